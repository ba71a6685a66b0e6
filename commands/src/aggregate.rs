//! The `Aggregate` trait: pure domain logic, and its type-erased form the engine drives.
//!
//! A handler maps `(state, command)` to events or a [`Rejection`]; `apply` folds an event
//! into the state. Neither does I/O or reads a clock: replaying the same commands always
//! yields the same state and the same events.

use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

/// A business rejection: the command was well-formed but the aggregate refuses it.
///
/// Rejections are outcomes, recorded like applied commands; they are not errors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Rejection {
    /// Human-readable reason, e.g. `insufficient funds: balance 10, withdrawal 25`.
    pub reason: String,
}

impl Rejection {
    /// Builds a rejection from a reason.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

/// Domain logic of one aggregate type.
pub trait Aggregate {
    /// The aggregate type as it appears in command types, e.g. `account`.
    const TYPE: &'static str;
    /// The aggregate's state; `Default` is the state before any event.
    type State: Default + Serialize + DeserializeOwned + Clone + std::fmt::Debug;
    /// The commands the aggregate accepts (externally tagged by command name).
    type Command: DeserializeOwned + std::fmt::Debug;
    /// The events the aggregate emits.
    type Event: Serialize + DeserializeOwned + Clone + std::fmt::Debug;

    /// Decides what a command does to the state. Pure.
    fn handle(state: &Self::State, command: &Self::Command) -> Result<Vec<Self::Event>, Rejection>;
    /// Folds one event into the state. Pure and total.
    fn apply(state: &mut Self::State, event: &Self::Event);
}

/// An event as the engine sees it: a name (without the aggregate prefix) and its JSON data.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainEvent {
    /// Event name, e.g. `Deposited`; the full CloudEvents type is `<aggregate>.<name>`.
    pub name: String,
    /// The event's payload, valid against `schemas/<aggregate>/events/<name>.json`.
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

/// The type-erased aggregate the engine drives, with state as JSON.
pub trait DynAggregate: Send + Sync + std::fmt::Debug {
    /// The aggregate type, e.g. `account`.
    fn aggregate_type(&self) -> &'static str;
    /// Handles `command_name` with `data` against `state` (JSON of `State`; `Value::Null`
    /// means the aggregate does not exist yet).
    fn handle(
        &self,
        state: &Value,
        command_name: &str,
        data: &Value,
    ) -> Result<Result<Vec<DomainEvent>, Rejection>, CommandError>;
    /// Applies events to a state, returning the new state as JSON.
    fn apply(&self, state: &Value, events: &[DomainEvent]) -> Value;
}
