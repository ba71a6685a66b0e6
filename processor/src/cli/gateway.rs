//! `cmdproc gateway`: the HTTP front door (see [`crate::gateway`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use commands::{Registry, Source, Topic};
use tokio_util::sync::CancellationToken;

use super::{parse_duration, Common};
use crate::gateway::{Gateway, Settings};

/// Arguments of `gateway`.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Routes:
  POST /commands                 a CloudEvent, or {\"type\", \"subject\", \"data\"} with an
                                 Idempotency-Key header (the command id) and optionally a
                                 Command-Source header; answers 200 applied, 409 rejected or
                                 key reused, 422 invalid, 413 too large, 202 + Location when
                                 no reply came within --deadline
  GET  /commands/{source}/{id}   the recorded outcome (source percent-encoded), 404 unknown
  GET  /openapi.json             the OpenAPI 3.1 document (docs/openapi.json)
  GET  /healthz, /readyz, /metrics

The reply topic must exist: `cmdproc topics create` creates <commands-topic>.replies.")]
pub struct GatewayArgs {
    /// Where to serve HTTP.
    #[arg(long, env = "CMDPROC_GATEWAY_LISTEN", default_value = crate::gateway::DEFAULT_ADDR)]
    pub listen: SocketAddr,
    /// The topic replies are asked on and read from (default: `<commands-topic>.replies`).
    /// Every gateway reads all of it and keeps the replies to its own requests.
    #[arg(long, env = "CMDPROC_REPLY_TOPIC")]
    pub reply_topic: Option<Topic>,
    /// The source of commands whose request names none (no Command-Source header, no
    /// CloudEvent source).
    #[arg(long, env = "CMDPROC_GATEWAY_SOURCE", default_value = "/cmdproc-gateway", value_parser = parse_source)]
    pub default_source: Source,
    /// How long a request waits for its reply before it gets 202 with a Location to poll.
    #[arg(long, env = "CMDPROC_GATEWAY_DEADLINE", default_value = "5s", value_parser = parse_duration)]
    pub deadline: Duration,
    /// Larger request bodies get 413.
    #[arg(long, env = "CMDPROC_GATEWAY_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Database connections (for GET /commands/{source}/{id} and /readyz).
    #[arg(long, default_value_t = 4)]
    pub db_connections: u32,
}

fn parse_source(s: &str) -> Result<Source, String> {
    Source::parse(s).map_err(|e| e.to_string())
}

/// Serves until SIGTERM or Ctrl-C, then answers the requests in flight and exits.
pub async fn run(
    common: &Common,
    registry: Arc<Registry>,
    args: GatewayArgs,
) -> anyhow::Result<()> {
    let reply_topic = args
        .reply_topic
        .unwrap_or_else(|| common.commands_topic.replies());
    let timeout = common.connect_timeout;
    let brokers = common.brokers.clone();
    tokio::task::spawn_blocking(move || crate::topics::check_reachable(&brokers, timeout))
        .await
        .context("checking the broker")??;
    let pool = crate::store::connect(&common.database_url, args.db_connections, timeout).await?;
    let listener = crate::gateway::listen(args.listen).await?;
    let shutdown = CancellationToken::new();
    let settings = Settings {
        brokers: common.brokers.clone(),
        commands_topic: common.commands_topic.clone(),
        reply_topic: reply_topic.clone(),
        default_source: args.default_source,
        deadline: args.deadline,
        max_body_bytes: args.max_body_bytes,
    };
    let gateway = Gateway::start(registry, pool, settings, shutdown.clone()).await?;
    tokio::spawn(super::run::on_signal(shutdown.clone()));
    tracing::info!(
        addr = %listener.local_addr().unwrap_or(args.listen),
        commands = %common.commands_topic,
        replies = %reply_topic,
        "serving the command gateway"
    );
    crate::gateway::serve(listener, gateway, shutdown)
        .await
        .context("serving HTTP")?;
    tracing::info!("gateway stopped");
    Ok(())
}
