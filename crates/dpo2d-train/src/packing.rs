//! Padding-free packed forward passes. A prompt and the responses that
//! continue it form one unit `[prompt | response 1 | response 2 ...]` in which
//! each response attends to the prompt and to itself only, so the shared
//! prompt goes through the model once with the same result as separate
//! prompt + response sequences. Units are packed into rows (first fit by
//! decreasing length) and label log-probs are taken at response positions only.

use crate::align::TokenizedPair;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use dpo2d_model::llama::{AttentionLayout, CausalLM};

/// A prompt and the responses that continue it.
pub(crate) struct Unit<'a> {
    pub prompt: &'a [u32],
    pub responses: Vec<&'a [u32]>,
}

impl Unit<'_> {
    fn len(&self) -> usize {
        self.prompt.len() + self.responses.iter().map(|r| r.len()).sum::<usize>()
    }
}

/// One unit per pair: its prompt with the chosen and then the rejected response.
pub(crate) fn pair_units<'a>(pairs: &[&'a TokenizedPair]) -> Vec<Unit<'a>> {
    pairs.iter().map(|p| Unit { prompt: &p.prompt, responses: vec![&p.chosen.ids, &p.rejected.ids] }).collect()
}

/// Per-response label log-probs from one packed forward pass.
pub(crate) struct PackedOut {
    /// Flat `[N]` log-probs of every response token of every unit, in order.
    pub logps: Tensor,
    /// Flat `[N, V]` logits at the same positions (only when asked).
    pub logits: Option<Tensor>,
    /// `starts[u][r]`: start of unit u's response r in the flat vector.
    pub starts: Vec<Vec<usize>>,
}

impl PackedOut {
    /// Flat starts of response `r` of every unit.
    pub fn starts_of(&self, r: usize) -> Vec<usize> {
        self.starts.iter().map(|s| s[r]).collect()
    }
}

/// Where each unit sits: rows as wide as the longest unit, filled first-fit
/// by decreasing length.
struct Packing {
    width: usize,
    /// Unit indices of each row, in placement order.
    rows: Vec<Vec<usize>>,
    /// `(row, offset)` of each unit.
    place: Vec<(usize, usize)>,
}

impl Packing {
    fn new(units: &[Unit]) -> Result<Self> {
        let lens: Vec<usize> = units.iter().map(Unit::len).collect();
        let width = *lens.iter().max().context("empty batch")?;
        let mut order: Vec<usize> = (0..units.len()).collect();
        order.sort_by(|a, b| lens[*b].cmp(&lens[*a]).then(a.cmp(b)));
        let mut used: Vec<usize> = Vec::new();
        let mut rows: Vec<Vec<usize>> = Vec::new();
        let mut place = vec![(0usize, 0usize); units.len()];
        for &i in &order {
            let r = used.iter().position(|u| u + lens[i] <= width).unwrap_or_else(|| {
                used.push(0);
                rows.push(vec![]);
                rows.len() - 1
            });
            place[i] = (r, used[r]);
            used[r] += lens[i];
            rows[r].push(i);
        }
        Ok(Packing { width, rows, place })
    }

    /// Token ids `[rows * width]` (0 where nothing is packed).
    fn ids(&self, units: &[Unit]) -> Vec<u32> {
        let mut ids = vec![0u32; self.rows.len() * self.width];
        for (u, (r, off)) in units.iter().zip(&self.place) {
            let mut at = r * self.width + off;
            for part in std::iter::once(u.prompt).chain(u.responses.iter().copied()) {
                ids[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
        }
        ids
    }

    fn layout(&self, units: &[Unit]) -> Result<AttentionLayout> {
        let shape: Vec<Vec<(usize, Vec<usize>)>> = self
            .rows
            .iter()
            .map(|row| row.iter().map(|&i| (units[i].prompt.len(), units[i].responses.iter().map(|r| r.len()).collect())).collect())
            .collect();
        AttentionLayout::packed_shared(&shape, self.width)
    }

    /// For every response token: the flat position of the hidden state that
    /// predicts it (the prompt's last token for a response's first token,
    /// else the previous response token), and the token itself; plus where
    /// each response starts in that list.
    fn label_positions(&self, units: &[Unit]) -> (Vec<u32>, Vec<u32>, Vec<Vec<usize>>) {
        let (mut hidx, mut labels, mut starts) = (Vec::new(), Vec::new(), Vec::with_capacity(units.len()));
        for (u, (r, off)) in units.iter().zip(&self.place) {
            let prompt_end = r * self.width + off + u.prompt.len();
            let mut at = prompt_end;
            let mut s = Vec::with_capacity(u.responses.len());
            for resp in &u.responses {
                s.push(labels.len());
                for (j, &tok) in resp.iter().enumerate() {
                    hidx.push(if j == 0 { prompt_end - 1 } else { at + j - 1 } as u32);
                    labels.push(tok);
                }
                at += resp.len();
            }
            starts.push(s);
        }
        (hidx, labels, starts)
    }
}

/// The model's last hidden states over packed units.
pub(crate) struct PackedHidden {
    /// Flat `[rows * width, H]`.
    pub hidden: Tensor,
    /// `response_starts[u][r]`: flat position of the first token of unit u's response r.
    pub response_starts: Vec<Vec<usize>>,
}

/// Run the model once over the packed units; its hidden states.
pub(crate) fn packed_hidden(model: &CausalLM, units: &[Unit]) -> Result<PackedHidden> {
    let (packing, hidden) = forward_packed(model, units)?;
    let response_starts = units
        .iter()
        .zip(&packing.place)
        .map(|(u, (r, off))| {
            let mut at = r * packing.width + off + u.prompt.len();
            u.responses
                .iter()
                .map(|resp| {
                    at += resp.len();
                    at - resp.len()
                })
                .collect()
        })
        .collect();
    Ok(PackedHidden { hidden, response_starts })
}

/// The packing of `units` and the flat `[rows * width, H]` hidden states of one pass.
fn forward_packed(model: &CausalLM, units: &[Unit]) -> Result<(Packing, Tensor)> {
    let packing = Packing::new(units)?;
    let (n_rows, width) = (packing.rows.len(), packing.width);
    let input = Tensor::from_vec(packing.ids(units), (n_rows, width), model.device())?;
    let hidden = model.forward(&input, &packing.layout(units)?)?;
    let h = hidden.dim(2)?;
    Ok((packing, hidden.reshape((n_rows * width, h))?))
}

/// Run the model once over the packed units and take the label log-probs
/// (and, if asked, the logits) at the response positions.
pub(crate) fn packed_forward(model: &CausalLM, units: &[Unit], want_logits: bool) -> Result<PackedOut> {
    let (packing, hidden) = forward_packed(model, units)?;
    let dev = model.device();
    let (hidx, labels, starts) = packing.label_positions(units);
    let n = labels.len();
    let sel = hidden.index_select(&Tensor::from_vec(hidx, n, dev)?, 0)?.unsqueeze(0)?;
    let lab = Tensor::from_vec(labels, (1, n), dev)?;
    let logps = model.label_logprobs(&sel, &lab)?.squeeze(0)?;
    let logits = if want_logits { Some(model.logits(&sel)?.squeeze(0)?) } else { None };
    Ok(PackedOut { logps, logits, starts })
}

/// Gather per-sequence runs of a flat `[N, ...]` tensor into `[B, T, ...]`
/// (padding rows are zero), where sequence k has `lens[k]` entries at `starts[k]`.
pub(crate) fn gather_side(flat: &Tensor, starts: &[usize], lens: &[usize]) -> Result<Tensor> {
    let t = *lens.iter().max().unwrap_or(&1);
    let n = flat.dim(0)?;
    let mut pad_shape = flat.dims().to_vec();
    pad_shape[0] = 1;
    let padded = Tensor::cat(&[flat, &Tensor::zeros(pad_shape, flat.dtype(), flat.device())?], 0)?;
    let mut idx = Vec::with_capacity(starts.len() * t);
    for (s, l) in starts.iter().zip(lens) {
        for j in 0..t {
            idx.push(if j < *l { (s + j) as u32 } else { n as u32 });
        }
    }
    let g = padded.index_select(&Tensor::from_vec(idx, starts.len() * t, flat.device())?, 0)?;
    let mut shape = vec![starts.len(), t];
    shape.extend_from_slice(&flat.dims()[1..]);
    Ok(g.reshape(shape)?)
}

/// Response mask `[B, T]`: 1 on the first `lens[b]` positions of row b.
pub(crate) fn mask_for(lens: &[usize], dev: &Device) -> Result<Tensor> {
    let t = *lens.iter().max().unwrap_or(&1);
    let mut m = vec![0f32; lens.len() * t];
    for (b, l) in lens.iter().enumerate() {
        m[b * t..b * t + l].fill(1.0);
    }
    Ok(Tensor::from_vec(m, (lens.len(), t), dev)?)
}

/// Rows of different lengths as one zero-padded `[B, T]` tensor.
pub(crate) fn padded_rows(rows: &[&[f32]], dev: &Device) -> Result<Tensor> {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(1);
    let mut m = vec![0f32; rows.len() * t];
    for (b, r) in rows.iter().enumerate() {
        m[b * t..b * t + r.len()].copy_from_slice(r);
    }
    Ok(Tensor::from_vec(m, (rows.len(), t), dev)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use dpo2d_model::llama::LoadOptions;
    use dpo2d_model::test_support::TinyModel;

    #[test]
    fn shared_prompt_forward_equals_one_sequence_per_response() {
        let tiny = TinyModel { vocab: 32, hidden: 8, intermediate: 16, heads: 2, kv_heads: 1, dtype: DType::F64, ..Default::default() };
        let model = tiny.build(&LoadOptions { dtype: DType::F64, ..LoadOptions::default() });
        let (p1, c1, r1): (&[u32], &[u32], &[u32]) = (&[1, 2, 3, 4], &[5, 6, 7], &[8, 9]);
        let (p2, c2, r2): (&[u32], &[u32], &[u32]) = (&[10, 11], &[12], &[13, 14, 15, 16, 17]);
        let shared = vec![Unit { prompt: p1, responses: vec![c1, r1] }, Unit { prompt: p2, responses: vec![c2, r2] }];
        let alone: Vec<Unit> =
            [(p1, c1), (p1, r1), (p2, c2), (p2, r2)].iter().map(|&(p, r)| Unit { prompt: p, responses: vec![r] }).collect();
        let a = packed_forward(&model, &shared, true).unwrap();
        let b = packed_forward(&model, &alone, true).unwrap();
        let (la, lb) = (a.logps.to_vec1::<f64>().unwrap(), b.logps.to_vec1::<f64>().unwrap());
        let (xa, xb) = (a.logits.unwrap().to_vec2::<f64>().unwrap(), b.logits.unwrap().to_vec2::<f64>().unwrap());
        for (u, resp) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let len = shared[u].responses[resp].len();
            let (sa, sb) = (a.starts[u][resp], b.starts[2 * u + resp][0]);
            for j in 0..len {
                assert!((la[sa + j] - lb[sb + j]).abs() < 1e-10, "unit {u} response {resp} token {j}");
                let d = xa[sa + j].iter().zip(&xb[sb + j]).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
                assert!(d < 1e-10, "logits of unit {u} response {resp} token {j}");
            }
        }
        assert!(la.iter().all(|&x| x < 0.0));
    }
}
