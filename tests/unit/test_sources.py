"""What the operator reads from the Hugging Face Hub (or the --hf-endpoint mirror): config.json of a
model that is not in the catalog, from a real HTTP server that answers as the Hub does (the
hub_mirror fixture in tests/conftest.py)."""
from __future__ import annotations

import json

import pytest

from kubetune import hub as hub_module
from kubetune.api.validation import parse_spec
from kubetune.controller import sources
from kubetune.controller.sources import hub_endpoint
from kubetune.errors import UsageError
from kubetune.estimator import resolve_architecture

from builders import modules_loaded_by
from netkit import HttpStandIn

CONFIG = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
          "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000, "torch_dtype": "bfloat16"}


@pytest.fixture
def hub(hub_mirror):
    hub_mirror.repos = {("acme/open-7b", "main"): (CONFIG, None), ("acme/gated-7b", "main"): (CONFIG, "hf_good"),
                        ("acme/gated-7b", "v2"): (CONFIG, "hf_good")}
    return hub_mirror.url, hub_mirror.seen


def _spec(uri: str):
    return parse_spec({"model": {"uri": uri}, "dataset": {"uri": "s3://data/train.jsonl"}, "method": {"type": "lora"},
                       "training": {"maxSteps": 1}, "checkpoints": {"uri": "s3://ckpt/x"}})


def test_the_mirror_serves_config_json_and_the_estimator_reads_the_architecture_from_it(hub):
    url, seen = hub
    spec = _spec("hf://acme/open-7b")
    arch = resolve_architecture(spec.model, lambda _u: sources.read_config_json(spec, None, None, url))
    assert (arch.hidden_size, arch.num_layers, arch.vocab_size) == (512, 4, 32000)
    assert seen == [("/acme/open-7b/resolve/main/config.json", None)]


def test_a_gated_model_is_read_with_the_token_at_the_revision_in_the_uri(hub):
    url, seen = hub
    text = sources.read_config_json(_spec("hf://acme/gated-7b@v2"), None, "hf_good", url)
    assert json.loads(text) == CONFIG
    assert seen == [("/acme/gated-7b/resolve/v2/config.json", "Bearer hf_good")]


@pytest.mark.parametrize("uri,token,refusal", [
    ("hf://acme/gated-7b", None, "refused its config.json (HTTP 401): it is gated or private: set "
                                 "spec.model.tokenSecret to a Secret holding an HF_TOKEN with access"),
    ("hf://acme/gated-7b", "hf_other", "refused its config.json (HTTP 403): the token in spec.model.tokenSecret has no "
                                       "access to it: accept the model's licence on the Hub with that account"),
    ("hf://acme/open-7b@nope", None, "has no config.json for acme/open-7b at revision nope: check the repository name "
                                     "and revision"),
])
def test_each_refusal_says_what_to_fix(hub, uri, token, refusal):
    url, _ = hub
    with pytest.raises(ValueError) as e:
        sources.read_config_json(_spec(uri), None, token, url)
    assert str(e.value) == f"the Hub mirror {url} (--hf-endpoint) {refusal}"


def test_an_unreachable_hub_fails_one_reconcile_with_a_message_not_a_traceback(hub):
    url, _ = hub
    spec = _spec("hf://acme/open-7b")
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens
    with pytest.raises(Exception) as e:
        resolve_architecture(spec.model, lambda _u: sources.read_config_json(spec, None, None, closed))
    msg = str(e.value)
    assert msg.startswith("spec.model.uri hf://acme/open-7b: not in kubetune's model catalog and reading its "
                          f"config.json failed: the Hub mirror {closed} (--hf-endpoint) did not serve its config.json")
    assert msg.endswith("set spec.model.architecture (the config.json dimensions) to estimate it")


@pytest.mark.parametrize("value,want", [
    ("https://hf-mirror.internal", "https://hf-mirror.internal"),
    ("http://10.0.0.5:8080/hf/", "http://10.0.0.5:8080/hf"),
    ("", None),
    (None, None),
])
def test_hf_endpoint_accepts_a_base_url(value, want):
    assert hub_endpoint(value, "--hf-endpoint") == want


@pytest.mark.parametrize("value", ["hf-mirror.internal", "ftp://m/x", "https://m/?a=1", "https://"])
def test_hf_endpoint_rejects_what_is_not_a_base_url(value):
    with pytest.raises(UsageError,
                       match=r"^HF_ENDPOINT must be an http\(s\) URL such as https://hf-mirror.internal, got"):
        hub_endpoint(value, "HF_ENDPOINT")


def test_a_mirror_signed_by_a_private_ca_is_read_with_spec_storage_ca_bundle(hub, tls_proxy):
    """The same mirror behind https with a certificate from a private CA (a real TLS handshake):
    without the bundle, the refusal names spec.storage.caBundle; with it, config.json is read."""
    url, seen = hub
    proxy = tls_proxy(int(url.rsplit(":", 1)[1]))
    spec = _spec("hf://acme/open-7b")
    with pytest.raises(ValueError) as e:
        sources.read_config_json(spec, None, None, proxy.url)
    assert str(e.value) == (
        f"the Hub mirror {proxy.url} (--hf-endpoint) did not serve its config.json: its TLS certificate is not trusted "
        "(certificate verify failed): set spec.storage.caBundle to a ConfigMap holding the CA that signed it")
    assert json.loads(sources.read_config_json(spec, None, None, proxy.url, ca_pem=proxy.ca_pem)) == CONFIG
    assert seen == [("/acme/open-7b/resolve/main/config.json", None)] and proxy.handshakes == 1
    with pytest.raises(ValueError, match="point SSL_CERT_FILE at a bundle holding the CA that signed it$"):
        sources.read_hub_config("hf://acme/open-7b", None, proxy.url, cli=True)  # kubetune estimate's wording


def test_the_hub_reader_sits_below_the_controller_and_the_estimator():
    """`kubetune estimate` reads the Hub without importing the operator's controller (or kubernetes, kopf)."""
    assert modules_loaded_by("import kubetune.estimator.cli", "kubetune.controller", "kubernetes", "kopf") == []
    assert sources.read_hub_config is hub_module.read_hub_config and sources.hub_endpoint is hub_module.hub_endpoint


def test_the_operator_splits_s3_uris_as_the_trainer_does():
    """One split (kubetune.api.storage) on both sides: a key holding '#' or '?' is the key the trainer wrote."""
    from kubetune.api.storage import split_s3_uri
    from kubetune_trainer import storage as trainer_storage

    for uri in ("s3://ckpt/run-1/progress.json", "s3://ckpt/a#b/c?d/", "s3://ckpt"):
        assert trainer_storage.split_s3(uri) == split_s3_uri(uri)
    assert trainer_storage._join("a/", "b") == "a/b"  # the trainer's own names stay


def test_s3_clients_are_cached_per_operator_state_by_endpoint_and_credentials():
    """One client per (endpoint, region, credentials, CA) in an OperatorState's cache, the newest kept;
    without a cache each call makes its own (kubetune report's one-off reads)."""
    from kubetune.controller.sources import S3Clients

    clients = S3Clients(size=2)
    a = clients.get("http://127.0.0.1:9000", None, "k", "s", True, None)
    assert clients.get("http://127.0.0.1:9000", None, "k", "s", True, None) is a
    b = clients.get("http://127.0.0.1:9000", None, "k2", "s2", True, None)  # other credentials: another client
    assert b is not a
    clients.get("http://127.0.0.1:9001", None, "k", "s", True, None)  # a third: the oldest (a) goes
    assert clients.get("http://127.0.0.1:9000", None, "k", "s", True, None) is not a
    assert S3Clients() is not S3Clients()  # no module-level cache: each OperatorState has its own


def test_progress_not_written_yet_is_no_error_but_s3_not_answering_is_said(monkeypatch):
    """A missing progress object is a trainer that has not reported yet; S3 refusing or not answering
    is an outage the status must show (reconcile: CheckpointSynced=False StorageUnreachable)."""
    import socket

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")

    prog = json.dumps({"progress": {"step": 7, "totalSteps": 10}}).encode()
    answers = {"/ckpt/run/progress.json": (200, prog),
               "/ckpt/down/progress.json": (503, b"<Error><Code>ServiceUnavailable</Code></Error>")}
    srv = HttpStandIn(lambda path, _h: answers.get(path, (404, b"<Error><Code>NoSuchKey</Code></Error>")))
    try:
        spec = parse_spec({"model": {"uri": "hf://acme/open-7b"}, "dataset": {"uri": "s3://data/train.jsonl"},
                           "method": {"type": "lora"}, "training": {"maxSteps": 1},
                           "checkpoints": {"uri": "s3://ckpt/x"},
                           "storage": {"endpoint": srv.url, "forcePathStyle": True}})
        got, err = sources.read_progress(spec, None, "s3://ckpt/run/progress.json")
        assert got.progress.step == 7 and err is None
        assert sources.read_progress(spec, None, "s3://ckpt/new/progress.json") == (None, None)
        got, err = sources.read_progress(spec, None, "s3://ckpt/down/progress.json")
        assert got is None and err == ("cannot read the trainer's progress s3://ckpt/down/progress.json: the S3 "
                                       "endpoint answered ServiceUnavailable (HTTP 503)"), err
    finally:
        srv.close()
    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    spec.storage.endpoint = f"http://127.0.0.1:{closed}"
    got, err = sources.read_progress(spec, None, "s3://ckpt/run/progress.json")
    assert got is None and err.startswith("cannot read the trainer's progress s3://ckpt/run/progress.json: "
                                          "EndpointConnectionError: Could not connect"), err
