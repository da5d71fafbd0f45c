//! The 2-D reward model (docs/method.md §7): a causal LM's backbone with a linear
//! head on the last hidden state at the final token of every segment,
//! predicting the segment's five 0..4 scores. Trained by the [`crate::trainer`]
//! with `task = "reward_model"` (MSE against the labels of both responses of
//! every pair) and saved as transformers' `LlamaForTokenClassification` /
//! `Qwen2ForTokenClassification` with `num_labels = 5` (head `score.weight`,
//! `score.bias`), so `AutoModelForTokenClassification` loads it.
//!
//! A segment's final token: its last token; the last segment's includes the
//! end-of-turn text the chat template puts after an answer.

use crate::align::{AlignOptions, Aligner, TokenizedResponse, NO_SEGMENT};
use crate::batch::BatchLoss;
use crate::packing::{packed_hidden, Unit};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use dpo2d_data::{Pair, Response, Scores, ASPECTS};
use dpo2d_model::llama::{CausalLM, LoadOptions};
use dpo2d_model::source::TextSide;
use rand::{Rng, SeedableRng};
use std::path::Path;

/// Names of the head's tensors, as transformers names them.
pub const SCORE_WEIGHT: &str = "score.weight";
pub const SCORE_BIAS: &str = "score.bias";
/// Where a LoRA run keeps the head (the adapter file holds the adapters only).
pub const HEAD_FILE: &str = "score.safetensors";

/// The linear head: `[5, H]` weight and `[5]` bias (f32 for f32 and bf16 models).
pub struct RewardHead {
    pub weight: Var,
    pub bias: Var,
}

impl RewardHead {
    /// A fresh head: weights ~ N(0, 0.02) (transformers' `initializer_range`)
    /// from `seed`; the bias at the mean label of each aspect (`bias`), so the
    /// first updates go to telling segments apart, not to finding the mean.
    pub fn new(hidden: usize, bias: [f64; 5], seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5c0e_5c0e);
        // Box-Muller: one normal draw from two uniform ones.
        let mut normal = || -> f32 {
            let (u, v): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
            (0.02 * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        };
        let w: Vec<f32> = (0..ASPECTS.len() * hidden).map(|_| normal()).collect();
        let weight = Var::from_tensor(&Tensor::from_vec(w, (ASPECTS.len(), hidden), device)?.to_dtype(dtype)?)?;
        let bias = Var::from_tensor(&Tensor::new(&bias, device)?.to_dtype(dtype)?)?;
        Ok(RewardHead { weight, bias })
    }

    /// The head saved in `dir` (`model.safetensors` of a full model, or [`HEAD_FILE`]).
    pub fn load(dir: &Path, hidden: usize, dtype: DType, device: &Device) -> Result<Self> {
        let file = if dir.join(HEAD_FILE).exists() { dir.join(HEAD_FILE) } else { dir.join("model.safetensors") };
        let w = dpo2d_model::weights::WeightSet::load_file(&file, device)?;
        let get = |name: &str, shape: &[usize]| -> Result<Var> {
            let t = w.get(name, shape).with_context(|| format!("{} holds no reward head", file.display()))?;
            Ok(Var::from_tensor(&t.to_dtype(dtype)?)?)
        };
        Ok(RewardHead { weight: get(SCORE_WEIGHT, &[ASPECTS.len(), hidden])?, bias: get(SCORE_BIAS, &[ASPECTS.len()])? })
    }

    pub fn vars(&self) -> Vec<(String, Var)> {
        vec![(SCORE_WEIGHT.into(), self.weight.clone()), (SCORE_BIAS.into(), self.bias.clone())]
    }

    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.vars().into_iter().map(|(n, v)| (n, v.as_tensor().detach())).collect()
    }

    /// Predicted scores `[N, 5]` (in the head's dtype) from hidden states `[N, H]`.
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let x = hidden.to_dtype(self.weight.dtype())?;
        Ok(x.matmul(&self.weight.as_tensor().t()?)?.broadcast_add(self.bias.as_tensor())?)
    }
}

/// The mean 0..4 label of each aspect over every segment of both sides of `pairs`.
pub fn mean_labels(pairs: &[crate::align::TokenizedPair]) -> [f64; 5] {
    let mut sum = [0.0; 5];
    let mut n = 0usize;
    for s in pairs.iter().flat_map(|p| p.chosen.scores.iter().chain(&p.rejected.scores)) {
        for (a, x) in s.iter().enumerate() {
            sum[a] += *x as f64;
        }
        n += 1;
    }
    sum.map(|x| x / n.max(1) as f64)
}

/// Position of the final token of each segment of a response (its segments
/// are numbered in order, so the last token with a number ends it).
pub fn segment_ends(r: &TokenizedResponse) -> Vec<usize> {
    let mut ends = vec![0; r.scores.len()];
    for (j, &s) in r.token_segments.iter().enumerate() {
        if s != NO_SEGMENT {
            ends[s as usize] = j;
        }
    }
    ends
}

const MSE: [&str; 5] = ["mse/helpfulness", "mse/correctness", "mse/safety", "mse/completeness", "mse/clarity"];
const ACCURACY: [&str; 5] =
    ["accuracy/helpfulness", "accuracy/correctness", "accuracy/safety", "accuracy/completeness", "accuracy/clarity"];
const WITHIN_ONE: [&str; 5] =
    ["within_one/helpfulness", "within_one/correctness", "within_one/safety", "within_one/completeness", "within_one/clarity"];

/// The reward model's loss on `pairs`: MSE of the predicted scores at every
/// segment end of both responses against their labels; metrics per aspect:
/// MSE, accuracy (the prediction rounded to 0..4 equals the label) and
/// within-one accuracy, and their means over the aspects.
pub(crate) fn reward_loss(policy: &CausalLM, head: &RewardHead, pairs: &[&crate::align::TokenizedPair]) -> Result<BatchLoss> {
    let units: Vec<Unit> = crate::packing::pair_units(pairs);
    let out = packed_hidden(policy, &units)?;
    let (mut positions, mut labels) = (vec![], vec![]);
    for (u, p) in pairs.iter().enumerate() {
        for (r, side) in [&p.chosen, &p.rejected].into_iter().enumerate() {
            for (s, end) in segment_ends(side).into_iter().enumerate() {
                positions.push((out.response_starts[u][r] + end) as u32);
                labels.extend(side.scores[s].iter().map(|&x| x as f32));
            }
        }
    }
    let n = positions.len();
    if n == 0 {
        bail!("a reward-model batch without scored segments");
    }
    let dev = policy.device();
    let sel = out.hidden.index_select(&Tensor::from_vec(positions, n, dev)?, 0)?;
    let pred = head.forward(&sel)?;
    let target = Tensor::from_vec(labels.clone(), (n, ASPECTS.len()), dev)?.to_dtype(pred.dtype())?;
    let loss = (&pred - &target)?.sqr()?.mean_all()?;
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let metrics = score_metrics(&pred.detach().to_dtype(DType::F32)?.to_vec2::<f32>()?, &labels, value);
    Ok(BatchLoss { loss, metrics, tokens: pairs.iter().map(|p| p.num_tokens()).sum() })
}

/// The 0..4 label nearest to a prediction of aspect `a`: rounded and
/// clamped, except safety, which is 0 (fail) or 4 (pass).
fn to_label(a: usize, p: f64) -> u8 {
    const SAFETY: usize = 2;
    if a == SAFETY {
        if p >= 2.0 {
            4
        } else {
            0
        }
    } else {
        p.round().clamp(0.0, 4.0) as u8
    }
}

fn score_metrics(pred: &[Vec<f32>], labels: &[f32], loss: f64) -> Vec<(&'static str, f64)> {
    let n = pred.len() as f64;
    let mut m = vec![("loss", loss)];
    let (mut acc_all, mut within_all) = (0.0, 0.0);
    for a in 0..ASPECTS.len() {
        let (mut se, mut acc, mut within) = (0.0, 0.0, 0.0);
        for (i, row) in pred.iter().enumerate() {
            let (p, y) = (row[a] as f64, labels[i * ASPECTS.len() + a] as f64);
            se += (p - y).powi(2);
            let rounded = to_label(a, p) as f64;
            acc += (rounded == y) as u8 as f64;
            within += ((rounded - y).abs() <= 1.0) as u8 as f64;
        }
        m.push((MSE[a], se / n));
        m.push((ACCURACY[a], acc / n));
        m.push((WITHIN_ONE[a], within / n));
        acc_all += acc / n;
        within_all += within / n;
    }
    m.push(("accuracy", acc_all / ASPECTS.len() as f64));
    m.push(("within_one", within_all / ASPECTS.len() as f64));
    m
}

/// Write a reward model as transformers' token-classification model:
/// `model.safetensors` (backbone without `lm_head`, plus `score.*`),
/// `config.json` (`*ForTokenClassification`, `num_labels` 5 with the aspect
/// names as labels) and the tokenizer files. `merged`: LoRA adapters merged in.
pub fn save_reward_model(dir: &Path, backbone: &CausalLM, head: &RewardHead, text: &TextSide, merged: bool) -> Result<()> {
    let mut tensors = if merged { backbone.merged_hf_tensors()? } else { backbone.hf_tensors()? };
    tensors.retain(|(n, _)| n != "lm_head.weight");
    tensors.extend(head.tensors());
    dpo2d_model::save::save_safetensors(&tensors, &dir.join("model.safetensors"))?;
    let mut cfg = backbone.config().clone();
    cfg.torch_dtype = Some(if backbone.dtype() == DType::BF16 { "bfloat16" } else { "float32" }.into());
    let mut json = cfg.to_hf_json();
    let arch = cfg.architecture.token_classification_name();
    json["architectures"] = serde_json::json!([arch]);
    // No output embeddings in a token classifier; tied, dpo2d reads the backbone as a causal LM again.
    json["tie_word_embeddings"] = true.into();
    json["num_labels"] = ASPECTS.len().into();
    json["id2label"] = ASPECTS.iter().enumerate().map(|(i, a)| (i.to_string(), serde_json::Value::from(*a))).collect();
    json["label2id"] = ASPECTS.iter().enumerate().map(|(i, a)| (a.to_string(), serde_json::Value::from(i))).collect();
    json["problem_type"] = "regression".into();
    dpo2d_fs::write_file(&dir.join("config.json"), serde_json::to_string_pretty(&json)?)?;
    dpo2d_model::save::save_text_side(dir, text)
}

/// A trained reward model, for scoring.
pub struct RewardModel {
    pub backbone: CausalLM,
    pub head: RewardHead,
    pub text: TextSide,
}

impl RewardModel {
    /// Load a directory written by `dpo2d rm train` (`final/`, or `final/merged/` of a LoRA run).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let opts = LoadOptions { device: device.clone(), ..LoadOptions::default() };
        let loaded = dpo2d_model::source::load(dir, &opts).with_context(|| format!("loading the reward model {}", dir.display()))?;
        let head = RewardHead::load(dir, loaded.config.hidden_size, DType::F32, device)?;
        let text = loaded.text();
        Ok(RewardModel { backbone: loaded.model, head, text })
    }

    /// Every segment of both responses of each pair scored: the pairs with
    /// their segments' `scores` replaced by the predictions (rounded and
    /// clamped to 0..4). `batch`: pairs per forward pass.
    pub fn score_pairs(&self, pairs: &[Pair], batch: usize) -> Result<Vec<Pair>> {
        let aligner = Aligner::new(&self.text.tokenizer.inner, &self.text.chat)?;
        let max_length = self.backbone.config().max_position_embeddings;
        let opts = AlignOptions { max_length, max_prompt_length: max_length / 2 };
        let mut out = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(batch.max(1)) {
            // Labels are needed to align segments with tokens; any will do.
            let labelled: Vec<Pair> = chunk.iter().map(with_placeholder_scores).collect::<Result<_>>()?;
            let (tokenized, _) = aligner.pairs(&labelled, opts)?;
            let refs: Vec<&crate::align::TokenizedPair> = tokenized.iter().collect();
            let units = crate::packing::pair_units(&refs);
            let hidden = packed_hidden(&self.backbone, &units)?;
            // The segmented pairs are the output; their placeholder scores are all replaced.
            for ((mut scored, tp), starts) in labelled.into_iter().zip(&tokenized).zip(&hidden.response_starts) {
                for (r, (side, t)) in [(&mut scored.chosen, &tp.chosen), (&mut scored.rejected, &tp.rejected)].into_iter().enumerate() {
                    let positions: Vec<u32> = segment_ends(t).into_iter().map(|e| (starts[r] + e) as u32).collect();
                    let n = positions.len();
                    let pred =
                        self.head.forward(&hidden.hidden.index_select(&Tensor::from_vec(positions, n, self.backbone.device())?, 0)?)?;
                    fill_scores(side, &pred.to_dtype(DType::F32)?.to_vec2::<f32>()?);
                }
                out.push(scored);
            }
        }
        Ok(out)
    }
}

/// The pair with every response segmented and every segment given scores
/// (a plain response becomes one segment).
fn with_placeholder_scores(p: &Pair) -> Result<Pair> {
    let fill = |r: &Response| -> Result<Response> {
        let mut segments = match r {
            Response::Plain(t) => {
                dpo2d_data::segment_response(t, &dpo2d_data::SegmentOptions::default()).segments().unwrap_or(&[]).to_vec()
            }
            Response::Segmented { segments } => segments.clone(),
        };
        if segments.is_empty() {
            bail!("an empty response cannot be scored");
        }
        for s in &mut segments {
            s.scores = Some(Scores::from_array([0; 5]));
        }
        Ok(Response::Segmented { segments })
    };
    Ok(Pair { chosen: fill(&p.chosen)?, rejected: fill(&p.rejected)?, ..p.clone() })
}

/// Put predictions (as labels: [`to_label`]) on the segments of a
/// segmented `side`: the segments that own tokens (one prediction each, in
/// order) get theirs; one that owns none (only whitespace, or cut off by the
/// context) gets its predecessor's.
fn fill_scores(side: &mut Response, pred: &[Vec<f32>]) {
    let Response::Segmented { segments } = side else { return };
    let kept = pred.len();
    let to_scores = |row: &[f32]| Scores::from_array(std::array::from_fn(|a| to_label(a, row[a] as f64)));
    let mut k = 0;
    let mut last = pred.first().map(|r| to_scores(r));
    for s in segments.iter_mut() {
        if k < kept && !s.text.trim().is_empty() {
            last = Some(to_scores(&pred[k]));
            k += 1;
        }
        s.scores = last;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::align::TokenizedPair;
    use dpo2d_model::test_support::TinyModel;

    fn response(ids: Vec<u32>, token_segments: Vec<u32>, scores: Vec<[u8; 5]>) -> TokenizedResponse {
        TokenizedResponse { ids, token_segments, scores }
    }

    fn pairs() -> Vec<TokenizedPair> {
        let p = |index, prompt: Vec<u32>, chosen, rejected| TokenizedPair {
            index,
            prompt,
            chosen,
            rejected,
            prompt_truncated: false,
            response_truncated: false,
        };
        vec![
            p(
                0,
                vec![3, 4, 5],
                response(vec![6, 7, 8, 9], vec![0, 0, 1, 1], vec![[4, 4, 4, 2, 3], [3, 4, 4, 4, 4]]),
                response(vec![10, 11, 12], vec![0, 0, 0], vec![[1, 0, 4, 1, 2]]),
            ),
            p(
                1,
                vec![13, 14],
                response(vec![15, 16], vec![0, 1], vec![[2, 3, 4, 1, 1], [0, 1, 0, 2, 3]]),
                response(vec![17], vec![0], vec![[4; 5]]),
            ),
        ]
    }

    /// The analytic gradient of the loss, through the head and into the
    /// backbone, against central finite differences (f64).
    #[test]
    fn gradients_match_finite_differences() {
        let model = TinyModel { dtype: DType::F64, ..Default::default() }.build(&LoadOptions {
            dtype: DType::F64,
            trainable: true,
            ..LoadOptions::default()
        });
        let data = pairs();
        assert_eq!(mean_labels(&data)[2], 20.0 / 6.0);
        let head = RewardHead::new(16, mean_labels(&data), 1, DType::F64, &Device::Cpu).unwrap();
        let refs: Vec<&TokenizedPair> = data.iter().collect();
        let loss_of = || reward_loss(&model, &head, &refs).unwrap().loss.to_scalar::<f64>().unwrap();
        let out = reward_loss(&model, &head, &refs).unwrap();
        let store = out.loss.backward().unwrap();
        let mut vars = model.trainable_vars();
        let grads_model = model.gradients(&store).unwrap();
        let mut grads: Vec<Option<Tensor>> = grads_model;
        vars.extend(head.vars());
        grads.extend(head.vars().iter().map(|(_, v)| store.get(v.as_tensor()).cloned()));
        let mut checked = 0;
        for ((name, var), grad) in vars.iter().zip(&grads) {
            if !(name.starts_with("score") || name.contains("layers.1.mlp.down") || name == "model.norm.weight") {
                continue;
            }
            let g = grad.as_ref().unwrap_or_else(|| panic!("no gradient for {name}")).flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for i in [0, base.len() / 2, base.len() - 1] {
                let eps = 1e-5;
                let at = |d: f64| {
                    let mut v = base.clone();
                    v[i] += d;
                    var.set(&Tensor::from_vec(v, var.as_tensor().shape(), &Device::Cpu).unwrap()).unwrap();
                    loss_of()
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                var.set(&Tensor::from_vec(base.clone(), var.as_tensor().shape(), &Device::Cpu).unwrap()).unwrap();
                assert!((fd - g[i]).abs() <= 1e-6 * (1.0 + fd.abs()), "{name}[{i}]: finite difference {fd}, gradient {}", g[i]);
                checked += 1;
            }
        }
        assert_eq!(checked, 12);
    }

    #[test]
    fn segment_ends_are_the_last_token_of_each_segment() {
        let r = TokenizedResponse { ids: vec![1; 7], token_segments: vec![0, 0, 1, 1, 1, 2, 2], scores: vec![[0; 5]; 3] };
        assert_eq!(segment_ends(&r), vec![1, 4, 6]);
    }

    #[test]
    fn metrics_round_and_clamp_predictions() {
        let pred = vec![vec![3.6, 0.4, -1.0, 5.2, 2.5], vec![1.0, 1.0, 4.0, 2.0, 0.0]];
        let labels = [4.0, 0.0, 0.0, 4.0, 1.0, 3.0, 1.0, 4.0, 2.0, 0.0];
        let m: std::collections::HashMap<_, _> = score_metrics(&pred, &labels, 0.5).into_iter().collect();
        assert_eq!(m["accuracy/helpfulness"], 0.5);
        assert_eq!(m["within_one/helpfulness"], 0.5);
        // Safety is pass/fail: -1.0 is a fail (0), 4.0 a pass.
        assert_eq!(m["accuracy/safety"], 1.0);
        assert_eq!((to_label(2, 1.9), to_label(2, 2.1), to_label(1, 2.5), to_label(1, -0.7)), (0, 4, 3, 0));
        assert_eq!(m["accuracy/completeness"], 1.0);
        // 2.5 rounds to 3: two away from 1.
        assert_eq!(m["within_one/clarity"], 0.5);
        assert!((m["mse/helpfulness"] - (0.16 + 4.0) / 2.0).abs() < 1e-6);
    }
}
