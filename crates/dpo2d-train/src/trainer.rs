//! The training loop: data -> tokens -> packed forward passes of policy (and
//! reference) -> loss -> AdamW, with gradient accumulation, clipping, a
//! learning-rate schedule, evaluation, metrics, checkpoints and exact resume.
//!
//! Exact resume: everything random is derived from the seed and a counter
//! (epoch for the data order), weights and optimizer moments are saved
//! bit-exactly, and the metrics window in progress is saved with the
//! checkpoint, so a resumed run ends with the same weights and metrics as an
//! uninterrupted one. LoRA dropout masks come from the model's own RNG
//! stream, whose state is saved with the checkpoint too.
//!
//! Speed: sequences of a micro-batch (prompt+chosen, prompt+rejected) are
//! packed without padding into rows as wide as the longest sequence (each
//! with its own positions and block-diagonal causal mask); label
//! log-probabilities are taken only at response positions and without a
//! stored full log-softmax; reference log-probs are precomputed once and
//! cached on disk unless the loss needs the reference's full distribution.

use crate::align::{AlignOptions, Aligner, TokenizedPair, TokenizedResponse, NO_SEGMENT};
use crate::checkpoint::{self, TrainerState};
use crate::config::TrainConfig;
use crate::loss::{self, AspectWeights, KtoKl, LossConfig, LossOutput, LossType, PreferenceBatch, SegmentBatch, SideBatch};
use crate::metrics::{Accumulator, MetricsWriter, Record};
use crate::optim::{clip_grad_norm, AdamW, AdamWParams};
use crate::schedule::{self, SchedulerType};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use dpo2d_data::{load_pairs, LoadOptions as DataLoadOptions, Pair, Requirement};
use dpo2d_model::llama::{AttentionLayout, CausalLM, LoadOptions};
use dpo2d_model::lora::{LoraConfig, LoraTarget};
use dpo2d_model::source::TextSide;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How to run (beyond the configuration).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Checkpoint directory to resume from.
    pub resume: Option<PathBuf>,
    /// Show a progress bar.
    pub progress: bool,
    /// Stop after this many updates as if interrupted (after any checkpoint of
    /// that step is written); for tests of resume.
    pub stop_after: Option<usize>,
    /// Cache directory for precomputed reference log-probs (default: the dpo2d cache).
    pub cache_dir: Option<PathBuf>,
    /// Print a line per logging step to stderr when there is no progress bar.
    pub quiet: bool,
}

/// What a finished run produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub output_dir: PathBuf,
    pub history: Vec<Record>,
    pub global_step: usize,
    /// Directory holding the final model (HF directory; for LoRA the merged model).
    pub final_model_dir: PathBuf,
    pub summary: String,
    pub charts: Vec<PathBuf>,
    pub interrupted: bool,
    /// Step this run started from (0, or the resumed checkpoint's step).
    pub start_step: usize,
}

/// Resolve a model name: `smollm2` is fetched into the cache.
pub fn resolve_model(name: &str) -> Result<PathBuf> {
    if name.eq_ignore_ascii_case("smollm2") {
        return dpo2d_model::fetch::fetch_smollm2(None);
    }
    Ok(PathBuf::from(name))
}

/// Deterministic 64-bit generator (SplitMix64): tiny, seedable, and its
/// whole state is one number, so data order is reproducible anywhere.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// Order of the training pairs in `epoch`.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    SplitMix(seed ^ (epoch as u64).wrapping_mul(0xA24B_AED4_963E_E407)).shuffle(&mut v);
    v
}

fn load_data(path: &Path, skip_invalid: bool) -> Result<Vec<Pair>> {
    let loaded = load_pairs(path, &DataLoadOptions::new(Requirement::Plain).skip_invalid(skip_invalid))?;
    if !loaded.skipped.is_empty() {
        eprintln!("warning: skipped {} invalid line(s):\n{}", loaded.skipped.lines_skipped, loaded.skipped);
    }
    if loaded.pairs.is_empty() {
        bail!("{}: no preference pairs", path.display());
    }
    Ok(loaded.pairs)
}

/// The loss configuration a training configuration implies.
pub fn loss_config(cfg: &TrainConfig) -> Result<LossConfig> {
    let loss_type: LossType = cfg.loss_type.parse()?;
    let mut lc = LossConfig::new(loss_type);
    lc.beta = cfg.beta;
    lc.sft_weight = cfg.sft_weight;
    lc.simpo_gamma = cfg.simpo_gamma;
    lc.tdpo_alpha = cfg.tdpo_alpha;
    lc.label_smoothing = cfg.label_smoothing;
    lc.aspect_weights = AspectWeights::new(cfg.aspect_weights)?;
    lc.validate()?;
    Ok(lc)
}

/// Reference log-probs of one pair's responses (label positions only).
#[derive(Debug, Clone, PartialEq)]
pub struct RefLogps {
    pub chosen: Vec<f32>,
    pub rejected: Vec<f32>,
}

/// A prompt and the responses that continue it, run as one packed unit
/// `[prompt | response 1 | response 2 ...]` in which each response attends to
/// the prompt and to itself only: the shared prompt goes through the model
/// once, with the same result as separate prompt + response sequences.
struct Unit<'a> {
    prompt: &'a [u32],
    responses: Vec<&'a [u32]>,
}

impl Unit<'_> {
    fn len(&self) -> usize {
        self.prompt.len() + self.responses.iter().map(|r| r.len()).sum::<usize>()
    }
}

/// Per-response label log-probs from one packed forward pass.
struct PackedOut {
    /// Flat `[N]` log-probs of every response token of every unit, in order.
    logps: Tensor,
    /// Flat `[N, V]` logits at the same positions (only when asked).
    logits: Option<Tensor>,
    /// `starts[u][r]`: start of unit u's response r in the flat vector.
    starts: Vec<Vec<usize>>,
}

/// Pack units into rows (first-fit by decreasing length, rows as wide as the
/// longest unit), run the model once, and take label log-probs at the
/// response positions only.
fn packed_forward(model: &CausalLM, units: &[Unit], want_logits: bool) -> Result<PackedOut> {
    let lens: Vec<usize> = units.iter().map(Unit::len).collect();
    let width = *lens.iter().max().context("empty batch")?;
    let mut order: Vec<usize> = (0..units.len()).collect();
    order.sort_by(|a, b| lens[*b].cmp(&lens[*a]).then(a.cmp(b)));
    // rows[r] = (used width, list of unit indices)
    let mut rows: Vec<(usize, Vec<usize>)> = Vec::new();
    let mut place = vec![(0usize, 0usize); units.len()]; // (row, offset)
    for &i in &order {
        let r = match rows.iter().position(|(used, _)| used + lens[i] <= width) {
            Some(r) => r,
            None => {
                rows.push((0, vec![]));
                rows.len() - 1
            }
        };
        place[i] = (r, rows[r].0);
        rows[r].0 += lens[i];
        rows[r].1.push(i);
    }
    let n_rows = rows.len();
    let mut ids = vec![0u32; n_rows * width];
    for (i, u) in units.iter().enumerate() {
        let (r, off) = place[i];
        let mut at = r * width + off;
        for part in std::iter::once(u.prompt).chain(u.responses.iter().copied()) {
            ids[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
    }
    let shape: Vec<Vec<(usize, Vec<usize>)>> = rows
        .iter()
        .map(|(_, v)| v.iter().map(|&i| (units[i].prompt.len(), units[i].responses.iter().map(|r| r.len()).collect())).collect())
        .collect();
    let layout = AttentionLayout::packed_shared(&shape, width)?;
    let dev = model.device();
    let input = Tensor::from_vec(ids, (n_rows, width), dev)?;
    let hidden = model.forward(&input, &layout)?;
    let h = hidden.dim(2)?;
    // The hidden state before a token predicts it: the prompt's last token
    // for a response's first token, else the previous response token.
    let mut hidx = Vec::new();
    let mut labels = Vec::new();
    let mut starts = Vec::with_capacity(units.len());
    for (i, u) in units.iter().enumerate() {
        let (r, off) = place[i];
        let prompt_end = r * width + off + u.prompt.len();
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
    let n = labels.len();
    let sel = hidden.reshape((n_rows * width, h))?.index_select(&Tensor::from_vec(hidx, n, dev)?, 0)?.unsqueeze(0)?;
    let lab = Tensor::from_vec(labels, (1, n), dev)?;
    let logps = model.label_logprobs(&sel, &lab)?.squeeze(0)?;
    let logits = if want_logits { Some(model.logits(&sel)?.squeeze(0)?) } else { None };
    Ok(PackedOut { logps, logits, starts })
}

/// Unit per pair: its prompt with the chosen and then the rejected response.
fn pair_units<'a>(pairs: &[&'a TokenizedPair]) -> Vec<Unit<'a>> {
    pairs.iter().map(|p| Unit { prompt: &p.prompt, responses: vec![&p.chosen.ids, &p.rejected.ids] }).collect()
}

/// Flat starts of response `r` of every unit.
fn starts_of(out: &PackedOut, r: usize) -> Vec<usize> {
    out.starts.iter().map(|s| s[r]).collect()
}

/// Gather per-sequence runs of a flat `[N, ...]` tensor into `[B, T, ...]`
/// (padding rows are zero), where sequence k has `lens[k]` entries at `starts[k]`.
fn gather_side(flat: &Tensor, starts: &[usize], lens: &[usize]) -> Result<Tensor> {
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

fn mask_for(lens: &[usize], dev: &Device) -> Result<Tensor> {
    let t = *lens.iter().max().unwrap_or(&1);
    let mut m = vec![0f32; lens.len() * t];
    for (b, l) in lens.iter().enumerate() {
        m[b * t..b * t + l].fill(1.0);
    }
    Ok(Tensor::from_vec(m, (lens.len(), t), dev)?)
}

fn padded_rows(rows: &[&[f32]], dev: &Device) -> Result<Tensor> {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(1);
    let mut m = vec![0f32; rows.len() * t];
    for (b, r) in rows.iter().enumerate() {
        m[b * t..b * t + r.len()].copy_from_slice(r);
    }
    Ok(Tensor::from_vec(m, (rows.len(), t), dev)?)
}

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

/// Where the reference comes from.
enum Reference {
    /// Reference-free loss.
    None,
    /// Precomputed per pair (train and eval sets).
    Cached { train: Vec<RefLogps>, eval: Vec<RefLogps> },
    /// Run alongside the policy, without gradients.
    Live(Box<CausalLM>),
}

/// Metrics of one micro-batch, plus what the loss needs for backward.
struct MicroOut {
    loss: Tensor,
    values: Vec<(String, f64)>,
    tokens: usize,
}

struct Ctx<'a> {
    cfg: &'a TrainConfig,
    lc: LossConfig,
    policy: &'a CausalLM,
    reference: &'a Reference,
}

impl Ctx<'_> {
    /// Forward the pairs `idx` of `data` (eval: `is_eval`), compute the loss.
    fn micro(&self, data: &[TokenizedPair], idx: &[usize], is_eval: bool) -> Result<MicroOut> {
        let lt = self.lc.loss_type;
        let pairs: Vec<&TokenizedPair> = idx.iter().map(|&i| &data[i]).collect();
        let units = pair_units(&pairs);
        let want_logits = lt.needs_token_kl();
        let out = packed_forward(self.policy, &units, want_logits)?;
        let (starts_c, starts_r) = (starts_of(&out, 0), starts_of(&out, 1));
        let lens_c: Vec<usize> = pairs.iter().map(|p| p.chosen.ids.len()).collect();
        let lens_r: Vec<usize> = pairs.iter().map(|p| p.rejected.ids.len()).collect();
        let dev = self.policy.device();
        let pol_c = gather_side(&out.logps, &starts_c, &lens_c)?;
        let pol_r = gather_side(&out.logps, &starts_r, &lens_r)?;
        let mask_c = mask_for(&lens_c, dev)?;
        let mask_r = mask_for(&lens_r, dev)?;
        let mut chosen = SideBatch::new(pol_c.clone(), mask_c.clone());
        let mut rejected = SideBatch::new(pol_r.clone(), mask_r.clone());
        let mut exact_kl: Option<(Tensor, Tensor)> = None;
        match self.reference {
            Reference::None => {}
            Reference::Cached { train, eval } => {
                let src = if is_eval { eval } else { train };
                let rc: Vec<&[f32]> = idx.iter().map(|&i| src[i].chosen.as_slice()).collect();
                let rr: Vec<&[f32]> = idx.iter().map(|&i| src[i].rejected.as_slice()).collect();
                chosen.reference_logps = Some(padded_rows(&rc, dev)?);
                rejected.reference_logps = Some(padded_rows(&rr, dev)?);
            }
            Reference::Live(r) => {
                // Same units, same packing: the flat layouts of policy and reference agree.
                let ro = packed_forward(r, &units, want_logits)?;
                chosen.reference_logps = Some(gather_side(&ro.logps, &starts_c, &lens_c)?.detach());
                rejected.reference_logps = Some(gather_side(&ro.logps, &starts_r, &lens_r)?.detach());
                if let (Some(pl), Some(rl)) = (&out.logits, &ro.logits) {
                    let kl = loss::token_kl(&pl.unsqueeze(0)?, &rl.detach().unsqueeze(0)?)?.squeeze(0)?;
                    let kc = gather_side(&kl, &starts_c, &lens_c)?;
                    let kr = gather_side(&kl, &starts_r, &lens_r)?;
                    exact_kl = Some((kc.clone(), kr.clone()));
                    chosen.token_kl = Some(kc);
                    rejected.token_kl = Some(kr);
                }
            }
        }
        if lt.needs_segment_scores() {
            chosen.segments = Some(segment_batch(&pairs.iter().map(|p| &p.chosen).collect::<Vec<_>>())?);
            rejected.segments = Some(segment_batch(&pairs.iter().map(|p| &p.rejected).collect::<Vec<_>>())?);
        }
        let kto_kl = if lt.needs_kto_kl() { Some(self.kto_kl(&pairs)?) } else { None };
        let seq_kl = |s: &SideBatch| -> Result<Option<Vec<f64>>> {
            match &s.reference_logps {
                Some(r) => Ok(Some(((&s.policy_logps - r)? * &s.mask)?.sum(1)?.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?)),
                None => Ok(None),
            }
        };
        let (kl_c, kl_r) = match &exact_kl {
            Some((kc, kr)) => (
                Some((kc * &mask_c)?.sum(1)?.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?),
                Some((kr * &mask_r)?.sum(1)?.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?),
            ),
            None => (seq_kl(&chosen)?, seq_kl(&rejected)?),
        };
        let batch = PreferenceBatch { chosen, rejected, kto_kl };
        let lo: LossOutput = loss::compute_loss(&self.lc, &batch)?;
        let mut values: Vec<(String, f64)> = lo.metrics().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        values.push(("sft_loss".into(), lo.sft_loss));
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        if let (Some(c), Some(r)) = (kl_c, kl_r) {
            values.push(("kl/chosen".into(), mean(&c)));
            values.push(("kl/rejected".into(), mean(&r)));
        }
        let tokens = pairs.iter().map(|p| p.num_tokens()).sum();
        let _ = self.cfg;
        Ok(MicroOut { loss: lo.loss, values, tokens })
    }

    /// KTO's KL estimate inputs: prompt i with the chosen response of pair
    /// i+1 (mod B), under policy and reference, as constants.
    fn kto_kl(&self, pairs: &[&TokenizedPair]) -> Result<KtoKl> {
        let b = pairs.len();
        let units: Vec<Unit> = (0..b).map(|i| Unit { prompt: &pairs[i].prompt, responses: vec![&pairs[(i + 1) % b].chosen.ids] }).collect();
        let sums = |m: &CausalLM| -> Result<Tensor> {
            let o = packed_forward(m, &units, false)?;
            let lens: Vec<usize> = units.iter().map(|u| u.responses[0].len()).collect();
            let g = gather_side(&o.logps.detach(), &starts_of(&o, 0), &lens)?;
            Ok((g * mask_for(&lens, m.device())?)?.sum(1)?.detach())
        };
        let policy_logps = sums(self.policy)?;
        let reference_logps = match self.reference {
            Reference::Live(r) => sums(r)?,
            _ => bail!("kto needs the reference model running alongside"),
        };
        Ok(KtoKl { policy_logps, reference_logps })
    }
}

/// Sha256 over model files (weights + config) of a directory or GGUF file.
fn hash_model_files(path: &Path, h: &mut Sha256) -> Result<()> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
                n.ends_with(".safetensors") || n == "config.json"
            })
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    for f in files {
        use std::io::Read;
        let mut r = std::fs::File::open(&f).with_context(|| format!("reading {}", f.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        h.update(f.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default().as_bytes());
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(())
}

/// Cache key of reference log-probs: model files + token ids of every pair.
fn ref_cache_key(model_path: &Path, sets: &[&[TokenizedPair]]) -> Result<String> {
    let mut h = Sha256::new();
    // v2: prompt shared by both responses in one forward (different rounding).
    h.update(b"dpo2d-reflogps-v2");
    hash_model_files(model_path, &mut h)?;
    for set in sets {
        h.update((set.len() as u64).to_le_bytes());
        for p in *set {
            for part in [&p.prompt, &p.chosen.ids, &p.rejected.ids] {
                h.update((part.len() as u64).to_le_bytes());
                for t in part.iter() {
                    h.update(t.to_le_bytes());
                }
            }
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// Reference log-probs of every pair, `batch` pairs per forward pass.
fn compute_ref_logps(model: &CausalLM, data: &[TokenizedPair], batch: usize, pb: Option<&indicatif::ProgressBar>) -> Result<Vec<RefLogps>> {
    let mut out = Vec::with_capacity(data.len());
    for chunk in data.chunks(batch.max(1)) {
        let o = packed_forward(model, &pair_units(&chunk.iter().collect::<Vec<_>>()), false)?;
        let flat = o.logps.detach().to_dtype(DType::F32)?.to_vec1::<f32>()?;
        for (k, p) in chunk.iter().enumerate() {
            let (sc, sr) = (o.starts[k][0], o.starts[k][1]);
            out.push(RefLogps {
                chosen: flat[sc..sc + p.chosen.ids.len()].to_vec(),
                rejected: flat[sr..sr + p.rejected.ids.len()].to_vec(),
            });
        }
        if let Some(pb) = pb {
            pb.inc(chunk.len() as u64);
        }
    }
    Ok(out)
}

fn save_ref_cache(path: &Path, sets: &[&[RefLogps]]) -> Result<()> {
    let mut map = HashMap::new();
    for (s, set) in sets.iter().enumerate() {
        for (i, r) in set.iter().enumerate() {
            map.insert(format!("{s}.{i}.c"), Tensor::new(r.chosen.as_slice(), &Device::Cpu)?);
            map.insert(format!("{s}.{i}.r"), Tensor::new(r.rejected.as_slice(), &Device::Cpu)?);
        }
    }
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn load_ref_cache(path: &Path, sizes: &[&[TokenizedPair]]) -> Result<Vec<Vec<RefLogps>>> {
    let map = candle_core::safetensors::load(path, &Device::Cpu)?;
    let mut out = Vec::new();
    for (s, set) in sizes.iter().enumerate() {
        let mut v = Vec::with_capacity(set.len());
        for (i, p) in set.iter().enumerate() {
            let get = |k: &str, n: usize| -> Result<Vec<f32>> {
                let t = map.get(&format!("{s}.{i}.{k}")).context("entry missing")?.to_vec1::<f32>()?;
                if t.len() != n {
                    bail!("entry has the wrong length");
                }
                Ok(t)
            };
            v.push(RefLogps { chosen: get("c", p.chosen.ids.len())?, rejected: get("r", p.rejected.ids.len())? });
        }
        out.push(v);
    }
    Ok(out)
}

fn config_hash(cfg: &TrainConfig) -> String {
    // Everything that changes the numbers; output paths and logging cadence do not.
    let mut c = cfg.clone();
    c.output_dir = PathBuf::new();
    c.save_steps = 0;
    c.save_total_limit = 0;
    c.max_steps = 0;
    c.num_train_epochs = 0.0;
    let text = toml::to_string(&c).unwrap_or_default();
    hex::encode(Sha256::digest(text.as_bytes()))[..16].to_string()
}

fn lora_config(cfg: &TrainConfig) -> Result<Option<LoraConfig>> {
    if !cfg.use_lora {
        return Ok(None);
    }
    let mut targets = Vec::new();
    for t in &cfg.lora_target_modules {
        if t == "all-linear" {
            targets.extend([
                LoraTarget::Q,
                LoraTarget::K,
                LoraTarget::V,
                LoraTarget::O,
                LoraTarget::Gate,
                LoraTarget::Up,
                LoraTarget::Down,
            ]);
        } else {
            targets.push(LoraTarget::parse(t)?);
        }
    }
    let lc = LoraConfig { r: cfg.lora_r, alpha: cfg.lora_alpha, dropout: cfg.lora_dropout, targets, seed: cfg.seed };
    lc.validate()?;
    Ok(Some(lc))
}

/// Train according to `cfg`. See the module documentation.
pub fn train(cfg: &TrainConfig, run: &RunOptions) -> Result<TrainOutcome> {
    cfg.validate()?;
    let lc = loss_config(cfg)?;
    let lt = lc.loss_type;
    let out_dir = cfg.output_dir.clone();
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating output_dir {}", out_dir.display()))?;
    let say = |s: &str| {
        if !run.quiet {
            eprintln!("{s}");
        }
    };

    // Data.
    let train_file = cfg.train_file.as_ref().context("no training data: set train_file (--train-file)")?;
    let mut train_pairs = load_data(train_file, cfg.skip_invalid)?;
    let mut eval_pairs = match &cfg.eval_file {
        Some(f) => load_data(f, cfg.skip_invalid)?,
        None => vec![],
    };
    if cfg.eval_file.is_none() && cfg.eval_split > 0.0 {
        let n_eval = ((train_pairs.len() as f64) * cfg.eval_split).round().max(1.0) as usize;
        if n_eval >= train_pairs.len() {
            bail!("eval_split {} leaves no training pairs", cfg.eval_split);
        }
        let mut order: Vec<usize> = (0..train_pairs.len()).collect();
        SplitMix(cfg.seed ^ 0x5EED_E7A1).shuffle(&mut order);
        let eval_idx: std::collections::BTreeSet<usize> = order[..n_eval].iter().copied().collect();
        let all = std::mem::take(&mut train_pairs);
        for (i, p) in all.into_iter().enumerate() {
            if eval_idx.contains(&i) {
                eval_pairs.push(p);
            } else {
                train_pairs.push(p);
            }
        }
    }
    let scored = train_pairs.iter().chain(&eval_pairs).all(|p| p.chosen.is_scored() && p.rejected.is_scored());
    lt.check_data(scored).with_context(|| format!("{}", train_file.display()))?;

    // Models.
    if cfg.bf16 {
        say("note: bf16 is not used on CPU (slower than f32 there); training in f32");
    }
    let model_path = resolve_model(&cfg.model)?;
    let text: TextSide = dpo2d_model::source::load_text_side(&model_path)?;
    let lora = lora_config(cfg)?;
    let opts = LoadOptions { dtype: DType::F32, device: Device::Cpu, trainable: lora.is_none(), lora: lora.clone() };
    let resume_state = match &run.resume {
        Some(dir) => Some((dir.clone(), checkpoint::load_state(dir)?)),
        None => None,
    };
    let policy = match (&resume_state, &lora) {
        (Some((dir, _)), None) => {
            dpo2d_model::source::load(dir, &opts).with_context(|| format!("loading the policy from checkpoint {}", dir.display()))?.model
        }
        _ => dpo2d_model::source::load(&model_path, &opts)?.model,
    };
    if let (Some((dir, _)), Some(_)) = (&resume_state, &lora) {
        checkpoint::load_adapter(dir, &policy)?;
    }

    // Tokenize.
    let aligner = Aligner::new(&text.tokenizer.inner, &text.chat)?;
    let aopts = AlignOptions { max_length: cfg.max_length, max_prompt_length: cfg.max_prompt_length };
    let (train, rep) = aligner.pairs(&train_pairs, aopts)?;
    say(&format!("train: {rep}"));
    let (eval, erep) = aligner.pairs(&eval_pairs, aopts)?;
    if !eval.is_empty() {
        say(&format!("eval: {erep}"));
    }

    // Training time as HF's `train_runtime`: reference precompute + loop + evals.
    let train_clock = Instant::now();
    // Reference.
    let ref_path = match &cfg.ref_model {
        Some(r) => resolve_model(r)?,
        None => model_path.clone(),
    };
    let live = lt.needs_token_kl() || lt.needs_kto_kl() || !cfg.precompute_ref_log_probs;
    let reference = if !lt.needs_reference() {
        Reference::None
    } else if live {
        let r = dpo2d_model::source::load(&ref_path, &LoadOptions { trainable: false, lora: None, ..opts.clone() })?.model;
        Reference::Live(Box::new(r))
    } else {
        let key = ref_cache_key(&ref_path, &[&train, &eval])?;
        let cache_root = match &run.cache_dir {
            Some(c) => c.clone(),
            None => dpo2d_model::fetch::cache_dir(None)?,
        };
        let path = cache_root.join("reflogps").join(format!("{key}.safetensors"));
        let cached = if path.is_file() { load_ref_cache(&path, &[&train, &eval]).ok() } else { None };
        match cached {
            Some(mut v) => {
                say(&format!("reference log-probs: cached ({})", path.display()));
                let eval_r = v.pop().unwrap_or_default();
                let train_r = v.pop().unwrap_or_default();
                Reference::Cached { train: train_r, eval: eval_r }
            }
            None => {
                // Before its first update the policy IS the reference: use it
                // rather than loading a second copy (peak memory: one model).
                let own;
                let r: &CausalLM = if cfg.ref_model.is_none() && resume_state.is_none() {
                    policy.set_training(false);
                    &policy
                } else {
                    own = dpo2d_model::source::load(&ref_path, &LoadOptions { trainable: false, lora: None, ..opts.clone() })?.model;
                    &own
                };
                let pb = if run.progress {
                    let pb = indicatif::ProgressBar::new((train.len() + eval.len()) as u64);
                    pb.set_style(
                        indicatif::ProgressStyle::with_template(
                            "reference log-probs {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    Some(pb)
                } else {
                    None
                };
                let bs = forward_chunk(cfg, lt, cfg.per_device_eval_batch_size);
                let train_r = compute_ref_logps(r, &train, bs, pb.as_ref())?;
                let eval_r = compute_ref_logps(r, &eval, bs, pb.as_ref())?;
                if let Some(pb) = pb {
                    pb.finish_and_clear();
                }
                if let Err(e) = save_ref_cache(&path, &[&train_r, &eval_r]) {
                    say(&format!("warning: cannot cache reference log-probs in {}: {e:#}", path.display()));
                }
                Reference::Cached { train: train_r, eval: eval_r }
            }
        }
    };

    // Schedule.
    let bs = cfg.per_device_train_batch_size;
    let gas = cfg.gradient_accumulation_steps;
    let mb_per_epoch = train.len().div_ceil(bs);
    let total = if cfg.max_steps > 0 {
        cfg.max_steps
    } else {
        ((cfg.num_train_epochs * mb_per_epoch as f64) / gas as f64).ceil().max(1.0) as usize
    };
    let warmup = schedule::warmup_steps(cfg.warmup_steps, cfg.warmup_ratio, total);
    let sched: SchedulerType = cfg.lr_scheduler_type.parse()?;

    let vars = policy.trainable_vars();
    if vars.is_empty() {
        bail!("the model has no trainable parameters");
    }
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWParams { weight_decay: cfg.weight_decay, beta1: cfg.adam_beta1, beta2: cfg.adam_beta2, eps: cfg.adam_epsilon },
    )?;

    let chash = config_hash(cfg);
    let mut history: Vec<Record> = vec![];
    let mut window = Accumulator::default();
    let mut window_tokens = 0usize;
    let mut start_step = 0usize;
    let mut micro = 0usize;
    let writer = MetricsWriter::new(&out_dir);
    if let Some((dir, st)) = &resume_state {
        if st.config_hash != chash {
            bail!(
                "--resume {}: the checkpoint was written with different training settings; resume with the same configuration",
                dir.display()
            );
        }
        opt.load(&dir.join("optimizer.safetensors"))?;
        start_step = st.global_step;
        micro = st.micro_step;
        history = st.log_history.clone();
        window = st.window.clone();
        window_tokens = st.window_tokens;
        if let Some(state) = st.dropout_rng {
            policy.set_dropout_rng_state(state);
        }
        writer.rewrite(&history)?;
        say(&format!("resuming from {} at step {start_step}", dir.display()));
    } else {
        writer.rewrite(&[])?;
    }
    std::fs::write(out_dir.join("config.toml"), cfg.to_toml()?)?;
    say(&format!(
        "training {} pairs ({} held out), loss {lt}, {total} updates of {bs} x {gas} pairs, {} trainable parameters",
        train.len(),
        eval.len(),
        vars.iter().map(|(_, v)| v.elem_count()).sum::<usize>()
    ));

    let ctx = Ctx { cfg, lc, policy: &policy, reference: &reference };
    let pb = if run.progress {
        let pb = indicatif::ProgressBar::new(total as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_position(start_step as u64);
        Some(pb)
    } else {
        None
    };
    let mut order_cache: Option<(usize, Vec<usize>)> = None;
    let mut window_start = Instant::now();
    let mut last_eval_step = None;
    let mut interrupted = false;
    let mut train_tokens_total = 0usize;
    let epoch_of = |m: usize| m as f64 / mb_per_epoch as f64;
    // Held-out metrics before the first update: the baseline the run is judged against.
    if !eval.is_empty() && start_step == 0 {
        let rec = evaluate(&ctx, &eval, 0, 0.0)?;
        writer.append(&rec)?;
        history.push(rec);
        window_start = Instant::now();
    }

    for step in start_step..total {
        policy.set_training(true);
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        for _ in 0..gas {
            let ep = micro / mb_per_epoch;
            let within = micro % mb_per_epoch;
            if order_cache.as_ref().map(|(e, _)| *e != ep).unwrap_or(true) {
                let order = if cfg.train_sampling_strategy == "sequential" {
                    (0..train.len()).collect()
                } else {
                    epoch_order(train.len(), cfg.seed, ep)
                };
                order_cache = Some((ep, order));
            }
            let order = &order_cache.as_ref().expect("set above").1;
            let idx: Vec<usize> = order[within * bs..((within + 1) * bs).min(train.len())].to_vec();
            micro += 1;
            // Every loss but KTO (whose KL term mixes pairs) is a mean of
            // per-pair losses, so a micro-batch can run as several smaller
            // forward/backward passes with the same gradient and a fraction
            // of the activation memory.
            let chunk = if lt.needs_kto_kl() || cfg.pairs_per_forward == 0 { idx.len() } else { cfg.pairs_per_forward };
            for part in idx.chunks(chunk.max(1)) {
                let mo = ctx.micro(&train, part, false)?;
                let w = part.len() as f64 / idx.len() as f64;
                // Window means are per-pair means.
                for (k, v) in &mo.values {
                    window.add_weighted(k, v * part.len() as f64, part.len());
                }
                window_tokens += mo.tokens;
                train_tokens_total += mo.tokens;
                let l = (mo.loss * (w / gas as f64))?;
                let grads = l.backward()?;
                for (i, (_, var)) in vars.iter().enumerate() {
                    if let Some(g) = grads.get(var) {
                        acc[i] = Some(match acc[i].take() {
                            Some(a) => (a + g)?,
                            None => g.clone(),
                        });
                    }
                }
            }
        }
        let grad_norm = clip_grad_norm(&mut acc, cfg.max_grad_norm)?;
        let lr = schedule::lr_at(sched, cfg.learning_rate, step, warmup, total);
        opt.step(&acc, lr)?;
        drop(acc);
        let gstep = step + 1;
        window.add("grad_norm", grad_norm);
        window.add("lr", lr);

        if gstep % cfg.logging_steps.max(1) == 0 || gstep == total {
            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            let mut values = window.take_means("");
            // grad_norm and lr: the values of the step logged (as TRL).
            values.insert("grad_norm".into(), grad_norm);
            values.insert("lr".into(), lr);
            values.insert("tokens/s".into(), window_tokens as f64 / secs);
            window_tokens = 0;
            window_start = Instant::now();
            let rec = Record { step: gstep, epoch: epoch_of(micro), values };
            if let Some(pb) = &pb {
                pb.set_message(format!(
                    "loss {:.4} acc {:.2} margin {:.4}",
                    rec.get("loss").unwrap_or(f64::NAN),
                    rec.get("rewards/accuracies").unwrap_or(f64::NAN),
                    rec.get("rewards/margins").unwrap_or(f64::NAN)
                ));
            } else if !run.quiet {
                eprintln!("{}", serde_json::to_string(&rec)?);
            }
            writer.append(&rec)?;
            history.push(rec);
        }
        if !eval.is_empty() && cfg.eval_steps > 0 && gstep % cfg.eval_steps == 0 {
            let rec = evaluate(&ctx, &eval, gstep, epoch_of(micro))?;
            writer.append(&rec)?;
            history.push(rec);
            last_eval_step = Some(gstep);
        }
        if let Some(pb) = &pb {
            pb.set_position(gstep as u64);
        }
        if cfg.save_steps > 0 && gstep % cfg.save_steps == 0 && gstep < total {
            let dir = out_dir.join(format!("checkpoint-{gstep}"));
            let state = TrainerState {
                global_step: gstep,
                micro_step: micro,
                max_steps: total,
                epoch: epoch_of(micro),
                seed: cfg.seed,
                data_order: order_cache.as_ref().map(|(_, o)| o.clone()).unwrap_or_default(),
                log_history: history.clone(),
                window: window.clone(),
                window_tokens,
                config_hash: chash.clone(),
                dropout_rng: Some(policy.dropout_rng_state()),
            };
            checkpoint::write_atomic(&dir, |tmp| {
                checkpoint::save_weights(tmp, &policy, &text, &model_path.display().to_string())?;
                opt.save(&tmp.join("optimizer.safetensors"))?;
                checkpoint::save_state(tmp, &state)
            })?;
            checkpoint::rotate(&out_dir, cfg.save_total_limit)?;
        }
        if run.stop_after == Some(gstep) && gstep < total {
            interrupted = true;
            break;
        }
    }
    if let Some(pb) = &pb {
        pb.finish();
    }
    let global_step = if interrupted { run.stop_after.unwrap_or(total) } else { total };
    if interrupted {
        return Ok(TrainOutcome {
            output_dir: out_dir.clone(),
            history,
            global_step,
            final_model_dir: out_dir,
            summary: String::new(),
            charts: vec![],
            interrupted,
            start_step,
        });
    }
    if !eval.is_empty() && last_eval_step != Some(total) {
        let rec = evaluate(&ctx, &eval, total, epoch_of(micro))?;
        writer.append(&rec)?;
        history.push(rec);
    }

    let train_runtime = train_clock.elapsed().as_secs_f64();
    let losses: Vec<f64> = history.iter().filter_map(|r| r.get("loss")).collect();
    let results = serde_json::json!({
        "train_runtime": train_runtime,
        "global_step": total,
        "train_loss": losses.iter().sum::<f64>() / losses.len().max(1) as f64,
        "train_tokens": train_tokens_total,
        "train_tokens_per_second": train_tokens_total as f64 / train_runtime.max(1e-9),
        "resumed_from_step": start_step,
        "note": "train_runtime covers reference log-prob precompute, training and evaluation of this process (not model loading or saving)",
    });
    std::fs::write(out_dir.join("train_results.json"), serde_json::to_string_pretty(&results)?)?;

    // Final model: the output directory itself holds an HF model (LoRA: the
    // adapter, plus the merged model in `merged/`).
    let final_dir = out_dir.join("final");
    checkpoint::write_atomic(&final_dir, |tmp| {
        checkpoint::save_weights(tmp, &policy, &text, &model_path.display().to_string())?;
        if policy.lora_config().is_some() {
            checkpoint::save_merged(&tmp.join("merged"), &policy, &text)?;
        }
        checkpoint::save_state(
            tmp,
            &TrainerState {
                global_step: total,
                micro_step: micro,
                max_steps: total,
                epoch: epoch_of(micro),
                seed: cfg.seed,
                data_order: vec![],
                log_history: history.clone(),
                window: Accumulator::default(),
                window_tokens: 0,
                config_hash: chash.clone(),
                dropout_rng: Some(policy.dropout_rng_state()),
            },
        )
    })?;
    let final_model_dir = if policy.lora_config().is_some() { final_dir.join("merged") } else { final_dir.clone() };
    let charts = crate::charts::draw_charts(&history, &out_dir)?;
    let summary = crate::metrics::summary(&history);
    std::fs::write(out_dir.join("summary.txt"), &summary)?;
    Ok(TrainOutcome { output_dir: out_dir, history, global_step, final_model_dir, summary, charts, interrupted, start_step })
}

/// Pairs per forward pass for gradient-free passes (evaluation, reference
/// precompute): `pairs_per_forward` caps the batch, except for KTO.
fn forward_chunk(cfg: &TrainConfig, lt: LossType, batch: usize) -> usize {
    if lt.needs_kto_kl() || cfg.pairs_per_forward == 0 {
        batch.max(1)
    } else {
        batch.min(cfg.pairs_per_forward).max(1)
    }
}

/// Metrics over the eval set (no gradients, dropout off), prefixed `eval_`.
fn evaluate(ctx: &Ctx, eval: &[TokenizedPair], step: usize, epoch: f64) -> Result<Record> {
    ctx.policy.set_training(false);
    let bs = forward_chunk(ctx.cfg, ctx.lc.loss_type, ctx.cfg.per_device_eval_batch_size);
    let mut acc = Accumulator::default();
    let idx: Vec<usize> = (0..eval.len()).collect();
    for chunk in idx.chunks(bs) {
        let mo = ctx.micro(eval, chunk, true)?;
        // Weight batch means by batch size so the result is a per-pair mean.
        for (k, v) in &mo.values {
            acc.add_weighted(k, v * chunk.len() as f64, chunk.len());
        }
    }
    ctx.policy.set_training(true);
    Ok(Record { step, epoch, values: acc.take_means("eval_") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dpo2d_model::config::ModelConfig;

    /// A random 2-layer model in f64 (exact comparisons).
    fn tiny_model() -> CausalLM {
        let cfg = ModelConfig::from_json_str(
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":32,"hidden_size":8,"intermediate_size":16,
              "num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,"rope_theta":10000.0,
              "rms_norm_eps":1e-5,"tie_word_embeddings":true}"#,
            "tiny",
        )
        .unwrap();
        let dev = Device::Cpu;
        let mut m = HashMap::new();
        let mut add = |n: String, shape: &[usize]| {
            m.insert(n, (Tensor::randn(0f64, 1.0, shape, &dev).unwrap() * 0.5).unwrap());
        };
        add("model.embed_tokens.weight".into(), &[32, 8]);
        add("model.norm.weight".into(), &[8]);
        for i in 0..2 {
            let p = format!("model.layers.{i}");
            for (n, o, inp) in [("q_proj", 8, 8), ("k_proj", 4, 8), ("v_proj", 4, 8), ("o_proj", 8, 8)] {
                add(format!("{p}.self_attn.{n}.weight"), &[o, inp]);
            }
            for (n, o, inp) in [("gate_proj", 16, 8), ("up_proj", 16, 8), ("down_proj", 8, 16)] {
                add(format!("{p}.mlp.{n}.weight"), &[o, inp]);
            }
            add(format!("{p}.input_layernorm.weight"), &[8]);
            add(format!("{p}.post_attention_layernorm.weight"), &[8]);
        }
        let opts = LoadOptions { dtype: DType::F64, device: Device::Cpu, trainable: false, lora: None };
        CausalLM::from_tensors(cfg, m, &opts).unwrap()
    }

    #[test]
    fn shared_prompt_forward_equals_one_sequence_per_response() {
        let model = tiny_model();
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

    #[test]
    fn epoch_orders_are_seeded_permutations() {
        let a = epoch_order(10, 42, 0);
        let b = epoch_order(10, 42, 0);
        let c = epoch_order(10, 42, 1);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..10).collect::<Vec<_>>());
    }
}
