//! Parked aggregates, and the commands set aside while they are parked.

use std::collections::HashSet;

use sqlx::{PgPool, Postgres, Row, Transaction};

use super::Result;
use crate::batch::{AggregateKey, ParkedRow};

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
