"""The trainer against a real S3 server process: resumable verified downloads, and an outage."""
import hashlib
import json
import time
import urllib.request

import pytest

import tiny
from kubetune_trainer import checkpoint as ck
from proc import TrainerProc, free_port

pytestmark = pytest.mark.slow


def _objects(client, prefix):
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="kubetune", Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = o["Size"]
    return out


def _scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(body) for s in fam.samples}


def test_model_and_data_from_s3_resumable(tmp_path, s3, model_dir):
    """Download of an s3:// model prefix: a partial file is continued and everything verifies."""
    from kubetune.api.v1alpha1 import Storage
    from kubetune_trainer import storage as st

    c = s3.client()
    for p in model_dir.iterdir():
        c.upload_file(str(p), "kubetune", f"models/tiny/{p.name}")
    loc = st.open_location("s3://kubetune/models/tiny", Storage(endpoint=s3.endpoint))
    dest = tmp_path / "dl"
    dest.mkdir()
    big = max(model_dir.iterdir(), key=lambda p: p.stat().st_size)
    (dest / (big.name + ".part")).write_bytes(big.read_bytes()[:1000])  # an interrupted earlier download
    st.download_tree(loc, dest, log=lambda m: None)
    for p in model_dir.iterdir():
        assert hashlib.sha256((dest / p.name).read_bytes()).digest() == hashlib.sha256(p.read_bytes()).digest()
    # corrupt a file behind the record's back: the size check makes it download again
    (dest / big.name).write_bytes(b"junk")
    st.download_tree(loc, dest, log=lambda m: None)
    assert (dest / big.name).read_bytes() == big.read_bytes()


def test_s3_outage_loses_no_checkpoint(tmp_path, s3, model_dir):
    steps, save_every = 40, 4
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.alpaca_rows(60))
    c = s3.client()
    c.put_object(Bucket="kubetune", Key="data/train.jsonl", Body=data.read_bytes())
    cfg = tiny.trainer_config(
        tmp_path, model_dir, data,
        dataset={"validationSplit": 0.1},
        training={"maxSteps": steps, "learningRate": 2e-2, "evalSteps": 8, "loggingSteps": 1},
        checkpoints={"saveSteps": save_every, "keep": 2},
        storage={"endpoint": s3.endpoint, "region": "us-east-1"},
        ckpt_uri="s3://kubetune/ckpt/default/test/run-1", output_uri="s3://kubetune/out/default/test/run-1",
        progress_uri="s3://kubetune/progress/default/test/run-1.json")
    cfg["spec"]["dataset"]["uri"] = "s3://kubetune/data/train.jsonl"
    cfg["metricsPort"] = port = int(free_port())
    env = {"KUBETUNE_DEBUG_STEP_SLEEP": "1.0", "KUBETUNE_UPLOAD_MAX_BACKOFF": "4", "KUBETUNE_PROGRESS_INTERVAL": "2",
           "KUBETUNE_S3_CONNECT_TIMEOUT": "2", "KUBETUNE_S3_MAX_ATTEMPTS": "2"}
    run = TrainerProc(cfg, tmp_path / "trainer.yaml", env=env)
    run.wait_for(lambda e: e.get("event") == "log" and "checkpoint-00000004 committed" in e.get("message", ""), 300)

    s3.stop()
    down_at = time.time()
    step_before = max(run.losses())
    time.sleep(30)
    step_after = max(run.losses())
    metrics = _scrape(port)  # the pod's /metrics, as the PodMonitor scrapes it, mid-outage
    s3.start()
    outage = time.time() - down_at
    assert run.wait(300) == 0, run.stderr[-3000:]

    failures = [m for m in run.messages() if "upload failed" in m]
    committed = sorted(int(m.split("checkpoint-")[1][:8]) for m in run.messages() if " committed to " in m)
    saves = run.events_of("checkpoint")
    superseded = sorted([s for e in saves for s in e["superseded"]] +
                        [int(m.split("checkpoint-")[1][:8]) for m in run.messages() if "upload is abandoned" in m])
    print(f"\nS3 outage ({s3.kind}): {outage:.0f}s down, training went from step {step_before} to {step_after} meanwhile; "
          f"{len(failures)} failed upload attempts; committed: {committed}; superseded while waiting: {superseded}; "
          f"most on local disk: {max(e['pending'] for e in saves)}")
    assert step_after - step_before >= 15, "training waited for S3"
    assert failures, "the outage did not hit an upload"
    assert [e["step"] for e in saves] == list(range(save_every, steps + 1, save_every))
    # every checkpoint either reached S3 or was one retention would have deleted anyway; the
    # outage's backlog never held more than retention keeps (2 + the best) and the one mid-retry
    assert superseded and sorted(set(committed) | set(superseded)) == [e["step"] for e in saves], "a checkpoint was lost"
    assert max(e["pending"] for e in saves) <= 2 + 1 + 1
    assert metrics["kubetune_trainer_total_steps"] == steps and metrics["kubetune_trainer_step"] >= step_after
    assert metrics["kubetune_trainer_checkpoint_committed_step"] == save_every  # the last before the outage
    assert metrics["kubetune_trainer_checkpoint_upload_failures_total"] >= 1
    assert 1 <= metrics["kubetune_trainer_checkpoints_superseded_total"] <= len(superseded)
    assert metrics["kubetune_trainer_tokens_total"] > 0 and metrics["kubetune_trainer_loss"] > 0

    # what S3 holds now is what retention keeps of every checkpoint saved, as if none had been
    # dropped: the newest two plus the best, each complete and matching its manifest
    evals = {e["step"]: e["evalLoss"] for e in run.events_of("eval") if "evalLoss" in e}
    objs = _objects(c, "ckpt/default/test/run-1/")
    names = sorted({k.split("/")[4] for k in objs})
    assert names == [ck.ckpt_name(s) for s in sorted(ck.retained([(e["step"], evals.get(e["step"])) for e in saves], 2))]
    assert {"checkpoint-00000036", "checkpoint-00000040"} <= set(names)
    for name in names:
        man = json.loads(c.get_object(Bucket="kubetune", Key=f"ckpt/default/test/run-1/{name}/manifest.json")["Body"].read())
        for f in man["files"]:
            body = c.get_object(Bucket="kubetune", Key=f"ckpt/default/test/run-1/{name}/{f['path']}")["Body"].read()
            assert len(body) == f["size"] and hashlib.sha256(body).hexdigest() == f["sha256"]
    term = json.loads(run.termination.read_text())
    assert term["reason"] == "Completed" and term["result"]["adapterUri"] == "s3://kubetune/out/default/test/run-1/adapter/"
    assert "ckpt" not in term["result"]["adapterUri"]
    assert "out/default/test/run-1/adapter/manifest.json" in _objects(c, "out/")
    progress = json.loads(c.get_object(Bucket="kubetune", Key="progress/default/test/run-1.json")["Body"].read())
    assert progress["state"] == "finished" and progress["checkpoints"]["latestStep"] == steps


def test_under_fsdp_only_rank_0s_node_downloads_the_weights(tmp_path, s3, model_dir):
    """Two pods of an Indexed Job, one FSDP process each, the model from S3: rank 0 alone reads the
    weights (the other rank builds on meta and receives them from FSDP), so the second pod downloads
    the config and tokenizer only, and the two still train like one process."""
    c = s3.client()
    for p in model_dir.iterdir():
        c.upload_file(str(p), "kubetune", f"models/tiny/{p.name}")
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.alpaca_rows(45, seed=9))

    def cfg_for(store, n):
        cfg = tiny.trainer_config(
            tmp_path, model_dir, data, method={"type": "full"},
            training={"maxSteps": 8, "microBatchSize": 2, "gradientAccumulationSteps": 2 // n, "learningRate": 1e-3,
                      "seed": 5, "sharding": "fsdp" if n > 1 else "auto"},
            storage={"endpoint": s3.endpoint, "region": "us-east-1"}, resolved={"numProcesses": n, "gradientAccumulationSteps": 2 // n},
            ckpt_uri=f"file://{store}/ckpt", output_uri=f"file://{store}/out", progress_uri=f"file://{store}/progress.json")
        cfg["spec"]["model"]["uri"] = "s3://kubetune/models/tiny"
        return cfg

    single = TrainerProc(cfg_for(tmp_path / "single", 1), tmp_path / "single.yaml")
    assert single.wait(300) == 0, single.stderr[-3000:]
    port = free_port()
    pods = []
    for index in (0, 1):
        cfg = cfg_for(tmp_path / "multi", 2)
        cfg["spec"]["resources"] |= {"nodes": 2, "gpusPerNode": 1}
        cfg["paths"]["workDir"] = str(tmp_path / f"pod-{index}")
        pods.append(TrainerProc(cfg, tmp_path / f"pod-{index}.yaml", env={
            "JOB_COMPLETION_INDEX": str(index), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
            "KUBETUNE_DEBUG_FSDP_ON_CPU": "1", "KUBETUNE_TERMINATION_LOG": str(tmp_path / f"pod-{index}.termination")}))
    for p in pods:
        assert p.wait(300) == 0, p.stderr[-3000:]
    assert pods[0].events_of("model")[0]["distributedType"] == "FSDP"
    files = [sorted(f.name for f in (tmp_path / f"pod-{i}" / "model").iterdir() if not f.name.startswith(".")) for i in (0, 1)]
    assert "model.safetensors" in files[0] and "config.json" in files[0], files
    assert files[1] == [f for f in files[0] if f != "model.safetensors"], files  # config and tokenizer, no weights
    got, expected = pods[0].losses(), single.losses()
    assert sorted(got) == list(range(1, 9)) and max(abs(got[s] - expected[s]) for s in expected) < 2e-3, (got, expected)


def test_an_https_endpoint_signed_by_a_private_ca_verifies_against_aws_ca_bundle(tmp_path, s3, tls_proxy, monkeypatch):
    """spec.storage.caBundle reaches the trainer as AWS_CA_BUNDLE (the operator mounts the ConfigMap key):
    without it the private CA's certificate is refused, with it the same endpoint works."""
    from kubetune.api.v1alpha1 import Storage
    from kubetune_trainer import storage as st

    proxy = tls_proxy(int(s3.endpoint.rsplit(":", 1)[1]))
    s3.client().put_object(Bucket="kubetune", Key="models/tiny/config.json", Body=b'{"model_type": "llama"}')
    storage = Storage(endpoint=proxy.url)
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    with pytest.raises(Exception) as e:
        st.S3Location(st.s3_client(storage), "kubetune", "models/tiny").get_bytes("config.json")
    assert "certificate verify failed" in str(e.value).lower() or "CERTIFICATE_VERIFY_FAILED" in str(e.value), e.value
    # downloading through it is a BadConfig at once (exit 2, the Job fails) naming the field, not retries
    from kubetune_trainer.errors import BadConfig

    said = []
    with pytest.raises(BadConfig) as e:
        st.download_tree(st.S3Location(st.s3_client(storage), "kubetune", "models/tiny"), tmp_path / "dl", log=said.append)
    assert e.value.message == ("cannot list s3://kubetune/models/tiny: the S3 endpoint's TLS certificate is not "
                               "trusted (certificate verify failed): set spec.storage.caBundle to a ConfigMap holding "
                               "the CA that signed it")
    assert not said, said  # no "retrying in" lines
    from kubetune_trainer import data as dt

    with pytest.raises(BadConfig) as e:  # a dataset prefix: the same
        dt.resolve_files("s3://kubetune/models/", storage, tmp_path / "w", log=said.append)
    assert e.value.message.startswith("cannot list s3://kubetune/models/: the S3 endpoint's TLS certificate is not "
                                      "trusted"), e.value.message
    monkeypatch.setenv("AWS_CA_BUNDLE", str(proxy.ca_file))
    loc = st.S3Location(st.s3_client(storage), "kubetune", "models/tiny")
    assert loc.get_bytes("config.json") == b'{"model_type": "llama"}'


def test_a_dataset_prefix_with_parquet_and_jsonl_objects_is_downloaded_and_read(tmp_path, s3):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import tiny
    from kubetune.api.v1alpha1 import Storage
    from kubetune_trainer import data as dt

    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(tiny.alpaca_rows(7)), buf)
    c = s3.client()
    c.put_object(Bucket="kubetune", Key="ds/pq/data/train-00000-of-00001.parquet", Body=buf.getvalue().to_pybytes())
    c.put_object(Bucket="kubetune", Key="ds/pq/more.jsonl", Body="".join(
        json.dumps(r) + "\n" for r in tiny.alpaca_rows(2)).encode())
    c.put_object(Bucket="kubetune", Key="ds/pq/README.md", Body=b"# card")
    storage = Storage(endpoint=s3.endpoint, region="us-east-1")
    from kubetune_trainer import storage as st

    listings = []  # what the trainer asks the S3 server to list (a big prefix costs a page per 1,000 keys)
    st.open_location("s3://kubetune/", storage).client.meta.events.register(
        "provide-client-params.s3.ListObjectsV2", lambda params, **_: listings.append(params["Prefix"]))
    files = dt.resolve_files("s3://kubetune/ds/pq/", storage, tmp_path / "w", log=lambda m: None)
    assert [n for n, _ in files] == ["s3://kubetune/ds/pq/data/train-00000-of-00001.parquet",
                                     "s3://kubetune/ds/pq/more.jsonl"]
    assert listings == ["ds/pq/"]  # listed once, not again for the download
    recs, fmt = dt.read_records(files, "auto", "fail", dt.DataStats())
    assert fmt == "alpaca" and len(recs) == 9
    one = dt.resolve_files("s3://kubetune/ds/pq/data/train-00000-of-00001.parquet", storage, tmp_path / "w1",
                           log=lambda m: None)
    assert listings[1:] == ["ds/pq/data/train-00000-of-00001.parquet"]  # the object's key, not its folder
    assert len(dt.read_records(one, "alpaca", "fail", dt.DataStats())[0]) == 7


def test_the_evaluation_report_waits_out_an_s3_outage_at_the_end_of_a_run(s3):
    """Found on a real node with S3 stopped for 60 s: a run that reached its end during the outage
    failed (reason Error) on writing evaluation/summary.json, which was not retried as the outputs'
    uploads are, and the pod's committed work was thrown away. Now the write waits for S3."""
    import threading
    from types import SimpleNamespace

    from kubetune_trainer import storage as st
    from kubetune_trainer.evaluation import EndOfRunEvaluation

    ev = EndOfRunEvaluation(SimpleNamespace(max_new_tokens=8, temperature=0.0), [1, 2, 3], [], 7, print)
    loc = st.open_location("s3://kubetune/out/default/test/run-1", SimpleNamespace(
        endpoint=s3.endpoint, region="us-east-1", force_path_style=True))
    s3.stop()
    threading.Timer(4.0, s3.start).start()  # back after 4 s, while the write is retrying
    t0 = time.time()
    result, report = ev.write({"metrics": {"loss": 2.0}, "answers": []}, {"metrics": {"loss": 1.0}, "answers": []},
                              loc, "default/test")
    waited = time.time() - t0
    keys = set(_objects(s3.client(), "out/default/test/run-1/evaluation/"))
    assert keys == {f"out/default/test/run-1/evaluation/{f}" for f in ("summary.json", "answers.jsonl", "report.html")}
    assert report == "s3://kubetune/out/default/test/run-1/evaluation/report.html"
    assert result["delta"]["loss"] == -1.0 and waited >= 3.5, (result, waited)
