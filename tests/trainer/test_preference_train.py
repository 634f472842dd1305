"""Each preference objective trains a tiny random-init model for real, through the Objective API alone
(examples, prepare, precompute_reference, collate, loss) and a plain AdamW loop, until the policy
prefers the chosen responses of its training pairs: reward accuracy above 0.9.

The toy task: the chosen response is the prompt's words reversed, the rejected one random words of
the same length, so what is preferred can be learned and the two responses are equally long."""
import random
import time

import pytest
import torch

import tiny
from kubetune_trainer import data as dt
from kubetune_trainer import objectives
from kubetune_trainer.config import parse_config, plan_for
from kubetune_trainer.model import LossHead, build_model, load_tokenizer
from kubetune_trainer.objectives import reference

LORA = {"type": "lora", "lora": {"rank": 8, "alpha": 16}}
FULL = {"type": "full"}
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny matrices: threads only add overhead, and on a shared CPU they make the runs ten times slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def setup(tmp_path, model_dir, name: str, method: dict, fused: bool = True, **settings):
    """The objective as the trainer builds it: from a validated TrainerConfig's spec.objective."""
    raw = tiny.trainer_config(tmp_path, model_dir, tmp_path / "d.jsonl", method=method,
                              training={"microBatchSize": 8, "fusedCrossEntropy": fused})
    raw["spec"]["objective"] = {"type": name, **settings}
    raw["spec"]["dataset"]["format"] = "kto" if name == "kto" else "preference"
    cfg = parse_config(raw)
    plan = plan_for(cfg)
    torch.manual_seed(0)
    model, base = build_model(plan, cfg.spec, model_dir, CPU, log=lambda m: None)
    head = LossHead(model, base, plan.fused_cross_entropy, CPU)
    obj = objectives.get(name)(cfg.spec, plan, log=lambda m: None)
    return obj, model, head


def reward_accuracy(obj, model, head, examples, pad_id) -> float:
    with torch.no_grad():
        b = obj.collate(examples, pad_id)
        _, m = obj.loss(model, head, b)
    return float(m["rewardAccuracy"]) / b["count"]


def train(tmp_path, model_dir, name: str, method: dict, steps: int, lr: float, fused: bool = True, **settings):
    t0 = time.perf_counter()
    obj, model, head = setup(tmp_path, model_dir, name, method, fused, **settings)
    tok = load_tokenizer(model_dir)
    f = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.kto_rows(16) if name == "kto" else tiny.preference_rows(16))
    records, fmt = dt.read_records([("train.jsonl", f)], "auto", "fail", dt.DataStats(), formats=obj.formats())
    examples = obj.examples(records, fmt, tok, 64, dt.DataStats())
    obj.prepare(model, head, None)
    obj.precompute_reference(model, head, None, tok.pad_token_id, examples)
    before = reward_accuracy(obj, model, head, examples, tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    order = random.Random(1)
    for _ in range(steps):
        b = obj.collate(order.sample(examples, 8), tok.pad_token_id)
        loss, metrics = obj.loss(model, head, b)
        assert set(metrics) == set(obj.metric_names())
        (loss / b["count"]).backward()  # the recipe's mean: the summed loss over the global count
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = reward_accuracy(obj, model, head, examples, tok.pad_token_id)
    return before, after, time.perf_counter() - t0, obj


@pytest.mark.parametrize("name,method,settings,steps,lr", [
    ("dpo", LORA, {"reference": "implicit"}, 30, 1e-2),
    ("dpo", FULL, {"reference": "copy"}, 20, 1e-3),
    ("dpo", FULL, {"reference": "precomputed", "loss": "ipo"}, 30, 1e-3),
    ("dpo", LORA, {"reference": "precomputed", "loss": "hinge"}, 30, 1e-2),
    ("orpo", LORA, {}, 30, 1e-2),
    ("simpo", LORA, {}, 30, 1e-2),
    ("kto", LORA, {}, 30, 1e-2),
], ids=["dpo-lora-implicit", "dpo-full-copy", "dpo-full-precomputed-ipo", "dpo-lora-precomputed-hinge", "orpo",
        "simpo", "kto"])
def test_each_objective_learns_its_preferences(tmp_path, model_dir, name, method, settings, steps, lr):
    before, after, seconds, _ = train(tmp_path, model_dir, name, method, steps, lr, **settings)
    print(f"{name} {settings}: reward accuracy {before:.2f} -> {after:.2f} in {seconds:.1f}s")
    assert after > 0.9, (before, after)


def test_the_logits_head_trains_as_the_fused_one(tmp_path, model_dir):
    before, after, _, _ = train(tmp_path, model_dir, "dpo", LORA, 30, 1e-2, fused=False)
    assert after > 0.9, (before, after)


def _batch(obj, model_dir, n=4):
    tok = load_tokenizer(model_dir)
    recs = [dt.preference_record(r, "preference") for r in tiny.preference_rows(n, seed=3)]
    return obj.collate(obj.examples(recs, "preference", tok, 64, dt.DataStats()), tok.pad_token_id)


def test_every_reference_gives_the_models_log_probs_as_built(tmp_path, model_dir):
    """implicit (adapters off), copy and precomputed are one and the same function: the model as built."""
    obj, model, head = setup(tmp_path, model_dir, "dpo", LORA, reference="implicit")
    b = _batch(obj, model_dir)
    with torch.no_grad():
        base = reference.Policy().logps(model, head, b)  # LoRA's B starts at 0: the policy is the base
        obj.prepare(model, head, None)
        implicit = obj.reference.logps(model, head, b)
    torch.testing.assert_close(implicit, base)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)  # a trained adapter: the policy moves, the implicit reference must not
        moved = reference.Policy().logps(model, head, b)
        assert (moved - base).abs().max() > 1e-3
        torch.testing.assert_close(obj.reference.logps(model, head, b), base)

    full, fmodel, fhead = setup(tmp_path, model_dir, "dpo", FULL, reference="copy")
    full.prepare(fmodel, fhead, None)
    assert not any(p.requires_grad for p in full.reference.model.parameters())
    assert all(p.requires_grad for p in fmodel.parameters())
    with torch.no_grad():
        for p in fmodel.parameters():
            p.add_(0.01)
    torch.testing.assert_close(full.reference.logps(fmodel, fhead, b), base)

    pre, pmodel, phead = setup(tmp_path, model_dir, "dpo", FULL, reference="precomputed")
    tok = load_tokenizer(model_dir)
    recs = [dt.preference_record(r, "preference") for r in tiny.preference_rows(4, seed=3)]
    ex = pre.examples(recs, "preference", tok, 64, dt.DataStats())
    pre.prepare(pmodel, phead, None)
    pre.precompute_reference(pmodel, phead, None, tok.pad_token_id, ex[:3], ex[3:])  # train and validation lists
    pb = pre.collate(ex, tok.pad_token_id)
    torch.testing.assert_close(pb["ref_logps"], base)


def test_a_void_example_counts_for_nothing(tmp_path, model_dir):
    obj, model, head = setup(tmp_path, model_dir, "dpo", LORA)
    obj.prepare(model, head, None)
    tok = load_tokenizer(model_dir)
    recs = [dt.preference_record(r, "preference") for r in tiny.preference_rows(3, seed=5)]
    ex = obj.examples(recs, "preference", tok, 64, dt.DataStats())
    whole = obj.collate(ex[:2], tok.pad_token_id)
    padded = obj.collate(ex[:2] + [dt.void(ex[2])], tok.pad_token_id)
    assert (whole["count"], padded["count"]) == (2, 2)
    la, ma = obj.loss(model, head, whole)
    lb, mb = obj.loss(model, head, padded)
    torch.testing.assert_close(la, lb)
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k])
