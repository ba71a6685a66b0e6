//! Workflows across aggregates: commands a handler emits, their outcomes coming back, and
//! durable timers.
//!
//! Besides its events, a [`Decision`](crate::Decision) may carry:
//!
//! - **emitted commands** ([`Emit`]) for other aggregates (or its own). They are outbox rows
//!   of the transaction that records the emitting command, published to the commands topic
//!   keyed by their subject, with ids derived from the emitting command's key and their
//!   index ([`emitted_id`]), `source` naming the emitter (`/aggregates/<type>/<id>`), and
//!   the emitting command's `time` and correlation id. Handling the emitting command again
//!   (a database restore) derives the same ids: duplicates downstream, never second effects.
//! - a request for each emitted command's **outcome** ([`Emit::with_outcome`]): when the
//!   target aggregate has applied, rejected or dead-lettered it, the emitter receives the
//!   command `<its type>.Outcome` whose data is a [`CommandOutcome`] (its id derived from
//!   the emitted command's, so a repeated outcome is a duplicate). An aggregate that asks for
//!   outcomes has an `Outcome(CommandOutcome)` command and registers [`OUTCOME_SCHEMA`] as
//!   `commands/Outcome.json`.
//! - **timers** ([`Decision::schedule`](crate::Decision::schedule),
//!   [`Decision::cancel`](crate::Decision::cancel)): a command to send at a time, by name
//!   per aggregate (scheduling a name again replaces it). The partition's owner fires a due
//!   timer by writing its command to the outbox in the transaction that deletes the timer;
//!   the fired command's `time` is the due time and its id is the timer's ([`timer_id`]), so
//!   it takes effect once however often workers die.
//!
//! ```
//! use chrono::{Duration, TimeZone, Utc};
//! use commands::workflow::Emit;
//! use commands::Decision;
//! use serde_json::json;
//!
//! let now = Utc.with_ymd_and_hms(2026, 12, 1, 10, 0, 0).unwrap();
//! let decision: Decision<()> = Decision::new()
//!     .emit(Emit::new("inventory.Reserve", "sku-1", json!({"order": "ord-1", "qty": 2})).with_outcome())
//!     .schedule("deadline", now + Duration::minutes(5), Emit::new("order.Expire", "ord-1", json!({})));
//! assert_eq!(decision.commands.len(), 1);
//! assert_eq!(decision.timers.len(), 1);
//! ```

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::ids::{CommandId, Source};
use crate::reply::ReplyOutcome;

/// The namespace of emitted commands', outcomes' and timers' ids (UUIDv5).
pub const WORKFLOW_NAMESPACE: Uuid = Uuid::from_u128(0x7c2e_41a0_5d3b_4f0e_9a61_0b8d_2f4e_6c13);

/// The command name an outcome is delivered as: `<emitter type>.Outcome`.
pub const OUTCOME_COMMAND: &str = "Outcome";

/// The JSON Schema of [`CommandOutcome`], to register as `commands/Outcome.json` of an
/// aggregate that asks for outcomes.
pub const OUTCOME_SCHEMA: &str = include_str!("../../schemas/outcome.json");

/// A command a handler emits: for which aggregate, what, and whether its outcome comes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emit {
    /// `<aggregate_type>.<CommandName>`, e.g. `inventory.Reserve`.
    pub command_type: String,
    /// The target aggregate's id.
    pub subject: String,
    /// The command's data, valid against the target's schema.
    pub data: Value,
    /// Whether the emitter gets the command's outcome as its `Outcome` command.
    pub outcome: bool,
}

impl Emit {
    /// A command of `command_type` (`<aggregate_type>.<CommandName>`) for `subject`.
    pub fn new(command_type: impl Into<String>, subject: impl Into<String>, data: Value) -> Self {
        Self {
            command_type: command_type.into(),
            subject: subject.into(),
            data,
            outcome: false,
        }
    }

    /// A command of aggregate type `aggregate_type` from a value of its command enum (any
    /// `Serialize` enum in serde's externally tagged form: `{"Reserve": {...}}`).
    ///
    /// # Panics
    /// If `command` does not serialize to a one-key object or a string (a unit variant).
    pub fn command<C: Serialize>(
        aggregate_type: &str,
        subject: impl Into<String>,
        command: &C,
    ) -> Self {
        let (name, data) = match serde_json::to_value(command) {
            Ok(Value::Object(m)) if m.len() == 1 => m.into_iter().next().expect("one key"),
            Ok(Value::String(name)) => (name, Value::Object(Default::default())),
            other => panic!("an emitted command must be an externally tagged enum, got {other:?}"),
        };
        Self::new(format!("{aggregate_type}.{name}"), subject, data)
    }

    /// The same command, asking for its outcome to come back to the emitter.
    pub fn with_outcome(mut self) -> Self {
        self.outcome = true;
        self
    }
}

/// What a handler does to a timer of its aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TimerOp {
    /// Send `command` at `at`; replaces a pending timer of the same name.
    Schedule {
        /// The timer's name, unique per aggregate.
        name: String,
        /// When it is due.
        at: DateTime<Utc>,
        /// What it sends.
        command: Emit,
    },
    /// Forget the pending timer of this name, if any: it never fires.
    Cancel {
        /// The timer's name.
        name: String,
    },
}

/// The data of the `Outcome` command an emitter receives for a command it emitted with
/// [`Emit::with_outcome`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandOutcome {
    /// The command the outcome is of.
    pub command: OutcomeOf,
    /// What happened to it.
    #[serde(flatten)]
    pub outcome: ReplyOutcome,
}

/// The command an outcome is of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeOf {
    /// Its `id`.
    pub id: String,
    /// Its `source`.
    pub source: String,
    /// Its type, e.g. `inventory.Reserve`.
    #[serde(rename = "type")]
    pub command_type: String,
    /// Its subject.
    pub subject: String,
}

/// The `source` of commands emitted by (and timers of) aggregate `aggregate_type`/`id`.
pub fn emitter_source(aggregate_type: &str, aggregate_id: &str) -> String {
    format!("/aggregates/{aggregate_type}/{aggregate_id}")
}

/// The id of the `index`-th command emitted while handling the command `source`/`id`.
pub fn emitted_id(source: &Source, id: &CommandId, index: usize) -> String {
    let name = format!("emit\0{}\0{}\0{index}", source.as_str(), id.as_str());
    Uuid::new_v5(&WORKFLOW_NAMESPACE, name.as_bytes()).to_string()
}

/// The id of the command a timer sends: derived from the timer's aggregate and name and
/// the command that scheduled it, so rescheduling makes a new one and firing twice does not.
pub fn timer_id(
    aggregate_type: &str,
    aggregate_id: &str,
    name: &str,
    source: &Source,
    id: &CommandId,
) -> String {
    let name = format!(
        "timer\0{aggregate_type}\0{aggregate_id}\0{name}\0{}\0{}",
        source.as_str(),
        id.as_str()
    );
    Uuid::new_v5(&WORKFLOW_NAMESPACE, name.as_bytes()).to_string()
}

/// The id of the `Outcome` command that carries the outcome of command `source`/`id`.
pub fn outcome_id(source: &str, id: &str) -> String {
    let name = format!("outcome\0{source}\0{id}");
    Uuid::new_v5(&WORKFLOW_NAMESPACE, name.as_bytes()).to_string()
}

/// The `source` of `Outcome` commands.
pub const OUTCOME_SOURCE: &str = "/cmdproc/outcomes";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::ReplyOutcome;

    #[derive(Serialize)]
    enum Target {
        Reserve { order: String, qty: u32 },
        Ping,
    }

    #[test]
    fn a_typed_command_becomes_its_type_and_data() {
        let e = Emit::command(
            "inventory",
            "sku-1",
            &Target::Reserve {
                order: "o".into(),
                qty: 2,
            },
        );
        assert_eq!(e.command_type, "inventory.Reserve");
        assert_eq!(e.data, serde_json::json!({"order": "o", "qty": 2}));
        let ping = Emit::command("inventory", "sku-1", &Target::Ping);
        assert_eq!(ping.command_type, "inventory.Ping");
        assert_eq!(ping.data, serde_json::json!({}));
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let s = Source::parse("/t").unwrap();
        let i = CommandId::parse("c-1").unwrap();
        assert_eq!(emitted_id(&s, &i, 0), emitted_id(&s, &i, 0));
        assert_ne!(emitted_id(&s, &i, 0), emitted_id(&s, &i, 1));
        assert_ne!(
            timer_id("order", "o-1", "deadline", &s, &i),
            timer_id("order", "o-1", "other", &s, &i)
        );
        assert_ne!(outcome_id("/t", "c-1"), outcome_id("/t", "c-2"));
    }

    #[test]
    fn an_outcome_validates_against_its_schema() {
        let schema: Value = serde_json::from_str(OUTCOME_SCHEMA).unwrap();
        let schema = jsonschema::draft202012::new(&schema).unwrap();
        let outcome = CommandOutcome {
            command: OutcomeOf {
                id: "x".into(),
                source: "/aggregates/order/o-1".into(),
                command_type: "inventory.Reserve".into(),
                subject: "sku-1".into(),
            },
            outcome: ReplyOutcome::Rejected {
                code: Some("insufficient_stock".into()),
                reason: "r".into(),
            },
        };
        let v = serde_json::to_value(&outcome).unwrap();
        assert!(schema.is_valid(&v), "{v}");
        let back: CommandOutcome = serde_json::from_value(v).unwrap();
        assert_eq!(back, outcome);
    }
}
