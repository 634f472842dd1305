"""Host memory of loading a model under FSDP: what each rank holds before FSDP shards it.

Runs `kubetune train` (the real trainer, one step) with N processes and sharding fsdp on a
random-init Llama of the given dims saved with real weights, and prints each rank's `load` event:
where it built the model (cpu: rank 0 reads the weights; meta: shapes only, FSDP broadcasts rank 0's
values), the bytes it materialized and its peak RSS. On CPU it drives FSDP over gloo
(KUBETUNE_DEBUG_FSDP_ON_CPU); on a node with N GPUs, real FSDP over NCCL.

usage:
  python benchmarks/fsdp_load_bench.py                        # ~0.45B params in fp32 (1.7 GiB), 2 processes
  python benchmarks/fsdp_load_bench.py --hidden 2048 --layers 8 --nproc 2 --method full
It runs the trainer twice, with every rank reading the weights (KUBETUNE_FSDP_RANK0_LOAD=0) and
with rank 0 alone reading them (the default), and prints both; the one-step losses must match.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--method", default="lora", choices=["lora", "full", "freeze"])
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kubetune_trainer.tiny import alpaca_rows, build_tokenizer, write_jsonl

    root = Path(tempfile.mkdtemp(prefix="fsdp-load-"))
    model_dir = root / "model"
    tok = build_tokenizer(model_dir)
    h = args.hidden
    cfg = LlamaConfig(hidden_size=h, num_hidden_layers=args.layers, num_attention_heads=h // 128,
                      num_key_value_heads=h // 512 or 1,
                      intermediate_size=int(h * 3.5) // 64 * 64, vocab_size=len(tok), max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(model_dir))
    del model
    data = write_jsonl(root / "train.jsonl", alpaca_rows(16, seed=1))

    method = {"lora": {"type": "lora", "lora": {"rank": 8, "alpha": 16}}, "full": {"type": "full"},
              "freeze": {"type": "freeze", "freeze": {"trainableLayers": 1}}}[args.method]
    gpus = torch.cuda.device_count()
    config = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "TrainerConfig",
        "job": {"namespace": "bench", "name": "fsdp-load", "run": 1},
        "spec": {"model": {"uri": f"file://{model_dir}"}, "dataset": {"uri": f"file://{data}", "maxSeqLength": 64},
                 "method": method,
                 "training": {"maxSteps": 1, "microBatchSize": 1, "precision": "fp32" if not gpus else "bf16",
                              "sharding": "fsdp", "loggingSteps": 1},
                 "resources": {"gpusPerNode": args.nproc if gpus else 0},
                 "checkpoints": {"uri": "s3://unused/", "saveSteps": 100}, "output": {}},
        "resolved": {"microBatchSize": 1, "gradientAccumulationSteps": 1, "numProcesses": args.nproc},
        "paths": {"checkpointsUri": f"file://{root}/ckpt", "outputUri": f"file://{root}/out",
                  "progressUri": f"file://{root}/progress.json", "workDir": str(root / "work")},
        "metricsPort": 0,
    }
    path = root / "config.yaml"
    print(f"model: {n_params / 1e9:.3f}B params ({n_params * 4 / 2**20:,.0f} MiB in fp32), {args.method}, "
          f"{args.nproc} processes")
    print(f"{'loading':<18}  {'rank':>4}  {'place':<6}  {'materialized MiB':>16}  {'peak RSS MiB':>12}  "
          f"{'final loss':>10}")
    # the two ways side by side, in this run: every rank reading the weights (the escape hatch, and
    # what accelerate does without cpu_ram_efficient_loading), and the default
    for label, knob in (("every rank reads", "0"), ("rank 0 reads", "1")):
        env = dict(os.environ, KUBETUNE_DEBUG_FSDP_ON_CPU="1", PYTHONUNBUFFERED="1", KUBETUNE_FSDP_RANK0_LOAD=knob,
                   KUBETUNE_TERMINATION_LOG=str(root / "termination-log"))
        config["paths"] |= {"checkpointsUri": f"file://{root}/ckpt-{knob}", "outputUri": f"file://{root}/out-{knob}",
                            "workDir": str(root / f"work-{knob}")}
        path.write_text(yaml.safe_dump(config))
        p = subprocess.run([sys.executable, "-m", "kubetune.cli", "train", "--config", str(path)], capture_output=True,
                           text=True, env=env, cwd=REPO)
        events = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
        loads = sorted((e for e in events if e.get("event") == "load"), key=lambda e: e.get("rank", 0))
        steps = [e for e in events if e.get("event") == "step"]
        if p.returncode != 0 or not loads or not steps:
            sys.exit(f"trainer exited {p.returncode}:\n{p.stderr[-3000:]}")
        model_ev = next(e for e in events if e.get("event") == "model")
        for e in loads:
            print(f"{label:<18}  {e.get('rank', 0):>4}  {e['place']:<6}  {e['materializedBytes'] / 2**20:>16,.0f}  "
                  f"{e['peakRssMiB']:>12,}  {steps[-1]['loss']:>10.5f}")
    print(f"distributedType {model_ev['distributedType']} on {model_ev['device']}; peak RSS includes the "
          f"Python/torch runtime (~0.5 GiB)")

if __name__ == "__main__":
    main()
