//! The reference model's side of the losses. Most losses need only the
//! reference's log-probs of the response tokens, which are computed once
//! before training and cached on disk (TRL's `precompute_ref_log_probs`),
//! keyed by the model files and the token ids; losses that need the
//! reference's full distribution (TDPO) or its log-probs of other pairings
//! (KTO) run the reference model alongside the policy instead.

use crate::align::TokenizedPair;
use crate::packing::{packed_forward, pair_units};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use dpo2d_model::llama::CausalLM;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Reference log-probs of one pair's responses (label positions only).
#[derive(Debug, Clone, PartialEq)]
pub struct RefLogps {
    pub chosen: Vec<f32>,
    pub rejected: Vec<f32>,
}

/// Where the reference comes from.
pub(crate) enum Reference {
    /// Reference-free loss.
    None,
    /// Precomputed per pair (train and eval sets).
    Cached { train: Vec<RefLogps>, eval: Vec<RefLogps> },
    /// Run alongside the policy, without gradients.
    Live(Box<CausalLM>),
}

/// How [`Reference::precomputed`] finds or computes the cached log-probs.
pub(crate) struct Precompute<'a> {
    /// The reference model's files (hashed into the cache key).
    pub model_path: &'a Path,
    pub cache_root: PathBuf,
    /// Pairs per forward pass over the training pairs (taken in order of length).
    pub batch: usize,
    /// Pairs per forward pass over the held-out pairs, taken in data order:
    /// the passes of the policy's evaluation, so that before the first update
    /// both compute the very same numbers and the rewards are exactly 0
    /// (other batches differ in the last bits, which makes step 0's reward
    /// accuracy a coin toss).
    pub eval_batch: usize,
    pub progress: bool,
}

impl Reference {
    /// Reference log-probs of the training and held-out pairs: from the
    /// cache, or computed with `load()` (the model is loaded only on a miss).
    pub fn precomputed(
        p: &Precompute,
        train: &[TokenizedPair],
        eval: &[TokenizedPair],
        load: impl FnOnce() -> Result<CausalLM>,
        say: &dyn Fn(&str),
    ) -> Result<Reference> {
        let key = cache_key(p.model_path, &[train, eval])?;
        let path = p.cache_root.join("reflogps").join(format!("{key}.safetensors"));
        if let Some(mut v) = path.is_file().then(|| load_cache(&path, &[train, eval]).ok()).flatten() {
            say(&format!("reference log-probs: cached ({})", path.display()));
            let eval = v.pop().unwrap_or_default();
            let train = v.pop().unwrap_or_default();
            return Ok(Reference::Cached { train, eval });
        }
        let model = load()?;
        let pb = p.progress.then(|| {
            dpo2d_ui::progress::bar(
                (train.len() + eval.len()) as u64,
                "reference log-probs {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
            )
        });
        let train_r = compute(&model, train, p.batch, true, pb.as_ref())?;
        let eval_r = compute(&model, eval, p.eval_batch, false, pb.as_ref())?;
        if let Some(pb) = pb {
            pb.finish_and_clear();
        }
        if let Err(e) = save_cache(&path, &[&train_r, &eval_r]) {
            say(&format!("warning: cannot cache reference log-probs in {}: {e:#}", path.display()));
        }
        Ok(Reference::Cached { train: train_r, eval: eval_r })
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
        h.update(f.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default().as_bytes());
        h.update(file_digest(&f).with_context(|| format!("reading {}", f.display()))?);
    }
    Ok(())
}

/// Hash the token ids of every pair of `sets` (lengths included, so no two
/// different data sets hash alike).
pub(crate) fn hash_token_ids(sets: &[&[TokenizedPair]], h: &mut Sha256) {
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
}

/// Cache key of reference log-probs: model files + token ids of every pair.
/// BLAKE3 of a file on every core, mapped 256 MiB at a time: SHA-256 of a
/// 15 GB 7B checkpoint took longer than the reference pass itself, and a map
/// of the whole file would count towards the process's resident memory.
fn file_digest(path: &Path) -> std::io::Result<[u8; 32]> {
    const WINDOW: u64 = 256 << 20;
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut hasher = blake3::Hasher::new();
    let mut offset = 0;
    while offset < len {
        let n = WINDOW.min(len - offset);
        // SAFETY: the file is only read; a model file changed while it is being
        // hashed gives a key that no later run matches, nothing worse.
        let map = unsafe { memmap2::MmapOptions::new().offset(offset).len(n as usize).map(&file)? };
        hasher.update_rayon(&map);
        offset += n;
    }
    Ok(*hasher.finalize().as_bytes())
}

fn cache_key(model_path: &Path, sets: &[&[TokenizedPair]]) -> Result<String> {
    let mut h = Sha256::new();
    // v2: prompt shared by both responses in one forward (different rounding).
    // v3: fused kernels (logsumexp summed in f64) and the held-out pairs in
    // evaluation's batches, which step 0's evaluation reproduces bit for bit.
    h.update(b"dpo2d-reflogps-v4");
    hash_model_files(model_path, &mut h)?;
    hash_token_ids(sets, &mut h);
    Ok(hex::encode(h.finalize()))
}

/// Reference log-probs of every pair, `batch` pairs per forward pass. With
/// `by_length` the pairs go through in order of length, so that the pairs of
/// one pass are about as long as each other and its rows carry little
/// padding (a row is as wide as its longest pair; in data order a fifth of
/// the positions of an 8-pair pass were padding); results come back in data
/// order either way.
fn compute(
    model: &CausalLM,
    data: &[TokenizedPair],
    batch: usize,
    by_length: bool,
    pb: Option<&dpo2d_ui::ProgressBar>,
) -> Result<Vec<RefLogps>> {
    let mut order: Vec<usize> = (0..data.len()).collect();
    if by_length {
        order.sort_by_key(|&i| (data[i].num_tokens(), i));
    }
    let mut out: Vec<Option<RefLogps>> = (0..data.len()).map(|_| None).collect();
    for chunk in order.chunks(batch.max(1)) {
        let pairs: Vec<&TokenizedPair> = chunk.iter().map(|&i| &data[i]).collect();
        let o = packed_forward(model, &pair_units(&pairs), false)?;
        let flat = o.logps.detach().to_dtype(DType::F32)?.to_vec1::<f32>()?;
        for (k, (&i, p)) in chunk.iter().zip(&pairs).enumerate() {
            let (sc, sr) = (o.starts[k][0], o.starts[k][1]);
            out[i] = Some(RefLogps {
                chosen: flat[sc..sc + p.chosen.ids.len()].to_vec(),
                rejected: flat[sr..sr + p.rejected.ids.len()].to_vec(),
            });
        }
        if let Some(pb) = pb {
            pb.inc(chunk.len() as u64);
        }
    }
    Ok(out.into_iter().flatten().collect())
}

fn save_cache(path: &Path, sets: &[&[RefLogps]]) -> Result<()> {
    let mut map = HashMap::new();
    for (s, set) in sets.iter().enumerate() {
        for (i, r) in set.iter().enumerate() {
            map.insert(format!("{s}.{i}.c"), Tensor::new(r.chosen.as_slice(), &Device::Cpu)?);
            map.insert(format!("{s}.{i}.r"), Tensor::new(r.rejected.as_slice(), &Device::Cpu)?);
        }
    }
    dpo2d_fs::write_file_with(path, |tmp| Ok(candle_core::safetensors::save(&map, tmp)?))
}

fn load_cache(path: &Path, sizes: &[&[TokenizedPair]]) -> Result<Vec<Vec<RefLogps>>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::align::TokenizedResponse;
    use candle_core::DType;
    use dpo2d_model::llama::LoadOptions;
    use dpo2d_model::test_support::TinyModel;

    fn pair(index: usize, p: usize, c: usize, r: usize) -> TokenizedPair {
        let ids = |n: usize, s: usize| (0..n).map(|j| ((j * 7 + s * 3 + index) % 31) as u32 + 1).collect::<Vec<u32>>();
        let resp = |n, s| TokenizedResponse { ids: ids(n, s), token_segments: vec![0; n], scores: vec![] };
        TokenizedPair {
            index,
            prompt: ids(p, 1),
            chosen: resp(c, 2),
            rejected: resp(r, 3),
            prompt_truncated: false,
            response_truncated: false,
        }
    }

    #[test]
    fn length_ordered_batches_give_each_pair_its_own_log_probs() {
        let tiny = TinyModel { vocab: 32, hidden: 8, intermediate: 16, heads: 2, kv_heads: 1, dtype: DType::F64, ..Default::default() };
        let model = tiny.build(&LoadOptions { dtype: DType::F64, ..LoadOptions::default() });
        let data: Vec<TokenizedPair> =
            [(5, 9, 2), (2, 1, 1), (7, 3, 6), (3, 4, 4), (4, 8, 1)].iter().enumerate().map(|(i, &(p, c, r))| pair(i, p, c, r)).collect();
        let batched = compute(&model, &data, 3, true, None).unwrap();
        let alone = compute(&model, &data, 1, false, None).unwrap();
        assert_eq!(batched.len(), data.len());
        for (i, (a, b)) in batched.iter().zip(&alone).enumerate() {
            assert_eq!((a.chosen.len(), a.rejected.len()), (data[i].chosen.ids.len(), data[i].rejected.ids.len()), "pair {i}");
            for (x, y) in a.chosen.iter().chain(&a.rejected).zip(b.chosen.iter().chain(&b.rejected)) {
                assert!((x - y).abs() < 1e-5, "pair {i}: {x} vs {y}");
            }
        }
    }
}
