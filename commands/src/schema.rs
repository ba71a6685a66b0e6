//! JSON Schema validation: the envelopes of the wire contract, embedded in this crate, and
//! the data schemas of each registered aggregate, compiled once when it is registered.
//!
//! The files in `schemas/` are the contract other-language clients validate against; the
//! processor validates with the very same files.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::OnceLock;

use jsonschema::Validator;
use serde_json::Value;

/// Why a document failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// No schema exists for this type (`<aggregate>.<Name>`): the aggregate or the command
    /// or event name is unknown. Dead-lettered as `unknown_type`.
    #[error("unknown type `{0}`")]
    UnknownType(String),
    /// The document does not match its schema. The message names the JSON pointer and the
    /// problem of the first few errors and is at most [`MAX_MESSAGE_LEN`] bytes long, so it
    /// fits in a dead-letter header; instance values are masked so that client data is not
    /// echoed into logs and headers.
    #[error("{0}")]
    Invalid(String),
}

/// Upper bound on the length of a [`SchemaError::Invalid`] message, in bytes.
pub const MAX_MESSAGE_LEN: usize = 300;

/// How many validation errors an [`SchemaError::Invalid`] message spells out; the first few
/// are enough to fix a payload, and the rest usually follow from them.
const MAX_REPORTED_ERRORS: usize = 3;

/// Whether a schema describes a command's or an event's `data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DataKind {
    /// `<schemas>/commands/<Name>.json`.
    Command,
    /// `<schemas>/events/<Name>.json`.
    Event,
}

impl DataKind {
    /// The folder of this kind's schemas: `commands` or `events`.
    pub fn folder(self) -> &'static str {
        match self {
            Self::Command => "commands",
            Self::Event => "events",
        }
    }
}

impl fmt::Display for DataKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Command => "command",
            Self::Event => "event",
        })
    }
}

/// The command envelope, `schemas/command.envelope.json`, as text.
pub const COMMAND_ENVELOPE: &str = include_str!("../../schemas/command.envelope.json");

/// The event envelope, `schemas/event.envelope.json`, as text.
pub const EVENT_ENVELOPE: &str = include_str!("../../schemas/event.envelope.json");

/// The compiled envelopes, shared by every [`SchemaSet`].
#[derive(Debug)]
struct Envelopes {
    command: Validator,
    event: Validator,
}

fn envelopes() -> &'static Envelopes {
    static ENVELOPES: OnceLock<Envelopes> = OnceLock::new();
    ENVELOPES.get_or_init(|| {
        let compile = |path: &str, text: &str| match compile_data_schema(text) {
            Ok(validator) => validator,
            // Fixed at build time and compiled by the unit tests, so this cannot happen in
            // a tested build.
            Err(error) => panic!("embedded {path} does not compile: {error}"),
        };
        Envelopes {
            command: compile("command.envelope.json", COMMAND_ENVELOPE),
            event: compile("event.envelope.json", EVENT_ENVELOPE),
        }
    })
}

/// The compiled data schemas of one aggregate, by command and event name.
#[derive(Debug, Default)]
pub(crate) struct AggregateValidators {
    commands: BTreeMap<String, Validator>,
    events: BTreeMap<String, Validator>,
}

impl AggregateValidators {
    pub(crate) fn insert(&mut self, kind: DataKind, name: String, validator: Validator) {
        match kind {
            DataKind::Command => self.commands.insert(name, validator),
            DataKind::Event => self.events.insert(name, validator),
        };
    }
}

/// Compiled validators for the envelopes and every registered command's and event's data;
/// a [`crate::Registry`] holds one (see [`crate::Registry::schemas`]).
///
/// Validating is `&self` and thread-safe.
#[derive(Debug)]
pub struct SchemaSet {
    envelopes: &'static Envelopes,
    data: BTreeMap<String, AggregateValidators>,
}

impl Default for SchemaSet {
    fn default() -> Self {
        Self {
            envelopes: envelopes(),
            data: BTreeMap::new(),
        }
    }
}

impl SchemaSet {
    pub(crate) fn insert(&mut self, aggregate_type: &str, validators: AggregateValidators) {
        self.data.insert(aggregate_type.to_owned(), validators);
    }

    /// Checks a command's CloudEvents envelope (not its `data`; see
    /// [`SchemaSet::validate_command_data`]).
    pub fn validate_command_envelope(&self, envelope: &Value) -> Result<(), SchemaError> {
        check(&self.envelopes.command, envelope)
    }

    /// Checks an event's CloudEvents envelope (not its `data`).
    pub fn validate_event_envelope(&self, envelope: &Value) -> Result<(), SchemaError> {
        check(&self.envelopes.event, envelope)
    }

    /// Checks the `data` of command `<aggregate_type>.<command_name>`.
    ///
    /// Returns [`SchemaError::UnknownType`] if no such command exists.
    pub fn validate_command_data(
        &self,
        aggregate_type: &str,
        command_name: &str,
        data: &Value,
    ) -> Result<(), SchemaError> {
        self.validate_data(DataKind::Command, aggregate_type, command_name, data)
    }

    /// Checks the `data` of event `<aggregate_type>.<event_name>`.
    ///
    /// Returns [`SchemaError::UnknownType`] if no such event exists.
    pub fn validate_event_data(
        &self,
        aggregate_type: &str,
        event_name: &str,
        data: &Value,
    ) -> Result<(), SchemaError> {
        self.validate_data(DataKind::Event, aggregate_type, event_name, data)
    }

    /// Whether a schema exists for the `kind` named `<aggregate_type>.<name>`.
    pub fn has_data_schema(&self, kind: DataKind, aggregate_type: &str, name: &str) -> bool {
        self.validator(kind, aggregate_type, name).is_some()
    }

    fn validator(&self, kind: DataKind, aggregate_type: &str, name: &str) -> Option<&Validator> {
        let aggregate = self.data.get(aggregate_type)?;
        match kind {
            DataKind::Command => aggregate.commands.get(name),
            DataKind::Event => aggregate.events.get(name),
        }
    }

    fn validate_data(
        &self,
        kind: DataKind,
        aggregate_type: &str,
        name: &str,
        data: &Value,
    ) -> Result<(), SchemaError> {
        match self.validator(kind, aggregate_type, name) {
            Some(validator) => check(validator, data),
            None => Err(SchemaError::UnknownType(format!("{aggregate_type}.{name}"))),
        }
    }
}

/// Compiles a schema's text as draft 2020-12, asserting `format`.
///
/// `format` is only an annotation by default in 2020-12; the processor asserts it so that,
/// say, `2026-02-30` fails as a schema error rather than later in the handler, and a
/// malformed `time` never reaches the events. The schemas add patterns where client
/// validators that do not assert formats should still catch the shape.
pub(crate) fn compile_data_schema(text: &str) -> Result<Validator, String> {
    let schema: Value = serde_json::from_str(text).map_err(|error| format!("not JSON: {error}"))?;
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .map_err(|error| format!("not a valid JSON Schema: {error}"))
}

/// Validates `instance`, turning failures into a short [`SchemaError::Invalid`].
fn check(validator: &Validator, instance: &Value) -> Result<(), SchemaError> {
    // `is_valid` is the fast path; errors are only collected for invalid documents.
    if validator.is_valid(instance) {
        return Ok(());
    }
    let mut message = String::new();
    let mut errors = validator.iter_errors(instance);
    for error in errors.by_ref().take(MAX_REPORTED_ERRORS) {
        if !message.is_empty() {
            message.push_str("; ");
        }
        let pointer = error.instance_path().as_str();
        let pointer = if pointer.is_empty() {
            "(root)"
        } else {
            pointer
        };
        // Writing to a `String` cannot fail.
        let _ = write!(message, "{pointer}: {}", error.masked());
    }
    if errors.next().is_some() {
        message.push_str("; and more");
    }
    Err(SchemaError::Invalid(truncate(message, MAX_MESSAGE_LEN)))
}

/// Cuts `text` to at most `max` bytes on a character boundary, marking the cut with `…`.
fn truncate(mut text: String, max: usize) -> String {
    const ELLIPSIS: char = '…';
    if text.len() <= max {
        return text;
    }
    let mut end = max - ELLIPSIS.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push(ELLIPSIS);
    text
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn schemas() -> SchemaSet {
        SchemaSet::default()
    }

    fn invalid(result: Result<(), SchemaError>) -> String {
        match result {
            Err(SchemaError::Invalid(message)) => message,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn envelopes_compile_declare_their_ids_and_accept_their_examples() {
        for (path, text) in [
            ("command.envelope.json", COMMAND_ENVELOPE),
            ("event.envelope.json", EVENT_ENVELOPE),
        ] {
            let schema: Value = serde_json::from_str(text).expect("JSON");
            assert_eq!(
                schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
                "{path}"
            );
            assert_eq!(schema["$id"], format!("https://cmdproc.dev/schemas/{path}"));
            let validator = compile_data_schema(text).expect("compiles");
            for example in schema["examples"].as_array().into_iter().flatten() {
                assert_eq!(check(&validator, example), Ok(()), "{path}");
            }
        }
    }

    #[test]
    fn unknown_data_types_are_unknown_not_invalid() {
        assert_eq!(
            schemas().validate_command_data("account", "Deposit", &json!({})),
            Err(SchemaError::UnknownType("account.Deposit".into()))
        );
    }

    fn command_envelope() -> Value {
        json!({
            "specversion": "1.0",
            "id": "c-1",
            "source": "/checkout",
            "type": "account.Deposit",
            "subject": "acc-42",
            "datacontenttype": "application/json",
            "expectedversion": 0,
            "correlationid": "flow-7",
            "time": "2026-01-15T10:00:00Z",
            "data": {"amount": 5},
            "traceparent": "extensions are allowed"
        })
    }

    #[test]
    fn command_envelope_accepts_a_full_and_a_minimal_command() {
        assert_eq!(
            schemas().validate_command_envelope(&command_envelope()),
            Ok(())
        );
        let minimal = json!({
            "specversion": "1.0",
            "id": "c-1",
            "source": "/checkout",
            "type": "room.Book",
            "subject": "room-42"
        });
        assert_eq!(schemas().validate_command_envelope(&minimal), Ok(()));
    }

    #[test]
    fn command_envelope_rejects_malformed_attributes() {
        let cases = [
            ("specversion", json!("0.3"), "/specversion"),
            ("specversion", json!(1.0), "/specversion"),
            ("id", json!(""), "/id"),
            ("source", json!(""), "/source"),
            ("source", json!("not a uri"), "/source"),
            ("subject", json!(""), "/subject"),
            ("type", json!("Account.Deposit"), "/type"),
            ("type", json!("account.deposit"), "/type"),
            ("type", json!("account"), "/type"),
            ("type", json!("account.Deposit.v2"), "/type"),
            ("expectedversion", json!(-1), "/expectedversion"),
            ("expectedversion", json!("3"), "/expectedversion"),
            ("time", json!("yesterday"), "/time"),
            ("correlationid", json!(7), "/correlationid"),
            ("datacontenttype", json!("text/plain"), "/datacontenttype"),
        ];
        for (attribute, value, pointer) in cases {
            let mut envelope = command_envelope();
            envelope[attribute] = value.clone();
            let message = invalid(schemas().validate_command_envelope(&envelope));
            assert!(
                message.starts_with(&format!("{pointer}: ")),
                "{attribute}={value}: {message}"
            );
        }
        for required in ["specversion", "id", "source", "type", "subject"] {
            let mut envelope = command_envelope();
            envelope.as_object_mut().expect("object").remove(required);
            let message = invalid(schemas().validate_command_envelope(&envelope));
            assert!(
                message.starts_with("(root): ") && message.contains(required),
                "{message}"
            );
        }
        invalid(schemas().validate_command_envelope(&json!("not an object")));
    }

    #[test]
    fn messages_are_short_and_do_not_echo_values() {
        let secret = "s3cret-value-".repeat(50);
        let envelope = json!({
            "specversion": secret,
            "id": "",
            "source": "",
            "type": secret,
            "subject": "",
            "expectedversion": -1
        });
        let message = invalid(schemas().validate_command_envelope(&envelope));
        assert!(message.len() <= MAX_MESSAGE_LEN, "{}", message.len());
        assert!(!message.contains("s3cret"), "{message}");
        assert!(
            message.ends_with("and more") || message.ends_with('…'),
            "{message}"
        );
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let text = "é".repeat(400);
        let cut = truncate(text, 301);
        assert!(cut.len() <= 301);
        assert!(cut.ends_with('…'));
        assert_eq!(truncate("short".into(), 10), "short");
    }

    #[test]
    fn event_envelope_accepts_an_event_and_rejects_bad_extensions() {
        let event = json!({
            "specversion": "1.0",
            "id": "3b241101-e2bb-5255-8caf-4136c566a962",
            "source": "/cmdproc",
            "type": "account.Deposited",
            "subject": "acc-42",
            "time": "2026-01-15T10:00:00Z",
            "datacontenttype": "application/json",
            "data": {"amount": 5, "balance": 5},
            "aggregateversion": 2,
            "commandid": "c-1",
            "correlationid": "flow-7",
            "sequence": 0
        });
        assert_eq!(schemas().validate_event_envelope(&event), Ok(()));
        for (attribute, value) in [
            ("id", json!("not-a-uuid")),
            ("aggregateversion", json!(0)),
            ("sequence", json!(-1)),
            ("commandid", json!("")),
        ] {
            let mut bad = event.clone();
            bad[attribute] = value;
            invalid(schemas().validate_event_envelope(&bad));
        }
        for required in ["data", "aggregateversion", "commandid", "sequence"] {
            let mut bad = event.clone();
            bad.as_object_mut().expect("object").remove(required);
            invalid(schemas().validate_event_envelope(&bad));
        }
    }
}
