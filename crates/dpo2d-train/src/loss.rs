//! Preference losses: DPO, IPO, KTO, ORPO, SimPO, TDPO1/2, 1D-DPO and 2D-DPO,
//! each plus the SFT term on the chosen response (all but ORPO).
//!
//! # Public API
//!
//! * [`LossType`]: `dpo | ipo | kto | orpo | simpo | tdpo1 | tdpo2 | 1d-dpo | 2d-dpo`
//!   (`FromStr`/`Display`/serde use exactly these names). Its `needs_*` methods
//!   tell the trainer which inputs to prepare: [`LossType::needs_reference`]
//!   (per-token reference log-probs), [`LossType::needs_token_kl`] (full
//!   next-token distributions of policy and reference: TDPO),
//!   [`LossType::needs_segment_scores`] (2-D data), [`LossType::needs_kto_kl`]
//!   (mismatched prompt/completion log-probs: KTO). [`LossType::check_data`]
//!   refuses plain TRL-shaped data for the 2-D losses with a clear message.
//! * [`LossConfig`]: `beta`, `label_smoothing`, `simpo_gamma`, `tdpo_alpha`,
//!   `desirable_weight`, `undesirable_weight`, `sft_weight`, `aspect_weights`
//!   ([`AspectWeights`]); [`LossConfig::new`] gives the paper's defaults.
//! * Inputs: [`PreferenceBatch`] = a [`SideBatch`] for chosen and for rejected
//!   (per-token tensors `[B,T]`; `T` may differ between the sides) plus, for
//!   KTO, [`KtoKl`]. 2-D losses read [`SegmentBatch`] (explicit per-token
//!   segment ids and per-segment raw 0..4 scores) from each side.
//! * [`compute_loss`] returns [`LossOutput`]: the differentiable scalar `loss`
//!   (preference loss + `sft_weight` * SFT loss), the plain numbers
//!   `preference_loss` and `sft_loss`, and per-pair metrics; its
//!   [`LossOutput::metrics`] gives TRL-named `(name, value)` pairs averaged
//!   over the batch (`rewards/chosen`, `rewards/rejected`, `rewards/margins`,
//!   `rewards/accuracies`, `logps/chosen`, `logps/rejected`, `nll_loss`, ...).
//! * Building blocks usable on their own: [`token_kl`] (KL(ref || policy) per
//!   position from full logits, differentiable w.r.t. the policy),
//!   [`sequence_logps`], [`average_logps`], [`log_sigmoid`], the per-pair loss
//!   functions [`dpo_losses`], [`ipo_losses`], [`kto_losses`],
//!   [`orpo_losses`], [`simpo_losses`], [`tdpo_losses`] and
//!   [`two_d_dpo_losses`].
//!
//! Conventions: a *response mask* is 1.0 on response tokens and 0.0 on prompt
//! and padding tokens; masked positions never influence a loss. Per-pair
//! losses are averaged over the batch, so a batch of two pairs gives the mean
//! of the two pairs' losses. The SFT term is `-mean over pairs of (mean
//! per-token log-prob of the chosen response)`, i.e. the per-sequence average
//! as in the paper's code base, not a token-weighted batch average.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

mod two_d;

pub use two_d::{combined_scores, plan_pair, two_d_dpo_losses, PairPlan, SegmentBatch, TwoDLosses, NO_SEGMENT};

/// The preference loss to train with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LossType {
    /// DPO, sigmoid loss with optional label smoothing (Rafailov et al. 2023).
    #[serde(rename = "dpo")]
    Dpo,
    /// IPO on per-token average log-probs, as TRL (Azar et al. 2024).
    #[serde(rename = "ipo")]
    Ipo,
    /// KTO on paired data: chosen desirable, rejected undesirable (Ethayarajh et al. 2024).
    #[serde(rename = "kto")]
    Kto,
    /// ORPO: NLL of chosen + beta * odds-ratio term; reference-free (Hong et al. 2024).
    #[serde(rename = "orpo")]
    Orpo,
    /// SimPO: length-normalised, reference-free, target margin gamma (Meng et al. 2024).
    #[serde(rename = "simpo")]
    Simpo,
    /// TDPO1: sequential KL enters the margin in full (Zeng et al. 2024).
    #[serde(rename = "tdpo1")]
    Tdpo1,
    /// TDPO2: KL scaled by alpha, chosen KL detached (Zeng et al. 2024).
    #[serde(rename = "tdpo2")]
    Tdpo2,
    /// 2D-DPO with helpfulness only, W = [1, 0, 0, 0, 0].
    #[serde(rename = "1d-dpo")]
    OneDDpo,
    /// 2D-DPO: segment-level, 5-aspect scores (the paper's method).
    #[serde(rename = "2d-dpo")]
    TwoDDpo,
}

impl LossType {
    /// Every loss type, in the order of the paper's comparison.
    pub const ALL: [LossType; 9] = [
        LossType::Dpo,
        LossType::Ipo,
        LossType::Kto,
        LossType::Orpo,
        LossType::Simpo,
        LossType::Tdpo1,
        LossType::Tdpo2,
        LossType::OneDDpo,
        LossType::TwoDDpo,
    ];

    /// The name used on the command line and in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            LossType::Dpo => "dpo",
            LossType::Ipo => "ipo",
            LossType::Kto => "kto",
            LossType::Orpo => "orpo",
            LossType::Simpo => "simpo",
            LossType::Tdpo1 => "tdpo1",
            LossType::Tdpo2 => "tdpo2",
            LossType::OneDDpo => "1d-dpo",
            LossType::TwoDDpo => "2d-dpo",
        }
    }

    /// Per-token reference log-probs are required (all but ORPO and SimPO).
    pub fn needs_reference(self) -> bool {
        !matches!(self, LossType::Orpo | LossType::Simpo)
    }

    /// The per-position KL(ref || policy) over the full vocabulary is
    /// required ([`SideBatch::token_kl`]), so the reference model must run
    /// alongside the policy (its full logits cannot be precomputed cheaply).
    pub fn needs_token_kl(self) -> bool {
        matches!(self, LossType::Tdpo1 | LossType::Tdpo2)
    }

    /// Segment ids and 5-aspect segment scores are required (2-D data).
    pub fn needs_segment_scores(self) -> bool {
        matches!(self, LossType::OneDDpo | LossType::TwoDDpo)
    }

    /// The KTO reference point z0 needs log-probs of mismatched
    /// prompt/completion pairs under policy and reference ([`KtoKl`]).
    pub fn needs_kto_kl(self) -> bool {
        matches!(self, LossType::Kto)
    }

    /// The SFT term (`sft_weight` * NLL of chosen) is added; ORPO has its own NLL.
    pub fn uses_sft_term(self) -> bool {
        !matches!(self, LossType::Orpo)
    }

    /// Refuse data that lacks what this loss needs. `has_segment_scores`:
    /// every response of the data set is split into scored segments.
    pub fn check_data(self, has_segment_scores: bool) -> Result<()> {
        if self.needs_segment_scores() && !has_segment_scores {
            bail!(
                "loss_type {self} needs segment-level 5-aspect scores, but the data has plain \
                 (TRL-shaped) or unscored responses; segment and annotate it first \
                 (`dpo2d segment`, `dpo2d annotate`), or train with a response-level loss \
                 such as --loss-type dpo"
            );
        }
        Ok(())
    }
}

impl fmt::Display for LossType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LossType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        LossType::ALL.iter().copied().find(|t| t.as_str().eq_ignore_ascii_case(s)).with_context(|| {
            let names: Vec<&str> = LossType::ALL.iter().map(|t| t.as_str()).collect();
            format!("unknown loss type '{s}'; expected one of: {}", names.join(", "))
        })
    }
}

/// Aspect weights `W` (helpfulness, correctness, safety, completeness,
/// clarity): five non-negative numbers summing to 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "[f64; 5]", into = "[f64; 5]")]
pub struct AspectWeights([f64; 5]);

impl AspectWeights {
    /// The paper's weights `[0.3, 0.4, 0.1, 0.1, 0.1]`.
    pub const PAPER: AspectWeights = AspectWeights([0.3, 0.4, 0.1, 0.1, 0.1]);
    /// Helpfulness only: what 1D-DPO uses.
    pub const HELPFULNESS_ONLY: AspectWeights = AspectWeights([1.0, 0.0, 0.0, 0.0, 0.0]);

    /// Validated weights.
    pub fn new(w: [f64; 5]) -> Result<Self> {
        ensure!(w.iter().all(|x| x.is_finite() && *x >= 0.0), "aspect weights must be non-negative numbers, got {w:?}");
        let sum: f64 = w.iter().sum();
        ensure!(
            (sum - 1.0).abs() <= 1e-6,
            "aspect weights must sum to 1 (helpfulness, correctness, safety, completeness, \
             clarity), got {w:?} summing to {sum}"
        );
        Ok(AspectWeights(w))
    }

    pub fn as_array(&self) -> [f64; 5] {
        self.0
    }
}

impl Default for AspectWeights {
    fn default() -> Self {
        AspectWeights::PAPER
    }
}

impl TryFrom<[f64; 5]> for AspectWeights {
    type Error = anyhow::Error;
    fn try_from(w: [f64; 5]) -> Result<Self> {
        AspectWeights::new(w)
    }
}

impl From<AspectWeights> for [f64; 5] {
    fn from(w: AspectWeights) -> Self {
        w.0
    }
}

/// Parses `"0.3,0.4,0.1,0.1,0.1"` (commas and/or spaces).
impl FromStr for AspectWeights {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split(|c: char| c == ',' || c.is_whitespace()).filter(|p| !p.is_empty()).collect();
        ensure!(
            parts.len() == 5,
            "aspect weights need 5 numbers (helpfulness, correctness, safety, completeness, \
             clarity), got {} in '{s}'",
            parts.len()
        );
        let mut w = [0.0; 5];
        for (x, p) in w.iter_mut().zip(&parts) {
            *x = p.parse().with_context(|| format!("aspect weight '{p}' in '{s}' is not a number"))?;
        }
        AspectWeights::new(w)
    }
}

impl fmt::Display for AspectWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = self.0;
        write!(f, "{},{},{},{},{}", w[0], w[1], w[2], w[3], w[4])
    }
}

/// Loss hyper-parameters (TRL names where TRL has the option).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossConfig {
    pub loss_type: LossType,
    /// Strength of the implicit KL penalty (paper: 0.2 for every method).
    /// For ORPO it is the weight lambda of the odds-ratio term, as in TRL.
    pub beta: f64,
    /// Conservative-DPO label smoothing for `dpo` and `simpo`, in [0, 0.5).
    pub label_smoothing: f64,
    /// SimPO target reward margin gamma (paper: 0.5). It is subtracted from
    /// the scaled logit: `-log sigmoid(beta*(avg_w - avg_l) - gamma)`.
    pub simpo_gamma: f64,
    /// TDPO2's KL weight alpha (paper: 0.5); TDPO1 ignores it.
    pub tdpo_alpha: f64,
    /// KTO weight of the desirable (chosen) term.
    pub desirable_weight: f64,
    /// KTO weight of the undesirable (rejected) term.
    pub undesirable_weight: f64,
    /// Coefficient of the SFT term on the chosen response (paper: 0.1);
    /// ignored by ORPO, whose NLL term has weight 1.
    pub sft_weight: f64,
    /// Aspect weights `W` for `2d-dpo` (`1d-dpo` always uses helpfulness only).
    pub aspect_weights: AspectWeights,
}

impl LossConfig {
    /// The paper's hyper-parameters for `loss_type`.
    pub fn new(loss_type: LossType) -> Self {
        LossConfig {
            loss_type,
            beta: 0.2,
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            tdpo_alpha: 0.5,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            sft_weight: 0.1,
            aspect_weights: AspectWeights::PAPER,
        }
    }

    /// The weights the 2-D loss actually uses (helpfulness only for 1d-dpo).
    pub fn effective_aspect_weights(&self) -> AspectWeights {
        match self.loss_type {
            LossType::OneDDpo => AspectWeights::HELPFULNESS_ONLY,
            _ => self.aspect_weights,
        }
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.beta.is_finite() && self.beta > 0.0, "beta must be > 0, got {}", self.beta);
        ensure!((0.0..0.5).contains(&self.label_smoothing), "label_smoothing must be in [0, 0.5), got {}", self.label_smoothing);
        ensure!(self.simpo_gamma.is_finite(), "simpo_gamma must be a number, got {}", self.simpo_gamma);
        ensure!(self.tdpo_alpha.is_finite() && self.tdpo_alpha >= 0.0, "tdpo_alpha must be >= 0, got {}", self.tdpo_alpha);
        for (name, v) in
            [("desirable_weight", self.desirable_weight), ("undesirable_weight", self.undesirable_weight), ("sft_weight", self.sft_weight)]
        {
            ensure!(v.is_finite() && v >= 0.0, "{name} must be >= 0, got {v}");
        }
        AspectWeights::new(self.aspect_weights.0)?;
        Ok(())
    }
}

/// One side (chosen or rejected) of a batch of `B` pairs, padded to `T`
/// response positions. All tensors are `[B, T]` of one float dtype.
#[derive(Debug, Clone)]
pub struct SideBatch {
    /// log pi_theta(label token) at each position (differentiable).
    pub policy_logps: Tensor,
    /// log pi_ref(label token) at each position (constant); `None` for ORPO/SimPO.
    pub reference_logps: Option<Tensor>,
    /// 1.0 on response tokens, 0.0 on prompt and padding.
    pub mask: Tensor,
    /// KL(ref(.|s_t) || policy(.|s_t)) per position, see [`token_kl`] (TDPO only).
    pub token_kl: Option<Tensor>,
    /// Segment ids and scores (1d-dpo / 2d-dpo only).
    pub segments: Option<SegmentBatch>,
}

impl SideBatch {
    /// A side with only what every loss needs; fill the options as required.
    pub fn new(policy_logps: Tensor, mask: Tensor) -> Self {
        SideBatch { policy_logps, reference_logps: None, mask, token_kl: None, segments: None }
    }
}

/// KTO's batch KL estimate inputs, as TRL's KTOTrainer builds them: summed
/// log-probs `[M]` of mismatched completions (prompt i with the completion of
/// another pair, TRL shifts by one within the batch) under policy and
/// reference. Both are treated as constants.
#[derive(Debug, Clone)]
pub struct KtoKl {
    pub policy_logps: Tensor,
    pub reference_logps: Tensor,
}

/// A batch of `B` preference pairs.
#[derive(Debug, Clone)]
pub struct PreferenceBatch {
    pub chosen: SideBatch,
    pub rejected: SideBatch,
    /// Required for KTO only.
    pub kto_kl: Option<KtoKl>,
}

/// Detached per-pair numbers (one entry per pair of the batch).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PairMetrics {
    /// `beta * sum(policy - ref)` over the chosen response; for the
    /// reference-free ORPO/SimPO `beta * mean policy log-prob`, as TRL.
    pub rewards_chosen: Vec<f64>,
    pub rewards_rejected: Vec<f64>,
    /// Summed policy log-probs of the response.
    pub logps_chosen: Vec<f64>,
    pub logps_rejected: Vec<f64>,
    /// Number of segment pairs N that entered the 2-D loss (0: pair skipped).
    pub segment_pairs: Option<Vec<usize>>,
}

/// What [`compute_loss`] returns.
#[derive(Debug, Clone)]
pub struct LossOutput {
    /// Scalar to differentiate: preference loss + `sft_weight` * SFT loss
    /// (ORPO: NLL + odds-ratio term).
    pub loss: Tensor,
    /// Preference part of `loss` (without the SFT term).
    pub preference_loss: f64,
    /// Unweighted SFT loss: mean over pairs of the chosen response's mean
    /// per-token negative log-prob (for ORPO: its NLL term).
    pub sft_loss: f64,
    /// Weight with which `sft_loss` entered `loss` (0 when not used, 1 for ORPO).
    pub sft_coefficient: f64,
    pub pairs: PairMetrics,
    /// Loss-specific extra metrics, already averaged (e.g. KTO `kl`).
    pub extra: Vec<(&'static str, f64)>,
}

impl LossOutput {
    /// TRL-named metrics averaged over the batch.
    pub fn metrics(&self) -> Vec<(&'static str, f64)> {
        let p = &self.pairs;
        let margins: Vec<f64> = p.rewards_chosen.iter().zip(&p.rewards_rejected).map(|(c, r)| c - r).collect();
        let accuracies: Vec<f64> = margins.iter().map(|m| if *m > 0.0 { 1.0 } else { 0.0 }).collect();
        let mut out = vec![
            ("loss", self.preference_loss + self.sft_coefficient * self.sft_loss),
            ("rewards/chosen", mean(&p.rewards_chosen)),
            ("rewards/rejected", mean(&p.rewards_rejected)),
            ("rewards/accuracies", mean(&accuracies)),
            ("rewards/margins", mean(&margins)),
            ("logps/chosen", mean(&p.logps_chosen)),
            ("logps/rejected", mean(&p.logps_rejected)),
            ("nll_loss", self.sft_loss),
        ];
        if let Some(n) = &p.segment_pairs {
            let n: Vec<f64> = n.iter().map(|&x| x as f64).collect();
            out.push(("segments/pairs", mean(&n)));
        }
        out.extend(self.extra.iter().copied());
        out
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

// ---------------------------------------------------------------------------
// Building blocks

/// `log sigmoid(x)`, stable for large |x| and with the exact gradient
/// `sigmoid(-x)` everywhere, x = 0 included:
/// `log sigmoid(x) = x/2 - |x|/2 - log(1 + exp(-|x|))` (the two |x| terms
/// together are smooth, so the sub-gradient of |x| at 0 cancels out).
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let abs = x.abs()?;
    let soft = (abs.neg()?.exp()? + 1.0)?.log()?;
    Ok(((x - &abs)? * 0.5)?.sub(&soft)?)
}

/// `sigmoid(x) = exp(log sigmoid(x))`.
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(log_sigmoid(x)?.exp()?)
}

/// Sum of per-token values over the response: `[B,T] -> [B]`.
pub fn sequence_logps(token_logps: &Tensor, mask: &Tensor) -> Result<Tensor> {
    Ok((token_logps * mask)?.sum(D::Minus1)?)
}

/// Mean of per-token values over the response: `[B,T] -> [B]` (an empty
/// response counts as length 1, so it gives 0 instead of NaN).
pub fn average_logps(token_logps: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let len = mask.sum(D::Minus1)?.clamp(1.0, f64::INFINITY)?;
    Ok(sequence_logps(token_logps, mask)?.div(&len)?)
}

/// Per-position KL(ref(.|s_t) || policy(.|s_t)) `[B,T]` from full logits
/// `[B,T,V]`; differentiable w.r.t. `policy_logits`, the reference is
/// detached. Log-softmax is built from primitive ops so that it has a
/// backward pass.
pub fn token_kl(policy_logits: &Tensor, ref_logits: &Tensor) -> Result<Tensor> {
    ensure!(
        policy_logits.dims() == ref_logits.dims(),
        "token_kl: policy logits {:?} and reference logits {:?} differ in shape",
        policy_logits.dims(),
        ref_logits.dims()
    );
    let policy_logp = log_softmax_last(policy_logits)?;
    let ref_logp = log_softmax_last(&ref_logits.detach())?;
    let ref_p = ref_logp.exp()?;
    Ok((ref_p * (ref_logp - policy_logp)?)?.sum(D::Minus1)?)
}

fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// `-(1-ls) log sigmoid(z) - ls log sigmoid(-z)` on already scaled logits.
fn sigmoid_losses(z: &Tensor, label_smoothing: f64) -> Result<Tensor> {
    let pos = (log_sigmoid(z)? * (-(1.0 - label_smoothing)))?;
    if label_smoothing == 0.0 {
        return Ok(pos);
    }
    Ok((pos - (log_sigmoid(&z.neg()?)? * label_smoothing)?)?)
}

// ---------------------------------------------------------------------------
// Per-pair losses on sequence-level quantities `[B]`.

/// DPO: `-log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))`, with
/// conservative label smoothing. Inputs: summed log-ratios per response.
pub fn dpo_losses(logratio_chosen: &Tensor, logratio_rejected: &Tensor, beta: f64, label_smoothing: f64) -> Result<Tensor> {
    let h = (logratio_chosen - logratio_rejected)?;
    sigmoid_losses(&(h * beta)?, label_smoothing)
}

/// IPO: `(h - 1/(2 beta))^2`, h = difference of the per-token AVERAGE
/// log-ratios (TRL averages the log-probs for IPO).
pub fn ipo_losses(avg_logratio_chosen: &Tensor, avg_logratio_rejected: &Tensor, beta: f64) -> Result<Tensor> {
    let h = (avg_logratio_chosen - avg_logratio_rejected)?;
    Ok((h - 1.0 / (2.0 * beta))?.sqr()?)
}

/// KTO on pairs (TRL's KTOTrainer): chosen is desirable, rejected
/// undesirable, `z0` the clamped, detached KL estimate;
/// `(dw (1 - sigmoid(beta (lr_w - z0))) + uw (1 - sigmoid(beta (z0 - lr_l)))) / 2`
/// (TRL averages over the 2B completions, hence the /2 per pair).
pub fn kto_losses(
    logratio_chosen: &Tensor,
    logratio_rejected: &Tensor,
    z0: f64,
    beta: f64,
    desirable_weight: f64,
    undesirable_weight: f64,
) -> Result<Tensor> {
    let chosen = (sigmoid(&((logratio_chosen - z0)? * beta)?)?.neg()? + 1.0)?;
    let rejected = (sigmoid(&((logratio_rejected.neg()? + z0)? * beta)?)?.neg()? + 1.0)?;
    Ok((((chosen * desirable_weight)? + (rejected * undesirable_weight)?)? * 0.5)?)
}

/// ORPO's odds-ratio term (without the NLL): `-lambda log sigmoid(log_odds)`,
/// `log_odds = (a_w - a_l) - (log(1 - e^{a_w}) - log(1 - e^{a_l}))`, `a` the
/// per-token average policy log-probs (as TRL).
pub fn orpo_losses(avg_logp_chosen: &Tensor, avg_logp_rejected: &Tensor, lambda: f64) -> Result<Tensor> {
    let log1m_exp = |a: &Tensor| -> Result<Tensor> {
        // 1 - e^a underflows to 0 only for a response of probability ~1 per token.
        Ok((a.exp()?.neg()? + 1.0)?.clamp(1e-12, 1.0)?.log()?)
    };
    let log_odds = ((avg_logp_chosen - avg_logp_rejected)? - (log1m_exp(avg_logp_chosen)? - log1m_exp(avg_logp_rejected)?)?)?;
    Ok((log_sigmoid(&log_odds)? * (-lambda))?)
}

/// SimPO: `-log sigmoid(beta (a_w - a_l) - gamma)` (with label smoothing),
/// `a` the per-token average policy log-probs; gamma is a margin in reward
/// units (TRL subtracts `gamma/beta` before scaling by beta: the same).
pub fn simpo_losses(avg_logp_chosen: &Tensor, avg_logp_rejected: &Tensor, beta: f64, gamma: f64, label_smoothing: f64) -> Result<Tensor> {
    let z = (((avg_logp_chosen - avg_logp_rejected)? * beta)? - gamma)?;
    sigmoid_losses(&z, label_smoothing)
}

/// TDPO (Zeng et al. 2024): `-log sigmoid(beta * logits)` with
/// `margin = lr_w - lr_l` (summed log-ratios) and the sequential KLs
/// `kl = sum_t KL(ref || policy)` of each response;
/// TDPO1: `logits = margin - (kl_l - kl_w)`,
/// TDPO2: `logits = margin - alpha (kl_l - detach(kl_w))`.
pub fn tdpo_losses(
    logratio_chosen: &Tensor,
    logratio_rejected: &Tensor,
    seq_kl_chosen: &Tensor,
    seq_kl_rejected: &Tensor,
    beta: f64,
    tdpo2_alpha: Option<f64>,
) -> Result<Tensor> {
    let margin = (logratio_chosen - logratio_rejected)?;
    let logits = match tdpo2_alpha {
        None => (margin - (seq_kl_rejected - seq_kl_chosen)?)?,
        Some(alpha) => (margin - ((seq_kl_rejected - seq_kl_chosen.detach())? * alpha)?)?,
    };
    sigmoid_losses(&(logits * beta)?, 0.0)
}

// ---------------------------------------------------------------------------
// The batch loss.

/// Check a `[B,T]` tensor of one side against the side's policy log-probs.
fn check_like(name: &str, t: &Tensor, like: &Tensor) -> Result<()> {
    ensure!(t.dims() == like.dims(), "{name} has shape {:?}, expected {:?} like the policy log-probs", t.dims(), like.dims());
    ensure!(t.dtype() == like.dtype(), "{name} is {:?}, expected {:?}", t.dtype(), like.dtype());
    Ok(())
}

fn check_side(side_name: &str, s: &SideBatch, lt: LossType) -> Result<()> {
    ensure!(s.policy_logps.rank() == 2, "{side_name} policy log-probs must be [batch, tokens], got {:?}", s.policy_logps.dims());
    check_like(&format!("{side_name} mask"), &s.mask, &s.policy_logps)?;
    if lt.needs_reference() {
        let r = s
            .reference_logps
            .as_ref()
            .with_context(|| format!("loss_type {lt} needs reference log-probs for the {side_name} responses"))?;
        check_like(&format!("{side_name} reference log-probs"), r, &s.policy_logps)?;
    }
    if lt.needs_token_kl() {
        let k = s.token_kl.as_ref().with_context(|| {
            format!(
                "loss_type {lt} needs the per-token KL(ref || policy) for the {side_name} \
                 responses (run the reference model alongside the policy)"
            )
        })?;
        check_like(&format!("{side_name} token KL"), k, &s.policy_logps)?;
    }
    if lt.needs_segment_scores() {
        let seg =
            s.segments.as_ref().with_context(|| format!("loss_type {lt} needs segment ids and scores for the {side_name} responses"))?;
        let (b, t) = s.policy_logps.dims2()?;
        seg.check_shape(b, t).with_context(|| format!("{side_name} segments"))?;
    }
    Ok(())
}

/// An input that `check_side` has already required.
fn need<T>(t: &Option<T>) -> &T {
    t.as_ref().expect("presence checked by check_side")
}

fn to_f64_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

fn scalar_f64(t: &Tensor) -> Result<f64> {
    Ok(t.detach().to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// The loss of `cfg.loss_type` on `batch`, plus metrics. See the module
/// documentation for the inputs each loss type needs.
pub fn compute_loss(cfg: &LossConfig, batch: &PreferenceBatch) -> Result<LossOutput> {
    cfg.validate()?;
    let lt = cfg.loss_type;
    let (w, l) = (&batch.chosen, &batch.rejected);
    check_side("chosen", w, lt)?;
    check_side("rejected", l, lt)?;
    let b = w.policy_logps.dim(0)?;
    ensure!(l.policy_logps.dim(0)? == b, "chosen and rejected batches differ in size: {b} vs {}", l.policy_logps.dim(0)?);
    ensure!(b > 0, "empty batch");
    ensure!(l.policy_logps.dtype() == w.policy_logps.dtype(), "chosen and rejected log-probs differ in dtype");

    let sum_w = sequence_logps(&w.policy_logps, &w.mask)?;
    let sum_l = sequence_logps(&l.policy_logps, &l.mask)?;
    let avg_w = average_logps(&w.policy_logps, &w.mask)?;
    let avg_l = average_logps(&l.policy_logps, &l.mask)?;
    // Token log-ratios rho_t (reference detached) and their sums.
    let rho = |s: &SideBatch| -> Result<Option<Tensor>> {
        match &s.reference_logps {
            Some(r) if lt.needs_reference() => Ok(Some(((&s.policy_logps - r.detach())? * &s.mask)?)),
            _ => Ok(None),
        }
    };
    let (rho_w, rho_l) = (rho(w)?, rho(l)?);
    let lr = |r: &Option<Tensor>| -> Result<Option<Tensor>> { r.as_ref().map(|r| Ok(r.sum(D::Minus1)?)).transpose() };
    let (lr_w, lr_l) = (lr(&rho_w)?, lr(&rho_l)?);

    let nll = avg_w.neg()?.mean_all()?;
    let mut extra = Vec::new();
    let mut segment_pairs = None;
    let per_pair = match lt {
        LossType::Dpo => dpo_losses(need(&lr_w), need(&lr_l), cfg.beta, cfg.label_smoothing)?,
        LossType::Ipo => {
            let avg_lr_w = average_logps(need(&rho_w), &w.mask)?;
            let avg_lr_l = average_logps(need(&rho_l), &l.mask)?;
            ipo_losses(&avg_lr_w, &avg_lr_l, cfg.beta)?
        }
        LossType::Kto => {
            let kl = batch.kto_kl.as_ref().context(
                "loss_type kto needs log-probs of mismatched prompt/completion pairs under policy \
                 and reference for its KL estimate",
            )?;
            ensure!(
                kl.policy_logps.dims() == kl.reference_logps.dims() && kl.policy_logps.rank() == 1,
                "KTO KL log-probs must be two [M] tensors, got {:?} and {:?}",
                kl.policy_logps.dims(),
                kl.reference_logps.dims()
            );
            let z0 = scalar_f64(&(&kl.policy_logps - &kl.reference_logps)?.mean_all()?)?.max(0.0);
            extra.push(("kl", z0));
            kto_losses(need(&lr_w), need(&lr_l), z0, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)?
        }
        LossType::Orpo => orpo_losses(&avg_w, &avg_l, cfg.beta)?,
        LossType::Simpo => simpo_losses(&avg_w, &avg_l, cfg.beta, cfg.simpo_gamma, cfg.label_smoothing)?,
        LossType::Tdpo1 | LossType::Tdpo2 => {
            let kl_w = sequence_logps(need(&w.token_kl), &w.mask)?;
            let kl_l = sequence_logps(need(&l.token_kl), &l.mask)?;
            extra.push(("kl/chosen", mean(&to_f64_vec(&kl_w)?)));
            extra.push(("kl/rejected", mean(&to_f64_vec(&kl_l)?)));
            let alpha = (lt == LossType::Tdpo2).then_some(cfg.tdpo_alpha);
            tdpo_losses(need(&lr_w), need(&lr_l), &kl_w, &kl_l, cfg.beta, alpha)?
        }
        LossType::OneDDpo | LossType::TwoDDpo => {
            let out = two_d_dpo_losses(
                need(&rho_w),
                need(&rho_l),
                &w.mask,
                &l.mask,
                need(&w.segments),
                need(&l.segments),
                &cfg.effective_aspect_weights(),
                cfg.beta,
            )?;
            segment_pairs = Some(out.segment_pairs);
            out.losses
        }
    };
    let preference = per_pair.mean_all()?;
    let (loss, sft_coefficient) = match lt {
        LossType::Orpo => ((&nll + &preference)?, 1.0),
        _ if cfg.sft_weight > 0.0 => ((&preference + (&nll * cfg.sft_weight)?)?, cfg.sft_weight),
        _ => (preference.clone(), 0.0),
    };
    let sft_loss = scalar_f64(&nll)?;

    let (rewards_chosen, rewards_rejected) = if lt.needs_reference() {
        (to_f64_vec(need(&lr_w))?, to_f64_vec(need(&lr_l))?)
    } else {
        (to_f64_vec(&avg_w)?, to_f64_vec(&avg_l)?)
    };
    let scale = |v: Vec<f64>| v.into_iter().map(|x| cfg.beta * x).collect::<Vec<f64>>();
    let pairs = PairMetrics {
        rewards_chosen: scale(rewards_chosen),
        rewards_rejected: scale(rewards_rejected),
        logps_chosen: to_f64_vec(&sum_w)?,
        logps_rejected: to_f64_vec(&sum_l)?,
        segment_pairs,
    };
    Ok(LossOutput { loss, preference_loss: scalar_f64(&preference)?, sft_loss, sft_coefficient, pairs, extra })
}

#[cfg(test)]
mod tests;
