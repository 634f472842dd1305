"""The preference losses as pure functions of per-sequence log-probs: one value per example, so the
objective can sum them over the micro batch (the recipe divides by the global example count).

Implemented here rather than taken from TRL: TRL's trainers own the loop, the data collation and the
reference model, none of which fit the recipe (resume, FSDP, our LossHead, the estimator's pricing),
and its loss functions are methods on those trainers. The formulas follow the papers and TRL's
choices where they differ (noted below); tests/trainer/test_preference_losses.py checks each against
numbers worked out by hand.

Notation: ``pc``/``pr`` the policy's summed log-probs of the chosen/rejected responses, ``rc``/``rr``
the reference's, ``nc``/``nr`` their response token counts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def dpo_losses(pc, pr, rc, rr, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023) on Δ = (pc - rc) - (pr - rr):
    sigmoid: -(1-ε)·logσ(βΔ) - ε·logσ(-βΔ) (ε > 0: conservative DPO, labels flipped with probability ε);
    ipo:     (Δ - 1/(2β))² (Azar et al. 2023, on summed log-probs as the paper writes it; TRL averages them
             per token);
    hinge:   relu(1 - βΔ) (SLiC). Label smoothing applies to sigmoid only, as in TRL."""
    d = (pc - rc) - (pr - rr)
    if loss == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
    if loss == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    if loss == "hinge":
        return torch.relu(1 - beta * d)
    raise ValueError(f"unknown DPO loss {loss!r}: one of {', '.join(DPO_LOSSES)}")


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 (expm1) and far from it (log1p)."""
    x = x.clamp(max=-1e-6)  # a mean log-prob of exactly 0 (probability 1) has infinite odds
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_losses(pc, pr, nc, nr, beta: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024): the chosen response's mean token NLL plus β·(-logσ(log odds ratio)),
    with odds(y) = p/(1-p) of the length-normalized probability p = exp(logp/|y|). Each example's NLL is
    the mean over its own tokens (TRL takes the mean over all chosen tokens of the batch)."""
    ac, ar = pc / nc, pr / nr
    log_odds = (ac - ar) - (_log1m_exp(ac) - _log1m_exp(ar))
    return -ac - beta * F.logsigmoid(log_odds)


def simpo_losses(pc, pr, nc, nr, beta: float, gamma: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO (Meng et al. 2024): -logσ(β·(pc/|c| - pr/|r|) - γ), no reference; label smoothing as in DPO
    (TRL's CPO trainer does the same)."""
    z = beta * (pc / nc - pr / nr) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def kto_losses(pi, ref, desirable, live, beta: float, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024) per example, and z0:
    desirable:   w_d·(1 - σ(β·(π - ref - z0))),  undesirable: w_u·(1 - σ(β·(z0 - (π - ref)))).

    z0, the reference point, estimates KL(π‖ref). The paper and TRL estimate it from mismatched pairs
    (prompt i with completion j), which costs a third forward of every sequence (policy and reference)
    and is not what the estimator prices. Here it is the batch's own mean log-ratio of its live examples,
    detached and clamped at 0 (a KL is never negative; TRL clamps too): no extra forward, and like
    TRL's it only shifts the point each example's ratio is measured from (no gradient goes through it).
    It is per micro batch, so with one example a micro batch z0 is that example's own ratio (clamped)."""
    ratio = pi - ref
    live_f = live.float()
    z0 = ((ratio.detach() * live_f).sum() / live_f.sum().clamp(min=1)).clamp(min=0)
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio)))
    return torch.where(desirable, good, bad), z0


# --- metrics: sums over the live examples (the recipe divides by the global example count) --------


def pair_metrics(reward_chosen, reward_rejected, live) -> dict[str, torch.Tensor]:
    """rewardsChosen/Rejected, rewardMargin and rewardAccuracy (chosen reward > rejected reward), summed."""
    w = live.float()
    rc, rr = reward_chosen.detach().float(), reward_rejected.detach().float()
    return {"rewardsChosen": (rc * w).sum(), "rewardsRejected": (rr * w).sum(), "rewardMargin": ((rc - rr) * w).sum(),
            "rewardAccuracy": ((rc > rr).float() * w).sum()}


def kto_metrics(reward, desirable, live) -> dict[str, torch.Tensor]:
    """KTO's examples are unpaired: rewardsChosen sums the desirable examples' rewards, rewardsRejected
    the undesirable ones', rewardMargin is their difference, and rewardAccuracy counts the examples whose
    reward has the label's sign (the policy likes a desirable completion more than the reference does,
    an undesirable one less). Divided by the count of all examples, the first two are each label's mean
    reward times its share of the data (with a balanced set: half of each mean)."""
    w = live.float()
    r = reward.detach().float()
    good, bad = w * desirable.float(), w * (~desirable).float()
    chosen, rejected = (r * good).sum(), (r * bad).sum()
    right = ((r > 0).float() * good + (r < 0).float() * bad).sum()
    return {"rewardsChosen": chosen, "rewardsRejected": rejected, "rewardMargin": chosen - rejected,
            "rewardAccuracy": right}
