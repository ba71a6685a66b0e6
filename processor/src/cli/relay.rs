//! `cmdproc relay`: the outbox relay alone.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::Common;
use crate::http::{self, HttpState};
use crate::metrics::Metrics;
use crate::relay::Relay;

/// Arguments of `relay`.
#[derive(Debug, Args)]
pub struct RelayArgs {
    /// Most outbox rows published per partition per step.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: i64,
    /// Where to serve `/metrics` (Prometheus), `/healthz` and `/readyz` [default:
    /// 127.0.0.1:9464]. An address given here that cannot be bound is an error; when the
    /// default port is taken the relay runs without the endpoint and says so.
    #[arg(long, env = "CMDPROC_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

/// Runs the relay until SIGTERM or Ctrl-C.
pub async fn run(common: &Common, args: RelayArgs) -> anyhow::Result<()> {
    let pool = super::pool(common, 4).await?;
    crate::store::migrate(&pool).await?;
    let listener = http::listen(args.metrics_addr).await?;
    let metrics = Arc::new(Metrics::new());
    let relay = Relay::new(
        pool.clone(),
        &common.brokers,
        common.commands_topic.as_str(),
        args.batch_size,
        None,
    )?
    .with_metrics(metrics.clone());
    let shutdown = CancellationToken::new();
    tokio::spawn(super::run::on_signal(shutdown.clone()));
    let http_stop = CancellationToken::new();
    let http_task = http::spawn(
        listener,
        HttpState {
            metrics: metrics.clone(),
            owned: None,
            pool,
            shutdown: shutdown.clone(),
        },
        http_stop.clone(),
    );
    tracing::info!(topic = %common.commands_topic, "relay started");
    relay
        .run(shutdown, std::time::Duration::from_secs(10))
        .await;
    http_stop.cancel();
    if let Some(task) = http_task {
        let _ = task.await;
    }
    tracing::info!(
        events_published = metrics.events_published.get(),
        dead_letters_published = metrics.dead_letters_published.get(),
        "relay stopped"
    );
    Ok(())
}
