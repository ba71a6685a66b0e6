//! `cmdproc verify`.

use clap::Args;

use commands::Registry;

use super::run::Misrouted;
use super::Common;
use crate::verify::{self, VerifyConfig};

/// Arguments of `verify`.
///
/// Re-executes each partition's retained commands from the start of the commands topic up
/// to the offset the workers stored, in memory, through the same pure handlers, and compares
/// every aggregate (state and version) with Postgres. Prints each difference and exits
/// non-zero if there is any. Partitions whose log start was removed by retention are skipped.
/// Use the same `--max-command-bytes` and `--misrouted` as the workers.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Partitions to verify, e.g. `0,3`, or `all`.
    #[arg(long, default_value = "all")]
    pub partitions: String,
    /// The workers' size limit: larger messages were dead-lettered as `too_large`.
    #[arg(long, default_value_t = 256 * 1024)]
    pub max_command_bytes: usize,
    /// The workers' policy for commands on the wrong partition.
    #[arg(long, value_enum, default_value_t = Misrouted::DeadLetter)]
    pub misrouted: Misrouted,
}

/// Verifies the stored aggregates against a re-execution of the retained commands.
pub async fn run(common: &Common, registry: &Registry, args: VerifyArgs) -> anyhow::Result<()> {
    let partitions = verify::parse_partitions(&args.partitions).map_err(anyhow::Error::msg)?;
    let pool = super::pool(common, 4).await?;
    let config = VerifyConfig {
        brokers: common.brokers.clone(),
        topic: common.commands_topic.to_string(),
        partitions,
        max_command_bytes: args.max_command_bytes,
        misrouted: args.misrouted.into(),
    };
    let report = verify::verify(&pool, registry, &config, |line| println!("{line}")).await?;
    for d in &report.differences {
        println!("difference: {}", d.describe());
    }
    println!("{}", report.summary());
    if !report.differences.is_empty() {
        anyhow::bail!(
            "{} aggregate(s) differ from the re-execution",
            report.differences.len()
        );
    }
    Ok(())
}
