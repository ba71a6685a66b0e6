//! Workers joining and leaving the group under load, and a graceful SIGTERM: drain, leave,
//! exit 0, another worker finishes the rest.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{wait_until, WAIT};
use crate::support::workload::{
    assert_events_published, assert_matches_model, generate, serial_model,
};
use crate::support::{
    ends, outbox_backlog, produce_in_slices, wait_processed, TestDb, TestTopics, WorkerProcess,
};

// ---------------------------------------------------------------------------------------
// 3. Workers joining and leaving (SIGTERM) while load keeps arriving.

#[tokio::test(flavor = "multi_thread")]
async fn workers_joining_and_leaving_under_load_lose_and_double_nothing() {
    let _serial = crate::serial().await;
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
    let _serial = crate::serial().await;
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
