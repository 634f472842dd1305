"""The trainer image's Dockerfile and pins, checked without a Docker engine (there is none here): every
package it installs is pinned, the pins satisfy pyproject's ranges, and this test environment runs
exactly the pinned versions (the Makefile installs with the same constraints)."""
from __future__ import annotations

import re
import shlex
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "trainer-image" / "Dockerfile"


def instructions(dockerfile: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        buf += line.rstrip("\\").rstrip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "trainer-image" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            out[canonicalize_name(name)] = version
    return out


def installed_by_dockerfile() -> list[str]:
    names = []
    for word, args in instructions():
        if word != "RUN" or "uv pip install" not in args:
            continue
        for cmd in args.split("&&"):
            toks = shlex.split(cmd.split(";")[-1])
            while toks and "=" in toks[0]:  # VAR=value prefixes
                toks = toks[1:]
            if toks[:3] != ["uv", "pip", "install"]:
                continue
            skip = False
            for t in toks[3:]:
                if skip:
                    skip = False
                elif t in ("-c", "-r", "--constraint", "--python"):
                    skip = True
                elif not t.startswith("-") and not t.startswith("."):
                    names.append(canonicalize_name(t))
    return names


def test_every_package_the_image_installs_is_pinned():
    p = pins()
    names = installed_by_dockerfile()
    assert "torch" in names and "bitsandbytes" in names and "liger-kernel" in names
    missing = [n for n in names if n not in p]
    assert not missing, f"trainer-image/Dockerfile installs {missing} without a pin in constraints.txt"
    # every pip install of the image goes through the constraints
    for word, args in instructions():
        if word == "RUN" and "uv pip install" in args and "--no-deps" not in args:
            assert args.count("uv pip install") == args.count("-c trainer-image/constraints.txt"), args


def test_pins_satisfy_the_pyproject_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["trainer"]]
    p = pins()
    for r in reqs:
        name = canonicalize_name(r.name)
        if name in p:
            assert r.specifier.contains(p[name], prereleases=True), f"pin {name}=={p[name]} is outside pyproject's {r}"
    assert {canonicalize_name(r.name) for r in reqs if canonicalize_name(r.name) in
            ("torch", "transformers", "peft", "accelerate", "boto3", "pydantic")} <= set(p)


def test_this_environment_runs_the_pinned_versions():
    """What the CPU tests prove holds for the image only if they ran the same versions."""
    wrong = {}
    for name, version in pins().items():
        try:
            got = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # e.g. the operator-only env; the trainer tests need the [trainer] extra anyway
        if got.split("+")[0] != version:
            wrong[name] = (got, version)
    if "torch" not in {canonicalize_name(d.metadata["Name"]) for d in metadata.distributions()}:
        pytest.skip("no trainer extra in this environment")
    assert not wrong, f"installed vs pinned: {wrong}; run `make test` (it installs with trainer-image/constraints.txt)"


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, ROOT / "operator" / "Dockerfile"], ids=["trainer", "operator"])
def test_both_images_start_from_bookworm_slim_pinned_by_digest(dockerfile):
    """torch's wheels carry CUDA, so no CUDA base image; users get the base pinned by digest, and the
    build may substitute its own copy (make images builds one with debootstrap) through BASE_IMAGE."""
    ins = instructions(dockerfile)
    assert ins[0][0] == "ARG" and ins[1] == ("FROM", "${BASE_IMAGE}"), ins[:2]
    default = ins[0][1].removeprefix("BASE_IMAGE=")
    assert re.fullmatch(r"docker\.io/library/debian:bookworm-slim@sha256:[0-9a-f]{64}", default), default
    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users


def test_the_image_runs_as_non_root_with_the_trainer_entry_point():
    ins = instructions()
    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert ins[-2:] == [("ENTRYPOINT", '["kubetune", "train"]'), ("CMD", '["--config", "/etc/kubetune/trainer.yaml"]')]


def test_the_working_directory_is_not_under_a_volume_the_job_mounts():
    """Found on a real kubelet: with WORKDIR /tmp/kubetune under the Job's emptyDir at /tmp, the runtime
    created the directory root-owned inside the volume and the trainer (uid 1000) failed at once with
    `Permission denied: '/tmp/kubetune/model'`. KWOK and host-process pods could not show it."""
    from kubetune.controller import manifests
    from tests.unit.test_manifests import kids

    workdir = [a for w, a in instructions() if w == "WORKDIR"][-1]
    job = kids()["Job"]
    mounts = [m["mountPath"] for c in job["spec"]["template"]["spec"]["containers"] for m in c["volumeMounts"]]
    assert "/tmp" in mounts and manifests.WORK_DIR.startswith("/tmp/")
    under = [m for m in mounts if workdir == m or workdir.startswith(m.rstrip("/") + "/")]
    assert not under, f"trainer-image/Dockerfile WORKDIR {workdir} lies under the Job's volume mount(s) {under}"


def test_the_operator_mounts_what_the_image_expects():
    """The operator's config mount and metrics port are the image's CMD and EXPOSE."""
    from kubetune.controller import manifests

    ins = dict(instructions())
    assert f"{manifests.CONFIG_MOUNT}/{manifests.CONFIG_KEY}" in ins["CMD"]
    assert ins["EXPOSE"] == str(manifests.METRICS_PORT)
    assert any(f"--uid {manifests.UID}" in a for w, a in instructions() if w == "RUN")
    assert ins["USER"] == f"{manifests.UID}:{manifests.UID}"


def test_the_dependency_layer_installs_everything_the_package_needs():
    """The image installs kubetune itself with --no-deps, so its dependency layer must name every
    requirement of the base and [trainer] extras (a missing one would only fail at run time)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["trainer"]
    needed = {canonicalize_name(Requirement(r).name) for r in requirements}
    missing = needed - set(installed_by_dockerfile())
    assert not missing, f"trainer-image/Dockerfile does not install {sorted(missing)}"
    assert any("--no-deps" in a and '".[trainer]"' in a for w, a in instructions() if w == "RUN")


@pytest.mark.tools
def test_the_pins_resolve_for_the_image_python_and_platform():
    """What `uv pip install -c constraints.txt ...` in the image resolves to, without building it: the base
    image's Python (Debian bookworm: 3.11) on manylinux x86_64, from the package index."""
    import shutil
    import subprocess

    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed (the Makefile installs it)")
    names = installed_by_dockerfile()
    r = subprocess.run([uv, "pip", "compile", "--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28",
                        "-c", str(ROOT / "trainer-image" / "constraints.txt"), "-"],
                       input="\n".join(names), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    resolved = dict(line.split("==", 1) for line in r.stdout.splitlines() if "==" in line and not line.startswith("#"))
    resolved = {canonicalize_name(k): v.split()[0] for k, v in resolved.items()}
    for name, version in pins().items():
        assert resolved.get(name) == version, (name, resolved.get(name), version)
    assert "triton" in resolved and any(k.startswith("nvidia-") for k in resolved), "not the CUDA build of torch"
