//! Text generation: batched prompts (left padding), KV-cache incremental
//! decoding, greedy or sampled (temperature, top-k, top-p, seed), stopping
//! at EOS, at stop strings or after `max_new_tokens`.

use crate::chat::Message;
use crate::llama::{CausalLM, KvCache};
use crate::source::{LoadedModel, TextSide};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// How to decode. `temperature == 0` (or `do_sample == false`) is greedy.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub do_sample: bool,
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability
    /// reaches `top_p` (1.0 = off).
    pub top_p: f64,
    /// Keep only the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    pub seed: u64,
    /// Stop once the completion contains any of these (the stop string is cut off).
    pub stop: Vec<String>,
    /// Completions per prompt.
    pub num_return_sequences: usize,
    /// Rows decoded together (prompts x samples).
    pub batch_size: usize,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            do_sample: false,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: 42,
            stop: vec![],
            num_return_sequences: 1,
            batch_size: 8,
        }
    }
}

impl GenerationConfig {
    /// Greedy decoding of up to `max_new_tokens`.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self { max_new_tokens, ..Self::default() }
    }

    /// Sampling with the given temperature and top-p.
    pub fn sampling(max_new_tokens: usize, temperature: f64, top_p: f64, seed: u64) -> Self {
        Self { max_new_tokens, do_sample: true, temperature, top_p, seed, ..Self::default() }
    }

    pub fn is_greedy(&self) -> bool {
        !self.do_sample || self.temperature <= 0.0
    }

    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.top_p) || self.top_p == 0.0 {
            bail!("top_p must be in (0, 1], got {}", self.top_p);
        }
        if self.temperature < 0.0 || !self.temperature.is_finite() {
            bail!("temperature must be >= 0, got {}", self.temperature);
        }
        if self.num_return_sequences == 0 {
            bail!("num_return_sequences must be at least 1");
        }
        if self.batch_size == 0 {
            bail!("batch_size must be at least 1");
        }
        Ok(())
    }
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token.
    Eos,
    /// A stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

/// Generated token ids of one row.
#[derive(Debug, Clone, PartialEq)]
pub struct RawCompletion {
    /// New tokens, without the EOS token that ended them.
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

/// One completion of one prompt.
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    pub prompt_index: usize,
    pub sample_index: usize,
    pub completion: String,
    pub token_ids: Vec<u32>,
    pub num_tokens: usize,
    pub finish_reason: FinishReason,
}

/// Generate continuations of token-id prompts. Returns, per prompt, its
/// `num_return_sequences` completions in order. `stop_check` is called with
/// each row's new tokens and returns true when a stop string occurred.
/// Sample `s` of prompt `p` draws from its own generator seeded by
/// (`seed`, `p`, `s`), so what it samples does not depend on the batch size.
pub fn generate_ids(
    model: &CausalLM,
    prompts: &[Vec<u32>],
    eos_ids: &[u32],
    pad_id: u32,
    cfg: &GenerationConfig,
    stop_check: &dyn Fn(&[u32]) -> bool,
) -> Result<Vec<Vec<RawCompletion>>> {
    cfg.validate()?;
    let n = cfg.num_return_sequences;
    // Rows: every prompt repeated n times.
    let rows: Vec<(usize, usize)> = (0..prompts.len()).flat_map(|p| (0..n).map(move |s| (p, s))).collect();
    let mut results: Vec<Vec<Option<RawCompletion>>> = vec![vec![None; n]; prompts.len()];
    for chunk in rows.chunks(cfg.batch_size) {
        let batch: Vec<Row> = chunk.iter().map(|&(p, s)| Row::new(&prompts[p], cfg, row_seed(cfg.seed, p as u64, s as u64))).collect();
        let out = decode_rows(model, batch, eos_ids, pad_id, &mut |_, tokens| stop_check(tokens))?;
        for (&(p, s), c) in chunk.iter().zip(out) {
            results[p][s] = Some(c);
        }
    }
    Ok(results.into_iter().map(|r| r.into_iter().flatten().collect()).collect())
}

/// The seed of one (prompt, sample) row: SplitMix64 over the three numbers.
pub fn row_seed(seed: u64, prompt: u64, sample: u64) -> u64 {
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    mix(mix(mix(seed) ^ prompt) ^ sample)
}

/// One row of a batched decode: its prompt, how it picks tokens (its own
/// temperature, top-p, top-k and `max_new_tokens`) and its own generator.
pub struct Row<'a> {
    pub prompt: &'a [u32],
    pub cfg: &'a GenerationConfig,
    pub rng: StdRng,
}

impl<'a> Row<'a> {
    pub fn new(prompt: &'a [u32], cfg: &'a GenerationConfig, seed: u64) -> Self {
        Row { prompt, cfg, rng: StdRng::seed_from_u64(seed) }
    }
}

/// Decode rows together: one left-padded prefill, then one token per row per
/// step from a shared KV cache, dropping rows as they finish. Rows may differ
/// in prompt length, sampling settings and `max_new_tokens`. `on_token(row,
/// tokens)` sees each row's new tokens after every step and returns true to
/// end that row (a stop string, or nobody is listening any more).
pub fn decode_rows(
    model: &CausalLM,
    rows: Vec<Row>,
    eos_ids: &[u32],
    pad_id: u32,
    on_token: &mut dyn FnMut(usize, &[u32]) -> bool,
) -> Result<Vec<RawCompletion>> {
    decode_rows_within(model, rows, eos_ids, pad_id, on_token, PREFILL_SCORES)
}

/// Attention scores one prefill pass may hold (f32 values): the prompts of a
/// batch go through the model in column chunks small enough for this, so
/// sixteen long prompts (a judge's) never need gigabytes of scores at once.
const PREFILL_SCORES: usize = 1 << 27;

/// Prompt columns per prefill pass for `rows` prompts of `len` tokens.
fn prefill_chunk(rows: usize, len: usize, heads: usize, budget: usize) -> usize {
    (budget / (rows * heads * len).max(1)).clamp(16, len.max(16))
}

fn decode_rows_within(
    model: &CausalLM,
    mut rows: Vec<Row>,
    eos_ids: &[u32],
    pad_id: u32,
    on_token: &mut dyn FnMut(usize, &[u32]) -> bool,
    budget: usize,
) -> Result<Vec<RawCompletion>> {
    let b = rows.len();
    if rows.iter().any(|r| r.prompt.is_empty()) {
        bail!("cannot generate from an empty prompt");
    }
    let mut out: Vec<Option<RawCompletion>> = vec![None; b];
    let mut tokens: Vec<Vec<u32>> = vec![vec![]; b];
    // Rows still decoding, as indices into `rows`, in cache row order.
    let mut active: Vec<usize> = (0..b).filter(|&r| rows[r].cfg.max_new_tokens > 0).collect();
    let max_new = rows.iter().map(|r| r.cfg.max_new_tokens).max().unwrap_or(0);
    for (o, row) in out.iter_mut().zip(&rows) {
        if row.cfg.max_new_tokens == 0 {
            *o = Some(RawCompletion { tokens: vec![], finish: FinishReason::Length });
        }
    }
    if active.is_empty() {
        return Ok(out.into_iter().flatten().collect());
    }
    let prompts: Vec<&[u32]> = active.iter().map(|&r| rows[r].prompt).collect();
    let mut prefill = Prefill::new(model, &prompts, pad_id, max_new)?;
    let chunk = prefill.chunk_within(model, budget);
    while !prefill.is_done() {
        prefill.advance(model, chunk)?;
    }
    let mut batch = DecodeBatch::default();
    batch.join(prefill)?;
    loop {
        let logits = batch.logits(model)?; // [active, V]
        let next = pick_tokens(&logits, &active, &mut rows)?;
        let mut keep = vec![];
        let mut keep_tokens = vec![];
        for (i, &row) in active.iter().enumerate() {
            let t = next[i];
            let finish = if eos_ids.contains(&t) {
                Some(FinishReason::Eos)
            } else {
                tokens[row].push(t);
                if on_token(row, &tokens[row]) {
                    Some(FinishReason::Stop)
                } else if tokens[row].len() >= rows[row].cfg.max_new_tokens {
                    Some(FinishReason::Length)
                } else {
                    None
                }
            };
            match finish {
                Some(finish) => out[row] = Some(RawCompletion { tokens: std::mem::take(&mut tokens[row]), finish }),
                None => {
                    keep.push(i);
                    keep_tokens.push(t);
                }
            }
        }
        if keep.is_empty() {
            break;
        }
        batch.step(model, &keep, &keep_tokens)?;
        active = keep.iter().map(|&i| active[i]).collect();
    }
    Ok(out.into_iter().map(|o| o.unwrap_or(RawCompletion { tokens: vec![], finish: FinishReason::Length })).collect())
}

/// Prompts on their way into a KV cache of their own: left-padded and run
/// through the model a column chunk per [`Prefill::advance`], so that a
/// server can interleave a long prompt with the decoding steps of the rows
/// already running, then [`DecodeBatch::join`] them.
pub struct Prefill {
    /// The columns being run.
    stage: Stage,
    /// Each row's own columns, after a prefix all rows share ran as one row
    /// ([`Prefill::sharing_prefix`]).
    rest: Option<Stage>,
    cache: KvCache,
    start: usize,
    last: Option<Tensor>,
}

/// Left-padded token columns, `[rows, len]`, and which of them are tokens.
struct Stage {
    input: Tensor,
    mask: Vec<Vec<u32>>,
    any_pad: bool,
}

impl Stage {
    fn left_padded(model: &CausalLM, prompts: &[&[u32]], pad_id: u32) -> Result<Self> {
        let max_len = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(prompts.len() * max_len);
        let mut mask = Vec::with_capacity(prompts.len());
        for p in prompts {
            let pad = max_len - p.len();
            ids.extend(std::iter::repeat_n(pad_id, pad));
            ids.extend_from_slice(p);
            mask.push(std::iter::repeat_n(0u32, pad).chain(std::iter::repeat_n(1, p.len())).collect::<Vec<_>>());
        }
        let input = Tensor::from_vec(ids, (prompts.len(), max_len), model.device())?;
        let any_pad = mask.iter().any(|r| r.contains(&0));
        Ok(Stage { input, mask, any_pad })
    }

    fn rows(&self) -> usize {
        self.mask.len()
    }

    fn len(&self) -> usize {
        self.mask.first().map(Vec::len).unwrap_or(0)
    }
}

/// A shared prefix gets a pass of its own when that saves at least this
/// many token computations (the pass costs about one read of the weights).
const MIN_SHARED_TOKENS_SAVED: usize = 64;

impl Prefill {
    /// `max_new`: the most tokens any of the rows will generate (the cache is
    /// made long enough at once).
    pub fn new(model: &CausalLM, prompts: &[&[u32]], pad_id: u32, max_new: usize) -> Result<Self> {
        let max_len = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        if max_len == 0 || prompts.iter().any(|p| p.is_empty()) {
            bail!("cannot generate from an empty prompt");
        }
        let limit = model.config().max_position_embeddings;
        if max_len + max_new > limit {
            tracing::warn!("prompt ({max_len} tokens) + max_new_tokens exceeds the model's context ({limit})");
        }
        let stage = Stage::left_padded(model, prompts, pad_id)?;
        Ok(Prefill { stage, rest: None, cache: model.new_cache_for(max_len + max_new), start: 0, last: None })
    }

    /// As [`Prefill::new`], but the longest prefix every prompt shares (a
    /// system prompt, a judge's instructions, the `n` choices of one
    /// request) runs once, as one row whose keys and values are then copied
    /// to every row; each row's own rest follows, left-padded so that the
    /// prompts end together. Rows attend to the same tokens at the same
    /// positions as under [`Prefill::new`], so they decode the same up to
    /// rounding (the padding sits between prefix and rest instead of first).
    pub fn sharing_prefix(model: &CausalLM, prompts: &[&[u32]], pad_id: u32, max_new: usize) -> Result<Self> {
        let shared = common_prefix(prompts);
        if shared * prompts.len().saturating_sub(1) < MIN_SHARED_TOKENS_SAVED {
            return Self::new(model, prompts, pad_id, max_new);
        }
        let own: Vec<&[u32]> = prompts.iter().map(|p| &p[shared..]).collect();
        let longest_own = own.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut p = Self::new(model, &[&prompts[0][..shared]], pad_id, longest_own + max_new)?;
        p.rest = Some(Stage::left_padded(model, &own, pad_id)?);
        Ok(p)
    }

    /// Rows once the prefill is done.
    pub fn rows(&self) -> usize {
        self.rest.as_ref().unwrap_or(&self.stage).rows()
    }

    /// Every prompt column has been through the model.
    pub fn is_done(&self) -> bool {
        self.rest.is_none() && self.start == self.stage.len()
    }

    /// Prompt columns per pass that keep one pass within `budget` attention scores.
    pub fn chunk_within(&self, model: &CausalLM, budget: usize) -> usize {
        let keys = self.cache.len() + self.stage.len() - self.start;
        prefill_chunk(self.stage.rows(), keys, model.config().num_attention_heads, budget)
    }

    /// Runs up to `columns` more prompt columns through the model.
    pub fn advance(&mut self, model: &CausalLM, columns: usize) -> Result<()> {
        if self.start == self.stage.len() {
            let Some(rest) = self.rest.take() else { return Ok(()) };
            // The shared prefix is in: every row starts from a copy of it.
            self.cache.select_rows(&vec![0; rest.rows()])?;
            self.stage = rest;
            self.start = 0;
        }
        let len = columns.max(1).min(self.stage.len() - self.start);
        let part: Vec<Vec<u32>> = self.stage.mask.iter().map(|r| r[self.start..self.start + len].to_vec()).collect();
        let mask = if self.stage.any_pad { Some(part.as_slice()) } else { None };
        let hidden = model.forward_cached(&self.stage.input.narrow(1, self.start, len)?, mask, &mut self.cache)?;
        self.start += len;
        if self.is_done() {
            self.last = Some(hidden.narrow(1, len - 1, 1)?);
        }
        Ok(())
    }
}

/// Tokens at the start of every prompt, leaving each at least one of its own
/// (its last hidden state gives the first new token).
fn common_prefix(prompts: &[&[u32]]) -> usize {
    let Some((first, others)) = prompts.split_first() else { return 0 };
    let shortest = prompts.iter().map(|p| p.len()).min().unwrap_or(0);
    let same = |i: usize| others.iter().all(|p| p[i] == first[i]);
    (0..shortest.saturating_sub(1)).take_while(|&i| same(i)).count()
}

/// Rows decoding together from one KV cache, one token per row per step
/// (continuous batching): rows join once their [`Prefill`] is done and
/// leave at any step; the others carry on.
#[derive(Default)]
pub struct DecodeBatch {
    cache: Option<KvCache>,
    /// Each row's last hidden state, `[rows, 1, H]`.
    last: Option<Tensor>,
}

impl DecodeBatch {
    pub fn rows(&self) -> usize {
        self.cache.as_ref().map(KvCache::rows).unwrap_or(0)
    }

    /// Adds the rows of a finished prefill after the rows already here.
    pub fn join(&mut self, p: Prefill) -> Result<()> {
        let last = p.last.context("the prefill is not finished")?;
        match (self.cache.as_mut(), self.last.take()) {
            (Some(cache), Some(mine)) if cache.rows() > 0 => {
                cache.append_rows(p.cache)?;
                self.last = Some(Tensor::cat(&[&mine, &last], 0)?);
            }
            _ => {
                self.cache = Some(p.cache);
                self.last = Some(last);
            }
        }
        Ok(())
    }

    /// The next-token logits of every row, `[rows, V]` in f32.
    pub fn logits(&self, model: &CausalLM) -> Result<Tensor> {
        let last = self.last.as_ref().context("no rows to decode")?;
        Ok(model.logits(last)?.squeeze(1)?.to_dtype(DType::F32)?)
    }

    /// Keeps the rows `keep` (in that order) and feeds each its next token;
    /// with none left, the batch is empty again.
    pub fn step(&mut self, model: &CausalLM, keep: &[usize], tokens: &[u32]) -> Result<()> {
        if keep.is_empty() {
            *self = DecodeBatch::default();
            return Ok(());
        }
        let cache = self.cache.as_mut().context("no rows to decode")?;
        if keep.len() != cache.rows() || keep.iter().enumerate().any(|(i, &k)| i != k) {
            cache.select_rows(keep)?;
        }
        let ids = Tensor::from_vec(tokens.to_vec(), (keep.len(), 1), model.device())?;
        self.last = Some(model.forward_cached(&ids, None, cache)?);
        Ok(())
    }

    /// Drops cache positions that no row attends to any more (left by rows
    /// that are gone while others joined later).
    pub fn trim(&mut self) -> Result<()> {
        match self.cache.as_mut() {
            Some(c) => Ok(c.trim_front()?),
            None => Ok(()),
        }
    }
}

/// The next token of every active row: one argmax on the device when all
/// of them decode greedily, else each row samples (or takes its maximum)
/// with its own settings and generator.
fn pick_tokens(logits: &Tensor, active: &[usize], rows: &mut [Row]) -> Result<Vec<u32>> {
    if active.iter().all(|&r| rows[r].cfg.is_greedy()) {
        return Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
    }
    let all = logits.to_vec2::<f32>()?;
    Ok(active
        .iter()
        .zip(&all)
        .map(|(&r, l)| {
            let row = &mut rows[r];
            if row.cfg.is_greedy() {
                argmax(l)
            } else {
                sample(l, row.cfg, &mut row.rng)
            }
        })
        .collect())
}

/// The index of the largest logit (the first of equals).
pub fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in l.iter().enumerate() {
        if *v > l[best] {
            best = i;
        }
    }
    best as u32
}

/// Draw one token id from logits with temperature, top-k and top-p (in
/// that order, as transformers applies them).
pub fn sample(logits: &[f32], cfg: &GenerationConfig, rng: &mut StdRng) -> u32 {
    let t = cfg.temperature.max(1e-6) as f32;
    let mut idx = descending(logits);
    if idx.is_empty() {
        return 0;
    }
    if cfg.top_k > 0 && idx.len() > cfg.top_k {
        idx.truncate(cfg.top_k);
    }
    let mx = logits[idx[0]] / t;
    let mut probs: Vec<f64> = idx.iter().map(|&i| ((logits[i] / t - mx) as f64).exp()).collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= z);
    if cfg.top_p < 1.0 {
        let mut acc = 0.0;
        let mut cut = probs.len();
        for (k, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= cfg.top_p {
                cut = k + 1;
                break;
            }
        }
        probs.truncate(cut);
        idx.truncate(cut);
    }
    let z: f64 = probs.iter().sum();
    let mut u = rng.gen::<f64>() * z;
    for (k, p) in probs.iter().enumerate() {
        if u < *p {
            return idx[k] as u32;
        }
        u -= p;
    }
    idx[idx.len() - 1] as u32
}

/// The indices of the finite logits, largest first, equal ones by index.
/// One `u64` per token (the logit's order-preserving bits above its index)
/// sorts three times faster than comparing floats through the indices,
/// which at 64 rows of a 49k vocabulary was a sixth of a server's step.
fn descending(logits: &[f32]) -> Vec<usize> {
    let mut keys: Vec<u64> = logits
        .iter()
        .enumerate()
        .filter(|(_, x)| x.is_finite())
        .map(|(i, &x)| {
            // -0.0 and 0.0 compare equal, as they did under `partial_cmp`.
            let bits = (x + 0.0).to_bits();
            let ascending = if bits >> 31 == 1 { !bits } else { bits | 0x8000_0000 };
            ((!ascending as u64) << 32) | i as u64
        })
        .collect();
    keys.sort_unstable();
    keys.into_iter().map(|k| (k & 0xFFFF_FFFF) as usize).collect()
}

/// Earliest position of any stop string in `text` (empty ones never match).
pub fn find_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}

/// Generate answers to chat conversations (each rendered with the model's
/// chat template and a generation prompt). Returns `num_return_sequences`
/// completions per conversation, prompt-major.
pub fn generate_chat(lm: &LoadedModel, conversations: &[Vec<Message>], cfg: &GenerationConfig) -> Result<Vec<Completion>> {
    let text = lm.text();
    generate_with(&lm.model, &text, conversations, cfg)
}

/// As [`generate_chat`] with the model and its text side given separately
/// (e.g. a policy being trained).
pub fn generate_with(model: &CausalLM, text: &TextSide, conversations: &[Vec<Message>], cfg: &GenerationConfig) -> Result<Vec<Completion>> {
    let prompts: Vec<Vec<u32>> = conversations.iter().map(|c| text.prompt_ids(c)).collect::<Result<_>>()?;
    generate_from_ids(model, text, &prompts, cfg)
}

/// Generate from already tokenized prompts and decode the completions.
pub fn generate_from_ids(model: &CausalLM, text: &TextSide, prompts: &[Vec<u32>], cfg: &GenerationConfig) -> Result<Vec<Completion>> {
    let tok = &text.tokenizer;
    let eos = text.stop_token_ids();
    let stop = cfg.stop.clone();
    let stop_check = |ids: &[u32]| -> bool {
        if stop.is_empty() {
            return false;
        }
        tok.decode(ids, true).map(|s| find_stop(&s, &stop).is_some()).unwrap_or(false)
    };
    let raw = generate_ids(model, prompts, &eos, tok.pad_token_id(), cfg, &stop_check)?;
    let mut out = vec![];
    for (p, comps) in raw.into_iter().enumerate() {
        for (s, c) in comps.into_iter().enumerate() {
            let mut txt = tok.decode(&c.tokens, true)?;
            if c.finish == FinishReason::Stop {
                if let Some(at) = find_stop(&txt, &stop) {
                    txt.truncate(at);
                }
            }
            out.push(Completion {
                prompt_index: p,
                sample_index: s,
                completion: txt,
                num_tokens: c.tokens.len(),
                token_ids: c.tokens,
                finish_reason: c.finish,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::{AttentionLayout, LoadOptions};

    fn tiny() -> (tempfile::TempDir, LoadedModel) {
        let dir = tempfile::tempdir().unwrap();
        let gg = dir.path().join("tiny.gguf");
        crate::source::tests::write_tiny_model_gguf(&gg);
        let lm = crate::source::load(&gg, &LoadOptions::default()).unwrap();
        (dir, lm)
    }

    /// Greedy decoding by full recomputation, no cache, one prompt.
    fn greedy_reference(model: &CausalLM, prompt: &[u32], n: usize) -> Vec<u32> {
        let mut ids = prompt.to_vec();
        for _ in 0..n {
            let x = Tensor::new(vec![ids.clone()], model.device()).unwrap();
            let h = model.forward(&x, &AttentionLayout::causal(1, ids.len())).unwrap();
            let l = model.logits(&h.narrow(1, ids.len() - 1, 1).unwrap()).unwrap();
            let t = l.flatten_all().unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
            ids.push(t);
        }
        ids[prompt.len()..].to_vec()
    }

    #[test]
    fn cached_batched_greedy_equals_recomputation() {
        let (_d, lm) = tiny();
        let prompts = vec![vec![5u32, 9, 40, 7, 100, 3], vec![11u32, 12], vec![200u32, 201, 202, 203]];
        let cfg = GenerationConfig { max_new_tokens: 6, batch_size: 3, ..GenerationConfig::default() };
        // No EOS so every row runs the full length.
        let raw = generate_ids(&lm.model, &prompts, &[], 0, &cfg, &|_| false).unwrap();
        for (p, r) in prompts.iter().zip(&raw) {
            assert_eq!(r[0].tokens, greedy_reference(&lm.model, p, 6));
            assert_eq!(r[0].finish, FinishReason::Length);
        }
        // Long enough for the KV buffer to grow (it starts at 64 positions).
        let cfg = GenerationConfig { max_new_tokens: 80, batch_size: 2, ..GenerationConfig::default() };
        let raw = generate_ids(&lm.model, &prompts[..2], &[], 0, &cfg, &|_| false).unwrap();
        for (p, r) in prompts.iter().zip(&raw) {
            assert_eq!(r[0].tokens, greedy_reference(&lm.model, p, 80));
        }
    }

    /// Continuous batching: a row that joins a running batch (shorter or
    /// longer than the rows there, prefilled in chunks meanwhile) decodes
    /// what it decodes alone, and so do the rows it joined and outlived.
    #[test]
    fn rows_joining_and_leaving_a_running_batch_decode_as_alone() {
        let (_d, lm) = tiny();
        let m = &lm.model;
        let prompts: [&[u32]; 3] = [&[5, 9, 40, 7, 100, 3], &[11, 12], &[200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211]];
        let want: Vec<Vec<u32>> = prompts.iter().map(|p| greedy_reference(m, p, 12)).collect();
        let mut batch = DecodeBatch::default();
        let mut got: Vec<Vec<u32>> = vec![vec![]; 3];
        // Rows in the batch, as prompt indices; each joins after some steps
        // of the others, and prompt 1 leaves early (after 4 tokens).
        let mut rows: Vec<usize> = vec![];
        let joins = [(0usize, 0usize), (1, 3), (2, 5)];
        for step in 0..20 {
            for &(p, at) in &joins {
                if at == step {
                    let mut pre = Prefill::new(m, &[prompts[p]], 0, 12).unwrap();
                    while !pre.is_done() {
                        pre.advance(m, 5).unwrap();
                    }
                    batch.join(pre).unwrap();
                    rows.push(p);
                }
            }
            if rows.is_empty() {
                break;
            }
            let next = batch.logits(m).unwrap().argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
            let mut keep = vec![];
            for (i, &p) in rows.iter().enumerate() {
                got[p].push(next[i]);
                let limit = if p == 1 { 4 } else { 12 };
                if got[p].len() < limit {
                    keep.push(i);
                }
            }
            let tokens: Vec<u32> = keep.iter().map(|&i| next[i]).collect();
            batch.step(m, &keep, &tokens).unwrap();
            batch.trim().unwrap();
            rows = keep.iter().map(|&i| rows[i]).collect();
        }
        assert_eq!(got[0], want[0]);
        assert_eq!(got[1], want[1][..4]);
        assert_eq!(got[2], want[2]);
        assert_eq!(batch.rows(), 0);
    }

    /// A prefix shared by every row runs once, as one row, and the rows
    /// (of different lengths, one of them twice, as `n` choices are) still
    /// decode what each decodes alone.
    #[test]
    fn a_shared_prefix_runs_once_and_rows_decode_as_alone() {
        let (_d, lm) = tiny();
        let m = &lm.model;
        let prefix: Vec<u32> = (0..40).map(|i| 3 + (i * 7) % 150).collect();
        let own: [&[u32]; 4] = [&[9], &[200, 17, 4], &[5, 6, 7, 8, 9, 10, 11], &[200, 17, 4]];
        let prompts: Vec<Vec<u32>> = own.iter().map(|o| [prefix.as_slice(), o].concat()).collect();
        let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let mut pre = Prefill::sharing_prefix(m, &refs, 0, 8).unwrap();
        assert_eq!(pre.stage.rows(), 1, "the prefix runs as one row");
        assert_eq!(pre.stage.len(), 40);
        assert_eq!(pre.rows(), 4);
        while !pre.is_done() {
            let chunk = pre.chunk_within(m, 1 << 20).min(7);
            pre.advance(m, chunk).unwrap();
        }
        let mut batch = DecodeBatch::default();
        batch.join(pre).unwrap();
        let mut got: Vec<Vec<u32>> = vec![vec![]; 4];
        for _ in 0..8 {
            let next = batch.logits(m).unwrap().argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
            for (g, t) in got.iter_mut().zip(&next) {
                g.push(*t);
            }
            batch.step(m, &[0, 1, 2, 3], &next).unwrap();
        }
        for (p, g) in prompts.iter().zip(&got) {
            assert_eq!(g, &greedy_reference(m, p, 8));
        }
        // Too little in common to be worth a pass: one stage, as `new`.
        let few = Prefill::sharing_prefix(m, &[&[1, 2, 3, 4], &[1, 2, 3, 5]], 0, 8).unwrap();
        assert!(few.rest.is_none());
        assert_eq!(few.stage.rows(), 2);
    }

    /// The copy laid out for decoding computes the same logits (to rounding)
    /// and decodes the same tokens.
    #[test]
    fn the_decoding_layout_decodes_the_same() {
        let (d, lm) = tiny();
        let fast = crate::source::load(&d.path().join("tiny.gguf"), &LoadOptions::default()).unwrap().model.for_decoding().unwrap();
        let prompts: Vec<Vec<u32>> = vec![vec![5, 9, 40, 7, 100, 3], vec![11, 12]];
        let cfg = GenerationConfig { max_new_tokens: 10, batch_size: 2, ..GenerationConfig::default() };
        let raw = generate_ids(&fast, &prompts, &[], 0, &cfg, &|_| false).unwrap();
        for (p, r) in prompts.iter().zip(&raw) {
            assert_eq!(r[0].tokens, greedy_reference(&lm.model, p, 10));
        }
        let x = Tensor::new(vec![prompts[0].clone()], lm.model.device()).unwrap();
        let layout = AttentionLayout::causal(1, prompts[0].len());
        let (a, b) = (lm.model.forward(&x, &layout).unwrap(), fast.forward(&x, &layout).unwrap());
        let diff = (lm.model.logits(&a).unwrap() - fast.logits(&b).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
    }

    #[test]
    fn common_prefix_leaves_every_prompt_a_token_of_its_own() {
        assert_eq!(common_prefix(&[&[1, 2, 3], &[1, 2, 4]]), 2);
        assert_eq!(common_prefix(&[&[1, 2, 3], &[1, 2, 3]]), 2);
        assert_eq!(common_prefix(&[&[1, 2], &[1, 2, 3, 4]]), 1);
        assert_eq!(common_prefix(&[&[7, 2], &[1, 2]]), 0);
        assert_eq!(common_prefix(&[&[1, 2, 3]]), 2);
        assert_eq!(common_prefix(&[]), 0);
    }

    #[test]
    fn chunked_prefill_decodes_the_same() {
        let (_d, lm) = tiny();
        let prompts = [
            vec![5u32, 9, 40, 7, 100, 3, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22],
            vec![11u32, 12],
            vec![200u32, 201, 202, 203],
        ];
        let cfg = GenerationConfig::greedy(7);
        let rows = || prompts.iter().map(|p| Row::new(p, &cfg, 0)).collect::<Vec<_>>();
        let whole = decode_rows_within(&lm.model, rows(), &[], 0, &mut |_, _| false, usize::MAX).unwrap();
        // A budget so small that the 21 prompt columns go in chunks of 16 and 5.
        assert_eq!(prefill_chunk(3, 21, lm.config.num_attention_heads, 1), 16);
        let chunked = decode_rows_within(&lm.model, rows(), &[], 0, &mut |_, _| false, 1).unwrap();
        assert_eq!(chunked, whole);
        for (p, r) in prompts.iter().zip(&whole) {
            assert_eq!(r.tokens, greedy_reference(&lm.model, p, 7));
        }
    }

    #[test]
    fn eos_drops_rows_and_stop_check_ends() {
        let (_d, lm) = tiny();
        let prompts = vec![vec![5u32, 9, 40], vec![11u32, 12, 13, 14]];
        let cfg = GenerationConfig { max_new_tokens: 5, ..GenerationConfig::default() };
        let free = generate_ids(&lm.model, &prompts, &[], 0, &cfg, &|_| false).unwrap();
        // Make row 0's second token an EOS: row 0 stops there, row 1 is unaffected.
        let eos = free[0][0].tokens[1];
        let first = free[0][0].tokens.iter().position(|&t| t == eos).unwrap();
        let with = generate_ids(&lm.model, &prompts, &[eos], 0, &cfg, &|_| false).unwrap();
        assert_eq!(with[0][0].tokens, free[0][0].tokens[..first].to_vec());
        assert_eq!(with[0][0].finish, FinishReason::Eos);
        if !free[1][0].tokens.contains(&eos) {
            assert_eq!(with[1][0].tokens, free[1][0].tokens);
        }
        let stopped = generate_ids(&lm.model, &prompts, &[], 0, &cfg, &|t| t.len() == 2).unwrap();
        assert_eq!(stopped[1][0].tokens.len(), 2);
        assert_eq!(stopped[1][0].finish, FinishReason::Stop);
    }

    #[test]
    fn rows_with_their_own_settings_decode_as_they_would_alone() {
        let (_d, lm) = tiny();
        let greedy = GenerationConfig::greedy(5);
        let hot = GenerationConfig::sampling(3, 1.3, 0.9, 0);
        let prompts = [vec![5u32, 9, 40, 7], vec![11u32, 12], vec![200u32, 201, 202]];
        let cfgs = [&greedy, &hot, &greedy];
        let alone: Vec<RawCompletion> = (0..3)
            .map(|i| decode_rows(&lm.model, vec![Row::new(&prompts[i], cfgs[i], i as u64)], &[], 0, &mut |_, _| false).unwrap().remove(0))
            .collect();
        let rows = (0..3).map(|i| Row::new(&prompts[i], cfgs[i], i as u64)).collect();
        let mut seen = vec![0usize; 3];
        let together = decode_rows(&lm.model, rows, &[], 0, &mut |r, t| {
            seen[r] = t.len();
            false
        })
        .unwrap();
        assert_eq!(together, alone);
        assert_eq!(together[1].tokens.len(), 3);
        assert_eq!(together[0].tokens.len(), 5);
        assert_eq!(seen, vec![5, 3, 5]);
        // A row that asks for nothing gets nothing, without decoding.
        let none = GenerationConfig::greedy(0);
        let out = decode_rows(&lm.model, vec![Row::new(&prompts[0], &none, 0)], &[], 0, &mut |_, _| false).unwrap();
        assert!(out[0].tokens.is_empty());
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_k() {
        let (_d, lm) = tiny();
        let prompts = vec![vec![5u32, 9, 40]];
        let cfg = GenerationConfig { num_return_sequences: 3, ..GenerationConfig::sampling(8, 1.0, 1.0, 7) };
        let a = generate_ids(&lm.model, &prompts, &[], 0, &cfg, &|_| false).unwrap();
        let b = generate_ids(&lm.model, &prompts, &[], 0, &cfg, &|_| false).unwrap();
        assert_eq!(a, b);
        assert_eq!(a[0].len(), 3);
        // top_k = 1 is greedy.
        let k1 = GenerationConfig { top_k: 1, num_return_sequences: 1, ..cfg.clone() };
        let g = generate_ids(&lm.model, &prompts, &[], 0, &k1, &|_| false).unwrap();
        assert_eq!(g[0][0].tokens, greedy_reference(&lm.model, &prompts[0], 8));
        // top_p keeps the smallest nucleus.
        let mut rng = StdRng::seed_from_u64(1);
        let c = GenerationConfig { top_p: 0.5, ..cfg.clone() };
        for _ in 0..50 {
            assert_eq!(sample(&[0.0, 5.0, 1.0], &c, &mut rng), 1);
        }
        assert!(GenerationConfig { top_p: 0.0, ..cfg }.validate().is_err());
    }

    proptest::proptest! {
        /// The order `sample` walks is the one a stable sort by descending
        /// logit gives (so seeded draws are what they were before the keys),
        /// with ties, signed zeros and non-finite logits in the mix.
        #[test]
        fn descending_is_the_stable_sort_by_logit(picks in proptest::collection::vec(0usize..9, 0..300)) {
            let values = [0.0f32, -0.0, 1.5, -1.5, 1e-30, -3.25e8, f32::NEG_INFINITY, f32::NAN, 7.0];
            let logits: Vec<f32> = picks.iter().map(|&i| values[i]).collect();
            let mut expected: Vec<usize> = (0..logits.len()).filter(|&i| logits[i].is_finite()).collect();
            expected.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap());
            proptest::prop_assert_eq!(descending(&logits), expected);
        }
    }

    #[test]
    fn chat_generation_decodes_and_cuts_stop_strings() {
        let (_d, lm) = tiny();
        let convs = vec![vec![Message::user("hi")], vec![Message::user("a longer question")]];
        let cfg = GenerationConfig { max_new_tokens: 4, num_return_sequences: 2, ..GenerationConfig::default() };
        let out = generate_chat(&lm, &convs, &cfg).unwrap();
        assert_eq!(out.len(), 4);
        assert_eq!((out[2].prompt_index, out[2].sample_index), (1, 0));
        for c in &out {
            assert_eq!(c.num_tokens, c.token_ids.len());
            assert_eq!(c.completion, lm.tokenizer.decode(&c.token_ids, true).unwrap());
        }
        // Use the first generated character as a stop string: the text is cut before it.
        let first = out[0].completion.chars().next();
        if let Some(ch) = first {
            let cfg = GenerationConfig { stop: vec![ch.to_string()], ..cfg };
            let out = generate_chat(&lm, &convs[..1], &cfg).unwrap();
            assert_eq!(out[0].completion, "");
            assert_eq!(out[0].finish_reason, FinishReason::Stop);
        }
    }
}
