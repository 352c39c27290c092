//! Placeholder: implemented under the operations issue.

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct BackupArgs {}

pub async fn run(_args: BackupArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
