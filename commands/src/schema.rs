//! The JSON Schemas of the wire contract, embedded and compiled once.
//!
//! The files in `schemas/` are the contract other-language clients validate against, so the
//! processor validates with the very same files: they are compiled into the binary with
//! `include_str!`, which also means a deployed processor cannot drift from the schemas it
//! was built with.

use std::collections::BTreeMap;
use std::fmt::Write as _;
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
    /// `schemas/<aggregate>/commands/<Name>.json`.
    Command,
    /// `schemas/<aggregate>/events/<Name>.json`.
    Event,
}

/// One schema file compiled into the crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddedSchema {
    /// Path relative to `schemas/`, e.g. `account/commands/Deposit.json`.
    pub path: &'static str,
    /// The file's text, exactly as in the repository.
    pub source: &'static str,
}

/// Declares the embedded data schemas once, so that the path and `include_str!` argument
/// cannot disagree.
macro_rules! data_schemas {
    ($(($aggregate:literal, $kind:ident, $dir:literal, $name:literal)),* $(,)?) => {
        &[$((
            $aggregate,
            DataKind::$kind,
            $name,
            EmbeddedSchema {
                path: concat!($aggregate, "/", $dir, "/", $name, ".json"),
                source: include_str!(concat!(
                    "../../schemas/", $aggregate, "/", $dir, "/", $name, ".json"
                )),
            },
        )),*]
    };
}

/// `(aggregate type, kind, name, file)` of every data schema.
const DATA_SCHEMAS: &[(&str, DataKind, &str, EmbeddedSchema)] = data_schemas![
    ("account", Command, "commands", "Open"),
    ("account", Command, "commands", "Deposit"),
    ("account", Command, "commands", "Withdraw"),
    ("account", Event, "events", "Opened"),
    ("account", Event, "events", "Deposited"),
    ("account", Event, "events", "Withdrawn"),
    ("room", Command, "commands", "Book"),
    ("room", Command, "commands", "Cancel"),
    ("room", Event, "events", "Booked"),
    ("room", Event, "events", "Cancelled"),
];

const COMMAND_ENVELOPE: EmbeddedSchema = EmbeddedSchema {
    path: "command.envelope.json",
    source: include_str!("../../schemas/command.envelope.json"),
};

const EVENT_ENVELOPE: EmbeddedSchema = EmbeddedSchema {
    path: "event.envelope.json",
    source: include_str!("../../schemas/event.envelope.json"),
};

/// Compiled validators for the envelopes and every command's and event's data.
///
/// Compiling is the expensive part, so use the shared [`Schemas::builtin`] rather than
/// building one per message; validating is `&self` and thread-safe.
#[derive(Debug)]
pub struct Schemas {
    command_envelope: Validator,
    event_envelope: Validator,
    data: BTreeMap<(DataKind, &'static str, &'static str), Validator>,
}

impl Schemas {
    /// The schemas of `schemas/`, compiled on first use and shared by every caller.
    ///
    /// # Panics
    ///
    /// If an embedded schema does not compile. They are fixed at build time and the unit
    /// tests compile them all, so this cannot happen in a tested build.
    pub fn builtin() -> &'static Schemas {
        static SCHEMAS: OnceLock<Schemas> = OnceLock::new();
        SCHEMAS.get_or_init(|| match Self::compile() {
            Ok(schemas) => schemas,
            Err(error) => panic!("embedded schema does not compile: {error}"),
        })
    }

    /// Every embedded schema file: the envelopes, then the data schemas. For tools that
    /// publish or print the contract.
    pub fn embedded() -> impl Iterator<Item = EmbeddedSchema> {
        [COMMAND_ENVELOPE, EVENT_ENVELOPE]
            .into_iter()
            .chain(DATA_SCHEMAS.iter().map(|(.., file)| *file))
    }

    fn compile() -> Result<Self, String> {
        let mut data = BTreeMap::new();
        for (aggregate, kind, name, file) in DATA_SCHEMAS {
            data.insert((*kind, *aggregate, *name), compile(file)?);
        }
        Ok(Self {
            command_envelope: compile(&COMMAND_ENVELOPE)?,
            event_envelope: compile(&EVENT_ENVELOPE)?,
            data,
        })
    }

    /// Checks a command's CloudEvents envelope (not its `data`; see
    /// [`Schemas::validate_command_data`]).
    pub fn validate_command_envelope(&self, envelope: &Value) -> Result<(), SchemaError> {
        check(&self.command_envelope, envelope)
    }

    /// Checks an event's CloudEvents envelope (not its `data`).
    pub fn validate_event_envelope(&self, envelope: &Value) -> Result<(), SchemaError> {
        check(&self.event_envelope, envelope)
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
        self.data.contains_key(&(kind, aggregate_type, name))
    }

    fn validate_data(
        &self,
        kind: DataKind,
        aggregate_type: &str,
        name: &str,
        data: &Value,
    ) -> Result<(), SchemaError> {
        match self.data.get(&(kind, aggregate_type, name)) {
            Some(validator) => check(validator, data),
            None => Err(SchemaError::UnknownType(format!("{aggregate_type}.{name}"))),
        }
    }
}

/// Compiles one embedded file as draft 2020-12, asserting `format`.
///
/// `format` is only an annotation by default in 2020-12; the processor asserts it so that,
/// say, `2026-02-30` fails as a schema error rather than later in the handler, and a
/// malformed `time` never reaches the events. The schemas add patterns where client
/// validators that do not assert formats should still catch the shape.
fn compile(file: &EmbeddedSchema) -> Result<Validator, String> {
    let schema: Value = serde_json::from_str(file.source)
        .map_err(|error| format!("{}: not JSON: {error}", file.path))?;
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .map_err(|error| format!("{}: {error}", file.path))
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
    use crate::aggregate::DomainEvent;
    use crate::domain::Registry;

    fn schemas() -> &'static Schemas {
        Schemas::builtin()
    }

    fn invalid(result: Result<(), SchemaError>) -> String {
        match result {
            Err(SchemaError::Invalid(message)) => message,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn every_embedded_schema_compiles_and_declares_its_id() {
        let mut count = 0;
        for file in Schemas::embedded() {
            let schema: Value = serde_json::from_str(file.source).expect("JSON");
            assert_eq!(
                schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
                "{}",
                file.path
            );
            assert_eq!(
                schema["$id"],
                format!("https://cmdproc.dev/schemas/{}", file.path),
                "{}",
                file.path
            );
            compile(&file).expect("compiles");
            count += 1;
        }
        assert_eq!(count, 12);
        // Forces the shared instance too.
        let _ = schemas();
    }

    #[test]
    fn schemas_cover_exactly_the_registered_commands_and_events() {
        let registry = Registry::builtin();
        let mut expected = Vec::new();
        for aggregate_type in registry.types() {
            for name in registry.command_names(aggregate_type).expect("registered") {
                expected.push((DataKind::Command, aggregate_type.to_owned(), *name));
            }
            for name in registry.event_names(aggregate_type).expect("registered") {
                expected.push((DataKind::Event, aggregate_type.to_owned(), *name));
            }
        }
        expected.sort();
        let mut actual: Vec<_> = schemas()
            .data
            .keys()
            .map(|(kind, aggregate, name)| (*kind, (*aggregate).to_owned(), *name))
            .collect();
        actual.sort();
        assert_eq!(actual, expected);
    }

    #[test]
    fn each_schema_accepts_its_own_examples() {
        for file in Schemas::embedded() {
            let schema: Value = serde_json::from_str(file.source).expect("JSON");
            let validator = compile(&file).expect("compiles");
            let examples = schema["examples"].as_array().expect("examples");
            assert!(!examples.is_empty(), "{}", file.path);
            for example in examples {
                assert_eq!(check(&validator, example), Ok(()), "{}", file.path);
            }
        }
    }

    /// `(aggregate, command, a valid payload, the field to tamper with)`.
    const COMMAND_CASES: &[(&str, &str, &str, &str)] = &[
        ("account", "Open", r#"{"owner": "alice"}"#, "owner"),
        ("account", "Deposit", r#"{"amount": 1}"#, "amount"),
        (
            "account",
            "Withdraw",
            r#"{"amount": 1000000000000}"#,
            "amount",
        ),
        (
            "room",
            "Book",
            r#"{"night": "2026-12-24", "guest": "alice"}"#,
            "night",
        ),
        ("room", "Cancel", r#"{"night": "2026-12-24"}"#, "night"),
    ];

    #[test]
    fn command_schemas_accept_valid_and_reject_malformed_data() {
        for &(aggregate, command, valid, field) in COMMAND_CASES {
            let valid: Value = serde_json::from_str(valid).expect("JSON");
            let validate = |data: &Value| schemas().validate_command_data(aggregate, command, data);
            assert_eq!(validate(&valid), Ok(()), "{aggregate}.{command}");

            let mut missing = valid.clone();
            missing.as_object_mut().expect("object").remove(field);
            let message = invalid(validate(&missing));
            assert!(message.contains("required"), "{message}");

            let mut wrong_type = valid.clone();
            wrong_type[field] = json!(true);
            let message = invalid(validate(&wrong_type));
            assert!(message.contains(&format!("/{field}")), "{message}");

            let mut extra = valid.clone();
            extra["note"] = json!("hi");
            let message = invalid(validate(&extra));
            assert!(message.contains("note"), "{message}");

            invalid(validate(&json!(null)));
            invalid(validate(&json!([valid])));
        }
    }

    #[test]
    fn amounts_must_be_positive_and_bounded() {
        for command in ["Deposit", "Withdraw"] {
            for amount in [
                json!(0),
                json!(-1),
                json!(1_000_000_000_001_i64),
                json!(1.5),
            ] {
                let message = invalid(schemas().validate_command_data(
                    "account",
                    command,
                    &json!({ "amount": amount }),
                ));
                assert!(message.starts_with("/amount: "), "{message}");
            }
        }
    }

    #[test]
    fn names_must_be_non_empty_and_bounded() {
        let validate = |owner: Value| {
            schemas().validate_command_data("account", "Open", &json!({ "owner": owner }))
        };
        invalid(validate(json!("")));
        invalid(validate(json!("x".repeat(201))));
        assert_eq!(validate(json!("x".repeat(200))), Ok(()));
    }

    #[test]
    fn nights_must_be_real_iso_dates() {
        for night in [
            "2026-02-30",
            "24.12.2026",
            "2026-12-24T00:00:00Z",
            "20261224",
        ] {
            let message = invalid(schemas().validate_command_data(
                "room",
                "Cancel",
                &json!({ "night": night }),
            ));
            assert!(message.starts_with("/night: "), "{night}: {message}");
        }
    }

    #[test]
    fn unknown_types_are_distinct_from_invalid_data() {
        let data = json!({"amount": 5});
        assert_eq!(
            schemas().validate_command_data("account", "Close", &data),
            Err(SchemaError::UnknownType("account.Close".into()))
        );
        assert_eq!(
            schemas().validate_command_data("order", "Deposit", &data),
            Err(SchemaError::UnknownType("order.Deposit".into()))
        );
        // An event name is not a command name.
        assert_eq!(
            schemas().validate_command_data("account", "Deposited", &data),
            Err(SchemaError::UnknownType("account.Deposited".into()))
        );
        assert_eq!(
            schemas().validate_event_data("account", "Deposit", &data),
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

    /// A small deterministic generator, so the property test needs no extra dependency.
    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        *seed >> 33
    }

    /// A schema-valid command for `aggregate_type`, drawn from a small space so that
    /// sequences hit both accepted and rejected paths.
    fn random_command(aggregate_type: &str, seed: &mut u64) -> (&'static str, Value) {
        let pick = lcg(seed);
        match aggregate_type {
            "account" => match pick % 6 {
                0 => ("Open", json!({"owner": format!("owner-{}", pick % 3)})),
                1 | 2 => ("Deposit", json!({"amount": 1 + pick % 1000})),
                3 => ("Deposit", json!({"amount": 1_000_000_000_000_u64})),
                _ => ("Withdraw", json!({"amount": 1 + pick % 1500})),
            },
            "room" => {
                let night = format!("2026-12-{:02}", 20 + pick % 5);
                if pick % 3 == 0 {
                    ("Cancel", json!({ "night": night }))
                } else {
                    (
                        "Book",
                        json!({"night": night, "guest": format!("guest-{}", pick % 4)}),
                    )
                }
            }
            other => panic!("no generator for {other}"),
        }
    }

    #[test]
    fn every_event_the_handlers_emit_matches_its_schema() {
        let registry = Registry::builtin();
        for aggregate_type in registry.types() {
            let aggregate = registry.get(aggregate_type).expect("registered");
            let mut seen = std::collections::BTreeSet::new();
            for seed in 0..100 {
                let mut seed = seed;
                let mut state = Value::Null;
                for _ in 0..40 {
                    let (name, data) = random_command(aggregate_type, &mut seed);
                    assert_eq!(
                        schemas().validate_command_data(aggregate_type, name, &data),
                        Ok(()),
                        "generator made an invalid {aggregate_type}.{name}: {data}"
                    );
                    let outcome = aggregate.handle(&state, name, &data).expect("well-formed");
                    let Ok(events) = outcome else { continue };
                    for DomainEvent { name, data } in &events {
                        assert_eq!(
                            schemas().validate_event_data(aggregate_type, name, data),
                            Ok(()),
                            "{aggregate_type}.{name}: {data}"
                        );
                        seen.insert(name.clone());
                    }
                    state = aggregate.apply(&state, &events);
                }
            }
            let all: std::collections::BTreeSet<String> = registry
                .event_names(aggregate_type)
                .expect("registered")
                .iter()
                .map(|name| (*name).to_owned())
                .collect();
            assert_eq!(seen, all, "{aggregate_type}: not every event was exercised");
        }
    }
}
