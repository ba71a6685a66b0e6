//! Dead letters and parked aggregates: listing them, submitting dead letters again, and
//! releasing a parked aggregate by re-applying its commands in their original order.

use crate::producer::CommandProducer;
use chrono::{DateTime, Utc};
use commands::envelope::Command;
use commands::Registry;
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use sqlx::{PgPool, Row};

use crate::batch::{self, headers_from_json, Incoming, PlanOptions};
use crate::error::{OperatorError, Result};
use crate::store::{self, BatchTarget, StoreError};

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
    let (parts, offs): (Vec<i32>, Vec<i64>) = filter.ids.iter().copied().unzip();
    let rows = sqlx::query(
        "SELECT d.partition, d.\"offset\", d.kind, d.message, d.aggregate_type, d.aggregate_id, d.key,
                d.value, d.headers, d.created_at, COALESCE(d.redriven_at, c.redriven_at),
                COALESCE(d.skipped_at, c.skipped_at), COALESCE(d.skip_reason, c.skip_reason)
         FROM dead_letters d
         LEFT JOIN parked_commands c
           ON c.topic = d.topic AND c.partition = d.partition AND c.\"offset\" = d.\"offset\"
         WHERE d.topic = $1
           AND ($2::text IS NULL OR d.kind = $2)
           AND ($3::text IS NULL OR (d.aggregate_type = $3 AND d.aggregate_id = $4))
           AND (cardinality($5::int[]) = 0
                OR (d.partition, d.\"offset\") IN (SELECT * FROM UNNEST($5::int[], $6::bigint[])))
         ORDER BY d.created_at, d.partition, d.\"offset\"
         LIMIT $7",
    )
    .bind(topic)
    .bind(filter.reason.as_deref())
    .bind(filter.aggregate.as_ref().map(|a| a.0.as_str()))
    .bind(filter.aggregate.as_ref().map(|a| a.1.as_str()))
    .bind(&parts)
    .bind(&offs)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let t: Option<String> = r.get(4);
            let i: Option<String> = r.get(5);
            DeadLetter {
                partition: r.get(0),
                offset: r.get(1),
                kind: r.get(2),
                message: r.get(3),
                aggregate: t.zip(i),
                key: r.get(6),
                value: r.get(7),
                headers: headers_from_json(&r.get::<serde_json::Value, _>(8)),
                created_at: r.get(9),
                redriven_at: r.get(10),
                skipped: r
                    .get::<Option<DateTime<Utc>>, _>(11)
                    .map(|at| (at, r.get::<Option<String>, _>(12).unwrap_or_default())),
            }
        })
        .collect())
}

/// Parked aggregates of `topic`, with how many commands wait behind each.
pub async fn parked(
    pool: &PgPool,
    topic: &str,
    aggregate: Option<&(String, String)>,
) -> store::Result<Vec<Parked>> {
    let rows = sqlx::query(
        "SELECT a.aggregate_type, a.aggregate_id, a.reason, a.partition, a.first_offset, a.parked_at,
                count(c.*) FILTER (WHERE c.redriven_at IS NULL AND c.skipped_at IS NULL),
                count(c.*) FILTER (WHERE c.skipped_at IS NOT NULL)
         FROM parked_aggregates a
         LEFT JOIN parked_commands c
           ON c.aggregate_type = a.aggregate_type AND c.aggregate_id = a.aggregate_id AND c.topic = a.topic
         WHERE a.topic = $1 AND ($2::text IS NULL OR (a.aggregate_type = $2 AND a.aggregate_id = $3))
         GROUP BY 1, 2, 3, 4, 5, 6
         ORDER BY a.parked_at",
    )
    .bind(topic)
    .bind(aggregate.map(|a| a.0.as_str()))
    .bind(aggregate.map(|a| a.1.as_str()))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Parked {
            aggregate_type: r.get(0),
            aggregate_id: r.get(1),
            reason: r.get(2),
            partition: r.get(3),
            first_offset: r.get(4),
            parked_at: r.get(5),
            waiting: r.get(6),
            skipped: r.get(7),
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
    let (parts, offs): (Vec<i32>, Vec<i64>) = sent.iter().copied().unzip();
    sqlx::query(
        "UPDATE dead_letters SET redriven_at = now()
         WHERE topic = $1 AND (partition, \"offset\") IN (SELECT * FROM UNNEST($2::int[], $3::bigint[]))",
    )
    .bind(producer.topic().as_str())
    .bind(&parts)
    .bind(&offs)
    .execute(pool)
    .await
    .map_err(StoreError::from)?;
    Ok(sent.len())
}

/// What releasing a parked aggregate did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Released {
    /// Commands applied.
    pub applied: usize,
    /// Commands rejected by the aggregate.
    pub rejected: usize,
    /// Commands that were duplicates of ones applied before.
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
    let Some(row) = sqlx::query(
        "SELECT partition FROM parked_aggregates WHERE topic = $1 AND aggregate_type = $2 AND aggregate_id = $3",
    )
    .bind(topics.commands)
    .bind(&aggregate.0)
    .bind(&aggregate.1)
    .fetch_optional(&mut *tx)
    .await
    .map_err(StoreError::from)?
    else {
        return Ok(None);
    };
    let partition: i32 = row.get(0);
    let locked = sqlx::query(
        "SELECT epoch, outbox_seq FROM partitions WHERE topic = $1 AND partition = $2 FOR UPDATE",
    )
    .bind(topics.commands)
    .bind(partition)
    .fetch_one(&mut *tx)
    .await
    .map_err(StoreError::from)?;
    let (epoch, outbox_seq): (i64, i64) = (locked.get(0), locked.get(1));

    let waiting = sqlx::query(
        "SELECT c.\"offset\", c.skipped_at IS NOT NULL, d.key, d.value, d.headers
         FROM parked_commands c
         JOIN dead_letters d ON d.topic = c.topic AND d.partition = c.partition AND d.\"offset\" = c.\"offset\"
         WHERE c.topic = $1 AND c.aggregate_type = $2 AND c.aggregate_id = $3 AND c.redriven_at IS NULL
         ORDER BY c.partition, c.\"offset\"",
    )
    .bind(topics.commands)
    .bind(&aggregate.0)
    .bind(&aggregate.1)
    .fetch_all(&mut *tx)
    .await
    .map_err(StoreError::from)?;
    let mut released = Released::default();
    let mut messages = Vec::new();
    for r in &waiting {
        if r.get::<bool, _>(1) {
            released.skipped += 1;
            continue;
        }
        let key: Option<Vec<u8>> = r.get(2);
        let value: Option<Vec<u8>> = r.get(3);
        let headers = headers_from_json(&r.get::<serde_json::Value, _>(4));
        let hs: Vec<(&str, Option<&[u8]>)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        let decoded = Command::decode(key.as_deref(), &hs, value.as_deref(), registry.schemas());
        messages.push(Incoming {
            offset: r.get(0),
            timestamp: None,
            key,
            value,
            headers,
            decoded,
        });
    }

    sqlx::query("DELETE FROM parked_aggregates WHERE topic = $1 AND aggregate_type = $2 AND aggregate_id = $3")
        .bind(topics.commands)
        .bind(&aggregate.0)
        .bind(&aggregate.1)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?;
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
    sqlx::query("UPDATE partitions SET outbox_seq = $3, updated_at = now() WHERE topic = $1 AND partition = $2")
        .bind(topics.commands)
        .bind(partition)
        .bind(outbox_end)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?;
    let done: Vec<i64> = plan
        .processed
        .iter()
        .map(|p| p.offset)
        .chain(plan.duplicates.iter().map(|d| d.offset))
        .collect();
    sqlx::query(
        "UPDATE parked_commands SET redriven_at = now()
         WHERE topic = $1 AND partition = $2 AND \"offset\" = ANY($3::bigint[])",
    )
    .bind(topics.commands)
    .bind(partition)
    .bind(&done)
    .execute(&mut *tx)
    .await
    .map_err(StoreError::from)?;
    tx.commit().await.map_err(StoreError::from)?;
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
    let Some(letter) = sqlx::query(
        "SELECT d.key, d.value, d.headers, d.skipped_at IS NOT NULL OR c.skipped_at IS NOT NULL,
                c.\"offset\" IS NOT NULL, c.redriven_at IS NOT NULL, c.source, c.command_id,
                c.aggregate_type, c.aggregate_id, d.aggregate_type, d.aggregate_id
         FROM dead_letters d
         LEFT JOIN parked_commands c
           ON c.topic = d.topic AND c.partition = d.partition AND c.\"offset\" = d.\"offset\"
         WHERE d.topic = $1 AND d.partition = $2 AND d.\"offset\" = $3
         FOR UPDATE OF d",
    )
    .bind(topic)
    .bind(partition)
    .bind(offset)
    .fetch_optional(&mut *tx)
    .await
    .map_err(StoreError::from)?
    else {
        return Err(OperatorError::Refused(format!(
            "no dead letter at partition {partition} offset {offset} of {topic}; \
             `cmdproc dlq list` shows the dead letters and parked aggregates"
        )));
    };
    if letter.get::<bool, _>(3) {
        return Err(OperatorError::Refused(format!(
            "partition {partition} offset {offset} of {topic} was skipped already"
        )));
    }
    let was_parked: bool = letter.get(4);
    if letter.get::<bool, _>(5) {
        return Err(OperatorError::Refused(format!(
            "partition {partition} offset {offset} of {topic} was re-applied when its aggregate \
             was released; there is nothing left to skip"
        )));
    }
    let key: Option<Vec<u8>> = letter.get(0);
    let value: Option<Vec<u8>> = letter.get(1);
    let headers = headers_from_json(&letter.get::<serde_json::Value, _>(2));
    let hs: Vec<(&str, Option<&[u8]>)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_deref()))
        .collect();
    let decoded = Command::decode(key.as_deref(), &hs, value.as_deref(), registry.schemas()).ok();
    // A parked command decoded when it was parked; its row names it even if the schemas
    // changed since. Another dead letter names its command only if it decodes.
    let command: Option<(String, String, String, String, String)> = match &decoded {
        Some(c) => Some((
            c.source.to_string(),
            c.id.to_string(),
            c.command_type.aggregate_type().to_owned(),
            c.subject.to_string(),
            c.command_type.to_string(),
        )),
        None if was_parked => Some((
            letter.get(6),
            letter.get(7),
            letter.get(8),
            letter.get(9),
            String::from("unknown"),
        )),
        None => None,
    };
    if let Some((source, id, aggregate_type, aggregate_id, command_type)) = &command {
        let existing: Option<String> = sqlx::query_scalar(
            "SELECT outcome FROM processed_commands WHERE source = $1 AND command_id = $2",
        )
        .bind(source)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        if let Some(outcome) = existing {
            return Err(OperatorError::Refused(format!(
                "command {id} from {source} already has the outcome `{outcome}`; skipping it now would change nothing"
            )));
        }
        sqlx::query(
            "INSERT INTO processed_commands
               (source, command_id, aggregate_type, aggregate_id, command_type, outcome, reason, version,
                event_ids, topic, partition, \"offset\")
             VALUES ($1, $2, $3, $4, $5, 'skipped', $6, 0, '{}', $7, $8, $9)",
        )
        .bind(source)
        .bind(id)
        .bind(aggregate_type)
        .bind(aggregate_id)
        .bind(command_type)
        .bind(why)
        .bind(topic)
        .bind(partition)
        .bind(offset)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?;
    }
    let mark = [
        "UPDATE dead_letters SET skipped_at = now(), skip_reason = $4
         WHERE topic = $1 AND partition = $2 AND \"offset\" = $3",
        "UPDATE parked_commands SET skipped_at = now(), skip_reason = $4
         WHERE topic = $1 AND partition = $2 AND \"offset\" = $3",
    ];
    for sql in mark {
        sqlx::query(sql)
            .bind(topic)
            .bind(partition)
            .bind(offset)
            .bind(why)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
    }
    tx.commit().await.map_err(StoreError::from)?;
    let named: Option<(String, String)> = letter
        .get::<Option<String>, _>(10)
        .zip(letter.get::<Option<String>, _>(11));
    Ok(Skipped {
        aggregate: command
            .as_ref()
            .map(|(_, _, t, i, _)| (t.clone(), i.clone()))
            .or(named),
        command: command.map(|(s, i, _, _, _)| (s, i)),
        was_parked,
    })
}
