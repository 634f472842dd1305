"""`kubetune estimate`: flag form, -f job.yaml, --json, and one-line errors (exit 2)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from kubetune.estimator import catalog_architecture, estimate, estimate_spec, plan_from_flags
from kubetune.estimator.memory import GIB

from builders import run_estimate

REPO = Path(__file__).resolve().parents[2]

JOB = textwrap.dedent("""\
    apiVersion: kubetune.io/v1alpha1
    kind: FineTuneJob
    metadata:
      name: llama8b-lora
    spec:
      model:
        uri: hf://meta-llama/Llama-3.1-8B@main
      dataset:
        uri: s3://data/train.jsonl
        maxSeqLength: 4096
      method:
        type: lora
      training:
        maxSteps: 100
        microBatchSize: 8
      checkpoints:
        uri: s3://ckpt/
""")


run = run_estimate


def test_flag_form_human(capsys):
    rc, out, err = run(capsys, "--model", "llama-3.1-8b", "--method", "lora", "--batch-size", "4", "--seq-len", "2048",
                       "--gradient-checkpointing")
    assert rc == 0 and not err
    for want in ("meta-llama/Llama-3.1-8B", "8.03B total", "41.94M trainable", "weights", "logits / loss",
                 "CUDA context + allocator", "total", "16GB no", "40GB yes", "141GB yes"):
        assert want in out, want


def test_flag_form_json_matches_the_library(capsys):
    rc, out, _ = run(capsys, "--model", "meta-llama/Llama-3.1-8B", "--method", "lora", "--batch-size", "4",
                     "--seq-len", "2048", "--gradient-checkpointing", "--lora-rank", "16", "--lora-targets",
                     "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--json")
    assert rc == 0
    d = json.loads(out)
    want = estimate(catalog_architecture("llama-3.1-8b"),
                    plan_from_flags(method="lora", micro_batch_size=4, seq_len=2048, gradient_checkpointing=True))
    assert d["total_bytes"] == want.total_bytes
    assert d["total_gib"] == pytest.approx(want.total_bytes / GIB, abs=1e-3)
    assert set(d["breakdown_gib"]) == {"weights", "gradients", "optimizer", "adapters", "activations", "logits",
                                       "overhead", "communication"}
    assert d["trainable_params"] == 41_943_040 and d["fits"]["80GB"] is True and d["fits"]["24GB"] is False


def test_packing_flag_prices_the_packed_attention_mask(capsys):
    base = ["--model", "llama-3.1-8b", "--method", "lora", "--batch-size", "4", "--seq-len", "2048", "--json"]
    plain = json.loads(run(capsys, *base)[1])
    rc, out, _ = run(capsys, *base, "--packing")
    packed = json.loads(out)
    # per block: k/v repeated to 32 heads (2 x 2 x (4096 - 1024) B) + the additive mask (2 x 2048 B), per token
    per_token_block = 2 * 2 * (4096 - 1024) + 2 * 2048
    grow = (packed["total_bytes"] - plain["total_bytes"]) / (4 * 2048 * 32)
    assert rc == 0 and grow == pytest.approx(per_token_block, rel=0.05), grow
    rc, out, _ = run(capsys, *base[:-1], "--packing")
    assert "| packing |" in out


def test_config_json_and_directory(tmp_path, capsys):
    cfg = {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
           "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for model in (str(tmp_path / "config.json"), str(tmp_path)):
        rc, out, _ = run(capsys, "--model", model, "--method", "full", "--batch-size", "8", "--seq-len", "1024",
                         "--json")
        assert rc == 0 and json.loads(out)["total_params"] == 494_032_768


def test_auto_batch_and_advice(capsys):
    rc, out, _ = run(capsys, "--model", "llama-3.1-8b", "--method", "full", "--batch-size", "auto", "--seq-len", "2048",
                     "--gradient-checkpointing", "--fused-cross-entropy", "--json")
    d = json.loads(out)
    assert rc == 0 and d["max_micro_batch"]["80GB"] >= 1 and d["max_micro_batch"]["24GB"] == 0
    rc, out, _ = run(capsys, "--model", "llama-3.1-8b", "--method", "lora", "--batch-size", "2", "--seq-len", "4096",
                     "--gpu-memory", "80GB")
    assert rc == 0 and "fits none of these GPUs" in out and "gradient checkpointing on" in out


def test_job_file_uses_kubetune_trainer_defaults(tmp_path, capsys):
    f = tmp_path / "job.yaml"
    f.write_text(JOB)
    rc, out, _ = run(capsys, "-f", str(f), "--json")
    assert rc == 0
    d = json.loads(out)
    import yaml

    from kubetune.api.v1alpha1 import FineTuneJob

    spec = FineTuneJob.model_validate(yaml.safe_load(JOB)).spec
    assert d["total_bytes"] == estimate_spec(spec).total_bytes
    assert "fused CE on" in d["plan"] and "checkpointing on" in d["plan"]
    from kubetune.estimator.disk import work_dir_bytes
    from kubetune.plan import plan_from_spec

    e = estimate_spec(spec)
    disk = work_dir_bytes(spec, plan_from_spec(spec), e.total_params, e.trainable_params)
    assert d["local_disk_bytes"] == disk and disk > e.total_params * 2  # what the operator requests for the pod
    rc, out, _ = run(capsys, "-f", str(f))
    assert rc == 0 and "llama8b-lora" in out
    assert f"local disk     {disk / 2**30:.0f} GiB per trainer pod" in out
    assert "host_model_bytes" not in d and "host memory" not in out  # one GPU: the model streams onto it
    f.write_text(JOB + "  output:\n    mergeAdapter: true\n")
    rc, out, _ = run(capsys, "-f", str(f), "--json")
    d = json.loads(out)
    assert rc == 0 and d["host_model_bytes"] == e.total_params * 2 and "mergeAdapter" in d["host_model_why"]


def test_fsdp_fit_advice_for_a_job_file_names_the_host_memory_rank_0_needs(repo, tmp_path, capsys):
    """An FSDP option makes rank 0 read the whole model into host memory: the advice says how much
    spec.resources.memory that takes, as the operator's Unschedulable message does."""
    import math

    import yaml

    from kubetune.api.v1alpha1 import FineTuneJob

    job = yaml.safe_load((repo / "examples" / "too-big.yaml").read_text())
    params = estimate_spec(FineTuneJob.model_validate(job).spec).total_params
    need = math.ceil(params * 2 * 1.1 / 2**30 + 8)  # bf16 weights read whole, 10 % slack, 8 GiB for the rest
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(job))
    rc, out, _ = run(capsys, "-f", str(f), "--json")
    fsdp = [a for a in json.loads(out)["advice"] if a["sharding"] == "fsdp"]
    assert rc == 0 and fsdp and all(a["min_memory_gib"] == need for a in fsdp)
    rc, out, _ = run(capsys, "-f", str(f))
    assert "with FSDP: effective batch" in out and f", with spec.resources.memory at least {need}Gi\n" in out
    job["spec"]["resources"]["memory"] = f"{need}Gi"  # enough: the advice says nothing about it
    f.write_text(yaml.safe_dump(job))
    rc, out, _ = run(capsys, "-f", str(f), "--json")
    advice = json.loads(out)["advice"]
    assert rc == 0 and advice and not any("min_memory_gib" in a for a in advice)


def test_job_file_with_auto_micro_batch(tmp_path, capsys):
    f = tmp_path / "job.yaml"
    f.write_text(JOB.replace("microBatchSize: 8", "microBatchSize: auto"))
    rc, out, _ = run(capsys, "-f", str(f), "--json")
    assert rc == 0 and json.loads(out)["max_micro_batch"]["80GB"] > 8


@pytest.mark.parametrize("argv,msg", [
    (["--model", "nope-7b"], "--model nope-7b: not a config.json file nor a model in kubetune's catalog"),
    (["--model", "llama-3.1-8b", "--batch-size", "0"], "--batch-size: must be an integer from 1 to 4096 (got 0)"),
    (["--model", "llama-3.1-8b", "--batch-size", "four"], "--batch-size: must be a positive integer or auto"),
    (["--model", "llama-3.1-8b", "--seq-len", "-5"], "--seq-len: must be an integer"),
    (["--model", "llama-3.1-8b", "--method", "dpo"], "--method: must be one of full, lora, qlora"),
    (["--model", "llama-3.1-8b", "--precision", "fp8"], "--precision: must be one of bf16, fp32-mixed, fp32"),
    (["--model", "llama-3.1-8b", "--method", "full", "--lora-rank", "8"],
     "--lora-rank: only valid with --method lora or qlora"),
    (["--model", "llama-3.1-8b", "--lora-dropout", "1.5"], "--lora-dropout: must be a number in [0, 1)"),
    (["--model", "llama-3.1-8b", "--lora-targets", "c_attn"],
     "--lora-targets: LoRA target 'c_attn' is not a linear module"),
    (["--model", "llama-3.1-8b", "--sharding", "fsdp"], "--sharding: needs --gpus 2 or more"),
    (["--model", "llama-3.1-8b", "--gpus", "2", "--sharding", "tp"],
     "--sharding: must be one of ddp, fsdp, zero2, zero3"),
    (["--model", "llama-3.1-8b", "--gpu-memory", "lots"], "--gpu-memory: 'lots' is not a size"),
    (["--model", "llama-3.1-8b", "--quant-bits", "4"], "--quant-bits: only valid with --method qlora"),
    ([], "give -f JOB_YAML or --model"),
    (["-f", "/nonexistent/job.yaml"], "-f /nonexistent/job.yaml: no such file"),
])
def test_errors_are_one_line_naming_the_flag(capsys, argv, msg):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and not out
    assert msg in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("name,text,argv,msg", [
    ("config.json", '{"model_type": "llama", "hidden_size": 64,', ["--model", "{f}"], "--model {f}: not valid JSON"),
    ("config.json", '{"model_type": "llama", "hidden_size": 64}', ["--model", "{f}"], "{f}: missing num_hidden_layers"),
    ("job.yaml", JOB.replace("type: lora", "type: lorax"), ["-f", "{f}"], "-f {f}: spec.method.type"),
    ("job.yaml", JOB.replace("hf://meta-llama/Llama-3.1-8B@main", "s3://models/private/"), ["-f", "{f}"],
     "spec.model.uri s3://models/private/: not in kubetune's model catalog"),
    ("job.yaml", "spec: [unclosed", ["-f", "{f}"], "not valid YAML"),
    ("job.yaml", JOB, ["-f", "{f}", "--batch-size", "2"], "--batch-size: not used with -f"),
    ("job.yaml", JOB, ["-f", "{f}", "--packing"], "--packing: not used with -f (the job file sets it)"),
    ("job.yaml", JOB, ["-f", "{f}", "--fused-kernels"], "--fused-kernels: not used with -f (the job file sets it)"),
])
def test_bad_files(tmp_path, capsys, name, text, argv, msg):
    f = tmp_path / name
    f.write_text(text)
    rc, _, err = run(capsys, *(a.format(f=f) for a in argv))
    assert rc == 2 and msg.format(f=f) in err and err.count("\n") == 1, err


def test_fused_kernels_flag(capsys):
    """apply_liger_kernel_to_llama's RMSNorm and SwiGLU without checkpointing: 11.0 GiB less for 8B b4 x 2048."""
    flags = ("--model", "llama-3.1-8b", "--method", "lora", "--batch-size", "4", "--seq-len", "2048", "--json")
    rc, out, _ = run(capsys, *flags)
    rc2, out2, _ = run(capsys, *flags, "--fused-kernels")
    assert rc == rc2 == 0
    plain, fused = json.loads(out), json.loads(out2)
    # the allocated part (the physics); the reserved part is simulated for each plan's own trace
    assert plain["allocated_bytes"] - fused["allocated_bytes"] == (2 * 2 * 4096 + 2 * 14336) * 32 * 4 * 2048
    assert "fused kernels" in fused["plan"] and "fused kernels" not in plain["plan"]


HUB_CONFIG = {"model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
              "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000}


def test_a_model_outside_the_catalog_is_read_from_the_hub_as_huggingface_hub_would(hub_mirror, monkeypatch, tmp_path,
                                                                                    capsys):
    """$HF_ENDPOINT (a mirror) and $HF_TOKEN, for --model hf://... and for -f job.yaml; a refusal is one
    line naming the variable to set."""
    hub_mirror.repos = {("acme/open-1b", "main"): (HUB_CONFIG, None), ("acme/gated-1b", "main"): (HUB_CONFIG, "hf_ok")}
    monkeypatch.setenv("HF_ENDPOINT", hub_mirror.url + "/")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    (tmp_path / "config.json").write_text(json.dumps(HUB_CONFIG))
    rc, out, _ = run(capsys, "--model", str(tmp_path / "config.json"), "--json")
    local = json.loads(out)
    rc, out, _ = run(capsys, "--model", "hf://acme/open-1b", "--json")
    hub = json.loads(out)
    assert rc == 0 and hub["total_params"] == local["total_params"] > 0 and hub["total_bytes"] == local["total_bytes"]
    assert hub_mirror.seen == [("/acme/open-1b/resolve/main/config.json", None)]

    rc, _, err = run(capsys, "--model", "hf://acme/gated-1b")
    assert rc == 2 and err.strip() == (
        "kubetune estimate: error: --model hf://acme/gated-1b: not in kubetune's catalog, and the Hub mirror "
        f"{hub_mirror.url} (HF_ENDPOINT) refused its config.json (HTTP 401): it is gated or private: set HF_TOKEN to "
        "a token with access")
    monkeypatch.setenv("HF_TOKEN", "hf_ok")
    job = JOB.replace("hf://meta-llama/Llama-3.1-8B@main", "hf://acme/gated-1b")
    (tmp_path / "job.yaml").write_text(job)
    rc, out, _ = run(capsys, "-f", str(tmp_path / "job.yaml"), "--json")
    assert rc == 0 and json.loads(out)["total_params"] == local["total_params"]
    assert hub_mirror.seen[-1] == ("/acme/gated-1b/resolve/main/config.json", "Bearer hf_ok")


def test_a_jobs_auto_micro_batch_is_what_the_operator_would_pick(capsys):
    """examples/hub-dataset.yaml: a 0.5B model fits micro batches of hundreds, but effectiveBatchSize
    32 on one GPU caps auto at 32 (no accumulation), as placement does."""
    rc, out, _ = run(capsys, "-f", str(REPO / "examples" / "hub-dataset.yaml"), "--json")
    d = json.loads(out)
    d = d[0] if isinstance(d, list) else d
    assert rc == 0 and set(d["max_micro_batch"].values()) == {32}
    assert "micro batch 32 x 1024 tokens |" in d["plan"]


ACCUMULATING = textwrap.dedent("""\
    apiVersion: kubetune.io/v1alpha1
    kind: FineTuneJob
    metadata: {name: accumulating}
    spec:
      model: {uri: hf://Qwen/Qwen2.5-0.5B}
      dataset: {uri: s3://data/train.jsonl, maxSeqLength: 1024}
      method: {type: full}
      training: {maxSteps: 10, microBatchSize: 2, effectiveBatchSize: 16}
      checkpoints: {uri: s3://ckpt/}
""")


@pytest.mark.parametrize("name", ["full-1b", "lora-8b", "multi-gpu-70b", "too-big", "accumulating", "dpo-8b"])
def test_estimate_f_prices_a_job_as_the_operator_does(name, capsys, tmp_path):
    """`kubetune estimate -f` and the operator's status estimate are one rule: the same bytes for a job
    with a fixed micro batch, its effectiveBatchSize turned into the same accumulation (accumulating:
    8 steps, whose gradients live through the forward of a full fine-tune)."""
    from kubetune.api.validation import load_jobs
    from kubetune.controller.fleet import read_fleet
    from kubetune.controller.reconcile import decide
    from kubetune.devenv.fleet import manifests
    from kubetune.estimator import resolve_architecture

    path = REPO / "examples" / f"{name}.yaml"
    if name == "accumulating":
        path = tmp_path / "job.yaml"
        path.write_text(ACCUMULATING)
    rc, out, _ = run(capsys, "-f", str(path), "--json")
    d = json.loads(out)
    d = d[0] if isinstance(d, list) else d
    spec = load_jobs(path)[0].spec
    nodes = [dict(n, status={**n["status"], "conditions": [{"type": "Ready", "status": "True"}]}) for n in manifests()]
    got = decide(spec, resolve_architecture(spec.model), read_fleet(nodes, []))
    assert rc == 0 and d["total_bytes"] == got.estimate.total_bytes, (d["plan"], got.estimate.total_bytes)


@pytest.mark.parametrize("flag,setting", [(None, "expandable_segments:False"),
                                          ("default", "expandable_segments:False"),
                                          ("expandable", "expandable_segments:True"),
                                          (" Expandable ", "expandable_segments:True")])
def test_allocator_flag_picks_the_setting_the_reserved_figure_assumes(capsys, flag, setting):
    argv = ["--model", "llama-3.1-8b", "--method", "lora", "--batch-size", "4", "--seq-len", "2048",
            "--gradient-checkpointing", "--json"] + (["--allocator", flag] if flag is not None else [])
    rc, out, _ = run(capsys, *argv)
    assert rc == 0
    d = json.loads(out)
    want = estimate(catalog_architecture("llama-3.1-8b"),
                    plan_from_flags(method="lora", micro_batch_size=4, seq_len=2048, gradient_checkpointing=True),
                    allocator=setting)
    assert d["allocator_setting"] == setting
    assert d["total_bytes"] == want.total_bytes and d["reserved_bytes"] == want.reserved_bytes
    assert d["allocated_bytes"] == want.allocated_bytes


def test_allocator_flag_reaches_the_human_form_the_job_form_and_auto(capsys, tmp_path):
    rc, out, _ = run(capsys, "--model", "llama-3.1-8b", "--method", "lora", "--batch-size", "4", "--seq-len", "2048",
                     "--gradient-checkpointing", "--allocator", "expandable")
    assert rc == 0 and "simulated caching allocator, expandable_segments:True" in out
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    rc, out, _ = run(capsys, "-f", str(job), "--allocator", "expandable", "--json")
    assert rc == 0 and json.loads(out)["allocator_setting"] == "expandable_segments:True"
    # auto micro batch searches with the same setting: expandable segments reserve less here, so never a smaller batch
    auto = {}
    for setting in ("default", "expandable"):
        rc, out, _ = run(capsys, "--model", "llama-3.1-8b", "--method", "lora", "--batch-size", "auto", "--seq-len",
                         "2048", "--gradient-checkpointing", "--gpu-memory", "24GB", "--allocator", setting, "--json")
        assert rc == 0
        auto[setting] = json.loads(out)["max_micro_batch"]["24GB"]
    assert auto["expandable"] >= auto["default"] >= 1


def test_allocator_flag_refuses_other_settings(capsys):
    rc, out, err = run(capsys, "--model", "llama-3.1-8b", "--allocator", "cudaMallocAsync")
    assert rc == 2 and "--allocator: must be one of default, expandable" in err and not out
