//! Recorded outcomes (`processed_commands`) and duplicate deliveries: what deduplicates a
//! command delivered again. Pruned after the dedupe window, with the horizon recorded.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use super::{Result, StoreError};
use crate::batch::{CommandKey, DuplicateRow, Outcome, OutcomeKind, ProcessedRow};

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
/// code`.
fn outcome_row(r: &sqlx::postgres::PgRow) -> (CommandKey, Outcome) {
    let recorded = Outcome {
        outcome: OutcomeKind::parse(r.get::<&str, _>(2)),
        code: r.get(6),
        reason: r.get(3),
        version: r.get(4),
        event_ids: r.get(5),
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
        "SELECT p.source, p.command_id, p.outcome, p.reason, p.version, p.event_ids, p.code
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
/// partition, on `topic`.
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
                version, event_ids, topic, partition, \"offset\")
             SELECT s, c, t, i, ct, o, code, r, v, COALESCE(string_to_array(e, ',')::uuid[], '{}'), $10,
                    part, off
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::bigint[], $9::text[], $11::int[], $12::bigint[], $13::text[])
               AS u(s, c, t, i, ct, o, r, v, e, part, off, code)",
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
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Records deliveries of commands already processed, each with its partition, on `topic`
/// (a delivery seen again only gets its time updated).
pub(crate) async fn write_duplicates(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    duplicates: &[(i32, &DuplicateRow)],
) -> Result<()> {
    if !duplicates.is_empty() {
        let d = duplicates;
        sqlx::query(
            "INSERT INTO duplicate_deliveries (topic, partition, \"offset\", source, command_id)
             SELECT $1, part, off, s, c FROM UNNEST($2::int[], $3::bigint[], $4::text[], $5::text[]) AS u(part, off, s, c)
             ON CONFLICT (topic, partition, \"offset\") DO UPDATE SET seen_at = now()",
        )
        .bind(topic)
        .bind(d.iter().map(|(part, _)| *part).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.offset).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.source.as_str()).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.command_id.as_str()).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
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
        "SELECT p.source, p.command_id, p.outcome, p.reason, p.version, p.event_ids, p.code
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
