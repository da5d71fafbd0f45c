//! Scaffold: replaced by the real command.
use anyhow::{bail, Result};

#[derive(clap::Subcommand)]
pub enum ModelCommand {
    /// Download a known model and convert it to a Hugging Face directory.
    Fetch {},
}

pub fn run(_c: ModelCommand) -> Result<()> {
    bail!("this command is not built yet")
}
