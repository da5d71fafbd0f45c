//! The prompts a run samples answers for: a JSONL file (any file with a
//! `prompt` field per line, so a pairs file works too) or generated
//! arithmetic problems that carry their own answer key.

use anyhow::{bail, Context, Result};
use dpo2d_data::Prompt;
use dpo2d_eval::arithmetic::{self, Level, Problem, Split};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One prompt of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<serde_json::Value>,
    pub prompt: Prompt,
    /// The answer key of a generated arithmetic problem (what `check:arithmetic` checks against).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<Problem>,
}

/// The prompts of a JSONL file; other fields of a line are ignored.
pub fn load(path: &Path) -> Result<Vec<PromptRecord>> {
    let mut out = vec![];
    for line in dpo2d_data::io::jsonl_lines(path)? {
        let line = line?;
        let rec: PromptRecord = serde_json::from_str(&line.text)
            .with_context(|| format!("{}:{}: expected an object with a \"prompt\"", path.display(), line.number))?;
        out.push(rec);
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

/// `n` training-side arithmetic problems of one level (never in the
/// held-out set that `dpo2d eval --bench arithmetic[-L]` measures) as prompts.
pub fn arithmetic(n: usize, seed: u64, level: Level) -> Vec<PromptRecord> {
    arithmetic::generate(n, seed, Split::Train, level)
        .into_iter()
        .map(|p| PromptRecord { id: Some(p.id.clone().into()), prompt: Prompt::Text(p.prompt()), problem: Some(p) })
        .collect()
}

/// `FILE`, `arithmetic:N` or `arithmetic-L:N` (N generated problems of
/// level L from `seed`).
pub fn from_spec(spec: &str, seed: u64) -> Result<Vec<PromptRecord>> {
    let Some((name, n)) = spec.split_once(':').filter(|(name, _)| name.starts_with("arithmetic")) else {
        return load(Path::new(spec));
    };
    let level = Level::parse(name)
        .with_context(|| format!("--prompts {spec}: expected arithmetic:N or arithmetic-L:N"))?
        .map_err(|e| anyhow::anyhow!("--prompts {e}"))?;
    let n: usize = n.parse().with_context(|| format!("--prompts {spec}: expected {name}:N with N a number"))?;
    if n == 0 {
        bail!("--prompts {spec}: N must be at least 1");
    }
    Ok(arithmetic(n, seed, level))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_prompts_are_training_side_and_keyed() {
        let p = from_spec("arithmetic:20", 3).unwrap();
        assert_eq!(p.len(), 20);
        let held: Vec<String> = arithmetic::generate(500, 2024, Split::HeldOut, Level::DEFAULT).into_iter().map(|p| p.question).collect();
        for r in &p {
            let problem = r.problem.as_ref().unwrap();
            assert!(!held.contains(&problem.question));
            assert_eq!(r.prompt, Prompt::Text(problem.prompt()));
        }
        assert!(from_spec("arithmetic:x", 3).is_err());
        assert!(from_spec("arithmetic:0", 3).is_err());
        assert!(from_spec("arithmetic-9:5", 3).is_err());
        let one_step = from_spec("arithmetic-1:5", 3).unwrap();
        assert!(one_step.iter().all(|r| r.problem.as_ref().unwrap().steps.len() == 1));
    }

    #[test]
    fn loads_prompt_lines_of_any_shape() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("p.jsonl");
        std::fs::write(&f, "{\"prompt\": \"hi\", \"chosen\": \"a\", \"rejected\": \"b\"}\n\n{\"id\": 7, \"prompt\": [{\"role\": \"user\", \"content\": \"yo\"}]}\n").unwrap();
        let p = load(&f).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].id, Some(7.into()));
        std::fs::write(&f, "{\"text\": \"no prompt\"}\n").unwrap();
        assert!(load(&f).unwrap_err().to_string().contains(":1: expected an object"));
    }
}
