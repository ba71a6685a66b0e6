//! Recorded outcomes (`processed_commands`) and duplicate deliveries: what deduplicates a
//! command delivered again. Pruned after the dedupe window, with the horizon recorded.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use super::{Result, StoreError};
use crate::batch::{CommandKey, DuplicateRow, LogPosition, Outcome, OutcomeKind, ProcessedRow};

/// What one pruning pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Recorded outcomes of processed commands.
    pub outcomes: u64,
    /// Recorded duplicate deliveries.
    pub duplicates: u64,
    /// Published outbox rows.
    pub outbox: u64,
}

impl Pruned {
    /// Rows deleted in all.
    pub fn total(&self) -> u64 {
        self.outcomes + self.duplicates + self.outbox
    }
}

/// Deletes, in slices small enough for the worker's statement timeout, the outcomes and
/// duplicate deliveries of commands of `topic` recorded before `window` ago, and the outbox
/// rows of `topic` published before then. Event rows, aggregates, dead letters and skips
/// (outcome `skipped`: an operator's decision, honoured however late the command comes
/// back) are kept. Other commands topics sharing the database keep theirs: each is pruned by its own
/// workers, with their own window.
///
/// The horizon is recorded first (in `prune_horizons`, never moved back), so `cmdproc
/// replay` knows from where on outcomes may be missing even while the deletes run.
pub async fn prune(pool: &PgPool, topic: &str, window: Duration) -> Result<Pruned> {
    let horizon = chrono::Utc::now()
        - chrono::Duration::from_std(window).map_err(|e| StoreError::Database(e.to_string()))?;
    sqlx::query(
        "INSERT INTO prune_horizons (topic, pruned_before) VALUES ($1, $2)
         ON CONFLICT (topic) DO UPDATE
           SET pruned_before = GREATEST(prune_horizons.pruned_before, EXCLUDED.pruned_before),
               updated_at = now()",
    )
    .bind(topic)
    .bind(horizon)
    .execute(pool)
    .await?;
    let statements = [
        "DELETE FROM processed_commands WHERE ctid = ANY(ARRAY(
           SELECT ctid FROM processed_commands
           WHERE topic = $2 AND processed_at < $1 AND outcome <> 'skipped' LIMIT 5000))",
        "DELETE FROM duplicate_deliveries WHERE ctid = ANY(ARRAY(
           SELECT ctid FROM duplicate_deliveries WHERE topic = $2 AND seen_at < $1 LIMIT 5000))",
        "DELETE FROM outbox WHERE ctid = ANY(ARRAY(
           SELECT o.ctid FROM outbox o JOIN relay_positions r
             ON r.topic = o.commands_topic AND r.partition = o.partition
           WHERE o.commands_topic = $2 AND o.seq <= r.published_seq AND o.created_at < $1 LIMIT 5000))",
        // Identities the relay found on a topic, whose rows were never re-derived.
        "DELETE FROM relay_published WHERE ctid = ANY(ARRAY(
           SELECT ctid FROM relay_published WHERE commands_topic = $2 AND found_at < $1 LIMIT 5000))",
    ];
    let mut counts = [0u64; 4];
    for (i, sql) in statements.iter().enumerate() {
        loop {
            let n = sqlx::query(sql)
                .bind(horizon)
                .bind(topic)
                .execute(pool)
                .await?
                .rows_affected();
            counts[i] += n;
            if n < 5000 {
                break;
            }
        }
    }
    Ok(Pruned {
        outcomes: counts[0],
        duplicates: counts[1],
        outbox: counts[2] + counts[3],
    })
}

/// The time before which outcomes of `topic` may have been pruned (the latest horizon any
/// of its workers pruned with), or `None` if none ever pruned.
pub async fn prune_horizon(
    pool: &PgPool,
    topic: &str,
) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
    Ok(
        sqlx::query_scalar("SELECT pruned_before FROM prune_horizons WHERE topic = $1")
            .bind(topic)
            .fetch_optional(pool)
            .await?,
    )
}

/// A recorded outcome from a row of `source, command_id, outcome, reason, version, event_ids,
/// code, digest, topic, partition, offset`.
fn outcome_row(r: &sqlx::postgres::PgRow) -> (CommandKey, Outcome) {
    let recorded = Outcome {
        outcome: OutcomeKind::parse(r.get::<&str, _>(2)),
        code: r.get(6),
        reason: r.get(3),
        version: r.get(4),
        event_ids: r.get(5),
        digest: r.get(7),
        recorded_at: Some(LogPosition {
            topic: r.get(8),
            partition: r.get(9),
            offset: r.get(10),
        }),
    };
    ((r.get(0), r.get(1)), recorded)
}

/// The recorded outcomes of the commands `keys` names (`(source, command id)`).
pub(crate) async fn load_outcomes<'k>(
    tx: &mut Transaction<'_, Postgres>,
    keys: impl Iterator<Item = (&'k str, &'k str)>,
) -> Result<HashMap<CommandKey, Outcome>> {
    let (sources, ids): (Vec<&str>, Vec<&str>) = keys.unzip();
    if sources.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query(
        "SELECT p.source, p.command_id, p.outcome, p.reason, p.version, p.event_ids, p.code,
                p.digest, p.topic, p.partition, p.\"offset\"
         FROM processed_commands p
         JOIN UNNEST($1::text[], $2::text[]) AS k(source, command_id)
           ON p.source = k.source AND p.command_id = k.command_id",
    )
    .bind(&sources)
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.iter().map(outcome_row).collect())
}

/// Records the outcomes of commands processed for the first time, each with its
/// partition and payload digest, on `topic`.
pub(crate) async fn write_processed(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    processed: &[(i32, &ProcessedRow)],
) -> Result<()> {
    if !processed.is_empty() {
        let p = processed;
        sqlx::query(
            "INSERT INTO processed_commands
               (source, command_id, aggregate_type, aggregate_id, command_type, outcome, code, reason,
                version, event_ids, topic, partition, \"offset\", digest)
             SELECT source, command_id, aggregate_type, aggregate_id, command_type, outcome, code,
                    reason, version, COALESCE(string_to_array(event_ids, ',')::uuid[], '{}'), $10,
                    partition, command_offset, digest
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::bigint[], $9::text[], $11::int[], $12::bigint[], $13::text[], $14::uuid[])
               AS u(source, command_id, aggregate_type, aggregate_id, command_type, outcome, reason,
                    version, event_ids, partition, command_offset, code, digest)",
        )
        .bind(p.iter().map(|(_, r)| r.source.as_str()).collect::<Vec<_>>())
        .bind(p.iter().map(|(_, r)| r.command_id.as_str()).collect::<Vec<_>>())
        .bind(p.iter().map(|(_, r)| r.aggregate_type.as_str()).collect::<Vec<_>>())
        .bind(p.iter().map(|(_, r)| r.aggregate_id.as_str()).collect::<Vec<_>>())
        .bind(p.iter().map(|(_, r)| r.command_type.as_str()).collect::<Vec<_>>())
        .bind(p.iter().map(|(_, r)| r.outcome.outcome.as_str()).collect::<Vec<_>>())
        .bind(p.iter().map(|(_, r)| r.outcome.reason.as_deref()).collect::<Vec<_>>())
        .bind(p.iter().map(|(_, r)| r.outcome.version).collect::<Vec<_>>())
        .bind(p.iter().map(|(_, r)| join_ids(&r.outcome.event_ids)).collect::<Vec<_>>())
        .bind(topic)
        .bind(p.iter().map(|(part, _)| *part).collect::<Vec<_>>())
        .bind(p.iter().map(|(_, r)| r.offset).collect::<Vec<_>>())
        .bind(p.iter().map(|(_, r)| r.outcome.code.as_deref()).collect::<Vec<_>>())
        .bind(p.iter().map(|(_, r)| r.outcome.digest).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Records deliveries of commands whose key was processed before, each with its partition,
/// on `topic`: duplicates and refused reuses of the key (`key_reused`). A refused reuse also
/// records the aggregate, type and payload digest it named (what `inspect` shows); a plain
/// duplicate leaves them empty, so that a replay, which re-delivers every command, writes
/// no more than it did before. A delivery seen again only gets its time updated: what it
/// was is decided once, when it was first recorded.
///
/// With `report_new`, returns the `(partition, offset)` of the deliveries recorded now for
/// the first time (a reply answers only those); otherwise an empty set.
pub(crate) async fn write_duplicates(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    duplicates: &[(i32, &DuplicateRow)],
    report_new: bool,
) -> Result<HashSet<(i32, i64)>> {
    let mut new = HashSet::new();
    if !duplicates.is_empty() {
        let d = duplicates;
        const INSERT: &str = "INSERT INTO duplicate_deliveries
               (topic, partition, \"offset\", source, command_id, key_reused, digest, aggregate_type,
                aggregate_id, command_type)
             SELECT $1, partition, delivery_offset, source, command_id, key_reused, digest,
                    aggregate_type, aggregate_id, command_type
             FROM UNNEST($2::int[], $3::bigint[], $4::text[], $5::text[], $6::bool[], $7::uuid[],
                         $8::text[], $9::text[], $10::text[])
               AS u(partition, delivery_offset, source, command_id, key_reused, digest, aggregate_type,
                    aggregate_id, command_type)
             ON CONFLICT (topic, partition, \"offset\") DO UPDATE SET seen_at = now()";
        // `xmax = 0` tells a row inserted by this statement from one it updated.
        let returning = format!("{INSERT} RETURNING partition, \"offset\", xmax = 0");
        let query = sqlx::query(if report_new { &returning } else { INSERT })
            .bind(topic)
            .bind(d.iter().map(|(part, _)| *part).collect::<Vec<_>>())
            .bind(d.iter().map(|(_, r)| r.offset).collect::<Vec<_>>())
            .bind(d.iter().map(|(_, r)| r.source.as_str()).collect::<Vec<_>>())
            .bind(
                d.iter()
                    .map(|(_, r)| r.command_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(d.iter().map(|(_, r)| r.key_reused()).collect::<Vec<_>>())
            .bind(
                d.iter()
                    .map(|(_, r)| r.refused.as_ref().map(|x| x.digest))
                    .collect::<Vec<_>>(),
            )
            .bind(
                d.iter()
                    .map(|(_, r)| r.refused.as_ref().map(|x| x.aggregate.0.as_str()))
                    .collect::<Vec<_>>(),
            )
            .bind(
                d.iter()
                    .map(|(_, r)| r.refused.as_ref().map(|x| x.aggregate.1.as_str()))
                    .collect::<Vec<_>>(),
            )
            .bind(
                d.iter()
                    .map(|(_, r)| r.refused.as_ref().map(|x| x.command_type.as_str()))
                    .collect::<Vec<_>>(),
            );
        if report_new {
            for r in query.fetch_all(&mut **tx).await? {
                if r.get::<bool, _>(2) {
                    new.insert((r.get(0), r.get(1)));
                }
            }
        } else {
            query.execute(&mut **tx).await?;
        }
    }
    Ok(new)
}

/// The recorded outcomes of `keys` whose first delivery was processed somewhere other than
/// `topic`/`partition`, and those an operator skipped. Deduplication is global, so a command
/// first processed on another partition (or topic) is a duplicate here, whatever a
/// re-execution of this partition alone would think; a skipped command never takes effect.
pub async fn outcomes_recorded_elsewhere(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    keys: &[CommandKey],
) -> Result<HashMap<CommandKey, Outcome>> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let (sources, ids): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(s, i)| (s.as_str(), i.as_str())).unzip();
    let rows = sqlx::query(
        "SELECT p.source, p.command_id, p.outcome, p.reason, p.version, p.event_ids, p.code,
                p.digest, p.topic, p.partition, p.\"offset\"
         FROM processed_commands p
         JOIN UNNEST($1::text[], $2::text[]) AS k(source, command_id)
           ON p.source = k.source AND p.command_id = k.command_id
         WHERE p.topic <> $3 OR p.partition <> $4 OR p.outcome = 'skipped'",
    )
    .bind(&sources)
    .bind(&ids)
    .bind(topic)
    .bind(partition)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(outcome_row).collect())
}

/// The recorded outcome (`applied`, `rejected`, `skipped`, ...) of the command `source`/`id`,
/// if it has one.
pub(crate) async fn recorded_outcome(
    tx: &mut Transaction<'_, Postgres>,
    source: &str,
    id: &str,
) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT outcome FROM processed_commands WHERE source = $1 AND command_id = $2",
    )
    .bind(source)
    .bind(id)
    .fetch_optional(&mut **tx)
    .await?)
}

/// A command an operator skipped, and the dead letter it was.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SkippedCommand<'a> {
    /// The command's source.
    pub(crate) source: &'a str,
    /// The command's id.
    pub(crate) command_id: &'a str,
    /// Its aggregate type.
    pub(crate) aggregate_type: &'a str,
    /// Its aggregate id.
    pub(crate) aggregate_id: &'a str,
    /// Its command type (`unknown` when it no longer decodes).
    pub(crate) command_type: &'a str,
    /// The operator's reason.
    pub(crate) reason: &'a str,
    /// The commands topic of the dead letter.
    pub(crate) topic: &'a str,
    /// Its partition.
    pub(crate) partition: i32,
    /// Its offset.
    pub(crate) offset: i64,
}

/// Records the outcome `skipped` for a command, so every later delivery of it is a
/// duplicate without effect. Fails with [`StoreError::Conflict`] when it has an outcome.
pub(crate) async fn record_skipped(
    tx: &mut Transaction<'_, Postgres>,
    skipped: &SkippedCommand<'_>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO processed_commands
           (source, command_id, aggregate_type, aggregate_id, command_type, outcome, reason, version,
            event_ids, topic, partition, \"offset\")
         VALUES ($1, $2, $3, $4, $5, 'skipped', $6, 0, '{}', $7, $8, $9)",
    )
    .bind(skipped.source)
    .bind(skipped.command_id)
    .bind(skipped.aggregate_type)
    .bind(skipped.aggregate_id)
    .bind(skipped.command_type)
    .bind(skipped.reason)
    .bind(skipped.topic)
    .bind(skipped.partition)
    .bind(skipped.offset)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Which of the commands `keys` names (`(source, command id)`) have a recorded outcome.
pub(crate) async fn with_outcome(
    pool: &PgPool,
    keys: &[CommandKey],
) -> Result<HashSet<CommandKey>> {
    let (sources, ids): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(s, i)| (s.as_str(), i.as_str())).unzip();
    let rows = sqlx::query(
        "SELECT p.source, p.command_id FROM processed_commands p
         JOIN UNNEST($1::text[], $2::text[]) AS k(source, command_id)
           ON p.source = k.source AND p.command_id = k.command_id",
    )
    .bind(&sources)
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// What the workers recorded for the offsets `[start, end)` of `topic`/`partition` since a
/// time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RecordedSince {
    /// Outcomes recorded (commands processed for the first time).
    pub(crate) processed: i64,
    /// Duplicate deliveries recorded (or seen again).
    pub(crate) duplicates: i64,
}

/// Counts the outcomes and duplicate deliveries recorded for the offsets `[start, end)` of
/// `topic`/`partition` at or after `since`.
pub(crate) async fn recorded_since(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    (start, end): (i64, i64),
    since: DateTime<Utc>,
) -> Result<RecordedSince> {
    let processed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM processed_commands
         WHERE topic = $1 AND partition = $2 AND \"offset\" >= $3 AND \"offset\" < $4 AND processed_at >= $5",
    )
    .bind(topic)
    .bind(partition)
    .bind(start)
    .bind(end)
    .bind(since)
    .fetch_one(pool)
    .await?;
    let duplicates: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM duplicate_deliveries
         WHERE topic = $1 AND partition = $2 AND \"offset\" >= $3 AND \"offset\" < $4 AND seen_at >= $5",
    )
    .bind(topic)
    .bind(partition)
    .bind(start)
    .bind(end)
    .bind(since)
    .fetch_one(pool)
    .await?;
    Ok(RecordedSince {
        processed,
        duplicates,
    })
}

/// A recorded outcome of a command of one aggregate, as `cmdproc inspect` shows it.
#[derive(Debug, Clone)]
pub(crate) struct RecordedCommand {
    /// The command's source.
    pub(crate) source: String,
    /// The command's id.
    pub(crate) command_id: String,
    /// Its command type.
    pub(crate) command_type: String,
    /// Its outcome (`applied`, `rejected`, `skipped`, ...).
    pub(crate) outcome: String,
    /// The rejection code, for a rejection.
    pub(crate) code: Option<String>,
    /// The reason of a rejection or a skip.
    pub(crate) reason: Option<String>,
    /// The aggregate's version after it.
    pub(crate) version: i64,
    /// The ids of the events it produced.
    pub(crate) event_ids: Vec<Uuid>,
    /// Its commands partition.
    pub(crate) partition: i32,
    /// Its offset there.
    pub(crate) offset: i64,
    /// When it was processed.
    pub(crate) processed_at: DateTime<Utc>,
}

/// The latest `limit` recorded outcomes of commands of the aggregate
/// `aggregate_type`/`aggregate_id`, newest first.
pub(crate) async fn recent_commands(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
    limit: i64,
) -> Result<Vec<RecordedCommand>> {
    let rows = sqlx::query(
        "SELECT source, command_id, command_type, outcome, reason, version, event_ids, partition, \"offset\", processed_at,
                code
         FROM processed_commands WHERE aggregate_type = $1 AND aggregate_id = $2
         ORDER BY processed_at DESC, \"offset\" DESC LIMIT $3",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| RecordedCommand {
            source: r.get(0),
            command_id: r.get(1),
            command_type: r.get(2),
            outcome: r.get(3),
            reason: r.get(4),
            version: r.get(5),
            event_ids: r.get(6),
            partition: r.get(7),
            offset: r.get(8),
            processed_at: r.get(9),
            code: r.get(10),
        })
        .collect())
}

/// A delivery refused for reusing a processed command's key with another payload, as
/// `cmdproc inspect` shows it under the aggregate the delivery named.
#[derive(Debug, Clone)]
pub(crate) struct RefusedDelivery {
    /// The delivery's source.
    pub(crate) source: String,
    /// The delivery's id.
    pub(crate) command_id: String,
    /// Its command type.
    pub(crate) command_type: Option<String>,
    /// Its commands partition.
    pub(crate) partition: i32,
    /// Its offset there.
    pub(crate) offset: i64,
    /// When it was seen (last, if delivered again).
    pub(crate) seen_at: DateTime<Utc>,
    /// The command recorded under the key, unless its outcome was pruned since.
    pub(crate) original: Option<KeyHolder>,
}

/// The command a key `(source, id)` was recorded for.
#[derive(Debug, Clone)]
pub(crate) struct KeyHolder {
    /// Its command type.
    pub(crate) command_type: String,
    /// Its aggregate type.
    pub(crate) aggregate_type: String,
    /// Its aggregate id.
    pub(crate) aggregate_id: String,
    /// Its outcome (`applied`, `rejected`, `skipped`).
    pub(crate) outcome: String,
}

/// The latest `limit` deliveries refused as `key_reused` that named the aggregate
/// `aggregate_type`/`aggregate_id`, newest first, each with the command its key was used for.
pub(crate) async fn refused_deliveries(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
    limit: i64,
) -> Result<Vec<RefusedDelivery>> {
    let rows = sqlx::query(
        "SELECT d.source, d.command_id, d.command_type, d.partition, d.\"offset\", d.seen_at,
                p.command_type, p.aggregate_type, p.aggregate_id, p.outcome
         FROM duplicate_deliveries d
         LEFT JOIN processed_commands p ON p.source = d.source AND p.command_id = d.command_id
         WHERE d.key_reused AND d.aggregate_type = $1 AND d.aggregate_id = $2
         ORDER BY d.seen_at DESC, d.\"offset\" DESC LIMIT $3",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let original_type: Option<String> = r.get(6);
            RefusedDelivery {
                source: r.get(0),
                command_id: r.get(1),
                command_type: r.get(2),
                partition: r.get(3),
                offset: r.get(4),
                seen_at: r.get(5),
                original: original_type.map(|command_type| KeyHolder {
                    command_type,
                    aggregate_type: r.get(7),
                    aggregate_id: r.get(8),
                    outcome: r.get(9),
                }),
            }
        })
        .collect())
}

/// Event ids as one comma-separated text, which the statement splits back into an array
/// (`UNNEST` cannot take an array of arrays of different lengths); `None` for none.
fn join_ids(ids: &[Uuid]) -> Option<String> {
    if ids.is_empty() {
        None
    } else {
        Some(
            ids.iter()
                .map(Uuid::to_string)
                .collect::<Vec<_>>()
                .join(","),
        )
    }
}
