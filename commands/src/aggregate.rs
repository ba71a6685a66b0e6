//! The `Aggregate` trait: pure domain logic, and its type-erased form the engine drives.
//!
//! A handler maps `(state, command, context)` to a [`Decision`] or a [`Rejection`]; `apply`
//! folds an event into the state. Neither does I/O or reads a clock (the command's `time`,
//! in the [`Context`], is the only clock a handler sees): replaying the same commands always
//! yields the same state and the same events.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

use crate::ids::{CommandId, Source};
use crate::workflow::{Emit, TimerOp};

/// A business rejection: the command was well-formed but the aggregate refuses it.
///
/// Rejections are outcomes, recorded like applied commands; they are not errors. The
/// `code` is for machines (a caller branches on `insufficient_funds`), the `reason` for
/// people.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rejection {
    /// Machine-readable cause in `snake_case`, e.g. `insufficient_funds`.
    pub code: String,
    /// Human-readable reason, e.g. `insufficient funds: balance 10, withdrawal 25`.
    pub reason: String,
}

impl Rejection {
    /// Builds a rejection from a code and a reason.
    pub fn new(code: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.reason)
    }
}

/// What the engine knows about the command being handled, besides its data.
///
/// Built by the engine for every command; tests build one with [`Context::new`] (or let
/// [`crate::testing`] do it).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Context<'a> {
    /// The command's `id`.
    pub command_id: &'a CommandId,
    /// The command's `source`; with the id, the idempotency key.
    pub source: &'a Source,
    /// The command's `time`, if the sender set one: the only clock a handler sees, so an
    /// expiry computed from it is the same on every replay.
    pub time: Option<DateTime<Utc>>,
    /// The command's `correlationid`, carried onto its events.
    pub correlation_id: Option<&'a str>,
    /// The aggregate's version before this command (0 for an aggregate with no events).
    pub version: u64,
    /// The aggregate's id (the command's `subject`), e.g. to address a timer or an emitted
    /// command's outcome to itself. Empty when the context was built without one.
    pub aggregate_id: &'a str,
}

impl<'a> Context<'a> {
    /// A context for a command without `time` or correlation id.
    pub fn new(command_id: &'a CommandId, source: &'a Source, version: u64) -> Self {
        Self {
            command_id,
            source,
            time: None,
            correlation_id: None,
            version,
            aggregate_id: "",
        }
    }

    /// The same context for the aggregate `aggregate_id`.
    pub fn with_aggregate_id(mut self, aggregate_id: &'a str) -> Self {
        self.aggregate_id = aggregate_id;
        self
    }

    /// The same context with the command's `time`.
    pub fn with_time(mut self, time: Option<DateTime<Utc>>) -> Self {
        self.time = time;
        self
    }

    /// The same context with the command's correlation id.
    pub fn with_correlation_id(mut self, correlation_id: Option<&'a str>) -> Self {
        self.correlation_id = correlation_id;
        self
    }
}

/// What an accepted command does: the events it records, in order, and the commands it
/// emits and timers it sets for what spans aggregates (see [`crate::workflow`]).
///
/// The struct is `#[non_exhaustive]`: build it with [`Decision::new`], [`Decision::event`],
/// [`Decision::events`] or `From<Vec<E>>`, then [`Decision::emit`], [`Decision::schedule`]
/// and [`Decision::cancel`], so that what a handler may return can grow without breaking
/// handlers written today.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Decision<E> {
    /// The events, applied to the state in this order; their index within the command
    /// derives their ids.
    pub events: Vec<E>,
    /// Commands for other aggregates (or this one), published with the events; their index
    /// derives their ids.
    pub commands: Vec<Emit>,
    /// Timers of this aggregate to set or cancel, in order.
    pub timers: Vec<TimerOp>,
}

impl<E> Decision<E> {
    /// A decision that records nothing (the command is accepted as a no-op).
    pub fn new() -> Self {
        Self::from(Vec::new())
    }

    /// A decision recording one event.
    pub fn event(event: E) -> Self {
        Self::from(vec![event])
    }

    /// A decision recording `events` in order.
    pub fn events(events: impl IntoIterator<Item = E>) -> Self {
        Self::from(events.into_iter().collect::<Vec<_>>())
    }

    /// Adds one more event after the others.
    pub fn and(mut self, event: E) -> Self {
        self.events.push(event);
        self
    }

    /// Emits a command, published in the same transaction as the events.
    pub fn emit(mut self, command: Emit) -> Self {
        self.commands.push(command);
        self
    }

    /// Sets the timer `name` of this aggregate to send `command` at `at`, replacing a
    /// pending timer of that name.
    pub fn schedule(mut self, name: impl Into<String>, at: DateTime<Utc>, command: Emit) -> Self {
        self.timers.push(TimerOp::Schedule {
            name: name.into(),
            at,
            command,
        });
        self
    }

    /// Cancels the timer `name` of this aggregate, if it is pending: it never fires.
    pub fn cancel(mut self, name: impl Into<String>) -> Self {
        self.timers.push(TimerOp::Cancel { name: name.into() });
        self
    }

    /// The same decision with each event mapped, keeping everything else.
    pub fn map<F>(self, f: impl FnMut(E) -> F) -> Decision<F> {
        Decision {
            events: self.events.into_iter().map(f).collect(),
            commands: self.commands,
            timers: self.timers,
        }
    }
}

impl<E> Default for Decision<E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E> From<Vec<E>> for Decision<E> {
    fn from(events: Vec<E>) -> Self {
        Self {
            events,
            commands: Vec::new(),
            timers: Vec::new(),
        }
    }
}

/// Domain logic of one aggregate type.
///
/// Commands and events are enums in serde's default (externally tagged) form whose
/// variants are named exactly like the command or event (`Deposit`, `Deposited`) and carry
/// their data as struct fields, so `{"Deposit": {"amount": 5}}` is `{name: data}`. The
/// registry reads the variant names from the enums and checks that each has a schema.
///
/// ```
/// use commands::{Aggregate, Context, Decision, Rejection};
/// use serde::{Deserialize, Serialize};
///
/// struct Counter;
///
/// #[derive(Debug, Deserialize)]
/// enum CounterCommand {
///     Add { by: u32 },
/// }
///
/// #[derive(Debug, Clone, Serialize, Deserialize)]
/// enum CounterEvent {
///     Added { by: u32, total: u64 },
/// }
///
/// impl Aggregate for Counter {
///     const TYPE: &'static str = "counter";
///     type State = u64;
///     type Command = CounterCommand;
///     type Event = CounterEvent;
///
///     fn handle(total: &u64, command: &CounterCommand, _: &Context<'_>)
///         -> Result<Decision<CounterEvent>, Rejection>
///     {
///         let CounterCommand::Add { by } = command;
///         if *by == 0 {
///             return Err(Rejection::new("zero", "adding zero changes nothing"));
///         }
///         Ok(Decision::event(CounterEvent::Added { by: *by, total: total + u64::from(*by) }))
///     }
///
///     fn apply(total: &mut u64, event: &CounterEvent) {
///         let CounterEvent::Added { total: after, .. } = event;
///         *total = *after;
///     }
/// }
/// ```
pub trait Aggregate: 'static {
    /// The aggregate type as it appears in command types, e.g. `account`.
    const TYPE: &'static str;
    /// The aggregate's state; `Default` is the state before any event.
    type State: Default + Serialize + DeserializeOwned + Clone + fmt::Debug;
    /// The commands the aggregate accepts (externally tagged by command name).
    type Command: DeserializeOwned + fmt::Debug;
    /// The events the aggregate emits (externally tagged by event name).
    type Event: Serialize + DeserializeOwned + Clone + fmt::Debug;

    /// Decides what a command does to the state. Pure: everything it may depend on is in
    /// `state`, `command` and `context`.
    fn handle(
        state: &Self::State,
        command: &Self::Command,
        context: &Context<'_>,
    ) -> Result<Decision<Self::Event>, Rejection>;

    /// Folds one event into the state. Pure and total.
    fn apply(state: &mut Self::State, event: &Self::Event);

    /// A short label of where the aggregate stands (a saga's step: `paying`, `confirmed`,
    /// `cancelled:out_of_stock`), stored with it and counted in the gauge
    /// `cmdproc_aggregates{type, status}`. `None` (the default) for aggregates without one.
    fn status(state: &Self::State) -> Option<String> {
        let _ = state;
        None
    }
}

/// An event as the engine sees it: a name (without the aggregate prefix) and its JSON data.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainEvent {
    /// Event name, e.g. `Deposited`; the full CloudEvents type is `<aggregate>.<name>`.
    pub name: String,
    /// The event's payload, valid against the aggregate's event schema of that name.
    pub data: Value,
}

/// Why a command could not even be handed to its handler.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// No command of that name exists for the aggregate type.
    #[error("unknown command `{0}`")]
    UnknownCommand(String),
    /// The data does not deserialize into the command.
    #[error("invalid command data: {0}")]
    InvalidData(String),
}

/// What handling a command came to, as the engine sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Handled {
    /// The handler accepted the command.
    Accepted(Decision<DomainEvent>),
    /// The handler refused the command: a recorded outcome.
    Rejected(Rejection),
    /// The command never reached the handler: a dead letter.
    Invalid(CommandError),
}

/// The type-erased aggregate the engine drives, with state as JSON.
pub trait DynAggregate: Send + Sync + fmt::Debug {
    /// The aggregate type, e.g. `account`.
    fn aggregate_type(&self) -> &'static str;
    /// Handles `command_name` with `data` against `state` (JSON of the state;
    /// `Value::Null` means the aggregate does not exist yet).
    fn handle(
        &self,
        state: &Value,
        command_name: &str,
        data: &Value,
        context: &Context<'_>,
    ) -> Handled;
    /// Applies events to a state, returning the new state as JSON.
    fn apply(&self, state: &Value, events: &[DomainEvent]) -> Value;
    /// Applies events to a state, returning the new state as JSON and its
    /// [`Aggregate::status`].
    fn apply_with_status(&self, state: &Value, events: &[DomainEvent]) -> (Value, Option<String>) {
        (self.apply(state, events), None)
    }
}
