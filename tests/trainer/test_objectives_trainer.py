"""Each preference objective through the real trainer (kubetune_trainer.loop.train, the recipe): the
data read with format auto, the reference set up, reward metrics per step in the log and at the end
an A/B of the base and the tuned model on the validation pairs (here the training pairs)."""
import json

import pytest

import tiny
from kubetune_trainer.config import parse_config
from kubetune_trainer.loop import train

pytestmark = pytest.mark.slow

LORA = {"type": "lora", "lora": {"rank": 8, "alpha": 16}}

# objective settings, method, learning rate, the reward accuracy the tuned model must reach on the
# training pairs (KTO's unpaired loss moves each example alone, and 24 steps take it to about 0.8)
CASES = {
    "dpo": ({"type": "dpo", "beta": 0.5}, LORA, 2e-2, 0.9),
    "dpo-full-copy": ({"type": "dpo", "beta": 0.5, "reference": "copy"}, {"type": "full"}, 3e-3, 0.9),
    "dpo-precomputed": ({"type": "dpo", "beta": 0.5, "reference": "precomputed"}, LORA, 2e-2, 0.9),
    "orpo": ({"type": "orpo"}, LORA, 2e-2, 0.9),
    "simpo": ({"type": "simpo"}, LORA, 2e-2, 0.9),
    "kto": ({"type": "kto", "beta": 0.5}, LORA, 2e-2, 0.7),
}


def run(tmp_path, model_dir, objective: dict, method: dict, lr: float, steps: int = 24):
    rows = tiny.kto_rows(32, seed=4) if objective["type"] == "kto" else tiny.preference_rows(32, seed=4)
    data = tiny.write_jsonl(tmp_path / "prefs.jsonl", rows)
    cfg = tiny.trainer_config(tmp_path, model_dir, data, method=method,
                              dataset={"format": "auto", "maxSeqLength": 64},
                              training={"learningRate": lr, "maxSteps": steps, "microBatchSize": 4, "evalSteps": 12,
                                        "loggingSteps": 4})
    cfg["spec"]["objective"] = objective
    # The toy pairs are memorized, not generalized (held-out accuracy stays near chance on 24 pairs), so
    # the end-of-run A/B is taken on the training pairs: what the "above 0.9" is about.
    cfg["spec"]["dataset"]["validationUri"] = cfg["spec"]["dataset"]["uri"]
    return train(parse_config(cfg))


@pytest.mark.parametrize("case", list(CASES))
def test_objective_trains_through_the_trainer(tmp_path, model_dir, case, capsys):
    objective, method, lr, accuracy = CASES[case]
    out = run(tmp_path, model_dir, objective, method, lr)
    m = out.result.metrics
    logged = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    steps = [e for e in logged if e.get("event") == "step"]
    print(f"\n{case}: loss {steps[0]['loss']:.4f} -> {m['trainLoss']:.4f}; reward accuracy "
          f"{m['baseRewardAccuracy']:.2f} -> {m['rewardAccuracy']:.2f}, margin {m['baseRewardMargin']:.3f} -> "
          f"{m['rewardMargin']:.3f}; eval loss {m['baseEvalLoss']:.4f} -> {m['evalLoss']:.4f}")
    assert out.reason == "Completed" and out.step == 24
    assert all({"rewardAccuracy", "rewardMargin", "rewardsChosen", "rewardsRejected"} <= set(e) for e in steps), steps[0]
    assert m["rewardAccuracy"] > accuracy and m["rewardMargin"] > m["baseRewardMargin"], m
    assert m["evalLoss"] < m["baseEvalLoss"], m
    if objective.get("reference") != "copy" and objective["type"] in ("dpo", "kto"):
        # the implicit/precomputed reference is the base itself: no reward yet, no pair preferred
        assert m["baseRewardMargin"] == 0 and m["baseRewardAccuracy"] == 0, m


def test_preference_data_for_sft_names_the_objective(tmp_path, model_dir):
    """Preference pairs under the default objective (sft) fail at once, saying which objectives read them."""
    from kubetune_trainer.errors import BadData

    data = tiny.write_jsonl(tmp_path / "prefs.jsonl", tiny.preference_rows(8))
    cfg = tiny.trainer_config(tmp_path, model_dir, data, method=LORA, dataset={"format": "auto"})
    with pytest.raises(BadData, match="objective dpo or orpo or simpo"):
        train(parse_config(cfg))
