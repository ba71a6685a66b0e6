//! The real parts: a Kafka broker and a Postgres server on this machine, and the one-shot
//! commands that prepare them. Needs `deploy/local/up.sh`.

mod support;

use std::time::{Duration, Instant};

use commands::{AggregateId, Command, CommandId, CommandType, Source};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::ClientConfig;
use serde_json::json;
use support::{cmdproc, TestDb, TestTopics, BROKERS};

#[tokio::test(flavor = "multi_thread")]
async fn a_produced_command_is_consumed_back_from_a_fresh_topic() {
    let topics = TestTopics::new(3).await;
    let producer = topics.producer();
    let command = Command::new(
        Source::parse("/foundation").unwrap(),
        CommandId::parse("c-1").unwrap(),
        CommandType::parse("account.Open").unwrap(),
        AggregateId::parse("acc-7").unwrap(),
        json!({"owner": "ada"}),
    );
    let delivery = producer.send(&command).await.unwrap();
    // The Java client's murmur2 decides the partition.
    assert_eq!(
        Some(delivery.partition),
        commands::partitioner::partition_for_key(b"acc-7", 3)
    );

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("group.id", format!("foundation-{}", support::unique()))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topics.commands.as_str()]).unwrap();
    let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("a message within 30 s")
        .unwrap();
    assert_eq!(m.key(), Some(&b"acc-7"[..]));
    assert_eq!(
        (m.partition(), m.offset()),
        (delivery.partition, delivery.offset)
    );
    let back = Command::decode(m.key(), &[], m.payload(), bank::registry().schemas()).unwrap();
    assert_eq!(back, command);
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_creates_the_tables_and_is_idempotent() {
    let db = TestDb::new().await;
    // TestDb::new migrated once; the CLI runs it again.
    let out = cmdproc()
        .args(["migrate", "--database-url", &db.url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for t in [
        "aggregates",
        "dead_letters",
        "events",
        "outbox",
        "partitions",
        "processed_commands",
        "relay_positions",
    ] {
        assert!(
            tables.iter().any(|x| x == t),
            "table {t} missing from {tables:?}"
        );
    }
    db.drop_db().await;
}

#[test]
fn topics_create_is_idempotent() {
    let prefix = format!("found-{}", support::unique());
    let args = |p: &str| {
        let mut c = cmdproc();
        c.args(["topics", "create", "--partitions", p]).args([
            "--commands-topic",
            &format!("{prefix}-commands"),
            "--events-topic",
            &format!("{prefix}-events"),
        ]);
        c
    };
    let first = args("4").output().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let text = String::from_utf8_lossy(&first.stdout);
    assert!(
        text.contains(&format!("created {prefix}-commands (4 partitions)")),
        "{text}"
    );
    assert!(
        text.contains(&format!("created {prefix}-commands.dlq")),
        "{text}"
    );
    let second = args("4").output().unwrap();
    assert!(second.status.success());
    assert!(String::from_utf8_lossy(&second.stdout)
        .contains(&format!("{prefix}-events exists (4 partitions)")));
    let third = args("8").output().unwrap();
    assert!(String::from_utf8_lossy(&third.stdout).contains("exists with 4 partitions (not 8)"));
}

#[test]
fn topics_create_fails_fast_when_the_broker_is_unreachable() {
    // Nothing listens on port 1; the message must name the address, within seconds.
    let started = Instant::now();
    let out = cmdproc()
        .args(["topics", "create", "--brokers", "127.0.0.1:1"])
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the Kafka broker at 127.0.0.1:1"),
        "{err}"
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[test]
fn a_bad_database_url_fails_with_a_clear_message() {
    let out = cmdproc()
        .args([
            "migrate",
            "--database-url",
            "postgres://cmdproc:cmdproc@127.0.0.1:1/cmdproc",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect to Postgres at 127.0.0.1:1"),
        "{err}"
    );
    assert!(
        !err.contains("cmdproc:cmdproc@"),
        "the password must not be printed: {err}"
    );
}

/// A binary built with `cli::main` whose registry breaks its contract refuses to start,
/// naming each mistake, before it touches Kafka or Postgres: never a dead letter later.
#[test]
fn a_binary_with_a_broken_registry_refuses_to_start_and_names_the_mistakes() {
    // `cargo test` builds the package's examples next to the test binaries.
    let exe = std::env::current_exe().expect("test binary path");
    let examples = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target profile dir")
        .join("examples")
        .join("misregistered");
    if !examples.exists() {
        // Filtered runs (`--test foundation`) do not build the examples.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let built = std::process::Command::new(cargo)
            .args(["build", "-p", "processor", "--example", "misregistered"])
            .status()
            .expect("run cargo");
        assert!(built.success(), "cargo build --example misregistered");
    }
    let out = std::process::Command::new(&examples)
        .args([
            "run",
            "--brokers",
            "127.0.0.1:1",
            "--database-url",
            "postgres://nobody@127.0.0.1:1/none",
        ])
        .output()
        .expect("run the example");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("aggregate `account` is registered twice"),
        "{stderr}"
    );
    assert!(
        stderr.contains("aggregate `room`: command `Book` has no schema (expected schemas/room/commands/Book.json)"),
        "{stderr}"
    );
    // It stopped at the registry, not after trying the unreachable database.
    assert!(!stderr.contains("database"), "{stderr}");
}
