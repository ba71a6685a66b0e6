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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use commands::envelope::DeadLetterKind;
use commands::Registry;
use commands::SchemaSet;
use commands::Topic;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::batch::{Incoming, PlanOptions};
use crate::commands_log::{self, FirstMessage, HaltReason, Halted, SharedLogChecks};
use crate::metrics::{outcome, Metrics};
use crate::retry::Backoff;
use crate::store::{self, AggregateCache, BatchTarget, PartitionBatch, StoreError};

/// What to do with a command found on a partition its key does not map to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MisroutedPolicy {
    /// Dead-letter it: it breaks the single-writer guarantee.
    DeadLetter,
    /// Apply it anyway (only for topics whose producers use another partitioner knowingly).
    Accept,
}

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
    /// The naive baseline of `cmdproc bench`: no aggregate cache, and each batch's Kafka
    /// offset committed synchronously (with batch size 1: per message).
    pub naive: bool,
    /// Most aggregates kept in memory between batches (0: none).
    pub aggregate_cache: usize,
}

/// Shared state of a worker and its rebalance callback.
struct WorkerContext {
    pool: PgPool,
    runtime: tokio::runtime::Handle,
    topic: String,
    owner: String,
    owned: Arc<Mutex<HashMap<i32, i64>>>,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    positions: Positions,
    halted: Halted,
    checks: SharedLogChecks,
}

/// The stored next offset of each owned partition, as this worker last read or wrote it:
/// at acquisition, then after each of its commits. Only the epoch holder moves a partition's
/// offset, so while the worker owns a partition this is the value in Postgres.
type Positions = Arc<Mutex<HashMap<i32, i64>>>;

impl ClientContext for WorkerContext {}

impl ConsumerContext for WorkerContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        self.metrics.rebalances.inc();
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut assign = TopicPartitionList::new();
                for elem in tpl.elements() {
                    let partition = elem.partition();
                    let Some(acquired) = self.acquire(partition) else {
                        continue;
                    };
                    tracing::info!(
                        partition,
                        epoch = acquired.epoch,
                        offset = acquired.next_offset,
                        "partition assigned"
                    );
                    let start = note_acquired(
                        &self.owned,
                        &self.positions,
                        &self.checks,
                        partition,
                        &acquired,
                    );
                    let _ =
                        assign.add_partition_offset(elem.topic(), partition, Offset::Offset(start));
                }
                let result = if cooperative {
                    consumer.incremental_assign(&assign)
                } else {
                    consumer.assign(&assign)
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, "assigning partitions failed");
                }
                // A partition fenced earlier was paused; owning it again means consuming again.
                let _ = consumer.resume(&assign);
                // Unless the whole topic is halted: then so is every partition it gets.
                let mut halted = self.halted.lock().expect("halted set");
                if let Some(reason) = halted.topic().cloned() {
                    for elem in assign.elements() {
                        halted.insert(elem.partition(), reason.clone());
                    }
                    let _ = consumer.pause(&assign);
                }
                halted.publish(&self.metrics);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let lost = consumer.assignment_lost();
                {
                    let mut owned = self.owned.lock().expect("owned map");
                    let mut positions = self.positions.lock().expect("positions");
                    let mut checks = self.checks.lock().expect("log checks");
                    let mut halted = self.halted.lock().expect("halted set");
                    for elem in tpl.elements() {
                        owned.remove(&elem.partition());
                        positions.remove(&elem.partition());
                        forget_lag(&self.metrics, elem.partition());
                        checks.forget(elem.partition());
                        // Whoever owns it next checks its log again.
                        halted.lift_if(elem.partition(), |r| {
                            !matches!(r, HaltReason::Poison { .. })
                        });
                        tracing::info!(partition = elem.partition(), lost, "partition revoked");
                    }
                    halted.publish(&self.metrics);
                }
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "unassigning partitions failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance failed; dropping every partition");
                self.owned.lock().expect("owned map").clear();
                for (p, _) in self.positions.lock().expect("positions").drain() {
                    forget_lag(&self.metrics, p);
                    self.checks.lock().expect("log checks").forget(p);
                }
                let _ = consumer.unassign();
            }
        }
    }
}

impl WorkerContext {
    /// Takes a partition in Postgres, retrying while the database is unavailable. Runs
    /// inside the rebalance callback, which is synchronous, hence the blocking bridge.
    fn acquire(&self, partition: i32) -> Option<store::Acquired> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let result = tokio::task::block_in_place(|| {
                self.runtime.block_on(store::acquire_partition(
                    &self.pool,
                    &self.topic,
                    partition,
                    &self.owner,
                ))
            });
            match result {
                Ok(a) => return Some(a),
                Err(e) => {
                    if self.shutdown.is_cancelled() {
                        return None;
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(partition, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot take partition; retrying");
                    std::thread::sleep(delay);
                }
            }
        }
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
    positions: Positions,
    relay_wake: Option<Arc<Notify>>,
    owned: crate::relay::Owned,
    relay: Option<RelayHandle>,
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
}

/// How many times a poll whose transaction hit a version conflict is retried whole before
/// its partitions are applied one transaction each.
const WHOLE_CONFLICT_RETRIES: u32 = 3;
/// First and longest wait before a partition set aside is tried again.
const SET_ASIDE_FIRST_RETRY: Duration = Duration::from_secs(1);
const SET_ASIDE_LONGEST_RETRY: Duration = Duration::from_secs(60);

/// After how many transactions of a remembered split size passed the size doubles.
const SPLIT_GROWS_AFTER: u32 = 8;

/// The transaction size that passed for a partition whose transactions timed out.
#[derive(Debug, Clone, Copy)]
struct SplitLimit {
    /// Most commands per transaction.
    per_transaction: usize,
    /// Transactions of that size that passed since it was set.
    passed: u32,
}

/// A partition set aside after its batch kept failing.
#[derive(Debug)]
struct SetAside {
    /// When to try it again; `None` while it is being tried.
    retry_at: Option<Instant>,
    /// Grows with every failed try; the entry goes once the partition commits again.
    backoff: Backoff,
}

/// The relay running beside a worker: stopped and drained after the worker's last batch and
/// before it leaves the group, while it still owns the partitions whose outbox it drains.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    /// Cancelling it starts the relay's drain.
    pub stop: CancellationToken,
    /// The relay's task.
    pub tasks: tokio_util::task::TaskTracker,
    /// Longest wait for the drain.
    pub deadline: Duration,
}

impl Worker {
    /// Drains `relay` on shutdown before leaving the group.
    pub fn with_relay(mut self, relay: RelayHandle) -> Self {
        self.relay = Some(relay);
        self
    }

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
    /// `owned` holds the partitions it owns with their epochs (shared with its relay).
    pub fn new(
        config: WorkerConfig,
        pool: PgPool,
        registry: Arc<Registry>,
        relay_wake: Option<Arc<Notify>>,
        owned: crate::relay::Owned,
    ) -> Self {
        Self {
            registry,
            owned,
            relay: None,
            halted: Halted::default(),
            checks: SharedLogChecks::default(),
            set_aside: Mutex::default(),
            split_limits: Mutex::default(),
            dead_letter_topic: config.commands_topic.dead_letter(),
            dropped: Mutex::default(),
            metrics: Arc::new(Metrics::new()),
            positions: Positions::default(),
            config,
            pool,
            relay_wake,
        }
    }

    /// Consumes and applies commands until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let cfg = &self.config;
        let owned = self.owned.clone();
        let context = WorkerContext {
            pool: self.pool.clone(),
            runtime: tokio::runtime::Handle::current(),
            topic: cfg.commands_topic.to_string(),
            owner: cfg.owner.clone(),
            owned: owned.clone(),
            shutdown: shutdown.clone(),
            metrics: self.metrics.clone(),
            positions: self.positions.clone(),
            halted: self.halted.clone(),
            checks: self.checks.clone(),
        };
        let consumer: StreamConsumer<WorkerContext> = ClientConfig::new()
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
            return Ok(());
        };
        if recorded != partitions {
            self.halt_topic(
                &consumer,
                &owned,
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
        let lag_monitor = tokio::spawn(monitor_lag(
            cfg.brokers.clone(),
            cfg.commands_topic.to_string(),
            self.positions.clone(),
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
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = epoch_check.tick() => {
                    self.retry_set_aside(&consumer, &owned);
                    self.retry_seeks(&consumer, &owned);
                    self.check_epochs(&consumer, &owned).await;
                    continue;
                }
                Some(report) = log_reports.recv() => {
                    self.on_log_report(&consumer, &owned, &mut known_partitions, report).await;
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
                    .partition_count_changed(&consumer, &owned, &mut known_partitions)
                    .await
            {
                // Nothing of this poll is applied: the topic is halted, or taken again from
                // the stored offsets under the accepted count.
                continue;
            }
            let mut groups = group_by_partition(batch);
            self.screen(&consumer, &mut groups);
            self.apply(&consumer, &owned, &registry, &groups, &mut cache, &shutdown)
                .await;
            if last_report.elapsed() > Duration::from_secs(10) {
                last_report = Instant::now();
                let m = &self.metrics;
                tracing::info!(
                    applied = m.commands_with(outcome::APPLIED),
                    rejected = m.commands_with(outcome::REJECTED),
                    duplicates = m.commands_with(outcome::DUPLICATE),
                    dead_letters = m.commands_with(outcome::DEAD_LETTERED),
                    parked = m.commands_with(outcome::PARKED),
                    fenced = m.fenced_batches.get(),
                    conflicts = m.version_conflicts.get(),
                    "progress"
                );
            }
        }
        lag_stop.cancel();
        let _ = lag_monitor.await;
        if let Some(relay) = &self.relay {
            tracing::info!("worker stopping: draining the relay");
            relay.stop.cancel();
            relay.tasks.close();
            if tokio::time::timeout(relay.deadline, relay.tasks.wait())
                .await
                .is_err()
            {
                tracing::warn!("relay did not drain within the shutdown timeout");
            }
        }
        tracing::info!("worker stopping: leaving the consumer group");
        consumer.unsubscribe();
        drop(consumer);
        Ok(())
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

    /// Applies one poll's messages, grouped by partition, in one transaction, and handles
    /// each partition found fenced or moved on its own. While the database is unavailable
    /// the whole poll is retried with backoff; a conflict is retried whole a few times. Any
    /// other failure (a statement timeout, a persistent conflict, a database error) must not
    /// hold back the partitions that are fine: each partition is then applied in a
    /// transaction of its own ([`Worker::apply_partition`]).
    #[tracing::instrument(skip_all, fields(
        partitions = groups.len(),
        messages = groups.iter().map(|(_, m)| m.len()).sum::<usize>(),
    ))]
    async fn apply(
        &self,
        consumer: &StreamConsumer<WorkerContext>,
        owned: &Mutex<HashMap<i32, i64>>,
        registry: &Registry,
        groups: &[(i32, Vec<Incoming>)],
        cache: &mut AggregateCache,
        shutdown: &CancellationToken,
    ) {
        let cfg = &self.config;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut conflict_backoff = Backoff::new(Duration::from_millis(5), Duration::from_secs(1));
        for (partition, messages) in groups {
            trace_commands(*partition, messages);
        }
        // A partition whose transactions timed out recently is applied in transactions no
        // larger than those that passed, rather than timing out whole again first.
        let limited: HashMap<i32, usize> = {
            let limits = self.split_limits.lock().expect("split limits");
            if limits.is_empty() {
                HashMap::new()
            } else {
                groups
                    .iter()
                    .filter_map(|(p, _)| limits.get(p).map(|l| (*p, l.per_transaction)))
                    .collect()
            }
        };
        for (partition, messages) in groups {
            if let Some(limit) = limited.get(partition) {
                self.apply_partition(
                    consumer, owned, registry, *partition, messages, cache, shutdown, None, *limit,
                )
                .await;
            }
        }
        loop {
            {
                let owned = owned.lock().expect("owned map");
                cache.retain(|p| owned.contains_key(&p));
            }
            let batches: Vec<PartitionBatch<'_>> = groups
                .iter()
                .filter(|(partition, _)| !limited.contains_key(partition))
                .filter_map(|(partition, messages)| {
                    self.partition_batch(owned, *partition, messages)
                })
                .collect();
            if batches.is_empty() {
                return;
            }
            let started = Instant::now();
            let batch_cache = (!cfg.naive).then_some(&mut *cache);
            let result =
                store::process_batches(&self.pool, &batches, registry, &cfg.plan, batch_cache)
                    .await;
            let elapsed = started.elapsed();
            match result {
                Ok(results) => {
                    let slices: Vec<(i32, &[Incoming])> =
                        groups.iter().map(|(p, m)| (*p, m.as_slice())).collect();
                    self.batch_done(consumer, owned, registry, &slices, results, elapsed)
                        .await;
                    return;
                }
                Err(StoreError::Unavailable(e)) => {
                    self.metrics.db_retries.inc();
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, attempt = backoff.attempts, retry_in_ms = delay.as_millis() as u64, "batch failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(StoreError::Conflict(reason))
                    if conflict_backoff.attempts < WHOLE_CONFLICT_RETRIES =>
                {
                    // Another writer existed (or a concurrent duplicate on another
                    // partition): reload and retry, soon but not in a tight loop, since a
                    // conflict that keeps coming back must not burn the CPU or block shutdown.
                    self.metrics.version_conflicts.inc();
                    let delay = conflict_backoff.next_delay();
                    tracing::warn!(
                        %reason,
                        attempt = conflict_backoff.attempts,
                        "version conflict; reloading and retrying the batch"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => {
                    if matches!(e, StoreError::Conflict(_)) {
                        self.metrics.version_conflicts.inc();
                    }
                    let alone = batches.len() == 1;
                    tracing::warn!(
                        error = %e,
                        partitions = batches.len(),
                        "batch failed; applying its partitions one transaction each"
                    );
                    drop(batches);
                    for (partition, messages) in groups {
                        if shutdown.is_cancelled() {
                            return;
                        }
                        if limited.contains_key(partition) {
                            continue;
                        }
                        // With one partition in the poll, the attempt that failed was
                        // already its own transaction.
                        let failed = alone.then_some(&e);
                        self.apply_partition(
                            consumer,
                            owned,
                            registry,
                            *partition,
                            messages,
                            cache,
                            shutdown,
                            failed,
                            messages.len(),
                        )
                        .await;
                    }
                    return;
                }
            }
        }
    }

    /// The batch of one partition's `messages`, or `None` when this worker does not own the
    /// partition, or has halted or set it aside.
    fn partition_batch<'m>(
        &'m self,
        owned: &Mutex<HashMap<i32, i64>>,
        partition: i32,
        messages: &'m [Incoming],
    ) -> Option<PartitionBatch<'m>> {
        let cfg = &self.config;
        if self.halted.lock().expect("halted set").contains(&partition)
            || self.is_set_aside(partition)
        {
            return None;
        }
        let Some(epoch) = owned.lock().expect("owned map").get(&partition).copied() else {
            tracing::debug!(
                partition,
                "skipping messages of a partition this worker does not own"
            );
            return None;
        };
        Some(PartitionBatch {
            target: BatchTarget {
                topic: cfg.commands_topic.as_str(),
                dead_letter_topic: self.dead_letter_topic.as_str(),
                events_topic: cfg.events_topic.as_str(),
                partition,
                epoch,
                expected_next: self
                    .positions
                    .lock()
                    .expect("positions")
                    .get(&partition)
                    .copied(),
            },
            messages,
        })
    }

    /// Applies one partition's messages of a poll in transactions of its own, at most
    /// `per_transaction` commands each, after the poll failed as a whole (`failed` is that
    /// failure when the poll held only this partition) or because the partition's
    /// transactions timed out recently. A transaction that times out is split: half the
    /// commands per transaction, then half again, down to one command; the size that passes
    /// is remembered for the partition's next polls and doubled again after
    /// [`SPLIT_GROWS_AFTER`] transactions pass. A partition that still fails (a single
    /// command timing out, a persistent conflict, any other database error) is set aside
    /// ([`Worker::set_aside`]) and tried again later, while the others go on. Only an
    /// unavailable database is waited for, as always.
    #[allow(clippy::too_many_arguments)]
    async fn apply_partition(
        &self,
        consumer: &StreamConsumer<WorkerContext>,
        owned: &Mutex<HashMap<i32, i64>>,
        registry: &Registry,
        partition: i32,
        messages: &[Incoming],
        cache: &mut AggregateCache,
        shutdown: &CancellationToken,
        failed: Option<&StoreError>,
        per_transaction: usize,
    ) {
        let cfg = &self.config;
        let mut per_transaction = per_transaction.clamp(1, messages.len().max(1));
        match failed {
            Some(StoreError::Timeout(_)) if messages.len() > 1 => {
                per_transaction = messages.len() / 2;
                self.log_split(partition, messages, per_transaction);
            }
            Some(e) => {
                self.set_aside(consumer, partition, e);
                return;
            }
            None => {}
        }
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut conflicts = 0;
        let mut start = 0;
        while start < messages.len() {
            let end = (start + per_transaction).min(messages.len());
            let Some(batch) = self.partition_batch(owned, partition, &messages[start..end]) else {
                return;
            };
            let started = Instant::now();
            let batch_cache = (!cfg.naive).then_some(&mut *cache);
            let result = store::process_batches(
                &self.pool,
                std::slice::from_ref(&batch),
                registry,
                &cfg.plan,
                batch_cache,
            )
            .await;
            let elapsed = started.elapsed();
            match result {
                Ok(results) => {
                    // A partition fenced, moved or halted meanwhile is handled by
                    // `partition_done`; its remaining messages are not this worker's to apply.
                    let go_on = results
                        .iter()
                        .all(|(_, r)| matches!(r, Ok(b) if b.halted_at.is_none()));
                    let slices = [(partition, &messages[start..end])];
                    self.batch_done(consumer, owned, registry, &slices, results, elapsed)
                        .await;
                    if !go_on {
                        return;
                    }
                    self.split_passed(partition);
                    start = end;
                    backoff.reset();
                    conflicts = 0;
                }
                Err(StoreError::Unavailable(e)) => {
                    self.metrics.db_retries.inc();
                    let delay = backoff.next_delay();
                    tracing::warn!(partition, error = %e, attempt = backoff.attempts, retry_in_ms = delay.as_millis() as u64, "batch failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(StoreError::Timeout(_)) if end - start > 1 => {
                    per_transaction = (end - start) / 2;
                    self.log_split(partition, &messages[start..], per_transaction);
                }

                Err(StoreError::Conflict(reason)) if conflicts < WHOLE_CONFLICT_RETRIES => {
                    self.metrics.version_conflicts.inc();
                    conflicts += 1;
                    tracing::warn!(partition, %reason, attempt = conflicts, "version conflict; reloading and retrying the partition's batch");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(10 << conflicts)) => {}
                    }
                }
                Err(e) => {
                    self.set_aside(consumer, partition, &e);
                    return;
                }
            }
        }
    }

    fn log_split(&self, partition: i32, messages: &[Incoming], per_transaction: usize) {
        self.split_limits.lock().expect("split limits").insert(
            partition,
            SplitLimit {
                per_transaction,
                passed: 0,
            },
        );
        tracing::warn!(
            partition,
            first_offset = messages.first().map(|m| m.offset),
            commands = messages.len(),
            per_transaction,
            "batch timed out (statement timeout); splitting it into smaller transactions"
        );
    }

    /// Counts a transaction that passed for a partition with a
    /// remembered split size; after [`SPLIT_GROWS_AFTER`] of them the size doubles, and once
    /// it reaches the batch size the partition is applied with the others again.
    fn split_passed(&self, partition: i32) {
        let mut limits = self.split_limits.lock().expect("split limits");
        if limits.is_empty() {
            return;
        }
        let Some(limit) = limits.get_mut(&partition) else {
            return;
        };
        limit.passed += 1;
        if limit.passed >= SPLIT_GROWS_AFTER {
            limit.per_transaction *= 2;
            limit.passed = 0;
            if limit.per_transaction >= self.config.batch_size {
                limits.remove(&partition);
            }
        }
    }

    /// Feeds the metrics and handles each partition's result of a committed transaction
    /// (`slices` are the messages it carried, per partition), then wakes the relay.
    async fn batch_done(
        &self,
        consumer: &StreamConsumer<WorkerContext>,
        owned: &Mutex<HashMap<i32, i64>>,
        registry: &Registry,
        slices: &[(i32, &[Incoming])],
        results: Vec<(i32, store::Result<store::BatchResult>)>,
        elapsed: Duration,
    ) {
        let cfg = &self.config;
        // One transaction, however many partitions it carried.
        let messages: usize = results
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .map(|r| r.messages)
            .sum();
        if messages > 0 {
            let m = &self.metrics;
            m.batches.inc();
            m.batch_size.observe(messages as f64);
            m.batch_apply_seconds.observe(elapsed.as_secs_f64());
        }
        let mut committed = false;
        for (partition, result) in results {
            if let Ok(r) = &result {
                self.clear_set_aside(partition, r.next_offset);
            }
            let messages = slices
                .iter()
                .find(|(p, _)| *p == partition)
                .map(|(_, m)| *m)
                .unwrap_or_default();
            committed |= self
                .partition_done(consumer, owned, registry, partition, messages, result)
                .await;
        }
        if committed {
            match &self.relay_wake {
                Some(w) => w.notify_one(),
                // Off the batch loop: the next batch need not wait for it.
                None => {
                    let (pool, topic) = (self.pool.clone(), cfg.commands_topic.to_string());
                    tokio::spawn(async move { crate::relay::notify(&pool, &topic).await });
                }
            }
        }
    }

    /// Whether `partition` is set aside and waiting for its next try.
    fn is_set_aside(&self, partition: i32) -> bool {
        let set_aside = self.set_aside.lock().expect("set-aside partitions");
        !set_aside.is_empty()
            && set_aside
                .get(&partition)
                .is_some_and(|s| s.retry_at.is_some())
    }

    /// Forgets that `partition` was set aside: it committed again.
    fn clear_set_aside(&self, partition: i32, next_offset: i64) {
        let mut set_aside = self.set_aside.lock().expect("set-aside partitions");
        if !set_aside.is_empty() && set_aside.remove(&partition).is_some() {
            tracing::info!(
                partition,
                next_offset,
                "partition set aside earlier commits again"
            );
        }
    }

    /// Sets a partition whose batch keeps failing aside: pauses it, drops its messages of
    /// this poll (they are consumed again from the stored offset), and schedules a retry
    /// with a per-partition backoff, so the worker's other partitions go on meanwhile.
    fn set_aside(
        &self,
        consumer: &StreamConsumer<WorkerContext>,
        partition: i32,
        error: &StoreError,
    ) {
        let delay = {
            let mut set_aside = self.set_aside.lock().expect("set-aside partitions");
            let entry = set_aside.entry(partition).or_insert_with(|| SetAside {
                retry_at: None,
                backoff: Backoff::new(SET_ASIDE_FIRST_RETRY, SET_ASIDE_LONGEST_RETRY),
            });
            let delay = entry.backoff.next_delay();
            entry.retry_at = Some(Instant::now() + delay);
            (delay, entry.backoff.attempts)
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(self.config.commands_topic.as_str(), partition);
        let _ = consumer.pause(&tpl);
        self.metrics.partitions_set_aside.inc();
        tracing::error!(
            partition,
            error = %error,
            attempt = delay.1,
            retry_in_ms = delay.0.as_millis() as u64,
            "a batch of this partition keeps failing: partition set aside (paused, tried again \
             later from its stored offset) while the other partitions go on"
        );
    }

    /// Tries the set-aside partitions whose time has come again: seeks each back to its
    /// stored offset and resumes it. Partitions no longer owned are forgotten.
    fn retry_set_aside(
        &self,
        consumer: &StreamConsumer<WorkerContext>,
        owned: &Mutex<HashMap<i32, i64>>,
    ) {
        let now = Instant::now();
        let due: Vec<i32> = {
            let mut set_aside = self.set_aside.lock().expect("set-aside partitions");
            if set_aside.is_empty() {
                return;
            }
            let owned = owned.lock().expect("owned map");
            set_aside.retain(|p, _| owned.contains_key(p));
            // A halted partition waits for its operator, not for this retry.
            let halted = self.halted.lock().expect("halted set");
            set_aside
                .iter()
                .filter(|(p, _)| !halted.contains(p))
                .filter(|(_, s)| s.retry_at.is_some_and(|at| at <= now))
                .map(|(p, _)| *p)
                .collect()
        };
        let topic = self.config.commands_topic.as_str();
        for partition in due {
            let Some(offset) = self
                .positions
                .lock()
                .expect("positions")
                .get(&partition)
                .copied()
            else {
                continue;
            };
            let seek = consumer.seek(
                topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(10),
            );
            let mut set_aside = self.set_aside.lock().expect("set-aside partitions");
            let Some(entry) = set_aside.get_mut(&partition) else {
                continue;
            };
            match seek {
                Ok(()) => {
                    entry.retry_at = None;
                    drop(set_aside);
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition(topic, partition);
                    let _ = consumer.resume(&tpl);
                    tracing::info!(
                        partition,
                        offset,
                        "trying a partition set aside again, from its stored offset"
                    );
                }
                Err(e) => {
                    let delay = entry.backoff.next_delay();
                    entry.retry_at = Some(Instant::now() + delay);
                    tracing::warn!(partition, offset, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot seek a partition set aside back to its stored offset; trying later");
                }
            }
        }
    }

    /// Handles one partition's result of a batch. Returns whether it committed anything.
    async fn partition_done(
        &self,
        consumer: &StreamConsumer<WorkerContext>,
        owned: &Mutex<HashMap<i32, i64>>,
        registry: &Registry,
        partition: i32,
        messages: &[Incoming],
        result: store::Result<store::BatchResult>,
    ) -> bool {
        let cfg = &self.config;
        match result {
            Ok(r) => {
                self.record_batch(registry, partition, messages, &r);
                for (aggregate_type, aggregate_id) in &r.newly_parked {
                    tracing::error!(
                        partition,
                        %aggregate_type,
                        %aggregate_id,
                        "poison command: aggregate parked; its later commands are set aside in order"
                    );
                }
                tracing::debug!(
                    partition,
                    applied = r.applied,
                    rejected = r.rejected,
                    duplicates = r.duplicates,
                    dead_letters = r.dead_letters,
                    next_offset = r.next_offset,
                    "batch committed"
                );
                if cfg.naive {
                    // The baseline commits each offset to Kafka before going on.
                    let mut tpl = TopicPartitionList::new();
                    let _ = tpl.add_partition_offset(
                        cfg.commands_topic.as_str(),
                        partition,
                        Offset::Offset(r.next_offset),
                    );
                    if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                        tracing::warn!(partition, error = %e, "offset commit failed");
                    }
                } else {
                    // Mirror the stored position into Kafka for lag tools; failures do not
                    // matter.
                    let _ = consumer.store_offset(
                        cfg.commands_topic.as_str(),
                        partition,
                        r.next_offset,
                    );
                }
                if let Some(offset) = r.halted_at {
                    tracing::error!(
                        partition,
                        offset,
                        "poison command: partition halted (--on-poison halt); restart the worker once the handler is fixed"
                    );
                    {
                        let mut halted = self.halted.lock().expect("halted set");
                        halted.insert(partition, HaltReason::Poison { offset });
                        halted.publish(&self.metrics);
                    }
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition(cfg.commands_topic.as_str(), partition);
                    let _ = consumer.pause(&tpl);
                }
                r.messages > 0
            }
            Err(StoreError::Fenced { mine, current, .. }) => {
                self.metrics.fenced_batches.inc();
                self.fenced(consumer, owned, partition, mine, current, None)
                    .await;
                false
            }
            Err(StoreError::Moved {
                expected, stored, ..
            }) => {
                // Restored from a backup (older) or an unacknowledged commit (newer):
                // consume again from what the database holds.
                tracing::warn!(
                    partition,
                    expected,
                    stored,
                    "stored position moved behind this worker's back"
                );
                let epoch = owned.lock().expect("owned map").get(&partition).copied();
                if let Some(epoch) = epoch {
                    self.fenced(consumer, owned, partition, epoch, epoch, None)
                        .await;
                }
                false
            }
            Err(e) => {
                tracing::error!(partition, error = %e, "unexpected result for a partition");
                false
            }
        }
    }
}

impl Worker {
    /// Feeds the per-partition metrics (outcomes, dead-letter kinds, end-to-end latency) from
    /// a committed batch, and moves the partition's known position.
    ///
    /// `BatchResult` carries counts, not per-message outcomes, so what needs the messages
    /// (dead-letter kinds, end-to-end latency) is derived from those the batch committed:
    /// offsets from the position before the batch up to `next_offset`.
    fn record_batch(
        &self,
        registry: &Registry,
        partition: i32,
        messages: &[Incoming],
        r: &store::BatchResult,
    ) {
        // Only a partition still known as owned is tracked: one revoked meanwhile must not
        // come back into the lag monitor's set.
        let before = match self
            .positions
            .lock()
            .expect("positions")
            .get_mut(&partition)
        {
            Some(position) => std::mem::replace(position, r.next_offset),
            None => i64::MIN,
        };
        if r.messages == 0 {
            // Every message was below the stored offset: nothing was committed.
            return;
        }
        let m = &self.metrics;
        m.count_commands(outcome::APPLIED, r.applied);
        m.count_commands(outcome::REJECTED, r.rejected);
        m.count_commands(outcome::DUPLICATE, r.duplicates);
        // Every parked command is also a dead letter (kind `parked`, or `handler_panic` for
        // the poison one); counting it once keeps the outcomes a partition of the messages.
        m.count_commands(
            outcome::DEAD_LETTERED,
            r.dead_letters.saturating_sub(r.parked),
        );
        m.count_commands(outcome::PARKED, r.parked);

        let committed = messages
            .iter()
            .filter(|msg| msg.offset >= before && msg.offset < r.next_offset);
        let now = chrono::Utc::now();
        let mut kinds: HashMap<&'static str, usize> = HashMap::new();
        for msg in committed {
            match &msg.decoded {
                Err(e) => *kinds.entry(e.kind.as_str()).or_default() += 1,
                Ok(c) => {
                    // A type the registry does not know is never recorded as processed, so it
                    // cannot be a duplicate: the plan dead-letters it, always.
                    if registry.get(c.command_type.aggregate_type()).is_none() {
                        *kinds
                            .entry(DeadLetterKind::UnknownType.as_str())
                            .or_default() += 1;
                    }
                    if let Some(time) = c.time {
                        let latency = (now - time).to_std().unwrap_or_default();
                        m.end_to_end_seconds.observe(latency.as_secs_f64());
                    }
                }
            }
        }
        // The rest were dead-lettered by the plan after decoding: commands of an aggregate
        // already parked (`parked`), and the poison ones, whose handler panicked
        // (`handler_panic`, which also covers the rare handler that refuses data its schema
        // accepted).
        let known: usize = kinds.values().sum();
        let parked = r.parked.saturating_sub(r.newly_parked.len());
        let rest = r.dead_letters.saturating_sub(known);
        *kinds.entry(DeadLetterKind::Parked.as_str()).or_default() += parked.min(rest);
        *kinds
            .entry(DeadLetterKind::HandlerPanic.as_str())
            .or_default() += rest.saturating_sub(parked);
        for (kind, n) in kinds {
            if n > 0 {
                m.dead_letters.with_label_values(&[kind]).inc_by(n as u64);
            }
        }
    }
}

/// One debug event per command of a batch, inside the batch's span, so that a command can be
/// followed by id or correlation id through the logs.
fn trace_commands(partition: i32, messages: &[Incoming]) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    for m in messages {
        match &m.decoded {
            Ok(c) => tracing::debug!(
                partition,
                offset = m.offset,
                command_id = %c.id,
                source = %c.source,
                correlation_id = c.correlation_id.as_deref(),
                command_type = %c.command_type,
                aggregate = %c.subject,
                "command"
            ),
            Err(e) => tracing::debug!(
                partition,
                offset = m.offset,
                kind = e.kind.as_str(),
                "undecodable message"
            ),
        }
    }
}

/// How often the lag gauge is refreshed.
const LAG_INTERVAL: Duration = Duration::from_secs(5);

/// Drops a partition's lag series: lag of a partition another worker owns now would be
/// reported twice, once stale.
fn forget_lag(metrics: &Metrics, partition: i32) {
    let _ = metrics
        .partition_lag
        .remove_label_values(&[&partition.to_string()]);
}

/// A partition's log bounds as the monitor read them.
#[derive(Debug, Clone, Copy)]
struct LogBounds {
    partition: i32,
    /// The log start offset (low watermark).
    low: i64,
    /// The log end offset (high watermark).
    high: i64,
    /// The stored next offset, read before the watermarks.
    stored: i64,
}

/// What the monitor tells the worker's loop.
#[derive(Debug)]
enum LogReport {
    /// Bounds that look wrong, or every owned partition's after a consumer error.
    Bounds(Vec<LogBounds>),
    /// The commands topic's partition count, as the broker reports it now.
    PartitionCount(i32),
}

/// Refreshes the lag gauge of every owned partition until `stop`: the Kafka high watermark
/// minus the stored next offset. It has its own client, because `fetch_watermarks` blocks
/// and the worker's consumer is busy in its loop.
///
/// With the same reads it watches the commands log: every tick it reports the topic's
/// partition count, and the bounds of partitions whose log no longer covers the stored
/// offset; when `check_now` is notified (a consumer error) it looks at once and reports
/// every owned partition's bounds.
async fn monitor_lag(
    brokers: String,
    topic: String,
    positions: Positions,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    reports: mpsc::Sender<LogReport>,
    check_now: Arc<Notify>,
) {
    let consumer: Arc<BaseConsumer> = match ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("client.id", "cmdproc-lag-monitor")
        .create()
    {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::warn!(error = %e, "cannot create the lag monitor's client; no lag metric");
            return;
        }
    };
    let mut tick = tokio::time::interval(LAG_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let poked = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => false,
            _ = check_now.notified() => true,
        };
        // Read before the watermarks: a log end below this is not this worker's progress.
        let before: Vec<(i32, i64)> = positions
            .lock()
            .expect("positions")
            .iter()
            .map(|(p, o)| (*p, *o))
            .collect();
        let (c, t) = (consumer.clone(), topic.clone());
        let partitions: Vec<i32> = before.iter().map(|(p, _)| *p).collect();
        let fetch = tokio::task::spawn_blocking(move || {
            let count = crate::topics::partition_count(c.client(), &t, Duration::from_secs(2));
            let marks = partitions
                .into_iter()
                .map(|p| (p, c.fetch_watermarks(&t, p, Duration::from_secs(2))))
                .collect::<Vec<_>>();
            (count, marks)
        });
        let (count, marks) = tokio::select! {
            _ = stop.cancelled() => return,
            r = fetch => match r { Ok(h) => h, Err(_) => continue },
        };
        if let Ok(count) = count {
            let _ = reports.try_send(LogReport::PartitionCount(count));
        }
        let mut report = Vec::new();
        {
            let positions = positions.lock().expect("positions");
            for (p, marks) in marks {
                match (marks, positions.get(&p)) {
                    // The position read now is at least as new as the watermark, so the lag
                    // is at worst a little low, never negative.
                    (Ok((low, high)), Some(next)) => {
                        metrics
                            .partition_lag
                            .with_label_values(&[&p.to_string()])
                            .set((high - next).max(0));
                        let stored = before
                            .iter()
                            .find(|(q, _)| *q == p)
                            .map_or(*next, |(_, o)| *o);
                        let bounds = LogBounds {
                            partition: p,
                            low,
                            high,
                            stored,
                        };
                        if poked
                            || commands_log::judge_watermarks(low, high, stored, None).is_some()
                        {
                            report.push(bounds);
                        }
                    }
                    (Err(e), _) => {
                        tracing::debug!(partition = p, error = %e, "reading the watermarks failed")
                    }
                    // Revoked meanwhile; the revocation dropped its series.
                    (Ok(_), None) => {}
                }
            }
        }
        if !report.is_empty() {
            let _ = reports.try_send(LogReport::Bounds(report));
        }
    }
}

/// Assigns `partition` again at `offset`, to restart a fetcher that stopped.
fn reassign(
    consumer: &StreamConsumer<WorkerContext>,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<(), String> {
    if !matches!(
        consumer.rebalance_protocol(),
        RebalanceProtocol::Cooperative
    ) {
        return Err("the partition's fetcher stopped and the group is not cooperative".into());
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    // Not assigned any more (an earlier attempt got this far): assigning is what is left.
    let _ = consumer.incremental_unassign(&tpl);
    let mut at = TopicPartitionList::new();
    at.add_partition_offset(topic, partition, Offset::Offset(offset))
        .map_err(|e| e.to_string())?;
    consumer.incremental_assign(&at).map_err(|e| e.to_string())
}

/// Whether a message may have been routed by another partition count than `partitions`: it
/// is on a partition past the count, or its key maps elsewhere.
fn routed_elsewhere(partition: i32, incoming: &Incoming, partitions: i32) -> bool {
    partition >= partitions
        || matches!(&incoming.decoded, Err(e) if e.kind == DeadLetterKind::Misrouted)
}

impl Worker {
    /// Compares the epochs and stored positions of the owned partitions with Postgres and
    /// handles any change; and takes back a partition it dropped as fenced if Kafka still
    /// assigns it here a session timeout later (whoever fenced it was a zombie that has
    /// since stopped, or a restore confused the ownership), so no partition stays paused
    /// on the member the group gave it to.
    async fn check_epochs(
        &self,
        consumer: &StreamConsumer<WorkerContext>,
        owned: &Mutex<HashMap<i32, i64>>,
    ) {
        self.retake_dropped(consumer, owned).await;
        let mine: Vec<(i32, i64)> = owned
            .lock()
            .expect("owned map")
            .iter()
            .map(|(p, e)| (*p, *e))
            .collect();
        if mine.is_empty() {
            return;
        }
        let parts: Vec<i32> = mine.iter().map(|(p, _)| *p).collect();
        let Ok(stored) =
            store::epochs(&self.pool, self.config.commands_topic.as_str(), &parts).await
        else {
            // The database is away; the next batch will find out and retry.
            return;
        };
        for (partition, epoch) in mine {
            let Some(state) = stored.get(&partition) else {
                continue;
            };
            let last_stored = self
                .positions
                .lock()
                .expect("positions")
                .get(&partition)
                .copied();
            if state.epoch != epoch {
                let owner = state.owner.as_deref();
                self.fenced(consumer, owned, partition, epoch, state.epoch, owner)
                    .await;
            } else if last_stored.is_some_and(|p| p != state.next_offset) {
                // Same epoch, other position: restored from a backup taken since we took
                // the partition (or a commit whose acknowledgement was lost).
                tracing::warn!(
                    partition,
                    expected = last_stored,
                    stored = state.next_offset,
                    "stored position moved behind this worker's back"
                );
                self.fenced(consumer, owned, partition, epoch, epoch, None)
                    .await;
            }
        }
    }

    async fn retake_dropped(
        &self,
        consumer: &StreamConsumer<WorkerContext>,
        owned: &Mutex<HashMap<i32, i64>>,
    ) {
        let due: Vec<i32> = {
            let owned = owned.lock().expect("owned map");
            let mut dropped = self.dropped.lock().expect("dropped partitions");
            // Reassigned through a rebalance meanwhile: taken in the callback already.
            dropped.retain(|p, _| !owned.contains_key(p));
            dropped
                .iter()
                .filter(|(_, since)| since.elapsed() >= self.config.session_timeout)
                .map(|(p, _)| *p)
                .collect()
        };
        if due.is_empty() {
            return;
        }
        let assigned = consumer.assignment().unwrap_or_default();
        let topic = self.config.commands_topic.as_str();
        for partition in due {
            self.dropped
                .lock()
                .expect("dropped partitions")
                .remove(&partition);
            if assigned.find_partition(topic, partition).is_none() {
                continue;
            }
            if !self
                .take_back(
                    consumer,
                    owned,
                    partition,
                    "still assigned here after the session timeout: taking the partition back",
                )
                .await
            {
                self.drop_partition(consumer, owned, partition);
            }
        }
    }

    /// Handles a partition whose epoch or stored position moved (`owner` is the row's
    /// owner when the caller read it). When the row still names this worker, or the epoch
    /// went back (a database restore), it was not another worker: take the partition
    /// again and consume from the stored offset. Otherwise another worker owns it now:
    /// drop it without committing anything.
    async fn fenced(
        &self,
        consumer: &StreamConsumer<WorkerContext>,
        owned: &Mutex<HashMap<i32, i64>>,
        partition: i32,
        mine: i64,
        current: i64,
        owner: Option<&str>,
    ) {
        // Epochs only grow, so one lower than ours (or our own, with the position moved)
        // means the database was restored: nobody took the partition since we did.
        let restored = current <= mine;
        let named = match owner {
            Some(o) => o == self.config.owner,
            None => matches!(
                store::epochs(&self.pool, self.config.commands_topic.as_str(), &[partition])
                    .await
                    .map(|m| m.get(&partition).cloned()),
                Ok(Some(store::PartitionState { owner: Some(o), .. })) if o == self.config.owner
            ),
        };
        if (restored || named)
            && self
                .take_back(consumer, owned, partition, "partition rewound (replay, accepted log or database restore): consuming again from the stored offset")
                .await
        {
            return;
        }
        if !(restored || named) {
            tracing::warn!(
                partition,
                epoch = mine,
                current_epoch = current,
                "fenced: another worker owns this partition now; dropping it"
            );
        }
        self.drop_partition(consumer, owned, partition);
        self.dropped
            .lock()
            .expect("dropped partitions")
            .insert(partition, Instant::now());
    }

    /// Takes `partition` again in Postgres (a new epoch) and seeks to its stored offset.
    async fn take_back(
        &self,
        consumer: &StreamConsumer<WorkerContext>,
        owned: &Mutex<HashMap<i32, i64>>,
        partition: i32,
        why: &str,
    ) -> bool {
        let topic = self.config.commands_topic.as_str();
        match store::acquire_partition(&self.pool, topic, partition, &self.config.owner).await {
            Ok(acquired) => {
                let start =
                    note_acquired(owned, &self.positions, &self.checks, partition, &acquired);
                // A log halt is judged again from the new start (after `topics accept-log`
                // the position is where the operator put it); other halts stay.
                let (lifted, still_halted) = {
                    let mut halted = self.halted.lock().expect("halted set");
                    let lifted =
                        halted.lift_if(partition, |r| matches!(r, HaltReason::LogChanged(_)));
                    halted.publish(&self.metrics);
                    (lifted, halted.contains(&partition))
                };
                tracing::warn!(
                    partition,
                    epoch = acquired.epoch,
                    offset = acquired.next_offset,
                    log_halt_lifted = lifted,
                    "{why}"
                );
                self.seek_or_defer(consumer, partition, start, !still_halted);
                true
            }
            Err(e) => {
                tracing::warn!(partition, error = %e, "cannot take the partition again; dropping it for now");
                false
            }
        }
    }

    /// Stops consuming `partition` and forgets it as owned.
    fn drop_partition(
        &self,
        consumer: &StreamConsumer<WorkerContext>,
        owned: &Mutex<HashMap<i32, i64>>,
        partition: i32,
    ) {
        self.positions.lock().expect("positions").remove(&partition);
        forget_lag(&self.metrics, partition);
        owned.lock().expect("owned map").remove(&partition);
        // Its log is checked again by whoever takes it (this worker too, when it does).
        self.checks.lock().expect("log checks").forget(partition);
        {
            let mut halted = self.halted.lock().expect("halted set");
            halted.lift_if(partition, |r| matches!(r, HaltReason::LogChanged(_)));
            halted.publish(&self.metrics);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(self.config.commands_topic.as_str(), partition);
        let _ = consumer.pause(&tpl);
    }
}

impl Worker {
    /// The partition count recorded for the topic, recording `partitions` when none is;
    /// retried while the database is unavailable. `None` when shut down meanwhile.
    async fn record_layout(&self, partitions: i32, shutdown: &CancellationToken) -> Option<i32> {
        let topic = self.config.commands_topic.as_str();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match store::record_layout(&self.pool, topic, partitions).await {
                Ok(recorded) => return Some(recorded),
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot read the topic's recorded partition count; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Halts `partition`: paused, nothing of it applied, still owned; logged once per reason.
    fn halt(&self, consumer: &StreamConsumer<WorkerContext>, partition: i32, reason: HaltReason) {
        let new = {
            let mut halted = self.halted.lock().expect("halted set");
            let new = halted.insert(partition, reason.clone());
            halted.publish(&self.metrics);
            new
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(self.config.commands_topic.as_str(), partition);
        let _ = consumer.pause(&tpl);
        if new {
            tracing::error!(
                partition,
                reason = reason.label(),
                "partition halted, nothing of it is applied: {}",
                reason.describe(partition)
            );
        }
    }

    /// Halts every owned partition, and every one assigned later, until the topic's
    /// partition count is accepted.
    fn halt_topic(
        &self,
        consumer: &StreamConsumer<WorkerContext>,
        owned: &Mutex<HashMap<i32, i64>>,
        reason: HaltReason,
    ) {
        let mine: Vec<i32> = owned.lock().expect("owned map").keys().copied().collect();
        let new = {
            let mut halted = self.halted.lock().expect("halted set");
            let new = halted.topic() != Some(&reason);
            halted.halt_topic(reason.clone(), mine.iter().copied());
            halted.publish(&self.metrics);
            new
        };
        let topic = self.config.commands_topic.as_str();
        let mut tpl = TopicPartitionList::new();
        for p in &mine {
            tpl.add_partition(topic, *p);
        }
        let _ = consumer.pause(&tpl);
        if new {
            tracing::error!(
                topic,
                reason = reason.label(),
                "topic halted, nothing of any partition is applied: {}",
                reason.describe(-1)
            );
        }
    }

    /// Handles what the log monitor found.
    async fn on_log_report(
        &self,
        consumer: &StreamConsumer<WorkerContext>,
        owned: &Mutex<HashMap<i32, i64>>,
        known: &mut i32,
        report: LogReport,
    ) {
        match report {
            LogReport::PartitionCount(broker) => {
                let halted = self.halted.lock().expect("halted set").topic().is_some();
                if broker != *known || halted {
                    self.layout_changed(consumer, owned, known, broker).await;
                }
            }
            LogReport::Bounds(bounds) => {
                // How far each partition's messages were delivered to this worker.
                let delivered: HashMap<i32, i64> = consumer
                    .position()
                    .map(|tpl| {
                        tpl.elements()
                            .iter()
                            .filter_map(|e| match e.offset() {
                                Offset::Offset(o) => Some((e.partition(), o)),
                                _ => None,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                for b in bounds {
                    let p = b.partition;
                    // A position that moved since the monitor read it makes the reading stale.
                    let now = self.positions.lock().expect("positions").get(&p).copied();
                    if now != Some(b.stored)
                        || !owned.lock().expect("owned map").contains_key(&p)
                        || self.halted.lock().expect("halted set").contains(&p)
                    {
                        continue;
                    }
                    if let Some(detail) = commands_log::judge_watermarks(
                        b.low,
                        b.high,
                        b.stored,
                        delivered.get(&p).copied(),
                    ) {
                        self.halt(consumer, p, HaltReason::LogChanged(detail));
                        continue;
                    }
                    // The fingerprinted message itself is gone (retention of applied
                    // commands only): nothing to compare, start at the stored offset.
                    let gone = {
                        let mut checks = self.checks.lock().expect("log checks");
                        let gone = checks.expected.get(&p).is_some_and(|e| e.offset < b.low);
                        if gone {
                            checks.expected.remove(&p);
                        }
                        gone
                    };
                    if gone {
                        tracing::info!(partition = p, low = b.low, stored = b.stored, "the last applied command was deleted by retention; consuming from the stored offset");
                        self.seek_or_defer(consumer, p, b.stored, true);
                    }
                }
            }
        }
    }

    /// Reads the topic's partition count now; when it is not the known one, halts the topic
    /// (or takes its partitions again under an accepted count). Returns whether it did.
    async fn partition_count_changed(
        &self,
        consumer: &StreamConsumer<WorkerContext>,
        owned: &Mutex<HashMap<i32, i64>>,
        known: &mut i32,
    ) -> bool {
        let topic = self.config.commands_topic.as_str();
        let count = tokio::task::block_in_place(|| {
            crate::topics::partition_count(consumer.client(), topic, Duration::from_secs(5))
        });
        match count {
            Ok(broker) if broker != *known => {
                self.layout_changed(consumer, owned, known, broker).await;
                true
            }
            Ok(_) => false,
            Err(e) => {
                // The message is dead-lettered as misrouted only if the count is known to
                // be the same; without an answer, nothing is applied and the poll is read
                // again.
                tracing::warn!(error = %e, "cannot read the partition count; the poll is consumed again");
                self.take_back_all(
                    consumer,
                    owned,
                    "reading the partition count failed: consuming again from the stored offsets",
                )
                .await;
                true
            }
        }
    }

    /// The broker reports `broker` partitions, and the worker knew `known`: adopts the count
    /// if an operator accepted it (taking every owned partition again, to consume under it
    /// from the stored offsets), or halts the topic.
    async fn layout_changed(
        &self,
        consumer: &StreamConsumer<WorkerContext>,
        owned: &Mutex<HashMap<i32, i64>>,
        known: &mut i32,
        broker: i32,
    ) {
        let topic = self.config.commands_topic.as_str();
        let recorded = match store::recorded_layout(&self.pool, topic).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the recorded partition count");
                None
            }
        };
        if recorded == Some(broker) {
            let lifted = {
                let mut halted = self.halted.lock().expect("halted set");
                let lifted = halted.lift_topic();
                halted.publish(&self.metrics);
                lifted
            };
            tracing::warn!(
                topic,
                from = *known,
                to = broker,
                lifted = lifted.len(),
                "partition count accepted: consuming again from the stored offsets under the new count"
            );
            *known = broker;
            self.take_back_all(consumer, owned, "partition count accepted")
                .await;
        } else {
            self.halt_topic(
                consumer,
                owned,
                HaltReason::PartitionCount {
                    recorded: recorded.unwrap_or(*known),
                    broker,
                },
            );
        }
    }

    /// Takes every owned partition again, so each consumes from its stored offset.
    async fn take_back_all(
        &self,
        consumer: &StreamConsumer<WorkerContext>,
        owned: &Mutex<HashMap<i32, i64>>,
        why: &str,
    ) {
        let mine: Vec<i32> = owned.lock().expect("owned map").keys().copied().collect();
        for partition in mine {
            if !self.take_back(consumer, owned, partition, why).await {
                self.drop_partition(consumer, owned, partition);
            }
        }
    }

    /// Holds back the messages of a poll that must not be applied (yet): those of a
    /// partition whose seek failed, and checks each fingerprinted partition's first message.
    /// One lock and one test per poll when nothing is pending.
    fn screen(
        &self,
        consumer: &StreamConsumer<WorkerContext>,
        groups: &mut Vec<(i32, Vec<Incoming>)>,
    ) {
        let mut after: Vec<(i32, i64)> = Vec::new();
        let mut differs: Vec<(i32, String)> = Vec::new();
        {
            let mut checks = self.checks.lock().expect("log checks");
            if checks.is_empty() {
                return;
            }
            groups.retain(|(p, messages)| {
                if checks.pending_seeks.contains_key(p) {
                    return false;
                }
                let Some(expected) = checks.expected.get(p).copied() else {
                    return true;
                };
                let Some(first) = messages.iter().find(|m| m.offset >= expected.offset) else {
                    // From before the start: below the stored offset, dropped by the store.
                    return true;
                };
                match commands_log::judge_first_message(&expected, first.offset, first.timestamp) {
                    FirstMessage::Matches => {
                        checks.expected.remove(p);
                        true
                    }
                    FirstMessage::Differs(detail) => {
                        differs.push((*p, detail));
                        false
                    }
                    FirstMessage::After => {
                        after.push((*p, expected.stored));
                        true
                    }
                    FirstMessage::Before => true,
                }
            });
            for (p, _) in &after {
                checks.expected.remove(p);
            }
        }
        for (p, detail) in differs {
            self.halt(consumer, p, HaltReason::LogChanged(detail));
        }
        // A gap where the fingerprinted message was: fine when the log still starts at or
        // below the stored offset (transaction markers, retention of applied commands).
        let topic = self.config.commands_topic.as_str();
        for (p, stored) in after {
            let marks = tokio::task::block_in_place(|| {
                consumer.fetch_watermarks(topic, p, Duration::from_secs(5))
            });
            let verdict = match marks {
                Ok((low, high)) => commands_log::judge_watermarks(low, high, stored, None),
                Err(e) => Some(format!("the log start could not be read ({e}) after a gap below the stored offset {stored}")),
            };
            if let Some(detail) = verdict {
                groups.retain(|(q, _)| *q != p);
                self.halt(consumer, p, HaltReason::LogChanged(detail));
            }
        }
    }

    /// Seeks `partition` to `offset`, resuming it when `resume`. A failed seek leaves the
    /// consumer where it was, so the partition is paused, its messages are discarded, and
    /// the seek is retried every second: nothing is applied from anywhere but the stored
    /// position. Returns whether the seek succeeded.
    fn seek_or_defer(
        &self,
        consumer: &StreamConsumer<WorkerContext>,
        partition: i32,
        offset: i64,
        resume: bool,
    ) -> bool {
        let topic = self.config.commands_topic.as_str();
        let result = if crate::failpoint::once("seek-fails-once") {
            Err("failpoint seek-fails-once".to_owned())
        } else {
            match consumer.seek(
                topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(10),
            ) {
                Ok(()) => Ok(()),
                // After an offset outside the log (`auto.offset.reset=error`) librdkafka
                // stops fetching the partition, and refuses seeks: only assigning it again
                // starts it. (rdkafka reports the seek's error code only as librdkafka's
                // text for it, `RD_KAFKA_RESP_ERR__STATE`.)
                Err(KafkaError::Seek(e)) if e == "Local: Erroneous state" => {
                    reassign(consumer, topic, partition, offset)
                }
                Err(e) => Err(e.to_string()),
            }
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let mut checks = self.checks.lock().expect("log checks");
        match result {
            Ok(()) => {
                if checks.pending_seeks.remove(&partition).is_some() {
                    tracing::info!(
                        partition,
                        offset,
                        "seek succeeded; consuming from the stored position"
                    );
                }
                if resume {
                    let _ = consumer.resume(&tpl);
                }
                true
            }
            Err(e) => {
                let _ = consumer.pause(&tpl);
                if checks.pending_seeks.insert(partition, offset).is_none() {
                    tracing::error!(partition, offset, error = %e, "seek to the stored position failed: partition paused and its messages discarded; retrying every second");
                }
                false
            }
        }
    }

    /// Retries the failed seeks of partitions still owned.
    fn retry_seeks(
        &self,
        consumer: &StreamConsumer<WorkerContext>,
        owned: &Mutex<HashMap<i32, i64>>,
    ) {
        let pending: Vec<(i32, i64)> = {
            let mut checks = self.checks.lock().expect("log checks");
            if checks.pending_seeks.is_empty() {
                return;
            }
            let owned = owned.lock().expect("owned map");
            checks.pending_seeks.retain(|p, _| owned.contains_key(p));
            checks.pending_seeks.iter().map(|(p, o)| (*p, *o)).collect()
        };
        for (partition, offset) in pending {
            let resume = !self.halted.lock().expect("halted set").contains(&partition);
            self.seek_or_defer(consumer, partition, offset, resume);
        }
    }
}

/// Records a partition just taken in Postgres as owned at `acquired`'s epoch and position,
/// and returns the offset to consume from: one message early when the last applied message
/// is fingerprinted, to check that the log is still the one the stored offset belongs to.
fn note_acquired(
    owned: &Mutex<HashMap<i32, i64>>,
    positions: &Positions,
    checks: &SharedLogChecks,
    partition: i32,
    acquired: &store::Acquired,
) -> i64 {
    owned
        .lock()
        .expect("owned map")
        .insert(partition, acquired.epoch);
    positions
        .lock()
        .expect("positions")
        .insert(partition, acquired.next_offset);
    let (start, expected) = commands_log::start_at(acquired.next_offset, acquired.last_timestamp);
    let mut checks = checks.lock().expect("log checks");
    checks.forget(partition);
    if let Some(e) = expected {
        checks.expected.insert(partition, e);
    }
    start
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
