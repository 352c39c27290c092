//! Placeholder: implemented under the operations issue.

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {}

pub async fn run(_args: VerifyArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
