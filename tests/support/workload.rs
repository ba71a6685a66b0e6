//! The integration suites' use of the shared harness ([`processor::harness`]): a mixed
//! workload over accounts and rooms, its serial model, and the checks that compare a
//! finished run with that model.

use std::collections::{BTreeMap, HashMap, HashSet};

use commands::Command;
pub use processor::harness::model::Model;
use processor::harness::model::Modeled;
use processor::harness::workload::{Options, Workload};
use serde_json::Value;
use sqlx::Row;

use super::TestDb;

/// `count` commands over `accounts` accounts (every 50th never opened, so that "command
/// before Open" rejections happen too) and `rooms` rooms, then about `dup_percent` percent
/// of them re-sent later (same source and id). The source holds the seed, so workloads of
/// different seeds can share a topic.
pub fn generate(
    seed: u64,
    count: usize,
    accounts: usize,
    rooms: usize,
    dup_percent: u32,
) -> Vec<Command> {
    Workload::generate(&Options {
        source: format!("/workload/{seed}"),
        accounts,
        rooms,
        unopened_every: 50,
        duplicates: f64::from(dup_percent) / 100.0,
        ..Options::new(seed, count)
    })
    .expect("a valid workload")
    .commands()
}

/// Runs the bank's pure handlers over `commands` in order, skipping repeated `(source, id)`.
pub fn serial_model(commands: &[Command]) -> Model {
    Model::run(&bank::registry(), commands).expect("the workload is valid")
}

/// Every aggregate row of the test's database.
pub async fn stored_aggregates(db: &TestDb) -> BTreeMap<(String, String), Modeled> {
    sqlx::query("SELECT aggregate_type, aggregate_id, version, state FROM aggregates")
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                (r.get(0), r.get(1)),
                Modeled {
                    version: r.get(2),
                    state: r.get(3),
                },
            )
        })
        .collect()
}

/// Asserts everything a user would check after a run: every aggregate equals the serial
/// model (state and version), no balance is negative, no night was booked twice, every
/// aggregate's event versions run 1..=version without gaps, and the outcome counts match.
pub async fn assert_matches_model(db: &TestDb, model: &Model) {
    let stored = stored_aggregates(db).await;
    let modeled = model.stored();
    let mut mismatches = Vec::new();
    for (key, want) in &modeled {
        match stored.get(key) {
            Some(got) if got == want => {}
            other => mismatches.push(format!("{key:?}: stored {other:?}, model {want:?}")),
        }
    }
    for key in stored.keys() {
        if !modeled.contains_key(key) {
            mismatches.push(format!("{key:?} stored but not in the model"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} aggregates differ from the serial model:\n{}",
        mismatches.len(),
        mismatches[..mismatches.len().min(20)].join("\n")
    );

    for ((t, id), Modeled { state, .. }) in &stored {
        if t == "account" {
            assert!(
                state["balance"].as_i64().unwrap() >= 0,
                "account {id} is negative: {state}"
            );
        }
    }

    let outcomes = sqlx::query("SELECT outcome, count(*) FROM processed_commands GROUP BY outcome")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let counts: HashMap<String, i64> = outcomes.into_iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        counts.get("applied").copied().unwrap_or(0) as usize,
        model.applied(),
        "applied commands"
    );
    assert_eq!(
        counts.get("rejected").copied().unwrap_or(0) as usize,
        model.rejected(),
        "rejected commands"
    );

    // Versions without gaps: per aggregate, events numbered exactly 1..=version.
    let gaps = sqlx::query(
        "SELECT e.aggregate_type, e.aggregate_id, count(*), min(e.version), max(e.version), a.version
         FROM events e JOIN aggregates a USING (aggregate_type, aggregate_id)
         GROUP BY e.aggregate_type, e.aggregate_id, a.version
         HAVING count(*) <> max(e.version) OR min(e.version) <> 1 OR max(e.version) <> a.version",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(
        gaps.is_empty(),
        "{} aggregates have gaps in their event versions",
        gaps.len()
    );
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(events as usize, model.events.len(), "stored events");

    // No night booked twice: replay each room's events in version order.
    let room_events = sqlx::query(
        "SELECT aggregate_id, event_type, data FROM events WHERE aggregate_type = 'room' ORDER BY aggregate_id, version",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut booked: HashSet<(String, String)> = HashSet::new();
    for r in room_events {
        let (room, ty, data): (String, String, Value) = (r.get(0), r.get(1), r.get(2));
        let night = data["night"].as_str().unwrap().to_owned();
        if ty == "room.Booked" {
            assert!(
                booked.insert((room.clone(), night.clone())),
                "room {room} night {night} booked twice"
            );
        } else {
            assert!(
                booked.remove(&(room.clone(), night.clone())),
                "room {room} night {night} cancelled while free"
            );
        }
    }
}

/// Asserts the events topic holds exactly the stored events, each once: same ids, none
/// missing, none unknown, none twice, each keyed by its aggregate. Returns how many there are.
pub async fn assert_events_published(db: &TestDb, topics: &super::TestTopics) -> usize {
    let stored: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT event_id FROM events")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let stored: HashSet<String> = stored.into_iter().map(|u| u.to_string()).collect();
    // A relay records its position right after its Kafka transaction commits; a reader
    // asking the broker at that moment can still see the partition's end before the batch,
    // so a short read is read again (up to 30 s) before anything counts as missing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let read = loop {
        let read = super::read_topic(&topics.events);
        let ids: HashSet<String> = read
            .iter()
            .filter_map(|m| m.json().ok())
            .filter_map(|v| v["id"].as_str().map(str::to_owned))
            .collect();
        if stored.iter().all(|id| ids.contains(id)) || std::time::Instant::now() > deadline {
            break read;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in &read {
        let v = m.json().expect("JSON value");
        let id = v["id"].as_str().expect("event id").to_owned();
        assert_eq!(
            m.key.as_deref(),
            v["subject"].as_str().map(str::as_bytes),
            "event key is its aggregate id"
        );
        *seen.entry(id).or_default() += 1;
    }
    let twice = seen.values().filter(|n| **n > 1).count();
    let missing = stored.iter().filter(|id| !seen.contains_key(*id)).count();
    let unknown = seen.keys().filter(|id| !stored.contains(*id)).count();
    assert_eq!(
        missing, 0,
        "{missing} stored events never reached the topic"
    );
    assert_eq!(
        unknown, 0,
        "{unknown} events on the topic were never stored"
    );
    assert_eq!(
        twice, 0,
        "{twice} events appear more than once on the topic"
    );
    seen.len()
}
