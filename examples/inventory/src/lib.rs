//! `inventory`: stock per SKU, held for orders, never oversold; holds that expire by
//! themselves.
//!
//! An example of a domain crate as a user of cmdproc writes one, against the public API of
//! [`commands`] only: one aggregate, its JSON Schemas (embedded in the binary at build time),
//! a [`registry`] that the `inventory` binary hands to `processor::cli::main` (and
//! [`register`], to add it to another processor's registry), and given/when/then tests that
//! need no broker and no database.
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
//! | `inventory.Reserve` | `{"order": "ord-1", "qty": 3, "ttl": 900}` | `Reserved` | `invalid_quantity`, `invalid_order`, `invalid_ttl`, `time_required`, `already_reserved`, `already_confirmed`, `insufficient_stock` |
//! | `inventory.Confirm` | `{"order": "ord-1"}` | `Confirmed` (none if already confirmed) | `invalid_order`, `not_reserved` |
//! | `inventory.Release` | `{"order": "ord-1"}` | `Released` | `invalid_order`, `not_reserved`, `overflow` |
//! | `inventory.Expire` | `{"order": "ord-1"}` | `Expired` (none if the order holds nothing) | `invalid_order`, `time_required`, `not_due`, `overflow` |
//!
//! # Holds, and what each of them ends as
//!
//! A `Reserve` with a `ttl` (seconds) holds the units until the command's `time` plus the
//! ttl: it schedules the timer `hold/<order>` of the SKU, which sends `inventory.Expire
//! {order}` to the SKU at that time. Then exactly one of these ends the hold:
//!
//! - `Confirm` makes it final: the units are **sold** (they stay on hand, no longer
//!   available or held), and the timer is cancelled. Confirming an order already confirmed
//!   is accepted without effect (a retried confirmation); confirming an order that holds
//!   nothing (never reserved, released or expired) is rejected `not_reserved`: its units
//!   may be promised to somebody else by now.
//! - `Release` (the compensation of a saga) gives the units back to the available stock and
//!   cancels the timer. Releasing an order that holds nothing is rejected `not_reserved`,
//!   without effect: a saga sends its releases without waiting for their outcome, so a
//!   rejection cannot hold it up, and the rejection tells a person reading the log that the
//!   hold was gone already (expired, or released before).
//! - `Expire` (the timer) gives the units back. An `Expire` for an order that holds nothing
//!   (confirmed or released meanwhile, the timer having fired just before) is accepted
//!   without effect, so a late timer is harmless; one that comes before the hold's expiry
//!   (its `time` is the due time for a timer) is rejected `not_due`.
//!
//! A `Reserve` without `ttl` holds until confirmed or released, as before timers existed.
//!
//! Invariants, checked by [`InventoryState::is_balanced`] in the tests: `available` never
//! goes negative (a `u64` lowered only after checking), and every unit received is
//! available, held or sold: `on_hand == available + held + sold`.
//!
//! ```
//! use commands::testing::given;
//! use inventory::{InventoryCommand as C, InventoryEvent as E, Inventory};
//!
//! given::<Inventory>([E::Received { qty: 5, available: 5 }])
//!     .when(C::Reserve { order: "ord-1".into(), qty: 6, ttl: None })
//!     .then_reject("insufficient_stock");
//! ```
//!
//! # Running it
//!
//! The `inventory` binary (package `inventory-cli` in `examples/inventory/cli`, so that this
//! library does not depend on the engine) is `cmdproc` with this registry: every subcommand
//! and flag of `cmdproc`, and only the `inventory` aggregate. The stock `cmdproc` binary has
//! it too, with `account`, `room` and `order`.
//!
//! ```sh
//! cargo build -p inventory-cli                  # target/debug/inventory
//! inventory migrate && inventory topics create --partitions 6
//! inventory run &
//! inventory produce --type inventory.Receive --subject sku-42 --data '{"qty": 40}'
//! inventory produce --type inventory.Reserve --subject sku-42 --data '{"order": "ord-1", "qty": 3}'
//! inventory inspect inventory sku-42
//! ```

#![warn(missing_docs)]

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use commands::workflow::Emit;
use commands::{Aggregate, Context, Decision, Registry, Rejection, Schemas};
use serde::{Deserialize, Serialize};

/// The most characters an order id may have (the schemas' `maxLength`).
pub const MAX_ORDER_CHARS: usize = 200;

/// The longest hold a `Reserve` may ask for, in seconds (the schema's `maximum`): 30 days.
pub const MAX_TTL_SECS: u64 = 30 * 24 * 3600;

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
        "commands/Confirm.json",
        include_str!("../schemas/commands/Confirm.json"),
    ),
    (
        "commands/Release.json",
        include_str!("../schemas/commands/Release.json"),
    ),
    (
        "commands/Expire.json",
        include_str!("../schemas/commands/Expire.json"),
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
        "events/Confirmed.json",
        include_str!("../schemas/events/Confirmed.json"),
    ),
    (
        "events/Released.json",
        include_str!("../schemas/events/Released.json"),
    ),
    (
        "events/Expired.json",
        include_str!("../schemas/events/Expired.json"),
    ),
];

/// The schemas of [`Inventory`], as embedded in this crate.
pub fn schemas() -> Schemas {
    Schemas::embedded("examples/inventory/schemas", SCHEMA_FILES)
}

/// Adds [`Inventory`], with its embedded schemas, to `registry`: how a processor with
/// several domains (the stock `cmdproc` binary) registers this one.
pub fn register(registry: Registry) -> Registry {
    registry.with::<Inventory>(schemas())
}

/// The registry of this processor: [`Inventory`] with its embedded schemas.
///
/// The `inventory` binary hands it to `processor::cli::main`, which checks it before
/// running any subcommand.
pub fn registry() -> Registry {
    register(Registry::new())
}

/// The name of the timer that expires `order`'s hold on a SKU.
pub fn hold_timer(order: &str) -> String {
    format!("hold/{order}")
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
    /// Holds `qty` units for `order` out of the available stock, for `ttl` seconds from the
    /// command's `time` if given. An order holds stock of a SKU at most once: to change the
    /// quantity, release and reserve again.
    Reserve {
        /// The order to hold the stock for.
        order: String,
        /// Units to hold, at least 1.
        qty: u64,
        /// Seconds the hold lasts unless confirmed or released; none: until then.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl: Option<u64>,
    },
    /// Makes `order`'s hold final: its units are sold.
    Confirm {
        /// The order whose hold becomes a sale.
        order: String,
    },
    /// Gives everything `order` holds back to the available stock (a compensation).
    Release {
        /// The order whose hold is given back.
        order: String,
    },
    /// Gives `order`'s hold back because its time ran out; sent by the hold's timer.
    Expire {
        /// The order whose hold expires.
        order: String,
    },
}

/// What happened to a SKU. Each event carries the count it changed after it, so a consumer
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
        /// When the hold expires, if it does.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<DateTime<Utc>>,
    },
    /// An order's hold became a sale.
    Confirmed {
        /// The order.
        order: String,
        /// Units sold: all the order held.
        qty: u64,
        /// Units sold in all, after the event.
        sold: u64,
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
    /// An order's hold ran out and was given back.
    Expired {
        /// The order whose hold expired.
        order: String,
        /// Units given back: all the order held.
        qty: u64,
        /// Units available after the event.
        available: u64,
    },
}

/// A SKU's state; the default is a SKU with no stock and no holds.
///
/// Maps are `BTreeMap`s, so the state's JSON (stored as JSONB and compared by `cmdproc
/// verify`) does not depend on hashing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryState {
    /// Units received in all: each one is available, held or sold.
    #[serde(default)]
    pub on_hand: u64,
    /// Units not held for any order nor sold. Never negative: a `u64` the handler only
    /// lowers with checked arithmetic, after checking the reservation fits.
    pub available: u64,
    /// Units held per order (order id -> units, each at least 1).
    pub held: BTreeMap<String, u64>,
    /// When each expiring hold expires (the holds reserved with a `ttl`).
    #[serde(default)]
    pub expires: BTreeMap<String, DateTime<Utc>>,
    /// Units sold in all.
    #[serde(default)]
    pub sold: u64,
    /// Units sold per confirmed order.
    #[serde(default)]
    pub confirmed: BTreeMap<String, u64>,
}

impl InventoryState {
    /// Units held for all orders together (saturating: a count this large is not real).
    pub fn total_held(&self) -> u64 {
        self.held
            .values()
            .fold(0u64, |sum, qty| sum.saturating_add(*qty))
    }

    /// Whether every unit received is accounted for exactly once: `on_hand == available +
    /// held + sold`, and the sales per order add up to `sold`.
    pub fn is_balanced(&self) -> bool {
        let sold_per_order = self
            .confirmed
            .values()
            .fold(0u64, |sum, qty| sum.saturating_add(*qty));
        let accounted = self
            .available
            .checked_add(self.total_held())
            .and_then(|n| n.checked_add(self.sold));
        accounted == Some(self.on_hand) && sold_per_order == self.sold
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
        context: &Context<'_>,
    ) -> Result<Decision<InventoryEvent>, Rejection> {
        match command {
            InventoryCommand::Receive { qty } => {
                let qty = positive(*qty)?;
                let overflow = || {
                    Rejection::new(
                        "overflow",
                        format!(
                            "receiving {qty} would overflow the on-hand count {}",
                            state.on_hand
                        ),
                    )
                };
                // `on_hand` is at least `available`, so checking it checks both.
                state.on_hand.checked_add(qty).ok_or_else(overflow)?;
                let available = state.available.checked_add(qty).ok_or_else(overflow)?;
                Ok(Decision::event(InventoryEvent::Received { qty, available }))
            }
            InventoryCommand::Reserve { order, qty, ttl } => {
                reserve(state, order, *qty, *ttl, context)
            }
            InventoryCommand::Confirm { order } => {
                valid_order(order)?;
                if state.confirmed.contains_key(order) {
                    // Confirmed before: a retried confirmation changes nothing.
                    return Ok(Decision::new());
                }
                let Some(&qty) = state.held.get(order) else {
                    return Err(Rejection::new(
                        "not_reserved",
                        format!(
                            "order {order} holds nothing of this SKU (never reserved, released or expired)"
                        ),
                    ));
                };
                // Sold units were held, and held ones were received: `sold + qty` is at
                // most `on_hand`, which did not overflow.
                let sold = state.sold.saturating_add(qty);
                Ok(Decision::event(InventoryEvent::Confirmed {
                    order: order.clone(),
                    qty,
                    sold,
                })
                .cancel(hold_timer(order)))
            }
            InventoryCommand::Release { order } => {
                valid_order(order)?;
                let Some(&qty) = state.held.get(order) else {
                    return Err(Rejection::new(
                        "not_reserved",
                        format!("order {order} holds nothing of this SKU"),
                    ));
                };
                let available = give_back(state, order, qty, "releasing")?;
                Ok(Decision::event(InventoryEvent::Released {
                    order: order.clone(),
                    qty,
                    available,
                })
                .cancel(hold_timer(order)))
            }
            InventoryCommand::Expire { order } => {
                valid_order(order)?;
                let Some(&qty) = state.held.get(order) else {
                    // Confirmed or released since the timer was set (it fired just before
                    // being cancelled), or expired already: nothing to give back.
                    return Ok(Decision::new());
                };
                let now = context.time.ok_or_else(|| {
                    Rejection::new("time_required", "an expiry needs the command's time")
                })?;
                match state.expires.get(order) {
                    Some(at) if *at <= now => {}
                    Some(at) => {
                        return Err(Rejection::new(
                            "not_due",
                            format!("the hold of order {order} expires at {at}, not by {now}"),
                        ))
                    }
                    None => {
                        return Err(Rejection::new(
                            "not_due",
                            format!("the hold of order {order} does not expire"),
                        ))
                    }
                }
                let available = give_back(state, order, qty, "expiring")?;
                Ok(Decision::event(InventoryEvent::Expired {
                    order: order.clone(),
                    qty,
                    available,
                }))
            }
        }
    }

    fn apply(state: &mut InventoryState, event: &InventoryEvent) {
        // The counts are taken from the events rather than recomputed, which keeps `apply`
        // total and the event the single source of truth; `on_hand` is the one running
        // total, saturating (the handler checked it cannot overflow).
        match event {
            InventoryEvent::Received { qty, available } => {
                state.on_hand = state.on_hand.saturating_add(*qty);
                state.available = *available;
            }
            InventoryEvent::Reserved {
                order,
                qty,
                available,
                expires_at,
            } => {
                state.available = *available;
                state.held.insert(order.clone(), *qty);
                if let Some(at) = expires_at {
                    state.expires.insert(order.clone(), *at);
                }
            }
            InventoryEvent::Confirmed { order, qty, sold } => {
                state.held.remove(order);
                state.expires.remove(order);
                state.confirmed.insert(order.clone(), *qty);
                state.sold = *sold;
            }
            InventoryEvent::Released {
                order, available, ..
            }
            | InventoryEvent::Expired {
                order, available, ..
            } => {
                state.available = *available;
                state.held.remove(order);
                state.expires.remove(order);
            }
        }
    }
}

/// `Reserve`: checks, takes the units out of the available stock, and sets the hold's
/// expiry timer when it has a ttl.
fn reserve(
    state: &InventoryState,
    order: &str,
    qty: u64,
    ttl: Option<u64>,
    context: &Context<'_>,
) -> Result<Decision<InventoryEvent>, Rejection> {
    let qty = positive(qty)?;
    valid_order(order)?;
    if let Some(held) = state.held.get(order) {
        return Err(Rejection::new(
            "already_reserved",
            format!("order {order} already holds {held}; release it first"),
        ));
    }
    if state.confirmed.contains_key(order) {
        return Err(Rejection::new(
            "already_confirmed",
            format!("order {order} bought this SKU already"),
        ));
    }
    // The expiry is computed before anything is taken, so a reservation that cannot expire
    // as asked takes nothing.
    let expiry = match ttl {
        None => None,
        Some(ttl) => {
            if ttl == 0 || ttl > MAX_TTL_SECS {
                return Err(Rejection::new(
                    "invalid_ttl",
                    format!("a hold lasts 1 to {MAX_TTL_SECS} seconds, not {ttl}"),
                ));
            }
            let now = context.time.ok_or_else(|| {
                Rejection::new(
                    "time_required",
                    "a reservation with a ttl needs the command's time",
                )
            })?;
            // `ttl` is at most 30 days, so the seconds fit and the sum is a real date.
            Some(now + Duration::seconds(ttl as i64))
        }
    };
    let available = state.available.checked_sub(qty).ok_or_else(|| {
        Rejection::new(
            "insufficient_stock",
            format!(
                "insufficient stock: {} available, {qty} requested by order {order}",
                state.available
            ),
        )
    })?;
    let decision = Decision::event(InventoryEvent::Reserved {
        order: order.to_owned(),
        qty,
        available,
        expires_at: expiry,
    });
    Ok(match expiry {
        None => decision,
        // The timer sends the expiry to this SKU itself.
        Some(at) => decision.schedule(
            hold_timer(order),
            at,
            Emit::command(
                Inventory::TYPE,
                context.aggregate_id,
                &InventoryCommand::Expire {
                    order: order.to_owned(),
                },
            ),
        ),
    })
}

/// The available count after `order`'s `qty` held units come back, checked: stock received
/// since may have filled the count up.
fn give_back(state: &InventoryState, order: &str, qty: u64, doing: &str) -> Result<u64, Rejection> {
    state.available.checked_add(qty).ok_or_else(|| {
        Rejection::new(
            "overflow",
            format!(
                "{doing} the {qty} units of order {order} would overflow the available count {}",
                state.available
            ),
        )
    })
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
    use commands::workflow::TimerOp;
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
            ttl: None,
        }
    }

    /// A reservation that lasts `ttl` seconds.
    fn reserve_for(order: &str, qty: u64, ttl: u64) -> C {
        C::Reserve {
            order: order.into(),
            qty,
            ttl: Some(ttl),
        }
    }

    fn confirm(order: &str) -> C {
        C::Confirm {
            order: order.into(),
        }
    }

    fn expire(order: &str) -> C {
        C::Expire {
            order: order.into(),
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
            expires_at: None,
        }
    }

    fn reserved_until(order: &str, qty: u64, available: u64, at: DateTime<Utc>) -> E {
        E::Reserved {
            order: order.into(),
            qty,
            available,
            expires_at: Some(at),
        }
    }

    fn confirmed(order: &str, qty: u64, sold: u64) -> E {
        E::Confirmed {
            order: order.into(),
            qty,
            sold,
        }
    }

    fn expired(order: &str, qty: u64, available: u64) -> E {
        E::Expired {
            order: order.into(),
            qty,
            available,
        }
    }

    /// The clock of these tests: 2026-12-01 10:00 UTC plus `seconds`.
    fn at(seconds: i64) -> DateTime<Utc> {
        use chrono::TimeZone;
        Utc.with_ymd_and_hms(2026, 12, 1, 10, 0, 0).unwrap() + Duration::seconds(seconds)
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

    /// Handles `command` against `state` with a fixed context at time `now` and applies
    /// what it decided.
    fn step_at(
        state: &mut InventoryState,
        command: &C,
        now: DateTime<Utc>,
    ) -> Result<Vec<E>, Rejection> {
        let id = CommandId::parse("c-1").unwrap();
        let source = Source::parse("/test").unwrap();
        let context = Context::new(&id, &source, 0)
            .with_time(Some(now))
            .with_aggregate_id("sku-1");
        let decision = Inventory::handle(state, command, &context)?;
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

    /// What `command` decides at time `now` against the state `events` make, straight from
    /// the handler: to look at the timers and emitted commands besides the events.
    fn decide(events: &[E], command: &C, now: Option<DateTime<Utc>>) -> Decision<E> {
        let mut state = InventoryState::default();
        for event in events {
            Inventory::apply(&mut state, event);
        }
        let id = CommandId::parse("c-1").unwrap();
        let source = Source::parse("/test").unwrap();
        let context = Context::new(&id, &source, events.len() as u64)
            .with_time(now)
            .with_aggregate_id("sku-1");
        Inventory::handle(&state, command, &context).expect("accepted")
    }

    #[test]
    fn a_reservation_with_a_ttl_schedules_its_expiry() {
        given::<Inventory>([received(10, 10)])
            .when(reserve_for("ord-1", 3, 900))
            .at(at(0))
            .then_expect([reserved_until("ord-1", 3, 7, at(900))])
            .then_state(|s| {
                assert_eq!(s.held["ord-1"], 3);
                assert_eq!(s.expires["ord-1"], at(900));
                assert!(s.is_balanced());
            });
        let decision = decide(
            &[received(10, 10)],
            &reserve_for("ord-1", 3, 900),
            Some(at(0)),
        );
        assert!(decision.commands.is_empty(), "nothing is sent now");
        assert_eq!(
            decision.timers,
            [TimerOp::Schedule {
                name: "hold/ord-1".into(),
                at: at(900),
                command: Emit::new("inventory.Expire", "sku-1", json!({"order": "ord-1"})),
            }]
        );
        // Without a ttl, nothing expires and no timer is set.
        let decision = decide(&[received(10, 10)], &reserve("ord-1", 3), None);
        assert!(decision.timers.is_empty());
    }

    #[test]
    fn a_reservation_that_cannot_expire_as_asked_takes_nothing() {
        given::<Inventory>([received(10, 10)])
            .when(reserve_for("ord-1", 3, 900))
            .then_reject("time_required")
            .then_state(|s| assert_eq!(s.available, 10));
        for ttl in [0, MAX_TTL_SECS + 1] {
            given::<Inventory>([received(10, 10)])
                .when(reserve_for("ord-1", 3, ttl))
                .at(at(0))
                .then_reject("invalid_ttl");
        }
    }

    #[test]
    fn confirm_sells_the_hold_and_cancels_its_expiry() {
        let history = [received(10, 10), reserved_until("ord-1", 3, 7, at(900))];
        given::<Inventory>(history.clone())
            .when(confirm("ord-1"))
            .then_expect([confirmed("ord-1", 3, 3)])
            .then_state(|s| {
                assert_eq!(
                    (s.on_hand, s.available, s.total_held(), s.sold),
                    (10, 7, 0, 3)
                );
                assert!(s.expires.is_empty());
                assert_eq!(s.confirmed["ord-1"], 3);
                assert!(s.is_balanced());
            });
        let decision = decide(&history, &confirm("ord-1"), None);
        assert_eq!(
            decision.timers,
            [TimerOp::Cancel {
                name: "hold/ord-1".into()
            }]
        );
        // A retried confirmation changes nothing; a sold order cannot reserve again.
        let sold = [
            received(10, 10),
            reserved("ord-1", 3, 7),
            confirmed("ord-1", 3, 3),
        ];
        given::<Inventory>(sold.clone())
            .when(confirm("ord-1"))
            .then_expect([]);
        given::<Inventory>(sold)
            .when(reserve("ord-1", 1))
            .then_reject("already_confirmed");
    }

    #[test]
    fn confirming_a_hold_that_is_gone_is_rejected() {
        given::<Inventory>([received(10, 10)])
            .when(confirm("ord-1"))
            .then_reject("not_reserved");
        given::<Inventory>([
            received(10, 10),
            reserved_until("ord-1", 3, 7, at(900)),
            expired("ord-1", 3, 10),
        ])
        .when(confirm("ord-1"))
        .then_reject("not_reserved")
        .then_state(|s| assert_eq!(s.sold, 0));
        given::<Inventory>([
            received(10, 10),
            reserved("ord-1", 3, 7),
            released("ord-1", 3, 10),
        ])
        .when(confirm("ord-1"))
        .then_reject("not_reserved");
    }

    #[test]
    fn release_cancels_the_expiry() {
        let history = [received(10, 10), reserved_until("ord-1", 3, 7, at(900))];
        given::<Inventory>(history.clone())
            .when(release("ord-1"))
            .then_expect([released("ord-1", 3, 10)])
            .then_state(|s| assert!(s.expires.is_empty() && s.is_balanced()));
        let decision = decide(&history, &release("ord-1"), None);
        assert_eq!(
            decision.timers,
            [TimerOp::Cancel {
                name: "hold/ord-1".into()
            }]
        );
    }

    #[test]
    fn expire_gives_a_due_hold_back() {
        let history = [received(10, 10), reserved_until("ord-1", 3, 7, at(900))];
        given::<Inventory>(history.clone())
            .when(expire("ord-1"))
            .at(at(900))
            .then_expect([expired("ord-1", 3, 10)])
            .then_state(|s| {
                assert_eq!(s.available, 10);
                assert!(s.held.is_empty() && s.expires.is_empty());
                assert!(s.is_balanced());
            });
        // The timer fired: nothing to cancel, nothing to send.
        let decision = decide(&history, &expire("ord-1"), Some(at(901)));
        assert!(decision.timers.is_empty() && decision.commands.is_empty());
        // Too early, without time, or a hold that does not expire: refused.
        given::<Inventory>(history.clone())
            .when(expire("ord-1"))
            .at(at(899))
            .then_reject("not_due")
            .then_state(|s| assert_eq!(s.held["ord-1"], 3));
        given::<Inventory>(history)
            .when(expire("ord-1"))
            .then_reject("time_required");
        given::<Inventory>([received(10, 10), reserved("ord-1", 3, 7)])
            .when(expire("ord-1"))
            .at(at(900))
            .then_reject("not_due");
    }

    #[test]
    fn a_late_expiry_is_a_no_op() {
        // Confirmed, released or expired before the timer's command came: accepted, no
        // event, so a timer that fired just before its cancellation is harmless.
        for history in [
            vec![
                received(10, 10),
                reserved_until("ord-1", 3, 7, at(900)),
                confirmed("ord-1", 3, 3),
            ],
            vec![
                received(10, 10),
                reserved_until("ord-1", 3, 7, at(900)),
                released("ord-1", 3, 10),
            ],
            vec![
                received(10, 10),
                reserved_until("ord-1", 3, 7, at(900)),
                expired("ord-1", 3, 10),
            ],
            vec![received(10, 10)],
        ] {
            let before = given::<Inventory>(history.clone()).state().clone();
            given::<Inventory>(history)
                .when(expire("ord-1"))
                .at(at(900))
                .then_expect([])
                .then_state(|s| assert_eq!(*s, before));
        }
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

    /// `n` commands over 200 orders, each with its time (a clock advancing 0 to 3 seconds a
    /// command), with every kind of outcome: receipts, reservations with and without a ttl
    /// that fit and that do not, duplicate reservations, confirmations, releases and expiries
    /// with and without a hold, early and due. Receipts are rare and holds large, so the stock
    /// runs out again and again.
    fn commands(seed: u64, n: usize) -> Vec<(C, DateTime<Utc>)> {
        let mut rng = Lcg(seed);
        let mut clock = 0;
        (0..n)
            .map(|_| {
                clock += rng.below(4) as i64;
                let order = format!("ord-{}", rng.below(200));
                let command = match rng.below(100) {
                    0..=4 => receive(1 + rng.below(40)),
                    5..=39 => reserve(&order, 1 + rng.below(30)),
                    40..=69 => reserve_for(&order, 1 + rng.below(30), 1 + rng.below(60)),
                    70..=79 => confirm(&order),
                    80..=89 => expire(&order),
                    _ => release(&order),
                };
                (command, at(clock))
            })
            .collect()
    }

    #[test]
    fn available_never_goes_negative_and_stock_is_conserved() {
        for seed in [1, 7, 42, 2026] {
            let mut state = InventoryState::default();
            let mut received_total = 0u64;
            let mut codes = BTreeMap::<String, usize>::new();
            let mut kinds = BTreeMap::<String, usize>::new();
            let mut sold_out = 0;
            for (command, now) in commands(seed, 5_000) {
                let before = state.clone();
                match step_at(&mut state, &command, now) {
                    Ok(events) => {
                        assert!(events.len() <= 1, "{command:?}");
                        if let C::Receive { qty } = command {
                            received_total += qty;
                        }
                        let Some(event) = events.first() else {
                            // Accepted without effect: a late expiry or a repeated
                            // confirmation.
                            assert!(matches!(command, C::Expire { .. } | C::Confirm { .. }));
                            assert_eq!(state, before, "a no-op changes nothing");
                            continue;
                        };
                        *kinds.entry(split(event).0).or_default() += 1;
                        match event {
                            E::Received { available, .. }
                            | E::Reserved { available, .. }
                            | E::Released { available, .. }
                            | E::Expired { available, .. } => {
                                assert_eq!(*available, state.available, "event carries the count")
                            }
                            E::Confirmed { sold, .. } => assert_eq!(*sold, state.sold),
                        }
                    }
                    Err(rejection) => {
                        assert_eq!(state, before, "a rejection changes nothing");
                        *codes.entry(rejection.code).or_default() += 1;
                    }
                }
                // Nothing is created or lost: every unit received is available, held or
                // sold.
                assert_eq!(state.on_hand, received_total);
                assert!(state.is_balanced(), "{state:?}");
                assert!(state.held.values().all(|qty| *qty >= 1));
                // Only holds have expiries, and no hold outlives its expiry by an expiry
                // (the one sent at that time would give it back).
                assert!(state.expires.keys().all(|o| state.held.contains_key(o)));
                sold_out += usize::from(state.available == 0);
            }
            assert!(sold_out > 0, "the stock ran out at some point");
            // The sequence exercised every business rejection and every event.
            for code in [
                "insufficient_stock",
                "already_reserved",
                "already_confirmed",
                "not_reserved",
                "not_due",
            ] {
                assert!(codes.get(code).is_some_and(|n| *n > 0), "{code}: {codes:?}");
            }
            assert_eq!(kinds.len(), 5, "{kinds:?}");
        }
    }

    #[test]
    fn the_same_commands_give_the_same_events() {
        let run = || {
            let mut state = InventoryState::default();
            let outcomes: Vec<_> = commands(99, 2_000)
                .iter()
                .map(|(c, now)| step_at(&mut state, c, *now))
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
        assert_eq!(
            commands,
            ["Confirm", "Expire", "Receive", "Release", "Reserve"]
        );
        let mut events = registry.event_names("inventory").unwrap().to_vec();
        events.sort();
        assert_eq!(
            events,
            ["Confirmed", "Expired", "Received", "Released", "Reserved"]
        );
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
            ("Reserve", json!({"order": "ord-1", "qty": 1, "ttl": 0})),
            (
                "Reserve",
                json!({"order": "ord-1", "qty": 1, "ttl": MAX_TTL_SECS + 1}),
            ),
            ("Confirm", json!({})),
            ("Expire", json!({"order": "ord-1", "at": "now"})),
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
        for (command, now) in commands(5, 3_000) {
            let (name, data) = split(&command);
            schemas
                .validate_command_data("inventory", &name, &data)
                .unwrap_or_else(|e| panic!("{name} {data}: {e}"));
            for event in step_at(&mut state, &command, now).unwrap_or_default() {
                let (name, data) = split(&event);
                schemas
                    .validate_event_data("inventory", &name, &data)
                    .unwrap_or_else(|e| panic!("{name} {data}: {e}"));
                *seen.entry(name).or_default() += 1;
            }
        }
        assert_eq!(seen.len(), 5, "every event kind was emitted: {seen:?}");
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
            r#"{"available":5,"confirmed":{},"expires":{},"held":{"ord-a":1,"ord-b":4},"on_hand":10,"sold":0}"#
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
