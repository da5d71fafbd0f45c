"""dpo2d's 2-D losses in PyTorch, as `dpo2d train` computes them
(crates/dpo2d-train/src/loss.rs and loss/two_d.rs).

Per pair, with ``rho_t = log pi(y_t) - log pi_ref(y_t)`` over the response
tokens and ``R_k`` its sum over segment ``k``:

1. ``s = r / 4 + 1`` for every raw 0..4 score; ``g_k = sum_j W_j s_kj``
   (``1d-dpo``: ``W = [1, 0, 0, 0, 0]``).
2. ``N = min(S_w, S_l)`` over the segments that own at least one token; the
   ``N`` chosen segments of highest ``g`` (descending) are paired, in order,
   with the ``N`` rejected segments of lowest ``g`` (ascending); ties keep
   segment order.
3. ``beta_w = beta / mean(selected g_w)``, ``beta_l`` likewise.
4. ``L = -sum_i log sigmoid(beta_w g_w(i) R_w(i) - beta_l g_l(i) R_l(i))``.

The batch loss is the mean of ``L`` over the pairs (a pair with no segment
on a side gives 0 and still counts), plus ``sft_weight`` times the SFT term:
the mean over pairs of the chosen response's mean per-token NLL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAPER_WEIGHTS = (0.3, 0.4, 0.1, 0.1, 0.1)
HELPFULNESS_ONLY = (1.0, 0.0, 0.0, 0.0, 0.0)
TWO_D_LOSSES = ("2d-dpo", "1d-dpo")


def check_weights(w) -> tuple[float, float, float, float, float]:
    w = tuple(float(x) for x in w)
    if len(w) != 5:
        raise ValueError(
            f"aspect weights need 5 numbers (helpfulness, correctness, safety, completeness, clarity), got {len(w)}"
        )
    if not all(x >= 0 and x == x and x != float("inf") for x in w):
        raise ValueError(f"aspect weights must be non-negative numbers, got {list(w)}")
    if abs(sum(w) - 1.0) > 1e-6:
        raise ValueError(
            "aspect weights must sum to 1 (helpfulness, correctness, safety, completeness, clarity), "
            f"got {list(w)} summing to {sum(w)}"
        )
    return w  # type: ignore[return-value]


def effective_weights(loss_type: str, weights) -> tuple[float, ...]:
    """The weights the loss uses: helpfulness only for ``1d-dpo``."""
    return HELPFULNESS_ONLY if loss_type == "1d-dpo" else check_weights(weights)


def combined_scores(scores, weights) -> list[float]:
    """``g_k = sum_j W_j (r_kj / 4 + 1)`` for each segment (in f64, as dpo2d)."""
    return [sum(wj * (x / 4.0 + 1.0) for x, wj in zip(r, weights)) for r in scores]


@dataclass
class PairPlan:
    chosen: list[int]  # chosen segment ids, g descending
    rejected: list[int]  # rejected segment ids, g ascending
    coef_chosen: list[float]  # beta_w * g_w(i)
    coef_rejected: list[float]  # beta_l * g_l(i)

    def __len__(self) -> int:
        return len(self.chosen)


def plan_pair(g_w, present_w, g_l, present_l, beta: float) -> PairPlan:
    """Which segments of one pair are paired, and their coefficients."""
    chosen = sorted((k for k in range(len(g_w)) if present_w[k]), key=lambda k: -g_w[k])
    rejected = sorted((k for k in range(len(g_l)) if present_l[k]), key=lambda k: g_l[k])
    n = min(len(chosen), len(rejected))
    chosen, rejected = chosen[:n], rejected[:n]

    def coefs(ids, g):
        if not ids:
            return []
        equivalent_beta = beta / (sum(g[k] for k in ids) / len(ids))
        return [equivalent_beta * g[k] for k in ids]

    return PairPlan(chosen, rejected, coefs(chosen, g_w), coefs(rejected, g_l))


def _presence(ids: torch.Tensor, mask: torch.Tensor, n_segments: int) -> list[bool]:
    present = [False] * n_segments
    for k in ids[(mask > 0) & (ids >= 0)].unique().tolist():
        if k >= n_segments:
            raise ValueError(f"segment id {k} but the response has {n_segments} scored segments")
        present[k] = True
    return present


def two_d_dpo_losses(
    chosen_token_logratios: torch.Tensor,
    rejected_token_logratios: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    chosen_segment_ids: torch.Tensor,
    rejected_segment_ids: torch.Tensor,
    chosen_scores: list,
    rejected_scores: list,
    weights,
    beta: float,
) -> tuple[torch.Tensor, list[int]]:
    """Per-pair 2-D losses ``[B]`` and the number N of segment pairs of each.

    ``*_token_logratios``, ``*_mask``, ``*_segment_ids``: ``[B, T_side]``
    (segment id -1 = in no segment); ``*_scores``: per pair, the raw 0..4
    scores of each segment in aspect order.
    """
    b = chosen_token_logratios.shape[0]
    losses, counts = [], []
    for i in range(b):
        sw, sl = chosen_scores[i], rejected_scores[i]
        pw = _presence(chosen_segment_ids[i], chosen_mask[i], len(sw))
        pl = _presence(rejected_segment_ids[i], rejected_mask[i], len(sl))
        plan = plan_pair(combined_scores(sw, weights), pw, combined_scores(sl, weights), pl, beta)
        counts.append(len(plan))
        if not len(plan):
            losses.append(chosen_token_logratios.new_zeros(()))
            continue
        r_w = _segment_sums(chosen_token_logratios[i], chosen_mask[i], chosen_segment_ids[i], len(sw))
        r_l = _segment_sums(rejected_token_logratios[i], rejected_mask[i], rejected_segment_ids[i], len(sl))
        dev, dt = chosen_token_logratios.device, chosen_token_logratios.dtype
        r_w = r_w[torch.tensor(plan.chosen, device=dev)]
        r_l = r_l[torch.tensor(plan.rejected, device=dev)]
        coef_w = torch.tensor(plan.coef_chosen, device=dev, dtype=torch.float64).to(dt)
        coef_l = torch.tensor(plan.coef_rejected, device=dev, dtype=torch.float64).to(dt)
        losses.append(-F.logsigmoid(coef_w * r_w - coef_l * r_l).sum())
    return torch.stack(losses), counts


def _segment_sums(ratios: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    keep = (mask > 0) & (ids >= 0)
    return ratios.new_zeros(n).index_add(0, ids[keep], ratios[keep])


@dataclass
class LossOutput:
    loss: torch.Tensor  # differentiable scalar: preference mean + sft_weight * SFT
    per_pair: dict[str, torch.Tensor]  # detached per-pair values; their means are dpo2d's metrics


def two_d_loss(
    loss_type: str,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    chosen_segment_ids: torch.Tensor,
    rejected_segment_ids: torch.Tensor,
    chosen_scores: list,
    rejected_scores: list,
    beta: float = 0.1,
    sft_weight: float = 0.1,
    aspect_weights=PAPER_WEIGHTS,
) -> LossOutput:
    """``2d-dpo`` / ``1d-dpo`` on per-token log-probs of policy and reference
    (``[B, T]`` per side, response tokens where the mask is 1), with dpo2d's
    metrics per pair."""
    if loss_type not in TWO_D_LOSSES:
        raise ValueError(f"two_d_loss computes {', '.join(TWO_D_LOSSES)}, not {loss_type}")
    if not (beta > 0):
        raise ValueError(f"beta must be > 0, got {beta}")
    if not (sft_weight >= 0):
        raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")
    weights = effective_weights(loss_type, aspect_weights)
    cm, rm = chosen_mask.to(policy_chosen.dtype), rejected_mask.to(policy_rejected.dtype)
    chosen_ratios = (policy_chosen - ref_chosen.detach()) * cm
    rejected_ratios = (policy_rejected - ref_rejected.detach()) * rm
    losses, counts = two_d_dpo_losses(
        chosen_ratios,
        rejected_ratios,
        cm,
        rm,
        chosen_segment_ids,
        rejected_segment_ids,
        chosen_scores,
        rejected_scores,
        weights,
        beta,
    )
    # SFT: the chosen response's mean per-token NLL, averaged over pairs.
    chosen_len = cm.sum(-1).clamp(min=1.0)
    nll = -(policy_chosen * cm).sum(-1) / chosen_len
    preference = losses.mean()
    sft_coefficient = sft_weight if sft_weight > 0 else 0.0
    loss = preference + sft_weight * nll.mean() if sft_weight > 0 else preference
    with torch.no_grad():
        chosen_logratios = chosen_ratios.sum(-1)
        rejected_logratios = rejected_ratios.sum(-1)
        rewards_chosen = beta * chosen_logratios
        rewards_rejected = beta * rejected_logratios
        margins = rewards_chosen - rewards_rejected
        per_pair = {
            "loss": losses.detach() + sft_coefficient * nll.detach(),
            "rewards/chosen": rewards_chosen,
            "rewards/rejected": rewards_rejected,
            "rewards/accuracies": (margins > 0).to(policy_chosen.dtype),
            "rewards/margins": margins,
            "logps/chosen": (policy_chosen * cm).sum(-1).detach(),
            "logps/rejected": (policy_rejected * rm).sum(-1).detach(),
            "nll_loss": nll.detach(),
            "sft_loss": nll.detach(),
            "segments/pairs": torch.tensor(counts, dtype=policy_chosen.dtype, device=policy_chosen.device),
            "kl/chosen": chosen_logratios,
            "kl/rejected": rejected_logratios,
        }
    return LossOutput(loss, per_pair)
