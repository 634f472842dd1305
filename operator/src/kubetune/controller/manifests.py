"""The children of a FineTuneJob run, built as plain dicts: trainer ConfigMap, batch/v1 Job and,
for multi-node runs, a headless Service for rendezvous.

Pure: same inputs, same objects. Names are deterministic (<name>-r<run>), so creating them again
is a no-op ("already exists" is success) and a restarted operator finds what it made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

# exit codes the Job fails on at once, and the SIGTERM grace: facts shared with the trainer
from kubetune.api.constants import (
    BF16_MIN_COMPUTE_MAJOR,
    BF16_PRECISIONS,
    GRACE_SECONDS,
    NON_RETRYABLE_EXIT_CODES,
    OOM_EXIT_CODES,
)
from kubetune.api.v1alpha1 import (
    API_VERSION,
    KIND,
    FineTuneJobSpec,
    JobRef,
    Resolved,
    TrainerConfig,
    TrainerPaths,
)
from kubetune.controller.fleet import GPU_RESOURCE, LABEL_COMPUTE_MAJOR, LABEL_MEMORY, LABEL_PRODUCT
from kubetune.controller.placement import Placement

LABEL_JOB = "kubetune.io/job"
LABEL_RUN = "kubetune.io/run"
# the Job controller's annotation on each pod of an Indexed Job: a multi-node run's rank
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
DEFAULT_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"
CONFIG_KEY = "trainer.yaml"
CONFIG_MOUNT = "/etc/kubetune"
# spec.storage.caBundle, as AWS_CA_BUNDLE=CA_MOUNT/ca.crt; beside CONFIG_MOUNT, not in it: a mount point
# cannot be made inside a read-only ConfigMap volume
CA_MOUNT = "/etc/kubetune-ca"
WORK_DIR = "/tmp/kubetune"
RENDEZVOUS_PORT = 29500
METRICS_PORT = 9090
UID = 1000


@dataclass(frozen=True)
class PodDefaults:
    """Cluster-wide settings of `kubetune operator` that every trainer pod gets."""

    image: str = DEFAULT_IMAGE
    # A Hugging Face Hub mirror (air-gapped clusters, a caching proxy): the trainer's huggingface_hub
    # reads HF_ENDPOINT, and the operator reads config.json from the same place.
    hf_endpoint: str | None = None
    # --trainer-env: what every trainer pod of the cluster needs (proxies, NCCL settings); a job's
    # spec.resources.env wins for the same name.
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RunIdentity:
    namespace: str
    name: str
    uid: str
    run: int

    @property
    def base(self) -> str:
        return f"{self.name}-r{self.run}"

    @property
    def job_name(self) -> str:
        return self.base

    @property
    def config_name(self) -> str:
        return f"{self.base}-config"

    @property
    def service_name(self) -> str:
        return self.base

    def selector(self) -> dict[str, str]:
        """The labels that pick out this run's pods (the headless Service, the ranks' anti-affinity)."""
        return {LABEL_JOB: self.name, LABEL_RUN: str(self.run)}

    def labels(self) -> dict[str, str]:
        return {
            **self.selector(),
            "app.kubernetes.io/name": "kubetune-trainer",
            "app.kubernetes.io/managed-by": "kubetune",
        }

    def owner_reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def metadata(self, name: str, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": {**self.labels(), **(extra_labels or {})},
            "ownerReferences": [self.owner_reference()],
        }


def _join(prefix: str, *parts: str) -> str:
    return prefix.rstrip("/") + "/" + "/".join(p.strip("/") for p in parts) + "/"


def job_prefix(spec: FineTuneJobSpec, namespace: str, name: str) -> str:
    """Where all of a FineTuneJob's checkpoints live, every run included."""
    return _join(spec.checkpoints.uri, namespace, name)


def run_paths(spec: FineTuneJobSpec, rid: RunIdentity) -> TrainerPaths:
    run_prefix = job_prefix(spec, rid.namespace, rid.name) + f"run-{rid.run}/"
    output = (
        _join(spec.output.uri, rid.namespace, rid.name, f"run-{rid.run}") if spec.output.uri else run_prefix + "final/"
    )
    return TrainerPaths(
        checkpoints_uri=run_prefix + "checkpoints/",
        output_uri=output,
        progress_uri=run_prefix + "progress.json",
        work_dir=WORK_DIR,
    )


def trainer_config(spec: FineTuneJobSpec, rid: RunIdentity, resolved: Resolved) -> TrainerConfig:
    return TrainerConfig(
        job=JobRef(namespace=rid.namespace, name=rid.name, uid=rid.uid, run=rid.run),
        spec=spec,
        resolved=resolved,
        paths=run_paths(spec, rid),
        metrics_port=METRICS_PORT,
    )


def config_map(cfg: TrainerConfig, rid: RunIdentity) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": rid.metadata(rid.config_name),
        "data": {CONFIG_KEY: yaml.safe_dump(cfg.dump(), sort_keys=False)},
        "immutable": True,  # a run's config never changes; a spec change makes a new run
    }


def headless_service(rid: RunIdentity) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": rid.metadata(rid.service_name),
        "spec": {
            "clusterIP": "None",
            "selector": rid.selector(),
            # rank 0 must be resolvable before every pod is Ready, or rendezvous deadlocks
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


def _affinity(spec: FineTuneJobSpec, placement: Placement) -> dict[str, Any] | None:
    if placement.resource is None:
        # CPU run: keep GPU nodes free for GPU work when any other node can take it.
        return {
            "nodeAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "preference": {
                            "matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "DoesNotExist"}]
                        },
                    }
                ]
            }
        }
    required: list[dict[str, Any]] = []
    if placement.resource == GPU_RESOURCE and placement.min_gpu_memory_mib:
        # kube-scheduler enforces "enough memory per GPU" itself: Gt is exclusive.
        required.append({"key": LABEL_MEMORY, "operator": "Gt", "values": [str(placement.min_gpu_memory_mib - 1)]})
    if spec.resources.gpu_product:
        required.append({"key": LABEL_PRODUCT, "operator": "In", "values": [spec.resources.gpu_product]})
    if spec.training.precision in BF16_PRECISIONS:
        # NotIn, not Gt 7: a node without GFD's label still matches, as placement lets it (bf16_refused)
        older = [str(major) for major in range(1, BF16_MIN_COMPUTE_MAJOR)]
        required.append({"key": LABEL_COMPUTE_MAJOR, "operator": "NotIn", "values": older})
    affinity: dict[str, Any] = {"nodeAffinity": {}}
    if required:
        affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] = {
            "nodeSelectorTerms": [{"matchExpressions": required}]
        }
    if placement.preferred_nodes:
        # Best fit first: the scheduler weighs these, but may still use any node that satisfies `required`.
        prefs = []
        for i, node in enumerate(placement.preferred_nodes[:5]):
            prefs.append(
                {
                    "weight": 100 - 10 * i,
                    "preference": {
                        "matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]
                    },
                }
            )
        affinity["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] = prefs
    return affinity if affinity["nodeAffinity"] else None


def _env(spec: FineTuneJobSpec, rid: RunIdentity, defaults: PodDefaults) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "KUBETUNE_JOB", "value": rid.name},
        {"name": "KUBETUNE_RUN", "value": str(rid.run)},
        {"name": "KUBETUNE_NAMESPACE", "value": rid.namespace},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": f"{WORK_DIR}/hf"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "KUBETUNE_GRACE_SECONDS", "value": str(GRACE_SECONDS)},
    ]
    st = spec.storage
    if st.endpoint:
        env += [{"name": "AWS_ENDPOINT_URL_S3", "value": st.endpoint}]
    if st.region:
        env += [{"name": "AWS_REGION", "value": st.region}, {"name": "AWS_DEFAULT_REGION", "value": st.region}]
    if st.credentials_secret:
        s = st.credentials_secret
        env += [
            {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": s.name, "key": s.access_key_id_key}}},
            {
                "name": "AWS_SECRET_ACCESS_KEY",
                "valueFrom": {"secretKeyRef": {"name": s.name, "key": s.secret_access_key_key}},
            },
        ]
    if st.ca_bundle:
        env += [{"name": "AWS_CA_BUNDLE", "value": f"{CA_MOUNT}/ca.crt"}]
    if defaults.hf_endpoint:
        env += [{"name": "HF_ENDPOINT", "value": defaults.hf_endpoint}]
    if spec.model.token_secret:
        t = spec.model.token_secret
        env += [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": t.name, "key": t.key}}}]
    r = spec.resources
    extra = dict(defaults.env) | {e.name: e.value for e in r.env}
    env += [{"name": k, "value": v} for k, v in extra.items()]
    if r.nodes > 1:
        # torchrun/accelerate rendezvous from the Indexed Job: rank 0's stable DNS name via the headless Service.
        env += [
            {"name": "NNODES", "value": str(r.nodes)},
            {"name": "NPROC_PER_NODE", "value": str(max(1, r.gpus_per_node))},
            {
                "name": "NODE_RANK",
                "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}},
            },
            {"name": "MASTER_ADDR", "value": f"{rid.job_name}-0.{rid.service_name}.{rid.namespace}.svc"},
            {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        ]
    return env


def ephemeral_storage(r, resolved: Resolved) -> str | None:
    """The pod's ephemeral-storage request: the user's, else the operator's (kubetune.estimator.disk)."""
    if r.ephemeral_storage:
        return str(r.ephemeral_storage)
    n = resolved.ephemeral_storage_bytes
    return f"{-(-n // 2**30)}Gi" if n else None


PVC_ROOT = "/mnt/pvc"  # the trainer image's KUBETUNE_PVC_ROOT: pvc://claim/path is PVC_ROOT/claim/path


def volume_claims(spec: FineTuneJobSpec) -> dict[str, str]:
    """The PersistentVolumeClaims the job reads (pvc:// model and data URIs): claim -> the field."""
    out: dict[str, str] = {}
    for field_name, uri in (
        ("spec.model.uri", spec.model.uri),
        ("spec.dataset.uri", spec.dataset.uri),
        ("spec.dataset.validationUri", spec.dataset.validation_uri),
        ("spec.dataset.testUri", spec.dataset.test_uri),
        ("spec.evaluation.promptsUri", spec.evaluation.prompts_uri if spec.evaluation else None),
    ):
        if uri and uri.startswith("pvc://"):
            out.setdefault(uri[len("pvc://") :].split("/", 1)[0], field_name)
    return out


def _resources(spec: FineTuneJobSpec, resolved: Resolved, placement: Placement) -> dict[str, dict[str, str]]:
    r = spec.resources
    limits: dict[str, str] = {"memory": str(r.memory)}
    requests: dict[str, str] = {"cpu": str(r.cpu), "memory": str(r.memory)}
    if disk := ephemeral_storage(r, resolved):
        requests["ephemeral-storage"] = disk  # no limit: the kubelet evicts a pod over its limit
    if placement.resource and r.gpus_per_node:
        limits[placement.resource] = str(r.gpus_per_node)
        requests[placement.resource] = str(r.gpus_per_node)
    return {"requests": requests, "limits": limits}


def _volume_mounts(spec: FineTuneJobSpec, claims: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        *([{"name": "ca", "mountPath": CA_MOUNT, "readOnly": True}] if spec.storage.ca_bundle else []),
        # The root filesystem is read-only; /tmp (HOME, HF cache, compile caches, local checkpoints) is not.
        {"name": "work", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
        *({"name": f"pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True} for i, claim in enumerate(claims)),
    ]


def _volumes(spec: FineTuneJobSpec, rid: RunIdentity, claims: dict[str, str]) -> list[dict[str, Any]]:
    ca = spec.storage.ca_bundle
    return [
        {"name": "config", "configMap": {"name": rid.config_name}},
        {"name": "work", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        *([{"name": "ca", "configMap": {"name": ca.name, "items": [{"key": ca.key, "path": "ca.crt"}]}}] if ca else []),
    ] + [
        {"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        for i, claim in enumerate(claims)
    ]


def _container(
    spec: FineTuneJobSpec,
    rid: RunIdentity,
    cfg: TrainerConfig,
    placement: Placement,
    defaults: PodDefaults,
    claims: dict[str, str],
) -> dict[str, Any]:
    """The trainer container: non-root, read-only root filesystem, no capabilities."""
    multi_node = spec.resources.nodes > 1
    return {
        "name": "trainer",
        "image": spec.run_policy.image or defaults.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["kubetune", "train", "--config", f"{CONFIG_MOUNT}/{CONFIG_KEY}"],
        "env": _env(spec, rid, defaults),
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT}]
        + ([{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}] if multi_node else []),
        "resources": _resources(spec, cfg.resolved, placement),
        "volumeMounts": _volume_mounts(spec, claims),
        "terminationMessagePath": "/dev/termination-log",
        # The trainer writes a JSON TrainerTermination there; fall back to the log tail if it crashed first.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def _pod_spec(
    spec: FineTuneJobSpec, rid: RunIdentity, container: dict[str, Any], placement: Placement, claims: dict[str, str]
) -> dict[str, Any]:
    r, rp = spec.resources, spec.run_policy
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumes": _volumes(spec, rid, claims),
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": GRACE_SECONDS,
    }
    if affinity := _affinity(spec, placement):
        pod_spec["affinity"] = affinity
    if r.node_selector:
        pod_spec["nodeSelector"] = dict(r.node_selector)
    if r.tolerations:
        pod_spec["tolerations"] = [t.dump() for t in r.tolerations]
    if r.priority_class_name:
        pod_spec["priorityClassName"] = r.priority_class_name
    if spec.storage.service_account_name:
        pod_spec["serviceAccountName"] = spec.storage.service_account_name
    if rp.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in rp.image_pull_secrets]
    if r.nodes > 1:
        pod_spec["subdomain"] = rid.service_name
        # One pod per node, as placement counted them: with gpusPerNode below a node's GPU count the
        # scheduler would otherwise be free to stack the ranks on one node.
        pod_spec.setdefault("affinity", {})["podAntiAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {"matchLabels": rid.selector()},
                    "topologyKey": "kubernetes.io/hostname",
                }
            ]
        }
    return pod_spec


def _failure_policy() -> dict[str, Any]:
    return {
        "rules": [
            # Preemption, eviction and node drain are not the trainer's fault: retry without counting.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": "trainer",
                    "operator": "In",
                    "values": list(NON_RETRYABLE_EXIT_CODES + OOM_EXIT_CODES),
                },
            },
        ]
    }


def job(
    spec: FineTuneJobSpec,
    rid: RunIdentity,
    cfg: TrainerConfig,
    placement: Placement,
    defaults: PodDefaults = PodDefaults(),
) -> dict[str, Any]:
    r, rp = spec.resources, spec.run_policy
    claims = volume_claims(spec)  # read-only: models and data are read in place, outputs go to S3
    container = _container(spec, rid, cfg, placement, defaults, claims)
    extra = {KUEUE_QUEUE_LABEL: rp.queue_name} if rp.queue_name else None
    job_spec: dict[str, Any] = {
        "backoffLimit": rp.backoff_limit,
        "suspend": rp.suspend,
        "podFailurePolicy": _failure_policy(),
        "template": {
            "metadata": {
                "labels": {**rid.labels(), **(extra or {})},
                **({"annotations": dict(r.pod_annotations)} if r.pod_annotations else {}),
            },
            "spec": _pod_spec(spec, rid, container, placement, claims),
        },
    }
    if rp.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = rp.active_deadline_seconds
    if rp.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = rp.ttl_seconds_after_finished
    if r.nodes > 1:
        job_spec |= {"completionMode": "Indexed", "completions": r.nodes, "parallelism": r.nodes}
    else:
        job_spec |= {"completions": 1, "parallelism": 1}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": rid.metadata(rid.job_name, extra), "spec": job_spec}


def children(
    spec: FineTuneJobSpec,
    rid: RunIdentity,
    resolved: Resolved,
    placement: Placement,
    defaults: PodDefaults = PodDefaults(),
) -> list[dict[str, Any]]:
    """Everything a run needs, in creation order (the Job last, so its pod finds its config)."""
    cfg = trainer_config(spec, rid, resolved)
    out = [config_map(cfg, rid)]
    if spec.resources.nodes > 1:
        out.append(headless_service(rid))
    out.append(job(spec, rid, cfg, placement, defaults))
    return out
