"""Pinned versions and the on-disk layout of the build cache and of the ground's state directory."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

# One Kubernetes version for apiserver, controller-manager, scheduler and kubectl. The fallback is used
# when the first refuses to build (see build.py); both are served by the Go module proxy.
KUBERNETES_VERSIONS = ("v1.37.2", "v1.36.3")
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.22.0"
# s3s-fs 0.15+ needs a newer rustc than the one here (1.95); 0.14.1 has every call boto3 makes.
S3S_FS_VERSION = "0.14.1"

KUBE_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")

# Real nodes (devenv/node.py): containerd from its Go module, the kubelet of the ground's Kubernetes
# version (its own cache entry, so adding it did not invalidate the cached control plane), and a pause
# image built here (no registry.k8s.io).
CONTAINERD_VERSION = "v2.4.2"
CONTAINERD_BINARIES = ("containerd", "ctr", "containerd-shim-runc-v2")
PAUSE_VERSION = "3.10"
PAUSE_IMAGE = f"localhost/pause:{PAUSE_VERSION}"
# Cluster DNS for the real nodes' pods: CoreDNS from its Go module, with only the plugins the ground's
# Corefile uses (devenv/build.py COREDNS_PLUGINS), so no cloud SDK is compiled and no forwarder exists.
COREDNS_VERSION = "v1.15.0"
# What a real node needs from Debian: the runtime, the CNI plugins, iptables (the kubelet's and CNI's
# rules), nftables (`nft` deletes the tables iptables-nft created, on `down`), gcc to compile the pause
# binary statically (libc6-dev brings the static libc).
REAL_NODE_PACKAGES = {
    "runc": "/usr/sbin/runc",
    "containernetworking-plugins": "/usr/lib/cni/bridge",
    "iptables": "/usr/sbin/iptables",
    "nftables": "/usr/sbin/nft",
    "gcc": "/usr/bin/gcc",
    "libc6-dev": "/usr/lib/x86_64-linux-gnu/libc.a",
}


def cache_root() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune")


def bin_cache(component: str, version: str) -> Path:
    """Where one component's binaries live, keyed by version so several versions can coexist."""
    return cache_root() / "bin" / f"{component}-{version}"


def dev_dir() -> Path:
    """The ground's state: data, logs, pids, kubeconfig and tokens, all under one directory."""
    return Path(os.environ.get("KUBETUNE_DEV_DIR") or cache_root() / "dev")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """One process at a time (flock on ``path``, made with its folder): the next waits, then usually
    finds the work done. The kernel drops the lock when a holder dies, so a killed build never wedges it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
