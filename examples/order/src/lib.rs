//! `order`: a saga across aggregates, written as a user writes one against the public API of
//! [`commands`] only.
//!
//! An order (type `order`, aggregate id = the order id) is an ordinary aggregate that sends
//! commands to others and reacts to their outcomes: no orchestrator, lock or coordinator.
//! Every step is a command applied by its own single writer, and every command the order
//! sends is an outbox row of the transaction that records the order's decision, with an id
//! derived from it, so that no step happens twice however often workers die.
//!
//! # The conversation
//!
//! 1. `order.Place {lines: [{sku, qty}], account, amount, deadline}`: the order sends
//!    `inventory.Reserve {order, qty, ttl}` (`order` its own id) to every line's SKU, asking for each
//!    outcome, and sets its timer `deadline`, which sends `order.Timeout` at the command's
//!    `time` plus `deadline` seconds. The holds last [`HOLD_MARGIN_SECS`] longer than the
//!    deadline, so a hold never expires under an order that may still confirm it. Status
//!    `reserving`.
//! 2. Each reservation's outcome comes back as `order.Outcome`. When every line is held,
//!    the order sends `account.Withdraw {amount}` to the account, asking for the outcome.
//!    Status `paying`.
//! 3. The payment applied: the order sends `inventory.Confirm {order}` to every SKU and
//!    cancels its deadline. Status `confirmed`.
//!
//! A reservation or payment refused (rejected or dead-lettered), or the deadline passing
//! first, **cancels** the order: it sends `inventory.Release {order}` for every hold it was
//! told of and cancels its deadline (unless it fired). What is still on its way is
//! compensated when its outcome arrives: a reservation applied after the cancellation is
//! released, a payment applied after it is refunded (`account.Deposit {amount}`). Status
//! `cancelled`, with the `reason`:
//!
//! | reason | what happened |
//! |---|---|
//! | `out_of_stock` | a SKU refused the reservation with `insufficient_stock` |
//! | `reservation_refused` | a SKU refused it otherwise, or it was dead-lettered |
//! | `payment_refused` | the account refused the withdrawal (`insufficient_funds`, `not_open`, ...) or it was dead-lettered |
//! | `timed_out` | the deadline passed before the payment was applied |
//!
//! Every command is safe to see twice: the engine drops a repeated command or outcome by
//! its id, and besides, an outcome for a line or payment the order already knows the end
//! of changes nothing, and a `Timeout` of an order that ended is accepted without effect.
//! Releases and refunds are sent without asking for their outcome: nothing the order could
//! do about a refusal (a hold that expired meanwhile is given back already).
//!
//! | command | data | events | rejections |
//! |---|---|---|---|
//! | `order.Place` | `{"lines": [{"sku": "sku-1", "qty": 2}], "account": "acc-1", "amount": 1500, "deadline": 30}` | `Placed` | `already_placed`, `time_required`, `invalid_order`, `invalid_lines`, `duplicate_sku`, `invalid_quantity`, `invalid_account`, `invalid_amount`, `invalid_deadline` |
//! | `order.Outcome` | a [`CommandOutcome`] | see above (none if already known) | `not_placed`, `unexpected_outcome` |
//! | `order.Timeout` | `{}` | `Cancelled` (none if the order ended) | `not_placed`, `time_required`, `not_due` |
//!
//! ```
//! use commands::testing::given;
//! use order::{Line, Order, OrderCommand, OrderState, Status};
//! # use chrono::TimeZone;
//! # let now = chrono::Utc.with_ymd_and_hms(2026, 12, 1, 10, 0, 0).unwrap();
//!
//! let then = given::<Order>([])
//!     .when(OrderCommand::Place {
//!         lines: vec![Line { sku: "sku-1".into(), qty: 2 }],
//!         account: "acc-1".into(),
//!         amount: 1500,
//!         deadline: 30,
//!     })
//!     .at(now)
//!     .on("ord-1")
//!     .outcome();
//! assert_eq!(then.state().status, Status::Reserving);
//! let decision = then.decision().as_ref().unwrap();
//! assert_eq!(decision.commands[0].command_type, "inventory.Reserve");
//! ```

#![warn(missing_docs)]

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};
use commands::workflow::{emitter_source, CommandOutcome, Emit, OUTCOME_SCHEMA};
use commands::{Aggregate, Context, Decision, Registry, Rejection, ReplyOutcome, Schemas};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// How much longer than the order's deadline its holds last, in seconds: the margin for a
/// confirmation still on its way when the deadline nearly passed.
pub const HOLD_MARGIN_SECS: u64 = 600;

/// The longest deadline an order may have, in seconds (the schema's `maximum`): 7 days.
pub const MAX_DEADLINE_SECS: u64 = 7 * 24 * 3600;

/// The most lines an order may have (the schema's `maxItems`).
pub const MAX_LINES: usize = 100;

/// The most characters an order, SKU or account id may have (the schemas' `maxLength`).
pub const MAX_ID_CHARS: usize = 200;

/// The name of the order's deadline timer.
pub const DEADLINE_TIMER: &str = "deadline";

/// The schema files, embedded at build time: `(path under schemas/, text)`. The `Outcome`
/// command's schema is the one `commands` ships for every aggregate that hears back.
pub const SCHEMA_FILES: &[(&str, &str)] = &[
    (
        "commands/Place.json",
        include_str!("../schemas/commands/Place.json"),
    ),
    ("commands/Outcome.json", OUTCOME_SCHEMA),
    (
        "commands/Timeout.json",
        include_str!("../schemas/commands/Timeout.json"),
    ),
    (
        "events/Placed.json",
        include_str!("../schemas/events/Placed.json"),
    ),
    (
        "events/ReservationHeld.json",
        include_str!("../schemas/events/ReservationHeld.json"),
    ),
    (
        "events/ReservationRefused.json",
        include_str!("../schemas/events/ReservationRefused.json"),
    ),
    (
        "events/PaymentRequested.json",
        include_str!("../schemas/events/PaymentRequested.json"),
    ),
    (
        "events/PaymentRefused.json",
        include_str!("../schemas/events/PaymentRefused.json"),
    ),
    (
        "events/Confirmed.json",
        include_str!("../schemas/events/Confirmed.json"),
    ),
    (
        "events/Cancelled.json",
        include_str!("../schemas/events/Cancelled.json"),
    ),
    (
        "events/LateHoldReleased.json",
        include_str!("../schemas/events/LateHoldReleased.json"),
    ),
    (
        "events/Refunded.json",
        include_str!("../schemas/events/Refunded.json"),
    ),
];

/// The schemas of [`Order`], as embedded in this crate.
pub fn schemas() -> Schemas {
    Schemas::embedded("examples/order/schemas", SCHEMA_FILES)
}

/// Adds [`Order`], with its embedded schemas, to `registry`. A processor that runs orders
/// also needs the aggregates they talk to: `inventory` and `account` (the stock `cmdproc`
/// binary registers all of them).
pub fn register(registry: Registry) -> Registry {
    registry.with::<Order>(schemas())
}

/// A registry with [`Order`] only.
pub fn registry() -> Registry {
    register(Registry::new())
}

/// The order saga (type `order`; the aggregate id is the order id).
#[derive(Debug, Clone, Copy, Default)]
pub struct Order;

/// One line of an order: units of a SKU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Line {
    /// The SKU (an `inventory` aggregate id).
    pub sku: String,
    /// Units, at least 1.
    pub qty: u64,
}

/// What an order accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum OrderCommand {
    /// Places the order: reserves every line, then takes the payment, within `deadline`
    /// seconds of the command's `time`.
    Place {
        /// What is ordered; each SKU at most once.
        lines: Vec<Line>,
        /// The `account` aggregate the amount is taken from.
        account: String,
        /// Minor units to take, at least 1.
        amount: i64,
        /// Seconds the order has to reserve and pay before it is cancelled.
        deadline: u64,
    },
    /// The outcome of a command the order sent asking for it (a reservation or the
    /// payment), delivered by the engine.
    Outcome(CommandOutcome),
    /// The deadline passed; sent by the order's timer.
    Timeout {},
}

/// Where an order is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Not placed yet.
    #[default]
    New,
    /// Placed: waiting for the reservations.
    Reserving,
    /// Every line held: waiting for the payment.
    Paying,
    /// Paid, holds confirmed: the order succeeded.
    Confirmed,
    /// Cancelled (see `reason`); what it took is given back.
    Cancelled,
}

/// Where one line's hold is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hold {
    /// The reservation was sent; no outcome yet.
    Pending,
    /// The SKU holds the units for the order.
    Held,
    /// The SKU refused the reservation (or it was dead-lettered): nothing is held.
    Refused,
    /// The order sent the release of its hold.
    Released,
    /// The order sent the confirmation of its hold.
    Confirmed,
}

/// Where the payment is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payment {
    /// Not asked for.
    #[default]
    None,
    /// The withdrawal was sent; no outcome yet.
    Requested,
    /// The withdrawal was applied, and kept: the order is confirmed.
    Taken,
    /// The withdrawal was refused (or dead-lettered): nothing was taken.
    Refused,
    /// The withdrawal was applied after the order was cancelled; the refund was sent.
    Refunded,
}

/// A line with where its hold is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineState {
    /// Units ordered.
    pub qty: u64,
    /// Where the hold is.
    pub hold: Hold,
}

/// An order's state; the default is an order not placed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderState {
    /// Where the order is.
    pub status: Status,
    /// Why it was cancelled (`out_of_stock`, `reservation_refused`, `payment_refused`,
    /// `timed_out`), once it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The order's own id.
    pub order: String,
    /// The account paying.
    pub account: String,
    /// Minor units to take.
    pub amount: i64,
    /// When the order is cancelled unless paid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_at: Option<DateTime<Utc>>,
    /// The lines by SKU.
    pub lines: BTreeMap<String, LineState>,
    /// Where the payment is.
    pub payment: Payment,
}

impl OrderState {
    /// The SKUs whose hold is `hold`.
    pub fn skus_where(&self, hold: &Hold) -> Vec<String> {
        self.lines
            .iter()
            .filter(|(_, line)| &line.hold == hold)
            .map(|(sku, _)| sku.clone())
            .collect()
    }

    /// Whether the order ended (confirmed or cancelled). Outcomes may still come for an
    /// ended order, and are compensated.
    pub fn has_ended(&self) -> bool {
        matches!(self.status, Status::Confirmed | Status::Cancelled)
    }
}

/// What happened to an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderEvent {
    /// The order was placed; its reservations were sent.
    Placed {
        /// The order's own id.
        order: String,
        /// What is ordered.
        lines: Vec<Line>,
        /// The account paying.
        account: String,
        /// Minor units to take.
        amount: i64,
        /// When the order is cancelled unless paid.
        deadline_at: DateTime<Utc>,
    },
    /// A SKU holds a line's units.
    ReservationHeld {
        /// The line's SKU.
        sku: String,
    },
    /// A SKU refused a line's reservation, or it was dead-lettered.
    ReservationRefused {
        /// The line's SKU.
        sku: String,
        /// The outcome: `rejected`, `dead_lettered`, ...
        outcome: String,
        /// The rejection code or dead-letter kind, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
    },
    /// Every line is held; the withdrawal was sent.
    PaymentRequested {
        /// The account paying.
        account: String,
        /// Minor units to take.
        amount: i64,
    },
    /// The account refused the withdrawal, or it was dead-lettered.
    PaymentRefused {
        /// The outcome: `rejected`, `dead_lettered`, ...
        outcome: String,
        /// The rejection code or dead-letter kind, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
    },
    /// The payment was taken; the holds' confirmations were sent.
    Confirmed {
        /// Minor units taken.
        amount: i64,
    },
    /// The order was cancelled; the releases of `released` were sent.
    Cancelled {
        /// Why.
        reason: String,
        /// The SKUs whose hold is given back.
        released: Vec<String>,
    },
    /// A reservation was applied after the order was cancelled; its release was sent.
    LateHoldReleased {
        /// The line's SKU.
        sku: String,
    },
    /// The payment was applied after the order was cancelled; the refund was sent.
    Refunded {
        /// Minor units given back.
        amount: i64,
    },
}

impl Aggregate for Order {
    const TYPE: &'static str = "order";
    type State = OrderState;
    type Command = OrderCommand;
    type Event = OrderEvent;

    fn handle(
        state: &OrderState,
        command: &OrderCommand,
        context: &Context<'_>,
    ) -> Result<Decision<OrderEvent>, Rejection> {
        match command {
            OrderCommand::Place {
                lines,
                account,
                amount,
                deadline,
            } => place(state, lines, account, *amount, *deadline, context),
            OrderCommand::Outcome(outcome) => {
                if state.status == Status::New {
                    return Err(not_placed());
                }
                on_outcome(state, outcome)
            }
            OrderCommand::Timeout {} => {
                if state.status == Status::New {
                    return Err(not_placed());
                }
                if state.has_ended() {
                    // Paid (or cancelled) just before the timer fired: nothing to do.
                    return Ok(Decision::new());
                }
                let now = context.time.ok_or_else(|| {
                    Rejection::new("time_required", "a timeout needs the command's time")
                })?;
                if let Some(at) = state.deadline_at.filter(|at| now < *at) {
                    return Err(Rejection::new(
                        "not_due",
                        format!("the order's deadline is {at}, not by {now}"),
                    ));
                }
                // The timer fired: nothing left to cancel.
                Ok(cancel(state, "timed_out", Decision::new()))
            }
        }
    }

    fn apply(state: &mut OrderState, event: &OrderEvent) {
        match event {
            OrderEvent::Placed {
                order,
                lines,
                account,
                amount,
                deadline_at,
            } => {
                state.status = Status::Reserving;
                state.order = order.clone();
                state.account = account.clone();
                state.amount = *amount;
                state.deadline_at = Some(*deadline_at);
                state.lines = lines
                    .iter()
                    .map(|line| {
                        let pending = LineState {
                            qty: line.qty,
                            hold: Hold::Pending,
                        };
                        (line.sku.clone(), pending)
                    })
                    .collect();
            }
            OrderEvent::ReservationHeld { sku } => set_hold(state, sku, Hold::Held),
            OrderEvent::ReservationRefused { sku, .. } => set_hold(state, sku, Hold::Refused),
            OrderEvent::LateHoldReleased { sku } => set_hold(state, sku, Hold::Released),
            OrderEvent::PaymentRequested { .. } => {
                state.status = Status::Paying;
                state.payment = Payment::Requested;
            }
            OrderEvent::PaymentRefused { .. } => state.payment = Payment::Refused,
            OrderEvent::Confirmed { .. } => {
                state.status = Status::Confirmed;
                state.payment = Payment::Taken;
                for line in state.lines.values_mut() {
                    line.hold = Hold::Confirmed;
                }
            }
            OrderEvent::Cancelled { reason, released } => {
                state.status = Status::Cancelled;
                state.reason = Some(reason.clone());
                for sku in released {
                    set_hold(state, sku, Hold::Released);
                }
            }
            OrderEvent::Refunded { .. } => state.payment = Payment::Refunded,
        }
    }

    /// `reserving`, `paying`, `confirmed` or `cancelled:<reason>`: counted per status in
    /// `cmdproc_aggregates{type="order"}` (sagas by state, cancellations by reason).
    fn status(state: &OrderState) -> Option<String> {
        Some(match state.status {
            Status::New => "new".to_owned(),
            Status::Reserving => "reserving".to_owned(),
            Status::Paying => "paying".to_owned(),
            Status::Confirmed => "confirmed".to_owned(),
            Status::Cancelled => {
                format!("cancelled:{}", state.reason.as_deref().unwrap_or("unknown"))
            }
        })
    }
}

/// `Place`: checks the order, sends its reservations and sets its deadline.
fn place(
    state: &OrderState,
    lines: &[Line],
    account: &str,
    amount: i64,
    deadline: u64,
    context: &Context<'_>,
) -> Result<Decision<OrderEvent>, Rejection> {
    if state.status != Status::New {
        return Err(Rejection::new(
            "already_placed",
            format!("order {} was placed before", state.order),
        ));
    }
    // The order names itself in its reservations and its deadline timer.
    let order = context.aggregate_id;
    valid_id("invalid_order", "an order id", order)?;
    valid_id("invalid_account", "an account id", account)?;
    if lines.is_empty() || lines.len() > MAX_LINES {
        return Err(Rejection::new(
            "invalid_lines",
            format!("an order has 1 to {MAX_LINES} lines, not {}", lines.len()),
        ));
    }
    let mut skus = BTreeSet::new();
    for line in lines {
        valid_id("invalid_lines", "a SKU", &line.sku)?;
        if line.qty == 0 {
            return Err(Rejection::new(
                "invalid_quantity",
                format!("the line of {} orders no unit", line.sku),
            ));
        }
        if !skus.insert(line.sku.as_str()) {
            return Err(Rejection::new(
                "duplicate_sku",
                format!("{} is on two lines; one line per SKU", line.sku),
            ));
        }
    }
    if amount <= 0 {
        return Err(Rejection::new(
            "invalid_amount",
            format!("amount must be positive, got {amount}"),
        ));
    }
    if deadline == 0 || deadline > MAX_DEADLINE_SECS {
        return Err(Rejection::new(
            "invalid_deadline",
            format!("a deadline is 1 to {MAX_DEADLINE_SECS} seconds, not {deadline}"),
        ));
    }
    let now = context.time.ok_or_else(|| {
        Rejection::new(
            "time_required",
            "placing an order needs the command's time, which its deadline counts from",
        )
    })?;
    // At most 7 days: the seconds fit an i64 and the sum is a real date.
    let deadline_at = now + Duration::seconds(deadline as i64);
    let ttl = deadline + HOLD_MARGIN_SECS;
    let mut decision = Decision::event(OrderEvent::Placed {
        order: order.to_owned(),
        lines: lines.to_vec(),
        account: account.to_owned(),
        amount,
        deadline_at,
    });
    for line in lines {
        decision = decision.emit(
            Emit::new(
                "inventory.Reserve",
                line.sku.clone(),
                json!({"order": order, "qty": line.qty, "ttl": ttl}),
            )
            .with_outcome(),
        );
    }
    Ok(decision.schedule(
        DEADLINE_TIMER,
        deadline_at,
        Emit::command(Order::TYPE, order, &OrderCommand::Timeout {}),
    ))
}

/// An outcome of a command the order sent: a reservation's or the payment's.
fn on_outcome(
    state: &OrderState,
    outcome: &CommandOutcome,
) -> Result<Decision<OrderEvent>, Rejection> {
    let of = &outcome.command;
    if of.source != emitter_source(Order::TYPE, &state.order) {
        return Err(Rejection::new(
            "unexpected_outcome",
            format!(
                "the outcome of {} {} was sent by {}, not by this order",
                of.command_type, of.id, of.source
            ),
        ));
    }
    match of.command_type.as_str() {
        "inventory.Reserve" => {
            let Some(line) = state.lines.get(&of.subject) else {
                return Err(Rejection::new(
                    "unexpected_outcome",
                    format!("the order has no line of {}", of.subject),
                ));
            };
            if line.hold != Hold::Pending {
                // The line's outcome is known already: a repeat changes nothing.
                return Ok(Decision::new());
            }
            Ok(on_reservation(state, &of.subject, &outcome.outcome))
        }
        "account.Withdraw" => {
            if state.payment != Payment::Requested || of.subject != state.account {
                // Not asked for, or its outcome is known already.
                return Ok(Decision::new());
            }
            Ok(on_payment(state, &outcome.outcome))
        }
        other => Err(Rejection::new(
            "unexpected_outcome",
            format!("the order sends no {other} asking for its outcome"),
        )),
    }
}

/// The first outcome of the reservation of `sku`'s line.
fn on_reservation(state: &OrderState, sku: &str, outcome: &ReplyOutcome) -> Decision<OrderEvent> {
    let ended = state.has_ended();
    match (outcome, ended) {
        (ReplyOutcome::Applied { .. }, false) => {
            let decision = Decision::event(OrderEvent::ReservationHeld {
                sku: sku.to_owned(),
            });
            let all_held = state
                .lines
                .iter()
                .all(|(other, line)| other == sku || line.hold == Hold::Held);
            if !all_held {
                return decision;
            }
            decision
                .and(OrderEvent::PaymentRequested {
                    account: state.account.clone(),
                    amount: state.amount,
                })
                .emit(
                    Emit::new(
                        "account.Withdraw",
                        state.account.clone(),
                        json!({"amount": state.amount}),
                    )
                    .with_outcome(),
                )
        }
        // Held after the order was cancelled: give it back at once.
        (ReplyOutcome::Applied { .. }, true) => Decision::event(OrderEvent::LateHoldReleased {
            sku: sku.to_owned(),
        })
        .emit(release(&state.order, sku)),
        (refused, _) => {
            let (name, code) = refusal(refused);
            let reason = if code.as_deref() == Some("insufficient_stock") {
                "out_of_stock"
            } else {
                "reservation_refused"
            };
            let decision = Decision::event(OrderEvent::ReservationRefused {
                sku: sku.to_owned(),
                outcome: name,
                code,
            });
            if ended {
                decision
            } else {
                cancel(state, reason, decision).cancel(DEADLINE_TIMER)
            }
        }
    }
}

/// The first outcome of the payment.
fn on_payment(state: &OrderState, outcome: &ReplyOutcome) -> Decision<OrderEvent> {
    let ended = state.has_ended();
    match (outcome, ended) {
        (ReplyOutcome::Applied { .. }, false) => {
            let mut decision = Decision::event(OrderEvent::Confirmed {
                amount: state.amount,
            });
            for sku in state.lines.keys() {
                decision = decision.emit(Emit::new(
                    "inventory.Confirm",
                    sku.clone(),
                    json!({"order": state.order}),
                ));
            }
            decision.cancel(DEADLINE_TIMER)
        }
        // Taken after the order was cancelled (it timed out meanwhile): give it back.
        (ReplyOutcome::Applied { .. }, true) => Decision::event(OrderEvent::Refunded {
            amount: state.amount,
        })
        .emit(Emit::new(
            "account.Deposit",
            state.account.clone(),
            json!({"amount": state.amount}),
        )),
        (refused, _) => {
            let (name, code) = refusal(refused);
            let decision = Decision::event(OrderEvent::PaymentRefused {
                outcome: name,
                code,
            });
            if ended {
                decision
            } else {
                cancel(state, "payment_refused", decision).cancel(DEADLINE_TIMER)
            }
        }
    }
}

/// Adds to `decision` the cancellation for `reason`: every hold the order was told of is
/// released. Reservations still on their way are released when their outcome comes, and a
/// payment still on its way is refunded then.
fn cancel(
    state: &OrderState,
    reason: &str,
    decision: Decision<OrderEvent>,
) -> Decision<OrderEvent> {
    let released = state.skus_where(&Hold::Held);
    let mut decision = decision.and(OrderEvent::Cancelled {
        reason: reason.to_owned(),
        released: released.clone(),
    });
    for sku in &released {
        decision = decision.emit(release(&state.order, sku));
    }
    decision
}

/// The release of `order`'s hold on `sku`.
fn release(order: &str, sku: &str) -> Emit {
    Emit::new("inventory.Release", sku, json!({ "order": order }))
}

/// The outcome's name and its code (a rejection's code, a dead letter's kind).
fn refusal(outcome: &ReplyOutcome) -> (String, Option<String>) {
    let code = match outcome {
        ReplyOutcome::Rejected { code, .. } => code.clone(),
        ReplyOutcome::DeadLettered { kind, .. } => Some(kind.clone()),
        _ => None,
    };
    (outcome.name().to_owned(), code)
}

fn set_hold(state: &mut OrderState, sku: &str, hold: Hold) {
    if let Some(line) = state.lines.get_mut(sku) {
        line.hold = hold;
    }
}

fn not_placed() -> Rejection {
    Rejection::new("not_placed", "the order was not placed")
}

/// Checks an id has 1 to [`MAX_ID_CHARS`] characters, as the schemas demand.
fn valid_id(code: &str, what: &str, id: &str) -> Result<(), Rejection> {
    let chars = id.chars().count();
    if chars == 0 || chars > MAX_ID_CHARS {
        return Err(Rejection::new(
            code,
            format!("{what} has 1 to {MAX_ID_CHARS} characters, not {chars}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
