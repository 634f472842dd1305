"""A cluster that reaches the Hugging Face Hub through a mirror (`kubetune operator --hf-endpoint`):
the operator estimates a non-catalog model from the mirror's config.json, trainer pods get the
mirror as HF_ENDPOINT, and a gated model waits with the Hub's refusal and the fix until its token is
given. The mirror is a real HTTP server (the hub_mirror fixture); the rest is the real ground."""
from __future__ import annotations

import pytest

from kubetune.devenv.ground import wait_until as wait_for
from kubetune.estimator import catalog

from opkit import SEEN_RUNNING, Operator, apply, cond, ftj, small_gpu_job, wait_phase

pytestmark = pytest.mark.integration

# Qwen2.5-0.5B's dimensions under names that are in no catalog: only the mirror knows them
CONFIG = {**catalog.lookup("hf://Qwen/Qwen2.5-0.5B")[1], "torch_dtype": "bfloat16"}


def test_models_come_from_the_operators_hub_mirror(ground, crds, ns, hub_mirror, tmp_path):
    hub_mirror.repos = {("acme/small-1b", "main"): (CONFIG, None), ("acme/gated-1b", "main"): (CONFIG, "hf_test")}
    op = Operator(tmp_path / "operator.log")
    op.start("--hf-endpoint", hub_mirror.url + "/")
    try:
        job = small_gpu_job("mirrored", delay=SEEN_RUNNING)
        job["spec"]["model"]["uri"] = "hf://acme/small-1b"
        apply(ground, ns, job)
        obj = wait_phase(ground, ns, "mirrored", "Running", 60)
        assert obj["status"]["estimate"]["perGpuBytes"] > 0
        assert ("/acme/small-1b/resolve/main/config.json", None) in hub_mirror.seen
        pod = ground.kubectl_json("get", "pods", "-n", ns, "-l", "kubetune.io/job=mirrored")["items"][0]
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["HF_ENDPOINT"] == hub_mirror.url  # the trailing slash dropped: huggingface_hub joins paths

        gated = small_gpu_job("gated", delay=SEEN_RUNNING)
        gated["spec"]["model"]["uri"] = "hf://acme/gated-1b"
        apply(ground, ns, gated)
        obj = wait_for("Validated=False", lambda: (lambda o: o if cond(o, "Validated").get("status") == "False"
                                                   else None)(ftj(ground, ns, "gated")), 60)
        c = cond(obj, "Validated")
        assert c["reason"] == "ModelConfigUnavailable" and obj["status"]["phase"] == "Pending"
        assert (f"the Hub mirror {hub_mirror.url} (--hf-endpoint) refused its config.json (HTTP 401): it is gated or "
                "private: set spec.model.tokenSecret to a Secret holding an HF_TOKEN with access") in c["message"]

        ground.kubectl("patch", "ftj", "gated", "-n", ns, "--type=merge", "-p",
                       '{"spec": {"model": {"tokenSecret": {"name": "hf-token"}}}}')
        wait_phase(ground, ns, "gated", "Running", 60)
        assert ("/acme/gated-1b/resolve/main/config.json", "Bearer hf_test") in hub_mirror.seen
    finally:
        ground.kubectl("delete", "ftj", "--all", "-n", ns, "--wait=false")
        wait_for("finalized", lambda: not ground.kubectl_json("get", "ftj", "-n", ns)["items"], 60)
        op.stop()
