"""The children of a run: names, labels, owner references, security, affinity, failure policy."""
from __future__ import annotations

import copy

import yaml

from kubetune.api.v1alpha1 import Resolved, TrainerConfig
from kubetune.api.validation import parse_spec
from kubetune.controller import manifests as m
from kubetune.controller.placement import Placement

SPEC = {
    "model": {"uri": "hf://meta-llama/Llama-3.1-8B"},
    "dataset": {"uri": "s3://data/train.jsonl"},
    "method": {"type": "lora"},
    "training": {"maxSteps": 10, "microBatchSize": "auto"},
    "storage": {"endpoint": "http://minio:9000", "region": "eu-west-1", "credentialsSecret": {"name": "s3"}},
    "checkpoints": {"uri": "s3://ckpt/runs"},
    "resources": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                  "priorityClassName": "high"},
    "runPolicy": {"queueName": "team-a", "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 600},
}
RID = m.RunIdentity("ml", "demo", "uid-1", 2)
PLACED = Placement(True, "Placed", "ok", micro_batch_size=4, estimate_bytes=20 * 2**30, resource="nvidia.com/gpu",
                   gpu_product="NVIDIA-L4", gpu_memory_mib=23034, min_gpu_memory_mib=21505,
                   preferred_nodes=("kwok-l4-0", "kwok-l4-1"))
RESOLVED = Resolved(micro_batch_size=4, gradient_accumulation_steps=2, num_processes=1)


def spec(**over):
    s = copy.deepcopy(SPEC)
    for k, v in over.items():
        s[k] = {**s.get(k, {}), **v}
    return parse_spec(s)


def kids(s=None, placement=PLACED):
    return {o["kind"]: o for o in m.children(s or spec(), RID, RESOLVED, placement)}


def test_deterministic_names_labels_and_owner():
    k = kids()
    assert list(k) == ["ConfigMap", "Job"]
    assert k["Job"]["metadata"]["name"] == "demo-r2" and k["ConfigMap"]["metadata"]["name"] == "demo-r2-config"
    for obj in k.values():
        md = obj["metadata"]
        assert md["namespace"] == "ml"
        assert md["labels"]["kubetune.io/job"] == "demo" and md["labels"]["kubetune.io/run"] == "2"
        assert md["ownerReferences"] == [{"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "demo",
                                          "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}]
    assert kids() == kids()  # pure


def test_trainer_config_round_trips_and_paths():
    cm = kids()["ConfigMap"]
    cfg = TrainerConfig.model_validate(yaml.safe_load(cm["data"]["trainer.yaml"]))
    assert cfg.spec == spec() and cfg.resolved == RESOLVED and cfg.job.run == 2
    assert cfg.paths.checkpoints_uri == "s3://ckpt/runs/ml/demo/run-2/checkpoints/"
    assert cfg.paths.progress_uri == "s3://ckpt/runs/ml/demo/run-2/progress.json"
    assert cfg.paths.output_uri == "s3://ckpt/runs/ml/demo/run-2/final/"
    assert cm["immutable"] is True
    out = m.children(spec(output={"uri": "s3://models/out/"}), RID, RESOLVED, PLACED)[0]
    assert TrainerConfig.model_validate(yaml.safe_load(out["data"]["trainer.yaml"])).paths.output_uri == \
        "s3://models/out/ml/demo/run-2/"


def test_job_gpu_affinity_and_scheduling_fields():
    job = kids()["Job"]
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1" and c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    req = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    # bf16 (the default precision) keeps off GPUs older than Ampere; a node without GFD's label still matches
    assert req == [{"matchExpressions": [
        {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["21504"]},
        {"key": "nvidia.com/gpu.compute.major", "operator": "NotIn", "values": ["1", "2", "3", "4", "5", "6", "7"]},
    ]}]
    for precision in ("fp16", "fp32"):
        pod = kids(spec(training={"precision": precision}))["Job"]["spec"]["template"]["spec"]
        req = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert req == [{"matchExpressions": [{"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["21504"]}]}]
    prefs = pod["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert [p["preference"]["matchExpressions"][0]["values"] for p in prefs] == [["kwok-l4-0"], ["kwok-l4-1"]]
    assert prefs[0]["weight"] > prefs[1]["weight"]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "high"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["activeDeadlineSeconds"] == 3600 and job["spec"]["ttlSecondsAfterFinished"] == 600
    assert job["spec"]["backoffLimit"] == 3 and pod["restartPolicy"] == "Never"


def test_pod_failure_policy_ignores_disruption():
    rules = kids()["Job"]["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert rules[1]["action"] == "FailJob" and 137 in rules[1]["onExitCodes"]["values"]


def test_restricted_security_context_and_s3_env():
    pod = kids()["Job"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
                                    "seccompProfile": {"type": "RuntimeDefault"}}
    env = {e["name"]: e for e in c["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {"secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "AWS_SECRET_ACCESS_KEY"
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio:9000" and env["AWS_REGION"]["value"] == "eu-west-1"
    assert not any("value" in e and "secret" in e["name"].lower() and e["value"] for e in c["env"])


def test_a_gated_hf_model_gets_its_token_from_the_secret_and_nowhere_else():
    pod = kids(spec(model={"tokenSecret": {"name": "hf"}}))["Job"]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}}
    pod = kids(spec(model={"tokenSecret": {"name": "hf", "key": "token"}}))["Job"]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "token"
    assert "HF_TOKEN" not in {e["name"] for e in kids()["Job"]["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_extra_env_from_the_operator_and_the_job_the_job_winning_for_the_same_name():
    defaults = m.PodDefaults(env=(("HTTPS_PROXY", "http://proxy:3128"), ("NCCL_DEBUG", "WARN")))
    s = spec(resources={"env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "NO_PROXY", "value": ".svc"}]})
    env = {o["kind"]: o for o in m.children(s, RID, RESOLVED, PLACED, defaults)}["Job"]["spec"]["template"]["spec"]
    env = env["containers"][0]["env"]
    extra = [e for e in env if e["name"] in ("HTTPS_PROXY", "NCCL_DEBUG", "NO_PROXY")]
    assert extra == [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}, {"name": "NCCL_DEBUG", "value": "INFO"},
                     {"name": "NO_PROXY", "value": ".svc"}]
    assert len({e["name"] for e in env}) == len(env)  # no name twice: nothing silently overridden


def test_a_private_ca_bundle_is_mounted_beside_the_config_and_named_by_aws_ca_bundle():
    pod = kids(spec(storage={"caBundle": {"name": "corp-ca", "key": "bundle.pem"}}))["Job"]["spec"]["template"]["spec"]
    ca = {"name": "ca", "configMap": {"name": "corp-ca", "items": [{"key": "bundle.pem", "path": "ca.crt"}]}}
    assert ca in pod["volumes"]
    c = pod["containers"][0]
    assert {"name": "ca", "mountPath": m.CA_MOUNT, "readOnly": True} in c["volumeMounts"]
    assert not m.CA_MOUNT.startswith(m.CONFIG_MOUNT + "/")  # no mount point inside the read-only config volume
    assert {"name": "AWS_CA_BUNDLE", "value": f"{m.CA_MOUNT}/ca.crt"} in c["env"]
    plain = kids()["Job"]["spec"]["template"]["spec"]
    assert "ca" not in {v["name"] for v in plain["volumes"]}
    assert "AWS_CA_BUNDLE" not in {e["name"] for e in plain["containers"][0]["env"]}


def test_workload_identity_runs_the_trainer_as_the_named_service_account():
    pod = kids(spec(storage={"serviceAccountName": "trainer-s3"}))["Job"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "trainer-s3"
    assert "serviceAccountName" not in kids()["Job"]["spec"]["template"]["spec"]  # the namespace's default


def test_pvc_models_and_data_are_mounted_read_only_where_the_trainer_reads_them():
    st = __import__("pytest").importorskip("kubetune_trainer.storage")
    s = spec(model={"uri": "pvc://models/llama-3.1-8b"},
             dataset={"uri": "pvc://datasets/alpaca/train.jsonl", "validationUri": "pvc://datasets/alpaca/val.jsonl"})
    assert m.volume_claims(s) == {"models": "spec.model.uri", "datasets": "spec.dataset.uri"}
    pod = kids(s)["Job"]["spec"]["template"]["spec"]
    mounts = {v["name"]: v for v in pod["containers"][0]["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    for claim in ("models", "datasets"):
        name = next(n for n, v in vols.items() if v.get("persistentVolumeClaim", {}).get("claimName") == claim)
        assert vols[name]["persistentVolumeClaim"]["readOnly"] is True and mounts[name]["readOnly"] is True
        assert mounts[name]["mountPath"] == f"{m.PVC_ROOT}/{claim}"
    # the trainer (KUBETUNE_PVC_ROOT in its image) resolves the URIs to paths under those mounts
    assert str(st.local_path_of("pvc://models/llama-3.1-8b")) == f"{m.PVC_ROOT}/models/llama-3.1-8b"
    assert not any("persistentVolumeClaim" in v for v in kids()["Job"]["spec"]["template"]["spec"]["volumes"])


def test_multi_node_is_indexed_with_headless_service():
    s = spec(resources={"nodes": 2, "gpusPerNode": 8})
    k = kids(s, PLACED)
    assert list(k) == ["ConfigMap", "Service", "Job"]
    svc, job = k["Service"], k["Job"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"kubetune.io/job": "demo", "kubetune.io/run": "2"}
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == "demo-r2"
    # one rank per node, as placement counted nodes (8-GPU nodes could otherwise take both 1-GPU ranks)
    (anti,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti == {"labelSelector": {"matchLabels": {"kubetune.io/job": "demo", "kubetune.io/run": "2"}},
                    "topologyKey": "kubernetes.io/hostname"}
    assert "podAntiAffinity" not in (kids(spec(), PLACED)["Job"]["spec"]["template"]["spec"].get("affinity") or {})
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["MASTER_ADDR"]["value"] == "demo-r2-0.demo-r2.ml.svc" and env["NNODES"]["value"] == "2"
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_cpu_run_has_no_gpu_request_and_avoids_gpu_nodes():
    cpu = Placement(True, "CPUOnly", "cpu", micro_batch_size=4, estimate_bytes=1)
    pod = kids(spec(resources={"gpusPerNode": 0}), cpu)["Job"]["spec"]["template"]["spec"]
    assert not any(k.startswith("nvidia.com/") for k in pod["containers"][0]["resources"]["limits"])
    pref = pod["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert pref["preference"]["matchExpressions"][0] == {"key": "nvidia.com/gpu.present", "operator": "DoesNotExist"}


def test_mig_slice_requests_the_mig_resource_without_memory_affinity():
    mig = Placement(True, "Placed", "mig", micro_batch_size=1, estimate_bytes=1, resource="nvidia.com/mig-1g.10gb",
                    gpu_product="A100-MIG-1g.10gb", gpu_memory_mib=9728, min_gpu_memory_mib=8000,
                    preferred_nodes=("kwok-a100-mig-0",))
    pod = kids(spec(training={"precision": "fp16"}), mig)["Job"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/mig-1g.10gb"] == "1"
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in pod["affinity"]["nodeAffinity"]


def test_image_override_and_suspend():
    job = kids(spec(runPolicy={"image": "registry.local/trainer:dev", "suspend": True,
                               "imagePullSecrets": ["registry-creds"]}))["Job"]
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/trainer:dev"
    assert job["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "registry-creds"}]
    assert "imagePullSecrets" not in kids()["Job"]["spec"]["template"]["spec"]
    assert job["spec"]["suspend"] is True


def test_the_operators_defaults_give_the_image_and_the_hub_mirror_and_the_job_can_override_the_image():
    mirror = m.PodDefaults(image="registry.local/trainer:1", hf_endpoint="https://hf-mirror.internal")
    c = {o["kind"]: o for o in m.children(spec(), RID, RESOLVED, PLACED, mirror)}["Job"]["spec"]["template"]["spec"]
    c = c["containers"][0]
    assert c["image"] == "registry.local/trainer:1"
    assert {"name": "HF_ENDPOINT", "value": "https://hf-mirror.internal"} in c["env"]
    own = {o["kind"]: o for o in m.children(spec(runPolicy={"image": "mine:2"}), RID, RESOLVED, PLACED, mirror)}
    assert own["Job"]["spec"]["template"]["spec"]["containers"][0]["image"] == "mine:2"
    c = kids()["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == m.DEFAULT_IMAGE and "HF_ENDPOINT" not in {e["name"] for e in c["env"]}


def test_the_pod_requests_local_disk_for_its_work_dir_but_sets_no_limit():
    def resources(s, resolved):
        job = {o["kind"]: o for o in m.children(s, RID, resolved, PLACED)}["Job"]
        return job["spec"]["template"]["spec"]["containers"][0]["resources"]

    r = resources(spec(), RESOLVED.model_copy(update={"ephemeral_storage_bytes": 25 * 2**30 + 1}))
    assert r["requests"]["ephemeral-storage"] == "26Gi" and "ephemeral-storage" not in r["limits"]
    r = resources(spec(resources={"ephemeralStorage": "500Gi"}),
                  RESOLVED.model_copy(update={"ephemeral_storage_bytes": 2**30}))
    assert r["requests"]["ephemeral-storage"] == "500Gi"  # the user's wins
    assert "ephemeral-storage" not in resources(spec(), RESOLVED)["requests"]  # a config from before the field
