//! Sampling through a serving engine: the K answers of each prompt from any
//! OpenAI-compatible chat-completions server (vLLM, SGLang, `dpo2d serve`)
//! that serves the round's policy, with `n`, `temperature`, `top_p`, `seed`
//! and `max_tokens`. Each round's policy is a directory of Hugging Face
//! files, so the engine is (re)started on it: by the user between runs, or
//! by iterate itself with a command (`{model}` stands for the policy).

use crate::prompts::PromptRecord;
use crate::SamplingSettings;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where answers are sampled when not with dpo2d's own decoder.
#[derive(Debug, Clone)]
pub struct ServerSampler {
    /// The engine's OpenAI-compatible base URL, e.g. `http://localhost:8000/v1`.
    pub base_url: String,
    /// Started on each round's policy (`{model}` replaced by its path) and
    /// stopped after sampling; without it the engine must already serve the policy.
    pub command: Option<String>,
    /// The model name to ask for; `None`: the policy as iterate names it
    /// (the path vLLM serves a directory under).
    pub model: Option<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Per-request timeout, and the longest wait for a started engine.
    pub timeout: Duration,
}

/// A started engine, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Engine {
    child: Child,
}

impl Drop for Engine {
    fn drop(&mut self) {
        let pid = self.child.id();
        let child = &mut self.child;
        if !terminate(pid, || matches!(child.try_wait(), Ok(Some(_)))) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Sends SIGTERM to `pid` and waits up to 30 s until `gone`; whether it went
/// (the caller kills it otherwise). One way to stop an engine, whether this
/// run started it or a killed run left it behind.
fn terminate(pid: u32, mut gone: impl FnMut() -> bool) -> bool {
    let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !gone() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    gone()
}

impl ServerSampler {
    /// Starts the engine on `policy` when there is a command (its output in
    /// `log`), and waits until it lists its models.
    pub fn start(&self, policy: &str, log: &Path) -> Result<Option<Engine>> {
        let Some(cmd) = &self.command else { return Ok(None) };
        let line = cmd.replace("{model}", policy);
        let pid_file = log.with_extension("pid");
        stop_leftover(&pid_file, policy);
        let out = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("exec {line}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start the sampler: {line}"))?;
        dpo2d_fs::write_file(&pid_file, child.id().to_string())?;
        let mut engine = Engine { child };
        let rt = runtime()?;
        let http = reqwest::Client::new();
        let url = format!("{}/models", self.base_url.trim_end_matches('/'));
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(status) = engine.child.try_wait()? {
                let tail = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(10).collect();
                bail!(
                    "the sampler exited ({status}) before answering; the end of {}:\n{}",
                    log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            let up =
                rt.block_on(async { http.get(&url).timeout(Duration::from_secs(5)).send().await.is_ok_and(|r| r.status().is_success()) });
            if up {
                return Ok(Some(engine));
            }
            if Instant::now() > deadline {
                bail!("the sampler did not answer at {url} within {:?} (its output: {})", self.timeout, log.display());
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The answers to each prompt: `s.samples_per_prompt` of them, asked
    /// with `n` (more requests, with other seeds, where a server returns fewer).
    pub fn sample(&self, prompts: &[PromptRecord], s: &SamplingSettings, seed: u64, model: &str) -> Result<Vec<Vec<String>>> {
        let rt = runtime()?;
        let http = reqwest::Client::builder().timeout(self.timeout).build().context("cannot create the HTTP client")?;
        let url = format!("{}/chat/completions", self.base_url.trim_end_matches('/'));
        let name = self.model.clone().unwrap_or_else(|| model.to_string());
        let gate = Arc::new(tokio::sync::Semaphore::new(self.concurrency.max(1)));
        rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for (i, p) in prompts.iter().enumerate() {
                let messages: Vec<Value> = p.prompt.messages().iter().map(|m| json!({"role": m.role, "content": m.content})).collect();
                let (http, url, name, gate, s) = (http.clone(), url.clone(), name.clone(), gate.clone(), s.clone());
                let seed = seed.wrapping_add(i as u64 * 1000);
                set.spawn(async move {
                    let _permit = gate.acquire_owned().await.expect("never closed");
                    let mut answers = Vec::new();
                    for extra in 0..s.samples_per_prompt as u64 {
                        if answers.len() >= s.samples_per_prompt {
                            break;
                        }
                        let body = json!({
                            "model": name, "messages": messages, "n": s.samples_per_prompt - answers.len(),
                            "temperature": s.temperature, "top_p": s.top_p, "seed": api_seed(seed, extra), "max_tokens": s.max_new_tokens,
                        });
                        answers.extend(ask(&http, &url, &body).await?);
                    }
                    answers.truncate(s.samples_per_prompt);
                    anyhow::Ok((i, answers))
                });
            }
            let mut out = vec![Vec::new(); prompts.len()];
            while let Some(joined) = set.join_next().await {
                let (i, answers) = joined.context("a sampling request crashed")??;
                out[i] = answers;
            }
            Ok(out)
        })
    }
}

/// Stops the engine a killed run started on `policy` (its pid is in
/// `pid_file`, and its command line names the policy), which would
/// otherwise hold the port.
fn stop_leftover(pid_file: &Path, policy: &str) {
    let Some(pid) = std::fs::read_to_string(pid_file).ok().and_then(|s| s.trim().parse::<u32>().ok()) else { return };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !String::from_utf8_lossy(&cmdline).contains(policy) {
        return;
    }
    tracing::warn!("stopping the sampler (pid {pid}) that an interrupted run left running");
    // A zombie has an empty command line: gone for our purposes.
    let alive = || std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty());
    if !terminate(pid, || !alive()) {
        let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A request's `seed`: non-negative and within 31 bits, which every
/// OpenAI-compatible server takes.
fn api_seed(seed: u64, extra: u64) -> u64 {
    seed.wrapping_add(extra) & 0x7fff_ffff
}

/// One request, retried a few times on connection errors, 429 and 5xx.
async fn ask(http: &reqwest::Client, url: &str, body: &Value) -> Result<Vec<String>> {
    let mut last = String::new();
    for attempt in 0..5u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500) * 2u32.pow(attempt - 1)).await;
        }
        match http.post(url).json(body).send().await {
            Ok(r) if r.status().is_success() => {
                let v: Value = r.json().await.context("the sampler's answer is not JSON")?;
                let mut choices: Vec<(u64, String)> = v["choices"]
                    .as_array()
                    .context("the sampler's answer has no choices")?
                    .iter()
                    .map(|c| (c["index"].as_u64().unwrap_or(0), c["message"]["content"].as_str().unwrap_or("").trim().to_string()))
                    .collect();
                choices.sort_by_key(|c| c.0);
                return Ok(choices.into_iter().map(|c| c.1).collect());
            }
            Ok(r) if r.status().as_u16() == 429 || r.status().is_server_error() => last = format!("{} answered {}", url, r.status()),
            Ok(r) => {
                let status = r.status();
                let text: String = r.text().await.unwrap_or_default().chars().take(300).collect();
                bail!("the sampler at {url} answered {status}: {text} (does it serve the round's policy? see --sampler-model)");
            }
            Err(e) => last = format!("cannot reach {url}: {e}"),
        }
    }
    bail!("sampling failed after 5 attempts: {last}")
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")
}
