"""`kubetune operator` with peering on (the default) says what it waits for, instead of waiting
silently for a peering object only the chart creates."""
from __future__ import annotations

import logging

import pytest
from kubernetes.client.rest import ApiException

from kubetune.controller import cli
from kubetune.errors import UsageError


class FakeCustom:
    def __init__(self, status: int | None, exists: bool = False, list_status: int | None = None):
        self.status, self.created, self.exists, self.list_status = status, [], exists, list_status

    def _list(self, *args, field_selector):
        if self.list_status is not None:
            raise ApiException(status=self.list_status, reason="x")
        return {"items": [{"metadata": {"name": field_selector.split("=")[1]}}] if self.exists else []}

    def list_cluster_custom_object(self, group, version, plural, field_selector):
        return self._list(group, version, plural, field_selector=field_selector)

    def list_namespaced_custom_object(self, group, version, ns, plural, field_selector):
        return self._list(group, version, ns, plural, field_selector=field_selector)

    def _create(self, *args):
        self.created.append(args)
        if self.status is not None:
            raise ApiException(status=self.status, reason="x")

    def create_cluster_custom_object(self, group, version, plural, body):
        self._create(group, version, plural, body["metadata"])

    def create_namespaced_custom_object(self, group, version, ns, plural, body):
        self._create(group, version, ns, plural, body["metadata"])


@pytest.mark.parametrize("status", [None, 409])
def test_the_peering_object_is_created_or_found(caplog, status):
    fake = FakeCustom(status)
    with caplog.at_level(logging.INFO):
        cli.ensure_peering(fake, "kubetune", [], logging.getLogger("t"))
    assert fake.created == [("kopf.dev", "v1", "clusterkopfpeerings", {"name": "kubetune"})]
    assert "leader election through ClusterKopfPeering 'kubetune'" in caplog.text


def test_namespaced_operators_peer_in_each_namespace():
    fake = FakeCustom(None)
    cli.ensure_peering(fake, "p", ["a", "b"], logging.getLogger("t"))
    assert [c[2:4] for c in fake.created] == [("a", "kopfpeerings"), ("b", "kopfpeerings")]


def test_an_existing_peering_object_is_used_without_creating_it():
    fake = FakeCustom(403, exists=True)  # the chart's RBAC: list, watch, patch; no create
    cli.ensure_peering(fake, "kubetune", [], logging.getLogger("t"))
    assert fake.created == []


def test_missing_peering_crds_refuse_to_start_with_the_way_out():
    with pytest.raises(UsageError) as e:
        cli.ensure_peering(FakeCustom(404, list_status=404), "kubetune", [], logging.getLogger("t"))
    assert "kubectl apply -f crds/kopf-peering.yaml" in str(e.value) and "--standalone" in str(e.value)


def test_no_right_to_create_it_says_what_it_waits_for(caplog):
    cli.ensure_peering(FakeCustom(403), "kubetune", [], logging.getLogger("t"))
    assert "waiting for ClusterKopfPeering 'kubetune' (leader election)" in caplog.text


def test_the_log_filter_redacts_what_any_library_logs(caplog):
    record = logging.LogRecord("urllib3", logging.WARNING, __file__, 1,
                               "retrying http://%s@minio:9000 with %s", ("admin:pw123", "Bearer tok123456"), None)
    assert cli._RedactingFilter().filter(record)
    assert record.getMessage() == "retrying http://***@minio:9000 with Bearer ***"


def test_after_sigterm_a_stuck_worker_cannot_keep_the_process_alive():
    """kopf returns from SIGTERM, then Python waits for non-daemon worker threads at exit: a worker
    stuck in a reconcile would hold the pod past its grace period. The cleanup handler ends it."""
    import subprocess
    import sys
    import time

    code = (
        "import threading, time\n"
        "from kubetune.controller import handlers\n"
        "from kubetune.controller.state import Config\n"
        "state = handlers.new_state(None, Config(exit_grace_seconds=0.5))\n"
        "threading.Thread(target=lambda: time.sleep(3600)).start()  # a worker that never returns\n"
        "handlers._exit_on_time(memo=state)\n"
    )
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], timeout=30, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 15


def test_the_liveness_probe_fails_while_a_reconcile_is_stuck():
    import kopf

    from kubetune.controller import guard, handlers

    state = handlers.new_state(None)
    state.watchdog = dog = guard.Watchdog(budget=0, stuck_after=0)
    assert handlers._probe_workers(memo=state) == {"retrying": 0}
    with dog.watch(("team-a", "spin")):
        dog._running[next(iter(dog._running))].interrupted = 0.0  # interrupted long ago, still running
        with pytest.raises(kopf.PermanentError, match="1 reconcile\\(s\\) stuck: team-a/spin"):
            handlers._probe_workers(memo=state)
    assert handlers._probe_workers(memo=state) == {"retrying": 0}


def test_a_failure_before_observe_finishes_still_masks_the_jobs_secrets():
    from kubetune.controller import handlers

    secrets = {"s3": {"AWS_SECRET_ACCESS_KEY": "sekrit-value-123"}, "hf": {"HF_TOKEN": "tok-value-456\n"}}

    class Secrets:
        def read_secret(self, ns, name):
            return secrets.get(name)

    state = handlers.new_state(Secrets())
    body = {"metadata": {"namespace": "ns"},
            "spec": {"storage": {"credentialsSecret": {"name": "s3"}}, "model": {"tokenSecret": {"name": "hf"}},
                     "method": "not even a mapping"}}
    r = handlers._secrets_redactor(state, body)
    assert r("boom: sekrit-value-123 and 'tok-value-456\\n'") == "boom: *** and '***'"
    assert handlers._secrets_redactor(state, {"metadata": {"namespace": "ns"}, "spec": {"storage": []}})("x y") == "x y"


def test_the_peering_lifetime_flag_reaches_kopfs_settings():
    """A standby takes over this long after the leader's last renewal (the chart's operator.peeringLifetime)."""
    import kopf

    from kubetune.controller import handlers
    from kubetune.controller.state import Config

    state = handlers.new_state(None, Config(peering_lifetime=20))
    state.watchdog.start = lambda *a, **k: None  # no thread: only the settings are under test
    settings = kopf.OperatorSettings()
    assert settings.peering.lifetime == 60  # kopf's default, which the flag's default keeps
    handlers._startup(settings=settings, memo=state)
    assert settings.peering.lifetime == 20
