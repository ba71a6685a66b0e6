//! Reading one aggregate with its recent commands and events, for `cmdproc inspect`.

use serde_json::{json, Value};
use sqlx::{PgPool, Row};

use crate::store::Result;

/// The aggregate as JSON: `aggregate_type`, `aggregate_id`, `version`, `state`, and its
/// `recent_commands` and `recent_events` (newest last), or `None` when nothing is known
/// about it.
pub async fn aggregate(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
    limit: i64,
) -> Result<Option<Value>> {
    let agg = sqlx::query("SELECT version, state, updated_at FROM aggregates WHERE aggregate_type = $1 AND aggregate_id = $2")
        .bind(aggregate_type)
        .bind(aggregate_id)
        .fetch_optional(pool)
        .await?;
    let commands = sqlx::query(
        "SELECT source, command_id, command_type, outcome, reason, version, event_ids, partition, \"offset\", processed_at,
                code
         FROM processed_commands WHERE aggregate_type = $1 AND aggregate_id = $2
         ORDER BY processed_at DESC, \"offset\" DESC LIMIT $3",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let events = sqlx::query(
        "SELECT event_id, version, event_type, data, command_id FROM events
         WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY version DESC LIMIT $3",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    if agg.is_none() && commands.is_empty() {
        return Ok(None);
    }
    let recent_commands: Vec<Value> = commands
        .iter()
        .rev()
        .map(|r| {
            json!({
                "source": r.get::<String, _>(0),
                "id": r.get::<String, _>(1),
                "type": r.get::<String, _>(2),
                "outcome": r.get::<String, _>(3),
                "code": r.get::<Option<String>, _>(10),
                "reason": r.get::<Option<String>, _>(4),
                "version": r.get::<i64, _>(5),
                "event_ids": r.get::<Vec<uuid::Uuid>, _>(6),
                "partition": r.get::<i32, _>(7),
                "offset": r.get::<i64, _>(8),
                "processed_at": r.get::<chrono::DateTime<chrono::Utc>, _>(9),
            })
        })
        .collect();
    let recent_events: Vec<Value> = events
        .iter()
        .rev()
        .map(|r| {
            json!({
                "id": r.get::<uuid::Uuid, _>(0),
                "version": r.get::<i64, _>(1),
                "type": r.get::<String, _>(2),
                "data": r.get::<Value, _>(3),
                "command_id": r.get::<String, _>(4),
            })
        })
        .collect();
    let (version, state) = agg.map_or((0, Value::Null), |r| {
        (r.get::<i64, _>(0), r.get::<Value, _>(1))
    });
    Ok(Some(json!({
        "aggregate_type": aggregate_type,
        "aggregate_id": aggregate_id,
        "version": version,
        "state": state,
        "recent_commands": recent_commands,
        "recent_events": recent_events,
    })))
}
