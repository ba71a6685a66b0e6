//! `cmdproc inspect <type> <id>`.

use clap::Args;

use commands::Registry;

use super::Common;

/// Arguments of `inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Aggregate type, e.g. `account`.
    pub aggregate_type: String,
    /// Aggregate id, e.g. `acc-42`.
    pub aggregate_id: String,
    /// How many recent commands and events to show.
    #[arg(long, default_value_t = 20)]
    pub limit: i64,
}

/// Prints the aggregate, or fails when nothing is known about it.
pub async fn run(common: &Common, registry: &Registry, args: InspectArgs) -> anyhow::Result<()> {
    if registry.get(&args.aggregate_type).is_none() {
        anyhow::bail!(
            "unknown aggregate type `{}`; this processor knows {}",
            args.aggregate_type,
            registry.types().collect::<Vec<_>>().join(", ")
        );
    }
    let pool = super::pool(common, 2).await?;
    match crate::inspect::aggregate(&pool, &args.aggregate_type, &args.aggregate_id, args.limit)
        .await?
    {
        Some(v) => {
            use std::io::Write as _;
            let text = serde_json::to_string_pretty(&v)?;
            match writeln!(std::io::stdout().lock(), "{text}") {
                // Piped into `head` or the like, which stopped reading: nothing is lost.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                other => Ok(other?),
            }
        }
        None => anyhow::bail!(
            "no {} `{}` has been seen",
            args.aggregate_type,
            args.aggregate_id
        ),
    }
}
