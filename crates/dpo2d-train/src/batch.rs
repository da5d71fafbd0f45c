//! From tokenized pairs to the loss: one packed forward pass of the policy
//! (and of a live reference), the per-side tensors the losses read, and the
//! loss with its metrics.

use crate::align::{TokenizedPair, TokenizedResponse, NO_SEGMENT};
use crate::loss::{self, KtoKl, LossConfig, PreferenceBatch, SegmentBatch, SideBatch};
use crate::packing::{gather_side, mask_for, packed_forward, padded_rows, pair_units, PackedOut, Unit};
use crate::reference::Reference;
use crate::reward::RewardHead;
use anyhow::{bail, Result};
use candle_core::Tensor;
use dpo2d_model::llama::CausalLM;

/// Which set a batch comes from (the cached reference log-probs differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Split {
    Train,
    Eval,
}

/// The models a loss is computed with.
pub(crate) struct Models {
    pub policy: CausalLM,
    pub reference: Reference,
}

/// What a run minimises: a preference loss of the policy, or the reward
/// model's regression loss through its head on the policy's backbone.
pub(crate) enum Objective {
    Preference(LossConfig),
    Reward(RewardHead),
}

impl Objective {
    /// Trainable parameters besides the policy's.
    pub fn vars(&self) -> Vec<(String, candle_core::Var)> {
        match self {
            Objective::Preference(_) => vec![],
            Objective::Reward(head) => head.vars(),
        }
    }

    /// The objective's name for the log.
    pub fn describe(&self) -> String {
        match self {
            Objective::Preference(l) => format!("loss {}", l.loss_type),
            Objective::Reward(_) => "reward model (MSE of 5 aspect scores per segment)".into(),
        }
    }

    /// Every loss but KTO (whose KL term mixes pairs) and the reward model's
    /// MSE is a mean over pairs that can be split into smaller passes.
    pub fn splits_over_pairs(&self) -> bool {
        match self {
            Objective::Preference(l) => !l.loss_type.needs_kto_kl(),
            Objective::Reward(_) => true,
        }
    }
}

/// The loss of one batch, its metrics, and its size in tokens.
pub(crate) struct BatchLoss {
    pub loss: Tensor,
    pub metrics: Vec<(&'static str, f64)>,
    pub tokens: usize,
}

impl Models {
    /// Forward the pairs `idx` of `data` and compute the objective's loss.
    pub fn loss(&self, objective: &Objective, data: &[TokenizedPair], idx: &[usize], split: Split) -> Result<BatchLoss> {
        let pairs: Vec<&TokenizedPair> = idx.iter().map(|&i| &data[i]).collect();
        match objective {
            Objective::Preference(cfg) => self.preference_loss(cfg, &pairs, idx, split),
            Objective::Reward(head) => crate::reward::reward_loss(&self.policy, head, &pairs),
        }
    }

    /// The gradient of the policy's trainable variables and then the
    /// objective's own ([`Objective::vars`]), from one backward pass.
    pub fn gradients(&self, objective: &Objective, store: &candle_core::backprop::GradStore) -> Result<Vec<Option<Tensor>>> {
        let mut grads = self.policy.gradients(store)?;
        grads.extend(objective.vars().iter().map(|(_, v)| store.get(v.as_tensor()).cloned()));
        Ok(grads)
    }

    fn preference_loss(&self, cfg: &LossConfig, pairs: &[&TokenizedPair], idx: &[usize], split: Split) -> Result<BatchLoss> {
        let lt = cfg.loss_type;
        let units = pair_units(pairs);
        let policy = packed_forward(&self.policy, &units, lt.needs_token_kl())?;
        let mut chosen = Side::new(pairs, &policy, 0, |p| &p.chosen)?;
        let mut rejected = Side::new(pairs, &policy, 1, |p| &p.rejected)?;
        match &self.reference {
            Reference::None => {}
            Reference::Cached { train, eval } => {
                let cached = if split == Split::Eval { eval } else { train };
                let rows = |f: fn(&crate::reference::RefLogps) -> &[f32]| idx.iter().map(|&i| f(&cached[i])).collect::<Vec<_>>();
                chosen.batch.reference_logps = Some(padded_rows(&rows(|r| &r.chosen), self.policy.device())?);
                rejected.batch.reference_logps = Some(padded_rows(&rows(|r| &r.rejected), self.policy.device())?);
            }
            Reference::Live(r) => {
                // Same units, same packing: the flat layouts of policy and reference agree.
                let reference = packed_forward(r, &units, lt.needs_token_kl())?;
                let token_kl = match (&policy.logits, &reference.logits) {
                    (Some(pl), Some(rl)) => Some(loss::token_kl(&pl.unsqueeze(0)?, &rl.detach().unsqueeze(0)?)?.squeeze(0)?),
                    _ => None,
                };
                chosen.add_live_reference(&reference, token_kl.as_ref())?;
                rejected.add_live_reference(&reference, token_kl.as_ref())?;
            }
        }
        if lt.needs_segment_scores() {
            chosen.batch.segments = Some(segment_batch(&pairs.iter().map(|p| &p.chosen).collect::<Vec<_>>())?);
            rejected.batch.segments = Some(segment_batch(&pairs.iter().map(|p| &p.rejected).collect::<Vec<_>>())?);
        }
        let kto_kl = if lt.needs_kto_kl() { Some(self.kto_kl(pairs)?) } else { None };
        let out = loss::compute_loss(cfg, &PreferenceBatch { chosen: chosen.batch, rejected: rejected.batch, kto_kl })?;
        let tokens = pairs.iter().map(|p| p.num_tokens()).sum();
        Ok(BatchLoss { metrics: out.metrics(), loss: out.loss, tokens })
    }

    /// KTO's KL estimate inputs: prompt i with the chosen response of pair
    /// i+1 (mod B), under policy and reference, as constants.
    fn kto_kl(&self, pairs: &[&TokenizedPair]) -> Result<KtoKl> {
        let b = pairs.len();
        let units: Vec<Unit> = (0..b).map(|i| Unit { prompt: &pairs[i].prompt, responses: vec![&pairs[(i + 1) % b].chosen.ids] }).collect();
        let sums = |m: &CausalLM| -> Result<Tensor> {
            let o = packed_forward(m, &units, false)?;
            let lens: Vec<usize> = units.iter().map(|u| u.responses[0].len()).collect();
            let g = gather_side(&o.logps.detach(), &o.starts_of(0), &lens)?;
            Ok((g * mask_for(&lens, m.device())?)?.sum(1)?.detach())
        };
        let policy_logps = sums(&self.policy)?;
        let reference_logps = match &self.reference {
            Reference::Live(r) => sums(r)?,
            _ => bail!("kto needs the reference model running alongside"),
        };
        Ok(KtoKl { policy_logps, reference_logps })
    }
}

/// One side (chosen or rejected) of a batch, while it is being assembled.
struct Side {
    batch: SideBatch,
    /// Response `r` of every unit: 0 chosen, 1 rejected.
    r: usize,
    lens: Vec<usize>,
}

impl Side {
    fn new(pairs: &[&TokenizedPair], policy: &PackedOut, r: usize, side: fn(&TokenizedPair) -> &TokenizedResponse) -> Result<Self> {
        let lens: Vec<usize> = pairs.iter().map(|p| side(p).ids.len()).collect();
        let logps = gather_side(&policy.logps, &policy.starts_of(r), &lens)?;
        let mask = mask_for(&lens, policy.logps.device())?;
        Ok(Side { batch: SideBatch::new(logps, mask), r, lens })
    }

    /// Reference log-probs from a live reference pass, and the exact
    /// per-token KL (flat, all responses) when the loss needs it.
    fn add_live_reference(&mut self, reference: &PackedOut, token_kl: Option<&Tensor>) -> Result<()> {
        let starts = reference.starts_of(self.r);
        self.batch.reference_logps = Some(gather_side(&reference.logps, &starts, &self.lens)?.detach());
        if let Some(kl) = token_kl {
            self.batch.token_kl = Some(gather_side(kl, &starts, &self.lens)?);
        }
        Ok(())
    }
}

/// Segment ids per token (padded with [`NO_SEGMENT`]) and segment scores.
fn segment_batch(sides: &[&TokenizedResponse]) -> Result<SegmentBatch> {
    let t = sides.iter().map(|s| s.ids.len()).max().unwrap_or(1);
    let ids = sides
        .iter()
        .map(|s| {
            let mut v = s.token_segments.clone();
            v.resize(t, NO_SEGMENT);
            v
        })
        .collect();
    SegmentBatch::new(ids, sides.iter().map(|s| s.scores.clone()).collect())
}
