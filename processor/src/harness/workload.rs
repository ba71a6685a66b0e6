//! The workload: seeded, reproducible commands over accounts and rooms, for the demo, the
//! benchmark and the integration tests alike.
//!
//! Accounts are opened first (all of them, or all but every n-th, so that "before Open"
//! rejections happen too); then each command moves money in or out of an account, picked
//! uniformly or Zipf-skewed, or books or cancels a room night. On request some valid
//! commands are re-sent later (duplicates) and one message of each way a message can be
//! invalid is mixed in, each with what the processor must make of it.
//!
//! Everything here is pure: the same options always yield the same messages, in the same
//! order, with the same ids, so the model and a rerun agree message for message.

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use commands::partitioner::partition_for_key;
use commands::{AggregateId, Command, CommandId, CommandType, DeadLetterKind, Source};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde_json::{json, Value};

/// Nights each room can be booked for; few nights, so many bookings collide.
const NIGHTS: u32 = 10;
/// Share of the commands after the opens that go to accounts when there are rooms too.
const ACCOUNT_SHARE: f64 = 0.55;
/// Share of room commands that cancel a night rather than book one.
const CANCEL_SHARE: f64 = 0.25;
/// Bytes of padding in the oversized message: above the workers' default limit of 256 KiB,
/// below the broker's default limit of about 1 MiB.
const OVERSIZED_BYTES: usize = 300 * 1024;

const PEOPLE: &[&str] = &[
    "ada", "alan", "barbara", "donald", "edsger", "frances", "grace", "john", "ken", "leslie",
    "margaret", "niklaus", "radia", "tony",
];

/// Why a workload cannot be generated.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Options that describe no workload.
    #[error("{0}")]
    Options(String),
}

/// How the commands pick their account.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Skew {
    /// Every account equally likely.
    Uniform,
    /// Zipf with this exponent: the account of rank k (`acc-{k-1}`) with probability
    /// proportional to 1/k^s, so `acc-0` is the hot key.
    Zipf(f64),
}

/// What to generate. [`Options::new`] gives the demo's mix; change the fields for others.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Seed of the generator.
    pub seed: u64,
    /// The `source` of every command; with the id it is the idempotency key, so two
    /// workloads meant to be sent to one topic need different sources.
    pub source: String,
    /// Valid commands, the opens included (duplicates and invalid messages come on top).
    pub commands: usize,
    /// Accounts, `acc-0`, `acc-1`, ...; only the first `commands` are used when fewer.
    pub accounts: usize,
    /// Rooms, `room-0`, `room-1`, ...; 0 for account commands only.
    pub rooms: usize,
    /// How account commands pick their account.
    pub skew: Skew,
    /// Share of account commands that withdraw rather than deposit.
    pub withdrawals: f64,
    /// Share of withdrawals far larger than any balance: business rejections.
    pub overdrafts: f64,
    /// Every n-th account (`acc-{n-1}`, `acc-{2n-1}`, ...) is never opened, so its commands
    /// are rejected; 0 opens every account.
    pub unopened_every: usize,
    /// Share of valid commands sent a second time, later than the first.
    pub duplicates: f64,
    /// One message of each way a message can be invalid, for a commands topic of this many
    /// partitions (misrouting needs two or more); `None` for none.
    pub invalid: Option<i32>,
}

impl Options {
    /// The demo's mix: 50 accounts and 20 rooms, half the account commands withdrawals,
    /// some of them overdrafts, no duplicates, no invalid messages.
    pub fn new(seed: u64, commands: usize) -> Self {
        Self {
            seed,
            source: "/workload".to_owned(),
            commands,
            accounts: 50,
            rooms: 20,
            skew: Skew::Uniform,
            withdrawals: 0.5,
            overdrafts: 0.15,
            unopened_every: 0,
            duplicates: 0.0,
            invalid: None,
        }
    }
}

/// The id of account number `i` (rank `i + 1` of a Zipf skew).
pub fn account_id(i: usize) -> String {
    format!("acc-{i}")
}

/// The id of room number `i`.
pub fn room_id(i: usize) -> String {
    format!("room-{i}")
}

/// How a message goes onto the commands topic.
#[derive(Debug, Clone)]
pub enum Send {
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
pub enum Expect {
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
pub struct Message {
    /// How to produce it.
    pub send: Send,
    /// What the processor must make of it.
    pub expect: Expect,
}

/// The whole workload, in produce order.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The valid commands, each once, in produce order.
    pub valid: Vec<Command>,
    /// Every message to produce, in order: valid commands, duplicates and invalid ones.
    pub messages: Vec<Message>,
}

impl Workload {
    /// Generates the workload `options` describe.
    pub fn generate(options: &Options) -> Result<Self, Error> {
        let o = options;
        if o.accounts == 0 {
            return Err(Error::Options(
                "a workload needs at least one account".into(),
            ));
        }
        let source = Source::parse(o.source.as_str())
            .map_err(|e| Error::Options(format!("invalid source {}: {e}", o.source)))?;
        let mut rng = StdRng::seed_from_u64(o.seed);
        let accounts: Vec<String> = (0..o.accounts.min(o.commands).max(1))
            .map(account_id)
            .collect();
        let rooms: Vec<String> = (0..o.rooms).map(room_id).collect();
        let zipf = match o.skew {
            Skew::Uniform => None,
            Skew::Zipf(s) => Some(
                Zipf::new(accounts.len() as u64, s)
                    .map_err(|e| Error::Options(format!("invalid Zipf exponent {s}: {e}")))?,
            ),
        };
        let first_night = NaiveDate::from_ymd_opt(2026, 12, 20).expect("a valid date");
        let nights: Vec<NaiveDate> = first_night.iter_days().take(NIGHTS as usize).collect();
        let start: DateTime<Utc> = first_night
            .and_hms_opt(8, 0, 0)
            .expect("a valid time")
            .and_utc();

        let mut valid = Vec::with_capacity(o.commands);
        let push = |valid: &mut Vec<Command>, ty: &str, subject: &str, data: Value| {
            let n = valid.len();
            let mut c = command(&source, &format!("cmd-{n:06}"), ty, subject, data);
            // Handlers read no clock; a deterministic time keeps reruns byte-identical.
            c.time = Some(start + TimeDelta::seconds(n as i64));
            valid.push(c);
        };
        for (i, acc) in accounts.iter().enumerate() {
            if valid.len() == o.commands {
                break;
            }
            if o.unopened_every > 0 && i % o.unopened_every == o.unopened_every - 1 {
                continue;
            }
            let owner = PEOPLE.choose(&mut rng).expect("people");
            push(&mut valid, "account.Open", acc, json!({ "owner": owner }));
        }
        while valid.len() < o.commands {
            if rooms.is_empty() || rng.gen_bool(ACCOUNT_SHARE) {
                let acc = match &zipf {
                    None => accounts.choose(&mut rng).expect("accounts"),
                    Some(z) => {
                        let rank = (z.sample(&mut rng) as usize).clamp(1, accounts.len());
                        &accounts[rank - 1]
                    }
                };
                if rng.gen_bool(o.withdrawals) {
                    let amount: i64 = if rng.gen_bool(o.overdrafts) {
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
                } else {
                    let amount: i64 = rng.gen_range(100..=10_000);
                    push(
                        &mut valid,
                        "account.Deposit",
                        acc,
                        json!({ "amount": amount }),
                    );
                }
            } else {
                let room = rooms.choose(&mut rng).expect("rooms");
                let night = nights.choose(&mut rng).expect("nights").to_string();
                if rng.gen_bool(CANCEL_SHARE) {
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
        let duplicates = ((n as f64) * o.duplicates).round() as usize;
        for _ in 0..if n > 0 { duplicates } else { 0 } {
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
        if let Some(partitions) = o.invalid {
            // The room messages need a room even in an accounts-only workload.
            let rooms = if rooms.is_empty() {
                vec![room_id(0)]
            } else {
                rooms
            };
            for m in invalid_messages(&mut rng, &source, &accounts, &rooms, &nights, partitions) {
                extra.push((rng.gen_range(0..=n), m));
            }
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
        Ok(Self { valid, messages })
    }

    /// `valid` as a workload of its own: each command sent once, in order, nothing else.
    pub fn of_commands(valid: Vec<Command>) -> Self {
        let messages = (0..valid.len())
            .map(|i| Message {
                send: Send::Command(i),
                expect: Expect::Processed(i),
            })
            .collect();
        Self { valid, messages }
    }

    /// The commands the command producer sends, in order, duplicates included: every
    /// message but the raw and misrouted ones.
    pub fn commands(&self) -> Vec<Command> {
        self.messages
            .iter()
            .filter_map(|m| match m.send {
                Send::Command(i) => Some(self.valid[i].clone()),
                _ => None,
            })
            .collect()
    }

    /// How many messages re-send an earlier command.
    pub fn duplicates(&self) -> usize {
        self.count(|e| matches!(e, Expect::Duplicate(_)))
    }

    /// How many messages must become dead letters.
    pub fn invalid(&self) -> usize {
        self.count(|e| matches!(e, Expect::DeadLetter { .. }))
    }

    fn count(&self, f: impl Fn(&Expect) -> bool) -> usize {
        self.messages.iter().filter(|m| f(&m.expect)).count()
    }
}

/// Builds a valid command; the generator only passes well-formed parts.
fn command(source: &Source, id: &str, ty: &str, subject: &str, data: Value) -> Command {
    Command::new(
        source.clone(),
        CommandId::parse(id).expect("a valid id"),
        CommandType::parse(ty).expect("a valid type"),
        AggregateId::parse(subject).expect("a valid subject"),
        data,
    )
}

/// A structured-mode CloudEvent as JSON, for the invalid messages to tamper with.
fn envelope(source: &Source, id: &str, ty: &str, subject: &str, data: Value) -> Value {
    json!({
        "specversion": "1.0",
        "id": id,
        "source": source.as_str(),
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
    source: &Source,
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
        source,
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
            source,
            &next_id(),
            "account.Teleport",
            &a,
            json!({"to": "mars"}),
        ))),
        UnknownType,
        "unknown command account.Teleport",
    ));
    out.push(raw(
        Some("ship-1"),
        Some(json_bytes(&envelope(
            source,
            &next_id(),
            "shipment.Dispatch",
            "ship-1",
            json!({"to": "mars"}),
        ))),
        UnknownType,
        "unknown aggregate type shipment",
    ));

    // Schema violations, of the data and of the envelope.
    let a = acc(rng);
    out.push(raw(
        Some(&a),
        Some(json_bytes(&envelope(
            source,
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
            source,
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
            source,
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
            source,
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
            source,
            &next_id(),
            "room.Book",
            &r,
            json!({"night": "24/12/2026", "guest": "ada"}),
        ))),
        Schema,
        "night that is not an ISO date",
    ));
    let a = acc(rng);
    let mut v = envelope(
        source,
        &next_id(),
        "account.Deposit",
        &a,
        json!({"amount": 5}),
    );
    v["specversion"] = "0.3".into();
    out.push(raw(
        Some(&a),
        Some(json_bytes(&v)),
        Schema,
        "specversion 0.3",
    ));
    let a = acc(rng);
    let mut v = envelope(
        source,
        "unused",
        "account.Deposit",
        &a,
        json!({"amount": 5}),
    );
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
            source,
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
            source,
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
            command(
                source,
                &next_id(),
                "account.Deposit",
                &a,
                json!({"amount": 700}),
            ),
            command(
                source,
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
    let mut v = envelope(
        source,
        &next_id(),
        "account.Deposit",
        &a,
        json!({"amount": 5}),
    );
    v["padding"] = "x".repeat(OVERSIZED_BYTES).into();
    out.push(raw(
        Some(&a),
        Some(json_bytes(&v)),
        TooLarge,
        "a 300 KiB command",
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn demo(seed: u64, commands: usize) -> Workload {
        Workload::generate(&Options {
            duplicates: 0.05,
            invalid: Some(6),
            ..Options::new(seed, commands)
        })
        .unwrap()
    }

    #[test]
    fn the_same_seed_gives_the_same_workload() {
        let a = demo(7, 500);
        let b = demo(7, 500);
        assert_eq!(a.valid, b.valid);
        assert_eq!(a.messages.len(), b.messages.len());
        let c = demo(8, 500);
        assert_ne!(a.valid, c.valid);
    }

    #[test]
    fn every_valid_command_is_sent_once_before_its_duplicates() {
        let w = demo(1, 1000);
        assert_eq!(w.valid.len(), 1000);
        assert_eq!(w.duplicates(), 50);
        assert_eq!(w.commands().len(), 1050);
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
        let w = demo(3, 300);
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

    fn accounts_only(seed: u64, commands: usize, accounts: usize, skew: Skew) -> Vec<Command> {
        Workload::generate(&Options {
            accounts,
            rooms: 0,
            skew,
            withdrawals: 0.2,
            overdrafts: 0.0,
            ..Options::new(seed, commands)
        })
        .unwrap()
        .valid
    }

    #[test]
    fn opens_every_account_first_and_is_reproducible() {
        let a = accounts_only(1, 1_000, 50, Skew::Uniform);
        assert_eq!(a.len(), 1_000);
        assert!(a[..50]
            .iter()
            .all(|c| c.command_type.as_str() == "account.Open"));
        assert!(a[50..]
            .iter()
            .all(|c| c.command_type.as_str() != "account.Open"
                && c.command_type.aggregate_type() == "account"));
        assert_eq!(a, accounts_only(1, 1_000, 50, Skew::Uniform));
        // Fewer commands than accounts: only as many accounts are opened.
        let few = accounts_only(1, 10, 50, Skew::Uniform);
        assert!(few
            .iter()
            .all(|c| c.command_type.as_str() == "account.Open"));
    }

    #[test]
    fn zipf_makes_the_first_account_hot() {
        let c = accounts_only(2, 20_000, 1_000, Skew::Zipf(1.1));
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for c in &c[1_000..] {
            *counts.entry(c.subject.as_str()).or_default() += 1;
        }
        let hot = counts[account_id(0).as_str()];
        let median = {
            let mut v: Vec<usize> = counts.values().copied().collect();
            v.sort_unstable();
            v[v.len() / 2]
        };
        assert!(hot > 2_000, "the hot key got {hot} of 19,000");
        assert!(hot > 50 * median, "hot {hot}, median {median}");
    }

    #[test]
    fn deposits_only_and_unopened_accounts() {
        let w = Workload::generate(&Options {
            withdrawals: 0.0,
            rooms: 0,
            unopened_every: 10,
            ..Options::new(4, 500)
        })
        .unwrap();
        let opens = w
            .valid
            .iter()
            .filter(|c| c.command_type.as_str() == "account.Open")
            .count();
        assert_eq!(opens, 45);
        assert!(!w
            .valid
            .iter()
            .any(|c| c.command_type.as_str() == "account.Open" && c.subject.as_str() == "acc-9"));
        assert!(w.valid[45..]
            .iter()
            .all(|c| c.command_type.as_str() == "account.Deposit"));
    }
}
