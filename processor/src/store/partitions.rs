//! The partition rows: epochs (fencing), stored positions with their log fingerprints,
//! outbox sequences; the recorded topic layouts; the operator's log decisions.

use std::collections::HashMap;

use sqlx::{PgPool, Postgres, Row, Transaction};

use super::{Result, StoreError};

/// A partition as acquired by a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acquired {
    /// The new epoch, the worker's fencing token.
    pub epoch: i64,
    /// The stored next offset to consume.
    pub next_offset: i64,
    /// The Kafka timestamp of the message at `next_offset - 1` (the last one applied), when
    /// known: the fingerprint of the log the stored position belongs to.
    pub last_timestamp: Option<i64>,
}

/// Takes a partition: moves its epoch past every earlier one (fencing every earlier owner)
/// and reads its stored next offset. The new epoch is at least the current time in
/// microseconds, so even after the database is restored from a backup (which rolls epochs
/// back) no epoch a stale worker still remembers is handed out again.
pub async fn acquire_partition(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    owner: &str,
) -> Result<Acquired> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        "INSERT INTO partitions (topic, partition, epoch, owner, acquired_at, acquisitions)
         VALUES ($1, $2, GREATEST(1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint), $3, now(), 1)
         ON CONFLICT (topic, partition) DO UPDATE
           SET epoch = GREATEST(partitions.epoch + 1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint),
               owner = EXCLUDED.owner, acquired_at = now(), updated_at = now(),
               acquisitions = partitions.acquisitions + 1
         RETURNING epoch, next_offset, last_timestamp",
    )
    .bind(topic)
    .bind(partition)
    .bind(owner)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO relay_positions (topic, partition) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(topic)
    .bind(partition)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Acquired {
        epoch: row.get(0),
        next_offset: row.get(1),
        last_timestamp: row.get(2),
    })
}

/// A partition's fencing state as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionState {
    /// Current epoch.
    pub epoch: i64,
    /// Worker named as owner.
    pub owner: Option<String>,
    /// Stored next offset.
    pub next_offset: i64,
}

/// The stored state of each of `partitions` of `topic`.
pub async fn epochs(
    pool: &PgPool,
    topic: &str,
    partitions: &[i32],
) -> Result<HashMap<i32, PartitionState>> {
    let rows = sqlx::query(
        "SELECT partition, epoch, owner, next_offset FROM partitions WHERE topic = $1 AND partition = ANY($2)",
    )
    .bind(topic)
    .bind(partitions)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                r.get(0),
                PartitionState {
                    epoch: r.get(1),
                    owner: r.get(2),
                    next_offset: r.get(3),
                },
            )
        })
        .collect())
}

/// Moves a partition's stored position back to `offset` (never forward) and increments its
/// epoch, so the live owner is fenced and consumes again from there. A position that moves
/// loses its log fingerprint (the timestamp of the message before it), which belonged to the
/// old position. Returns the position before the rewind, or `None` when no worker ever took
/// the partition.
pub async fn rewind_partition(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<Option<i64>> {
    let mut tx = pool.begin().await?;
    let before: Option<i64> = sqlx::query_scalar(
        "SELECT next_offset FROM partitions WHERE topic = $1 AND partition = $2 FOR UPDATE",
    )
    .bind(topic)
    .bind(partition)
    .fetch_optional(&mut *tx)
    .await?;
    crate::failpoint::sleep_if("rewind-hold-lock").await;
    if before.is_some() {
        sqlx::query(
            "UPDATE partitions SET next_offset = LEAST(next_offset, $3),
               last_timestamp = CASE WHEN $3 < next_offset THEN NULL ELSE last_timestamp END,
               epoch = GREATEST(epoch + 1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint),
               updated_at = now()
             WHERE topic = $1 AND partition = $2",
        )
        .bind(topic)
        .bind(partition)
        .bind(offset)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(before)
}

/// A partition row as a batch found it, locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LockedPartition {
    /// The current epoch.
    pub(crate) epoch: i64,
    /// The stored next offset.
    pub(crate) next_offset: i64,
    /// The last outbox sequence the partition used.
    pub(crate) outbox_seq: i64,
}

/// Locks the rows of `partitions` of `topic` until `tx` ends and reads them. A partition
/// no worker ever took has no row, and no entry.
pub(crate) async fn lock_partitions(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    partitions: &[i32],
) -> Result<HashMap<i32, LockedPartition>> {
    // Locked in partition order, so two transactions over overlapping sets cannot deadlock.
    Ok(sqlx::query(
        "SELECT partition, epoch, next_offset, outbox_seq FROM partitions
         WHERE topic = $1 AND partition = ANY($2) ORDER BY partition FOR UPDATE",
    )
    .bind(topic)
    .bind(partitions)
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .map(|r| {
        (
            r.get(0),
            LockedPartition {
                epoch: r.get(1),
                next_offset: r.get(2),
                outbox_seq: r.get(3),
            },
        )
    })
    .collect())
}

/// The outbox position of a partition row locked by [`lock_partition`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LockedOutboxSeq {
    /// The current epoch.
    pub(crate) epoch: i64,
    /// The last outbox sequence the partition used.
    pub(crate) outbox_seq: i64,
}

/// Locks the row of `partition` of `topic` until `tx` ends and reads its epoch and outbox
/// sequence, for an operator's write into the partition (releasing a parked aggregate):
/// its owner cannot commit a batch meanwhile. Fails when no worker ever took the partition.
pub(crate) async fn lock_partition(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    partition: i32,
) -> Result<LockedOutboxSeq> {
    let row = sqlx::query(
        "SELECT epoch, outbox_seq FROM partitions WHERE topic = $1 AND partition = $2 FOR UPDATE",
    )
    .bind(topic)
    .bind(partition)
    .fetch_one(&mut **tx)
    .await?;
    Ok(LockedOutboxSeq {
        epoch: row.get(0),
        outbox_seq: row.get(1),
    })
}

/// Stores the last outbox sequence a partition used, inside `tx`, which holds its row
/// locked ([`lock_partition`]). Its position stays as it is.
pub(crate) async fn store_outbox_seq(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    partition: i32,
    outbox_seq: i64,
) -> Result<()> {
    sqlx::query("UPDATE partitions SET outbox_seq = $3, updated_at = now() WHERE topic = $1 AND partition = $2")
        .bind(topic)
        .bind(partition)
        .bind(outbox_seq)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Where a batch leaves a partition it holds locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    /// The partition.
    pub(crate) partition: i32,
    /// The epoch the batch ran under.
    pub(crate) epoch: i64,
    /// The next offset to consume.
    pub(crate) next_offset: i64,
    /// The last outbox sequence used.
    pub(crate) outbox_seq: i64,
    /// The Kafka timestamp of the message at `next_offset - 1`, when the batch saw it.
    pub(crate) last_timestamp: Option<i64>,
}

/// Stores each partition's position after a batch, inside `tx`, which holds the rows
/// locked ([`lock_partitions`]) and checked at the same epochs.
pub(crate) async fn store_positions(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    positions: &[Position],
) -> Result<()> {
    // With the position goes the log's fingerprint: the Kafka timestamp of the message
    // just before it. A position that did not move keeps the one it has.
    let updated = sqlx::query(
        "UPDATE partitions p SET next_offset = u.next_offset, outbox_seq = u.outbox_seq, updated_at = now(),
             last_timestamp = CASE WHEN u.next_offset = p.next_offset THEN p.last_timestamp ELSE u.last_timestamp END
         FROM UNNEST($2::int[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[])
              AS u(partition, next_offset, outbox_seq, epoch, last_timestamp)
         WHERE p.topic = $1 AND p.partition = u.partition AND p.epoch = u.epoch",
    )
    .bind(topic)
    .bind(positions.iter().map(|p| p.partition).collect::<Vec<_>>())
    .bind(positions.iter().map(|p| p.next_offset).collect::<Vec<_>>())
    .bind(positions.iter().map(|p| p.outbox_seq).collect::<Vec<_>>())
    .bind(positions.iter().map(|p| p.epoch).collect::<Vec<_>>())
    .bind(positions.iter().map(|p| p.last_timestamp).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    if updated.rows_affected() != positions.len() as u64 {
        // The rows are locked by this transaction; only a bug gets here.
        return Err(StoreError::Conflict(format!(
            "{} of {} partition rows changed under their lock",
            positions.len() as u64 - updated.rows_affected(),
            positions.len()
        )));
    }
    Ok(())
}

/// The stored next offset of every partition of `topic` that a worker has acquired: what
/// the workers have applied, and so where a re-execution must stop.
pub async fn stored_next_offsets(pool: &PgPool, topic: &str) -> Result<HashMap<i32, i64>> {
    let rows = sqlx::query("SELECT partition, next_offset FROM partitions WHERE topic = $1")
        .bind(topic)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// A partition's stored next offset and the Kafka timestamp of the message before it (the
/// log fingerprint), `None` when no worker ever took the partition.
pub async fn stored_position(
    pool: &PgPool,
    topic: &str,
    partition: i32,
) -> Result<Option<(i64, Option<i64>)>> {
    let row = sqlx::query(
        "SELECT next_offset, last_timestamp FROM partitions WHERE topic = $1 AND partition = $2",
    )
    .bind(topic)
    .bind(partition)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// Moves a partition's stored position to `offset` (either way), clears its log
/// fingerprint and increments its epoch, so the live owner takes it back and consumes from
/// there; records the operator's decision with its reason. Returns the position before, or
/// `None` when no worker ever took the partition (nothing is changed then).
pub async fn accept_log(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    offset: i64,
    why: &str,
) -> Result<Option<i64>> {
    let mut tx = pool.begin().await?;
    let before: Option<i64> = sqlx::query_scalar(
        "SELECT next_offset FROM partitions WHERE topic = $1 AND partition = $2 FOR UPDATE",
    )
    .bind(topic)
    .bind(partition)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(before) = before {
        sqlx::query(
            "UPDATE partitions SET next_offset = $3, last_timestamp = NULL,
               epoch = GREATEST(epoch + 1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint),
               updated_at = now()
             WHERE topic = $1 AND partition = $2",
        )
        .bind(topic)
        .bind(partition)
        .bind(offset)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO log_decisions (topic, decision, partition, from_value, to_value, why)
             VALUES ($1, 'accept-log', $2, $3, $4, $5)",
        )
        .bind(topic)
        .bind(partition)
        .bind(before)
        .bind(offset)
        .bind(why)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(before)
}

/// The partition count recorded for `topic`, recording `partitions` first when none is (the
/// first worker on a topic records what it found).
pub async fn record_layout(pool: &PgPool, topic: &str, partitions: i32) -> Result<i32> {
    sqlx::query(
        "INSERT INTO topic_layouts (topic, partitions) VALUES ($1, $2) ON CONFLICT (topic) DO NOTHING",
    )
    .bind(topic)
    .bind(partitions)
    .execute(pool)
    .await?;
    Ok(recorded_layout(pool, topic).await?.unwrap_or(partitions))
}

/// The partition count recorded for `topic`, if any.
pub async fn recorded_layout(pool: &PgPool, topic: &str) -> Result<Option<i32>> {
    Ok(
        sqlx::query_scalar("SELECT partitions FROM topic_layouts WHERE topic = $1")
            .bind(topic)
            .fetch_optional(pool)
            .await?,
    )
}

/// Records `partitions` as `topic`'s partition count, an operator's decision with its
/// reason. Returns the count recorded before, if any.
pub async fn accept_partitions(
    pool: &PgPool,
    topic: &str,
    partitions: i32,
    why: &str,
) -> Result<Option<i32>> {
    let mut tx = pool.begin().await?;
    let before: Option<i32> =
        sqlx::query_scalar("SELECT partitions FROM topic_layouts WHERE topic = $1 FOR UPDATE")
            .bind(topic)
            .fetch_optional(&mut *tx)
            .await?;
    if before == Some(partitions) {
        // Nothing changed: no decision to record.
        tx.rollback().await?;
        return Ok(before);
    }
    sqlx::query(
        "INSERT INTO topic_layouts (topic, partitions) VALUES ($1, $2)
         ON CONFLICT (topic) DO UPDATE SET partitions = EXCLUDED.partitions, recorded_at = now()",
    )
    .bind(topic)
    .bind(partitions)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO log_decisions (topic, decision, from_value, to_value, why)
         VALUES ($1, 'accept-partitions', $2, $3, $4)",
    )
    .bind(topic)
    .bind(before.map(i64::from))
    .bind(i64::from(partitions))
    .bind(why)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(before)
}
