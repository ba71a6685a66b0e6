//! Failure injection against the real broker and database: a worker paused past its session
//! (a zombie), a lease that expires during a slow write, workers joining and leaving under
//! load, graceful shutdown, Postgres and Kafka outages, hostile input and a hot key. Every
//! test asserts what a user would check: the final state equals the serial model, every
//! event is on the events topic exactly once, nothing is lost and nothing applied twice.
//!
//! Some tests stop Kafka or Postgres with `deploy/local/{kafka,postgres}.sh`, so every test
//! in this binary holds one global lock and none overlap; a stopped service is started
//! again even when a test panics. Other suites running against the same services at the
//! same time would see those outages too. Needs `deploy/local/up.sh`.

mod poison;
mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::time::{Duration, Instant};

use commands::envelope::DeadLetterKind;
use commands::partitioner::partition_for_key;
use commands::{AggregateId, Command, CommandId, CommandType, Source};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::Row;
use support::workload::{assert_events_published, assert_matches_model, generate, serial_model};
use support::{
    ends, outbox_backlog, partition_owners, produce_all, produce_in_slices, produce_raw,
    send_signal, wait_processed, RawMessage, TestDb, TestTopics, WorkerProcess,
};

/// Serializes every test of this binary: some stop the broker or the database, which would
/// break whatever else runs at that moment.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The lock of [`SERIAL`], for the tests in submodules.
pub(crate) async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// Generous bound for a run to finish after a failure; a healthy run needs a few seconds.
const WAIT: Duration = Duration::from_secs(180);

/// What a worker logs when a batch finds its epoch stale (the relay's Kafka producer being
/// fenced is another matter, and logged differently).
const BATCH_FENCED: &str = "fenced: another worker owns";

/// `WorkerProcess::spawn` runs workers with a 6 s session timeout.
const SESSION: Duration = Duration::from_secs(6);

/// A local service stopped for an outage. Dropping it, also while a test panics, starts the
/// service again, so one failing test cannot leave the broker or the database down for the
/// rest of the suite.
struct Outage {
    service: &'static str,
    down: bool,
}

impl Outage {
    /// Stops `service` (`kafka` or `postgres`); returns once it is down.
    fn begin(service: &'static str) -> Outage {
        let mut outage = Outage {
            service,
            down: true,
        };
        if !tokio::task::block_in_place(|| service_ctl(service, "stop")) {
            outage.end();
            panic!("could not stop {service}");
        }
        outage
    }

    /// Starts the service again; the scripts return once it answers clients.
    fn end(&mut self) {
        if self.down {
            assert!(
                tokio::task::block_in_place(|| service_ctl(self.service, "start")),
                "could not start {} again",
                self.service
            );
            self.down = false;
        }
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if self.down && !service_ctl(self.service, "start") {
            eprintln!(
                "!!! could not restart {}: run deploy/local/{}.sh start",
                self.service, self.service
            );
        }
    }
}

/// Runs `deploy/local/<service>.sh <action>` synchronously.
fn service_ctl(service: &str, action: &str) -> bool {
    let script = support::repo_root()
        .join("deploy/local")
        .join(format!("{service}.sh"));
    let started = Instant::now();
    let ok = std::process::Command::new(&script)
        .arg(action)
        .status()
        .is_ok_and(|s| s.success());
    eprintln!(
        "{service}.sh {action}: {} in {:.1?}",
        if ok { "ok" } else { "FAILED" },
        started.elapsed()
    );
    ok
}

/// Polls `check` every 200 ms until it holds or `timeout` passes; returns whether it held.
async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The partitions `name` owns, with their epochs.
async fn owned_by(db: &TestDb, topics: &TestTopics, name: &str) -> BTreeMap<i32, i64> {
    partition_owners(db, &topics.commands)
        .await
        .into_iter()
        .filter(|(_, (owner, _))| owner == name)
        .map(|(p, (_, epoch))| (p, epoch))
        .collect()
}

/// Waits until every worker in `names` owns at least one partition.
async fn wait_all_own(db: &TestDb, topics: &TestTopics, names: &[&str]) -> bool {
    wait_until(Duration::from_secs(60), || async {
        let owners = partition_owners(db, &topics.commands).await;
        owners.len() == topics.partitions as usize
            && names.iter().all(|n| owners.values().any(|(o, _)| o == n))
    })
    .await
}

/// Whether every partition in `before` has an epoch above the one recorded there.
async fn epochs_moved_past(db: &TestDb, topics: &TestTopics, before: &BTreeMap<i32, i64>) -> bool {
    let now = partition_owners(db, &topics.commands).await;
    before
        .iter()
        .all(|(p, e)| now.get(p).is_some_and(|(_, cur)| cur > e))
}

/// Backends of this test's database that wait for a lock, with what they run.
async fn lock_waiters(db: &TestDb) -> Vec<String> {
    sqlx::query(
        "SELECT pid, left(regexp_replace(query, '\\s+', ' ', 'g'), 70) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_all(&db.pool)
    .await
    .map(|rows| {
        rows.iter()
            .map(|r| format!("pid {}: {}", r.get::<i32, _>(0), r.get::<String, _>(1)))
            .collect()
    })
    .unwrap_or_default()
}

/// Log lines of `text` that contain any of `needles`, for the test's own output.
fn lines_with<'a>(text: &'a str, needles: &[&str]) -> Vec<&'a str> {
    text.lines()
        .filter(|l| needles.iter().any(|n| l.contains(n)))
        .collect()
}

/// `commands` (each produced to where `deliveries` says, index for index) in the order
/// the commands topic holds them: by partition, then offset. Every aggregate lives on one
/// partition, so this is the order a single serial writer would apply them in.
fn in_topic_order(
    commands: &[Command],
    deliveries: &[processor::producer::Delivery],
) -> Vec<Command> {
    assert_eq!(commands.len(), deliveries.len());
    let mut placed: Vec<(i32, i64, &Command)> = deliveries
        .iter()
        .zip(commands)
        .map(|(d, c)| (d.partition, d.offset, c))
        .collect();
    placed.sort_by_key(|(p, o, _)| (*p, *o));
    placed.into_iter().map(|(_, _, c)| c.clone()).collect()
}

fn command(source: &str, id: String, ty: &str, subject: &str, data: Value) -> Command {
    Command::new(
        Source::parse(source).unwrap(),
        CommandId::parse(id).unwrap(),
        CommandType::parse(ty).unwrap(),
        AggregateId::parse(subject).unwrap(),
        data,
    )
}

// ---------------------------------------------------------------------------------------
// 1. A zombie: a worker frozen past its session, then resumed.

#[tokio::test(flavor = "multi_thread")]
async fn a_zombie_worker_resumed_after_sigstop_commits_nothing() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let topics = TestTopics::new(6).await;
    let args = ["--batch-size", "100"];
    let mut workers = [
        WorkerProcess::spawn(&db, &topics, "w0", &args),
        WorkerProcess::spawn(&db, &topics, "w1", &args),
    ];
    let commands = generate(101, 6_000, 300, 100, 3);
    // About 15 s of steady load, so commands keep arriving before, during and after the pause.
    let production = produce_in_slices(&topics, commands.clone(), 250, Duration::from_millis(600));
    assert!(
        wait_all_own(&db, &topics, &["w0", "w1"]).await,
        "both workers own partitions"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Freeze a worker that owns partitions, as a long GC pause or a stalled VM would.
    let victim = if owned_by(&db, &topics, "w0").await.is_empty() {
        1
    } else {
        0
    };
    let before = owned_by(&db, &topics, &workers[victim].name).await;
    assert!(!before.is_empty());
    // A burst right before the pause, so the worker is frozen busy: with a batch in hand
    // (its next commit then finds a stale epoch) or inside a batch transaction.
    let burst = generate(111, 2_000, 300, 100, 0);
    let burst_deliveries = produce_all(&topics.producer(), &burst).await;
    send_signal(workers[victim].pid(), "STOP");
    eprintln!(
        "SIGSTOP {} owning partitions {before:?} (partition -> epoch)",
        workers[victim].name
    );
    tokio::time::sleep(2 * SESSION).await;

    // The survivor takes the partitions over, incrementing their epochs. (If the zombie froze
    // inside a batch transaction, that transaction holds the partition row lock and the
    // takeover waits until the zombie resumes and finishes it: see the two tests below.)
    let taken_while_frozen = wait_until(Duration::from_secs(15), || {
        epochs_moved_past(&db, &topics, &before)
    })
    .await;
    eprintln!(
        "taken over while frozen: {taken_while_frozen}; lock waiters: {:?}",
        lock_waiters(&db).await
    );
    let log_mark = workers[victim].log_text().len();
    send_signal(workers[victim].pid(), "CONT");
    assert!(
        wait_until(Duration::from_secs(60), || epochs_moved_past(
            &db, &topics, &before
        ))
        .await,
        "every partition of the frozen worker got a new epoch: {:?} -> {:?}",
        before,
        partition_owners(&db, &topics.commands).await
    );

    // The resumed worker must notice it lost its partitions: librdkafka reports the lost
    // assignment, or its next batch finds a stale epoch.
    let noticed = wait_until(Duration::from_secs(30), || {
        let text = workers[victim].log_text();
        let fresh = text[log_mark.min(text.len())..].to_owned();
        async move { fresh.contains("partition revoked") || fresh.contains(BATCH_FENCED) }
    })
    .await;
    let mut deliveries = production.await.unwrap();
    deliveries.extend(burst_deliveries);
    let refs: Vec<&WorkerProcess> = workers.iter().collect();
    wait_processed(&db, &topics.commands, &ends(&deliveries), WAIT, &refs).await;
    // The burst and the steady load share aggregates, so the serial model replays all of
    // them in the order the partitions hold them.
    let sent: Vec<Command> = commands.iter().chain(&burst).cloned().collect();
    let model = serial_model(&in_topic_order(&sent, &deliveries));
    assert_matches_model(&db, &model).await;
    assert_events_published(&db, &topics).await;

    let text = workers[victim].log_text();
    let after = &text[log_mark.min(text.len())..];
    eprintln!(
        "what the zombie logged after SIGCONT:\n{}",
        lines_with(
            after,
            &[BATCH_FENCED, "partition revoked", "partition assigned"]
        )
        .join("\n")
    );
    assert!(
        noticed,
        "the resumed worker logged neither a revoked partition nor a fenced batch"
    );
    assert!(
        workers[victim].alive(),
        "the resumed worker recovers instead of dying"
    );
    let status = tokio::task::block_in_place(|| workers[victim].terminate(Duration::from_secs(20)));
    eprintln!(
        "zombie summary: {}",
        lines_with(&workers[victim].log_text(), &["worker stopped"]).join("")
    );
    assert!(status.is_some_and(|s| s.success()), "SIGTERM exits 0");
    drop(workers);
    db.drop_db().await;
}

// ---------------------------------------------------------------------------------------
// 2. A lease that expires while the owner's batch transaction is stuck on a slow write.

#[tokio::test(flavor = "multi_thread")]
async fn a_lease_that_expires_during_a_slow_write_cannot_commit_stale() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let topics = TestTopics::new(4).await;
    let workers = [
        WorkerProcess::spawn(&db, &topics, "w0", &[]),
        WorkerProcess::spawn(&db, &topics, "w1", &[]),
    ];
    let slow = "acc-slow";
    let slow_partition = partition_for_key(slow.as_bytes(), topics.partitions).unwrap();
    let special =
        |n: usize, ty: &str, data: Value| command("/slow", format!("slow-{n}"), ty, slow, data);
    let workload = generate(202, 4_000, 200, 50, 2);
    let mut all = vec![
        special(0, "account.Open", json!({"owner": "sloth"})),
        special(1, "account.Deposit", json!({"amount": 1000})),
    ];
    all.extend_from_slice(&workload[..1_000]);
    let producer = topics.producer();
    let mut deliveries = produce_all(&producer, &all).await;
    let refs: Vec<&WorkerProcess> = workers.iter().collect();
    wait_processed(&db, &topics.commands, &ends(&deliveries), WAIT, &refs).await;
    assert!(wait_all_own(&db, &topics, &["w0", "w1"]).await);

    // Make the next write of acc-slow slow: hold its row lock from the test. The owner's
    // batch then waits in its version-checked UPDATE, inside a transaction that already
    // holds the partition's row lock (taken first, to check the epoch).
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query(
        "SELECT version FROM aggregates WHERE aggregate_type = 'account' AND aggregate_id = $1 FOR UPDATE",
    )
    .bind(slow)
    .fetch_one(&mut *blocker)
    .await
    .unwrap();
    let blocked_batch = vec![
        special(2, "account.Withdraw", json!({"amount": 300})),
        special(3, "account.Deposit", json!({"amount": 50})),
    ];
    all.extend(blocked_batch.clone());
    deliveries.extend(produce_all(&producer, &blocked_batch).await);
    assert!(
        wait_until(Duration::from_secs(30), || async {
            lock_waiters(&db)
                .await
                .iter()
                .any(|w| w.contains("UPDATE aggregates"))
        })
        .await,
        "the owner's batch blocks on the held row"
    );
    let owners = partition_owners(&db, &topics.commands).await;
    let (owner, epoch) = owners[&slow_partition].clone();
    let victim = workers.iter().position(|w| w.name == owner).unwrap();
    eprintln!("{owner} (epoch {epoch} of partition {slow_partition}) is stuck in a slow write");

    // Now its lease expires: freeze it past the session timeout while load goes on.
    send_signal(workers[victim].pid(), "STOP");
    let more = produce_in_slices(
        &topics,
        workload[1_000..3_000].to_vec(),
        200,
        Duration::from_millis(500),
    );
    tokio::time::sleep(2 * SESSION).await;
    // Why nothing stale can commit: the survivor takes the partition by incrementing its
    // epoch in that same `partitions` row, so its UPDATE waits for the frozen transaction's
    // row lock. Either the frozen batch commits first (its epoch is still current: it was
    // the rightful owner when it began, and the survivor then resumes from the offset it
    // stored), or the takeover commits first and the old owner's `SELECT ... FOR UPDATE`
    // sees the new epoch and rolls back. No interleaving lets a stale epoch commit.
    eprintln!(
        "while frozen, waiting for locks: {:?}",
        lock_waiters(&db).await
    );
    blocker.rollback().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let log_mark = workers[victim].log_text().len();
    send_signal(workers[victim].pid(), "CONT");

    deliveries.extend(more.await.unwrap());
    let rest = &workload[3_000..];
    deliveries.extend(produce_all(&producer, rest).await);
    all.extend_from_slice(&workload[1_000..]);
    let model = serial_model(&all);
    wait_processed(&db, &topics.commands, &ends(&deliveries), WAIT, &refs).await;
    assert_matches_model(&db, &model).await;
    assert_events_published(&db, &topics).await;

    let after = partition_owners(&db, &topics.commands).await;
    assert!(
        after[&slow_partition].1 > epoch,
        "partition {slow_partition} was taken over: epoch {epoch} -> {:?}",
        after[&slow_partition]
    );
    let state: Value = sqlx::query_scalar(
        "SELECT state FROM aggregates WHERE aggregate_type = 'account' AND aggregate_id = $1",
    )
    .bind(slow)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        state["balance"], 750,
        "the slow batch applied once: 1000 - 300 + 50"
    );
    let text = workers[victim].log_text();
    eprintln!(
        "what {owner} logged after SIGCONT:\n{}",
        lines_with(
            &text[log_mark.min(text.len())..],
            &[BATCH_FENCED, "partition revoked", "partition assigned"]
        )
        .join("\n")
    );
    drop(workers);
    db.drop_db().await;
}

// ---------------------------------------------------------------------------------------
// 2b. A worker that freezes for good inside its batch transaction.

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_frozen_inside_its_transaction_does_not_stall_the_others() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let topics = TestTopics::new(4).await;
    let workers = [
        WorkerProcess::spawn(&db, &topics, "w0", &[]),
        WorkerProcess::spawn(&db, &topics, "w1", &[]),
    ];
    let stuck = "acc-stuck";
    let workload = generate(222, 4_000, 200, 50, 2);
    let mut all = vec![command(
        "/stuck",
        "open".into(),
        "account.Open",
        stuck,
        json!({"owner": "frozen"}),
    )];
    all.extend_from_slice(&workload[..1_000]);
    let producer = topics.producer();
    let mut deliveries = produce_all(&producer, &all).await;
    let refs: Vec<&WorkerProcess> = workers.iter().collect();
    wait_processed(&db, &topics.commands, &ends(&deliveries), WAIT, &refs).await;
    assert!(wait_all_own(&db, &topics, &["w0", "w1"]).await);

    // Catch the owner inside a batch transaction (blocked on a row the test holds), freeze
    // it there, then let the row go: the frozen worker's session now sits idle in its
    // transaction, holding the partition's row lock, and never comes back.
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query(
        "SELECT version FROM aggregates WHERE aggregate_type = 'account' AND aggregate_id = $1 FOR UPDATE",
    )
    .bind(stuck)
    .fetch_one(&mut *blocker)
    .await
    .unwrap();
    let deposit = command(
        "/stuck",
        "deposit".into(),
        "account.Deposit",
        stuck,
        json!({"amount": 10}),
    );
    all.push(deposit.clone());
    deliveries.extend(produce_all(&producer, &[deposit]).await);
    assert!(
        wait_until(Duration::from_secs(30), || async {
            lock_waiters(&db)
                .await
                .iter()
                .any(|w| w.contains("UPDATE aggregates"))
        })
        .await,
        "the owner's batch blocks on the held row"
    );
    let partition = partition_for_key(stuck.as_bytes(), topics.partitions).unwrap();
    let (owner, _) = partition_owners(&db, &topics.commands).await[&partition].clone();
    let frozen = workers.iter().position(|w| w.name == owner).unwrap();
    send_signal(workers[frozen].pid(), "STOP");
    blocker.rollback().await.unwrap();
    eprintln!("{owner} frozen for good inside a batch transaction on partition {partition}");

    // The survivor must take every partition over and process everything, including the
    // frozen worker's uncommitted batch, while that worker stays frozen. A lease that a
    // frozen process can hold forever is no lease.
    all.extend_from_slice(&workload[1_000..]);
    deliveries.extend(produce_all(&producer, &workload[1_000..]).await);
    let survivor = &workers[1 - frozen];
    let bound = Duration::from_secs(90);
    let started = Instant::now();
    let done = wait_until(bound, || async {
        let owners = partition_owners(&db, &topics.commands).await;
        let positions: BTreeMap<i32, i64> =
            sqlx::query("SELECT partition, next_offset FROM partitions WHERE topic = $1")
                .bind(topics.commands.as_str())
                .fetch_all(&db.pool)
                .await
                .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
                .unwrap_or_default();
        owners.values().all(|(o, _)| *o == survivor.name)
            && ends(&deliveries)
                .iter()
                .all(|(p, e)| positions.get(p).is_some_and(|n| n >= e))
    })
    .await;
    if !done {
        let waiters = lock_waiters(&db).await;
        let positions: Vec<(i32, i64)> = sqlx::query(
            "SELECT partition, next_offset FROM partitions WHERE topic = $1 ORDER BY 1",
        )
        .bind(topics.commands.as_str())
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
        panic!(
            "with {owner} frozen inside its transaction, {} did not take over and finish within {bound:?}:\n\
             owners {:?}\nstored positions {positions:?}, wanted {:?}\nwaiting for locks: {waiters:?}\n{} log:\n{}",
            survivor.name,
            partition_owners(&db, &topics.commands).await,
            ends(&deliveries),
            survivor.name,
            survivor.log_tail(15)
        );
    }
    eprintln!(
        "{} took over and caught up in {:.1?}",
        survivor.name,
        started.elapsed()
    );
    wait_processed(&db, &topics.commands, &ends(&deliveries), WAIT, &[survivor]).await;
    assert_matches_model(&db, &serial_model(&all)).await;
    assert_events_published(&db, &topics).await;
    drop(workers);
    db.drop_db().await;
}

// ---------------------------------------------------------------------------------------
// 3. Workers joining and leaving (SIGTERM) while load keeps arriving.

#[tokio::test(flavor = "multi_thread")]
async fn workers_joining_and_leaving_under_load_lose_and_double_nothing() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let topics = TestTopics::new(6).await;
    let args = ["--shutdown-timeout", "5s", "--batch-size", "200"];
    let mut spawned = 0;
    let mut spawn = |db: &TestDb| {
        spawned += 1;
        WorkerProcess::spawn(db, &topics, &format!("w{}", spawned - 1), &args)
    };
    let mut running = vec![spawn(&db), spawn(&db)];
    let commands = generate(303, 15_000, 500, 200, 3);
    let model = serial_model(&commands);
    // About 30 s of load.
    let production = produce_in_slices(&topics, commands, 500, Duration::from_millis(900));

    let mut rng = StdRng::seed_from_u64(303);
    let (mut joins, mut leaves) = (0, 0);
    while !production.is_finished() {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(2_000..4_000))).await;
        let join = match running.len() {
            0 | 1 => true,
            4.. => false,
            _ => rng.gen_bool(0.5),
        };
        if join {
            running.push(spawn(&db));
            joins += 1;
            continue;
        }
        let mut leaving = running.remove(rng.gen_range(0..running.len()));
        let started = Instant::now();
        // A SIGTERMed worker finishes its batch, drains its relay, leaves the group and
        // exits 0 within its shutdown deadline.
        let status = tokio::task::block_in_place(|| leaving.terminate(Duration::from_secs(15)));
        eprintln!(
            "SIGTERM {}: {status:?} after {:.1?}",
            leaving.name,
            started.elapsed()
        );
        assert!(
            status.is_some_and(|s| s.success()),
            "{} exits 0 within 15 s of SIGTERM, got {status:?}:\n{}",
            leaving.name,
            leaving.log_tail(30)
        );
        leaves += 1;
    }
    let deliveries = production.await.unwrap();
    let refs: Vec<&WorkerProcess> = running.iter().collect();
    wait_processed(&db, &topics.commands, &ends(&deliveries), WAIT, &refs).await;
    assert_matches_model(&db, &model).await;
    assert_events_published(&db, &topics).await;
    let takeovers: i64 = sqlx::query_scalar("SELECT sum(acquisitions - 1)::bigint FROM partitions")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    eprintln!("{joins} joins, {leaves} SIGTERMs, {takeovers} partition takeovers");
    assert!(
        joins >= 2 && leaves >= 2,
        "membership changed ({joins} joins, {leaves} leaves)"
    );
    drop(running);
    db.drop_db().await;
}

// ---------------------------------------------------------------------------------------
// 4. SIGTERM: drain, leave, exit 0; another worker finishes the rest.

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_and_exits_zero() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let topics = TestTopics::new(4).await;
    let mut first = WorkerProcess::spawn(&db, &topics, "w0", &["--shutdown-timeout", "5s"]);
    let commands = generate(404, 8_000, 300, 100, 3);
    let model = serial_model(&commands);
    let production = produce_in_slices(&topics, commands, 400, Duration::from_millis(400));

    // SIGTERM once the worker is busy, while load is still arriving.
    assert!(
        wait_until(Duration::from_secs(60), || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM processed_commands")
                .fetch_one(&db.pool)
                .await
                .unwrap()
                > 1_500
        })
        .await,
        "the worker processes commands"
    );
    let started = Instant::now();
    let status = tokio::task::block_in_place(|| first.terminate(Duration::from_secs(10)));
    eprintln!("SIGTERM w0: {status:?} after {:.1?}", started.elapsed());
    assert!(
        status.is_some_and(|s| s.success()),
        "exits 0 within 10 s of SIGTERM, got {status:?}:\n{}",
        first.log_tail(30)
    );
    let log = first.log_text();
    for line in [
        "draining the relay",
        "leaving the consumer group",
        "worker stopped",
    ] {
        assert!(
            log.contains(line),
            "the log says `{line}`:\n{}",
            first.log_tail(30)
        );
    }
    // Drained: everything the worker committed was published before it exited.
    let backlog = outbox_backlog(&db, &topics.commands).await;
    let processed: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_commands")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    eprintln!("w0 stopped after {processed} commands with {backlog} outbox rows unpublished");
    assert_eq!(backlog, 0, "the relay drained before the worker exited");

    let second = WorkerProcess::spawn(&db, &topics, "w1", &[]);
    let deliveries = production.await.unwrap();
    wait_processed(
        &db,
        &topics.commands,
        &ends(&deliveries),
        WAIT,
        &[&first, &second],
    )
    .await;
    assert_matches_model(&db, &model).await;
    assert_events_published(&db, &topics).await;
    drop(second);
    db.drop_db().await;
}

// ---------------------------------------------------------------------------------------
// 5. Postgres down for 10 s, then every worker connection killed.

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_outage_is_retried_and_nothing_is_skipped() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let topics = TestTopics::new(6).await;
    let workers = [
        WorkerProcess::spawn(&db, &topics, "w0", &[]),
        WorkerProcess::spawn(&db, &topics, "w1", &[]),
    ];
    assert!(wait_all_own(&db, &topics, &["w0", "w1"]).await);
    let commands = generate(505, 10_000, 300, 100, 3);
    let model = serial_model(&commands);
    // About 20 s of load; it keeps reaching Kafka while the database is away.
    let production = produce_in_slices(&topics, commands, 250, Duration::from_millis(500));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut outage = Outage::begin("postgres");
    tokio::time::sleep(Duration::from_secs(10)).await;
    outage.end();

    // The workers come back on their own. The test's own pool lost its connections too;
    // sqlx tests each one before use and reconnects, so errors here only mean "not yet".
    let processed = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM processed_commands")
            .fetch_one(&db.pool)
            .await
            .unwrap_or(-1)
    };
    let mut at_restart = -1;
    let deadline = Instant::now() + Duration::from_secs(30);
    while at_restart < 0 && Instant::now() < deadline {
        at_restart = processed().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        wait_until(Duration::from_secs(60), || async {
            processed().await > at_restart
        })
        .await,
        "the workers resume after the database is back"
    );

    // Then every connection of the workers dies at once, mid-load, a few times over so
    // that some of the kills land inside batch and relay transactions.
    let mut killed = 0;
    for _ in 0..5 {
        killed += sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()) AS t",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    eprintln!("terminated {killed} backends of the test database");

    let deliveries = production.await.unwrap();
    let refs: Vec<&WorkerProcess> = workers.iter().collect();
    wait_processed(&db, &topics.commands, &ends(&deliveries), WAIT, &refs).await;
    assert_matches_model(&db, &model).await;
    assert_events_published(&db, &topics).await;
    let retries: Vec<String> = workers
        .iter()
        .map(|w| {
            format!(
                "{}: {} retry lines",
                w.name,
                lines_with(&w.log_text(), &["retrying"]).len()
            )
        })
        .collect();
    eprintln!("{}", retries.join(", "));
    assert!(
        workers.iter().any(|w| w.log_text().contains("retrying")),
        "the workers logged their retries"
    );
    drop(workers);
    db.drop_db().await;
}

// ---------------------------------------------------------------------------------------
// 6. Kafka down for 10 s with a relay backlog waiting.

#[tokio::test(flavor = "multi_thread")]
async fn a_kafka_outage_is_survived_and_the_relay_backlog_drains() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let topics = TestTopics::new(6).await;
    let workers = [
        WorkerProcess::spawn(&db, &topics, "w0", &[]),
        WorkerProcess::spawn(&db, &topics, "w1", &[]),
    ];
    assert!(wait_all_own(&db, &topics, &["w0", "w1"]).await);
    let commands = generate(606, 8_000, 300, 100, 3);
    let model = serial_model(&commands);
    let (first_half, second_half) = commands.split_at(4_000);

    // Hold the workers' batches back (they wait to insert into processed_commands) while
    // their consumers fetch the first half, so that they commit it only once Kafka is gone:
    // the relay then has a backlog it cannot publish until the broker is back.
    let mut gate = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE processed_commands IN EXCLUSIVE MODE")
        .execute(&mut *gate)
        .await
        .unwrap();
    let mut deliveries = produce_all(&topics.producer(), first_half).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut outage = Outage::begin("kafka");
    let down_since = Instant::now();
    gate.commit().await.unwrap();
    let first_ends = ends(&deliveries);
    let consumed = wait_until(Duration::from_secs(8), || async {
        let owners: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM partitions p JOIN UNNEST($2::int[], $3::bigint[]) AS e(p, o)
             ON p.partition = e.p WHERE p.topic = $1 AND p.next_offset >= e.o",
        )
        .bind(topics.commands.as_str())
        .bind(first_ends.keys().copied().collect::<Vec<_>>())
        .bind(first_ends.values().copied().collect::<Vec<_>>())
        .fetch_one(&db.pool)
        .await
        .unwrap();
        owners as usize == first_ends.len()
    })
    .await;
    let backlog = outbox_backlog(&db, &topics.commands).await;
    eprintln!(
        "with Kafka down: prefetched first half committed: {consumed}; {backlog} outbox rows wait for the relay"
    );
    assert!(backlog > 0, "the relay has a backlog while Kafka is down");

    // Meanwhile an operator's one-shot command fails fast and says why, instead of hanging.
    let started = Instant::now();
    let out = support::cmdproc()
        .args([
            "topics",
            "create",
            "--commands-topic",
            topics.commands.as_str(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot reach the Kafka broker at 127.0.0.1:9092"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "failed within seconds"
    );
    eprintln!(
        "topics create with Kafka down failed in {:?}: {}",
        started.elapsed(),
        err.trim()
    );

    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down_since.elapsed())).await;
    outage.end();

    // A fresh producer: the old one may still be backing off its reconnects.
    deliveries.extend(produce_all(&topics.producer(), second_half).await);
    let refs: Vec<&WorkerProcess> = workers.iter().collect();
    wait_processed(&db, &topics.commands, &ends(&deliveries), WAIT, &refs).await;
    assert_matches_model(&db, &model).await;
    assert_events_published(&db, &topics).await;
    let mut workers = workers;
    for w in &mut workers {
        assert!(w.alive(), "{} survived the outage", w.name);
    }
    drop(workers);
    db.drop_db().await;
}

// ---------------------------------------------------------------------------------------
// 7. Ten thousand hostile messages mixed with valid commands.

/// Expected dead-letter kinds of one hostile message (any of them).
type Kinds = &'static [&'static str];

/// One hostile message and the dead-letter kinds it may legitimately get.
struct Hostile {
    message: RawMessage,
    kinds: Kinds,
}

/// A structured-mode envelope with the given attributes, as JSON.
fn envelope(id: &str, ty: &str, subject: &str, data: Value) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "/hostile", "type": ty,
           "subject": subject, "data": data})
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let n = rng.gen_range(0..=max);
    (0..n).map(|_| rng.gen()).collect()
}

/// Headers that mean nothing to cmdproc (no `ce_` prefix): binary values, null values,
/// odd names. They must not change how a message is handled.
fn junk_headers(rng: &mut StdRng) -> Vec<(String, Option<Vec<u8>>)> {
    (0..rng.gen_range(1..4))
        .map(|i| {
            let value = match rng.gen_range(0..3) {
                0 => None,
                1 => Some(random_bytes(rng, 40)),
                _ => Some(b"text/plain; charset=\xff".to_vec()),
            };
            let name = match i {
                0 => "content-type".to_owned(),
                _ => format!("x-junk-{}", rng.gen_range(0..1000)),
            };
            (name, value)
        })
        .collect()
}

/// A hostile message of a random category. `n` makes ids unique; `partitions` is the
/// commands topic's partition count.
fn hostile(rng: &mut StdRng, n: usize, partitions: i32, limit: usize) -> Hostile {
    let subject = format!("acc-{}", rng.gen_range(0..100));
    let id = format!("h-{n}");
    let home = partition_for_key(subject.as_bytes(), partitions).unwrap();
    let valid = || {
        serde_json::to_vec(&envelope(
            &id,
            "account.Deposit",
            &subject,
            json!({"amount": 5}),
        ))
        .unwrap()
    };
    let keyed = |value: Vec<u8>| RawMessage {
        partition: home,
        key: Some(subject.clone().into_bytes()),
        value: Some(value),
        headers: Vec::new(),
    };
    let (mut message, kinds): (RawMessage, Kinds) = match rng.gen_range(0..16) {
        // Random bytes with a random key, or none, on any partition.
        0 => {
            let key = match rng.gen_range(0..3) {
                0 => None,
                1 => Some(Vec::new()),
                _ => Some(random_bytes(rng, 30)),
            };
            let value = random_bytes(rng, 300);
            (
                RawMessage {
                    partition: rng.gen_range(0..partitions),
                    key,
                    value: Some(value),
                    headers: Vec::new(),
                },
                &["malformed"],
            )
        }
        // A valid envelope with invalid UTF-8 spliced in.
        1 => {
            let mut v = valid();
            let at = rng.gen_range(1..v.len() - 1);
            v[at] = 0xff;
            v.insert(at, 0xc3);
            (keyed(v), &["malformed"])
        }
        // A valid envelope cut short.
        2 => {
            let v = valid();
            let cut = rng.gen_range(0..v.len());
            (keyed(v[..cut].to_vec()), &["malformed"])
        }
        // Nesting deeper than any parser should follow.
        3 => {
            let depth = rng.gen_range(200..10_000);
            let value = match rng.gen_range(0..3) {
                0 => "[".repeat(depth).into_bytes(),
                1 => format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes(),
                _ => {
                    let data = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
                    format!(
                        r#"{{"specversion":"1.0","id":"{id}","source":"/hostile","type":"account.Deposit","subject":"{subject}","data":{data}}}"#
                    )
                    .into_bytes()
                }
            };
            (keyed(value), &["malformed"])
        }
        // Numbers no integer holds.
        4 => {
            let amount =
                ["1e400", "-1e400", "1180591620717411303424", "1.5", "1e-400"][rng.gen_range(0..5)];
            let value = format!(
                r#"{{"specversion":"1.0","id":"{id}","source":"/hostile","type":"account.Deposit","subject":"{subject}","data":{{"amount":{amount}}}}}"#
            );
            (keyed(value.into_bytes()), &["malformed", "schema"])
        }
        // Binary mode (ce_* headers) with garbage.
        5 => {
            let mut headers: Vec<(String, Option<Vec<u8>>)> = vec![
                ("ce_specversion".into(), Some(b"1.0".to_vec())),
                ("ce_id".into(), Some(id.clone().into_bytes())),
                ("ce_source".into(), Some(b"/hostile".to_vec())),
                ("ce_type".into(), Some(b"account.Deposit".to_vec())),
                ("ce_subject".into(), Some(subject.clone().into_bytes())),
            ];
            let mut value = br#"{"amount":5}"#.to_vec();
            let kinds: Kinds = match rng.gen_range(0..6) {
                0 => {
                    headers[0].1 = Some(vec![0xff, 0xfe, 0x00]);
                    &["malformed"]
                }
                1 => {
                    value = random_bytes(rng, 50);
                    value.insert(0, b'{');
                    &["malformed"]
                }
                2 => {
                    headers.truncate(1);
                    &["schema"]
                }
                3 => {
                    headers.push(("ce_expectedversion".into(), Some(b"-3".to_vec())));
                    &["schema"]
                }
                4 => {
                    headers[3].1 = Some(b"Account..deposit".to_vec());
                    &["schema"]
                }
                _ => {
                    headers[0].1 = None;
                    &["schema", "malformed"]
                }
            };
            let mut m = keyed(value);
            m.headers = headers;
            (m, kinds)
        }
        // No key, or an empty one.
        6 => {
            let mut m = keyed(valid());
            m.key = if rng.gen_bool(0.5) {
                None
            } else {
                Some(Vec::new())
            };
            (m, &["key_mismatch"])
        }
        // A key that is not the subject (sent to the key's partition).
        7 => {
            let other = format!("acc-other-{}", rng.gen_range(0..100));
            let mut m = keyed(valid());
            m.partition = partition_for_key(other.as_bytes(), partitions).unwrap();
            m.key = Some(other.into_bytes());
            (m, &["key_mismatch"])
        }
        // Larger than --max-command-bytes.
        8 => {
            let pad = "x".repeat(rng.gen_range(limit..3 * limit));
            let v = serde_json::to_vec(&envelope(
                &id,
                "account.Open",
                &subject,
                json!({"owner": pad}),
            ))
            .unwrap();
            (keyed(v), &["too_large"])
        }
        // Types nobody handles.
        9 => {
            let ty = ["account.Teleport", "spaceship.Launch", "room.Demolish"][rng.gen_range(0..3)];
            let v = serde_json::to_vec(&envelope(&id, ty, &subject, json!({"amount": 5}))).unwrap();
            (keyed(v), &["unknown_type"])
        }
        // Schema violations, in the data and in the envelope.
        10 => {
            let mut e = envelope(&id, "account.Deposit", &subject, json!({"amount": 5}));
            match rng.gen_range(0..8) {
                0 => e["data"] = json!({"amount": -5}),
                1 => e["data"] = json!({"amount": "10"}),
                2 => e["data"] = json!({"amount": 5, "extra": true}),
                3 => e["data"] = Value::Null,
                4 => e["specversion"] = json!("0.3"),
                5 => e["id"] = json!(""),
                6 => e["time"] = json!("yesterday"),
                _ => {
                    e.as_object_mut().unwrap().remove("source");
                }
            }
            (keyed(serde_json::to_vec(&e).unwrap()), &["schema"])
        }
        // A valid command on a partition its key does not map to.
        11 => {
            let mut m = keyed(valid());
            m.partition = (home + rng.gen_range(1..partitions)) % partitions;
            (m, &["misrouted"])
        }
        // JSON that is not a CloudEvent.
        12 => {
            let v = [
                r#"{"hello":"world"}"#,
                "[1,2,3]",
                r#""acc-1""#,
                "null",
                "42",
                "{}",
            ][rng.gen_range(0..6)];
            (keyed(v.as_bytes().to_vec()), &["malformed"])
        }
        // No value at all.
        13 => {
            let mut m = keyed(Vec::new());
            m.value = if rng.gen_bool(0.5) {
                None
            } else {
                Some(Vec::new())
            };
            (m, &["malformed"])
        }
        // U+0000 in data or in the correlation id: valid JSON that Postgres cannot store.
        14 => {
            let mut e = envelope(&id, "account.Open", &subject, json!({"owner": "a\u{0}b"}));
            if rng.gen_bool(0.5) {
                e = envelope(&id, "account.Deposit", &subject, json!({"amount": 5}));
                e["correlationid"] = json!("\u{0}");
            }
            (keyed(serde_json::to_vec(&e).unwrap()), &["schema"])
        }
        // Control characters where identities go.
        _ => {
            let bad_subject = format!("{subject}\u{7}");
            let v = serde_json::to_vec(&envelope(
                &id,
                "account.Deposit",
                &bad_subject,
                json!({"amount": 5}),
            ))
            .unwrap();
            let mut m = keyed(v);
            m.key = Some(bad_subject.into_bytes());
            (m, &["schema"])
        }
    };
    if message.headers.is_empty() && rng.gen_bool(0.3) {
        message.headers = junk_headers(rng);
    }
    Hostile { message, kinds }
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_hostile_messages_never_stop_a_worker() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let topics = TestTopics::new(4).await;
    let limit = 20_000;
    let args = ["--max-command-bytes", "20000"];
    let mut workers = [
        WorkerProcess::spawn(&db, &topics, "w0", &args),
        WorkerProcess::spawn(&db, &topics, "w1", &args),
    ];
    let valid = generate(707, 2_000, 100, 40, 3);
    let model = serial_model(&valid);

    // Valid commands at random positions among hostile ones, in their own order.
    let mut rng = StdRng::seed_from_u64(707);
    let total = 10_000;
    let mut valid_at: BTreeSet<usize> = BTreeSet::new();
    while valid_at.len() < valid.len() {
        valid_at.insert(rng.gen_range(0..total));
    }
    let mut messages = Vec::with_capacity(total);
    let mut expected: Vec<Option<Kinds>> = Vec::with_capacity(total);
    let mut next_valid = valid.iter();
    for n in 0..total {
        if valid_at.contains(&n) {
            let c = next_valid.next().unwrap();
            let mut headers = vec![(
                "content-type".to_owned(),
                Some(b"application/cloudevents+json".to_vec()),
            )];
            // Junk headers on a valid command change nothing.
            if rng.gen_bool(0.2) {
                headers = junk_headers(&mut rng);
            }
            messages.push(RawMessage {
                partition: partition_for_key(c.subject.as_str().as_bytes(), topics.partitions)
                    .unwrap(),
                key: Some(c.subject.as_str().as_bytes().to_vec()),
                value: Some(c.encode()),
                headers,
            });
            expected.push(None);
        } else {
            let h = hostile(&mut rng, n, topics.partitions, limit);
            messages.push(h.message);
            expected.push(Some(h.kinds));
        }
    }
    let deliveries = produce_raw(&topics.commands, &messages).await;
    let refs: Vec<&WorkerProcess> = workers.iter().collect();
    wait_processed(&db, &topics.commands, &ends(&deliveries), WAIT, &refs).await;

    assert_matches_model(&db, &model).await;
    assert_events_published(&db, &topics).await;

    // Every hostile message, and nothing else, is a dead letter with a known kind.
    let rows = sqlx::query("SELECT partition, \"offset\", kind, message FROM dead_letters")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let recorded: HashMap<(i32, i64), (String, String)> = rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
        .collect();
    let mut wrong = Vec::new();
    let mut hostile_count = 0;
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for ((d, kinds), m) in deliveries.iter().zip(&expected).zip(&messages) {
        let got = recorded.get(&(d.partition, d.offset));
        match (kinds, got) {
            (None, None) => {}
            (None, Some((kind, why))) => wrong.push(format!(
                "valid command at {}/{} dead-lettered as {kind}: {why}",
                d.partition, d.offset
            )),
            (Some(_), None) => wrong.push(format!(
                "hostile message at {}/{} has no dead letter: {:?}",
                d.partition,
                d.offset,
                m.value
                    .as_deref()
                    .map(|v| String::from_utf8_lossy(&v[..v.len().min(120)]).into_owned())
            )),
            (Some(kinds), Some((kind, why))) => {
                hostile_count += 1;
                *by_kind.entry(kind.clone()).or_default() += 1;
                if DeadLetterKind::parse(kind).is_none() || !kinds.contains(&kind.as_str()) {
                    wrong.push(format!(
                        "hostile message at {}/{} dead-lettered as `{kind}` ({why}), expected one of {kinds:?}",
                        d.partition, d.offset
                    ));
                }
                if why.is_empty() {
                    wrong.push(format!(
                        "dead letter at {}/{} has no message",
                        d.partition, d.offset
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} messages were handled wrongly:\n{}",
        wrong.len(),
        wrong[..wrong.len().min(20)].join("\n")
    );
    let hostile_total = expected.iter().filter(|k| k.is_some()).count();
    assert_eq!(hostile_count, hostile_total);
    assert_eq!(recorded.len(), hostile_total, "no other dead letters");
    eprintln!("{hostile_total} hostile messages dead-lettered: {by_kind:?}");

    let dlq = support::read_topic(&topics.dead_letters);
    assert_eq!(
        dlq.len(),
        hostile_total,
        "the dead-letter topic holds each hostile message once"
    );
    let origins: BTreeSet<(String, String)> = dlq
        .iter()
        .map(|m| {
            (
                m.header("cmdproc-original-partition").unwrap_or_default(),
                m.header("cmdproc-original-offset").unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(origins.len(), hostile_total, "distinct origins on the DLQ");

    for w in &mut workers {
        assert!(
            w.alive(),
            "{} is still running:\n{}",
            w.name,
            w.log_tail(20)
        );
    }
    drop(workers);
    db.drop_db().await;
}

// ---------------------------------------------------------------------------------------
// 7b. A NUL character in command data: valid JSON and valid per the schemas, but Postgres
// stores it neither in `jsonb` nor in `text` (the engine once retried such a batch forever).

#[tokio::test(flavor = "multi_thread")]
async fn a_nul_character_in_a_command_does_not_stall_its_partition() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let topics = TestTopics::new(1).await;
    let mut worker = WorkerProcess::spawn(&db, &topics, "w0", &[]);
    let sent = [
        command(
            "/nul",
            "open".into(),
            "account.Open",
            "acc-ok",
            json!({"owner": "ada"}),
        ),
        // Schema-valid commands whose data holds U+0000.
        command(
            "/nul",
            "nul-open".into(),
            "account.Open",
            "acc-nul",
            json!({"owner": "nul\u{0}byte"}),
        ),
        command(
            "/nul",
            "nul-book".into(),
            "room.Book",
            "room-nul",
            json!({"night": "2027-01-01", "guest": "\u{0}"}),
        ),
        command(
            "/nul",
            "deposit".into(),
            "account.Deposit",
            "acc-ok",
            json!({"amount": 100}),
        ),
    ];
    let messages: Vec<RawMessage> = sent
        .iter()
        .map(|c| RawMessage {
            partition: 0,
            key: Some(c.subject.as_str().as_bytes().to_vec()),
            value: Some(c.encode()),
            headers: Vec::new(),
        })
        .collect();
    let deliveries = produce_raw(&topics.commands, &messages).await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&deliveries),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;

    // Input that cannot be stored is a dead letter, recorded with the offset it moves past;
    // it is neither retried forever nor allowed to block the commands behind it.
    for d in &deliveries[1..3] {
        let kind: Option<String> = sqlx::query_scalar(
            "SELECT kind FROM dead_letters WHERE partition = $1 AND \"offset\" = $2",
        )
        .bind(d.partition)
        .bind(d.offset)
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        assert_eq!(
            kind.as_deref(),
            Some("schema"),
            "offset {} is dead-lettered",
            d.offset
        );
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_commands")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        applied, 2,
        "only the two commands without NUL were processed"
    );
    let balance: Value =
        sqlx::query_scalar("SELECT state FROM aggregates WHERE aggregate_id = 'acc-ok'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(balance["balance"], 100, "the commands behind it applied");
    assert!(worker.alive());
    drop(worker);
    db.drop_db().await;
}

// ---------------------------------------------------------------------------------------
// 8. A hot key keeps strict order.

/// Half the commands go to `acc-hot` (deposits and larger withdrawals, so many are
/// rejected and any reordering would change which); the rest spread over 200 accounts.
fn hot_key_workload(seed: u64, count: usize) -> Vec<Command> {
    let mut rng = StdRng::seed_from_u64(seed);
    let source = format!("/hot/{seed}");
    let mut out = Vec::with_capacity(count);
    let push = |out: &mut Vec<Command>, ty: &str, subject: &str, data: Value| {
        let id = format!("c-{}", out.len());
        out.push(command(&source, id, ty, subject, data));
    };
    push(&mut out, "account.Open", "acc-hot", json!({"owner": "hot"}));
    for a in 0..200 {
        push(
            &mut out,
            "account.Open",
            &format!("acc-{a}"),
            json!({"owner": format!("o{a}")}),
        );
    }
    while out.len() < count {
        let subject = if rng.gen_bool(0.5) {
            "acc-hot".to_owned()
        } else {
            format!("acc-{}", rng.gen_range(0..200))
        };
        if rng.gen_bool(0.5) {
            let amount: i64 = rng.gen_range(1..=100);
            push(
                &mut out,
                "account.Deposit",
                &subject,
                json!({"amount": amount}),
            );
        } else {
            let amount: i64 = rng.gen_range(1..=300);
            push(
                &mut out,
                "account.Withdraw",
                &subject,
                json!({"amount": amount}),
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hot_key_keeps_strict_order() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let topics = TestTopics::new(6).await;
    let workers: Vec<WorkerProcess> = (0..3)
        .map(|i| WorkerProcess::spawn(&db, &topics, &format!("w{i}"), &[]))
        .collect();
    let commands = hot_key_workload(808, 20_000);
    let model = serial_model(&commands);
    let hot = &model.aggregates[&("account".to_owned(), "acc-hot".to_owned())];
    let hot_rejections = {
        // The workload only means something if the hot key's outcomes depend on order.
        let registry = bank::registry();
        let account = registry.get("account").unwrap();
        let mut state = Value::Null;
        let mut rejected = 0;
        for c in commands.iter().filter(|c| c.subject.as_str() == "acc-hot") {
            let context = commands::Context::new(&c.id, &c.source, 0);
            match account.handle(&state, c.command_type.name(), &c.data, &context) {
                commands::Handled::Accepted(decision) => {
                    state = account.apply(&state, &decision.events)
                }
                commands::Handled::Rejected(_) => rejected += 1,
                commands::Handled::Invalid(error) => panic!("invalid workload command: {error}"),
            }
        }
        rejected
    };
    assert!(
        hot_rejections > 1_000,
        "{hot_rejections} rejections on acc-hot"
    );

    let deliveries = produce_all(&topics.producer(), &commands).await;
    let refs: Vec<&WorkerProcess> = workers.iter().collect();
    wait_processed(&db, &topics.commands, &ends(&deliveries), WAIT, &refs).await;
    assert_matches_model(&db, &model).await;
    assert_events_published(&db, &topics).await;

    // On the events topic, acc-hot's events carry versions 1, 2, ..., N in topic order.
    let versions: Vec<i64> = support::read_topic(&topics.events)
        .iter()
        .map(|m| m.json().expect("JSON value"))
        .filter(|v| v["subject"] == "acc-hot")
        .map(|v| v["aggregateversion"].as_i64().expect("aggregateversion"))
        .collect();
    let want: Vec<i64> = (1..=hot.version).collect();
    assert_eq!(versions.len(), want.len(), "acc-hot's events on the topic");
    if let Some(i) = versions.iter().zip(&want).position(|(a, b)| a != b) {
        panic!(
            "acc-hot's events are out of order at position {i}: {:?}",
            &versions[i.saturating_sub(3)..(i + 3).min(versions.len())]
        );
    }
    eprintln!(
        "acc-hot: {} events in order, {hot_rejections} rejections",
        versions.len()
    );
    drop(workers);
    db.drop_db().await;
}
