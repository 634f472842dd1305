"""The trainer's entry, ``train(config)``, and the building blocks its recipe (recipe.py) is made of:
SIGTERM handling, the Accelerator, the optimizer, an evaluation pass, outputs and resume points.

The run itself reads top to bottom in recipe.FineTuneRecipe.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from kubetune.api import registry
from kubetune.api.constants import bf16_refused
from kubetune.api.v1alpha1 import ResultStatus, TrainerConfig
from kubetune_trainer import checkpoint as ck
from kubetune_trainer import knobs as kn
from kubetune_trainer import storage as st
from kubetune_trainer.errors import BadConfig, StorageFailed
from kubetune_trainer.knobs import Knobs
from kubetune_trainer.model import LossHead, bitsandbytes_on, loading_place, plan_dtypes_on
from kubetune_trainer.progress import log_event, logger


@dataclass
class Outcome:
    reason: str  # Completed | EarlyStopped | Preempted
    step: int
    result: ResultStatus
    message: str = ""
    losses: list = field(default_factory=list)
    step_times: list = field(default_factory=list)  # seconds per optimizer step (this attempt)
    step_tokens: list = field(default_factory=list)  # real (non-pad) tokens per optimizer step, all processes


# ---------------------------------------------------------------------------------------------
# setup helpers


class Preemption:
    """SIGTERM (the kubelet stopping the pod: preemption, eviction, drain) asks the loop to stop at
    the end of the current optimizer step, save a checkpoint and upload it within the pod's grace
    period. Without a handler Python dies at once, and as PID 1 it would ignore SIGTERM entirely."""

    def __init__(self, grace_seconds: float, margin: float = 5.0):
        self.grace, self.margin = grace_seconds, margin
        self.at: float | None = None
        self._acknowledged = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (an embedding caller): leave signals alone
            pass

    def _handle(self, signum, frame) -> None:
        # Only a flag. The handler runs between two bytecodes of the main thread, which may be inside
        # log_event holding the stdout lock: logging here deadlocked until the kubelet's SIGKILL.
        if self.at is None:
            self.at = time.monotonic()

    @property
    def requested(self) -> bool:
        """Read by the loop on the main thread, which also says (once) that the signal was seen."""
        self.acknowledge()
        return self.at is not None

    def acknowledge(self) -> None:
        # Also called on the way out: ranks agree to stop through a collective, so a rank may stop on
        # another's signal before it has read its own.
        if self.at is not None and not self._acknowledged:
            self._acknowledged = True
            log_event("preempted", message=f"SIGTERM: stopping at the end of this step or eval; "
                                           f"{self.grace:.0f}s grace to save a checkpoint")

    def time_left(self) -> float:
        return 0.0 if self.at is None else max(0.0, self.at + self.grace - self.margin - time.monotonic())

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def check_precision_fits_gpu(precision: str) -> None:
    """bf16 on a GPU older than Ampere: a clear BadConfig here, not accelerate's refusal or a Triton
    compile error mid-step. The operator keeps such jobs off those GPUs; this covers a pinned node."""
    if not torch.cuda.is_available():
        return
    i = int(os.environ.get("LOCAL_RANK", "0") or 0) % torch.cuda.device_count()
    why = bf16_refused(precision, torch.cuda.get_device_capability(i), torch.cuda.get_device_name(i))
    if why is not None:
        raise BadConfig(why)


def make_accelerator(plan, knobs: Knobs | None = None):
    from accelerate import Accelerator

    knobs = knobs or kn.current()
    on_cuda = torch.cuda.is_available()
    mp = "no"
    if plan_dtypes_on(on_cuda) and plan.compute_dtype != "fp32":
        mp = "bf16" if plan.compute_dtype == "bf16" else "fp16"
    kwargs: dict = {"mixed_precision": mp, "cpu": not on_cuda}
    if plan.sharding == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            sharding_strategy="FULL_SHARD",
            auto_wrap_policy="transformer_based_wrap",  # the model's _no_split_modules (its decoder blocks)
            use_orig_params=True,  # freeze: frozen and trainable parameters share flat parameters
            # set below, once the process's device is known (the plugin would pick cuda:0 on every rank)
            sync_module_states=False,
            state_dict_type="SHARDED_STATE_DICT",
        )
    acc = Accelerator(**kwargs)
    if plan.sharding == "fsdp" and not on_cuda and acc.num_processes > 1 and knobs.debug_fsdp_on_cpu:
        # Test knob: accelerate only shards on accelerators, but FSDP itself runs on CPU (gloo); this
        # lets CPU tests drive the trainer's FSDP paths (wrapping, sharded checkpoints, outputs).
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DistributedType
        from torch.distributed.fsdp import _init_utils

        for shared in (PartialState._shared_state, AcceleratorState._shared_state):
            shared["distributed_type"] = DistributedType.FSDP
            shared["device"] = torch.device("cpu")  # FSDP's compute device on CPU has no index
        acc.state.fsdp_plugin = kwargs["fsdp_plugin"]
        # FSDP refuses to broadcast CPU tensors because NCCL cannot; gloo can
        _init_utils._check_module_states_for_sync_module_states = lambda states: None
    if model_place(plan, acc, rank=1, knobs=knobs) == "meta":
        # rank 0 alone holds the weights (model.loading_place): FSDP gives the other ranks' meta
        # tensors storage on their own device and broadcasts rank 0's values into them. Decided
        # the same on every rank (asking for rank 1's place): the broadcast is a collective.
        plugin, dev = acc.state.fsdp_plugin, acc.device
        plugin.sync_module_states = True
        plugin.param_init_fn = lambda module: module.to_empty(device=dev, recurse=False)
    return acc


def model_place(plan, accelerator, rank: int | None = None, knobs: Knobs | None = None) -> str:
    return loading_place(plan.method, accelerator.distributed_type.value == "FSDP",
                         accelerator.process_index if rank is None else rank,
                         rank0_only=(knobs or kn.current()).fsdp_rank0_load)


def fsdp_wrap_policy(model, method: str):
    """FSDP1 flattens each wrapped unit into one tensor: one dtype, and, if any part of it trains, one
    gradient the size of the whole unit. Wrapped a decoder block at a time, a LoRA block would mix fp32
    adapters with bf16 base weights ("Must flatten tensors with uniform dtype") and give every frozen
    weight a gradient. peft's policy makes each adapter layer its own unit (what HF Trainer does too);
    full and freeze train whole blocks, so the per-block policy is right for them."""
    if not registry.method(method).adapter:
        return None
    from peft.utils.other import fsdp_auto_wrap_policy

    return fsdp_auto_wrap_policy(model)


def build_optimizer(model, plan, training, device, knobs: Knobs | None = None):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "norm" not in name.lower() else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": training.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise BadConfig("nothing to train: the method left no trainable parameters")
    lr = training.learning_rate
    if plan.optimizer == "adamw":
        fused = device.type == "cuda" and (knobs or kn.current()).fused_optimizer
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True if fused else None)
    if not bitsandbytes_on(device.type == "cuda"):
        raise BadConfig(f"training.optimizer {plan.optimizer} is bitsandbytes 8-bit AdamW and needs a CUDA GPU; "
                        "use optimizer adamw on CPU")
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if plan.optimizer == "adamw-8bit" else bnb.optim.PagedAdamW8bit
    return cls(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def all_sum(accelerator, values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t.tolist()


class EvalStopped(Exception):
    """A SIGTERM arrived during an evaluation: a large validation set can outlast the grace period."""


def eval_pass(model, head: LossHead, objective, val: list, micro_batch: int, accelerator, pad_id: int,
              stop: Callable[[], bool] | None = None, sleep: float = 0.0) -> tuple[float | None, dict[str, float]]:
    """The objective's mean loss and metrics over the validation set (all processes). Raises
    EvalStopped when stop() turns true on any rank; the ranks agree on it each batch, so they all
    leave at the same one."""
    if not val:
        return None, {}
    n, rank = accelerator.num_processes, accelerator.process_index
    mine = val[rank::n]
    rounds = math.ceil(math.ceil(len(val) / n) / micro_batch)  # same number of forwards on every rank
    names = objective.metric_names()
    sums = [0.0] * (2 + len(names))  # loss, count, then each metric
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(rounds):
            if stop is not None and all_sum(accelerator, [float(stop())])[0]:
                if was_training:
                    model.train()
                raise EvalStopped
            if sleep:  # tests: a long eval to stop midway
                time.sleep(sleep)
            chunk = mine[i * micro_batch:(i + 1) * micro_batch]
            # a rank out of examples still runs a forward, to keep collective ops in step, and counts nothing
            b = to_device(objective.collate(chunk or val[:1], pad_id), accelerator.device)
            loss, metrics = objective.loss(model, head, b)
            if chunk:
                sums[0] += float(loss)
                sums[1] += float(b["count"])
                for j, k in enumerate(names):
                    sums[2 + j] += float(metrics[k])
    if was_training:
        model.train()
    loss_sum, count, *metric_sums = all_sum(accelerator, sums)
    if not count:
        return None, {}
    return loss_sum / count, {k: v / count for k, v in zip(names, metric_sums)}


def upload_dir(local: Path, loc: st.Location, log, attempts: int = 8) -> None:
    """Upload a directory, then its manifest (files, sizes, sha256) last."""
    entries = []
    for p in sorted(q for q in local.rglob("*") if q.is_file()):
        rel = p.relative_to(local).as_posix()
        sha = st.sha256_file(p)
        st._retry(lambda: loc.put_file(rel, p, sha256=sha), attempts, f"upload {loc.uri}/{rel}", log)
        entries.append({"path": rel, "size": p.stat().st_size, "sha256": sha})
    body = json.dumps({"created": ck.now_iso(), "files": entries}, indent=1).encode()
    st._retry(lambda: loc.put_bytes(st.MANIFEST, body), attempts, f"upload {loc.uri}/{st.MANIFEST}", log)


# ---------------------------------------------------------------------------------------------
# the run


def train(config: TrainerConfig, log: Callable[[str], None] | None = None, knobs: Knobs | None = None) -> Outcome:
    """Run the recipe (recipe.FineTuneRecipe) for this config."""
    from kubetune_trainer.recipe import FineTuneRecipe

    knobs = knobs or Knobs.from_env()
    # Installed first: loading a large model takes minutes, and a SIGTERM then must not kill us mid-write.
    preempt = Preemption(knobs.grace_seconds)
    try:
        with kn.installed(knobs):
            return FineTuneRecipe(config, log or logger(), preempt, knobs).run()
    finally:
        preempt.restore()


def peak_device_memory() -> int:
    """CUDA context + the allocator's peak reservation (what has to fit on the GPU)."""
    free, total = torch.cuda.mem_get_info()
    context_and_other = max(0, (total - free) - torch.cuda.memory_reserved())
    return int(torch.cuda.max_memory_reserved() + context_and_other)


def ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def write_outputs(plan, spec, model, accelerator, tokenizer, model_dir, work, out_loc, result, log) -> None:
    """The adapter (or the full model) to <output>/adapter (/model), the merged model to <output>/merged."""
    method = registry.method(plan.method)
    full = not method.adapter
    sd, _ = ck.full_state_dicts(model, None, accelerator, trainable_only=not full)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    unwrapped = accelerator.unwrap_model(model)
    out = work / "output"
    shutil.rmtree(out, ignore_errors=True)
    sub = "model" if full else "adapter"
    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    if full:
        unwrapped.save_pretrained(str(out / sub), state_dict=tensors)
    else:
        ck.save_adapter(unwrapped, out / sub, tensors)
    tokenizer.save_pretrained(str(out / sub))
    upload_dir(out / sub, out_loc.child(sub), log)
    result.adapter_uri = f"{out_loc.uri.rstrip('/')}/{sub}/"
    log_event("output", uri=result.adapter_uri)
    if spec.output.merge_adapter and method.mergeable:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.compute_dtype, torch.float32)
        if not plan_dtypes_on(torch.cuda.is_available()):
            dtype = torch.float32
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, trust_remote_code=spec.model.trust_remote_code)
        merged = PeftModel.from_pretrained(base, str(out / sub)).merge_and_unload()
        merged.save_pretrained(str(out / "merged"))
        tokenizer.save_pretrained(str(out / "merged"))
        del merged, base
        upload_dir(out / "merged", out_loc.child("merged"), log)
        result.merged_uri = f"{out_loc.uri.rstrip('/')}/merged/"
        log_event("output", uri=result.merged_uri, merged=True)
    accelerator.wait_for_everyone()


def follow_schedule(scheduler, optimizer, base_lrs) -> None:
    """Put this spec's schedule (peak rates ``base_lrs``) at the scheduler's restored step."""
    scheduler.base_lrs = list(base_lrs)
    lrs = [b * f(scheduler.last_epoch) for b, f in zip(base_lrs, scheduler.lr_lambdas)]
    for group, base, lr in zip(optimizer.param_groups, base_lrs, lrs):
        group["initial_lr"], group["lr"] = base, lr
    scheduler._last_lr = lrs


def fetch_resume_point(own, resume_from: str | None, storage, dest, log, uid: str | None = None):
    """(path, committed, its URI, whether it is this run's): the newest committed checkpoint of this
    run, else the one checkpoints.resumeFrom names. None: a fresh start.

    This run's prefix (<uri>/<namespace>/<name>/run-<n>/) may hold the checkpoints of an earlier
    FineTuneJob of the same name, deleted and kept by deletionPolicy Retain. Those are another
    object's run, perhaps on other data: continuing it takes checkpoints.resumeFrom, said outright."""
    foreign: list[ck.Committed] = []

    def mine(c: ck.Committed) -> bool:
        if ck.foreign_owner(c, uid) is None:
            return True
        foreign.append(c)
        return False

    found = _fetch(own, dest, log, functools.partial(ck.fetch_latest, only=mine))
    if found is not None:
        return (*found, f"{own.uri.rstrip('/')}/{found[1].name}", True)
    if foreign and not resume_from:
        raise BadConfig(
            f"{own.uri} holds the checkpoints of an earlier FineTuneJob of this name (uid "
            f"{foreign[-1].manifest['jobUid']}, newest {foreign[-1].name}), kept by its deletionPolicy Retain: a new "
            f"object does not continue another's run on its own. To continue it, set spec.checkpoints.resumeFrom to "
            f"{own.uri}; to start over, delete that prefix or use another name or spec.checkpoints.uri")
    if not resume_from:
        return None
    src = st.open_location(resume_from, storage)
    found = _fetch(src, dest, log, ck.fetch_from)
    if found is None:
        raise BadConfig(f"spec.checkpoints.resumeFrom {resume_from}: no committed checkpoint there (a "
                        "checkpoint-<step>/ with its manifest.json, or a prefix holding some)")
    base = src.uri.rstrip("/")
    uri = base if base.endswith("/" + found[1].name) else f"{base}/{found[1].name}"
    log(f"no checkpoint of this run yet: starting from {uri} (step {found[1].step})")
    return (*found, uri, False)


def _fetch(loc, dest, log, how):
    try:
        return how(loc, dest, log)
    except (StorageFailed, BadConfig):
        raise
    except Exception as e:
        raise st.storage_error(f"cannot read checkpoints at {loc.uri}", e) from None


def peak_rss_mib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # KiB on Linux


def on_local_main(accelerator, fn):
    """Run fn on each node's first process (downloads), then on the others (now a cache hit)."""
    if accelerator.num_processes == 1:
        return fn()
    with accelerator.local_main_process_first():
        return fn()
