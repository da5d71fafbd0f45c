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
//!   ([`AspectWeights`]); [`LossConfig::default`] holds the one default of each.
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

/// The aspect weights live with the data (every stage uses them); the loss re-exports them.
pub use dpo2d_data::AspectWeights;

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

/// Loss hyper-parameters (TRL names where TRL has the option).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossConfig {
    pub loss_type: LossType,
    /// Strength of the implicit KL penalty (TRL's default 0.1; the paper
    /// uses 0.2 for every method).
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

/// The one set of loss defaults: TRL's `beta` (0.1; the paper's 0.2 is in
/// the `paper` preset), the paper's SFT weight, gamma, alpha and aspect
/// weights. [`crate::config::TrainConfig`]'s defaults come from here.
impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            loss_type: LossType::TwoDDpo,
            beta: 0.1,
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            tdpo_alpha: 0.5,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            sft_weight: 0.1,
            aspect_weights: AspectWeights::PAPER,
        }
    }
}

impl LossConfig {
    /// The default hyper-parameters for `loss_type`.
    pub fn new(loss_type: LossType) -> Self {
        LossConfig { loss_type, ..LossConfig::default() }
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
        // aspect_weights: valid by construction (AspectWeights::new, serde).
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
            ("sft_loss", self.sft_loss),
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

/// DPO: `-log sigmoid(beta * (chosen_logratios - rejected_logratios))`, a
/// log-ratio being `sum log pi - sum log pi_ref` over a response, with
/// conservative label smoothing.
pub fn dpo_losses(chosen_logratios: &Tensor, rejected_logratios: &Tensor, beta: f64, label_smoothing: f64) -> Result<Tensor> {
    let logits = (chosen_logratios - rejected_logratios)?;
    sigmoid_losses(&(logits * beta)?, label_smoothing)
}

/// IPO: `(h - 1/(2 beta))^2`, h = difference of the per-token AVERAGE
/// log-ratios (TRL averages the log-probs for IPO).
pub fn ipo_losses(chosen_avg_logratios: &Tensor, rejected_avg_logratios: &Tensor, beta: f64) -> Result<Tensor> {
    let h = (chosen_avg_logratios - rejected_avg_logratios)?;
    Ok((h - 1.0 / (2.0 * beta))?.sqr()?)
}

/// KTO on pairs (TRL's KTOTrainer): the chosen response is desirable, the
/// rejected one undesirable, `z0` the clamped, detached KL estimate:
///
/// `chosen_losses   = 1 - sigmoid(beta (chosen_logratios - z0))`
/// `rejected_losses = 1 - sigmoid(beta (z0 - rejected_logratios))`
/// `loss = (desirable_weight chosen_losses + undesirable_weight rejected_losses) / 2`
///
/// (TRL averages over the 2B completions, hence the /2 per pair).
pub fn kto_losses(
    chosen_logratios: &Tensor,
    rejected_logratios: &Tensor,
    z0: f64,
    beta: f64,
    desirable_weight: f64,
    undesirable_weight: f64,
) -> Result<Tensor> {
    let one_minus = |t: Tensor| -> Result<Tensor> { Ok((t.neg()? + 1.0)?) };
    let chosen_losses = one_minus(sigmoid(&((chosen_logratios - z0)? * beta)?)?)?;
    let rejected_losses = one_minus(sigmoid(&((rejected_logratios.neg()? + z0)? * beta)?)?)?;
    Ok((((chosen_losses * desirable_weight)? + (rejected_losses * undesirable_weight)?)? * 0.5)?)
}

/// ORPO's odds-ratio term (without the NLL): `-lambda log sigmoid(log_odds)`,
/// `log_odds = (a_w - a_l) - (log(1 - e^{a_w}) - log(1 - e^{a_l}))`, `a` the
/// per-token average policy log-probs (as TRL).
pub fn orpo_losses(chosen_avg_logps: &Tensor, rejected_avg_logps: &Tensor, lambda: f64) -> Result<Tensor> {
    let log1m_exp = |a: &Tensor| -> Result<Tensor> {
        // 1 - e^a underflows to 0 only for a response of probability ~1 per token.
        Ok((a.exp()?.neg()? + 1.0)?.clamp(1e-12, 1.0)?.log()?)
    };
    let log_odds = ((chosen_avg_logps - rejected_avg_logps)? - (log1m_exp(chosen_avg_logps)? - log1m_exp(rejected_avg_logps)?)?)?;
    Ok((log_sigmoid(&log_odds)? * (-lambda))?)
}

/// SimPO: `-log sigmoid(beta (a_w - a_l) - gamma)` (with label smoothing),
/// `a` the per-token average policy log-probs; gamma is a margin in reward
/// units (TRL subtracts `gamma/beta` before scaling by beta: the same).
pub fn simpo_losses(chosen_avg_logps: &Tensor, rejected_avg_logps: &Tensor, beta: f64, gamma: f64, label_smoothing: f64) -> Result<Tensor> {
    let z = (((chosen_avg_logps - rejected_avg_logps)? * beta)? - gamma)?;
    sigmoid_losses(&z, label_smoothing)
}

/// TDPO (Zeng et al. 2024): `-log sigmoid(beta * logits)` with
/// `margin = chosen_logratios - rejected_logratios` and the sequential KLs
/// `kl = sum_t KL(ref || policy)` of each response;
/// TDPO1: `logits = margin - (rejected_kl - chosen_kl)`,
/// TDPO2: `logits = margin - alpha (rejected_kl - detach(chosen_kl))`.
pub fn tdpo_losses(
    chosen_logratios: &Tensor,
    rejected_logratios: &Tensor,
    chosen_kl: &Tensor,
    rejected_kl: &Tensor,
    beta: f64,
    tdpo2_alpha: Option<f64>,
) -> Result<Tensor> {
    let margin = (chosen_logratios - rejected_logratios)?;
    let logits = match tdpo2_alpha {
        None => (margin - (rejected_kl - chosen_kl)?)?,
        Some(alpha) => (margin - ((rejected_kl - chosen_kl.detach())? * alpha)?)?,
    };
    sigmoid_losses(&(logits * beta)?, 0.0)
}

// ---------------------------------------------------------------------------
// The batch loss: input checks, per-pair losses, metrics.

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

/// Everything `loss_type` needs is present and the shapes agree.
fn check_batch(lt: LossType, batch: &PreferenceBatch) -> Result<()> {
    let (w, l) = (&batch.chosen, &batch.rejected);
    check_side("chosen", w, lt)?;
    check_side("rejected", l, lt)?;
    let b = w.policy_logps.dim(0)?;
    ensure!(l.policy_logps.dim(0)? == b, "chosen and rejected batches differ in size: {b} vs {}", l.policy_logps.dim(0)?);
    ensure!(b > 0, "empty batch");
    ensure!(l.policy_logps.dtype() == w.policy_logps.dtype(), "chosen and rejected log-probs differ in dtype");
    if lt.needs_kto_kl() {
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
    }
    Ok(())
}

/// An input that `check_batch` has already required.
fn need<T>(t: &Option<T>) -> &T {
    t.as_ref().expect("presence checked by check_batch")
}

fn to_f64_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

fn scalar_f64(t: &Tensor) -> Result<f64> {
    Ok(t.detach().to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// The sequence-level quantities of one side that the losses are written in.
struct SideLogps {
    /// Summed policy log-probs `[B]`.
    sum: Tensor,
    /// Per-token average policy log-probs `[B]`.
    avg: Tensor,
    /// `(log pi - log pi_ref) * mask` per token `[B,T]`, reference detached
    /// (losses with a reference only).
    token_logratios: Option<Tensor>,
    /// `token_logratios` summed over the response `[B]`.
    logratios: Option<Tensor>,
}

impl SideLogps {
    fn of(side: &SideBatch, lt: LossType) -> Result<Self> {
        let token_logratios = match &side.reference_logps {
            Some(r) if lt.needs_reference() => Some(((&side.policy_logps - r.detach())? * &side.mask)?),
            _ => None,
        };
        let logratios = token_logratios.as_ref().map(|t| t.sum(D::Minus1)).transpose()?;
        Ok(SideLogps {
            sum: sequence_logps(&side.policy_logps, &side.mask)?,
            avg: average_logps(&side.policy_logps, &side.mask)?,
            token_logratios,
            logratios,
        })
    }
}

/// Per-pair preference losses `[B]`, plus loss-specific metrics and, for
/// the 2-D losses, the number of segment pairs of each pair.
type PerPair = (Tensor, Vec<(&'static str, f64)>, Option<Vec<usize>>);

fn per_pair_losses(cfg: &LossConfig, batch: &PreferenceBatch, chosen: &SideLogps, rejected: &SideLogps) -> Result<PerPair> {
    let lt = cfg.loss_type;
    let (w, l) = (&batch.chosen, &batch.rejected);
    let mut extra = Vec::new();
    let mut segment_pairs = None;
    let losses = match lt {
        LossType::Dpo => dpo_losses(need(&chosen.logratios), need(&rejected.logratios), cfg.beta, cfg.label_smoothing)?,
        LossType::Ipo => {
            let chosen_avg = average_logps(need(&chosen.token_logratios), &w.mask)?;
            let rejected_avg = average_logps(need(&rejected.token_logratios), &l.mask)?;
            ipo_losses(&chosen_avg, &rejected_avg, cfg.beta)?
        }
        LossType::Kto => {
            let kl = need(&batch.kto_kl);
            let z0 = scalar_f64(&(&kl.policy_logps - &kl.reference_logps)?.mean_all()?)?.max(0.0);
            extra.push(("kl", z0));
            let (c, r) = (need(&chosen.logratios), need(&rejected.logratios));
            kto_losses(c, r, z0, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)?
        }
        LossType::Orpo => orpo_losses(&chosen.avg, &rejected.avg, cfg.beta)?,
        LossType::Simpo => simpo_losses(&chosen.avg, &rejected.avg, cfg.beta, cfg.simpo_gamma, cfg.label_smoothing)?,
        LossType::Tdpo1 | LossType::Tdpo2 => {
            let chosen_kl = sequence_logps(need(&w.token_kl), &w.mask)?;
            let rejected_kl = sequence_logps(need(&l.token_kl), &l.mask)?;
            let alpha = (lt == LossType::Tdpo2).then_some(cfg.tdpo_alpha);
            tdpo_losses(need(&chosen.logratios), need(&rejected.logratios), &chosen_kl, &rejected_kl, cfg.beta, alpha)?
        }
        LossType::OneDDpo | LossType::TwoDDpo => {
            let out = two_d_dpo_losses(
                need(&chosen.token_logratios),
                need(&rejected.token_logratios),
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
    Ok((losses, extra, segment_pairs))
}

/// `kl/chosen`, `kl/rejected`: the mean sequence KL of each side: exact
/// (from the full distributions) when the batch has token KLs, else the
/// sampled estimate `sum(log pi - log pi_ref)` over the response.
fn kl_metrics(batch: &PreferenceBatch, chosen: &SideLogps, rejected: &SideLogps) -> Result<Vec<(&'static str, f64)>> {
    let exact = |s: &SideBatch| s.token_kl.as_ref().map(|k| sequence_logps(k, &s.mask)).transpose();
    let (c, r) = match (exact(&batch.chosen)?, exact(&batch.rejected)?) {
        (Some(c), Some(r)) => (c, r),
        _ => match (&chosen.logratios, &rejected.logratios) {
            (Some(c), Some(r)) => (c.clone(), r.clone()),
            _ => return Ok(vec![]),
        },
    };
    Ok(vec![("kl/chosen", mean(&to_f64_vec(&c)?)), ("kl/rejected", mean(&to_f64_vec(&r)?))])
}

/// The loss of `cfg.loss_type` on `batch`, plus metrics. See the module
/// documentation for the inputs each loss type needs.
pub fn compute_loss(cfg: &LossConfig, batch: &PreferenceBatch) -> Result<LossOutput> {
    cfg.validate()?;
    let lt = cfg.loss_type;
    check_batch(lt, batch)?;
    let chosen = SideLogps::of(&batch.chosen, lt)?;
    let rejected = SideLogps::of(&batch.rejected, lt)?;

    let (per_pair, mut extra, segment_pairs) = per_pair_losses(cfg, batch, &chosen, &rejected)?;
    let preference = per_pair.mean_all()?;
    let nll = chosen.avg.neg()?.mean_all()?;
    let (loss, sft_coefficient) = match lt {
        LossType::Orpo => ((&nll + &preference)?, 1.0),
        _ if cfg.sft_weight > 0.0 => ((&preference + (&nll * cfg.sft_weight)?)?, cfg.sft_weight),
        _ => (preference.clone(), 0.0),
    };
    extra.extend(kl_metrics(batch, &chosen, &rejected)?);

    // Rewards as TRL: beta * log-ratio, or beta * average log-prob without a reference.
    let (rewards_chosen, rewards_rejected) = if lt.needs_reference() {
        (to_f64_vec(need(&chosen.logratios))?, to_f64_vec(need(&rejected.logratios))?)
    } else {
        (to_f64_vec(&chosen.avg)?, to_f64_vec(&rejected.avg)?)
    };
    let scale = |v: Vec<f64>| v.into_iter().map(|x| cfg.beta * x).collect::<Vec<f64>>();
    let pairs = PairMetrics {
        rewards_chosen: scale(rewards_chosen),
        rewards_rejected: scale(rewards_rejected),
        logps_chosen: to_f64_vec(&chosen.sum)?,
        logps_rejected: to_f64_vec(&rejected.sum)?,
        segment_pairs,
    };
    Ok(LossOutput { loss, preference_loss: scalar_f64(&preference)?, sft_loss: scalar_f64(&nll)?, sft_coefficient, pairs, extra })
}

#[cfg(test)]
mod tests;
