//! Recorded dead letters, and what the operator did with them (redriven, skipped).

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Row, Transaction};

use super::Result;
use crate::batch::{headers_from_json, headers_to_json, DeadLetterRow, Header};

/// Records dead letters, each with its partition, on `topic`, and returns the
/// `(partition, offset)` of those recorded now. A dead letter is published when it is first
/// recorded: a replay (or a restore) that meets the same message again finds its row and
/// publishes nothing.
pub(crate) async fn write_dead_letters(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    dead_letters: &[(i32, &DeadLetterRow)],
) -> Result<HashSet<(i32, i64)>> {
    let mut new_dead_letters: HashSet<(i32, i64)> = HashSet::new();
    if !dead_letters.is_empty() {
        let d = dead_letters;
        let recorded = sqlx::query(
            "INSERT INTO dead_letters (topic, partition, \"offset\", kind, message, key, value, headers,
                                       aggregate_type, aggregate_id)
             SELECT $1, part, off, k, m, key, val, h, t, i
             FROM UNNEST($2::int[], $3::bigint[], $4::text[], $5::text[], $6::bytea[], $7::bytea[], $8::jsonb[],
                         $9::text[], $10::text[]) AS u(part, off, k, m, key, val, h, t, i)
             ON CONFLICT DO NOTHING
             RETURNING partition, \"offset\"",
        )
        .bind(topic)
        .bind(d.iter().map(|(part, _)| *part).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.offset).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.kind.as_str()).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.message.as_str()).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.key.as_deref()).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.value.as_deref()).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| headers_to_json(&r.headers)).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.aggregate.as_ref().map(|a| a.0.as_str())).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.aggregate.as_ref().map(|a| a.1.as_str())).collect::<Vec<_>>())
        .fetch_all(&mut **tx)
        .await?;
        new_dead_letters.extend(recorded.iter().map(|r| (r.get(0), r.get(1))));
    }
    Ok(new_dead_letters)
}

/// A recorded dead letter, with what an operator did with it: its own marks, or those of
/// its row in `parked_commands` when it was a command set aside for a parked aggregate.
#[derive(Debug, Clone)]
pub(crate) struct StoredDeadLetter {
    /// Commands partition.
    pub(crate) partition: i32,
    /// Offset in it.
    pub(crate) offset: i64,
    /// Kind (`schema`, `handler_panic`, ...).
    pub(crate) kind: String,
    /// Why.
    pub(crate) message: String,
    /// Aggregate type, when known.
    pub(crate) aggregate_type: Option<String>,
    /// Aggregate id, when known.
    pub(crate) aggregate_id: Option<String>,
    /// Original key.
    pub(crate) key: Option<Vec<u8>>,
    /// Original value.
    pub(crate) value: Option<Vec<u8>>,
    /// Original headers.
    pub(crate) headers: Vec<Header>,
    /// When it was recorded.
    pub(crate) created_at: DateTime<Utc>,
    /// When it was last submitted again, or re-applied by releasing its aggregate.
    pub(crate) redriven_at: Option<DateTime<Utc>>,
    /// When an operator skipped it.
    pub(crate) skipped_at: Option<DateTime<Utc>>,
    /// The operator's reason for skipping it.
    pub(crate) skip_reason: Option<String>,
}

/// The dead letters of `topic`, oldest first, at most `limit`: only those of `kind` when
/// given, of `aggregate` (`(type, id)`) when given, at `positions` (`(partition, offset)`)
/// when there are any.
pub(crate) async fn list_dead_letters(
    pool: &PgPool,
    topic: &str,
    kind: Option<&str>,
    aggregate: Option<(&str, &str)>,
    positions: &[(i32, i64)],
    limit: i64,
) -> Result<Vec<StoredDeadLetter>> {
    let (partitions, offsets): (Vec<i32>, Vec<i64>) = positions.iter().copied().unzip();
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
    .bind(kind)
    .bind(aggregate.map(|a| a.0))
    .bind(aggregate.map(|a| a.1))
    .bind(&partitions)
    .bind(&offsets)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| StoredDeadLetter {
            partition: r.get(0),
            offset: r.get(1),
            kind: r.get(2),
            message: r.get(3),
            aggregate_type: r.get(4),
            aggregate_id: r.get(5),
            key: r.get(6),
            value: r.get(7),
            headers: headers_from_json(&r.get::<serde_json::Value, _>(8)),
            created_at: r.get(9),
            redriven_at: r.get(10),
            skipped_at: r.get(11),
            skip_reason: r.get(12),
        })
        .collect())
}

/// Records that the dead letters of `topic` at `positions` (`(partition, offset)`) were
/// submitted again now.
pub(crate) async fn mark_redriven(
    pool: &PgPool,
    topic: &str,
    positions: &[(i32, i64)],
) -> Result<()> {
    let (partitions, offsets): (Vec<i32>, Vec<i64>) = positions.iter().copied().unzip();
    sqlx::query(
        "UPDATE dead_letters SET redriven_at = now()
         WHERE topic = $1 AND (partition, \"offset\") IN (SELECT * FROM UNNEST($2::int[], $3::bigint[]))",
    )
    .bind(topic)
    .bind(&partitions)
    .bind(&offsets)
    .execute(pool)
    .await?;
    Ok(())
}

/// A dead letter locked for an operator's skip, with its row in `parked_commands` if it
/// was a command set aside for a parked aggregate.
#[derive(Debug, Clone)]
pub(crate) struct LockedDeadLetter {
    /// Original key.
    pub(crate) key: Option<Vec<u8>>,
    /// Original value.
    pub(crate) value: Option<Vec<u8>>,
    /// Original headers.
    pub(crate) headers: Vec<Header>,
    /// Whether it (or its parked command) was skipped before.
    pub(crate) skipped: bool,
    /// Its parked command, when it is one.
    pub(crate) parked: Option<ParkedCommandOf>,
    /// The aggregate type the dead letter names, when known.
    pub(crate) aggregate_type: Option<String>,
    /// The aggregate id the dead letter names, when known.
    pub(crate) aggregate_id: Option<String>,
}

/// The `parked_commands` row of a dead letter: the command as it decoded when it was
/// parked.
#[derive(Debug, Clone)]
pub(crate) struct ParkedCommandOf {
    /// Whether it was re-applied by releasing its aggregate.
    pub(crate) redriven: bool,
    /// The command's source.
    pub(crate) source: String,
    /// The command's id.
    pub(crate) command_id: String,
    /// Its aggregate type.
    pub(crate) aggregate_type: String,
    /// Its aggregate id.
    pub(crate) aggregate_id: String,
}

/// Locks the dead letter of `topic` at `partition`:`offset` until `tx` ends and reads it,
/// `None` when there is none.
pub(crate) async fn lock_dead_letter(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<Option<LockedDeadLetter>> {
    let row = sqlx::query(
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
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map(|r| LockedDeadLetter {
        key: r.get(0),
        value: r.get(1),
        headers: headers_from_json(&r.get::<serde_json::Value, _>(2)),
        skipped: r.get(3),
        // The columns of `parked_commands` are NOT NULL: a joined row has them all.
        parked: r.get::<bool, _>(4).then(|| ParkedCommandOf {
            redriven: r.get(5),
            source: r.get(6),
            command_id: r.get(7),
            aggregate_type: r.get(8),
            aggregate_id: r.get(9),
        }),
        aggregate_type: r.get(10),
        aggregate_id: r.get(11),
    }))
}

/// Marks the dead letter of `topic` at `partition`:`offset` skipped now, with the
/// operator's reason.
pub(crate) async fn mark_dead_letter_skipped(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    partition: i32,
    offset: i64,
    why: &str,
) -> Result<()> {
    sqlx::query(
        "UPDATE dead_letters SET skipped_at = now(), skip_reason = $4
         WHERE topic = $1 AND partition = $2 AND \"offset\" = $3",
    )
    .bind(topic)
    .bind(partition)
    .bind(offset)
    .bind(why)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
