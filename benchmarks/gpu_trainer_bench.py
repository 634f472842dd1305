"""GPU benchmark of kubetune's trainer against the plain HF Trainer + PEFT stack, in the same run.

For each shared calibration config (/work/shared/calibration/measure.py, or shared/calibration/ in the
checkout) it runs kubetune's trainer with each speed lever on and off, one subprocess per variant so
peak memory stats are clean, and runs measure.py on the same configs beside it. Random-init models of
the real dims (no hub on the device); random-token text data made here.

Levers: Liger's RMSNorm/RoPE/SwiGLU kernels | the CUDA allocator's expandable segments | fused linear
cross-entropy (Liger) | packing (variable-length data) | fused AdamW | torch.compile. Each row also carries
the estimator's figure for its plan.
Target (H100, Llama-3.1-8B dims, LoRA r16 all-linear, b4 x 2048, gradient checkpointing):
>= 11,000 tokens/s (plain stack 6,951) and <= 20 GiB device memory (plain stack 33.7 GiB).

usage:
  python benchmarks/gpu_trainer_bench.py                 # the target config, every lever, + baseline
  python benchmarks/gpu_trainer_bench.py --all           # every calibration config (default levers), + levers
                                                         # on the target
  python benchmarks/gpu_trainer_bench.py --configs 1b-lora-b4s2048-gc --variants default no-fused-ce
  python benchmarks/gpu_trainer_bench.py --no-baseline   # skip measure.py
  python benchmarks/gpu_trainer_bench.py --dry-run --all # every run on tiny dims, CPU or GPU, in about a minute:
                                                         # checks the setup before spending device time on it
Writes $OUT/trainer_bench.jsonl (one JSON line per run: ours and the baseline's) and prints a table.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = "8b-lora-b4s2048-gc"
STEPS, WARM = 14, 4
DRY_STEPS, DRY_WARM, DRY_SEQ = 6, 2, 64

# name: (environment, spec.training overrides, spec.dataset overrides, data kind)
VARIANTS = {
    # what the trainer does out of the box: Liger's RMSNorm/RoPE/SwiGLU and fused linear CE, fused AdamW
    "default": ({}, {}, {}, "full"),
    "no-fused-kernels": ({}, {"fusedKernels": False}, {}, "full"),
    "no-fused-ce": ({}, {"fusedCrossEntropy": False}, {}, "full"),
    "no-fused-optim": ({"KUBETUNE_FUSED_OPTIMIZER": "0"}, {}, {}, "full"),
    "no-expandable-segments": ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}, {}, {}, "full"),
    "compile": ({"KUBETUNE_COMPILE": "1"}, {}, {}, "full"),
    "torch-chunked-ce": ({"KUBETUNE_FUSED_CE_IMPL": "torch"}, {}, {}, "full"),
    "mixed-no-packing": ({}, {}, {"packing": False}, "mixed"),
    "mixed-packing": ({}, {}, {"packing": True}, "mixed"),
    # without checkpointing Liger's kernels keep fewer activations, which the estimator prices: run on a
    # config that fits (--configs 1b-lora-b4s2048-gc --variants no-gc no-gc-no-fused-kernels)
    "no-gc": ({}, {"gradientCheckpointing": False}, {}, "full"),
    "no-gc-no-fused-kernels": ({}, {"gradientCheckpointing": False, "fusedKernels": False}, {}, "full"),
}
TARGET_VARIANTS = [v for v in VARIANTS if not v.startswith("no-gc")]
DEFAULT_VARIANTS = ["default"]


def find_measure() -> Path | None:
    for p in (os.environ.get("KUBETUNE_MEASURE_PY"), REPO / "shared/calibration/measure.py",
              REPO.parent / "shared/calibration/measure.py", Path("/work/shared/calibration/measure.py")):
        if p and Path(p).is_file():
            return Path(p)
    return None


def load_measure():
    p = find_measure()
    if p is None:
        raise SystemExit("measure.py not found: set KUBETUNE_MEASURE_PY")
    spec = importlib.util.spec_from_file_location("measure", p)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return p, mod


# ---------------------------------------------------------------------------------------------
# material


def shrink(cfg):
    """The same family and attention layout (GQA or not, tied or not) at dims a CPU trains in seconds."""
    grouped = cfg.num_key_value_heads < cfg.num_attention_heads
    cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size = 64, 2, 128, 512
    cfg.num_attention_heads, cfg.num_key_value_heads = 4, 2 if grouped else 4
    cfg.head_dim = 16
    return cfg


def build_model_dir(root: Path, arch: str, measure, dry: bool = False) -> Path:
    """config.json (no weights: the trainer random-inits with KUBETUNE_ALLOW_RANDOM_INIT=1) and a
    word-level tokenizer with exactly the architecture's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out = root / f"model-{arch}{'-dry' if dry else ''}"
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True)
    cfg = shrink(measure.build_config(arch)) if dry else measure.build_config(arch)
    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), cfg.vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(str(out))
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 2, 3, 1
    cfg.save_pretrained(str(out))
    return out


def build_data(root: Path, vocab: int, seq: int, n: int, kind: str) -> Path:
    """text JSONL. full: every example fills seq tokens exactly (comparable with measure.py's random
    ids of exactly seq_len); mixed: lengths uniform in [seq/8, seq] (what packing is for)."""
    path = root / f"data-{kind}-{seq}-{vocab}-{n}.jsonl"
    if path.exists():
        return path
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            length = seq if kind == "full" else rng.randint(seq // 8, seq)
            words = " ".join(f"w{rng.randrange(4, vocab)}" for _ in range(length))  # bos+words+eos, truncated to seq
            f.write(json.dumps({"text": words}) + "\n")
    return path


def trainer_config(root: Path, name: str, variant: str, measure, dry: bool = False) -> dict:
    arch, method, batch, seq, gc, extra = measure.CONFIGS[name]
    env, training, dataset, kind = VARIANTS[variant]
    vocab = 512 if dry else measure.ARCH[arch][6]
    seq, steps = (DRY_SEQ, DRY_STEPS) if dry else (seq, STEPS)
    model_dir = build_model_dir(root, arch, measure, dry)
    n = batch * (steps + 2) * (3 if kind == "mixed" else 1)
    data = build_data(root, vocab, seq, n, kind)
    m = {"type": method}
    if method in ("lora", "qlora"):
        m["lora"] = {"rank": 16, "alpha": 32, "dropout": extra.get("lora_dropout", 0.0),
                     "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    run = root / "runs" / f"{name}-{variant}{'-dry' if dry else ''}"
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "TrainerConfig",
        "job": {"namespace": "bench", "name": "bench", "run": 1},
        "spec": {
            "model": {"uri": f"file://{model_dir}"},
            "dataset": {"uri": f"file://{data}", "format": "text", "maxSeqLength": seq, **dataset},
            "method": m,
            "training": {"maxSteps": steps, "microBatchSize": batch, "learningRate": 1e-4, "scheduler": "constant",
                         "warmupRatio": 0.0, "precision": "fp32" if extra.get("fp32_master") else "bf16",
                         "gradientCheckpointing": gc, "loggingSteps": 1, **training},
            "resources": {"gpusPerNode": 1},
            "checkpoints": {"uri": "s3://bench/ckpt/", "saveSteps": 10**6},
        },
        "resolved": {"microBatchSize": batch, "gradientAccumulationSteps": 1, "numProcesses": 1},
        "paths": {"checkpointsUri": f"file://{run}/ckpt", "outputUri": f"file://{run}/out",
                  "progressUri": f"file://{run}/progress.json", "workDir": str(run / "work")},
        "metricsPort": 0,
    }, env


def estimated_gib(cfg: dict, model_dir: Path) -> dict:
    """The estimator's device memory for this run's spec (what the operator would place it by)."""
    from kubetune.api.v1alpha1 import FineTuneJobSpec
    from kubetune.estimator import estimate_spec

    spec = FineTuneJobSpec.model_validate(cfg["spec"])
    e = estimate_spec(spec, micro_batch_size=cfg["resolved"]["microBatchSize"], num_processes=1,
                      read_config=lambda uri: (model_dir / "config.json").read_text())
    return {"estimate_gib": round(e.total_bytes / 2**30, 3),
            "estimate_allocated_gib": round(e.allocated_bytes / 2**30, 3)}


# ---------------------------------------------------------------------------------------------
# one run (child process)


def run_one(config_path: str, warm: int = WARM) -> None:
    import kubetune_trainer  # noqa: F401  (first: it sets the trainer's CUDA allocator config before torch)

    # isort: split
    import torch

    from kubetune_trainer.config import load_config
    from kubetune_trainer.errors import TrainerError
    from kubetune_trainer.loop import train

    cuda = torch.cuda.is_available()  # only a --dry-run goes without; its memory figures are then None
    total = torch.cuda.mem_get_info()[1] if cuda else None
    cfg = load_config(config_path)
    err = None
    out = None
    try:
        out = train(cfg)
    except torch.OutOfMemoryError:
        err = "OOM"
    except TrainerError as e:  # the trainer's own clear refusals, e.g. QLoRA without a GPU
        err = f"{e.reason}: {e.message}"
    times = out.step_times if out else []
    steady = sorted(times[warm:])
    step_s = steady[len(steady) // 2] if steady else None
    # tokens actually trained per step (packing/mixed data: real tokens, not padding)
    progress = json.loads(Path(cfg.paths.progress_uri[len("file://"):]).read_text()) if out else {}
    import peft
    import transformers

    def gib(n):
        return round(n / 2**30, 3) if n is not None else None

    toks = out.step_tokens if out else []
    res = {
        "error": err,
        "step_s": round(step_s, 4) if step_s else None,
        # real tokens over the steady steps / their time: equals b*s/step for full-length data
        "tokens_per_s": round(sum(toks[warm:]) / sum(times[warm:])) if len(times) > warm else None,
        "steps": len(times),
        "losses": [round(loss, 4) for _, loss in out.losses] if out else [],
        "train_loss": out.result.metrics.get("trainLoss") if out else None,
        "peak_alloc_gib": gib(torch.cuda.max_memory_allocated()) if cuda else None,
        "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()) if cuda else None,
        "device_used_end_gib": gib(total - torch.cuda.mem_get_info()[0]) if cuda else None,
        "peak_gpu_memory_gib": gib(progress.get("progress", {}).get("peakGpuMemoryBytes") or 0),
        "tokens_per_s_reported": progress.get("progress", {}).get("tokensPerSecond"),
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
    }
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        res["liger_kernel"] = version("liger-kernel")
    except Exception:
        pass
    print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------------
# driver


def tokens_per_step(cfg: dict) -> int:
    """Real (non-pad) tokens in one optimizer step's batch: b x s for full data; measured otherwise."""
    t, d = cfg["spec"]["training"], cfg["spec"]["dataset"]
    return t["microBatchSize"] * d["maxSeqLength"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--configs", nargs="*", help=f"calibration configs (default: {TARGET})")
    ap.add_argument("--variants", nargs="*", help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--all", action="store_true",
                    help="every calibration config (default levers), levers on the target")
    ap.add_argument("--no-baseline", action="store_true", help="do not run measure.py")
    ap.add_argument("--dry-run", action="store_true",
                    help=f"tiny dims, {DRY_STEPS} steps of {DRY_SEQ} tokens, no baseline: checks every run works, "
                    "measures nothing")
    ap.add_argument("--warm", type=int, default=WARM, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=os.environ.get("KUBETUNE_BENCH_WORK", "/tmp/kubetune-bench"))
    args = ap.parse_args()
    if args.one:
        return run_one(args.one, args.warm)

    measure_path, measure = load_measure()
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / ("trainer_bench_dry.jsonl" if args.dry_run else "trainer_bench.jsonl")
    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    configs = args.configs or ([TARGET] + [c for c in measure.CONFIGS if c != TARGET] if args.all else [TARGET])
    plan = []
    for c in configs:
        if c not in measure.CONFIGS:
            raise SystemExit(f"unknown config {c}; measure.py has: {', '.join(measure.CONFIGS)}")
        if measure.CONFIGS[c][5].get("liger"):
            continue  # ours always has the fused-CE lever; the -liger rows are the baseline's own variant
        variants = args.variants or (TARGET_VARIANTS if c == TARGET else DEFAULT_VARIANTS)
        for v in variants:
            if v not in VARIANTS:
                raise SystemExit(f"unknown variant {v}; variants are: {', '.join(VARIANTS)}")
        plan += [(c, v) for v in variants]

    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        tps = row.get("tokens_per_s")
        print(f"{row['stack']:9s} {row['config']:26s} {row.get('variant', ''):17s} err={str(row.get('error')):5s} "
              f"tok/s={tps} peak_reserved={row.get('peak_reserved_gib')} device_used={row.get('device_used_end_gib')} "
              f"estimate={row.get('estimate_gib')} "
              f"wall={row.get('wall_s')}", flush=True)

    if not (args.no_baseline or args.dry_run):
        base_cfgs = sorted({c for c, _ in plan} | {c + "-liger" for c, _ in plan if c + "-liger" in measure.CONFIGS})
        for c in base_cfgs:
            t0 = time.time()
            env = dict(os.environ, OUT=str(root / "baseline"))
            (root / "baseline").mkdir(exist_ok=True)
            p = subprocess.run([sys.executable, str(measure_path), c], capture_output=True, text=True, env=env)
            rows = [json.loads(ln) for ln in (root / "baseline" / "baseline.jsonl").read_text().splitlines()
                    if ln.strip()] if (root / "baseline" / "baseline.jsonl").exists() else []
            row = next((r for r in reversed(rows) if r.get("config") == c), {"config": c, "error": p.stderr[-800:]})
            row.update(stack="hf+peft", variant="baseline", wall_s=round(time.time() - t0, 1))
            record(row)

    for c, v in plan:
        cfg, env = trainer_config(root, c, v, measure, args.dry_run)
        path = root / "runs" / f"{c}-{v}{'-dry' if args.dry_run else ''}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg))
        t0 = time.time()
        e = dict(os.environ, KUBETUNE_ALLOW_RANDOM_INIT="1", KUBETUNE_SKIP_OUTPUTS="1",
                 KUBETUNE_TERMINATION_LOG=str(root / "termination-log"), **env)
        warm = DRY_WARM if args.dry_run else WARM
        p = subprocess.run([sys.executable, __file__, "--one", str(path), "--warm", str(warm)], capture_output=True,
                           text=True, env=e, cwd=str(REPO))
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        row = json.loads(line[-1][7:]) if line else {"error": "crash: " + (p.stderr[-1500:] or p.stdout[-1500:])}
        _, training, dataset, kind = VARIANTS[v]
        if row.get("step_s") and kind == "full":
            row["tokens_per_s_median_step"] = round(tokens_per_step(cfg) / row["step_s"])  # measure.py's definition
        row.update(estimated_gib(cfg, Path(cfg["spec"]["model"]["uri"][len("file://"):])))
        row.update(stack="kubetune", config=c, variant=v, levers={
            "fused_kernels": training.get("fusedKernels", True),
            "fused_ce": training.get("fusedCrossEntropy", True) and env.get("KUBETUNE_FUSED_CE_IMPL", "liger"),
            "fused_optimizer": env.get("KUBETUNE_FUSED_OPTIMIZER", "1") == "1",
            "expandable_segments": "False" not in env.get("PYTORCH_CUDA_ALLOC_CONF", ""),
            "compile": env.get("KUBETUNE_COMPILE") == "1",
            "packing": dataset.get("packing", False), "data": kind},
            dry_run=args.dry_run, wall_s=round(time.time() - t0, 1))
        record(row)
        if (row.get("error") or "").startswith("crash"):
            print(row["error"][-1200:], flush=True)

    print(f"\nresults: {results}")
    if args.dry_run:
        # without a GPU the one expected failure is the trainer's own refusal of QLoRA
        refused = [r for r in rows
                   if r.get("gpu") == "cpu" and (r.get("error") or "").startswith("BadConfig: method.type qlora")]
        failed = [r for r in rows if r.get("error") and r not in refused]
        trained = len(rows) - len(refused) - len(failed)
        print(f"dry run: tiny dims, so the figures above mean nothing. {trained} trained, "
              f"{len(refused)} QLoRA refused (no GPU), {len(failed)} failed. Run without --dry-run to measure.")
        if failed:
            crashed = ", ".join(r["config"] + "/" + r["variant"] for r in failed)
            raise SystemExit(f"{len(failed)} dry runs crashed: {crashed}")
        return
    print(f"target ({TARGET}, H100): >= 11000 tokens/s (plain stack 6951), <= 20 GiB device memory (plain stack 33.7)")


if __name__ == "__main__":
    main()
