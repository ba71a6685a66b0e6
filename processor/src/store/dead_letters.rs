//! Recorded dead letters.

use std::collections::HashSet;

use sqlx::{Postgres, Row, Transaction};

use super::Result;
use crate::batch::{headers_to_json, DeadLetterRow};

/// Records dead letters, each with its partition, on `topic`, and returns the
/// `(partition, offset)` of those recorded now. A dead letter is published when it is first
/// recorded: a replay (or a restore) that meets the same message again finds its row and
/// publishes nothing.
pub(crate) async fn write_dead_letters(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    dead_letters: &[(i32, &DeadLetterRow)],
) -> Result<HashSet<(i32, i64)>> {
    let mut new_dead_letters: HashSet<(i32, i64)> = HashSet::new();
    if !dead_letters.is_empty() {
        let d = dead_letters;
        let recorded = sqlx::query(
            "INSERT INTO dead_letters (topic, partition, \"offset\", kind, message, key, value, headers,
                                       aggregate_type, aggregate_id)
             SELECT $1, part, off, k, m, key, val, h, t, i
             FROM UNNEST($2::int[], $3::bigint[], $4::text[], $5::text[], $6::bytea[], $7::bytea[], $8::jsonb[],
                         $9::text[], $10::text[]) AS u(part, off, k, m, key, val, h, t, i)
             ON CONFLICT DO NOTHING
             RETURNING partition, \"offset\"",
        )
        .bind(topic)
        .bind(d.iter().map(|(part, _)| *part).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.offset).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.kind.as_str()).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.message.as_str()).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.key.as_deref()).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.value.as_deref()).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| headers_to_json(&r.headers)).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.aggregate.as_ref().map(|a| a.0.as_str())).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.aggregate.as_ref().map(|a| a.1.as_str())).collect::<Vec<_>>())
        .fetch_all(&mut **tx)
        .await?;
        new_dead_letters.extend(recorded.iter().map(|r| (r.get(0), r.get(1))));
    }
    Ok(new_dead_letters)
}
