"""The operator's defences against careless and hostile FineTuneJobs, as pure parts: redaction,
the outbound-call rule, the messages for refused children, failure statuses, the watchdog and the
retry backoff. (tests/integration/test_hostile.py drives them through a real operator.)"""
from __future__ import annotations

import socket
import threading
import time
from datetime import datetime, timezone

import pytest

from kubetune.controller import guard
from kubetune.controller.conditions import MAX_MESSAGE, set_condition
from kubetune.controller.egress import EgressPolicy, EndpointRefused
from kubetune.controller.redact import MASK, Redactor, redact

NOW = datetime(2026, 12, 2, tzinfo=timezone.utc)
TOKEN = "hf_CanaryCanaryCanaryCanaryCanary1234"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYCANARYKEY"


# --- redaction -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    f"Invalid header value b'Bearer {TOKEN}\\n'",          # http.client's message for a token with a newline
    f"token={TOKEN}",
    f"secret {SECRET} in a message",
    f"quoted {SECRET.replace('/', '%2F')}",                # URL-quoted, as in a signed query string
    f"escaped {repr(SECRET + chr(10))}",
])
def test_known_secret_values_are_masked_in_every_printed_form(text):
    r = Redactor([TOKEN + "\n", SECRET + "\n"])
    out = r(text)
    assert TOKEN not in out and SECRET not in out and SECRET.replace("/", "%2F") not in out
    assert MASK in out


@pytest.mark.parametrize("text,leak", [
    ("could not connect to http://admin:hunter2pass@minio.internal:9000/", "hunter2pass"),
    ("headers {'Authorization': 'AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/2026'}", "AKIAIOSFODNN7EXAMPLE"),
    ("Bearer abcdefghijklmnop was refused", "abcdefghijklmnop"),
    (f"a stray {TOKEN} in a log", TOKEN),
    ("GET /x?X-Amz-Signature=deadbeefcafe&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE", "deadbeefcafe"),
])
def test_credential_shapes_are_masked_without_knowing_the_value(text, leak):
    out = redact(text)
    assert leak not in out, out
    assert MASK in out


def test_redaction_keeps_ordinary_text_and_uris():
    text = "spec.model.uri hf://meta-llama/Llama-3.1-8B: s3://kubetune/ckpt/ns/job/ is not readable (NoSuchKey)"
    assert redact(text) == text
    assert Redactor(["ab"])("a tab and a bag") == "a tab and a bag"  # too short to be a secret worth masking


def test_deep_redacts_every_string_of_a_status():
    st = {"conditions": [{"message": f"token {TOKEN}", "reason": "X"}], "run": 1, "placement": {"message": SECRET}}
    out = Redactor([TOKEN, SECRET]).deep(st)
    assert TOKEN not in str(out) and SECRET not in str(out) and out["run"] == 1


# --- outbound calls ----------------------------------------------------------------------------------


def resolver(table: dict[str, list[str]]):
    """A stand-in for DNS (no name in these tests is looked up for real, and nothing is connected)."""
    def resolve(host, port, proto=0):
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, proto, "", (a, port)) for a in table[host]]
    return resolve


@pytest.mark.parametrize("url,kind", [
    ("http://169.254.169.254/", "link-local"),
    ("http://[fd00:ec2::254]/", "link-local"),
    ("http://127.0.0.1:9000", "loopback"),
    ("http://[::1]:9000", "loopback"),
    ("http://[::ffff:169.254.169.254]/", "link-local"),
    ("http://0.0.0.0:9000", "unspecified"),
    ("http://metadata.google.internal/", "metadata"),
    ("http://rebind.example/", "link-local"),       # a name that resolves to the metadata address
    ("http://split.example/", "loopback"),          # one good and one refused address: refused
])
def test_refused_endpoints_name_the_field_and_the_way_out(url, kind):
    policy = EgressPolicy(resolve=resolver({"rebind.example": ["169.254.169.254"],
                                            "split.example": ["10.1.2.3", "127.0.0.1"]}))
    with pytest.raises(EndpointRefused) as e:
        policy.check(url, "spec.storage.endpoint")
    msg = str(e.value)
    assert msg.startswith("spec.storage.endpoint: ") and kind in msg
    if kind != "metadata":
        assert "--allow-endpoint" in msg and "operator.allowEndpoints" in msg


def test_ordinary_endpoints_pass_and_the_admin_can_allow_a_refused_one():
    policy = EgressPolicy(resolve=resolver({"minio.data.svc": ["10.96.4.2"], "s3.example": ["203.0.113.7"]}))
    policy.check("http://minio.data.svc:9000", "spec.storage.endpoint")
    policy.check("https://s3.example", "spec.storage.endpoint")
    with pytest.raises(EndpointRefused, match="does not resolve"):
        policy.check("http://nowhere.example", "spec.storage.endpoint")
    with pytest.raises(EndpointRefused, match="credentials in the URL"):
        policy.check("http://u:p@minio.data.svc:9000", "spec.storage.endpoint")

    allowed = EgressPolicy(allow=("127.0.0.1", "10.0.0.0/8:9000"), resolve=resolver({}))
    allowed.check("http://127.0.0.1:41234", "spec.storage.endpoint")
    with pytest.raises(EndpointRefused):
        allowed.check("http://169.254.169.254", "spec.storage.endpoint")  # not named: still refused
    by_name = EgressPolicy(allow=("localhost:9000",), resolve=resolver({"localhost": ["127.0.0.1"]}))
    by_name.check("http://localhost:9000", "spec.storage.endpoint")
    with pytest.raises(EndpointRefused):
        by_name.check("http://localhost:9001", "spec.storage.endpoint")  # another port


def test_the_resolver_cache_is_bounded():
    calls = []

    def resolve(host, port, proto=0):
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, proto, "", ("10.0.0.1", port))]

    policy = EgressPolicy(resolve=resolve)
    for i in range(3000):
        policy.check(f"http://h{i}.example", "spec.storage.endpoint")
    policy.check("http://h2999.example", "spec.storage.endpoint")
    assert len(calls) == 3000 and len(policy._cache) <= 1025


# --- messages ------------------------------------------------------------------------------------------


def test_a_refused_child_names_the_spec_field_it_came_from():
    job = {"kind": "Job", "metadata": {"name": "x-r1"}}
    body = ('{"kind":"Status","message":"Job.batch \\"x-r1\\" is invalid","details":{"causes":['
            '{"reason":"FieldValueInvalid","message":"Invalid value: \\"a b\\": name part must consist of ...",'
            '"field":"spec.template.spec.tolerations[0].key"},'
            '{"reason":"FieldValueInvalid","message":"Invalid value: \\"-1\\": must be greater than 0",'
            '"field":"spec.template.spec.containers[0].resources.requests[cpu]"}]}}')
    msg = guard.child_rejection(job, 422, body)
    assert "spec.template.spec.tolerations[0].key" in msg and "(from spec.resources.tolerations)" in msg
    assert "(from spec.resources (cpu, memory, ephemeralStorage))" in msg
    svc = guard.child_rejection({"kind": "Service", "metadata": {"name": "a.b-r1"}}, 422,
                                '{"details":{"causes":[{"field":"metadata.name","message":"a DNS-1035 label"}]}}')
    assert "no dots" in svc
    assert "HTTP 422" in guard.child_rejection(job, 422, "not json")


def test_condition_messages_are_clipped_below_the_apiserver_limit():
    conds, _ = set_condition([], "Scheduled", False, "NoFit", "x" * 100_000, NOW, 1)
    assert len(conds[0].message) <= MAX_MESSAGE and conds[0].message.endswith("more characters)")


def test_failure_status_keeps_what_is_there_and_adds_the_condition():
    old = {"phase": "Running", "run": 2, "conditions": [
        {"type": "Scheduled", "status": "True", "reason": "Placed", "message": "m",
         "lastTransitionTime": "2026-12-01T00:00:00Z"}]}
    st = guard.failure_status(old, 3, NOW, "Failed", "InternalError", "boom", None)
    assert st["phase"] == "Running" and st["run"] == 2
    assert {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]} == {
        "Scheduled": ("True", "Placed"), "Failed": ("True", "InternalError")}
    st = guard.failure_status({"garbage": 1, "conditions": "not a list"}, 1, NOW, "Validated", "InvalidSpec", "m",
                              "Failed")
    assert st["phase"] == "Failed" and st["conditions"][0]["status"] == "False" and st["observedGeneration"] == 1
    assert guard.safe_reason("Bad reason!") == "InternalError" and guard.safe_reason("InvalidSpec") == "InvalidSpec"


def test_transient_failures_are_told_apart():
    class E(Exception):
        def __init__(self, status):
            self.status = status

    assert guard.is_transient(E(503)) and guard.is_transient(E(429)) and guard.is_transient(ConnectionResetError())
    assert not guard.is_transient(E(422)) and not guard.is_transient(E(403)) and not guard.is_transient(ValueError())


# --- the watchdog and the retries ------------------------------------------------------------------------


def test_the_watchdog_interrupts_a_reconcile_past_its_budget():
    dog = guard.Watchdog(budget=0.2, stuck_after=5)
    got = []

    def busy():
        try:
            with dog.watch(("ns", "spin")):
                n = 0
                while True:  # a per-layer loop over 10**12 layers, say
                    n += 1
        except guard.ReconcileTimeout:
            got.append("interrupted")

    t = threading.Thread(target=busy)
    t.start()
    deadline = time.monotonic() + 10
    while t.is_alive() and time.monotonic() < deadline:
        dog.check()
        time.sleep(0.05)
    t.join(1)
    assert got == ["interrupted"] and not t.is_alive()
    assert dog.stuck() == [] and dog._running == {}


def test_a_thread_that_cannot_be_interrupted_is_reported_stuck():
    dog = guard.Watchdog(budget=0.1, stuck_after=0.2)
    done = threading.Event()

    def blocked():
        try:
            with dog.watch(("ns", "blocked")):
                done.wait(10)  # in C: the interrupt waits for it to return
        except guard.ReconcileTimeout:
            pass

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.2)
    assert dog.check() == [("ns", "blocked")]
    time.sleep(0.3)
    assert dog.stuck() == [("ns", "blocked")]
    done.set()
    t.join(5)
    assert not t.is_alive() and dog.stuck() == []


def test_retries_back_off_and_a_forgotten_job_is_not_retried():
    driven = []
    r = guard.Retrier(lambda ns, name: driven.append((ns, name)), cap=10)
    delays = []
    for _ in range(5):
        delays.append(r.delay(("ns", "a")))
        r.schedule(("ns", "a"))
    for d, want in zip(delays, (1, 2, 4, 8, 10)):  # doubling, capped, with ±20% jitter
        assert 0.8 * want <= d <= 1.2 * want, delays
    r.schedule(("ns", "b"))
    r.forget(("ns", "b"))
    deadline = time.monotonic() + 5
    while not driven and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert driven == [("ns", "a")]  # once (the earliest due of its five), and b never
    r.succeeded(("ns", "a"))
    assert 0.8 <= r.delay(("ns", "a")) <= 1.2
