//! Scaffold: replaced by the real command.
use anyhow::{bail, Result};

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    bail!("this command is not built yet")
}
