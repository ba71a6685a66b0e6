//! The example domains' contract: schemas, handlers and registry agree.

use bank::{registry, ACCOUNT_SCHEMAS, ROOM_SCHEMAS};
use commands::{Context, DomainEvent, Handled, Registry, SchemaError, SchemaSet};
use serde_json::{json, Value};
use std::sync::OnceLock;

fn shared() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let registry = registry();
        registry.check().expect("the example contract holds");
        registry
    })
}

fn schemas() -> &'static SchemaSet {
    shared().schemas()
}

fn invalid(result: Result<(), SchemaError>) -> String {
    match result {
        Err(SchemaError::Invalid(message)) => message,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn every_file() -> impl Iterator<Item = (String, &'static str)> {
    ACCOUNT_SCHEMAS
        .iter()
        .map(|(path, text)| (format!("account/{path}"), *text))
        .chain(
            ROOM_SCHEMAS
                .iter()
                .map(|(path, text)| (format!("room/{path}"), *text)),
        )
}

#[test]
fn every_schema_declares_its_id_and_accepts_its_own_examples() {
    let mut count = 0;
    for (path, text) in every_file() {
        let schema: Value = serde_json::from_str(text).expect("JSON");
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{path}"
        );
        assert_eq!(schema["$id"], format!("https://cmdproc.dev/schemas/{path}"));
        let (aggregate, rest) = path.split_once('/').expect("aggregate/");
        let (folder, file) = rest.split_once('/').expect("kind/");
        let name = file.trim_end_matches(".json");
        let examples = schema["examples"].as_array().expect("examples");
        assert!(!examples.is_empty(), "{path}");
        for example in examples {
            let result = match folder {
                "commands" => schemas().validate_command_data(aggregate, name, example),
                _ => schemas().validate_event_data(aggregate, name, example),
            };
            assert_eq!(result, Ok(()), "{path}");
        }
        count += 1;
    }
    assert_eq!(count, 10);
}

#[test]
fn registry_lists_the_example_domains_and_their_names() {
    let registry = shared();
    assert_eq!(registry.types().collect::<Vec<_>>(), ["account", "room"]);
    assert_eq!(
        registry.command_names("account").expect("registered"),
        ["Open", "Deposit", "Withdraw"]
    );
    assert_eq!(
        registry.event_names("room").expect("registered"),
        ["Booked", "Cancelled"]
    );
    assert!(registry.get("order").is_none());
}

#[test]
fn json_round_trip_through_stored_state_and_rejection_codes() {
    let account = shared().get("account").expect("registered");
    let id = commands::CommandId::parse("c-1").expect("id");
    let source = commands::Source::parse("/test").expect("source");
    let context = Context::new(&id, &source, 0);
    let mut state = Value::Null;
    for (name, data) in [
        ("Open", json!({"owner": "alice"})),
        ("Deposit", json!({"amount": 100})),
        ("Withdraw", json!({"amount": 30})),
    ] {
        let Handled::Accepted(decision) = account.handle(&state, name, &data, &context) else {
            panic!("{name} not accepted");
        };
        // The engine stores JSON text; go through it to catch anything lossy.
        let stored = serde_json::to_string(&account.apply(&state, &decision.events)).expect("json");
        state = serde_json::from_str(&stored).expect("json");
    }
    assert_eq!(
        state,
        json!({"opened": true, "owner": "alice", "balance": 70})
    );
    match account.handle(&state, "Withdraw", &json!({"amount": 71}), &context) {
        Handled::Rejected(rejection) => {
            assert_eq!(rejection.code, "insufficient_funds");
            assert_eq!(
                rejection.reason,
                "insufficient funds: balance 70, withdrawal 71"
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(matches!(
        account.handle(&state, "Close", &json!({}), &context),
        Handled::Invalid(commands::CommandError::UnknownCommand(_))
    ));
    assert!(matches!(
        account.handle(&state, "Deposit", &json!({"amount": "5"}), &context),
        Handled::Invalid(commands::CommandError::InvalidData(_))
    ));
}

#[test]
#[should_panic(expected = "stored account state does not deserialize")]
fn corrupt_stored_state_panics_rather_than_blaming_the_command() {
    let account = shared().get("account").expect("registered");
    let id = commands::CommandId::parse("c-1").expect("id");
    let source = commands::Source::parse("/test").expect("source");
    let _ = account.handle(
        &json!({"balance": "lots"}),
        "Deposit",
        &json!({"amount": 1}),
        &Context::new(&id, &source, 0),
    );
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
        let message =
            invalid(schemas().validate_command_data("room", "Cancel", &json!({ "night": night })));
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
    let registry = shared();
    let id = commands::CommandId::parse("c-1").expect("id");
    let source = commands::Source::parse("/test").expect("source");
    let context = Context::new(&id, &source, 0);
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
                let events = match aggregate.handle(&state, name, &data, &context) {
                    Handled::Accepted(decision) => decision.events,
                    Handled::Rejected(_) => continue,
                    Handled::Invalid(error) => panic!("{aggregate_type}.{name}: {error}"),
                };
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
            .cloned()
            .collect();
        assert_eq!(seen, all, "{aggregate_type}: not every event was exercised");
    }
}
