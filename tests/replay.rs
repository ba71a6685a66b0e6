//! `cmdproc replay` and recovery after a database restore: the live workers consume again
//! from the stored positions; applied commands come back as duplicates without effect,
//! lost ones are applied, with the same event ids as the first time.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use sqlx::Row;

use crate::support::workload::{
    assert_events_published, assert_matches_model, generate, serial_model,
};
use crate::support::{
    ends, produce_all, read_topic, wait_processed, TestDb, TestTopics, WorkerProcess,
};

fn replay(db: &TestDb, topics: &TestTopics, args: &[&str]) -> (bool, String) {
    crate::support::cmdproc_on(db, topics, "replay", args)
}

/// Event ids on the topic for one aggregate, in topic order.
fn topic_ids(topics: &TestTopics, subject: &str) -> Vec<String> {
    read_topic(&topics.events)
        .iter()
        .map(|m| m.json().expect("JSON value"))
        .filter(|e| e["subject"] == subject)
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_makes_the_live_workers_consume_again_without_double_effects() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(3).await;
    let worker = WorkerProcess::spawn(&db, &topics, "w1", &[]);
    let commands = generate(21, 3_000, 60, 20, 3);
    let model = serial_model(&commands);
    let d = produce_all(&topics.producer(), &commands).await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&d),
        Duration::from_secs(120),
        &[&worker],
    )
    .await;

    // Lose one account's effects, as a bad manual fix would.
    let lost = "acc-7";
    let lost_messages = commands
        .iter()
        .filter(|c| c.subject.as_str() == lost)
        .count();
    let ids_before = topic_ids(&topics, lost);
    assert!(!ids_before.is_empty());
    for table in ["processed_commands", "events", "aggregates"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE aggregate_id = $1"))
            .bind(lost)
            .execute(&db.pool)
            .await
            .unwrap();
    }

    // The dry run counts and changes nothing.
    let (ok, out) = replay(
        &db,
        &topics,
        &["--partitions", "all", "--from-offset", "0", "--dry-run"],
    );
    assert!(ok, "{out}");
    let want = format!(
        "total: {} already processed (would be duplicates), {} not processed (would be applied), 0 invalid",
        commands.len() - lost_messages,
        lost_messages
    );
    assert!(out.contains(&want), "wanted `{want}` in:\n{out}");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM aggregates WHERE aggregate_id = $1")
        .bind(lost)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0, "a dry run changes nothing");

    // Past the dedupe window it refuses without --force.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (ok, out) = replay(
        &db,
        &topics,
        &[
            "--partitions",
            "all",
            "--from-offset",
            "0",
            "--dedupe-window",
            "1s",
        ],
    );
    assert!(
        !ok && out.contains("refusing to replay past the dedupe window"),
        "{out}"
    );

    // The real replay: everything comes back, only the lost account is applied again.
    let (ok, out) = replay(
        &db,
        &topics,
        &[
            "--partitions",
            "all",
            "--from-offset",
            "0",
            "--timeout",
            "120s",
        ],
    );
    assert!(ok, "{out}");
    let distinct_lost: HashSet<String> = commands
        .iter()
        .filter(|c| c.subject.as_str() == lost)
        .map(|c| c.id.to_string())
        .collect();
    assert!(
        out.contains(&format!("{} command(s) applied", distinct_lost.len())),
        "{out}"
    );
    assert_matches_model(&db, &model).await;
    // Its events were derived again with the same ids, and published again.
    let ids_after = topic_ids(&topics, lost);
    assert_eq!(ids_after.len(), 2 * ids_before.len());
    assert_eq!(
        ids_after[ids_before.len()..],
        ids_before[..],
        "same ids, same order"
    );
    let log = std::fs::read_to_string(&worker.log).unwrap();
    assert!(
        log.contains("partition rewound"),
        "the live worker noticed the rewind"
    );
    drop(worker);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_database_restore_the_workers_reapply_exactly_what_was_lost() {
    let mut db = TestDb::new().await;
    let topics = TestTopics::new(3).await;
    let workers = [
        WorkerProcess::spawn(&db, &topics, "w1", &[]),
        WorkerProcess::spawn(&db, &topics, "w2", &[]),
    ];
    let refs: Vec<&WorkerProcess> = workers.iter().collect();
    let commands = generate(33, 6_000, 150, 50, 3);
    let model = serial_model(&commands);
    let (first, second) = commands.split_at(3_000);
    let producer = topics.producer();
    let d1 = produce_all(&producer, first).await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&d1),
        Duration::from_secs(120),
        &refs,
    )
    .await;

    // Back up mid-run, then let the run go on.
    let dump = crate::support::backup(&db);
    let d2 = produce_all(&producer, second).await;
    let mut all = d1.clone();
    all.extend(d2);
    wait_processed(
        &db,
        &topics.commands,
        &ends(&all),
        Duration::from_secs(120),
        &refs,
    )
    .await;
    let before: BTreeMap<String, i64> = sqlx::query("SELECT event_id::text, version FROM events")
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    // Restore the backup under the running workers: everything after it is lost. One
    // transaction: the workers, retrying meanwhile, see the old tables or none.
    crate::support::restore(&mut db, &dump).await;
    let restored_at = chrono::Utc::now();
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_commands")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        (kept as usize) < model.applied() + model.rejected(),
        "the restore lost the second half"
    );

    // The workers notice, consume again from the restored positions, and re-apply.
    wait_processed(
        &db,
        &topics.commands,
        &ends(&all),
        Duration::from_secs(180),
        &refs,
    )
    .await;
    assert_matches_model(&db, &model).await;
    let reapplied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM processed_commands WHERE processed_at >= $1")
            .bind(restored_at)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        reapplied + kept,
        (model.applied() + model.rejected()) as i64,
        "exactly what was lost, once"
    );
    let after: BTreeMap<String, i64> = sqlx::query("SELECT event_id::text, version FROM events")
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        after, before,
        "the re-derived events carry the same ids and versions"
    );
    // And the topic still holds each of them exactly once.
    assert_events_published(&db, &topics).await;
    drop(workers);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn outcomes_older_than_the_dedupe_window_are_forgotten() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(2).await;
    let worker = WorkerProcess::spawn(
        &db,
        &topics,
        "w1",
        &["--dedupe-window", "2s", "--prune-every", "1s"],
    );
    let commands = generate(44, 500, 20, 10, 5);
    let model = serial_model(&commands);
    let d = produce_all(&topics.producer(), &commands).await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&d),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM processed_commands) + (SELECT count(*) FROM duplicate_deliveries)
                  + (SELECT count(*) FROM outbox)",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{left} rows older than the window remain"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The effects stay; only the memory of outcomes and the published outbox go.
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(events as usize, model.events.len());
    let versions: i64 = sqlx::query_scalar("SELECT sum(version)::bigint FROM aggregates")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(versions as usize, model.events.len());
    let log = std::fs::read_to_string(&worker.log).unwrap();
    assert!(
        log.contains("forgot what is older than the dedupe window"),
        "the worker logs its pruning"
    );

    // Replaying that far back would evaluate rejected commands again (applied ones are still
    // known by their events): refused without --force.
    let (ok, out) = replay(
        &db,
        &topics,
        &[
            "--partitions",
            "all",
            "--from-offset",
            "0",
            "--dedupe-window",
            "2s",
        ],
    );
    assert!(
        !ok && out.contains("refusing to replay past the dedupe window"),
        "{out}"
    );
    drop(worker);
    db.drop_db().await;
}
