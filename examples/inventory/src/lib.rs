//! `inventory`: stock per SKU, held for orders, never oversold.
//!
//! An example of a domain crate as a user of cmdproc writes one, against the public API of
//! [`commands`] only: one aggregate, its JSON Schemas (embedded in the binary at build time),
//! a [`registry`] that the `inventory` binary hands to `processor::cli::main`, and
//! given/when/then tests that need no broker and no database.
//!
//! Each SKU is one aggregate (type `inventory`, aggregate id = the SKU, e.g. `sku-42`), so
//! all of its commands land on one partition and are applied by one worker, in order. That
//! is what keeps the invariant without locks: two orders racing for the last unit are
//! serialized, and the second one sees the first one's reservation and is rejected with
//! `insufficient_stock` instead of overselling.
//!
//! | command | data | events | rejections |
//! |---|---|---|---|
//! | `inventory.Receive` | `{"qty": 40}` | `Received` | `invalid_quantity`, `overflow` |
//! | `inventory.Reserve` | `{"order": "ord-1", "qty": 3}` | `Reserved` | `invalid_quantity`, `invalid_order`, `already_reserved`, `insufficient_stock` |
//! | `inventory.Release` | `{"order": "ord-1"}` | `Released` | `invalid_order`, `not_reserved`, `overflow` |
//!
//! ```
//! use commands::testing::given;
//! use inventory::{InventoryCommand as C, InventoryEvent as E, Inventory};
//!
//! given::<Inventory>([E::Received { qty: 5, available: 5 }])
//!     .when(C::Reserve { order: "ord-1".into(), qty: 6 })
//!     .then_reject("insufficient_stock");
//! ```
//!
//! # Running it
//!
//! The `inventory` binary is `cmdproc` with this registry: every subcommand and flag of
//! `cmdproc`, and only the `inventory` aggregate.
//!
//! ```sh
//! cargo build -p inventory                      # target/debug/inventory
//! inventory migrate && inventory topics create --partitions 6
//! inventory run &
//! inventory produce --type inventory.Receive --subject sku-42 --data '{"qty": 40}'
//! inventory produce --type inventory.Reserve --subject sku-42 --data '{"order": "ord-1", "qty": 3}'
//! inventory inspect inventory sku-42
//! ```

#![warn(missing_docs)]

use std::collections::BTreeMap;

use commands::{Aggregate, Context, Decision, Registry, Rejection, Schemas};
use serde::{Deserialize, Serialize};

/// The most characters an order id may have (the schemas' `maxLength`).
pub const MAX_ORDER_CHARS: usize = 200;

/// The schema files, embedded at build time so that the binary works from any working
/// directory: `(path under schemas/, text)`, the layout [`Schemas::embedded`] expects.
pub const SCHEMA_FILES: &[(&str, &str)] = &[
    (
        "commands/Receive.json",
        include_str!("../schemas/commands/Receive.json"),
    ),
    (
        "commands/Reserve.json",
        include_str!("../schemas/commands/Reserve.json"),
    ),
    (
        "commands/Release.json",
        include_str!("../schemas/commands/Release.json"),
    ),
    (
        "events/Received.json",
        include_str!("../schemas/events/Received.json"),
    ),
    (
        "events/Reserved.json",
        include_str!("../schemas/events/Reserved.json"),
    ),
    (
        "events/Released.json",
        include_str!("../schemas/events/Released.json"),
    ),
];

/// The schemas of [`Inventory`], as embedded in this crate.
pub fn schemas() -> Schemas {
    Schemas::embedded("examples/inventory/schemas", SCHEMA_FILES)
}

/// The registry of this processor: [`Inventory`] with its embedded schemas.
///
/// The `inventory` binary hands it to `processor::cli::main`, which checks it before
/// running any subcommand.
pub fn registry() -> Registry {
    Registry::new().with::<Inventory>(schemas())
}

/// The inventory aggregate of one SKU (type `inventory`; the aggregate id is the SKU).
#[derive(Debug, Clone, Copy, Default)]
pub struct Inventory;

/// What a SKU accepts. Quantities are whole units, at least 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Mirrors `additionalProperties: false` in the schemas, so the handler is as strict as the
// contract even when called without schema validation.
#[serde(deny_unknown_fields)]
pub enum InventoryCommand {
    /// Stock arrives: `qty` units become available.
    Receive {
        /// Units received, at least 1.
        qty: u64,
    },
    /// Holds `qty` units for `order` out of the available stock. An order holds stock of a
    /// SKU at most once: to change the quantity, release and reserve again.
    Reserve {
        /// The order to hold the stock for.
        order: String,
        /// Units to hold, at least 1.
        qty: u64,
    },
    /// Gives everything `order` holds back to the available stock.
    Release {
        /// The order whose hold is given back.
        order: String,
    },
}

/// What happened to a SKU. Each event carries the available count after it, so a consumer
/// of the events topic needs no running total of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InventoryEvent {
    /// Stock arrived.
    Received {
        /// Units received.
        qty: u64,
        /// Units available after the event.
        available: u64,
    },
    /// Units were held for an order.
    Reserved {
        /// The order they are held for.
        order: String,
        /// Units held.
        qty: u64,
        /// Units available after the event.
        available: u64,
    },
    /// An order's hold was given back.
    Released {
        /// The order whose hold was given back.
        order: String,
        /// Units given back: all the order held.
        qty: u64,
        /// Units available after the event.
        available: u64,
    },
}

/// A SKU's state; the default is a SKU with no stock and no holds.
///
/// `held` is a `BTreeMap`, so the state's JSON (stored as JSONB and compared by
/// `cmdproc verify`) does not depend on hashing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryState {
    /// Units not held for any order. Never negative: a `u64` the handler only lowers with
    /// checked arithmetic, after checking the reservation fits.
    pub available: u64,
    /// Units held per order (order id -> units, each at least 1).
    pub held: BTreeMap<String, u64>,
}

impl InventoryState {
    /// Units held for all orders together (saturating: a count this large is not real).
    pub fn total_held(&self) -> u64 {
        self.held
            .values()
            .fold(0u64, |sum, qty| sum.saturating_add(*qty))
    }
}

impl Aggregate for Inventory {
    const TYPE: &'static str = "inventory";
    type State = InventoryState;
    type Command = InventoryCommand;
    type Event = InventoryEvent;

    fn handle(
        state: &InventoryState,
        command: &InventoryCommand,
        _context: &Context<'_>,
    ) -> Result<Decision<InventoryEvent>, Rejection> {
        match command {
            InventoryCommand::Receive { qty } => {
                let qty = positive(*qty)?;
                let available = state.available.checked_add(qty).ok_or_else(|| {
                    Rejection::new(
                        "overflow",
                        format!(
                            "receiving {qty} would overflow the available count {}",
                            state.available
                        ),
                    )
                })?;
                Ok(Decision::event(InventoryEvent::Received { qty, available }))
            }
            InventoryCommand::Reserve { order, qty } => {
                let qty = positive(*qty)?;
                valid_order(order)?;
                if let Some(held) = state.held.get(order) {
                    return Err(Rejection::new(
                        "already_reserved",
                        format!("order {order} already holds {held}; release it first"),
                    ));
                }
                let available = state.available.checked_sub(qty).ok_or_else(|| {
                    Rejection::new(
                        "insufficient_stock",
                        format!(
                            "insufficient stock: {} available, {qty} requested by order {order}",
                            state.available
                        ),
                    )
                })?;
                Ok(Decision::event(InventoryEvent::Reserved {
                    order: order.clone(),
                    qty,
                    available,
                }))
            }
            InventoryCommand::Release { order } => {
                valid_order(order)?;
                let Some(&qty) = state.held.get(order) else {
                    return Err(Rejection::new(
                        "not_reserved",
                        format!("order {order} holds nothing of this SKU"),
                    ));
                };
                // Units held were available once, but stock received since may have filled
                // the count up: checked, like every addition.
                let available = state.available.checked_add(qty).ok_or_else(|| {
                    Rejection::new(
                        "overflow",
                        format!(
                            "releasing {qty} would overflow the available count {}",
                            state.available
                        ),
                    )
                })?;
                Ok(Decision::event(InventoryEvent::Released {
                    order: order.clone(),
                    qty,
                    available,
                }))
            }
        }
    }

    fn apply(state: &mut InventoryState, event: &InventoryEvent) {
        // The available count is taken from the event rather than recomputed, which keeps
        // `apply` total (no arithmetic that could overflow) and the event the single source
        // of truth.
        match event {
            InventoryEvent::Received { available, .. } => state.available = *available,
            InventoryEvent::Reserved {
                order,
                qty,
                available,
            } => {
                state.available = *available;
                state.held.insert(order.clone(), *qty);
            }
            InventoryEvent::Released {
                order, available, ..
            } => {
                state.available = *available;
                state.held.remove(order);
            }
        }
    }
}

/// Checks a quantity is at least 1. The schemas demand it already; the handler defends
/// anyway, because it must hold its invariants for callers that skip validation.
fn positive(qty: u64) -> Result<u64, Rejection> {
    if qty == 0 {
        return Err(Rejection::new(
            "invalid_quantity",
            "quantity must be at least 1",
        ));
    }
    Ok(qty)
}

/// Checks an order id has 1 to [`MAX_ORDER_CHARS`] characters, as the schemas demand.
fn valid_order(order: &str) -> Result<(), Rejection> {
    let chars = order.chars().count();
    if chars == 0 || chars > MAX_ORDER_CHARS {
        return Err(Rejection::new(
            "invalid_order",
            format!("an order id has 1 to {MAX_ORDER_CHARS} characters, not {chars}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use commands::testing::given;
    use commands::{CommandId, Handled, Source};
    use serde_json::{json, Value};

    use InventoryCommand as C;
    use InventoryEvent as E;

    fn receive(qty: u64) -> C {
        C::Receive { qty }
    }

    fn reserve(order: &str, qty: u64) -> C {
        C::Reserve {
            order: order.into(),
            qty,
        }
    }

    fn release(order: &str) -> C {
        C::Release {
            order: order.into(),
        }
    }

    fn received(qty: u64, available: u64) -> E {
        E::Received { qty, available }
    }

    fn reserved(order: &str, qty: u64, available: u64) -> E {
        E::Reserved {
            order: order.into(),
            qty,
            available,
        }
    }

    fn released(order: &str, qty: u64, available: u64) -> E {
        E::Released {
            order: order.into(),
            qty,
            available,
        }
    }

    /// `(name, data)` of an event or command in serde's externally tagged form.
    fn split<T: Serialize>(value: &T) -> (String, Value) {
        match serde_json::to_value(value).unwrap() {
            Value::Object(map) if map.len() == 1 => map.into_iter().next().unwrap(),
            other => panic!("not an externally tagged variant: {other}"),
        }
    }

    /// Handles `command` against `state` with a fixed context and applies what it decided.
    fn step(state: &mut InventoryState, command: &C) -> Result<Vec<E>, Rejection> {
        let id = CommandId::parse("c-1").unwrap();
        let source = Source::parse("/test").unwrap();
        let decision = Inventory::handle(state, command, &Context::new(&id, &source, 0))?;
        for event in &decision.events {
            Inventory::apply(state, event);
        }
        Ok(decision.events)
    }

    #[test]
    fn receive_adds_to_available() {
        given::<Inventory>([])
            .when(receive(40))
            .then_expect([received(40, 40)])
            .then_state(|s| {
                assert_eq!(s.available, 40);
                assert!(s.held.is_empty());
            });
        given::<Inventory>([received(40, 40)])
            .when(receive(2))
            .then_expect([received(2, 42)]);
    }

    #[test]
    fn reserve_holds_stock_for_an_order() {
        given::<Inventory>([received(10, 10)])
            .when(reserve("ord-1", 3))
            .then_expect([reserved("ord-1", 3, 7)])
            .then_state(|s| {
                assert_eq!(s.available, 7);
                assert_eq!(s.held, BTreeMap::from([("ord-1".to_owned(), 3)]));
            });
        // All of it, exactly.
        given::<Inventory>([received(10, 10)])
            .when(reserve("ord-1", 10))
            .then_expect([reserved("ord-1", 10, 0)]);
    }

    #[test]
    fn release_gives_the_hold_back() {
        given::<Inventory>([received(10, 10), reserved("ord-1", 3, 7)])
            .when(release("ord-1"))
            .then_expect([released("ord-1", 3, 10)])
            .then_state(|s| {
                assert_eq!(s.available, 10);
                assert!(s.held.is_empty());
            });
        // A released order may reserve again.
        given::<Inventory>([
            received(10, 10),
            reserved("ord-1", 3, 7),
            released("ord-1", 3, 10),
        ])
        .when(reserve("ord-1", 4))
        .then_expect([reserved("ord-1", 4, 6)]);
    }

    #[test]
    fn reserving_more_than_available_is_rejected() {
        given::<Inventory>([])
            .when(reserve("ord-1", 1))
            .then_reject("insufficient_stock");
        given::<Inventory>([received(10, 10), reserved("ord-1", 8, 2)])
            .when(reserve("ord-2", 3))
            .then_reject("insufficient_stock")
            .then_state(|s| {
                assert_eq!(s.available, 2);
                assert_eq!(s.held.len(), 1);
            });
    }

    #[test]
    fn a_second_reservation_for_an_order_is_rejected() {
        given::<Inventory>([received(10, 10), reserved("ord-1", 3, 7)])
            .when(reserve("ord-1", 1))
            .then_reject("already_reserved")
            .then_state(|s| assert_eq!(s.held["ord-1"], 3));
    }

    #[test]
    fn releasing_an_order_without_a_hold_is_rejected() {
        given::<Inventory>([received(10, 10)])
            .when(release("ord-1"))
            .then_reject("not_reserved");
        given::<Inventory>([
            received(10, 10),
            reserved("ord-1", 3, 7),
            released("ord-1", 3, 10),
        ])
        .when(release("ord-1"))
        .then_reject("not_reserved");
    }

    #[test]
    fn zero_quantities_are_rejected() {
        given::<Inventory>([])
            .when(receive(0))
            .then_reject("invalid_quantity");
        given::<Inventory>([received(10, 10)])
            .when(reserve("ord-1", 0))
            .then_reject("invalid_quantity");
    }

    #[test]
    fn empty_or_long_order_ids_are_rejected() {
        given::<Inventory>([received(10, 10)])
            .when(reserve("", 1))
            .then_reject("invalid_order");
        let long = "x".repeat(MAX_ORDER_CHARS + 1);
        given::<Inventory>([received(10, 10)])
            .when(reserve(&long, 1))
            .then_reject("invalid_order");
        given::<Inventory>([received(10, 10)])
            .when(release(""))
            .then_reject("invalid_order");
        // The limit counts characters, as JSON Schema's maxLength does, not bytes.
        let accents = "é".repeat(MAX_ORDER_CHARS);
        given::<Inventory>([received(10, 10)])
            .when(reserve(&accents, 1))
            .then_expect([reserved(&accents, 1, 9)]);
    }

    #[test]
    fn counts_that_would_overflow_are_rejected() {
        given::<Inventory>([received(u64::MAX, u64::MAX)])
            .when(receive(1))
            .then_reject("overflow")
            .then_state(|s| assert_eq!(s.available, u64::MAX));
        // Held units come back to a count that stock received since filled up.
        given::<Inventory>([
            received(5, 5),
            reserved("ord-1", 5, 0),
            received(u64::MAX, u64::MAX),
        ])
        .when(release("ord-1"))
        .then_reject("overflow");
    }

    /// A deterministic pseudo-random sequence of commands (Knuth's MMIX LCG; no `rand`).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 33
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// `n` commands over 200 orders, with every kind of outcome: receipts, reservations
    /// that fit and that do not, duplicate reservations, releases with and without a hold.
    /// Receipts are rare and holds large, so the stock runs out again and again.
    fn commands(seed: u64, n: usize) -> Vec<C> {
        let mut rng = Lcg(seed);
        (0..n)
            .map(|_| {
                let order = format!("ord-{}", rng.below(200));
                match rng.below(100) {
                    0..=4 => receive(1 + rng.below(40)),
                    5..=69 => reserve(&order, 1 + rng.below(30)),
                    _ => release(&order),
                }
            })
            .collect()
    }

    #[test]
    fn available_never_goes_negative_and_stock_is_conserved() {
        for seed in [1, 7, 42, 2026] {
            let mut state = InventoryState::default();
            let mut received_total = 0u64;
            let mut codes = BTreeMap::<String, usize>::new();
            let mut sold_out = 0;
            for command in commands(seed, 5_000) {
                let before = state.clone();
                match step(&mut state, &command) {
                    Ok(events) => {
                        assert_eq!(events.len(), 1, "{command:?}");
                        if let C::Receive { qty } = command {
                            received_total += qty;
                        }
                        let (E::Received { available, .. }
                        | E::Reserved { available, .. }
                        | E::Released { available, .. }) = &events[0];
                        assert_eq!(*available, state.available, "event carries the count");
                    }
                    Err(rejection) => {
                        assert_eq!(state, before, "a rejection changes nothing");
                        *codes.entry(rejection.code).or_default() += 1;
                    }
                }
                // Nothing is created or lost: every unit received is available or held.
                assert_eq!(state.available + state.total_held(), received_total);
                assert!(state.held.values().all(|qty| *qty >= 1));
                sold_out += usize::from(state.available == 0);
            }
            assert!(sold_out > 0, "the stock ran out at some point");
            // The sequence exercised every business rejection.
            for code in ["insufficient_stock", "already_reserved", "not_reserved"] {
                assert!(codes.get(code).is_some_and(|n| *n > 0), "{code}: {codes:?}");
            }
        }
    }

    #[test]
    fn the_same_commands_give_the_same_events() {
        let run = || {
            let mut state = InventoryState::default();
            let outcomes: Vec<_> = commands(99, 2_000)
                .iter()
                .map(|c| step(&mut state, c))
                .collect();
            (outcomes, serde_json::to_string(&state).unwrap())
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn the_registry_checks_clean() {
        let registry = registry();
        registry
            .check()
            .expect("every command and event has a schema");
        assert_eq!(registry.types().collect::<Vec<_>>(), ["inventory"]);
        let mut commands = registry.command_names("inventory").unwrap().to_vec();
        commands.sort();
        assert_eq!(commands, ["Receive", "Release", "Reserve"]);
        let mut events = registry.event_names("inventory").unwrap().to_vec();
        events.sort();
        assert_eq!(events, ["Received", "Released", "Reserved"]);
    }

    #[test]
    fn every_schema_example_validates_and_deserializes() {
        let registry = registry();
        let schemas = registry.schemas();
        for (path, text) in SCHEMA_FILES {
            let schema: Value = serde_json::from_str(text).unwrap();
            let (kind, file) = path.split_once('/').unwrap();
            let name = file.strip_suffix(".json").unwrap();
            assert_eq!(
                schema["$id"],
                format!("https://cmdproc.dev/schemas/inventory/{path}")
            );
            assert_eq!(schema["title"], format!("inventory.{name}"));
            let examples = schema["examples"].as_array().expect("examples");
            assert!(!examples.is_empty(), "{path} has no examples");
            for example in examples {
                let tagged = json!({ name: example });
                match kind {
                    "commands" => {
                        schemas
                            .validate_command_data("inventory", name, example)
                            .unwrap_or_else(|e| panic!("{path}: {example}: {e}"));
                        serde_json::from_value::<C>(tagged).unwrap();
                    }
                    _ => {
                        schemas
                            .validate_event_data("inventory", name, example)
                            .unwrap_or_else(|e| panic!("{path}: {example}: {e}"));
                        serde_json::from_value::<E>(tagged).unwrap();
                    }
                }
            }
        }
    }

    #[test]
    fn the_schemas_refuse_what_the_handler_defends_against() {
        let registry = registry();
        let schemas = registry.schemas();
        for (name, data) in [
            ("Receive", json!({"qty": 0})),
            ("Receive", json!({"qty": 1_000_000_001u64})),
            ("Receive", json!({"qty": 1, "note": "extra"})),
            ("Reserve", json!({"order": "", "qty": 1})),
            ("Reserve", json!({"order": "x".repeat(201), "qty": 1})),
            ("Reserve", json!({"order": "ord-1"})),
            ("Release", json!({})),
        ] {
            assert!(
                schemas
                    .validate_command_data("inventory", name, &data)
                    .is_err(),
                "{name} {data} should be invalid"
            );
        }
    }

    #[test]
    fn every_event_the_handler_emits_validates() {
        let registry = registry();
        let schemas = registry.schemas();
        let mut state = InventoryState::default();
        let mut seen = BTreeMap::<String, usize>::new();
        for command in commands(5, 3_000) {
            let (name, data) = split(&command);
            schemas
                .validate_command_data("inventory", &name, &data)
                .unwrap_or_else(|e| panic!("{name} {data}: {e}"));
            for event in step(&mut state, &command).unwrap_or_default() {
                let (name, data) = split(&event);
                schemas
                    .validate_event_data("inventory", &name, &data)
                    .unwrap_or_else(|e| panic!("{name} {data}: {e}"));
                *seen.entry(name).or_default() += 1;
            }
        }
        assert_eq!(seen.len(), 3, "every event kind was emitted: {seen:?}");
    }

    #[test]
    fn the_engine_sees_the_same_through_json() {
        // The engine drives the aggregate through its type-erased, JSON-facing form.
        let registry = registry();
        let aggregate = registry.get("inventory").expect("registered");
        let id = CommandId::parse("c-1").unwrap();
        let source = Source::parse("/test").unwrap();
        let context = Context::new(&id, &source, 0);
        let mut state = Value::Null;
        for (name, data) in [
            ("Receive", json!({"qty": 10})),
            ("Reserve", json!({"order": "ord-b", "qty": 4})),
            ("Reserve", json!({"order": "ord-a", "qty": 1})),
        ] {
            let Handled::Accepted(decision) = aggregate.handle(&state, name, &data, &context)
            else {
                panic!("{name} {data} not accepted");
            };
            state = aggregate.apply(&state, &decision.events);
        }
        // Orders in key order, so equal states have equal JSON.
        assert_eq!(
            serde_json::to_string(&state).unwrap(),
            r#"{"available":5,"held":{"ord-a":1,"ord-b":4}}"#
        );
        match aggregate.handle(
            &state,
            "Reserve",
            &json!({"order": "ord-c", "qty": 6}),
            &context,
        ) {
            Handled::Rejected(rejection) => assert_eq!(rejection.code, "insufficient_stock"),
            other => panic!("expected a rejection, got {other:?}"),
        }
        assert!(matches!(
            aggregate.handle(
                &state,
                "Reserve",
                &json!({"order": "o", "qty": 1, "x": 1}),
                &context
            ),
            Handled::Invalid(_)
        ));
    }
}
