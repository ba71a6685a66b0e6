//! The demo's workload: a seeded, reproducible mix of valid commands, re-sent duplicates and
//! invalid messages, and the serial in-memory model the results are checked against.
//!
//! Everything here is pure: the same seed always yields the same messages, in the same
//! order, with the same ids, so the model and a rerun agree message for message.

use std::collections::BTreeMap;

use anyhow::Context;
use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use commands::partitioner::partition_for_key;
use commands::{AggregateId, Command, CommandId, CommandType, DeadLetterKind, Source};
use commands::{Context as HandlerContext, Handled, Registry};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// The `source` of every demo command; with the id it is the idempotency key.
pub(in crate::cli) const SOURCE: &str = "/cmdproc-demo";
/// Accounts the workload opens and then moves money in and out of.
pub(in crate::cli) const ACCOUNTS: usize = 50;
/// Rooms the workload books and cancels.
pub(in crate::cli) const ROOMS: usize = 20;
/// Nights each room can be booked for; few nights, so many bookings collide.
const NIGHTS: u32 = 10;
/// Share of valid commands that are sent a second time.
const DUPLICATE_SHARE: f64 = 0.05;
/// Bytes of padding in the oversized message: above the workers' default limit of 256 KiB,
/// below the broker's default limit of about 1 MiB.
const OVERSIZED_BYTES: usize = 300 * 1024;

const PEOPLE: &[&str] = &[
    "ada", "alan", "barbara", "donald", "edsger", "frances", "grace", "john", "ken", "leslie",
    "margaret", "niklaus", "radia", "tony",
];

/// How a message goes onto the commands topic.
#[derive(Debug, Clone)]
pub(in crate::cli) enum Send {
    /// A valid command, by index into [`Workload::valid`], produced by the command producer
    /// (keyed by its subject, so it lands on the partition its key maps to).
    Command(usize),
    /// Arbitrary bytes, keyed as given.
    Raw {
        /// The message key.
        key: Option<Vec<u8>>,
        /// The message value.
        value: Option<Vec<u8>>,
    },
    /// A valid command produced to a partition its key does not map to.
    Misrouted {
        /// The command.
        command: Box<Command>,
        /// The wrong partition.
        partition: i32,
    },
}

/// What the processor must make of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::cli) enum Expect {
    /// The first delivery of valid command `i`: processed (applied or rejected).
    Processed(usize),
    /// A re-send of valid command `i`: detected as a duplicate, no effect.
    Duplicate(usize),
    /// A dead letter of this kind.
    DeadLetter {
        /// The expected kind.
        kind: DeadLetterKind,
        /// What is wrong with the message, for the output.
        what: &'static str,
    },
}

/// One message of the workload.
#[derive(Debug, Clone)]
pub(in crate::cli) struct Message {
    /// How to produce it.
    pub(in crate::cli) send: Send,
    /// What the processor must make of it.
    pub(in crate::cli) expect: Expect,
}

/// The whole workload, in produce order.
#[derive(Debug, Clone)]
pub(in crate::cli) struct Workload {
    /// The valid commands, each once, in produce order.
    pub(in crate::cli) valid: Vec<Command>,
    /// Every message to produce, in order: valid commands, duplicates and invalid ones.
    pub(in crate::cli) messages: Vec<Message>,
}

impl Workload {
    /// Generates `commands` valid commands (at least one per account, since each account is
    /// opened first) plus duplicates and invalid messages, from `seed`. `partitions` is the
    /// commands topic's partition count, needed to misroute a command on purpose.
    pub(in crate::cli) fn generate(seed: u64, commands: usize, partitions: i32) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let accounts: Vec<String> = (1..=ACCOUNTS).map(|i| format!("acc-{i:02}")).collect();
        let rooms: Vec<String> = (1..=ROOMS).map(|i| format!("room-{i:02}")).collect();
        let first_night = NaiveDate::from_ymd_opt(2026, 12, 20).expect("a valid date");
        let nights: Vec<NaiveDate> = first_night.iter_days().take(NIGHTS as usize).collect();
        let start: DateTime<Utc> = first_night
            .and_hms_opt(8, 0, 0)
            .expect("a valid time")
            .and_utc();

        let mut valid = Vec::with_capacity(commands);
        let push = |valid: &mut Vec<Command>, ty: &str, subject: &str, data: Value| {
            let n = valid.len();
            let mut c = command(&format!("cmd-{n:06}"), ty, subject, data);
            // Handlers read no clock; a deterministic time keeps reruns byte-identical.
            c.time = Some(start + TimeDelta::seconds(n as i64));
            valid.push(c);
        };
        // Every account is opened before anything else touches it, so deposits succeed.
        for acc in &accounts {
            let owner = PEOPLE.choose(&mut rng).expect("people");
            push(&mut valid, "account.Open", acc, json!({ "owner": owner }));
        }
        while valid.len() < commands {
            if rng.gen_bool(0.55) {
                let acc = accounts.choose(&mut rng).expect("accounts");
                if rng.gen_bool(0.5) {
                    let amount: i64 = rng.gen_range(100..=10_000);
                    push(
                        &mut valid,
                        "account.Deposit",
                        acc,
                        json!({ "amount": amount }),
                    );
                } else {
                    // Some withdrawals are far larger than any balance: business rejections.
                    let amount: i64 = if rng.gen_bool(0.15) {
                        rng.gen_range(50_000..=500_000)
                    } else {
                        rng.gen_range(100..=6_000)
                    };
                    push(
                        &mut valid,
                        "account.Withdraw",
                        acc,
                        json!({ "amount": amount }),
                    );
                }
            } else {
                let room = rooms.choose(&mut rng).expect("rooms");
                let night = nights.choose(&mut rng).expect("nights").to_string();
                if rng.gen_bool(0.25) {
                    push(&mut valid, "room.Cancel", room, json!({ "night": night }));
                } else {
                    let guest = PEOPLE.choose(&mut rng).expect("people");
                    push(
                        &mut valid,
                        "room.Book",
                        room,
                        json!({ "night": night, "guest": guest }),
                    );
                }
            }
        }

        // Extra messages go into slots between the valid commands: slot `s` is just before
        // valid command `s` (slot `n` is the end). A duplicate of command `j` goes into a
        // slot after `j`, so the original is always processed first.
        let n = valid.len();
        let mut extra: Vec<(usize, Message)> = Vec::new();
        let duplicates = ((n as f64) * DUPLICATE_SHARE).round() as usize;
        for _ in 0..duplicates {
            let j = rng.gen_range(0..n);
            let slot = rng.gen_range(j + 1..=n);
            extra.push((
                slot,
                Message {
                    send: Send::Command(j),
                    expect: Expect::Duplicate(j),
                },
            ));
        }
        for m in invalid_messages(&mut rng, &accounts, &rooms, &nights, partitions) {
            extra.push((rng.gen_range(0..=n), m));
        }
        // Stable: extra messages of one slot keep their generation order.
        extra.sort_by_key(|(slot, _)| *slot);

        let mut messages = Vec::with_capacity(n + extra.len());
        let mut extra = extra.into_iter().peekable();
        for slot in 0..=n {
            while let Some((_, m)) = extra.next_if(|(s, _)| *s == slot) {
                messages.push(m);
            }
            if slot < n {
                messages.push(Message {
                    send: Send::Command(slot),
                    expect: Expect::Processed(slot),
                });
            }
        }
        Self { valid, messages }
    }

    /// How many messages re-send an earlier command.
    pub(in crate::cli) fn duplicates(&self) -> usize {
        self.count(|e| matches!(e, Expect::Duplicate(_)))
    }

    /// How many messages must become dead letters.
    pub(in crate::cli) fn invalid(&self) -> usize {
        self.count(|e| matches!(e, Expect::DeadLetter { .. }))
    }

    fn count(&self, f: impl Fn(&Expect) -> bool) -> usize {
        self.messages.iter().filter(|m| f(&m.expect)).count()
    }
}

/// Builds a valid command; the generator only passes well-formed parts.
fn command(id: &str, ty: &str, subject: &str, data: Value) -> Command {
    Command::new(
        Source::parse(SOURCE).expect("a valid source"),
        CommandId::parse(id).expect("a valid id"),
        CommandType::parse(ty).expect("a valid type"),
        AggregateId::parse(subject).expect("a valid subject"),
        data,
    )
}

/// A structured-mode CloudEvent as JSON, for the invalid messages to tamper with.
fn envelope(id: &str, ty: &str, subject: &str, data: Value) -> Value {
    json!({
        "specversion": "1.0",
        "id": id,
        "source": SOURCE,
        "type": ty,
        "subject": subject,
        "datacontenttype": "application/json",
        "data": data,
    })
}

/// One of each way a message can fail before it reaches a handler, with the dead-letter
/// kind the contract assigns it.
fn invalid_messages(
    rng: &mut StdRng,
    accounts: &[String],
    rooms: &[String],
    nights: &[NaiveDate],
    partitions: i32,
) -> Vec<Message> {
    use DeadLetterKind::{KeyMismatch, Malformed, Misrouted, Schema, TooLarge, UnknownType};

    let mut out = Vec::new();
    let mut n = 0;
    let mut next_id = || {
        n += 1;
        format!("bad-{n:02}")
    };
    let acc = |rng: &mut StdRng| accounts.choose(rng).expect("accounts").clone();
    let night = nights[0].to_string();
    let raw = |key: Option<&str>, value: Option<Vec<u8>>, kind, what| Message {
        send: Send::Raw {
            key: key.map(|k| k.as_bytes().to_vec()),
            value,
        },
        expect: Expect::DeadLetter { kind, what },
    };
    let json_bytes = |v: &Value| serde_json::to_vec(v).expect("JSON serializes");

    // Malformed: not a CloudEvent at all.
    let a = acc(rng);
    let whole = json_bytes(&envelope(
        &next_id(),
        "account.Deposit",
        &a,
        json!({"amount": 5}),
    ));
    let truncated = whole[..whole.len() / 2].to_vec();
    out.push(raw(Some(&a), Some(truncated), Malformed, "truncated JSON"));
    let a = acc(rng);
    out.push(raw(
        Some(&a),
        Some(b"\xff\xfe\x00 not UTF-8".to_vec()),
        Malformed,
        "bytes that are not UTF-8",
    ));
    let a = acc(rng);
    out.push(raw(Some(&a), None, Malformed, "an empty value"));
    let a = acc(rng);
    out.push(raw(
        Some(&a),
        Some(br#"[{"type": "account.Deposit"}]"#.to_vec()),
        Malformed,
        "a JSON array",
    ));
    let a = acc(rng);
    out.push(raw(
        Some(&a),
        Some(format!("please deposit 500 into {a}").into_bytes()),
        Malformed,
        "plain text",
    ));
    let a = acc(rng);
    out.push(raw(
        Some(&a),
        Some(json_bytes(&json!({"account": a, "amount": 500}))),
        Malformed,
        "a JSON object that is not a CloudEvent",
    ));

    // Unknown types.
    let a = acc(rng);
    out.push(raw(
        Some(&a),
        Some(json_bytes(&envelope(
            &next_id(),
            "account.Teleport",
            &a,
            json!({"to": "mars"}),
        ))),
        UnknownType,
        "unknown command account.Teleport",
    ));
    out.push(raw(
        Some("order-1"),
        Some(json_bytes(&envelope(
            &next_id(),
            "order.Place",
            "order-1",
            json!({"sku": "tea"}),
        ))),
        UnknownType,
        "unknown aggregate type order",
    ));

    // Schema violations, of the data and of the envelope.
    let a = acc(rng);
    out.push(raw(
        Some(&a),
        Some(json_bytes(&envelope(
            &next_id(),
            "account.Deposit",
            &a,
            json!({"amount": -500}),
        ))),
        Schema,
        "negative amount",
    ));
    let a = acc(rng);
    out.push(raw(
        Some(&a),
        Some(json_bytes(&envelope(
            &next_id(),
            "account.Withdraw",
            &a,
            json!({"amount": "100"}),
        ))),
        Schema,
        "amount as a string",
    ));
    let a = acc(rng);
    out.push(raw(
        Some(&a),
        Some(json_bytes(&envelope(
            &next_id(),
            "account.Open",
            &a,
            json!({"owner": "mallory", "vip": true}),
        ))),
        Schema,
        "unknown field in data",
    ));
    let r = rooms.choose(rng).expect("rooms").clone();
    out.push(raw(
        Some(&r),
        Some(json_bytes(&envelope(
            &next_id(),
            "room.Book",
            &r,
            json!({ "night": night }),
        ))),
        Schema,
        "booking without a guest",
    ));
    let r = rooms.choose(rng).expect("rooms").clone();
    out.push(raw(
        Some(&r),
        Some(json_bytes(&envelope(
            &next_id(),
            "room.Book",
            &r,
            json!({"night": "24/12/2026", "guest": "ada"}),
        ))),
        Schema,
        "night that is not an ISO date",
    ));
    let a = acc(rng);
    let mut v = envelope(&next_id(), "account.Deposit", &a, json!({"amount": 5}));
    v["specversion"] = "0.3".into();
    out.push(raw(
        Some(&a),
        Some(json_bytes(&v)),
        Schema,
        "specversion 0.3",
    ));
    let a = acc(rng);
    let mut v = envelope("unused", "account.Deposit", &a, json!({"amount": 5}));
    v.as_object_mut().expect("an object").remove("id");
    out.push(raw(Some(&a), Some(json_bytes(&v)), Schema, "no id"));

    // The key must equal the subject.
    let (a, b) = {
        let two: Vec<&String> = accounts.choose_multiple(rng, 2).collect();
        (two[0].clone(), two[1].clone())
    };
    out.push(raw(
        Some(&b),
        Some(json_bytes(&envelope(
            &next_id(),
            "account.Deposit",
            &a,
            json!({"amount": 5}),
        ))),
        KeyMismatch,
        "key differs from subject",
    ));
    let a = acc(rng);
    out.push(raw(
        None,
        Some(json_bytes(&envelope(
            &next_id(),
            "account.Deposit",
            &a,
            json!({"amount": 5}),
        ))),
        KeyMismatch,
        "no key",
    ));

    // Valid commands on the wrong partition; only possible with more than one partition.
    if partitions > 1 {
        let a = acc(rng);
        let r = rooms.choose(rng).expect("rooms").clone();
        let misrouted = [
            command(&next_id(), "account.Deposit", &a, json!({"amount": 700})),
            command(
                &next_id(),
                "room.Book",
                &r,
                json!({"night": night, "guest": "eve"}),
            ),
        ];
        for c in misrouted {
            let right = partition_for_key(c.subject.as_str().as_bytes(), partitions)
                .expect("partitions is positive");
            out.push(Message {
                send: Send::Misrouted {
                    command: Box::new(c),
                    partition: (right + 1) % partitions,
                },
                expect: Expect::DeadLetter {
                    kind: Misrouted,
                    what: "valid command on the wrong partition",
                },
            });
        }
    }

    // Too large: otherwise a perfectly valid command.
    let a = acc(rng);
    let mut v = envelope(&next_id(), "account.Deposit", &a, json!({"amount": 5}));
    v["padding"] = "x".repeat(OVERSIZED_BYTES).into();
    out.push(raw(
        Some(&a),
        Some(json_bytes(&v)),
        TooLarge,
        "a 300 KiB command",
    ));
    out
}

/// An aggregate as the serial model leaves it.
#[derive(Debug, Clone, PartialEq)]
pub(in crate::cli) struct Modeled {
    /// Version: the number of events applied.
    pub(in crate::cli) version: i64,
    /// State as JSON, exactly as the engine stores it; `Null` if no event was applied.
    pub(in crate::cli) state: Value,
}

/// The result of applying the valid commands one by one, in produce order.
#[derive(Debug, Clone)]
pub(in crate::cli) struct Model {
    /// Every aggregate a valid command named, by `(type, id)`.
    pub(in crate::cli) aggregates: BTreeMap<(String, String), Modeled>,
    /// Whether valid command `i` is applied (`true`) or rejected (`false`).
    pub(in crate::cli) applied: Vec<bool>,
    /// The events the applied commands emit, in order.
    pub(in crate::cli) events: Vec<ModelEvent>,
}

/// An event as the serial model emits it.
#[derive(Debug, Clone, PartialEq)]
pub(in crate::cli) struct ModelEvent {
    /// `(type, id)` of the aggregate.
    pub(in crate::cli) aggregate: (String, String),
    /// The aggregate's version after the event.
    pub(in crate::cli) version: i64,
    /// `<aggregate_type>.<EventName>`, e.g. `account.Deposited`.
    pub(in crate::cli) event_type: String,
    /// The event's data.
    pub(in crate::cli) data: Value,
}

/// Refuses a registry without the domains the demo and the bench generate commands for.
pub(in crate::cli) fn require_example_domains(registry: &Registry) -> anyhow::Result<()> {
    for needed in ["account", "room"] {
        if registry.get(needed).is_none() {
            anyhow::bail!(
                "the demo and the bench generate `account` and `room` commands, and this \
                 processor does not know `{needed}` (it knows {}); run them with the stock \
                 `cmdproc` binary, or register `bank::Account` and `bank::Room`",
                registry.types().collect::<Vec<_>>().join(", ")
            );
        }
    }
    Ok(())
}

impl Model {
    /// Runs the domain's pure handlers over `valid` serially. Commands of one aggregate
    /// share a partition and are produced in this order, so this is the order the workers
    /// must apply them in; commands of different aggregates do not interact.
    pub(in crate::cli) fn run(registry: &Registry, valid: &[Command]) -> anyhow::Result<Self> {
        let mut aggregates: BTreeMap<(String, String), Modeled> = BTreeMap::new();
        let mut applied = Vec::with_capacity(valid.len());
        let mut events = Vec::new();
        for c in valid {
            let ty = c.command_type.aggregate_type();
            let aggregate = registry
                .get(ty)
                .with_context(|| format!("no aggregate type `{ty}` in the registry"))?;
            let key = (ty.to_owned(), c.subject.to_string());
            let entry = aggregates.entry(key.clone()).or_insert(Modeled {
                version: 0,
                state: Value::Null,
            });
            let context = HandlerContext::new(&c.id, &c.source, entry.version as u64)
                .with_time(c.time)
                .with_correlation_id(c.correlation_id.as_deref());
            match aggregate.handle(&entry.state, c.command_type.name(), &c.data, &context) {
                Handled::Invalid(e) => {
                    anyhow::bail!("the demo generated an invalid command {}: {e}", c.id)
                }
                Handled::Rejected(_rejection) => applied.push(false),
                Handled::Accepted(decision) => {
                    let emitted = decision.events;
                    // The engine leaves an aggregate untouched by a command without events.
                    if !emitted.is_empty() {
                        entry.state = aggregate.apply(&entry.state, &emitted);
                    }
                    for e in emitted {
                        entry.version += 1;
                        events.push(ModelEvent {
                            aggregate: key.clone(),
                            version: entry.version,
                            event_type: format!("{ty}.{}", e.name),
                            data: e.data,
                        });
                    }
                    applied.push(true);
                }
            }
        }
        Ok(Self {
            aggregates,
            applied,
            events,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_workload() {
        let a = Workload::generate(7, 500, 6);
        let b = Workload::generate(7, 500, 6);
        assert_eq!(a.valid, b.valid);
        assert_eq!(a.messages.len(), b.messages.len());
        let c = Workload::generate(8, 500, 6);
        assert_ne!(a.valid, c.valid);
    }

    #[test]
    fn every_valid_command_is_sent_once_before_its_duplicates() {
        let w = Workload::generate(1, 1000, 6);
        assert_eq!(w.valid.len(), 1000);
        assert_eq!(w.duplicates(), 50);
        let mut first = vec![None; w.valid.len()];
        for (pos, m) in w.messages.iter().enumerate() {
            match m.expect {
                Expect::Processed(i) => {
                    assert!(first[i].is_none(), "command {i} processed twice");
                    first[i] = Some(pos);
                }
                Expect::Duplicate(i) => {
                    assert!(
                        first[i].is_some_and(|p| p < pos),
                        "duplicate before original"
                    )
                }
                Expect::DeadLetter { .. } => {}
            }
        }
        assert!(first.iter().all(Option::is_some));
    }

    #[test]
    fn valid_commands_pass_the_schemas_and_invalid_ones_get_their_kind() {
        let w = Workload::generate(3, 300, 6);
        let registry = bank::registry();
        let schemas = registry.schemas();
        for c in &w.valid {
            let bytes = c.encode();
            let key = c.subject.as_str().as_bytes();
            assert!(Command::decode(Some(key), &[], Some(&bytes), schemas).is_ok());
        }
        for m in &w.messages {
            let (Send::Raw { key, value }, Expect::DeadLetter { kind, what }) =
                (&m.send, &m.expect)
            else {
                continue;
            };
            if *kind == DeadLetterKind::TooLarge {
                assert!(value.as_ref().is_some_and(|v| v.len() > 256 * 1024));
                continue;
            }
            let decoded = Command::decode(key.as_deref(), &[], value.as_deref(), schemas);
            assert_eq!(decoded.map_err(|e| e.kind).err(), Some(*kind), "{what}");
        }
        assert!(w.invalid() >= 20);
    }

    #[test]
    fn the_model_rejects_overdrafts_and_double_bookings() {
        let w = Workload::generate(42, 2000, 6);
        let model = Model::run(&bank::registry(), &w.valid).expect("a valid workload");
        let rejected = model.applied.iter().filter(|a| !**a).count();
        assert!(rejected > 100, "only {rejected} rejections");
        for ((ty, _), m) in &model.aggregates {
            if ty == "account" {
                assert!(m.state["balance"].as_i64().is_some_and(|b| b >= 0));
            }
        }
    }
}
