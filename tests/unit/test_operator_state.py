"""The operator's memory: one OperatorState passed to the handlers as kopf's memo, a Kube client
injected into it (here an in-memory fake that records calls), caches that are bounded, shared
safely by kopf's worker threads, and that forget a FineTuneJob once it is deleted.

The handlers' real conversation with an apiserver is covered by tests/integration."""
from __future__ import annotations

import copy
import logging
import subprocess
import sys
import threading

import kopf
import pytest

from kubetune.controller import handlers
from kubetune.controller.state import Config, Expiring, OperatorState

from builders import OPERATOR_SPEC, ready_nodes

LOG = logging.getLogger("test")
SPEC = OPERATOR_SPEC  # shared with test_reconcile


class FakeKube:
    """An in-memory stand-in for ``kube.Kube``: objects by (kind, namespace, name), every call recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.events: list[tuple[str, str, str]] = []
        self.nodes: list[dict] = []
        self._rv = 0

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def add(self, kind: str, obj: dict) -> dict:
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", f"uid-{kind}-{meta['name']}")
        meta["resourceVersion"] = self._next_rv()
        self.objects[(kind, meta.get("namespace", ""), meta["name"])] = obj
        return copy.deepcopy(obj)

    def connection_info(self) -> dict:
        return {"server": "https://fake:6443", "token": "t", "scheme": "Bearer"}

    def get_finetunejob(self, namespace, name):
        self.calls.append(("get_finetunejob", namespace, name))
        obj = self.objects.get(("FineTuneJob", namespace, name))
        return copy.deepcopy(obj) if obj else None

    def list_finetunejobs(self, namespaces=None):
        self.calls.append(("list_finetunejobs", namespaces))
        return [copy.deepcopy(o) for (k, ns, _), o in self.objects.items()
                if k == "FineTuneJob" and (not namespaces or ns in namespaces)]

    def patch_status(self, namespace, name, status):
        self.calls.append(("patch_status", namespace, name))
        obj = self.objects.get(("FineTuneJob", namespace, name))
        if obj is None:
            return None
        obj["status"] = {k: v for k, v in {**(obj.get("status") or {}), **status}.items() if v is not None}
        obj["metadata"]["resourceVersion"] = self._next_rv()
        return copy.deepcopy(obj)

    def create(self, obj, dry_run=False):
        self.calls.append(("create", obj["kind"], obj["metadata"]["name"], dry_run))
        if dry_run:
            return copy.deepcopy(obj)
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        if key in self.objects:
            return copy.deepcopy(self.objects[key])
        return self.add(obj["kind"], copy.deepcopy(obj))

    def get_job(self, namespace, name):
        self.calls.append(("get_job", namespace, name))
        obj = self.objects.get(("Job", namespace, name))
        return copy.deepcopy(obj) if obj else None

    def patch_job(self, namespace, name, body):
        self.calls.append(("patch_job", namespace, name))
        return self.get_job(namespace, name)

    def list_pods(self, namespace, job, run):
        self.calls.append(("list_pods", namespace, job, run))
        return []

    def delete_children(self, namespace, job):
        self.calls.append(("delete_children", namespace, job))
        gone = [k for k, o in self.objects.items() if k[1] == namespace
                and (o["metadata"].get("labels") or {}).get("kubetune.io/job") == job]
        for k in gone:
            del self.objects[k]
        return len(gone)

    def exists(self, kind, namespace, name):
        self.calls.append(("exists", kind, namespace, name))
        return (kind, namespace, name) in self.objects

    def read_config_map(self, namespace, name):
        self.calls.append(("read_config_map", namespace, name))
        obj = self.objects.get(("ConfigMap", namespace, name))
        return dict(obj.get("data") or {}) if obj else None

    def read_secret(self, namespace, name):
        self.calls.append(("read_secret", namespace, name))
        obj = self.objects.get(("Secret", namespace, name))
        return dict(obj.get("stringData") or {}) if obj else None

    def job_failed_create(self, namespace, job):
        self.calls.append(("job_failed_create", namespace, job))
        return None

    def fleet_objects(self, max_age=5.0):
        self.calls.append(("fleet_objects",))
        return self.nodes, []

    def invalidate_fleet(self):
        self.calls.append(("invalidate_fleet",))

    def add_expected_pods(self, pods):
        self.calls.append(("add_expected_pods", len(pods)))

    def post_event(self, obj, type_, reason, message):
        self.calls.append(("post_event", reason))
        self.events.append((type_, reason, message))

    def called(self, name: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == name]


def finetunejob(name: str = "demo", ns: str = "ml", spec: dict | None = None) -> dict:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"namespace": ns, "name": name, "generation": 1}, "spec": copy.deepcopy(spec or SPEC)}


@pytest.fixture
def kube() -> FakeKube:
    k = FakeKube()
    k.nodes = ready_nodes()
    k.add("Secret", {"metadata": {"namespace": "ml", "name": "s3"},
                     "stringData": {"AWS_ACCESS_KEY_ID": "AKIAFAKEFAKE", "AWS_SECRET_ACCESS_KEY": "secret-value-1"}})
    return k


@pytest.fixture
def state(kube) -> OperatorState:
    return handlers.new_state(kube, Config())


def event(kube: FakeKube, kind: str, ns: str, name: str, type_: str = "MODIFIED") -> dict:
    return {"type": type_, "object": copy.deepcopy(kube.objects[(kind, ns, name)])}


# --- the memo ------------------------------------------------------------------------------------


def test_kopf_shares_one_state_with_every_resource(state):
    # kopf shallow-copies the operator's memo into each resource's memo: ours is that one object
    assert copy.copy(state) is state


def test_handlers_are_registered_for_one_operator_with_its_config_not_at_import():
    code = ("import kopf\n"
            "from kubetune.controller import handlers\n"
            "from kubetune.controller.state import Config\n"
            "d = kopf.get_default_registry()\n"
            "assert not list(d._watching.get_all_handlers()) and not list(d._spawning.get_all_handlers())\n"
            "r = handlers.registry(Config(progress_interval=2.5, retry_interval=4.0))\n"
            "print(sorted((h.id, h.interval) for h in r._spawning.get_all_handlers()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[('mirror_progress', 2.5), ('retry_pending', 4.0)]"


def test_kopf_logs_in_as_the_injected_client(state):
    info = handlers._login(memo=state)
    assert (info.server, info.scheme, info.token) == ("https://fake:6443", "Bearer", "t")


# --- a job's life through the handlers, on the fake client ---------------------------------------


def test_a_new_job_is_placed_and_its_run_created(kube, state):
    kube.add("FineTuneJob", finetunejob())
    handlers.on_finetunejob(event=event(kube, "FineTuneJob", "ml", "demo"),
                            body=kopf.Body(kube.objects[("FineTuneJob", "ml", "demo")]), logger=LOG, memo=state)
    assert [c[1:] for c in kube.called("create")] == [("Job", "demo-r1", True), ("ConfigMap", "demo-r1-config", False),
                                                     ("Job", "demo-r1", False)]
    assert kube.objects[("FineTuneJob", "ml", "demo")]["status"]["phase"] == "Starting"
    assert ("Normal", "Placed") in {e[:2] for e in kube.events}
    # the echo of our own status write is not reconciled again
    n = len(kube.calls)
    handlers.on_finetunejob(event=event(kube, "FineTuneJob", "ml", "demo"),
                            body=kopf.Body(kube.objects[("FineTuneJob", "ml", "demo")]), logger=LOG, memo=state)
    assert len(kube.calls) == n
    # nor is the ADDED event of the Job it just created
    handlers.on_child_job(event=event(kube, "Job", "ml", "demo-r1", "ADDED"),
                          body=kopf.Body(kube.objects[("Job", "ml", "demo-r1")]), logger=LOG, memo=state)
    assert len(kube.calls) == n


def test_a_deleted_job_is_forgotten_by_every_cache(kube, state):
    kube.add("FineTuneJob", finetunejob())
    kube.add("PersistentVolumeClaim", {"metadata": {"namespace": "ml", "name": "data"}})
    spec = copy.deepcopy(SPEC) | {"dataset": {"uri": "pvc://data/train.jsonl", "maxSeqLength": 1024}}
    kube.add("FineTuneJob", finetunejob("other", spec=spec))
    for name in ("demo", "other"):
        handlers.drive(state, "ml", name, LOG)
    handlers.on_node(event={"type": "ADDED"}, body=kopf.Body(kube.nodes[0]), logger=LOG, memo=state)
    full = state.sizes()
    assert all(full[k] for k in ("locks", "last_seen", "job_signatures", "bodies", "children", "architectures",
                                 "objects", "present", "table", "node_signatures")), full
    # both jobs read the Secret "s3" and the model's architecture: forgetting one keeps them for the other
    handlers.on_finetunejob(event={"type": "DELETED", "object": kube.objects[("FineTuneJob", "ml", "demo")]},
                            body=kopf.Body(kube.objects[("FineTuneJob", "ml", "demo")]), logger=LOG, memo=state)
    half = state.sizes()
    assert half["objects"] == full["objects"] and half["architectures"] == full["architectures"]
    assert half["bodies"] == half["locks"] == half["last_seen"] == half["table"] == half["children"] == 1
    kube.objects[("FineTuneJob", "ml", "other")]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    handlers.on_delete(body=kopf.Body(kube.objects[("FineTuneJob", "ml", "other")]),
                       spec=kopf.Spec(kube.objects[("FineTuneJob", "ml", "other")]), logger=LOG, memo=state)
    left = state.sizes()
    assert {k: v for k, v in left.items() if v} == {"node_signatures": 1}, left
    # a node that goes away is forgotten too
    handlers.on_node(event={"type": "DELETED"}, body=kopf.Body(kube.nodes[0]), logger=LOG, memo=state)
    assert state.sizes()["node_signatures"] == 0


def test_a_child_event_after_the_deletion_starts_nothing(kube, state):
    """A FineTuneJob being deleted is never reconciled again, whatever triggers the reconcile."""
    live = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"namespace": "ns", "name": "gone", "uid": "u1", "generation": 1, "resourceVersion": "5"},
            "spec": {}, "status": {"phase": "Running", "run": 1}}
    state.bodies.put(live)
    deleting = copy.deepcopy(live)
    deleting["metadata"].update(resourceVersion="6", deletionTimestamp="2026-01-01T00:00:00Z",
                                finalizers=["kubetune.io/finalizer"])
    kube.calls.clear()
    handlers.on_finetunejob(event={"type": "MODIFIED", "object": deleting}, body=kopf.Body(deleting), logger=LOG,
                            memo=state)
    # on_delete has removed the children; their DELETED events drive the job: a stale cached body
    # would make it look like an active run whose Job went missing, and recreate the Job
    assert handlers.drive(state, "ns", "gone") is None
    assert kube.calls == []


def test_a_missing_claim_is_looked_up_again_and_a_present_one_trusted(kube, state):
    spec = copy.deepcopy(SPEC) | {"dataset": {"uri": "pvc://data/train.jsonl", "maxSeqLength": 1024}}
    kube.add("FineTuneJob", finetunejob(spec=spec))
    handlers.drive(state, "ml", "demo", LOG)
    handlers.drive(state, "ml", "demo", LOG)
    assert len(kube.called("exists")) == 2
    assert kube.objects[("FineTuneJob", "ml", "demo")]["status"]["phase"] == "Pending"
    kube.add("PersistentVolumeClaim", {"metadata": {"namespace": "ml", "name": "data"}})
    handlers.drive(state, "ml", "demo", LOG)
    handlers.drive(state, "ml", "demo", LOG)
    assert len(kube.called("exists")) == 3
    assert kube.objects[("FineTuneJob", "ml", "demo")]["status"]["phase"] == "Starting"


# --- the caches ----------------------------------------------------------------------------------


def test_expiring_values_go_after_their_time():
    now = [0.0]
    c: Expiring[str, int] = Expiring(ttl=5, clock=lambda: now[0])
    c.put("k", 1, ("ns", "a"))
    assert c.get("k", ("ns", "a")) == (True, 1)
    now[0] = 5.0
    assert c.get("k", ("ns", "a")) == (False, None)


def test_expiring_is_bounded_oldest_first_and_forgets_with_its_last_reader():
    c: Expiring[int, int] = Expiring(ttl=60, maxsize=3)
    for i in range(5):
        c.put(i, i, ("ns", f"job{i}"))
    assert len(c) == 3 and c.get(0, ("ns", "x"))[0] is False and c.get(4, ("ns", "x")) == (True, 4)
    c.forget(("ns", "job4"))
    assert c.get(4, ("ns", "y"))[0] is True  # "x" read it too
    c.forget(("ns", "x"))
    c.forget(("ns", "y"))
    assert c.get(4, ("ns", "z"))[0] is False and len(c) == 2
    assert c._reads.keys() == {("ns", "job2"), ("ns", "job3")}  # no reader is kept for a dropped value


def test_the_worker_threads_share_the_state_safely(state):
    """kopf runs sync handlers on 16 threads: the maps they all touch take a lock."""
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(300):
                key = ("ns", f"job{(t * 300 + i) % 97}")
                with state.lock_for(key):
                    state.objects.put(("Secret", "ns", f"s{i % 13}"), {"k": "v"}, key)
                    state.reconciled(key, 1, {})
                    state.child_changed(f"uid{i}", key, (t, i))
                if i % 3 == 0:
                    state.forget(key)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    for n in range(97):
        state.forget(("ns", f"job{n}"))
    assert {k: v for k, v in state.sizes().items() if v} == {}
