//! The outbox relay: publishes outbox rows in sequence order per commands partition,
//! exactly once.
//!
//! The relay's identity is the deployment (`relay_identity`, a random id generated when the
//! database is migrated, kept by a restore), the commands topic and the partition. Two locks
//! make one relay at a time work a partition, in order:
//! - in Postgres, the partition's `relay_positions` row, held (`FOR UPDATE SKIP LOCKED`) for
//!   the transaction in which the relay publishes and then records its position;
//! - in Kafka, a transactional producer per partition (`transactional.id` =
//!   `cmdproc-relay.<deployment>.<commands topic>.<partition>`): taking it over fences any
//!   earlier relay of that partition, and aborts whatever it left open.
//!
//! Each batch is one Kafka transaction that also commits the batch's last outbox sequence
//! as the offset of group `cmdproc-relay.<deployment>.<commands topic>` on the commands
//! partition, with metadata `cmdproc:<deployment>:<sequence>`. Every message carries its
//! row's stable identity (`cmdproc-message-id`: the event id, or the dead letter's place in
//! the commands log) and the relay's (`cmdproc-relay`).
//!
//! A relay taking a partition trusts the Kafka position only if its metadata names this
//! deployment and the same sequence. When that position is exactly the recorded one, it
//! goes on. Otherwise (a relay died between the Kafka commit and the Postgres update; the
//! database was restored from a backup, and the rows it re-derives may be numbered
//! differently; the group's offsets expired, were reset or deleted) it reconciles: it reads
//! the destination topics (`read_committed`) from a little before the recorded position's
//! time, collects the identities this relay identity published for the partition, stores
//! them in `relay_published`, and from then on skips the outbox rows with those identities
//! (still advancing the position). So no row is published twice or skipped on the strength
//! of a Kafka position alone.
//!
//! A row too large for Kafka (`max_message_bytes`, or refused by the broker) is published
//! with its payload replaced by a reference (`cmdproc-payload-omitted: too_large`); it stays
//! whole in Postgres. A partition whose step fails is retried with its own backoff while
//! the others go on.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::{Notify, OnceCell};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics::Metrics;
use crate::store::{self, StoreError};

/// How long a Kafka transaction step may take before the relay gives up and retries.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(15);

use crate::store::OUTBOX_CHANNEL;

/// The header holding an outbox row's stable identity.
pub const MESSAGE_ID_HEADER: &str = "cmdproc-message-id";
/// The header naming the relay that published a message: `<deployment>/<commands
/// topic>/<partition>`.
pub const RELAY_HEADER: &str = "cmdproc-relay";
/// The header saying a message's payload was replaced by a reference, and why.
pub const PAYLOAD_OMITTED_HEADER: &str = "cmdproc-payload-omitted";
/// The header giving the size in bytes of a payload that was left out.
pub const PAYLOAD_SIZE_HEADER: &str = "cmdproc-payload-size";

/// Default of [`Relay::with_max_message_bytes`]: a little below librdkafka's and the
/// broker's default `message.max.bytes` (1,000,000 and 1,048,588), so headers and framing
/// fit.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 990_000;

/// How far before the recorded position's time a reconciliation starts reading, for
/// clocks that disagree and batches committed just before it.
const RECONCILE_MARGIN: Duration = Duration::from_secs(300);

/// How long a reconciliation may see no progress before it gives up (and is retried).
const RECONCILE_STALL: Duration = Duration::from_secs(120);

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
    /// Nothing was waiting (or every waiting partition is held by another relay, or
    /// waiting out its backoff).
    Idle,
}

/// The partitions a relay may publish: all of them, or those its worker owns (the worker's
/// ownership map, read here only for its partitions).
pub use crate::worker::Owned;

/// Who this relay is in Kafka: read from the database at its first step.
struct Identity {
    deployment: Uuid,
    positions: Arc<BaseConsumer>,
    group: Arc<ConsumerGroupMetadata>,
}

/// A partition whose last step failed, retried on its own schedule.
struct Failing {
    backoff: crate::retry::Backoff,
    not_before: Instant,
}

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
    identity: OnceCell<Identity>,
    /// Partitions published at the same time, each in its own Kafka transaction.
    concurrency: usize,
    /// How long an idle relay waits for a wake-up before it looks anyway.
    poll_interval: Duration,
    metrics: Arc<Metrics>,
    /// Partitions whose backlog gauge this relay has set, so it can zero those that drained.
    reported: Mutex<HashSet<i32>>,
    /// Topics a reconciliation reads besides those the outbox names (the events topic).
    destinations: Vec<String>,
    /// Largest message (key, payload and headers) sent whole.
    max_message_bytes: usize,
    /// Partitions backing off after a failed step.
    failing: Mutex<HashMap<i32, Failing>>,
    /// Rows (partition, sequence) the broker refused as too large: sent with their payload
    /// left out from now on.
    shrink: Mutex<HashSet<(i32, i64)>>,
    /// Per partition, identities of rows already on their topic (`relay_published`):
    /// skipped when their turn comes. Usually empty.
    skip: Mutex<HashMap<i32, HashSet<String>>>,
    /// Reply topics looked up: whether each exists, and when that was learnt. A command may
    /// name any topic as `replyto`; a missing one must not hold back the partition.
    reply_topics: Mutex<HashMap<String, (bool, Instant)>>,
}

/// How long a reply topic found missing is taken as missing before it is looked up again.
const MISSING_REPLY_TOPIC_TTL: Duration = Duration::from_secs(10);

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("commands_topic", &self.commands_topic)
            .finish_non_exhaustive()
    }
}

/// The consumer group whose offsets hold each partition's last published outbox sequence,
/// for the deployment (`relay_identity`) of the database.
pub fn relay_group(deployment: &Uuid, commands_topic: &str) -> String {
    format!("cmdproc-relay.{deployment}.{commands_topic}")
}

/// The metadata committed with a relay position: who wrote it, and which sequence.
fn position_metadata(deployment: &Uuid, seq: i64) -> String {
    format!("cmdproc:{deployment}:{seq}")
}

/// The `cmdproc-relay` header of the messages of one commands partition.
fn relay_header(deployment: &Uuid, commands_topic: &str, partition: i32) -> String {
    format!("{deployment}/{commands_topic}/{partition}")
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
        Ok(Self {
            pool,
            brokers: brokers.to_owned(),
            commands_topic: commands_topic.to_owned(),
            batch_size,
            wake: Arc::new(Notify::new()),
            only,
            producers: Mutex::new(HashMap::new()),
            recorded: Mutex::new(HashMap::new()),
            identity: OnceCell::new(),
            concurrency: 4,
            poll_interval: Duration::from_millis(200),
            metrics: Arc::new(Metrics::new()),
            reported: Mutex::default(),
            destinations: Vec::new(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            failing: Mutex::default(),
            shrink: Mutex::default(),
            skip: Mutex::default(),
            reply_topics: Mutex::default(),
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

    /// Topics a reconciliation reads besides the dead-letter topic and those the outbox
    /// names: the events topic, whose rows a restored database may not hold yet.
    pub fn with_destinations(mut self, topics: &[&str]) -> Self {
        self.destinations = topics.iter().map(|t| (*t).to_owned()).collect();
        self
    }

    /// Largest message (key, payload and headers) published whole (default
    /// [`DEFAULT_MAX_MESSAGE_BYTES`]); a larger row is published with its payload replaced
    /// by a reference. The producer's `message.max.bytes` is raised to fit it if needed.
    pub fn with_max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes.max(1024);
        self
    }

    /// A handle that wakes the relay early, e.g. right after a worker commits a batch.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// The relay's identity, read from the database at the first step.
    async fn identity(&self) -> Result<&Identity, RelayError> {
        self.identity
            .get_or_try_init(|| async {
                let deployment = store::relay_deployment(&self.pool).await?;
                let positions: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", &self.brokers)
                    .set("group.id", relay_group(&deployment, &self.commands_topic))
                    .set("enable.auto.commit", "false")
                    .create()
                    .map_err(|e| RelayError::Kafka(e.to_string()))?;
                let group = positions.group_metadata().ok_or_else(|| {
                    RelayError::Kafka("no consumer group metadata for the relay group".into())
                })?;
                tracing::info!(%deployment, topic = %self.commands_topic, "relay identity");
                Ok(Identity {
                    deployment,
                    positions: Arc::new(positions),
                    group: Arc::new(group),
                })
            })
            .await
    }

    /// Publishes what is waiting, one batch per partition with a backlog. A partition
    /// whose step fails backs off on its own (and is left out until then); the error is
    /// returned only when the relay could not look at the outbox at all.
    pub async fn relay_once(&self) -> Result<RelayOutcome, RelayError> {
        let identity = self.identity().await?;
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
            self.failing
                .lock()
                .expect("failing partitions")
                .retain(|p, _| only.contains_key(p));
        }
        self.report_backlog(&backlog);
        {
            let now = Instant::now();
            let failing = self.failing.lock().expect("failing partitions");
            visit.retain(|p| failing.get(p).is_none_or(|f| f.not_before <= now));
        }
        // Partitions are independent (own row lock, own transactional producer), so their
        // transactions overlap: an event waits for its own partition's commit, not for a
        // round of every partition's.
        let results: Vec<(i32, Result<usize, RelayError>)> =
            futures::stream::iter(visit)
                .map(|partition| async move {
                    (partition, self.relay_partition(partition, identity).await)
                })
                .buffer_unordered(self.concurrency)
                .collect()
                .await;
        let mut total = 0;
        for (partition, result) in results {
            match result {
                Ok(n) => {
                    total += n;
                    self.failing
                        .lock()
                        .expect("failing partitions")
                        .remove(&partition);
                }
                Err(e) => {
                    // Start over with a fresh producer: it re-fences, aborts what is open,
                    // and recovers the position from Kafka.
                    self.producers.lock().expect("producers").remove(&partition);
                    let mut failing = self.failing.lock().expect("failing partitions");
                    let f = failing.entry(partition).or_insert_with(|| Failing {
                        backoff: crate::retry::Backoff::new(
                            Duration::from_millis(100),
                            Duration::from_secs(5),
                        ),
                        not_before: Instant::now(),
                    });
                    let delay = f.backoff.next_delay();
                    f.not_before = Instant::now() + delay;
                    tracing::warn!(
                        partition,
                        error = %e,
                        attempts = f.backoff.attempts,
                        retry_in_ms = delay.as_millis() as u64,
                        "relay step failed; retrying this partition, the others go on"
                    );
                }
            }
        }
        Ok(if total == 0 {
            RelayOutcome::Idle
        } else {
            RelayOutcome::Relayed(total)
        })
    }

    /// How long until the next failing partition may be tried again, if any is waiting.
    fn next_retry_in(&self) -> Option<Duration> {
        let now = Instant::now();
        self.failing
            .lock()
            .expect("failing partitions")
            .values()
            .map(|f| f.not_before.saturating_duration_since(now))
            .min()
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

    /// The reply topics of `rows` that do not exist. A topic found is remembered for good (a
    /// failed publish forgets it again); one found missing for [`MISSING_REPLY_TOPIC_TTL`].
    /// A lookup that fails (the broker unreachable) counts the topic as existing, so that
    /// no reply is dropped for an outage: the publish fails and is retried instead.
    async fn missing_reply_topics(
        &self,
        producer: &Arc<FutureProducer>,
        rows: &[store::OutboxMessage],
    ) -> HashSet<String> {
        let mut missing = HashSet::new();
        let topics: HashSet<&str> = rows
            .iter()
            .filter(|r| is_reply(r))
            .map(|r| r.topic.as_str())
            .collect();
        for topic in topics {
            let cached = self
                .reply_topics
                .lock()
                .expect("reply topics")
                .get(topic)
                .copied();
            let exists = match cached {
                Some((true, _)) => true,
                Some((false, at)) if at.elapsed() < MISSING_REPLY_TOPIC_TTL => false,
                _ => {
                    let (client, name) = (producer.clone(), topic.to_owned());
                    let looked_up = blocking(move || {
                        let md = client.client().fetch_metadata(Some(&name), KAFKA_TIMEOUT)?;
                        Ok::<_, KafkaError>(md.topics().iter().any(|t| {
                            t.name() == name && t.error().is_none() && !t.partitions().is_empty()
                        }))
                    })
                    .await;
                    match looked_up {
                        Ok(exists) => {
                            self.reply_topics
                                .lock()
                                .expect("reply topics")
                                .insert(topic.to_owned(), (exists, Instant::now()));
                            exists
                        }
                        Err(_) => true,
                    }
                }
            };
            if !exists {
                missing.insert(topic.to_owned());
            }
        }
        missing
    }

    /// The partition's transactional producer, created (fencing earlier relays) on first use.
    /// Returns whether it is new, in which case the position must be recovered from Kafka.
    async fn producer(
        &self,
        partition: i32,
        identity: &Identity,
    ) -> Result<(Arc<FutureProducer>, bool), RelayError> {
        if let Some(p) = self.producers.lock().expect("producers").get(&partition) {
            return Ok((p.clone(), false));
        }
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set(
                "transactional.id",
                format!(
                    "{}.{partition}",
                    relay_group(&identity.deployment, &self.commands_topic)
                ),
            )
            .set("transaction.timeout.ms", "60000")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "2")
            .set("message.timeout.ms", "30000")
            .set(
                "message.max.bytes",
                (self.max_message_bytes + 10_000).max(1_000_000).to_string(),
            )
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

    /// The last outbox sequence Kafka committed for a partition, if this deployment wrote
    /// it: `None` when there is none, or it carries no metadata of this deployment or
    /// metadata naming another sequence (reset, written by another tool or deployment).
    async fn kafka_position(
        &self,
        partition: i32,
        identity: &Identity,
    ) -> Result<Option<i64>, RelayError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.commands_topic, partition);
        let positions = identity.positions.clone();
        let committed = blocking(move || positions.committed_offsets(tpl, KAFKA_TIMEOUT))
            .await
            .map_err(|e| {
                RelayError::Kafka(format!(
                    "reading the relay position of partition {partition}: {e}"
                ))
            })?;
        let Some(elem) = committed.find_partition(&self.commands_topic, partition) else {
            return Ok(None);
        };
        let Offset::Offset(n) = elem.offset() else {
            return Ok(None);
        };
        // rdkafka panics on metadata that is not UTF-8, which another tool may have written.
        let metadata =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| elem.metadata().to_owned()))
                .unwrap_or_default();
        if metadata == position_metadata(&identity.deployment, n) {
            Ok(Some(n))
        } else {
            tracing::warn!(
                partition,
                in_kafka = n,
                metadata = %metadata,
                "the relay group's committed position was not written by this deployment at that sequence; not trusting it"
            );
            Ok(None)
        }
    }

    #[tracing::instrument(skip_all, fields(partition))]
    async fn relay_partition(
        &self,
        partition: i32,
        identity: &Identity,
    ) -> Result<usize, RelayError> {
        crate::failpoint::fail_relay_partition(partition)
            .map_err(|e| RelayError::Kafka(e.to_string()))?;
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let Some(published) =
            store::lock_relay_position(&mut tx, &self.commands_topic, partition).await?
        else {
            return Ok(0);
        };
        let (producer, fresh) = self.producer(partition, identity).await?;
        let restored = self
            .recorded
            .lock()
            .expect("recorded positions")
            .get(&partition)
            .is_some_and(|r| published < *r);
        if fresh || restored {
            // Taking the partition: decide, without the row lock (reading the topics can
            // take long), whether what is on the topics agrees with the recorded position.
            // The producer already fenced earlier relays of this partition.
            tx.rollback().await.map_err(StoreError::from)?;
            if let Err(e) = self
                .take_over(partition, published, restored, identity)
                .await
            {
                self.producers.lock().expect("producers").remove(&partition);
                return Err(e);
            }
            tx = self.pool.begin().await.map_err(StoreError::from)?;
            let Some(now) =
                store::lock_relay_position(&mut tx, &self.commands_topic, partition).await?
            else {
                return Ok(0);
            };
            if now != published {
                // Another relay moved it meanwhile (and fenced this one): start over.
                self.producers.lock().expect("producers").remove(&partition);
                return Ok(0);
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
        // Rows found already on their topic when the partition was taken are not sent
        // again; the position still moves past them.
        let mut skipped: Vec<String> = Vec::new();
        let rows: Vec<store::OutboxMessage> = {
            let skip = self.skip.lock().expect("skipped identities");
            match skip.get(&partition) {
                Some(ids) if !ids.is_empty() => rows
                    .into_iter()
                    .filter(|r| match &r.message_id {
                        Some(id) if ids.contains(id) => {
                            skipped.push(id.clone());
                            false
                        }
                        _ => true,
                    })
                    .collect(),
                _ => rows,
            }
        };

        // Replies whose topic does not exist go nowhere; the position still moves past them.
        let missing = self.missing_reply_topics(&producer, &rows).await;
        let (rows, undeliverable): (Vec<store::OutboxMessage>, Vec<store::OutboxMessage>) =
            if missing.is_empty() {
                (rows, Vec::new())
            } else {
                rows.into_iter()
                    .partition(|r| !(is_reply(r) && missing.contains(&r.topic)))
            };
        if !undeliverable.is_empty() {
            self.metrics
                .replies_undeliverable
                .inc_by(undeliverable.len() as u64);
            tracing::warn!(
                partition,
                replies = undeliverable.len(),
                topics = ?missing,
                "dropped replies to topics that do not exist (the commands named them as \
                 replyto); create the topic to get replies there"
            );
        }

        producer
            .begin_transaction()
            .map_err(|e| RelayError::Kafka(e.to_string()))?;
        let published_batch = self
            .publish(&producer, &rows, partition, last, identity)
            .await;
        if let Err(e) = published_batch {
            let aborting = producer.clone();
            let _ = blocking(move || aborting.abort_transaction(KAFKA_TIMEOUT)).await;
            // A reply topic deleted since it was looked up fails the batch: look again.
            let mut known = self.reply_topics.lock().expect("reply topics");
            for r in rows.iter().filter(|r| is_reply(r)) {
                known.remove(&r.topic);
            }
            return Err(e);
        }
        self.metrics
            .publish_seconds
            .observe(read_at.elapsed().as_secs_f64());
        // Dead letters go to `<commands topic>.dlq` (`Topic::dead_letter`), events elsewhere.
        let dead_letter_topic = format!("{}.dlq", self.commands_topic);
        let dead_letters = rows.iter().filter(|r| r.topic == dead_letter_topic).count();
        let replies = rows.iter().filter(|r| is_reply(r)).count();
        // Commands handlers emitted, timers fired and outcomes sent back go to the commands
        // topic itself.
        let commands = rows
            .iter()
            .filter(|r| r.topic == self.commands_topic)
            .count();
        self.metrics
            .dead_letters_published
            .inc_by(dead_letters as u64);
        self.metrics.replies_published.inc_by(replies as u64);
        self.metrics.commands_published.inc_by(commands as u64);
        self.metrics
            .events_published
            .inc_by((rows.len() - dead_letters - replies - commands) as u64);
        crate::failpoint::crash_if("relay-crash-after-publish");
        store::mark_published(&mut tx, &self.commands_topic, partition, last).await?;
        if !skipped.is_empty() {
            store::forget_found_published(&mut tx, &self.commands_topic, partition, &skipped)
                .await?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        self.recorded
            .lock()
            .expect("recorded positions")
            .insert(partition, last);
        if !skipped.is_empty() {
            self.metrics.relay_rows_skipped.inc_by(skipped.len() as u64);
            if let Some(ids) = self
                .skip
                .lock()
                .expect("skipped identities")
                .get_mut(&partition)
            {
                for id in &skipped {
                    ids.remove(id);
                }
            }
            tracing::info!(
                partition,
                skipped = skipped.len(),
                up_to = last,
                "skipped outbox rows already on their topic"
            );
        }
        {
            let mut shrink = self.shrink.lock().expect("rows to shrink");
            if !shrink.is_empty() {
                shrink.retain(|(p, seq)| *p != partition || *seq > last);
            }
        }
        tracing::debug!(
            partition,
            published = rows.len(),
            up_to = last,
            "relayed outbox rows"
        );
        Ok(rows.len())
    }

    /// Takes a partition: compares the trusted Kafka position with the recorded one,
    /// reconciles with the destination topics when they differ, and loads the identities
    /// to skip.
    async fn take_over(
        &self,
        partition: i32,
        published: i64,
        restored: bool,
        identity: &Identity,
    ) -> Result<(), RelayError> {
        let in_kafka = self.kafka_position(partition, identity).await?;
        if in_kafka != Some(published) {
            let published_at =
                store::relay_published_at(&self.pool, &self.commands_topic, partition).await?;
            if in_kafka.is_none() && published_at.is_none() && !restored {
                // Nothing was ever recorded or committed: nothing can be on the topics.
            } else {
                match in_kafka {
                    Some(k) if k > published => tracing::info!(
                        partition,
                        recorded = published,
                        in_kafka = k,
                        "a previous relay published past its recorded position; reading the topics back to skip what it published, then resuming after what Kafka committed"
                    ),
                    _ => tracing::warn!(
                        partition,
                        recorded = published,
                        in_kafka = ?in_kafka,
                        restored,
                        "the Kafka position is not the recorded one (a restore, or offsets expired, reset or deleted); reading the topics back to publish nothing twice"
                    ),
                }
                self.reconcile(partition, published, published_at, identity)
                    .await?;
            }
        }
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let found = store::found_published(&mut tx, &self.commands_topic, partition).await?;
        tx.commit().await.map_err(StoreError::from)?;
        if !found.is_empty() {
            tracing::info!(
                partition,
                identities = found.len(),
                "outbox rows already on their topic will be skipped"
            );
        }
        self.skip
            .lock()
            .expect("skipped identities")
            .insert(partition, found);
        self.recorded
            .lock()
            .expect("recorded positions")
            .insert(partition, published);
        Ok(())
    }

    /// Reads the destination topics from a little before the recorded position's time and
    /// stores the identities this relay identity published for the partition.
    async fn reconcile(
        &self,
        partition: i32,
        published: i64,
        published_at: Option<chrono::DateTime<chrono::Utc>>,
        identity: &Identity,
    ) -> Result<(), RelayError> {
        let mut topics = store::outbox_topics(&self.pool, &self.commands_topic, partition).await?;
        for t in self
            .destinations
            .iter()
            .cloned()
            .chain([format!("{}.dlq", self.commands_topic)])
        {
            if !topics.contains(&t) {
                topics.push(t);
            }
        }
        self.metrics.relay_reconciles.inc();
        let since =
            published_at.map(|t| t.timestamp_millis() - RECONCILE_MARGIN.as_millis() as i64);
        let scan = Scan {
            brokers: self.brokers.clone(),
            topics,
            since_ms: since,
            relay: relay_header(&identity.deployment, &self.commands_topic, partition),
            partition,
        };
        let found = tokio::task::spawn_blocking(move || scan.run())
            .await
            .map_err(|e| RelayError::Kafka(format!("reading the topics back: {e}")))??;
        let stored = store::record_found_published(
            &self.pool,
            &self.commands_topic,
            partition,
            published,
            &found.ids,
        )
        .await?;
        tracing::info!(
            partition,
            scanned = found.scanned,
            found = found.ids.len(),
            to_skip = stored,
            "read the topics back"
        );
        Ok(())
    }

    /// Sends the rows and commits them with the position in one Kafka transaction.
    async fn publish(
        &self,
        producer: &Arc<FutureProducer>,
        rows: &[store::OutboxMessage],
        partition: i32,
        last: i64,
        identity: &Identity,
    ) -> Result<(), RelayError> {
        let relay = relay_header(&identity.deployment, &self.commands_topic, partition);
        // Enqueue every message in order before awaiting any: the producer keeps that order
        // per Kafka partition, retries included.
        let mut pending = Vec::with_capacity(rows.len());
        // Rows the broker refused before (rare): looked up once per batch.
        let refused: HashSet<i64> = {
            let shrink = self.shrink.lock().expect("rows to shrink");
            shrink
                .iter()
                .filter(|(p, _)| *p == partition)
                .map(|(_, seq)| *seq)
                .collect()
        };
        for row in rows {
            let mut whole = refused.is_empty() || !refused.contains(&row.seq);
            loop {
                let shrunk;
                let (payload, headers, sent_whole) = if whole && self.fits(row, &relay) {
                    (row.payload.as_deref(), row.headers.as_slice(), true)
                } else {
                    shrunk = shrink(row);
                    (Some(shrunk.0.as_slice()), shrunk.1.as_slice(), false)
                };
                let mut owned = OwnedHeaders::new_with_capacity(headers.len() + 2);
                for (k, v) in headers {
                    owned = owned.insert(Header {
                        key: k,
                        value: v.as_deref(),
                    });
                }
                if let Some(id) = &row.message_id {
                    owned = owned.insert(Header {
                        key: MESSAGE_ID_HEADER,
                        value: Some(id.as_bytes()),
                    });
                }
                owned = owned.insert(Header {
                    key: RELAY_HEADER,
                    value: Some(relay.as_bytes()),
                });
                let mut record: FutureRecord<'_, [u8], [u8]> =
                    FutureRecord::to(&row.topic).headers(owned);
                if let Some(k) = &row.key {
                    record = record.key(k);
                }
                if let Some(p) = payload {
                    record = record.payload(p);
                }
                let sent = loop {
                    match producer.send_result(record) {
                        Ok(f) => break Ok(f),
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                            record = r;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err((e, _)) => break Err(e),
                    }
                };
                match sent {
                    Ok(f) => {
                        // What a refusal is blamed on: the largest row sent whole.
                        let sent = if sent_whole {
                            message_size(row, &relay)
                        } else {
                            0
                        };
                        pending.push((row.seq, sent, f));
                        break;
                    }
                    Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge))
                        if whole =>
                    {
                        tracing::warn!(
                            partition,
                            seq = row.seq,
                            "the producer refused an outbox row as too large; publishing it with its payload left out"
                        );
                        whole = false;
                    }
                    Err(e) => return Err(RelayError::Kafka(e.to_string())),
                }
            }
        }
        let mut too_large: Option<(usize, i64)> = None;
        let mut failed = None;
        let omitted = pending.iter().filter(|(_, size, _)| *size == 0).count();
        for (seq, size, f) in pending {
            match f.await {
                Ok(Ok(_)) => {}
                Ok(Err((
                    KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                    _,
                ))) => {
                    if size > 0 && too_large.is_none_or(|(s, _)| size > s) {
                        too_large = Some((size, seq));
                    }
                    failed.get_or_insert_with(|| {
                        RelayError::Kafka(format!(
                            "the broker refused outbox row {seq} of partition {partition} as too large"
                        ))
                    });
                }
                Ok(Err((e, _))) => {
                    failed.get_or_insert(RelayError::Kafka(e.to_string()));
                }
                Err(_) => {
                    failed.get_or_insert(RelayError::Kafka("delivery was cancelled".into()));
                }
            }
        }
        if let Some((_, seq)) = too_large {
            // The broker (the topic's `max.message.bytes`) refused it: the largest refused
            // row goes out without its payload at the next attempt. One at a time, since a
            // refused batch fails every message in it.
            tracing::warn!(
                partition,
                seq,
                "the broker refused an outbox row as too large; it will be published with its payload left out"
            );
            self.shrink
                .lock()
                .expect("rows to shrink")
                .insert((partition, seq));
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let mut position = TopicPartitionList::new();
        position
            .add_partition(&self.commands_topic, partition)
            .set_metadata(position_metadata(&identity.deployment, last));
        position
            .set_partition_offset(&self.commands_topic, partition, Offset::Offset(last))
            .map_err(|e| RelayError::Kafka(e.to_string()))?;
        let (producer, group) = (producer.clone(), identity.group.clone());
        blocking(move || {
            producer.send_offsets_to_transaction(&position, &group, KAFKA_TIMEOUT)?;
            producer.commit_transaction(KAFKA_TIMEOUT)
        })
        .await
        .map_err(|e| RelayError::Kafka(format!("committing the Kafka transaction: {e}")))?;
        self.metrics.payloads_omitted.inc_by(omitted as u64);
        Ok(())
    }

    /// Whether a row fits in one message with the headers the relay adds.
    fn fits(&self, row: &store::OutboxMessage, relay: &str) -> bool {
        message_size(row, relay) <= self.max_message_bytes
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
                    // A failing partition is retried when its own backoff ends.
                    let wait = self
                        .next_retry_in()
                        .map_or(self.poll_interval, |d| d.min(self.poll_interval));
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(wait) => {}
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

/// The bytes a row takes in a message: key, payload and headers, with the two headers the
/// relay adds (`relay` is the `cmdproc-relay` value) and a little for framing.
fn message_size(row: &store::OutboxMessage, relay: &str) -> usize {
    let headers: usize = row
        .headers
        .iter()
        .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 8)
        .sum();
    row.key.as_ref().map_or(0, Vec::len)
        + row.payload.as_ref().map_or(0, Vec::len)
        + headers
        + MESSAGE_ID_HEADER.len()
        + row.message_id.as_ref().map_or(0, String::len)
        + RELAY_HEADER.len()
        + relay.len()
        + 64
}

/// A row's payload replaced by a small reference, and its headers saying so. An event
/// keeps its CloudEvent attributes (its id among them) without `data`; a dead letter
/// names its `dead_letters` row; anything else its identity. When even the original
/// headers are too many, only the `cmdproc-` ones are kept.
fn shrink(row: &store::OutboxMessage) -> (Vec<u8>, Vec<crate::batch::Header>) {
    let size = row.payload.as_ref().map_or(0, Vec::len);
    let header = |name: &str| {
        row.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let reference = if let Some(topic) = header("cmdproc-original-topic") {
        let number = |name: &str| header(name).and_then(|v| v.parse::<i64>().ok());
        serde_json::json!({
            "omitted": "too_large",
            "size": size,
            "dead_letter": {
                "topic": topic,
                "partition": number("cmdproc-original-partition"),
                "offset": number("cmdproc-original-offset"),
            },
        })
    } else {
        let envelope = row
            .payload
            .as_deref()
            .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
            .filter(serde_json::Value::is_object)
            .map(|mut e| {
                if let Some(o) = e.as_object_mut() {
                    o.remove("data");
                    o.remove("data_base64");
                }
                e
            })
            .filter(|e| serde_json::to_vec(e).map_or(0, |v| v.len()) < 64 * 1024);
        envelope.unwrap_or_else(|| {
            serde_json::json!({
                "omitted": "too_large",
                "size": size,
                "id": row.message_id,
            })
        })
    };
    let original: usize = row
        .headers
        .iter()
        .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
        .sum();
    let mut headers: Vec<crate::batch::Header> = row
        .headers
        .iter()
        .filter(|(k, _)| original < 64 * 1024 || k.starts_with("cmdproc-"))
        .filter(|(k, _)| k != "content-length")
        .cloned()
        .collect();
    headers.push((
        PAYLOAD_OMITTED_HEADER.to_owned(),
        Some(b"too_large".to_vec()),
    ));
    headers.push((
        PAYLOAD_SIZE_HEADER.to_owned(),
        Some(size.to_string().into_bytes()),
    ));
    (
        serde_json::to_vec(&reference).expect("JSON serializes"),
        headers,
    )
}

/// What a reconciliation found.
struct Found {
    ids: Vec<String>,
    scanned: u64,
}

/// Whether an outbox row is a reply (to the topic its command named as `replyto`).
fn is_reply(row: &store::OutboxMessage) -> bool {
    row.message_id
        .as_deref()
        .is_some_and(|id| id.starts_with(store::REPLY_MESSAGE_PREFIX))
}

/// A read of the destination topics for the identities one relay identity published.
struct Scan {
    brokers: String,
    topics: Vec<String>,
    /// Where to start, in milliseconds since the epoch; from the beginning when `None`.
    since_ms: Option<i64>,
    /// The `cmdproc-relay` header to look for.
    relay: String,
    partition: i32,
}

impl Scan {
    /// Reads every partition of the topics, `read_committed`, from the start time to the
    /// end it had when the read began. Blocking.
    fn run(self) -> Result<Found, RelayError> {
        let kafka = |e: KafkaError| RelayError::Kafka(format!("reading the topics back: {e}"));
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", "cmdproc-relay-reconcile")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .create()
            .map_err(kafka)?;
        let mut ends: HashMap<(String, i32), i64> = HashMap::new();
        let mut starts = TopicPartitionList::new();
        for topic in &self.topics {
            let md = consumer
                .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
                .map_err(kafka)?;
            let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
                continue;
            };
            if t.error().is_some() {
                // No such topic: nothing was published to it.
                continue;
            }
            for p in t.partitions() {
                let (low, high) = consumer
                    .fetch_watermarks(topic, p.id(), KAFKA_TIMEOUT)
                    .map_err(kafka)?;
                if high <= low {
                    continue;
                }
                ends.insert((topic.clone(), p.id()), high);
                let start = match self.since_ms {
                    Some(ms) => Offset::Offset(ms.max(0)),
                    None => Offset::Beginning,
                };
                starts
                    .add_partition_offset(topic, p.id(), start)
                    .map_err(kafka)?;
            }
        }
        if self.since_ms.is_some() && starts.count() > 0 {
            let resolved = consumer
                .offsets_for_times(starts, KAFKA_TIMEOUT)
                .map_err(kafka)?;
            starts = TopicPartitionList::new();
            for e in resolved.elements() {
                let key = (e.topic().to_owned(), e.partition());
                match e.offset() {
                    Offset::Offset(o) if o < ends[&key] => {
                        starts
                            .add_partition_offset(e.topic(), e.partition(), Offset::Offset(o))
                            .map_err(kafka)?;
                    }
                    // Nothing as recent as the start time.
                    _ => {
                        ends.remove(&key);
                    }
                }
            }
        }
        let mut found = Found {
            ids: Vec::new(),
            scanned: 0,
        };
        if ends.is_empty() {
            return Ok(found);
        }
        consumer.assign(&starts).map_err(kafka)?;
        let mut done: HashSet<(String, i32)> = HashSet::new();
        let mut last_progress = Instant::now();
        let mut last_report = Instant::now();
        while done.len() < ends.len() {
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    last_progress = Instant::now();
                    found.scanned += 1;
                    if let Some(headers) = m.headers() {
                        let mut relay = false;
                        let mut id = None;
                        for h in headers.iter() {
                            if h.key == RELAY_HEADER {
                                relay = h.value == Some(self.relay.as_bytes());
                            } else if h.key == MESSAGE_ID_HEADER {
                                id = h.value;
                            }
                        }
                        if let (true, Some(id)) = (relay, id) {
                            found.ids.push(String::from_utf8_lossy(id).into_owned());
                        }
                    }
                    let key = (m.topic().to_owned(), m.partition());
                    if ends.get(&key).is_some_and(|end| m.offset() + 1 >= *end) {
                        done.insert(key);
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) | None => {
                    // Transaction markers and aborted messages take offsets no message is
                    // read at: look at the positions.
                    let positions = consumer.position().map_err(kafka)?;
                    for e in positions.elements() {
                        let key = (e.topic().to_owned(), e.partition());
                        if let (Offset::Offset(o), Some(end)) = (e.offset(), ends.get(&key)) {
                            if o >= *end && done.insert(key) {
                                last_progress = Instant::now();
                            }
                        }
                    }
                }
                Some(Err(e)) => return Err(kafka(e)),
            }
            if last_progress.elapsed() > RECONCILE_STALL {
                return Err(RelayError::Kafka(format!(
                    "reading the topics back for partition {}: no progress for {:?} ({} of {} topic partitions read)",
                    self.partition,
                    RECONCILE_STALL,
                    done.len(),
                    ends.len()
                )));
            }
            if last_report.elapsed() > Duration::from_secs(5) {
                last_report = Instant::now();
                tracing::info!(
                    partition = self.partition,
                    scanned = found.scanned,
                    found = found.ids.len(),
                    read = done.len(),
                    of = ends.len(),
                    "reading the topics back"
                );
            }
        }
        Ok(found)
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
