"""Build the ground's binaries from the package registries and cache them, keyed by version.

Nothing here downloads a prebuilt binary: the Kubernetes components, etcd, kwok and helm are compiled from
Go modules (proxy.golang.org is reachable, GitHub releases are not) and the S3 server from crates.io.
Each component is built into a temporary directory that is renamed into place only when complete, so an
interrupted build never looks cached. Builds run one after another (2 cores here) under a file lock, so two
`kubetune dev up` at once don't both compile.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kubetune.devenv import paths

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class BuildError(RuntimeError):
    """A component failed to build; the message names the log file with the compiler's output."""


@dataclass(frozen=True)
class Component:
    name: str
    version: str
    binaries: tuple[str, ...]

    @property
    def dir(self) -> Path:
        return paths.bin_cache(self.name, self.version)

    def cached(self) -> bool:
        return all((self.dir / b).is_file() for b in self.binaries)


# --- running the toolchains ---------------------------------------------------------------------------


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    # Static binaries that run anywhere; the local toolchain only (GOTOOLCHAIN=auto would try to download
    # another Go); -mod=mod lets the wrapper modules resolve their requirements as they build.
    env.update(CGO_ENABLED="0", GOTOOLCHAIN="local", GOFLAGS="-mod=mod -buildvcs=false", GOWORK="off")
    return env


def _run(cmd: list[str], cwd: Path, log_file: Path, env: dict[str, str] | None = None) -> str:
    """Run a build step, appending its output to log_file; raise BuildError pointing at it on failure."""
    with log_file.open("a") as log:
        log.write(f"$ {' '.join(cmd)}  (in {cwd})\n")
        log.flush()
        proc = subprocess.run(
            cmd, cwd=cwd, env=env or _go_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        log.write(proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise BuildError(f"{cmd[0]} {cmd[1]} failed (exit {proc.returncode}); full log: {log_file}\n{tail}")
    return proc.stdout


def _go_mod_json(module_at_version: str, cwd: Path, log_file: Path) -> dict:
    return json.loads(_run(["go", "mod", "download", "-json", module_at_version], cwd, log_file))


def _new_module(work: Path, name: str, log_file: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    _run(["go", "mod", "init", name], work, log_file)


# --- per-component recipes ----------------------------------------------------------------------------


def staging_replaces(gomod_text: str, version: str) -> list[str]:
    """k8s.io/kubernetes replaces its staging modules with ./staging/src/... paths, which `go build` refuses
    in a dependency (golang/go#44840). Map each to its published tag: v1.37.2 -> v0.37.2."""
    published = "v0" + version[version.index(".") :]
    out = []
    for line in gomod_text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "=>" and parts[2].startswith("./staging/"):
            out.append(f"-replace={parts[0]}={parts[0]}@{published}")
    return out


def kube_ldflags(version: str) -> str:
    """Stamp the version (kubernetes hack/lib/version.sh), else /version says v0.0.0-master and Helm's
    kubeVersion checks fail."""
    major, minor = version.lstrip("v").split(".")[:2]
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
        ]
    return " ".join(flags)


def _go_build_each(
    c: Component, out: Path, work: Path, log_file: Path, log: Log, cmd_pkg: str, flags: list[str]
) -> None:
    """`go build` each of the component's binaries from `<cmd_pkg>/<binary>` in the wrapper module, timed."""
    for binary in c.binaries:
        t0 = time.monotonic()
        _run(
            ["go", "build", "-p", "2", "-trimpath", *flags, "-o", str(out / binary), f"{cmd_pkg}/{binary}"],
            work,
            log_file,
        )
        log(f"  {binary}: {time.monotonic() - t0:.0f}s")


def _build_kubernetes(c: Component, out: Path, work: Path, log_file: Path, log: Log) -> None:
    _new_module(work, "kubetune.local/k8swrap", log_file)
    info = _go_mod_json(f"k8s.io/kubernetes@{c.version}", work, log_file)
    replaces = staging_replaces(Path(info["GoMod"]).read_text(), c.version)
    _run(["go", "mod", "edit", f"-require=k8s.io/kubernetes@{c.version}", *replaces], work, log_file)
    _go_build_each(c, out, work, log_file, log, "k8s.io/kubernetes/cmd", ["-ldflags", kube_ldflags(c.version)])


def _build_etcd(c: Component, out: Path, work: Path, log_file: Path, log: Log) -> None:
    # etcd's main package is the root of go.etcd.io/etcd/server/v3, whose go.mod has replace lines; a
    # wrapper module that merely requires it builds it from the published modules.
    _new_module(work, "kubetune.local/etcdwrap", log_file)
    _run(["go", "mod", "edit", f"-require=go.etcd.io/etcd/server/v3@{c.version}"], work, log_file)
    _run(
        [
            "go",
            "build",
            "-p",
            "2",
            "-trimpath",
            "-ldflags",
            "-s -w",
            "-o",
            str(out / "etcd"),
            "go.etcd.io/etcd/server/v3",
        ],
        work,
        log_file,
    )


def _go_install(pkg: str, out: Path, work: Path, log_file: Path, ldflags: str = "-s -w") -> None:
    env = _go_env() | {"GOBIN": str(out)}
    work.mkdir(parents=True, exist_ok=True)
    _run(["go", "install", "-p", "2", "-trimpath", "-ldflags", ldflags, pkg], work, log_file, env)


def _build_kwok(c: Component, out: Path, work: Path, log_file: Path, log: Log) -> None:
    _go_install(
        f"sigs.k8s.io/kwok/cmd/kwok@{c.version}",
        out,
        work,
        log_file,
        f"-s -w -X sigs.k8s.io/kwok/pkg/consts.Version={c.version.lstrip('v')}",
    )


def _build_helm(c: Component, out: Path, work: Path, log_file: Path, log: Log) -> None:
    _go_install(
        f"helm.sh/helm/v3/cmd/helm@{c.version}",
        out,
        work,
        log_file,
        f"-s -w -X helm.sh/helm/v3/internal/version.version={c.version}",
    )


def _build_s3s_fs(c: Component, out: Path, work: Path, log_file: Path, log: Log) -> None:
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ) | {"CARGO_BUILD_JOBS": "2", "CARGO_TARGET_DIR": str(work / "target")}
    _run(
        [
            "cargo",
            "install",
            "s3s-fs",
            "--version",
            c.version,
            "--features",
            "binary",
            "--locked",
            "--root",
            str(work / "root"),
        ],
        work,
        log_file,
        env,
    )
    shutil.copy2(work / "root" / "bin" / "s3s-fs", out / "s3s-fs")
    shutil.rmtree(work / "target", ignore_errors=True)  # hundreds of MB of intermediates


def containerd_ldflags(version: str) -> str:
    """Stamp the version (containerd's Makefile does the same), so `containerd --version` and the CRI's
    runtime version name it instead of a placeholder."""
    return f"-s -w -X github.com/containerd/containerd/v2/version.Version={version}"


def _build_containerd(c: Component, out: Path, work: Path, log_file: Path, log: Log) -> None:
    # A wrapper module, as for etcd: `go install ...@version` of containerd's commands refuses its replace
    # lines. no_btrfs: the btrfs snapshotter needs cgo headers, and the real nodes use overlayfs.
    _new_module(work, "kubetune.local/containerdwrap", log_file)
    _run(["go", "mod", "edit", f"-require=github.com/containerd/containerd/v2@{c.version}"], work, log_file)
    flags = ["-tags", "no_btrfs", "-ldflags", containerd_ldflags(c.version)]
    _go_build_each(c, out, work, log_file, log, "github.com/containerd/containerd/v2/cmd", flags)


# The sandbox ("pause") container's only process: sleep until told to stop. registry.k8s.io is out of
# reach, so it is compiled here; static, so the image needs nothing but this one file.
PAUSE_C = r"""
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
int main(void) {
    struct sigaction sa = {0};
    sa.sa_handler = stop;
    if (sigaction(SIGTERM, &sa, NULL) < 0 || sigaction(SIGINT, &sa, NULL) < 0) return 1;
    for (;;) pause();
}
"""


def _build_pause(c: Component, out: Path, work: Path, log_file: Path, log: Log) -> None:
    from kubetune.devenv import oci  # only here: the rest of the build needs no image code

    shutil.rmtree(work, ignore_errors=True)
    rootfs = work / "rootfs"
    rootfs.mkdir(parents=True)
    (work / "pause.c").write_text(PAUSE_C)
    _run(
        ["gcc", "-static", "-O2", "-o", str(rootfs / "pause"), str(work / "pause.c")], work, log_file, dict(os.environ)
    )
    shutil.copy2(rootfs / "pause", out / "pause")
    layer = work / "layer.tar"
    _run(
        [
            "tar",
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "--mtime=@0",
            "-C",
            str(rootfs),
            "-cf",
            str(layer),
            "pause",
        ],
        work,
        log_file,
        dict(os.environ),
    )
    cfg = oci.image_config([oci._sha256_file(layer)], entrypoint=["/pause"])
    oci.single_layer_archive(layer, paths.PAUSE_IMAGE, out / "pause.oci.tar", cfg)
    shutil.rmtree(work, ignore_errors=True)


# CoreDNS with only the plugins the ground's Corefile uses (node.corefile), in the execution order of
# upstream's plugin.cfg (dnsserver.Directives must be ordered). Upstream's main imports every plugin, which
# drags in the AWS, Azure, GCP and Datadog SDKs; this main is the documented compile-time plugin selection
# (coremain.Run with dnsserver.Directives set), and without `forward` no query can leave the host.
COREDNS_PLUGINS = ("bind", "ready", "health", "errors", "log", "kubernetes")


def coredns_main(plugins: tuple[str, ...] = COREDNS_PLUGINS) -> str:
    """The wrapper module's main.go: CoreDNS's coremain with exactly `plugins`, in that order."""
    imports = "".join(f'\t_ "github.com/coredns/coredns/plugin/{p}"\n' for p in plugins)
    directives = "".join(f'\t\t"{p}",\n' for p in plugins)
    return (
        "package main\n\nimport (\n"
        '\t"github.com/coredns/coredns/core/dnsserver"\n'
        '\t"github.com/coredns/coredns/coremain"\n'
        f"{imports})\n\n"
        f"func init() {{\n\tdnsserver.Directives = []string{{\n{directives}\t}}\n}}\n\n"
        "func main() { coremain.Run() }\n"
    )


def _build_coredns(c: Component, out: Path, work: Path, log_file: Path, log: Log) -> None:
    _new_module(work, "kubetune.local/corednswrap", log_file)
    _run(["go", "mod", "edit", f"-require=github.com/coredns/coredns@{c.version}"], work, log_file)
    (work / "main.go").write_text(coredns_main())
    _run(["go", "build", "-p", "2", "-trimpath", "-ldflags", "-s -w", "-o", str(out / "coredns"), "."], work, log_file)


RECIPES = {
    "kubernetes": _build_kubernetes,
    "kubelet": _build_kubernetes,
    "containerd": _build_containerd,
    "pause": _build_pause,
    "coredns": _build_coredns,
    "etcd": _build_etcd,
    "kwok": _build_kwok,
    "helm": _build_helm,
    "s3s-fs": _build_s3s_fs,
}


def components(kube_version: str) -> list[Component]:
    return [
        Component("etcd", paths.ETCD_VERSION, ("etcd",)),
        Component("kubernetes", kube_version, paths.KUBE_BINARIES),
        Component("kwok", paths.KWOK_VERSION, ("kwok",)),
        Component("helm", paths.HELM_VERSION, ("helm",)),
        Component("s3s-fs", paths.S3S_FS_VERSION, ("s3s-fs",)),
    ]


# --- orchestration ------------------------------------------------------------------------------------


def build_one(c: Component, log: Log = _stderr) -> float:
    """Build one component unless cached; returns the seconds spent (0 when cached)."""
    if c.cached():
        return 0.0
    logs = paths.cache_root() / "build" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_file = logs / f"{c.name}-{c.version}.log"
    tmp = c.dir.with_name(c.dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"building {c.name} {c.version} (log: {log_file})")
    t0 = time.monotonic()
    try:
        RECIPES[c.name](c, tmp, paths.cache_root() / "build" / f"{c.name}-{c.version}", log_file, log)
        seconds = time.monotonic() - t0
        (tmp / "BUILD_INFO.json").write_text(
            json.dumps(
                {
                    "component": c.name,
                    "version": c.version,
                    "seconds": round(seconds),
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                indent=1,
            )
            + "\n"
        )
        shutil.rmtree(c.dir, ignore_errors=True)
        tmp.rename(c.dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"built {c.name} {c.version} in {seconds:.0f}s")
    return seconds


def _kube_component(log: Log) -> Component:
    """The first Kubernetes version that is cached or builds; a failure is reported, then the next tried."""
    candidates = [components(v)[1] for v in paths.KUBERNETES_VERSIONS]
    for c in candidates:
        if c.cached():
            return c
    errors = []
    for c in candidates:
        try:
            build_one(c, log)
            return c
        except BuildError as e:
            log(f"kubernetes {c.version} failed to build, trying the next version: {e}")
            errors.append(str(e))
    raise BuildError("no Kubernetes version built:\n" + "\n".join(errors))


def ensure_all(log: Log = _stderr) -> dict[str, Component]:
    """Every component, built if missing; keyed by component name."""
    with paths.file_lock(paths.cache_root() / "build.lock"):
        kube = _kube_component(log)
        out = {}
        for c in components(kube.version):
            if c.name != "kubernetes":
                build_one(c, log)
            out[c.name] = kube if c.name == "kubernetes" else c
        return out


def real_node_components(kube_version: str) -> list[Component]:
    """What a real node runs, beside the control plane: the kubelet of the same version, containerd,
    the pause image, and CoreDNS for the pods' cluster DNS."""
    return [
        Component("kubelet", kube_version, ("kubelet",)),
        Component("containerd", paths.CONTAINERD_VERSION, paths.CONTAINERD_BINARIES),
        Component("pause", paths.PAUSE_VERSION, ("pause", "pause.oci.tar")),
        Component("coredns", paths.COREDNS_VERSION, ("coredns",)),
    ]


# `make test` builds the images beside the ground's binaries, and both may apt-get install at once:
# the second waits for dpkg's lock instead of failing on it.
APT_WAIT = ("-o", "DPkg::Lock::Timeout=600")


def missing_packages(packages: dict[str, str] = paths.REAL_NODE_PACKAGES) -> list[str]:
    """The Debian packages whose marker file is absent."""
    return sorted(pkg for pkg, marker in packages.items() if not Path(marker).exists())


def ensure_packages(log: Log = _stderr) -> None:
    """Install what a real node needs from Debian when root (as `kubetune dev prometheus` does), else say
    what is missing."""
    missing = missing_packages()
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BuildError(f"real nodes need these Debian packages: apt-get install {' '.join(missing)}")
    log(f"installing Debian packages for real nodes: {' '.join(missing)}")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["update", "-q"], ["install", "-y", "-q", "--no-install-recommends", *missing]):
        cmd = ["apt-get", *APT_WAIT, *cmd]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}")


def ensure_real_node(kube_version: str, log: Log = _stderr) -> dict[str, Component]:
    """The real-node components for this Kubernetes version, built if missing; keyed by name."""
    ensure_packages(log)
    with paths.file_lock(paths.cache_root() / "build.lock"):
        out = {}
        for c in real_node_components(kube_version):
            build_one(c, log)
            out[c.name] = c
        return out


def cached_components() -> dict[str, Component] | None:
    """The cached set without building anything, or None when something is missing."""
    for v in paths.KUBERNETES_VERSIONS:
        cs = components(v)
        if all(c.cached() for c in cs):
            return {c.name: c for c in cs}
    return None
