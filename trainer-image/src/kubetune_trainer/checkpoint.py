"""Checkpoints: written locally, uploaded in the background, committed by a manifest written last.

Layout under paths.checkpointsUri::

    checkpoint-00000200/model.safetensors     trainable parameters (full state, FQN keys)
                       optimizer.pt           optimizer state (FQN keys: survives re-wrapping)
                       state.pt               scheduler + loop state (step, early stopping, ...)
                       trainer_state.json     the loop state, readable
                       rng_state_<rank>.pt    python / numpy / torch (/ cuda) RNG per process
                       adapter/...            peft adapter (adapter methods): usable as is
                       manifest.json          WRITTEN LAST: files, sizes, sha256. No manifest, no checkpoint.

A checkpoint without its manifest (an upload cut short by a kill or an outage) is never used and is
cleaned up later. The uploader thread retries with backoff forever (a failed upload never stops
training) and uploads checkpoints in order; retention keeps the newest ``keep`` plus the best by eval
loss, and an outage's backlog is held to the same rule.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from kubetune.api.storage import written_by_another
from kubetune_trainer.storage import Location, MANIFEST, download_tree, sha256_file, short_error

NAME_RE = re.compile(r"^checkpoint-(\d+)$")


def ckpt_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------
# saving and loading (torch)


def _dcp_options(distributed: bool, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=distributed, cpu_offload=distributed, **kw)


def full_state_dicts(model, optimizer, accelerator, *, trainable_only: bool) -> tuple[dict, dict | None]:
    """The model's (and optimizer's) whole state on process 0, on CPU; empty dicts elsewhere."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, get_state_dict,
    )

    # FSDP1's full state dict exists on rank 0 only, yet torch then drops the frozen keys on every
    # rank (a KeyError on the others): drop them from the sharded dicts, then gather what is left.
    fsdp = accelerator.distributed_type.value == "FSDP"
    if trainable_only and not fsdp:
        # Unsharded, the trainable state is the trainable parameters, named as torch's state-dict
        # helpers name them (no DDP or compile prefix). Those helpers would also resolve every key of
        # the whole state dict as an attribute path, which bitsandbytes' 8-bit layers break
        # ("...base_layer.SCB": the scale lives on the weight, not the layer).
        if accelerator.num_processes > 1 and not accelerator.is_main_process:
            msd = {}
        else:
            unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
            msd = {n: p.detach() for n, p in unwrapped.named_parameters() if p.requires_grad}
        osd = None
        if optimizer is not None:
            osd = get_optimizer_state_dict(model, optimizer, options=_dcp_options(accelerator.num_processes > 1))
        return msd, osd
    if fsdp:
        opts = StateDictOptions(full_state_dict=False, ignore_frozen_params=trainable_only)
    else:
        opts = _dcp_options(accelerator.num_processes > 1, ignore_frozen_params=trainable_only)
    if optimizer is None:
        msd, osd = get_model_state_dict(model, options=opts), None
    else:
        msd, osd = get_state_dict(model, optimizer, options=opts)
    if fsdp:
        from torch.distributed._state_dict_utils import _gather_state_dict

        if trainable_only:
            # FSDP's dict also carries state that is not a parameter, which ignore_frozen_params keeps:
            # a 4-bit base's quantization constants (...base_layer.weight.absmax). Only what trains
            # belongs in a checkpoint or an adapter.
            from torch.distributed.fsdp._common_utils import clean_tensor_name

            keep = {clean_tensor_name(n) for n, p in model.named_parameters() if p.requires_grad}
            if missing := keep - msd.keys():
                raise RuntimeError(f"trainable parameters missing from the state dict: {sorted(missing)[:3]}")
            msd = {k: v for k, v in msd.items() if k in keep}
        msd = _gather_state_dict(msd, cpu_offload=True, ranks_only=(0,))
        osd = _gather_state_dict(osd, cpu_offload=True, ranks_only=(0,)) if osd is not None else None
    return msd, osd


def save_adapter(peft_model, out: Path, tensors: dict) -> None:
    """Write a peft adapter directory from the trainable state. peft's save_pretrained picks the
    adapter's entries by module name, and FSDP's wrapping renames modules (..._fsdp_wrapped_module...):
    under FSDP it finds none and writes an empty adapter. The tensors are already exactly the
    trainable state, so under FSDP write peft's format (adapter name out of the keys) directly."""
    if not any("_fsdp_wrapped_module" in n for n, _ in peft_model.named_modules()):
        peft_model.save_pretrained(str(out), state_dict=tensors)
        return
    import copy

    from safetensors.torch import save_file

    name = peft_model.active_adapter
    cfg = copy.copy(peft_model.peft_config[name])
    if cfg.is_prompt_learning:
        weights = {"prompt_embeddings": next(v for k, v in tensors.items() if k.endswith(f"prompt_encoder.{name}.embedding.weight"))}
    else:
        weights = {k.replace(f".{name}.", "."): v for k, v in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg.inference_mode = True  # as peft writes it
    cfg.save_pretrained(str(out))


def save_local(
    out_dir: Path,
    *,
    model,
    optimizer,
    scheduler,
    loop_state: dict,
    accelerator,
    adapter_model=None,
) -> Path | None:
    """Write a checkpoint directory (process 0 writes the shared files, every process its RNG).
    Returns the directory on the main process, None elsewhere."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    distributed = accelerator.num_processes > 1
    msd, osd = full_state_dicts(model, optimizer, accelerator, trainable_only=True)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in msd.items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        torch.save(osd, tmp / "optimizer.pt")
        # fp16's loss scale too: restarted at its initial 65536, a run that had halved it would skip
        # steps on overflow until it got back down
        scaler = accelerator.scaler.state_dict() if getattr(accelerator, "scaler", None) is not None else None
        torch.save({"scheduler": scheduler.state_dict(), "loop": loop_state, "scaler": scaler}, tmp / "state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(loop_state, indent=1, default=str))
        if adapter_model is not None:
            save_adapter(adapter_model, tmp / "adapter", tensors)
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    if distributed:  # other nodes may not share a filesystem: every RNG state goes through rank 0
        from accelerate.utils import gather_object

        rngs = gather_object([rng])
    else:
        rngs = [rng]
    if accelerator.is_main_process:
        for r, state in enumerate(rngs):
            torch.save(state, tmp / f"rng_state_{r}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
        return out_dir
    return None


def load_local(ckpt_dir: Path, *, model, optimizer, scheduler, accelerator) -> dict:
    """Restore model (trainable part), optimizer, scheduler and this process's RNG; returns the loop state."""
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_state_dict

    distributed = accelerator.num_processes > 1
    msd = load_file(str(ckpt_dir / "model.safetensors"))
    osd = torch.load(ckpt_dir / "optimizer.pt", map_location="cpu", weights_only=False)
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd,
                   options=_dcp_options(distributed, strict=False))
    st = torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=False)
    scheduler.load_state_dict(st["scheduler"])
    if st.get("scaler") and getattr(accelerator, "scaler", None) is not None:
        accelerator.scaler.load_state_dict(st["scaler"])
    rng_file = ckpt_dir / f"rng_state_{accelerator.process_index}.pt"
    if not rng_file.exists():
        rng_file = ckpt_dir / "rng_state_0.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(rng["cuda"])
        except Exception:
            pass
    return st["loop"]


# ---------------------------------------------------------------------------------------------
# finding the newest committed checkpoint


@dataclass
class Committed:
    name: str
    step: int
    manifest: dict

    @property
    def eval_loss(self) -> float | None:
        return self.manifest.get("evalLoss")


def list_committed(loc: Location) -> list[Committed]:
    """Committed checkpoints (those with a readable manifest), oldest first."""
    out = []
    for name in loc.list_dirs():
        m = NAME_RE.match(name)
        if not m:
            continue
        raw = loc.get_bytes(f"{name}/{MANIFEST}")
        if raw is None:
            continue
        try:
            man = json.loads(raw)
        except ValueError:
            continue
        out.append(Committed(name, int(m.group(1)), man))
    return sorted(out, key=lambda c: c.step)


def foreign_owner(c: Committed, uid: str | None) -> str | None:
    """The UID of the FineTuneJob that wrote ``c`` when it is not ``uid``: a deleted object's run under
    the same name and prefix. None when it is this object's, or when either side does not say (a
    checkpoint from before manifests named their job, a config without a UID)."""
    theirs = c.manifest.get("jobUid")
    return theirs if written_by_another(theirs, uid) else None


def fetch_latest(loc: Location, dest_root: Path, log: Callable[[str], None] = print,
                 only: Callable[[Committed], bool] | None = None) -> tuple[Path, Committed] | None:
    """Download and verify the newest committed checkpoint (of those ``only`` accepts); an unverifiable
    one falls back to the next older. None when there is none."""
    from kubetune_trainer.errors import StorageFailed

    for c in reversed([c for c in list_committed(loc) if only is None or only(c)]):
        try:
            return _download(loc.child(c.name), c, dest_root, log), c
        except StorageFailed as e:
            log(f"checkpoint {c.name} is unusable ({e.message}); trying an older one")
    return None


def fetch_from(loc: Location, dest_root: Path, log: Callable[[str], None] = print) -> tuple[Path, Committed] | None:
    """fetch_latest, where ``loc`` may also be one checkpoint (its manifest at the top):
    checkpoints.resumeFrom names either."""
    raw = loc.get_bytes(MANIFEST)
    if raw is None:
        return fetch_latest(loc, dest_root, log)
    try:
        man = json.loads(raw)
        name = loc.uri.rstrip("/").rsplit("/", 1)[-1]
        c = Committed(name if NAME_RE.match(name) else ckpt_name(int(man["step"])), int(man["step"]), man)
    except (ValueError, KeyError, TypeError):
        return None
    return _download(loc, c, dest_root, log), c


def _download(loc: Location, c: Committed, dest_root: Path, log: Callable[[str], None]) -> Path:
    dest = dest_root / c.name
    files = {f["path"] for f in c.manifest.get("files", [])}
    download_tree(loc, dest, only=lambda k: k in files, log=log)
    return dest


# ---------------------------------------------------------------------------------------------
# the background uploader


def retained(checkpoints: list[tuple[int, float | None]], keep: int) -> set[int]:
    """The steps retention keeps of (step, eval loss) pairs, oldest first: the newest ``keep`` and
    the best by eval loss (the newer of equals)."""
    kept = {step for step, _ in checkpoints[-keep:]}
    scored = [(loss, -step) for step, loss in checkpoints if loss is not None]
    if scored:
        kept.add(-min(scored)[1])
    return kept


@dataclass
class _Job:
    local: Path
    step: int
    eval_loss: float | None
    entries: list | None = None
    done_files: set | None = None
    superseded: bool = False


class _Paused(Exception):
    """The upload stops between two files: a checkpoint submitted ``first`` goes ahead."""


class Uploader:
    """Uploads checkpoints in order on a thread of its own; training never waits for it.

    A failing upload is retried with exponential backoff (capped) until it succeeds; files already
    uploaded in an earlier attempt are not sent again. Each checkpoint is committed by its manifest,
    written last; then retention runs.

    While S3 is down the backlog only holds what retention would keep once it commits (the newest
    ``keep`` and the best by eval loss): an older checkpoint is superseded and its local copy
    deleted, or a long outage would fill the node's disk and get the pod evicted, losing them all.

    The checkpoint saved at SIGTERM is submitted ``first``: the next pod resumes from it, so it must
    not wait behind an older upload while the grace period runs out. The older one pauses between
    two files and goes on afterwards from where it stopped.
    """

    def __init__(self, loc: Location, keep: int, *, log: Callable[[str], None] = print,
                 on_commit: Callable[[str, int, int], None] | None = None,
                 on_failure: Callable[[str], None] | None = None,
                 on_drop: Callable[[int], None] | None = None,
                 max_backoff: float = 30.0, base_backoff: float = 1.0, owner: str | None = None):
        self.loc = loc
        self.owner = owner  # the FineTuneJob's UID, in each manifest (see foreign_owner)
        self.keep = keep
        self.log = log
        self.on_commit = on_commit
        self.on_failure = on_failure
        self.on_drop = on_drop
        self.max_backoff = max_backoff
        self.base_backoff = base_backoff
        self.backlog: list[_Job] = []  # in upload order; [0] goes next
        self._current: _Job | None = None  # the one the thread is on (its files may be half sent)
        self.committed: list[int] = []
        self.superseded: list[int] = []  # dropped without a commit (the one uploading only if it gave up)
        self.failures = 0
        self._closed = False
        self._cv = threading.Condition()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="checkpoint-uploader", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Checkpoints on local disk waiting for S3, the one uploading included."""
        return len(self.backlog)

    def submit(self, local: Path, step: int, eval_loss: float | None, *, first: bool = False) -> list[int]:
        """Queue a checkpoint (``first``: ahead of the others); returns the steps it dropped.

        The one uploading is only marked: it still commits unless it fails again, and counts as
        dropped only then (``on_drop``)."""
        dropped = []
        with self._cv:
            job = _Job(local, step, eval_loss)
            if first:
                self.backlog.insert(0, job)
            else:
                self.backlog.append(job)
            self._idle.clear()
            kept = retained(sorted((j.step, j.eval_loss) for j in self.backlog if not j.superseded), self.keep)
            for job in list(self.backlog):
                if job.superseded or job.step in kept:
                    continue
                job.superseded = True
                if job is not self._current:  # the current one stops at its next retry, if it fails
                    dropped.append(job.step)
                    self.backlog.remove(job)
                    shutil.rmtree(job.local, ignore_errors=True)
            self.superseded += sorted(dropped)
            self._cv.notify_all()
        for s in sorted(dropped):
            self.log(f"checkpoint {ckpt_name(s)} is superseded by {ckpt_name(step)} while its upload waits; it is "
                     f"dropped from local disk (retention would delete it once the newer ones commit)")
            if self.on_drop:
                self.on_drop(s)
        return sorted(dropped)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted checkpoint is committed or superseded; False on timeout."""
        return self._idle.wait(timeout)

    def close(self) -> None:
        """The thread ends once the backlog is empty."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def _must_stop(self, job: _Job) -> bool:
        return job.superseded or self.backlog[0] is not job

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self.backlog and not self._closed:
                    self._cv.wait()
                if not self.backlog:
                    return
                job = self._current = self.backlog[0]
            attempt, committed = 0, False
            while not self._must_stop(job):
                try:
                    self._upload(job)
                    committed = True
                    break
                except _Paused:
                    break
                except Exception as e:  # never let an upload failure reach training
                    self.failures += 1
                    delay = min(self.max_backoff, self.base_backoff * 2**attempt) * (0.8 + 0.4 * random.random())
                    attempt += 1
                    msg = f"checkpoint {ckpt_name(job.step)} upload failed ({short_error(e)}); retry {attempt} in {delay:.1f}s"
                    self.log(msg)
                    if self.on_failure:
                        self.on_failure(msg)
                    with self._cv:  # a checkpoint submitted first does not wait out the backoff
                        self._cv.wait_for(lambda: self._must_stop(job), delay)
            if not committed and not job.superseded:
                continue  # paused: the job ahead of it goes now, this one resumes from its next file
            if not committed:
                with self._cv:
                    self.superseded.append(job.step)
                when = "while it failed" if attempt else "before its upload started"
                self.log(f"checkpoint {ckpt_name(job.step)} upload is abandoned: newer checkpoints superseded it "
                         f"{when} (retention would delete it once they commit)")
                if self.on_drop:
                    self.on_drop(job.step)
            if committed:
                try:
                    self._retain()
                except Exception as e:
                    self.log(f"checkpoint retention failed ({short_error(e)}); will try after the next upload")
            # a superseded upload's partial files go with the next retention's leftover sweep
            shutil.rmtree(job.local, ignore_errors=True)
            with self._cv:
                self.backlog.remove(job)
                self._current = None
                if not self.backlog:
                    self._idle.set()

    def _upload(self, job: _Job) -> None:
        name = ckpt_name(job.step)
        dest = self.loc.child(name)
        if job.entries is None:
            files = sorted(p for p in job.local.rglob("*") if p.is_file())
            job.done_files = set()
            job.entries = [{"path": p.relative_to(job.local).as_posix(), "size": p.stat().st_size,
                            "sha256": sha256_file(p)} for p in files]
        for entry in job.entries:
            if entry["path"] in job.done_files:
                continue
            # Only a checkpoint submitted first interrupts a working upload. A superseded one still
            # finishes once started: stopping it would starve S3 of commits whenever an upload takes
            # longer than the saves that supersede it.
            if self.backlog[0] is not job:
                raise _Paused
            dest.put_file(entry["path"], job.local / entry["path"], sha256=entry["sha256"])
            job.done_files.add(entry["path"])
        manifest = {"step": job.step, "created": now_iso(), "files": job.entries}
        if self.owner:
            manifest["jobUid"] = self.owner
        if job.eval_loss is not None:
            manifest["evalLoss"] = job.eval_loss
        dest.put_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
        self.committed.append(job.step)
        self.log(f"checkpoint {name} committed to {dest.uri}")
        if self.on_commit:
            self.on_commit(dest.uri, job.step, len(self.committed))

    def _retain(self) -> None:
        committed = list_committed(self.loc)
        if not committed:
            return
        keep = retained([(c.step, c.eval_loss) for c in committed], self.keep)
        newest = committed[-1].step
        for c in committed:
            if c.step not in keep:
                # manifest first: from then on nobody treats it as a checkpoint
                self.loc.delete([f"{c.name}/{MANIFEST}"])
                # through the parent: a file:// location then prunes the emptied directory too
                self.loc.delete([f"{c.name}/{o.key}" for o in self.loc.child(c.name).list()])
        with self._cv:  # uploads still to finish (paused behind a newer one) are not leftovers
            keep_names = {c.name for c in committed} | {ckpt_name(j.step) for j in self.backlog}
        for name in self.loc.list_dirs():
            m = NAME_RE.match(name)
            if m and name not in keep_names and int(m.group(1)) < newest:
                # leftovers of an upload that never committed (killed pod, outage)
                self.loc.delete([f"{name}/{o.key}" for o in self.loc.child(name).list()])
        if self.on_commit and committed:
            self.on_commit(None, None, len(keep))  # type: ignore[arg-type]
