"""Careless and hostile FineTuneJobs against a real operator on the test ground (issue #19).

Each crash class found by fuzzing gets its own case; then a seeded fuzz run of 320 mutated specs,
and a burst of pathological jobs beside valid ones. The figures (admitted, refused, slowest status)
are printed: `pytest -s tests/integration/test_hostile.py`.

Nothing here calls a non-local address: outbound-call rules are checked against stand-in listeners
on 127.0.0.2 (refused) and 127.0.0.1 (the Hub mirror the operator is configured with). Refused
link-local and metadata endpoints are refused before any connection (tests/unit/test_guard.py).
"""
from __future__ import annotations

import base64
import copy
import json
import os
import random
import socket
import time
import urllib.request
import uuid

import pytest

from kubetune.devenv.ground import wait_until as wait_for

from netkit import HttpStandIn
from opkit import Operator, _clean, cond, small_gpu_job

pytestmark = pytest.mark.integration

# Canaries: every Secret-backed value a job can name. None may appear in status, Events or logs.
CANARY = uuid.uuid4().hex[:12]
CANARY_KEY_ID = f"AKIA{CANARY.upper()}0000"  # the shape of an access key id (20 characters)
CANARY_SECRET = f"canary-secret-{CANARY}-wJalrXUtnFEMI"
CANARY_TOKEN = f"hf_canary{CANARY}abcdefghijklmnopq"
CANARIES = (CANARY_KEY_ID, CANARY_SECRET, CANARY_TOKEN, CANARY)


class StandIn(HttpStandIn):
    """A local listener that records every request and answers 401 with the request's headers in its
    body (what a hostile endpoint would reflect)."""

    def __init__(self, host: str) -> None:
        self.requests: list[dict] = []

        def respond(path: str, headers) -> tuple[int, bytes]:
            self.requests.append({"path": path, "headers": dict(headers)})
            return 401, json.dumps({"echo": dict(headers)}).encode()

        super().__init__(respond, host)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def standins():
    hub, forbidden = StandIn("127.0.0.1"), StandIn("127.0.0.2")
    yield hub, forbidden
    hub.close()
    forbidden.close()


@pytest.fixture(scope="module")
def hostile_operator(ground, crds, standins, tmp_path_factory):
    """An operator with its liveness endpoint on, and a Hub mirror that is a local stand-in (so a
    token is sent to this machine, never to the Hub)."""
    hub, _ = standins
    op = Operator(tmp_path_factory.mktemp("hostile") / "operator.log")
    op.health = f"http://127.0.0.1:{_free_port()}/healthz"
    op.start("--liveness", op.health, "--hf-endpoint", hub.url)
    yield op
    wait_for("deleted FineTuneJobs finalized", lambda: not any(
        o["metadata"].get("deletionTimestamp") for o in ground.kubectl_json("get", "ftj", "-A")["items"]), 90)
    op.stop()


def healthz(op) -> int:
    try:
        with urllib.request.urlopen(op.health, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


@pytest.fixture
def hns(ground, ns):
    """The test namespace with canary Secrets, a binary one, and config.json files in S3."""
    data = {"AWS_ACCESS_KEY_ID": CANARY_KEY_ID, "AWS_SECRET_ACCESS_KEY": CANARY_SECRET + "\n"}
    ground.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "canary-s3"}, "stringData": data}, ns)
    ground.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "canary-hf"},
                  "stringData": {"HF_TOKEN": CANARY_TOKEN + "\n"}}, ns)  # as `--from-file` leaves it
    ground.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "wrong-s3"},
                  "stringData": {"AWS_ACCESS_KEY_ID": CANARY_KEY_ID, "AWS_SECRET_ACCESS_KEY": CANARY_SECRET}}, ns)
    binary = base64.b64encode(b"\xff\xfe\x00binary" + CANARY.encode()).decode()
    ground.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "binary-s3"},
                  "data": {"AWS_ACCESS_KEY_ID": binary, "AWS_SECRET_ACCESS_KEY": binary}}, ns)
    s3 = ground.s3()
    base = {"model_type": "qwen3_moe", "hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 8,
            "intermediate_size": 3072, "vocab_size": 32000, "num_experts": 8, "num_experts_per_tok": 2}
    configs = {
        "absurd-layers": {**base, "num_hidden_layers": 10**12},
        "absurd-everything": {**base, "num_hidden_layers": 10**9, "hidden_size": 10**9, "num_experts": 10**9},
        "weird-types": {**base, "num_hidden_layers": [1, 2], "hidden_size": "wide", "mlp_only_layers": {"a": 1}},
        "nan": {**base, "num_hidden_layers": float("nan")},
        "small": {**base, "num_hidden_layers": 4},
    }
    for name, cfg in configs.items():
        s3.put_object(Bucket="kubetune-models", Key=f"{ns}/{name}/config.json",
                      Body=json.dumps(cfg, allow_nan=True).encode())
    s3.put_object(Bucket="kubetune-models", Key=f"{ns}/huge/config.json", Body=b" " * (3 << 20))
    s3.put_object(Bucket="kubetune-models", Key=f"{ns}/not-text/config.json", Body=b"\xff\xfe" * 100)
    return ns


def s3_endpoint(ground) -> str:
    return ground.state["s3"]["endpoint"]


def base_job(ground, name: str, ns: str, suspend: bool = True) -> dict:
    obj = _clean(small_gpu_job(name))
    obj["metadata"]["namespace"] = ns
    obj["spec"]["storage"]["endpoint"] = s3_endpoint(ground)
    obj["spec"]["runPolicy"] = {"suspend": suspend}
    return obj


def kube_client():
    from kubernetes import client, config

    # named explicitly: the client reads $KUBECONFIG once, when first imported (maybe before the ground set it)
    config.load_kube_config(config_file=os.environ["KUBECONFIG"])
    return client.CustomObjectsApi()


def create(api, obj) -> str | None:
    """Create it as `kubectl create` would; None when admitted, else the apiserver's message."""
    from kubernetes.client.rest import ApiException

    try:
        api.create_namespaced_custom_object("kubetune.io", "v1alpha1", obj["metadata"]["namespace"], "finetunejobs",
                                            obj)
        return None
    except ApiException as e:
        try:
            return json.loads(e.body).get("message") or str(e.status)
        except ValueError:
            return f"HTTP {e.status}"
    except ValueError as e:  # the client refuses to send it (e.g. an unencodable value)
        return f"client: {e}"


def statuses(ground, ns) -> dict[str, dict]:
    return {o["metadata"]["name"]: o.get("status") or {} for o in ground.kubectl_json("get", "ftj", "-n", ns)["items"]}


def assert_no_canary(ground, ns, op) -> None:
    texts = {
        "status": json.dumps(ground.kubectl_json("get", "ftj", "-n", ns)),
        "events": json.dumps(ground.kubectl_json("get", "events", "-n", ns)),
        "operator log": op.log.read_text(errors="replace"),
    }
    for where, text in texts.items():
        for c in CANARIES:
            assert c not in text, f"canary {c} leaked into the {where}"


# --- one case per crash class -----------------------------------------------------------------------

def _set(obj: dict, dotted: str, value) -> dict:
    node = obj
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return obj


# (name, changes, where it ends: "admission" + words the refusal says, or phase, reason, words in the message)
CLASSES = [
    ("lora-typo", {"spec.method.lora.targetModules": ["q_proj", "v_projj"]},
     ("Failed", "InvalidSpec", "LoRA target 'v_projj' is not a linear module of qwen2")),
    ("lora-nul", {"spec.method.lora.targetModules": ["q_proj\u0000"]}, ("admission", "targetModules")),
    ("binary-secret", {"spec.storage.credentialsSecret": {"name": "binary-s3"}},
     ("Pending", "SecretNotFound", "is not UTF-8 text")),
    ("token-newline",
     {"spec.model.uri": "hf://example-org/private-model", "spec.model.tokenSecret": {"name": "canary-hf"}},
     ("Pending", "ModelConfigUnavailable", "refused its config.json (HTTP 401)")),
    ("config-absurd-layers", {"spec.model.uri": "s3://kubetune-models/{ns}/absurd-layers/"},
     ("Pending", "ModelConfigUnavailable", "parameters, more than 1e+15")),
    ("config-absurd-everything", {"spec.model.uri": "s3://kubetune-models/{ns}/absurd-everything/"},
     ("Pending", "ModelConfigUnavailable", "parameters, more than 1e+15")),
    ("config-weird-types", {"spec.model.uri": "s3://kubetune-models/{ns}/weird-types/"},
     ("Pending", "ModelConfigUnavailable", "must be a positive integer")),
    ("config-huge", {"spec.model.uri": "s3://kubetune-models/{ns}/huge/"},
     ("Pending", "ModelConfigUnavailable", "larger than 1024 KiB")),
    ("config-not-text", {"spec.model.uri": "s3://kubetune-models/{ns}/not-text/"},
     ("Pending", "ModelConfigUnavailable", "is not UTF-8 text")),
    ("s3-key-newline", {"spec.model.uri": "s3://kubetune-models/{ns}/small/",
                              "spec.storage.credentialsSecret": {"name": "canary-s3"}},
     ("Pending", "SecretNotFound", "starts or ends with whitespace")),
    ("wrong-s3-keys", {"spec.model.uri": "s3://kubetune-models/{ns}/small/",
                       "spec.storage.credentialsSecret": {"name": "wrong-s3"}},
     ("Pending", "StorageCredentialsRefused", "the S3 endpoint refused the credentials")),
    ("ssrf-loopback", {"spec.storage.endpoint": "{forbidden}/"},
     ("Pending", "EndpointNotAllowed", "is a loopback address, which the operator does not call")),
    ("ssrf-metadata", {"spec.storage.endpoint": "http://169.254.169.254/"},
     ("Pending", "EndpointNotAllowed", "is a link-local address")),
    ("missing-priority-class", {"spec.resources.priorityClassName": "training-high", "spec.runPolicy.suspend": False},
     ("Starting", "PodPending", "no PriorityClass with name training-high")),
    ("huge-node-selector", {"spec.resources.nodeSelector": {"example.com/zone": "z" * 40000}},
     ("admission", "nodeSelector")),
    ("negative-cpu", {"spec.resources.cpu": "-1"}, ("admission", "cpu")),
    ("absurd-memory", {"spec.resources.memory": "1e400"}, ("admission", "memory")),
    ("bad-annotation-key", {"spec.resources.podAnnotations": {"not a key!": "x"}}, ("admission", "podAnnotations")),
    ("bad-toleration", {"spec.resources.tolerations": [{"key": "bad key", "operator": "Exists", "value": "v"}]},
     ("admission", "tolerations")),
    ("bad-queue-name", {"spec.runPolicy.queueName": "not a label value!"}, ("admission", "queueName")),
    ("bad-priority-class", {"spec.resources.priorityClassName": "Not_A_Name"}, ("admission", "priorityClassName")),
    ("userinfo-endpoint", {"spec.storage.endpoint": f"http://user:{CANARY_SECRET}@127.0.0.1:9/"},
     ("admission", "endpoint")),
    ("nbsp-uri", {"spec.dataset.uri": "s3://kubetune-data/a\u00a0b.jsonl"}, ("admission", "dataset.uri")),
    ("absurd-inline-layers", {"spec.model.architecture": {
        "modelType": "qwen3_moe", "hiddenSize": 1024, "numHiddenLayers": 10**12, "numAttentionHeads": 16,
        "intermediateSize": 3072, "vocabSize": 32000, "numLocalExperts": 8, "numExpertsPerTok": 2}},
     ("admission", "numHiddenLayers")),
]


OPERATOR_CLASSES = [c for c in CLASSES if c[2][0] != "admission"]
ADMISSION_CLASSES = [c for c in CLASSES if c[2][0] == "admission"]


@pytest.mark.parametrize("name,changes,want", CLASSES, ids=[c[0] for c in CLASSES])
def test_each_crash_class_ends_in_a_clear_status(ground, hostile_operator, hns, standins, name, changes, want):
    _, forbidden = standins
    obj = base_job(ground, name, hns)
    for k, v in changes.items():
        if isinstance(v, str):
            v = v.format(ns=hns, forbidden=forbidden.url)
        _set(obj, k, v)
    refusal = create(kube_client(), obj)
    if want[0] == "admission":
        assert refusal is not None, f"{name} was admitted"
        assert want[1] in refusal, refusal
        for c in CANARIES:
            assert c not in refusal
        return
    assert refusal is None, refusal
    phase, reason, words = want
    t0 = time.monotonic()

    def settled():
        st = statuses(ground, hns).get(name) or {}
        hit = [c for c in st.get("conditions") or [] if c["reason"] == reason]
        return hit[0] if st.get("phase") == phase and hit else None

    try:
        c = wait_for(f"{name}: phase {phase} with reason {reason}", settled, 60)
    except Exception:
        print(json.dumps(statuses(ground, hns).get(name), indent=1)[:3000])
        raise
    assert words in c["message"], c["message"]
    print(f"{name}: {phase}/{reason} after {time.monotonic() - t0:.1f}s: {c['message'][:160]}")
    assert forbidden.requests == [], "the operator called a refused endpoint"
    if name == "token-newline":  # stripped, as huggingface_hub strips it in the trainer
        hub, _ = standins
        assert {r["headers"].get("Authorization") for r in hub.requests} == {f"Bearer {CANARY_TOKEN}"}
    assert hostile_operator.alive()
    assert_no_canary(ground, hns, hostile_operator)


def test_a_job_the_apiserver_refuses_is_invalid_and_leaves_nothing_behind(ground, hostile_operator, hns):
    """A cluster policy the spec cannot know (a ValidatingAdmissionPolicy refusing Jobs without a
    deadline) is a 422 for the trainer Job: InvalidSpec naming the policy, and no half-made run."""
    policy = f"kubetune-test-deadline-{hns}"
    ground.apply({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
                  "metadata": {"name": policy},
                  "spec": {"failurePolicy": "Fail",
                           "matchConstraints": {"resourceRules": [{"apiGroups": ["batch"], "apiVersions": ["v1"],
                                                                   "operations": ["CREATE"], "resources": ["jobs"]}]},
                           "validations": [{"expression": "has(object.spec.activeDeadlineSeconds)",
                                            "message": "every Job needs spec.activeDeadlineSeconds",
                                            "reason": "Invalid"}]}})
    ground.apply({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
                  "metadata": {"name": policy},
                  "spec": {"policyName": policy, "validationActions": ["Deny"],
                           "matchResources": {"namespaceSelector": {"matchLabels": {
                               "kubernetes.io/metadata.name": hns}}}}})
    try:
        obj = base_job(ground, "policy", hns)
        # the policy takes a moment to be enforced: retry the probe Job until it is
        wait_for("policy enforced", lambda: ground.kubectl(
            "create", "job", "probe", "-n", hns, "--image=x", "--dry-run=server", check=False).returncode != 0, 30)
        assert create(kube_client(), obj) is None
        c = wait_for("InvalidSpec", lambda: next((c for c in (statuses(ground, hns).get("policy") or {}).get(
            "conditions") or [] if c["reason"] == "InvalidSpec"), None), 60)
        assert "the apiserver refused the Job policy-r1 this job needs" in c["message"], c["message"]
        assert "every Job needs spec.activeDeadlineSeconds" in c["message"]
        assert statuses(ground, hns)["policy"]["phase"] == "Failed"
        # dry run first: not even the run's ConfigMap was made
        assert ground.kubectl("get", "configmap", "policy-r1-config", "-n", hns, check=False).returncode != 0
    finally:
        ground.kubectl("delete", "validatingadmissionpolicybinding", policy, check=False)
        ground.kubectl("delete", "validatingadmissionpolicy", policy, check=False)


# --- the fuzz run ----------------------------------------------------------------------------------------

ODD_VALUES = [None, True, -1, 0, 2**63, 2**70, -2**70, 1e308, 1.5, "", " ", "\u00a0", "\u2028", "\x00", "x" * 5000,
              "ünïcödé", "${HOME}", "../../etc/passwd", "a b", [], {}, [1, "a"], {"a": {"b": 1}}]


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))
    else:
        yield path


def _put(obj, path, value):
    node = obj
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def mutants(ground, ns: str, forbidden: str, n: int, seed: int) -> list[dict]:
    """``n`` FineTuneJobs, each a valid base job with 1-3 mutations drawn from the crash classes
    above and from type confusion on any field."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        obj = base_job(ground, f"fz-{i:03d}", ns, suspend=rng.random() < 0.7)
        for _ in range(rng.randint(1, 2)):
            roll = rng.random()
            if roll < 0.75:
                # mostly what admission lets through, so that the operator meets it
                _, changes, _ = rng.choice(OPERATOR_CLASSES if roll < 0.6 else ADMISSION_CLASSES)
                for k, v in copy.deepcopy(changes).items():
                    _set(obj, k, v.format(ns=ns, forbidden=forbidden) if isinstance(v, str) else v)
            else:
                leaves = [p for p in _leaves(obj["spec"]) if p]
                _put(obj["spec"], rng.choice(leaves), copy.deepcopy(rng.choice(ODD_VALUES)))
        out.append(obj)
    return out


def test_fuzz_every_admitted_job_gets_a_status_and_the_operator_stays_live(ground, hostile_operator, hns, standins):
    _, forbidden = standins
    api = kube_client()
    jobs = mutants(ground, hns, forbidden.url, 320, seed=19)
    t0 = time.monotonic()
    refused = {o["metadata"]["name"]: r for o in jobs if (r := create(api, o)) is not None}
    admitted = [o["metadata"]["name"] for o in jobs if o["metadata"]["name"] not in refused]
    applied = time.monotonic()
    named = sum(1 for r in refused.values() if "spec." in r)
    seen: dict[str, float] = {}

    def all_have_status():
        for name, st in statuses(ground, hns).items():
            if name not in seen and st.get("phase") and st.get("conditions"):
                seen[name] = time.monotonic() - applied
        return set(admitted) <= set(seen)

    try:
        wait_for("a status for every admitted job", all_have_status, 60)
    finally:
        missing = sorted(set(admitted) - set(seen))
        print(f"\nfuzz: {len(jobs)} specs, {len(admitted)} admitted, {len(refused)} refused at admission "
              f"({named} naming a spec field); created in {applied - t0:.1f}s; slowest status "
              f"{max(seen.values(), default=0):.1f}s; without status: {missing[:10]}")
    phases: dict[str, int] = {}
    for st in statuses(ground, hns).values():
        phases[st.get("phase")] = phases.get(st.get("phase"), 0) + 1
    print(f"fuzz phases: {phases}")
    assert named >= 0.9 * len(refused), [r for r in refused.values() if "spec." not in r][:5]
    assert hostile_operator.alive() and healthz(hostile_operator) == 200
    assert forbidden.requests == []
    assert hostile_operator.metric("kubetune_reconcile_duration_seconds_count") > 0

    # valid jobs after the storm are placed as if it had not happened
    t1 = time.monotonic()
    for i in range(5):
        assert create(api, base_job(ground, f"valid-{i}", hns)) is None
    for i in range(5):
        wait_for(f"valid-{i} has its Job", lambda i=i: ground.kubectl(
            "get", "job", f"valid-{i}-r1", "-n", hns, check=False).returncode == 0, 60)
    print(f"fuzz: 5 valid jobs after it got their Jobs in {time.monotonic() - t1:.1f}s")
    assert_no_canary(ground, hns, hostile_operator)


def test_pathological_burst_does_not_starve_valid_jobs(ground, hostile_operator, hns):
    api = kube_client()
    bad = []
    for i in range(20):
        obj = base_job(ground, f"dos-{i:02d}", hns)
        cfg = ("absurd-layers", "absurd-everything", "weird-types", "huge")[i % 4]
        _set(obj, "spec.model.uri", f"s3://kubetune-models/{hns}/{cfg}/")
        _set(obj, "spec.model.tokenSecret", None)
        bad.append(_clean(obj))
    t0 = time.monotonic()
    for obj in bad:
        assert create(api, obj) is None
    for i in range(3):
        assert create(api, base_job(ground, f"ok-{i}", hns)) is None
    for i in range(3):
        wait_for(f"ok-{i} has its Job", lambda i=i: ground.kubectl(
            "get", "job", f"ok-{i}-r1", "-n", hns, check=False).returncode == 0, 30)
    placed = time.monotonic() - t0
    wait_for("every pathological job has a status", lambda: all(
        (statuses(ground, hns).get(o["metadata"]["name"]) or {}).get("phase") == "Pending" for o in bad), 60)
    print(f"\nburst: 20 pathological jobs and 3 valid ones: valid placed within {placed:.1f}s, "
          f"all pathological Pending within {time.monotonic() - t0:.1f}s")
    assert hostile_operator.alive() and healthz(hostile_operator) == 200
    for o in bad:
        c = cond({"status": statuses(ground, hns)[o["metadata"]["name"]]}, "Validated")
        assert c["reason"] == "ModelConfigUnavailable" and c["message"].startswith("spec.model")
