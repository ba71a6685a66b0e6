//! Durable timers: set and cancelled in a batch's transaction, fired by the partition's
//! owner into the outbox.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use commands::wire;
use serde_json::Value;
use sqlx::{PgPool, Postgres, Row, Transaction};

use super::{OutboxRow, Result};
use crate::batch::{AggregateKey, TimerRow};

/// Counts of a batch's timer changes, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimerChanges {
    /// Timers set (or replaced).
    pub scheduled: u64,
    /// Cancellations (of a pending timer, or of one that already fired or never was).
    pub cancelled: u64,
}

/// Applies a group's timer changes on commands topic `topic`, each with the partition of
/// the aggregate that made it. Only the last change of each timer counts (they come in
/// command order), so a timer set and cancelled in one batch is never written.
pub(crate) async fn write_timers(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    changes: &[(i32, &TimerRow)],
) -> Result<TimerChanges> {
    if changes.is_empty() {
        return Ok(TimerChanges::default());
    }
    let mut last: HashMap<(&AggregateKey, &str), (i32, &TimerRow)> = HashMap::new();
    let mut order = Vec::new();
    for (partition, row) in changes {
        let key = match row {
            TimerRow::Schedule {
                aggregate, name, ..
            }
            | TimerRow::Cancel { aggregate, name } => (aggregate, name.as_str()),
        };
        if last.insert(key, (*partition, row)).is_none() {
            order.push(key);
        }
    }
    let (mut set, mut cancel) = (Vec::new(), Vec::new());
    for key in order {
        match last[&key] {
            (
                partition,
                TimerRow::Schedule {
                    due_at, command, ..
                },
            ) => set.push((key, partition, *due_at, command)),
            (_, TimerRow::Cancel { .. }) => cancel.push(key),
        }
    }
    let mut changed = TimerChanges::default();
    if !cancel.is_empty() {
        changed.cancelled = sqlx::query(
            "DELETE FROM timers t USING UNNEST($1::text[], $2::text[], $3::text[]) AS u(ty, id, name)
             WHERE t.aggregate_type = u.ty AND t.aggregate_id = u.id AND t.name = u.name",
        )
        .bind(cancel.iter().map(|k| k.0 .0.as_str()).collect::<Vec<_>>())
        .bind(cancel.iter().map(|k| k.0 .1.as_str()).collect::<Vec<_>>())
        .bind(cancel.iter().map(|k| k.1).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?
        .rows_affected();
    }
    if !set.is_empty() {
        sqlx::query(
            "INSERT INTO timers (aggregate_type, aggregate_id, name, commands_topic, partition, due_at,
                                 subject, message_id, payload)
             SELECT ty, id, name, $1, part, due, subject, mid, payload
             FROM UNNEST($2::text[], $3::text[], $4::text[], $5::int[], $6::timestamptz[], $7::text[],
                         $8::text[], $9::bytea[]) AS u(ty, id, name, part, due, subject, mid, payload)
             ON CONFLICT (aggregate_type, aggregate_id, name) DO UPDATE SET
               commands_topic = EXCLUDED.commands_topic, partition = EXCLUDED.partition,
               due_at = EXCLUDED.due_at, subject = EXCLUDED.subject,
               message_id = EXCLUDED.message_id, payload = EXCLUDED.payload, scheduled_at = now()",
        )
        .bind(topic)
        .bind(set.iter().map(|s| s.0 .0 .0.as_str()).collect::<Vec<_>>())
        .bind(set.iter().map(|s| s.0 .0 .1.as_str()).collect::<Vec<_>>())
        .bind(set.iter().map(|s| s.0 .1).collect::<Vec<_>>())
        .bind(set.iter().map(|s| s.1).collect::<Vec<_>>())
        .bind(set.iter().map(|s| s.2).collect::<Vec<_>>())
        .bind(set.iter().map(|s| s.3.key.as_str()).collect::<Vec<_>>())
        .bind(set.iter().map(|s| s.3.message_id.as_str()).collect::<Vec<_>>())
        .bind(set.iter().map(|s| s.3.payload.as_slice()).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
        changed.scheduled = set.len() as u64;
    }
    Ok(changed)
}

/// What one firing pass did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fired {
    /// Timers fired, per partition.
    pub per_partition: HashMap<i32, u64>,
    /// How late each fired timer was, in seconds (database clock).
    pub lateness: Vec<f64>,
}

/// A due timer taken for firing.
struct Due {
    partition: i32,
    subject: String,
    message_id: String,
    payload: Vec<u8>,
    /// Seconds past due, by the database's clock.
    late: f64,
    due_at: DateTime<Utc>,
}

/// Fires up to `limit` due timers of the partitions of `topic` whose epochs are given (the
/// caller's: a partition whose stored epoch differs is skipped, fenced): deletes them and
/// writes their commands to the outbox after each partition's last sequence, in one
/// transaction holding the partition rows' locks, as a batch does.
pub async fn fire_due_timers(
    pool: &PgPool,
    topic: &str,
    epochs: &HashMap<i32, i64>,
    limit: i64,
) -> Result<Fired> {
    let mut fired = Fired::default();
    if epochs.is_empty() {
        return Ok(fired);
    }
    let owned: Vec<i32> = epochs.keys().copied().collect();
    // Without locks first: an idle partition costs one index probe, and only the
    // partitions with due timers are locked (each lock holds back that partition's batch).
    let partitions: Vec<i32> = sqlx::query_scalar(
        "SELECT DISTINCT partition FROM timers WHERE commands_topic = $1 AND partition = ANY($2)
         AND due_at <= now()",
    )
    .bind(topic)
    .bind(&owned)
    .fetch_all(pool)
    .await?;
    if partitions.is_empty() {
        return Ok(fired);
    }
    let mut tx = pool.begin().await?;
    let locked = super::lock_partitions(&mut tx, topic, &partitions).await?;
    let mine: Vec<i32> = locked
        .iter()
        .filter(|(p, l)| epochs.get(p) == Some(&l.epoch))
        .map(|(p, _)| *p)
        .collect();
    if mine.is_empty() {
        tx.rollback().await?;
        return Ok(fired);
    }
    let rows = sqlx::query(
        "DELETE FROM timers WHERE (aggregate_type, aggregate_id, name) IN (
             SELECT aggregate_type, aggregate_id, name FROM timers
             WHERE commands_topic = $1 AND partition = ANY($2) AND due_at <= now()
             ORDER BY due_at LIMIT $3 FOR UPDATE)
         RETURNING partition, subject, message_id, payload,
                   EXTRACT(EPOCH FROM (now() - due_at))::float8, due_at",
    )
    .bind(topic)
    .bind(&mine)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    let mut rows: Vec<Due> = rows
        .into_iter()
        .map(|r| Due {
            partition: r.get(0),
            subject: r.get(1),
            message_id: r.get(2),
            payload: r.get(3),
            late: r.get(4),
            due_at: r.get(5),
        })
        .collect();
    // In due order within each partition, so the commands go out in the order they fire.
    rows.sort_by(|a, b| {
        (a.partition, a.due_at, &a.message_id).cmp(&(b.partition, b.due_at, &b.message_id))
    });
    let mut seqs: HashMap<i32, i64> = mine.iter().map(|p| (*p, locked[p].outbox_seq)).collect();
    let outbox: Vec<OutboxRow<'_>> = rows
        .iter()
        .map(|due| {
            let seq = seqs.get_mut(&due.partition).expect("a locked partition");
            *seq += 1;
            OutboxRow {
                partition: due.partition,
                seq: *seq,
                topic,
                message_id: due.message_id.clone(),
                message: wire::command_message(&due.subject, due.payload.clone()),
            }
        })
        .collect();
    super::write_outbox(&mut tx, topic, &outbox).await?;
    sqlx::query(
        "UPDATE partitions p SET outbox_seq = u.seq
         FROM UNNEST($2::int[], $3::bigint[]) AS u(partition, seq)
         WHERE p.topic = $1 AND p.partition = u.partition",
    )
    .bind(topic)
    .bind(seqs.keys().copied().collect::<Vec<_>>())
    .bind(seqs.values().copied().collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    for due in &rows {
        *fired.per_partition.entry(due.partition).or_default() += 1;
        fired.lateness.push(due.late.max(0.0));
    }
    Ok(fired)
}

/// Pending timers of some partitions of `topic`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PendingTimers {
    /// Pending timers per partition.
    pub per_partition: HashMap<i32, i64>,
    /// Those more than `overdue_after` past due.
    pub overdue: i64,
    /// Seconds the most overdue one is past due (0 when none is due).
    pub oldest_overdue: f64,
}

/// The pending timers of `partitions` of `topic`, by the database's clock.
pub async fn pending_timers(
    pool: &PgPool,
    topic: &str,
    partitions: &[i32],
    overdue_after: std::time::Duration,
) -> Result<PendingTimers> {
    let rows = sqlx::query(
        "SELECT partition, count(*),
                count(*) FILTER (WHERE due_at < now() - $3 * interval '1 millisecond'),
                COALESCE(EXTRACT(EPOCH FROM (now() - min(due_at)))::float8, 0)
         FROM timers WHERE commands_topic = $1 AND partition = ANY($2) GROUP BY partition",
    )
    .bind(topic)
    .bind(partitions)
    .bind(overdue_after.as_millis() as f64)
    .fetch_all(pool)
    .await?;
    let mut pending = PendingTimers::default();
    for r in rows {
        pending.per_partition.insert(r.get(0), r.get(1));
        let overdue: i64 = r.get(2);
        pending.overdue += overdue;
        if overdue > 0 {
            pending.oldest_overdue = pending.oldest_overdue.max(r.get(3));
        }
    }
    Ok(pending)
}

/// The pending timers of one aggregate, soonest first: name, due time and the command.
pub(crate) async fn aggregate_timers(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Vec<Value>> {
    let rows = sqlx::query(
        "SELECT name, due_at, payload FROM timers
         WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY due_at, name",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let due: DateTime<Utc> = r.get(1);
            let payload: Vec<u8> = r.get(2);
            let command: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
            serde_json::json!({
                "name": r.get::<String, _>(0),
                "due_at": due.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "command": {
                    "id": command["id"],
                    "type": command["type"],
                    "subject": command["subject"],
                    "data": command["data"],
                },
            })
        })
        .collect())
}
