//! Postgres down, then every worker connection killed: retried, nothing skipped.

use std::time::{Duration, Instant};

use super::{lines_with, wait_all_own, wait_until, Outage, WAIT};
use crate::support::workload::{
    assert_events_published, assert_matches_model, generate, serial_model,
};
use crate::support::{ends, produce_in_slices, wait_processed, TestDb, TestTopics, WorkerProcess};

// ---------------------------------------------------------------------------------------
// 5. Postgres down for 10 s, then every worker connection killed.

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_outage_is_retried_and_nothing_is_skipped() {
    let _serial = crate::serial().await;
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
