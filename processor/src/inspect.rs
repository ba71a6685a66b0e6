//! Reading one aggregate with its recent commands and events, for `cmdproc inspect`.

use serde_json::{json, Value};
use sqlx::PgPool;

use crate::store::{self, Result};

/// The aggregate as JSON: `aggregate_type`, `aggregate_id`, `version`, `state`, and its
/// `recent_commands` and `recent_events` (newest last), or `None` when nothing is known
/// about it.
pub async fn aggregate(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
    limit: i64,
) -> Result<Option<Value>> {
    let agg = store::stored_aggregate(pool, aggregate_type, aggregate_id).await?;
    let commands = store::recent_commands(pool, aggregate_type, aggregate_id, limit).await?;
    let events = store::recent_events(pool, aggregate_type, aggregate_id, limit).await?;
    if agg.is_none() && commands.is_empty() {
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
    let (version, state) = agg.map_or((0, Value::Null), |a| (a.version, a.state));
    Ok(Some(json!({
        "aggregate_type": aggregate_type,
        "aggregate_id": aggregate_id,
        "version": version,
        "state": state,
        "recent_commands": recent_commands,
        "recent_events": recent_events,
    })))
}
