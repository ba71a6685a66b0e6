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
    /// Partitions published at the same time, each in its own Kafka transaction (and
    /// with its own database connection).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub concurrency: u32,
    /// How long the relay waits before looking for outbox rows when no worker has
    /// announced any. Workers started with `--no-relay` announce every commit (Postgres
    /// NOTIFY on `cmdproc_outbox`), so this is only a safety net.
    #[arg(long, default_value = "1s", value_parser = super::parse_duration)]
    pub poll_interval: std::time::Duration,
    /// Where to serve `/metrics` (Prometheus), `/healthz` and `/readyz` [default:
    /// 127.0.0.1:9464]. An address given here that cannot be bound is an error; when the
    /// default port is taken the relay runs without the endpoint and says so.
    #[arg(long, env = "CMDPROC_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Largest message (key, value and headers) published whole. A larger outbox row (a
    /// dead letter of an oversized command, a huge event) is published with its value
    /// replaced by a small JSON reference (the dead letter's `dead_letters` row, or the
    /// event without its `data`) and the header `cmdproc-payload-omitted: too_large`; so is
    /// a row the broker refuses as too large. Postgres keeps the row whole.
    #[arg(long, default_value_t = crate::relay::DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
}

/// Runs the relay until SIGTERM or Ctrl-C.
pub async fn run(common: &Common, args: RelayArgs) -> anyhow::Result<()> {
    // One connection per concurrent partition, one for the backlog query, one to listen.
    let pool = super::pool(common, args.concurrency + 2).await?;
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
    .with_metrics(metrics.clone())
    .with_concurrency(args.concurrency as usize)
    .with_poll_interval(args.poll_interval)
    .with_max_message_bytes(args.max_message_bytes)
    .with_destinations(&[common.events_topic.as_str()]);
    let shutdown = CancellationToken::new();
    // Listening before the first pass: a commit before it is found by that pass, a commit
    // after it is announced.
    let notifications = crate::relay::wake_on_notify(
        &pool,
        common.commands_topic.as_str(),
        relay.waker(),
        shutdown.clone(),
    )
    .await?;
    tokio::spawn(super::run::on_signal(shutdown.clone()));
    let http_stop = CancellationToken::new();
    let http_task = http::spawn(
        listener,
        HttpState {
            metrics: metrics.clone(),
            owned: None,
            halted: None,
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
    let _ = notifications.await;
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
