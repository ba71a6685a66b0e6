//! Aggregates: their versioned JSON states.

use std::collections::HashMap;

use sqlx::{PgPool, Postgres, Row, Transaction};

use super::{Result, StoreError};
use crate::batch::{AggregateKey, AggregateWrite, Loaded};

/// An aggregate as `cmdproc inspect` shows it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredAggregate {
    /// Its version.
    pub(crate) version: i64,
    /// Its state.
    pub(crate) state: serde_json::Value,
}

/// An aggregate from a row of `aggregate_type, aggregate_id, version, state`.
fn loaded_row(r: &sqlx::postgres::PgRow) -> (AggregateKey, Loaded) {
    (
        (r.get(0), r.get(1)),
        Loaded {
            version: r.get(2),
            state: r.get(3),
        },
    )
}

/// The stored aggregates `keys` names (`(type, id)`); those not stored have no entry.
pub(crate) async fn load_aggregates(
    tx: &mut Transaction<'_, Postgres>,
    mut keys: Vec<(&str, &str)>,
) -> Result<HashMap<AggregateKey, Loaded>> {
    keys.sort_unstable();
    keys.dedup();
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let (types, ids): (Vec<&str>, Vec<&str>) = keys.into_iter().unzip();
    let rows = sqlx::query(
        "SELECT a.aggregate_type, a.aggregate_id, a.version, a.state
         FROM aggregates a
         JOIN UNNEST($1::text[], $2::text[]) AS k(t, i) ON a.aggregate_type = k.t AND a.aggregate_id = k.i",
    )
    .bind(&types)
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.iter().map(loaded_row).collect())
}

/// Writes aggregates, each guarded by the version it was read at: new ones (read at 0) are
/// inserted, the others updated where their version is still the one read. Any write that
/// finds another version fails the whole call with [`StoreError::Conflict`]: another
/// writer existed.
pub(crate) async fn write_aggregates<'w>(
    tx: &mut Transaction<'_, Postgres>,
    writes: impl Iterator<Item = &'w AggregateWrite>,
) -> Result<()> {
    let (inserts, updates): (Vec<_>, Vec<_>) = writes.partition(|w| w.read_version == 0);
    if !inserts.is_empty() {
        let n = sqlx::query(
            "INSERT INTO aggregates (aggregate_type, aggregate_id, version, state, status)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::jsonb[], $5::text[])
             ON CONFLICT DO NOTHING",
        )
        .bind(
            inserts
                .iter()
                .map(|w| w.aggregate_type.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            inserts
                .iter()
                .map(|w| w.aggregate_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(inserts.iter().map(|w| w.new_version).collect::<Vec<_>>())
        .bind(inserts.iter().map(|w| &w.state).collect::<Vec<_>>())
        .bind(
            inserts
                .iter()
                .map(|w| w.status.as_deref())
                .collect::<Vec<_>>(),
        )
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if n != inserts.len() as u64 {
            return Err(StoreError::Conflict(format!(
                "{} of {} new aggregates already exist",
                inserts.len() as u64 - n,
                inserts.len()
            )));
        }
    }
    if !updates.is_empty() {
        let n = sqlx::query(
            "UPDATE aggregates a SET version = u.new_version, state = u.state, status = u.status,
                    updated_at = now()
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::jsonb[], $6::text[])
               AS u(t, i, read_version, new_version, state, status)
             WHERE a.aggregate_type = u.t AND a.aggregate_id = u.i AND a.version = u.read_version",
        )
        .bind(
            updates
                .iter()
                .map(|w| w.aggregate_type.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            updates
                .iter()
                .map(|w| w.aggregate_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(updates.iter().map(|w| w.read_version).collect::<Vec<_>>())
        .bind(updates.iter().map(|w| w.new_version).collect::<Vec<_>>())
        .bind(updates.iter().map(|w| &w.state).collect::<Vec<_>>())
        .bind(updates.iter().map(|w| w.status.as_deref()).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if n != updates.len() as u64 {
            return Err(StoreError::Conflict(format!(
                "{} of {} aggregates changed since they were read",
                updates.len() as u64 - n,
                updates.len()
            )));
        }
    }
    Ok(())
}

/// Every stored aggregate that a command of `topic` was processed for. The aggregates
/// table has no topic column (several topics may share a database), so the recorded
/// commands tell which aggregates belong to this topic.
pub async fn aggregates_of_topic(
    pool: &PgPool,
    topic: &str,
) -> Result<Vec<(AggregateKey, Loaded)>> {
    let rows = sqlx::query(
        "SELECT a.aggregate_type, a.aggregate_id, a.version, a.state FROM aggregates a
         WHERE EXISTS (SELECT 1 FROM processed_commands p
                       WHERE p.aggregate_type = a.aggregate_type AND p.aggregate_id = a.aggregate_id
                         AND p.topic = $1)",
    )
    .bind(topic)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(loaded_row).collect())
}

/// The stored aggregate `aggregate_type`/`aggregate_id`, `None` when it is not stored.
pub(crate) async fn stored_aggregate(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Option<StoredAggregate>> {
    // `updated_at` is read but not shown.
    let row = sqlx::query("SELECT version, state, updated_at FROM aggregates WHERE aggregate_type = $1 AND aggregate_id = $2")
        .bind(aggregate_type)
        .bind(aggregate_id)
        .fetch_optional(pool)
        .await?;
    Ok(row.map(|r| StoredAggregate {
        version: r.get(0),
        state: r.get(1),
    }))
}

/// How many aggregates of each type stand at each [`commands::Aggregate::status`] (types
/// without statuses are left out).
pub async fn statuses(pool: &PgPool) -> Result<Vec<(String, String, i64)>> {
    let rows = sqlx::query(
        "SELECT aggregate_type, status, count(*) FROM aggregates WHERE status IS NOT NULL
         GROUP BY aggregate_type, status",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}
