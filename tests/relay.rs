//! The outbox relay against the real broker and database: whose Kafka positions it trusts
//! (two deployments on one commands topic, offsets reset or deleted), recovery after a
//! restore whose re-derived outbox is numbered differently, rows too large for Kafka, and
//! a failing partition that must not slow the others. Needs `deploy/local/up.sh`.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use commands::{AggregateId, Command, CommandId, CommandType, Source, Topic};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::json;
use sqlx::Row;
use support::workload::assert_events_published;
use support::{backup, restore};
use support::{
    cmdproc, cmdproc_on, ends, free_addr, produce_all, read_topic, read_topic_at_least, repo_root,
    scrape, wait_processed, KillOnDrop, TestDb, TestTopics, WorkerProcess, BROKERS,
};

fn open(id: &str, subject: &str) -> Command {
    Command::new(
        Source::parse("/relay").unwrap(),
        CommandId::parse(id).unwrap(),
        CommandType::parse("account.Open").unwrap(),
        AggregateId::parse(subject).unwrap(),
        json!({"owner": "o"}),
    )
}

fn deposit(id: &str, subject: &str, amount: i64) -> Command {
    Command::new(
        Source::parse("/relay").unwrap(),
        CommandId::parse(id).unwrap(),
        CommandType::parse("account.Deposit").unwrap(),
        AggregateId::parse(subject).unwrap(),
        json!({ "amount": amount }),
    )
}

/// `n` accounts opened, named `<prefix>-<i>`: one event each.
fn opens(prefix: &str, n: usize) -> Vec<Command> {
    (0..n)
        .map(|i| open(&format!("{prefix}-{i}"), &format!("{prefix}-{i}")))
        .collect()
}

/// A standalone `cmdproc relay`, killed when dropped.
fn spawn_relay(
    db: &TestDb,
    topics: &TestTopics,
    name: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (KillOnDrop, PathBuf) {
    let log =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-{name}.log", topics.group));
    let child = cmdproc()
        .args(["relay", "--brokers", BROKERS, "--database-url", &db.url])
        .args([
            "--commands-topic",
            topics.commands.as_str(),
            "--events-topic",
            topics.events.as_str(),
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(extra)
        .env("CMDPROC_LOG", "info,sqlx=warn,rdkafka=warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap(),
        )
        .spawn()
        .expect("spawn cmdproc relay");
    (KillOnDrop(child), log)
}

/// SIGTERM, and wait (bounded) for the process to exit.
fn stop(process: &mut KillOnDrop) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &process.0.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = process.0.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = process.0.kill();
    let _ = process.0.wait();
}

/// Waits until the workers stored positions at or past `ends` (the outbox is written; the
/// relay may not have published it).
async fn wait_consumed(db: &TestDb, topic: &Topic, want: &BTreeMap<i32, i64>) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let stored: BTreeMap<i32, i64> =
            sqlx::query("SELECT partition, next_offset FROM partitions WHERE topic = $1")
                .bind(topic.as_str())
                .fetch_all(&db.pool)
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
        if want
            .iter()
            .all(|(p, e)| stored.get(p).is_some_and(|s| s >= e))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "worker did not consume: {stored:?} < {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs a Kafka CLI tool (`deploy/local/kafka.sh tool ...`); panics if it fails.
fn kafka_tool(args: &[&str]) -> String {
    let out = std::process::Command::new(repo_root().join("deploy/local/kafka.sh"))
        .arg("tool")
        .args(args)
        .output()
        .expect("run kafka.sh tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kafka.sh tool {args:?}: {text}");
    text
}

/// The consumer groups whose name holds this test's commands topic: the relay's.
fn relay_groups(topics: &TestTopics) -> Vec<String> {
    kafka_tool(&["consumer-groups", "--bootstrap-server", BROKERS, "--list"])
        .lines()
        .map(str::trim)
        .filter(|g| g.contains(topics.commands.as_str()) && g.starts_with("cmdproc-relay"))
        .map(str::to_owned)
        .collect()
}

/// The offsets and metadata `group` committed on `topic`'s partitions.
fn committed(group: &str, topic: &Topic) -> Vec<(i32, i64, String)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_range(topic.as_str(), 0, 1);
    consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap()
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => Some((e.partition(), o, e.metadata().to_owned())),
            _ => None,
        })
        .collect()
}

/// The database's deployment id.
async fn deployment(db: &TestDb) -> String {
    sqlx::query_scalar::<_, uuid::Uuid>("SELECT deployment FROM relay_identity")
        .fetch_one(&db.pool)
        .await
        .unwrap()
        .to_string()
}

/// How many events each stored event id appears on the topic.
fn event_ids_on(topic: &Topic) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for m in read_topic(topic) {
        let id = m.json().expect("JSON value")["id"]
            .as_str()
            .expect("event id")
            .to_owned();
        *seen.entry(id).or_default() += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn two_deployments_on_one_commands_topic_each_publish_all_their_events() {
    let blue_db = TestDb::new().await;
    let green_db = TestDb::new().await;
    let blue = TestTopics::new(3).await;
    // Green reads blue's commands topic, into its own database, group and events topic.
    let green_own = TestTopics::new(3).await;
    let green = TestTopics {
        commands: blue.commands.clone(),
        events: green_own.events.clone(),
        dead_letters: blue.dead_letters.clone(),
        replies: blue.replies.clone(),
        group: green_own.group.clone(),
        partitions: 3,
    };
    let blue_worker = WorkerProcess::spawn(&blue_db, &blue, "blue", &[]);
    let green_worker = WorkerProcess::spawn(&green_db, &green, "green", &[]);
    let commands = opens("acc", 80);
    let d = produce_all(&blue.producer(), &commands).await;
    for (db, worker) in [(&blue_db, &blue_worker), (&green_db, &green_worker)] {
        wait_processed(
            db,
            &blue.commands,
            &ends(&d),
            Duration::from_secs(90),
            &[worker],
        )
        .await;
    }
    for (db, topics) in [(&blue_db, &blue), (&green_db, &green)] {
        // Every stored event on the topic once; 80 of them.
        let on_topic = assert_events_published(db, topics).await;
        assert_eq!(on_topic, 80, "{} events on {}", on_topic, topics.events);
    }
    drop((blue_worker, green_worker));
    std::mem::forget(green);
    blue_db.drop_db().await;
    green_db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_group_reset_to_latest_loses_nothing() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(2).await;
    let worker = WorkerProcess::spawn(&db, &topics, "w1", &["--no-relay"]);
    let producer = topics.producer();
    let (mut relay, log) = spawn_relay(&db, &topics, "relay1", &[], &[]);
    let first = produce_all(&producer, &opens("a", 10)).await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&first),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;
    stop(&mut relay);

    // 30 events wait in the outbox while an operator resets every group to latest.
    let second = produce_all(&producer, &opens("b", 30)).await;
    let mut all = first.clone();
    all.extend(second);
    wait_consumed(&db, &topics.commands, &ends(&all)).await;
    let groups = relay_groups(&topics);
    assert!(!groups.is_empty(), "the relay committed its positions");
    // The positions it committed in its Kafka transactions name its deployment.
    for g in &groups {
        let positions = committed(g, &topics.commands);
        assert!(!positions.is_empty(), "{g} has positions");
        for (partition, offset, metadata) in positions {
            assert_eq!(
                metadata,
                format!("cmdproc:{}:{offset}", deployment(&db).await),
                "partition {partition}"
            );
        }
    }
    for g in &groups {
        kafka_tool(&[
            "consumer-groups",
            "--bootstrap-server",
            BROKERS,
            "--group",
            g,
            "--reset-offsets",
            "--to-latest",
            "--topic",
            topics.commands.as_str(),
            "--execute",
        ]);
    }

    let (_relay, _) = spawn_relay(&db, &topics, "relay2", &[], &[]);
    wait_processed(
        &db,
        &topics.commands,
        &ends(&all),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;
    let on_topic = read_topic_at_least(&topics.events, 40, Duration::from_secs(30));
    assert_events_published(&db, &topics).await;
    assert_eq!(
        on_topic.len(),
        40,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    drop(worker);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_restore_and_a_redrive_every_stored_event_is_on_the_topic_once() {
    let mut db = TestDb::new().await;
    let topics = TestTopics::new(1).await;
    // Every command of acc-p panics in this worker: the account is parked.
    let worker = WorkerProcess::spawn_with_env(
        &db,
        &topics,
        "w1",
        &[],
        &[("CMDPROC_FAILPOINT", "handler-panic:acc-p")],
    );
    let producer = topics.producer();
    let mut first = opens("a", 10);
    first.push(open("p-open", "acc-p"));
    first.push(deposit("p-dep1", "acc-p", 10));
    first.push(deposit("p-dep2", "acc-p", 20));
    let d1 = produce_all(&producer, &first).await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&d1),
        Duration::from_secs(90),
        &[&worker],
    )
    .await;
    let dump = backup(&db);

    // After the backup: the parked account is released (its events take outbox sequence
    // numbers between the backup and later commands), then more commands.
    let (ok, out) = cmdproc_on(
        &db,
        &topics,
        "dlq",
        &["redrive", "--aggregate", "account/acc-p"],
    );
    assert!(ok, "{out}");
    let d2 = produce_all(&producer, &opens("b", 10)).await;
    let mut all = d1.clone();
    all.extend(d2);
    wait_processed(
        &db,
        &topics.commands,
        &ends(&all),
        Duration::from_secs(90),
        &[&worker],
    )
    .await;
    let published_before = read_topic(&topics.events).len();
    assert_eq!(published_before, 10 + 3 + 10);

    // Restore: the redrive and the later commands are lost; the workers re-apply the
    // commands, so the outbox is re-derived numbered differently. More commands follow,
    // and the operator redrives the account again.
    restore(&mut db, &dump).await;
    let d3 = produce_all(&producer, &opens("c", 10)).await;
    all.extend(d3);
    wait_processed(
        &db,
        &topics.commands,
        &ends(&all),
        Duration::from_secs(120),
        &[&worker],
    )
    .await;
    let (ok, out) = cmdproc_on(
        &db,
        &topics,
        "dlq",
        &["redrive", "--aggregate", "account/acc-p"],
    );
    assert!(ok, "{out}");
    wait_processed(
        &db,
        &topics.commands,
        &ends(&all),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;
    read_topic_at_least(&topics.events, 33, Duration::from_secs(30));
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 33);
    assert_events_published(&db, &topics).await;
    drop(worker);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_restore_with_the_relay_offsets_deleted_nothing_is_published_twice() {
    let mut db = TestDb::new().await;
    let topics = TestTopics::new(2).await;
    let worker = WorkerProcess::spawn(&db, &topics, "w1", &["--no-relay"]);
    let producer = topics.producer();
    let (mut relay, _) = spawn_relay(&db, &topics, "relay1", &[], &[]);
    let d1 = produce_all(&producer, &opens("a", 10)).await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&d1),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;
    let dump = backup(&db);
    let d2 = produce_all(&producer, &opens("b", 20)).await;
    let mut all = d1.clone();
    all.extend(d2);
    wait_processed(
        &db,
        &topics.commands,
        &ends(&all),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;
    stop(&mut relay);

    // The database goes back to the backup, and Kafka has forgotten the relay's offsets
    // (expired after a week without commits, or deleted).
    restore(&mut db, &dump).await;
    let groups = relay_groups(&topics);
    assert!(!groups.is_empty(), "the relay committed its positions");
    for g in &groups {
        kafka_tool(&[
            "consumer-groups",
            "--bootstrap-server",
            BROKERS,
            "--delete",
            "--group",
            g,
        ]);
    }
    let (_relay, _) = spawn_relay(&db, &topics, "relay2", &[], &[]);
    wait_processed(
        &db,
        &topics.commands,
        &ends(&all),
        Duration::from_secs(120),
        &[&worker],
    )
    .await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 30);
    let seen = event_ids_on(&topics.events);
    let twice = seen.values().filter(|n| **n > 1).count();
    assert_eq!(twice, 0, "events published twice after the restore");
    assert_events_published(&db, &topics).await;
    drop(worker);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_dead_letters_do_not_block_their_partition() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(1).await;
    // The dead-letter topic takes less than the relay's own limit: the broker refuses what
    // lies between.
    kafka_tool(&[
        "configs",
        "--bootstrap-server",
        BROKERS,
        "--alter",
        "--entity-type",
        "topics",
        "--entity-name",
        topics.dead_letters.as_str(),
        "--add-config",
        "max.message.bytes=100000",
    ]);
    let addr = free_addr();
    let worker = WorkerProcess::spawn(
        &db,
        &topics,
        "w1",
        &["--max-command-bytes", "500000", "--metrics-addr", &addr],
    );
    // A librdkafka client at its defaults sends a command of 999,850 bytes, then one of
    // 150,000 bytes that is not JSON.
    let plain: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .create()
        .unwrap();
    let big: Vec<u8> = (0..999_850).map(|i| b'a' + (i % 26) as u8).collect();
    let medium = vec![b'x'; 150_000];
    let mut offsets = Vec::new();
    for value in [&big, &medium] {
        let delivery = plain
            .send(
                FutureRecord::to(topics.commands.as_str())
                    .key("acc-big")
                    .payload(value.as_slice()),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("the broker takes it");
        offsets.push((delivery.partition, delivery.offset));
    }
    let d = produce_all(&topics.producer(), &opens("acc", 20)).await;
    let mut want = ends(&d);
    for (p, o) in &offsets {
        let e = want.entry(*p).or_insert(0);
        *e = (*e).max(o + 1);
    }
    wait_processed(
        &db,
        &topics.commands,
        &want,
        Duration::from_secs(90),
        &[&worker],
    )
    .await;
    read_topic_at_least(&topics.events, 20, Duration::from_secs(30));
    assert_events_published(&db, &topics).await;
    assert_eq!(read_topic(&topics.events).len(), 20);

    // On the dead-letter topic: references, said so in a header.
    let dead = read_topic(&topics.dead_letters);
    assert_eq!(dead.len(), 2, "{dead:?}");
    for (m, (size, (partition, offset), kind)) in dead.iter().zip([
        (999_850, offsets[0], "too_large"),
        (150_000, offsets[1], "malformed"),
    ]) {
        assert_eq!(m.header("cmdproc-error-kind").as_deref(), Some(kind));
        assert_eq!(
            m.header("cmdproc-payload-omitted").as_deref(),
            Some("too_large")
        );
        assert_eq!(
            m.header("cmdproc-payload-size").as_deref(),
            Some(size.to_string().as_str())
        );
        let reference = m.json().expect("JSON value");
        assert_eq!(reference["dead_letter"]["topic"], topics.commands.as_str());
        assert_eq!(reference["dead_letter"]["partition"], partition);
        assert_eq!(reference["dead_letter"]["offset"], offset);
    }
    // Postgres keeps the original bytes.
    let stored: Vec<u8> = sqlx::query_scalar(
        "SELECT value FROM dead_letters WHERE partition = $1 AND \"offset\" = $2",
    )
    .bind(offsets[0].0)
    .bind(offsets[0].1)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(stored == big, "the dead letter keeps the original bytes");
    // And the operator can see it happened.
    assert_eq!(
        scrape(&addr, processor::metrics::PAYLOADS_OMITTED_TOTAL),
        Some(2.0)
    );
    drop(worker);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_partition_does_not_slow_the_others() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(3).await;
    let worker = WorkerProcess::spawn(&db, &topics, "w1", &["--no-relay"]);
    let commands = opens("acc", 240);
    let d = produce_all(&topics.producer(), &commands).await;
    wait_consumed(&db, &topics.commands, &ends(&d)).await;

    // Partition 0's relay steps all fail; one row per Kafka transaction makes the others
    // take many steps.
    let (_relay, log) = spawn_relay(
        &db,
        &topics,
        "relay",
        &["--batch-size", "1"],
        &[("CMDPROC_FAILPOINT", "relay-fail-partition:0")],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let behind: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM partitions p JOIN relay_positions r USING (topic, partition)
             WHERE p.topic = $1 AND p.partition <> 0 AND r.published_seq < p.outbox_seq",
        )
        .bind(topics.commands.as_str())
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if behind == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other partitions were held back by the failing one:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stuck: i64 = sqlx::query_scalar(
        "SELECT published_seq FROM relay_positions WHERE topic = $1 AND partition = 0",
    )
    .bind(topics.commands.as_str())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(stuck, 0, "partition 0 kept failing");
    let on_partition_0 = d.iter().filter(|x| x.partition == 0).count();
    assert!(on_partition_0 > 0 && on_partition_0 < 240);
    let on_topic = read_topic_at_least(
        &topics.events,
        240 - on_partition_0,
        Duration::from_secs(30),
    );
    assert_eq!(on_topic.len(), 240 - on_partition_0);
    drop(worker);
    db.drop_db().await;
}
