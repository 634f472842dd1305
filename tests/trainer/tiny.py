"""Test material: the tiny models and data of kubetune_trainer.tiny, plus TrainerConfig documents."""
from __future__ import annotations

from pathlib import Path

from kubetune_trainer.tiny import (  # noqa: F401  (re-exported for the tests)
    ANIMALS, CHAT_TEMPLATE, COLORS, FRUITS, INIT_RANGE, SOUNDS, SPECIALS, alpaca_rows, build_model_dir,
    build_tokenizer, chat_rows, kto_rows, preference_rows, text_rows, write_jsonl,
)


def trainer_config(tmp: Path, model_dir: Path, data: Path, *, method: dict | None = None, training: dict | None = None,
                   dataset: dict | None = None, checkpoints: dict | None = None, ckpt_uri: str | None = None,
                   output_uri: str | None = None, progress_uri: str | None = None, storage: dict | None = None,
                   resolved: dict | None = None, output: dict | None = None) -> dict:
    training = {"maxSteps": 20, "microBatchSize": 4, "learningRate": 3e-3, "scheduler": "constant", "warmupRatio": 0.0,
                "loggingSteps": 1, "precision": "fp32", "seed": 7, **(training or {})}
    mbs = training["microBatchSize"]
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "TrainerConfig",
        "job": {"namespace": "default", "name": "test", "run": 1},
        "spec": {
            "model": {"uri": f"file://{model_dir}"},
            "dataset": {"uri": f"file://{data}", "maxSeqLength": 128, **(dataset or {})},
            "method": method or {"type": "lora", "lora": {"rank": 8, "alpha": 16}},
            "training": training,
            "resources": {"gpusPerNode": 0},
            "storage": storage or {},
            "checkpoints": {"uri": "s3://kubetune/checkpoints/", "saveSteps": 10, "keep": 2, **(checkpoints or {})},
            "output": output or {},
        },
        "resolved": {"microBatchSize": mbs, "gradientAccumulationSteps": training.get("gradientAccumulationSteps", 1),
                     "numProcesses": 1, **(resolved or {})},
        "paths": {
            "checkpointsUri": ckpt_uri or f"file://{tmp}/store/ckpt",
            "outputUri": output_uri or f"file://{tmp}/store/out",
            "progressUri": progress_uri or f"file://{tmp}/store/progress.json",
            "workDir": str(tmp / "work"),
        },
        "metricsPort": 0,
    }
