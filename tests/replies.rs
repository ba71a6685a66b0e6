//! What a caller learns about a command it sent: an idempotency key `(source, id)` reused
//! with another payload is refused (`key_reused`) without effect, recorded, shown by
//! `cmdproc inspect` and counted in the metrics, while outcomes recorded before payload
//! digests existed keep deduplicating as before. Needs `deploy/local/up.sh`.

mod support;

use std::time::{Duration, Instant};

use commands::envelope::payload_digest;
use commands::{AggregateId, Command, CommandId, CommandType, Source};
use processor::metrics;
use serde_json::{json, Value};
use sqlx::Row;
use support::workload::{assert_events_published, assert_matches_model, serial_model};
use support::{cmdproc_on, free_addr, produce_and_wait, scrape, TestDb, TestTopics, WorkerProcess};
use uuid::Uuid;

fn cmd(id: &str, ty: &str, subject: &str, data: Value) -> Command {
    Command::new(
        Source::parse("/test").unwrap(),
        CommandId::parse(id).unwrap(),
        CommandType::parse(ty).unwrap(),
        AggregateId::parse(subject).unwrap(),
        data,
    )
}

/// What the deliveries recorded for `dep-1` after its first name: nothing for a plain
/// duplicate, the digest, aggregate and type for a refused reuse of the key.
type Named = Option<(Uuid, String, String, String)>;

/// The deliveries recorded for `dep-1` after its first, in offset order: whether each was
/// refused as `key_reused`, and what it named.
async fn deliveries_of_dep_1(db: &TestDb) -> Vec<(bool, Named)> {
    sqlx::query(
        "SELECT key_reused, digest, aggregate_type, aggregate_id, command_type
         FROM duplicate_deliveries WHERE source = '/test' AND command_id = 'dep-1'
         ORDER BY partition, \"offset\"",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| {
        let named = r
            .get::<Option<Uuid>, _>(1)
            .map(|digest| (digest, r.get(2), r.get(3), r.get(4)));
        (r.get(0), named)
    })
    .collect()
}

async fn balance(db: &TestDb) -> i64 {
    let state: Value =
        sqlx::query_scalar("SELECT state FROM aggregates WHERE aggregate_id = 'acc-1'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    state["balance"].as_i64().unwrap()
}

/// Polls the worker's `/metrics` until `cmdproc_commands_total{outcome=...}` reaches
/// `want` (the counter moves right after the commit the test waited for).
fn wait_for_count(addr: &str, outcome: &str, want: f64, worker: &WorkerProcess) {
    let series = format!("{}{{outcome=\"{outcome}\"}}", metrics::COMMANDS_TOTAL);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = scrape(addr, &series);
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {got:?}, not {want}\n{}",
            worker.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_reused_with_another_payload_is_refused_without_effect() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(2).await;
    let addr = free_addr();
    let worker = WorkerProcess::spawn(&db, &topics, "w1", &["--metrics-addr", &addr]);
    let timeout = Duration::from_secs(90);

    let open = cmd("open", "account.Open", "acc-1", json!({"owner": "ada"}));
    let deposit = cmd("dep-1", "account.Deposit", "acc-1", json!({"amount": 500}));
    let reused = cmd("dep-1", "account.Deposit", "acc-1", json!({"amount": 700}));
    let mut all = vec![open, deposit.clone(), deposit.clone()];
    produce_and_wait(&db, &topics, &all, timeout, &[&worker]).await;
    // The reuse comes in a later batch: the recorded outcome is known from the database.
    all.push(reused.clone());
    produce_and_wait(&db, &topics, &all[3..], timeout, &[&worker]).await;

    assert_eq!(balance(&db).await, 500, "only the first deposit counted");
    let recorded = sqlx::query(
        "SELECT outcome, version, digest FROM processed_commands
         WHERE source = '/test' AND command_id = 'dep-1'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(recorded.get::<String, _>(0), "applied");
    assert_eq!(recorded.get::<i64, _>(1), 2);
    assert_eq!(
        recorded.get::<Option<Uuid>, _>(2),
        Some(payload_digest(&deposit)),
        "the outcome is recorded with its payload's digest, and not replaced"
    );
    let account = (
        "account".to_owned(),
        "acc-1".to_owned(),
        "account.Deposit".to_owned(),
    );
    assert_eq!(
        deliveries_of_dep_1(&db).await,
        vec![
            (false, None),
            (
                true,
                Some((
                    payload_digest(&reused),
                    account.0.clone(),
                    account.1.clone(),
                    account.2.clone()
                ))
            ),
        ],
        "a duplicate, then the refused reuse"
    );

    wait_for_count(&addr, metrics::outcome::KEY_REUSED, 1.0, &worker);
    wait_for_count(&addr, metrics::outcome::DUPLICATE, 1.0, &worker);
    wait_for_count(&addr, metrics::outcome::APPLIED, 2.0, &worker);

    let (ok, out) = cmdproc_on(&db, &topics, "inspect", &["account", "acc-1"]);
    assert!(ok, "{out}");
    let shown: Value = serde_json::from_str(&out).expect("inspect prints JSON");
    assert_eq!(shown["version"], 2);
    assert_eq!(shown["state"]["balance"], 500);
    let outcomes: Vec<&str> = shown["recent_commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["applied", "applied"],
        "no outcome added or replaced"
    );
    let refused = shown["refused_commands"]
        .as_array()
        .expect("refused_commands");
    assert_eq!(refused.len(), 1, "{shown:#}");
    assert_eq!(refused[0]["id"], "dep-1");
    assert_eq!(refused[0]["source"], "/test");
    assert_eq!(refused[0]["type"], "account.Deposit");
    assert_eq!(refused[0]["outcome"], "key_reused");
    assert_eq!(refused[0]["original"]["type"], "account.Deposit");
    assert_eq!(refused[0]["original"]["aggregate_id"], "acc-1");
    assert_eq!(refused[0]["original"]["outcome"], "applied");

    // The log names the refused command by its key, never by its data.
    let log = worker.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("key_reused"))
        .unwrap_or_else(|| panic!("no key_reused line in the log:\n{}", worker.log_tail(30)));
    assert!(
        line.contains("INFO") && line.contains("dep-1") && line.contains("/test"),
        "{line}"
    );
    assert!(!line.contains("amount"), "{line}");

    // Re-executing the log refuses the reuse again and finds the same aggregates.
    let (ok, out) = cmdproc_on(&db, &topics, "verify", &[]);
    assert!(ok, "{out}");
    assert!(out.contains("1 refused (key reused)"), "{out}");
    assert!(out.contains(" 0 differences"), "{out}");

    // Outcomes recorded before digests existed have none: then another payload under the
    // key is a plain duplicate, as it was before, and still has no effect.
    sqlx::query("UPDATE processed_commands SET digest = NULL")
        .execute(&db.pool)
        .await
        .unwrap();
    let before_digests = cmd("dep-1", "account.Deposit", "acc-1", json!({"amount": 900}));
    all.push(before_digests.clone());
    produce_and_wait(&db, &topics, &all[4..], timeout, &[&worker]).await;
    assert_eq!(balance(&db).await, 500);
    let deliveries = deliveries_of_dep_1(&db).await;
    assert_eq!(deliveries.len(), 3);
    assert_eq!(deliveries[2], (false, None), "a plain duplicate");
    wait_for_count(&addr, metrics::outcome::DUPLICATE, 2.0, &worker);
    assert_eq!(
        scrape(
            &addr,
            &format!("{}{{outcome=\"key_reused\"}}", metrics::COMMANDS_TOTAL)
        ),
        Some(1.0)
    );

    // The serial model skips every repeated key: the stored aggregates and events agree.
    assert_matches_model(&db, &serial_model(&all)).await;
    assert_eq!(assert_events_published(&db, &topics).await, 2);
    drop(worker);
    db.drop_db().await;
}
