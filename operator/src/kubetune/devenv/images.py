"""Build the operator and trainer images from their Dockerfiles with buildah: no Docker daemon.

buildah (Debian's, `--isolation chroot`) builds each Dockerfile unchanged, with its layers kept in a
storage root under the cache, so an unchanged rebuild takes seconds and a code-only change rebuilds only
the code layers. The base is the debootstrap copy of debian:bookworm-slim (oci.py), passed as BASE_IMAGE.
The host's uv cache is shared into the trainer build, so torch's CUDA wheels are not downloaded again.
Images are tagged with the project's version, under the names the chart and the operator use.

    python -m kubetune.devenv.images [operator|trainer ...] [--archive]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path

from kubetune.devenv import oci, paths
from kubetune.devenv.build import APT_WAIT

Log = Callable[[str], None]

# The host's CA bundle goes in as the build secret `ca`: PyPI is reached through a TLS-intercepting proxy
# on machines like this one. Dockerfiles treat the secret as optional.
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
REGISTRY = "ghcr.io/kubetune"
APT_TOOLS = ("buildah", "runc", "debootstrap")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def version() -> str:
    try:
        return metadata.version("kubetune")
    except metadata.PackageNotFoundError:
        return "0.0.0"


@dataclass(frozen=True)
class Image:
    name: str  # operator | trainer
    dockerfile: str

    def ref(self, tag: str | None = None) -> str:
        return f"{REGISTRY}/{self.name}:{tag or version()}"


IMAGES = {
    "operator": Image("operator", "operator/Dockerfile"),
    "trainer": Image("trainer", "trainer-image/Dockerfile"),
}


def storage_dir() -> Path:
    """buildah's storage (layers and images), outside the repo; keyed by the storage driver's name."""
    return oci.images_dir() / "buildah-overlay"


def buildah_argv(*args: str) -> list[str]:
    root = storage_dir()
    return [
        "buildah",
        "--root",
        str(root / "root"),
        "--runroot",
        str(root / "run"),
        "--storage-driver",
        "overlay",
        *args,
    ]


def build_argv(image: Image, context: Path, base: str, uv_cache: Path | None, ca: Path | None) -> list[str]:
    """The `buildah build` command for one image (pure: what runs is what a test can read)."""
    argv = buildah_argv(
        "build",
        "--isolation",
        "chroot",
        "--pull=never",
        "--layers",
        "--force-rm",  # a failed step leaves no working container (nor its overlay mount) behind
        "-f",
        str(context / image.dockerfile),
        "-t",
        image.ref(),
        "--build-arg",
        f"BASE_IMAGE={base}",
    )
    if ca is not None:
        argv += ["--secret", f"id=ca,src={ca}"]
    if uv_cache is not None and image.name == "trainer":
        argv += ["-v", f"{uv_cache}:/uv-cache", "--build-arg", "UV_CACHE_DIR=/uv-cache"]
    return [*argv, str(context)]


def _ensure_tools(log: Log) -> None:
    missing = [t for t in APT_TOOLS if shutil.which(t) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise oci.ImageError(
            f"missing {', '.join(missing)}: apt-get install --no-install-recommends {' '.join(missing)}"
        )
    log(f"installing {' '.join(missing)} from Debian ...")
    for cmd in (["update", "-q"], ["install", "-y", "--no-install-recommends", *APT_TOOLS]):
        subprocess.run(["apt-get", *APT_WAIT, *cmd], check=True, stdout=subprocess.DEVNULL)


def _run_logged(argv: list[str], logf: Path, what: str) -> str:
    with logf.open("a") as lf:
        lf.write(f"$ {' '.join(argv)}\n")
        lf.flush()
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=lf, text=True)
        lf.write(p.stdout)
    if p.returncode != 0:
        raise oci.ImageError(f"{what} failed (exit {p.returncode}); see {logf}")
    return p.stdout


def image_id(ref: str) -> str | None:
    p = subprocess.run(
        buildah_argv("images", "--noheading", "--no-trunc", "--format", "{{.ID}}", ref), capture_output=True, text=True
    )
    return p.stdout.split()[0] if p.returncode == 0 and p.stdout.split() else None


def ensure_base(log: Log = _stderr) -> str:
    """The Debian base in buildah's storage, under the name BASE_IMAGE is given; returns that name."""
    archive = oci.debian_base(log)
    name = oci.BASE_REF
    tag = f"localhost/kubetune-base:{archive.stem.split('.')[0]}"  # which archive it came from
    if image_id(tag) is None:
        logf = oci.images_dir() / "buildah.log"
        img = _run_logged(buildah_argv("pull", "-q", f"oci-archive:{archive}"), logf, "importing the base").split()[-1]
        _run_logged(buildah_argv("tag", img, tag, name), logf, "tagging the base")
    return name


def build(names: Sequence[str], context: Path, log: Log = _stderr) -> dict[str, str]:
    """Build the named images; returns {name: image id}. Prints each step and its time. One build at a
    time (`make test` starts one before pytest, whose fixtures then find it done)."""
    with oci.lock("build"):
        return _build(names, context, log)


def _build(names: Sequence[str], context: Path, log: Log) -> dict[str, str]:
    _ensure_tools(log)
    storage_dir().mkdir(parents=True, exist_ok=True)
    base = ensure_base(log)
    uv_cache = _uv_cache()
    ca = HOST_CA if HOST_CA.is_file() else None
    ids = {}
    for name in names:
        image = IMAGES[name]
        logf = oci.images_dir() / f"build-{name}.log"
        logf.write_text("")
        log(f"building {image.ref()} from {image.dockerfile} (buildah; log {logf}) ...")
        t0 = time.monotonic()
        _run_logged(build_argv(image, context, base, uv_cache, ca), logf, f"building {image.ref()}")
        ids[name] = image_id(image.ref()) or ""
        log(f"built {image.ref()} in {time.monotonic() - t0:.0f} s ({size(image.ref())})")
    prune(log)
    return ids


# Another session on this machine (a demo beside `make test`) shares the storage and the tags: what it
# built and is still exporting or importing must survive this one's clean-up. Exports start right
# after a build and take about a minute, so anything younger than this is left for a later clean-up.
IN_USE_GRACE = 600.0


def stale_dangling(listing: list[dict], now: float, grace: float = IN_USE_GRACE) -> list[str]:
    """Of `buildah images --json --filter dangling=true` (untagged, no child: a superseded build's top),
    the IDs built more than `grace` seconds before `now`."""
    return [i["id"] for i in listing if not i.get("names") and now - float(i.get("created", now)) > grace]


_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)")


def _created(stamp: object) -> float | None:
    """containers/storage's `created` (Go's RFC 3339 with nanoseconds) as epoch seconds; None if unreadable."""
    m = _RFC3339.fullmatch(stamp) if isinstance(stamp, str) else None
    if m is None:
        return None
    frac = (m[2] or ".0")[:7]  # Python reads microseconds at most
    return datetime.fromisoformat(m[1] + frac + ("+00:00" if m[3] == "Z" else m[3])).timestamp()


def stale_containers(records: list[dict], now: float, grace: float = IN_USE_GRACE) -> list[str]:
    """Of the storage's containers.json, the IDs created more than `grace` seconds before `now`. Only
    builds make containers in this storage, one per RUN step, and `--force-rm` removes a failed step's;
    a build killed outright (SIGKILL, a CI timeout) leaves its step's container and overlay mount."""
    out = []
    for c in records:
        t = _created(c.get("created"))
        if t is not None and now - t > grace and isinstance(c.get("id"), str):
            out.append(c["id"])
    return out


def working_containers() -> list[dict]:
    """The storage's own record of its containers: `buildah containers --json` has no creation time."""
    try:
        records = json.loads((storage_dir() / "root" / "overlay-containers" / "containers.json").read_text())
    except (OSError, ValueError):
        return []
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


def prune(log: Log = _stderr) -> None:
    """Remove what killed and superseded builds left: a killed build's working containers, then the
    dangling images. Every code change leaves the previous build's code layers behind (the storage grew
    to 19 GB in one session). Only what is older than IN_USE_GRACE goes, so the current builds, their
    layer cache and another session's fresh build stay; a chain goes one image per prune. A failure
    costs disk, not the build: it is logged."""
    left = stale_containers(working_containers(), time.time(), IN_USE_GRACE)
    if left:
        p = subprocess.run(buildah_argv("rm", *left), capture_output=True, text=True)
        if p.returncode != 0:
            log(f"removing killed builds' working containers failed (kept): {p.stderr.strip()[-300:]}")
    p = subprocess.run(
        buildah_argv("images", "--json", "--no-trunc", "--filter", "dangling=true"), capture_output=True, text=True
    )
    try:
        stale = stale_dangling(json.loads(p.stdout or "[]"), time.time(), IN_USE_GRACE) if p.returncode == 0 else []
    except ValueError:
        stale = []
    if stale:
        p = subprocess.run(buildah_argv("rmi", *stale), capture_output=True, text=True)
    if p.returncode != 0:
        log(f"pruning superseded image layers failed (kept): {p.stderr.strip()[-300:]}")


def size(ref: str) -> str:
    """The image's unpacked size as buildah prints it (e.g. "280 MB")."""
    p = subprocess.run(buildah_argv("images", "--format", "{{.Size}}", ref), capture_output=True, text=True)
    return p.stdout.strip() or "?"


def _uv_cache() -> Path | None:
    p = subprocess.run(["uv", "cache", "dir"], capture_output=True, text=True) if shutil.which("uv") else None
    path = Path(p.stdout.strip()) if p is not None and p.returncode == 0 else None
    return path if path is not None and path.is_dir() else None


def archive(name: str, log: Log = _stderr) -> Path:
    """An OCI archive of a built image, for `ctr image import`; cached by image id (a rebuild that
    changed nothing reuses it)."""
    ref = IMAGES[name].ref()
    iid = image_id(ref)
    if iid is None:
        raise oci.ImageError(f"{ref} is not built: run make images")
    out = oci.images_dir() / "archives" / f"{name}-{iid.removeprefix('sha256:')[:16]}.oci.tar"
    with oci.lock(f"archive-{name}"):
        if not out.is_file():
            _export(name, iid, ref, out, log)
    return out


def _export(name: str, iid: str, ref: str, out: Path, log: Log) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in out.parent.glob(f"{name}-*.oci.tar"):
        if time.time() - old.stat().st_mtime > IN_USE_GRACE:  # another session may be importing a fresh one
            old.unlink(missing_ok=True)
    log(f"exporting {ref} to {out.name} ...")
    t0 = time.monotonic()
    # Written under a name of its own and renamed when whole: an interrupted export never looks cached.
    part = out.with_name(f"{out.name}.{os.getpid()}.part")
    _run_logged(
        # by ID: the tag may move to another session's build while this one exports
        buildah_argv("push", "-q", "--disable-compression", iid, f"oci-archive:{part}:{ref}"),
        oci.images_dir() / "buildah.log",
        f"exporting {ref}",
    )
    part.rename(out)
    log(f"exported {ref} in {time.monotonic() - t0:.0f} s ({out.stat().st_size >> 20} MiB)")


def archive_digest(path: Path) -> str:
    """The manifest digest an OCI archive's index names (what containerd lists the image under)."""
    with tarfile.open(path) as tar:  # uncompressed: reading the headers skips over the layers
        f = tar.extractfile("index.json")
        assert f is not None
        return json.load(f)["manifests"][0]["digest"]


def import_into(node_state: dict, name: str, log: Log = _stderr) -> bool:
    """Make a real node's containerd hold the current build of image `name`; False when it already did.

    The tag stays the project version across builds, so the check is by manifest digest, not by name."""
    from kubetune.devenv import node as rn

    ref = IMAGES[name].ref()
    arch = archive(name, log)
    want = archive_digest(arch)
    bin_dir = node_state.get("containerd_bin") or str(paths.bin_cache("containerd", paths.CONTAINERD_VERSION))
    listed = rn.ctr(bin_dir, f"{node_state['dir']}/ctrd.sock", "images", "ls").stdout.splitlines()
    if any(line.split()[:1] == [ref] and want in line.split() for line in listed):
        return False
    log(f"importing {ref} into {node_state['name']}'s containerd ...")
    t0 = time.monotonic()
    rn.import_image(node_state, arch)
    log(f"imported {ref} into {node_state['name']} in {time.monotonic() - t0:.0f} s")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kubetune.devenv.images", description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", metavar="IMAGE", help=f"which images ({', '.join(IMAGES)}); default all")
    ap.add_argument("--context", type=Path, default=Path.cwd(), help="the repository root (default: .)")
    ap.add_argument("--archive", action="store_true", help="also export OCI archives for ctr image import")
    args = ap.parse_args(argv)
    names = args.names or list(IMAGES)
    if unknown := [n for n in names if n not in IMAGES]:
        ap.error(f"unknown image {', '.join(unknown)}: choose from {', '.join(IMAGES)}")
    try:
        build(names, args.context)
        if args.archive:
            for name in names:
                print(archive(name))
    except (oci.ImageError, subprocess.CalledProcessError) as e:
        print(f"images: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
