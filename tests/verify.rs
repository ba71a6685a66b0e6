//! `cmdproc verify` finds every difference between the stored aggregates and a re-execution.

use std::time::Duration;

use commands::partitioner::partition_for_key;

use crate::support::workload::generate;
use crate::support::{
    cmdproc, ends, produce_all, wait_processed, TestDb, TestTopics, WorkerProcess, BROKERS,
};

const PARTITIONS: i32 = 4;
const ACCOUNTS: usize = 40;

/// A database and topics after a real worker applied a mixed workload (with duplicates)
/// and stopped.
async fn processed_run(seed: u64) -> (TestDb, TestTopics) {
    let db = TestDb::new().await;
    let topics = TestTopics::new(PARTITIONS).await;
    let commands = generate(seed, 3_000, ACCOUNTS, 20, 5);
    let mut worker = WorkerProcess::spawn(&db, &topics, "w1", &[]);
    let deliveries = produce_all(&topics.producer(), &commands).await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&deliveries),
        Duration::from_secs(120),
        &[&worker],
    )
    .await;
    worker.terminate(Duration::from_secs(20));
    (db, topics)
}

/// Runs `cmdproc verify` with `extra` arguments: exit success, stdout.
fn verify(db: &TestDb, topics: &TestTopics, extra: &[&str]) -> (bool, String) {
    let out = cmdproc()
        .args(["verify", "--brokers", BROKERS, "--database-url", &db.url])
        .args(["--commands-topic", topics.commands.as_str()])
        .args(extra)
        .env("CMDPROC_LOG", "warn")
        .output()
        .expect("run cmdproc verify");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (
        out.status.success(),
        format!("{stdout}\n--- stderr\n{stderr}"),
    )
}

/// Accounts `acc-0..` (all opened by the workload except every 50th) with their partition.
fn accounts() -> Vec<(String, i32)> {
    (0..ACCOUNTS)
        .filter(|a| a % 50 != 49)
        .map(|a| {
            let id = format!("acc-{a}");
            let p = partition_for_key(id.as_bytes(), PARTITIONS).expect("partitions > 0");
            (id, p)
        })
        .collect()
}

async fn corrupt_balance(db: &TestDb, id: &str) {
    let n = sqlx::query(
        "UPDATE aggregates SET state = jsonb_set(state, '{balance}', '999999')
         WHERE aggregate_type = 'account' AND aggregate_id = $1",
    )
    .bind(id)
    .execute(&db.pool)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(n, 1, "account {id} exists");
}

async fn bump_version(db: &TestDb, id: &str) {
    let n = sqlx::query(
        "UPDATE aggregates SET version = version + 1
         WHERE aggregate_type = 'account' AND aggregate_id = $1",
    )
    .bind(id)
    .execute(&db.pool)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(n, 1, "account {id} exists");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_faithful_run_verifies_without_differences() {
    let (db, topics) = processed_run(11).await;
    let (ok, out) = verify(&db, &topics, &[]);
    assert!(ok, "verify exits 0:\n{out}");
    assert!(
        out.contains(&format!(
            "verify: {PARTITIONS} partitions checked, 0 skipped"
        )),
        "{out}"
    );
    assert!(out.contains(", 0 differences"), "{out}");
    assert!(!out.contains("difference:"), "{out}");
    assert!(
        !out.contains(" 0 commands re-executed"),
        "the commands were re-executed:\n{out}"
    );
    for p in 0..PARTITIONS {
        assert!(out.contains(&format!("partition {p}: ")), "{out}");
    }
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupted_aggregates_are_named_with_what_differs() {
    let (db, topics) = processed_run(12).await;
    let accounts = accounts();
    let (rich, _) = &accounts[0];
    let (ahead, _) = &accounts[1];
    corrupt_balance(&db, rich).await;
    bump_version(&db, ahead).await;

    let (ok, out) = verify(&db, &topics, &[]);
    assert!(!ok, "verify exits non-zero:\n{out}");
    let line = |id: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("difference: account/{id}: ")))
            .unwrap_or_else(|| panic!("no difference line for {id}:\n{out}"))
            .to_owned()
    };
    let state = line(rich);
    assert!(state.contains("state differs"), "{state}");
    assert!(state.contains(r#""balance":999999"#), "{state}");
    assert!(!state.contains("version differs"), "{state}");
    let version = line(ahead);
    assert!(version.contains("version differs"), "{version}");
    assert!(!version.contains("state differs"), "{version}");
    assert!(out.contains(", 2 differences"), "{out}");
    assert_eq!(out.matches("difference: ").count(), 2, "{out}");
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_chosen_partitions_are_checked() {
    let (db, topics) = processed_run(13).await;
    let accounts = accounts();
    let (on_zero, _) = accounts
        .iter()
        .find(|(_, p)| *p == 0)
        .expect("an account on 0");
    let (elsewhere, other) = accounts
        .iter()
        .find(|(_, p)| *p != 0)
        .expect("an account elsewhere");
    corrupt_balance(&db, on_zero).await;
    corrupt_balance(&db, elsewhere).await;

    let (ok, out) = verify(&db, &topics, &["--partitions", "0"]);
    assert!(!ok, "partition 0 has a difference:\n{out}");
    assert!(
        out.contains("verify: 1 partitions checked, 0 skipped"),
        "{out}"
    );
    assert!(out.contains("partition 0: "), "{out}");
    for p in 1..PARTITIONS {
        assert!(!out.contains(&format!("partition {p}: ")), "{out}");
    }
    assert!(
        out.contains(&format!("difference: account/{on_zero}: ")),
        "{out}"
    );
    assert!(
        !out.contains(&format!("account/{elsewhere}:")),
        "{elsewhere} lives on partition {other}, which was not checked:\n{out}"
    );
    assert!(out.contains(", 1 differences"), "{out}");

    let other = other.to_string();
    let (ok, out) = verify(&db, &topics, &["--partitions", &other]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("difference: account/{elsewhere}: ")),
        "{out}"
    );
    assert!(!out.contains(&format!("account/{on_zero}:")), "{out}");

    let (ok, out) = verify(&db, &topics, &["--partitions", "9"]);
    assert!(!ok && out.contains("there is no partition 9"), "{out}");
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn parked_aggregates_are_set_aside_as_the_workers_did() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(PARTITIONS).await;
    let commands = generate(14, 2_000, ACCOUNTS, 20, 5);
    // Every command for acc-3 panics in the workers' handler, so they park it; verify's own
    // handlers do not panic, and only the parking taken from Postgres keeps it in step.
    let mut worker = WorkerProcess::spawn_with_env(
        &db,
        &topics,
        "w1",
        &[],
        &[("CMDPROC_FAILPOINT", "handler-panic:acc-3")],
    );
    let deliveries = produce_all(&topics.producer(), &commands).await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&deliveries),
        Duration::from_secs(120),
        &[&worker],
    )
    .await;
    worker.terminate(Duration::from_secs(20));
    let parked: i64 =
        sqlx::query_scalar("SELECT count(*) FROM parked_aggregates WHERE aggregate_id = 'acc-3'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(parked, 1, "the workers parked acc-3");

    let (ok, out) = verify(&db, &topics, &[]);
    assert!(ok, "verify exits 0:\n{out}");
    assert!(out.contains(", 0 differences"), "{out}");
    let home = partition_for_key(b"acc-3", PARTITIONS).expect("partitions > 0");
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("partition {home}: ")))
        .unwrap_or_else(|| panic!("no line for partition {home}:\n{out}"));
    assert!(
        !line.contains(" 0 set aside"),
        "acc-3's commands were set aside: {line}"
    );
    db.drop_db().await;
}
