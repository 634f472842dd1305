"""OCI image archives made here, with no registry: the Debian base both Dockerfiles start from, and
one-layer images (the pause image) for the real nodes.

Docker Hub is unreachable from this machine, so `debian:bookworm-slim` is rebuilt the way it is made
upstream: `debootstrap --variant=minbase` from the Debian mirror apt already uses, then the same clean-up
(no apt lists or caches, no device nodes). Users building elsewhere pull the real one, pinned by digest
in the Dockerfiles.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from kubetune.devenv import paths

Log = Callable[[str], None]

BASE_SUITE = "bookworm"
BASE_REF = "docker.io/library/debian:bookworm-slim"
# Bump when the recipe below changes, so a cached base is rebuilt.
BASE_RECIPE = "3"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


class ImageError(RuntimeError):
    """An image step failed; the message says which and names its log."""


def images_dir() -> Path:
    return paths.cache_root() / "images"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def apt_mirror(sources: str) -> str:
    """The Debian mirror apt uses here (deb822 `URIs:` or one-line `deb URL suite`), else deb.debian.org.

    The base must come from the same mirror, since nothing else may be reachable."""
    for line in sources.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "URIs:" and "security" not in words[1]:
            return words[1]
        if len(words) >= 3 and words[0] == "deb" and "security" not in words[1]:
            return words[1]
    return DEFAULT_MIRROR


def _host_sources() -> str:
    texts = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            texts.append(p.read_text())
    return "\n".join(texts)


def image_config(
    diff_ids: list[str],
    *,
    env: list[str] | None = None,
    cmd: list[str] | None = None,
    entrypoint: list[str] | None = None,
    user: str | None = None,
    created_by: str = "kubetune devenv",
) -> dict:
    """An image config. `history` has one entry per layer: buildah refuses a base whose history does not
    account for its layers ("history lists 1 non-empty layers, but we have 2 layers on disk")."""
    cfg: dict = {"Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
    if cmd:
        cfg["Cmd"] = cmd
    if entrypoint:
        cfg["Entrypoint"] = entrypoint
    if user:
        cfg["User"] = user
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{d}" for d in diff_ids]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": created_by} for _ in diff_ids],
    }


def _add_blob(tar: tarfile.TarFile, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
    return digest, len(data)


def single_layer_archive(layer_tar: Path, ref: str, out: Path, config: dict | None = None) -> Path:
    """Write an OCI image-layout archive of one gzip layer made from `layer_tar` (an uncompressed tar).

    The index names the image twice: `org.opencontainers.image.ref.name` (what buildah and skopeo read)
    and `io.containerd.image.name` (what `ctr image import` names the image by)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    diff_id = _sha256_file(layer_tar)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        gz = Path(tmp) / "layer.tar.gz"
        # mtime=0: the same layer gives the same digest every time.
        with layer_tar.open("rb") as src, gzip.GzipFile(gz, "wb", compresslevel=1, mtime=0) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        layer_digest, layer_size = _sha256_file(gz), gz.stat().st_size
        cfg = json.dumps(config or image_config([diff_id]), sort_keys=True).encode()
        part = out.with_suffix(".part")
        with tarfile.open(part, "w") as tar:
            info = tarfile.TarInfo(f"blobs/sha256/{layer_digest}")  # no file mtime/owner: same bytes each time
            info.size, info.mode = layer_size, 0o644
            with gz.open("rb") as f:
                tar.addfile(info, f)
            cfg_digest, cfg_size = _add_blob(tar, cfg)
            manifest = {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": f"sha256:{cfg_digest}",
                    "size": cfg_size,
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": f"sha256:{layer_digest}",
                        "size": layer_size,
                    }
                ],
            }
            m_digest, m_size = _add_blob(tar, json.dumps(manifest, sort_keys=True).encode())
            index = {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": f"sha256:{m_digest}",
                        "size": m_size,
                        "annotations": {"org.opencontainers.image.ref.name": ref, "io.containerd.image.name": ref},
                    }
                ],
            }
            _add_blob_named(tar, "index.json", json.dumps(index).encode())
            _add_blob_named(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        part.rename(out)
    return out


def _add_blob_named(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


@contextlib.contextmanager
def lock(name: str) -> Iterator[None]:
    """One process at a time for `name` (a build, an export): the next one waits, then finds it cached."""
    with paths.file_lock(images_dir() / f".{name}.lock"):
        yield


# What debuerreotype's slimify gives the official `-slim` images: dpkg skips docs, man pages and locales
# (for every later apt-get install too), copyright files kept.
SLIM_DPKG_CFG = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
"""


def _slim(rootfs: Path) -> None:
    """What makes the official image `-slim` and reproducible: the dpkg excludes above (and what they
    exclude removed now), no apt lists or caches, no device nodes (the runtime mounts /dev), empty /proc,
    /sys, /tmp, /run."""
    (rootfs / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/dpkg/dpkg.cfg.d/docker").write_text(SLIM_DPKG_CFG)
    for sub in (
        "usr/share/info",
        "usr/share/lintian/overrides",
        "usr/share/locale",
        "usr/share/man",
        "usr/share/groff",
    ):
        if (rootfs / sub).is_dir():
            shutil.rmtree(rootfs / sub)
            (rootfs / sub).mkdir()
    for f in (rootfs / "usr/share/doc").rglob("*"):
        if (f.is_file() or f.is_symlink()) and f.name != "copyright":
            f.unlink()
    for sub in ("var/lib/apt/lists", "var/cache/apt", "var/log", "dev", "proc", "sys", "tmp", "run"):
        d = rootfs / sub
        if d.is_dir():
            for child in d.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    (rootfs / "tmp").mkdir(exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)


def debian_base(log: Log = print) -> Path:
    """The cached OCI archive of the Debian base (`BASE_REF`); built once (about a minute, ~200 MB)."""
    mirror = apt_mirror(_host_sources())
    key = hashlib.sha256(f"{BASE_SUITE} {mirror} {BASE_RECIPE}".encode()).hexdigest()[:12]
    out = images_dir() / f"debian-{BASE_SUITE}-minbase-{key}.oci.tar"
    if out.is_file():
        return out
    if os.geteuid() != 0:
        raise ImageError("building the Debian base needs root (debootstrap); run as root or build on a host that is")
    if shutil.which("debootstrap") is None:
        raise ImageError("debootstrap is missing: apt-get install --no-install-recommends debootstrap")
    with lock("debian-base"):
        if out.is_file():
            return out
        logf = images_dir() / "debian-base.log"
        log(f"building the Debian {BASE_SUITE} base (debootstrap --variant=minbase from {mirror}, ~1 min) ...")
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(dir=images_dir()) as tmp:
            rootfs = Path(tmp) / "rootfs"
            with logf.open("w") as lf:
                rc = subprocess.run(
                    ["debootstrap", "--variant=minbase", BASE_SUITE, str(rootfs), mirror],
                    stdout=lf,
                    stderr=subprocess.STDOUT,
                ).returncode
            if rc != 0:
                raise ImageError(f"debootstrap failed (exit {rc}); see {logf}")
            _slim(rootfs)
            layer = Path(tmp) / "layer.tar"
            # --numeric-owner: ownership as uids, the way image layers carry it; sorted for a stable digest.
            subprocess.run(
                [
                    "tar",
                    "--numeric-owner",
                    "--xattrs",
                    "--sort=name",
                    "--mtime=@0",
                    "-C",
                    str(rootfs),
                    "-cf",
                    str(layer),
                    ".",
                ],
                check=True,
            )
            cfg = image_config(
                [_sha256_file(layer)], cmd=["bash"], created_by=f"debootstrap --variant=minbase {BASE_SUITE} {mirror}"
            )
            single_layer_archive(layer, BASE_REF, out, cfg)
        log(f"built the Debian base in {time.monotonic() - t0:.0f} s: {out} ({out.stat().st_size >> 20} MiB)")
    return out
