//! The commands log changing under the workers through ordinary operations: the topic
//! deleted and re-created, commands deleted by retention before a worker consumed them,
//! partitions added, a failed seek. In every case acknowledged commands are never dropped
//! silently: the partition (or the topic) halts loudly until an operator accepts the change.
//! Needs `deploy/local/up.sh`.

mod support;

use std::time::{Duration, Instant};

use commands::envelope::CLOUDEVENTS_JSON;
use commands::partitioner::partition_for_key;
use commands::{AggregateId, Command, CommandId, CommandType, Source};
use processor::metrics;
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
use rdkafka::client::DefaultClientContext;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;
use support::workload::{assert_matches_model, serial_model};
use support::{
    cmdproc_on, ends, free_addr, http_get as get, produce_all, produce_and_wait, produce_raw,
    scrape, wait_processed, RawMessage, TestDb, TestTopics, WorkerProcess, BROKERS,
};

/// `accounts` accounts named `<prefix>-<n>`, each opened and then given `deposits` deposits,
/// from the source `/<prefix>`.
fn deposits(prefix: &str, accounts: usize, deposits: usize) -> Vec<Command> {
    let source = Source::parse(format!("/{prefix}")).unwrap();
    let mut out = Vec::new();
    let command = |n: usize, ty: &str, subject: &str, data| {
        Command::new(
            source.clone(),
            CommandId::parse(format!("cmd-{n}")).unwrap(),
            CommandType::parse(ty).unwrap(),
            AggregateId::parse(subject).unwrap(),
            data,
        )
    };
    for a in 0..accounts {
        let subject = format!("{prefix}-{a}");
        out.push(command(
            out.len(),
            "account.Open",
            &subject,
            json!({"owner": "o"}),
        ));
    }
    for d in 0..deposits {
        for a in 0..accounts {
            let subject = format!("{prefix}-{a}");
            out.push(command(
                out.len(),
                "account.Deposit",
                &subject,
                json!({"amount": d + 1}),
            ));
        }
    }
    out
}

/// Commands of `source` with a recorded outcome.
async fn processed(db: &TestDb, source: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM processed_commands WHERE source = $1")
        .bind(source)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// Waits until `n` commands of `source` have an outcome.
async fn wait_processed_count(db: &TestDb, source: &str, n: i64, worker: &WorkerProcess) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let got = processed(db, source).await;
        if got == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{got} of {n} commands of {source} processed\n{}",
            worker.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn halted_series(reason: &str) -> String {
    format!("{}{{reason=\"{reason}\"}}", metrics::PARTITIONS_HALTED)
}

/// Waits until the worker says, every way an operator looks, that partitions are halted
/// for `reason`: `/readyz` 503 naming them, the gauge, and an error in the log. Returns the
/// `/readyz` body.
fn wait_halted(addr: &str, reason: &str, worker: &WorkerProcess) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ready = get(addr, "/readyz");
        let gauge = scrape(addr, &halted_series(reason)).unwrap_or(0.0);
        let log = std::fs::read_to_string(&worker.log).unwrap_or_default();
        if let Some((503, body)) = &ready {
            if body.contains("halted")
                && gauge >= 1.0
                && log.contains("ERROR")
                && log.contains("halted")
            {
                return body.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "not halted for {reason}: readyz {ready:?}, gauge {gauge}\n{}",
            worker.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Waits until `/readyz` answers 200 again.
fn wait_ready(addr: &str, worker: &WorkerProcess) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ready = get(addr, "/readyz");
        if matches!(&ready, Some((200, _))) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not ready again: {ready:?}\n{}",
            worker.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .create()
        .expect("admin client")
}

fn admin_options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))
}

/// Deletes the commands topic, waits until the broker no longer has it, and creates it
/// again with as many partitions.
async fn recreate_commands_topic(topics: &TestTopics) {
    let topic = topics.commands.as_str();
    processor::topics::delete(BROKERS, &[topic], Duration::from_secs(10))
        .await
        .expect("delete the commands topic");
    let deadline = Instant::now() + Duration::from_secs(30);
    while processor::topics::partitions_of(BROKERS, topic, Duration::from_secs(5))
        .expect("metadata")
        .is_some()
    {
        assert!(Instant::now() < deadline, "topic {topic} not deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The broker refuses to create a topic still being deleted: retry for a while.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let wanted = vec![(topic.to_owned(), topics.partitions)];
        match processor::topics::create(BROKERS, &wanted, 1, Duration::from_secs(10)).await {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "cannot create {topic} again: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

fn accept_log(db: &TestDb, topics: &TestTopics, partitions: &str) {
    let (ok, out) = cmdproc_on(
        db,
        topics,
        "topics",
        &[
            "accept-log",
            "--partitions",
            partitions,
            "--why",
            "commands topic re-created by the platform team",
        ],
    );
    assert!(ok, "accept-log failed:\n{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_topic_recreated_under_a_running_worker_halts_and_loses_nothing() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(2).await;
    let addr = free_addr();
    let worker = WorkerProcess::spawn(&db, &topics, "w1", &["--metrics-addr", &addr]);
    let before = deposits("before", 10, 3);
    produce_and_wait(&db, &topics, &before, Duration::from_secs(90), &[&worker]).await;

    recreate_commands_topic(&topics).await;
    let after = deposits("after", 12, 4);
    assert_eq!(after.len(), 60);
    produce_all(&topics.producer(), &after).await;

    let ready = wait_halted(&addr, metrics::halt_reason::LOG_CHANGED, &worker);
    assert!(
        ready.contains("partition"),
        "readyz names the partitions: {ready}"
    );
    // Nothing of the new log was applied from the stored offsets of the old one.
    assert_eq!(processed(&db, "/after").await, 0, "{}", worker.log_tail(40));
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(dead, 0);

    accept_log(&db, &topics, "all");
    wait_processed_count(&db, "/after", 60, &worker).await;
    wait_ready(&addr, &worker);
    let mut all = before.clone();
    all.extend(after);
    assert_matches_model(&db, &serial_model(&all)).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_topic_recreated_while_no_worker_ran_and_grown_past_the_stored_offset_halts() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(1).await;
    let mut worker = WorkerProcess::spawn(&db, &topics, "w1", &[]);
    let before = deposits("before", 10, 3);
    produce_and_wait(&db, &topics, &before, Duration::from_secs(90), &[&worker]).await;
    worker
        .terminate(Duration::from_secs(30))
        .expect("worker stops");

    // The new log is longer than the stored offset: offsets alone look fine.
    recreate_commands_topic(&topics).await;
    let after = deposits("after", 12, 4);
    let d = produce_all(&topics.producer(), &after).await;
    assert!(
        ends(&d)[&0] > 40,
        "the new log reaches past the stored offset"
    );

    let addr = free_addr();
    let worker = WorkerProcess::spawn(&db, &topics, "w2", &["--metrics-addr", &addr]);
    let ready = wait_halted(&addr, metrics::halt_reason::LOG_CHANGED, &worker);
    assert!(ready.contains("partition 0"), "readyz: {ready}");
    assert_eq!(processed(&db, "/after").await, 0, "{}", worker.log_tail(40));

    accept_log(&db, &topics, "0");
    wait_processed_count(&db, "/after", 60, &worker).await;
    wait_ready(&addr, &worker);
    let mut all = before.clone();
    all.extend(after);
    assert_matches_model(&db, &serial_model(&all)).await;
    let decisions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM log_decisions WHERE decision = 'accept-log'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(decisions, 1, "the decision is recorded");
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_deleted_before_a_worker_consumed_them_halt_the_partition() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(2).await;
    let mut worker = WorkerProcess::spawn(&db, &topics, "w1", &[]);
    let before = deposits("before", 10, 1);
    produce_and_wait(&db, &topics, &before, Duration::from_secs(90), &[&worker]).await;
    worker
        .terminate(Duration::from_secs(30))
        .expect("worker stops");

    // Acknowledged while no worker runs; then retention (here: deleted records) removes the
    // oldest half of partition 0's new commands.
    let later = deposits("later", 10, 3);
    let d = produce_all(&topics.producer(), &later).await;
    let on_0: Vec<i64> = d
        .iter()
        .filter(|x| x.partition == 0)
        .map(|x| x.offset)
        .collect();
    assert!(on_0.len() >= 4, "partition 0 has new commands");
    let cut = on_0[on_0.len() / 2];
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topics.commands.as_str(), 0, Offset::Offset(cut))
        .unwrap();
    admin()
        .delete_records(&tpl, &admin_options())
        .await
        .expect("delete records");
    let deleted = on_0.iter().filter(|o| **o < cut).count() as i64;

    let addr = free_addr();
    let worker = WorkerProcess::spawn(&db, &topics, "w2", &["--metrics-addr", &addr]);
    let ready = wait_halted(&addr, metrics::halt_reason::LOG_CHANGED, &worker);
    assert!(ready.contains("partition 0"), "readyz: {ready}");
    assert!(!ready.contains("partition 1"), "readyz: {ready}");
    // Partition 1 goes on; partition 0 applies nothing, rather than skipping the deleted.
    let on_1 = d.iter().filter(|x| x.partition == 1).count() as i64;
    wait_processed_count(&db, "/later", on_1, &worker).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(processed(&db, "/later").await, on_1);

    // The operator accepts the loss: the rest of partition 0 is applied.
    accept_log(&db, &topics, "0");
    wait_processed_count(&db, "/later", later.len() as i64 - deleted, &worker).await;
    wait_ready(&addr, &worker);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn partitions_added_under_a_running_worker_halt_the_topic_before_anything_moved_is_applied() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(2).await;
    let addr = free_addr();
    let worker = WorkerProcess::spawn(&db, &topics, "w1", &["--metrics-addr", &addr]);
    let before = deposits("before", 20, 1);
    produce_and_wait(&db, &topics, &before, Duration::from_secs(90), &[&worker]).await;

    let results = admin()
        .create_partitions(
            &[NewPartitions::new(topics.commands.as_str(), 4)],
            &admin_options(),
        )
        .await
        .expect("create partitions");
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");

    // Producers that refreshed their metadata route by the new count.
    let after = deposits("after", 20, 2);
    let moved: Vec<&Command> = after
        .iter()
        .filter(|c| {
            let key = c.subject.as_str().as_bytes();
            partition_for_key(key, 4) != partition_for_key(key, 2)
        })
        .collect();
    assert!(!moved.is_empty(), "some keys move");
    let raw: Vec<RawMessage> = after
        .iter()
        .map(|c| RawMessage {
            partition: partition_for_key(c.subject.as_str().as_bytes(), 4).unwrap(),
            key: Some(c.subject.as_str().as_bytes().to_vec()),
            value: Some(c.encode()),
            headers: vec![(
                "content-type".into(),
                Some(CLOUDEVENTS_JSON.as_bytes().to_vec()),
            )],
        })
        .collect();
    produce_raw(&topics.commands, &raw).await;

    let ready = wait_halted(&addr, metrics::halt_reason::PARTITION_COUNT, &worker);
    assert!(ready.contains("whole topic"), "readyz: {ready}");
    // Give a worker that would apply them time to do so.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let misrouted: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dead_letters WHERE kind = 'misrouted'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(misrouted, 0, "nothing dead-lettered as misrouted");
    let moved_ids: Vec<String> = moved.iter().map(|c| c.id.to_string()).collect();
    let applied_moved: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM processed_commands WHERE source = '/after' AND command_id = ANY($1)",
    )
    .bind(&moved_ids)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(applied_moved, 0, "nothing routed by the new count applied");
    let recorded: i32 = sqlx::query_scalar("SELECT partitions FROM topic_layouts WHERE topic = $1")
        .bind(topics.commands.as_str())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(recorded, 2);
    let log = std::fs::read_to_string(&worker.log).unwrap();
    assert!(
        log.contains("accept-partitions"),
        "the log says what to run"
    );

    // Restarting the worker is not a way past the halt: the new process derives it again
    // from the broker and the database, and applies nothing of the moved keys.
    let mut worker = worker;
    worker.terminate(Duration::from_secs(20));
    let addr = free_addr();
    let worker = WorkerProcess::spawn(&db, &topics, "w2", &["--metrics-addr", &addr]);
    let ready = wait_halted(&addr, metrics::halt_reason::PARTITION_COUNT, &worker);
    assert!(
        ready.contains("whole topic"),
        "readyz after a restart: {ready}"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let applied_moved: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM processed_commands WHERE source = '/after' AND command_id = ANY($1)",
    )
    .bind(&moved_ids)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        applied_moved, 0,
        "nothing routed by the new count applied after a restart"
    );

    // The operator accepts the new count (no command of a moved key was applied before on
    // its old partition, so here the order holds): everything is applied once.
    let (ok, out) = cmdproc_on(
        &db,
        &topics,
        "topics",
        &["accept-partitions", "--why", "grown for the test"],
    );
    assert!(ok, "{out}");
    wait_processed_count(&db, "/after", after.len() as i64, &worker).await;
    wait_ready(&addr, &worker);
    let mut all = before.clone();
    all.extend(after);
    assert_matches_model(&db, &serial_model(&all)).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_seek_never_lets_a_batch_start_past_the_stored_offset() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(1).await;
    // The first seek back to a stored position (after the replay below) reports failure.
    let worker = WorkerProcess::spawn_with_env(
        &db,
        &topics,
        "w1",
        &[],
        &[("CMDPROC_FAILPOINT", "seek-fails-once")],
    );
    let before = deposits("before", 5, 3);
    produce_and_wait(&db, &topics, &before, Duration::from_secs(90), &[&worker]).await;

    // One account's effects are lost; a replay from 0 must restore them.
    for table in ["processed_commands", "events", "aggregates"] {
        sqlx::query(&format!(
            "DELETE FROM {table} WHERE aggregate_id = 'before-2'"
        ))
        .execute(&db.pool)
        .await
        .unwrap();
    }
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
            "5s",
        ],
    );
    eprintln!("replay (ok: {ok}):\n{out}");
    // A command arriving meanwhile: with the seek failed, the consumer is still past the
    // rewound range.
    let later = deposits("later", 1, 1);
    produce_and_wait(&db, &topics, &later, Duration::from_secs(90), &[&worker]).await;
    let mut all = before.clone();
    all.extend(later);
    assert_matches_model(&db, &serial_model(&all)).await;
    let log = std::fs::read_to_string(&worker.log).unwrap();
    assert!(
        log.contains("seek to the stored position failed"),
        "{}",
        worker.log_tail(40)
    );
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn accepting_a_log_that_did_not_change_moves_nothing_unless_forced() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(2).await;
    let worker = WorkerProcess::spawn(&db, &topics, "w1", &[]);
    let commands = deposits("same", 6, 2);
    let d = produce_and_wait(&db, &topics, &commands, Duration::from_secs(60), &[&worker]).await;
    let positions = |db: &TestDb| {
        let pool = db.pool.clone();
        let topic = topics.commands.to_string();
        async move {
            sqlx::query_as::<_, (i32, i64)>(
                "SELECT partition, next_offset FROM partitions WHERE topic = $1 ORDER BY partition",
            )
            .bind(topic)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let before = positions(&db).await;
    assert!(before.iter().all(|(_, o)| *o > 0), "{before:?}");

    // An operator accepting "all" by mistake: the logs hold the stored positions and the
    // messages applied before them, so nothing moves and nothing is replayed.
    let (ok, out) = cmdproc_on(
        &db,
        &topics,
        "topics",
        &["accept-log", "--partitions", "all", "--why", "by mistake"],
    );
    assert!(ok, "{out}");
    assert_eq!(out.matches("left as it is").count(), 2, "{out}");
    assert_eq!(positions(&db).await, before);
    let decisions: i64 = sqlx::query_scalar("SELECT count(*) FROM log_decisions")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(decisions, 0);

    // Forced, the positions move to the log start, and the replay that follows has no
    // second effect.
    let (ok, out) = cmdproc_on(
        &db,
        &topics,
        "topics",
        &[
            "accept-log",
            "--partitions",
            "all",
            "--why",
            "on purpose",
            "--force",
        ],
    );
    assert!(ok && out.contains("-> 0"), "{out}");
    wait_processed(
        &db,
        &topics.commands,
        &ends(&d),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;
    assert_matches_model(&db, &serial_model(&commands)).await;
    drop(worker);
    db.drop_db().await;
}
