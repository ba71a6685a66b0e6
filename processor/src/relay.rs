//! The outbox relay: publishes outbox rows in sequence order per commands partition,
//! exactly once.
//!
//! Two locks make one relay at a time work a partition, in order:
//! - in Postgres, the partition's `relay_positions` row, held (`FOR UPDATE SKIP LOCKED`) for
//!   the transaction in which the relay publishes and then records its position;
//! - in Kafka, a transactional producer per partition (`transactional.id` =
//!   `cmdproc-relay.<commands topic>.<partition>`): taking it over fences any earlier relay
//!   of that partition, and aborts whatever it left open.
//!
//! Each batch is one Kafka transaction that also commits the batch's last outbox sequence
//! as the offset of group `cmdproc-relay.<commands topic>` on the commands partition. If a
//! relay dies after Kafka committed but before Postgres recorded the position, the next
//! relay to take the partition reads that offset back and skips what was published, so no
//! event appears twice to a `read_committed` consumer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
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

/// The Postgres notification channel on which workers without a relay of their own
/// announce committed outbox rows; the payload is the commands topic.
pub const OUTBOX_CHANNEL: &str = "cmdproc_outbox";

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
    producers: Mutex<HashMap<i32, Arc<FutureProducer>>>,
    /// The last position this relay recorded per partition: a smaller one in Postgres
    /// means the database was restored from a backup.
    recorded: Mutex<HashMap<i32, i64>>,
    positions: Arc<BaseConsumer>,
    group: Arc<ConsumerGroupMetadata>,
    /// Partitions published at the same time, each in its own Kafka transaction.
    concurrency: usize,
    /// How long an idle relay waits for a wake-up before it looks anyway.
    poll_interval: Duration,
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
    /// Creates a relay. With `only`, it publishes just the partitions in that map (the ones
    /// its worker owns), so relays of different workers do not take turns fencing each other.
    pub fn new(
        pool: PgPool,
        brokers: &str,
        commands_topic: &str,
        batch_size: i64,
        only: Option<Owned>,
    ) -> Result<Self, RelayError> {
        let positions: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", relay_group(commands_topic))
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| RelayError::Kafka(e.to_string()))?;
        let group = positions.group_metadata().ok_or_else(|| {
            RelayError::Kafka("no consumer group metadata for the relay group".into())
        })?;
        Ok(Self {
            pool,
            brokers: brokers.to_owned(),
            commands_topic: commands_topic.to_owned(),
            batch_size,
            wake: Arc::new(Notify::new()),
            only,
            producers: Mutex::new(HashMap::new()),
            recorded: Mutex::new(HashMap::new()),
            positions: Arc::new(positions),
            group: Arc::new(group),
            concurrency: 4,
            poll_interval: Duration::from_millis(200),
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

    /// Publishes up to `n` partitions at a time (default 4), each holding a database
    /// connection while its Kafka transaction commits: keep it below the pool's size.
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// How long the relay, idle and not woken, waits before it looks for outbox rows
    /// anyway (default 200 ms).
    pub fn with_poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every;
        self
    }

    /// A handle that wakes the relay early, e.g. right after a worker commits a batch.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Publishes what is waiting, one batch per partition with a backlog.
    pub async fn relay_once(&self) -> Result<RelayOutcome, RelayError> {
        let mut backlog = store::outbox_backlog(&self.pool, &self.commands_topic).await?;
        let mut visit: Vec<i32> = backlog.iter().map(|b| b.partition).collect();
        if let Some(only) = &self.only {
            let only = only.lock().expect("owned map");
            backlog.retain(|b| only.contains_key(&b.partition));
            visit.retain(|p| only.contains_key(p));
            // A partition that moved to another worker has another relay now, which fenced
            // this one's producer: close it, so a return starts fresh and recovers the
            // position from Kafka instead of failing once on the fenced producer.
            let mut producers = self.producers.lock().expect("producers");
            producers.retain(|p, _| only.contains_key(p));
            // A partition just taken gets its producer (and its position read back) now,
            // not when its first event waits for that.
            let unprepared: Vec<i32> = only
                .keys()
                .filter(|p| !producers.contains_key(p) && !visit.contains(p))
                .copied()
                .collect();
            drop(producers);
            visit.extend(unprepared);
            self.recorded
                .lock()
                .expect("recorded positions")
                .retain(|p, _| only.contains_key(p));
        }
        self.report_backlog(&backlog);
        // Partitions are independent (own row lock, own transactional producer), so their
        // transactions overlap: an event waits for its own partition's commit, not for a
        // round of every partition's.
        let results: Vec<(i32, Result<usize, RelayError>)> = futures::stream::iter(visit)
            .map(|partition| async move { (partition, self.relay_partition(partition).await) })
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        let mut total = 0;
        let mut failed = None;
        for (partition, result) in results {
            match result {
                Ok(n) => total += n,
                Err(e) => {
                    // Start over with a fresh producer: it re-fences, aborts what is open,
                    // and recovers the position from Kafka.
                    self.producers.lock().expect("producers").remove(&partition);
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(if total == 0 {
            RelayOutcome::Idle
        } else {
            RelayOutcome::Relayed(total)
        })
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

    /// The partition's transactional producer, created (fencing earlier relays) on first use.
    /// Returns whether it is new, in which case the position must be recovered from Kafka.
    async fn producer(&self, partition: i32) -> Result<(Arc<FutureProducer>, bool), RelayError> {
        if let Some(p) = self.producers.lock().expect("producers").get(&partition) {
            return Ok((p.clone(), false));
        }
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set(
                "transactional.id",
                format!("{}.{partition}", relay_group(&self.commands_topic)),
            )
            .set("transaction.timeout.ms", "60000")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "2")
            .set("message.timeout.ms", "30000")
            .create()
            .map_err(|e| RelayError::Kafka(e.to_string()))?;
        let producer = Arc::new(producer);
        let init = producer.clone();
        blocking(move || init.init_transactions(KAFKA_TIMEOUT))
            .await
            .map_err(|e| {
                RelayError::Kafka(format!(
                    "taking over partition {partition}'s transactional id: {e}"
                ))
            })?;
        self.producers
            .lock()
            .expect("producers")
            .insert(partition, producer.clone());
        Ok((producer, true))
    }

    /// The last outbox sequence Kafka committed for a partition, 0 if none.
    async fn kafka_position(&self, partition: i32) -> Result<i64, RelayError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.commands_topic, partition);
        let positions = self.positions.clone();
        let committed = blocking(move || positions.committed_offsets(tpl, KAFKA_TIMEOUT))
            .await
            .map_err(|e| {
                RelayError::Kafka(format!(
                    "reading the relay position of partition {partition}: {e}"
                ))
            })?;
        Ok(committed
            .find_partition(&self.commands_topic, partition)
            .and_then(|e| match e.offset() {
                Offset::Offset(n) => Some(n),
                _ => None,
            })
            .unwrap_or(0))
    }

    #[tracing::instrument(skip_all, fields(partition))]
    async fn relay_partition(&self, partition: i32) -> Result<usize, RelayError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let Some(mut published) =
            store::lock_relay_position(&mut tx, &self.commands_topic, partition).await?
        else {
            return Ok(0);
        };
        let (producer, fresh) = self.producer(partition).await?;
        let restored = self
            .recorded
            .lock()
            .expect("recorded positions")
            .get(&partition)
            .is_some_and(|r| published < *r);
        if fresh || restored {
            let in_kafka = self.kafka_position(partition).await?;
            if in_kafka > published {
                tracing::info!(
                    partition,
                    recorded = published,
                    in_kafka,
                    "a previous relay published past its recorded position; resuming after what Kafka committed"
                );
                store::mark_published(&mut tx, &self.commands_topic, partition, in_kafka).await?;
                published = in_kafka;
            }
        }
        // Publish latency runs from this read to the Kafka commit: what an event waits once
        // the relay has picked it up.
        let read_at = Instant::now();
        let rows = store::next_outbox_rows(
            &mut tx,
            &self.commands_topic,
            partition,
            published,
            self.batch_size,
        )
        .await?;
        let Some(last) = rows.last().map(|r| r.seq) else {
            tx.commit().await.map_err(StoreError::from)?;
            return Ok(0);
        };

        producer
            .begin_transaction()
            .map_err(|e| RelayError::Kafka(e.to_string()))?;
        let published_batch = self.publish(&producer, &rows, partition, last).await;
        if let Err(e) = published_batch {
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
        store::mark_published(&mut tx, &self.commands_topic, partition, last).await?;
        tx.commit().await.map_err(StoreError::from)?;
        self.recorded
            .lock()
            .expect("recorded positions")
            .insert(partition, last);
        tracing::debug!(
            partition,
            published = rows.len(),
            up_to = last,
            "relayed outbox rows"
        );
        Ok(rows.len())
    }

    /// Sends the rows and commits them with the position in one Kafka transaction.
    async fn publish(
        &self,
        producer: &Arc<FutureProducer>,
        rows: &[store::OutboxMessage],
        partition: i32,
        last: i64,
    ) -> Result<(), RelayError> {
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
        let mut position = TopicPartitionList::new();
        position
            .add_partition_offset(&self.commands_topic, partition, Offset::Offset(last))
            .map_err(|e| RelayError::Kafka(e.to_string()))?;
        let (producer, group) = (producer.clone(), self.group.clone());
        blocking(move || {
            producer.send_offsets_to_transaction(&position, &group, KAFKA_TIMEOUT)?;
            producer.commit_transaction(KAFKA_TIMEOUT)
        })
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
                Ok(RelayOutcome::Relayed(_)) => backoff.reset(),
                Ok(RelayOutcome::Idle) => {
                    backoff.reset();
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(self.poll_interval) => {}
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

/// Tells relays in other processes (`cmdproc relay`) that `commands_topic` has new outbox
/// rows. Called after the rows are committed; a lost notification only delays them until
/// the relay's next poll.
pub async fn notify(pool: &PgPool, commands_topic: &str) {
    if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
        .bind(OUTBOX_CHANNEL)
        .bind(commands_topic)
        .execute(pool)
        .await
    {
        tracing::debug!(error = %e, "could not notify the relay; it finds the rows at its next poll");
    }
}

/// Listens on [`OUTBOX_CHANNEL`] and wakes `wake` whenever a worker announces rows of
/// `commands_topic`, until `shutdown`. Returns once listening, so rows committed after
/// the return are announced to it; the listener reconnects by itself after losing the
/// connection (the relay polls meanwhile).
pub async fn wake_on_notify(
    pool: &PgPool,
    commands_topic: &str,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, RelayError> {
    let mut listener = sqlx::postgres::PgListener::connect_with(pool)
        .await
        .map_err(StoreError::from)?;
    listener
        .listen(OUTBOX_CHANNEL)
        .await
        .map_err(StoreError::from)?;
    let topic = commands_topic.to_owned();
    Ok(tokio::spawn(async move {
        loop {
            let received = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = listener.try_recv() => r,
            };
            match received {
                Ok(Some(n)) if n.payload() == topic => wake.notify_one(),
                Ok(Some(_)) => {}
                // The connection was lost; the next call reconnects. Anything announced
                // meanwhile is found by polling, and by this pass.
                Ok(None) => {
                    tracing::warn!("lost the notification connection to Postgres; reconnecting");
                    wake.notify_one();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for outbox notifications; retrying in 1 s");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }))
}

/// Runs a blocking librdkafka call on Tokio's blocking pool, so the runtime's threads (and
/// the other partitions' transactions) go on meanwhile. A panic in `f` resumes here.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, KafkaError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(KafkaError::Canceled),
    }
}
