//! `cmdproc demo`.

use clap::Args;

use super::Common;

/// Arguments of `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many commands to produce.
    #[arg(long, default_value_t = 4000)]
    pub commands: usize,
}

/// Runs the demonstration.
pub async fn run(_common: &Common, _args: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet available")
}
