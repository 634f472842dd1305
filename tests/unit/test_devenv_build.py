"""Pure parts of the Go builds: the staging replace list and the version stamp."""
from kubetune.devenv import build, paths

GOMOD = """module k8s.io/kubernetes

go 1.26.0

require (
\tk8s.io/api v0.0.0
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
\tk8s.io/cri-streaming => ./staging/src/k8s.io/cri-streaming
\tgithub.com/other/mod => github.com/fork/mod v1.2.3
)
"""


def test_staging_replaces_map_to_published_tags():
    assert build.staging_replaces(GOMOD, "v1.37.2") == [
        "-replace=k8s.io/api=k8s.io/api@v0.37.2",
        "-replace=k8s.io/client-go=k8s.io/client-go@v0.37.2",
        "-replace=k8s.io/cri-streaming=k8s.io/cri-streaming@v0.37.2",
    ]


def test_kube_ldflags_stamp_both_version_packages():
    flags = build.kube_ldflags("v1.36.3")
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        assert f"-X {pkg}.gitVersion=v1.36.3" in flags
        assert f"-X {pkg}.gitMajor=1" in flags
        assert f"-X {pkg}.gitMinor=36" in flags


def test_cache_is_keyed_by_component_and_version(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path))
    c = build.components("v1.37.2")[1]
    assert c.dir == tmp_path / "bin" / "kubernetes-v1.37.2"
    assert not c.cached()
    c.dir.mkdir(parents=True)
    for b in paths.KUBE_BINARIES:
        (c.dir / b).write_text("")
    assert c.cached()


def test_versions_meet_the_floor():
    for v in paths.KUBERNETES_VERSIONS:
        assert tuple(int(x) for x in v.lstrip("v").split(".")[:2]) >= (1, 35)
    assert paths.ETCD_VERSION.startswith("v3.6.")


def test_real_node_components_are_keyed_by_version(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path))
    comps = {c.name: c for c in build.real_node_components("v1.37.2")}
    assert comps["kubelet"].dir == tmp_path / "bin" / "kubelet-v1.37.2"
    assert comps["containerd"].dir == tmp_path / "bin" / f"containerd-{paths.CONTAINERD_VERSION}"
    assert set(comps["containerd"].binaries) == {"containerd", "ctr", "containerd-shim-runc-v2"}
    assert "pause.oci.tar" in comps["pause"].binaries
    assert comps["coredns"].dir == tmp_path / "bin" / f"coredns-{paths.COREDNS_VERSION}"
    assert set(comps) <= set(build.RECIPES)


def test_containerd_version_is_stamped():
    assert "-X github.com/containerd/containerd/v2/version.Version=v2.4.2" in build.containerd_ldflags("v2.4.2")


def test_missing_packages_are_named(tmp_path):
    present = tmp_path / "here"
    present.write_text("")
    assert build.missing_packages({"a": str(present), "b": str(tmp_path / "absent")}) == ["b"]


def test_pause_source_exits_on_term_and_int():
    assert "SIGTERM" in build.PAUSE_C and "SIGINT" in build.PAUSE_C and "pause()" in build.PAUSE_C


def test_coredns_main_has_only_the_plugins_the_corefile_uses():
    src = build.coredns_main()
    assert "coremain.Run()" in src
    imported = [line.split('"')[1].rsplit("/", 1)[1] for line in src.splitlines() if "/plugin/" in line]
    assert imported == list(build.COREDNS_PLUGINS)
    assert "kubernetes" in imported and "bind" in imported and "ready" in imported
    assert "forward" not in imported  # no query can leave the host
    directives = src[src.index("Directives"):]
    assert [p for p in build.COREDNS_PLUGINS if f'"{p}"' in directives] == list(build.COREDNS_PLUGINS)


def test_dev_build_runs_on_the_bare_interpreter(repo):
    """`make test` compiles the ground beside the env's install (Makefile ground-build), so `kubetune dev
    build` and everything it imports must need nothing outside the standard library."""
    import subprocess
    import sys

    code = (
        "import sys; sys.path.insert(0, 'operator/src');"
        "import kubetune.cli, kubetune.devenv.cli, kubetune.devenv.build, kubetune.devenv.ground;"
        "from kubetune.cli import build_parser; build_parser('dev').parse_args(['dev', 'build'])"
    )
    # -S: no site-packages (nothing pip installed), -E: no PYTHONPATH from the test's environment.
    p = subprocess.run([sys.executable, "-S", "-E", "-c", code], cwd=repo, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
