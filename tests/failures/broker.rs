//! Kafka down with a relay backlog waiting: survived, and the backlog drains.

use std::time::{Duration, Instant};

use super::{wait_all_own, wait_until, Outage, WAIT};
use crate::support::workload::{
    assert_events_published, assert_matches_model, generate, serial_model,
};
use crate::support::{
    self, ends, outbox_backlog, produce_all, wait_processed, TestDb, TestTopics, WorkerProcess,
};

// ---------------------------------------------------------------------------------------
// 6. Kafka down for 10 s with a relay backlog waiting.

#[tokio::test(flavor = "multi_thread")]
async fn a_kafka_outage_is_survived_and_the_relay_backlog_drains() {
    let _serial = crate::serial().await;
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
