"""Pinned versions and the on-disk layout of the build cache and of the ground's state directory."""

from __future__ import annotations

import os
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


def cache_root() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune")


def bin_cache(component: str, version: str) -> Path:
    """Where one component's binaries live, keyed by version so several versions can coexist."""
    return cache_root() / "bin" / f"{component}-{version}"


def dev_dir() -> Path:
    """The ground's state: data, logs, pids, kubeconfig and tokens, all under one directory."""
    return Path(os.environ.get("KUBETUNE_DEV_DIR") or cache_root() / "dev")
