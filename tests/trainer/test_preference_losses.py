"""The preference losses and metrics against values worked out by hand, and the per-sequence log-probs
LossHead computes for them (fused and from logits) against plain per-token cross-entropy.

Hand arithmetic uses -logσ(x) = log(1 + e^-x): -logσ(1) = log(1.367879) = 0.313262,
-logσ(-1) = 1 + 0.313262 = 1.313262, -logσ(-0.5) = log(1 + 1.648721) = 0.974077,
-logσ(0.5) = log(1.606531) = 0.474077."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import tiny
from kubetune_trainer import objectives
from kubetune_trainer.config import parse_config, plan_for
from kubetune_trainer.errors import BadConfig
from kubetune_trainer.model import IGNORE, LossHead, build_model, chunked_linear_token_nll
from kubetune_trainer.objectives import losses
from kubetune_trainer.objectives.preference import settings_for

T = torch.tensor

# Two pairs. Pair 1: pc=-2 pr=-5 rc=-3 rr=-4, Δ = (-2+3) - (-5+4) = 2.
#            Pair 2: pc=-4 pr=-3 rc=-4 rr=-4, Δ = 0 - 1 = -1.
PC, PR, RC, RR = T([-2.0, -4.0]), T([-5.0, -3.0]), T([-3.0, -4.0]), T([-4.0, -4.0])


def close(got, want, tol=1e-5):
    torch.testing.assert_close(got, T(want, dtype=got.dtype), atol=tol, rtol=0)


def test_dpo_sigmoid_with_and_without_label_smoothing():
    # β=0.5: βΔ = 1 and -0.5. ε=0: -logσ(1) = 0.313262, -logσ(-0.5) = 0.974077.
    close(losses.dpo_losses(PC, PR, RC, RR, 0.5), [0.313262, 0.974077])
    # ε=0.1: 0.9·0.313262 + 0.1·1.313262 = 0.413262;  0.9·0.974077 + 0.1·0.474077 = 0.924077
    close(losses.dpo_losses(PC, PR, RC, RR, 0.5, "sigmoid", 0.1), [0.413262, 0.924077])


def test_dpo_ipo_and_hinge():
    # IPO, β=0.5: target 1/(2β) = 1; (2-1)² = 1, (-1-1)² = 4
    close(losses.dpo_losses(PC, PR, RC, RR, 0.5, "ipo"), [1.0, 4.0])
    # hinge: relu(1 - βΔ) = relu(1-1) = 0, relu(1+0.5) = 1.5
    close(losses.dpo_losses(PC, PR, RC, RR, 0.5, "hinge"), [0.0, 1.5])
    with pytest.raises(ValueError, match="unknown DPO loss 'kto'"):
        losses.dpo_losses(PC, PR, RC, RR, 0.5, "kto")


def test_orpo():
    # pc=-2 over 4 tokens: mean -0.5; pr=-6 over 3 tokens: mean -2.
    # log(1-e^-0.5) = log(0.393469) = -0.932752;  log(1-e^-2) = log(0.864665) = -0.145413
    # log odds ratio = (-0.5+2) - (-0.932752+0.145413) = 1.5 + 0.787339 = 2.287339
    # -logσ(2.287339) = log(1 + 0.101553) = 0.096706;  β=0.1: 0.5 (chosen NLL mean) + 0.0096706 = 0.509671
    close(losses.orpo_losses(T([-2.0]), T([-6.0]), T([4.0]), T([3.0]), 0.1), [0.509671])


def test_simpo():
    # β=2, γ=0.5: 2·(-0.5 - -2) - 0.5 = 2.5;  -logσ(2.5) = log(1 + 0.082085) = 0.078890
    close(losses.simpo_losses(T([-2.0]), T([-6.0]), T([4.0]), T([3.0]), 2.0, 0.5), [0.078890])
    # ε=0.1 adds 0.1·(2.5) (since -logσ(-x) = x - logσ(x)): 0.078890 + 0.25 = 0.328890
    close(losses.simpo_losses(T([-2.0]), T([-6.0]), T([4.0]), T([3.0]), 2.0, 0.5, 0.1), [0.328890])


def test_kto_and_its_reference_point():
    # log-ratios π-ref = 1 (desirable), -2 (undesirable), 3 (desirable), 100 (void: not in z0)
    pi, ref = T([1.0, -2.0, 3.0, 100.0]), T([0.0, 0.0, 0.0, 0.0])
    desirable, live = T([True, False, True, True]), T([True, True, True, False])
    per, z0 = losses.kto_losses(pi, ref, desirable, live, 0.5, 1.0, 1.5)
    # z0 = (1 - 2 + 3)/3 = 2/3
    # 1 - σ(0.5·(1 - 2/3)) = 1 - σ(1/6) = 1 - 0.541571 = 0.458430
    # 1.5·(1 - σ(0.5·(2/3 + 2))) = 1.5·(1 - σ(4/3)) = 1.5·(1 - 0.791392) = 0.312913
    # 1 - σ(0.5·(3 - 2/3)) = 1 - σ(7/6) = 1 - 0.762542 = 0.237458
    close(z0, 2 / 3)
    close(per[:3], [0.458430, 0.312913, 0.237458])
    # a negative mean ratio is clamped: z0 = 0;  1 - σ(-0.5) = 0.622459,  1 - σ(0.5·2) = 0.268941
    per, z0 = losses.kto_losses(T([-1.0, -2.0]), T([0.0, 0.0]), T([True, False]), T([True, True]), 0.5)
    close(z0, 0.0)
    close(per, [0.622459, 0.268941])


def test_kto_reference_point_takes_no_gradient():
    pi = T([1.0, -2.0], requires_grad=True)
    per, _ = losses.kto_losses(pi, T([0.0, 0.0]), T([True, False]), T([True, True]), 0.5)
    per.sum().backward()
    # z0 = 0 (mean -0.5, clamped); d/dr [1 - σ(0.5 r)] = -0.5·σ'(0.5) = -0.5·0.235004 = -0.117502;
    # d/dr [1 - σ(0.5·(0 - r))] = 0.5·σ'(1) = 0.5·0.196612 = 0.098306
    close(pi.grad, [-0.117502, 0.098306])


def test_pair_metrics_are_sums_over_live_examples():
    # rewards β(π-ref), β=0.5: pair 1 chosen 0.5, rejected -0.5 (accurate); pair 2 chosen 0, rejected 0.5
    m = losses.pair_metrics(0.5 * (PC - RC), 0.5 * (PR - RR), T([True, True]))
    assert {k: round(float(v), 6) for k, v in m.items()} == {
        "rewardsChosen": 0.5, "rewardsRejected": 0.0, "rewardMargin": 0.5, "rewardAccuracy": 1.0}
    m = losses.pair_metrics(0.5 * (PC - RC), 0.5 * (PR - RR), T([False, True]))  # pair 1 a rank's filler
    assert {k: round(float(v), 6) for k, v in m.items()} == {
        "rewardsChosen": 0.0, "rewardsRejected": 0.5, "rewardMargin": -0.5, "rewardAccuracy": 0.0}


def test_kto_metrics_split_by_label():
    # rewards 0.5 (desirable), -1 (undesirable), 1.5 (desirable), -3 (desirable, wrong sign)
    m = losses.kto_metrics(T([0.5, -1.0, 1.5, -3.0]), T([True, False, True, True]), T([True, True, True, True]))
    assert {k: round(float(v), 6) for k, v in m.items()} == {
        "rewardsChosen": -1.0, "rewardsRejected": -1.0, "rewardMargin": 0.0, "rewardAccuracy": 3.0}


def _objective(name, method="lora", **settings):
    plan = SimpleNamespace(method=method, micro_batch_size=2)
    spec = SimpleNamespace(objective=SimpleNamespace(type=name, **settings))
    return objectives.get(name)(spec, plan, log=lambda m: None)


def test_the_objectives_read_the_batch_layout_chosen_then_rejected():
    # logps [chosen_1, chosen_2, rejected_1, rejected_2] with the pairs above: DPO's hand values
    obj = _objective("dpo", beta=0.5)
    batch = {"live": T([True, True]), "desirable": T([True, True])}
    per, m = obj.terms(torch.cat([PC, PR]), T([4.0, 4.0, 4.0, 4.0]), torch.cat([RC, RR]), batch)
    close(per, [0.313262, 0.974077])
    close(m["rewardMargin"], 0.5)
    # ORPO and SimPO length-normalize with the counts of the same layout: the pair of test_orpo
    orpo = _objective("orpo")
    per, m = orpo.terms(T([-2.0, -6.0]), T([4.0, 3.0]), None, {"live": T([True])})
    close(per, [0.509671])
    close(m["rewardsChosen"], 0.1 * -0.5)  # β · mean log-prob, as TRL reports them
    simpo = _objective("simpo", gamma=0.5)
    close(simpo.terms(T([-2.0, -6.0]), T([4.0, 3.0]), None, {"live": T([True])})[0], [0.078890])


def test_settings_take_the_registry_defaults_and_refuse_what_cannot_work():
    s = _objective("dpo").settings
    assert (s.beta, s.loss, s.label_smoothing, s.reference) == (0.1, "sigmoid", 0.0, "implicit")
    assert _objective("dpo", method="full").settings.reference == "copy"
    assert _objective("simpo").settings.beta == 2.0 and _objective("simpo").settings.gamma == 0.5
    assert _objective("orpo").settings.reference is None
    with pytest.raises(BadConfig, match="implicit .* needs an adapter method, not method.type full"):
        _objective("dpo", method="full", reference="implicit")
    # the API's helpers win when the spec has them
    from kubetune.api import registry

    o = SimpleNamespace(type="kto", beta=None, effective_beta=0.3, effective_reference=lambda m: "precomputed")
    s = settings_for(SimpleNamespace(objective=o), SimpleNamespace(method="lora"), registry.objective("kto"))
    assert (s.beta, s.reference) == (0.3, "precomputed")
    # and the API's own model
    from kubetune.api.v1alpha1 import TrainingObjective

    o = TrainingObjective.model_validate({"type": "kto", "beta": 0.2, "undesirableWeight": 1.5})
    s = settings_for(SimpleNamespace(objective=o), SimpleNamespace(method="full"), registry.objective("kto"))
    assert (s.beta, s.desirable_weight, s.undesirable_weight, s.reference) == (0.2, 1.0, 1.5, "copy")
    o = TrainingObjective.model_validate({"type": "simpo"})
    s = settings_for(SimpleNamespace(objective=o), SimpleNamespace(method="lora"), registry.objective("simpo"))
    assert (s.beta, s.gamma, s.reference) == (2.0, 0.5, None)


def test_the_registered_objectives_are_the_apis():
    from kubetune.api import registry

    assert set(objectives.names()) == set(registry.OBJECTIVE_NAMES)
    for name in ("dpo", "orpo", "kto", "simpo"):
        assert _objective(name).metric_names() == registry.PREFERENCE_METRICS


# --- per-sequence log-probs ----------------------------------------------------------------------


def test_token_nll_and_its_gradients_match_torch():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    y[::5] = IGNORE
    g = torch.randn(37)  # a different upstream gradient per token, as per-sequence weights give
    (chunked_linear_token_nll(h, w, b, y, chunk_rows=7) * g).sum().backward()
    h2, w2, b2 = (t.detach().clone().requires_grad_() for t in (h, w, b))
    ref = F.cross_entropy(h2 @ w2.t() + b2, y, ignore_index=IGNORE, reduction="none")
    (ref * g).sum().backward()
    for got, want in ((h.grad, h2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(chunked_linear_token_nll(h, w, b, y, chunk_rows=5), ref.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", [{"type": "full"}, {"type": "lora", "lora": {"rank": 4, "alpha": 8}}])
def test_loss_head_gives_each_sequences_summed_nll_fused_or_from_logits(tmp_path, model_dir, method):
    ids = torch.tensor([[5, 9, 14, 3, 7, 22], [11, 4, 30, 6, 2, 0]])
    labels = torch.tensor([[IGNORE, IGNORE, 3, 7, 22, IGNORE], [IGNORE, 30, 6, 2, IGNORE, IGNORE]])
    weights = torch.tensor([0.7, -1.3])  # each row's loss weighted differently, as DPO weighs chosen and rejected
    grads, values = [], []
    for fused in (True, False):
        cfg = parse_config(tiny.trainer_config(tmp_path, model_dir, tmp_path / "d.jsonl", method=method))
        torch.manual_seed(0)
        model, base = build_model(plan_for(cfg), cfg.spec, model_dir, torch.device("cpu"), log=lambda m: None)
        head = LossHead(model, base, fused, torch.device("cpu"))
        assert head.mode == ("fused" if fused else "logits")
        with head.computing_sequence_nll(labels):
            nll = head.loss_from(model(input_ids=ids, attention_mask=torch.ones_like(ids)))
        assert nll.shape == (2,)
        (nll * weights).sum().backward()
        values.append(nll.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        head.restore()
        with torch.no_grad():  # the plain computation: full logits, per-token cross-entropy, summed per row
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                                   reduction="none").view(2, -1).sum(1)
        torch.testing.assert_close(nll.detach(), want, atol=1e-5, rtol=1e-5)
        # the SFT path after it is unchanged: one summed loss
        head = LossHead(model, base, fused, torch.device("cpu"))
        with head.computing_loss(labels):
            torch.testing.assert_close(head.loss_from(model(input_ids=ids)).detach(), want.sum(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values[0], values[1], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4)
