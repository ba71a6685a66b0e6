//! The order saga end to end, against the real broker and database, with the stock
//! `cmdproc` binary (which registers `account`, `inventory` and `order`): accounts opened
//! and funded, stock received, then orders placed over many SKUs (some scarce), from many
//! accounts (some short of money, two never opened), a few with a deadline already passed
//! so that they time out, and a few walk-in holds that expire by themselves. Three workers,
//! one killed with SIGKILL in the middle of the run and started again. Once every order has
//! ended and nothing moves any more: every order is confirmed or cancelled, stock and money
//! are conserved, a confirmed order paid once, no emitted command had a second effect, and
//! a replay of every partition while the workers run changes no aggregate.
//!
//! `CMDPROC_SAGA_ORDERS` sets the number of orders (default 2,000). Needs
//! `deploy/local/up.sh`.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use chrono::Utc;
use commands::{AggregateId, Command, CommandId, CommandType, Source};
use inventory::InventoryState;
use order::{OrderState, Payment, Status};
use serde_json::{json, Value};
use sqlx::Row;
use support::{
    cmdproc_on, free_addr, outbox_backlog, produce_and_wait, produce_in_slices, TestDb, TestTopics,
    WorkerProcess,
};

/// The source of every command this test produces.
const SOURCE: &str = "/saga-e2e";
const PARTITIONS: i32 = 6;
const SKUS: usize = 50;
const ACCOUNTS: usize = 200;
/// Every `SCARCE_EVERY`-th SKU has [`SCARCE_STOCK`] units, the others plenty.
const SCARCE_EVERY: usize = 10;
const SCARCE_STOCK: u64 = 6;
const PLENTY: u64 = 1_000_000;
/// Every `SHORT_EVERY`-th account has [`SHORT_BALANCE`], the others plenty.
const SHORT_EVERY: usize = 10;
const SHORT_BALANCE: i64 = 800;
const RICH_BALANCE: i64 = 100_000_000;
/// Accounts that orders pay from but that are never opened: their payments are refused.
const UNOPENED: [&str; 2] = ["acc-closed-1", "acc-closed-2"];
/// Every `LATE_EVERY`-th order is placed with a `time` a minute ago and a 1 s deadline: its
/// deadline timer is due at once, so it almost always times out before it pays.
const LATE_EVERY: usize = 25;
/// The deadline of the other orders, in seconds: long enough that a loaded run pays first.
const DEADLINE: u64 = 120;
/// Walk-in holds: direct reservations with a 1 s ttl and no order behind them.
const WALK_INS: usize = 20;

fn cmd(id: String, ty: &str, subject: &str, data: Value) -> Command {
    let mut command = Command::new(
        Source::parse(SOURCE).unwrap(),
        CommandId::parse(id).unwrap(),
        CommandType::parse(ty).unwrap(),
        AggregateId::parse(subject).unwrap(),
        data,
    );
    // Timers count from the command's time.
    command.time = Some(Utc::now());
    command
}

/// A deterministic pseudo-random sequence (Knuth's MMIX LCG).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

fn sku(i: usize) -> String {
    format!("sku-{i}")
}

fn account(i: usize) -> String {
    format!("acc-{i}")
}

/// What the test sent, to check the end against.
#[derive(Debug, Default)]
struct Plan {
    /// Accounts opened and funded, with the balance deposited.
    deposited: BTreeMap<String, i64>,
    /// Units received per SKU.
    received: BTreeMap<String, u64>,
    /// The setup commands (opens, deposits, receipts).
    setup: Vec<Command>,
    /// The orders placed and the walk-in holds.
    orders: Vec<Command>,
    /// The order ids, and the late ones among them.
    order_ids: Vec<String>,
    late: BTreeSet<String>,
    /// The end an order must reach whatever the interleaving, when it has one: not late,
    /// no scarce SKU, and paid from a rich account (`confirmed`) or an unopened one
    /// (`payment_refused`). The others race for stock or money.
    certain: BTreeMap<String, &'static str>,
    /// Walk-in hold ids by SKU.
    walk_ins: Vec<(String, String)>,
}

fn plan(seed: u64, orders: usize) -> Plan {
    let mut rng = Lcg(seed);
    let mut plan = Plan::default();
    for a in 0..ACCOUNTS {
        let balance = if a % SHORT_EVERY == 0 {
            SHORT_BALANCE
        } else {
            RICH_BALANCE
        };
        let id = account(a);
        plan.setup.push(cmd(
            format!("open-{id}"),
            "account.Open",
            &id,
            json!({"owner": format!("owner of {id}")}),
        ));
        plan.setup.push(cmd(
            format!("fund-{id}"),
            "account.Deposit",
            &id,
            json!({ "amount": balance }),
        ));
        plan.deposited.insert(id, balance);
    }
    for s in 0..SKUS {
        let qty = if s % SCARCE_EVERY == 0 {
            SCARCE_STOCK
        } else {
            PLENTY
        };
        plan.setup.push(cmd(
            format!("receive-{}", sku(s)),
            "inventory.Receive",
            &sku(s),
            json!({ "qty": qty }),
        ));
        plan.received.insert(sku(s), qty);
    }
    for o in 0..orders {
        let id = format!("ord-{o}");
        let line_count = 1 + rng.below(3) as usize;
        let mut skus = BTreeSet::new();
        while skus.len() < line_count {
            skus.insert(rng.below(SKUS as u64) as usize);
        }
        let lines: Vec<Value> = skus
            .iter()
            .map(|s| json!({"sku": sku(*s), "qty": 1 + rng.below(3)}))
            .collect();
        let amount: u64 = lines.iter().map(|l| l["qty"].as_u64().unwrap() * 100).sum();
        let payer = match rng.below(100) {
            0 => UNOPENED[0].to_owned(),
            1 => UNOPENED[1].to_owned(),
            _ => account(rng.below(ACCOUNTS as u64) as usize),
        };
        let late = o % LATE_EVERY == LATE_EVERY - 1;
        let mut place = cmd(
            format!("place-{id}"),
            "order.Place",
            &id,
            json!({
                "lines": lines,
                "account": payer,
                "amount": amount,
                "deadline": if late { 1 } else { DEADLINE },
            }),
        );
        if late {
            place.time = Some(Utc::now() - chrono::Duration::seconds(60));
            plan.late.insert(id.clone());
        } else if skus.iter().all(|s| s % SCARCE_EVERY != 0) {
            if UNOPENED.contains(&payer.as_str()) {
                plan.certain.insert(id.clone(), "payment_refused");
            } else if plan.deposited[&payer] == RICH_BALANCE {
                plan.certain.insert(id.clone(), "confirmed");
            }
        }
        plan.orders.push(place);
        plan.order_ids.push(id.clone());
        if o % (orders / WALK_INS).max(1) == 0 && plan.walk_ins.len() < WALK_INS {
            let hold = format!("walk-in-{o}");
            // A SKU with plenty of stock, so that the hold is taken (and then expires).
            let mut i = 1 + rng.below(SKUS as u64 - 1) as usize;
            if i % SCARCE_EVERY == 0 {
                i += 1;
            }
            let s = sku(i);
            plan.orders.push(cmd(
                format!("reserve-{hold}"),
                "inventory.Reserve",
                &s,
                json!({"order": hold, "qty": 1, "ttl": 1}),
            ));
            plan.walk_ins.push((s, hold));
        }
    }
    plan
}

/// Every aggregate row: `(type, id) -> (version, state)`.
async fn aggregates(db: &TestDb) -> BTreeMap<(String, String), (i64, Value)> {
    sqlx::query("SELECT aggregate_type, aggregate_id, version, state FROM aggregates")
        .fetch_all(&db.pool)
        .await
        .expect("read aggregates")
        .into_iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
        .collect()
}

/// What says whether anything still moves: commands processed, events stored, duplicate
/// deliveries, pending timers, unpublished outbox rows.
async fn activity(db: &TestDb, topics: &TestTopics) -> (i64, i64, i64, i64, i64) {
    let count = |sql: &'static str| async move {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&db.pool)
            .await
            .expect(sql)
    };
    (
        count("SELECT count(*) FROM processed_commands").await,
        count("SELECT count(*) FROM events").await,
        count("SELECT count(*) FROM duplicate_deliveries").await,
        count("SELECT count(*) FROM timers").await,
        outbox_backlog(db, &topics.commands).await,
    )
}

/// Waits until every order has ended, no SKU holds anything, no timer is pending, the outbox
/// is published and nothing changed for `quiet`; panics with the workers' logs after
/// `timeout`. Returns how long it took.
async fn settle(
    db: &TestDb,
    topics: &TestTopics,
    orders: usize,
    quiet: Duration,
    timeout: Duration,
    workers: &[&WorkerProcess],
) -> Duration {
    let start = Instant::now();
    let mut last = None;
    let mut still_since = Instant::now();
    loop {
        let ended: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM aggregates WHERE aggregate_type = 'order'
             AND state->>'status' IN ('confirmed', 'cancelled')",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        let holding: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM aggregates WHERE aggregate_type = 'inventory'
             AND state->'held' <> '{}'::jsonb",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        let now = activity(db, topics).await;
        if last != Some(now) {
            last = Some(now);
            still_since = Instant::now();
        }
        let idle = now.3 == 0 && now.4 == 0;
        if ended as usize == orders && holding == 0 && idle && still_since.elapsed() >= quiet {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            let logs: Vec<String> = workers
                .iter()
                .map(|w| format!("--- {}\n{}", w.log.display(), w.log_tail(40)))
                .collect();
            panic!(
                "not settled within {timeout:?}: {ended}/{orders} orders ended, {holding} SKUs \
                 holding, (processed, events, duplicates, timers, outbox) = {now:?}\n{}",
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn spawn(db: &TestDb, topics: &TestTopics, name: &str) -> WorkerProcess {
    let addr = free_addr();
    WorkerProcess::spawn(
        db,
        topics,
        name,
        &["--metrics-addr", &addr, "--batch-size", "500"],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_end_confirmed_or_cancelled_with_stock_and_money_conserved() {
    let orders: usize = std::env::var("CMDPROC_SAGA_ORDERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000);
    let plan = plan(2026, orders);
    let db = TestDb::new().await;
    let topics = TestTopics::new(PARTITIONS).await;
    let mut workers = vec![
        spawn(&db, &topics, "saga-1"),
        spawn(&db, &topics, "saga-2"),
        spawn(&db, &topics, "saga-3"),
    ];

    // Accounts and stock first.
    let refs: Vec<&WorkerProcess> = workers.iter().collect();
    produce_and_wait(&db, &topics, &plan.setup, Duration::from_secs(120), &refs).await;

    // The orders, in slices, with a worker killed in the middle of the run and restarted.
    let started = Instant::now();
    let producing = produce_in_slices(
        &topics,
        plan.orders.clone(),
        100,
        Duration::from_millis(100),
    );
    // In the thick of it: the orders are still arriving and their conversations running.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    workers[1].kill9();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    workers[1] = spawn(&db, &topics, "saga-2-restarted");
    let produced = producing.await.expect("produce the orders");
    assert_eq!(produced.len(), plan.orders.len());
    let refs: Vec<&WorkerProcess> = workers.iter().collect();
    let took = settle(
        &db,
        &topics,
        orders,
        Duration::from_secs(4),
        Duration::from_secs(300),
        &refs,
    )
    .await;
    let elapsed = started.elapsed();

    let stored = aggregates(&db).await;
    let order_states: BTreeMap<String, OrderState> = stored
        .iter()
        .filter(|((t, _), _)| t == "order")
        .map(|((_, id), (_, state))| {
            let state = serde_json::from_value(state.clone()).expect("an order's state");
            (id.clone(), state)
        })
        .collect();
    let sku_states: BTreeMap<String, InventoryState> = stored
        .iter()
        .filter(|((t, _), _)| t == "inventory")
        .map(|((_, id), (_, state))| {
            let state = serde_json::from_value(state.clone()).expect("a SKU's state");
            (id.clone(), state)
        })
        .collect();
    let balances: BTreeMap<String, i64> = stored
        .iter()
        .filter(|((t, _), _)| t == "account")
        .map(|((_, id), (_, state))| (id.clone(), state["balance"].as_i64().unwrap()))
        .collect();

    // Every order ended, confirmed or cancelled with a reason.
    assert_eq!(order_states.len(), orders, "every order was placed");
    let mut ends = BTreeMap::<String, usize>::new();
    for (id, state) in &order_states {
        let end = match state.status {
            Status::Confirmed => "confirmed".to_owned(),
            Status::Cancelled => state.reason.clone().expect("a cancelled order's reason"),
            other => panic!("order {id} ended {other:?}: {state:?}"),
        };
        *ends.entry(end).or_default() += 1;
    }
    let refunded = order_states
        .values()
        .filter(|s| s.payment == Payment::Refunded)
        .count();
    let late_timed_out = plan
        .late
        .iter()
        .filter(|id| order_states[*id].reason.as_deref() == Some("timed_out"))
        .count();
    eprintln!(
        "saga: {orders} orders ({} late, {} with a certain end) settled in {elapsed:.1?} (last end {took:.1?} after \
         the first order); ends {ends:?}; {refunded} refunded after a timeout; \
         {late_timed_out} late orders timed out",
        plan.late.len(),
        plan.certain.len()
    );
    // Where the interleaving cannot matter, the order ended as a serial run would end it.
    for (id, want) in &plan.certain {
        let state = &order_states[id];
        let end = match state.status {
            Status::Confirmed => "confirmed",
            _ => state.reason.as_deref().unwrap_or_default(),
        };
        assert_eq!(end, *want, "{id}: {state:?}");
    }
    for end in ["confirmed", "out_of_stock", "payment_refused", "timed_out"] {
        assert!(ends.contains_key(end), "no order ended {end}: {ends:?}");
    }

    // Stock: every unit received is available, held or sold; nothing is held once things
    // settle (a cancelled order holds nothing, walk-in holds expired); each SKU sold exactly
    // what its confirmed orders bought.
    let mut bought = BTreeMap::<String, BTreeMap<String, u64>>::new();
    for (id, state) in &order_states {
        if state.status == Status::Confirmed {
            for (s, line) in &state.lines {
                bought
                    .entry(s.clone())
                    .or_default()
                    .insert(id.clone(), line.qty);
            }
        }
    }
    let mut units = 0u64;
    for (s, received) in &plan.received {
        let state = &sku_states[s];
        assert!(state.is_balanced(), "{s}: {state:?}");
        assert_eq!(state.on_hand, *received, "{s}: on hand");
        assert!(state.held.is_empty(), "{s} still holds {:?}", state.held);
        assert_eq!(
            state.confirmed,
            bought.get(s).cloned().unwrap_or_default(),
            "{s}: sales against confirmed orders"
        );
        units += state.available + state.sold;
    }
    assert_eq!(
        units,
        plan.received.values().sum::<u64>(),
        "units conserved"
    );
    let expired: Vec<(String, String)> = sqlx::query(
        "SELECT aggregate_id, data->>'order' FROM events WHERE event_type = 'inventory.Expired'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    for walk_in in &plan.walk_ins {
        assert!(expired.contains(walk_in), "{walk_in:?} did not expire");
    }
    // How long past its expiry each walk-in hold lasted (or past its reservation, for one
    // already due when it was made: the commands' times are taken before they are
    // produced): the timer's tick plus a batch, unless the worker owning its SKU was the
    // one killed (a session timeout more).
    let lateness: Vec<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM (x.created_at
                - GREATEST((r.data->>'expires_at')::timestamptz, r.created_at)))::float8
         FROM events x JOIN events r ON r.aggregate_id = x.aggregate_id
          AND r.event_type = 'inventory.Reserved' AND r.data->>'order' = x.data->>'order'
         WHERE x.event_type = 'inventory.Expired' AND x.data->>'order' LIKE 'walk-in-%'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(lateness.len(), plan.walk_ins.len());
    let latest = lateness.iter().copied().fold(0.0, f64::max);
    assert!(
        lateness.iter().all(|late| *late >= 0.0),
        "a hold expired early: {lateness:?}"
    );
    assert!(latest < 15.0, "a hold outlived its expiry by {latest:.1} s");
    let mut sorted = lateness.clone();
    sorted.sort_by(f64::total_cmp);
    eprintln!(
        "saga: walk-in holds ended {:.2} s (median) and at most {latest:.2} s after their expiry",
        sorted[sorted.len() / 2]
    );

    // Money: balances plus what confirmed orders captured is what was deposited; no
    // balance negative.
    let captured: i64 = order_states
        .values()
        .filter(|s| s.status == Status::Confirmed)
        .map(|s| s.amount)
        .sum();
    assert!(balances.values().all(|b| *b >= 0), "{balances:?}");
    assert_eq!(
        balances.values().sum::<i64>() + captured,
        plan.deposited.values().sum::<i64>(),
        "money conserved"
    );

    // Per order, what its account recorded: a confirmed order's payment was taken once and
    // not given back; a cancelled order's was given back as often as it was taken.
    let mut effects = HashMap::<(String, String), i64>::new();
    for r in sqlx::query(
        "SELECT source, event_type, count(*) FROM events WHERE aggregate_type = 'account'
         AND source LIKE '/aggregates/order/%' GROUP BY source, event_type",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    {
        let source: String = r.get(0);
        let order = source.trim_start_matches("/aggregates/order/").to_owned();
        effects.insert((order, r.get(1)), r.get(2));
    }
    for (id, state) in &order_states {
        let withdrawn = effects
            .get(&(id.clone(), "account.Withdrawn".into()))
            .copied()
            .unwrap_or(0);
        let refunded = effects
            .get(&(id.clone(), "account.Deposited".into()))
            .copied()
            .unwrap_or(0);
        match state.status {
            Status::Confirmed => assert_eq!((withdrawn, refunded), (1, 0), "{id}: {state:?}"),
            _ => {
                assert_eq!(withdrawn, refunded, "{id}: {state:?}");
                assert!(withdrawn <= 1, "{id}");
                assert_eq!(
                    withdrawn == 1,
                    state.payment == Payment::Refunded,
                    "{id}: {state:?}"
                );
            }
        }
    }

    // No emitted command had a second effect: each step of an order (its reservation,
    // confirmation or release of a SKU, its withdrawal or refund) was processed once, and
    // every processed command stored exactly the events it recorded.
    let repeated: Vec<(String, String, String, i64)> = sqlx::query(
        "SELECT source, command_type, aggregate_id, count(*) FROM processed_commands
         WHERE source LIKE '/aggregates/order/%'
         GROUP BY source, command_type, aggregate_id HAVING count(*) > 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect();
    assert!(repeated.is_empty(), "steps processed twice: {repeated:?}");
    let mismatched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM processed_commands p
         LEFT JOIN (SELECT source, command_id, count(*) AS stored FROM events
                    GROUP BY source, command_id) e USING (source, command_id)
         WHERE cardinality(p.event_ids) <> COALESCE(e.stored, 0)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        mismatched, 0,
        "commands whose stored events differ from their outcome"
    );
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events e WHERE NOT EXISTS (SELECT 1 FROM processed_commands p
         WHERE p.source = e.source AND p.command_id = e.command_id)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(orphans, 0, "events without their command");
    let dead_letters: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(dead_letters, 0, "every command was valid");
    let (processed, events, duplicates, _, _) = activity(&db, &topics).await;
    eprintln!(
        "saga: {processed} commands processed, {events} events, {duplicates} duplicate \
         deliveries before the replay"
    );

    // A replay of every partition while the workers run changes no order, hold or balance.
    let replay_started = Instant::now();
    let (ok, out) = cmdproc_on(
        &db,
        &topics,
        "replay",
        &[
            "--partitions",
            "all",
            "--from-offset",
            "0",
            "--timeout",
            "240s",
        ],
    );
    assert!(ok, "replay failed:\n{out}");
    let refs: Vec<&WorkerProcess> = workers.iter().collect();
    settle(
        &db,
        &topics,
        orders,
        Duration::from_secs(4),
        Duration::from_secs(240),
        &refs,
    )
    .await;
    let after = aggregates(&db).await;
    let changed: Vec<&(String, String)> = stored
        .keys()
        .chain(after.keys())
        .filter(|key| stored.get(*key) != after.get(*key))
        .collect();
    assert!(changed.is_empty(), "the replay changed {changed:?}");
    let (processed_after, events_after, duplicates_after, _, _) = activity(&db, &topics).await;
    assert_eq!(
        (processed_after, events_after),
        (processed, events),
        "the replay recorded nothing new"
    );
    assert!(duplicates_after > duplicates, "the replay was consumed");
    eprintln!(
        "saga: the replay delivered {} commands again, all duplicates, in {:.1?}",
        duplicates_after - duplicates,
        replay_started.elapsed()
    );

    // `verify` re-executes the retained commands (the sagas' outcomes and timers among
    // them) through the same handlers: the same states.
    let verify_started = Instant::now();
    let (ok, out) = cmdproc_on(&db, &topics, "verify", &[]);
    assert!(ok, "verify failed:\n{out}");
    assert!(!out.contains("difference:"), "{out}");
    eprintln!(
        "saga: {} in {:.1?}",
        out.lines().last().unwrap_or_default(),
        verify_started.elapsed()
    );

    drop(workers);
    db.drop_db().await;
}
