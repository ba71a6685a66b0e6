//! `cmdproc dlq`: listing dead letters and parked aggregates, skipping a parked command,
//! releasing a parked aggregate in order, and submitting dead letters again.

use std::time::Duration;

use commands::{AggregateId, Command, CommandId, CommandType, Source};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};

use crate::support::{
    ends, produce_all, read_topic, wait_processed, TestDb, TestTopics, WorkerProcess, BROKERS,
};

fn cmd(id: &str, ty: &str, subject: &str, data: Value) -> Command {
    Command::new(
        Source::parse("/dlq").unwrap(),
        CommandId::parse(id).unwrap(),
        CommandType::parse(ty).unwrap(),
        AggregateId::parse(subject).unwrap(),
        data,
    )
}

fn dlq(db: &TestDb, topics: &TestTopics, args: &[&str]) -> (bool, String) {
    crate::support::cmdproc_on(db, topics, "dlq", args)
}

async fn state(db: &TestDb, id: &str) -> Option<(i64, Value)> {
    sqlx::query_as::<_, (i64, Value)>(
        "SELECT version, state FROM aggregates WHERE aggregate_id = $1",
    )
    .bind(id)
    .fetch_optional(&db.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn parked_aggregates_are_listed_skipped_and_released_in_order() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(3).await;
    let poisoned = WorkerProcess::spawn_with_env(
        &db,
        &topics,
        "w1",
        &[],
        &[("CMDPROC_FAILPOINT", "handler-panic:acc-p")],
    );
    let producer = topics.producer();
    let first = vec![
        cmd("open", "account.Open", "acc-p", json!({"owner": "p"})),
        cmd("d10", "account.Deposit", "acc-p", json!({"amount": 10})),
        cmd("d20", "account.Deposit", "acc-p", json!({"amount": 20})),
        cmd("d5", "account.Deposit", "acc-p", json!({"amount": 5})),
    ];
    let d = produce_all(&producer, &first).await;
    // A valid command produced to the wrong partition: dead-lettered as misrouted, and
    // fixed by submitting it again through the murmur2 partitioner.
    let misrouted = cmd("m-open", "account.Open", "acc-m", json!({"owner": "m"}));
    let right = commands::partitioner::partition_for_key(b"acc-m", 3).unwrap();
    let raw: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .create()
        .unwrap();
    let value = misrouted.encode();
    let m = raw
        .send(
            FutureRecord::to(topics.commands.as_str())
                .key("acc-m")
                .payload(&value)
                .partition((right + 1) % 3),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let mut all = d.clone();
    all.push(commands::producer::Delivery {
        partition: m.partition,
        offset: m.offset,
    });
    wait_processed(
        &db,
        &topics.commands,
        &ends(&all),
        Duration::from_secs(60),
        &[&poisoned],
    )
    .await;

    let (ok, listed) = dlq(&db, &topics, &["list"]);
    assert!(ok, "{listed}");
    assert!(listed.contains("5 dead letter(s)"), "{listed}");
    assert!(
        listed.contains("handler_panic") && listed.contains("misrouted"),
        "{listed}"
    );
    assert!(listed.contains("account/acc-p  parked"), "{listed}");
    assert!(
        listed.contains("4 command(s) waiting, 0 skipped"),
        "{listed}"
    );

    // The operator drops the 20 deposit, then skipping it again is refused.
    let d20 = format!("{}:{}", d[2].partition, d[2].offset);
    let (ok, out) = dlq(
        &db,
        &topics,
        &["skip", &d20, "--why", "charged twice upstream"],
    );
    assert!(ok, "{out}");
    let (ok, out) = dlq(&db, &topics, &["skip", &d20, "--why", "again"]);
    assert!(!ok && out.contains("no waiting parked command"), "{out}");

    // Handler fixed: a worker without the failpoint takes over, then the release.
    drop(poisoned);
    let worker = WorkerProcess::spawn(&db, &topics, "w2", &[]);
    let (ok, out) = dlq(&db, &topics, &["redrive", "--aggregate", "account/acc-p"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("account/acc-p: released; 3 applied, 0 rejected, 0 duplicate(s), 1 skipped"),
        "{out}"
    );
    let (version, s) = state(&db, "acc-p").await.expect("acc-p exists now");
    assert_eq!((version, s["balance"].as_i64()), (3, Some(15)));

    // Later commands for it apply after the released ones.
    let later = produce_all(
        &producer,
        &[cmd("d1", "account.Deposit", "acc-p", json!({"amount": 1}))],
    )
    .await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&later),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;
    let (version, s) = state(&db, "acc-p").await.unwrap();
    assert_eq!((version, s["balance"].as_i64()), (4, Some(16)));
    let versions: Vec<i64> = read_topic(&topics.events)
        .iter()
        .map(|m| m.json())
        .filter(|e| e["subject"] == "acc-p")
        .map(|e| e["aggregateversion"].as_i64().unwrap())
        .collect();
    assert_eq!(
        versions,
        [1, 2, 3, 4],
        "released events first, in order, each once"
    );

    // Submitting the misrouted dead letter again applies it; a second time is a duplicate.
    for _ in 0..2 {
        let (ok, out) = dlq(&db, &topics, &["redrive", "--reason", "misrouted"]);
        assert!(ok && out.contains("submitted 1 dead letter(s)"), "{out}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let dups: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM duplicate_deliveries WHERE command_id = 'm-open'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if dups == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the resubmitted command was not processed twice"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        state(&db, "acc-m").await.map(|(v, _)| v),
        Some(1),
        "applied once"
    );
    let (ok, listed) = dlq(&db, &topics, &["list"]);
    assert!(
        ok && listed.contains("0 parked aggregate(s)") && listed.contains("(redriven"),
        "{listed}"
    );
    drop(worker);
    db.drop_db().await;
}
