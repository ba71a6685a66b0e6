//! The outbox relay: publishes outbox rows in sequence order per commands partition,
//! exactly once.
//!
//! A pass publishes every partition with a backlog at once:
//! - in Postgres, it locks those partitions' `relay_positions` rows (`FOR UPDATE SKIP
//!   LOCKED`, so one relay at a time works a partition) for the transaction in which it
//!   publishes and then records the new positions;
//! - in Kafka, it publishes them in one transaction of its transactional producer, which
//!   also commits each partition's last outbox sequence as the offset of group
//!   `cmdproc-relay.<commands topic>` on that commands partition. The offsets are added to
//!   the transaction before any message.
//!
//! Before publishing, every pass reads those offsets back with `require_stable` (a
//! `read_committed` consumer's offset fetch): if another relay has a transaction open for
//! one of the partitions (a relay that froze, lost its database lock and may still
//! commit), the fetch waits until that transaction commits or times out. A committed
//! offset past the recorded position means a relay published and died (or froze) before
//! recording it: the pass records it and goes on after it. So no event appears twice to a
//! `read_committed` consumer, and one Kafka transaction carries all the partitions a
//! relay serves instead of one transaction each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::{self, StoreError};

/// How long a Kafka transaction step may take before the relay gives up and retries.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a relay's open Kafka transaction may last before the broker aborts it. A relay
/// taking over a partition from a frozen one waits at most this long.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a pass waits for a partition's position in Kafka to become stable (no other
/// relay's transaction open on it) before leaving that partition for the next pass.
const STABLE_WAIT: Duration = Duration::from_millis(800);
/// How long the relay lets commits gather before a pass: after being woken, and between
/// passes while there is a backlog. Every pass is a Kafka transaction, and on a busy
/// machine fewer, fuller transactions are both faster and cheaper.
const LINGER: Duration = Duration::from_millis(5);

/// Errors of the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Kafka did not take a message or a transaction.
    #[error("publishing to Kafka failed: {0}")]
    Kafka(String),
}

/// What one relay step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayOutcome {
    /// Published this many messages.
    Relayed(usize),
    /// Nothing was waiting (or every waiting partition is held by another relay).
    Idle,
}

/// The partitions a relay may publish: all of them, or those its worker owns.
pub type Owned = Arc<Mutex<HashMap<i32, i64>>>;

/// Publishes the outbox of one commands topic.
pub struct Relay {
    pool: PgPool,
    brokers: String,
    commands_topic: String,
    batch_size: i64,
    wake: Arc<Notify>,
    only: Option<Owned>,
    /// `cmdproc-relay.<commands topic>.<name>`: one per running relay.
    transactional_id: String,
    producer: tokio::sync::Mutex<Option<Arc<FutureProducer>>>,
    /// With `only`: per partition, the epoch under which its Kafka position was last read
    /// back, and the position this relay last recorded.
    verified: Mutex<HashMap<i32, (i64, i64)>>,
    positions: Arc<BaseConsumer>,
    group: Arc<ConsumerGroupMetadata>,
    metrics: Arc<Metrics>,
    /// Partitions whose backlog gauge this relay has set, so it can zero those that drained.
    reported: Mutex<std::collections::HashSet<i32>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("commands_topic", &self.commands_topic)
            .finish_non_exhaustive()
    }
}

/// The consumer group whose offsets hold each partition's last published outbox sequence.
pub fn relay_group(commands_topic: &str) -> String {
    format!("cmdproc-relay.{commands_topic}")
}

impl Relay {
    /// Creates a relay named `name` (unique among running relays of the topic: it names
    /// the Kafka transactional id). With `only`, it publishes just the partitions in that
    /// map (the ones its worker owns), so relays of different workers do not contend.
    pub fn new(
        pool: PgPool,
        brokers: &str,
        commands_topic: &str,
        name: &str,
        batch_size: i64,
        only: Option<Owned>,
    ) -> Result<Self, RelayError> {
        let positions: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", relay_group(commands_topic))
            .set("enable.auto.commit", "false")
            // Offset fetches wait for other relays' open transactions (require_stable).
            .set("isolation.level", "read_committed")
            // This relay's own last transaction reads as open until the broker has written
            // its markers, a few milliseconds after the commit: retry soon.
            .set("retry.backoff.ms", "2")
            .set("retry.backoff.max.ms", "50")
            .create()
            .map_err(|e| RelayError::Kafka(e.to_string()))?;
        let group = positions.group_metadata().ok_or_else(|| {
            RelayError::Kafka("no consumer group metadata for the relay group".into())
        })?;
        Ok(Self {
            pool,
            brokers: brokers.to_owned(),
            transactional_id: format!("{}.{name}", relay_group(commands_topic)),
            commands_topic: commands_topic.to_owned(),
            batch_size,
            wake: Arc::new(Notify::new()),
            only,
            producer: tokio::sync::Mutex::new(None),
            verified: Mutex::default(),
            positions: Arc::new(positions),
            group: Arc::new(group),
            metrics: Arc::new(Metrics::new()),
            reported: Mutex::default(),
        })
    }

    /// Records into `metrics` (shared with the worker in `cmdproc run`) instead of a
    /// private registry.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// A handle that wakes the relay early, e.g. right after a worker commits a batch.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Publishes what is waiting: up to the batch size of every partition with a backlog,
    /// in one Kafka transaction.
    pub async fn relay_once(&self) -> Result<RelayOutcome, RelayError> {
        let mut backlog = store::outbox_backlog(&self.pool, &self.commands_topic).await?;
        if let Some(only) = &self.only {
            let only = only.lock().expect("owned map");
            backlog.retain(|b| only.contains_key(&b.partition));
        }
        self.report_backlog(&backlog);
        if backlog.is_empty() {
            return Ok(RelayOutcome::Idle);
        }
        let partitions: Vec<i32> = backlog.iter().map(|b| b.partition).collect();
        let epochs: Option<Vec<i64>> = self.only.as_ref().map(|only| {
            let only = only.lock().expect("owned map");
            partitions
                .iter()
                .map(|p| only.get(p).copied().unwrap_or_default())
                .collect()
        });
        let result = self.relay_partitions(&partitions, epochs.as_deref()).await;
        if result.is_err() {
            // Start over with a fresh producer: it aborts whatever this one left open, and
            // every position is read back from Kafka again.
            *self.producer.lock().await = None;
            self.verified.lock().expect("verified positions").clear();
        }
        result
    }

    /// Sets the backlog gauge of the partitions this relay serves; the query returns only
    /// partitions with a backlog, so those it reported before and no longer sees are at 0.
    fn report_backlog(&self, backlog: &[store::Backlog]) {
        let mut reported = self.reported.lock().expect("reported partitions");
        let gauge = &self.metrics.outbox_backlog;
        for p in reported.iter() {
            if !backlog.iter().any(|b| b.partition == *p) {
                gauge.with_label_values(&[&p.to_string()]).set(0);
            }
        }
        for b in backlog {
            gauge
                .with_label_values(&[&b.partition.to_string()])
                .set(b.pending);
            reported.insert(b.partition);
        }
    }

    /// The relay's transactional producer, created on first use (and after a failure).
    async fn producer(&self) -> Result<Arc<FutureProducer>, RelayError> {
        let mut slot = self.producer.lock().await;
        if let Some(p) = slot.as_ref() {
            return Ok(p.clone());
        }
        let mut config = ClientConfig::new();
        // librdkafka's own debug contexts (e.g. `eos,protocol`) for the transactional
        // producer, logged at debug level under `librdkafka` (CMDPROC_LOG=info,librdkafka=debug).
        if let Ok(contexts) = std::env::var("CMDPROC_KAFKA_DEBUG") {
            config.set("debug", contexts);
        }
        let producer: FutureProducer = config
            .set("bootstrap.servers", &self.brokers)
            .set("transactional.id", &self.transactional_id)
            .set(
                "transaction.timeout.ms",
                TRANSACTION_TIMEOUT.as_millis().to_string(),
            )
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "1")
            // A pass starting right after the previous commit finds the broker still
            // writing that commit's markers: the first request of the new transaction is
            // refused (CONCURRENT_TRANSACTIONS) and retried after this backoff. The default
            // (100 ms) was the whole latency tail.
            .set("retry.backoff.ms", "2")
            .set("retry.backoff.max.ms", "50")
            .set(
                "message.timeout.ms",
                TRANSACTION_TIMEOUT.as_millis().to_string(),
            )
            .create()
            .map_err(|e| RelayError::Kafka(e.to_string()))?;
        let producer = Arc::new(producer);
        let id = self.transactional_id.clone();
        blocking({
            let producer = producer.clone();
            move || producer.init_transactions(KAFKA_TIMEOUT)
        })
        .await
        .map_err(|e| RelayError::Kafka(format!("initialising transactional id {id}: {e}")))?;
        *slot = Some(producer.clone());
        Ok(producer)
    }

    /// The last outbox sequence Kafka committed for each of `partitions` (0 if none),
    /// waiting up to `wait` while another relay's transaction holds an uncommitted one.
    async fn kafka_positions(
        &self,
        partitions: &[i32],
        wait: Duration,
    ) -> Result<HashMap<i32, i64>, RelayError> {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(&self.commands_topic, *p);
        }
        let positions = self.positions.clone();
        let committed = blocking(move || positions.committed_offsets(tpl, wait))
            .await
            .map_err(|e| RelayError::Kafka(format!("reading the relay positions: {e}")))?;
        Ok(committed
            .elements()
            .iter()
            .map(|e| {
                let at = match e.offset() {
                    Offset::Offset(n) => n,
                    _ => 0,
                };
                (e.partition(), at)
            })
            .collect())
    }

    /// The stable Kafka positions of `partitions`. Those for which another relay still has
    /// a transaction open (it froze or died mid-publish; the broker aborts it after the
    /// transaction timeout) are left out, so they do not hold up the others.
    async fn stable_positions(&self, partitions: &[i32]) -> Result<HashMap<i32, i64>, RelayError> {
        let all_failed = match self.kafka_positions(partitions, STABLE_WAIT).await {
            Ok(all) => return Ok(all),
            Err(e) => e,
        };
        // Find out which ones are held up; with one partition, that was the answer.
        let mut out = HashMap::new();
        if partitions.len() > 1 {
            for p in partitions {
                match self.kafka_positions(&[*p], STABLE_WAIT / 4).await {
                    Ok(one) => out.extend(one),
                    Err(e) => tracing::info!(
                        partition = p,
                        error = %e,
                        "another relay's Kafka transaction for this partition is still open; waiting for it to commit or time out"
                    ),
                }
            }
        }
        // None stable (or Kafka unreachable): the pass fails and is retried with backoff.
        if out.is_empty() {
            return Err(all_failed);
        }
        Ok(out)
    }

    #[tracing::instrument(skip_all, fields(partitions = partitions.len()))]
    async fn relay_partitions(
        &self,
        partitions: &[i32],
        epochs: Option<&[i64]>,
    ) -> Result<RelayOutcome, RelayError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let locked =
            store::lock_relay_positions(&mut tx, &self.commands_topic, partitions, epochs).await?;
        if locked.is_empty() {
            return Ok(RelayOutcome::Idle);
        }
        let producer = self.producer().await?;
        // A relay serving its worker's partitions holds them by epoch: no other relay can
        // lock them while the epoch stands, so their Kafka positions need reading back
        // only when it took them (a new epoch) or its recorded position went back (a
        // database restore). A standalone relay reads them back on every pass.
        let epoch_of =
            |p: i32| epochs.and_then(|e| partitions.iter().position(|q| *q == p).map(|i| e[i]));
        let mut in_kafka: HashMap<i32, i64> = HashMap::new();
        let mut to_check = Vec::new();
        {
            let verified = self.verified.lock().expect("verified positions");
            for (p, recorded) in &locked {
                match (epoch_of(*p), verified.get(p)) {
                    (Some(epoch), Some((at, mine))) if *at == epoch && *mine == *recorded => {
                        in_kafka.insert(*p, *recorded);
                    }
                    _ => to_check.push(*p),
                }
            }
        }
        if !to_check.is_empty() {
            in_kafka.extend(self.stable_positions(&to_check).await?);
        }
        let mut after = Vec::with_capacity(locked.len());
        let mut recovered = Vec::new();
        for (partition, recorded) in locked {
            // A partition whose position is not stable yet waits for the next pass.
            let Some(committed) = in_kafka.get(&partition).copied() else {
                continue;
            };
            if committed > recorded {
                tracing::info!(
                    partition,
                    recorded,
                    in_kafka = committed,
                    "a previous relay published past its recorded position; resuming after what Kafka committed"
                );
                recovered.push((partition, committed));
            }
            after.push((partition, recorded.max(committed)));
        }
        if !recovered.is_empty() {
            store::mark_published(&mut tx, &self.commands_topic, &recovered).await?;
        }
        // Publish latency runs from this read to the Kafka commit: what an event waits once
        // the relay has picked it up.
        let read_at = Instant::now();
        let rows =
            store::next_outbox_rows(&mut tx, &self.commands_topic, &after, self.batch_size).await?;
        if rows.is_empty() {
            tx.commit().await.map_err(StoreError::from)?;
            return Ok(RelayOutcome::Idle);
        }
        // Rows come in partition and sequence order: each partition's last is its new position.
        let mut last: Vec<(i32, i64)> = Vec::new();
        for r in &rows {
            match last.last_mut() {
                Some((p, seq)) if *p == r.partition => *seq = r.seq,
                _ => last.push((r.partition, r.seq)),
            }
        }

        producer
            .begin_transaction()
            .map_err(|e| RelayError::Kafka(e.to_string()))?;
        if let Err(e) = self.publish(&producer, &rows, &last).await {
            let aborting = producer.clone();
            let _ = blocking(move || aborting.abort_transaction(KAFKA_TIMEOUT)).await;
            return Err(e);
        }
        self.metrics
            .publish_seconds
            .observe(read_at.elapsed().as_secs_f64());
        // Dead letters go to `<commands topic>.dlq` (`Topic::dead_letter`), events elsewhere.
        let dead_letter_topic = format!("{}.dlq", self.commands_topic);
        let dead_letters = rows.iter().filter(|r| r.topic == dead_letter_topic).count();
        self.metrics
            .dead_letters_published
            .inc_by(dead_letters as u64);
        self.metrics
            .events_published
            .inc_by((rows.len() - dead_letters) as u64);
        crate::failpoint::crash_if("relay-crash-after-publish");
        store::mark_published(&mut tx, &self.commands_topic, &last).await?;
        tx.commit().await.map_err(StoreError::from)?;
        if epochs.is_some() {
            let mut verified = self.verified.lock().expect("verified positions");
            for (p, seq) in &last {
                if let Some(epoch) = epoch_of(*p) {
                    verified.insert(*p, (epoch, *seq));
                }
            }
        }
        tracing::debug!(
            published = rows.len(),
            partitions = last.len(),
            "relayed outbox rows"
        );
        Ok(RelayOutcome::Relayed(rows.len()))
    }

    /// Adds the new positions to the open transaction, sends the rows, and commits.
    ///
    /// The positions go first: from then on, another relay's stable offset fetch for these
    /// partitions waits for this transaction, so it cannot publish them again meanwhile.
    async fn publish(
        &self,
        producer: &Arc<FutureProducer>,
        rows: &[store::OutboxMessage],
        last: &[(i32, i64)],
    ) -> Result<(), RelayError> {
        let mut position = TopicPartitionList::new();
        for (partition, seq) in last {
            position
                .add_partition_offset(&self.commands_topic, *partition, Offset::Offset(*seq))
                .map_err(|e| RelayError::Kafka(e.to_string()))?;
        }
        {
            let (producer, group) = (producer.clone(), self.group.clone());
            blocking(move || {
                producer.send_offsets_to_transaction(&position, &group, KAFKA_TIMEOUT)
            })
            .await
            .map_err(|e| {
                RelayError::Kafka(format!("adding the positions to the transaction: {e}"))
            })?;
        }
        // Enqueue every message in order before awaiting any: the producer keeps that order
        // per Kafka partition, retries included.
        let mut pending = Vec::with_capacity(rows.len());
        for row in rows {
            let mut headers = OwnedHeaders::new_with_capacity(row.headers.len());
            for (k, v) in &row.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: v.as_deref(),
                });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&row.topic).headers(headers);
            if let Some(k) = &row.key {
                record = record.key(k);
            }
            if let Some(p) = &row.payload {
                record = record.payload(p);
            }
            loop {
                match producer.send_result(record) {
                    Ok(f) => {
                        pending.push(f);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => return Err(RelayError::Kafka(e.to_string())),
                }
            }
        }
        for f in pending {
            match f.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(RelayError::Kafka(e.to_string())),
                Err(_) => return Err(RelayError::Kafka("delivery was cancelled".into())),
            }
        }
        let producer = producer.clone();
        blocking(move || producer.commit_transaction(KAFKA_TIMEOUT))
            .await
            .map_err(|e| RelayError::Kafka(format!("committing the Kafka transaction: {e}")))
    }

    /// Runs until `shutdown`, then drains what is waiting for at most `drain`.
    pub async fn run(&self, shutdown: CancellationToken, drain: Duration) {
        let mut backoff =
            crate::retry::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            match self.relay_once().await {
                Ok(RelayOutcome::Relayed(n)) => {
                    backoff.reset();
                    // A full pass means a backlog: go on at once.
                    if n < self.batch_size as usize {
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(LINGER) => {}
                        }
                    }
                }
                Ok(RelayOutcome::Idle) => {
                    backoff.reset();
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = self.wake.notified() => {
                            tokio::time::sleep(LINGER).await;
                        }
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "relay step failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        let deadline = tokio::time::Instant::now() + drain;
        while tokio::time::Instant::now() < deadline {
            match tokio::time::timeout_at(deadline, self.relay_once()).await {
                Ok(Ok(RelayOutcome::Relayed(_))) => continue,
                Ok(Ok(RelayOutcome::Idle)) => break,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "relay could not drain the outbox before exit");
                    break;
                }
                Err(_) => break,
            }
        }
    }
}

/// Runs one of librdkafka's blocking calls on the blocking pool, so that partitions
/// published side by side do not wait for each other's transaction commits.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, KafkaError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(KafkaError::Canceled),
    }
}
