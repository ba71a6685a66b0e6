//! What an operator sees: a real `cmdproc run` serves `/metrics`, `/healthz` and `/readyz`,
//! and its counters equal what was produced, parked aggregates and dead-letter kinds
//! included. Needs `deploy/local/up.sh`.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use processor::metrics;
use support::workload::{generate, serial_model};
use support::{ends, produce_all, produce_raw, wait_processed, RawMessage, TestDb, TestTopics};
use support::{free_addr, http_get as get, WorkerProcess};

/// Polls `path` until it answers `status`, panicking with the worker's log after `timeout`.
fn wait_for_status(
    addr: &str,
    path: &str,
    status: u16,
    timeout: Duration,
    worker: &WorkerProcess,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let got = get(addr, path);
        if let Some((s, body)) = &got {
            if *s == status {
                return body.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{path} did not answer {status} within {timeout:?}, last {got:?}\n{}",
            worker.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Samples of the text exposition format: `name{labels}` → value.
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn sample(samples: &HashMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no sample {series} in the scrape"))
}

fn commands(samples: &HashMap<String, f64>, outcome: &str) -> usize {
    sample(
        samples,
        &format!("{}{{outcome=\"{outcome}\"}}", metrics::COMMANDS_TOTAL),
    ) as usize
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_exactly_what_was_produced() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(3).await;
    let addr = free_addr();
    let mut worker = WorkerProcess::spawn(&db, &topics, "w1", &["--metrics-addr", &addr]);

    // Alive at once; ready only once the group gave it partitions.
    wait_for_status(&addr, "/healthz", 200, Duration::from_secs(30), &worker);
    let ready = wait_for_status(&addr, "/readyz", 200, Duration::from_secs(60), &worker);
    assert!(ready.contains("3 partition(s)"), "readyz says {ready}");

    // A mix with duplicates inside the workload and re-sent originals at its end, every
    // command stamped with a CloudEvents `time` so the end-to-end latency sees each one.
    let mut all = generate(7, 1500, 40, 15, 5);
    all.extend(all[..10].to_vec());
    let sent_at = chrono::Utc::now();
    for c in &mut all {
        c.time = Some(sent_at);
    }
    let model = serial_model(&all);
    let deliveries = produce_all(&topics.producer(), &all).await;
    // Two messages that are not CloudEvents at all: dead letters of kind `malformed`.
    let bad: Vec<RawMessage> = (0..2)
        .map(|i| RawMessage {
            partition: i,
            key: Some(b"nobody".to_vec()),
            value: Some(b"this is not json".to_vec()),
            headers: Vec::new(),
        })
        .collect();
    let raw = produce_raw(&topics.commands, &bad).await;
    let mut wanted: BTreeMap<i32, i64> = ends(&deliveries);
    for (p, end) in ends(&raw) {
        let e = wanted.entry(p).or_insert(0);
        *e = (*e).max(end);
    }
    wait_processed(
        &db,
        &topics.commands,
        &wanted,
        Duration::from_secs(120),
        &[&worker],
    )
    .await;

    let (status, text) = get(&addr, "/metrics").expect("scrape /metrics");
    assert_eq!(status, 200);
    let s = parse(&text);
    assert_eq!(commands(&s, "applied"), model.applied(), "applied");
    assert_eq!(commands(&s, "rejected"), model.rejected(), "rejected");
    assert_eq!(commands(&s, "duplicate"), model.duplicates(), "duplicates");
    assert!(model.duplicates() >= 10, "the workload has duplicates");
    assert_eq!(commands(&s, "dead_lettered"), 2, "dead letters");
    assert_eq!(commands(&s, "parked"), 0, "parked");
    assert_eq!(
        sample(
            &s,
            &format!("{}{{kind=\"malformed\"}}", metrics::DEAD_LETTERS_TOTAL)
        ),
        2.0
    );
    assert_eq!(
        sample(&s, metrics::EVENTS_PUBLISHED_TOTAL) as usize,
        model.events.len(),
        "events published"
    );
    assert_eq!(sample(&s, metrics::DEAD_LETTERS_PUBLISHED_TOTAL), 2.0);
    let batches = sample(&s, metrics::BATCHES_TOTAL);
    assert!(batches >= 1.0);
    assert_eq!(
        sample(&s, &format!("{}_count", metrics::BATCH_APPLY_SECONDS)),
        batches,
        "one apply latency per committed batch"
    );
    assert_eq!(
        sample(&s, &format!("{}_sum", metrics::BATCH_SIZE)) as usize,
        all.len() + bad.len(),
        "every message in exactly one committed batch"
    );
    assert_eq!(
        sample(&s, &format!("{}_count", metrics::END_TO_END_SECONDS)) as usize,
        all.len(),
        "one end-to-end latency per committed command"
    );
    assert!(sample(&s, &format!("{}_count", metrics::PUBLISH_SECONDS)) >= 1.0);
    assert_eq!(sample(&s, metrics::FENCED_BATCHES_TOTAL), 0.0);
    assert!(sample(&s, metrics::REBALANCES_TOTAL) >= 1.0);

    // Everything is consumed and published, so the gauges settle at 0 for every partition
    // (the lag refreshes every few seconds, the backlog on the relay's next look).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = parse(&get(&addr, "/metrics").expect("scrape /metrics").1);
        let settled = (0..topics.partitions).all(|p| {
            let lag = s.get(&format!("{}{{partition=\"{p}\"}}", metrics::PARTITION_LAG));
            let backlog = s.get(&format!("{}{{partition=\"{p}\"}}", metrics::OUTBOX_BACKLOG));
            lag == Some(&0.0) && backlog.is_none_or(|b| *b == 0.0)
        });
        if settled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lag and backlog did not settle at 0:\n{}",
            text.lines()
                .filter(|l| l.contains("lag") || l.contains("backlog"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    assert_eq!(
        worker
            .terminate(Duration::from_secs(20))
            .map(|s| s.success()),
        Some(true),
        "SIGTERM exits 0"
    );
    assert!(
        get(&addr, "/healthz").is_none(),
        "the endpoint stops with the process"
    );
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parked_aggregate_shows_as_parked_and_by_dead_letter_kind() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(2).await;
    let addr = free_addr();
    let worker = WorkerProcess::spawn_with_env(
        &db,
        &topics,
        "w1",
        &["--metrics-addr", &addr],
        &[("CMDPROC_FAILPOINT", "handler-panic:acc-poison")],
    );
    wait_for_status(&addr, "/readyz", 200, Duration::from_secs(60), &worker);

    let cmd = |id: &str, ty: &str, subject: &str, data: serde_json::Value| {
        commands::Command::new(
            commands::Source::parse("/test").unwrap(),
            commands::CommandId::parse(id).unwrap(),
            commands::CommandType::parse(ty).unwrap(),
            commands::AggregateId::parse(subject).unwrap(),
            data,
        )
    };
    let all = vec![
        cmd(
            "p1",
            "account.Open",
            "acc-poison",
            serde_json::json!({"owner": "x"}),
        ),
        cmd(
            "p2",
            "account.Deposit",
            "acc-poison",
            serde_json::json!({"amount": 5}),
        ),
        cmd(
            "p3",
            "account.Deposit",
            "acc-poison",
            serde_json::json!({"amount": 6}),
        ),
        cmd(
            "h1",
            "account.Open",
            "acc-healthy",
            serde_json::json!({"owner": "y"}),
        ),
        cmd(
            "h2",
            "account.Deposit",
            "acc-healthy",
            serde_json::json!({"amount": 7}),
        ),
    ];
    let deliveries = produce_all(&topics.producer(), &all).await;
    wait_processed(
        &db,
        &topics.commands,
        &ends(&deliveries),
        Duration::from_secs(60),
        &[&worker],
    )
    .await;

    let s = parse(&get(&addr, "/metrics").expect("scrape /metrics").1);
    assert_eq!(commands(&s, "applied"), 2, "the healthy aggregate goes on");
    assert_eq!(
        commands(&s, "parked"),
        3,
        "the poison command and the two after it"
    );
    assert_eq!(
        commands(&s, "dead_lettered"),
        0,
        "parked is not counted twice"
    );
    let kind = |k: &str| {
        sample(
            &s,
            &format!("{}{{kind=\"{k}\"}}", metrics::DEAD_LETTERS_TOTAL),
        )
    };
    assert_eq!(kind("handler_panic"), 1.0);
    assert_eq!(kind("parked"), 2.0);
    assert_eq!(sample(&s, metrics::DEAD_LETTERS_PUBLISHED_TOTAL), 3.0);
    assert_eq!(sample(&s, metrics::EVENTS_PUBLISHED_TOTAL), 2.0);
    drop(worker);
    db.drop_db().await;
}
