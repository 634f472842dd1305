"""The end-of-run evaluation on the held-out test set: base vs tuned, as practitioners judge a run.

Quantitative: loss, perplexity and response-token accuracy over the test examples, and two generation
metrics on their responses (exact match and ROUGE-L, from Google's rouge-score, the implementation HF
evaluate wraps). Qualitative: the same prompts answered by both models, side by side.

The base is measured before the first step of a fresh run and kept in the run state (so it survives a
resume, and full fine-tuning needs no second copy of the weights); the tuned model at the end. With an
adapter method the base is the model with its adapters disabled (peft's disable_adapter): a LoRA's B
starts at zero, but prompt and prefix tuning's virtual tokens start random, so the step-0 model is not
the base. Nothing here picks a checkpoint or stops training: the test set is only read here.

A test example's prompt is everything before its first labelled (response) token and its reference is
that first response: for chat data with several assistant turns, the first answer.
"""
from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import dataclass

import torch

from kubetune_trainer.data import IGNORE
from kubetune_trainer.objectives.reference import _is_fsdp, evaluating, unwrap

METRICS = ("loss", "perplexity", "tokenAccuracy", "exactMatch", "rougeL")
LOWER_IS_BETTER = ("loss", "perplexity")


@dataclass
class Prompt:
    """One prompt both models answer: from spec.evaluation.prompts or a test example."""

    text: str | None  # as written, or a test example's decoded (as its template rendered it)
    ids: list[int]
    reference: str | None = None


def sequence_of(example):
    """The sequence an example is scored and prompted by: a preference pair's chosen response (KTO: its
    completion), an SFT example itself."""
    return example.sequences[0] if hasattr(example, "sequences") else example


def split_prompt(example, tokenizer) -> Prompt:
    """Prompt ids (up to the first response token) and the first response as text."""
    seq = sequence_of(example)
    labels = seq.labels
    first = next((i for i, y in enumerate(labels) if y != IGNORE), None)
    if first is None:
        return Prompt(None, list(seq.input_ids), None)
    end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE), len(labels))
    # labels are shifted (labels[t] is predicted from input_ids[:t+1]): the response's tokens are labels[first:end]
    reference = tokenizer.decode(labels[first:end], skip_special_tokens=True).strip()
    ids = list(seq.input_ids[: first + 1])
    return Prompt(tokenizer.decode(ids, skip_special_tokens=True).strip(), ids, reference)


def prompt_from_text(text: str, tokenizer, fmt: str) -> list[int]:
    """A written prompt's ids, rendered as the training data's format renders its prompts: the Alpaca
    template, the chat template with the generation prompt, or plain text after the BOS token."""
    from kubetune_trainer.data import Tokenize

    if fmt == "alpaca":
        ids, learn = Tokenize(tokenizer, fmt, 1 << 30)({"instruction": text, "input": "", "output": ""})
        return [i for i, learned in zip(ids, learn) if not learned]
    if fmt == "chat" or (fmt in ("preference", "kto") and getattr(tokenizer, "chat_template", None)):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + list(ids)


# --- scores ---------------------------------------------------------------------------------------
def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the answer is the reference, whitespace aside."""
    return float(normalize(prediction) == normalize(reference))


_SCORER = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (rouge-score's tokenizer: lowercased, ASCII letters and digits)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_SCORER.score(reference, prediction)["rougeL"].fmeasure)


def answer_scores(prediction: str, reference: str | None) -> dict[str, float]:
    if reference is None:
        return {}
    return {"exactMatch": exact_match(prediction, reference), "rougeL": rouge_l(prediction, reference)}


def mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for s in scores for k in s})
    return {k: sum(s[k] for s in scores if k in s) / sum(1 for s in scores if k in s) for k in keys}


# --- the model ------------------------------------------------------------------------------------
def _autocast(accelerator):
    return accelerator.autocast() if accelerator is not None else contextlib.nullcontext()


def _stop_if_asked(stop, accelerator) -> None:
    """EvalStopped once a SIGTERM arrived on any rank (the ranks agree each item, as eval_pass's do): the
    recipe saves and the next pod runs this evaluation again."""
    from kubetune_trainer.loop import EvalStopped, all_sum

    if stop is not None and all_sum(accelerator, [float(stop())])[0]:
        raise EvalStopped()


@torch.no_grad()
def token_accuracy(model, head, examples: list, accelerator, device, stop=None) -> dict[str, float]:
    """Summed cross-entropy and argmax accuracy over the examples' response tokens, one example at a
    time (logits of one sequence only). Every rank runs the same examples (FSDP's forwards need that)."""
    correct = total = 0
    nll = 0.0
    with evaluating(model), head.unpatched(), _autocast(accelerator):
        for e in examples:
            _stop_if_asked(stop, accelerator)
            seq = sequence_of(e)
            ids = torch.tensor([seq.input_ids], device=device)
            labels = torch.tensor([seq.labels], device=device)
            # prompt tuning's virtual tokens come first in the logits: the sequence's own are the last
            logits = model(input_ids=ids).logits[:, -ids.shape[1]:].float()
            keep = labels != IGNORE
            if not keep.any():
                continue
            picked, y = logits[keep], labels[keep]
            nll += float(torch.nn.functional.cross_entropy(picked, y, reduction="sum"))
            correct += int((picked.argmax(-1) == y).sum())
            total += int(keep.sum())
    if not total:
        return {}
    loss = nll / total
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokenAccuracy": correct / total}


@contextlib.contextmanager
def without_adapters(model, accelerator):
    """The base model: a peft model with its adapters disabled (no second copy of the weights); any
    other model as it is. Through accelerate's and FSDP's wrappers: disable_adapter acts on the
    PeftModel inside, so the wrapper's forward (FSDP's gathers) still runs."""
    from peft import PeftModel

    inner = unwrap(model, accelerator)
    with inner.disable_adapter() if isinstance(inner, PeftModel) else contextlib.nullcontext():
        yield


def _generating(model, accelerator):
    """Where ``generate`` runs. Under FSDP generate calls the module inside the root wrapper, whose own
    parameters (embeddings, final norm, output head: what no decoder-block or adapter unit holds) stay
    sharded outside its forward; summon_full_params(recurse=False) gathers just those, and each nested
    unit (a decoder block, an adapter) gathers its shard in its own forward and frees it after, as in
    training. Gathering every weight (recurse=True) would put the whole model on each rank: what FSDP
    is there to avoid. Every rank generates the same prompts, each forward a collective (see ``gen``'s
    synced_gpus)."""
    if not _is_fsdp(accelerator):
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.summon_full_params(getattr(model, "_orig_mod", model), writeback=False, recurse=False)


@torch.no_grad()
def generate(model, head, tokenizer, prompts: list[Prompt], max_new_tokens: int, temperature: float, seed: int,
             accelerator, device, stop=None) -> list[str]:
    """Each prompt's answer: greedy when temperature is 0, else sampled with the run's seed."""
    inner = unwrap(model, accelerator)
    out: list[str] = []
    gen = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    gen |= {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    if _is_fsdp(accelerator) and accelerator.num_processes > 1:
        # the ranks answer the same prompt with the same weights, so they stop together; should rounding
        # ever part them, a rank that met EOS keeps running forwards until all have, as each is a collective
        gen["synced_gpus"] = True
    with evaluating(model), head.unpatched(), _autocast(accelerator), _generating(model, accelerator):
        for i, p in enumerate(prompts):
            _stop_if_asked(stop, accelerator)
            torch.manual_seed(seed + i)  # an answer does not depend on the ones before it
            ids = torch.tensor([p.ids], device=device)
            new = inner.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)[0, ids.shape[1]:]
            out.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return out


def evaluate_model(model, head, tokenizer, examples: list, prompts: list[Prompt], settings, seed: int, accelerator,
                   device, stop=None) -> tuple[dict[str, float], list[str]]:
    """One model's test metrics and its answers to ``prompts`` (the first ``len(examples)`` of which may
    be the test examples' own prompts, with references)."""
    metrics = token_accuracy(model, head, examples, accelerator, device, stop)
    answers = generate(model, head, tokenizer, prompts, settings.max_new_tokens, settings.temperature, seed,
                       accelerator, device, stop)
    scored = [answer_scores(a, p.reference) for a, p in zip(answers, prompts)]
    metrics.update(mean_scores([s for s in scored if s]))
    return metrics, answers


def delta(base: dict[str, float], tuned: dict[str, float]) -> dict[str, float]:
    return {k: tuned[k] - base[k] for k in METRICS if k in base and k in tuned}


# --- prompts --------------------------------------------------------------------------------------
def read_prompt_file(path, name: str) -> list[tuple[str, str | None]]:
    """evaluation.promptsUri's lines: {prompt, reference?}. A bad line names the file, the line and the rule."""
    import json

    from kubetune_trainer.errors import BadData

    out: list[tuple[str, str | None]] = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise BadData(f"{name} line {n}: not JSON ({e.__class__.__name__}: {str(e)[:120]})") from None
            if not isinstance(row, dict):
                raise BadData(f"{name} line {n}: a prompt line is a JSON object {{prompt, reference?}}")
            prompt, reference = row.get("prompt"), row.get("reference")
            if not isinstance(prompt, str) or not prompt.strip():
                raise BadData(f"{name} line {n}: \"prompt\" must be a non-empty string")
            if reference is not None and not isinstance(reference, str):
                raise BadData(f"{name} line {n}: \"reference\" must be a string when set")
            out.append((prompt, reference))
    return out


class EndOfRunEvaluation:
    """The recipe's evaluation stage. ``run(base=True)`` runs before the first step of a fresh run (its
    result goes into the run state, and so into checkpoints); ``run`` after the last, then ``write``
    <output>/evaluation/{summary.json, answers.jsonl, report.html}."""

    def __init__(self, settings, test: list, prompts: list[Prompt], seed: int, log):
        self.settings, self.test, self.prompts, self.seed, self.log = settings, test, prompts, seed, log

    @classmethod
    def build(cls, spec, tokenizer, fmt: str, test: list, prompt_files: list[tuple],
              log) -> "EndOfRunEvaluation | None":
        """None when there is nothing to evaluate. ``fmt``: the training data's format (written prompts are
        rendered as its prompts are); ``prompt_files``: (its URI, local path) of promptsUri's files."""
        from kubetune.api.v1alpha1 import Evaluation

        settings = spec.evaluation or Evaluation()
        written = [(p.prompt, p.reference) for p in settings.prompts]
        for name, path in prompt_files:
            written += read_prompt_file(path, name)
        prompts = [Prompt(text, prompt_from_text(text, tokenizer, fmt), ref) for text, ref in written]
        prompts += [p for p in (split_prompt(e, tokenizer) for e in test) if p.reference is not None]
        prompts = prompts[: settings.max_prompts]
        if not test and not prompts:
            return None
        log(f"evaluation: {len(test)} test examples, {len(prompts)} prompts answered by the base and the tuned model")
        return cls(settings, test, prompts, spec.training.seed, log)

    def run(self, model, head, tokenizer, accelerator, device, stop=None, base: bool = False) -> dict:
        """One model's {"metrics", "answers"} (the run state keeps the base's): with ``base``, the model
        without its adapters. EvalStopped when ``stop()`` (asked before each test example and prompt)
        turns true: a SIGTERM."""
        t0 = time.perf_counter()
        with without_adapters(model, accelerator) if base else contextlib.nullcontext():
            metrics, answers = evaluate_model(model, head, tokenizer, self.test, self.prompts, self.settings,
                                              self.seed, accelerator, device, stop)
        self.log(f"evaluation: {'base' if base else 'tuned'} {metrics} in {time.perf_counter() - t0:.1f}s")
        return {"metrics": metrics, "answers": answers}

    def write(self, base: dict, tuned: dict, out_loc, title: str, attempts: int = 8) -> tuple[dict, str]:
        """summary.json, answers.jsonl and report.html under <output>/evaluation/; the result's
        evaluation (base, tuned, delta, headline) and the report's URI."""
        import json

        from kubetune.report import render_html
        from kubetune_trainer import storage as st
        from kubetune_trainer.progress import logger

        b, t = base["metrics"], tuned["metrics"]
        d = delta(b, t)
        summary = {"split": "test", "examples": len(self.test), "prompts": len(self.prompts),
                   "generation": {"maxNewTokens": self.settings.max_new_tokens,
                                  "temperature": self.settings.temperature},
                   "base": b, "tuned": t, "delta": d}
        rows = []
        for i, (p, ba, ta) in enumerate(zip(self.prompts, base["answers"], tuned["answers"])):
            row = {"index": i, "prompt": p.text if p.text is not None else "", "reference": p.reference,
                   "base": ba, "tuned": ta}
            if p.reference is not None:
                row["scores"] = {"base": answer_scores(ba, p.reference), "tuned": answer_scores(ta, p.reference)}
            rows.append(row)
        loc = out_loc.child("evaluation")
        # Retried as the outputs' uploads are: an S3 outage at the end of a run must not throw the run away.
        files = {"summary.json": json.dumps(summary, indent=1).encode(),
                 "answers.jsonl": "".join(json.dumps(r) + "\n" for r in rows).encode(),
                 "report.html": render_html(summary, rows, title).encode()}
        for key, body in files.items():
            st._retry(lambda: loc.put_bytes(key, body), attempts, f"upload {loc.uri}/{key}", logger())  # noqa: B023
        result = {"base": b, "tuned": t, "delta": d, "headline": headline(b, t),
                  "examples": len(self.test), "prompts": len(self.prompts)}
        return result, f"{loc.uri.rstrip('/')}/report.html"


def headline(base: dict[str, float], tuned: dict[str, float]) -> str | None:
    """The change a person reads first: exact match when answers were scored, else the test loss."""
    for k in ("exactMatch", "rougeL", "loss"):
        if k in base and k in tuned:
            return f"{k} {base[k]:.3g} -> {tuned[k]:.3g}"
    return None
