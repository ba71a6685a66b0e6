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
    all.push(processor::producer::Delivery {
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

    // Two operators drop the 20 deposit at the same moment: one skip is recorded, the
    // other is refused; skipping it again later is refused too.
    let d20 = format!("{}:{}", d[2].partition, d[2].offset);
    let (first, second) = std::thread::scope(|scope| {
        let a = scope.spawn(|| {
            dlq(
                &db,
                &topics,
                &["skip", &d20, "--why", "charged twice upstream"],
            )
        });
        let b = scope.spawn(|| {
            dlq(
                &db,
                &topics,
                &["skip", &d20, "--why", "charged twice upstream"],
            )
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(
        first.0 != second.0,
        "exactly one skip succeeds: {first:?} {second:?}"
    );
    let refused = if first.0 { &second.1 } else { &first.1 };
    assert!(refused.contains("was skipped already"), "{refused}");
    let skipped: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM processed_commands WHERE source = '/dlq' AND command_id = 'd20' AND outcome = 'skipped'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(skipped, 1, "the skip is recorded once");
    let (ok, out) = dlq(&db, &topics, &["skip", &d20, "--why", "again"]);
    assert!(!ok && out.contains("was skipped already"), "{out}");

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
        .map(|m| m.json().expect("JSON value"))
        .filter(|e| e["subject"] == "acc-p")
        .map(|e| e["aggregateversion"].as_i64().unwrap())
        .collect();
    assert_eq!(
        versions,
        [1, 2, 3, 4],
        "released events first, in order, each once"
    );

    // Submitting the misrouted dead letter again applies it; a second redrive leaves it
    // out, and forced with --again it is a duplicate.
    let (ok, out) = dlq(&db, &topics, &["redrive", "--reason", "misrouted"]);
    assert!(ok && out.contains("submitted 1 dead letter(s)"), "{out}");
    let (ok, out) = dlq(&db, &topics, &["redrive", "--reason", "misrouted"]);
    assert!(
        ok && out.contains("left out 1 dead letter(s)")
            && out.contains("no dead letters to submit"),
        "{out}"
    );
    let (ok, out) = dlq(
        &db,
        &topics,
        &["redrive", "--reason", "misrouted", "--again"],
    );
    assert!(ok && out.contains("submitted 1 dead letter(s)"), "{out}");
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

/// Balance of an account, `None` while it does not exist.
async fn balance(db: &TestDb, id: &str) -> Option<i64> {
    state(db, id).await.and_then(|(_, s)| s["balance"].as_i64())
}

/// Waits until `command_id` was delivered again `times` times in all (duplicates recorded).
async fn wait_duplicates(db: &TestDb, command_id: &str, times: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM duplicate_deliveries WHERE command_id = $1")
                .bind(command_id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        if n >= times {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{command_id} was not delivered again {times} time(s) (seen {n})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_skip_sticks_through_release_redrive_replay_and_verify() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(2).await;
    let producer = topics.producer();

    // The account holds 100.
    let worker = WorkerProcess::spawn(&db, &topics, "w1", &[]);
    let opened = produce_all(
        &producer,
        &[
            cmd("open", "account.Open", "acc-s", json!({"owner": "s"})),
            cmd("d100", "account.Deposit", "acc-s", json!({"amount": 100})),
        ],
    )
    .await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&opened),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;
    drop(worker);

    // Its handler breaks: a withdrawal parks it, and two deposits wait behind it, one of
    // them charged twice upstream.
    let poisoned = WorkerProcess::spawn_with_env(
        &db,
        &topics,
        "w2",
        &[],
        &[("CMDPROC_FAILPOINT", "handler-panic:acc-s")],
    );
    let parked = produce_all(
        &producer,
        &[
            cmd("w50", "account.Withdraw", "acc-s", json!({"amount": 50})),
            cmd("d7", "account.Deposit", "acc-s", json!({"amount": 7})),
            cmd("d1000", "account.Deposit", "acc-s", json!({"amount": 1000})),
        ],
    )
    .await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&parked),
        Duration::from_secs(60),
        &[&poisoned],
    )
    .await;
    drop(poisoned);

    // The operator skips the withdrawal (the poison command) and the doubled deposit.
    for (d, why) in [
        (&parked[0], "not ours"),
        (&parked[2], "charged twice upstream"),
    ] {
        let id = format!("{}:{}", d.partition, d.offset);
        let (ok, out) = dlq(&db, &topics, &["skip", &id, "--why", why]);
        assert!(ok && out.contains("recorded as skipped"), "{out}");
    }
    let skipped: Vec<(String, String)> = sqlx::query_as(
        "SELECT command_id, reason FROM processed_commands WHERE outcome = 'skipped' ORDER BY command_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        skipped,
        [
            ("d1000".to_owned(), "charged twice upstream".to_owned()),
            ("w50".to_owned(), "not ours".to_owned())
        ]
    );

    // Handler fixed: the release applies only the deposit of 7.
    let worker = WorkerProcess::spawn(&db, &topics, "w3", &[]);
    let (ok, out) = dlq(&db, &topics, &["redrive", "--aggregate", "account/acc-s"]);
    assert!(
        ok && out.contains("released; 1 applied, 0 rejected, 0 duplicate(s), 2 skipped"),
        "{out}"
    );
    assert_eq!(balance(&db, "acc-s").await, Some(107));

    // A redrive by reason leaves out the skipped poison command; forced, it is a duplicate.
    let (ok, out) = dlq(&db, &topics, &["redrive", "--reason", "handler_panic"]);
    assert!(
        ok && out.contains("left out 1 dead letter(s)")
            && out.contains("no dead letters to submit"),
        "{out}"
    );
    let (ok, out) = dlq(
        &db,
        &topics,
        &["redrive", "--reason", "handler_panic", "--again"],
    );
    assert!(ok && out.contains("submitted 1 dead letter(s)"), "{out}");
    wait_duplicates(&db, "w50", 1).await;
    assert_eq!(
        balance(&db, "acc-s").await,
        Some(107),
        "the skipped withdrawal took effect"
    );

    // A replay of everything: the skipped commands come back as duplicates.
    let (ok, out) = crate::support::cmdproc_on(
        &db,
        &topics,
        "replay",
        &["--partitions", "all", "--from-offset", "0"],
    );
    assert!(ok, "{out}");
    wait_duplicates(&db, "d1000", 1).await;
    wait_duplicates(&db, "w50", 2).await;
    assert_eq!(
        balance(&db, "acc-s").await,
        Some(107),
        "a replay applied a skipped command"
    );

    // verify re-executes the log the same way.
    let (ok, out) = crate::support::cmdproc_on(&db, &topics, "verify", &[]);
    assert!(ok && out.contains("0 differences"), "{out}");
    drop(worker);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_publishes_no_dead_letter_twice() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(2).await;
    let worker = WorkerProcess::spawn_with_env(
        &db,
        &topics,
        "w1",
        &[],
        &[("CMDPROC_FAILPOINT", "handler-panic:acc-p")],
    );
    let producer = topics.producer();
    let mut all = produce_all(
        &producer,
        &[
            cmd("open-a", "account.Open", "acc-a", json!({"owner": "a"})),
            cmd(
                "bad-a",
                "account.Deposit",
                "acc-a",
                json!({"amount": "ten"}),
            ),
            cmd("d-a", "account.Deposit", "acc-a", json!({"amount": 10})),
            cmd("open-p", "account.Open", "acc-p", json!({"owner": "p"})),
            cmd("d-p", "account.Deposit", "acc-p", json!({"amount": 5})),
        ],
    )
    .await;
    for garbage in [&b"not json"[..], &b"{\"specversion\":\"1.0\"}"[..]] {
        let d = producer
            .send_raw(Some(b"acc-a"), Some(garbage), None)
            .await
            .unwrap();
        all.push(d);
    }
    wait_processed(
        &db,
        &topics.commands,
        &ends(&all),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;
    // One schema violation, two malformed messages, a poison command and the command
    // parked behind it.
    let dead_before = read_topic(&topics.dead_letters).len();
    assert_eq!(dead_before, 5);
    let events_before = read_topic(&topics.events).len();

    let (ok, out) = crate::support::cmdproc_on(
        &db,
        &topics,
        "replay",
        &["--partitions", "all", "--from-offset", "0"],
    );
    assert!(ok, "{out}");
    wait_duplicates(&db, "d-a", 1).await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&all),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;

    assert_eq!(
        read_topic(&topics.dead_letters).len(),
        dead_before,
        "dead letters published again"
    );
    assert_eq!(
        read_topic(&topics.events).len(),
        events_before,
        "events published again"
    );
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM parked_commands")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(parked, 2);
    drop(worker);
    db.drop_db().await;
}
