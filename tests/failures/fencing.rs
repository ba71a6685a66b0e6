//! A worker that loses its partitions without knowing it cannot commit: one frozen past its
//! session and resumed (a zombie), a lease that expires while its batch is stuck on a slow
//! write, and a worker frozen for good inside its batch transaction.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use commands::partitioner::partition_for_key;
use commands::Command;
use serde_json::{json, Value};
use sqlx::Row;

use super::{
    command, epochs_moved_past, in_topic_order, lines_with, lock_waiters, owned_by, wait_all_own,
    wait_until, BATCH_FENCED, SESSION, WAIT,
};
use crate::support::workload::{
    assert_events_published, assert_matches_model, generate, serial_model,
};
use crate::support::{
    ends, partition_owners, produce_all, produce_in_slices, send_signal, wait_processed, TestDb,
    TestTopics, WorkerProcess,
};

// ---------------------------------------------------------------------------------------
// 1. A zombie: a worker frozen past its session, then resumed.

#[tokio::test(flavor = "multi_thread")]
async fn a_zombie_worker_resumed_after_sigstop_commits_nothing() {
    let _serial = crate::serial().await;
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
    let _serial = crate::serial().await;
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
    let _serial = crate::serial().await;
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
