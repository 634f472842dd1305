"""Pure renderers for the files the ground's processes read: token file, kubeconfig, scheduler config,
Prometheus config. No I/O here, so unit tests cover them without starting anything."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

ADMIN_USER = "kubetune-admin"
DEV_USER = "kubetune-dev"  # the non-admin user: only what RBAC grants it
DEV_GROUP = "kubetune:developers"
ADMIN_CONTEXT = "kubetune-dev"
DEV_CONTEXT = "kubetune-dev-user"


@dataclass(frozen=True)
class Token:
    token: str
    user: str
    uid: str
    groups: tuple[str, ...]


def tokens_csv(tokens: list[Token]) -> str:
    """kube-apiserver --token-auth-file: `token,user,uid,"group1,group2"` per line."""
    for t in tokens:
        for v in (t.token, t.user, t.uid, *t.groups):
            # The file is CSV with no escaping of these; reject what would silently split a field.
            if any(c in v for c in ',"\n') or not v:
                raise ValueError(f"invalid token field {v!r}")
    return "".join(f'{t.token},{t.user},{t.uid},"{",".join(t.groups)}"\n' for t in tokens)


def default_tokens(admin_secret: str, dev_secret: str) -> list[Token]:
    return [
        Token(admin_secret, ADMIN_USER, "kubetune-admin-uid", ("system:masters",)),
        Token(dev_secret, DEV_USER, "kubetune-dev-uid", (DEV_GROUP,)),
    ]


def kubeconfig(server: str, ca_pem: bytes, admin_token: str, dev_token: str) -> dict:
    """A kubeconfig with two contexts: the admin one (current) and the non-admin user's."""
    cluster = "kubetune-dev"
    ca = base64.b64encode(ca_pem).decode()
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [
            {"name": ADMIN_USER, "user": {"token": admin_token}},
            {"name": DEV_USER, "user": {"token": dev_token}},
        ],
        "contexts": [
            {"name": ADMIN_CONTEXT, "context": {"cluster": cluster, "user": ADMIN_USER}},
            {"name": DEV_CONTEXT, "context": {"cluster": cluster, "user": DEV_USER}},
        ],
        "current-context": ADMIN_CONTEXT,
        "preferences": {},
    }


def scheduler_config(kubeconfig_path: str) -> dict:
    # --kubeconfig is ignored once --config is given, so the connection goes here.
    return {
        "apiVersion": "kubescheduler.config.k8s.io/v1",
        "kind": "KubeSchedulerConfiguration",
        "clientConnection": {"kubeconfig": kubeconfig_path, "qps": 200, "burst": 400},
        "leaderElection": {"leaderElect": False},
    }


def prometheus_config(targets_file: str, scrape_interval: str = "5s") -> dict:
    """Scrape whatever host:port list targets_file holds; Prometheus re-reads it when it changes, so
    `kubetune dev prometheus --target` can add targets without a restart."""
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {"job_name": "kubetune", "file_sd_configs": [{"files": [targets_file], "refresh_interval": "5s"}]},
        ],
    }


def prometheus_targets(targets: list[str]) -> str:
    return json.dumps([{"targets": sorted(set(targets)), "labels": {"source": "kubetune-dev"}}], indent=1) + "\n"


def env_exports(values: dict[str, str]) -> str:
    """Shell `export` lines, single-quoted so any value survives `eval "$(kubetune dev env)"`."""

    def quote(v: str) -> str:
        return "'" + v.replace("'", "'\"'\"'") + "'"

    return "".join(f"export {k}={quote(v)}\n" for k, v in values.items())
