//! Poison commands park their aggregate (or, by choice, are dead-lettered alone or halt the
//! partition), and a relay that dies between publishing and recording never publishes an
//! event twice. Both use failpoints (`CMDPROC_FAILPOINT`), since no real input makes the
//! shipped handlers panic or stops a relay at that exact point.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use commands::{AggregateId, Command, CommandId, CommandType, Source};
use serde_json::{json, Value};
use sqlx::Row;

use crate::support::workload::{assert_events_published, generate, serial_model};
use crate::support::{
    cmdproc, ends, produce_all, read_topic, wait_processed, TestDb, TestTopics, WorkerProcess,
    BROKERS,
};

fn cmd(id: &str, ty: &str, subject: &str, data: Value) -> Command {
    Command::new(
        Source::parse("/poison").unwrap(),
        CommandId::parse(id).unwrap(),
        CommandType::parse(ty).unwrap(),
        AggregateId::parse(subject).unwrap(),
        data,
    )
}

/// A `cmdproc run` with failpoints set, killed when dropped.
fn spawn_with_failpoint(
    db: &TestDb,
    topics: &TestTopics,
    name: &str,
    failpoint: &str,
    extra: &[&str],
) -> WorkerProcess {
    WorkerProcess::spawn_with_env(db, topics, name, extra, &[("CMDPROC_FAILPOINT", failpoint)])
}

/// An account id other than `than` that maps to the same partition.
fn same_partition(than: &str, partitions: i32) -> String {
    let p = commands::partitioner::partition_for_key(than.as_bytes(), partitions);
    (0..)
        .map(|i| format!("acc-n{i}"))
        .find(|k| commands::partitioner::partition_for_key(k.as_bytes(), partitions) == p)
        .unwrap()
}

/// Another account id that maps to a different partition.
fn other_partition(than: &str, partitions: i32) -> String {
    let p = commands::partitioner::partition_for_key(than.as_bytes(), partitions);
    (0..)
        .map(|i| format!("acc-o{i}"))
        .find(|k| commands::partitioner::partition_for_key(k.as_bytes(), partitions) != p)
        .unwrap()
}

fn scenario(neighbour: &str, elsewhere: &str) -> Vec<Command> {
    vec![
        cmd(
            "p-open",
            "account.Open",
            "acc-poison",
            json!({"owner": "p"}),
        ),
        cmd("n-open", "account.Open", neighbour, json!({"owner": "n"})),
        cmd(
            "p-dep1",
            "account.Deposit",
            "acc-poison",
            json!({"amount": 10}),
        ),
        cmd("e-open", "account.Open", elsewhere, json!({"owner": "e"})),
        cmd("n-dep", "account.Deposit", neighbour, json!({"amount": 5})),
        cmd(
            "p-dep2",
            "account.Deposit",
            "acc-poison",
            json!({"amount": 20}),
        ),
        cmd("e-dep", "account.Deposit", elsewhere, json!({"amount": 7})),
    ]
}

async fn balance(db: &TestDb, id: &str) -> Option<i64> {
    sqlx::query_scalar::<_, Value>(
        "SELECT state FROM aggregates WHERE aggregate_type = 'account' AND aggregate_id = $1",
    )
    .bind(id)
    .fetch_optional(&db.pool)
    .await
    .unwrap()
    .map(|s| s["balance"].as_i64().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_command_parks_its_aggregate_and_the_others_go_on() {
    let _serial = crate::serial().await;
    let db = TestDb::new().await;
    let topics = TestTopics::new(3).await;
    let worker = spawn_with_failpoint(&db, &topics, "w1", "handler-panic:acc-poison", &[]);
    let neighbour = same_partition("acc-poison", 3);
    let elsewhere = other_partition("acc-poison", 3);
    let d = produce_all(&topics.producer(), &scenario(&neighbour, &elsewhere)).await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&d),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;

    // The others, on the same partition too, went on.
    assert_eq!(balance(&db, &neighbour).await, Some(5));
    assert_eq!(balance(&db, &elsewhere).await, Some(7));
    assert_eq!(
        balance(&db, "acc-poison").await,
        None,
        "nothing of the parked aggregate applied"
    );

    let reason: String = sqlx::query_scalar(
        "SELECT reason FROM parked_aggregates WHERE aggregate_id = 'acc-poison'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(reason.contains("panicked 3 time(s)"), "{reason}");
    // Every command of the aggregate set aside, in their order.
    let parked: Vec<String> =
        sqlx::query_scalar("SELECT command_id FROM parked_commands WHERE aggregate_id = 'acc-poison' ORDER BY \"offset\"")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(parked, ["p-open", "p-dep1", "p-dep2"]);
    // And on the dead-letter topic in that order, the first as the panic, the rest as parked.
    let dlq: Vec<(i64, String)> = read_topic(&topics.dead_letters)
        .iter()
        .filter(|m| m.key.as_deref() == Some(&b"acc-poison"[..]))
        .map(|m| {
            (
                m.header("cmdproc-original-offset")
                    .unwrap()
                    .parse()
                    .unwrap(),
                m.header("cmdproc-error-kind").unwrap(),
            )
        })
        .collect();
    let kinds: Vec<&str> = dlq.iter().map(|(_, k)| k.as_str()).collect();
    assert_eq!(kinds, ["handler_panic", "parked", "parked"]);
    assert!(
        dlq.windows(2).all(|w| w[0].0 < w[1].0),
        "offset order kept: {dlq:?}"
    );
    let log = std::fs::read_to_string(&worker.log).unwrap();
    assert!(
        log.contains("aggregate parked"),
        "the worker logs the parking"
    );
    drop(worker);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_can_instead_be_dead_lettered_alone_or_halt_the_partition() {
    let _serial = crate::serial().await;
    let neighbour = same_partition("acc-poison", 3);
    let elsewhere = other_partition("acc-poison", 3);

    // dead-letter: each failing command goes alone; nothing is parked.
    let db = TestDb::new().await;
    let topics = TestTopics::new(3).await;
    let worker = spawn_with_failpoint(
        &db,
        &topics,
        "w1",
        "handler-panic:acc-poison",
        &["--on-poison", "dead-letter"],
    );
    let d = produce_all(&topics.producer(), &scenario(&neighbour, &elsewhere)).await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&d),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;
    let kinds: Vec<String> =
        sqlx::query_scalar("SELECT kind FROM dead_letters ORDER BY \"offset\"")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(kinds, ["handler_panic", "handler_panic", "handler_panic"]);
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM parked_aggregates")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(parked, 0);
    assert_eq!(balance(&db, &neighbour).await, Some(5));
    drop(worker);
    db.drop_db().await;

    // halt: the poison's partition stops at it; other partitions go on.
    let db = TestDb::new().await;
    let topics = TestTopics::new(3).await;
    let worker = spawn_with_failpoint(
        &db,
        &topics,
        "w1",
        "handler-panic:acc-poison",
        &["--on-poison", "halt"],
    );
    let d = produce_all(&topics.producer(), &scenario(&neighbour, &elsewhere)).await;
    let poison_at = d[0];
    let mut others = ends(&d);
    others.remove(&poison_at.partition);
    wait_processed(
        &db,
        &topics.commands,
        &others,
        Duration::from_secs(60),
        &[&worker],
    )
    .await;
    assert_eq!(balance(&db, &elsewhere).await, Some(7));
    // Give the halted partition time to (wrongly) move on, then check it did not.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stored: i64 = sqlx::query_scalar("SELECT next_offset FROM partitions WHERE partition = $1")
        .bind(poison_at.partition)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        stored, poison_at.offset,
        "the partition stopped at the poison command"
    );
    assert_eq!(
        balance(&db, &neighbour).await,
        None,
        "commands after the poison on its partition wait"
    );
    assert!(std::fs::read_to_string(&worker.log)
        .unwrap()
        .contains("partition halted"));
    drop(worker);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_killed_between_publishing_and_recording_publishes_nothing_twice() {
    let _serial = crate::serial().await;
    let db = TestDb::new().await;
    let topics = TestTopics::new(3).await;
    let worker = WorkerProcess::spawn(&db, &topics, "w1", &["--no-relay"]);
    let commands = generate(5, 3_000, 100, 40, 2);
    let model = serial_model(&commands);
    let d = produce_all(&topics.producer(), &commands).await;
    let want = ends(&d);

    // Wait until the worker consumed everything (the outbox is full, nothing published).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rows = sqlx::query("SELECT partition, next_offset FROM partitions")
            .fetch_all(&db.pool)
            .await
            .unwrap();
        let stored: BTreeMap<i32, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        if want
            .iter()
            .all(|(p, e)| stored.get(p).is_some_and(|s| s >= e))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "worker did not consume: {stored:?} < {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A relay that dies right after its first Kafka commit, before Postgres records it.
    let log = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{}-relay.log", topics.group));
    let relay = |failpoint: &str| {
        cmdproc()
            .args(["relay", "--brokers", BROKERS, "--database-url", &db.url])
            .args([
                "--commands-topic",
                topics.commands.as_str(),
                "--batch-size",
                "200",
            ])
            .env("CMDPROC_FAILPOINT", failpoint)
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .unwrap()
    };
    let status = relay("relay-crash-after-publish").wait().unwrap();
    assert!(!status.success(), "the failpoint aborted the relay");
    let recorded: i64 =
        sqlx::query_scalar("SELECT COALESCE(sum(published_seq), 0)::bigint FROM relay_positions")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(recorded, 0, "Postgres never heard of the published batch");
    let in_kafka = read_topic(&topics.events).len();
    assert!(in_kafka > 0, "the batch is committed in Kafka");

    // The next relay recovers the position from Kafka and publishes the rest once.
    let next = crate::support::KillOnDrop(relay(""));
    wait_processed(
        &db,
        &topics.commands,
        &want,
        Duration::from_secs(120),
        &[&worker],
    )
    .await;
    drop(next);
    assert_eq!(
        assert_events_published(&db, &topics).await,
        model.events.len()
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("resuming after what Kafka committed"),
        "{text}"
    );
    drop(worker);
    db.drop_db().await;
}
