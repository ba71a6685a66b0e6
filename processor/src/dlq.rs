//! Dead letters and parked aggregates: listing them, submitting dead letters again, and
//! releasing a parked aggregate by re-applying its commands in their original order.

use crate::producer::CommandProducer;
use chrono::{DateTime, Utc};
use commands::envelope::Command;
use commands::Registry;
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use sqlx::PgPool;

use crate::batch::{self, Incoming, PlanOptions};
use crate::error::{OperatorError, Result};
use crate::store::{self, BatchTarget, SkippedCommand, StoreError};

/// Which dead letters an operator means.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this kind (`schema`, `handler_panic`, ...).
    pub reason: Option<String>,
    /// Only this aggregate: `(type, id)`.
    pub aggregate: Option<(String, String)>,
    /// Only these positions: `(partition, offset)`.
    pub ids: Vec<(i32, i64)>,
}

/// A dead letter as stored.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Commands partition.
    pub partition: i32,
    /// Offset in it.
    pub offset: i64,
    /// Kind.
    pub kind: String,
    /// Why.
    pub message: String,
    /// Aggregate, when known.
    pub aggregate: Option<(String, String)>,
    /// Original key.
    pub key: Option<Vec<u8>>,
    /// Original value.
    pub value: Option<Vec<u8>>,
    /// Original headers.
    pub headers: Vec<batch::Header>,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
    /// When it was last submitted again, or re-applied by releasing its aggregate.
    pub redriven_at: Option<DateTime<Utc>>,
    /// When an operator skipped it, and why.
    pub skipped: Option<(DateTime<Utc>, String)>,
}

impl DeadLetter {
    /// Whether it was redriven or skipped before: a redrive leaves it out unless asked.
    pub fn handled(&self) -> bool {
        self.redriven_at.is_some() || self.skipped.is_some()
    }
}

/// A parked aggregate and its commands waiting.
#[derive(Debug, Clone)]
pub struct Parked {
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Why it was parked.
    pub reason: String,
    /// Its commands partition.
    pub partition: i32,
    /// Offset of the poison command.
    pub first_offset: i64,
    /// When.
    pub parked_at: DateTime<Utc>,
    /// Commands set aside and not yet skipped.
    pub waiting: i64,
    /// Commands skipped by an operator.
    pub skipped: i64,
}

/// Dead letters of `topic` matching `filter`, oldest first.
pub async fn list(
    pool: &PgPool,
    topic: &str,
    filter: &Filter,
    limit: i64,
) -> store::Result<Vec<DeadLetter>> {
    let rows = store::list_dead_letters(
        pool,
        topic,
        filter.reason.as_deref(),
        filter
            .aggregate
            .as_ref()
            .map(|a| (a.0.as_str(), a.1.as_str())),
        &filter.ids,
        limit,
    )
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| DeadLetter {
            partition: r.partition,
            offset: r.offset,
            kind: r.kind,
            message: r.message,
            aggregate: r.aggregate_type.zip(r.aggregate_id),
            key: r.key,
            value: r.value,
            headers: r.headers,
            created_at: r.created_at,
            redriven_at: r.redriven_at,
            skipped: r
                .skipped_at
                .map(|at| (at, r.skip_reason.unwrap_or_default())),
        })
        .collect())
}

/// Parked aggregates of `topic`, with how many commands wait behind each.
pub async fn parked(
    pool: &PgPool,
    topic: &str,
    aggregate: Option<&(String, String)>,
) -> store::Result<Vec<Parked>> {
    let rows =
        store::list_parked(pool, topic, aggregate.map(|a| (a.0.as_str(), a.1.as_str()))).await?;
    Ok(rows
        .into_iter()
        .map(|r| Parked {
            aggregate_type: r.aggregate_type,
            aggregate_id: r.aggregate_id,
            reason: r.reason,
            partition: r.partition,
            first_offset: r.first_offset,
            parked_at: r.parked_at,
            waiting: r.waiting,
            skipped: r.skipped,
        })
        .collect())
}

/// Submits dead letters to the commands topic again, with their original key, value and
/// headers, so the command keeps its id: one that was applied meanwhile is a duplicate.
/// Commands of parked aggregates are not submitted (they are released instead).
pub async fn resubmit(
    pool: &PgPool,
    producer: &CommandProducer,
    letters: &[DeadLetter],
) -> Result<usize> {
    let mut sent = Vec::new();
    for dl in letters {
        let mut headers = OwnedHeaders::new_with_capacity(dl.headers.len());
        for (k, v) in &dl.headers {
            headers = headers.insert(KafkaHeader {
                key: k,
                value: v.as_deref(),
            });
        }
        producer
            .send_raw(dl.key.as_deref(), dl.value.as_deref(), Some(headers))
            .await?;
        sent.push((dl.partition, dl.offset));
    }
    store::mark_redriven(pool, producer.topic().as_str(), &sent).await?;
    Ok(sent.len())
}

/// What releasing a parked aggregate did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Released {
    /// Commands applied.
    pub applied: usize,
    /// Commands rejected by the aggregate.
    pub rejected: usize,
    /// Commands that were duplicates of ones applied before, or refused for reusing the key
    /// of one processed before with another payload (`key_reused`).
    pub duplicates: usize,
    /// Commands skipped by an operator earlier, left out.
    pub skipped: usize,
    /// Whether the aggregate failed again and is parked once more.
    pub parked_again: bool,
}

/// Topics a release writes to.
#[derive(Debug, Clone, Copy)]
pub struct Topics<'a> {
    /// Commands topic.
    pub commands: &'a str,
    /// Its dead-letter topic.
    pub dead_letters: &'a str,
    /// Events topic.
    pub events: &'a str,
}

/// Re-applies a parked aggregate's waiting commands in their original order and releases
/// it, in one transaction that holds its partition's row lock: the partition's owner
/// cannot commit a batch meanwhile, so the aggregate's later commands are applied after
/// these, and the outbox sequence stays gap-free. If the handler fails again, the aggregate
/// is parked again with the rest of its commands.
pub async fn release(
    pool: &PgPool,
    registry: &Registry,
    topics: Topics<'_>,
    aggregate: &(String, String),
    options: &PlanOptions,
) -> Result<Option<Released>> {
    let mut tx = pool.begin().await.map_err(StoreError::from)?;
    let parked_aggregate = (aggregate.0.as_str(), aggregate.1.as_str());
    let Some(partition) =
        store::parked_partition(&mut tx, topics.commands, parked_aggregate).await?
    else {
        return Ok(None);
    };
    let locked = store::lock_partition(&mut tx, topics.commands, partition).await?;
    let (epoch, outbox_seq) = (locked.epoch, locked.outbox_seq);

    let waiting = store::waiting_commands(&mut tx, topics.commands, parked_aggregate).await?;
    let mut released = Released::default();
    let mut messages = Vec::new();
    for command in waiting {
        if command.skipped {
            released.skipped += 1;
            continue;
        }
        let hs: Vec<(&str, Option<&[u8]>)> = command
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        let decoded = Command::decode(
            command.key.as_deref(),
            &hs,
            command.value.as_deref(),
            registry.schemas(),
        );
        messages.push(Incoming {
            offset: command.offset,
            timestamp: None,
            key: command.key,
            value: command.value,
            headers: command.headers,
            decoded,
        });
    }

    store::unpark(&mut tx, topics.commands, parked_aggregate).await?;
    let target = BatchTarget {
        topic: topics.commands,
        dead_letter_topic: topics.dead_letters,
        events_topic: topics.events,
        partition,
        epoch,
        expected_next: None,
    };
    // The parked row is gone, so the plan applies the waiting commands; if the handler
    // fails again it parks the aggregate anew.
    let (plan, outbox_end) =
        store::plan_and_write(&mut tx, &target, registry, options, &messages, outbox_seq).await?;
    store::store_outbox_seq(&mut tx, topics.commands, partition, outbox_end).await?;
    let done: Vec<i64> = plan
        .processed
        .iter()
        .map(|p| p.offset)
        .chain(plan.duplicates.iter().map(|d| d.offset))
        .collect();
    store::mark_parked_redriven(&mut tx, topics.commands, partition, &done).await?;
    tx.commit().await.map_err(StoreError::from)?;
    for refused in plan.duplicates.iter().filter(|d| d.key_reused()) {
        tracing::info!(
            partition,
            offset = refused.offset,
            source = %refused.source,
            command_id = %refused.command_id,
            "idempotency key reused with another payload: refused (key_reused), no effect"
        );
    }
    released.applied = plan.applied();
    released.rejected = plan.rejected();
    released.duplicates = plan.duplicates.len();
    released.parked_again = !plan.newly_parked.is_empty();
    Ok(Some(released))
}

/// What `skip` recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The skipped command's aggregate, when the message names one.
    pub aggregate: Option<(String, String)>,
    /// The command's `(source, id)`, recorded with outcome `skipped`; `None` when the message
    /// cannot be decoded into a command (then only the dead letter is marked).
    pub command: Option<(String, String)>,
    /// Whether it was a waiting command of a parked aggregate (a release leaves it out).
    pub was_parked: bool,
}

/// Skips the dead letter at `partition`:`offset` of `topic` (a waiting command of a parked
/// aggregate, or any other dead letter), with the operator's reason. The command's
/// `(source, id)` gets the recorded outcome `skipped`, so every later delivery of it (a
/// replay, a redrive, a client's retry) is a duplicate without effect, and `verify` leaves
/// it out; the dead letter is marked, so a redrive leaves it out unless asked. One
/// transaction; refused when there is no such dead letter, when it was skipped or
/// re-applied before, or when the command already has an outcome.
pub async fn skip(
    pool: &PgPool,
    registry: &Registry,
    topic: &str,
    partition: i32,
    offset: i64,
    why: &str,
) -> Result<Skipped> {
    let mut tx = pool.begin().await.map_err(StoreError::from)?;
    let Some(letter) = store::lock_dead_letter(&mut tx, topic, partition, offset).await? else {
        return Err(OperatorError::Refused(format!(
            "no dead letter at partition {partition} offset {offset} of {topic}; \
             `cmdproc dlq list` shows the dead letters and parked aggregates"
        )));
    };
    if letter.skipped {
        return Err(OperatorError::Refused(format!(
            "partition {partition} offset {offset} of {topic} was skipped already"
        )));
    }
    let was_parked = letter.parked.is_some();
    if letter.parked.as_ref().is_some_and(|c| c.redriven) {
        return Err(OperatorError::Refused(format!(
            "partition {partition} offset {offset} of {topic} was re-applied when its aggregate \
             was released; there is nothing left to skip"
        )));
    }
    let hs: Vec<(&str, Option<&[u8]>)> = letter
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_deref()))
        .collect();
    let decoded = Command::decode(
        letter.key.as_deref(),
        &hs,
        letter.value.as_deref(),
        registry.schemas(),
    )
    .ok();
    // A parked command decoded when it was parked; its row names it even if the schemas
    // changed since. Another dead letter names its command only if it decodes.
    let command: Option<(String, String, String, String, String)> = match (&decoded, &letter.parked)
    {
        (Some(c), _) => Some((
            c.source.to_string(),
            c.id.to_string(),
            c.command_type.aggregate_type().to_owned(),
            c.subject.to_string(),
            c.command_type.to_string(),
        )),
        (None, Some(parked)) => Some((
            parked.source.clone(),
            parked.command_id.clone(),
            parked.aggregate_type.clone(),
            parked.aggregate_id.clone(),
            String::from("unknown"),
        )),
        (None, None) => None,
    };
    if let Some((source, id, aggregate_type, aggregate_id, command_type)) = &command {
        let existing = store::recorded_outcome(&mut tx, source, id).await?;
        if let Some(outcome) = existing {
            return Err(OperatorError::Refused(format!(
                "command {id} from {source} already has the outcome `{outcome}`; skipping it now would change nothing"
            )));
        }
        let skipped = SkippedCommand {
            source,
            command_id: id,
            aggregate_type,
            aggregate_id,
            command_type,
            reason: why,
            topic,
            partition,
            offset,
        };
        store::record_skipped(&mut tx, &skipped).await?;
    }
    store::mark_dead_letter_skipped(&mut tx, topic, partition, offset, why).await?;
    store::mark_parked_skipped(&mut tx, topic, partition, offset, why).await?;
    tx.commit().await.map_err(StoreError::from)?;
    let named: Option<(String, String)> = letter.aggregate_type.zip(letter.aggregate_id);
    Ok(Skipped {
        aggregate: command
            .as_ref()
            .map(|(_, _, t, i, _)| (t.clone(), i.clone()))
            .or(named),
        command: command.map(|(s, i, _, _, _)| (s, i)),
        was_parked,
    })
}
