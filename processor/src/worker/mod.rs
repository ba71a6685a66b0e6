//! The worker: joins the consumer group and applies each owned partition's commands in
//! offset order, in micro-batches: one Postgres transaction per poll, covering every
//! partition the poll brought.
//!
//! Ownership is taken in the rebalance callback: for every partition assigned, the worker
//! increments the partition's epoch in Postgres (fencing any earlier owner) and assigns it
//! at the offset stored there, so Kafka's committed offsets are never the source of truth.
//! Every batch re-checks the epoch under a row lock; a stale epoch means another worker
//! owns the partition now, and this worker drops it without committing anything.
//!
//! The worker also checks that the log it consumes is the one its stored positions belong
//! to ([`crate::commands_log`]): a partition whose log changed, or the whole topic when its
//! partition count changed, is halted until an operator accepts the change.
//!
//! # Layout
//! - `mod.rs`: the settings, the run loop, and decoding and grouping a poll.
//! - `ownership.rs`: the one ownership map ([`Owned`]), the rebalance callback, fencing,
//!   taking a partition back and dropping it.
//! - `halts.rs`: the commands-log checks of the loop: the recorded partition count, halts,
//!   screening a poll's first messages, seeks.
//! - `apply.rs`: applying a poll, retrying it, splitting a partition's transactions that
//!   time out, and setting a failing partition aside.
//! - `record.rs`: the metrics (and debug logs) derived from a committed batch.
//! - `lag.rs`: the lag monitor, which also watches the log bounds and partition count.
//! - `naive.rs`: the naive baseline of `cmdproc bench`, kept out of the production path.

mod apply;
mod halts;
mod lag;
mod naive;
mod ownership;
mod record;
mod timers;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use commands::envelope::DeadLetterKind;
use commands::Registry;
use commands::SchemaSet;
use commands::Topic;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use sqlx::PgPool;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::batch::Incoming;
use crate::commands_log::{HaltReason, Halted, SharedLogChecks};
use crate::config::PlanOptions;
use crate::metrics::Metrics;
use crate::store::AggregateCache;

// The policy lives in `config`; kept here at its old path.
pub use crate::config::MisroutedPolicy;
pub use ownership::{Owned, OwnedPartition};

use apply::{SetAside, SplitLimit};
use ownership::WorkerContext;

/// The worker's Kafka consumer, with its rebalance callback.
type Consumer = StreamConsumer<WorkerContext>;

/// Settings of a worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// Consumer group.
    pub group: String,
    /// Commands topic.
    pub commands_topic: Topic,
    /// Events topic.
    pub events_topic: Topic,
    /// Most commands per batch.
    pub batch_size: usize,
    /// Longest wait for a batch to fill.
    pub batch_linger: Duration,
    /// Larger messages are dead-lettered as `too_large`.
    pub max_command_bytes: usize,
    /// Consumer group session timeout.
    pub session_timeout: Duration,
    /// What to do with misrouted commands.
    pub misrouted: MisroutedPolicy,
    /// This worker's name in logs and in the `partitions.owner` column.
    pub owner: String,
    /// How failing handlers are treated.
    pub plan: PlanOptions,
    /// The naive baseline of `cmdproc bench`; set by [`WorkerConfig::naive_baseline`].
    pub naive: bool,
    /// Most aggregates kept in memory between batches (0: none).
    pub aggregate_cache: usize,
    /// How often due timers of the owned partitions are fired.
    pub timer_tick: Duration,
}

impl WorkerConfig {
    /// These settings as the naive baseline of `cmdproc bench`: one command per
    /// transaction, no linger, no aggregate cache, and each offset committed to Kafka
    /// synchronously (see `worker/naive.rs`).
    pub fn naive_baseline(self) -> Self {
        naive::settings(self)
    }
}

/// Why a worker stopped on an error it cannot retry.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The consumer could not be created, or could not subscribe.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// The commands topic's partition count could not be read at start (the topic does
    /// not exist, or the broker did not answer).
    #[error(transparent)]
    PartitionCount(#[from] crate::topics::TopicError),
}

/// How a committed batch's position reaches Kafka, which only mirrors it (the position in
/// Postgres is the truth). Chosen once, when the worker is built.
trait KafkaOffsets: std::fmt::Debug + Send + Sync {
    /// `partition` committed up to `next_offset` in Postgres.
    fn committed(&self, consumer: &Consumer, topic: &str, partition: i32, next_offset: i64);
}

/// The production worker's [`KafkaOffsets`]: the stored position is handed to the
/// consumer's auto-commit, for lag tools; failures do not matter.
#[derive(Debug)]
struct MirrorOffsets;

impl KafkaOffsets for MirrorOffsets {
    fn committed(&self, consumer: &Consumer, topic: &str, partition: i32, next_offset: i64) {
        let _ = consumer.store_offset(topic, partition, next_offset);
    }
}

/// A running worker.
#[derive(Debug)]
pub struct Worker {
    /// The aggregates and schemas this worker applies commands with.
    registry: Arc<Registry>,
    config: WorkerConfig,
    pool: PgPool,
    metrics: Arc<Metrics>,
    relay_wake: Option<Arc<Notify>>,
    /// The partitions this worker owns, with their epochs and stored positions; shared
    /// with the rebalance callback, the lag monitor, the relay and `/readyz`.
    owned: Owned,
    /// Partitions that apply nothing until an operator acts, and why; shared with the
    /// rebalance callback and `/readyz`.
    halted: Halted,
    /// Fingerprint checks and failed seeks of owned partitions; shared with the callback.
    checks: SharedLogChecks,
    /// Partitions whose batch kept failing, set aside (paused) while the others go on, and
    /// tried again from their stored offset with a backoff of their own.
    set_aside: Mutex<HashMap<i32, SetAside>>,
    /// Partitions whose transactions timed out recently, with the size that passed.
    split_limits: Mutex<HashMap<i32, SplitLimit>>,
    /// The dead-letter topic of the commands topic.
    dead_letter_topic: Topic,
    /// Partitions dropped as fenced, and since when: taken back if Kafka still assigns them
    /// here a session timeout later.
    dropped: Mutex<HashMap<i32, Instant>>,
    /// How committed positions reach Kafka.
    offsets: Box<dyn KafkaOffsets>,
}

/// A worker that has stopped taking batches but is still a member of its consumer group, so
/// it still owns its partitions (and a relay may drain their outbox);
/// [`InGroup::leave`] leaves the group.
#[must_use = "dropping it leaves the consumer group at once"]
pub struct InGroup {
    /// `None` when the worker stopped before subscribing.
    consumer: Option<Consumer>,
}

impl std::fmt::Debug for InGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InGroup")
            .field("subscribed", &self.consumer.is_some())
            .finish()
    }
}

impl InGroup {
    /// Leaves the consumer group, so its partitions go to the other workers.
    pub fn leave(self) {
        if let Some(consumer) = self.consumer {
            tracing::info!("worker stopping: leaving the consumer group");
            consumer.unsubscribe();
            drop(consumer);
        }
    }
}

impl Worker {
    /// Shares its halted partitions with `halted` (read by `/readyz`).
    pub fn with_halted(mut self, halted: Halted) -> Self {
        self.halted = halted;
        self
    }

    /// Records into `metrics` (shared with the relay and the HTTP endpoint) instead of a
    /// private registry.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// A worker over `pool`; `relay_wake` is notified after every committed batch, and
    /// `owned` holds the partitions it owns with their epochs and positions (shared with
    /// its relay).
    pub fn new(
        config: WorkerConfig,
        pool: PgPool,
        registry: Arc<Registry>,
        relay_wake: Option<Arc<Notify>>,
        owned: Owned,
    ) -> Self {
        let offsets: Box<dyn KafkaOffsets> = if config.naive {
            Box::new(naive::SyncCommit)
        } else {
            Box::new(MirrorOffsets)
        };
        Self {
            registry,
            owned,
            halted: Halted::default(),
            checks: SharedLogChecks::default(),
            set_aside: Mutex::default(),
            split_limits: Mutex::default(),
            dead_letter_topic: config.commands_topic.dead_letter(),
            dropped: Mutex::default(),
            metrics: Arc::new(Metrics::new()),
            offsets,
            config,
            pool,
            relay_wake,
        }
    }

    /// Consumes and applies commands until `shutdown`; then finishes the batch at hand,
    /// stops its lag monitor and returns still in the group ([`InGroup`]): the caller
    /// drains what must be drained while the partitions are still this worker's, then
    /// leaves.
    ///
    /// # Errors
    ///
    /// When the consumer cannot be created or subscribe, or the topic's partition count
    /// cannot be read at start.
    pub async fn run(self, shutdown: CancellationToken) -> Result<InGroup, WorkerError> {
        let cfg = &self.config;
        let context = WorkerContext {
            pool: self.pool.clone(),
            runtime: tokio::runtime::Handle::current(),
            topic: cfg.commands_topic.to_string(),
            owner: cfg.owner.clone(),
            owned: self.owned.clone(),
            shutdown: shutdown.clone(),
            metrics: self.metrics.clone(),
            halted: self.halted.clone(),
            checks: self.checks.clone(),
        };
        let consumer: Consumer = ClientConfig::new()
            .set("bootstrap.servers", &cfg.brokers)
            .set("group.id", &cfg.group)
            .set("client.id", &cfg.owner)
            .set("enable.auto.commit", "true")
            // Offsets live in Postgres; Kafka's committed offsets only mirror them for lag tools.
            .set("enable.auto.offset.store", "false")
            // Never jump silently: an offset outside the log (a re-created topic, commands
            // deleted by retention) is a consumer error, and the worker halts the partition.
            .set("auto.offset.reset", "error")
            .set("partition.assignment.strategy", "cooperative-sticky")
            // Partitions added to the topic join the group's assignment within this (the
            // default is 5 minutes); the worker halts the topic until the new count is
            // accepted, and then consumes them.
            .set("topic.metadata.refresh.interval.ms", "10000")
            .set(
                "session.timeout.ms",
                cfg.session_timeout.as_millis().to_string(),
            )
            .set(
                "heartbeat.interval.ms",
                (cfg.session_timeout.as_millis() / 4).max(500).to_string(),
            )
            .set("fetch.wait.max.ms", "50")
            .set(
                "max.partition.fetch.bytes",
                (cfg.max_command_bytes.max(1 << 20) * 2).to_string(),
            )
            .create_with_context(context)?;

        let partitions = crate::topics::partition_count(
            consumer.client(),
            cfg.commands_topic.as_str(),
            Duration::from_secs(10),
        )?;
        // Keys are routed by the partition count: the one the first worker found is the
        // topic's, and any other halts the topic before anything is applied.
        let Some(recorded) = self.record_layout(partitions, &shutdown).await else {
            return Ok(InGroup { consumer: None });
        };
        if recorded != partitions {
            self.halt_topic(
                &consumer,
                HaltReason::PartitionCount {
                    recorded,
                    broker: partitions,
                },
            );
        }
        let mut known_partitions = recorded;
        consumer.subscribe(&[cfg.commands_topic.as_str()])?;
        tracing::info!(
            topic = %cfg.commands_topic, group = %cfg.group, owner = %cfg.owner, partitions,
            "worker started"
        );

        // The lag monitor stops with the loop, not with `shutdown`: it keeps reporting while
        // the last batch drains.
        let lag_stop = CancellationToken::new();
        let (log_reports_tx, mut log_reports) = mpsc::channel(4);
        let check_log_now = Arc::new(Notify::new());
        let lag_monitor = tokio::spawn(lag::monitor_lag(
            cfg.brokers.clone(),
            cfg.commands_topic.to_string(),
            self.owned.clone(),
            self.metrics.clone(),
            lag_stop.clone(),
            log_reports_tx,
            check_log_now.clone(),
        ));

        let registry = Arc::clone(&self.registry);
        let schemas = registry.schemas();
        let mut cache = AggregateCache::new(cfg.aggregate_cache);
        let mut last_report = Instant::now();
        // A rewind (`cmdproc replay`) or a database restore changes a partition's epoch
        // without moving it; an idle worker would never run a batch to notice, so it looks.
        let mut epoch_check = tokio::time::interval(Duration::from_secs(1));
        epoch_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Due timers fire on their own tick, so they fire while the topic is idle too.
        let mut timer_tick = tokio::time::interval(cfg.timer_tick.max(Duration::from_millis(10)));
        timer_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending_reported = Instant::now() - timers::PENDING_EVERY;
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = timer_tick.tick() => {
                    if self.fire_timers().await {
                        // More were due than one transaction takes: go on at once.
                        timer_tick.reset_immediately();
                    }
                    self.report_pending_timers(&mut pending_reported).await;
                    continue;
                }
                _ = epoch_check.tick() => {
                    self.retry_set_aside(&consumer);
                    self.retry_seeks(&consumer);
                    self.check_epochs(&consumer).await;
                    continue;
                }
                Some(report) = log_reports.recv() => {
                    self.on_log_report(&consumer, &mut known_partitions, report).await;
                    continue;
                }
                m = consumer.recv() => m,
            };
            let mut batch: Vec<(i32, Incoming)> = Vec::with_capacity(cfg.batch_size);
            // A message misrouted by the known partition count, or on a partition past it,
            // may have been routed by a new count: checked before anything is applied.
            let mut suspect = false;
            let partitions = known_partitions;
            match first {
                Ok(m) => {
                    let (p, incoming) = self.incoming(&m, partitions, schemas);
                    suspect |= routed_elsewhere(p, &incoming, partitions);
                    batch.push((p, incoming));
                }
                Err(e) => {
                    // With `auto.offset.reset=error`, an offset outside the log lands here.
                    tracing::warn!(error = %e, "consumer error; checking the owned partitions' logs");
                    check_log_now.notify_one();
                    continue;
                }
            }
            let deadline = tokio::time::Instant::now() + cfg.batch_linger;
            while batch.len() < cfg.batch_size {
                match tokio::time::timeout_at(deadline, consumer.recv()).await {
                    Ok(Ok(m)) => {
                        let (p, incoming) = self.incoming(&m, partitions, schemas);
                        suspect |= routed_elsewhere(p, &incoming, partitions);
                        batch.push((p, incoming));
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "consumer error; checking the owned partitions' logs");
                        check_log_now.notify_one();
                    }
                    Err(_) => break,
                }
            }
            if suspect
                && self
                    .partition_count_changed(&consumer, &mut known_partitions)
                    .await
            {
                // Nothing of this poll is applied: the topic is halted, or taken again from
                // the stored offsets under the accepted count.
                continue;
            }
            let mut groups = group_by_partition(batch);
            self.screen(&consumer, &mut groups);
            self.apply(&consumer, &registry, &groups, &mut cache, &shutdown)
                .await;
            if last_report.elapsed() > Duration::from_secs(10) {
                last_report = Instant::now();
                record::log_progress(&self.metrics);
            }
        }
        lag_stop.cancel();
        let _ = lag_monitor.await;
        Ok(InGroup {
            consumer: Some(consumer),
        })
    }

    fn incoming(
        &self,
        m: &BorrowedMessage<'_>,
        partitions: i32,
        schemas: &SchemaSet,
    ) -> (i32, Incoming) {
        let incoming = crate::decode::decode_message(
            m,
            partitions,
            self.config.max_command_bytes,
            self.config.misrouted,
            schemas,
        );
        (m.partition(), incoming)
    }
}

/// Whether a message may have been routed by another partition count than `partitions`: it
/// is on a partition past the count, or its key maps elsewhere.
fn routed_elsewhere(partition: i32, incoming: &Incoming, partitions: i32) -> bool {
    partition >= partitions
        || matches!(&incoming.decoded, Err(e) if e.kind == DeadLetterKind::Misrouted)
}

/// Splits a batch by partition, keeping offset order and dropping offsets seen earlier in
/// the batch (a partition reassigned mid-batch is fetched again from its stored offset).
fn group_by_partition(batch: Vec<(i32, Incoming)>) -> Vec<(i32, Vec<Incoming>)> {
    let mut groups: Vec<(i32, Vec<Incoming>)> = Vec::new();
    for (p, m) in batch {
        match groups.iter_mut().find(|(q, _)| *q == p) {
            Some((_, v)) => {
                if v.last().is_none_or(|l| m.offset > l.offset) {
                    v.push(m);
                }
            }
            None => groups.push((p, vec![m])),
        }
    }
    groups
}
