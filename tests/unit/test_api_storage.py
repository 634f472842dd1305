"""kubetune.api.storage: the s3:// split and join that the operator (controller/sources.py) and the trainer
(kubetune_trainer/storage.py) share, and the retry with backoff (the trainer's _retry)."""
from __future__ import annotations

import pytest

from kubetune.api import storage as st

from builders import modules_loaded_by


@pytest.mark.parametrize("uri,bucket,key", [
    ("s3://ckpt", "ckpt", ""),
    ("s3://ckpt/", "ckpt", ""),
    ("s3://ckpt/run-1/", "ckpt", "run-1/"),
    ("s3://ckpt//run-1/progress.json", "ckpt", "run-1/progress.json"),  # leading slashes are not part of the key
    ("s3://ckpt/a#b/c?d;e", "ckpt", "a#b/c?d;e"),  # key characters to S3, not URL syntax
])
def test_an_s3_uri_splits_into_its_bucket_and_key(uri, bucket, key):
    assert st.split_s3_uri(uri) == (bucket, key)


@pytest.mark.parametrize("uri,msg", [
    ("hf://org/name", "not an s3:// URI: hf://org/name"),
    ("s3:///key", "s3 URI without a bucket: s3:///key"),
])
def test_what_is_not_an_s3_uri_is_refused_by_name(uri, msg):
    with pytest.raises(ValueError, match=f"^{msg}$"):
        st.split_s3_uri(uri)


@pytest.mark.parametrize("prefix,key,joined", [
    ("", "config.json", "config.json"),
    ("models/llama", "config.json", "models/llama/config.json"),
    ("models/llama/", "/config.json", "models/llama/config.json"),
    ("models/llama", "", "models/llama"),
])
def test_keys_join_with_one_slash(prefix, key, joined):
    assert st.join_key(prefix, key) == joined


@pytest.mark.parametrize("key,uri", [("", "s3://ckpt"), ("run-1/x", "s3://ckpt/run-1/x")])
def test_s3_uri_is_the_inverse_of_the_split(key, uri):
    assert st.s3_uri("ckpt", key) == uri and st.split_s3_uri(uri) == ("ckpt", key)


@pytest.mark.parametrize("attempt,base,cap,delay", [(0, 1.0, 30.0, 1.0), (3, 1.0, 30.0, 8.0), (6, 1.0, 30.0, 30.0),
                                                    (2, 0.5, 30.0, 2.0)])
def test_the_backoff_doubles_up_to_its_cap(attempt, base, cap, delay):
    assert st.backoff_delay(attempt, base, cap) == delay


class Boom(Exception):
    pass


class Final(Exception):
    pass


def _flaky(failures: int, exc: type[Exception] = Boom):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= failures:
            raise exc(f"failure {len(calls)}")
        return "ok"
    return fn, calls


def test_retry_backs_off_between_attempts_and_returns_the_first_success(monkeypatch):
    slept, logged = [], []
    monkeypatch.setattr(st.time, "sleep", slept.append)
    fn, calls = _flaky(2)
    got = st.retry(fn, 4, fail=Final, log_retry=lambda e, d: logged.append((str(e), d)), base_delay=0.5)
    assert got == "ok" and len(calls) == 3
    assert slept == [0.5, 1.0] and logged == [("failure 1", 0.5), ("failure 2", 1.0)]


def test_the_last_failure_raises_what_fail_makes_of_it(monkeypatch):
    monkeypatch.setattr(st.time, "sleep", lambda _d: None)
    fn, calls = _flaky(5)
    with pytest.raises(Final, match="^failure 3$") as e:
        st.retry(fn, 3, fail=lambda err: Final(str(err)), log_retry=lambda e, d: None)
    assert len(calls) == 3 and e.value.__cause__ is None and e.value.__suppress_context__


def test_give_up_and_passthrough_stop_at_once(monkeypatch):
    monkeypatch.setattr(st.time, "sleep", lambda _d: pytest.fail("no wait when no retry can help"))
    fn, calls = _flaky(5)
    with pytest.raises(Final):
        st.retry(fn, 3, fail=lambda err: Final(str(err)), log_retry=lambda e, d: None, give_up=lambda e: True)
    assert len(calls) == 1
    fn, calls = _flaky(5, Final)
    with pytest.raises(Final, match="^failure 1$"):
        st.retry(fn, 3, fail=lambda err: Boom(str(err)), log_retry=lambda e, d: None, passthrough=(Final,))
    assert len(calls) == 1


def test_the_shared_module_imports_no_client_library():
    assert modules_loaded_by("import kubetune.api.storage", "boto3", "botocore", "kubernetes", "kopf") == []
