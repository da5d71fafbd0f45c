//! `dpo2d bench`: training (forward + backward) and generation speed of a
//! model on this machine's CPU, and the peak resident memory.

use anyhow::{Context, Result};
use candle_core::Tensor;
use dpo2d_model::chat::Message;
use dpo2d_model::fetch;
use dpo2d_model::gemm_bench::{time_matmul, training_shapes};
use dpo2d_model::generate::{generate_ids, GenerationConfig};
use dpo2d_model::llama::{AttentionLayout, LoadOptions};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model directory, .gguf file, or a known model name (smollm2).
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Sequences per training step.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Timed training steps (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// New tokens per generation run (greedy, EOS ignored).
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Prompts decoded together in the generation run.
    #[arg(long, default_value_t = 1)]
    pub gen_batch: usize,
    /// Only time the matrix products of a training step of this model's
    /// shapes (f32, forward and backward) and report GFLOP/s.
    #[arg(long)]
    pub gemm: bool,
    /// Tokens per forward pass for `--gemm` (two packed pairs of the
    /// benchmark data are about 380).
    #[arg(long, default_value_t = 384)]
    pub gemm_tokens: usize,
    /// Only check every fused op of the training path on `--device` against
    /// its composed reference on the CPU (values and gradients, f32 and bf16
    /// on a GPU); fails if one is off. Needs no model.
    #[arg(long)]
    pub check_kernels: bool,
    /// Also write the JSON result here [default: standard output only].
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    #[arg(long, env = "DPO2D_CACHE", value_name = "DIR", help = super::CACHE_DIR_HELP)]
    pub cache_dir: Option<PathBuf>,
    #[command(flatten)]
    pub device: super::DeviceArg,
}

/// `--gemm`: every product of one training step, timed alone.
fn gemm(a: &Args, path: &std::path::Path) -> Result<()> {
    let cfg = dpo2d_model::load_text_side(path)?.config;
    let shapes = training_shapes(&cfg, a.gemm_tokens, dpo2d_kernels::ops::chunk_rows(cfg.vocab_size));
    let threads = candle_core::utils::get_num_threads();
    println!("CPU: {} ({threads} threads), f32, {} tokens per pass\n", cpu_model(), a.gemm_tokens);
    println!("| product | batch x m x k x n | per step | GFLOP/s |");
    println!("|---|---|---|---|");
    let (mut rows, mut flops, mut secs) = (vec![], 0.0, 0.0);
    for s in &shapes {
        let t = time_matmul(s, 0.3)?;
        let gf = s.flops() / t / 1e9;
        println!("| {} | {} x {} x {} x {} | {} | {gf:.1} |", s.name, s.batch, s.m, s.k, s.n, s.count);
        flops += s.flops() * s.count as f64;
        secs += t * s.count as f64;
        rows.push(json!({"shape": s, "seconds": t, "gflops": gf}));
    }
    println!("| all products of one step, weighted | | | {:.1} ({secs:.2} s) |", flops / secs / 1e9);
    let result = json!({"cpu": cpu_model(), "threads": threads, "tokens": a.gemm_tokens, "products": rows, "step_seconds": secs, "step_gflops": flops / secs / 1e9});
    report(a, &result)
}

/// The result as one JSON line on stdout and, with `--json`, pretty in that file.
fn report(a: &Args, result: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string(result)?);
    if let Some(j) = &a.json {
        dpo2d_fs::write_file(j, serde_json::to_string_pretty(result)?)?;
    }
    Ok(())
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`).
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_else(|| "unknown".into())
}

/// `--check-kernels`: the table of ops, dtypes and errors; an error if one failed.
fn check_kernels(a: &Args) -> Result<()> {
    let dev = a.device.device.device()?;
    let rows = dpo2d_kernels::check::run(&dev)?;
    println!("device: {}\n\n| op | dtype | max error / max magnitude | tolerance | |\n|---|---|---|---|---|", a.device.device);
    for r in &rows {
        println!("| {} | {:?} | {:.2e} | {:.0e} | {} |", r.op, r.dtype, r.rel_err, r.tolerance, if r.passed() { "ok" } else { "FAILED" });
    }
    let failed: Vec<_> = rows.iter().filter(|r| !r.passed()).map(|r| format!("{} ({:?})", r.op, r.dtype)).collect();
    anyhow::ensure!(failed.is_empty(), "kernel check failed: {}", failed.join(", "));
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    if a.check_kernels {
        return check_kernels(&a);
    }
    let path = fetch::resolve_model(&a.model, a.cache_dir.as_deref())?;
    if a.gemm {
        return gemm(&a, &path);
    }
    let t0 = Instant::now();
    let frozen = a.device.load_options()?;
    let lm = dpo2d_model::load(&path, &LoadOptions { trainable: true, ..frozen.clone() })?;
    let load_s = t0.elapsed().as_secs_f64();
    let mem_load = peak_rss_mib();
    let vocab = lm.config.vocab_size as u64;
    let (b, t) = (a.batch_size.max(1), a.seq_len.max(2));
    // Deterministic pseudo-random token ids (vocabulary-wide).
    let mut rng = dpo2d_train::sampler::SplitMix(0x5EED);
    let ids: Vec<u32> = (0..b * t).map(|_| (rng.next_u64() % vocab) as u32).collect();
    let x = Tensor::from_vec(ids, (b, t), &frozen.device)?;
    let layout = AttentionLayout::causal(b, t);
    let step = || -> Result<f64> {
        let s = Instant::now();
        let lp = lm.model.token_logprobs(&x, &layout)?;
        let loss = (lp.sum_all()?.neg()? / (b * (t - 1)) as f64)?;
        // Collected as training does (the linear layers' own gradients included).
        let _grads = lm.model.gradients(&loss.backward().context("backward pass")?)?;
        Ok(s.elapsed().as_secs_f64())
    };
    eprintln!("training: {b} x {t} tokens, 1 warm-up + {} timed steps", a.steps);
    step()?;
    let mut times = vec![];
    for i in 0..a.steps.max(1) {
        let s = step()?;
        eprintln!("  step {}: {s:.2}s", i + 1);
        times.push(s);
    }
    let train_s = times.iter().sum::<f64>() / times.len() as f64;
    let train_tps = (b * t) as f64 / train_s;
    let mem_train = peak_rss_mib();
    // Generation, with the model loaded for inference as `dpo2d generate` does
    // (frozen weights take the faster gradient-free paths).
    drop(lm);
    let lm = dpo2d_model::load(&path, &frozen)?;
    let text = lm.text();
    let prompt = text.prompt_ids(&[Message::user("Write a short story about a robot who learns to paint.")])?;
    let prompts = vec![prompt.clone(); a.gen_batch.max(1)];
    let cfg = GenerationConfig { max_new_tokens: a.gen_tokens, batch_size: prompts.len(), ..GenerationConfig::greedy(a.gen_tokens) };
    eprintln!("generation: {} prompt(s) of {} tokens, {} new tokens each", prompts.len(), prompt.len(), a.gen_tokens);
    let s = Instant::now();
    let out = generate_ids(&lm.model, &prompts, &[], text.tokenizer.pad_token_id(), &cfg, &|_| false)?;
    let gen_s = s.elapsed().as_secs_f64();
    let gen_tokens: usize = out.iter().flatten().map(|c| c.tokens.len()).sum();
    let gen_tps = gen_tokens as f64 / gen_s;
    let mem_peak = peak_rss_mib();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let result = json!({
        "model": path.display().to_string(),
        "parameters": lm.config.vocab_size * lm.config.hidden_size
            + lm.config.num_hidden_layers * (lm.config.hidden_size * (lm.config.num_attention_heads + 2 * lm.config.num_key_value_heads) * lm.config.head_dim
                + lm.config.hidden_size * lm.config.num_attention_heads * lm.config.head_dim
                + 3 * lm.config.hidden_size * lm.config.intermediate_size),
        "cpu": cpu_model(),
        "threads": threads,
        "load_seconds": load_s,
        "train": {"batch_size": b, "seq_len": t, "steps": times.len(), "seconds_per_step": train_s, "tokens_per_second": train_tps},
        "generate": {"batch": prompts.len(), "prompt_tokens": prompt.len(), "new_tokens": gen_tokens, "seconds": gen_s, "tokens_per_second": gen_tps},
        "peak_rss_mib": {"after_load": mem_load, "after_train": mem_train, "final": mem_peak},
    });
    println!("| measure | value |");
    println!("|---|---|");
    println!("| CPU | {} ({threads} threads) |", cpu_model());
    println!("| model load | {load_s:.1} s |");
    println!("| forward+backward, {b} x {t} tokens | {train_s:.2} s/step, {train_tps:.0} tokens/s |");
    println!("| greedy generation, batch {} | {gen_tps:.1} tokens/s |", prompts.len());
    if let (Some(l), Some(tr), Some(p)) = (mem_load, mem_train, mem_peak) {
        println!("| peak RSS after load / train / generate | {l:.0} / {tr:.0} / {p:.0} MiB |");
    }
    report(&a, &result)
}
