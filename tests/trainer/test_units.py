"""Fast checks of the trainer's parts (no training)."""
import json
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tiny
from kubetune_trainer import checkpoint as ck
from kubetune_trainer import data as dt
from kubetune_trainer import storage as st
from kubetune_trainer.cli import launch_command
from kubetune_trainer.config import load_config, parse_config, plan_for
from kubetune_trainer.errors import BadConfig, BadData, ModelLoadFailed, StorageFailed
from kubetune_trainer.model import build_model, chunked_linear_ce, loading_place, materialized_bytes
from kubetune_trainer.progress import ProgressReporter, write_termination


def test_chunked_linear_ce_matches_torch():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    y[::5] = -100
    loss = chunked_linear_ce(h, w, None, y, chunk_rows=7)
    loss.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy(h2 @ w2.t(), y, ignore_index=-100, reduction="sum")
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-4)
    assert torch.allclose(h.grad, h2.grad, atol=1e-5)
    assert torch.allclose(w.grad, w2.grad, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(chunked_linear_ce(h, w, None, y, chunk_rows=5), ref, atol=1e-4)


def test_bad_lines_name_file_and_lines(tmp_path):
    f = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.alpaca_rows(10),
                         {3: '{"instruction": "x", "output": ', 6: '{"instruction": "x"}', 9: "[1, 2]"})
    with pytest.raises(BadData) as e:
        dt.read_records([("s3://b/train.jsonl", f)], "auto", "fail", dt.DataStats())
    msg = e.value.message
    assert "3 malformed lines" in msg and "s3://b/train.jsonl" in msg
    assert "line 3: invalid JSON" in msg and "line 6: missing field 'output'" in msg and "line 9: expected a JSON object" in msg
    assert "onBadLine: skip" in msg
    stats = dt.DataStats()
    recs, fmt = dt.read_records([("train.jsonl", f)], "auto", "skip", stats)
    assert (len(recs), fmt, stats.skipped_lines) == (10, "alpaca", 3)


def test_format_mismatch_and_chat_checks(tmp_path):
    f = tiny.write_jsonl(tmp_path / "c.jsonl", tiny.chat_rows(3) + [{"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(BadData, match=r"line 4: messages\[0\].role must be one of"):
        dt.read_records([("c.jsonl", f)], "chat", "fail", dt.DataStats())
    g = tiny.write_jsonl(tmp_path / "t.jsonl", [{"foo": 1}])
    with pytest.raises(BadData, match="line 1: cannot detect the format"):
        dt.read_records([("t.jsonl", g)], "auto", "fail", dt.DataStats())


def _as_sharegpt(rec: dict) -> dict:
    names = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}
    msgs = rec["messages"]
    lead = msgs[0]["role"] == "system"  # ShareGPT keeps a leading system prompt beside the turns
    out = {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in msgs[lead:]]}
    if lead:
        out["system"] = msgs[0]["content"]
    return out


def test_sharegpt_conversations_read_as_the_same_chat_and_train_the_same_tokens(tmp_path, model_dir):
    from kubetune_trainer.model import load_tokenizer

    rows = tiny.chat_rows(6)
    rows[1]["messages"] = rows[1]["messages"][1:]  # one without a system prompt
    assert rows[0]["messages"][0]["role"] == "system" and rows[1]["messages"][0]["role"] == "user"
    f = tiny.write_jsonl(tmp_path / "sharegpt.jsonl", [_as_sharegpt(r) for r in rows])
    recs, fmt = dt.read_records([("sharegpt.jsonl", f)], "auto", "fail", dt.DataStats())
    assert fmt == "chat" and recs == rows
    tok = dt.Tokenize(load_tokenizer(model_dir), "chat", 512)
    a, b = tok.example(recs[0], dt.DataStats()), tok.example(rows[0], dt.DataStats())
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels) and any(y != dt.IGNORE for y in a.labels)

    bad = tiny.write_jsonl(tmp_path / "bad.jsonl", [
        {"conversations": [{"from": "bot", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "hi"}]},
        {"conversations": [{"from": "gpt", "value": 3}]},
        {"conversations": []}])
    with pytest.raises(BadData) as e:
        dt.read_records([("bad.jsonl", bad)], "chat", "fail", dt.DataStats())
    msg = e.value.message
    assert "line 1: conversations[0].from must be one of system, human, user, gpt" in msg, msg
    assert "line 2: no gpt (assistant) turn (nothing to learn from)" in msg
    assert "line 3: conversations[0].value must be a string" in msg
    assert "line 4: field 'conversations' must be a non-empty list" in msg


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)  # several batches' worth of groups
    return path


def test_parquet_rows_read_as_the_same_records_and_bad_rows_are_named(tmp_path):
    alpaca = tiny.alpaca_rows(10)
    alpaca[2]["input"] = None  # Parquet nulls where JSON Lines omit the key
    f = _write_parquet(tmp_path / "train-00000-of-00001.parquet", alpaca)
    stats = dt.DataStats()
    recs, fmt = dt.read_records([("data/train-00000-of-00001.parquet", f)], "auto", "fail", stats)
    assert fmt == "alpaca" and stats.lines == 10
    assert [{k: v for k, v in r.items() if v is not None} for r in recs] == [
        {k: v for k, v in r.items() if v is not None} for r in alpaca]

    chat = tiny.chat_rows(4)  # messages: a list of structs in Parquet
    recs, fmt = dt.read_records([("c.parquet", _write_parquet(tmp_path / "c.parquet", chat))], "auto", "fail", dt.DataStats())
    assert fmt == "chat" and recs == chat

    rows = [dict(r) for r in tiny.alpaca_rows(5)]
    rows[3]["output"] = ""
    bad = _write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(BadData) as e:
        dt.read_records([("s3://b/bad.parquet", bad)], "alpaca", "fail", dt.DataStats())
    assert e.value.message.startswith("1 malformed line: s3://b/bad.parquet: row 4: field 'output' is empty."), e.value.message
    recs, _ = dt.read_records([("s3://b/bad.parquet", bad)], "alpaca", "skip", st_ := dt.DataStats())
    assert len(recs) == 4 and st_.skipped_lines == 1

    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 not really")
    with pytest.raises(BadData, match=r"^junk.parquet: not a readable Parquet file \("):
        dt.read_records([("junk.parquet", junk)], "auto", "fail", dt.DataStats())


def test_a_directory_of_parquet_and_jsonl_is_read_whole(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    _write_parquet(d / "a.parquet", tiny.alpaca_rows(3))
    tiny.write_jsonl(d / "b.jsonl", tiny.alpaca_rows(2))
    (d / "README.md").write_text("not data")
    files = dt.resolve_files(f"file://{d}", None, tmp_path / "w")
    assert [n for n, _ in files] == [f"file://{d}/a.parquet", f"file://{d}/b.jsonl"]
    recs, _ = dt.read_records(files, "auto", "fail", dt.DataStats())
    assert len(recs) == 5


def hub_cache(work: Path, repo: str, files: dict[str, list[dict]], rev: str = "main") -> None:
    """A Hub dataset as huggingface_hub caches it (what a finished download leaves in the work dir):
    with HF_HUB_OFFLINE=1 the real client serves it from there, so no Hub or fake of one is needed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cache = work / "hf" / f"datasets--{repo.replace('/', '--')}"
    (cache / "refs" / rev).parent.mkdir(parents=True, exist_ok=True)
    (cache / "refs" / rev).write_text("c0ffee" * 6 + "c0ff")
    snap = cache / "snapshots" / ("c0ffee" * 6 + "c0ff")
    for name, rows in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(rows), str(snap / name))
        else:
            tiny.write_jsonl(snap / name, rows)


ULTRA = {"data/train_sft-00000-of-00001.parquet": tiny.chat_rows(30), "data/train_gen-00000-of-00001.parquet": tiny.chat_rows(5),
         "data/test_sft-00000-of-00001.parquet": tiny.chat_rows(6), "data/test_gen-00000-of-00001.parquet": tiny.chat_rows(2),
         "README.md": []}


def test_a_path_in_an_hf_dataset_uri_names_a_file_a_folder_or_a_glob(tmp_path, monkeypatch):
    """hf://org/name/<path>: a dataset whose file names hold more than the split (ultrachat_200k's
    train_sft and train_gen) is read only where the path says."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert dt.hub_dataset_parts("hf://org/ultra/data/train_sft-*.parquet@refs/convert/parquet") == (
        "org/ultra", "data/train_sft-*.parquet", "refs/convert/parquet")
    assert dt.hub_dataset_parts("hf://org/ultra") == ("org/ultra", "", None)
    assert dt.hub_patterns("data") == ["data/*.jsonl", "data/*.parquet"]
    assert dt.hub_patterns("data/train_sft-*") == ["data/train_sft-*"]
    assert dt.hub_patterns("") == ["*.jsonl", "*.parquet"]

    work = tmp_path / "w"
    hub_cache(work, "org/ultra", ULTRA)
    logged = []

    def names(uri, split="train"):
        return [n for n, _ in dt.resolve_files(uri, None, work, logged.append, split=split)]

    pre = "hf://org/ultra/data/"
    # by file names alone, train takes both train_ files
    assert names("hf://org/ultra") == [pre + "train_gen-00000-of-00001.parquet", pre + "train_sft-00000-of-00001.parquet"]
    assert logged[-1].endswith("; name others with a path: hf://org/ultra/<path>")
    assert names("hf://org/ultra/data/train_sft-*") == [pre + "train_sft-00000-of-00001.parquet"]
    assert logged[-1] == "hf://org/ultra/data/train_sft-*: reading 1 file(s): data/train_sft-00000-of-00001.parquet"
    assert names("hf://org/ultra/data/test_sft-00000-of-00001.parquet", "validation") == [pre + "test_sft-00000-of-00001.parquet"]
    assert len(names("hf://org/ultra/data")) == 4  # a folder: all of it, no split picking
    files = dt.resolve_files("hf://org/ultra/data/train_sft-*", None, work)
    recs, _ = dt.read_records(files, "chat", "fail", dt.DataStats())
    assert len(recs) == 30
    with pytest.raises(BadData) as e:
        dt.resolve_files("hf://org/ultra/data/train.parquet", None, work)
    assert e.value.message == (
        "hf://org/ultra/data/train.parquet: no .jsonl or .parquet files at 'data/train.parquet' in the dataset org/ultra "
        "(it has data/test_gen-00000-of-00001.parquet, data/test_sft-00000-of-00001.parquet, "
        "data/train_gen-00000-of-00001.parquet, data/train_sft-00000-of-00001.parquet)")


def test_the_hub_client_trusts_spec_storage_ca_bundle_beside_the_public_roots(tmp_path, monkeypatch, hub_mirror, tls_proxy):
    """A Hub mirror behind https signed by a private CA: huggingface_hub's own client (httpx, built
    afresh as in a new pod) verifies it once the trainer has added the pod's AWS_CA_BUNDLE to its
    trust store, keeps the public roots, and without the bundle the failure names the fix."""
    import os
    import ssl

    from huggingface_hub import close_session, get_session

    hub_mirror.repos = {("acme/m", "main"): ({"model_type": "llama"}, None)}
    proxy = tls_proxy(int(hub_mirror.url.rsplit(":", 1)[1]))
    url = f"{proxy.url}/acme/m/resolve/main/config.json"
    monkeypatch.setenv("SSL_CERT_FILE", "")
    monkeypatch.setenv("HF_ENDPOINT", proxy.url)
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    assert st.trust_ca_for_hub(tmp_path) is None  # no bundle, nothing changes
    close_session()
    with pytest.raises(Exception) as e:
        get_session().get(url)
    got = st.hub_error("hf://acme/m", e.value, ModelLoadFailed)
    assert type(got) is BadConfig and got.message == (
        f"hf://acme/m: the Hub endpoint {proxy.url} did not verify: its TLS certificate is not trusted (certificate "
        "verify failed): set "
        "spec.storage.caBundle to a ConfigMap holding the CA that signed it")

    monkeypatch.setenv("AWS_CA_BUNDLE", str(proxy.ca_file))
    bundle = st.trust_ca_for_hub(tmp_path)
    assert os.environ["SSL_CERT_FILE"] == str(bundle)
    assert ssl.create_default_context(cafile=str(bundle)).cert_store_stats()["x509_ca"] > 100  # the public roots too
    close_session()
    try:
        r = get_session().get(url)
    finally:
        close_session()
    assert r.status_code == 200 and r.json() == {"model_type": "llama"}
    assert hub_mirror.seen[-1] == ("/acme/m/resolve/main/config.json", None)
    monkeypatch.setenv("SSL_CERT_FILE", "/etc/custom.pem")  # one the user set in resources.env stands
    assert st.trust_ca_for_hub(tmp_path) is None and os.environ["SSL_CERT_FILE"] == "/etc/custom.pem"


def test_a_hub_datasets_splits_are_picked_by_their_file_names():
    hub = ["data/test-00000-of-00001.parquet", "data/train-00000-of-00002.parquet",
           "data/train-00001-of-00002.parquet", "data/validation-00000-of-00001.parquet"]
    assert dt.pick_split(hub, "train") == ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    assert dt.pick_split(hub, "validation") == ["data/validation-00000-of-00001.parquet"]
    assert dt.pick_split(["train.jsonl", "test.jsonl"], "train") == ["train.jsonl"]
    assert dt.pick_split(["train.jsonl", "test.jsonl"], "validation") == ["test.jsonl"]  # no validation split: test
    assert dt.pick_split(["train/part-0.parquet", "eval/part-0.parquet"], "train") == ["train/part-0.parquet"]
    assert dt.pick_split(["sft/Training_set.jsonl", "sft/dev.jsonl"], "validation") == ["sft/dev.jsonl"]
    # no split named: everything (and a name that merely contains one is not a split)
    plain = ["alpaca_data.jsonl", "extra.parquet"]
    assert dt.pick_split(plain, "train") == plain and dt.pick_split(plain, "validation") == plain
    assert dt.pick_split(["constrained.jsonl", "retest.jsonl"], "train") == ["constrained.jsonl", "retest.jsonl"]


def test_alpaca_loss_counts_only_the_response(model_dir):
    tok = __import__("kubetune_trainer.model", fromlist=["x"]).load_tokenizer(model_dir)
    rec = {"instruction": "What color is the apple ?", "input": "", "output": "The apple is red ."}
    ex = dt.Tokenize(tok, "alpaca", 512).example(rec, dt.DataStats())
    learned = [ex.input_ids[t + 1] for t, y in enumerate(ex.labels) if y != dt.IGNORE]
    assert learned == tok("The apple is red .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert all(y in (dt.IGNORE, ex.input_ids[t + 1]) for t, y in enumerate(ex.labels[:-1]))


def test_chat_loss_counts_only_assistant_turns(model_dir):
    from kubetune_trainer.model import load_tokenizer

    tok = load_tokenizer(model_dir)
    rec = tiny.chat_rows(1)[0]
    ex = dt.Tokenize(tok, "chat", 512).example(rec, dt.DataStats())
    learned = tok.decode([ex.input_ids[t + 1] for t, y in enumerate(ex.labels) if y != dt.IGNORE])
    # each assistant turn and the end-of-turn token that closes it (so the model learns to stop)
    answers = " ".join(m["content"] + " <|end|>" for m in rec["messages"] if m["role"] == "assistant")
    assert learned.split() == answers.split()


def test_packing_keeps_examples_apart():
    exs = [dt.Example([1, 2, 3], [2, 3, -100]), dt.Example([4, 5], [5, -100]), dt.Example([6, 7, 8, 9], [7, 8, 9, -100])]
    packed = dt.pack(exs, 6)
    assert [p.input_ids for p in packed] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert packed[0].position_ids == [0, 1, 2, 0, 1]
    b = dt.collate(packed, pad_id=0, pad_to=6)
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    assert b["labels"].tolist()[0] == [2, 3, -100, 5, -100, -100]
    assert "attention_mask" not in b


def test_schedule_is_a_function_of_the_step():
    a = dt.Schedule(10, 3, 1, 0, seed=5)
    b = dt.Schedule(10, 3, 1, 0, seed=5)
    assert a.per_epoch == 4
    seq = [a.indices(m) for m in range(12)]
    assert [b.indices(m) for m in reversed(range(12))][::-1] == seq
    assert sorted(sum(seq[:4], [])) == list(range(10))
    assert seq[:4] != seq[4:8]  # a new order each epoch
    r0, r1 = dt.Schedule(10, 2, 2, 0, 5), dt.Schedule(10, 2, 2, 1, 5)
    assert not set(r0.indices(0)) & set(r1.indices(0))


def test_schedule_splits_the_last_partial_batch_between_ranks_and_drops_nothing():
    ex = [dt.Example([i, i + 1, i + 2], [i + 1, i + 2, dt.IGNORE]) for i in range(11)]
    ranks = [dt.Schedule(11, 2, 2, r, seed=1) for r in (0, 1)]  # global batch 4: 4 + 4 + 3
    assert ranks[0].per_epoch == 3
    seen = [i for m in range(3) for r in ranks for i in r.indices(m)]
    assert sorted(seen) == list(range(11))
    assert [len(r.indices(2)) for r in ranks] == [2, 1]
    one = [dt.Schedule(9, 2, 2, r, seed=1) for r in (0, 1)]  # 4 + 4 + 1: rank 1 has no share of the last
    assert one[1].indices(2) == []
    filler = one[1].batch(2, ex)
    assert len(filler) == 1 and set(filler[0].labels) == {dt.IGNORE}  # runs the forward, counts nothing
    assert one[0].batch(2, ex) == [ex[i] for i in one[0].indices(2)]
    with pytest.raises(BadData, match="no training sequences"):
        dt.Schedule(0, 2, 2, 0, seed=1)


def test_split_is_deterministic():
    a = dt.split_validation(list(range(100)), 0.1, 3)
    assert a == dt.split_validation(list(range(100)), 0.1, 3)
    assert len(a[1]) == 10 and not set(a[0]) & set(a[1])


def test_download_tree_resumes_and_verifies(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"x" * 1000)
    (src / "sub" / "b.txt").write_text("hello")
    man = {"files": [{"path": "a.bin", "size": 1000, "sha256": st.sha256_file(src / "a.bin")},
                     {"path": "sub/b.txt", "size": 5, "sha256": "0" * 64}]}
    (src / "manifest.json").write_text(json.dumps(man))
    dest = tmp_path / "dest"
    with pytest.raises(StorageFailed, match="sub/b.txt: downloaded file does not verify"):
        st.download_tree(st.LocalLocation(src), dest, log=lambda m: None)
    man["files"][1]["sha256"] = st.sha256_file(src / "sub" / "b.txt")
    (src / "manifest.json").write_text(json.dumps(man))
    st.download_tree(st.LocalLocation(src), dest, log=lambda m: None)
    assert (dest / "a.bin").read_bytes() == b"x" * 1000


def test_under_fsdp_only_rank_0_reads_the_weights_and_no_rank_puts_the_whole_model_on_its_gpu():
    assert [loading_place("lora", False, r) for r in (0, 1)] == ["device", "device"]  # DDP/one GPU: as before
    for method in ("lora", "full", "freeze", "prompt-tuning", "prefix-tuning"):
        assert [loading_place(method, True, r) for r in (0, 1, 7, 8)] == ["cpu", "meta", "meta", "meta"]
        assert [loading_place(method, True, r, rank0_only=False) for r in (0, 1)] == ["cpu", "cpu"]
    assert loading_place("qlora", True, 3) == "device"  # bitsandbytes quantizes while loading onto the GPU


@pytest.mark.parametrize("method", [{"type": "lora", "lora": {"rank": 4, "alpha": 8}}, {"type": "full"},
                                    {"type": "freeze", "freeze": {"trainableLayers": 1}}])
def test_a_meta_rank_builds_the_same_model_without_holding_a_byte_of_it(tmp_path, model_dir, method):
    cfg = parse_config(tiny.trainer_config(tmp_path, model_dir, tmp_path / "d.jsonl", method=method))
    plan = plan_for(cfg)
    real, _ = build_model(plan, cfg.spec, model_dir, torch.device("cpu"), log=lambda m: None, place="cpu")
    meta, _ = build_model(plan, cfg.spec, model_dir, torch.device("cpu"), log=lambda m: None, place="meta")
    shapes = lambda m: [(n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in m.named_parameters()]  # noqa: E731
    assert shapes(meta) == shapes(real)  # FSDP flattens both into the same shards
    assert [n for n, _ in meta.named_buffers()] == [n for n, _ in real.named_buffers()]
    assert materialized_bytes(meta) == 0
    assert materialized_bytes(real) == sum(p.numel() * 4 for p in real.parameters()) + sum(
        b.numel() * b.element_size() for b in real.buffers())


def test_writers_of_one_key_each_publish_a_whole_document(tmp_path):
    """The progress thread and a checkpoint commit write progress.json at once. Through one shared
    temporary their bytes interleaved: a CI run read a document with another's tail after it."""
    loc = st.LocalLocation(tmp_path)
    docs = [json.dumps({"writer": i, "pad": "x" * (40 * i)}).encode() for i in range(8)]
    errors: list[BaseException] = []

    def write(body):
        try:
            for _ in range(150):
                loc.put_bytes("progress.json", body)
                assert json.loads(loc.get_bytes("progress.json"))["writer"] in range(8)
        except BaseException as e:  # noqa: BLE001 -- reported below, with the thread's failure
            errors.append(e)

    threads = [threading.Thread(target=write, args=(d,)) for d in docs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} writers failed, the first: {errors[0]!r}"
    assert loc.get_bytes("progress.json") in docs
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"], "a temporary was left behind"


def test_progress_writes_never_overlap_so_the_newest_snapshot_lands_last(tmp_path):
    class Slow(st.LocalLocation):
        active = peak = 0

        def put_bytes(self, key, data):
            Slow.active += 1
            Slow.peak = max(Slow.peak, Slow.active)
            time.sleep(0.002)
            super().put_bytes(key, data)
            Slow.active -= 1

    rep = ProgressReporter(Slow(tmp_path), "progress.json", interval=0.001)

    def step(base):
        for s in range(base, base + 50):
            rep.update(step=s, total_steps=400)
            rep.flush()

    threads = [threading.Thread(target=step, args=(50 * i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rep.update(step=999, total_steps=999)
    rep.close()
    assert Slow.peak == 1
    assert json.loads((tmp_path / "progress.json").read_text())["progress"]["step"] == 999


def test_retention_keeps_the_newest_and_the_best():
    cks = [(10, 3.0), (20, 1.5), (30, None), (40, 1.5), (50, 2.0), (60, None)]
    assert ck.retained(cks, 2) == {50, 60, 40}  # of equal eval losses the newer
    assert ck.retained(cks[:2], 3) == {10, 20}
    assert ck.retained([(1, None), (2, None)], 1) == {2}


def test_retention_on_a_file_store_leaves_no_empty_directory(tmp_path):
    """A deleted checkpoint's directory goes too: the store lists only the kept ones (here the best,
    step 1, and the newest two)."""
    store = tmp_path / "store"
    up = ck.Uploader(st.LocalLocation(store), keep=2, log=lambda m: None)
    for step, loss in {1: 1.0, 2: None, 3: 2.0, 4: None}.items():
        d = tmp_path / "local" / ck.ckpt_name(step)
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(bytes([step]) * 100)
        up.submit(d, step, loss)
        assert up.drain(10)
    up.close()
    assert sorted(p.name for p in store.iterdir()) == [ck.ckpt_name(s) for s in (1, 3, 4)]


def test_an_outage_backlog_holds_only_what_retention_keeps_and_commits_it_after(tmp_path):
    """S3 down (here: the store's path is a file, so every write fails for real) while checkpoints
    keep coming: local disk holds no more than retention would keep; once writes work again the
    store ends up exactly as if nothing had been dropped."""
    store = tmp_path / "store"
    store.write_text("blocked")
    msgs = []
    up = ck.Uploader(st.LocalLocation(store), keep=2, log=msgs.append, base_backoff=0.01, max_backoff=0.05)
    losses = {1: 4.0, 2: 1.0, 3: 3.0, 4: 2.5, 5: None, 6: 2.0, 7: None}
    dirs = {}
    for step, loss in losses.items():
        d = dirs[step] = tmp_path / "local" / ck.ckpt_name(step)
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(bytes([step]) * 1000)
        up.submit(d, step, loss)
        if step == 1:  # the uploader is retrying it before the next arrives (a busy machine could let 3 supersede it first)
            deadline = time.monotonic() + 30
            while up.failures == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
        on_disk = sorted(s for s, p in dirs.items() if p.exists())
        assert len(on_disk) <= 2 + 1 + 1 and up.pending <= 4, on_disk  # newest two, the best, the one mid-retry
    assert not up.drain(0.3) and up.failures > 0
    assert {2, 6, 7} <= {s for s, p in dirs.items() if p.exists()}  # best (1.0), newest two
    assert sorted(up.superseded) == [1, 3, 4, 5]  # 1 mid-retry (abandoned), the others while waiting
    assert any("checkpoint-00000003 is superseded by checkpoint-00000005" in m for m in msgs), msgs
    assert any("checkpoint-00000001 upload is abandoned" in m for m in msgs), msgs

    store.unlink()
    assert up.drain(10)
    up.close()
    assert sorted(c.step for c in ck.list_committed(st.LocalLocation(store))) == sorted(ck.retained(list(losses.items()), 2))
    assert not any(p.exists() for p in dirs.values())
    assert (store / "checkpoint-00000002" / "model.safetensors").read_bytes() == bytes([2]) * 1000


class _Throttled(st.LocalLocation):
    """A local store that takes a while per file, like S3 with big files."""
    def child(self, key):
        return _Throttled(self.root / key, st._join(self.uri, key))

    def put_file(self, key, local, sha256=None):
        import time
        time.sleep(0.04)
        super().put_file(key, local, sha256)


def _ckpt(root, step, files):
    d = root / ck.ckpt_name(step)
    d.mkdir(parents=True)
    for i in range(files):
        (d / f"shard-{i:03d}.bin").write_bytes(bytes([step]) * 1000)
    return d


def test_the_checkpoint_saved_at_sigterm_goes_ahead_of_an_older_upload_which_then_finishes(tmp_path):
    """Preemption: the next pod resumes from the checkpoint saved at SIGTERM, so it must not wait
    behind an older upload while the grace period runs. The older one pauses between two files and
    goes on afterwards; the store ends up with both whole."""
    import time
    store = tmp_path / "store"
    older_files_at_commit = {}

    def on_commit(uri, step, count):
        if step is not None:
            older_files_at_commit[step] = len(list((store / ck.ckpt_name(10)).glob("shard-*")))

    up = ck.Uploader(_Throttled(store), keep=2, on_commit=on_commit)
    up.submit(_ckpt(tmp_path / "local", 10, 40), 10, None)
    deadline = time.monotonic() + 10
    while len(list((store / ck.ckpt_name(10)).glob("shard-*"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    up.submit(_ckpt(tmp_path / "local", 20, 2), 20, None, first=True)
    assert up.drain(30)
    up.close()
    assert up.committed == [20, 10]
    print(f"\nstep 20 committed with step 10 at {older_files_at_commit[20]}/40 files; then step 10 finished")
    assert 3 <= older_files_at_commit[20] < 40  # step 10 was paused part-way, not restarted or finished first
    got = {c.step: c for c in ck.list_committed(st.LocalLocation(store))}
    assert sorted(got) == [10, 20]
    # the leftover sweep after step 20 committed left step 10's early files alone
    assert len(list((store / ck.ckpt_name(10)).glob("shard-*"))) == 40
    assert all((store / ck.ckpt_name(10) / f["path"]).stat().st_size == f["size"] for f in got[10].manifest["files"])
    assert up.failures == 0


def test_uploads_slower_than_saves_still_commit(tmp_path):
    """keep 1 and each upload longer than the save interval: every upload in flight is superseded by
    the next save. It must finish anyway (only a failing one is dropped), or S3 never gets a commit."""
    import time
    store = tmp_path / "store"
    commits = []
    up = ck.Uploader(_Throttled(store), keep=1, on_commit=lambda uri, step, n: step and commits.append(step))
    for step in range(1, 9):
        up.submit(_ckpt(tmp_path / "local", step, 10), step, None)  # 10 files: about 0.4 s to upload
        time.sleep(0.1)
    assert commits, "nothing committed while saves kept coming"
    assert up.drain(30)
    up.close()
    print(f"\ncommitted {up.committed}, superseded while waiting {up.superseded}")
    assert up.committed[0] == 1 and up.committed[-1] == 8
    # an upload superseded in flight that then commits is not also counted as dropped (the metric)
    assert not set(up.superseded) & set(up.committed), (up.superseded, up.committed)
    assert sorted(set(up.superseded) | set(up.committed)) == list(range(1, 9))
    assert [c.step for c in ck.list_committed(st.LocalLocation(store))] == [8]


def test_a_checkpoint_submitted_first_does_not_wait_out_an_older_ones_backoff(tmp_path):
    import time
    store = tmp_path / "store"
    store.write_text("blocked")  # S3 down: every write fails
    up = ck.Uploader(st.LocalLocation(store), keep=2, base_backoff=6.0, max_backoff=6.0)
    up.submit(_ckpt(tmp_path / "local", 1, 1), 1, None)
    deadline = time.monotonic() + 5
    while up.failures == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    store.unlink()  # S3 back, while step 1 waits out a backoff of about 6 s
    t0 = time.monotonic()
    up.submit(_ckpt(tmp_path / "local", 2, 1), 2, None, first=True)
    while 2 not in up.committed and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    waited = time.monotonic() - t0
    print(f"\nstep 2 committed {waited:.2f} s after it was submitted (step 1's backoff was about 6 s)")
    assert up.committed[:1] == [2] and waited < 3, (up.committed, waited)
    assert up.drain(15)
    up.close()
    assert up.committed == [2, 1]


def test_fetch_from_takes_one_checkpoint_or_the_newest_under_a_prefix(tmp_path):
    """checkpoints.resumeFrom names either; an uncommitted one (no manifest) is never used."""
    store = tmp_path / "store"
    up = ck.Uploader(st.LocalLocation(store), keep=3)
    for step in (4, 8):
        up.submit(_ckpt(tmp_path / "local", step, 2), step, None)
    assert up.drain(10)
    up.close()
    (store / ck.ckpt_name(12)).mkdir()  # a half-uploaded one: files, no manifest
    (store / ck.ckpt_name(12) / "shard-000.bin").write_bytes(b"x")
    loc = st.LocalLocation(store)
    path, c = ck.fetch_from(loc, tmp_path / "a")
    assert c.step == 8 and path == tmp_path / "a" / ck.ckpt_name(8) and len(list(path.glob("shard-*"))) == 2
    path, c = ck.fetch_from(loc.child(ck.ckpt_name(4)), tmp_path / "b")
    assert (c.name, c.step) == (ck.ckpt_name(4), 4) and (path / "shard-001.bin").read_bytes() == bytes([4]) * 1000
    assert ck.fetch_from(loc.child(ck.ckpt_name(12)), tmp_path / "c") is None
    assert ck.fetch_from(st.LocalLocation(tmp_path / "empty"), tmp_path / "d") is None


def test_bad_config_names_the_field(tmp_path, model_dir):
    cfg = tiny.trainer_config(tmp_path, model_dir, tmp_path / "d.jsonl")
    cfg["spec"]["method"]["lora"]["rnak"] = 3
    cfg["spec"]["training"]["learningRate"] = -1
    with pytest.raises(BadConfig) as e:
        parse_config(cfg, "trainer.yaml")
    assert "spec.method.lora.rnak: unknown field" in e.value.message
    assert "spec.training.learningRate" in e.value.message
    (tmp_path / "c.yaml").write_text("a: [1,")
    with pytest.raises(BadConfig, match="not valid YAML"):
        load_config(tmp_path / "c.yaml")


def test_qlora_on_cpu_is_a_clear_error(tmp_path, model_dir):
    from kubetune_trainer.config import plan_for
    from kubetune_trainer.model import build_model

    raw = tiny.trainer_config(tmp_path, model_dir, tmp_path / "d.jsonl", method={"type": "qlora"})
    raw["spec"]["resources"]["gpusPerNode"] = 1
    cfg = parse_config(raw)
    with pytest.raises(BadConfig, match="qlora needs a CUDA GPU"):
        build_model(plan_for(cfg), cfg.spec, model_dir, torch.device("cpu"))


@pytest.mark.parametrize("optimizer", ["adamw-8bit", "paged-adamw-8bit"])
def test_an_8bit_optimizer_on_cpu_is_a_clear_error(tmp_path, model_dir, optimizer):
    from kubetune_trainer.config import plan_for
    from kubetune_trainer.loop import build_optimizer

    raw = tiny.trainer_config(tmp_path, model_dir, tmp_path / "d.jsonl", training={"optimizer": optimizer})
    cfg = parse_config(raw)
    model = torch.nn.Linear(4, 4)
    with pytest.raises(BadConfig) as e:
        build_optimizer(model, plan_for(cfg), cfg.spec.training, torch.device("cpu"))
    assert str(e.value) == (f"training.optimizer {optimizer} is bitsandbytes 8-bit AdamW and needs a CUDA GPU; "
                            "use optimizer adamw on CPU")


def test_the_fp16_loss_scale_survives_a_checkpoint(tmp_path):
    """accelerate keeps fp16's GradScaler only on accelerators, so it is put on a CPU accelerator here
    (a real one): a restart must come back at the saved scale, not at 65536 (which would skip
    overflowing steps all over again)."""
    from accelerate import Accelerator

    from kubetune_trainer import checkpoint as ck

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model, opt = acc.prepare(model, opt)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
    acc.scaler.scale(torch.tensor(1.0))
    acc.scaler.update(1024.0)  # where six overflows leave it
    saved = ck.save_local(tmp_path / "checkpoint-00000003", model=model, optimizer=opt, scheduler=sched,
                          loop_state={"step": 3}, accelerator=acc)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)  # the restarted process's
    loop = ck.load_local(saved, model=model, optimizer=opt, scheduler=sched, accelerator=acc)
    assert loop["step"] == 3 and acc.scaler.get_scale() == 1024.0
    acc.scaler = None  # bf16 and fp32 runs have none: the same checkpoint loads without one
    assert ck.load_local(saved, model=model, optimizer=opt, scheduler=sched, accelerator=acc)["step"] == 3


def _broken_copy(src, dst, config=None, drop=(), truncate=None):
    import shutil

    shutil.copytree(src, dst)
    if config is not None:
        (dst / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    for name in drop:
        (dst / name).unlink()
    if truncate:
        (dst / truncate).write_bytes((dst / truncate).read_bytes()[:4096])
    return dst


def test_a_broken_model_directory_is_named_with_the_file_and_the_rule(tmp_path, model_dir):
    from kubetune_trainer.model import check_model_dir

    cfg = json.loads((model_dir / "config.json").read_text())
    uri = "s3://models/tiny"
    cases = [
        (dict(config='{"model_type": "llama",\n "hidden_size": 64,,}'),
         "s3://models/tiny/config.json: invalid JSON at line 2 column 20: Expecting property name"),
        (dict(config="[1, 2]"), "s3://models/tiny/config.json: expected a JSON object, got list"),
        (dict(config={**cfg, "model_type": None}), "s3://models/tiny/config.json: missing model_type"),
        (dict(config={**cfg, "model_type": "nosuch"}), "model_type 'nosuch' is not an architecture transformers 5."),
        (dict(config={**cfg, "model_type": "mine", "auto_map": {"AutoConfig": "m.C"}}),
         "model_type 'mine' ships its own modelling code (auto_map); set spec.model.trustRemoteCode: true"),
        (dict(drop=["config.json"]), "s3://models/tiny: no config.json"),
        (dict(drop=["tokenizer.json", "tokenizer_config.json"]), "s3://models/tiny: no tokenizer files (one of tokenizer.json"),
    ]
    for i, (breaks, message) in enumerate(cases):
        with pytest.raises(ModelLoadFailed) as e:
            check_model_dir(_broken_copy(model_dir, tmp_path / str(i), **breaks), uri)
        assert message in e.value.message, (breaks, e.value.message)
    assert check_model_dir(model_dir, uri)["model_type"] == "llama"
    # remote code the user allowed: left to transformers
    check_model_dir(_broken_copy(model_dir, tmp_path / "ok", config={**cfg, "model_type": "mine", "auto_map": {"AutoConfig": "m.C"}}), uri, True)


def test_weights_that_do_not_load_are_named_by_file_and_tensor(tmp_path, model_dir):
    from kubetune_trainer.config import plan_for
    from kubetune_trainer.model import build_model

    raw = tiny.trainer_config(tmp_path, model_dir, tmp_path / "d.jsonl")
    spec = parse_config(raw).spec
    cfg = json.loads((model_dir / "config.json").read_text())
    cases = [
        (dict(drop=["model.safetensors"]), f"file://{model_dir}: no weight files (*.safetensors or *.bin)"),
        (dict(truncate="model.safetensors"), "model.safetensors is not a readable safetensors file (SafetensorError"),
        (dict(config={**cfg, "intermediate_size": cfg["intermediate_size"] * 2}),
         f"model.safetensors: model.layers.0.mlp.down_proj.weight is [{cfg['hidden_size']}, {cfg['intermediate_size']}], "
         f"config.json makes it [{cfg['hidden_size']}, {cfg['intermediate_size'] * 2}]"),
    ]
    for i, (breaks, message) in enumerate(cases):
        d = _broken_copy(model_dir, tmp_path / str(i), **breaks)
        with pytest.raises(ModelLoadFailed) as e:
            build_model(plan_for(parse_config(raw)), spec, d, torch.device("cpu"))
        assert message in e.value.message, (breaks, e.value.message)
    raw["spec"]["model"]["uri"] = "hf://org/pickled"  # the Hub snapshot has only a .bin, which is not fetched
    with pytest.raises(ModelLoadFailed, match=r"^hf://org/pickled: no weight files .*only \*\.safetensors are downloaded"):
        build_model(plan_for(parse_config(raw)), parse_config(raw).spec, _broken_copy(model_dir, tmp_path / "hub", drop=["model.safetensors"]),
                    torch.device("cpu"))


def test_what_the_hub_refuses_fails_the_job_and_what_may_pass_is_retried(tmp_path, monkeypatch):
    """huggingface_hub's own classification of real Hub responses, then ours: ModelLoadFailed or
    BadData (exit 4, 3: the Job fails at once) when retrying cannot help, StorageFailed (5: the pod
    is retried) when it may."""
    import httpx2
    from huggingface_hub.utils import hf_raise_for_status

    from kubetune_trainer.model import resolve_model_dir

    def refused(code, error_code=None):
        req = httpx2.Request("GET", "https://huggingface.co/api/models/meta-llama/Llama-3.1-8B/revision/main")
        try:
            hf_raise_for_status(httpx2.Response(code, headers={"X-Error-Code": error_code} if error_code else {}, request=req))
        except Exception as e:
            return e
        raise AssertionError("not refused")

    uri = "hf://meta-llama/Llama-3.1-8B"
    cases = [
        (refused(401, "GatedRepo"), False, ModelLoadFailed,
         "gated on the Hugging Face Hub, and no token was given: set spec.model.tokenSecret"),
        (refused(403, "GatedRepo"), True, ModelLoadFailed, "the token in spec.model.tokenSecret has no access: accept the licence"),
        (refused(404, "RepoNotFound"), False, ModelLoadFailed, "no such model on the Hugging Face Hub, or it is private"),
        (refused(404, "RevisionNotFound"), True, ModelLoadFailed, "the Hub has no such revision"),
        (refused(503), True, StorageFailed, "cannot download the model from the Hugging Face Hub: HfHubHTTPError"),
    ]
    for e, have_token, kind, message in cases:
        monkeypatch.setenv("HF_TOKEN", "hf_x") if have_token else monkeypatch.delenv("HF_TOKEN", raising=False)
        got = st.hub_error(uri, e, ModelLoadFailed)
        assert type(got) is kind and got.message.startswith(f"{uri}: ") and message in got.message, (e, got)
    got = st.hub_error("hf://org/data", refused(404, "RepoNotFound"), BadData, "dataset")
    assert type(got) is BadData and "hf://org/data: no such dataset on the Hugging Face Hub" in got.message
    # and no Hub at all (a refused connection, for real): a retry may find it
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(StorageFailed, match=r"^hf://org/model: cannot download the model from the Hugging Face Hub: .*Connect"):
        resolve_model_dir("hf://org/model", None, tmp_path)
    with pytest.raises(StorageFailed, match=r"^hf://org/data: cannot download the dataset from the Hugging Face Hub"):
        dt.resolve_files("hf://org/data", None, tmp_path)


def test_the_job_fails_at_once_on_a_reason_a_retry_cannot_fix():
    from kubetune.controller.manifests import NON_RETRYABLE_EXIT_CODES
    from kubetune_trainer.cli import EXIT

    assert sorted(NON_RETRYABLE_EXIT_CODES) == sorted(EXIT[r] for r in ("BadConfig", "BadData", "ModelLoadFailed"))
    assert EXIT["StorageFailed"] not in NON_RETRYABLE_EXIT_CODES and EXIT["Error"] not in NON_RETRYABLE_EXIT_CODES


def test_a_packed_row_computes_what_its_sequences_compute_apart(tmp_path, model_dir):
    """Packed sequences must not attend to each other. The trainer's model gets position_ids and no
    attention mask; transformers turns them into a block-diagonal mask only with the cache off."""
    from kubetune_trainer.model import build_model

    cfg = parse_config(tiny.trainer_config(tmp_path, model_dir, tmp_path / "d.jsonl", dataset={"packing": True}))
    _, base = build_model(plan_for(cfg), cfg.spec, model_dir, torch.device("cpu"))
    a, b = [5, 9, 14, 3, 7, 22, 8], [11, 4, 30, 6, 2]
    packed = dt.collate(dt.pack([dt.Example(a, a), dt.Example(b, b)], 16), pad_id=0, pad_to=16)
    assert "attention_mask" not in packed
    with torch.no_grad():
        got = base(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        apart = [base(input_ids=torch.tensor([x])).logits[0] for x in (a, b)]
    torch.testing.assert_close(got[:len(a)], apart[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[len(a):len(a) + len(b)], apart[1], atol=1e-5, rtol=1e-5)


def test_launch_command_uses_indexed_job_env(tmp_path, model_dir):
    cfg = parse_config(tiny.trainer_config(tmp_path, model_dir, tmp_path / "d.jsonl", resolved={"numProcesses": 16}))
    cfg.spec.resources.nodes, cfg.spec.resources.gpus_per_node = 2, 8
    env = {"JOB_COMPLETION_INDEX": "1", "MASTER_ADDR": "job-0.job-svc", "MASTER_PORT": "29400"}
    cmd = launch_command(cfg, "/etc/kubetune/trainer.yaml", env)
    s = " ".join(cmd)
    assert "--num_processes 16 --num_machines 2 --machine_rank 1 --main_process_ip job-0.job-svc --main_process_port 29400" in s
    assert s.endswith("-m kubetune_trainer.cli --config /etc/kubetune/trainer.yaml --no-launch")
    assert launch_command(cfg, "x", {**env, "LOCAL_RANK": "0"}) is None
    single = parse_config(tiny.trainer_config(tmp_path, model_dir, tmp_path / "d.jsonl"))
    assert launch_command(single, "x", {}) is None
    # one GPU per pod on two nodes: accelerate sees one local GPU and would not go multi-process by itself
    one_each = parse_config(tiny.trainer_config(tmp_path, model_dir, tmp_path / "d.jsonl", resolved={"numProcesses": 2}))
    one_each.spec.resources.nodes, one_each.spec.resources.gpus_per_node = 2, 1
    cmd = launch_command(one_each, "x", env)
    assert cmd[3] == "--multi_gpu" and cmd[cmd.index("--num_processes") + 1] == "2"


def test_a_single_node_launch_rendezvous_on_the_master_port(tmp_path):
    """One node, two processes: torchrun's rendezvous store must listen on KUBETUNE_MASTER_PORT, so
    two runs on one host with their own ports never meet (c10d without an endpoint, which accelerate
    gives one machine, always took 29400). Checked through accelerate's and torchrun's own parsing."""
    import torch.distributed.run as distrib_run
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import _filter_args, prepare_multi_gpu_env

    from proc import free_port

    cfg = parse_config(tiny.trainer_config(tmp_path, tmp_path, tmp_path / "d.jsonl", resolved={"numProcesses": 2}))
    port = free_port()
    cmd = launch_command(cfg, "/etc/kubetune/trainer.yaml", {"KUBETUNE_MASTER_PORT": port})
    args = dict(zip(cmd, cmd[1:]))
    assert args["--num_machines"] == "1" and args["--main_process_port"] == port and args["--rdzv_backend"] == "static"
    ns, _, _ = _validate_launch_command(launch_command_parser().parse_args(cmd[3:]))
    prepare_multi_gpu_env(ns)
    run_args = _filter_args(ns, distrib_run.get_args_parser(), ["--training_script", ns.training_script,
                                                                "--training_script_args", ns.training_script_args])
    config, _, _ = distrib_run.config_from_args(run_args)
    assert (config.rdzv_backend, config.rdzv_endpoint) == ("static", f"127.0.0.1:{port}")


def test_storage_knobs_come_from_knobs_and_are_passed_in(monkeypatch):
    """KUBETUNE_PVC_ROOT and the S3 client's KUBETUNE_S3_* are read by Knobs.from_env (a bad value names
    the variable); storage takes the Knobs it is given, else the run's (outside a run: the env now)."""
    from kubetune_trainer.knobs import Knobs

    d = Knobs.from_env({})
    assert (d.pvc_root, d.s3_max_attempts, d.s3_connect_timeout, d.s3_read_timeout) == ("/mnt/pvc", 3, 5.0, 60.0)
    k = Knobs.from_env({"KUBETUNE_PVC_ROOT": "/pvc", "KUBETUNE_S3_MAX_ATTEMPTS": "5",
                        "KUBETUNE_S3_CONNECT_TIMEOUT": "2", "KUBETUNE_S3_READ_TIMEOUT": "30"})
    assert st.local_path_of("pvc://claim/data/x.jsonl", k) == Path("/pvc/claim/data/x.jsonl")
    assert st.open_location("pvc://claim/out", knobs=k).root == Path("/pvc/claim/out")
    cfg = st.s3_client(None, k).meta.config
    # botocore counts the first attempt too
    assert (cfg.retries["total_max_attempts"], cfg.connect_timeout, cfg.read_timeout) == (5 + 1, 2.0, 30.0)
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", "/elsewhere")
    assert st.pvc_root() == Path("/elsewhere")
    for name, value, want in [("KUBETUNE_S3_MAX_ATTEMPTS", "many", "an integer >= 0"),
                              ("KUBETUNE_S3_CONNECT_TIMEOUT", "-1", "a number >= 0 (seconds)"),
                              ("KUBETUNE_S3_READ_TIMEOUT", "nan", "a number >= 0 (seconds)")]:
        with pytest.raises(BadConfig) as e:
            Knobs.from_env({name: value})
        assert str(e.value) == f"environment variable {name}={value!r}: expected {want}"


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_a_copied_reference_with_qlora_is_refused_at_config_load(tmp_path, objective):
    """A frozen copy of a QLoRA model is a second 4-bit base; the base with the adapters disabled gives
    the same log-probs for nothing. The trainer refuses it when it reads the config (exit 2, one line): the
    API's rule words it (the trainer's own check is behind it, for a config rendered by an older operator)."""
    from kubetune_trainer.cli import main

    cfg = tiny.trainer_config(tmp_path, tmp_path, tmp_path / "d.jsonl", method={"type": "qlora", "lora": {"rank": 8}})
    cfg["spec"]["resources"]["gpusPerNode"] = 1
    cfg["spec"]["objective"] = {"type": objective, "reference": "copy"}
    path = tmp_path / "trainer.yaml"
    path.write_text(json.dumps(cfg))
    want = (f"{path}: spec: objective.reference copy cannot be used with method.type qlora: the copy would be a "
            "second quantized base model, while the base with the adapters disabled is the same reference at no "
            "memory cost; use implicit (the default) or precomputed")
    with pytest.raises(BadConfig) as e:
        load_config(path)
    assert e.value.message == want
    assert main(["--config", str(path)]) == 2
    assert json.loads((tmp_path / "termination-log").read_text())["message"] == want
    for ok in ("implicit", "precomputed"):  # and copy with lora or full stays allowed
        cfg["spec"]["objective"]["reference"] = ok
        parse_config(cfg)
    cfg["spec"]["objective"]["reference"] = "copy"
    cfg["spec"]["method"]["type"] = "lora"
    parse_config(cfg)


def test_a_follow_on_error_does_not_hide_another_ranks_reason(tmp_path):
    write_termination("OutOfMemory", "GPU out of memory on rank 1", step=5)
    write_termination("Error", "NCCL watchdog: rank 1 went away", step=5)
    assert json.loads((tmp_path / "termination-log").read_text())["reason"] == "OutOfMemory"
    write_termination("Preempted", "stopped by SIGTERM at step 6", step=6)
    assert json.loads((tmp_path / "termination-log").read_text())["reason"] == "Preempted"


def test_termination_message_fits(tmp_path):
    doc = write_termination("BadData", "x" * 10000, step=3)
    text = (tmp_path / "termination-log").read_text()
    assert len(text.encode()) <= 4000 and json.loads(text)["reason"] == "BadData" and doc["step"] == 3


def test_termination_message_fits_with_a_big_result_by_dropping_the_evaluations_figures(tmp_path):
    """Long URIs and many metrics: the evaluation's figures go (summary.json at reportUri has them), the
    headline, the URIs and the metrics stay, and the JSON stays whole."""
    from kubetune.api.v1alpha1 import ResultStatus

    uri = "s3://b/" + "p" * 1000 + "/"
    figures = {f"metric{i}": 0.123456789 for i in range(30)}
    result = ResultStatus.model_validate({
        "adapterUri": uri + "adapter/", "mergedUri": uri + "merged/", "reportUri": uri + "evaluation/report.html",
        "metrics": {"trainLoss": 1.0, "evalLoss": 0.5},
        "evaluation": {"base": figures, "tuned": figures, "delta": figures, "headline": "exactMatch 0 -> 0.9"}})
    write_termination("Completed", "trained 10 steps", result=result, step=10)
    doc = json.loads((tmp_path / "termination-log").read_text())
    assert len(json.dumps(doc).encode()) <= 4000
    r = doc["result"]
    assert r["evaluation"]["headline"] == "exactMatch 0 -> 0.9" and r["evaluation"]["base"] == {}
    assert r["reportUri"].endswith("report.html") and r["metrics"]["evalLoss"] == 0.5


def test_the_operators_multi_node_pod_launches_the_right_rendezvous():
    """Operator → trainer, no hand-written env: the ConfigMap and pod env the operator renders for a
    2 x 8 GPU job, with what Kubernetes adds (JOB_COMPLETION_INDEX), give every pod the right launch."""
    import yaml as _yaml

    from kubetune.api.v1alpha1 import Resolved
    from kubetune.api.validation import parse_spec
    from kubetune.controller import manifests as m
    from kubetune.controller.placement import Placement

    s = parse_spec({"model": {"uri": "hf://meta-llama/Llama-3.1-70B"}, "dataset": {"uri": "s3://data/train.jsonl"},
                    "method": {"type": "full"}, "training": {"maxSteps": 10, "microBatchSize": 1},
                    "resources": {"nodes": 2, "gpusPerNode": 8}, "checkpoints": {"uri": "s3://ckpt/runs/"}})
    rid = m.RunIdentity("ml", "big", "uid-1", 3)
    placed = Placement(True, "Placed", "ok", micro_batch_size=1, estimate_bytes=70 * 2**30, resource="nvidia.com/gpu")
    kids = {o["kind"]: o for o in m.children(s, rid, Resolved(micro_batch_size=1, gradient_accumulation_steps=1,
                                                             num_processes=16), placed)}
    cfg = parse_config(_yaml.safe_load(kids["ConfigMap"]["data"][m.CONFIG_KEY]))
    pod = kids["Job"]["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"] if "value" in e}
    svc = kids["Service"]["metadata"]["name"]
    for index in (0, 1):
        cmd = launch_command(cfg, "/etc/kubetune/trainer.yaml", {**env, "JOB_COMPLETION_INDEX": str(index)})
        args = dict(zip(cmd, cmd[1:]))  # each flag to the token after it
        assert args["--num_processes"] == "16" and args["--num_machines"] == "2"
        assert args["--machine_rank"] == str(index) and args["--rdzv_backend"] == "static"
        # pod 0's stable name under the headless Service the Job's pods share
        assert args["--main_process_ip"] == f"{rid.job_name}-0.{svc}.ml.svc" and pod["subdomain"] == svc
        assert args["--main_process_port"] == str(m.RENDEZVOUS_PORT)
    assert plan_for(cfg).sharding == "fsdp"
    assert env["KUBETUNE_GRACE_SECONDS"] == str(pod["terminationGracePeriodSeconds"])


def test_the_sigterm_handler_never_waits_on_the_stdout_lock():
    """A SIGTERM landing while the main thread is inside log_event (it holds the stdout lock) used to
    deadlock the handler, so a preempted pod hung until the kubelet's SIGKILL and lost its step."""
    import subprocess
    import sys

    code = """
import os, signal, time
from kubetune_trainer import progress
from kubetune_trainer.loop import Preemption
p = Preemption(60)
with progress._OUT_LOCK:
    os.kill(os.getpid(), signal.SIGTERM)  # the handler runs on this thread, lock held
    deadline = time.time() + 5
    while p.at is None and time.time() < deadline:
        time.sleep(0.01)
assert p.at is not None and p.requested
print("survived")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[-1] == "survived"
    ack = json.loads(lines[0])
    assert ack["event"] == "preempted" and "60s grace" in ack["message"]


def test_the_trainer_grows_cuda_allocator_segments_unless_the_pod_says_otherwise():
    import os
    import subprocess
    import sys

    probe = "import kubetune_trainer, os; print(os.environ['PYTORCH_CUDA_ALLOC_CONF'])"
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "expandable_segments:True"
    env["PYTORCH_CUDA_ALLOC_CONF"] = "max_split_size_mb:512"  # resources.env
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "max_split_size_mb:512"


def _committed_by(tmp_path, uid, steps):
    """A store whose checkpoints the Uploader committed for the FineTuneJob ``uid``."""
    store = tmp_path / "store"
    up = ck.Uploader(st.LocalLocation(store), keep=5, log=lambda m: None, owner=uid)
    for step in steps:
        d = tmp_path / "local" / f"{uid}-{step}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(bytes([step]) * 10)
        up.submit(d, step, None)
        assert up.drain(10)
    up.close()
    return st.LocalLocation(store)


def test_a_new_object_of_the_same_name_does_not_resume_the_deleted_ones_checkpoints(tmp_path):
    """A FineTuneJob deleted (its checkpoints kept: deletionPolicy Retain) and made again under the same
    name writes to the same run prefix. Its trainer must not quietly continue the old object's run,
    perhaps on other data: it says what to do. Its own checkpoints, and old ones that name no job
    (written before manifests did), resume as before."""
    from kubetune_trainer.loop import fetch_resume_point

    own = _committed_by(tmp_path, "uid-old", [200, 250])
    assert json.loads((own.root / ck.ckpt_name(250) / ck.MANIFEST).read_text())["jobUid"] == "uid-old"
    with pytest.raises(BadConfig) as e:
        fetch_resume_point(own, None, None, tmp_path / "dl", print, uid="uid-new")
    assert str(e.value).startswith(f"{own.uri} holds the checkpoints of an earlier FineTuneJob of this name "
                                   f"(uid uid-old, newest {ck.ckpt_name(250)}), kept by its deletionPolicy Retain")
    assert f"set spec.checkpoints.resumeFrom to {own.uri}" in str(e.value)
    assert not (tmp_path / "dl").exists()  # refused before downloading a byte

    # said outright, resumeFrom continues it
    path, c, uri, mine = fetch_resume_point(own, own.uri, None, tmp_path / "dl", print, uid="uid-new")
    assert (c.step, mine) == (250, False)
    # the same object (a restarted pod) resumes its own, and a config without a UID resumes anything
    assert fetch_resume_point(own, None, None, tmp_path / "dl2", print, uid="uid-old")[1].step == 250
    assert fetch_resume_point(own, None, None, tmp_path / "dl3", print, uid=None)[1].step == 250
    # once the new object has checkpoints of its own there, those are what it resumes
    _committed_by(tmp_path, "uid-new", [20])
    path, c, uri, mine = fetch_resume_point(own, own.uri, None, tmp_path / "dl4", print, uid="uid-new")
    assert (c.step, mine) == (20, True)


def test_the_progress_object_names_the_job_that_wrote_it(tmp_path):
    """The progress object sits in the run prefix a new FineTuneJob of the same name reuses: its jobUid is
    what the operator compares with the object's UID, so a deleted namesake's numbers are not shown."""
    from kubetune.api.v1alpha1 import TrainerProgress
    from kubetune_trainer.progress import ProgressReporter

    rep = ProgressReporter(st.LocalLocation(tmp_path), "progress.json", interval=3600, job_uid="uid-new")
    rep.update(step=3, total_steps=10)
    rep.close()
    doc = json.loads((tmp_path / "progress.json").read_text())
    assert doc["jobUid"] == "uid-new" and doc["progress"]["step"] == 3
    assert TrainerProgress.model_validate(doc).job_uid == "uid-new"


def test_bf16_on_a_gpu_older_than_ampere_is_a_bad_config_naming_the_field(monkeypatch):
    """No GPU here: torch.cuda's answers for a T4 are stood in. The rule itself is kubetune.api's, the one
    placement uses; what this checks is that the trainer asks it about the GPU it got, before accelerate."""
    from kubetune_trainer import loop

    monkeypatch.setattr(loop.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loop.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(loop.torch.cuda, "get_device_capability", lambda i: (7, 5))
    monkeypatch.setattr(loop.torch.cuda, "get_device_name", lambda i: "Tesla T4")
    with pytest.raises(BadConfig, match=r"training.precision bf16 needs a GPU of compute capability 8.0 or newer "
                                        r"\(Ampere, Ada, Hopper, Blackwell\); Tesla T4 is 7.5: set training.precision "
                                        r"to fp16 \(or fp32\) to train there"):
        loop.check_precision_fits_gpu("bf16")
    with pytest.raises(BadConfig, match="bf16-mixed"):
        loop.check_precision_fits_gpu("bf16-mixed")
    for precision in ("fp16", "fp32"):
        loop.check_precision_fits_gpu(precision)
    monkeypatch.setattr(loop.torch.cuda, "get_device_capability", lambda i: (8, 0))
    loop.check_precision_fits_gpu("bf16")
