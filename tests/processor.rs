//! The single-writer processor end to end, against a real broker and database: exactly-once
//! effects with duplicates, several workers matching a serial model, workers killed with
//! SIGKILL, and bad input dead-lettered. Needs `deploy/local/up.sh`.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use commands::{AggregateId, Command, CommandId, CommandType, Source};
use rand::{Rng, SeedableRng};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use sqlx::Row;
use support::workload::{assert_events_published, assert_matches_model, generate, serial_model};
use support::{ends, produce_all, wait_processed, TestDb, TestTopics, WorkerProcess, BROKERS};

/// A raw message to produce: key, value, partition to force, expected dead-letter kind.
type BadInput = (Option<String>, Vec<u8>, Option<i32>, &'static str);

fn cmd(id: &str, ty: &str, subject: &str, data: Value) -> Command {
    Command::new(
        Source::parse("/test").unwrap(),
        CommandId::parse(id).unwrap(),
        CommandType::parse(ty).unwrap(),
        AggregateId::parse(subject).unwrap(),
        data,
    )
}

async fn outcome(db: &TestDb, id: &str) -> (String, Option<String>, i64, Vec<uuid::Uuid>) {
    let r = sqlx::query("SELECT outcome, reason, version, event_ids FROM processed_commands WHERE source = '/test' AND command_id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_delivered_three_times_has_one_effect() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(2).await;
    let producer = topics.producer();
    let mut worker = WorkerProcess::spawn(&db, &topics, "w1", &[]);

    let open = cmd("open", "account.Open", "acc-1", json!({"owner": "ada"}));
    let deposit = cmd("dep", "account.Deposit", "acc-1", json!({"amount": 100}));
    let overdraw = cmd("wd", "account.Withdraw", "acc-1", json!({"amount": 1000}));
    let mut all = vec![
        open.clone(),
        deposit.clone(),
        deposit.clone(),
        overdraw.clone(),
    ];
    let d = produce_all(&producer, &all).await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&d),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;
    let first_deposit = outcome(&db, "dep").await;
    let first_rejection = outcome(&db, "wd").await;
    assert_eq!(first_deposit.0, "applied");
    assert_eq!(first_rejection.0, "rejected");

    // Again later, after the originals were committed, and once more across a restart.
    let later = vec![deposit.clone(), overdraw.clone()];
    all.extend(later.clone());
    let d2 = produce_all(&producer, &later).await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&d2),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;
    assert_eq!(
        worker
            .terminate(Duration::from_secs(20))
            .map(|s| s.success()),
        Some(true),
        "SIGTERM exits 0"
    );
    let worker = WorkerProcess::spawn(&db, &topics, "w2", &[]);
    all.push(deposit.clone());
    let d3 = produce_all(&producer, std::slice::from_ref(&deposit)).await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&d3),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;

    let state: Value =
        sqlx::query_scalar("SELECT state FROM aggregates WHERE aggregate_id = 'acc-1'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(state["balance"], 100, "the deposit counted once");
    assert_eq!(
        outcome(&db, "dep").await,
        first_deposit,
        "the recorded outcome is the original's"
    );
    assert_eq!(outcome(&db, "wd").await, first_rejection);
    let dups: Vec<(String, i64)> =
        sqlx::query("SELECT command_id, count(*) FROM duplicate_deliveries GROUP BY 1 ORDER BY 1")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    assert_eq!(dups, vec![("dep".to_owned(), 3), ("wd".to_owned(), 1)]);
    let model = serial_model(&all);
    assert_matches_model(&db, &model).await;
    assert_events_published(&db, &topics).await;
    drop(worker);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn three_workers_match_the_serial_model() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(6).await;
    let workers: Vec<WorkerProcess> = (0..3)
        .map(|i| WorkerProcess::spawn(&db, &topics, &format!("w{i}"), &[]))
        .collect();
    let commands = generate(7, 20_000, 500, 200, 3);
    let model = serial_model(&commands);
    let deliveries = produce_all(&topics.producer(), &commands).await;
    let refs: Vec<&WorkerProcess> = workers.iter().collect();
    wait_processed(
        &db,
        &topics.commands,
        &ends(&deliveries),
        Duration::from_secs(300),
        &refs,
    )
    .await;
    assert_matches_model(&db, &model).await;
    assert_events_published(&db, &topics).await;
    let dups: i64 = sqlx::query_scalar("SELECT count(*) FROM duplicate_deliveries")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(dups as usize, model.duplicates());
    let owners: i64 = sqlx::query_scalar("SELECT count(DISTINCT owner) FROM partitions")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        owners >= 2,
        "the partitions were shared between workers ({owners} owner(s))"
    );
    drop(workers);
    db.drop_db().await;
}

/// SIGKILLs a worker that currently owns partitions (so the kill lands on live work) and
/// starts a fresh one in its place.
async fn kill_an_owner(
    db: &TestDb,
    topics: &TestTopics,
    workers: &mut [WorkerProcess],
    rng: &mut rand::rngs::StdRng,
    spawned: &mut usize,
) {
    let owners: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT owner FROM partitions WHERE owner IS NOT NULL")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let candidates: Vec<usize> = (0..workers.len())
        .filter(|i| owners.contains(&workers[*i].name))
        .collect();
    let victim = if candidates.is_empty() {
        rng.gen_range(0..workers.len())
    } else {
        candidates[rng.gen_range(0..candidates.len())]
    };
    workers[victim].kill9();
    let name = format!("w{spawned}");
    workers[victim] = WorkerProcess::spawn(db, topics, &name, &["--batch-size", "200"]);
    *spawned += 1;
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_killed_with_sigkill_lose_and_double_nothing() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(6).await;
    let mut workers: Vec<WorkerProcess> = (0..3)
        .map(|i| WorkerProcess::spawn(&db, &topics, &format!("w{i}"), &["--batch-size", "200"]))
        .collect();
    let commands = generate(11, 20_000, 500, 200, 3);
    let model = serial_model(&commands);

    // Produce in slices while a chaos loop kills, with SIGKILL, a worker that owns
    // partitions and starts a new one, so kills land mid-batch, mid-relay and mid-rebalance.
    let producer = topics.producer();
    let mut deliveries = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let mut kills = 0;
    let mut spawned = 3;
    for chunk in commands.chunks(2_000) {
        deliveries.extend(produce_all(&producer, chunk).await);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..2500))).await;
        kill_an_owner(&db, &topics, &mut workers, &mut rng, &mut spawned).await;
        kills += 1;
    }
    // Keep killing for a while after the last command was produced.
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..3000))).await;
        kill_an_owner(&db, &topics, &mut workers, &mut rng, &mut spawned).await;
        kills += 1;
    }
    let refs: Vec<&WorkerProcess> = workers.iter().collect();
    wait_processed(
        &db,
        &topics.commands,
        &ends(&deliveries),
        Duration::from_secs(300),
        &refs,
    )
    .await;
    assert_matches_model(&db, &model).await;
    let published = assert_events_published(&db, &topics).await;
    let takeovers: i64 = sqlx::query_scalar("SELECT sum(acquisitions - 1)::bigint FROM partitions")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    eprintln!(
        "{kills} SIGKILLs, {takeovers} partition takeovers, {published} events published once each"
    );
    // Kills that land within one session timeout of each other share a takeover, so count
    // only that partitions really changed hands several times.
    assert!(
        takeovers >= 3,
        "partitions changed owners ({takeovers} takeovers for {kills} kills)"
    );
    drop(workers);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn each_kind_of_bad_input_is_dead_lettered_and_the_rest_applies() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(3).await;
    let worker = WorkerProcess::spawn(&db, &topics, "w1", &["--max-command-bytes", "65536"]);
    let producer = topics.producer();
    let raw: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .create()
        .unwrap();
    let topic = topics.commands.as_str();

    let valid = |n: usize| {
        cmd(
            &format!("ok-{n}"),
            "account.Open",
            &format!("acc-{n}"),
            json!({"owner": "ada"}),
        )
    };
    let envelope = |ty: &str, subject: &str, data: Value| {
        serde_json::to_vec(
            &json!({"specversion": "1.0", "id": support::unique(), "source": "/bad",
                                   "type": ty, "subject": subject, "data": data}),
        )
        .unwrap()
    };
    let partition_of =
        |key: &str| commands::partitioner::partition_for_key(key.as_bytes(), 3).unwrap();
    // (key, value, forced partition, expected kind)
    let bad: Vec<BadInput> = vec![
        (
            Some("acc-x".into()),
            b"{not json".to_vec(),
            None,
            "malformed",
        ),
        (
            Some("acc-x".into()),
            b"\xff\xfe\xfd".to_vec(),
            None,
            "malformed",
        ),
        (
            Some("acc-x".into()),
            br#"{"hello":"world"}"#.to_vec(),
            None,
            "malformed",
        ),
        (
            Some("acc-x".into()),
            envelope("account.Teleport", "acc-x", json!({})),
            None,
            "unknown_type",
        ),
        (
            Some("acc-x".into()),
            envelope("account.Deposit", "acc-x", json!({"amount": -5})),
            None,
            "schema",
        ),
        (
            Some("acc-y".into()),
            envelope("account.Deposit", "acc-x", json!({"amount": 5})),
            None,
            "key_mismatch",
        ),
        (
            None,
            envelope("account.Deposit", "acc-x", json!({"amount": 5})),
            Some(0),
            "key_mismatch",
        ),
        (
            Some("acc-x".into()),
            envelope("account.Deposit", "acc-x", json!({"amount": 5})),
            Some((partition_of("acc-x") + 1) % 3),
            "misrouted",
        ),
        (
            Some("acc-x".into()),
            envelope(
                "account.Open",
                "acc-x",
                json!({"owner": "x".repeat(100_000)}),
            ),
            None,
            "too_large",
        ),
    ];
    let mut deliveries = Vec::new();
    let mut expected: HashMap<(i32, i64), &str> = HashMap::new();
    for (n, (key, value, partition, kind)) in bad.iter().enumerate() {
        deliveries.extend(produce_all(&producer, &[valid(n)]).await);
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).payload(value);
        if let Some(k) = key {
            record = record.key(k.as_bytes());
        }
        let p = partition.unwrap_or_else(|| partition_of(key.as_deref().unwrap_or("acc-x")));
        record = record
            .partition(p)
            .headers(OwnedHeaders::new().insert(Header {
                key: "trace",
                value: Some("t-1"),
            }));
        let d = raw
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        let (partition, offset) = (d.partition, d.offset);
        deliveries.push(processor::producer::Delivery { partition, offset });
        expected.insert((partition, offset), kind);
    }
    deliveries.extend(produce_all(&producer, &[valid(99)]).await);
    wait_processed(
        &db,
        &topics.commands,
        &ends(&deliveries),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;

    // Every valid command around the bad ones applied.
    let applied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM processed_commands WHERE outcome = 'applied'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(applied as usize, bad.len() + 1);

    // Recorded in Postgres with the right kind...
    let rows = sqlx::query("SELECT partition, \"offset\", kind, value FROM dead_letters")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let recorded: HashMap<(i32, i64), String> = rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    let want: HashMap<(i32, i64), String> =
        expected.iter().map(|(k, v)| (*k, v.to_string())).collect();
    assert_eq!(recorded, want);

    // ...and on the dead-letter topic with the original bytes and the reason in headers.
    let dlq = support::read_topic(&topics.dead_letters);
    assert_eq!(dlq.len(), bad.len());
    let by_origin: BTreeMap<(i32, i64), &support::Read> = dlq
        .iter()
        .map(|m| {
            let p = m
                .header("cmdproc-original-partition")
                .unwrap()
                .parse()
                .unwrap();
            let o = m
                .header("cmdproc-original-offset")
                .unwrap()
                .parse()
                .unwrap();
            ((p, o), m)
        })
        .collect();
    for (i, (key, value, _, kind)) in bad.iter().enumerate() {
        let origin = deliveries[2 * i + 1];
        let m = by_origin[&(origin.partition, origin.offset)];
        assert_eq!(m.header("cmdproc-error-kind").as_deref(), Some(*kind));
        assert!(!m.header("cmdproc-error-message").unwrap().is_empty());
        assert_eq!(m.header("cmdproc-original-topic").as_deref(), Some(topic));
        assert_eq!(
            m.header("trace").as_deref(),
            Some("t-1"),
            "original headers are kept"
        );
        assert_eq!(m.value.as_deref(), Some(&value[..]), "original value bytes");
        assert_eq!(
            m.key.as_deref(),
            key.as_deref().map(str::as_bytes),
            "original key bytes"
        );
    }
    drop(worker);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standalone_relay_publishes_and_inspect_shows_the_aggregate() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(2).await;
    let worker = WorkerProcess::spawn(&db, &topics, "w1", &["--no-relay"]);
    let log =
        std::fs::File::create(std::env::temp_dir().join(format!("{}-relay.log", topics.group)))
            .unwrap();
    // The worker announces its commits, so the relay publishes them without polling: at
    // a 10-minute poll interval, only the announcements get the events out within the
    // minute `wait_processed` allows.
    let relay = support::KillOnDrop(
        support::cmdproc()
            .args(["relay", "--brokers", BROKERS, "--database-url", &db.url])
            .args(["--commands-topic", topics.commands.as_str()])
            .args(["--poll-interval", "10m"])
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let commands = vec![
        cmd("o", "account.Open", "acc-9", json!({"owner": "grace"})),
        cmd("d", "account.Deposit", "acc-9", json!({"amount": 70})),
        cmd("w", "account.Withdraw", "acc-9", json!({"amount": 20})),
        cmd("x", "account.Withdraw", "acc-9", json!({"amount": 500})),
    ];
    let d = produce_all(&topics.producer(), &commands).await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&d),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;
    assert_events_published(&db, &topics).await;
    let events = support::read_topic(&topics.events);
    let types: Vec<String> = events
        .iter()
        .map(|m| {
            m.json().expect("JSON value")["type"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        types,
        ["account.Opened", "account.Deposited", "account.Withdrawn"]
    );
    let versions: Vec<i64> = events
        .iter()
        .map(|m| {
            m.json().expect("JSON value")["aggregateversion"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(versions, [1, 2, 3]);

    let out = support::cmdproc()
        .args(["inspect", "account", "acc-9", "--database-url", &db.url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["aggregate_type"], "account");
    assert_eq!(v["aggregate_id"], "acc-9");
    assert_eq!(v["version"], 3);
    assert_eq!(v["state"]["balance"], 50);
    let outcomes: Vec<&str> = v["recent_commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["applied", "applied", "applied", "rejected"]);
    assert_eq!(v["recent_events"].as_array().unwrap().len(), 3);

    let missing = support::cmdproc()
        .args(["inspect", "account", "nobody", "--database-url", &db.url])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no account `nobody` has been seen"));
    drop(relay);
    drop(worker);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_commands_topics_can_share_one_database() {
    // Each topic has its own positions and outbox sequence per partition, so partition 0 of
    // one does not collide with partition 0 of the other.
    let db = TestDb::new().await;
    let a = TestTopics::new(1).await;
    let b = TestTopics::new(1).await;
    let wa = WorkerProcess::spawn(&db, &a, "wa", &[]);
    let wb = WorkerProcess::spawn(&db, &b, "wb", &[]);
    let da = produce_all(
        &a.producer(),
        &[cmd("a1", "account.Open", "acc-a", json!({"owner": "a"}))],
    )
    .await;
    let db_ = produce_all(
        &b.producer(),
        &[cmd(
            "b1",
            "room.Book",
            "room-b",
            json!({"night": "2027-01-01", "guest": "g"}),
        )],
    )
    .await;
    wait_processed(
        &db,
        &a.commands,
        &ends(&da),
        Duration::from_secs(60),
        &[&wa],
    )
    .await;
    wait_processed(
        &db,
        &b.commands,
        &ends(&db_),
        Duration::from_secs(60),
        &[&wb],
    )
    .await;
    assert_eq!(support::read_topic(&a.events).len(), 1);
    assert_eq!(support::read_topic(&b.events).len(), 1);
    drop((wa, wb));
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partition_fenced_by_a_worker_that_vanished_is_taken_back() {
    // A zombie that took the partition in Postgres and then died leaves the rightful
    // owner fenced while Kafka still assigns the partition to it: the owner drops it,
    // then, a session timeout later and still assigned, takes it back.
    let db = TestDb::new().await;
    let topics = TestTopics::new(1).await;
    let worker = WorkerProcess::spawn(&db, &topics, "w1", &[]);
    let producer = topics.producer();
    let first: Vec<Command> = (0..10)
        .map(|i| {
            cmd(
                &format!("o{i}"),
                "account.Open",
                &format!("acc-{i}"),
                json!({"owner": "o"}),
            )
        })
        .collect();
    let d = produce_all(&producer, &first).await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&d),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;

    sqlx::query("UPDATE partitions SET epoch = epoch + 1, owner = 'ghost'")
        .execute(&db.pool)
        .await
        .unwrap();
    let second: Vec<Command> = (0..10)
        .map(|i| {
            cmd(
                &format!("d{i}"),
                "account.Deposit",
                &format!("acc-{i}"),
                json!({"amount": 5}),
            )
        })
        .collect();
    let d = produce_all(&producer, &second).await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&d),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;

    let all: Vec<Command> = first.into_iter().chain(second).collect();
    assert_matches_model(&db, &serial_model(&all)).await;
    let owner: String = sqlx::query_scalar("SELECT owner FROM partitions")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(owner, "w1");
    let log = std::fs::read_to_string(&worker.log).unwrap();
    assert!(
        log.contains("fenced: another worker owns this partition now"),
        "{log}"
    );
    assert!(log.contains("taking the partition back"), "{log}");
    drop(worker);
    db.drop_db().await;
}
