//! The 2D-DPO loss (paper Eq. 6, Appendix B.3), vectorised over the batch.
//!
//! Per pair: normalise scores `s = r/4 + 1`, combine aspects
//! `g_k = sum_j W_j s_kj`, take `N = min(S_w, S_l)`, pair the N chosen
//! segments of highest g (descending) with the N rejected segments of lowest g
//! (ascending), set `beta_w = beta / mean(selected g_w)` (likewise `beta_l`)
//! and
//! `L = -sum_i log sigmoid(beta_w g_w(i) R_w(i) - beta_l g_l(i) R_l(i))`,
//! `R` = sum of `rho_t = log pi - log pi_ref` over a segment's tokens.
//!
//! The selection depends only on the (constant) scores, so it is planned on
//! the host; the tensor work is one batched matmul per side with a constant
//! selection matrix `[B, T, N_max]` (one-hot of the i-th selected segment's
//! tokens) and a masked log-sigmoid. Segment ids are explicit (from the
//! data); a segment with no response token left (e.g. cut by truncation)
//! does not count. A pair with no segment on one side contributes 0 but still
//! counts in the batch mean, as in the paper's code.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};

use super::{log_sigmoid, AspectWeights};

/// Segment id of a response token that belongs to no segment.
pub const NO_SEGMENT: u32 = u32::MAX;

/// Segment ids and raw scores for one side of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentBatch {
    /// Per pair, the segment index of each of the `T` positions (only read
    /// where the response mask is 1; [`NO_SEGMENT`] = in no segment).
    pub token_segments: Vec<Vec<u32>>,
    /// Per pair, the raw 0..=4 scores of each segment in aspect order
    /// (helpfulness, correctness, safety, completeness, clarity).
    pub scores: Vec<Vec<[u8; 5]>>,
}

impl SegmentBatch {
    /// Validated: same number of pairs in both lists, every score in 0..=4.
    pub fn new(token_segments: Vec<Vec<u32>>, scores: Vec<Vec<[u8; 5]>>) -> Result<Self> {
        ensure!(token_segments.len() == scores.len(), "segment ids for {} pairs but scores for {}", token_segments.len(), scores.len());
        for (b, segs) in scores.iter().enumerate() {
            for (k, r) in segs.iter().enumerate() {
                ensure!(r.iter().all(|&x| x <= 4), "pair {b} segment {k}: scores {r:?} outside 0..=4");
            }
        }
        Ok(SegmentBatch { token_segments, scores })
    }

    /// From padded tensors: `segment_ids [B,T]` (u32), `scores [B,S,5]`
    /// (any dtype, integral values 0..=4) and `segment_mask [B,S]` (1 for a
    /// real segment; real segments must come first).
    pub fn from_tensors(segment_ids: &Tensor, scores: &Tensor, segment_mask: &Tensor) -> Result<Self> {
        let ids = segment_ids.to_dtype(DType::U32)?.to_vec2::<u32>().context("segment ids must be [B,T]")?;
        let sc = scores.to_dtype(DType::F64)?.to_vec3::<f64>().context("segment scores must be [B,S,5]")?;
        let m = segment_mask.to_dtype(DType::F64)?.to_vec2::<f64>().context("segment mask must be [B,S]")?;
        ensure!(sc.len() == m.len(), "segment scores for {} pairs but mask for {}", sc.len(), m.len());
        let mut all = Vec::with_capacity(sc.len());
        for (b, (rows, mrow)) in sc.iter().zip(&m).enumerate() {
            ensure!(rows.len() == mrow.len(), "pair {b}: {} score rows but {} mask entries", rows.len(), mrow.len());
            let n = mrow.iter().take_while(|&&x| x > 0.0).count();
            ensure!(mrow[n..].iter().all(|&x| x <= 0.0), "pair {b}: masked segments must come last");
            let mut segs = Vec::with_capacity(n);
            for (k, row) in rows[..n].iter().enumerate() {
                ensure!(row.len() == 5, "pair {b} segment {k}: {} scores, expected 5", row.len());
                let mut r = [0u8; 5];
                for (x, v) in r.iter_mut().zip(row) {
                    ensure!(v.fract() == 0.0 && (0.0..=4.0).contains(v), "pair {b} segment {k}: score {v} is not an integer in 0..=4");
                    *x = *v as u8;
                }
                segs.push(r);
            }
            all.push(segs);
        }
        SegmentBatch::new(ids, all)
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.scores.len()
    }

    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }

    pub(crate) fn check_shape(&self, b: usize, t: usize) -> Result<()> {
        ensure!(self.len() == b, "segments for {} pairs, but the batch has {b}", self.len());
        for (i, ids) in self.token_segments.iter().enumerate() {
            ensure!(ids.len() == t, "pair {i}: {} segment ids for {t} token positions", ids.len());
        }
        Ok(())
    }
}

/// `g_k = sum_j W_j (r_kj / 4 + 1)` for each segment.
pub fn combined_scores(scores: &[[u8; 5]], weights: &AspectWeights) -> Vec<f64> {
    let w = weights.as_array();
    scores.iter().map(|r| r.iter().zip(&w).map(|(&x, wj)| wj * (x as f64 / 4.0 + 1.0)).sum()).collect()
}

/// Which segments of one pair are paired, and their coefficients.
#[derive(Debug, Clone, PartialEq)]
pub struct PairPlan {
    /// Chosen segment ids, by g descending.
    pub chosen: Vec<usize>,
    /// Rejected segment ids, by g ascending.
    pub rejected: Vec<usize>,
    /// `beta_w * g_w(i)` for each selected chosen segment.
    pub coef_chosen: Vec<f64>,
    /// `beta_l * g_l(i)` for each selected rejected segment.
    pub coef_rejected: Vec<f64>,
}

impl PairPlan {
    /// N, the number of segment pairs.
    pub fn len(&self) -> usize {
        self.chosen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chosen.is_empty()
    }
}

/// Plan one pair from the combined scores `g` of each side's segments;
/// `present[k]` false drops segment k (no tokens). Ties keep segment order
/// (stable sort).
pub fn plan_pair(g_w: &[f64], present_w: &[bool], g_l: &[f64], present_l: &[bool], beta: f64) -> PairPlan {
    let ranked = |g: &[f64], present: &[bool], descending: bool| -> Vec<usize> {
        let mut ids: Vec<usize> = (0..g.len()).filter(|&k| present[k]).collect();
        ids.sort_by(|&a, &b| {
            let o = g[a].total_cmp(&g[b]);
            if descending {
                o.reverse()
            } else {
                o
            }
        });
        ids
    };
    let mut chosen = ranked(g_w, present_w, true);
    let mut rejected = ranked(g_l, present_l, false);
    let n = chosen.len().min(rejected.len());
    chosen.truncate(n);
    rejected.truncate(n);
    let coefs = |ids: &[usize], g: &[f64]| -> Vec<f64> {
        if ids.is_empty() {
            return Vec::new();
        }
        let mean_g = ids.iter().map(|&k| g[k]).sum::<f64>() / ids.len() as f64;
        let equivalent_beta = beta / mean_g;
        ids.iter().map(|&k| equivalent_beta * g[k]).collect()
    };
    PairPlan { coef_chosen: coefs(&chosen, g_w), coef_rejected: coefs(&rejected, g_l), chosen, rejected }
}

/// Per-pair 2-D losses and the number of segment pairs in each.
#[derive(Debug, Clone)]
pub struct TwoDLosses {
    /// `[B]`, differentiable through the token log-ratios.
    pub losses: Tensor,
    /// N for each pair (0: the pair contributed nothing).
    pub segment_pairs: Vec<usize>,
}

/// Segment presence of one pair: which segments own at least one response token.
fn presence(b: usize, ids: &[u32], mask: &[f32], n_segments: usize) -> Result<Vec<bool>> {
    let mut present = vec![false; n_segments];
    for (t, (&id, &m)) in ids.iter().zip(mask).enumerate() {
        if m <= 0.0 || id == NO_SEGMENT {
            continue;
        }
        match present.get_mut(id as usize) {
            Some(p) => *p = true,
            None => bail!("pair {b} token {t}: segment id {id} but the response has {n_segments} scored segments"),
        }
    }
    Ok(present)
}

/// Constant `[B, T, N_max]` matrix: entry (b, t, i) is 1 when response token
/// t of pair b lies in the i-th selected segment.
fn selection_matrix(segs: &SegmentBatch, masks: &[Vec<f32>], selected: &[&[usize]], n_max: usize, like: &Tensor) -> Result<Tensor> {
    let (b, t) = like.dims2()?;
    let mut a = vec![0f64; b * t * n_max];
    for (bi, sel) in selected.iter().enumerate() {
        let mut slot = vec![usize::MAX; segs.scores[bi].len()];
        for (i, &k) in sel.iter().enumerate() {
            slot[k] = i;
        }
        for (ti, (&id, &m)) in segs.token_segments[bi].iter().zip(&masks[bi]).enumerate() {
            if m > 0.0 && id != NO_SEGMENT && slot[id as usize] != usize::MAX {
                a[(bi * t + ti) * n_max + slot[id as usize]] = 1.0;
            }
        }
    }
    Ok(Tensor::from_vec(a, (b, t, n_max), like.device())?.to_dtype(like.dtype())?)
}

/// `[B, N_max]` constant from per-pair rows, zero-padded.
fn padded(rows: &[Vec<f64>], n_max: usize, like: &Tensor) -> Result<Tensor> {
    let mut v = vec![0f64; rows.len() * n_max];
    for (b, r) in rows.iter().enumerate() {
        v[b * n_max..b * n_max + r.len()].copy_from_slice(r);
    }
    Ok(Tensor::from_vec(v, (rows.len(), n_max), like.device())?.to_dtype(like.dtype())?)
}

/// The 2D-DPO loss of each pair. `*_token_logratios`: per-token `log pi - log pi_ref`
/// `[B, T_side]`; `mask_*`: response masks; `segments_*`: ids and scores.
#[allow(clippy::too_many_arguments)]
pub fn two_d_dpo_losses(
    chosen_token_logratios: &Tensor,
    rejected_token_logratios: &Tensor,
    mask_chosen: &Tensor,
    mask_rejected: &Tensor,
    segments_chosen: &SegmentBatch,
    segments_rejected: &SegmentBatch,
    weights: &AspectWeights,
    beta: f64,
) -> Result<TwoDLosses> {
    let (b, t_w) = chosen_token_logratios.dims2()?;
    let (b_l, t_l) = rejected_token_logratios.dims2()?;
    ensure!(b == b_l, "chosen and rejected batches differ in size: {b} vs {b_l}");
    segments_chosen.check_shape(b, t_w).context("chosen segments")?;
    segments_rejected.check_shape(b, t_l).context("rejected segments")?;
    let host_mask = |m: &Tensor| -> Result<Vec<Vec<f32>>> { Ok(m.to_dtype(DType::F32)?.to_vec2::<f32>()?) };
    let (mw, ml) = (host_mask(mask_chosen)?, host_mask(mask_rejected)?);

    let mut plans = Vec::with_capacity(b);
    for bi in 0..b {
        let (sw, sl) = (&segments_chosen.scores[bi], &segments_rejected.scores[bi]);
        let pw = presence(bi, &segments_chosen.token_segments[bi], &mw[bi], sw.len()).context("chosen")?;
        let pl = presence(bi, &segments_rejected.token_segments[bi], &ml[bi], sl.len()).context("rejected")?;
        let (gw, gl) = (combined_scores(sw, weights), combined_scores(sl, weights));
        plans.push(plan_pair(&gw, &pw, &gl, &pl, beta));
    }
    let segment_pairs: Vec<usize> = plans.iter().map(PairPlan::len).collect();
    let n_max = segment_pairs.iter().copied().max().unwrap_or(0);
    if n_max == 0 {
        let losses = Tensor::zeros(b, chosen_token_logratios.dtype(), chosen_token_logratios.device())?;
        return Ok(TwoDLosses { losses, segment_pairs });
    }

    let sel_w: Vec<&[usize]> = plans.iter().map(|p| p.chosen.as_slice()).collect();
    let sel_l: Vec<&[usize]> = plans.iter().map(|p| p.rejected.as_slice()).collect();
    let a_w = selection_matrix(segments_chosen, &mw, &sel_w, n_max, chosen_token_logratios)?;
    let a_l = selection_matrix(segments_rejected, &ml, &sel_l, n_max, rejected_token_logratios)?;
    // Segment sums R of the selected segments, [B, N_max].
    let r_w = chosen_token_logratios.unsqueeze(1)?.contiguous()?.matmul(&a_w)?.squeeze(1)?;
    let r_l = rejected_token_logratios.unsqueeze(1)?.contiguous()?.matmul(&a_l)?.squeeze(1)?;

    let coef_w = padded(&plans.iter().map(|p| p.coef_chosen.clone()).collect::<Vec<_>>(), n_max, chosen_token_logratios)?;
    let coef_l = padded(&plans.iter().map(|p| p.coef_rejected.clone()).collect::<Vec<_>>(), n_max, chosen_token_logratios)?;
    let valid = padded(&segment_pairs.iter().map(|&n| vec![1.0; n]).collect::<Vec<_>>(), n_max, chosen_token_logratios)?;
    let logits = ((coef_w * r_w)? - (coef_l * r_l)?)?;
    let losses = (log_sigmoid(&logits)? * valid)?.sum(1)?.neg()?;
    Ok(TwoDLosses { losses, segment_pairs })
}
