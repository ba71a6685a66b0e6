//! Durable timers against the real broker and database: thousands of reservation holds whose
//! expiry timers fall due over 20 seconds fire once each, across a worker killed with
//! SIGKILL and a rebalance; every hold comes back to the stock; a replay changes nothing.
//! Needs `deploy/local/up.sh`.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use commands::{AggregateId, Command, CommandId, CommandType, Source};
use serde_json::{json, Value};
use sqlx::Row;
use support::{cmdproc_on, ends, produce_all, wait_processed, TestDb, TestTopics, WorkerProcess};

const SKUS: usize = 100;
const HOLDS: usize = 10_000;
const STOCK: u64 = 1_000;

fn command(id: &str, ty: &str, subject: &str, data: Value, time: DateTime<Utc>) -> Command {
    let mut c = Command::new(
        Source::parse("/timers-test").unwrap(),
        CommandId::parse(id).unwrap(),
        CommandType::parse(ty).unwrap(),
        AggregateId::parse(subject).unwrap(),
        data,
    );
    c.time = Some(time);
    c
}

fn sku(i: usize) -> String {
    format!("sku-{}", i % SKUS)
}

/// Available stock per SKU.
async fn available(db: &TestDb) -> BTreeMap<String, u64> {
    sqlx::query("SELECT aggregate_id, state FROM aggregates WHERE aggregate_type = 'inventory'")
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            let state: Value = r.get(1);
            (r.get(0), state["available"].as_u64().unwrap())
        })
        .collect()
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&db.pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_timers_fire_once_each_across_a_kill_and_a_rebalance() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(6).await;
    let flags = ["--batch-size", "500", "--timer-tick", "200ms"];
    let mut workers = vec![
        WorkerProcess::spawn(&db, &topics, "t0", &flags),
        WorkerProcess::spawn(&db, &topics, "t1", &flags),
    ];
    let producer = topics.producer();
    let now = Utc::now();
    let stock: Vec<Command> = (0..SKUS)
        .map(|i| {
            command(
                &format!("receive-{i}"),
                "inventory.Receive",
                &sku(i),
                json!({"qty": STOCK}),
                now,
            )
        })
        .collect();
    let d = produce_all(&producer, &stock).await;
    let refs: Vec<&WorkerProcess> = workers.iter().collect();
    wait_processed(
        &db,
        &topics.commands,
        &ends(&d),
        Duration::from_secs(120),
        &refs,
    )
    .await;

    // Holds whose expiries fall due evenly over the 20 seconds after the last is sent: each
    // hold's time is when it is sent, its ttl brings it to its due time.
    let start = Utc::now() + chrono::Duration::seconds(5);
    let mut due: HashMap<String, DateTime<Utc>> = HashMap::new();
    let holds: Vec<Command> = (0..HOLDS)
        .map(|i| {
            let order = format!("ord-{i}");
            let at = start + chrono::Duration::milliseconds((i as i64 * 20_000) / HOLDS as i64);
            let sent = Utc::now();
            let ttl = (at - sent).num_milliseconds().max(1_000) as f64 / 1_000.0;
            let ttl = ttl.ceil() as u64;
            due.insert(order.clone(), sent + chrono::Duration::seconds(ttl as i64));
            command(
                &format!("hold-{i}"),
                "inventory.Reserve",
                &sku(i),
                json!({"order": order, "qty": 1, "ttl": ttl}),
                sent,
            )
        })
        .collect();
    let produced = Instant::now();
    let deliveries = produce_all(&producer, &holds).await;

    // While the timers fall due: a worker killed with SIGKILL and restarted, then a third
    // worker joining (a rebalance).
    tokio::time::sleep(Duration::from_secs(8)).await;
    workers[0].kill9();
    workers[0] = WorkerProcess::spawn(&db, &topics, "t2", &flags);
    tokio::time::sleep(Duration::from_secs(5)).await;
    workers.push(WorkerProcess::spawn(&db, &topics, "t3", &flags));

    // Every hold expires: every timer fired, its Expire applied, the stock back.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let pending = count(&db, "SELECT count(*) FROM timers").await;
        let expired = count(
            &db,
            "SELECT count(*) FROM processed_commands WHERE command_type = 'inventory.Expire'",
        )
        .await;
        if pending == 0 && expired == HOLDS as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{pending} timers pending, {expired} of {HOLDS} expiries applied\n{}",
            workers
                .iter()
                .map(|w| w.log_tail(20))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let took = produced.elapsed();
    let refs: Vec<&WorkerProcess> = workers.iter().collect();
    // The relay has published everything the workers wrote (the fired commands included).
    wait_processed(
        &db,
        &topics.commands,
        &ends(&deliveries),
        Duration::from_secs(60),
        &refs,
    )
    .await;

    // Once each on the commands topic, once each in Postgres.
    let fired: Vec<Value> = support::read_topic(&topics.commands)
        .into_iter()
        .filter_map(|r| serde_json::from_slice::<Value>(r.value.as_deref()?).ok())
        .filter(|ce| ce["type"] == "inventory.Expire")
        .collect();
    let ids: std::collections::HashSet<&str> =
        fired.iter().filter_map(|ce| ce["id"].as_str()).collect();
    assert_eq!(fired.len(), HOLDS, "one Expire per timer on the topic");
    assert_eq!(ids.len(), HOLDS, "each with its own id");
    for ce in &fired {
        let order = ce["data"]["order"].as_str().unwrap();
        let time: DateTime<Utc> = ce["time"].as_str().unwrap().parse().unwrap();
        assert_eq!(time, due[order], "a fired command's time is its due time");
    }
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM duplicate_deliveries d JOIN processed_commands p
               ON p.source = d.source AND p.command_id = d.command_id
             WHERE p.command_type = 'inventory.Expire'",
        )
        .await,
        0,
        "no timer fired twice"
    );
    let expired_events = count(
        &db,
        "SELECT count(*) FROM events WHERE event_type = 'inventory.Expired'",
    )
    .await;
    assert_eq!(expired_events, HOLDS as i64, "every hold expired once");
    let stock = available(&db).await;
    assert_eq!(stock.len(), SKUS);
    assert!(
        stock.values().all(|a| *a == STOCK),
        "every hold came back: {stock:?}"
    );

    // How late the holds ended: from each due time to the commit of its Expired event.
    let ended: Vec<(Value, DateTime<Utc>)> =
        sqlx::query("SELECT data, created_at FROM events WHERE event_type = 'inventory.Expired'")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    let mut late: Vec<f64> = ended
        .iter()
        .map(|(data, at)| {
            let order = data["order"].as_str().expect("Expired names its order");
            (*at - due[order]).num_milliseconds() as f64 / 1_000.0
        })
        .collect();
    late.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |q: f64| late[((late.len() - 1) as f64 * q) as usize];
    eprintln!(
        "{HOLDS} timers over 20 s, a SIGKILL and a rebalance: all expired {:.1} s after the \
         holds were sent; hold end after due: p50 {:.3} s, p99 {:.3} s, max {:.3} s",
        took.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );

    // A replay of every partition while the workers run changes no hold.
    let before = support::workload::stored_aggregates(&db).await;
    let positions: BTreeMap<i32, i64> =
        sqlx::query("SELECT partition, next_offset FROM partitions WHERE topic = $1")
            .bind(topics.commands.as_str())
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    let (ok, out) = cmdproc_on(
        &db,
        &topics,
        "replay",
        &["--partitions", "all", "--from-offset", "0"],
    );
    assert!(ok, "{out}");
    let settle = Instant::now() + Duration::from_secs(120);
    loop {
        let behind = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM partitions p JOIN UNNEST($1::int[], $2::bigint[]) AS b(partition, next_offset)
               ON b.partition = p.partition
             WHERE p.topic = $3 AND p.next_offset < b.next_offset",
        )
        .bind(positions.keys().copied().collect::<Vec<i32>>())
        .bind(positions.values().copied().collect::<Vec<i64>>())
        .bind(topics.commands.as_str())
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if behind == 0 {
            break;
        }
        assert!(
            Instant::now() < settle,
            "the replay did not finish: {behind} partitions behind"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(support::workload::stored_aggregates(&db).await, before);
    assert_eq!(count(&db, "SELECT count(*) FROM timers").await, 0);
    drop(workers);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restored_database_fires_its_timers_again_without_a_second_effect() {
    const N: usize = 20;
    let mut db = TestDb::new().await;
    let topics = TestTopics::new(2).await;
    let mut worker = WorkerProcess::spawn(&db, &topics, "r0", &["--timer-tick", "100ms"]);
    let producer = topics.producer();
    let now = Utc::now();
    let mut commands = vec![command(
        "receive",
        "inventory.Receive",
        "sku-0",
        json!({"qty": 100}),
        now,
    )];
    commands.extend((0..N).map(|i| {
        command(
            &format!("hold-{i}"),
            "inventory.Reserve",
            "sku-0",
            json!({"order": format!("ord-{i}"), "qty": 1, "ttl": 4}),
            now,
        )
    }));
    let d = produce_all(&producer, &commands).await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&d),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;
    // The backup holds the 20 holds and their pending timers.
    assert_eq!(count(&db, "SELECT count(*) FROM timers").await, N as i64);
    let dump = support::backup(&db);

    // The timers fire and the holds expire.
    let expired = "SELECT count(*) FROM events WHERE event_type = 'inventory.Expired'";
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&db, expired).await < N as i64 {
        assert!(Instant::now() < deadline, "{}", worker.log_tail(20));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(available(&db).await["sku-0"], 100);

    // Restore the backup: its timers are pending again, and fire again.
    worker.terminate(Duration::from_secs(15));
    support::restore(&mut db, &dump).await;
    assert_eq!(count(&db, "SELECT count(*) FROM timers").await, N as i64);
    let worker = WorkerProcess::spawn(&db, &topics, "r1", &["--timer-tick", "100ms"]);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let pending = count(&db, "SELECT count(*) FROM timers").await;
        let applied = count(
            &db,
            "SELECT count(*) FROM processed_commands WHERE command_type = 'inventory.Expire'",
        )
        .await;
        // Each hold's expiry is applied once: the commands fired before the restore are
        // read again from the log, and the timers fired again after it carry the same ids
        // (the relay finds them on the topic already and skips them; had it not, they would
        // be duplicates).
        if pending == 0 && applied == N as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{pending} pending, {applied} applied\n{}",
            worker.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        count(&db, expired).await,
        N as i64,
        "each hold expired once"
    );
    assert_eq!(available(&db).await["sku-0"], 100);
    let fired: std::collections::HashSet<String> = support::read_topic(&topics.commands)
        .into_iter()
        .filter_map(|r| serde_json::from_slice::<Value>(r.value.as_deref()?).ok())
        .filter(|ce| ce["type"] == "inventory.Expire")
        .map(|ce| ce["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(fired.len(), N, "the timers' commands kept their ids");
    drop(worker);
    db.drop_db().await;
}
