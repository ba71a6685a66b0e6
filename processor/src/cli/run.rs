//! `cmdproc run`: a worker with the outbox relay inside.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use commands::Registry;
use tokio_util::sync::CancellationToken;

use super::{parse_duration, Common};
use crate::config::{MisroutedPolicy, PoisonPolicy};
use crate::engine::{Options, Processor};

/// `--misrouted`: [`MisroutedPolicy`] on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Misrouted {
    /// Dead-letter it: it breaks the single-writer guarantee.
    DeadLetter,
    /// Apply it anyway (only for topics whose producers use another partitioner knowingly).
    Accept,
}

impl From<Misrouted> for MisroutedPolicy {
    fn from(value: Misrouted) -> Self {
        match value {
            Misrouted::DeadLetter => Self::DeadLetter,
            Misrouted::Accept => Self::Accept,
        }
    }
}

/// `--on-poison`: [`PoisonPolicy`] on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnPoison {
    /// Park the aggregate: set aside this command and every later one for the aggregate,
    /// in order, while other aggregates go on.
    Park,
    /// Dead-letter only this command and apply the aggregate's later commands. This breaks
    /// the aggregate's order; choose it only when commands are independent.
    DeadLetter,
    /// Stop the partition at this command until an operator intervenes.
    Halt,
}

impl From<OnPoison> for PoisonPolicy {
    fn from(value: OnPoison) -> Self {
        match value {
            OnPoison::Park => Self::Park,
            OnPoison::DeadLetter => Self::DeadLetter,
            OnPoison::Halt => Self::Halt,
        }
    }
}

/// Arguments of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Most commands applied in one transaction.
    #[arg(long, env = "CMDPROC_BATCH_SIZE", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,
    /// Longest wait for a batch to fill before it is applied.
    #[arg(long, env = "CMDPROC_BATCH_LINGER", default_value = "5ms", value_parser = parse_duration)]
    pub batch_linger: Duration,
    /// Larger messages are dead-lettered as `too_large`.
    #[arg(long, env = "CMDPROC_MAX_COMMAND_BYTES", default_value_t = 256 * 1024)]
    pub max_command_bytes: usize,
    /// Consumer group session timeout: how long a silent worker keeps its partitions.
    #[arg(long, env = "CMDPROC_SESSION_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub session_timeout: Duration,
    /// What to do with a command on a partition its key does not map to.
    #[arg(long, value_enum, default_value_t = Misrouted::DeadLetter)]
    pub misrouted: Misrouted,
    /// What to do with a command whose handler keeps panicking: park its aggregate (set it
    /// and the aggregate's later commands aside, in order), dead-letter only it, or halt the
    /// partition.
    #[arg(long, env = "CMDPROC_ON_POISON", value_enum, default_value_t = OnPoison::Park)]
    pub on_poison: OnPoison,
    /// How many times a panicking handler is tried before its command counts as poison.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub poison_attempts: u32,
    /// Do not run the outbox relay in this process (run `cmdproc relay` elsewhere); the
    /// worker then announces each commit to it (Postgres NOTIFY on `cmdproc_outbox`).
    #[arg(long)]
    pub no_relay: bool,
    /// How long processed commands' outcomes are kept. A command delivered again later than
    /// this has no second effect if it was applied (its stored events identify it), but one
    /// that was rejected is evaluated again. `cmdproc replay` refuses, without --force, to
    /// reach back past the horizon the workers pruned.
    #[arg(long, env = "CMDPROC_DEDUPE_WINDOW", default_value = "7d", value_parser = parse_duration)]
    pub dedupe_window: Duration,
    /// How often to forget outcomes past the dedupe window and published outbox rows.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub prune_every: Duration,
    /// On SIGTERM, how long to drain in-flight work before exiting.
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Database connections of this worker.
    #[arg(long, default_value_t = 8)]
    pub db_connections: u32,
    /// Name of this worker in logs and in the database [default: host, pid and a short
    /// random suffix, so that two containers both running as pid 1 differ].
    #[arg(long)]
    pub name: Option<String>,
    /// Where to serve `/metrics` (Prometheus), `/healthz` and `/readyz` [default:
    /// 127.0.0.1:9464]. An address given here that cannot be bound is an error; when the
    /// default port is taken (several workers on one host) the worker runs without the
    /// endpoint and says so.
    #[arg(long, env = "CMDPROC_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Most aggregates kept in memory between batches, so a batch reads from Postgres only
    /// those it has not seen (writes stay version-checked). 0 turns the cache off.
    #[arg(long, env = "CMDPROC_AGGREGATE_CACHE", default_value_t = 100_000)]
    pub aggregate_cache: usize,
    /// How often the worker fires the due timers of the partitions it owns (a timer fires
    /// at most this much, plus one batch, after it is due).
    #[arg(long, env = "CMDPROC_TIMER_TICK", default_value = "200ms", value_parser = parse_duration)]
    pub timer_tick: Duration,
    /// Benchmark baseline, not for production: apply every command in a transaction of its
    /// own (batch size 1, no linger, no aggregate cache) and commit its Kafka offset
    /// synchronously, the way a hand-rolled consumer would. `cmdproc bench` compares
    /// against it.
    #[arg(long)]
    pub naive_baseline: bool,
}

/// Runs until SIGTERM or Ctrl-C, then drains within the shutdown timeout.
pub async fn run(common: &Common, registry: Arc<Registry>, args: RunArgs) -> anyhow::Result<()> {
    let options = Options {
        batch_size: args.batch_size as usize,
        batch_linger: args.batch_linger,
        max_command_bytes: args.max_command_bytes,
        session_timeout: args.session_timeout,
        misrouted: args.misrouted.into(),
        poison: args.on_poison.into(),
        poison_attempts: args.poison_attempts,
        relay: !args.no_relay,
        dedupe_window: args.dedupe_window,
        prune_every: args.prune_every,
        shutdown_timeout: args.shutdown_timeout,
        db_connections: args.db_connections,
        name: args.name.clone(),
        metrics_addr: args.metrics_addr,
        aggregate_cache: args.aggregate_cache,
        timer_tick: args.timer_tick,
        naive_baseline: args.naive_baseline,
        connect_timeout: common.connect_timeout,
    };
    let processor = Processor::builder(registry)
        .database_url(&common.database_url)
        .brokers(&common.brokers)
        .group(&common.group)
        .commands_topic(common.commands_topic.clone())
        .events_topic(common.events_topic.clone())
        .options(options)
        .build()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(shutdown.clone()));
    Ok(processor.run(shutdown).await?)
}

/// The default worker name: `<hostname>-<pid>-<6 random hex digits>`. Host and pid alone
/// collide in containers (every container's worker is pid 1, and hostnames can repeat),
/// which would make fencing logs and `partitions.owner` name two workers as one.
pub fn default_worker_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "cmdproc".to_owned());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &suffix[..6])
}

/// Cancels `token` on SIGTERM or Ctrl-C.
pub async fn on_signal(token: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
    token.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_worker_names_differ_within_one_process() {
        let (a, b) = (default_worker_name(), default_worker_name());
        assert_ne!(
            a, b,
            "two workers with the same host and pid get different names"
        );
        let pid = format!("-{}-", std::process::id());
        assert!(a.contains(&pid), "{a} names the pid");
        let suffix = a.rsplit('-').next().unwrap();
        assert_eq!(suffix.len(), 6, "{a} ends with a short random suffix");
        assert!(!a.starts_with('-'), "{a} names the host");
    }
}
