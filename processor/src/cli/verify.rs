//! `cmdproc verify`.

use clap::Args;

use super::Common;

/// Arguments of `verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Partitions to verify, e.g. `0,3`, or `all`.
    #[arg(long, default_value = "all")]
    pub partitions: String,
}

/// Verifies the stored aggregates against a re-execution of the retained commands.
pub async fn run(_common: &Common, _args: VerifyArgs) -> anyhow::Result<()> {
    anyhow::bail!("cmdproc verify is not available yet")
}
