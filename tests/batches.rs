//! How a worker's batches survive what ordinary operations throw at them, against a real
//! broker and database: commands delivered again after their outcome was pruned, pruning
//! and replaying across the dedupe window, one partition's batch failing for good, batches
//! too heavy for the statement timeout, and a suspended operator command holding a
//! partition's lock. Needs `deploy/local/up.sh`.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use commands::{AggregateId, Command, CommandId, CommandType, Source};
use serde_json::{json, Value};
use sqlx::Row;
use support::workload::{
    assert_events_published, assert_matches_model, generate, serial_model, stored_aggregates, Model,
};
use support::{
    cmdproc, cmdproc_on, ends, produce_all, produce_and_wait, send_signal, wait_processed,
    KillOnDrop, TestDb, TestTopics, WorkerProcess, BROKERS,
};

/// `accounts` accounts opened, then `count` deposits spread over them: every command emits
/// an event, whatever the order it is evaluated in.
fn deposits(prefix: &str, accounts: usize, count: usize) -> Vec<Command> {
    let source = Source::parse(format!("/{prefix}")).unwrap();
    let command = |id: String, ty: &str, subject: String, data: Value| {
        Command::new(
            source.clone(),
            CommandId::parse(id).unwrap(),
            CommandType::parse(ty).unwrap(),
            AggregateId::parse(subject).unwrap(),
            data,
        )
    };
    let mut out: Vec<Command> = (0..accounts)
        .map(|a| {
            command(
                format!("open-{a}"),
                "account.Open",
                format!("{prefix}-{a}"),
                json!({"owner": format!("owner-{a}")}),
            )
        })
        .collect();
    out.extend((0..count).map(|n| {
        command(
            format!("deposit-{n}"),
            "account.Deposit",
            format!("{prefix}-{}", n % accounts),
            json!({"amount": n % 50 + 1}),
        )
    }));
    out
}

/// Every stored aggregate equals the serial model (state and version), no aggregate has a
/// gap in its event versions, and the events stored are the model's. Unlike
/// `assert_matches_model` it does not count recorded outcomes, which pruning deletes.
async fn assert_state_matches(db: &TestDb, model: &Model) {
    let stored = stored_aggregates(db).await;
    let modeled = model.stored();
    let differ: Vec<String> = modeled
        .iter()
        .filter(|(k, want)| stored.get(*k) != Some(*want))
        .map(|(k, want)| format!("{k:?}: stored {:?}, model {want:?}", stored.get(k)))
        .chain(
            stored
                .keys()
                .filter(|k| !modeled.contains_key(*k))
                .map(|k| format!("{k:?} stored but not in the model")),
        )
        .collect();
    assert!(
        differ.is_empty(),
        "{} aggregates differ from the serial model:\n{}",
        differ.len(),
        differ[..differ.len().min(20)].join("\n")
    );
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(events as usize, model.events.len(), "stored events");
    let gaps: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM events e JOIN aggregates a USING (aggregate_type, aggregate_id)
           GROUP BY e.aggregate_type, e.aggregate_id, a.version
           HAVING count(*) <> max(e.version) OR min(e.version) <> 1 OR max(e.version) <> a.version) g",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(gaps, 0, "aggregates with gaps in their event versions");
}

/// Recorded outcomes of commands of `topic`.
async fn outcomes_of(db: &TestDb, topic: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM processed_commands WHERE topic = $1")
        .bind(topic)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// Waits until every recorded outcome of `topic` is pruned.
async fn wait_pruned(db: &TestDb, topic: &str, worker: &WorkerProcess) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while outcomes_of(db, topic).await > 0 {
        assert!(
            Instant::now() < deadline,
            "outcomes of {topic} not pruned within 30s:\n{}",
            worker.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The commands of `commands` whose events are stored, once each, in their order.
async fn commands_with_events(db: &TestDb, commands: &[Command]) -> Vec<Command> {
    let applied: HashSet<(String, String)> =
        sqlx::query("SELECT DISTINCT source, command_id FROM events")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    let mut seen = HashSet::new();
    commands
        .iter()
        .filter(|c| {
            let key = (c.source.to_string(), c.id.to_string());
            applied.contains(&key) && seen.insert(key)
        })
        .cloned()
        .collect()
}

/// A command delivered again after its recorded outcome was pruned (a client retry older
/// than the dedupe window) is a duplicate, because its events are still stored; it stalls
/// neither its partition nor the others of its poll.
#[tokio::test(flavor = "multi_thread")]
async fn a_late_redelivery_after_pruning_is_a_duplicate_and_stalls_nothing() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(3).await;
    let worker = WorkerProcess::spawn(
        &db,
        &topics,
        "w1",
        &["--dedupe-window", "1s", "--prune-every", "1s"],
    );
    // No re-sent duplicates inside the workloads: a duplicate of a rejected command arriving
    // after the window would be evaluated again, by design.
    let first = generate(61, 1_200, 30, 10, 0);
    produce_and_wait(&db, &topics, &first, Duration::from_secs(120), &[&worker]).await;
    wait_pruned(&db, topics.commands.as_str(), &worker).await;

    // Every applied command again (as a client retrying long after would), then new work on
    // the same aggregates.
    let late = commands_with_events(&db, &first).await;
    assert!(late.len() > 500, "most of the workload applied");
    let fresh = generate(62, 600, 30, 10, 0);
    let mut all = first.clone();
    all.extend(late.iter().cloned());
    all.extend(fresh.iter().cloned());
    let model = serial_model(&all);
    let mut again = late.clone();
    again.extend(fresh);
    produce_and_wait(&db, &topics, &again, Duration::from_secs(90), &[&worker]).await;

    assert_state_matches(&db, &model).await;
    assert_events_published(&db, &topics).await;
    let log = worker.log_text();
    assert!(
        log.contains("delivered again after their outcome was pruned"),
        "the worker said what happened:\n{}",
        worker.log_tail(30)
    );
    drop(worker);
    db.drop_db().await;
}

/// A partition whose batch fails for good (here a trigger refusing one aggregate's events)
/// is set aside, and the other partitions of the same polls go on; once the cause is gone
/// it is tried again and catches up, nothing lost, nothing twice.
#[tokio::test(flavor = "multi_thread")]
async fn one_partitions_failing_batch_does_not_hold_back_the_others() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(3).await;
    sqlx::query(
        "CREATE FUNCTION refuse_events() RETURNS trigger AS $$
         BEGIN RAISE EXCEPTION 'events of % refused by the test', NEW.aggregate_id; END $$ LANGUAGE plpgsql",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER refuse_events BEFORE INSERT ON events FOR EACH ROW
         WHEN (NEW.aggregate_id = 'acc-3') EXECUTE FUNCTION refuse_events()",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    // Produced before the worker starts, so its polls carry every partition at once.
    let commands = generate(71, 1_500, 30, 10, 2);
    let model = serial_model(&commands);
    let d = produce_all(&topics.producer(), &commands).await;
    let stuck_at = commands
        .iter()
        .zip(&d)
        .find(|(c, _)| c.subject.as_str() == "acc-3")
        .map(|(_, d)| *d)
        .unwrap();
    let worker = WorkerProcess::spawn(&db, &topics, "w1", &[]);

    let others: BTreeMap<i32, i64> = ends(&d)
        .into_iter()
        .filter(|(p, _)| *p != stuck_at.partition)
        .collect();
    assert!(!others.is_empty());
    wait_processed(
        &db,
        &topics.commands,
        &others,
        Duration::from_secs(90),
        &[&worker],
    )
    .await;
    let stored: i64 = sqlx::query_scalar(
        "SELECT next_offset FROM partitions WHERE topic = $1 AND partition = $2",
    )
    .bind(topics.commands.as_str())
    .bind(stuck_at.partition)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        stored <= stuck_at.offset,
        "the failing partition stopped before acc-3's first command ({stored} > {})",
        stuck_at.offset
    );
    let log = worker.log_text();
    assert!(
        log.contains("partition set aside"),
        "the worker said it set the partition aside:\n{}",
        worker.log_tail(30)
    );

    sqlx::query("DROP TRIGGER refuse_events ON events")
        .execute(&db.pool)
        .await
        .unwrap();
    wait_processed(
        &db,
        &topics.commands,
        &ends(&d),
        Duration::from_secs(120),
        &[&worker],
    )
    .await;
    assert_matches_model(&db, &model).await;
    assert_events_published(&db, &topics).await;
    drop(worker);
    db.drop_db().await;
}

/// Two commands topics share a database; the workers of one prune with a tiny window. The
/// other topic's outcomes stay.
#[tokio::test(flavor = "multi_thread")]
async fn prune_is_scoped_to_its_commands_topic() {
    let db = TestDb::new().await;
    let topics_a = TestTopics::new(2).await;
    let topics_b = TestTopics::new(2).await;
    let worker_a = WorkerProcess::spawn(&db, &topics_a, "a1", &[]);
    let commands_a = deposits("a-acc", 10, 200);
    let d = produce_all(&topics_a.producer(), &commands_a).await;
    wait_processed(
        &db,
        &topics_a.commands,
        &ends(&d),
        Duration::from_secs(60),
        &[&worker_a],
    )
    .await;
    assert_eq!(
        outcomes_of(&db, topics_a.commands.as_str()).await as usize,
        commands_a.len()
    );

    let worker_b = WorkerProcess::spawn(
        &db,
        &topics_b,
        "b1",
        &["--dedupe-window", "1s", "--prune-every", "1s"],
    );
    let commands_b = deposits("b-acc", 10, 200);
    let d = produce_all(&topics_b.producer(), &commands_b).await;
    wait_processed(
        &db,
        &topics_b.commands,
        &ends(&d),
        Duration::from_secs(60),
        &[&worker_b],
    )
    .await;
    // B's worker prunes its own outcomes...
    wait_pruned(&db, topics_b.commands.as_str(), &worker_b).await;
    // ... and, a few passes later, still none of A's.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        outcomes_of(&db, topics_a.commands.as_str()).await as usize,
        commands_a.len(),
        "topic A's outcomes survive topic B's pruning"
    );
    let horizons: Vec<String> = sqlx::query_scalar("SELECT topic FROM prune_horizons")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(horizons, vec![topics_b.commands.to_string()]);
    drop(worker_a);
    drop(worker_b);
    db.drop_db().await;
}

/// The workers pruned with a 1s window: a replay reaching back past that horizon is refused
/// without --force (whatever the replay's own --dedupe-window default says), naming the
/// horizon; with --force it runs, and applies nothing twice.
#[tokio::test(flavor = "multi_thread")]
async fn replay_past_the_prune_horizon_needs_force_and_applies_nothing_twice() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(2).await;
    let worker = WorkerProcess::spawn(
        &db,
        &topics,
        "w1",
        &["--dedupe-window", "1s", "--prune-every", "1s"],
    );
    let commands = deposits("acc", 20, 400);
    let model = serial_model(&commands);
    let d = produce_and_wait(&db, &topics, &commands, Duration::from_secs(60), &[&worker]).await;
    wait_pruned(&db, topics.commands.as_str(), &worker).await;

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
            "60s",
        ],
    );
    assert!(!ok, "refused without --force:\n{out}");
    assert!(
        out.contains("refusing to replay past the dedupe window") && out.contains("prune horizon"),
        "the refusal names the recorded horizon:\n{out}"
    );
    assert_state_matches(&db, &model).await;

    let (ok, out) = cmdproc_on(
        &db,
        &topics,
        "replay",
        &[
            "--partitions",
            "all",
            "--from-offset",
            "0",
            "--force",
            "--timeout",
            "120s",
        ],
    );
    assert!(ok, "{out}\n{}", worker.log_tail(30));
    wait_processed(
        &db,
        &topics.commands,
        &ends(&d),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;
    assert_state_matches(&db, &model).await;
    assert_events_published(&db, &topics).await;
    assert!(
        worker
            .log_text()
            .contains("delivered again after their outcome was pruned"),
        "{}",
        worker.log_tail(30)
    );
    drop(worker);
    db.drop_db().await;
}

/// Every transaction of more than 20 commands runs past the statement timeout: the worker
/// splits the poll per partition, then halves the transactions until they pass, and every
/// command is applied exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_that_keeps_timing_out_is_split_down_to_single_commands() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(2).await;
    let commands = generate(81, 300, 20, 5, 3);
    let model = serial_model(&commands);
    // Produced first, so that the first polls are large.
    let d = produce_all(&topics.producer(), &commands).await;
    let worker = WorkerProcess::spawn_with_env(
        &db,
        &topics,
        "w1",
        &[],
        &[("CMDPROC_FAILPOINT", "slow-batch-over:20")],
    );
    wait_processed(
        &db,
        &topics.commands,
        &ends(&d),
        Duration::from_secs(150),
        &[&worker],
    )
    .await;
    assert_matches_model(&db, &model).await;
    assert_events_published(&db, &topics).await;
    assert!(
        worker
            .log_text()
            .contains("splitting it into smaller transactions"),
        "the worker logged the split:\n{}",
        worker.log_tail(30)
    );
    drop(worker);
    db.drop_db().await;
}

/// An operator's `cmdproc replay` holding a partition's row lock is suspended (SIGSTOP)
/// inside its transaction: Postgres ends its idle session, and the owner goes on applying
/// that partition's commands.
#[tokio::test(flavor = "multi_thread")]
async fn a_suspended_operator_command_cannot_block_the_partitions_owner() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(1).await;
    let worker = WorkerProcess::spawn(&db, &topics, "w1", &[]);
    let commands = deposits("acc", 5, 100);
    let (before, after) = commands.split_at(40);
    let model = serial_model(&commands);
    let d = produce_and_wait(&db, &topics, before, Duration::from_secs(60), &[&worker]).await;

    let stderr = std::env::temp_dir().join(format!("replay-{}.log", topics.group));
    let end = ends(&d)[&0].to_string();
    let replay = cmdproc()
        .args(["replay", "--partitions", "0", "--from-offset", &end])
        .args(["--database-url", &db.url, "--brokers", BROKERS])
        .args(["--commands-topic", topics.commands.as_str()])
        .args(["--events-topic", topics.events.as_str()])
        .env("CMDPROC_FAILPOINT", "rewind-hold-lock")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("spawn cmdproc replay");
    let replay = KillOnDrop(replay);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&stderr)
        .unwrap_or_default()
        .contains("failpoint rewind-hold-lock")
    {
        assert!(
            Instant::now() < deadline,
            "the replay never reached its lock: {}",
            std::fs::read_to_string(&stderr).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    send_signal(replay.0.id(), "STOP");

    produce_and_wait(&db, &topics, after, Duration::from_secs(45), &[&worker]).await;
    assert_state_matches(&db, &model).await;
    drop(replay);
    drop(worker);
    db.drop_db().await;
}
