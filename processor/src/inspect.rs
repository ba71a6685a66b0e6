//! Reading one aggregate with its recent commands and events, for `cmdproc inspect`.

use serde_json::{json, Value};
use sqlx::PgPool;

use crate::store::{self, Result};

/// The aggregate as JSON: `aggregate_type`, `aggregate_id`, `version`, `state`, its
/// `recent_commands` and `recent_events`, and `refused_commands`: deliveries naming it that
/// were refused for reusing the idempotency key of a command processed before with another
/// payload (outcome `key_reused`, no effect), each with the command its key was recorded
/// for (`original`, `null` once pruned). Lists are newest last. `None` when nothing is known
/// about the aggregate.
pub async fn aggregate(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
    limit: i64,
) -> Result<Option<Value>> {
    let agg = store::stored_aggregate(pool, aggregate_type, aggregate_id).await?;
    let commands = store::recent_commands(pool, aggregate_type, aggregate_id, limit).await?;
    let events = store::recent_events(pool, aggregate_type, aggregate_id, limit).await?;
    let refused = store::refused_deliveries(pool, aggregate_type, aggregate_id, limit).await?;
    let timers = store::aggregate_timers(pool, aggregate_type, aggregate_id).await?;
    if agg.is_none() && commands.is_empty() && refused.is_empty() && timers.is_empty() {
        return Ok(None);
    }
    let recent_commands: Vec<Value> = commands
        .iter()
        .rev()
        .map(|c| {
            json!({
                "source": c.source,
                "id": c.command_id,
                "type": c.command_type,
                "outcome": c.outcome,
                "code": c.code,
                "reason": c.reason,
                "version": c.version,
                "event_ids": c.event_ids,
                "partition": c.partition,
                "offset": c.offset,
                "processed_at": c.processed_at,
            })
        })
        .collect();
    let recent_events: Vec<Value> = events
        .iter()
        .rev()
        .map(|e| {
            json!({
                "id": e.event_id,
                "version": e.version,
                "type": e.event_type,
                "data": e.data,
                "command_id": e.command_id,
            })
        })
        .collect();
    let refused_commands: Vec<Value> = refused
        .iter()
        .rev()
        .map(|r| {
            json!({
                "source": r.source,
                "id": r.command_id,
                "type": r.command_type,
                "outcome": "key_reused",
                "partition": r.partition,
                "offset": r.offset,
                "seen_at": r.seen_at,
                "original": r.original.as_ref().map(|o| json!({
                    "type": o.command_type,
                    "aggregate_type": o.aggregate_type,
                    "aggregate_id": o.aggregate_id,
                    "outcome": o.outcome,
                })),
            })
        })
        .collect();
    let (version, state) = agg.map_or((0, Value::Null), |a| (a.version, a.state));
    Ok(Some(json!({
        "aggregate_type": aggregate_type,
        "aggregate_id": aggregate_id,
        "version": version,
        "state": state,
        "recent_commands": recent_commands,
        "recent_events": recent_events,
        "refused_commands": refused_commands,
        "pending_timers": timers,
    })))
}
