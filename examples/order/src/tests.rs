//! Given/when/then tests of the saga, and of the commands it sends against the handlers and
//! schemas of the aggregates that receive them.

use super::*;
use chrono::TimeZone;
use commands::testing::given;
use commands::workflow::{OutcomeOf, TimerOp};
use commands::{CommandId, Source};
use serde_json::Value;

use OrderCommand as C;
use OrderEvent as E;

const DEADLINE: u64 = 30;

/// The clock of these tests: 2026-12-01 10:00 UTC plus `seconds`.
fn at(seconds: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 1, 10, 0, 0).unwrap() + Duration::seconds(seconds)
}

fn lines() -> Vec<Line> {
    vec![
        Line {
            sku: "sku-1".into(),
            qty: 2,
        },
        Line {
            sku: "sku-7".into(),
            qty: 1,
        },
    ]
}

fn place() -> C {
    C::Place {
        lines: lines(),
        account: "acc-1".into(),
        amount: 2500,
        deadline: DEADLINE,
    }
}

fn placed() -> E {
    E::Placed {
        order: "ord-1".into(),
        lines: lines(),
        account: "acc-1".into(),
        amount: 2500,
        deadline_at: at(DEADLINE as i64),
    }
}

fn held(sku: &str) -> E {
    E::ReservationHeld { sku: sku.into() }
}

fn payment_requested() -> E {
    E::PaymentRequested {
        account: "acc-1".into(),
        amount: 2500,
    }
}

fn cancelled(reason: &str, released: &[&str]) -> E {
    E::Cancelled {
        reason: reason.into(),
        released: released.iter().map(|s| s.to_string()).collect(),
    }
}

fn applied() -> ReplyOutcome {
    ReplyOutcome::Applied {
        version: 3,
        events: Vec::new(),
    }
}

fn rejected(code: &str) -> ReplyOutcome {
    ReplyOutcome::Rejected {
        code: Some(code.into()),
        reason: format!("refused: {code}"),
    }
}

fn dead_lettered(kind: &str) -> ReplyOutcome {
    ReplyOutcome::DeadLettered {
        kind: kind.into(),
        message: "set aside".into(),
    }
}

/// The outcome of the `command_type` the order `ord-1` sent to `subject`.
fn outcome(command_type: &str, subject: &str, outcome: ReplyOutcome) -> C {
    C::Outcome(CommandOutcome {
        command: OutcomeOf {
            id: format!("{command_type}-{subject}"),
            source: "/aggregates/order/ord-1".into(),
            command_type: command_type.into(),
            subject: subject.into(),
        },
        outcome,
    })
}

fn reservation(sku: &str, result: ReplyOutcome) -> C {
    outcome("inventory.Reserve", sku, result)
}

fn payment(result: ReplyOutcome) -> C {
    outcome("account.Withdraw", "acc-1", result)
}

fn release(sku: &str) -> Emit {
    Emit::new("inventory.Release", sku, json!({"order": "ord-1"}))
}

/// The order's history when paying: placed, both lines held, withdrawal sent.
fn paying() -> Vec<E> {
    vec![placed(), held("sku-1"), held("sku-7"), payment_requested()]
}

/// What `command` decides against `events` at `time`, straight from the handler.
fn decide(events: &[E], command: C, time: Option<DateTime<Utc>>) -> Decision<E> {
    let mut when = given::<Order>(events.to_vec()).when(command).on("ord-1");
    if let Some(time) = time {
        when = when.at(time);
    }
    when.outcome().decision().clone().expect("accepted")
}

#[test]
fn place_reserves_every_line_and_sets_the_deadline() {
    given::<Order>([])
        .when(place())
        .on("ord-1")
        .at(at(0))
        .then_expect([placed()])
        .then_state(|s| {
            assert_eq!(s.status, Status::Reserving);
            assert_eq!(s.skus_where(&Hold::Pending), ["sku-1", "sku-7"]);
            assert_eq!(s.payment, Payment::None);
        });
    let decision = decide(&[], place(), Some(at(0)));
    let ttl = DEADLINE + HOLD_MARGIN_SECS;
    assert_eq!(
        decision.commands,
        [
            Emit::new(
                "inventory.Reserve",
                "sku-1",
                json!({"order": "ord-1", "qty": 2, "ttl": ttl})
            )
            .with_outcome(),
            Emit::new(
                "inventory.Reserve",
                "sku-7",
                json!({"order": "ord-1", "qty": 1, "ttl": ttl})
            )
            .with_outcome(),
        ]
    );
    assert_eq!(
        decision.timers,
        [TimerOp::Schedule {
            name: DEADLINE_TIMER.into(),
            at: at(DEADLINE as i64),
            command: Emit::new("order.Timeout", "ord-1", json!({})),
        }]
    );
}

#[test]
fn the_happy_path_reserves_then_pays_then_confirms() {
    // The first hold: nothing more to do yet.
    let decision = decide(&[placed()], reservation("sku-1", applied()), None);
    assert_eq!(decision.events, [held("sku-1")]);
    assert!(decision.commands.is_empty() && decision.timers.is_empty());
    // The last hold: the payment is asked for.
    given::<Order>([placed(), held("sku-1")])
        .when(reservation("sku-7", applied()))
        .then_expect([held("sku-7"), payment_requested()])
        .then_state(|s| {
            assert_eq!(s.status, Status::Paying);
            assert_eq!(s.payment, Payment::Requested);
        });
    let decision = decide(
        &[placed(), held("sku-1")],
        reservation("sku-7", applied()),
        None,
    );
    assert_eq!(
        decision.commands,
        [Emit::new("account.Withdraw", "acc-1", json!({"amount": 2500})).with_outcome()]
    );
    // Paid: the holds are confirmed and the deadline cancelled.
    given::<Order>(paying())
        .when(payment(applied()))
        .then_expect([E::Confirmed { amount: 2500 }])
        .then_state(|s| {
            assert_eq!(s.status, Status::Confirmed);
            assert_eq!(s.payment, Payment::Taken);
            assert_eq!(s.skus_where(&Hold::Confirmed), ["sku-1", "sku-7"]);
            assert_eq!(s.reason, None);
        });
    let decision = decide(&paying(), payment(applied()), None);
    assert_eq!(
        decision.commands,
        [
            Emit::new("inventory.Confirm", "sku-1", json!({"order": "ord-1"})),
            Emit::new("inventory.Confirm", "sku-7", json!({"order": "ord-1"})),
        ]
    );
    assert_eq!(
        decision.timers,
        [TimerOp::Cancel {
            name: DEADLINE_TIMER.into()
        }]
    );
}

#[test]
fn out_of_stock_cancels_and_releases_what_is_held() {
    given::<Order>([placed(), held("sku-1")])
        .when(reservation("sku-7", rejected("insufficient_stock")))
        .then_expect([
            E::ReservationRefused {
                sku: "sku-7".into(),
                outcome: "rejected".into(),
                code: Some("insufficient_stock".into()),
            },
            cancelled("out_of_stock", &["sku-1"]),
        ])
        .then_state(|s| {
            assert_eq!(s.status, Status::Cancelled);
            assert_eq!(s.reason.as_deref(), Some("out_of_stock"));
            assert_eq!(s.lines["sku-1"].hold, Hold::Released);
            assert_eq!(s.lines["sku-7"].hold, Hold::Refused);
        });
    let decision = decide(
        &[placed(), held("sku-1")],
        reservation("sku-7", rejected("insufficient_stock")),
        None,
    );
    assert_eq!(decision.commands, [release("sku-1")]);
    assert_eq!(
        decision.timers,
        [TimerOp::Cancel {
            name: DEADLINE_TIMER.into()
        }]
    );
    // Another refusal, or a dead letter, is `reservation_refused`; with nothing held,
    // nothing is released.
    for refused in [rejected("invalid_order"), dead_lettered("schema")] {
        let then = given::<Order>([placed()])
            .when(reservation("sku-1", refused))
            .outcome();
        assert_eq!(then.state().reason.as_deref(), Some("reservation_refused"));
        let decision = then.decision().as_ref().unwrap();
        assert!(decision.commands.is_empty(), "{decision:?}");
    }
}

#[test]
fn a_refused_payment_cancels_and_releases_every_hold() {
    given::<Order>(paying())
        .when(payment(rejected("insufficient_funds")))
        .then_expect([
            E::PaymentRefused {
                outcome: "rejected".into(),
                code: Some("insufficient_funds".into()),
            },
            cancelled("payment_refused", &["sku-1", "sku-7"]),
        ])
        .then_state(|s| {
            assert_eq!(s.status, Status::Cancelled);
            assert_eq!(s.payment, Payment::Refused);
            assert_eq!(s.skus_where(&Hold::Released), ["sku-1", "sku-7"]);
        });
    let decision = decide(&paying(), payment(rejected("insufficient_funds")), None);
    assert_eq!(decision.commands, [release("sku-1"), release("sku-7")]);
    assert_eq!(
        decision.timers,
        [TimerOp::Cancel {
            name: DEADLINE_TIMER.into()
        }]
    );
    // A dead-lettered withdrawal took nothing either.
    given::<Order>(paying())
        .when(payment(dead_lettered("parked")))
        .outcome()
        .then_state(|s| assert_eq!(s.reason.as_deref(), Some("payment_refused")));
}

#[test]
fn the_deadline_cancels_an_order_still_reserving_or_paying() {
    // Reserving: the holds known are released; the timer fired, nothing to cancel.
    let history = [placed(), held("sku-1")];
    given::<Order>(history.clone())
        .when(C::Timeout {})
        .at(at(DEADLINE as i64))
        .then_expect([cancelled("timed_out", &["sku-1"])])
        .then_state(|s| assert_eq!(s.lines["sku-7"].hold, Hold::Pending));
    let decision = decide(&history, C::Timeout {}, Some(at(DEADLINE as i64)));
    assert_eq!(decision.commands, [release("sku-1")]);
    assert!(decision.timers.is_empty());
    // Paying: every hold released, the payment still on its way.
    given::<Order>(paying())
        .when(C::Timeout {})
        .at(at(DEADLINE as i64))
        .then_expect([cancelled("timed_out", &["sku-1", "sku-7"])])
        .then_state(|s| {
            assert_eq!(s.status, Status::Cancelled);
            assert_eq!(s.payment, Payment::Requested);
        });
}

#[test]
fn a_payment_applied_after_the_timeout_is_refunded() {
    let mut history = paying();
    history.push(cancelled("timed_out", &["sku-1", "sku-7"]));
    given::<Order>(history.clone())
        .when(payment(applied()))
        .then_expect([E::Refunded { amount: 2500 }])
        .then_state(|s| {
            assert_eq!(s.status, Status::Cancelled);
            assert_eq!(s.reason.as_deref(), Some("timed_out"));
            assert_eq!(s.payment, Payment::Refunded);
        });
    let decision = decide(&history, payment(applied()), None);
    assert_eq!(
        decision.commands,
        [Emit::new(
            "account.Deposit",
            "acc-1",
            json!({"amount": 2500})
        )]
    );
    assert!(decision.timers.is_empty());
    // Refused after the timeout: recorded, nothing to give back.
    let decision = decide(&history, payment(rejected("insufficient_funds")), None);
    assert!(decision.commands.is_empty());
    // Refunded once: a repeat changes nothing.
    history.push(E::Refunded { amount: 2500 });
    given::<Order>(history)
        .when(payment(applied()))
        .then_expect([]);
}

#[test]
fn a_reservation_applied_after_the_cancellation_is_released() {
    let history = [
        placed(),
        E::ReservationRefused {
            sku: "sku-1".into(),
            outcome: "rejected".into(),
            code: Some("insufficient_stock".into()),
        },
        cancelled("out_of_stock", &[]),
    ];
    given::<Order>(history.clone())
        .when(reservation("sku-7", applied()))
        .then_expect([E::LateHoldReleased {
            sku: "sku-7".into(),
        }])
        .then_state(|s| {
            assert_eq!(s.lines["sku-7"].hold, Hold::Released);
            assert_eq!(s.reason.as_deref(), Some("out_of_stock"));
        });
    let decision = decide(&history, reservation("sku-7", applied()), None);
    assert_eq!(decision.commands, [release("sku-7")]);
    // Refused after the cancellation: recorded, nothing to release, no second cancel.
    let decision = decide(
        &history,
        reservation("sku-7", rejected("insufficient_stock")),
        None,
    );
    assert_eq!(decision.events.len(), 1);
    assert!(decision.commands.is_empty() && decision.timers.is_empty());
}

#[test]
fn what_the_order_knows_already_changes_nothing() {
    // An outcome for a line whose outcome is known.
    for history in [
        vec![placed(), held("sku-1")],
        paying(),
        vec![placed(), held("sku-1"), cancelled("timed_out", &["sku-1"])],
    ] {
        for result in [applied(), rejected("insufficient_stock")] {
            given::<Order>(history.clone())
                .when(reservation("sku-1", result))
                .then_expect([]);
        }
    }
    // A payment outcome before it was asked for, or after it is known.
    let mut confirmed = paying();
    confirmed.push(E::Confirmed { amount: 2500 });
    for history in [vec![placed()], confirmed.clone()] {
        given::<Order>(history)
            .when(payment(applied()))
            .then_expect([]);
    }
    // A timeout after the order ended.
    let mut cancelled_order = paying();
    cancelled_order.push(cancelled("payment_refused", &["sku-1", "sku-7"]));
    for history in [confirmed, cancelled_order] {
        let decision = decide(&history, C::Timeout {}, Some(at(DEADLINE as i64)));
        assert!(decision.events.is_empty() && decision.commands.is_empty());
    }
    // Placing again.
    given::<Order>([placed()])
        .when(place())
        .at(at(1))
        .then_reject("already_placed");
}

#[test]
fn commands_the_order_did_not_expect_are_rejected() {
    given::<Order>([])
        .when(C::Timeout {})
        .then_reject("not_placed");
    given::<Order>([])
        .when(reservation("sku-1", applied()))
        .then_reject("not_placed");
    given::<Order>([placed()])
        .when(C::Timeout {})
        .at(at(DEADLINE as i64 - 1))
        .then_reject("not_due");
    given::<Order>([placed()])
        .when(C::Timeout {})
        .then_reject("time_required");
    given::<Order>([placed()])
        .when(reservation("sku-9", applied()))
        .then_reject("unexpected_outcome");
    given::<Order>([placed()])
        .when(outcome("inventory.Release", "sku-1", applied()))
        .then_reject("unexpected_outcome");
    let mut foreign = reservation("sku-1", applied());
    if let C::Outcome(o) = &mut foreign {
        o.command.source = "/aggregates/order/ord-2".into();
    }
    given::<Order>([placed()])
        .when(foreign)
        .then_reject("unexpected_outcome");
}

#[test]
fn a_bad_order_is_rejected_before_anything_is_sent() {
    let with = |f: &dyn Fn(&mut C)| {
        let mut command = place();
        f(&mut command);
        command
    };
    let cases: Vec<(C, &str)> = vec![
        (
            with(&|c| {
                if let C::Place { lines, .. } = c {
                    lines.clear();
                }
            }),
            "invalid_lines",
        ),
        (
            with(&|c| {
                if let C::Place { lines, .. } = c {
                    lines[1].sku = "sku-1".into();
                }
            }),
            "duplicate_sku",
        ),
        (
            with(&|c| {
                if let C::Place { lines, .. } = c {
                    lines[0].qty = 0;
                }
            }),
            "invalid_quantity",
        ),
        (
            with(&|c| {
                if let C::Place { amount, .. } = c {
                    *amount = 0;
                }
            }),
            "invalid_amount",
        ),
        (
            with(&|c| {
                if let C::Place { deadline, .. } = c {
                    *deadline = 0;
                }
            }),
            "invalid_deadline",
        ),
        (
            with(&|c| {
                if let C::Place { account, .. } = c {
                    account.clear();
                }
            }),
            "invalid_account",
        ),
    ];
    for (command, code) in cases {
        given::<Order>([])
            .when(command)
            .at(at(0))
            .then_reject(code)
            .then_state(|s| assert_eq!(s.status, Status::New));
    }
    given::<Order>([])
        .when(place())
        .then_reject("time_required");
}

/// `(name, data)` of an event or command in serde's externally tagged form.
fn split<T: Serialize>(value: &T) -> (String, Value) {
    match serde_json::to_value(value).unwrap() {
        Value::Object(map) if map.len() == 1 => map.into_iter().next().unwrap(),
        other => panic!("not an externally tagged variant: {other}"),
    }
}

#[test]
fn the_registry_checks_clean_with_the_aggregates_the_order_talks_to() {
    registry()
        .check()
        .expect("every command and event has a schema");
    let all = register(inventory::register(bank::registry()));
    all.check().expect("bank, inventory and order together");
    assert_eq!(
        all.types().collect::<Vec<_>>(),
        ["account", "inventory", "order", "room"]
    );
}

#[test]
fn every_schema_example_validates_and_deserializes() {
    let registry = registry();
    let schemas = registry.schemas();
    for (path, text) in SCHEMA_FILES {
        if path.ends_with("Outcome.json") {
            continue; // `commands`' own schema, tested there.
        }
        let schema: Value = serde_json::from_str(text).unwrap();
        let (kind, file) = path.split_once('/').unwrap();
        let name = file.strip_suffix(".json").unwrap();
        assert_eq!(
            schema["$id"],
            format!("https://cmdproc.dev/schemas/order/{path}")
        );
        assert_eq!(schema["title"], format!("order.{name}"));
        for example in schema["examples"].as_array().expect("examples") {
            let tagged = json!({ name: example });
            if kind == "commands" {
                schemas
                    .validate_command_data("order", name, example)
                    .unwrap_or_else(|e| panic!("{path}: {example}: {e}"));
                serde_json::from_value::<C>(tagged).unwrap();
            } else {
                schemas
                    .validate_event_data("order", name, example)
                    .unwrap_or_else(|e| panic!("{path}: {example}: {e}"));
                serde_json::from_value::<E>(tagged).unwrap();
            }
        }
    }
}

/// A small world of one order, its SKUs and its account, driven by the real handlers of
/// all three: every command the order sends is delivered (in an order `pick` chooses among
/// those waiting), with its outcome back to the order when asked, and timers fire when
/// `pick` chooses them. Checks every command sent, and every event recorded, against the
/// receivers' schemas.
struct World {
    order: OrderState,
    skus: BTreeMap<String, inventory::InventoryState>,
    account: bank::account::AccountState,
    /// Commands on their way: (target type, subject, command type, data, with outcome).
    waiting: Vec<Emit>,
    /// Timers of the order and the SKUs: (owner, name) -> (due, command).
    timers: BTreeMap<(String, String), (DateTime<Utc>, Emit)>,
    all: Registry,
    deposited: i64,
}

impl World {
    fn new(stock: &[(&str, u64)], balance: i64) -> World {
        let mut world = World {
            order: OrderState::default(),
            skus: BTreeMap::new(),
            account: Default::default(),
            waiting: Vec::new(),
            timers: BTreeMap::new(),
            all: register(inventory::register(bank::registry())),
            deposited: balance,
        };
        for (sku, qty) in stock {
            let mut state = inventory::InventoryState::default();
            inventory::Inventory::apply(
                &mut state,
                &inventory::InventoryEvent::Received {
                    qty: *qty,
                    available: *qty,
                },
            );
            world.skus.insert(sku.to_string(), state);
        }
        for event in [
            bank::account::AccountEvent::Opened { owner: "a".into() },
            bank::account::AccountEvent::Deposited {
                amount: balance,
                balance,
            },
        ] {
            bank::Account::apply(&mut world.account, &event);
        }
        world
    }

    /// Delivers `emit` at `now`; returns its outcome, as the engine reports it.
    fn deliver(&mut self, emit: &Emit, now: DateTime<Utc>) -> ReplyOutcome {
        let (aggregate_type, name) = emit.command_type.split_once('.').unwrap();
        self.all
            .schemas()
            .validate_command_data(aggregate_type, name, &emit.data)
            .unwrap_or_else(|e| panic!("{} {}: {e}", emit.command_type, emit.data));
        let id = CommandId::parse("w-1").unwrap();
        let source = Source::parse("/aggregates/order/ord-1").unwrap();
        let context = Context::new(&id, &source, 1)
            .with_time(Some(now))
            .with_aggregate_id(&emit.subject);
        let tagged = json!({ name: emit.data });
        macro_rules! run {
            ($aggregate:ty, $state:expr, $owner:expr) => {{
                let command = serde_json::from_value(tagged).unwrap();
                match <$aggregate>::handle($state, &command, &context) {
                    Ok(decision) => {
                        for event in &decision.events {
                            let (event_name, data) = split(event);
                            self.all
                                .schemas()
                                .validate_event_data(aggregate_type, &event_name, &data)
                                .unwrap_or_else(|e| panic!("{event_name} {data}: {e}"));
                            <$aggregate>::apply($state, event);
                        }
                        self.waiting.extend(decision.commands.iter().cloned());
                        for op in decision.timers {
                            match op {
                                TimerOp::Schedule { name, at, command } => {
                                    self.timers.insert(($owner, name), (at, command));
                                }
                                TimerOp::Cancel { name } => {
                                    self.timers.remove(&($owner, name));
                                }
                                _ => unreachable!(),
                            }
                        }
                        applied()
                    }
                    Err(rejection) => rejected(&rejection.code),
                }
            }};
        }
        let result = match aggregate_type {
            "order" => run!(Order, &mut self.order, "ord-1".to_owned()),
            "inventory" => {
                let mut state = self.skus.remove(&emit.subject).unwrap_or_default();
                let result = run!(inventory::Inventory, &mut state, emit.subject.clone());
                self.skus.insert(emit.subject.clone(), state);
                result
            }
            "account" => run!(bank::Account, &mut self.account, "acc-1".to_owned()),
            other => panic!("no aggregate {other}"),
        };
        if emit.outcome {
            let back = Emit::new(
                "order.Outcome",
                "ord-1",
                serde_json::to_value(CommandOutcome {
                    command: OutcomeOf {
                        id: "x".into(),
                        source: "/aggregates/order/ord-1".into(),
                        command_type: emit.command_type.clone(),
                        subject: emit.subject.clone(),
                    },
                    outcome: result.clone(),
                })
                .unwrap(),
            );
            self.waiting.push(back);
        }
        result
    }

    /// Runs until nothing waits and no timer is left, choosing the next step with `pick`:
    /// a command waiting, or the timer due first, which fires at its due time. A command
    /// takes less than [`HOLD_MARGIN_SECS`] to arrive (what the margin is for), so a timer
    /// due that much later than now fires only when nothing waits.
    fn run(&mut self, mut pick: impl FnMut(usize) -> usize) {
        let mut now = at(0);
        let place = Emit::command(Order::TYPE, "ord-1", &place());
        self.deliver(&place, now);
        let margin = Duration::seconds(HOLD_MARGIN_SECS as i64);
        for _ in 0..1_000 {
            let first_timer = self
                .timers
                .iter()
                .min_by_key(|(_, (due, _))| *due)
                .map(|(key, (due, _))| (key.clone(), *due))
                .filter(|(_, due)| self.waiting.is_empty() || *due < now + margin);
            let steps = self.waiting.len() + usize::from(first_timer.is_some());
            if steps == 0 {
                assert!(self.timers.is_empty(), "{:?}", self.timers);
                return;
            }
            let chosen = pick(steps);
            if chosen < self.waiting.len() {
                let emit = self.waiting.remove(chosen);
                self.deliver(&emit, now);
            } else {
                let (key, due) = first_timer.expect("a timer was chosen");
                let (_, emit) = self.timers.remove(&key).expect("pending");
                now = now.max(due);
                self.deliver(&emit, due);
            }
        }
        panic!("the conversation did not end");
    }
}

#[test]
fn every_interleaving_ends_with_stock_and_money_conserved() {
    // Stock for both lines, or not for sku-7; money enough, or not. Each world runs many
    // times, each time delivering what waits (and firing timers) in another order.
    let mut ends = BTreeMap::<String, usize>::new();
    for (stock, balance) in [
        (vec![("sku-1", 5), ("sku-7", 5)], 10_000),
        (vec![("sku-1", 5), ("sku-7", 0)], 10_000),
        (vec![("sku-1", 5), ("sku-7", 5)], 100),
    ] {
        for seed in 0..300u64 {
            let mut world = World::new(&stock, balance);
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            world.run(|n| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng % n as u64) as usize
            });
            let order = &world.order;
            assert!(order.has_ended(), "seed {seed}: {order:?}");
            let key = format!("{:?} {:?}", order.status, order.reason);
            *ends.entry(key).or_default() += 1;
            if order.payment == Payment::Refunded {
                *ends.entry("refunded".into()).or_default() += 1;
            }
            let confirmed = order.status == Status::Confirmed;
            // Stock: nothing held once all is done; sold only for a confirmed order.
            for (sku, state) in &world.skus {
                assert!(state.is_balanced(), "{sku}: {state:?}");
                assert!(state.held.is_empty(), "seed {seed} {sku}: {state:?}");
                let sold = state.confirmed.get("ord-1").copied().unwrap_or(0);
                let want = if confirmed { order.lines[sku].qty } else { 0 };
                assert_eq!(sold, want, "seed {seed} {sku}");
            }
            // Money: taken once for a confirmed order, given back otherwise.
            let captured = if confirmed { order.amount } else { 0 };
            assert_eq!(
                world.account.balance + captured,
                world.deposited,
                "seed {seed}: {order:?}"
            );
        }
    }
    // The interleavings reached every end: confirmed, each refusal, and timeouts.
    for end in [
        "Confirmed None",
        "Cancelled Some(\"out_of_stock\")",
        "Cancelled Some(\"payment_refused\")",
        "Cancelled Some(\"timed_out\")",
        "refunded",
    ] {
        assert!(ends.contains_key(end), "{end}: {ends:?}");
    }
}

#[test]
fn the_status_says_where_the_order_stands_and_why_it_was_cancelled() {
    let state_after = |events: &[E]| given::<Order>(events.to_vec()).state().clone();
    assert_eq!(
        Order::status(&OrderState::default()).as_deref(),
        Some("new")
    );
    assert_eq!(
        Order::status(&state_after(&[placed()])).as_deref(),
        Some("reserving")
    );
    assert_eq!(
        Order::status(&state_after(&paying())).as_deref(),
        Some("paying")
    );
    assert_eq!(
        Order::status(&state_after(&[placed(), cancelled("out_of_stock", &[])])).as_deref(),
        Some("cancelled:out_of_stock")
    );
}
