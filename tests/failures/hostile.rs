//! Hostile input: ten thousand malformed, oversized, misrouted and otherwise hostile
//! messages mixed with valid commands, and a NUL character that Postgres cannot store.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use commands::envelope::DeadLetterKind;
use commands::partitioner::partition_for_key;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::Row;

use super::{command, WAIT};
use crate::support::workload::{
    assert_events_published, assert_matches_model, generate, serial_model,
};
use crate::support::{
    ends, produce_raw, wait_processed, RawMessage, TestDb, TestTopics, WorkerProcess,
};

// ---------------------------------------------------------------------------------------
// 7. Ten thousand hostile messages mixed with valid commands.

/// Expected dead-letter kinds of one hostile message (any of them).
type Kinds = &'static [&'static str];

/// One hostile message and the dead-letter kinds it may legitimately get.
struct Hostile {
    message: RawMessage,
    kinds: Kinds,
}

/// A structured-mode envelope with the given attributes, as JSON.
fn envelope(id: &str, ty: &str, subject: &str, data: Value) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "/hostile", "type": ty,
           "subject": subject, "data": data})
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let n = rng.gen_range(0..=max);
    (0..n).map(|_| rng.gen()).collect()
}

/// Headers that mean nothing to cmdproc (no `ce_` prefix): binary values, null values,
/// odd names. They must not change how a message is handled.
fn junk_headers(rng: &mut StdRng) -> Vec<(String, Option<Vec<u8>>)> {
    (0..rng.gen_range(1..4))
        .map(|i| {
            let value = match rng.gen_range(0..3) {
                0 => None,
                1 => Some(random_bytes(rng, 40)),
                _ => Some(b"text/plain; charset=\xff".to_vec()),
            };
            let name = match i {
                0 => "content-type".to_owned(),
                _ => format!("x-junk-{}", rng.gen_range(0..1000)),
            };
            (name, value)
        })
        .collect()
}

/// A hostile message of a random category. `n` makes ids unique; `partitions` is the
/// commands topic's partition count.
fn hostile(rng: &mut StdRng, n: usize, partitions: i32, limit: usize) -> Hostile {
    let subject = format!("acc-{}", rng.gen_range(0..100));
    let id = format!("h-{n}");
    let home = partition_for_key(subject.as_bytes(), partitions).unwrap();
    let valid = || {
        serde_json::to_vec(&envelope(
            &id,
            "account.Deposit",
            &subject,
            json!({"amount": 5}),
        ))
        .unwrap()
    };
    let keyed = |value: Vec<u8>| RawMessage {
        partition: home,
        key: Some(subject.clone().into_bytes()),
        value: Some(value),
        headers: Vec::new(),
    };
    let (mut message, kinds): (RawMessage, Kinds) = match rng.gen_range(0..16) {
        // Random bytes with a random key, or none, on any partition.
        0 => {
            let key = match rng.gen_range(0..3) {
                0 => None,
                1 => Some(Vec::new()),
                _ => Some(random_bytes(rng, 30)),
            };
            let value = random_bytes(rng, 300);
            (
                RawMessage {
                    partition: rng.gen_range(0..partitions),
                    key,
                    value: Some(value),
                    headers: Vec::new(),
                },
                &["malformed"],
            )
        }
        // A valid envelope with invalid UTF-8 spliced in.
        1 => {
            let mut v = valid();
            let at = rng.gen_range(1..v.len() - 1);
            v[at] = 0xff;
            v.insert(at, 0xc3);
            (keyed(v), &["malformed"])
        }
        // A valid envelope cut short.
        2 => {
            let v = valid();
            let cut = rng.gen_range(0..v.len());
            (keyed(v[..cut].to_vec()), &["malformed"])
        }
        // Nesting deeper than any parser should follow.
        3 => {
            let depth = rng.gen_range(200..10_000);
            let value = match rng.gen_range(0..3) {
                0 => "[".repeat(depth).into_bytes(),
                1 => format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes(),
                _ => {
                    let data = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
                    format!(
                        r#"{{"specversion":"1.0","id":"{id}","source":"/hostile","type":"account.Deposit","subject":"{subject}","data":{data}}}"#
                    )
                    .into_bytes()
                }
            };
            (keyed(value), &["malformed"])
        }
        // Numbers no integer holds.
        4 => {
            let amount =
                ["1e400", "-1e400", "1180591620717411303424", "1.5", "1e-400"][rng.gen_range(0..5)];
            let value = format!(
                r#"{{"specversion":"1.0","id":"{id}","source":"/hostile","type":"account.Deposit","subject":"{subject}","data":{{"amount":{amount}}}}}"#
            );
            (keyed(value.into_bytes()), &["malformed", "schema"])
        }
        // Binary mode (ce_* headers) with garbage.
        5 => {
            let mut headers: Vec<(String, Option<Vec<u8>>)> = vec![
                ("ce_specversion".into(), Some(b"1.0".to_vec())),
                ("ce_id".into(), Some(id.clone().into_bytes())),
                ("ce_source".into(), Some(b"/hostile".to_vec())),
                ("ce_type".into(), Some(b"account.Deposit".to_vec())),
                ("ce_subject".into(), Some(subject.clone().into_bytes())),
            ];
            let mut value = br#"{"amount":5}"#.to_vec();
            let kinds: Kinds = match rng.gen_range(0..6) {
                0 => {
                    headers[0].1 = Some(vec![0xff, 0xfe, 0x00]);
                    &["malformed"]
                }
                1 => {
                    value = random_bytes(rng, 50);
                    value.insert(0, b'{');
                    &["malformed"]
                }
                2 => {
                    headers.truncate(1);
                    &["schema"]
                }
                3 => {
                    headers.push(("ce_expectedversion".into(), Some(b"-3".to_vec())));
                    &["schema"]
                }
                4 => {
                    headers[3].1 = Some(b"Account..deposit".to_vec());
                    &["schema"]
                }
                _ => {
                    headers[0].1 = None;
                    &["schema", "malformed"]
                }
            };
            let mut m = keyed(value);
            m.headers = headers;
            (m, kinds)
        }
        // No key, or an empty one.
        6 => {
            let mut m = keyed(valid());
            m.key = if rng.gen_bool(0.5) {
                None
            } else {
                Some(Vec::new())
            };
            (m, &["key_mismatch"])
        }
        // A key that is not the subject (sent to the key's partition).
        7 => {
            let other = format!("acc-other-{}", rng.gen_range(0..100));
            let mut m = keyed(valid());
            m.partition = partition_for_key(other.as_bytes(), partitions).unwrap();
            m.key = Some(other.into_bytes());
            (m, &["key_mismatch"])
        }
        // Larger than --max-command-bytes.
        8 => {
            let pad = "x".repeat(rng.gen_range(limit..3 * limit));
            let v = serde_json::to_vec(&envelope(
                &id,
                "account.Open",
                &subject,
                json!({"owner": pad}),
            ))
            .unwrap();
            (keyed(v), &["too_large"])
        }
        // Types nobody handles.
        9 => {
            let ty = ["account.Teleport", "spaceship.Launch", "room.Demolish"][rng.gen_range(0..3)];
            let v = serde_json::to_vec(&envelope(&id, ty, &subject, json!({"amount": 5}))).unwrap();
            (keyed(v), &["unknown_type"])
        }
        // Schema violations, in the data and in the envelope.
        10 => {
            let mut e = envelope(&id, "account.Deposit", &subject, json!({"amount": 5}));
            match rng.gen_range(0..8) {
                0 => e["data"] = json!({"amount": -5}),
                1 => e["data"] = json!({"amount": "10"}),
                2 => e["data"] = json!({"amount": 5, "extra": true}),
                3 => e["data"] = Value::Null,
                4 => e["specversion"] = json!("0.3"),
                5 => e["id"] = json!(""),
                6 => e["time"] = json!("yesterday"),
                _ => {
                    e.as_object_mut().unwrap().remove("source");
                }
            }
            (keyed(serde_json::to_vec(&e).unwrap()), &["schema"])
        }
        // A valid command on a partition its key does not map to.
        11 => {
            let mut m = keyed(valid());
            m.partition = (home + rng.gen_range(1..partitions)) % partitions;
            (m, &["misrouted"])
        }
        // JSON that is not a CloudEvent.
        12 => {
            let v = [
                r#"{"hello":"world"}"#,
                "[1,2,3]",
                r#""acc-1""#,
                "null",
                "42",
                "{}",
            ][rng.gen_range(0..6)];
            (keyed(v.as_bytes().to_vec()), &["malformed"])
        }
        // No value at all.
        13 => {
            let mut m = keyed(Vec::new());
            m.value = if rng.gen_bool(0.5) {
                None
            } else {
                Some(Vec::new())
            };
            (m, &["malformed"])
        }
        // U+0000 in data or in the correlation id: valid JSON that Postgres cannot store.
        14 => {
            let mut e = envelope(&id, "account.Open", &subject, json!({"owner": "a\u{0}b"}));
            if rng.gen_bool(0.5) {
                e = envelope(&id, "account.Deposit", &subject, json!({"amount": 5}));
                e["correlationid"] = json!("\u{0}");
            }
            (keyed(serde_json::to_vec(&e).unwrap()), &["schema"])
        }
        // Control characters where identities go.
        _ => {
            let bad_subject = format!("{subject}\u{7}");
            let v = serde_json::to_vec(&envelope(
                &id,
                "account.Deposit",
                &bad_subject,
                json!({"amount": 5}),
            ))
            .unwrap();
            let mut m = keyed(v);
            m.key = Some(bad_subject.into_bytes());
            (m, &["schema"])
        }
    };
    if message.headers.is_empty() && rng.gen_bool(0.3) {
        message.headers = junk_headers(rng);
    }
    Hostile { message, kinds }
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_hostile_messages_never_stop_a_worker() {
    let _serial = crate::serial().await;
    let db = TestDb::new().await;
    let topics = TestTopics::new(4).await;
    let limit = 20_000;
    let args = ["--max-command-bytes", "20000"];
    let mut workers = [
        WorkerProcess::spawn(&db, &topics, "w0", &args),
        WorkerProcess::spawn(&db, &topics, "w1", &args),
    ];
    let valid = generate(707, 2_000, 100, 40, 3);
    let model = serial_model(&valid);

    // Valid commands at random positions among hostile ones, in their own order.
    let mut rng = StdRng::seed_from_u64(707);
    let total = 10_000;
    let mut valid_at: BTreeSet<usize> = BTreeSet::new();
    while valid_at.len() < valid.len() {
        valid_at.insert(rng.gen_range(0..total));
    }
    let mut messages = Vec::with_capacity(total);
    let mut expected: Vec<Option<Kinds>> = Vec::with_capacity(total);
    let mut next_valid = valid.iter();
    for n in 0..total {
        if valid_at.contains(&n) {
            let c = next_valid.next().unwrap();
            let mut headers = vec![(
                "content-type".to_owned(),
                Some(b"application/cloudevents+json".to_vec()),
            )];
            // Junk headers on a valid command change nothing.
            if rng.gen_bool(0.2) {
                headers = junk_headers(&mut rng);
            }
            messages.push(RawMessage {
                partition: partition_for_key(c.subject.as_str().as_bytes(), topics.partitions)
                    .unwrap(),
                key: Some(c.subject.as_str().as_bytes().to_vec()),
                value: Some(c.encode()),
                headers,
            });
            expected.push(None);
        } else {
            let h = hostile(&mut rng, n, topics.partitions, limit);
            messages.push(h.message);
            expected.push(Some(h.kinds));
        }
    }
    let deliveries = produce_raw(&topics.commands, &messages).await;
    let refs: Vec<&WorkerProcess> = workers.iter().collect();
    wait_processed(&db, &topics.commands, &ends(&deliveries), WAIT, &refs).await;

    assert_matches_model(&db, &model).await;
    assert_events_published(&db, &topics).await;

    // Every hostile message, and nothing else, is a dead letter with a known kind.
    let rows = sqlx::query("SELECT partition, \"offset\", kind, message FROM dead_letters")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let recorded: HashMap<(i32, i64), (String, String)> = rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
        .collect();
    let mut wrong = Vec::new();
    let mut hostile_count = 0;
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for ((d, kinds), m) in deliveries.iter().zip(&expected).zip(&messages) {
        let got = recorded.get(&(d.partition, d.offset));
        match (kinds, got) {
            (None, None) => {}
            (None, Some((kind, why))) => wrong.push(format!(
                "valid command at {}/{} dead-lettered as {kind}: {why}",
                d.partition, d.offset
            )),
            (Some(_), None) => wrong.push(format!(
                "hostile message at {}/{} has no dead letter: {:?}",
                d.partition,
                d.offset,
                m.value
                    .as_deref()
                    .map(|v| String::from_utf8_lossy(&v[..v.len().min(120)]).into_owned())
            )),
            (Some(kinds), Some((kind, why))) => {
                hostile_count += 1;
                *by_kind.entry(kind.clone()).or_default() += 1;
                if DeadLetterKind::parse(kind).is_none() || !kinds.contains(&kind.as_str()) {
                    wrong.push(format!(
                        "hostile message at {}/{} dead-lettered as `{kind}` ({why}), expected one of {kinds:?}",
                        d.partition, d.offset
                    ));
                }
                if why.is_empty() {
                    wrong.push(format!(
                        "dead letter at {}/{} has no message",
                        d.partition, d.offset
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} messages were handled wrongly:\n{}",
        wrong.len(),
        wrong[..wrong.len().min(20)].join("\n")
    );
    let hostile_total = expected.iter().filter(|k| k.is_some()).count();
    assert_eq!(hostile_count, hostile_total);
    assert_eq!(recorded.len(), hostile_total, "no other dead letters");
    eprintln!("{hostile_total} hostile messages dead-lettered: {by_kind:?}");

    let dlq = crate::support::read_topic(&topics.dead_letters);
    assert_eq!(
        dlq.len(),
        hostile_total,
        "the dead-letter topic holds each hostile message once"
    );
    let origins: BTreeSet<(String, String)> = dlq
        .iter()
        .map(|m| {
            (
                m.header("cmdproc-original-partition").unwrap_or_default(),
                m.header("cmdproc-original-offset").unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(origins.len(), hostile_total, "distinct origins on the DLQ");

    for w in &mut workers {
        assert!(
            w.alive(),
            "{} is still running:\n{}",
            w.name,
            w.log_tail(20)
        );
    }
    drop(workers);
    db.drop_db().await;
}

// ---------------------------------------------------------------------------------------
// 7b. A NUL character in command data: valid JSON and valid per the schemas, but Postgres
// stores it neither in `jsonb` nor in `text` (the engine once retried such a batch forever).

#[tokio::test(flavor = "multi_thread")]
async fn a_nul_character_in_a_command_does_not_stall_its_partition() {
    let _serial = crate::serial().await;
    let db = TestDb::new().await;
    let topics = TestTopics::new(1).await;
    let mut worker = WorkerProcess::spawn(&db, &topics, "w0", &[]);
    let sent = [
        command(
            "/nul",
            "open".into(),
            "account.Open",
            "acc-ok",
            json!({"owner": "ada"}),
        ),
        // Schema-valid commands whose data holds U+0000.
        command(
            "/nul",
            "nul-open".into(),
            "account.Open",
            "acc-nul",
            json!({"owner": "nul\u{0}byte"}),
        ),
        command(
            "/nul",
            "nul-book".into(),
            "room.Book",
            "room-nul",
            json!({"night": "2027-01-01", "guest": "\u{0}"}),
        ),
        command(
            "/nul",
            "deposit".into(),
            "account.Deposit",
            "acc-ok",
            json!({"amount": 100}),
        ),
    ];
    let messages: Vec<RawMessage> = sent
        .iter()
        .map(|c| RawMessage {
            partition: 0,
            key: Some(c.subject.as_str().as_bytes().to_vec()),
            value: Some(c.encode()),
            headers: Vec::new(),
        })
        .collect();
    let deliveries = produce_raw(&topics.commands, &messages).await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&deliveries),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;

    // Input that cannot be stored is a dead letter, recorded with the offset it moves past;
    // it is neither retried forever nor allowed to block the commands behind it.
    for d in &deliveries[1..3] {
        let kind: Option<String> = sqlx::query_scalar(
            "SELECT kind FROM dead_letters WHERE partition = $1 AND \"offset\" = $2",
        )
        .bind(d.partition)
        .bind(d.offset)
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        assert_eq!(
            kind.as_deref(),
            Some("schema"),
            "offset {} is dead-lettered",
            d.offset
        );
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_commands")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        applied, 2,
        "only the two commands without NUL were processed"
    );
    let balance: Value =
        sqlx::query_scalar("SELECT state FROM aggregates WHERE aggregate_id = 'acc-ok'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(balance["balance"], 100, "the commands behind it applied");
    assert!(worker.alive());
    drop(worker);
    db.drop_db().await;
}
