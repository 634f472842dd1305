"""Real trainer pods, in the trainer image on the ground's real kubelet node: what only a process that
really talks to S3 shows, beyond what KWOK's pretend pods can."""
from __future__ import annotations

import json

import pytest

from kubetune.devenv.ground import wait_until as wait_for
from kubetune.errors import UNTRUSTED_S3
from kubetune_trainer.tiny import preference_rows

from opkit import apply, cond, ftj, job_on_node, wait_ftj, wait_phase

pytestmark = pytest.mark.integration



def _tiny_job(name: str, ground, node: dict, endpoint: str | None = None, steps: int = 6) -> dict:
    obj = job_on_node(ground, node, name, steps, save=3, endpoint=endpoint)
    obj["spec"]["training"] |= {"evalSteps": 3}
    return obj


def _gateway(ground) -> str:
    """The real nodes' bridge address: where a listener on this host is reachable from the pods."""
    return ground.state["real_nodes"]["pod_endpoints"]["s3"].split("//", 1)[1].rsplit(":", 1)[0]


def test_a_run_against_an_s3_endpoint_only_a_private_ca_verifies(ground, operator, real_node, ns, tls_proxy):
    """spec.storage.caBundle end to end: the operator reads the model's config.json and the trainer's
    progress over https, and the trainer downloads the model and data, uploads checkpoints and the
    adapter, all through an endpoint whose certificate only the ConfigMap's CA verifies."""
    proxy = tls_proxy(int(ground.state["s3"]["endpoint"].rsplit(":", 1)[1]), _gateway(ground))
    ground.kubectl("create", "configmap", "s3-ca", "-n", ns, f"--from-file=ca.crt={proxy.ca_file}")
    obj = _tiny_job("private-ca", ground, real_node, proxy.url)
    obj["spec"]["storage"]["caBundle"] = {"name": "s3-ca"}
    apply(ground, ns, obj)
    done = wait_phase(ground, ns, "private-ca", "Succeeded", 300)

    m = done["status"]["result"]["metrics"]
    assert m["steps"] == 6 and m["evalLoss"] < m["baseEvalLoss"], m
    assert done["status"]["checkpoints"]["latestStep"] == 6
    # the quickstart holds out a test set: base vs tuned on it, and the A/B report beside the outputs
    ev = done["status"]["result"]["evaluation"]
    assert ev["examples"] == 80 and ev["tuned"]["loss"] < ev["base"]["loss"] and ev["headline"], ev
    for uri, want in ((done["status"]["checkpoints"]["latestUri"], "manifest.json"),
                      (done["status"]["result"]["adapterUri"], "adapter_model.safetensors"),
                      (done["status"]["result"]["reportUri"].rsplit("/", 1)[0], "report.html")):
        bucket, _, key = uri[len("s3://"):].partition("/")
        got = {o["Key"] for o in ground.s3().list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/")["Contents"]}
        assert f"{key.rstrip('/')}/{want}" in got, (uri, got)
    print(f"\nprivate CA: {proxy.handshakes} TLS sessions verified, {proxy.refused} refused; run ended at step "
          f"{m['steps']}, eval loss {m['baseEvalLoss']:.2f} -> {m['evalLoss']:.2f}")
    assert proxy.handshakes >= 2 and proxy.refused == 0  # the operator's and the trainer's (boto3 keeps them open)



def test_without_the_ca_bundle_the_job_says_to_set_it(ground, operator, real_node, ns, tls_proxy):
    """The same endpoint without spec.storage.caBundle: the operator, reading config.json, names the
    field; with an inline architecture (nothing for the operator to read) the trainer meets the
    certificate first and the run fails with the same advice, not a retry loop."""
    proxy = tls_proxy(int(ground.state["s3"]["endpoint"].rsplit(":", 1)[1]), _gateway(ground))
    apply(ground, ns, _tiny_job("no-ca", ground, real_node, proxy.url))
    got = wait_for("ModelConfigUnavailable", lambda: (lambda o: o if cond(o, "Validated").get("reason") ==
                                                      "ModelConfigUnavailable" else None)(ftj(ground, ns, "no-ca")), 60)
    msg = cond(got, "Validated")["message"]
    assert ("config.json: the S3 endpoint's TLS certificate is not trusted (certificate verify failed): set "
            "spec.storage.caBundle to a ConfigMap holding the CA that signed it") in msg, msg

    obj = _tiny_job("no-ca-trainer", ground, real_node, proxy.url)
    obj["spec"]["model"]["architecture"] = {  # the tiny Llama's (the vocabulary only sizes the estimate)
        "modelType": "llama", "hiddenSize": 64, "numHiddenLayers": 2, "numAttentionHeads": 4, "numKeyValueHeads": 2,
        "intermediateSize": 128, "vocabSize": 512}
    apply(ground, ns, obj)
    failed = wait_phase(ground, ns, "no-ca-trainer", "Failed", 120)
    c = cond(failed, "Failed")
    assert c["reason"] == "BadConfig", c  # exit 2: the Job fails at once instead of retrying the pod
    assert c["message"].startswith(f"run 1 failed: cannot list s3://kubetune-models/tiny-llama: {UNTRUSTED_S3}"), c
    job = ground.kubectl_json("get", "job", "-n", ns, "-l", "kubetune.io/job=no-ca-trainer")["items"][0]
    assert job["status"].get("failed") == 1, job["status"]
    print(f"\nno caBundle: {c['message']}")


def test_sft_then_dpo_from_its_merged_output(ground, operator, real_node, ns):
    """The pipeline docs/objectives.md describes, as two FineTuneJobs applied at once: SFT with a merged
    output, and DPO whose model.uri is that merged directory. The DPO job waits (its config.json is not
    there yet) until the SFT job has written it, then trains on preference pairs to Succeeded, with the
    reward metrics in status.progress, in the result's base-vs-tuned A/B and in the operator's /metrics."""
    rows = preference_rows(32, seed=4)
    ground.s3().put_object(Bucket="kubetune-data", Key="prefs/train.jsonl",
                           Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    sft = _tiny_job("chain-sft", ground, real_node)
    sft["spec"]["output"] = {"uri": "s3://kubetune/outputs/", "mergeAdapter": True}
    lora8 = {"type": "lora", "lora": {"rank": 8, "alpha": 16, "targetModules": ["all-linear"]}}
    sft["spec"]["method"] = lora8
    sft["spec"]["training"]["learningRate"] = 2e-2
    merged = f"s3://kubetune/outputs/{ns}/chain-sft/run-1/merged/"  # <output.uri>/<namespace>/<name>/run-<n>/
    dpo = _tiny_job("chain-dpo", ground, real_node, steps=24)
    spec = dpo["spec"]
    spec["model"]["uri"] = merged
    spec["objective"] = {"type": "dpo", "beta": 0.5}
    spec["method"] = lora8
    del spec["evaluation"]  # the quickstart's SFT prompts; this job's A/B is the reward accuracy below
    # The toy pairs are memorized, not generalized: the A/B is taken on the training pairs (as in
    # tests/trainer/test_objectives_trainer.py), where reward accuracy must rise.
    spec["dataset"] = {"uri": "s3://kubetune-data/prefs/train.jsonl", "format": "preference", "maxSeqLength": 64,
                       "validationUri": "s3://kubetune-data/prefs/train.jsonl"}
    spec["training"] |= {"microBatchSize": 4, "evalSteps": 12, "loggingSteps": 4, "learningRate": 2e-2}
    spec["checkpoints"] |= {"saveSteps": 12}
    apply(ground, ns, sft)
    apply(ground, ns, dpo)

    unavailable = lambda o: cond(o, "Validated").get("reason") == "ModelConfigUnavailable"  # noqa: E731
    waiting = wait_ftj(ground, ns, "chain-dpo", unavailable, 60, "the DPO job waiting for the merged config.json")
    assert merged + "config.json" in cond(waiting, "Validated")["message"], cond(waiting, "Validated")
    done_sft = wait_phase(ground, ns, "chain-sft", "Succeeded", 300)
    assert done_sft["status"]["result"]["mergedUri"] == merged, done_sft["status"]["result"]

    done = wait_phase(ground, ns, "chain-dpo", "Succeeded", 420)
    m = done["status"]["result"]["metrics"]
    progress = done["status"]["progress"]["metrics"]
    print(f"\nSFT -> DPO: DPO from {merged}; reward accuracy {m['baseRewardAccuracy']:.2f} -> "
          f"{m['rewardAccuracy']:.2f}, margin {m['baseRewardMargin']:.3f} -> {m['rewardMargin']:.3f}, eval loss "
          f"{m['baseEvalLoss']:.4f} -> {m['evalLoss']:.4f}; last step's metrics {progress}")
    assert m["steps"] == 24 and m["rewardAccuracy"] > 0.9 and m["rewardMargin"] > m["baseRewardMargin"], m
    assert m["evalLoss"] < m["baseEvalLoss"], m
    assert {"rewardAccuracy", "rewardMargin", "rewardsChosen", "rewardsRejected"} <= set(progress), progress
    series = f'kubetune_training_objective_metric{{metric="rewardAccuracy",name="chain-dpo",namespace="{ns}"}} '
    scraped = [s for s in operator.metrics().splitlines() if s.startswith(series)]
    assert len(scraped) == 1 and float(scraped[0][len(series):]) == progress["rewardAccuracy"], scraped
