//! Planning a batch: the pure step between loading and writing.
//!
//! Given a partition's messages (already decoded) and what the store knows about their
//! commands and aggregates, [`plan`] decides every outcome and every row to write. It does
//! no I/O, so the same inputs always give the same plan; the store then writes the plan in
//! one transaction.

use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};

use chrono::{DateTime, Utc};
use commands::envelope::{
    event_id, payload_digest, preview, Command, DeadLetterKind, DecodeError, EventEnvelope,
};
use commands::workflow::{emitted_id, emitter_source, timer_id, Emit, TimerOp};
use commands::{
    CommandError, Context, Handled, Registry, Rejection, Reply, ReplyAddress, ReplyCommand,
    ReplyOutcome,
};
use serde_json::{json, Value};
use uuid::Uuid;

// The policies live in `config`; kept here at their old paths.
pub use crate::config::{PlanOptions, PoisonPolicy};

/// A Kafka header: name and raw value.
pub type Header = (String, Option<Vec<u8>>);

/// One consumed message and what decoding made of it.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Offset in the commands partition.
    pub offset: i64,
    /// The message's Kafka timestamp in milliseconds, when it has one: with the offset, the
    /// fingerprint of the log a stored position belongs to.
    pub timestamp: Option<i64>,
    /// Original key bytes.
    pub key: Option<Vec<u8>>,
    /// Original value bytes.
    pub value: Option<Vec<u8>>,
    /// Original headers.
    pub headers: Vec<Header>,
    /// The decoded command, or why it is a dead letter.
    pub decoded: Result<Command, DecodeError>,
}

/// The stored outcome of a processed command.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// `applied`, `rejected` or `skipped`.
    pub outcome: OutcomeKind,
    /// The rejection's machine-readable code.
    pub code: Option<String>,
    /// The rejection reason (or an operator's reason to skip).
    pub reason: Option<String>,
    /// The aggregate version after the command.
    pub version: i64,
    /// Ids of the events the command emitted.
    pub event_ids: Vec<Uuid>,
    /// The [`payload_digest`] of the command this outcome belongs to. `None` when unknown:
    /// outcomes recorded before digests were, skips, and outcomes rebuilt from stored events
    /// after pruning. Without it a later delivery of the key is a plain duplicate, whatever
    /// its payload.
    pub digest: Option<Uuid>,
    /// Where the delivery this outcome was recorded for sits in the commands log, when
    /// loaded from the store: a replay re-reading that very message is no new delivery and
    /// gets no second reply. `None` for outcomes planned in this batch and rebuilt ones.
    pub recorded_at: Option<LogPosition>,
}

/// A message's place in the commands log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPosition {
    /// The commands topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// The offset.
    pub offset: i64,
}

impl Outcome {
    /// What a reply says of this recorded outcome.
    pub fn reply_outcome(&self) -> ReplyOutcome {
        match self.outcome {
            OutcomeKind::Applied => ReplyOutcome::Applied {
                version: self.version.max(0) as u64,
                events: self.event_ids.clone(),
            },
            OutcomeKind::Rejected => ReplyOutcome::Rejected {
                code: self.code.clone(),
                reason: self.reason.clone().unwrap_or_default(),
            },
            OutcomeKind::Skipped => ReplyOutcome::Skipped {
                reason: self.reason.clone(),
            },
        }
    }
}

/// What a reply says of a delivery that reused the key of `recorded` with another payload.
pub fn key_reused_outcome(recorded: &Outcome) -> ReplyOutcome {
    ReplyOutcome::KeyReused {
        reason: format!(
            "this idempotency key was already used by another command (outcome {}); \
             send a new command with a new id",
            recorded.outcome.as_str()
        ),
    }
}

/// Applied, rejected, or skipped by an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKind {
    /// The command's events were stored.
    Applied,
    /// The aggregate refused the command.
    Rejected,
    /// An operator dropped the command (`cmdproc dlq skip`): it never takes effect, and a
    /// later delivery of it is a duplicate.
    Skipped,
}

impl OutcomeKind {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Rejected => "rejected",
            Self::Skipped => "skipped",
        }
    }

    /// The stored form read back; anything unknown is taken as a rejection (no effect).
    pub fn parse(stored: &str) -> Self {
        match stored {
            "applied" => Self::Applied,
            "skipped" => Self::Skipped,
            _ => Self::Rejected,
        }
    }
}

/// An aggregate as loaded: version and JSON state.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// Stored version; 0 when the aggregate does not exist yet.
    pub version: i64,
    /// Stored state; `Null` when the aggregate does not exist yet.
    pub state: Value,
}

/// A processed command to record.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedRow {
    /// The command's source.
    pub source: String,
    /// The command's id.
    pub command_id: String,
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// `account.Deposit` and so on.
    pub command_type: String,
    /// Offset of the command.
    pub offset: i64,
    /// What happened.
    pub outcome: Outcome,
}

/// A delivery of a command whose key `(source, id)` was processed before: a duplicate, or a
/// refused reuse of the key with another payload. Either way it has no effect.
#[derive(Debug, Clone, PartialEq)]
pub struct DuplicateRow {
    /// Offset of the delivery.
    pub offset: i64,
    /// The command's source.
    pub source: String,
    /// The command's id.
    pub command_id: String,
    /// What the delivery asked for, when it reused the key with another payload (outcome
    /// `key_reused`, not `duplicate`); `None` for a plain duplicate, which keeps nothing of
    /// its own so a replay (every command a duplicate) builds and writes no more than before.
    pub refused: Option<RefusedReuse>,
    /// The outcome recorded for the key. A duplicate's outcome is the original's; a refused
    /// reuse of the key keeps it as what the key stands for.
    pub outcome: Outcome,
}

impl DuplicateRow {
    /// Whether the delivery reused the key with another payload.
    pub fn key_reused(&self) -> bool {
        self.refused.is_some()
    }
}

/// A delivery that reused a recorded key `(source, id)` with another payload: what it named.
#[derive(Debug, Clone, PartialEq)]
pub struct RefusedReuse {
    /// The aggregate it named (possibly another one than the original did).
    pub aggregate: AggregateKey,
    /// Its command type.
    pub command_type: String,
    /// Its [`payload_digest`], which differs from the recorded one.
    pub digest: Uuid,
}

/// A reply to one delivery of a command that named a `replyto` topic.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyRow {
    /// Offset of the delivery.
    pub offset: i64,
    /// Where it goes, and the command's key and correlation id.
    pub to: ReplyAddress,
    /// What it says.
    pub reply: Reply,
    /// What the delivery was, which decides whether the reply is written (see
    /// `pipeline::write_plans`): a delivery re-read by a replay gets no second reply.
    pub answers: Answers,
}

/// What kind of delivery a reply answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Answers {
    /// A command processed for the first time: always answered.
    Processed,
    /// A delivery of a command whose key has an outcome recorded at `recorded_at`:
    /// answered when the delivery is recorded for the first time, and is not that very
    /// message read again.
    Duplicate {
        /// Where the recorded outcome's delivery sits, if known.
        recorded_at: Option<LogPosition>,
    },
    /// A dead letter: answered when the dead letter is recorded for the first time.
    DeadLetter,
}

/// A command a handler emitted (or a timer's command): published to the commands topic,
/// keyed by its subject.
#[derive(Debug, Clone, PartialEq)]
pub struct EmittedRow {
    /// Offset of the command that emitted it.
    pub offset: i64,
    /// Its subject, the message key.
    pub key: String,
    /// Its stable identity on the topic: `command/<id>`.
    pub message_id: String,
    /// The structured CloudEvent.
    pub payload: Vec<u8>,
}

/// A change to an aggregate's timers.
#[derive(Debug, Clone, PartialEq)]
pub enum TimerRow {
    /// Set (or replace) the timer `name` of `aggregate`.
    Schedule {
        /// The aggregate that owns the timer.
        aggregate: AggregateKey,
        /// The timer's name.
        name: String,
        /// When it fires.
        due_at: DateTime<Utc>,
        /// What it sends: subject (key), identity and CloudEvent.
        command: EmittedRow,
    },
    /// Forget the timer `name` of `aggregate`.
    Cancel {
        /// The aggregate that owns the timer.
        aggregate: AggregateKey,
        /// The timer's name.
        name: String,
    },
}

/// An event to store and publish.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    /// Offset of the command that emitted it.
    pub offset: i64,
    /// The full envelope; `sequence` is filled in with the outbox sequence.
    pub envelope: EventEnvelope,
}

/// A dead letter to record and publish.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterRow {
    /// Offset of the message.
    pub offset: i64,
    /// Why.
    pub kind: DeadLetterKind,
    /// What is wrong, for a human.
    pub message: String,
    /// Original key.
    pub key: Option<Vec<u8>>,
    /// Original value.
    pub value: Option<Vec<u8>>,
    /// Original headers.
    pub headers: Vec<Header>,
    /// The aggregate, when known.
    pub aggregate: Option<(String, String)>,
}

/// An aggregate write, guarded by the version it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateWrite {
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// The version read; 0 means insert.
    pub read_version: i64,
    /// The version written.
    pub new_version: i64,
    /// The state written.
    pub state: Value,
    /// Its [`commands::Aggregate::status`], if the aggregate type has one.
    pub status: Option<String>,
}

/// Everything a batch writes, and its counts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Commands processed for the first time.
    pub processed: Vec<ProcessedRow>,
    /// Deliveries of commands already processed.
    pub duplicates: Vec<DuplicateRow>,
    /// Events, in order.
    pub events: Vec<EventRow>,
    /// Dead letters, in order.
    pub dead_letters: Vec<DeadLetterRow>,
    /// Replies to deliveries of commands with `replyto` or `outcometo`, in order.
    pub replies: Vec<ReplyRow>,
    /// Commands the handlers emitted, in order.
    pub emitted: Vec<EmittedRow>,
    /// Timers set and cancelled, in order.
    pub timers: Vec<TimerRow>,
    /// Aggregate writes, one per touched aggregate.
    pub writes: Vec<AggregateWrite>,
    /// Commands set aside because their aggregate is parked, in offset order.
    pub parked: Vec<ParkedRow>,
    /// Aggregates parked by this batch: `(aggregate, reason, offset of the poison command)`.
    pub newly_parked: Vec<(AggregateKey, String, i64)>,
    /// With [`PoisonPolicy::Halt`], the offset of the poison command the batch stopped at.
    pub halted_at: Option<i64>,
    /// The offset after the last message of the batch.
    pub next_offset: i64,
}

/// A command set aside because its aggregate is parked.
#[derive(Debug, Clone, PartialEq)]
pub struct ParkedRow {
    /// Offset of the command.
    pub offset: i64,
    /// Its aggregate.
    pub aggregate: AggregateKey,
    /// The command's source.
    pub source: String,
    /// The command's id.
    pub command_id: String,
    /// Why it was set aside.
    pub reason: String,
}

impl Plan {
    /// Commands applied.
    pub fn applied(&self) -> usize {
        self.processed
            .iter()
            .filter(|p| p.outcome.outcome == OutcomeKind::Applied)
            .count()
    }

    /// Commands rejected.
    pub fn rejected(&self) -> usize {
        self.processed
            .iter()
            .filter(|p| p.outcome.outcome == OutcomeKind::Rejected)
            .count()
    }

    /// Deliveries refused because they reused a processed command's key with another
    /// payload (outcome `key_reused`); the rest of [`Plan::duplicates`] are duplicates.
    pub fn key_reused(&self) -> usize {
        self.duplicates.iter().filter(|d| d.key_reused()).count()
    }
}

/// The identity of a command for deduplication: `(source, id)`.
pub type CommandKey = (String, String);
/// The identity of an aggregate: `(type, id)`.
pub type AggregateKey = (String, String);

/// Decides the outcome of every message of a batch, in offset order.
///
/// `known` holds the recorded outcomes of the batch's commands that were processed before;
/// `aggregates` the stored state of the aggregates the batch names (absent ones are new);
/// `parked` the batch's aggregates that are parked.
///
/// A command whose key `(source, id)` has an outcome (in `known`, or planned earlier in the
/// batch) has no effect: it is a duplicate when its [`payload_digest`] is the recorded one
/// (or the recorded outcome has none), and `key_reused` when the digests differ.
pub fn plan(
    registry: &Registry,
    options: &PlanOptions,
    messages: &[Incoming],
    known: &HashMap<CommandKey, Outcome>,
    aggregates: &HashMap<AggregateKey, Loaded>,
    parked: &HashSet<AggregateKey>,
) -> Plan {
    let mut out = Plan::default();
    let mut parked = parked.clone();
    let mut seen: HashMap<CommandKey, Outcome> = HashMap::new();
    let mut current: HashMap<AggregateKey, Loaded> = HashMap::new();
    let mut order: Vec<AggregateKey> = Vec::new();
    let mut touched: HashSet<AggregateKey> = HashSet::new();
    let mut statuses: HashMap<AggregateKey, Option<String>> = HashMap::new();

    for m in messages {
        out.next_offset = m.offset + 1;
        let command = match &m.decoded {
            Ok(c) => c,
            Err(e) => {
                push_dead_letter(&mut out, m, e.clone(), None);
                continue;
            }
        };
        let ckey = (
            command.source.as_str().to_owned(),
            command.id.as_str().to_owned(),
        );
        let digest = payload_digest(command);
        if let Some(outcome) = seen.get(&ckey).or_else(|| known.get(&ckey)) {
            // Only a recorded digest that differs refuses the key; without one (recorded
            // before digests, skipped, rebuilt from events) a delivery is a duplicate.
            let refused = outcome
                .digest
                .is_some_and(|recorded| recorded != digest)
                .then(|| RefusedReuse {
                    aggregate: (
                        command.command_type.aggregate_type().to_owned(),
                        command.subject.as_str().to_owned(),
                    ),
                    command_type: command.command_type.to_string(),
                    digest,
                });
            if let Some(to) = ReplyAddress::of(command) {
                let (answer, duplicate) = match refused {
                    Some(_) => (key_reused_outcome(outcome), false),
                    None => (outcome.reply_outcome(), true),
                };
                out.replies.push(ReplyRow {
                    offset: m.offset,
                    reply: reply(&to, answer, duplicate),
                    to,
                    answers: Answers::Duplicate {
                        recorded_at: outcome.recorded_at.clone(),
                    },
                });
            }
            out.duplicates.push(DuplicateRow {
                offset: m.offset,
                source: ckey.0,
                command_id: ckey.1,
                refused,
                outcome: outcome.clone(),
            });
            continue;
        }
        let agg_type = command.command_type.aggregate_type().to_owned();
        let Some(aggregate) = registry.get(&agg_type) else {
            let e = DecodeError {
                kind: DeadLetterKind::UnknownType,
                message: format!("unknown aggregate type `{agg_type}`"),
                aggregate: Some((agg_type, command.subject.to_string())),
            };
            push_dead_letter(&mut out, m, e, Some(command));
            continue;
        };
        let akey = (agg_type.clone(), command.subject.as_str().to_owned());
        if parked.contains(&akey) {
            let reason = format!("aggregate {}/{} is parked", akey.0, akey.1);
            out.parked.push(ParkedRow {
                offset: m.offset,
                aggregate: akey.clone(),
                source: ckey.0,
                command_id: ckey.1,
                reason: reason.clone(),
            });
            let e = DecodeError {
                kind: DeadLetterKind::Parked,
                message: reason,
                aggregate: Some(akey),
            };
            push_dead_letter(&mut out, m, e, Some(command));
            continue;
        }
        let loaded = current.entry(akey.clone()).or_insert_with(|| {
            order.push(akey.clone());
            aggregates.get(&akey).cloned().unwrap_or(Loaded {
                version: 0,
                state: Value::Null,
            })
        });

        let handled = if let Some(expected) = command
            .expected_version
            .filter(|v| *v as i64 != loaded.version)
        {
            Ok(Handled::Rejected(Rejection::new(
                "version_mismatch",
                format!(
                    "expected version {expected}, aggregate is at version {}",
                    loaded.version
                ),
            )))
        } else {
            // Handlers are pure, but a panic may come from a bug triggered by something
            // outside the command (memory pressure, a poisoned lock in a library): try again
            // a bounded number of times before calling the command poison.
            let context = Context::new(&command.id, &command.source, loaded.version as u64)
                .with_time(command.time)
                .with_correlation_id(command.correlation_id.as_deref())
                .with_aggregate_id(command.subject.as_str());
            let mut attempt = 0;
            loop {
                attempt += 1;
                let result = catch_unwind(AssertUnwindSafe(|| {
                    crate::failpoint::handler_panic(&akey.1);
                    aggregate.handle(
                        &loaded.state,
                        command.command_type.name(),
                        &command.data,
                        &context,
                    )
                }));
                if result.is_ok() || attempt >= options.attempts.max(1) {
                    break result;
                }
            }
        };
        let outcome = match handled {
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                let message = format!(
                    "handler for {} panicked {} time(s): {what}",
                    command.command_type,
                    options.attempts.max(1)
                );
                match options.poison {
                    PoisonPolicy::Halt => {
                        out.halted_at = Some(m.offset);
                        out.next_offset = m.offset;
                        break;
                    }
                    PoisonPolicy::Park => {
                        parked.insert(akey.clone());
                        out.newly_parked
                            .push((akey.clone(), message.clone(), m.offset));
                        out.parked.push(ParkedRow {
                            offset: m.offset,
                            aggregate: akey.clone(),
                            source: ckey.0,
                            command_id: ckey.1,
                            reason: message.clone(),
                        });
                    }
                    PoisonPolicy::DeadLetter => {}
                }
                let e = DecodeError {
                    kind: DeadLetterKind::HandlerPanic,
                    message,
                    aggregate: Some(akey.clone()),
                };
                push_dead_letter(&mut out, m, e, Some(command));
                continue;
            }
            Ok(Handled::Invalid(command_error)) => {
                let kind = match command_error {
                    CommandError::UnknownCommand(_) => DeadLetterKind::UnknownType,
                    CommandError::InvalidData(_) => DeadLetterKind::Schema,
                };
                let e = DecodeError {
                    kind,
                    message: command_error.to_string(),
                    aggregate: Some(akey.clone()),
                };
                push_dead_letter(&mut out, m, e, Some(command));
                continue;
            }
            Ok(Handled::Rejected(rejection)) => Outcome {
                outcome: OutcomeKind::Rejected,
                code: Some(rejection.code),
                reason: Some(rejection.reason),
                version: loaded.version,
                event_ids: Vec::new(),
                digest: Some(digest),
                recorded_at: None,
            },
            Ok(Handled::Accepted(decision)) => {
                workflow_rows(
                    &mut out,
                    m.offset,
                    command,
                    &akey,
                    &decision.commands,
                    &decision.timers,
                );
                let events = decision.events;
                let mut ids = Vec::with_capacity(events.len());
                let base = loaded.version;
                for (i, ev) in events.iter().enumerate() {
                    let id = event_id(&command.source, &command.id, i);
                    ids.push(id);
                    out.events.push(EventRow {
                        offset: m.offset,
                        envelope: EventEnvelope {
                            id,
                            event_type: format!("{}.{}", agg_type, ev.name),
                            aggregate_type: agg_type.clone(),
                            subject: command.subject.to_string(),
                            aggregate_version: (base + 1 + i as i64) as u64,
                            command_source: command.source.to_string(),
                            command_id: command.id.to_string(),
                            correlation_id: command.correlation_id.clone(),
                            time: command.time,
                            sequence: 0,
                            data: ev.data.clone(),
                        },
                    });
                }
                if !events.is_empty() {
                    let (state, status) = aggregate.apply_with_status(&loaded.state, &events);
                    loaded.state = state;
                    statuses.insert(akey.clone(), status);
                    loaded.version = base + events.len() as i64;
                    touched.insert(akey.clone());
                }
                Outcome {
                    outcome: OutcomeKind::Applied,
                    code: None,
                    reason: None,
                    version: loaded.version,
                    event_ids: ids,
                    digest: Some(digest),
                    recorded_at: None,
                }
            }
        };
        if let Some(to) = ReplyAddress::of(command) {
            out.replies.push(ReplyRow {
                offset: m.offset,
                reply: reply(&to, outcome.reply_outcome(), false),
                to,
                answers: Answers::Processed,
            });
        }
        seen.insert(ckey.clone(), outcome.clone());
        out.processed.push(ProcessedRow {
            source: ckey.0,
            command_id: ckey.1,
            aggregate_type: akey.0,
            aggregate_id: akey.1,
            command_type: command.command_type.to_string(),
            offset: m.offset,
            outcome,
        });
    }

    for akey in order {
        if !touched.contains(&akey) {
            continue;
        }
        let now = &current[&akey];
        let read_version = aggregates.get(&akey).map_or(0, |l| l.version);
        out.writes.push(AggregateWrite {
            aggregate_type: akey.0.clone(),
            aggregate_id: akey.1.clone(),
            read_version,
            new_version: now.version,
            state: now.state.clone(),
            status: statuses.remove(&akey).flatten(),
        });
    }
    out
}

/// The outbox rows of the commands a handler emitted, and its timer changes: ids derived
/// from the emitting command's key (so handling it again derives the same ones), `source`
/// naming the emitter, the emitting command's `time` and correlation id carried.
fn workflow_rows(
    out: &mut Plan,
    offset: i64,
    command: &Command,
    akey: &AggregateKey,
    emits: &[Emit],
    timers: &[TimerOp],
) {
    let source = emitter_source(&akey.0, &akey.1);
    let outcome_to = format!("{}/{}", akey.0, akey.1);
    let build = |emit: &Emit, id: String, time: Option<DateTime<Utc>>| {
        let mut ce = serde_json::Map::new();
        ce.insert("specversion".into(), "1.0".into());
        ce.insert("id".into(), id.clone().into());
        ce.insert("source".into(), source.clone().into());
        ce.insert("type".into(), emit.command_type.clone().into());
        ce.insert("subject".into(), emit.subject.clone().into());
        ce.insert("datacontenttype".into(), "application/json".into());
        if let Some(t) = time {
            ce.insert(
                "time".into(),
                t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
                    .into(),
            );
        }
        if let Some(c) = &command.correlation_id {
            ce.insert("correlationid".into(), c.clone().into());
        }
        if emit.outcome {
            ce.insert("outcometo".into(), outcome_to.clone().into());
        }
        ce.insert("data".into(), emit.data.clone());
        EmittedRow {
            offset,
            key: emit.subject.clone(),
            message_id: format!("command/{id}"),
            payload: serde_json::to_vec(&Value::Object(ce)).expect("JSON serializes"),
        }
    };
    for (i, emit) in emits.iter().enumerate() {
        let id = emitted_id(&command.source, &command.id, i);
        out.emitted.push(build(emit, id, command.time));
    }
    for op in timers {
        out.timers.push(match op {
            TimerOp::Schedule {
                name,
                at,
                command: emit,
            } => {
                let id = timer_id(&akey.0, &akey.1, name, &command.source, &command.id);
                TimerRow::Schedule {
                    aggregate: akey.clone(),
                    name: name.clone(),
                    due_at: *at,
                    command: build(emit, id, Some(*at)),
                }
            }
            TimerOp::Cancel { name } => TimerRow::Cancel {
                aggregate: akey.clone(),
                name: name.clone(),
            },
            _ => continue,
        });
    }
}

/// Records `m` as a dead letter for `e`, and a reply to it when the command (or, for a
/// message that did not decode, its envelope read leniently) names a reply topic.
fn push_dead_letter(out: &mut Plan, m: &Incoming, e: DecodeError, command: Option<&Command>) {
    let to = match command {
        Some(c) => ReplyAddress::of(c),
        None => {
            let headers: Vec<(&str, Option<&[u8]>)> = m
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_deref()))
                .collect();
            ReplyAddress::read(&headers, m.value.as_deref())
        }
    };
    if let Some(to) = to {
        let answer = ReplyOutcome::DeadLettered {
            kind: e.kind.as_str().to_owned(),
            message: e.message.clone(),
        };
        out.replies.push(ReplyRow {
            offset: m.offset,
            reply: reply(&to, answer, false),
            to,
            answers: Answers::DeadLetter,
        });
    }
    out.dead_letters.push(dead_letter(m, e));
}

/// The reply to the command `to` names.
fn reply(to: &ReplyAddress, outcome: ReplyOutcome, duplicate: bool) -> Reply {
    Reply {
        command: ReplyCommand {
            source: to.source.clone(),
            id: to.id.clone(),
        },
        outcome,
        duplicate,
    }
}

/// A dead letter of `m`, with copies of its original bytes (the batch keeps the message,
/// so that a retried transaction plans from the same input).
fn dead_letter(m: &Incoming, e: DecodeError) -> DeadLetterRow {
    DeadLetterRow {
        offset: m.offset,
        kind: e.kind,
        message: e.message,
        key: m.key.clone(),
        value: m.value.clone(),
        headers: m.headers.clone(),
        aggregate: e.aggregate,
    }
}

/// Headers as stored in JSON: `[{"k": name, "x": hex value or null}]`, so binary header
/// values survive untouched.
pub fn headers_to_json(headers: &[Header]) -> Value {
    Value::Array(
        headers
            .iter()
            // jsonb cannot hold U+0000; a header name with one is stored with U+FFFD instead.
            .map(|(k, v)| json!({"k": k.replace('\0', "\u{fffd}"), "x": v.as_deref().map(hex)}))
            .collect(),
    )
}

/// The inverse of [`headers_to_json`].
pub fn headers_from_json(v: &Value) -> Vec<Header> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|h| {
                    let k = h.get("k")?.as_str()?.to_owned();
                    let v = h.get("x").and_then(Value::as_str).and_then(unhex);
                    Some((k, v))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// A short printable preview of a dead letter's value.
pub fn value_preview(value: Option<&[u8]>) -> String {
    value
        .map(|v| preview(v, 120))
        .unwrap_or_else(|| "<no value>".into())
}

#[cfg(test)]
mod tests {
    /// The example domains, compiled once for every test.
    fn registry() -> &'static Registry {
        static REGISTRY: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
        REGISTRY.get_or_init(bank::registry)
    }

    use super::*;

    fn msg(offset: i64, source: &str, id: &str, ty: &str, subject: &str, data: Value) -> Incoming {
        let v = json!({"specversion":"1.0","id":id,"source":source,"type":ty,"subject":subject,"data":data});
        let bytes = serde_json::to_vec(&v).unwrap();
        let decoded = Command::decode(
            Some(subject.as_bytes()),
            &[],
            Some(&bytes),
            registry().schemas(),
        );
        Incoming {
            offset,
            timestamp: None,
            key: Some(subject.as_bytes().to_vec()),
            value: Some(bytes),
            headers: vec![],
            decoded,
        }
    }

    #[test]
    fn applies_in_order_and_dedupes_within_the_batch() {
        let registry = registry();
        let msgs = vec![
            msg(10, "/t", "1", "account.Open", "a", json!({"owner":"ada"})),
            msg(11, "/t", "2", "account.Deposit", "a", json!({"amount":10})),
            msg(12, "/t", "2", "account.Deposit", "a", json!({"amount":10})),
            msg(13, "/t", "3", "account.Withdraw", "a", json!({"amount":11})),
            msg(14, "/t", "4", "account.Withdraw", "a", json!({"amount":4})),
        ];
        let p = plan(
            registry,
            &PlanOptions::default(),
            &msgs,
            &HashMap::new(),
            &HashMap::new(),
            &HashSet::new(),
        );
        assert_eq!(p.next_offset, 15);
        assert_eq!(p.applied(), 3);
        assert_eq!(p.rejected(), 1);
        assert_eq!(p.duplicates.len(), 1);
        assert_eq!(p.duplicates[0].outcome.version, 2);
        assert_eq!(p.writes.len(), 1);
        assert_eq!(p.writes[0].read_version, 0);
        assert_eq!(p.writes[0].new_version, 3);
        assert_eq!(p.writes[0].state["balance"], 6);
        let versions: Vec<u64> = p
            .events
            .iter()
            .map(|e| e.envelope.aggregate_version)
            .collect();
        assert_eq!(versions, vec![1, 2, 3]);
    }

    #[test]
    fn known_outcomes_make_duplicates_and_expected_version_is_honoured() {
        let registry = registry();
        let mut known = HashMap::new();
        let recorded = Outcome {
            outcome: OutcomeKind::Applied,
            code: None,
            reason: None,
            version: 1,
            event_ids: vec![],
            digest: None,
            recorded_at: None,
        };
        known.insert(("/t".to_owned(), "1".to_owned()), recorded.clone());
        let mut aggregates = HashMap::new();
        aggregates.insert(
            ("account".to_owned(), "a".to_owned()),
            Loaded {
                version: 1,
                state: json!({"opened": true, "owner": "ada", "balance": 0}),
            },
        );
        let mut stale = msg(2, "/t", "5", "account.Deposit", "a", json!({"amount":1}));
        if let Ok(c) = stale.decoded.as_mut() {
            c.expected_version = Some(7);
        }
        let msgs = vec![
            msg(1, "/t", "1", "account.Open", "a", json!({"owner":"ada"})),
            stale,
        ];
        let p = plan(
            registry,
            &PlanOptions::default(),
            &msgs,
            &known,
            &aggregates,
            &HashSet::new(),
        );
        assert_eq!(p.duplicates[0].outcome, recorded);
        assert_eq!(p.rejected(), 1);
        assert!(p.processed[0]
            .outcome
            .reason
            .as_deref()
            .unwrap()
            .contains("expected version 7"));
        assert!(p.writes.is_empty());
    }

    #[test]
    fn dead_letters_keep_their_bytes_and_do_not_stop_the_batch() {
        let registry = registry();
        let bad = Incoming {
            offset: 0,
            timestamp: None,
            key: Some(b"k".to_vec()),
            value: Some(b"\xffnope".to_vec()),
            headers: vec![("h".into(), Some(vec![0, 1, 2]))],
            decoded: Command::decode(Some(b"k"), &[], Some(b"\xffnope"), registry.schemas()),
        };
        let msgs = vec![
            bad,
            msg(
                1,
                "/t",
                "1",
                "room.Book",
                "r",
                json!({"night":"2026-12-24","guest":"g"}),
            ),
        ];
        let p = plan(
            registry,
            &PlanOptions::default(),
            &msgs,
            &HashMap::new(),
            &HashMap::new(),
            &HashSet::new(),
        );
        assert_eq!(p.dead_letters.len(), 1);
        assert_eq!(p.dead_letters[0].kind, DeadLetterKind::Malformed);
        assert_eq!(p.dead_letters[0].value.as_deref(), Some(&b"\xffnope"[..]));
        assert_eq!(p.applied(), 1);
        let h = headers_to_json(&p.dead_letters[0].headers);
        assert_eq!(headers_from_json(&h), p.dead_letters[0].headers);
    }

    #[test]
    fn a_parked_aggregate_sets_its_commands_aside_and_others_apply() {
        let registry = registry();
        let parked: HashSet<AggregateKey> = [("account".to_owned(), "p".to_owned())].into();
        let msgs = vec![
            msg(1, "/t", "1", "account.Open", "p", json!({"owner":"x"})),
            msg(2, "/t", "2", "account.Open", "q", json!({"owner":"y"})),
            msg(3, "/t", "3", "account.Deposit", "p", json!({"amount":1})),
        ];
        let p = plan(
            registry,
            &PlanOptions::default(),
            &msgs,
            &HashMap::new(),
            &HashMap::new(),
            &parked,
        );
        assert_eq!(p.applied(), 1);
        let offsets: Vec<i64> = p.parked.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, vec![1, 3]);
        assert!(p
            .dead_letters
            .iter()
            .all(|d| d.kind == DeadLetterKind::Parked));
        assert!(p.newly_parked.is_empty());
        assert_eq!(p.next_offset, 4);
    }

    /// The account `a`, opened, with a balance of 500 after the deposit `dep-1`.
    fn account_after_deposit() -> HashMap<AggregateKey, Loaded> {
        [(
            ("account".to_owned(), "a".to_owned()),
            Loaded {
                version: 2,
                state: json!({"opened": true, "owner": "ada", "balance": 500}),
            },
        )]
        .into()
    }

    /// The recorded outcome of `dep-1` (`account.Deposit` of `amount` on `a`), with the
    /// digest of that payload or without one (recorded before digests were).
    fn deposit_recorded(amount: i64, with_digest: bool) -> HashMap<CommandKey, Outcome> {
        let original = msg(
            1,
            "/t",
            "dep-1",
            "account.Deposit",
            "a",
            json!({"amount": amount}),
        );
        let digest = payload_digest(original.decoded.as_ref().unwrap());
        [(
            ("/t".to_owned(), "dep-1".to_owned()),
            Outcome {
                outcome: OutcomeKind::Applied,
                code: None,
                reason: None,
                version: 2,
                event_ids: vec![event_id(
                    &commands::Source::parse("/t").unwrap(),
                    &commands::CommandId::parse("dep-1").unwrap(),
                    0,
                )],
                digest: with_digest.then_some(digest),
                recorded_at: None,
            },
        )]
        .into()
    }

    fn plan_of(messages: &[Incoming], known: &HashMap<CommandKey, Outcome>) -> Plan {
        plan(
            registry(),
            &PlanOptions::default(),
            messages,
            known,
            &account_after_deposit(),
            &HashSet::new(),
        )
    }

    #[test]
    fn the_same_payload_again_is_a_duplicate() {
        let known = deposit_recorded(500, true);
        let again = msg(
            7,
            "/t",
            "dep-1",
            "account.Deposit",
            "a",
            json!({"amount": 500}),
        );
        let p = plan_of(std::slice::from_ref(&again), &known);
        assert_eq!(p.duplicates.len(), 1);
        let d = &p.duplicates[0];
        assert!(!d.key_reused());
        assert_eq!(d.outcome, known[&("/t".to_owned(), "dep-1".to_owned())]);
        assert_eq!(
            Some(payload_digest(again.decoded.as_ref().unwrap())),
            d.outcome.digest
        );
        assert_eq!(p.key_reused(), 0);
        assert!(p.processed.is_empty() && p.events.is_empty() && p.writes.is_empty());
        assert_eq!(p.next_offset, 8);
    }

    #[test]
    fn another_payload_under_a_recorded_key_is_refused_without_effect() {
        let known = deposit_recorded(500, true);
        let reused = msg(
            7,
            "/t",
            "dep-1",
            "account.Deposit",
            "a",
            json!({"amount": 700}),
        );
        let p = plan_of(&[reused], &known);
        assert_eq!(p.key_reused(), 1);
        let d = &p.duplicates[0];
        assert!(d.key_reused());
        let refused = d.refused.as_ref().expect("refused");
        assert_eq!(refused.aggregate, ("account".to_owned(), "a".to_owned()));
        assert_eq!(refused.command_type, "account.Deposit");
        assert_ne!(Some(refused.digest), d.outcome.digest);
        // The recorded outcome stays what the key stands for; nothing is written.
        assert_eq!(d.outcome, known[&("/t".to_owned(), "dep-1".to_owned())]);
        assert!(p.processed.is_empty(), "no outcome recorded or replaced");
        assert!(p.events.is_empty() && p.writes.is_empty() && p.dead_letters.is_empty());
        assert_eq!(p.next_offset, 8);

        // Another command type or aggregate under the key is refused alike.
        let other_type = msg(
            8,
            "/t",
            "dep-1",
            "account.Withdraw",
            "a",
            json!({"amount": 500}),
        );
        let other_subject = msg(
            9,
            "/t",
            "dep-1",
            "account.Deposit",
            "b",
            json!({"amount": 500}),
        );
        let p = plan_of(&[other_type, other_subject], &known);
        assert_eq!(p.key_reused(), 2);
        assert_eq!(
            p.duplicates[1]
                .refused
                .as_ref()
                .map(|r| r.aggregate.clone()),
            Some(("account".to_owned(), "b".to_owned()))
        );
        assert!(p.processed.is_empty() && p.writes.is_empty());
    }

    #[test]
    fn a_key_reused_within_one_batch_is_refused() {
        let msgs = vec![
            msg(
                1,
                "/t",
                "open",
                "account.Open",
                "n",
                json!({"owner": "ada"}),
            ),
            msg(
                2,
                "/t",
                "dep-1",
                "account.Deposit",
                "n",
                json!({"amount": 500}),
            ),
            msg(
                3,
                "/t",
                "dep-1",
                "account.Deposit",
                "n",
                json!({"amount": 500}),
            ),
            msg(
                4,
                "/t",
                "dep-1",
                "account.Deposit",
                "n",
                json!({"amount": 700}),
            ),
            msg(
                5,
                "/t",
                "dep-1",
                "account.Deposit",
                "n",
                json!({"amount": 500}),
            ),
        ];
        let p = plan_of(&msgs, &HashMap::new());
        assert_eq!(p.applied(), 2);
        let deposit = &p.processed[1];
        assert_eq!(
            deposit.outcome.digest,
            Some(payload_digest(msgs[1].decoded.as_ref().unwrap())),
            "the recorded outcome carries its digest"
        );
        let refused: Vec<(i64, bool)> = p
            .duplicates
            .iter()
            .map(|d| (d.offset, d.key_reused()))
            .collect();
        assert_eq!(refused, vec![(3, false), (4, true), (5, false)]);
        assert_eq!(p.events.len(), 2);
        assert_eq!(p.writes.len(), 1);
        assert_eq!(
            p.writes[0].state["balance"], 500,
            "only the first deposit counted"
        );
    }

    #[test]
    fn a_recorded_outcome_without_a_digest_makes_any_payload_a_duplicate() {
        let known = deposit_recorded(500, false);
        let msgs = vec![
            msg(
                7,
                "/t",
                "dep-1",
                "account.Deposit",
                "a",
                json!({"amount": 700}),
            ),
            msg(
                8,
                "/t",
                "dep-1",
                "account.Deposit",
                "a",
                json!({"amount": 500}),
            ),
        ];
        let p = plan_of(&msgs, &known);
        assert_eq!(p.duplicates.len(), 2);
        assert_eq!(p.key_reused(), 0);
        assert!(p.processed.is_empty() && p.events.is_empty() && p.writes.is_empty());
    }
}

/// A handler's emitted commands, timers and the outcomes that come back, planned.
#[cfg(test)]
mod workflow_tests {
    use chrono::{TimeZone, Utc};
    use commands::workflow::{CommandOutcome, Emit, OUTCOME_SCHEMA};
    use commands::{Aggregate, Context, Decision, Registry, Rejection, Schemas};
    use serde::{Deserialize, Serialize};
    use serde_json::json;

    use super::*;

    /// Starts a transfer elsewhere, asks for its outcome, and sets a deadline.
    struct Flow;

    #[derive(Debug, Deserialize)]
    enum FlowCommand {
        Start { to: String },
        Stop {},
        Outcome(CommandOutcome),
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum FlowEvent {
        Started { to: String },
        Heard { outcome: String },
    }

    impl Aggregate for Flow {
        const TYPE: &'static str = "flow";
        type State = Vec<String>;
        type Command = FlowCommand;
        type Event = FlowEvent;

        fn handle(
            _: &Vec<String>,
            command: &FlowCommand,
            ctx: &Context<'_>,
        ) -> Result<Decision<FlowEvent>, Rejection> {
            Ok(match command {
                FlowCommand::Start { to } => {
                    let due = ctx.time.expect("a time") + chrono::Duration::seconds(30);
                    Decision::event(FlowEvent::Started { to: to.clone() })
                        .emit(
                            Emit::new("account.Deposit", to.clone(), json!({"amount": 5}))
                                .with_outcome(),
                        )
                        .schedule(
                            "deadline",
                            due,
                            Emit::new("flow.Stop", ctx.aggregate_id, json!({})),
                        )
                }
                FlowCommand::Stop {} => Decision::new().cancel("deadline"),
                FlowCommand::Outcome(o) => Decision::event(FlowEvent::Heard {
                    outcome: o.outcome.name().to_owned(),
                }),
            })
        }

        fn apply(heard: &mut Vec<String>, event: &FlowEvent) {
            if let FlowEvent::Heard { outcome } = event {
                heard.push(outcome.clone());
            }
        }
    }

    const ANY: &str = r#"{"type": "object"}"#;

    fn registry() -> Registry {
        bank::registry().with::<Flow>(Schemas::embedded(
            "flow",
            &[
                ("commands/Start.json", ANY),
                ("commands/Stop.json", ANY),
                ("commands/Outcome.json", OUTCOME_SCHEMA),
                ("events/Started.json", ANY),
                ("events/Heard.json", ANY),
            ],
        ))
    }

    fn incoming(registry: &Registry, offset: i64, ce: Value) -> Incoming {
        let subject = ce["subject"].as_str().unwrap().to_owned();
        let bytes = serde_json::to_vec(&ce).unwrap();
        let decoded = Command::decode(
            Some(subject.as_bytes()),
            &[],
            Some(&bytes),
            registry.schemas(),
        );
        Incoming {
            offset,
            timestamp: None,
            key: Some(subject.into_bytes()),
            value: Some(bytes),
            headers: vec![],
            decoded,
        }
    }

    fn plan_one(registry: &Registry, m: Incoming) -> Plan {
        plan(
            registry,
            &PlanOptions::default(),
            &[m],
            &HashMap::new(),
            &HashMap::new(),
            &HashSet::new(),
        )
    }

    #[test]
    fn emitted_commands_and_timers_are_derived_from_the_emitting_command() {
        let registry = registry();
        let start = json!({"specversion":"1.0","id":"s-1","source":"/t","type":"flow.Start",
                           "subject":"f-1","time":"2026-12-01T10:00:00Z","correlationid":"c-9",
                           "data":{"to":"acc-1"}});
        let p = plan_one(&registry, incoming(&registry, 4, start.clone()));
        assert_eq!(p.applied(), 1, "{p:#?}");
        let [emitted] = &p.emitted[..] else {
            panic!("{p:#?}")
        };
        let ce: Value = serde_json::from_slice(&emitted.payload).unwrap();
        assert_eq!(emitted.key, "acc-1");
        assert_eq!(ce["type"], "account.Deposit");
        assert_eq!(ce["source"], "/aggregates/flow/f-1");
        assert_eq!(ce["outcometo"], "flow/f-1");
        assert_eq!(ce["correlationid"], "c-9");
        assert_eq!(ce["time"], "2026-12-01T10:00:00Z");
        // The emitted command decodes as a command of its target.
        let back = incoming(&registry, 0, ce.clone());
        assert!(back.decoded.is_ok(), "{:?}", back.decoded);
        let [TimerRow::Schedule {
            name,
            due_at,
            command,
            ..
        }] = &p.timers[..]
        else {
            panic!("{p:#?}")
        };
        assert_eq!(name, "deadline");
        assert_eq!(
            *due_at,
            Utc.with_ymd_and_hms(2026, 12, 1, 10, 0, 30).unwrap()
        );
        let fired: Value = serde_json::from_slice(&command.payload).unwrap();
        assert_eq!(
            fired["time"], "2026-12-01T10:00:30Z",
            "a timer's command is timed when due"
        );
        assert_eq!(fired["type"], "flow.Stop");

        // Handling the same command again derives the same ids.
        let again = plan_one(&registry, incoming(&registry, 9, start));
        assert_eq!(again.emitted[0].message_id, emitted.message_id);
        let TimerRow::Schedule {
            command: again_timer,
            ..
        } = &again.timers[0]
        else {
            panic!()
        };
        assert_eq!(again_timer.message_id, command.message_id);
    }

    #[test]
    fn a_command_with_outcometo_answers_its_emitter_for_every_outcome() {
        let registry = registry();
        let deposit = |id: &str, amount: Value| {
            json!({"specversion":"1.0","id":id,"source":"/aggregates/flow/f-1",
                   "type":"account.Deposit","subject":"acc-1","outcometo":"flow/f-1",
                   "data":{"amount":amount}})
        };
        // The account is not open: rejected, and the emitter hears so.
        let rejected = plan_one(&registry, incoming(&registry, 1, deposit("d-1", json!(5))));
        let [r] = &rejected.replies[..] else {
            panic!("{rejected:#?}")
        };
        assert!(r.to.topic.is_none());
        assert_eq!(
            r.to.outcome_to.as_ref().map(ToString::to_string).as_deref(),
            Some("flow/f-1")
        );
        assert!(
            matches!(&r.reply.outcome, ReplyOutcome::Rejected { code: Some(c), .. } if c == "not_open")
        );
        let message = commands::wire::outcome_message(&r.to, &r.reply.outcome);
        let outcome = incoming(
            &registry,
            2,
            serde_json::from_slice(message.payload.as_deref().unwrap()).unwrap(),
        );
        let heard = plan_one(&registry, outcome);
        assert_eq!(
            heard.applied(),
            1,
            "the emitter accepts its Outcome: {heard:#?}"
        );
        assert_eq!(
            heard.events[0].envelope.data,
            json!({"Heard": {"outcome": "rejected"}})["Heard"]
        );

        // Schema-invalid data: dead-lettered, still answered.
        let invalid = plan_one(
            &registry,
            incoming(&registry, 3, deposit("d-2", json!("x"))),
        );
        assert!(matches!(
            &invalid.replies[0].reply.outcome,
            ReplyOutcome::DeadLettered { kind, .. } if kind == "schema"
        ));
        assert!(matches!(invalid.replies[0].answers, Answers::DeadLetter));
    }
}
