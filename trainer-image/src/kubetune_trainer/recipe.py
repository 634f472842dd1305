"""The fine-tuning recipe, top to bottom (as torchtune's recipes and nanoGPT's train.py read).

    setup        the TrainingPlan (the estimator's contract), the objective, an Accelerator, reporters
    setup_data   the base model's files and tokenizer; records -> the objective's examples; validation; packing
    setup_model  the model with its method applied, the loss head, the objective's reference
                 (objective.prepare, before wrapping), optimizer and schedule
    objective.precompute_reference   reference log-probs once, from the base weights (before resume)
    resume       the newest committed checkpoint: weights, optimizer, schedule, RNG, RunState
    train        train_step after train_step; evaluate every evalSteps; save every saveSteps;
                 a SIGTERM stops at the end of a step with a checkpoint (preempted)
    finish       final eval, the result's metrics, the adapter (and merged model) to the output URI

What a checkpoint carries of the loop is RunState; this attempt's own record (losses, step times,
throughput window) is Attempt. Every environment knob arrives in ``knobs`` (knobs.Knobs).
"""
from __future__ import annotations

import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from kubetune.api import registry
from kubetune.api.v1alpha1 import EvaluationResult, ResultStatus, TrainerConfig
from kubetune_trainer import checkpoint as ck
from kubetune_trainer import data as dt
from kubetune_trainer import objectives
from kubetune_trainer import storage as st
from kubetune_trainer.config import plan_for
from kubetune_trainer.errors import BadConfig, BadData
from kubetune_trainer.evaluation import EndOfRunEvaluation
from kubetune_trainer.knobs import Knobs
from kubetune_trainer.loop import (EvalStopped, Outcome, Preemption, all_sum, build_optimizer,
                                   check_precision_fits_gpu, eval_pass, fetch_resume_point, follow_schedule,
                                   fsdp_wrap_policy, make_accelerator, model_place, on_local_main,
                                   peak_device_memory, peak_rss_mib, ppl, to_device, write_outputs)
from kubetune_trainer.model import (LossHead, build_model, check_model_dir, count_params, load_tokenizer,
                                    materialized_bytes, resolve_model_dir)
from kubetune_trainer.progress import Metrics, ProgressReporter, log_event


@dataclass
class RunState:
    """The loop's state that a checkpoint saves (state.pt's "loop", trainer_state.json). The field
    names and their order are that JSON's keys: an older checkpoint must still resume."""

    step: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    base_eval_loss: float | None = None
    last_eval_loss: float | None = None
    last_eval_step: int | None = None
    tokens: int = 0
    skipped_lines: int = 0
    stopped_early: bool = False
    train_loss: float | None = None
    # Set only when a preemption saves (whether that step's eval is still due); absent from other checkpoints.
    pending_eval: bool | None = None
    # The objective's eval metrics (reward accuracy, ...) of the base model and of the newest eval:
    # the result's A/B needs both, and a resumed pod does not evaluate the base again.
    base_eval_metrics: dict | None = None
    last_eval_metrics: dict | None = None
    # The base model's end-of-run evaluation ({"metrics", "answers"}), taken before the first step
    base_evaluation: dict | None = None

    def to_checkpoint(self) -> dict:
        d = asdict(self)
        for key in ("pending_eval", "base_eval_metrics", "last_eval_metrics", "base_evaluation"):  # as they were
            if d[key] is None:
                del d[key]
        return d

    def restore(self, saved: dict) -> None:
        """Take a checkpoint's values; a key it lacks keeps this state's."""
        for f in fields(self):
            if f.name in saved:
                setattr(self, f.name, saved[f.name])


@dataclass
class Attempt:
    """This pod's own record: what its Outcome reports, and the throughput window between step logs."""

    start_step: int
    last_saved: int | None
    started: float = field(default_factory=time.perf_counter)
    window_start: float = field(default_factory=time.perf_counter)
    window_tokens: float = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)


def objective_name(spec) -> str:
    # spec.objective arrives with the preference objectives; a spec without it is SFT
    return getattr(getattr(spec, "objective", None), "type", None) or "sft"


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """rewardAccuracy -> evalRewardAccuracy: an eval event's names, beside its evalLoss."""
    return {prefix + k[:1].upper() + k[1:]: v for k, v in metrics.items()}


class FineTuneRecipe:
    def __init__(self, config: TrainerConfig, log: Callable[[str], None], preempt: Preemption, knobs: Knobs):
        self.config, self.spec, self.paths = config, config.spec, config.paths
        self.log, self.preempt, self.knobs = log, preempt, knobs

    def run(self) -> Outcome:
        self.setup()
        self.setup_data()
        self.setup_model()
        # before resume: a reference precomputed now comes from the base weights, not a checkpoint's
        self.objective.precompute_reference(self.model, self.head, self.accelerator, self.pad_id,
                                            self.train_ex, self.val_ex)
        self.resume()
        return self.train()

    # --- 1. plan and processes ------------------------------------------------------------------
    def setup(self) -> None:
        from transformers import set_seed

        config, t, log = self.config, self.spec.training, self.log
        self.plan = plan_for(config)
        self.method = registry.method(self.plan.method)
        try:
            self.objective = objectives.get(objective_name(self.spec))(self.spec, self.plan, log)
        except registry.UnknownName as e:
            raise BadConfig(str(e)) from None
        check_precision_fits_gpu(t.precision)
        acc = self.accelerator = make_accelerator(self.plan, self.knobs)
        self.device, self.main = acc.device, acc.is_main_process
        if self.plan.sharding == "fsdp" and acc.num_processes > 1 and acc.distributed_type.value != "FSDP":
            log(f"sharding fsdp needs CUDA GPUs; these {acc.num_processes} processes run "
                f"{acc.distributed_type.value} with the whole model in each")
        if acc.num_processes != config.resolved.num_processes:
            log(f"running {acc.num_processes} processes; the operator resolved {config.resolved.num_processes}")
        set_seed(t.seed)
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.work = Path(self.paths.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        if (bundle := st.trust_ca_for_hub(self.work)) is not None:
            log(f"the Hub client trusts spec.storage.caBundle beside the public roots ({bundle})")
        self.reporter = self._progress_reporter()
        self.metrics = Metrics(config.metrics_port if acc.local_process_index == 0 else 0)
        self.reporter.update(state="starting")

    def _progress_reporter(self) -> ProgressReporter:
        if not self.main:
            return ProgressReporter(None)
        parent, _, key = self.paths.progress_uri.rstrip("/").rpartition("/")
        try:
            return ProgressReporter(st.open_location(parent, self.spec.storage), key, log=self.log,
                                    interval=self.knobs.progress_interval, job_uid=self.config.job.uid)
        except BadConfig as e:
            self.log(f"progress reporting disabled: {e.message}")
            return ProgressReporter(None)

    # --- 2. data --------------------------------------------------------------------------------
    def setup_data(self) -> None:
        spec, ds, acc, log = self.spec, self.spec.dataset, self.accelerator, self.log
        self._fetch_model()
        self.stats = dt.DataStats()
        files = on_local_main(acc, lambda: dt.resolve_files(ds.uri, spec.storage, self.work, log))
        records, fmt = dt.read_records(files, ds.format, ds.on_bad_line, self.stats, formats=self.objective.formats())
        train_ex = self.objective.examples(records, fmt, self.tokenizer, ds.max_seq_length, self.stats)
        val_ex = self._held_out_examples(ds.validation_uri, "validation", fmt) if ds.validation_uri else []
        test_ex = self._held_out_examples(ds.test_uri, "test", fmt) if ds.test_uri else []
        if ds.validation_split or ds.test_split:  # one seeded shuffle: no example in two splits
            train_ex, split_val, split_test = dt.split_holdout(train_ex, ds.validation_split, ds.test_split,
                                                               spec.training.seed)
            val_ex, test_ex = val_ex or split_val, test_ex or split_test
        if not train_ex:
            s = self.stats
            raise BadData(f"{ds.uri}: no usable training examples ({s.lines} lines, {s.skipped_lines} skipped, "
                          f"{s.dropped_examples} with nothing to learn after truncation)")
        self.packing = self._packing()
        if self.packing:
            train_ex = dt.pack(train_ex, ds.max_seq_length)
        self.train_ex, self.val_ex = train_ex, val_ex
        self.pad_id = self.tokenizer.pad_token_id
        self.pad_to = ds.max_seq_length if self.packing else None
        log_event("data", format=fmt, files=len(files), lines=self.stats.lines, skippedLines=self.stats.skipped_lines,
                  truncated=self.stats.truncated_examples, dropped=self.stats.dropped_examples, train=len(train_ex),
                  validation=len(val_ex), test=len(test_ex), packed=self.packing)
        ev = spec.evaluation
        prompt_files = on_local_main(acc, lambda: dt.resolve_files(ev.prompts_uri, spec.storage, self.work, log,
                                                                   split="test")) if ev and ev.prompts_uri else []
        self.evaluation = EndOfRunEvaluation.build(spec, self.tokenizer, fmt, test_ex, prompt_files, log)

    def _fetch_model(self) -> None:
        """The base model's files (before the data: the tokenizer is the data's too)."""
        spec, acc = self.spec, self.accelerator
        # torchrun numbers ranks node by node, so rank 0 is on the node whose first local rank is global rank 0
        rank0_node = acc.process_index == acc.local_process_index
        weights_here = rank0_node or model_place(self.plan, acc, rank=1, knobs=self.knobs) != "meta"
        self.model_dir = on_local_main(acc, lambda: resolve_model_dir(spec.model.uri, spec.storage, self.work, self.log,
                                                                      weights=weights_here))
        check_model_dir(self.model_dir, spec.model.uri, spec.model.trust_remote_code)
        self.tokenizer = load_tokenizer(self.model_dir, spec.model.trust_remote_code)

    def _held_out_examples(self, uri: str, split: str, train_fmt: str) -> list:
        """validationUri's or testUri's examples, in the training data's format unless it is set."""
        ds = self.spec.dataset
        vstats = dt.DataStats()
        vfiles = on_local_main(self.accelerator, lambda: dt.resolve_files(uri, self.spec.storage, self.work, self.log,
                                                                           split=split))
        vrecords, vfmt = dt.read_records(vfiles, ds.format if ds.format != "auto" else train_fmt, ds.on_bad_line, vstats,
                                         formats=self.objective.formats())
        self.stats.skipped_lines += vstats.skipped_lines
        return self.objective.examples(vrecords, vfmt, self.tokenizer, ds.max_seq_length, vstats)

    def _packing(self) -> bool:
        if not self.spec.dataset.packing:
            return False
        if self.method.settings == "virtualTokens":
            self.log("dataset.packing is ignored with prompt/prefix tuning (virtual tokens need one example per sequence)")
            return False
        if not self.objective.packing:
            self.log(f"dataset.packing is ignored with objective {self.objective.name} (one example per sequence)")
            return False
        return True

    # --- 3. model, optimizer, schedule ----------------------------------------------------------
    def setup_model(self) -> None:
        from transformers import get_scheduler

        plan, spec, t, acc, knobs = self.plan, self.spec, self.spec.training, self.accelerator, self.knobs
        self.mbs, self.ga = plan.micro_batch_size, plan.gradient_accumulation_steps
        self.sched = dt.Schedule(len(self.train_ex), self.mbs, acc.num_processes, acc.process_index, t.seed)
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * self.sched.per_epoch / self.ga))
        place = model_place(plan, acc, knobs=knobs)
        model, base = build_model(plan, spec, self.model_dir, self.device, self.log, place=place)
        n_total, n_train = count_params(model)
        loaded = materialized_bytes(model)
        head = self.head = LossHead(model, base, plan.fused_cross_entropy, self.device, impl=knobs.fused_ce_impl)
        log_event("model", method=plan.method, params=n_total, trainable=n_train, lossHead=head.mode, lossImpl=head.impl,
                  fusedKernels=base.kubetune_fused_kernels, attention=base.config._attn_implementation,
                  weightDtype=str(next(base.parameters()).dtype), gradientCheckpointing=plan.gradient_checkpointing,
                  totalSteps=self.total_steps, microBatch=self.mbs, gradAccum=self.ga, processes=acc.num_processes,
                  sharding=plan.sharding, distributedType=acc.distributed_type.value, device=str(self.device))
        if acc.distributed_type.value == "FSDP" and (policy := fsdp_wrap_policy(model, plan.method)) is not None:
            acc.state.fsdp_plugin.auto_wrap_policy = policy
        # the objective's reference (a frozen copy, or the base under disabled adapters) from the plain model
        self.objective.prepare(model, head, acc)
        model = acc.prepare(model)
        log_event("load", place=place, materializedBytes=loaded, peakRssMiB=peak_rss_mib(), compiled=knobs.compile)
        if knobs.compile:
            model = torch.compile(model)
        self.model = model
        self.optimizer = acc.prepare(build_optimizer(model, plan, t, self.device, knobs))
        self.scheduler = get_scheduler(t.scheduler, self.optimizer, num_training_steps=self.total_steps,
                                       num_warmup_steps=math.ceil(t.warmup_ratio * self.total_steps))
        self.adapter_model = acc.unwrap_model(model) if self.method.adapter else None
        self.metrics.set(total_steps=self.total_steps)

    # --- 4. resume ------------------------------------------------------------------------------
    def resume(self) -> None:
        """From the newest committed checkpoint of this run, else spec.checkpoints.resumeFrom's; with
        neither, a fresh start at step 0. Then the background uploader for this run's checkpoints."""
        spec = self.spec
        self.ckpt_loc = st.open_location(self.paths.checkpoints_uri, spec.storage)
        self.state = RunState(skipped_lines=self.stats.skipped_lines)
        found = on_local_main(self.accelerator, lambda: fetch_resume_point(
            self.ckpt_loc, spec.checkpoints.resume_from, spec.storage, self.work / "resume", self.log,
            uid=self.config.job.uid))
        self.resumed = found is not None
        if found is not None:
            self._load_checkpoint(*found)
        self.uploader = self._uploader() if self.main else None

    def _load_checkpoint(self, path: Path, committed, uri: str, own: bool) -> None:
        acc, resume_from = self.accelerator, self.spec.checkpoints.resume_from
        if not own and committed.step > self.total_steps:
            raise BadConfig(f"spec.checkpoints.resumeFrom {resume_from}: {committed.name} is past this run's "
                            f"{self.total_steps} steps; raise spec.training.maxSteps (or epochs) above {committed.step}")
        base_lrs = list(self.scheduler.base_lrs)
        try:
            self.state.restore(ck.load_local(path, model=self.model, optimizer=self.optimizer,
                                             scheduler=self.scheduler, accelerator=acc))
        except Exception as e:
            if own:
                raise
            raise BadConfig(f"spec.checkpoints.resumeFrom {resume_from}: {committed.name} does not fit this job "
                            f"({st.short_error(e)}); it must come from a run of the same model and method") from None
        # Another run's checkpoint carries its own learning rate and schedule length; continuing it
        # with more steps or a new rate must follow this spec from the restored step on. For this
        # run's own checkpoint it is the same schedule, so this changes nothing.
        follow_schedule(self.scheduler, self.optimizer, base_lrs)
        # its disk (a whole checkpoint for full fine-tuning) is the run's from here on, once every
        # local rank has read its part
        acc.wait_for_everyone()
        if acc.is_local_main_process:
            shutil.rmtree(self.work / "resume", ignore_errors=True)
        self.reporter.resumed(self.state.step)
        if own:  # another run's checkpoint is not this run's newest
            self.reporter.checkpoint(uri, committed.step, len(ck.list_committed(self.ckpt_loc)) if self.main else 0)
        log_event("resumed", step=self.state.step, checkpoint=uri)

    def _uploader(self) -> ck.Uploader:
        def on_commit(uri, step, count):
            self.reporter.checkpoint(uri, step, count)
            if step is not None:
                self.metrics.set(checkpoint_step=step)

        return ck.Uploader(self.ckpt_loc, self.spec.checkpoints.keep, log=self.log, on_commit=on_commit,
                           on_failure=lambda m: self.metrics.inc("upload_failures"),
                           on_drop=lambda s: self.metrics.inc("checkpoints_superseded"),
                           max_backoff=self.knobs.upload_max_backoff, owner=self.config.job.uid)

    # --- 5. train -------------------------------------------------------------------------------
    def train(self) -> Outcome:
        s, t = self.state, self.spec.training
        self.model.train()
        self.reporter.update(state="training", total_steps=self.total_steps, step=s.step)
        self.attempt = Attempt(start_step=s.step, last_saved=s.step if self.resumed else None)
        if all_sum(self.accelerator, [float(self.preempt.requested)])[0]:  # stopped while loading: nothing new to save
            return self.preempted(s.step, saved=False)
        if (stopped := self.evaluate_base()) is not None:
            return stopped
        while s.step < self.total_steps and not s.stopped_early:
            stop = self.train_step()
            eval_due = bool(t.eval_steps and s.step % t.eval_steps == 0 and self.val_ex)
            if stop:
                # Out of time: save now; the resumed run does this step's eval first (exactly as here).
                s.pending_eval = eval_due
                self.save(s.step, None, first=True)  # the next pod resumes from it: ahead of any older upload
                return self.preempted(s.step)
            try:
                eval_loss = self.evaluate(s.step) if eval_due else None
            except EvalStopped:
                return self.eval_stopped(s.step)
            if s.step % self.spec.checkpoints.save_steps == 0 or s.stopped_early:
                self.save(s.step, eval_loss)
        return self.finish()

    def train_step(self) -> bool:
        """One optimizer step over the gradient-accumulation micro batches. The objective's loss is a
        sum over ``count`` units; each backward is scaled by processes / the global count, so DDP's
        gradient average makes it the mean. Returns whether any rank was asked to stop."""
        s, a, acc, objective = self.state, self.attempt, self.accelerator, self.objective
        t_step = time.perf_counter()
        micro = [objective.collate(self.sched.batch(s.step * self.ga + k, self.train_ex), self.pad_id, pad_to=self.pad_to)
                 for k in range(self.ga)]
        (global_count,) = all_sum(acc, [sum(b["count"] for b in micro)])
        scale = acc.num_processes / max(1.0, global_count)
        names = objective.metric_names()
        loss_sum, n_tokens, metric_sums = 0.0, 0, [0.0] * len(names)
        for k, b in enumerate(micro):
            b = to_device(b, self.device)
            last = k == self.ga - 1
            with acc.no_sync(self.model) if not last and acc.num_processes > 1 else nullcontext():
                loss, metrics = objective.loss(self.model, self.head, b)
                acc.backward(loss * scale)
            loss_sum += float(loss.detach())
            n_tokens += b["num_tokens"]
            for j, name in enumerate(names):
                metric_sums[j] += float(metrics[name].detach())
        grad_norm = self._optimizer_step()
        # One collective per step also carries the stop request, so every rank stops at the same step.
        g_loss, g_tokens, g_stop, *g_metrics = all_sum(acc, [loss_sum, n_tokens, float(self.preempt.requested), *metric_sums])
        a.step_times.append(time.perf_counter() - t_step)
        a.step_tokens.append(int(g_tokens))
        s.step += 1
        s.tokens += int(g_tokens)
        s.train_loss = g_loss / max(1.0, global_count)
        a.losses.append((s.step, s.train_loss))
        a.window_tokens += g_tokens
        self.metrics.inc("tokens", g_tokens)
        if s.step % self.spec.training.logging_steps == 0 or s.step == self.total_steps:
            self.log_step(grad_norm, {k: v / max(1.0, global_count) for k, v in zip(names, g_metrics)})
        return g_stop > 0

    def _optimizer_step(self):
        t = self.spec.training
        grad_norm = None
        if t.max_grad_norm > 0:
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), t.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.knobs.debug_step_sleep:  # tests: stretch a tiny run so it can be killed, stopped or outlive an outage
            time.sleep(self.knobs.debug_step_sleep)
        return grad_norm

    def log_step(self, grad_norm, metrics: dict[str, float]) -> None:
        s, a, acc, step = self.state, self.attempt, self.accelerator, self.state.step
        now = time.perf_counter()
        tps = a.window_tokens / max(1e-9, now - a.window_start)
        a.window_tokens, a.window_start = 0, now
        done = step - a.start_step
        eta = int((now - a.started) / done * (self.total_steps - step)) if done else None
        epoch = self.sched.epoch_of(step * self.ga)
        lr = self.scheduler.get_last_lr()[0]
        scale = {"lossScale": acc.scaler.get_scale()} if acc.scaler is not None else {}
        log_event("step", step=step, totalSteps=self.total_steps, loss=s.train_loss, lr=lr, epoch=round(epoch, 4),
                  tokensPerSecond=round(tps, 1), gradNorm=float(grad_norm) if grad_norm is not None else None,
                  **scale, **metrics)
        self.reporter.update(step=step, loss=s.train_loss, epoch=round(epoch, 4), tokens_per_second=round(tps, 1),
                             eta_seconds=eta)
        mem = peak_device_memory() if self.device.type == "cuda" else None
        if mem is not None:
            self.reporter.update(peak_gpu_memory_bytes=mem)
        self.metrics.set(step=step, loss=s.train_loss, epoch=epoch, tokens_per_second=tps, learning_rate=lr,
                         gpu_memory_peak=mem)
        if metrics:
            self.reporter.objective_metrics(metrics)
            self.metrics.objective(metrics)

    # --- evaluation -----------------------------------------------------------------------------
    def eval_pass(self) -> tuple[float | None, dict[str, float]]:
        return eval_pass(self.model, self.head, self.objective, self.val_ex, self.mbs, self.accelerator, self.pad_id,
                         stop=lambda: self.preempt.requested, sleep=self.knobs.debug_eval_sleep)

    def evaluate_base(self) -> Outcome | None:
        """A fresh run evaluates the base model (the result's baseline); a resumed one first does the
        eval its preempted step still owed. None: go on training."""
        s = self.state
        try:
            if not self.resumed:
                self.reporter.update(state="evaluating")
                s.base_eval_loss, metrics = self.eval_pass()
                s.base_eval_metrics = metrics or None
                if s.base_eval_loss is not None:
                    log_event("eval", step=0, baseEvalLoss=s.base_eval_loss, **_prefixed("base", metrics))
                if self.evaluation is not None:  # the test set's baseline (adapters disabled), before any step
                    s.base_evaluation = self.evaluation.run(self.model, self.head, self.tokenizer, self.accelerator,
                                                            self.device, stop=self._evaluation_stop, base=True)
                    log_event("evaluation", model="base", **s.base_evaluation["metrics"])
                self.reporter.update(state="training")
            pending, s.pending_eval = s.pending_eval, None
            if pending:
                self.evaluate(s.step)
        except EvalStopped:
            if not self.resumed:  # nothing trained yet: the next pod starts over
                return self.preempted(0, saved=False)
            return self.eval_stopped(s.step)
        return None

    def _evaluation_stop(self) -> bool:
        """The end-of-run evaluation's question before each item: has a SIGTERM come? (KUBETUNE_DEBUG_EVAL_SLEEP
        slows each item, so tests can interrupt it.)"""
        if self.knobs.debug_eval_sleep:
            time.sleep(self.knobs.debug_eval_sleep)
        return self.preempt.requested

    def evaluate(self, step: int) -> float:
        """The eval every training.evalSteps, with best tracking and early stopping."""
        s, es = self.state, self.spec.training.early_stopping
        self.reporter.update(state="evaluating")
        eval_loss, metrics = self.eval_pass()
        s.last_eval_loss, s.last_eval_step, s.last_eval_metrics = eval_loss, step, metrics or None
        min_delta = es.min_delta if es else 0.0
        if s.best_eval_loss is None or eval_loss < s.best_eval_loss - min_delta:
            s.best_eval_loss, s.best_step, s.evals_without_improvement = eval_loss, step, 0
        else:
            s.evals_without_improvement += 1
            if es and s.evals_without_improvement >= es.patience:
                s.stopped_early = True
        log_event("eval", step=step, evalLoss=eval_loss, bestEvalLoss=s.best_eval_loss,
                  evalsWithoutImprovement=s.evals_without_improvement, **_prefixed("eval", metrics))
        self.reporter.update(state="training", eval_loss=eval_loss)
        self.metrics.set(eval_loss=eval_loss)
        return eval_loss

    # --- checkpoints and stopping ---------------------------------------------------------------
    def save(self, step: int, eval_loss: float | None, first: bool = False) -> None:
        d = ck.save_local(self.work / "checkpoints" / ck.ckpt_name(step), model=self.model, optimizer=self.optimizer,
                          scheduler=self.scheduler, loop_state=self.state.to_checkpoint(), accelerator=self.accelerator,
                          adapter_model=self.adapter_model)
        self.attempt.last_saved = step
        if self.uploader is not None and d is not None:
            superseded = self.uploader.submit(d, step, eval_loss, first=first)
            log_event("checkpoint", step=step, local=str(d), pending=self.uploader.pending, superseded=superseded)

    def eval_stopped(self, step: int) -> Outcome:
        """SIGTERM during the eval of a step: save that step (once) and let the resumed run evaluate it."""
        self.state.pending_eval = True
        if self.attempt.last_saved != step:
            self.save(step, None, first=True)
        return self.preempted(step)

    def preempted(self, step: int, saved: bool = True) -> Outcome:
        """Wait for the checkpoint uploads while the grace period lasts, then report Preempted."""
        committed, uploader = True, self.uploader
        if uploader is not None:
            # older uploads use what is left of the grace period; what matters is this step's
            committed = uploader.drain(self.preempt.time_left()) or step in uploader.committed
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
        msg = f"stopped by SIGTERM at step {step}/{self.total_steps}: {what}"
        self.preempt.acknowledge()  # after the save and the drain, by which time this rank has its own signal too
        self.log(msg)
        self.reporter.update(state="preempted", message=msg, step=step)
        self.reporter.close()
        return self._outcome("Preempted", step, ResultStatus(), msg)

    def _outcome(self, reason: str, step: int, result: ResultStatus, message: str) -> Outcome:
        a = self.attempt
        return Outcome(reason, step, result, message, a.losses, a.step_times, a.step_tokens)

    # --- 6. finish ------------------------------------------------------------------------------
    def finish(self) -> Outcome:
        s, step = self.state, self.state.step
        if self.knobs.skip_outputs:  # benchmarks: no final checkpoint, eval or outputs
            self._drain_uploads(600)
            self.reporter.close()
            return self._outcome("Completed", step, ResultStatus(metrics={"trainLoss": s.train_loss or 0.0}),
                                 "benchmark run: outputs skipped")
        evaluated = s.last_eval_step == step
        if self.attempt.last_saved != step:
            self.save(step, s.last_eval_loss if evaluated else None)
        self.reporter.update(state="evaluating")
        try:
            tuned, metrics = (s.last_eval_loss, s.last_eval_metrics or {}) if evaluated else self.eval_pass()
        except EvalStopped:  # the last step is saved: the next pod only evaluates and writes the outputs
            return self.preempted(step)
        result = self.result(tuned, metrics)
        log_event("eval", step=step, evalLoss=tuned, final=True)
        tuned_ev = None
        if self.evaluation is not None and s.base_evaluation is not None:
            try:
                tuned_ev = self.evaluation.run(self.model, self.head, self.tokenizer, self.accelerator, self.device,
                                               stop=self._evaluation_stop)
            except EvalStopped:  # the last step is saved: the next pod runs the evaluation again, then the outputs
                return self.preempted(step)
            log_event("evaluation", model="tuned", **tuned_ev["metrics"])
        self.reporter.update(state="uploading")
        self.head.restore()
        out_loc = st.open_location(self.paths.output_uri, self.spec.storage)
        if tuned_ev is not None and self.main:
            job = self.config.job
            evaluation, result.report_uri = self.evaluation.write(s.base_evaluation, tuned_ev, out_loc,
                                                                  f"{job.namespace}/{job.name}")
            result.evaluation = EvaluationResult.model_validate(evaluation)
        write_outputs(self.plan, self.spec, self.model, self.accelerator, self.tokenizer, self.model_dir, self.work,
                      out_loc, result, self.log)
        if self.head.mode == "fused":
            self.head.head.forward = self.head._fused_forward
        self._drain_uploads(self.knobs.final_upload_timeout, report=True)
        reason = "EarlyStopped" if s.stopped_early else "Completed"
        self.reporter.update(state="finished", step=step, eval_loss=tuned)
        self.reporter.close()
        msg = (f"stopped early at step {step}/{self.total_steps}: no eval-loss improvement in "
               f"{self.spec.training.early_stopping.patience} evaluations" if s.stopped_early else f"trained {step} steps")
        return self._outcome(reason, step, result, msg)

    def result(self, tuned: float | None, metrics: dict[str, float]) -> ResultStatus:
        """The run's final metrics: train and eval loss, the base model's for comparison, data counts."""
        s, result = self.state, ResultStatus()
        m = result.metrics
        if s.train_loss is not None:
            m["trainLoss"] = s.train_loss
        if tuned is not None:
            m["evalLoss"] = tuned
            m["perplexity"] = ppl(tuned)
            m.update(metrics)  # the tuned model's on the validation set: rewardAccuracy, rewardMargin, ...
        if s.base_eval_loss is not None:
            m["baseEvalLoss"] = s.base_eval_loss
            m["basePerplexity"] = ppl(s.base_eval_loss)
            m.update(_prefixed("base", s.base_eval_metrics or {}))  # the A/B: the same metrics of the base model
        if s.best_eval_loss is not None:
            m["bestEvalLoss"] = s.best_eval_loss
            m["bestStep"] = float(s.best_step)
        m["skippedLines"] = float(self.stats.skipped_lines)
        m["steps"] = float(s.step)
        m["tokens"] = float(s.tokens)
        return result

    def _drain_uploads(self, timeout: float, report: bool = False) -> None:
        if self.uploader is None:
            return
        if not self.uploader.drain(timeout) and report:
            self.log(f"{self.uploader.pending} checkpoint upload(s) still pending after {timeout:.0f}s; the outputs are uploaded")
        self.uploader.close()
