//! Placeholder: implemented under the operations issue.

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct MaintainArgs {}

pub async fn run(_args: MaintainArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
