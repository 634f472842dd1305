"""The one module that talks to the Kubernetes API.

Everything else in the controller works on plain dicts and pydantic models. Creates are
idempotent (409 AlreadyExists returns the existing object), reads of missing objects return None,
and status is written as a merge patch to the status subresource.
"""
from __future__ import annotations

import base64
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from kubetune.api.v1alpha1 import GROUP, PLURAL, VERSION
from kubetune.controller.manifests import LABEL_JOB

_lock = threading.Lock()
_api: client.ApiClient | None = None


def configure(kubeconfig: str | None = None, pool_size: int = 32) -> client.ApiClient:
    """Load in-cluster config when running in a pod, else the kubeconfig."""
    global _api
    with _lock:
        cfg = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        # One connection per worker thread; the default (4) serializes a busy operator.
        cfg.connection_pool_maxsize = pool_size
        _api = client.ApiClient(cfg)
        return _api


def api() -> client.ApiClient:
    return _api or configure()


def core() -> client.CoreV1Api:
    return client.CoreV1Api(api())


def batch() -> client.BatchV1Api:
    return client.BatchV1Api(api())


def custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api())


def _plain(obj: Any) -> dict:
    return api().sanitize_for_serialization(obj)


def _get(fn, *args, **kw) -> dict | None:
    try:
        return _plain(fn(*args, **kw))
    except ApiException as e:
        if e.status == 404:
            return None
        raise


# --- the FineTuneJob itself ------------------------------------------------------------------


def get_finetunejob(namespace: str, name: str) -> dict | None:
    try:
        return custom().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def list_finetunejobs(namespaces: list[str] | None = None) -> list[dict]:
    if namespaces:
        out: list[dict] = []
        for ns in namespaces:
            out += custom().list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
        return out
    return custom().list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]


def patch_status(namespace: str, name: str, status: dict) -> None:
    try:
        custom().patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, {"status": status})
    except ApiException as e:
        if e.status != 404:  # deleted meanwhile: nothing to report on
            raise


# --- children ----------------------------------------------------------------------------------


def create(obj: dict) -> dict:
    """Create a child; if it already exists (a re-run or a restarted operator), return that one."""
    kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    create_fn, read_fn = {
        "ConfigMap": (core().create_namespaced_config_map, core().read_namespaced_config_map),
        "Service": (core().create_namespaced_service, core().read_namespaced_service),
        "Job": (batch().create_namespaced_job, batch().read_namespaced_job),
    }[kind]
    try:
        return _plain(create_fn(ns, obj))
    except ApiException as e:
        if e.status == 409:
            return _plain(read_fn(name, ns))
        raise


def get_job(namespace: str, name: str) -> dict | None:
    return _get(batch().read_namespaced_job, name, namespace)


def patch_job(namespace: str, name: str, body: dict) -> None:
    batch().patch_namespaced_job(name, namespace, body)


def list_pods(namespace: str, job: str, run: int) -> list[dict]:
    sel = f"{LABEL_JOB}={job},kubetune.io/run={run}"
    return [_plain(p) for p in core().list_namespaced_pod(namespace, label_selector=sel).items]


def delete_children(namespace: str, job: str) -> int:
    """Delete every Job, Service and ConfigMap of a FineTuneJob (all runs). Returns how many."""
    sel = f"{LABEL_JOB}={job}"
    n = 0
    for j in batch().list_namespaced_job(namespace, label_selector=sel).items:
        _delete(batch().delete_namespaced_job, j.metadata.name, namespace, propagation_policy="Background")
        n += 1
    for s in core().list_namespaced_service(namespace, label_selector=sel).items:
        _delete(core().delete_namespaced_service, s.metadata.name, namespace)
        n += 1
    for c in core().list_namespaced_config_map(namespace, label_selector=sel).items:
        _delete(core().delete_namespaced_config_map, c.metadata.name, namespace)
        n += 1
    return n


def _delete(fn, name: str, namespace: str, **kw) -> None:
    try:
        fn(name, namespace, **kw)
    except ApiException as e:
        if e.status != 404:
            raise


# --- what reconcile reads ----------------------------------------------------------------------


def read_secret(namespace: str, name: str) -> dict[str, str] | None:
    s = _get(core().read_namespaced_secret, name, namespace)
    if s is None:
        return None
    return {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}


@dataclass
class _FleetCache:
    at: float = 0.0
    nodes: list[dict] | None = None
    pods: list[dict] | None = None


_fleet = _FleetCache()
_fleet_lock = threading.Lock()


def fleet_objects(max_age: float = 5.0) -> tuple[list[dict], list[dict]]:
    """Nodes and the GPU-holding pods, cached briefly: a burst of new jobs shares one listing, and
    kube-scheduler still enforces the real state through the required affinity."""
    with _fleet_lock:
        if _fleet.nodes is None or time.monotonic() - _fleet.at > max_age:
            nodes = [_plain(n) for n in core().list_node().items]
            pods = core().list_pod_for_all_namespaces(
                field_selector="status.phase!=Succeeded,status.phase!=Failed").items
            gpu_pods = [_plain(p) for p in pods if p.spec.node_name and _requests_gpu(p)]
            _fleet.nodes, _fleet.pods, _fleet.at = nodes, gpu_pods, time.monotonic()
        return _fleet.nodes, _fleet.pods or []


def invalidate_fleet() -> None:
    with _fleet_lock:
        _fleet.nodes = None


def _requests_gpu(pod) -> bool:
    for c in pod.spec.containers or []:
        res = c.resources
        for d in (res.limits or {}, res.requests or {}) if res else ():
            if any(k.startswith("nvidia.com/") for k in d):
                return True
    return False


# --- events --------------------------------------------------------------------------------------


def post_event(obj: dict, type_: str, reason: str, message: str, component: str = "kubetune-operator") -> None:
    meta = obj["metadata"]
    now = datetime.now(timezone.utc)
    ev = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
        involved_object=client.V1ObjectReference(
            api_version=obj.get("apiVersion"), kind=obj.get("kind"), name=meta["name"],
            namespace=meta["namespace"], uid=meta.get("uid"), resource_version=meta.get("resourceVersion")),
        reason=reason,
        message=message[:1024],
        type=type_,
        first_timestamp=now,
        last_timestamp=now,
        count=1,
        source=client.V1EventSource(component=component),
        reporting_component=component,
        reporting_instance=component,
    )
    try:
        core().create_namespaced_event(meta["namespace"], ev)
    except ApiException:
        pass  # an Event is best effort; never fail a reconcile on it
