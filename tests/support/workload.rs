//! A deterministic mixed workload over accounts and rooms, the serial model of it, and the
//! checks that compare a finished run with that model.

use std::collections::{BTreeMap, HashMap, HashSet};

use commands::{AggregateId, Command, CommandId, CommandType, Source};
use commands::{Context, Handled};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::Row;

use super::TestDb;

/// `count` commands over `accounts` accounts and `rooms` rooms, with about `dup_percent`
/// percent of them re-sent duplicates of earlier ones (same source and id).
pub fn generate(
    seed: u64,
    count: usize,
    accounts: usize,
    rooms: usize,
    dup_percent: u32,
) -> Vec<Command> {
    let mut rng = StdRng::seed_from_u64(seed);
    let source = Source::parse(format!("/workload/{seed}")).unwrap();
    let mut out: Vec<Command> = Vec::with_capacity(count);
    // Open every account up front so most later commands apply; a few stay unopened so that
    // "command before Open" rejections happen too.
    for a in 0..accounts {
        if a % 50 == 49 {
            continue;
        }
        out.push(command(
            &source,
            out.len(),
            "account.Open",
            &format!("acc-{a}"),
            json!({"owner": format!("owner-{a}")}),
        ));
    }
    while out.len() < count {
        if !out.is_empty() && rng.gen_range(0..100) < dup_percent {
            let original = out[rng.gen_range(0..out.len())].clone();
            out.push(original);
            continue;
        }
        let n = out.len();
        if rng.gen_bool(0.6) {
            let subject = format!("acc-{}", rng.gen_range(0..accounts));
            let amount: i64 = rng.gen_range(1..=500);
            let ty = if rng.gen_bool(0.5) {
                "account.Deposit"
            } else {
                "account.Withdraw"
            };
            out.push(command(&source, n, ty, &subject, json!({"amount": amount})));
        } else {
            let subject = format!("room-{}", rng.gen_range(0..rooms));
            let night = format!("2027-01-{:02}", rng.gen_range(1..=20));
            if rng.gen_bool(0.7) {
                let guest = format!("guest-{}", rng.gen_range(0..1000));
                out.push(command(
                    &source,
                    n,
                    "room.Book",
                    &subject,
                    json!({"night": night, "guest": guest}),
                ));
            } else {
                out.push(command(
                    &source,
                    n,
                    "room.Cancel",
                    &subject,
                    json!({"night": night}),
                ));
            }
        }
    }
    out
}

fn command(source: &Source, n: usize, ty: &str, subject: &str, data: Value) -> Command {
    Command::new(
        source.clone(),
        CommandId::parse(format!("cmd-{n}")).unwrap(),
        CommandType::parse(ty).unwrap(),
        AggregateId::parse(subject).unwrap(),
        data,
    )
}

/// The outcome of applying commands serially, one at a time, in produce order.
#[derive(Debug, Default)]
pub struct Model {
    /// `(type, id)` → `(version, state)`.
    pub aggregates: BTreeMap<(String, String), (i64, Value)>,
    pub applied: usize,
    pub rejected: usize,
    pub duplicates: usize,
    pub events: usize,
}

/// Runs the pure handlers over `commands` in order, skipping repeated `(source, id)`.
pub fn serial_model(commands: &[Command]) -> Model {
    let registry = bank::registry();
    let mut model = Model::default();
    let mut seen = HashSet::new();
    for c in commands {
        if !seen.insert((c.source.to_string(), c.id.to_string())) {
            model.duplicates += 1;
            continue;
        }
        let agg = registry.get(c.command_type.aggregate_type()).unwrap();
        let key = (
            c.command_type.aggregate_type().to_owned(),
            c.subject.to_string(),
        );
        let entry = model.aggregates.entry(key).or_insert((0, Value::Null));
        let context = Context::new(&c.id, &c.source, entry.0 as u64)
            .with_time(c.time)
            .with_correlation_id(c.correlation_id.as_deref());
        match agg.handle(&entry.1, c.command_type.name(), &c.data, &context) {
            Handled::Accepted(decision) => {
                let events = decision.events;
                model.applied += 1;
                model.events += events.len();
                if !events.is_empty() {
                    entry.1 = agg.apply(&entry.1, &events);
                    entry.0 += events.len() as i64;
                }
            }
            Handled::Rejected(_) => model.rejected += 1,
            Handled::Invalid(error) => panic!("the workload made an invalid command: {error}"),
        }
    }
    model.aggregates.retain(|_, (v, _)| *v > 0);
    model
}

/// Asserts everything a user would check after a run: every aggregate equals the serial
/// model (state and version), no balance is negative, no night was booked twice, every
/// aggregate's event versions run 1..=version without gaps, and the outcome counts match.
pub async fn assert_matches_model(db: &TestDb, model: &Model) {
    let rows = sqlx::query("SELECT aggregate_type, aggregate_id, version, state FROM aggregates")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let stored: BTreeMap<(String, String), (i64, Value)> = rows
        .into_iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
        .collect();
    let mut mismatches = Vec::new();
    for (key, want) in &model.aggregates {
        match stored.get(key) {
            Some(got) if got == want => {}
            other => mismatches.push(format!("{key:?}: stored {other:?}, model {want:?}")),
        }
    }
    for key in stored.keys() {
        if !model.aggregates.contains_key(key) {
            mismatches.push(format!("{key:?} stored but not in the model"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} aggregates differ from the serial model:\n{}",
        mismatches.len(),
        mismatches[..mismatches.len().min(20)].join("\n")
    );

    for ((t, id), (_, state)) in &stored {
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
        model.applied,
        "applied commands"
    );
    assert_eq!(
        counts.get("rejected").copied().unwrap_or(0) as usize,
        model.rejected,
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
    assert_eq!(events as usize, model.events, "stored events");

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
    let read = super::read_topic(&topics.events);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in &read {
        let v = m.json();
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
