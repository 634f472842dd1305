"""`kubetune estimate`: per-GPU memory of a FineTuneJob (-f job.yaml) or of a set of flags.

The flag form describes a run of the plain HF Trainer + PEFT stack (see kubetune.estimator.flagplan);
-f uses kubetune's own trainer defaults (kubetune.plan.plan_from_spec).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Any

from kubetune.api import registry
from kubetune.api.base import one_of
from kubetune.errors import UsageError

EPILOG = """examples:
  kubetune estimate --model llama-3.1-8b --method lora --batch-size 4 --seq-len 2048 --gradient-checkpointing
  kubetune estimate --model ./config.json --method full --batch-size auto --seq-len 4096 --gpu-memory 80GB
  kubetune estimate -f job.yaml --json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    src = p.add_argument_group("what to estimate (one of)")
    src.add_argument(
        "-f", "--file", metavar="JOB_YAML", help="a FineTuneJob (or its spec) in YAML: kubetune's trainer defaults"
    )
    src.add_argument(
        "--model",
        metavar="CONFIG_JSON_OR_NAME",
        help="a config.json file, a directory holding one, a catalog name (llama-3.1-8b, "
        "Qwen/Qwen2.5-7B), or hf://org/name[@rev] (from the Hub, or $HF_ENDPOINT; $HF_TOKEN for "
        "gated models)",
    )
    f = p.add_argument_group("flag form (plain HF Trainer + PEFT)")
    _step_arguments(f)
    _method_arguments(f)
    _objective_arguments(f)
    _run_arguments(f)
    _output_arguments(p.add_argument_group("output"))


def _step_arguments(f) -> None:
    """The training step's shape and its memory levers."""
    f.add_argument("--method", help=" | ".join(registry.METHOD_NAMES) + " (default lora)")
    f.add_argument("--batch-size", metavar="B", help="micro batch per GPU, or auto (default 1)")
    f.add_argument("--seq-len", metavar="S", help="sequence length in tokens (default 2048)")
    f.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass")
    f.add_argument(
        "--fused-cross-entropy", action="store_true", help="liger fused linear cross-entropy (no full logits)"
    )
    f.add_argument(
        "--fused-kernels",
        action="store_true",
        help="liger RMSNorm, RoPE and SwiGLU/GeGLU kernels (apply_liger_kernel_to_*: fewer saved activations)",
    )
    f.add_argument(
        "--packing",
        action="store_true",
        help="packed sequences (position_ids): SDPA gets a block-diagonal mask and repeats k/v per head",
    )


def _method_arguments(f) -> None:
    f.add_argument("--lora-rank", metavar="R", help="LoRA rank (default 16)")
    f.add_argument("--lora-alpha", metavar="A", help="LoRA alpha (default 32; does not change memory)")
    f.add_argument("--lora-dropout", metavar="D", help="LoRA dropout in [0, 1) (default 0)")
    f.add_argument("--lora-targets", metavar="T", help="all-linear (default) or module names: q_proj,v_proj,...")
    f.add_argument("--quant-bits", metavar="N", help="QLoRA base weights: 4 (NF4, default) or 8")
    f.add_argument("--trainable-layers", metavar="K", help="freeze: top K blocks train (default 2)")
    f.add_argument("--train-embeddings", action="store_true", help="freeze: also train embeddings and the output head")
    f.add_argument("--virtual-tokens", metavar="N", help="prompt/prefix tuning: virtual tokens (default 20)")


def _objective_arguments(f) -> None:
    """The training objective and the end-of-run evaluation."""
    f.add_argument(
        "--objective",
        help=" | ".join(registry.OBJECTIVE_NAMES) + " (default sft). "
        f"{one_of(registry.objective_names(data='paired'))} put chosen and rejected through one forward: "
        "--batch-size counts examples, twice as many sequences",
    )
    f.add_argument(
        "--reference",
        help=f"with --objective {one_of(registry.objective_names(reference=True))}: implicit (the base with "
        "the adapters off; the default for adapter methods) | copy (a frozen second model; the default "
        "for full and freeze) | precomputed (log-probs from a pass before training)",
    )
    f.add_argument(
        "--test-data",
        action="store_true",
        help="the job has test data (dataset.testSplit or testUri): the end-of-run evaluation scores each test "
        "sequence and answers its prompt",
    )
    f.add_argument(
        "--max-new-tokens",
        metavar="N",
        help="the end-of-run evaluation's longest answer (evaluation.maxNewTokens; default 128 with --test-data; "
        "without it: written prompts only)",
    )


def _run_arguments(f) -> None:
    """Precision, optimizer and processes."""
    f.add_argument("--precision", help="bf16 (bf16 weights and AdamW states, default) | fp32-mixed | fp32")
    f.add_argument("--optimizer", help="adamw (default) | adamw-8bit | paged-adamw-8bit")
    f.add_argument("--gradient-accumulation-steps", metavar="N", help="micro batches per optimizer step (default 1)")
    f.add_argument("--gpus", metavar="N", help="GPUs (processes) the job runs on (default 1)")
    f.add_argument(
        "--sharding", help="with --gpus > 1: ddp | fsdp | zero2 | zero3 (default fsdp for full/freeze, else ddp)"
    )


def _output_arguments(o) -> None:
    o.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        help="GPU size(s) to check, comma-separated: 80GB, 24, 79.6Gi, 81559Mi (default 16,24,40,48,80,141 GB)",
    )
    o.add_argument("--margin", metavar="F", help="safety margin as a fraction of GPU memory (default 0.05)")
    o.add_argument("--json", action="store_true", help="machine-readable output; total_gib is per-GPU device memory")
    o.add_argument(
        "--allocator",
        metavar="SETTING",
        help="the caching allocator the reserved figure assumes: default (expandable_segments:False, "
        "torch's default; the plain HF Trainer) or expandable (expandable_segments:True, which "
        "kubetune's trainer sets). Default: default, which reserves at least as much on these traces",
    )


# ---- parsing helpers (every failure names the flag and the rule) ----------------------------------


def _int(args: argparse.Namespace, name: str, default: int, lo: int = 1, hi: int = 1 << 30) -> int:
    v = getattr(args, name.replace("-", "_"))
    if v is None:
        return default
    try:
        n = int(str(v).strip())
    except ValueError:
        raise UsageError(f"--{name}: must be an integer from {lo} to {hi} (got {v!r})") from None
    if not lo <= n <= hi:
        raise UsageError(f"--{name}: must be an integer from {lo} to {hi} (got {n})")
    return n


def _choice(args: argparse.Namespace, name: str, choices: tuple[str, ...], default: str) -> str:
    v = getattr(args, name.replace("-", "_"))
    if v is None:
        return default
    v = str(v).strip().lower()
    if v not in choices:
        raise UsageError(f"--{name}: must be one of {', '.join(choices)} (got {v!r})")
    return v


_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(gb|g|gib|gi|mib|mi|mb)?\s*$", re.I)


def parse_gpu_sizes(text: str) -> list[tuple[str, int]]:
    """'80GB,24' -> [(name, bytes)]. Nominal GB names use the known size classes (reported totals)."""
    from kubetune.estimator.advice import GPU_SIZES

    out = []
    for part in text.split(","):
        m = _SIZE.match(part)
        if not m:
            raise UsageError(f"--gpu-memory: {part.strip()!r} is not a size (examples: 80GB, 24, 79.6Gi, 81559Mi)")
        num, unit = float(m.group(1)), (m.group(2) or "gb").lower()
        if num <= 0:
            raise UsageError(f"--gpu-memory: sizes must be positive (got {part.strip()!r})")
        if unit in ("gb", "g"):
            known = next((g for g in GPU_SIZES if g.name.lower() == f"{num:g}gb"), None)
            if known is not None:
                out.append((known.name, known.bytes))
                continue
            out.append((f"{num:g}GB", int(num * 1e9)))
        elif unit in ("gib", "gi"):
            out.append((f"{num:g}GiB", int(num * (1 << 30))))
        else:
            nb = int(num * (1 << 20)) if unit in ("mib", "mi") else int(num * 1e6)
            out.append((f"{num:g}{'MiB' if unit in ('mib', 'mi') else 'MB'}", nb))
    return out


def _load_model(arg: str):
    """--model: a config.json path (or a directory with one), a catalog name, else hf://org/name."""
    from kubetune.estimator import catalog, catalog_architecture, from_config

    path = arg
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise UsageError(f"--model {arg}: directory has no config.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as fh:
                cfg = json.load(fh)
        except json.JSONDecodeError as e:
            raise UsageError(f"--model {path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--model {path}: cannot read ({e})") from None
        return from_config(cfg, path), path
    a = catalog_architecture(arg)
    if a is None and arg.startswith("hf://"):  # not in the catalog: its config.json on the Hub
        try:
            text = _read_config_for_cli(arg)
        except ValueError as e:
            raise UsageError(f"--model {arg}: not in kubetune's catalog, and {e}") from None
        try:
            return from_config(json.loads(text), arg), arg
        except json.JSONDecodeError as e:
            raise UsageError(f"--model {arg}: its config.json is not valid JSON (line {e.lineno}: {e.msg})") from None
    if a is None:
        if arg.endswith(".json") or arg.startswith((os.sep, ".")):
            raise UsageError(f"--model {arg}: no such file")
        close = [k for k in sorted(catalog.ALIASES) if arg.lower().split("/")[-1][:5] in k][:5]
        hint = (
            f" (did you mean {', '.join(close)}?)"
            if close
            else " (try llama-3.1-8b, qwen2.5-7b, mistral-7b, gemma-2-9b, phi-4)"
        )
        raise UsageError(f"--model {arg}: not a config.json file nor a model in kubetune's catalog{hint}")
    return a, a.name or arg


# ---- the two forms ---------------------------------------------------------------------------------


_FLAG_ONLY = (
    "method",
    "objective",
    "reference",
    "max_new_tokens",
    "batch_size",
    "seq_len",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "quant_bits",
    "trainable_layers",
    "virtual_tokens",
    "precision",
    "optimizer",
    "gradient_accumulation_steps",
    "gpus",
    "sharding",
)


def _flag_plan(args: argparse.Namespace):
    """The flag form's plan and whether --batch-size is auto; each flag is checked in the order given here, so the
    first error a command line has is the one reported."""
    from kubetune.estimator.flagplan import METHODS, OPTIMIZERS, PRECISIONS, plan_from_flags

    method = _choice(args, "method", METHODS, "lora")
    info = registry.method(method)
    _check_method_flags(args, info)
    objective, reference = _flag_objective(args, info)
    mbs, auto = _flag_batch(args)
    seq = _int(args, "seq-len", 2048, 1, 1 << 20)
    dropout, targets = _flag_lora(args)
    quant_bits = _int(args, "quant-bits", 4, 4, 8)
    if quant_bits not in (4, 8):
        raise UsageError(f"--quant-bits: must be 4 or 8 (got {quant_bits})")
    gpus, sharding = _flag_gpus(args)
    plan = plan_from_flags(
        method=method,
        micro_batch_size=mbs,
        seq_len=seq,
        gradient_checkpointing=args.gradient_checkpointing,
        fused_cross_entropy=args.fused_cross_entropy,
        fused_kernels=args.fused_kernels,
        packing=args.packing,
        precision=_choice(args, "precision", PRECISIONS, "bf16"),
        optimizer=_choice(args, "optimizer", OPTIMIZERS, "adamw"),
        lora_rank=_int(args, "lora-rank", 16, 1, 4096),
        lora_alpha=_int(args, "lora-alpha", 32, 1, 1 << 20),
        lora_dropout=dropout,
        lora_targets=targets,
        quant_bits=quant_bits,
        trainable_layers=_int(args, "trainable-layers", 2, 1, 4096),
        train_embeddings=args.train_embeddings,
        virtual_tokens=_int(args, "virtual-tokens", 20, 1, 4096),
        gpus=gpus,
        sharding=sharding,
        gradient_accumulation_steps=_int(args, "gradient-accumulation-steps", 1, 1, 1 << 20),
        objective=objective,
        reference=reference,
        **_flag_evaluation(args),
    )
    return plan, auto


def _flag_evaluation(args: argparse.Namespace) -> dict:
    """--test-data and --max-new-tokens as the plan's evaluation fields (plan_from_spec's rule: test data has
    its prompts answered too)."""
    answers = args.test_data or args.max_new_tokens is not None
    new_tokens = _int(args, "max-new-tokens", 128, 1, 8192) if answers else 0
    return {"evaluation_test_data": args.test_data, "evaluation_new_tokens": new_tokens}


def _check_method_flags(args: argparse.Namespace, info: registry.MethodInfo) -> None:
    """A method's own flags given with another method."""

    def only_with(flag: str, **having) -> None:
        raise UsageError(f"--{flag}: only valid with --method {one_of(registry.method_names(**having))}")

    for flag in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets"):
        if getattr(args, flag) is not None and info.settings != "lora":
            only_with(flag.replace("_", "-"), settings="lora")
    if args.quant_bits is not None and not info.quantized:
        only_with("quant-bits", quantized=True)
    if (args.trainable_layers is not None or args.train_embeddings) and info.settings != "freeze":
        only_with("trainable-layers" if args.trainable_layers is not None else "train-embeddings", settings="freeze")
    if args.virtual_tokens is not None and info.settings != "virtualTokens":
        only_with("virtual-tokens", settings="virtualTokens")


def _flag_objective(args: argparse.Namespace, info: registry.MethodInfo) -> tuple[str, str | None]:
    """--objective and --reference, checked against each other, the method and --packing."""
    objective = _choice(args, "objective", registry.OBJECTIVE_NAMES, "sft")
    reference = _choice(args, "reference", registry.REFERENCE_MODES, None)  # type: ignore[arg-type]
    oinfo = registry.objective(objective)
    if reference is not None and not oinfo.reference:
        raise UsageError(
            f"--reference: only valid with --objective {one_of(registry.objective_names(reference=True))} "
            f"({one_of(registry.objective_names(reference=False), 'and')} use no reference model)"
        )
    if reference == "implicit" and not info.adapter:
        raise UsageError(
            f"--reference implicit: needs an adapter --method "
            f"({one_of(registry.method_names(adapter=True))}): it disables the adapters to get the base "
            "model; use copy or precomputed"
        )
    if args.packing and oinfo.data != "sft":
        raise UsageError(
            f"--packing: only valid with --objective {one_of(registry.objective_names(data='sft'))} "
            "(preference objectives score each whole sequence on its own)"
        )
    return objective, reference


def _flag_batch(args: argparse.Namespace) -> tuple[int, bool]:
    """(micro batch, auto): auto is priced at 1 until the solver picks one."""
    auto = str(args.batch_size).strip().lower() == "auto" if args.batch_size is not None else False
    if auto:
        return 1, True
    if args.batch_size is not None and not str(args.batch_size).strip().isdigit():
        raise UsageError(f"--batch-size: must be a positive integer or auto (got {args.batch_size!r})")
    return _int(args, "batch-size", 1, 1, 4096), False


def _flag_lora(args: argparse.Namespace) -> tuple[float, tuple[str, ...]]:
    """--lora-dropout and --lora-targets."""
    dropout = 0.0
    if args.lora_dropout is not None:
        try:
            dropout = float(args.lora_dropout)
        except ValueError:
            dropout = -1.0
        if not 0.0 <= dropout < 1.0 or math.isnan(dropout):
            raise UsageError(f"--lora-dropout: must be a number in [0, 1) (got {args.lora_dropout!r})")
    targets: tuple[str, ...] = ("all-linear",)
    if args.lora_targets is not None:
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        if not targets:
            raise UsageError("--lora-targets: give all-linear or a comma-separated list of module names")
    return dropout, targets


def _flag_gpus(args: argparse.Namespace) -> tuple[int, str | None]:
    from kubetune.estimator.flagplan import SHARDINGS

    gpus = _int(args, "gpus", 1, 1, 4096)
    sharding = None
    if args.sharding is not None:
        sharding = _choice(args, "sharding", SHARDINGS, "ddp")
        if gpus < 2:
            raise UsageError("--sharding: needs --gpus 2 or more")
    return gpus, sharding


def _load_jobs(path: str) -> list[tuple[str, Any]]:
    """(name, FineTuneJobSpec) for every FineTuneJob document in the file (a bare spec is accepted)."""
    import yaml
    from pydantic import ValidationError

    from kubetune.api.base import format_errors
    from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobSpec

    try:
        with open(path, encoding="utf-8") as fh:
            docs = [d for d in yaml.safe_load_all(fh) if d is not None]
    except FileNotFoundError:
        raise UsageError(f"-f {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"-f {path}: cannot read ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UsageError(f"-f {path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    jobs = []
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise UsageError(f"-f {path}: document {i + 1} is not a mapping")
        try:
            if "spec" in d or d.get("kind") == "FineTuneJob":
                job = FineTuneJob.model_validate(d)
                jobs.append((job.metadata.name, job.spec))
            else:
                jobs.append((f"document {i + 1}", FineTuneJobSpec.model_validate(d)))
        except ValidationError as e:
            root = "" if "spec" in d else "spec"
            lines = format_errors(e, root)
            more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
            raise UsageError(f"-f {path}: {lines[0]}{more}") from None
    if not jobs:
        raise UsageError(f"-f {path}: no FineTuneJob in the file")
    return jobs


def _read_config_for_cli(uri: str) -> str:
    """config.json for file:// and hf:// URIs (the CLI cannot reach the job's S3 or PVCs). The Hub is
    read as huggingface_hub would: $HF_ENDPOINT (a mirror) and $HF_TOKEN."""
    if uri.startswith("file://"):
        p = uri[len("file://") :]
        p = os.path.join(p, "config.json") if os.path.isdir(p) else p
        with open(p, encoding="utf-8") as fh:
            return fh.read()
    if uri.startswith("hf://"):
        from kubetune.hub import hub_endpoint, read_hub_config

        return read_hub_config(
            uri,
            os.environ.get("HF_TOKEN") or None,
            hub_endpoint(os.environ.get("HF_ENDPOINT"), "HF_ENDPOINT"),
            cli=True,
        )
    raise OSError("the CLI reads config.json only from file:// and hf:// URIs")


# ---- output -------------------------------------------------------------------------------------------


def _fmt_params(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _plan_line(plan) -> str:
    info = registry.method(plan.method)
    parts = [plan.method]
    if info.settings == "lora":
        tg = ",".join(plan.lora_targets) if plan.lora_targets else "all-linear"
        parts[0] += f" r{plan.lora_rank} {tg}" + (f" dropout {plan.lora_dropout:g}" if plan.lora_dropout else "")
    if info.quantized:
        parts[0] += f" ({plan.quant_bits}-bit{' nf4' if plan.quant_bits == 4 else ''})"
    if info.settings == "freeze":
        parts[0] += f" top {plan.trainable_layers}" + (" + embeddings" if plan.train_embeddings else "")
    if info.settings == "virtualTokens":
        parts[0] += f" {plan.virtual_tokens} tokens"
    if plan.objective != "sft":
        parts.append(plan.objective + (f", reference {plan.reference}" if plan.reference != "none" else ""))
    parts.append(f"weights {plan.weight_dtype}, trainable {plan.trainable_dtype}, compute {plan.compute_dtype}")
    parts.append(plan.optimizer)
    seqs = plan.sequences_per_example
    examples = f" examples ({plan.micro_batch_size * seqs} sequences)" if seqs > 1 else ""
    accumulation = plan.gradient_accumulation_steps
    parts.append(
        f"micro batch {plan.micro_batch_size}{examples} x {plan.seq_len} tokens"
        + (f" x {accumulation} accumulation" if accumulation > 1 else "")
    )
    parts.append(f"checkpointing {'on' if plan.gradient_checkpointing else 'off'}")
    parts.append(f"fused CE {'on' if plan.fused_cross_entropy else 'off'}")
    if plan.fused_kernels:
        parts.append("fused kernels")
    if plan.packing:
        parts.append("packing")
    if plan.evaluation_test_data or plan.evaluation_new_tokens:
        what = ["test data"] if plan.evaluation_test_data else []
        what += [f"answers of {plan.evaluation_new_tokens} tokens"] if plan.evaluation_new_tokens else []
        parts.append("evaluation: " + ", ".join(what))
    g = plan.num_processes
    parts.append(f"{g} GPU{'s' if g > 1 else ''}" + (f" {plan.sharding}" if g > 1 else ""))
    return " | ".join(parts)


def _report(
    name: str,
    arch,
    plan,
    auto: bool,
    sizes: list[tuple[str, int]],
    margin: float,
    as_json: bool,
    source: str,
    spec=None,
    allocator: str | None = None,
) -> dict:
    """One model and plan priced (auto resolved as the operator would), with fit and advice; printed unless
    ``as_json``. Returns the JSON form."""
    from kubetune.estimator.advice import fit_advice, fits
    from kubetune.estimator.allocator import DEFAULT
    from kubetune.estimator.memory import GIB, estimate

    allocator = allocator or DEFAULT
    plan, auto_table = _priced_plan(arch, plan, auto, sizes, margin, spec, allocator)
    est = estimate(arch, plan, allocator=allocator)
    fit = {n: fits(est, b, margin) for n, b in sizes}
    advice = [] if any(fit.values()) else fit_advice(arch, plan, [b for _, b in sizes], margin, allocator=allocator)
    d = {
        "name": name,
        "source": source,
        "model": arch.name or arch.model_type,
        "architecture": arch.summary(),
        **est.to_dict(),
        "plan": _plan_line(plan),
        "margin": margin,
        "gpu_sizes": {n: round(b / GIB, 2) for n, b in sizes},
        "fits": fit,
        "advice": [a.to_dict() for a in advice],
    }
    floors: list[int | None] = [None] * len(advice)
    if spec is not None:  # a job file: an FSDP option also needs host memory for rank 0's whole-model read
        from kubetune.estimator.host import advice_memory_floor_gib

        floors = [advice_memory_floor_gib(spec, a) for a in advice]
        for a, need in zip(d["advice"], floors):
            if need:
                a["min_memory_gib"] = need
    if auto:
        d["max_micro_batch"] = auto_table
    if spec is not None:
        _add_pod_resources(d, spec, plan, est, arch)
    if not as_json:
        _print_report(d, arch, est, sizes, fit, auto, advice, floors)
    return d


def _priced_plan(arch, plan, auto: bool, sizes: list[tuple[str, int]], margin: float, spec, allocator: str):
    """(the plan to price, the auto micro batch per GPU size): a job is priced as the operator prices it, with
    the accumulation it will run; auto takes the largest micro batch that fits the smallest GPU taking one."""
    from kubetune.estimator.advice import max_micro_batch
    from kubetune.plan import accumulation_steps, auto_micro_batch_cap

    def as_run(p):
        if spec is None:
            return p
        return p.with_(gradient_accumulation_steps=accumulation_steps(spec, p.micro_batch_size, p.num_processes))

    plan = as_run(plan)
    auto_table: dict[str, int] = {}
    if auto:
        # a job's auto picks what the operator would: capped by its effective batch per GPU
        limit = {"limit": auto_micro_batch_cap(spec)} if spec is not None else {}
        auto_table = {n: max_micro_batch(arch, plan, b, margin, allocator=allocator, **limit) for n, b in sizes}
        if any(v > 0 for v in auto_table.values()):
            first = next(n for n, b in sizes if auto_table[n] > 0)
            plan = as_run(plan.with_(micro_batch_size=auto_table[first]))
    return plan, auto_table


def _add_pod_resources(d: dict, spec, plan, est, arch) -> None:
    """A job file: the trainer pod's ephemeral-storage request, as the operator sets it, and whether its host
    memory must hold the whole model."""
    from kubetune.estimator.disk import work_dir_bytes
    from kubetune.estimator.host import whole_model_in_host

    d["local_disk_bytes"] = work_dir_bytes(spec, plan, est.total_params, est.trainable_params, arch.disk_weight_bytes)
    host, why = whole_model_in_host(spec, plan, est.total_params)
    if host:
        d["host_model_bytes"], d["host_model_why"] = host, why


_BREAKDOWN_LABELS = {
    "weights": "weights",
    "gradients": "gradients",
    "optimizer": "optimizer states",
    "adapters": "adapters",
    "activations": "activations",
    "logits": "logits / loss",
    "overhead": "CUDA context + allocator",
    "communication": "communication",
}


def _print_report(
    d: dict, arch, est, sizes: list[tuple[str, int]], fit: dict[str, bool], auto: bool, advice: list, floors: list
) -> None:
    from kubetune.estimator.memory import GIB

    w = sys.stdout.write
    w(f"{d['name']}\n" if d["name"] else "")
    w(f"  model        {d['model']}: {arch.summary().split(': ', 1)[-1]}\n")
    pct = est.trainable_params / est.total_params * 100 if est.total_params else 0
    w(
        f"  parameters   {_fmt_params(est.total_params)} total, {_fmt_params(est.trainable_params)} trainable "
        f"({pct:.2f}%)\n"
    )
    w(f"  plan         {d['plan']}\n")
    for note in est.notes:
        w(f"  note         {note}\n")
    w(f"\n  per-GPU memory {est.total_gib:.2f} GiB (peak at the {est.phase})\n")
    for k, v in est.breakdown.items():
        if v or k in ("weights", "activations", "overhead"):
            w(f"    {_BREAKDOWN_LABELS[k]:<26s}{v / GIB:8.2f} GiB\n")
    w(f"    {'total':<26s}{est.total_gib:8.2f} GiB\n")
    # what torch reports apart: tensors at the peak, and what the caching allocator holds for them
    w(
        f"  allocated    {est.allocated_bytes / GIB:.2f} GiB (max_memory_allocated); reserved "
        f"{est.reserved_bytes / GIB:.2f} GiB (max_memory_reserved, simulated caching allocator, "
        f"{est.allocator_setting})\n"
    )
    if "local_disk_bytes" in d:
        w(f"  local disk     {d['local_disk_bytes'] / GIB:.0f} GiB per trainer pod (its ephemeral-storage request)\n")
    if "host_model_bytes" in d:
        w(
            f"  host memory    the whole model, {d['host_model_bytes'] / GIB:.1f} GiB, is read into it "
            f"({d['host_model_why']}): spec.resources.memory must hold it\n"
        )
    w("\n")
    cells = " | ".join(f"{n} {'yes' if fit[n] else 'no'}" for n, _ in sizes)
    w(f"  fits ({int(d['margin'] * 100)}% margin): {cells}\n")
    if auto:
        w("  auto micro batch: " + " | ".join(f"{n} -> {v}" for n, v in d["max_micro_batch"].items()) + "\n")
    if advice:
        w("\n  fits none of these GPUs; nearest configurations that do:\n")
        for a, need in list(zip(advice, floors))[:8]:
            mem = f", with spec.resources.memory at least {need}Gi" if need else ""
            w(f"    - {a.description}: {a.estimate.total_gib:.2f} GiB, fits {a.gpu}{mem}\n")
    elif not any(fit.values()):
        w("\n  fits none of these GPUs, and no nearby configuration does either\n")


def run(args: argparse.Namespace) -> int:
    from kubetune.estimator.advice import GPU_SIZES
    from kubetune.estimator.allocator import DEFAULT, EXPANDABLE

    if args.file and args.model:
        raise UsageError("-f and --model: give one of them (a job file, or a model with flags)")
    if not args.file and not args.model:
        raise UsageError("give -f JOB_YAML or --model CONFIG_JSON_OR_NAME (see kubetune estimate -h)")
    margin = _margin(args)
    sizes = parse_gpu_sizes(args.gpu_memory) if args.gpu_memory else [(g.name, g.bytes) for g in GPU_SIZES]
    allocator = {"default": DEFAULT, "expandable": EXPANDABLE}[
        _choice(args, "allocator", ("default", "expandable"), "default")
    ]
    if args.model:
        reports = [_flag_report(args, sizes, margin, allocator)]
    else:
        reports = _job_reports(args, sizes, margin, allocator)
    if args.json:
        doc = reports[0] if len(reports) == 1 else {"jobs": reports, "total_gib": max(r["total_gib"] for r in reports)}
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0


def _margin(args: argparse.Namespace) -> float:
    from kubetune.estimator.advice import DEFAULT_MARGIN

    if args.margin is None:
        return DEFAULT_MARGIN
    try:
        margin = float(args.margin)
    except ValueError:
        margin = -1.0
    if not 0.0 <= margin < 0.5:
        raise UsageError(f"--margin: must be a fraction in [0, 0.5) (got {args.margin!r})")
    return margin


def _flag_report(args: argparse.Namespace, sizes: list[tuple[str, int]], margin: float, allocator: str) -> dict:
    arch, source = _load_model(args.model)
    plan, auto = _flag_plan(args)
    try:
        return _report("", arch, plan, auto, sizes, margin, args.json, source, allocator=allocator)
    except UsageError as e:
        if "LoRA target" in str(e):  # an unknown LoRA target is reported against its flag
            raise UsageError(f"--lora-targets: {e}") from None
        raise


def _job_reports(args: argparse.Namespace, sizes: list[tuple[str, int]], margin: float, allocator: str) -> list[dict]:
    from kubetune.estimator import resolve_architecture
    from kubetune.plan import plan_from_spec

    given = [f"--{f.replace('_', '-')}" for f in _FLAG_ONLY if getattr(args, f) is not None]
    given += [
        f
        for f, on in (
            ("--gradient-checkpointing", args.gradient_checkpointing),
            ("--fused-cross-entropy", args.fused_cross_entropy),
            ("--fused-kernels", args.fused_kernels),
            ("--packing", args.packing),
            ("--train-embeddings", args.train_embeddings),
            ("--test-data", args.test_data),
        )
        if on
    ]
    if given:
        raise UsageError(f"{given[0]}: not used with -f (the job file sets it); use the flag form with --model")
    reports = []
    for name, spec in _load_jobs(args.file):
        arch = resolve_architecture(spec.model, _read_config_for_cli)
        auto = spec.training.micro_batch_size == "auto"
        plan = plan_from_spec(spec, micro_batch_size=1 if auto else None)
        job_sizes = sizes
        if auto and spec.resources.min_gpu_memory and not args.gpu_memory:
            from kubetune.api.base import quantity_to_float

            q = int(quantity_to_float(spec.resources.min_gpu_memory))
            job_sizes = [(str(spec.resources.min_gpu_memory), q)]
        try:
            reports.append(
                _report(
                    name,
                    arch,
                    plan,
                    auto,
                    job_sizes,
                    margin,
                    args.json,
                    f"{args.file}: {spec.model.uri}",
                    spec=spec,
                    allocator=allocator,
                )
            )
        except UsageError as e:
            if "LoRA target" in str(e):
                raise UsageError(f"-f {args.file}: spec.method.lora.targetModules: {e}") from None
            raise
        if not args.json:
            sys.stdout.write("\n")
    return reports
