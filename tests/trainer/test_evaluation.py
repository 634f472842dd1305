"""The end-of-run evaluation (issue #22): a test split disjoint from the others, base vs tuned metrics on it,
and the same prompts answered by both models, written under the output URI."""
from __future__ import annotations

import json

import pytest

from kubetune_trainer import data as dt
from kubetune_trainer import evaluation as ev
from kubetune_trainer.config import parse_config
from kubetune_trainer.errors import BadData
from kubetune_trainer.loop import train

import tiny


def test_splits_are_disjoint_deterministic_and_keep_the_old_validation_set():
    rows = list(range(1000))
    train_, val, test = dt.split_holdout(rows, 0.1, 0.2, seed=3)
    assert (len(train_), len(val), len(test)) == (700, 100, 200)
    assert sorted(train_ + val + test) == rows and not set(val) & set(test)  # every line in exactly one split
    assert dt.split_holdout(rows, 0.1, 0.2, seed=3) == (train_, val, test)
    assert dt.split_holdout(rows, 0.1, 0.2, seed=4)[2] != test
    assert dt.split_holdout(rows, 0.1, None, seed=3)[:2] == dt.split_validation(rows, 0.1, 3)  # as before
    with pytest.raises(BadData, match=r"validationSplit 0.5 plus testSplit 0.5 leaves no training data \(10"):
        dt.split_holdout(list(range(10)), 0.5, 0.5, seed=0)


def test_scores_on_hand_computed_answers():
    assert ev.exact_match(" The cat  says meow .", "The cat says meow .") == 1.0
    assert ev.exact_match("The cat says woof .", "The cat says meow .") == 0.0
    # LCS "the cat says" (3 of 4 tokens each side; rouge-score drops the "."): F1 = 0.75
    assert ev.rouge_l("The cat says woof .", "The cat says meow .") == pytest.approx(0.75)
    assert ev.delta({"loss": 2.0, "exactMatch": 0.1}, {"loss": 1.5, "exactMatch": 0.9}) == pytest.approx(
        {"loss": -0.5, "exactMatch": 0.8})
    assert ev.headline({"exactMatch": 0.1, "loss": 2}, {"exactMatch": 0.9, "loss": 1}) == "exactMatch 0.1 -> 0.9"


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "hi"}\nnot json\n', "p.jsonl line 2: not JSON"),
    ('["hi"]\n', "p.jsonl line 1: a prompt line is a JSON object {prompt, reference?}"),
    ('{"prompt": ""}\n', 'p.jsonl line 1: "prompt" must be a non-empty string'),
    ('{"prompt": "hi", "reference": 3}\n', 'p.jsonl line 1: "reference" must be a string when set'),
])
def test_a_bad_prompt_file_names_the_line_and_the_rule(tmp_path, line, message):
    (tmp_path / "p.jsonl").write_text(line)
    with pytest.raises(BadData) as e:
        ev.read_prompt_file(tmp_path / "p.jsonl", "p.jsonl")
    assert str(e.value.message if hasattr(e.value, "message") else e.value).startswith(message)


@pytest.mark.slow
def test_a_tuned_model_beats_its_base_on_the_held_out_test_set(tmp_path, model_dir):
    """The quickstart's toy task (colours of fruits, sounds of animals, alpaca format) with 20 % held out
    as the test set: the tuned model's exact match on the test responses is far above the base's, and
    the A/B of both models' answers is written with the report."""
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.alpaca_rows(200, seed=1))
    cfg = tiny.trainer_config(tmp_path, model_dir, data, dataset={"testSplit": 0.2, "validationSplit": 0.1},
                              method={"type": "lora", "lora": {"rank": 16, "alpha": 32}},
                              training={"maxSteps": 250, "learningRate": 3e-3, "evalSteps": 125, "loggingSteps": 50})
    lemon = {"prompt": "What color is the lemon ?", "reference": "The lemon is yellow ."}
    prompts = tiny.write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What color is the plum ?"}])
    cfg["spec"]["evaluation"] = {"prompts": [lemon], "promptsUri": f"file://{prompts}", "maxPrompts": 12,
                                 "maxNewTokens": 12}
    out = train(parse_config(cfg))
    e = out.result.evaluation
    print(f"\nexact match {e.base['exactMatch']:.2f} -> {e.tuned['exactMatch']:.2f}, ROUGE-L {e.base['rougeL']:.2f} -> "
          f"{e.tuned['rougeL']:.2f}, token accuracy {e.base['tokenAccuracy']:.2f} -> {e.tuned['tokenAccuracy']:.2f}, "
          f"test loss {e.base['loss']:.3f} -> {e.tuned['loss']:.3f} ({e.examples} examples, {e.prompts} prompts)")
    assert e.examples == 40 and e.prompts == 12
    # measured: exact match 0.00 -> 0.82-0.92 (run to run), token accuracy 0.00 -> 0.99 (250 steps, 30 s)
    assert e.base["exactMatch"] <= 0.1 and e.tuned["exactMatch"] >= 0.6, e
    assert e.tuned["loss"] < e.base["loss"] and e.tuned["tokenAccuracy"] > e.base["tokenAccuracy"] + 0.3, e
    assert e.delta["exactMatch"] == pytest.approx(e.tuned["exactMatch"] - e.base["exactMatch"])
    folder = tmp_path / "store" / "out" / "evaluation"
    assert out.result.report_uri == f"file://{folder}/report.html"
    rows = [json.loads(x) for x in (folder / "answers.jsonl").read_text().splitlines()]
    print("\n".join(f"  {r['reference']!r}: base {r['base']!r}, tuned {r['tuned']!r}" for r in rows[:4]))
    assert rows[0]["prompt"] == "What color is the lemon ?" and rows[0]["reference"] == "The lemon is yellow ."
    assert set(rows[0]["scores"]) == {"base", "tuned"} and len(rows) == 12 and all(r["tuned"] for r in rows)
    assert rows[1]["prompt"] == "What color is the plum ?" and rows[1]["reference"] is None and "scores" not in rows[1]
    assert rows[2]["prompt"].startswith("Below is an instruction")  # a test example's, as its template rendered it
    assert json.loads((folder / "summary.json").read_text())["tuned"] == e.tuned
    assert "What color is the lemon ?" in (folder / "report.html").read_text()


@pytest.mark.slow
def test_sigterm_during_the_end_of_run_evaluation_saves_and_the_next_pod_evaluates_again(tmp_path, model_dir):
    """As an eval does: SIGTERM in the tuned model's evaluation stops it (Preempted, the last step
    committed), and the restarted trainer resumes at the last step, evaluates, and writes the same report
    figures an uninterrupted run does (the base's come from the checkpoint's run state)."""
    from proc import TrainerProc

    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.alpaca_rows(60, seed=1))

    def cfg(store):
        c = tiny.trainer_config(tmp_path, model_dir, data, dataset={"testSplit": 0.2},
                                training={"maxSteps": 8, "learningRate": 3e-3},
                                checkpoints={"saveSteps": 4}, ckpt_uri=f"file://{store}/ckpt",
                                output_uri=f"file://{store}/out", progress_uri=f"file://{store}/progress.json")
        c["spec"]["evaluation"] = {"maxPrompts": 4, "maxNewTokens": 6}
        c["paths"]["workDir"] = str(store / "work")
        return c

    reference = TrainerProc(cfg(tmp_path / "ref"), tmp_path / "ref.yaml")
    assert reference.wait(300) == 0, reference.stderr[-3000:]
    first = TrainerProc(cfg(tmp_path / "run"), tmp_path / "run.yaml", env={"KUBETUNE_DEBUG_EVAL_SLEEP": "1"})
    first.wait_for(lambda e: e.get("event") == "eval" and e.get("final"), 300)  # the tuned evaluation starts
    first.sigterm()
    assert first.wait(60) == 143, first.stderr[-3000:]
    term = json.loads(first.termination.read_text())
    assert term["reason"] == "Preempted" and "checkpoint-00000008 committed" in term["message"], term
    assert not [e for e in first.events_of("evaluation") if e.get("model") == "tuned"], "it ran to its end"

    second = TrainerProc(cfg(tmp_path / "run"), tmp_path / "run.yaml")
    assert second.wait(300) == 0, second.stderr[-3000:]
    assert second.events_of("resumed")[0]["step"] == 8 and not second.events_of("evaluation")[:-1]
    got = json.loads(second.termination.read_text())["result"]["evaluation"]
    want = json.loads(reference.termination.read_text())["result"]["evaluation"]
    assert got["base"] == want["base"] and got["tuned"] == pytest.approx(want["tuned"], abs=1e-4), (got, want)
    assert (tmp_path / "run" / "out" / "evaluation" / "report.html").is_file()


def _plain_base_figures(model_dir, evaluation) -> tuple[dict, list[str]]:
    """The base model's test loss, token accuracy and greedy answers, from the model as saved (no
    adapter, no trainer code): what the evaluation's base figures must be."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    plain = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    nll, correct, total = 0.0, 0, 0
    with torch.no_grad():
        for e in evaluation.test:
            seq = ev.sequence_of(e)
            logits = plain(input_ids=torch.tensor([seq.input_ids])).logits[0].float()
            labels = torch.tensor(seq.labels)
            keep = labels != dt.IGNORE
            nll += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            correct += int((logits[keep].argmax(-1) == labels[keep]).sum())
            total += int(keep.sum())
        answers = []
        for p in evaluation.prompts:
            ids = torch.tensor([p.ids])
            out = plain.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=evaluation.settings.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
            answers.append(tokenizer.decode(out, skip_special_tokens=True).strip())
    return {"loss": nll / total, "perplexity": math.exp(nll / total), "tokenAccuracy": correct / total}, answers


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning", "lora"])
def test_the_base_is_the_model_without_its_adapters(tmp_path, model_dir, monkeypatch, method):
    """The base's figures are those of the model as it was loaded: with prompt or prefix tuning the
    step-0 model is not the base (its virtual tokens start random), so the base is measured with the
    adapters disabled. Checked against the saved model evaluated directly, outside the trainer."""
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.alpaca_rows(60, seed=1))
    spec_method = {"type": method, "virtualTokens": 8} if method != "lora" else None
    cfg = tiny.trainer_config(tmp_path, model_dir, data, dataset={"testSplit": 0.2}, method=spec_method,
                              training={"maxSteps": 3, "learningRate": 0.05})
    cfg["spec"]["evaluation"] = {"maxPrompts": 4, "maxNewTokens": 6}
    built = []
    build = ev.EndOfRunEvaluation.build

    def keep(cls, *args, **kwargs):
        built.append(build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(ev.EndOfRunEvaluation, "build", classmethod(keep))
    out = train(parse_config(cfg))
    e = out.result.evaluation
    want, answers = _plain_base_figures(model_dir, built[0])
    rows = [json.loads(x) for x in (tmp_path / "store/out/evaluation/answers.jsonl").read_text().splitlines()]
    print(f"\n{method}: base loss {e.base['loss']:.6f} (the saved model's {want['loss']:.6f}), "
          f"tuned {e.tuned['loss']:.6f}; base answers {[r['base'] for r in rows][:2]}")
    assert e.examples == 12 and len(rows) == e.prompts == 4
    for k, v in want.items():
        assert e.base[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (k, e.base, want)
    assert [r["base"] for r in rows] == answers
    assert e.tuned["loss"] != pytest.approx(e.base["loss"], rel=1e-3)  # the tuned model is another model
