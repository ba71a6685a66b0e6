//! `cmdproc dlq`.

use clap::Subcommand;

use super::Common;

/// Dead-letter subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters and parked aggregates.
    List,
}

/// Runs a dead-letter subcommand.
pub async fn run(_common: &Common, _cmd: DlqCommand) -> anyhow::Result<()> {
    anyhow::bail!("cmdproc dlq is not available yet")
}
