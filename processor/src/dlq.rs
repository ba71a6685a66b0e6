//! Dead letters and parked aggregates: listing them, submitting dead letters again, and
//! releasing a parked aggregate by re-applying its commands in their original order.

use chrono::{DateTime, Utc};
use commands::domain::Registry;
use commands::envelope::Command;
use commands::producer::CommandProducer;
use commands::schema::Schemas;
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use sqlx::{PgPool, Row};

use crate::batch::{self, headers_from_json, Incoming, PlanOptions};
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
    /// When it was last submitted again.
    pub redriven_at: Option<DateTime<Utc>>,
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
        "SELECT partition, \"offset\", kind, message, aggregate_type, aggregate_id, key, value, headers,
                created_at, redriven_at
         FROM dead_letters
         WHERE topic = $1
           AND ($2::text IS NULL OR kind = $2)
           AND ($3::text IS NULL OR (aggregate_type = $3 AND aggregate_id = $4))
           AND (cardinality($5::int[]) = 0
                OR (partition, \"offset\") IN (SELECT * FROM UNNEST($5::int[], $6::bigint[])))
         ORDER BY created_at, partition, \"offset\"
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
) -> anyhow::Result<usize> {
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
    topics: Topics<'_>,
    aggregate: &(String, String),
    options: &PlanOptions,
) -> anyhow::Result<Option<Released>> {
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
        let decoded = Command::decode(key.as_deref(), &hs, value.as_deref(), Schemas::builtin());
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
    let (plan, outbox_end) = store::plan_and_write(
        &mut tx,
        &target,
        &Registry::builtin(),
        options,
        &messages,
        outbox_seq,
    )
    .await?;
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

/// Drops one waiting command of a parked aggregate, with the reason recorded; a later
/// release leaves it out. Fails unless the command is parked and still waiting.
pub async fn skip(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    offset: i64,
    why: &str,
) -> anyhow::Result<(String, String)> {
    let row = sqlx::query(
        "UPDATE parked_commands SET skipped_at = now(), skip_reason = $4
         WHERE topic = $1 AND partition = $2 AND \"offset\" = $3 AND redriven_at IS NULL AND skipped_at IS NULL
         RETURNING aggregate_type, aggregate_id",
    )
    .bind(topic)
    .bind(partition)
    .bind(offset)
    .bind(why)
    .fetch_optional(pool)
    .await
    .map_err(StoreError::from)?;
    match row {
        Some(r) => Ok((r.get(0), r.get(1))),
        None => anyhow::bail!(
            "no waiting parked command at partition {partition} offset {offset} of {topic}; \
             `cmdproc dlq list` shows the parked aggregates and their commands"
        ),
    }
}
