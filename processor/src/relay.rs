//! The outbox relay: publishes outbox rows in sequence order per commands partition.
//!
//! A relay locks a partition's row in `relay_positions` (`FOR UPDATE SKIP LOCKED`) for the
//! transaction in which it publishes, so any number of relays (one inside every worker,
//! plus standalone `cmdproc relay` processes) share the work without two of them ever
//! publishing the same partition at once or out of order.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::{self, StoreError};

/// Errors of the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Kafka did not take a message.
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

/// Publishes the outbox of one commands topic.
pub struct Relay {
    pool: PgPool,
    producer: FutureProducer,
    commands_topic: String,
    batch_size: i64,
    wake: Arc<Notify>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("commands_topic", &self.commands_topic)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Creates a relay with its own idempotent producer.
    pub fn new(
        pool: PgPool,
        brokers: &str,
        commands_topic: &str,
        batch_size: i64,
    ) -> Result<Self, RelayError> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "2")
            .set("message.timeout.ms", "30000")
            .create::<FutureProducer>()
            .map_err(|e| RelayError::Kafka(e.to_string()))?;
        Ok(Self {
            pool,
            producer,
            commands_topic: commands_topic.to_owned(),
            batch_size,
            wake: Arc::new(Notify::new()),
        })
    }

    /// A handle that wakes the relay early, e.g. right after a worker commits a batch.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Publishes what is waiting, one batch per partition with a backlog.
    pub async fn relay_once(&self) -> Result<RelayOutcome, RelayError> {
        let backlog = store::outbox_backlog(&self.pool, &self.commands_topic).await?;
        let mut total = 0;
        for b in backlog {
            total += self.relay_partition(b.partition).await?;
        }
        Ok(if total == 0 {
            RelayOutcome::Idle
        } else {
            RelayOutcome::Relayed(total)
        })
    }

    #[tracing::instrument(skip_all, fields(partition))]
    async fn relay_partition(&self, partition: i32) -> Result<usize, RelayError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let Some(published) = store::lock_relay_position(&mut tx, partition).await? else {
            return Ok(0);
        };
        let rows = store::next_outbox_rows(&mut tx, partition, published, self.batch_size).await?;
        let Some(last) = rows.last().map(|r| r.seq) else {
            return Ok(0);
        };
        // Enqueue every message in order before awaiting any: the idempotent producer keeps
        // that order per Kafka partition, retries included.
        let mut pending = Vec::with_capacity(rows.len());
        for row in &rows {
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
                match self.producer.send_result(record) {
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
        store::mark_published(&mut tx, partition, last).await?;
        tx.commit().await.map_err(StoreError::from)?;
        tracing::debug!(
            partition,
            published = rows.len(),
            up_to = last,
            "relayed outbox rows"
        );
        Ok(rows.len())
    }

    /// Runs until `shutdown`, then drains what is waiting for at most `drain`.
    pub async fn run(&self, shutdown: CancellationToken, drain: Duration) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            match self.relay_once().await {
                Ok(RelayOutcome::Relayed(_)) => backoff = Duration::from_millis(100),
                Ok(RelayOutcome::Idle) => {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "relay step failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(crate::retry::jitter(backoff)) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
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
        let _ = self.producer.flush(Duration::from_secs(5));
    }
}
