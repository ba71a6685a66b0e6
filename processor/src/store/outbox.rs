//! The outbox and its relay: the rows to publish, each partition's published position, the
//! identities found already on the destination topics, and the deployment id.

use std::collections::HashSet;

use commands::wire;
use serde_json::Value;
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use super::Result;
use crate::batch::{self, headers_to_json, Header};

/// An outbox row to insert.
#[derive(Debug, Clone)]
pub(crate) struct OutboxRow<'t> {
    /// The commands partition it belongs to.
    pub(crate) partition: i32,
    /// Its sequence within that partition.
    pub(crate) seq: i64,
    /// Destination topic.
    pub(crate) topic: &'t str,
    /// The row's stable identity (see [`OutboxMessage::message_id`]).
    pub(crate) message_id: String,
    /// What is published.
    pub(crate) message: wire::Message,
}

/// Inserts outbox rows of commands topic `topic`.
pub(crate) async fn write_outbox(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    outbox: &[OutboxRow<'_>],
) -> Result<()> {
    if !outbox.is_empty() {
        sqlx::query(
            "INSERT INTO outbox (commands_topic, partition, seq, topic, key, payload, headers, message_id)
             SELECT $1, part, s, t, k, p, h, m
             FROM UNNEST($2::int[], $3::bigint[], $4::text[], $5::bytea[], $6::bytea[], $7::jsonb[], $8::text[])
               AS u(part, s, t, k, p, h, m)",
        )
        .bind(topic)
        .bind(outbox.iter().map(|o| o.partition).collect::<Vec<_>>())
        .bind(outbox.iter().map(|o| o.seq).collect::<Vec<_>>())
        .bind(outbox.iter().map(|o| o.topic).collect::<Vec<_>>())
        .bind(
            outbox
                .iter()
                .map(|o| o.message.key.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            outbox
                .iter()
                .map(|o| o.message.payload.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            outbox
                .iter()
                .map(|o| headers_to_json(&o.message.headers))
                .collect::<Vec<_>>(),
        )
        .bind(
            outbox
                .iter()
                .map(|o| o.message_id.as_str())
                .collect::<Vec<_>>(),
        )
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// The prefix of every reply's [`reply_message_id`].
pub const REPLY_MESSAGE_PREFIX: &str = "reply/";

/// The stable identity of a reply's outbox row: the place in the commands log of the
/// delivery it answers (a dead letter's reply is told apart: a parked command an operator
/// releases later gets its real outcome as a second reply).
pub fn reply_message_id(topic: &str, partition: i32, offset: i64, dead_letter: bool) -> String {
    let suffix = if dead_letter { "/dead-letter" } else { "" };
    format!("{REPLY_MESSAGE_PREFIX}{topic}/{partition}/{offset}{suffix}")
}

/// The stable identity of a dead letter's outbox row: its place in the commands log.
pub fn dead_letter_message_id(topic: &str, partition: i32, offset: i64) -> String {
    format!("dead-letter/{topic}/{partition}/{offset}")
}

/// A partition whose outbox has rows the relay has not published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// The commands partition.
    pub partition: i32,
    /// Rows waiting.
    pub pending: i64,
}

/// Partitions with unpublished outbox rows, largest backlog first.
pub async fn outbox_backlog(pool: &PgPool, topic: &str) -> Result<Vec<Backlog>> {
    let rows = sqlx::query(
        "SELECT r.partition, p.outbox_seq - r.published_seq AS pending
         FROM relay_positions r JOIN partitions p ON p.topic = r.topic AND p.partition = r.partition
         WHERE r.topic = $1 AND p.outbox_seq > r.published_seq
         ORDER BY pending DESC",
    )
    .bind(topic)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Backlog {
            partition: r.get(0),
            pending: r.get(1),
        })
        .collect())
}

/// An outbox row read by the relay.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    /// Sequence within the commands partition.
    pub seq: i64,
    /// The row's stable identity, the same however the row is re-derived: the event id of
    /// an event, `dead-letter/<topic>/<partition>/<offset>` of a dead letter. `None` for
    /// rows written before identities existed.
    pub message_id: Option<String>,
    /// Destination topic.
    pub topic: String,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Message value.
    pub payload: Option<Vec<u8>>,
    /// Message headers.
    pub headers: Vec<Header>,
}

/// Locks a partition's relay position for this transaction, or returns `None` when another
/// relay holds it. Returns the last published sequence.
pub async fn lock_relay_position(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    partition: i32,
) -> Result<Option<i64>> {
    let row = sqlx::query(
        "SELECT published_seq FROM relay_positions WHERE topic = $1 AND partition = $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(topic)
    .bind(partition)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map(|r| r.get(0)))
}

/// The next unpublished outbox rows of a partition, in sequence order.
pub async fn next_outbox_rows(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    partition: i32,
    after: i64,
    limit: i64,
) -> Result<Vec<OutboxMessage>> {
    let rows = sqlx::query(
        "SELECT seq, topic, key, payload, headers, message_id FROM outbox
         WHERE commands_topic = $4 AND partition = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    )
    .bind(partition)
    .bind(after)
    .bind(limit)
    .bind(topic)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| OutboxMessage {
            seq: r.get(0),
            topic: r.get(1),
            key: r.get(2),
            payload: r.get(3),
            headers: batch::headers_from_json(&r.get::<Value, _>(4)),
            message_id: r.get(5),
        })
        .collect())
}

/// Records that a partition's outbox is published up to `seq`.
pub async fn mark_published(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    partition: i32,
    seq: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE relay_positions SET published_seq = $2, published_at = now() WHERE topic = $3 AND partition = $1",
    )
    .bind(partition)
    .bind(seq)
    .bind(topic)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// This database's deployment id (`relay_identity`), which names the relay's Kafka
/// transactional ids and offsets group.
pub async fn relay_deployment(pool: &PgPool) -> Result<Uuid> {
    Ok(
        sqlx::query_scalar("SELECT deployment FROM relay_identity WHERE singleton")
            .fetch_one(pool)
            .await?,
    )
}

/// When a partition's relay position was last recorded, `None` if never.
pub async fn relay_published_at(
    pool: &PgPool,
    topic: &str,
    partition: i32,
) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
    Ok(sqlx::query_scalar(
        "SELECT published_at FROM relay_positions WHERE topic = $1 AND partition = $2",
    )
    .bind(topic)
    .bind(partition)
    .fetch_optional(pool)
    .await?
    .flatten())
}

/// Stores identities found on the destination topics for a partition, leaving out those of
/// outbox rows already recorded as published (at or below `published`): only rows still to
/// come are skipped. Returns how many were stored.
pub async fn record_found_published(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    published: i64,
    ids: &[String],
) -> Result<u64> {
    let mut stored = 0;
    for chunk in ids.chunks(10_000) {
        stored += sqlx::query(
            "INSERT INTO relay_published (commands_topic, partition, message_id)
             SELECT $1, $2, m FROM (
               SELECT unnest($4::text[]) AS m
               EXCEPT SELECT message_id FROM outbox
                 WHERE commands_topic = $1 AND partition = $2 AND seq <= $3 AND message_id IS NOT NULL
             ) f
             ON CONFLICT DO NOTHING",
        )
        .bind(topic)
        .bind(partition)
        .bind(published)
        .bind(chunk)
        .execute(pool)
        .await?
        .rows_affected();
    }
    Ok(stored)
}

/// The destination topics of a partition's outbox rows.
pub async fn outbox_topics(pool: &PgPool, topic: &str, partition: i32) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT topic FROM outbox WHERE commands_topic = $1 AND partition = $2",
    )
    .bind(topic)
    .bind(partition)
    .fetch_all(pool)
    .await?)
}

/// The identities of a partition's outbox rows known to be on their topic already.
pub async fn found_published(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    partition: i32,
) -> Result<HashSet<String>> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT message_id FROM relay_published WHERE commands_topic = $1 AND partition = $2",
    )
    .bind(topic)
    .bind(partition)
    .fetch_all(&mut **tx)
    .await?;
    Ok(ids.into_iter().collect())
}

/// Forgets identities whose outbox rows were skipped: a later row with the same identity
/// (a replay of deleted effects) is published again.
pub async fn forget_found_published(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    partition: i32,
    ids: &[String],
) -> Result<()> {
    sqlx::query(
        "DELETE FROM relay_published WHERE commands_topic = $1 AND partition = $2 AND message_id = ANY($3)",
    )
    .bind(topic)
    .bind(partition)
    .bind(ids)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The Postgres notification channel on which workers running without a relay announce
/// new outbox rows (the payload is the commands topic) to `cmdproc relay`.
pub const OUTBOX_CHANNEL: &str = "cmdproc_outbox";

/// Tells relays in other processes (`cmdproc relay`) that `commands_topic` has new outbox
/// rows. Called after the rows are committed; a lost notification only delays them until
/// the relay's next poll.
pub async fn notify_outbox(pool: &PgPool, commands_topic: &str) {
    if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
        .bind(OUTBOX_CHANNEL)
        .bind(commands_topic)
        .execute(pool)
        .await
    {
        tracing::debug!(error = %e, "could not notify the relay; it finds the rows at its next poll");
    }
}
