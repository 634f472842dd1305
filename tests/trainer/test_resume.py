"""Stop a run midway (kill -9, or SIGTERM as on preemption), restart it, and check the resumed losses
continue the uninterrupted run's."""
import json

import pytest

import tiny
from proc import TrainerProc

pytestmark = pytest.mark.slow

STEPS = 24

# The kill -9 test's cases: objective (None: SFT), method (None: LoRA with dropout), learning rate.
# DPO's reference must come back the same after a restart: the base under disabled adapters (implicit),
# log-probs precomputed again from the base before the checkpoint loads, or a copy made before it loads.
CASES = {
    "sft": (None, None, 1e-2),
    "dpo": ({"type": "dpo", "beta": 0.5}, None, 1e-2),
    "dpo-precomputed": ({"type": "dpo", "beta": 0.5, "reference": "precomputed"}, None, 1e-2),
    "dpo-full-copy": ({"type": "dpo", "beta": 0.5, "reference": "copy"}, {"type": "full"}, 3e-3),
}
REWARDS = ("rewardAccuracy", "rewardMargin", "rewardsChosen", "rewardsRejected")


def config(tmp_path, model_dir, data, store, case="sft"):
    objective, method, lr = CASES[case]
    cfg = tiny.trainer_config(
        tmp_path, model_dir, data,
        # dropout: the RNG must be restored
        method=method or {"type": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.1}},
        dataset={"validationSplit": 0.1},
        training={"maxSteps": STEPS, "microBatchSize": 2, "gradientAccumulationSteps": 2, "learningRate": lr,
                  "scheduler": "cosine", "warmupRatio": 0.1, "weightDecay": 0.01, "evalSteps": 6, "loggingSteps": 1,
                  "seed": 11},
        checkpoints={"saveSteps": 4, "keep": 2},
        ckpt_uri=f"file://{store}/ckpt", output_uri=f"file://{store}/out", progress_uri=f"file://{store}/progress.json")
    if objective:
        cfg["spec"]["objective"] = dict(objective)
    cfg["paths"]["workDir"] = str(store / "work")
    return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 36 train examples: 2 epochs in 24 steps
    return tiny.write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", tiny.alpaca_rows(40, seed=3))


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    # 36 training pairs, as many as the SFT examples
    return tiny.write_jsonl(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", tiny.preference_rows(40, seed=3))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model_dir, data, pref_data):
    """uninterrupted(case) -> that case's run without a stop (run once per module)."""
    runs = {}

    def get(case):
        if case not in runs:
            tmp = tmp_path_factory.mktemp(f"ref-{case}")
            run = TrainerProc(config(tmp, model_dir, data if case == "sft" else pref_data, tmp / "ref", case),
                              tmp / "ref.yaml")
            assert run.wait(300) == 0, run.stderr[-3000:]
            assert sorted(run.losses()) == list(range(1, STEPS + 1))
            runs[case] = run
        return runs[case]

    return get


@pytest.fixture(scope="module")
def reference(uninterrupted):
    """The uninterrupted SFT run."""
    return uninterrupted("sft")


def assert_continues(reference, got: dict[int, float], label: str) -> None:
    expected = reference.losses()
    assert sorted(got) == sorted(expected), f"{label}: steps {sorted(set(expected) ^ set(got))} missing or extra"
    deltas = {s: abs(got[s] - expected[s]) for s in expected}
    worst = max(deltas.values())
    print(f"\n{label}: max |dloss| over {len(deltas)} steps = {worst:.3g}")
    assert worst < 1e-4, deltas


@pytest.mark.parametrize("case", list(CASES))
def test_kill9_and_resume_continue_the_same_losses(tmp_path, model_dir, data, pref_data, uninterrupted, case):
    reference = uninterrupted(case)
    store = tmp_path / "run"
    cfg = config(tmp_path, model_dir, data if case == "sft" else pref_data, store, case)
    first = TrainerProc(cfg, tmp_path / "run.yaml", env={"KUBETUNE_DEBUG_STEP_SLEEP": "0.3"})
    first.wait_for(lambda e: e.get("event") == "log" and "checkpoint-00000012 committed" in e.get("message", ""), 300)
    first.wait_for(lambda e: e.get("event") == "step" and e["step"] >= 14, 60)
    first.kill9()
    killed_at = max(first.losses())
    assert 14 <= killed_at < STEPS

    second = TrainerProc(cfg, tmp_path / "run.yaml")
    assert second.wait(300) == 0, second.stderr[-3000:]
    resumed = second.events_of("resumed")
    assert resumed and resumed[0]["step"] == 12
    assert not (store / "work" / "resume").exists()  # the downloaded checkpoint is freed once loaded
    assert sorted(second.losses()) == list(range(13, STEPS + 1))
    assert_continues(reference, {**first.losses(), **second.losses()},
                     f"{case}: kill -9 at step {killed_at}, resumed from 12")

    term = json.loads(second.termination.read_text())
    ref_term = json.loads(reference.termination.read_text())
    assert term["reason"] == "Completed" and term["step"] == STEPS
    assert abs(term["result"]["metrics"]["evalLoss"] - ref_term["result"]["metrics"]["evalLoss"]) < 1e-4
    # the base model's eval from the first attempt survives the restart
    assert term["result"]["metrics"]["baseEvalLoss"] == ref_term["result"]["metrics"]["baseEvalLoss"]
    # retention: the newest two plus the best by eval loss
    kept = sorted(p.name for p in (store / "ckpt").iterdir())
    assert "checkpoint-00000024" in kept and "checkpoint-00000020" in kept and len(kept) <= 3
    progress = json.loads((store / "progress.json").read_text())
    assert progress["state"] == "finished" and progress["resumedFromStep"] == 12
    if case != "sft":
        # the reward metrics go on in every resumed step as in the uninterrupted run, and the result's
        # A/B keeps the base's numbers from the first attempt
        want = {e["step"]: e for e in reference.events_of("step")}
        got = second.events_of("step")
        assert all(set(REWARDS) <= set(e) for e in got), got[0]
        worst = max(abs(e[k] - want[e["step"]][k]) for e in got for k in REWARDS)
        m, ref_m = term["result"]["metrics"], ref_term["result"]["metrics"]
        print(f"{case}: max |d reward metric| over the resumed steps = {worst:.3g}; reward accuracy "
              f"{m['baseRewardAccuracy']:.2f} -> {m['rewardAccuracy']:.2f} "
              f"(uninterrupted {ref_m['rewardAccuracy']:.2f})")
        assert worst < 1e-4
        if CASES[case][0].get("reference") == "precomputed":  # again from the base, before the checkpoint loads
            assert [m for m in second.messages() if "reference log-probs of 36 examples precomputed" in m]
        for k in REWARDS:
            assert m["base" + k[:1].upper() + k[1:]] == ref_m["base" + k[:1].upper() + k[1:]], k
            assert abs(m[k] - ref_m[k]) < 1e-4, k


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_the_restart_continues(tmp_path, model_dir, data, reference):
    store = tmp_path / "run"
    cfg = config(tmp_path, model_dir, data, store)
    first = TrainerProc(cfg, tmp_path / "run.yaml", env={"KUBETUNE_DEBUG_STEP_SLEEP": "0.5"})
    # Aim at step 18: an eval is due there (every 6) but no periodic checkpoint (every 4).
    first.wait_for(lambda e: e.get("event") == "step" and e["step"] >= 17, 300)
    first.sigterm()
    assert first.wait(60) == 143, first.stderr[-3000:]
    stopped = max(first.losses())
    assert stopped % 4 != 0, f"stopped at {stopped}, a periodic checkpoint step: the test proves nothing"
    term = json.loads(first.termination.read_text())
    assert term["reason"] == "Preempted" and term["step"] == stopped
    name = f"checkpoint-{stopped:08d}"
    assert f"checkpoint {name} committed; the next pod resumes from it" in term["message"]
    assert (store / "ckpt" / name / "manifest.json").is_file()
    assert first.events_of("preempted"), "the SIGTERM was not acknowledged"
    progress = json.loads((store / "progress.json").read_text())
    # the operator's copy when the evicted pod is gone before it reads the termination message
    assert progress["state"] == "preempted" and progress["message"] == term["message"], progress
    assert "Traceback" not in first.stderr

    second = TrainerProc(cfg, tmp_path / "run.yaml")
    assert second.wait(300) == 0, second.stderr[-3000:]
    assert second.events_of("resumed")[0]["step"] == stopped
    assert min(second.losses()) == stopped + 1
    if stopped % 6 == 0:  # the eval skipped to save time runs first on resume, as the reference did it
        ev = [e for e in second.events_of("eval") if e["step"] == stopped and "evalLoss" in e]
        ref_ev = [e for e in reference.events_of("eval") if e["step"] == stopped and "evalLoss" in e]
        assert ev and abs(ev[0]["evalLoss"] - ref_ev[0]["evalLoss"]) < 1e-4
    assert_continues(reference, {**first.losses(), **second.losses()}, f"SIGTERM at step {stopped}")
    final = json.loads(second.termination.read_text())["result"]["metrics"]
    ref_final = json.loads(reference.termination.read_text())["result"]["metrics"]
    for k in ("evalLoss", "bestEvalLoss", "bestStep"):
        assert abs(final[k] - ref_final[k]) < 1e-4, k


def test_sigterm_during_an_eval_stops_it_and_the_restart_evaluates_that_step_first(tmp_path, model_dir, data, reference):
    """A big validation set can outlast the grace period, so the eval stops midway too (every rank
    at the same batch), the step is saved, and the resumed run runs that eval before training on."""
    store = tmp_path / "run"
    cfg = config(tmp_path, model_dir, data, store)
    first = TrainerProc(cfg, tmp_path / "run.yaml", env={"KUBETUNE_DEBUG_EVAL_SLEEP": "2"})
    # the step event of step 6 comes after the step's stop vote; its eval (every 6) follows it
    first.wait_for(lambda e: e.get("event") == "step" and e["step"] == 6, 300)
    first.sigterm()
    assert first.wait(60) == 143, first.stderr[-3000:]
    assert max(first.losses()) == 6
    assert not [e for e in first.events_of("eval") if e["step"] == 6], "the eval ran to its end"
    term = json.loads(first.termination.read_text())
    assert term["reason"] == "Preempted" and "checkpoint checkpoint-00000006 committed" in term["message"], term
    assert (store / "ckpt" / "checkpoint-00000006" / "manifest.json").is_file()

    second = TrainerProc(cfg, tmp_path / "run.yaml")
    assert second.wait(300) == 0, second.stderr[-3000:]
    assert second.events_of("resumed")[0]["step"] == 6
    ev = [e for e in second.events_of("eval") if "evalLoss" in e]
    ref_ev = {e["step"]: e["evalLoss"] for e in reference.events_of("eval") if "evalLoss" in e and not e.get("final")}
    assert ev[0]["step"] == 6 and abs(ev[0]["evalLoss"] - ref_ev[6]) < 1e-4
    assert_continues(reference, {**first.losses(), **second.losses()}, "SIGTERM in the eval of step 6")
    final = json.loads(second.termination.read_text())["result"]["metrics"]
    ref_final = json.loads(reference.termination.read_text())["result"]["metrics"]
    for k in ("evalLoss", "baseEvalLoss", "bestEvalLoss", "bestStep"):
        assert abs(final[k] - ref_final[k]) < 1e-4, k


def test_resume_from_continues_another_runs_checkpoint_in_a_new_run(tmp_path, model_dir, data, reference, s3):
    """checkpoints.resumeFrom: run 1 dies at step ~14 (its checkpoints in S3); run 2, with a prefix of
    its own, starts from run 1's newest committed checkpoint and continues run 1's losses exactly."""
    prefix = "s3://kubetune/ckpt/ml/job"

    def config_s3(name):
        cfg = config(tmp_path, model_dir, data, tmp_path / name)
        cfg["spec"]["storage"] = {"endpoint": s3.endpoint, "region": "us-east-1"}
        cfg["paths"]["checkpointsUri"] = f"{prefix}/{name.replace('run', 'run-')}/checkpoints"
        return cfg

    cfg1 = config_s3("run1")
    first = TrainerProc(cfg1, tmp_path / "run1.yaml", env={"KUBETUNE_DEBUG_STEP_SLEEP": "0.3"})
    first.wait_for(lambda e: e.get("event") == "log" and "checkpoint-00000012 committed" in e.get("message", ""), 300)
    first.wait_for(lambda e: e.get("event") == "step" and e["step"] >= 14, 60)
    first.kill9()
    killed_at = max(first.losses())

    cfg2 = config_s3("run2")
    cfg2["spec"]["checkpoints"]["resumeFrom"] = f"{prefix}/run-1/checkpoints/"
    second = TrainerProc(cfg2, tmp_path / "run2.yaml")
    assert second.wait(300) == 0, second.stderr[-3000:]
    assert second.events_of("resumed")[0] == {**second.events_of("resumed")[0], "step": 12,
                                              "checkpoint": f"{prefix}/run-1/checkpoints/checkpoint-00000012"}
    assert sorted(second.losses()) == list(range(13, STEPS + 1))
    assert_continues(reference, {**first.losses(), **second.losses()}, f"run 1 killed at {killed_at}, run 2 resumed from 12")
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket="kubetune", Prefix="ckpt/ml/job/run-2/")["Contents"]}
    assert "ckpt/ml/job/run-2/checkpoints/checkpoint-00000024/manifest.json" in keys  # its own prefix from then on

    # a checkpoint from another method does not fit, and an empty prefix holds nothing: one line each
    cfg3 = config_s3("run3")
    cfg3["spec"]["method"]["lora"]["rank"] = 4
    cfg3["spec"]["checkpoints"]["resumeFrom"] = f"{prefix}/run-1/checkpoints/checkpoint-00000012"
    third = TrainerProc(cfg3, tmp_path / "run3.yaml")
    assert third.wait(300) == 2
    term = json.loads(third.termination.read_text())
    assert term["reason"] == "BadConfig" and term["message"].startswith(
        f"spec.checkpoints.resumeFrom {prefix}/run-1/checkpoints/checkpoint-00000012: checkpoint-00000012 does not fit "
        "this job (") and term["message"].endswith("it must come from a run of the same model and method")
    cfg3["spec"]["method"]["lora"]["rank"] = 8
    cfg3["spec"]["checkpoints"]["resumeFrom"] = f"{prefix}/run-9/checkpoints/"
    fourth = TrainerProc(cfg3, tmp_path / "run4.yaml")
    assert fourth.wait(300) == 2
    assert json.loads(fourth.termination.read_text())["message"] == (
        f"spec.checkpoints.resumeFrom {prefix}/run-9/checkpoints/: no committed checkpoint there (a checkpoint-<step>/ "
        "with its manifest.json, or a prefix holding some)")
    assert "Traceback" not in third.stderr + fourth.stderr

    # continuing with more steps and a lower rate follows this spec's schedule from step 12 on, not
    # the one saved with the checkpoint (24 steps at 1e-2)
    cfg5 = config_s3("run5")
    cfg5["spec"]["training"].update(maxSteps=36, learningRate=5e-3)
    cfg5["spec"]["checkpoints"]["resumeFrom"] = f"{prefix}/run-1/checkpoints/checkpoint-00000012"
    fifth = TrainerProc(cfg5, tmp_path / "run5.yaml")
    assert fifth.wait(300) == 0, fifth.stderr[-3000:]
    want = _schedule("cosine", 5e-3, warmup=4, total=36)
    got = {e["step"]: e["lr"] for e in fifth.events_of("step")}
    assert sorted(got) == list(range(13, 37))
    print(f"\nresumeFrom step 12 with maxSteps 36, lr 5e-3: lr at 13 = {got[13]:.3e} (this spec's schedule: "
          f"{want[13]:.3e}), at 36 = {got[36]:.1e}")
    assert all(abs(got[s] - want[s]) <= 1e-12 for s in got), {s: (got[s], want[s]) for s in got}
    assert abs(fifth.losses()[13] - first.losses()[13]) < 0.5  # it continued the trained adapter, not a fresh one

    # fewer steps than the checkpoint already has: one line naming the field to raise
    cfg6 = config_s3("run6")
    cfg6["spec"]["training"]["maxSteps"] = 10
    cfg6["spec"]["checkpoints"]["resumeFrom"] = cfg5["spec"]["checkpoints"]["resumeFrom"]
    sixth = TrainerProc(cfg6, tmp_path / "run6.yaml")
    assert sixth.wait(300) == 2
    assert json.loads(sixth.termination.read_text())["message"] == (
        f"spec.checkpoints.resumeFrom {prefix}/run-1/checkpoints/checkpoint-00000012: checkpoint-00000012 is past this "
        "run's 10 steps; raise spec.training.maxSteps (or epochs) above 12")


def test_a_compiled_run_continues_an_eager_runs_checkpoint(tmp_path, model_dir, data):
    """KUBETUNE_COMPILE=1 (a speed lever of the GPU benchmark) wraps the model in torch.compile: its
    checkpoints must hold the same keys as an eager run's (no _orig_mod. prefix), so either can
    resume the other, and it must train the same. Inductor compiles for CPU here (gcc). Dropout off:
    compiled dropout draws from inductor's own RNG."""
    import shutil

    from safetensors.torch import load_file

    def cfg_for(store):
        cfg = config(tmp_path, model_dir, data, store)
        cfg["spec"]["method"]["lora"]["dropout"] = 0.0
        cfg["spec"]["training"]["maxSteps"] = 12
        cfg["spec"]["checkpoints"]["keep"] = 5
        return cfg

    eager = TrainerProc(cfg_for(tmp_path / "eager"), tmp_path / "eager.yaml")
    assert eager.wait(300) == 0, eager.stderr[-3000:]
    (tmp_path / "compiled" / "ckpt").mkdir(parents=True)
    shutil.copytree(tmp_path / "eager" / "ckpt" / "checkpoint-00000008", tmp_path / "compiled" / "ckpt" / "checkpoint-00000008")
    compiled = TrainerProc(cfg_for(tmp_path / "compiled"), tmp_path / "compiled.yaml", env={"KUBETUNE_COMPILE": "1"})
    assert compiled.wait(600) == 0, compiled.stderr[-3000:]
    assert compiled.events_of("load")[0]["compiled"] is True and eager.events_of("load")[0]["compiled"] is False
    assert compiled.events_of("resumed")[0]["step"] == 8
    got, want = compiled.losses(), eager.losses()
    assert sorted(got) == [9, 10, 11, 12]
    worst = max(abs(got[s] - want[s]) for s in got)
    print(f"\ncompiled run resumed from the eager run's step 8: max |dloss| over steps 9-12 = {worst:.3g}")
    assert worst < 1e-4, (got, want)
    for f in ("ckpt/checkpoint-00000012/model.safetensors", "out/adapter/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "eager" / f)), load_file(str(tmp_path / "compiled" / f))
        assert a.keys() == b.keys() and len(a) == 28, sorted(b)[:3]
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def _schedule(name, lr, warmup, total):
    """The learning rate after each step of a fresh run with this schedule."""
    import torch
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    out = {}
    for step in range(1, total + 1):
        opt.step()
        sched.step()
        out[step] = sched.get_last_lr()[0]
    return out
