//! Placeholder: implemented under the operations issue.

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {}

pub async fn run(_args: RestoreArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
