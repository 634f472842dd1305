"""A FineTuneJob being deleted is never reconciled again, whatever triggers the reconcile."""
from __future__ import annotations

import copy
import logging

import kopf

from kubetune.controller import handlers, kube


def test_a_child_event_after_the_deletion_starts_nothing(monkeypatch):
    calls = []
    for fn in ("create", "patch_status", "patch_job", "get_finetunejob", "get_job", "list_pods", "post_event",
               "fleet_objects", "read_secret"):
        monkeypatch.setattr(kube, fn, lambda *a, _fn=fn, **kw: calls.append(_fn))
    live = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"namespace": "ns", "name": "gone", "uid": "u1", "generation": 1, "resourceVersion": "5"},
            "spec": {}, "status": {"phase": "Running", "run": 1}}
    handlers._remember(live)
    deleting = copy.deepcopy(live)
    deleting["metadata"].update(resourceVersion="6", deletionTimestamp="2026-01-01T00:00:00Z",
                                finalizers=["kubetune.io/finalizer"])
    try:
        handlers.on_finetunejob(event={"type": "MODIFIED", "object": deleting}, body=kopf.Body(deleting),
                                logger=logging.getLogger("test"))
        # on_delete has removed the children; their DELETED events drive the job: a stale cached body
        # would make it look like an active run whose Job went missing, and recreate the Job
        assert handlers.drive("ns", "gone") is None
        assert calls == []
    finally:
        handlers._forget(("ns", "gone"))
