//! Stored events, and the outcomes of commands rebuilt from them.

use std::collections::HashMap;

use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use super::Result;
use crate::batch::{CommandKey, EventRow, Outcome, OutcomeKind};

/// Stores events (the primary key on their deterministic ids refuses an event stored
/// already, as [`StoreError::EventExists`](super::StoreError::EventExists)).
pub(crate) async fn write_events(
    tx: &mut Transaction<'_, Postgres>,
    events: &[&EventRow],
) -> Result<()> {
    if !events.is_empty() {
        let e = events;
        sqlx::query(
            "INSERT INTO events (event_id, aggregate_type, aggregate_id, version, event_type, data, source, command_id)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::jsonb[],
                                  $7::text[], $8::text[])",
        )
        .bind(e.iter().map(|r| r.envelope.id).collect::<Vec<Uuid>>())
        .bind(e.iter().map(|r| r.envelope.aggregate_type.as_str()).collect::<Vec<_>>())
        .bind(e.iter().map(|r| r.envelope.subject.as_str()).collect::<Vec<_>>())
        .bind(e.iter().map(|r| r.envelope.aggregate_version as i64).collect::<Vec<_>>())
        .bind(e.iter().map(|r| r.envelope.event_type.as_str()).collect::<Vec<_>>())
        .bind(e.iter().map(|r| &r.envelope.data).collect::<Vec<_>>())
        .bind(e.iter().map(|r| r.envelope.command_source.as_str()).collect::<Vec<_>>())
        .bind(e.iter().map(|r| r.envelope.command_id.as_str()).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// The outcomes of `without_outcome` rebuilt from their stored events: for each command whose
/// first event (its id is derived from the command's identity) is stored, `applied` at the
/// version of its last event, with the ids of its events. A command's events have
/// consecutive versions of one aggregate, so they are found by walking the unique
/// `(aggregate_type, aggregate_id, version)` index from the first one.
pub(crate) async fn load_outcomes_from_events(
    tx: &mut Transaction<'_, Postgres>,
    without_outcome: &[&commands::Command],
) -> Result<HashMap<CommandKey, Outcome>> {
    let mut keys: Vec<(Uuid, &str, &str)> = without_outcome
        .iter()
        .map(|c| {
            (
                commands::envelope::event_id(&c.source, &c.id, 0),
                c.source.as_str(),
                c.id.as_str(),
            )
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query(
        "WITH RECURSIVE wanted AS (
           SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[]) AS k(first_event_id, source, command_id)
         ), command_events AS (
           SELECT w.source, w.command_id, e.aggregate_type, e.aggregate_id, e.version, e.event_id
           FROM wanted w JOIN events e ON e.event_id = w.first_event_id
           WHERE e.source = w.source AND e.command_id = w.command_id
           UNION ALL
           SELECT c.source, c.command_id, e.aggregate_type, e.aggregate_id, e.version, e.event_id
           FROM command_events c
           JOIN events e ON e.aggregate_type = c.aggregate_type AND e.aggregate_id = c.aggregate_id
                        AND e.version = c.version + 1
           WHERE e.source = c.source AND e.command_id = c.command_id
         )
         SELECT source, command_id, version, event_id FROM command_events
         ORDER BY source, command_id, version",
    )
    .bind(keys.iter().map(|k| k.0).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.1).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.2).collect::<Vec<_>>())
    .fetch_all(&mut **tx)
    .await?;
    let mut out: HashMap<CommandKey, Outcome> = HashMap::new();
    for r in rows {
        let outcome = out.entry((r.get(0), r.get(1))).or_insert_with(|| Outcome {
            outcome: OutcomeKind::Applied,
            code: None,
            reason: None,
            version: 0,
            event_ids: Vec::new(),
            // The events do not say what payload the command carried: without a digest,
            // any later delivery of the key is a plain duplicate.
            digest: None,
            recorded_at: None,
        });
        outcome.version = r.get(2);
        outcome.event_ids.push(r.get(3));
    }
    Ok(out)
}

/// A stored event as `cmdproc inspect` shows it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredEvent {
    /// Its id.
    pub(crate) event_id: Uuid,
    /// The aggregate's version it made.
    pub(crate) version: i64,
    /// Its type.
    pub(crate) event_type: String,
    /// Its data.
    pub(crate) data: serde_json::Value,
    /// The id of the command that produced it.
    pub(crate) command_id: String,
}

/// The latest `limit` events of the aggregate `aggregate_type`/`aggregate_id`, newest first.
pub(crate) async fn recent_events(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
    limit: i64,
) -> Result<Vec<StoredEvent>> {
    let rows = sqlx::query(
        "SELECT event_id, version, event_type, data, command_id FROM events
         WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY version DESC LIMIT $3",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| StoredEvent {
            event_id: r.get(0),
            version: r.get(1),
            event_type: r.get(2),
            data: r.get(3),
            command_id: r.get(4),
        })
        .collect())
}
