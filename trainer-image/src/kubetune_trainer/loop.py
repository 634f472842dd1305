"""The training loop, top to bottom.

1. Plan: TrainerConfig -> TrainingPlan (the estimator's contract), an Accelerator for it.
2. Data: fetch, validate, tokenize, hold out validation, pack.
3. Model: load, apply the method, optimizer, scheduler.
4. Resume: newest committed checkpoint in S3 -> model/adapter, optimizer, scheduler, RNG, data position.
5. Train: gradient accumulation over micro batches, clipping, eval + early stopping, checkpoints
   uploaded in the background.
6. Finish: eval of base and tuned model, adapter (and merged model) to the output URI, result.
"""
from __future__ import annotations

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

from kubetune.api.constants import GRACE_SECONDS
from kubetune.api.v1alpha1 import ResultStatus, TrainerConfig
from kubetune_trainer import checkpoint as ck
from kubetune_trainer import data as dt
from kubetune_trainer import storage as st
from kubetune_trainer.config import plan_for
from kubetune_trainer.errors import BadConfig, BadData, StorageFailed
from kubetune_trainer.model import (LossHead, bitsandbytes_on, build_model, check_model_dir, count_params, load_tokenizer,
                                   loading_place, materialized_bytes, plan_dtypes_on, resolve_model_dir)
from kubetune_trainer.progress import Metrics, ProgressReporter, log_event, logger

ADAPTER_METHODS = ("lora", "qlora", "prompt-tuning", "prefix-tuning")


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


def make_accelerator(plan):
    from accelerate import Accelerator

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
    if plan.sharding == "fsdp" and not on_cuda and acc.num_processes > 1 and os.environ.get("KUBETUNE_DEBUG_FSDP_ON_CPU") == "1":
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
    if model_place(plan, acc, rank=1) == "meta":
        # rank 0 alone holds the weights (model.loading_place): FSDP gives the other ranks' meta
        # tensors storage on their own device and broadcasts rank 0's values into them. Decided
        # the same on every rank (asking for rank 1's place): the broadcast is a collective.
        plugin, dev = acc.state.fsdp_plugin, acc.device
        plugin.sync_module_states = True
        plugin.param_init_fn = lambda module: module.to_empty(device=dev, recurse=False)
    return acc


def model_place(plan, accelerator, rank: int | None = None) -> str:
    return loading_place(plan.method, accelerator.distributed_type.value == "FSDP",
                         accelerator.process_index if rank is None else rank,
                         rank0_only=os.environ.get("KUBETUNE_FSDP_RANK0_LOAD", "1") != "0")


def fsdp_wrap_policy(model, method: str):
    """FSDP1 flattens each wrapped unit into one tensor: one dtype, and, if any part of it trains, one
    gradient the size of the whole unit. Wrapped a decoder block at a time, a LoRA block would mix fp32
    adapters with bf16 base weights ("Must flatten tensors with uniform dtype") and give every frozen
    weight a gradient. peft's policy makes each adapter layer its own unit (what HF Trainer does too);
    full and freeze train whole blocks, so the per-block policy is right for them."""
    if method not in ADAPTER_METHODS:
        return None
    from peft.utils.other import fsdp_auto_wrap_policy

    return fsdp_auto_wrap_policy(model)


def build_optimizer(model, plan, training, device):
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
        fused = device.type == "cuda" and os.environ.get("KUBETUNE_FUSED_OPTIMIZER", "1") == "1"
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True if fused else None)
    if not bitsandbytes_on(device.type == "cuda"):
        raise BadConfig(f"training.optimizer {plan.optimizer} is bitsandbytes 8-bit AdamW and needs a CUDA GPU; "
                        "use optimizer adamw on CPU")
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if plan.optimizer == "adamw-8bit" else bnb.optim.PagedAdamW8bit
    return cls(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def all_sum(accelerator, values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t.tolist()


class EvalStopped(Exception):
    """A SIGTERM arrived during an evaluation: a large validation set can outlast the grace period."""


def evaluate(model, head: LossHead, val: list[dt.Example], micro_batch: int, accelerator, pad_id: int,
             stop: Callable[[], bool] | None = None) -> float | None:
    """Mean token loss over the validation set (all processes). Raises EvalStopped when stop() turns
    true on any rank; the ranks agree on it each batch, so they all leave at the same one."""
    if not val:
        return None
    debug_sleep = float(os.environ.get("KUBETUNE_DEBUG_EVAL_SLEEP", "0"))
    n, rank = accelerator.num_processes, accelerator.process_index
    mine = val[rank::n]
    rounds = math.ceil(math.ceil(len(val) / n) / micro_batch)  # same number of forwards on every rank
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0.0
    with torch.no_grad():
        for i in range(rounds):
            if stop is not None and all_sum(accelerator, [float(stop())])[0]:
                if was_training:
                    model.train()
                raise EvalStopped
            if debug_sleep:  # tests: a long eval to stop midway
                time.sleep(debug_sleep)
            chunk = mine[i * micro_batch:(i + 1) * micro_batch]
            if not chunk:  # keep collective ops in step: a batch that counts for nothing
                chunk = [dt.Example(val[0].input_ids, [dt.IGNORE] * len(val[0]))]
            b = to_device(dt.collate(chunk, pad_id), accelerator.device)
            with head.computing_loss(b["labels"]):
                loss_sum += float(head.loss_from(model(**model_inputs(b))))
            count += float((b["labels"] != dt.IGNORE).sum())
    if was_training:
        model.train()
    loss_sum, count = all_sum(accelerator, [loss_sum, count])
    return loss_sum / count if count else None


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


def train(config: TrainerConfig, log: Callable[[str], None] | None = None) -> Outcome:
    # Installed first: loading a large model takes minutes, and a SIGTERM then must not kill us mid-write.
    preempt = Preemption(float(os.environ.get("KUBETUNE_GRACE_SECONDS", GRACE_SECONDS)))
    try:
        return _train(config, log or logger(), preempt)
    finally:
        preempt.restore()


def _train(config: TrainerConfig, log: Callable[[str], None], preempt: Preemption) -> Outcome:
    spec, paths = config.spec, config.paths
    t = spec.training
    plan = plan_for(config)

    # --- 1. plan and processes -----------------------------------------------------------------
    from transformers import get_scheduler, set_seed

    accelerator = make_accelerator(plan)
    device = accelerator.device
    main = accelerator.is_main_process
    if plan.sharding == "fsdp" and accelerator.num_processes > 1 and accelerator.distributed_type.value != "FSDP":
        log(f"sharding fsdp needs CUDA GPUs; these {accelerator.num_processes} processes run "
            f"{accelerator.distributed_type.value} with the whole model in each")
    if accelerator.num_processes != config.resolved.num_processes:
        log(f"running {accelerator.num_processes} processes; the operator resolved {config.resolved.num_processes}")
    set_seed(t.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    work = Path(paths.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if (bundle := st.trust_ca_for_hub(work)) is not None:
        log(f"the Hub client trusts spec.storage.caBundle beside the public roots ({bundle})")

    reporter = ProgressReporter(None)
    if main:
        parent, _, key = paths.progress_uri.rstrip("/").rpartition("/")
        try:
            reporter = ProgressReporter(st.open_location(parent, spec.storage), key, log=log,
                                        interval=float(os.environ.get("KUBETUNE_PROGRESS_INTERVAL", "10")))
        except BadConfig as e:
            log(f"progress reporting disabled: {e.message}")
    metrics = Metrics(config.metrics_port if accelerator.local_process_index == 0 else 0)
    reporter.update(state="starting")

    # --- 2. data -------------------------------------------------------------------------------
    # torchrun numbers ranks node by node, so rank 0 is on the node whose first local rank is global rank 0
    rank0_node = accelerator.process_index == accelerator.local_process_index
    weights_here = rank0_node or model_place(plan, accelerator, rank=1) != "meta"
    model_dir = _on_local_main(accelerator, lambda: resolve_model_dir(spec.model.uri, spec.storage, work, log,
                                                                      weights=weights_here))
    check_model_dir(model_dir, spec.model.uri, spec.model.trust_remote_code)
    tokenizer = load_tokenizer(model_dir, spec.model.trust_remote_code)
    ds = spec.dataset
    stats = dt.DataStats()
    files = _on_local_main(accelerator, lambda: dt.resolve_files(ds.uri, spec.storage, work, log))
    records, fmt = dt.read_records(files, ds.format, ds.on_bad_line, stats)
    train_ex = dt.tokenize_all(records, tokenizer, fmt, ds.max_seq_length, stats)
    val_ex: list[dt.Example] = []
    if ds.validation_uri:
        vstats = dt.DataStats()
        vfiles = _on_local_main(accelerator, lambda: dt.resolve_files(ds.validation_uri, spec.storage, work, log,
                                                                       split="validation"))
        vrecords, vfmt = dt.read_records(vfiles, ds.format if ds.format != "auto" else fmt, ds.on_bad_line, vstats)
        val_ex = dt.tokenize_all(vrecords, tokenizer, vfmt, ds.max_seq_length, vstats)
        stats.skipped_lines += vstats.skipped_lines
    elif ds.validation_split:
        train_ex, val_ex = dt.split_validation(train_ex, ds.validation_split, t.seed)
    if not train_ex:
        raise BadData(f"{ds.uri}: no usable training examples ({stats.lines} lines, {stats.skipped_lines} skipped, "
                      f"{stats.dropped_examples} with nothing to learn after truncation)")
    packing = ds.packing
    if packing and plan.method in ("prompt-tuning", "prefix-tuning"):
        log("dataset.packing is ignored with prompt/prefix tuning (virtual tokens need one example per sequence)")
        packing = False
    if packing:
        train_ex = dt.pack(train_ex, ds.max_seq_length)
    log_event("data", format=fmt, files=len(files), lines=stats.lines, skippedLines=stats.skipped_lines,
              truncated=stats.truncated_examples, dropped=stats.dropped_examples, train=len(train_ex),
              validation=len(val_ex), packed=packing)

    # --- 3. model, optimizer, schedule ---------------------------------------------------------
    mbs, ga = plan.micro_batch_size, plan.gradient_accumulation_steps
    sched = dt.Schedule(len(train_ex), mbs, accelerator.num_processes, accelerator.process_index, t.seed)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * sched.per_epoch / ga))
    place = model_place(plan, accelerator)
    model, base = build_model(plan, spec, model_dir, device, log, place=place)
    n_total, n_train = count_params(model)
    loaded = materialized_bytes(model)
    head = LossHead(model, base, plan.fused_cross_entropy, device)
    log_event("model", method=plan.method, params=n_total, trainable=n_train, lossHead=head.mode, lossImpl=head.impl,
              fusedKernels=base.kubetune_fused_kernels, attention=base.config._attn_implementation,
              weightDtype=str(next(base.parameters()).dtype), gradientCheckpointing=plan.gradient_checkpointing,
              totalSteps=total_steps, microBatch=mbs, gradAccum=ga, processes=accelerator.num_processes,
              sharding=plan.sharding, distributedType=accelerator.distributed_type.value, device=str(device))
    if accelerator.distributed_type.value == "FSDP" and (policy := fsdp_wrap_policy(model, plan.method)) is not None:
        accelerator.state.fsdp_plugin.auto_wrap_policy = policy
    model = accelerator.prepare(model)
    compiled = os.environ.get("KUBETUNE_COMPILE") == "1"
    log_event("load", place=place, materializedBytes=loaded, peakRssMiB=_peak_rss_mib(), compiled=compiled)
    if compiled:
        model = torch.compile(model)
    optimizer = accelerator.prepare(build_optimizer(model, plan, t, device))
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=math.ceil(t.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    adapter_model = accelerator.unwrap_model(model) if plan.method in ADAPTER_METHODS else None
    metrics.set(total_steps=total_steps)

    # --- 4. resume -----------------------------------------------------------------------------
    ckpt_loc = st.open_location(paths.checkpoints_uri, spec.storage)
    state = {"step": 0, "best_eval_loss": None, "best_step": None, "evals_without_improvement": 0,
             "base_eval_loss": None, "last_eval_loss": None, "last_eval_step": None, "tokens": 0,
             "skipped_lines": stats.skipped_lines, "stopped_early": False, "train_loss": None}
    resume_from = spec.checkpoints.resume_from
    found = _on_local_main(accelerator, lambda: _fetch_resume_point(ckpt_loc, resume_from, spec.storage, work / "resume", log))
    if found is not None:
        path, committed, uri, own = found
        if not own and committed.step > total_steps:
            raise BadConfig(f"spec.checkpoints.resumeFrom {resume_from}: {committed.name} is past this run's "
                            f"{total_steps} steps; raise spec.training.maxSteps (or epochs) above {committed.step}")
        base_lrs = list(scheduler.base_lrs)
        try:
            state.update(ck.load_local(path, model=model, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator))
        except Exception as e:
            if own:
                raise
            raise BadConfig(f"spec.checkpoints.resumeFrom {resume_from}: {committed.name} does not fit this job "
                            f"({st.short_error(e)}); it must come from a run of the same model and method") from None
        # Another run's checkpoint carries its own learning rate and schedule length; continuing it
        # with more steps or a new rate must follow this spec from the restored step on. For this
        # run's own checkpoint it is the same schedule, so this changes nothing.
        follow_schedule(scheduler, optimizer, base_lrs)
        # its disk (a whole checkpoint for full fine-tuning) is the run's from here on, once every
        # local rank has read its part
        accelerator.wait_for_everyone()
        if accelerator.is_local_main_process:
            shutil.rmtree(work / "resume", ignore_errors=True)
        reporter.resumed(state["step"])
        if own:  # another run's checkpoint is not this run's newest
            reporter.checkpoint(uri, committed.step, len(ck.list_committed(ckpt_loc)) if main else 0)
        log_event("resumed", step=state["step"], checkpoint=uri)

    uploader = None
    if main:
        def on_commit(uri, step, count):
            reporter.checkpoint(uri, step, count)
            if step is not None:
                metrics.set(checkpoint_step=step)

        uploader = ck.Uploader(ckpt_loc, spec.checkpoints.keep, log=log, on_commit=on_commit,
                               on_failure=lambda m: metrics.inc("upload_failures"),
                               on_drop=lambda s: metrics.inc("checkpoints_superseded"),
                               max_backoff=float(os.environ.get("KUBETUNE_UPLOAD_MAX_BACKOFF", "30")))

    def save(step: int, eval_loss: float | None, first: bool = False) -> None:
        d = ck.save_local(work / "checkpoints" / ck.ckpt_name(step), model=model, optimizer=optimizer,
                          scheduler=scheduler, loop_state=dict(state), accelerator=accelerator,
                          adapter_model=adapter_model)
        if uploader is not None and d is not None:
            superseded = uploader.submit(d, step, eval_loss, first=first)
            log_event("checkpoint", step=step, local=str(d), pending=uploader.pending, superseded=superseded)

    def scheduled_eval(step: int) -> float:
        """The eval every training.evalSteps, with best tracking and early stopping."""
        reporter.update(state="evaluating")
        eval_loss = evaluate(model, head, val_ex, mbs, accelerator, pad_id, stopping)
        state["last_eval_loss"], state["last_eval_step"] = eval_loss, step
        best = state["best_eval_loss"]
        es = t.early_stopping
        min_delta = es.min_delta if es else 0.0
        if best is None or eval_loss < best - min_delta:
            state["best_eval_loss"], state["best_step"], state["evals_without_improvement"] = eval_loss, step, 0
        else:
            state["evals_without_improvement"] += 1
            if es and state["evals_without_improvement"] >= es.patience:
                state["stopped_early"] = True
        log_event("eval", step=step, evalLoss=eval_loss, bestEvalLoss=state["best_eval_loss"],
                  evalsWithoutImprovement=state["evals_without_improvement"])
        reporter.update(state="training", eval_loss=eval_loss)
        metrics.set(eval_loss=eval_loss)
        return eval_loss

    def stopping() -> bool:
        return preempt.requested

    def eval_stopped(step: int) -> Outcome:
        """SIGTERM during the eval of a step: save that step (once) and let the resumed run evaluate it."""
        state["pending_eval"] = True
        if last_saved != step:
            save(step, None, first=True)
        return preempted(step)

    def preempted(step: int, saved: bool = True) -> Outcome:
        """Wait for the checkpoint uploads while the grace period lasts, then report Preempted."""
        committed = True
        if uploader is not None:
            # older uploads use what is left of the grace period; what matters is this step's
            committed = uploader.drain(preempt.time_left()) or step in uploader.committed
            uploader.close()
        if not saved:
            what = "no new step to save; the next pod resumes from the newest committed checkpoint"
        elif uploader is None:
            what = "rank 0 saves the checkpoint"
        elif committed:
            what = f"checkpoint {ck.ckpt_name(step)} committed; the next pod resumes from it"
        else:
            what = ("its checkpoint upload did not finish within the grace period; the next pod resumes from the "
                    "newest committed checkpoint")
        msg = f"stopped by SIGTERM at step {step}/{total_steps}: {what}"
        preempt.acknowledge()  # after the save and the drain, by which time this rank has its own signal too
        log(msg)
        reporter.update(state="preempted", message=msg, step=step)
        reporter.close()
        return Outcome("Preempted", step, ResultStatus(), msg, losses, step_times, step_tokens)

    # --- 5. train ------------------------------------------------------------------------------
    model.train()
    reporter.update(state="training", total_steps=total_steps, step=state["step"])
    pad_id = tokenizer.pad_token_id
    window_tokens, window_start = 0, time.perf_counter()
    run_start, run_start_step = time.perf_counter(), state["step"]
    last_saved = state["step"] if found is not None else None
    losses: list[tuple[int, float]] = []
    debug_sleep = float(os.environ.get("KUBETUNE_DEBUG_STEP_SLEEP", "0"))
    step_times: list[float] = []
    step_tokens: list[int] = []
    if all_sum(accelerator, [float(preempt.requested)])[0]:  # stopped while loading: nothing new to save
        return preempted(state["step"], saved=False)
    try:
        if found is None:
            reporter.update(state="evaluating")
            state["base_eval_loss"] = evaluate(model, head, val_ex, mbs, accelerator, pad_id, stopping)
            if state["base_eval_loss"] is not None:
                log_event("eval", step=0, baseEvalLoss=state["base_eval_loss"])
            reporter.update(state="training")
        if state.pop("pending_eval", False):  # preempted at a step whose eval was due
            scheduled_eval(state["step"])
    except EvalStopped:
        if found is None:  # nothing trained yet: the next pod starts over
            return preempted(0, saved=False)
        return eval_stopped(state["step"])
    while state["step"] < total_steps and not state["stopped_early"]:
        t_step = time.perf_counter()
        step = state["step"]
        micro = [dt.collate(sched.batch(step * ga + k, train_ex), pad_id,
                            pad_to=ds.max_seq_length if packing else None) for k in range(ga)]
        n_labels = sum(int((b["labels"] != dt.IGNORE).sum()) for b in micro)
        (global_labels,) = all_sum(accelerator, [n_labels])
        scale = accelerator.num_processes / max(1.0, global_labels)
        loss_sum, n_tokens = 0.0, 0
        for k, b in enumerate(micro):
            b = to_device(b, device)
            sync = k == ga - 1
            ctx = accelerator.no_sync(model) if not sync and accelerator.num_processes > 1 else _null()
            with ctx:
                with head.computing_loss(b["labels"]):
                    loss = head.loss_from(model(**model_inputs(b)))
                accelerator.backward(loss * scale)
            loss_sum += float(loss.detach())
            n_tokens += b["num_tokens"]
        grad_norm = None
        if t.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if debug_sleep:  # tests: stretch a tiny run so it can be killed, stopped or outlive an outage
            time.sleep(debug_sleep)
        # One collective per step also carries the stop request, so every rank stops at the same step.
        g_loss, g_tokens, g_stop = all_sum(accelerator, [loss_sum, n_tokens, float(preempt.requested)])
        stop = g_stop > 0
        step_times.append(time.perf_counter() - t_step)
        step_tokens.append(int(g_tokens))
        step_loss = g_loss / max(1.0, global_labels)
        state["step"] = step = step + 1
        state["tokens"] += int(g_tokens)
        state["train_loss"] = step_loss
        losses.append((step, step_loss))
        window_tokens += g_tokens
        metrics.inc("tokens", g_tokens)

        if step % t.logging_steps == 0 or step == total_steps:
            now = time.perf_counter()
            tps = window_tokens / max(1e-9, now - window_start)
            window_tokens, window_start = 0, now
            done = step - run_start_step
            eta = int((now - run_start) / done * (total_steps - step)) if done else None
            epoch = sched.epoch_of(step * ga)
            lr = scheduler.get_last_lr()[0]
            scale = {"lossScale": accelerator.scaler.get_scale()} if accelerator.scaler is not None else {}
            log_event("step", step=step, totalSteps=total_steps, loss=step_loss, lr=lr, epoch=round(epoch, 4),
                      tokensPerSecond=round(tps, 1), gradNorm=float(grad_norm) if grad_norm is not None else None, **scale)
            reporter.update(step=step, loss=step_loss, epoch=round(epoch, 4), tokens_per_second=round(tps, 1), eta_seconds=eta)
            mem = peak_device_memory() if device.type == "cuda" else None
            if mem is not None:
                reporter.update(peak_gpu_memory_bytes=mem)
            metrics.set(step=step, loss=step_loss, epoch=epoch, tokens_per_second=tps, learning_rate=lr, gpu_memory_peak=mem)

        eval_due = bool(t.eval_steps and step % t.eval_steps == 0 and val_ex)
        if stop:
            # Out of time: save now; the resumed run does this step's eval first (exactly as here).
            state["pending_eval"] = eval_due
            save(step, None, first=True)  # the next pod resumes from it: ahead of any older upload
            return preempted(step)
        try:
            eval_loss = scheduled_eval(step) if eval_due else None
        except EvalStopped:
            return eval_stopped(step)

        if step % spec.checkpoints.save_steps == 0 or state["stopped_early"]:
            save(step, eval_loss)
            last_saved = step

    # --- 6. finish -----------------------------------------------------------------------------
    step = state["step"]
    if os.environ.get("KUBETUNE_SKIP_OUTPUTS") == "1":  # benchmarks: no final checkpoint, eval or outputs
        if uploader is not None:
            uploader.drain(600)
            uploader.close()
        reporter.close()
        return Outcome("Completed", step, ResultStatus(metrics={"trainLoss": state["train_loss"] or 0.0}),
                       "benchmark run: outputs skipped", losses, step_times, step_tokens)
    if last_saved != step:
        save(step, state["last_eval_loss"] if state["last_eval_step"] == step else None)
    reporter.update(state="evaluating")
    try:
        tuned = (state["last_eval_loss"] if state["last_eval_step"] == step
                 else evaluate(model, head, val_ex, mbs, accelerator, pad_id, stopping))
    except EvalStopped:  # the last step is saved: the next pod only evaluates and writes the outputs
        return preempted(step)
    result = ResultStatus()
    m = result.metrics
    if state["train_loss"] is not None:
        m["trainLoss"] = state["train_loss"]
    if tuned is not None:
        m["evalLoss"] = tuned
        m["perplexity"] = _ppl(tuned)
    if state["base_eval_loss"] is not None:
        m["baseEvalLoss"] = state["base_eval_loss"]
        m["basePerplexity"] = _ppl(state["base_eval_loss"])
    if state["best_eval_loss"] is not None:
        m["bestEvalLoss"] = state["best_eval_loss"]
        m["bestStep"] = float(state["best_step"])
    m["skippedLines"] = float(stats.skipped_lines)
    m["steps"] = float(step)
    m["tokens"] = float(state["tokens"])
    log_event("eval", step=step, evalLoss=tuned, final=True)

    reporter.update(state="uploading")
    head.restore()
    out_loc = st.open_location(paths.output_uri, spec.storage)
    _write_outputs(plan, spec, model, accelerator, tokenizer, model_dir, work, out_loc, result, log)
    if head.mode == "fused":
        head.head.forward = head._fused_forward

    if uploader is not None:
        timeout = float(os.environ.get("KUBETUNE_FINAL_UPLOAD_TIMEOUT", "1800"))
        if not uploader.drain(timeout):
            log(f"{uploader.pending} checkpoint upload(s) still pending after {timeout:.0f}s; the outputs are uploaded")
        uploader.close()
    reason = "EarlyStopped" if state["stopped_early"] else "Completed"
    reporter.update(state="finished", step=step, eval_loss=tuned)
    reporter.close()
    msg = (f"stopped early at step {step}/{total_steps}: no eval-loss improvement in {t.early_stopping.patience} evaluations"
           if state["stopped_early"] else f"trained {step} steps")
    return Outcome(reason, step, result, msg, losses, step_times, step_tokens)


def peak_device_memory() -> int:
    """CUDA context + the allocator's peak reservation (what has to fit on the GPU)."""
    free, total = torch.cuda.mem_get_info()
    context_and_other = max(0, (total - free) - torch.cuda.memory_reserved())
    return int(torch.cuda.max_memory_reserved() + context_and_other)


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def _write_outputs(plan, spec, model, accelerator, tokenizer, model_dir, work, out_loc, result, log) -> None:
    """The adapter (or the full model) to <output>/adapter (/model), the merged model to <output>/merged."""

    full = plan.method not in ADAPTER_METHODS
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
    if spec.output.merge_adapter and plan.method in ("lora", "qlora"):
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


def _fetch_resume_point(own, resume_from: str | None, storage, dest, log):
    """(path, committed, its URI, whether it is this run's): the newest committed checkpoint of this
    run, else the one checkpoints.resumeFrom names. None: a fresh start."""
    found = _fetch(own, dest, log, ck.fetch_latest)
    if found is not None:
        return (*found, f"{own.uri.rstrip('/')}/{found[1].name}", True)
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


def _peak_rss_mib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # KiB on Linux


def _on_local_main(accelerator, fn):
    """Run fn on each node's first process (downloads), then on the others (now a cache hit)."""
    if accelerator.num_processes == 1:
        return fn()
    with accelerator.local_main_process_first():
        return fn()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
