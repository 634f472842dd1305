"""Image building without a daemon: the buildah command, the Debian mirror choice, and the OCI archives
written here (digests, the names ctr and buildah read, history per layer)."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from datetime import datetime, timezone
from pathlib import Path

import pytest

from kubetune.devenv import images, oci

CTX = Path("/src/kubetune")


def test_trainer_build_shares_the_uv_cache_and_the_ca_but_the_operator_gets_no_cache():
    t = images.build_argv(images.IMAGES["trainer"], CTX, "docker.io/library/debian:bookworm-slim",
                          Path("/root/.cache/uv"), Path("/etc/ssl/certs/ca-certificates.crt"))
    assert t[0] == "buildah" and t[t.index("--storage-driver") + 1] == "overlay"
    i = t.index("build")
    assert t[i + 1:i + 3] == ["--isolation", "chroot"] and "--pull=never" in t and "--layers" in t
    assert t[t.index("-f") + 1] == "/src/kubetune/trainer-image/Dockerfile"
    assert t[t.index("-t") + 1] == images.IMAGES["trainer"].ref() and images.IMAGES["trainer"].ref().startswith(
        "ghcr.io/kubetune/trainer:")
    assert "BASE_IMAGE=docker.io/library/debian:bookworm-slim" in t
    assert "id=ca,src=/etc/ssl/certs/ca-certificates.crt" in t
    assert "/root/.cache/uv:/uv-cache" in t and "UV_CACHE_DIR=/uv-cache" in t
    assert t[-1] == str(CTX)
    o = images.build_argv(images.IMAGES["operator"], CTX, "b", Path("/root/.cache/uv"), None)
    assert not any("uv-cache" in a for a in o) and "--secret" not in o


def test_images_are_tagged_with_the_project_version_under_the_names_the_chart_uses():
    chart = (Path(__file__).resolve().parents[2] / "charts/kubetune/values.yaml").read_text()
    for img in images.IMAGES.values():
        repo, _, tag = img.ref().rpartition(":")
        assert tag == images.version() and f"repository: {repo}" in chart


@pytest.mark.parametrize("sources,mirror", [
    ("Types: deb\nURIs: http://mirror.local/debian\nSuites: bookworm\n"
     "Types: deb\nURIs: http://mirror.local/debian-security\n", "http://mirror.local/debian"),
    ("deb http://deb.example/debian bookworm main\n", "http://deb.example/debian"),
    ("", oci.DEFAULT_MIRROR),
])
def test_the_base_comes_from_the_mirror_apt_uses(sources, mirror):
    assert oci.apt_mirror(sources) == mirror


def test_a_single_layer_archive_is_a_valid_oci_layout(tmp_path):
    layer = tmp_path / "layer.tar"
    with tarfile.open(layer, "w") as t:
        data = b"#!/bin/sh\necho hi\n"
        info = tarfile.TarInfo("bin/hello")
        info.size, info.mode = len(data), 0o755
        t.addfile(info, io.BytesIO(data))
    diff_id = hashlib.sha256(layer.read_bytes()).hexdigest()
    out = oci.single_layer_archive(layer, "localhost/hello:1", tmp_path / "hello.oci.tar",
                                   oci.image_config([diff_id], entrypoint=["/bin/hello"]))
    with tarfile.open(out) as t:
        blob = {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}
    assert json.loads(blob["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    (entry,) = json.loads(blob["index.json"])["manifests"]
    assert entry["annotations"] == {"org.opencontainers.image.ref.name": "localhost/hello:1",
                                    "io.containerd.image.name": "localhost/hello:1"}
    # every descriptor's digest and size match its blob
    manifest_bytes = blob[f"blobs/sha256/{entry['digest'].removeprefix('sha256:')}"]
    assert hashlib.sha256(manifest_bytes).hexdigest() == entry["digest"].removeprefix("sha256:")
    manifest = json.loads(manifest_bytes)
    for d in [manifest["config"], *manifest["layers"]]:
        b = blob[f"blobs/sha256/{d['digest'].removeprefix('sha256:')}"]
        assert (hashlib.sha256(b).hexdigest(), len(b)) == (d["digest"].removeprefix("sha256:"), d["size"])
    cfg = json.loads(blob[f"blobs/sha256/{manifest['config']['digest'].removeprefix('sha256:')}"])
    assert cfg["rootfs"]["diff_ids"] == [f"sha256:{diff_id}"]
    # buildah refuses a base whose history does not account for each layer
    assert len(cfg["history"]) == len(cfg["rootfs"]["diff_ids"]) == 1
    assert cfg["config"]["Entrypoint"] == ["/bin/hello"]
    # the same layer gives the same archive: reproducible digests
    again = oci.single_layer_archive(layer, "localhost/hello:1", tmp_path / "again.oci.tar",
                                     oci.image_config([diff_id], entrypoint=["/bin/hello"]))
    assert again.read_bytes() == out.read_bytes()


def test_slimming_keeps_copyrights_and_drops_docs_and_device_nodes(tmp_path):
    root = tmp_path / "rootfs"
    for f in ("usr/share/doc/bash/copyright", "usr/share/doc/bash/README.gz", "usr/share/man/man1/ls.1.gz",
              "var/lib/apt/lists/deb.debian.org_dists", "dev/null-like", "etc/os-release"):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("x")
    oci._slim(root)
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert left == ["etc/dpkg/dpkg.cfg.d/docker", "etc/os-release", "usr/share/doc/bash/copyright"]
    assert "path-exclude /usr/share/doc/*" in (root / "etc/dpkg/dpkg.cfg.d/docker").read_text()
    assert (root / "tmp").stat().st_mode & 0o1777 == 0o1777


def test_unknown_image_names_are_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        images.main(["trainr"])
    assert e.value.code == 2
    assert "unknown image trainr: choose from operator, trainer" in capsys.readouterr().err


def test_builds_and_exports_run_one_at_a_time(tmp_path, monkeypatch):
    """`make test` builds the images while pytest's fixtures may ask for the same build: the second
    caller waits for the first (then finds it cached) instead of running buildah beside it."""
    import threading
    import time

    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path))
    spans: list[tuple[float, float]] = []

    def slow_build(names, context, log):
        t0 = time.monotonic()
        time.sleep(0.3)
        spans.append((t0, time.monotonic()))
        return {}

    monkeypatch.setattr(images, "_build", slow_build)
    threads = [threading.Thread(target=images.build, args=(["trainer"], tmp_path)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (a0, a1), (b0, b1) = sorted(spans)
    assert b0 >= a1, f"two builds overlapped: {spans}"


def test_only_superseded_builds_older_than_the_grace_are_pruned():
    """Dangling (untagged, no child) images go once older than IN_USE_GRACE: a session beside this one
    may still be exporting what it built a minute ago (seen: a CI run's prune removed a demo's fresh
    build mid-export, "image not known")."""
    now = 1_000_000.0
    listing = [
        {"id": "old", "names": [], "created": now - images.IN_USE_GRACE - 1},
        {"id": "fresh", "names": [], "created": now - 60},
        {"id": "tagged", "names": ["ghcr.io/kubetune/trainer:0.1.0"], "created": now - 10 * images.IN_USE_GRACE},
    ]
    assert images.stale_dangling(listing, now) == ["old"]
    assert images.stale_dangling([], now) == []


def test_a_killed_builds_working_containers_go_once_older_than_the_grace():
    """containers/storage writes `created` as Go's RFC 3339 with nanoseconds, in UTC or with an offset."""
    now = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc).timestamp()
    records = [
        {"id": "killed", "names": ["a-working-container"], "created": "2026-12-03T11:40:00.123456789Z"},
        {"id": "offset", "created": "2026-12-03T12:40:00.5+01:00"},  # 11:40 UTC
        {"id": "running", "created": "2026-12-03T11:59:00.000000001Z"},
        {"id": "unreadable", "created": "yesterday"},
        {"id": "no-stamp"},
        {"created": "2026-12-03T11:00:00Z"},  # no id: nothing to remove
    ]
    assert images.stale_containers(records, now) == ["killed", "offset"]
    assert images.stale_containers(records, now, grace=30) == ["killed", "offset", "running"]


def test_a_failed_prune_is_logged_not_raised(monkeypatch, tmp_path):
    ran, logged = [], []
    store = tmp_path / "root" / "overlay-containers"
    store.mkdir(parents=True)
    (store / "containers.json").write_text('[{"id": "c1", "created": "2020-01-01T00:00:00Z"}]')
    monkeypatch.setattr(images, "storage_dir", lambda: tmp_path)

    def run(argv, **kw):
        ran.append(argv)
        if "images" in argv:
            return images.subprocess.CompletedProcess(argv, 0, '[{"id": "sha256:ab", "names": [], "created": 1}]', "")
        return images.subprocess.CompletedProcess(argv, 125, "", "in use")

    monkeypatch.setattr(images.subprocess, "run", run)
    images.prune(logged.append)
    assert ran[0][-2:] == ["rm", "c1"] and "--root" in ran[0]
    assert ran[1][-5:] == ["images", "--json", "--no-trunc", "--filter", "dangling=true"]
    assert ran[2][-2:] == ["rmi", "sha256:ab"] and "--all" not in ran[2] and "--root" in ran[2]
    assert logged == [
        "removing killed builds' working containers failed (kept): in use",
        "pruning superseded image layers failed (kept): in use",
    ]
