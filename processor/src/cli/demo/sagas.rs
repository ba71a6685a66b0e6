//! The demo's workflow part: orders placed against the demo's accounts and a few SKUs, each
//! a saga (`order`) that reserves stock on other partitions (`inventory`, holds that expire),
//! takes the payment (`account`) and confirms, or compensates. Then the invariants of
//! workflows: every order ended, stock and money conserved, each confirmed order paid once,
//! nothing held and no timer left.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use commands::{AggregateId, Command, CommandId, CommandType, Registry, Source};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::{PgPool, Row};

use super::verify::{check, Check};
use super::workers::Workers;
use super::Namespace;
use crate::producer::CommandProducer;

/// SKUs the orders draw from; the first two are scarce.
const SKUS: usize = 10;
/// Units of a scarce SKU, and of the others.
const SCARCE: u64 = 4;
const PLENTY: u64 = 500;
/// Seconds an order has to get its stock and payment.
const DEADLINE: u64 = 20;
/// The `source` of the saga part's commands.
const SOURCE: &str = "/cmdproc-demo/shop";

/// Whether the registry has the workflow domains; the demo skips this part when not.
pub(super) fn available(registry: &Registry) -> bool {
    ["inventory", "order", "account"]
        .iter()
        .all(|t| registry.get(t).is_some())
}

/// What the orders were and how they ended, for the checks.
pub(super) struct Outcome {
    placed: usize,
    received: BTreeMap<String, u64>,
    balances_before: BTreeMap<String, i64>,
    balances_after: BTreeMap<String, i64>,
    orders: BTreeMap<String, Value>,
    skus: BTreeMap<String, Value>,
    /// Per order: applied withdrawals and deposits it sent.
    payments: BTreeMap<String, (i64, i64)>,
    timers_left: i64,
}

fn command(
    id: String,
    ty: &str,
    subject: &str,
    data: Value,
    late: bool,
) -> anyhow::Result<Command> {
    let mut c = Command::new(
        Source::parse(SOURCE)?,
        CommandId::parse(id)?,
        CommandType::parse(ty)?,
        AggregateId::parse(subject)?,
        data,
    );
    // A late order was placed before its deadline passed: its timer is due at once.
    let offset = if late { DEADLINE as i64 + 5 } else { 0 };
    c.time = Some(Utc::now() - chrono::Duration::seconds(offset));
    Ok(c)
}

async fn balances(pool: &PgPool) -> anyhow::Result<BTreeMap<String, i64>> {
    Ok(sqlx::query(
        "SELECT aggregate_id, (state->>'balance')::bigint FROM aggregates
         WHERE aggregate_type = 'account'",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|r| (r.get(0), r.get::<Option<i64>, _>(1).unwrap_or(0)))
    .collect())
}

async fn states(pool: &PgPool, ty: &str) -> anyhow::Result<BTreeMap<String, Value>> {
    Ok(
        sqlx::query("SELECT aggregate_id, state FROM aggregates WHERE aggregate_type = $1")
            .bind(ty)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect(),
    )
}

/// What to place.
pub(super) struct Orders {
    /// Seed of the orders.
    pub(super) seed: u64,
    /// How many.
    pub(super) orders: usize,
    /// Over the accounts `acc-0`..`acc-{accounts-1}`.
    pub(super) accounts: usize,
    /// How long they may take to settle.
    pub(super) timeout: Duration,
}

/// Places the orders and waits until every one has ended and everything it set in motion
/// has settled.
pub(super) async fn run(
    brokers: &str,
    ns: &Namespace,
    pool: &PgPool,
    workers: &mut Workers,
    what: Orders,
) -> anyhow::Result<Outcome> {
    let Orders {
        seed,
        orders,
        accounts,
        timeout,
    } = what;
    let producer = CommandProducer::new(brokers, ns.commands.clone(), Duration::from_secs(30))?;
    let balances_before = balances(pool).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5a6a);
    let mut received = BTreeMap::new();
    let mut sent = Vec::new();
    for i in 0..SKUS {
        let qty = if i < 2 { SCARCE } else { PLENTY };
        let sku = format!("sku-{i}");
        received.insert(sku.clone(), qty);
        sent.push(command(
            format!("receive-{sku}"),
            "inventory.Receive",
            &sku,
            json!({"qty": qty}),
            false,
        )?);
    }
    for i in 0..orders {
        let mut skus: Vec<usize> = (0..SKUS).collect();
        let n = rng.gen_range(1..=3);
        let lines: Vec<Value> = (0..n)
            .map(|_| {
                let sku = skus.remove(rng.gen_range(0..skus.len()));
                json!({"sku": format!("sku-{sku}"), "qty": rng.gen_range(1..=3)})
            })
            .collect();
        let account = format!("acc-{}", rng.gen_range(0..accounts));
        let amount = rng.gen_range(100..=20_000);
        let late = i % 25 == 7;
        let order = format!("ord-{i}");
        sent.push(command(
            format!("place-{order}"),
            "order.Place",
            &order,
            json!({"lines": lines, "account": account, "amount": amount, "deadline": DEADLINE}),
            late,
        )?);
    }
    for c in &sent {
        producer
            .send(c)
            .await
            .with_context(|| format!("producing {}", c.id))?;
    }

    // Settled: every order ended, nothing held, no timer pending, the outbox published.
    let started = Instant::now();
    loop {
        workers.check_alive()?;
        let ended: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM aggregates WHERE aggregate_type = 'order'
             AND (status = 'confirmed' OR status LIKE 'cancelled%')",
        )
        .fetch_one(pool)
        .await?;
        let held: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM aggregates WHERE aggregate_type = 'inventory'
             AND state->'held' <> '{}'::jsonb",
        )
        .fetch_one(pool)
        .await?;
        let timers: i64 = sqlx::query_scalar("SELECT count(*) FROM timers")
            .fetch_one(pool)
            .await?;
        let backlog: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM partitions p LEFT JOIN relay_positions r
               ON r.topic = p.topic AND r.partition = p.partition
             WHERE p.topic = $1 AND p.outbox_seq > COALESCE(r.published_seq, 0)",
        )
        .bind(ns.commands.as_str())
        .fetch_one(pool)
        .await?;
        if ended == orders as i64 && held == 0 && timers == 0 && backlog == 0 {
            break;
        }
        if started.elapsed() > timeout {
            anyhow::bail!(
                "the orders did not settle within {timeout:?}: {ended} of {orders} ended, \
                 {held} SKUs still hold stock, {timers} timers pending"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Withdrawals and refunds each order's saga sent, as applied.
    let payments = sqlx::query(
        "SELECT substr(source, length('/aggregates/order/') + 1),
                count(*) FILTER (WHERE command_type = 'account.Withdraw'),
                count(*) FILTER (WHERE command_type = 'account.Deposit')
         FROM processed_commands
         WHERE source LIKE '/aggregates/order/%' AND outcome = 'applied'
           AND command_type IN ('account.Withdraw', 'account.Deposit')
         GROUP BY source",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2))))
    .collect();
    Ok(Outcome {
        placed: orders,
        received,
        balances_before,
        balances_after: balances(pool).await?,
        orders: states(pool, "order").await?,
        skus: states(pool, "inventory").await?,
        payments,
        timers_left: sqlx::query_scalar("SELECT count(*) FROM timers")
            .fetch_one(pool)
            .await?,
    })
}

/// How many orders ended each way: `confirmed`, `cancelled:<reason>`.
pub(super) fn ends(o: &Outcome) -> BTreeMap<String, usize> {
    let mut ends = BTreeMap::new();
    for state in o.orders.values() {
        let status = state["status"].as_str().unwrap_or("?");
        let end = match state["reason"].as_str() {
            Some(reason) if status == "cancelled" => format!("cancelled:{reason}"),
            _ => status.to_owned(),
        };
        *ends.entry(end).or_default() += 1;
    }
    ends
}

/// The invariants of workflows, labelled from `first` on.
pub(super) fn checks(o: &Outcome, first: char) -> Vec<Check> {
    let label = |i: u8| (first as u8 + i) as char;
    let confirmed: Vec<(&String, &Value)> = o
        .orders
        .iter()
        .filter(|(_, s)| s["status"] == "confirmed")
        .collect();

    let mut unended = Vec::new();
    for (id, s) in &o.orders {
        if s["status"] != "confirmed" && s["status"] != "cancelled" {
            unended.push(format!("{id} is {}", s["status"]));
        }
    }
    if o.orders.len() != o.placed {
        unended.push(format!(
            "{} orders placed, {} stored",
            o.placed,
            o.orders.len()
        ));
    }
    let ends = ends(o);

    // Stock: every unit received is available or sold; nothing is held; each SKU sold
    // exactly the units of its confirmed orders.
    let mut stock = Vec::new();
    let mut sold_by_orders: BTreeMap<String, u64> = BTreeMap::new();
    for (_, s) in &confirmed {
        for (sku, line) in s["lines"].as_object().into_iter().flatten() {
            *sold_by_orders.entry(sku.clone()).or_default() += line["qty"].as_u64().unwrap_or(0);
        }
    }
    for (sku, received) in &o.received {
        let Some(s) = o.skus.get(sku) else {
            stock.push(format!("{sku} not stored"));
            continue;
        };
        let (available, sold) = (
            s["available"].as_u64().unwrap_or(0),
            s["sold"].as_u64().unwrap_or(0),
        );
        let held = s["held"].as_object().map_or(0, |h| h.len());
        if available + sold != *received || held != 0 {
            stock.push(format!(
                "{sku}: received {received}, available {available} + sold {sold}, {held} holds"
            ));
        }
        let want = sold_by_orders.get(sku).copied().unwrap_or(0);
        if sold != want {
            stock.push(format!("{sku}: sold {sold}, confirmed orders took {want}"));
        }
    }

    // Money: what left the accounts is exactly what the confirmed orders captured.
    let captured: i64 = confirmed
        .iter()
        .map(|(_, s)| s["amount"].as_i64().unwrap_or(0))
        .sum();
    let before: i64 = o.balances_before.values().sum();
    let after: i64 = o.balances_after.values().sum();
    let mut money = Vec::new();
    if before != after + captured {
        money.push(format!(
            "balances {before} before, {after} after, {captured} captured"
        ));
    }

    // Each confirmed order withdrew once and refunded nothing; each cancelled one refunded
    // every withdrawal it made.
    let mut paid = Vec::new();
    for (id, s) in &o.orders {
        let (withdrawn, refunded) = o.payments.get(id).copied().unwrap_or((0, 0));
        let ok = if s["status"] == "confirmed" {
            withdrawn == 1 && refunded == 0
        } else {
            withdrawn == refunded
        };
        if !ok {
            paid.push(format!(
                "{id} ({}): {withdrawn} withdrawal(s), {refunded} refund(s)",
                s["status"]
            ));
        }
    }

    vec![
        check(
            label(0),
            "every order ended confirmed or cancelled",
            unended,
            format!(
                "{} orders: {}",
                o.placed,
                ends.iter()
                    .map(|(k, v)| format!("{v} {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        check(
            label(1),
            "stock is conserved: every unit available or sold to a confirmed order, none held",
            stock,
            format!(
                "{} SKUs, {} units received, {} sold",
                o.received.len(),
                o.received.values().sum::<u64>(),
                sold_by_orders.values().sum::<u64>()
            ),
        ),
        check(
            label(2),
            "money is conserved: balances plus captured payments equal the balances before",
            money,
            format!(
                "{captured} captured by {} confirmed orders",
                confirmed.len()
            ),
        ),
        check(
            label(3),
            "each confirmed order was paid once, each cancelled one refunded what it took",
            paid,
            format!(
                "{} refunds after a late payment",
                o.payments.values().map(|(_, r)| r).sum::<i64>()
            ),
        ),
        check(
            label(4),
            "no timer is left: every hold and deadline was confirmed, released, cancelled or fired",
            if o.timers_left == 0 {
                Vec::new()
            } else {
                vec![format!("{} timers pending", o.timers_left)]
            },
            "0 pending".to_owned(),
        ),
    ]
}
