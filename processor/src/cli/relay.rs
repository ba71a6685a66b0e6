//! `cmdproc relay`: the outbox relay alone.

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::Common;
use crate::relay::Relay;

/// Arguments of `relay`.
#[derive(Debug, Args)]
pub struct RelayArgs {
    /// Most outbox rows published per partition per step.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: i64,
}

/// Runs the relay until SIGTERM or Ctrl-C.
pub async fn run(common: &Common, args: RelayArgs) -> anyhow::Result<()> {
    let pool = super::pool(common, 4).await?;
    crate::store::migrate(&pool).await?;
    let relay = Relay::new(
        pool,
        &common.brokers,
        common.commands_topic.as_str(),
        args.batch_size,
        None,
    )?;
    let shutdown = CancellationToken::new();
    tokio::spawn(super::run::on_signal(shutdown.clone()));
    tracing::info!(topic = %common.commands_topic, "relay started");
    relay
        .run(shutdown, std::time::Duration::from_secs(10))
        .await;
    tracing::info!("relay stopped");
    Ok(())
}
