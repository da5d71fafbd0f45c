//! Loss tests on hand-made inputs. Expected numbers were derived by hand and
//! cross-checked with a PyTorch float64 re-implementation of TRL's formulas
//! and of the paper's Appendix B.3 loop (with explicit segments); the
//! derivation of each literal is in the comment next to it.

use super::*;
use candle_core::{Device, Var};

const TOL: f64 = 1e-9;

fn t2(rows: &[&[f64]]) -> Tensor {
    let t = rows[0].len();
    let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap()
}

fn t1(v: &[f64]) -> Tensor {
    Tensor::from_vec(v.to_vec(), v.len(), &Device::Cpu).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn assert_close(got: f64, want: f64, tol: f64, what: &str) {
    assert!((got - want).abs() <= tol, "{what}: got {got}, want {want} (diff {})", (got - want).abs());
}

fn softplus(x: f64) -> f64 {
    (1.0 + x.exp()).ln()
}

/// The fixtures' hyper-parameters: the paper's beta 0.2.
fn cfg(lt: LossType, sft_weight: f64) -> LossConfig {
    LossConfig { sft_weight, beta: 0.2, ..LossConfig::new(lt) }
}

/// Base fixture, one pair, beta 0.2.
/// chosen:   policy [-1, -2, pad -3], ref [-1.5, -2.5, pad -9], mask [1,1,0]
///           -> sum logp -3, log-ratio chosen_logratios = 1.0, mean logp -1.5, mean lr 0.5,
///              token KL [0.1, 0.2, pad 5] -> 0.3
/// rejected: policy [-2, -1, -1], ref [-1, -1, -0.5], mask [1,1,1]
///           -> sum logp -4, rejected_logratios = -1.5, mean logp -4/3, mean lr -0.5,
///              token KL [0.3, 0.1, 0.4] -> 0.8
/// KTO mismatched logps: policy [-3, -4], ref [-4, -4] -> z0 = 0.5.
fn base_batch() -> PreferenceBatch {
    let chosen = SideBatch {
        policy_logps: t2(&[&[-1.0, -2.0, -3.0]]),
        reference_logps: Some(t2(&[&[-1.5, -2.5, -9.0]])),
        mask: t2(&[&[1.0, 1.0, 0.0]]),
        token_kl: Some(t2(&[&[0.1, 0.2, 5.0]])),
        segments: None,
    };
    let rejected = SideBatch {
        policy_logps: t2(&[&[-2.0, -1.0, -1.0]]),
        reference_logps: Some(t2(&[&[-1.0, -1.0, -0.5]])),
        mask: t2(&[&[1.0, 1.0, 1.0]]),
        token_kl: Some(t2(&[&[0.3, 0.1, 0.4]])),
        segments: None,
    };
    PreferenceBatch { chosen, rejected, kto_kl: Some(KtoKl { policy_logps: t1(&[-3.0, -4.0]), reference_logps: t1(&[-4.0, -4.0]) }) }
}

fn pref_loss(lt: LossType, batch: &PreferenceBatch) -> f64 {
    compute_loss(&cfg(lt, 0.0), batch).unwrap().preference_loss
}

#[test]
fn loss_log_sigmoid_values_and_gradient_at_zero() {
    let x = Var::from_tensor(&t1(&[0.0, 2.0, -3.0, 100.0, -100.0])).unwrap();
    let y = log_sigmoid(x.as_tensor()).unwrap();
    let v = y.to_vec1::<f64>().unwrap();
    // log sigmoid(0) = -ln 2; log sigmoid(2) = -softplus(-2); log sigmoid(-3) = -softplus(3);
    // far tails: ~ -e^-100 and -100.
    let want = [-(2f64.ln()), -softplus(-2.0), -softplus(3.0), 0.0, -100.0];
    for (g, w) in v.iter().zip(want) {
        assert_close(*g, w, 1e-12, "log_sigmoid");
    }
    let grads = y.sum_all().unwrap().backward().unwrap();
    let g = grads.get(x.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
    // d/dx log sigmoid(x) = sigmoid(-x): 0.5 at 0 (not 1.5 or -0.5 from |x|'s kink).
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let want = [0.5, sig(-2.0), sig(3.0), 0.0, 1.0];
    for (g, w) in g.iter().zip(want) {
        assert_close(*g, w, 1e-12, "log_sigmoid gradient");
    }
}

#[test]
fn loss_type_names_and_needs() {
    for lt in LossType::ALL {
        assert_eq!(lt.to_string().parse::<LossType>().unwrap(), lt);
        let json = serde_json::to_string(&lt).unwrap();
        assert_eq!(json, format!("\"{lt}\""));
        assert_eq!(serde_json::from_str::<LossType>(&json).unwrap(), lt);
    }
    let names: Vec<String> = LossType::ALL.iter().map(|t| t.to_string()).collect();
    assert_eq!(names, ["dpo", "ipo", "kto", "orpo", "simpo", "tdpo1", "tdpo2", "1d-dpo", "2d-dpo"]);
    let err = "dpo2".parse::<LossType>().unwrap_err().to_string();
    assert!(err.contains("unknown loss type 'dpo2'") && err.contains("2d-dpo"), "{err}");

    let refs: Vec<bool> = LossType::ALL.iter().map(|t| t.needs_reference()).collect();
    assert_eq!(refs, [true, true, true, false, false, true, true, true, true]);
    let kl: Vec<LossType> = LossType::ALL.into_iter().filter(|t| t.needs_token_kl()).collect();
    assert_eq!(kl, [LossType::Tdpo1, LossType::Tdpo2]);
    let seg: Vec<LossType> = LossType::ALL.into_iter().filter(|t| t.needs_segment_scores()).collect();
    assert_eq!(seg, [LossType::OneDDpo, LossType::TwoDDpo]);
    let no_sft: Vec<LossType> = LossType::ALL.into_iter().filter(|t| !t.uses_sft_term()).collect();
    assert_eq!(no_sft, [LossType::Orpo]);
    assert!(LossType::Kto.needs_kto_kl() && !LossType::Dpo.needs_kto_kl());

    assert!(LossType::Dpo.check_data(false).is_ok());
    assert!(LossType::TwoDDpo.check_data(true).is_ok());
    let err = LossType::TwoDDpo.check_data(false).unwrap_err().to_string();
    assert!(err.contains("2d-dpo needs segment-level") && err.contains("--loss-type dpo"), "{err}");
}

#[test]
fn loss_config_validation() {
    let mut c = LossConfig::new(LossType::TwoDDpo);
    assert!(c.validate().is_ok());
    c.beta = 0.0;
    assert!(c.validate().is_err());
    c.beta = 0.2;
    c.label_smoothing = 0.5;
    assert!(c.validate().is_err());
    assert_eq!(LossConfig::new(LossType::OneDDpo).effective_aspect_weights(), AspectWeights::HELPFULNESS_ONLY);
}

#[test]
fn loss_dpo_hand_values() {
    let b = base_batch();
    // h = chosen_logratios - rejected_logratios = 1 - (-1.5) = 2.5; z = beta h = 0.5; -log sigmoid(0.5) = ln(1 + e^-0.5)
    assert_close(pref_loss(LossType::Dpo, &b), 0.4740769841801067, TOL, "dpo");
    // label smoothing 0.1: 0.9 softplus(-0.5) + 0.1 softplus(0.5)
    let c = LossConfig { label_smoothing: 0.1, ..cfg(LossType::Dpo, 0.0) };
    assert_close(compute_loss(&c, &b).unwrap().preference_loss, 0.5240769841801067, TOL, "cdpo");
}

#[test]
fn loss_sft_term_and_metrics() {
    let b = base_batch();
    let out = compute_loss(&cfg(LossType::Dpo, 0.1), &b).unwrap();
    // NLL of chosen = -mean(-1, -2) = 1.5; loss = 0.47407698 + 0.1 * 1.5
    assert_close(out.sft_loss, 1.5, TOL, "sft_loss");
    assert_close(scalar(&out.loss), 0.4740769841801067 + 0.15, TOL, "loss with sft");
    let m: std::collections::HashMap<&str, f64> = out.metrics().into_iter().collect();
    // rewards = beta * summed log-ratio: 0.2 * 1 and 0.2 * -1.5
    assert_close(m["rewards/chosen"], 0.2, TOL, "rewards/chosen");
    assert_close(m["rewards/rejected"], -0.3, TOL, "rewards/rejected");
    assert_close(m["rewards/margins"], 0.5, TOL, "rewards/margins");
    assert_close(m["rewards/accuracies"], 1.0, TOL, "rewards/accuracies");
    assert_close(m["logps/chosen"], -3.0, TOL, "logps/chosen");
    assert_close(m["logps/rejected"], -4.0, TOL, "logps/rejected");
    assert_close(m["nll_loss"], 1.5, TOL, "nll_loss");
    assert_close(m["loss"], 0.6240769841801067, TOL, "loss metric");
}

#[test]
fn loss_ipo_kto_orpo_simpo_tdpo_hand_values() {
    let b = base_batch();
    // IPO: h = mean chosen_logratios - mean rejected_logratios = 0.5 - (-0.5) = 1; (1 - 1/(2*0.2))^2 = (-1.5)^2
    assert_close(pref_loss(LossType::Ipo, &b), 2.25, TOL, "ipo");
    // KTO: z0 = max(0, mean([-3+4, -4+4])) = 0.5;
    // ((1 - sig(0.2 (1 - 0.5))) + (1 - sig(0.2 (0.5 + 1.5)))) / 2 = (1 - sig(0.1) + 1 - sig(0.4)) / 2
    let out = compute_loss(&cfg(LossType::Kto, 0.0), &b).unwrap();
    assert_close(out.preference_loss, 0.438166576204304, TOL, "kto");
    assert_close(out.extra.iter().find(|(k, _)| *k == "kl").unwrap().1, 0.5, TOL, "kto kl");
    // KTO z0 is clamped at 0: mean(policy - ref) = -1 gives z0 = 0 -> (1 - sig(0.2) + 1 - sig(0.3)) / 2
    let mut b0 = base_batch();
    b0.kto_kl = Some(KtoKl { policy_logps: t1(&[-5.0]), reference_logps: t1(&[-4.0]) });
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    assert_close(pref_loss(LossType::Kto, &b0), (2.0 - sig(0.2) - sig(0.3)) / 2.0, TOL, "kto z0 clamp");
    // KTO weights: desirable 2, undesirable 0.5
    let c = LossConfig { desirable_weight: 2.0, undesirable_weight: 0.5, ..cfg(LossType::Kto, 0.0) };
    let want = (2.0 * (1.0 - sig(0.1)) + 0.5 * (1.0 - sig(0.4))) / 2.0;
    assert_close(compute_loss(&c, &b).unwrap().preference_loss, want, TOL, "kto weights");

    // ORPO: a_w = -1.5, a_l = -4/3; log_odds = (a_w - a_l) - (ln(1-e^a_w) - ln(1-e^a_l))
    //       = -0.22016215105; odds-ratio term = -0.2 log sigmoid(log_odds) = 0.161854996;
    // loss = NLL 1.5 + that, whatever sft_weight says (ORPO has no extra SFT term).
    let out = compute_loss(&cfg(LossType::Orpo, 0.1), &b).unwrap();
    assert_close(out.preference_loss, 0.16185499604713388, TOL, "orpo term");
    assert_close(scalar(&out.loss), 1.5 + 0.16185499604713388, TOL, "orpo loss");
    assert_close(out.sft_coefficient, 1.0, TOL, "orpo nll weight");
    // reference-free rewards: beta * mean logp = 0.2 * -1.5, 0.2 * -4/3
    assert_close(out.pairs.rewards_chosen[0], -0.3, TOL, "orpo reward");
    assert_close(out.pairs.rewards_rejected[0], -0.2 * 4.0 / 3.0, TOL, "orpo reward");

    // SimPO: z = 0.2 (-1.5 + 4/3) - 0.5 = -0.5333..; -log sigmoid(z) = softplus(0.5333..)
    assert_close(pref_loss(LossType::Simpo, &b), 0.9949558259620905, TOL, "simpo");
    let c = LossConfig { simpo_gamma: 0.0, ..cfg(LossType::Simpo, 0.0) };
    assert_close(compute_loss(&c, &b).unwrap().preference_loss, softplus(0.2 / 6.0), TOL, "simpo gamma 0");

    // TDPO1: logits = 2.5 - (0.8 - 0.3) = 2.0 -> softplus(-0.4)
    assert_close(pref_loss(LossType::Tdpo1, &b), 0.5130152523999526, TOL, "tdpo1");
    // TDPO2, alpha 0.5: logits = 2.5 - 0.5 (0.8 - 0.3) = 2.25 -> softplus(-0.45)
    assert_close(pref_loss(LossType::Tdpo2, &b), 0.4932489459974549, TOL, "tdpo2");
}

#[test]
fn loss_tdpo2_detaches_chosen_kl() {
    for (lt, chosen_kl_has_grad) in [(LossType::Tdpo1, true), (LossType::Tdpo2, false)] {
        let mut b = base_batch();
        let kw = Var::from_tensor(b.chosen.token_kl.as_ref().unwrap()).unwrap();
        let kl = Var::from_tensor(b.rejected.token_kl.as_ref().unwrap()).unwrap();
        b.chosen.token_kl = Some(kw.as_tensor().clone());
        b.rejected.token_kl = Some(kl.as_tensor().clone());
        let out = compute_loss(&cfg(lt, 0.0), &b).unwrap();
        let grads = out.loss.backward().unwrap();
        let gw = grads.get(kw.as_tensor()).map(|g| g.abs().unwrap().sum_all().unwrap());
        let gw = gw.map(|g| scalar(&g)).unwrap_or(0.0);
        assert_eq!(gw > 0.0, chosen_kl_has_grad, "{lt}: chosen KL gradient {gw}");
        let gl = scalar(&grads.get(kl.as_tensor()).unwrap().abs().unwrap().sum_all().unwrap());
        assert!(gl > 0.0, "{lt}: rejected KL must get a gradient");
    }
}

#[test]
fn loss_missing_inputs_are_clear_errors() {
    let mut b = base_batch();
    b.chosen.reference_logps = None;
    let e = format!("{:#}", compute_loss(&cfg(LossType::Dpo, 0.1), &b).unwrap_err());
    assert!(e.contains("needs reference log-probs for the chosen"), "{e}");
    // reference-free losses do not need it
    assert!(compute_loss(&cfg(LossType::Simpo, 0.1), &b).is_ok());
    let mut b = base_batch();
    b.rejected.token_kl = None;
    let e = format!("{:#}", compute_loss(&cfg(LossType::Tdpo2, 0.1), &b).unwrap_err());
    assert!(e.contains("per-token KL"), "{e}");
    let mut b = base_batch();
    b.kto_kl = None;
    assert!(format!("{:#}", compute_loss(&cfg(LossType::Kto, 0.1), &b).unwrap_err()).contains("mismatched"));
    let e = format!("{:#}", compute_loss(&cfg(LossType::TwoDDpo, 0.1), &base_batch()).unwrap_err());
    assert!(e.contains("needs segment ids and scores"), "{e}");
    let mut b = base_batch();
    b.chosen.mask = t2(&[&[1.0, 1.0]]);
    let e = format!("{:#}", compute_loss(&cfg(LossType::Dpo, 0.1), &b).unwrap_err());
    assert!(e.contains("chosen mask has shape"), "{e}");
}

// ---------------------------------------------------------------------------
// 2-D DPO

/// One side of a 2-D pair: per-token log-ratios `rho` (policy = rho - 1,
/// ref = -1), segment ids, scores.
struct Side2 {
    rho: Vec<f64>,
    ids: Vec<u32>,
    scores: Vec<[u8; 5]>,
}

fn side2(rho: &[f64], ids: &[u32], scores: &[[u8; 5]]) -> Side2 {
    Side2 { rho: rho.to_vec(), ids: ids.to_vec(), scores: scores.to_vec() }
}

/// Pads each pair's side to the longest with `pad` extra masked positions
/// carrying garbage values and out-of-range segment ids (they must not matter).
fn side_batch_2d(sides: &[&Side2], pad: usize) -> SideBatch {
    let t = sides.iter().map(|s| s.rho.len()).max().unwrap() + pad;
    let (mut pol, mut rf, mut mask, mut ids) = (vec![], vec![], vec![], vec![]);
    for s in sides {
        let mut ids_row = s.ids.clone();
        for i in 0..t {
            if i < s.rho.len() {
                pol.push(s.rho[i] - 1.0);
                rf.push(-1.0);
                mask.push(1.0);
            } else {
                pol.push(-7.0 + i as f64);
                rf.push(3.0);
                mask.push(0.0);
                ids_row.push(if i % 2 == 0 { 0 } else { 99 });
            }
        }
        ids.push(ids_row);
    }
    let b = sides.len();
    let tensor = |v: Vec<f64>| Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap();
    SideBatch {
        policy_logps: tensor(pol),
        reference_logps: Some(tensor(rf)),
        mask: tensor(mask),
        token_kl: None,
        segments: Some(SegmentBatch::new(ids, sides.iter().map(|s| s.scores.clone()).collect()).unwrap()),
    }
}

fn batch_2d(pairs: &[(&Side2, &Side2)], pad: usize) -> PreferenceBatch {
    let w: Vec<&Side2> = pairs.iter().map(|p| p.0).collect();
    let l: Vec<&Side2> = pairs.iter().map(|p| p.1).collect();
    PreferenceBatch { chosen: side_batch_2d(&w, pad), rejected: side_batch_2d(&l, pad), kto_kl: None }
}

/// Pair A: chosen 3 segments, rejected 2.
/// chosen rho [0.5,-0.2 | 0.3,0.1 | -0.4,0.25] -> R_w = [0.3, 0.4, -0.15]
///   scores [4,4,4,4,4] g=2.0; [2,2,4,2,2] g=1.55; [0,0,0,0,0] (safety fail) g=1.0
/// rejected rho [-0.3,0.2 | -0.6,0.15] -> R_l = [-0.1, -0.45]
///   scores [3,3,4,3,3] g=1.775; [1,0,0,1,1] g=1.125
fn pair_a() -> (Side2, Side2) {
    (
        side2(&[0.5, -0.2, 0.3, 0.1, -0.4, 0.25], &[0, 0, 1, 1, 2, 2], &[[4; 5], [2, 2, 4, 2, 2], [0; 5]]),
        side2(&[-0.3, 0.2, -0.6, 0.15], &[0, 0, 1, 1], &[[3, 3, 4, 3, 3], [1, 0, 0, 1, 1]]),
    )
}

/// Pair A's 2D-DPO loss, W = paper, beta 0.2: N = 2; chosen by g desc: seg 0
/// (2.0), seg 1 (1.55); rejected by g asc: seg 1 (1.125), seg 0 (1.775);
/// beta_w = 0.2/1.775, beta_l = 0.2/1.45;
/// L = -log sig(beta_w*2.0*0.3 - beta_l*1.125*(-0.45))
///     -log sig(beta_w*1.55*0.4 - beta_l*1.775*(-0.1)).
const PAIR_A_2D: f64 = 1.2738780620735008;
/// Same with W = [1,0,0,0,0]: g_w = [2, 1.5, 1], g_l = [1.75, 1.25].
const PAIR_A_1D: f64 = 1.2721860896475659;

/// Pair B: one chosen segment vs three rejected (N = 1).
/// chosen R_w = 0.2 (g irrelevant: N = 1 gives coefficient beta);
/// rejected scores g = [1.55, 1.175, 2.0]: lowest is seg 1 with R_l = -0.1 + 0.5 = 0.4;
/// L = -log sig(0.2 * (0.2 - 0.4)) = softplus(0.04).
fn pair_b() -> (Side2, Side2) {
    (
        side2(&[0.2, 0.1, -0.1], &[0, 0, 0], &[[3, 4, 4, 3, 2]]),
        side2(&[0.4, -0.1, 0.5, 0.2, 0.05], &[0, 1, 1, 2, 2], &[[2, 2, 4, 1, 3], [0, 1, 0, 1, 2], [4; 5]]),
    )
}
const PAIR_B_2D: f64 = 0.713347167228034;

#[test]
fn loss_2d_pair_hand_values() {
    let (w, l) = pair_a();
    let out = compute_loss(&cfg(LossType::TwoDDpo, 0.0), &batch_2d(&[(&w, &l)], 0)).unwrap();
    assert_close(out.preference_loss, PAIR_A_2D, TOL, "2d pair A");
    assert_eq!(out.pairs.segment_pairs, Some(vec![2]));
    // the 2-D metrics stay response-level: beta * sum rho
    assert_close(out.pairs.rewards_chosen[0], 0.2 * 0.55, TOL, "2d reward chosen");
    assert_close(out.pairs.rewards_rejected[0], 0.2 * -0.55, TOL, "2d reward rejected");
    assert_close(pref_loss(LossType::OneDDpo, &batch_2d(&[(&w, &l)], 0)), PAIR_A_1D, TOL, "1d pair A");
    let (w, l) = pair_b();
    let out = compute_loss(&cfg(LossType::TwoDDpo, 0.0), &batch_2d(&[(&w, &l)], 0)).unwrap();
    assert_close(out.preference_loss, PAIR_B_2D, TOL, "2d pair B");
    assert_close(out.preference_loss, softplus(0.04), TOL, "2d pair B closed form");
    assert_eq!(out.pairs.segment_pairs, Some(vec![1]));
}

#[test]
fn loss_1d_equals_2d_with_helpfulness_weights() {
    let (w, l) = pair_a();
    let (w2, l2) = pair_b();
    let b = batch_2d(&[(&w, &l), (&w2, &l2)], 1);
    let c2 = LossConfig { aspect_weights: AspectWeights::HELPFULNESS_ONLY, ..cfg(LossType::TwoDDpo, 0.1) };
    let one = compute_loss(&cfg(LossType::OneDDpo, 0.1), &b).unwrap();
    let two = compute_loss(&c2, &b).unwrap();
    assert_close(scalar(&one.loss), scalar(&two.loss), 1e-12, "1d == 2d with W=[1,0,0,0,0]");
    // and 1d-dpo ignores the configured aspect weights
    let c1 = LossConfig { aspect_weights: AspectWeights::PAPER, ..cfg(LossType::OneDDpo, 0.1) };
    assert_close(scalar(&compute_loss(&c1, &b).unwrap().loss), scalar(&one.loss), 1e-12, "1d ignores W");
}

#[test]
fn loss_2d_single_segments_equal_dpo() {
    // With one segment per side, N = 1, beta_w g_w = beta_l g_l = beta and
    // R = the whole response's log-ratio: 2D-DPO is exactly DPO.
    let w = side2(&[0.5, -0.2, 0.3], &[0, 0, 0], &[[4, 3, 4, 2, 1]]);
    let l = side2(&[-0.3, 0.2], &[0, 0], &[[0, 1, 0, 0, 2]]);
    let b = batch_2d(&[(&w, &l)], 2);
    let d = compute_loss(&cfg(LossType::Dpo, 0.1), &b).unwrap();
    let t = compute_loss(&cfg(LossType::TwoDDpo, 0.1), &b).unwrap();
    assert_close(scalar(&t.loss), scalar(&d.loss), 1e-12, "2d N=1 == dpo");
    // = softplus(-0.2 * (0.6 - (-0.1))) + 0.1 * NLL
    assert_close(t.preference_loss, softplus(-0.14), TOL, "2d N=1 closed form");
}

#[test]
fn loss_2d_equal_scores_reduce_to_segment_dpo() {
    // All g equal (any constant c): beta_w = beta_l = beta / c, so every
    // coefficient is beta and, ties keeping segment order, segment i of the
    // chosen response is paired with segment i of the rejected one:
    // L = -sum_i log sig(beta (R_w(i) - R_l(i))), here i < N = 2.
    let (mut w, mut l) = pair_a();
    // R_w = [0.3, 0.4, -0.15], R_l = [-0.1, -0.45]
    let want = softplus(-0.2 * (0.3 + 0.1)) + softplus(-0.2 * (0.4 + 0.45));
    for s in [[2u8; 5], [0u8; 5], [4, 1, 4, 0, 3]] {
        w.scores = vec![s; 3];
        l.scores = vec![s; 2];
        let got = pref_loss(LossType::TwoDDpo, &batch_2d(&[(&w, &l)], 0));
        assert_close(got, want, TOL, &format!("equal scores {s:?}"));
    }
}

#[test]
fn loss_2d_plan_selection_and_equivalent_beta() {
    // g_w = [1.2, 1.9, 1.5, 1.0], g_l = [1.6, 1.1, 1.3]; N = 3.
    let p = plan_pair(&[1.2, 1.9, 1.5, 1.0], &[true; 4], &[1.6, 1.1, 1.3], &[true; 3], 0.2);
    assert_eq!(p.chosen, [1, 2, 0]);
    assert_eq!(p.rejected, [1, 2, 0]);
    // beta_w = 0.2 / mean(1.9, 1.5, 1.2) = 0.2 / 1.5333..; coef = beta_w * g
    let bw = 0.2 / (4.6 / 3.0);
    for (c, g) in p.coef_chosen.iter().zip([1.9, 1.5, 1.2]) {
        assert_close(*c, bw * g, 1e-12, "coef chosen");
    }
    // equivalence: the selected coefficients average to beta on each side
    assert_close(p.coef_chosen.iter().sum::<f64>() / 3.0, 0.2, 1e-12, "mean coef chosen");
    assert_close(p.coef_rejected.iter().sum::<f64>() / 3.0, 0.2, 1e-12, "mean coef rejected");
    // absent segments (no tokens) are not candidates
    let p = plan_pair(&[1.2, 1.9, 1.5], &[true, false, true], &[1.6, 1.1, 1.3], &[true; 3], 0.2);
    assert_eq!((p.chosen.as_slice(), p.rejected.as_slice()), (&[2, 0][..], &[1, 2][..]));
    // an empty side gives N = 0
    assert!(plan_pair(&[], &[], &[1.0], &[true], 0.2).is_empty());
    // combined scores: s = r/4 + 1, weighted
    let g = combined_scores(&[[4; 5], [0; 5], [2, 2, 4, 2, 2]], &AspectWeights::PAPER);
    for (a, b) in g.iter().zip([2.0, 1.0, 1.55]) {
        assert_close(*a, b, 1e-12, "g");
    }
}

#[test]
fn loss_2d_safety_fail_segment_is_not_selected_when_chosen_is_longer() {
    // Chosen has two segments, identical but for a safety fail in the first;
    // the rejected response has one: N = 1 and the safe chosen segment wins,
    // so the loss equals that of the chosen response cut to its safe segment.
    let w = side2(&[0.9, 0.9, -0.2, 0.1], &[0, 0, 1, 1], &[[3, 3, 0, 3, 3], [3, 3, 4, 3, 3]]);
    let l = side2(&[0.1, -0.3], &[0, 0], &[[1, 1, 4, 1, 1]]);
    let got = pref_loss(LossType::TwoDDpo, &batch_2d(&[(&w, &l)], 0));
    // N = 1: -log sig(0.2 * (R_w(seg 1) - R_l)) = softplus(-0.2 * (-0.1 + 0.2))
    assert_close(got, softplus(-0.02), TOL, "safety fail skipped");
    let only_safe = side2(&[-0.2, 0.1], &[0, 0], &[[3, 3, 4, 3, 3]]);
    assert_close(pref_loss(LossType::TwoDDpo, &batch_2d(&[(&only_safe, &l)], 0)), got, TOL, "cut");
}

#[test]
fn loss_2d_long_rejected_side_and_absent_segments() {
    // Chosen: 1 segment; rejected: 10 segments, the lowest g (all zeros) is seg 7.
    let w = side2(&[0.3, 0.2], &[0, 0], &[[4; 5]]);
    let mut scores = vec![[3u8; 5]; 10];
    scores[7] = [0; 5];
    scores[2] = [1; 5];
    let rho: Vec<f64> = (0..20).map(|i| 0.01 * i as f64).collect();
    let ids: Vec<u32> = (0..20).map(|i| i / 2).collect();
    let l = side2(&rho, &ids, &scores);
    let out = compute_loss(&cfg(LossType::TwoDDpo, 0.0), &batch_2d(&[(&w, &l)], 0)).unwrap();
    // R_l(seg 7) = 0.14 + 0.15 = 0.29; L = softplus(-0.2 * (0.5 - 0.29))
    assert_close(out.preference_loss, softplus(-0.2 * 0.21), TOL, "1 vs 10 segments");
    assert_eq!(out.pairs.segment_pairs, Some(vec![1]));

    // Rejected seg 7's tokens are in no segment (NO_SEGMENT): seg 7 has no
    // tokens, so it is absent and the next lowest (seg 2, R = 0.04 + 0.05) is used.
    let mut l2 = side2(&rho, &ids, &scores);
    l2.ids[14] = NO_SEGMENT;
    l2.ids[15] = NO_SEGMENT;
    let got = pref_loss(LossType::TwoDDpo, &batch_2d(&[(&w, &l2)], 0));
    assert_close(got, softplus(-0.2 * (0.5 - 0.09)), TOL, "absent segment skipped");
}

#[test]
fn loss_2d_pair_without_segments_counts_zero_in_the_mean() {
    // As in the paper's code, a pair with no segment on one side adds 0 but
    // still counts in the batch size.
    let (w, l) = pair_a();
    let empty = side2(&[0.1, 0.2], &[NO_SEGMENT, NO_SEGMENT], &[[4; 5]]);
    let out = compute_loss(&cfg(LossType::TwoDDpo, 0.0), &batch_2d(&[(&w, &l), (&empty, &l)], 0)).unwrap();
    assert_close(out.preference_loss, PAIR_A_2D / 2.0, TOL, "N = 0 pair");
    assert_eq!(out.pairs.segment_pairs, Some(vec![2, 0]));
    // all pairs empty: loss 0, no NaN
    let out = compute_loss(&cfg(LossType::TwoDDpo, 0.0), &batch_2d(&[(&empty, &l)], 0)).unwrap();
    assert_close(out.preference_loss, 0.0, 0.0, "all empty");
}

#[test]
fn loss_2d_bad_segment_id_is_an_error() {
    let (mut w, l) = pair_a();
    w.ids[3] = 5;
    let e = format!("{:#}", compute_loss(&cfg(LossType::TwoDDpo, 0.1), &batch_2d(&[(&w, &l)], 0)).unwrap_err());
    assert!(e.contains("segment id 5") && e.contains("chosen"), "{e}");
    assert!(SegmentBatch::new(vec![vec![0]], vec![vec![[5, 0, 0, 0, 0]]]).is_err());
    assert!(SegmentBatch::new(vec![vec![0]], vec![]).is_err());
}

#[test]
fn loss_2d_from_tensors() {
    let ids = Tensor::new(&[[0u32, 0, 1, 9]], &Device::Cpu).unwrap();
    let scores = Tensor::new(&[[[4f32, 3., 4., 2., 1.], [0., 0., 0., 0., 0.], [9., 9., 9., 9., 9.]]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1f32, 1., 0.]], &Device::Cpu).unwrap();
    let s = SegmentBatch::from_tensors(&ids, &scores, &mask).unwrap();
    assert_eq!(s.scores, vec![vec![[4, 3, 4, 2, 1], [0; 5]]]);
    assert_eq!(s.token_segments, vec![vec![0, 0, 1, 9]]);
    let bad = Tensor::new(&[[0f32, 1., 1.]], &Device::Cpu).unwrap();
    assert!(SegmentBatch::from_tensors(&ids, &scores, &bad).is_err());
}

/// Every loss type on a batch with pair A and pair B (plus token KL).
fn all_losses_batch(pairs: &[(&Side2, &Side2)], pad: usize) -> PreferenceBatch {
    let mut b = batch_2d(pairs, pad);
    for side in [&mut b.chosen, &mut b.rejected] {
        // a token KL that depends on the position, masked like the rest
        let kl = (side.policy_logps.abs().unwrap() * 0.1).unwrap();
        side.token_kl = Some(kl);
    }
    b.kto_kl = Some(KtoKl { policy_logps: t1(&[-3.0, -4.0]), reference_logps: t1(&[-4.0, -4.0]) });
    b
}

#[test]
fn loss_every_type_ignores_padding_and_averages_pairs() {
    let (wa, la) = pair_a();
    let (wb, lb) = pair_b();
    for lt in LossType::ALL {
        let c = cfg(lt, 0.1);
        let run =
            |pairs: &[(&Side2, &Side2)], pad: usize| -> f64 { scalar(&compute_loss(&c, &all_losses_batch(pairs, pad)).unwrap().loss) };
        let a = run(&[(&wa, &la)], 0);
        let b = run(&[(&wb, &lb)], 0);
        assert!(a.is_finite() && b.is_finite(), "{lt}: {a} {b}");
        // padding: extra masked positions with garbage values change nothing
        assert_close(run(&[(&wa, &la)], 3), a, 1e-12, &format!("{lt}: padding"));
        // the batch loss (preference + SFT) is the mean of the pairs' losses
        assert_close(run(&[(&wa, &la), (&wb, &lb)], 2), (a + b) / 2.0, 1e-12, &format!("{lt}: batch mean"));
    }
    // the 2-D batch matches the hand values
    let c = cfg(LossType::TwoDDpo, 0.0);
    let got = compute_loss(&c, &batch_2d(&[(&wa, &la), (&wb, &lb)], 1)).unwrap().preference_loss;
    assert_close(got, (PAIR_A_2D + PAIR_B_2D) / 2.0, TOL, "2d batch of two");
}

/// Central finite differences of `f` at `x` (flattened), step `h`.
fn finite_diff(x: &[f64], shape: (usize, usize), h: f64, f: &dyn Fn(&Tensor) -> f64) -> Vec<f64> {
    (0..x.len())
        .map(|i| {
            let mut xp = x.to_vec();
            let mut xm = x.to_vec();
            xp[i] += h;
            xm[i] -= h;
            let tp = Tensor::from_vec(xp, shape, &Device::Cpu).unwrap();
            let tm = Tensor::from_vec(xm, shape, &Device::Cpu).unwrap();
            (f(&tp) - f(&tm)) / (2.0 * h)
        })
        .collect()
}

#[test]
fn loss_2d_gradient_matches_finite_differences() {
    let (wa, la) = pair_a();
    let (wb, lb) = pair_b();
    let base = batch_2d(&[(&wa, &la), (&wb, &lb)], 1);
    // Larger log-ratios so that the sigmoids are away from 1/2.
    let scale = |t: &Tensor| (t * 3.0).unwrap();
    let c = cfg(LossType::TwoDDpo, 0.1);
    for side_is_chosen in [true, false] {
        let x0 = {
            let s = if side_is_chosen { &base.chosen } else { &base.rejected };
            scale(&s.policy_logps)
        };
        let shape = x0.dims2().unwrap();
        let with = |x: &Tensor| -> PreferenceBatch {
            let mut b = base.clone();
            if side_is_chosen {
                b.chosen.policy_logps = x.clone();
            } else {
                b.rejected.policy_logps = x.clone();
            }
            b
        };
        let var = Var::from_tensor(&x0).unwrap();
        let out = compute_loss(&c, &with(var.as_tensor())).unwrap();
        let grads = out.loss.backward().unwrap();
        let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let f = |x: &Tensor| scalar(&compute_loss(&c, &with(x)).unwrap().loss);
        let x: Vec<f64> = x0.flatten_all().unwrap().to_vec1().unwrap();
        let fd = finite_diff(&x, shape, 1e-5, &f);
        let mask: Vec<f64> = {
            let s = if side_is_chosen { &base.chosen } else { &base.rejected };
            s.mask.flatten_all().unwrap().to_vec1().unwrap()
        };
        for i in 0..x.len() {
            assert_close(g[i], fd[i], 1e-7, &format!("grad chosen={side_is_chosen} [{i}]"));
            if mask[i] == 0.0 {
                assert_eq!(g[i], 0.0, "masked position {i} must get no gradient");
            }
        }
        assert!(g.iter().any(|v| v.abs() > 1e-3), "gradient should not vanish");
    }
}

#[test]
fn loss_token_kl_values_and_gradient() {
    // One position, V = 3: policy logits [1, 2, 4], reference [0, 1, 0].
    // ref p = softmax([0,1,0]) = [1, e, 1] / (2 + e); KL = sum p (log p - log q)
    let pl = Tensor::new(&[[[1.0f64, 2.0, 4.0], [0.5, 0.5, 0.5]]], &Device::Cpu).unwrap();
    let rl = Tensor::new(&[[[0.0f64, 1.0, 0.0], [3.0, -1.0, 0.0]]], &Device::Cpu).unwrap();
    let kl = token_kl(&pl, &rl).unwrap();
    assert_eq!(kl.dims(), &[1, 2]);
    let kl = kl.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let direct = |p: [f64; 3], r: [f64; 3]| -> f64 {
        let lse = |v: [f64; 3]| v.iter().map(|x| x.exp()).sum::<f64>().ln();
        let (lp, lr) = (lse(p), lse(r));
        (0..3).map(|i| (r[i] - lr).exp() * ((r[i] - lr) - (p[i] - lp))).sum()
    };
    assert_close(kl[0], direct([1.0, 2.0, 4.0], [0.0, 1.0, 0.0]), 1e-12, "kl[0]");
    assert_close(kl[1], direct([0.5, 0.5, 0.5], [3.0, -1.0, 0.0]), 1e-12, "kl[1]");
    // equal logits -> KL 0
    let z = token_kl(&rl, &rl).unwrap().abs().unwrap().sum_all().unwrap();
    assert_close(scalar(&z), 0.0, 1e-12, "kl of identical");
    // gradient w.r.t. policy logits vs finite differences (of sum of KL * weights)
    let wts = Tensor::new(&[[1.0f64, -0.7]], &Device::Cpu).unwrap();
    let var = Var::from_tensor(&pl).unwrap();
    let y = (token_kl(var.as_tensor(), &rl).unwrap() * &wts).unwrap().sum_all().unwrap();
    let g = y.backward().unwrap().get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let x: Vec<f64> = pl.flatten_all().unwrap().to_vec1().unwrap();
    let f = |x: &Tensor| {
        let x = x.reshape((1, 2, 3)).unwrap();
        scalar(&(token_kl(&x, &rl).unwrap() * &wts).unwrap().sum_all().unwrap())
    };
    let fd = finite_diff(&x, (1, 6), 1e-5, &f);
    for i in 0..6 {
        assert_close(g[i], fd[i], 1e-8, &format!("token_kl grad [{i}]"));
    }
}
