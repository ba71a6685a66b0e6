//! The example domains and the glue that lets the engine drive them as JSON.
//!
//! Each domain is a pure [`Aggregate`] with typed commands, events and state. The engine
//! only sees JSON (commands arrive as CloudEvents, state and events are stored as JSONB),
//! so [`Typed`] adapts any [`Catalog`] aggregate to [`DynAggregate`], and [`Registry`] maps
//! an aggregate type (the part of a CloudEvents `type` before the dot) to its adapter.
//!
//! Conventions every domain follows, because [`Typed`] relies on them:
//!
//! - commands and events are enums whose variants are named exactly like the command or
//!   event (`Deposit`, `Deposited`) and carry their data as struct fields, so serde's
//!   externally tagged form `{"Deposit": {"amount": 5}}` is `{name: data}`;
//! - [`Catalog`] lists the same names, and `schemas/<type>/{commands,events}/<Name>.json`
//!   holds one schema per name.

pub mod account;
pub mod room;

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde_json::{Map, Value};

use crate::aggregate::{Aggregate, CommandError, DomainEvent, DynAggregate, Rejection};

pub use account::Account;
pub use room::Room;

/// The names an aggregate's commands and events go by on the wire.
///
/// The engine needs them to tell an unknown command from a malformed one (different
/// dead-letter kinds) and the schema module and CLI need them to enumerate the contract;
/// serde's enums do not expose their variant names, so each domain lists them once here.
pub trait Catalog: Aggregate {
    /// Command names, i.e. the variants of [`Aggregate::Command`].
    const COMMANDS: &'static [&'static str];
    /// Event names, i.e. the variants of [`Aggregate::Event`].
    const EVENTS: &'static [&'static str];
}

/// Adapts a typed [`Aggregate`] to the JSON-facing [`DynAggregate`] the engine drives.
///
/// It holds no data: the aggregate's logic is in associated functions, so one `Typed<A>`
/// serves every aggregate instance of the type.
///
/// # Panics
///
/// `handle` and `apply` panic if the stored state or an event is not JSON this adapter
/// produced. That is a bug (or a state-shape change without a migration), not bad input:
/// the engine treats the panic as a handler failure and parks the aggregate, whereas
/// returning [`CommandError::InvalidData`] would dead-letter a good command and let later
/// commands for the same aggregate overtake it.
pub struct Typed<A>(PhantomData<fn() -> A>);

impl<A> Typed<A> {
    /// Creates the adapter.
    pub const fn new() -> Self {
        Self(PhantomData)
    }
}

impl<A> Default for Typed<A> {
    fn default() -> Self {
        Self::new()
    }
}

// Written by hand because a derive would demand `A: Debug`, yet only the type name matters.
impl<A: Aggregate> fmt::Debug for Typed<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Typed").field(&A::TYPE).finish()
    }
}

impl<A: Catalog> Typed<A> {
    /// Reads a stored state; `Null` is the state of an aggregate that does not exist yet.
    ///
    /// # Panics
    ///
    /// If `state` is not the JSON of `A::State`; see [`Typed`] for why this panics.
    fn load(state: &Value) -> A::State {
        if state.is_null() {
            return A::State::default();
        }
        match serde_json::from_value(state.clone()) {
            Ok(state) => state,
            Err(error) => panic!("stored {} state does not deserialize: {error}", A::TYPE),
        }
    }

    /// Splits a typed event into its name and data (see the module's conventions).
    fn to_domain_event(event: &A::Event) -> DomainEvent {
        let value = serde_json::to_value(event)
            .unwrap_or_else(|error| panic!("{} event does not serialize: {error}", A::TYPE));
        match value {
            Value::Object(map) if map.len() == 1 => {
                let (name, data) = map.into_iter().next().expect("one entry");
                DomainEvent { name, data }
            }
            // A unit variant serializes as its bare name.
            Value::String(name) => DomainEvent {
                name,
                data: Value::Null,
            },
            other => panic!(
                "{} event is not an externally tagged enum variant: {other}",
                A::TYPE
            ),
        }
    }

    /// Rebuilds a typed event from its name and data.
    ///
    /// # Panics
    ///
    /// If the event was not produced by this aggregate's handler (see [`Typed`]).
    fn from_domain_event(event: &DomainEvent) -> A::Event {
        match serde_json::from_value(tagged(&event.name, &event.data)) {
            Ok(event) => event,
            Err(error) => panic!(
                "stored {}.{} event does not deserialize: {error}",
                A::TYPE,
                event.name
            ),
        }
    }
}

/// Builds serde's externally tagged form `{name: data}`.
fn tagged(name: &str, data: &Value) -> Value {
    let mut map = Map::with_capacity(1);
    map.insert(name.to_owned(), data.clone());
    Value::Object(map)
}

impl<A> DynAggregate for Typed<A>
where
    A: Catalog + 'static,
{
    fn aggregate_type(&self) -> &'static str {
        A::TYPE
    }

    /// # Panics
    ///
    /// If `state` is not a state this adapter produced (see [`Typed`]).
    fn handle(
        &self,
        state: &Value,
        command_name: &str,
        data: &Value,
    ) -> Result<Result<Vec<DomainEvent>, Rejection>, CommandError> {
        // Checked before deserializing so that an unknown name is reported as such, not as
        // serde's "unknown variant" inside `InvalidData`.
        if !A::COMMANDS.contains(&command_name) {
            return Err(CommandError::UnknownCommand(command_name.to_owned()));
        }
        let command: A::Command = serde_json::from_value(tagged(command_name, data))
            .map_err(|error| CommandError::InvalidData(error.to_string()))?;
        let state = Self::load(state);
        Ok(A::handle(&state, &command)
            .map(|events| events.iter().map(Self::to_domain_event).collect()))
    }

    /// # Panics
    ///
    /// If `state` or an event was not produced by this adapter (see [`Typed`]).
    fn apply(&self, state: &Value, events: &[DomainEvent]) -> Value {
        let mut state = Self::load(state);
        for event in events {
            A::apply(&mut state, &Self::from_domain_event(event));
        }
        serde_json::to_value(&state)
            .unwrap_or_else(|error| panic!("{} state does not serialize: {error}", A::TYPE))
    }
}

/// One registered aggregate type.
#[derive(Debug)]
struct Entry {
    aggregate: Box<dyn DynAggregate>,
    commands: &'static [&'static str],
    events: &'static [&'static str],
}

/// The aggregate types a processor knows, by name.
///
/// A `BTreeMap` keeps [`Registry::types`] in a stable order, so CLI listings and schema
/// checks do not depend on hashing.
#[derive(Debug, Default)]
pub struct Registry {
    entries: BTreeMap<&'static str, Entry>,
}

impl Registry {
    /// An empty registry, for tests and for processors that ship their own domains.
    pub fn new() -> Self {
        Self::default()
    }

    /// The example domains shipped in this crate: `account` and `room`.
    pub fn builtin() -> Self {
        let mut registry = Self::new();
        registry.register::<Account>();
        registry.register::<Room>();
        registry
    }

    /// Adds aggregate `A` under [`Aggregate::TYPE`], replacing any earlier one of that type.
    pub fn register<A: Catalog + 'static>(&mut self) -> &mut Self {
        self.entries.insert(
            A::TYPE,
            Entry {
                aggregate: Box::new(Typed::<A>::new()),
                commands: A::COMMANDS,
                events: A::EVENTS,
            },
        );
        self
    }

    /// The aggregate for `aggregate_type` (e.g. `account`), if registered.
    pub fn get(&self, aggregate_type: &str) -> Option<&dyn DynAggregate> {
        self.entries
            .get(aggregate_type)
            .map(|entry| entry.aggregate.as_ref())
    }

    /// The registered aggregate types, in lexical order.
    pub fn types(&self) -> impl Iterator<Item = &str> + '_ {
        self.entries.keys().copied()
    }

    /// The command names of `aggregate_type`, or `None` if it is not registered.
    pub fn command_names(&self, aggregate_type: &str) -> Option<&'static [&'static str]> {
        self.entries.get(aggregate_type).map(|entry| entry.commands)
    }

    /// The event names of `aggregate_type`, or `None` if it is not registered.
    pub fn event_names(&self, aggregate_type: &str) -> Option<&'static [&'static str]> {
        self.entries.get(aggregate_type).map(|entry| entry.events)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn builtin_registry_lists_the_example_domains() {
        let registry = Registry::builtin();
        assert_eq!(registry.types().collect::<Vec<_>>(), ["account", "room"]);
        for aggregate_type in registry.types() {
            let aggregate = registry.get(aggregate_type).expect("registered");
            assert_eq!(aggregate.aggregate_type(), aggregate_type);
        }
        assert_eq!(
            registry.command_names("account"),
            Some(&["Open", "Deposit", "Withdraw"][..])
        );
        assert_eq!(
            registry.event_names("room"),
            Some(&["Booked", "Cancelled"][..])
        );
        assert!(registry.get("order").is_none());
        assert!(registry.command_names("order").is_none());
    }

    #[test]
    fn unknown_command_is_not_invalid_data() {
        let registry = Registry::builtin();
        let account = registry.get("account").expect("registered");
        assert_eq!(
            account.handle(&Value::Null, "Close", &json!({})),
            Err(CommandError::UnknownCommand("Close".into()))
        );
        // A command of another aggregate is unknown here, too.
        assert_eq!(
            account.handle(&Value::Null, "Book", &json!({})),
            Err(CommandError::UnknownCommand("Book".into()))
        );
    }

    #[test]
    fn malformed_data_is_invalid_data() {
        let registry = Registry::builtin();
        let account = registry.get("account").expect("registered");
        for data in [
            json!(null),
            json!({}),
            json!({"amount": "5"}),
            json!({"amount": 5, "extra": true}),
            json!([5]),
        ] {
            let outcome = account.handle(&Value::Null, "Deposit", &data);
            assert!(
                matches!(outcome, Err(CommandError::InvalidData(_))),
                "{data} gave {outcome:?}"
            );
        }
    }

    #[test]
    fn json_round_trip_through_stored_state() {
        let registry = Registry::builtin();
        let account = registry.get("account").expect("registered");
        let mut state = Value::Null;
        for (name, data) in [
            ("Open", json!({"owner": "alice"})),
            ("Deposit", json!({"amount": 100})),
            ("Withdraw", json!({"amount": 30})),
        ] {
            let events = account
                .handle(&state, name, &data)
                .expect("well-formed")
                .expect("accepted");
            // The engine stores JSON text; go through it to catch anything lossy.
            let stored = serde_json::to_string(&account.apply(&state, &events)).expect("json");
            state = serde_json::from_str(&stored).expect("json");
        }
        assert_eq!(
            state,
            json!({"opened": true, "owner": "alice", "balance": 70})
        );

        let rejected = account
            .handle(&state, "Withdraw", &json!({"amount": 71}))
            .expect("well-formed");
        assert_eq!(
            rejected,
            Err(Rejection::new(
                "insufficient funds: balance 70, withdrawal 71"
            ))
        );
    }

    #[test]
    fn events_are_named_by_variant_with_their_fields_as_data() {
        let registry = Registry::builtin();
        let room = registry.get("room").expect("registered");
        let events = room
            .handle(
                &Value::Null,
                "Book",
                &json!({"night": "2026-12-24", "guest": "alice"}),
            )
            .expect("well-formed")
            .expect("accepted");
        assert_eq!(
            events,
            [DomainEvent {
                name: "Booked".into(),
                data: json!({"night": "2026-12-24", "guest": "alice"}),
            }]
        );
        assert_eq!(
            room.apply(&Value::Null, &events),
            json!({"booked": {"2026-12-24": "alice"}})
        );
    }

    #[test]
    #[should_panic(expected = "stored account state does not deserialize")]
    fn corrupt_stored_state_panics_rather_than_blaming_the_command() {
        let registry = Registry::builtin();
        let account = registry.get("account").expect("registered");
        let _ = account.handle(
            &json!({"balance": "lots"}),
            "Deposit",
            &json!({"amount": 1}),
        );
    }

    #[test]
    fn applying_no_events_to_a_new_aggregate_gives_the_default_state() {
        let registry = Registry::builtin();
        let room = registry.get("room").expect("registered");
        assert_eq!(room.apply(&Value::Null, &[]), json!({"booked": {}}));
    }
}
