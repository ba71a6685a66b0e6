//! Parked aggregates, and the commands set aside while they are parked.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Row, Transaction};

use super::Result;
use crate::batch::{headers_from_json, AggregateKey, Header, ParkedRow};

/// Which of the aggregates `keys` names (`(type, id)`) are parked.
pub(crate) async fn load_parked<'k>(
    tx: &mut Transaction<'_, Postgres>,
    keys: impl Iterator<Item = (&'k str, &'k str)>,
) -> Result<HashSet<AggregateKey>> {
    let mut keys: Vec<(&str, &str)> = keys.collect();
    keys.sort_unstable();
    keys.dedup();
    let (types, ids): (Vec<&str>, Vec<&str>) = keys.into_iter().unzip();
    if types.is_empty() {
        return Ok(HashSet::new());
    }
    let rows = sqlx::query(
        "SELECT DISTINCT p.aggregate_type, p.aggregate_id FROM parked_aggregates p
         JOIN UNNEST($1::text[], $2::text[]) AS k(t, i) ON p.aggregate_type = k.t AND p.aggregate_id = k.i",
    )
    .bind(&types)
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Parks aggregates (`(aggregate, reason, offset of the poison command)`; one parked
/// already stays as it was) and sets commands aside for parked aggregates, on `topic` and
/// `partition`.
pub(crate) async fn write_parked(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    partition: i32,
    newly_parked: &[(AggregateKey, String, i64)],
    parked: &[ParkedRow],
) -> Result<()> {
    if !newly_parked.is_empty() {
        let n = newly_parked;
        sqlx::query(
            "INSERT INTO parked_aggregates (aggregate_type, aggregate_id, reason, topic, partition, first_offset)
             SELECT t, i, r, $4, $5, o FROM UNNEST($1::text[], $2::text[], $3::text[], $6::bigint[]) AS u(t, i, r, o)
             ON CONFLICT DO NOTHING",
        )
        .bind(n.iter().map(|(a, _, _)| a.0.as_str()).collect::<Vec<_>>())
        .bind(n.iter().map(|(a, _, _)| a.1.as_str()).collect::<Vec<_>>())
        .bind(n.iter().map(|(_, r, _)| r.as_str()).collect::<Vec<_>>())
        .bind(topic)
        .bind(partition)
        .bind(n.iter().map(|(_, _, o)| *o).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    if !parked.is_empty() {
        let p = parked;
        sqlx::query(
            "INSERT INTO parked_commands (topic, partition, \"offset\", aggregate_type, aggregate_id, source, command_id, reason)
             SELECT $1, $2, o, t, i, s, c, r
             FROM UNNEST($3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[]) AS u(o, t, i, s, c, r)
             ON CONFLICT DO NOTHING",
        )
        .bind(topic)
        .bind(partition)
        .bind(p.iter().map(|r| r.offset).collect::<Vec<_>>())
        .bind(p.iter().map(|r| r.aggregate.0.as_str()).collect::<Vec<_>>())
        .bind(p.iter().map(|r| r.aggregate.1.as_str()).collect::<Vec<_>>())
        .bind(p.iter().map(|r| r.source.as_str()).collect::<Vec<_>>())
        .bind(p.iter().map(|r| r.command_id.as_str()).collect::<Vec<_>>())
        .bind(p.iter().map(|r| r.reason.as_str()).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// A parked aggregate as `verify` needs it: which partition parked it and from which offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedSince {
    /// The aggregate.
    pub aggregate: AggregateKey,
    /// The commands partition its poison command was on.
    pub partition: i32,
    /// Offset of the poison command: from there on its commands are set aside.
    pub first_offset: i64,
}

/// The aggregates parked by the workers of `topic`.
pub async fn parked_since(pool: &PgPool, topic: &str) -> Result<Vec<ParkedSince>> {
    let rows = sqlx::query(
        "SELECT aggregate_type, aggregate_id, partition, first_offset FROM parked_aggregates
         WHERE topic = $1 ORDER BY partition, first_offset",
    )
    .bind(topic)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| ParkedSince {
            aggregate: (r.get(0), r.get(1)),
            partition: r.get(2),
            first_offset: r.get(3),
        })
        .collect())
}

/// A parked aggregate with the count of its commands set aside.
#[derive(Debug, Clone)]
pub(crate) struct ParkedAggregate {
    /// Aggregate type.
    pub(crate) aggregate_type: String,
    /// Aggregate id.
    pub(crate) aggregate_id: String,
    /// Why it was parked.
    pub(crate) reason: String,
    /// Its commands partition.
    pub(crate) partition: i32,
    /// Offset of the poison command.
    pub(crate) first_offset: i64,
    /// When.
    pub(crate) parked_at: DateTime<Utc>,
    /// Commands set aside, neither re-applied nor skipped.
    pub(crate) waiting: i64,
    /// Commands skipped by an operator.
    pub(crate) skipped: i64,
}

/// The aggregates parked by the workers of `topic` (only `aggregate`, `(type, id)`, when
/// given), oldest first, with the count of their commands set aside.
pub(crate) async fn list_parked(
    pool: &PgPool,
    topic: &str,
    aggregate: Option<(&str, &str)>,
) -> Result<Vec<ParkedAggregate>> {
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
    .bind(aggregate.map(|a| a.0))
    .bind(aggregate.map(|a| a.1))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| ParkedAggregate {
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

/// The commands partition of `topic` whose worker parked `aggregate` (`(type, id)`),
/// `None` when it is not parked.
pub(crate) async fn parked_partition(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    aggregate: (&str, &str),
) -> Result<Option<i32>> {
    let row = sqlx::query(
        "SELECT partition FROM parked_aggregates WHERE topic = $1 AND aggregate_type = $2 AND aggregate_id = $3",
    )
    .bind(topic)
    .bind(aggregate.0)
    .bind(aggregate.1)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map(|r| r.get(0)))
}

/// A command set aside for a parked aggregate and not yet re-applied, as its dead letter
/// recorded it.
#[derive(Debug, Clone)]
pub(crate) struct WaitingCommand {
    /// Offset in its commands partition.
    pub(crate) offset: i64,
    /// Whether an operator skipped it.
    pub(crate) skipped: bool,
    /// Original key.
    pub(crate) key: Option<Vec<u8>>,
    /// Original value.
    pub(crate) value: Option<Vec<u8>>,
    /// Original headers.
    pub(crate) headers: Vec<Header>,
}

/// The commands of `topic` set aside for `aggregate` (`(type, id)`) and not yet
/// re-applied, in their original order.
pub(crate) async fn waiting_commands(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    aggregate: (&str, &str),
) -> Result<Vec<WaitingCommand>> {
    let rows = sqlx::query(
        "SELECT c.\"offset\", c.skipped_at IS NOT NULL, d.key, d.value, d.headers
         FROM parked_commands c
         JOIN dead_letters d ON d.topic = c.topic AND d.partition = c.partition AND d.\"offset\" = c.\"offset\"
         WHERE c.topic = $1 AND c.aggregate_type = $2 AND c.aggregate_id = $3 AND c.redriven_at IS NULL
         ORDER BY c.partition, c.\"offset\"",
    )
    .bind(topic)
    .bind(aggregate.0)
    .bind(aggregate.1)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| WaitingCommand {
            offset: r.get(0),
            skipped: r.get(1),
            key: r.get(2),
            value: r.get(3),
            headers: headers_from_json(&r.get::<serde_json::Value, _>(4)),
        })
        .collect())
}

/// Releases `aggregate` (`(type, id)`) parked on `topic`: its later commands are applied
/// again. Its commands set aside stay, with their marks.
pub(crate) async fn unpark(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    aggregate: (&str, &str),
) -> Result<()> {
    sqlx::query("DELETE FROM parked_aggregates WHERE topic = $1 AND aggregate_type = $2 AND aggregate_id = $3")
        .bind(topic)
        .bind(aggregate.0)
        .bind(aggregate.1)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Records that the commands set aside at `offsets` of `topic`/`partition` were re-applied
/// now.
pub(crate) async fn mark_parked_redriven(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    partition: i32,
    offsets: &[i64],
) -> Result<()> {
    sqlx::query(
        "UPDATE parked_commands SET redriven_at = now()
         WHERE topic = $1 AND partition = $2 AND \"offset\" = ANY($3::bigint[])",
    )
    .bind(topic)
    .bind(partition)
    .bind(offsets)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Marks the command set aside at `partition`:`offset` of `topic` (if there is one)
/// skipped now, with the operator's reason.
pub(crate) async fn mark_parked_skipped(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    partition: i32,
    offset: i64,
    why: &str,
) -> Result<()> {
    sqlx::query(
        "UPDATE parked_commands SET skipped_at = now(), skip_reason = $4
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
