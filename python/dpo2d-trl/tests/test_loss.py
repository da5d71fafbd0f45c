"""The 2-D losses against values computed by hand from the formulas of
docs/training.md and METHOD.md (s = r/4 + 1, g = W.s, top-N chosen against
bottom-N rejected, equivalent beta, sum per pair, mean over the batch, SFT)."""

import math

import pytest
import torch

from dpo2d_trl.loss import (
    PAPER_WEIGHTS,
    check_weights,
    combined_scores,
    plan_pair,
    two_d_dpo_losses,
    two_d_loss,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_combined_scores_normalise_then_weigh():
    # s = r/4 + 1: all 4 -> 2, all 0 -> 1.
    assert combined_scores([(4, 4, 4, 4, 4)], PAPER_WEIGHTS) == pytest.approx([2.0])
    assert combined_scores([(0, 0, 0, 0, 0)], PAPER_WEIGHTS) == pytest.approx([1.0])
    # 0.3*(1+2/4) + 0.4*(1+4/4) + 0.1*(1+4/4) + 0.1*(1+0) + 0.1*(1+1/4) = 0.45+0.8+0.2+0.1+0.125
    assert combined_scores([(2, 4, 4, 0, 1)], PAPER_WEIGHTS) == pytest.approx([1.675])
    # 1d-dpo's weights read helpfulness only.
    assert combined_scores([(2, 0, 0, 0, 0)], (1, 0, 0, 0, 0)) == pytest.approx([1.5])


def test_plan_pairs_best_chosen_with_worst_rejected_and_equivalent_beta():
    g_w, g_l = [2.0, 1.5, 1.75], [1.0, 1.25]
    plan = plan_pair(g_w, [True] * 3, g_l, [True] * 2, beta=0.1)
    assert plan.chosen == [0, 2]  # highest g first, N = min(3, 2) = 2
    assert plan.rejected == [0, 1]  # lowest g first
    bw, bl = 0.1 / ((2.0 + 1.75) / 2), 0.1 / ((1.0 + 1.25) / 2)
    assert plan.coef_chosen == pytest.approx([bw * 2.0, bw * 1.75])
    assert plan.coef_rejected == pytest.approx([bl * 1.0, bl * 1.25])
    # The coefficients average to beta on each side.
    assert sum(plan.coef_chosen) / 2 == pytest.approx(0.1)


def test_plan_ties_keep_segment_order_and_absent_segments_are_dropped():
    plan = plan_pair([1.5, 2.0, 1.5, 2.0], [True, True, True, True], [1.5, 1.5, 1.0], [True, True, True], 0.2)
    assert plan.chosen == [1, 3, 0]
    assert plan.rejected == [2, 0, 1]
    plan = plan_pair([2.0, 1.0], [False, True], [1.0, 1.0], [True, True], 0.2)
    assert plan.chosen == [1] and plan.rejected == [0]
    assert plan.coef_chosen == pytest.approx([0.2]) and plan.coef_rejected == pytest.approx([0.2])
    assert len(plan_pair([2.0], [False], [1.0], [True], 0.2)) == 0


def test_two_d_loss_of_one_pair_by_hand():
    # Chosen: segment 0 (all 4s, g=2) owns tokens 0,1; segment 1 (all 0s, g=1) owns token 2.
    # Rejected: segment 0 (g=1) token 0, segment 1 (g=2) tokens 1,2; one pad position.
    cw = torch.tensor([[0.5, -0.2, 1.0]], dtype=torch.float64)
    cl = torch.tensor([[0.3, 0.1, 0.4]], dtype=torch.float64)
    mw = torch.ones(1, 3, dtype=torch.float64)
    ml = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)  # token 2 of rejected is padding
    sw = torch.tensor([[0, 0, 1]])
    sl = torch.tensor([[0, 1, 1]])
    scores_w = [[(4, 4, 4, 4, 4), (0, 0, 0, 0, 0)]]
    scores_l = [[(0, 0, 0, 0, 0), (4, 4, 4, 4, 4)]]
    losses, n = two_d_dpo_losses(cw, cl, mw, ml, sw, sl, scores_w, scores_l, PAPER_WEIGHTS, beta=0.1)
    assert n == [2]
    # R_w = [0.3, 1.0] (g 2, 1); R_l = [0.3, 0.1] (g 1, 2; padding left out).
    # Chosen by g descending: seg0 (2), seg1 (1); rejected ascending: seg0 (1), seg1 (2).
    bw, bl = 0.1 / 1.5, 0.1 / 1.5
    z1 = bw * 2 * 0.3 - bl * 1 * 0.3
    z2 = bw * 1 * 1.0 - bl * 2 * 0.1
    assert losses.item() == pytest.approx(-(log_sigmoid(z1) + log_sigmoid(z2)), rel=1e-12)


def test_batch_mean_counts_a_pair_without_segment_pairs():
    cw = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    cl = torch.tensor([[-1.0], [-1.0]], dtype=torch.float64)
    ones = torch.ones(2, 1, dtype=torch.float64)
    seg = torch.tensor([[0], [-1]])  # the second chosen response's only token lies in no segment
    s = [[(4, 4, 4, 4, 4)], [(4, 4, 4, 4, 4)]]
    losses, n = two_d_dpo_losses(cw, cl, ones, ones, seg, torch.tensor([[0], [0]]), s, s, PAPER_WEIGHTS, 0.5)
    assert n == [1, 0]
    assert losses.tolist() == pytest.approx([-log_sigmoid(0.5 * 1.0 + 0.5 * 1.0), 0.0])


def test_full_loss_sft_term_and_metrics():
    # Two pairs, one segment per side each: the loss reduces to DPO's per pair.
    pol_c = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    pol_r = torch.tensor([[-3.0, 0.0], [-1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    ref_c = torch.tensor([[-1.5, -2.0], [-0.5, 0.0]], dtype=torch.float64)
    ref_r = torch.tensor([[-2.0, 0.0], [-1.5, -1.5]], dtype=torch.float64)
    mc = torch.tensor([[1, 1], [1, 0]])
    mr = torch.tensor([[1, 0], [1, 1]])
    seg = torch.zeros(2, 2, dtype=torch.long)
    sc = [[(3, 3, 4, 2, 1)], [(1, 0, 4, 0, 0)]]
    out = two_d_loss("2d-dpo", pol_c, pol_r, ref_c, ref_r, mc, mr, seg, seg, sc, sc, beta=0.1, sft_weight=0.1)
    # Log-ratios: chosen [0.5, 0.0], rejected [-1.0, 1.0]. One segment pair: coef = beta on both sides.
    pref = [-log_sigmoid(0.1 * (0.5 + 1.0)), -log_sigmoid(0.1 * (0.0 - 1.0))]
    nll = [(1.0 + 2.0) / 2, 0.5 / 1]
    assert out.loss.item() == pytest.approx(sum(pref) / 2 + 0.1 * sum(nll) / 2, rel=1e-12)
    p = {k: v.tolist() for k, v in out.per_pair.items()}
    assert p["rewards/chosen"] == pytest.approx([0.05, 0.0])
    assert p["rewards/rejected"] == pytest.approx([-0.1, 0.1])
    assert p["rewards/margins"] == pytest.approx([0.15, -0.1])
    assert p["rewards/accuracies"] == [1.0, 0.0]
    assert p["logps/chosen"] == pytest.approx([-3.0, -0.5])
    assert p["logps/rejected"] == pytest.approx([-3.0, -2.0])
    assert p["nll_loss"] == pytest.approx(nll)
    assert p["segments/pairs"] == [1.0, 1.0]
    assert p["kl/chosen"] == pytest.approx([0.5, 0.0])
    # The metric `loss` is the per-pair loss; its mean is the batch loss.
    assert sum(p["loss"]) / 2 == pytest.approx(out.loss.item(), rel=1e-12)
    out.loss.backward()
    # d/d pol_c[0,0] = (1/2) * (-0.1 * sigmoid(-z)) + 0.1 * (1/2) * (-1/2)
    z = 0.1 * 1.5
    expected = 0.5 * (-0.1 / (1 + math.exp(z))) + 0.1 * 0.5 * (-0.5)
    assert pol_c.grad[0, 0].item() == pytest.approx(expected, rel=1e-12)
    assert pol_c.grad[1, 1].item() == pytest.approx(0.0)  # masked position


def test_sft_weight_zero_and_1d_dpo_reads_helpfulness_only():
    pol = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -0.5]], dtype=torch.float64)
    m = torch.ones(1, 2)
    seg = torch.tensor([[0, 1]])
    # Chosen: seg0 helpful (h=4) but wrong (c=0); seg1 unhelpful (h=0) but right (c=4).
    sc_w = [[(4, 0, 4, 4, 4), (0, 4, 4, 4, 4)]]
    sc_l = [[(2, 2, 4, 2, 2), (2, 2, 4, 2, 2)]]
    out1 = two_d_loss("1d-dpo", pol, pol, ref, ref, m, m, seg, seg, sc_w, sc_l, beta=0.2, sft_weight=0.0)
    # 1d: g_w = [2, 1] -> order seg0, seg1; beta_w = 0.2/1.5; g_l = [1.5, 1.5] -> beta_l = 0.2/1.5.
    r = [0.5, -0.5]
    bw = 0.2 / 1.5
    z = [bw * 2 * r[0] - bw * 1.5 * r[0], bw * 1 * r[1] - bw * 1.5 * r[1]]
    assert out1.loss.item() == pytest.approx(-(log_sigmoid(z[0]) + log_sigmoid(z[1])), rel=1e-12)
    out2 = two_d_loss("2d-dpo", pol, pol, ref, ref, m, m, seg, seg, sc_w, sc_l, beta=0.2, sft_weight=0.0)
    assert out2.loss.item() != pytest.approx(out1.loss.item())


def test_weights_are_checked():
    assert check_weights([0.3, 0.4, 0.1, 0.1, 0.1]) == (0.3, 0.4, 0.1, 0.1, 0.1)
    for bad in ([0.5, 0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [-0.1, 0.5, 0.2, 0.2, 0.2]):
        with pytest.raises(ValueError):
            check_weights(bad)
    with pytest.raises(ValueError):
        two_d_loss("dpo", *[torch.zeros(1, 1)] * 6, torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), [[]], [[]])
