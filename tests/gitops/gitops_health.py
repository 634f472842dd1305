"""Evaluate kubetune's GitOps health checks as Argo CD and Flux do, through the Go harness beside this
file (gopher-lua and cel-go), built on first use and cached by its source hash."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import yaml

from kubetune.devenv.paths import cache_root

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "tests" / "gitops" / "healthcheck"
ARGO = REPO / "integrations" / "argocd" / "kubetune.io" / "FineTuneJob"
FLUX = REPO / "integrations" / "flux" / "kustomization.yaml"


def harness() -> Path:
    src = b"".join((HARNESS / f).read_bytes() for f in ("main.go", "go.mod", "go.sum"))
    out = cache_root() / "bin" / f"healthcheck-{hashlib.sha256(src).hexdigest()[:12]}"
    if not out.exists():
        env = {**os.environ, "CGO_ENABLED": "0", "GOTOOLCHAIN": "local", "GOWORK": "off",
               "GOFLAGS": "-mod=readonly -buildvcs=false"}
        tmp = out.with_name(out.name + f".{os.getpid()}")
        subprocess.run(["go", "build", "-o", str(tmp), "."], cwd=HARNESS, env=env, check=True, timeout=600)
        os.replace(tmp, out)
    return out


def evaluate(request: dict) -> list[dict]:
    res = subprocess.run([str(harness())], input=json.dumps(request), capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise RuntimeError(f"healthcheck harness: {res.stderr}")
    return json.loads(res.stdout)


def argocd(objects: list[dict]) -> list[dict]:
    return evaluate({"argocd": (ARGO / "health.lua").read_text(), "objects": objects})


def flux(objects: list[dict]) -> list[dict]:
    (check,) = [c for c in yaml.safe_load(FLUX.read_text())["spec"]["healthCheckExprs"]
                if (c["apiVersion"], c["kind"]) == ("kubetune.io/v1alpha1", "FineTuneJob")]
    return evaluate({"flux": {k: check.get(k, "") for k in ("current", "failed", "inProgress")}, "objects": objects})
