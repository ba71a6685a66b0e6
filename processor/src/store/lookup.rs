//! Reading one command's recorded outcome by its idempotency key, for callers that ask
//! after the fact (the gateway's `GET /commands/{source}/{id}`).

use sqlx::{PgPool, Row};

use super::Result;
use crate::batch::{LogPosition, Outcome, OutcomeKind};

/// The recorded outcome of the command `(source, id)`, or `None` when none is recorded: never
/// processed yet, dead-lettered (dead letters are not outcomes), or pruned after the dedupe
/// window.
pub async fn recorded_command(pool: &PgPool, source: &str, id: &str) -> Result<Option<Outcome>> {
    let row = sqlx::query(
        "SELECT outcome, code, reason, version, event_ids, digest, topic, partition, \"offset\"
         FROM processed_commands WHERE source = $1 AND command_id = $2",
    )
    .bind(source)
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| Outcome {
        outcome: OutcomeKind::parse(r.get::<&str, _>("outcome")),
        code: r.get("code"),
        reason: r.get("reason"),
        version: r.get("version"),
        event_ids: r.get("event_ids"),
        digest: r.get("digest"),
        recorded_at: Some(LogPosition {
            topic: r.get("topic"),
            partition: r.get("partition"),
            offset: r.get("offset"),
        }),
    }))
}
