//! What a caller learns about a command it sent: an idempotency key `(source, id)` reused
//! with another payload is refused (`key_reused`) without effect, recorded, shown by
//! `cmdproc inspect` and counted in the metrics, while outcomes recorded before payload
//! digests existed keep deduplicating as before. Needs `deploy/local/up.sh`.

mod support;

use std::time::{Duration, Instant};

use commands::envelope::payload_digest;
use commands::{AggregateId, Command, CommandId, CommandType, Reply, ReplyOutcome, Source};
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

/// The replies on `topic`, read until there are at least `at_least`, by command id, each
/// with its stable message id.
fn replies_on(topic: &commands::Topic, at_least: usize) -> Vec<(String, Reply, String)> {
    support::read_topic_at_least(topic, at_least, Duration::from_secs(30))
        .into_iter()
        .map(|r| {
            let key = String::from_utf8(r.key.clone().expect("a reply has a key")).unwrap();
            let reply = Reply::from_cloudevent(r.value.as_deref().unwrap()).expect("a reply");
            assert_eq!(
                reply.command.id, key,
                "a reply is keyed by its command's id"
            );
            assert_eq!(
                r.partition,
                commands::partitioner::partition_for_key(key.as_bytes(), 2).unwrap(),
                "a reply lands where murmur2 puts its command's id"
            );
            let message_id = r.header("cmdproc-message-id").expect("message id");
            (key, reply, message_id)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_delivery_with_replyto_gets_one_reply_and_a_duplicate_the_recorded_outcome() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(2).await;
    let addr = free_addr();
    let worker = WorkerProcess::spawn(&db, &topics, "w1", &["--metrics-addr", &addr]);
    let timeout = Duration::from_secs(90);
    let to = topics.replies.clone();
    let asks = |c: Command| c.with_reply_to(to.clone());

    let open = asks(cmd(
        "open",
        "account.Open",
        "acc-1",
        json!({"owner": "ada"}),
    ));
    let deposit = asks(cmd(
        "dep-1",
        "account.Deposit",
        "acc-1",
        json!({"amount": 500}),
    ));
    let too_much = asks(cmd(
        "wd-1",
        "account.Withdraw",
        "acc-1",
        json!({"amount": 9000}),
    ));
    let bad_data = asks(cmd(
        "bad-1",
        "account.Deposit",
        "acc-1",
        json!({"amount": "x"}),
    ));
    let reused = asks(cmd(
        "dep-1",
        "account.Deposit",
        "acc-1",
        json!({"amount": 700}),
    ));
    let silent = cmd("dep-2", "account.Deposit", "acc-1", json!({"amount": 1}));
    let nowhere = cmd("dep-3", "account.Deposit", "acc-1", json!({"amount": 2}))
        .with_reply_to(commands::Topic::parse(format!("{}-missing", topics.replies)).unwrap());
    let first = vec![
        open.clone(),
        deposit.clone(),
        too_much,
        bad_data,
        silent,
        nowhere,
    ];
    produce_and_wait(&db, &topics, &first, timeout, &[&worker]).await;
    // In a later batch: the duplicate and the reuse are answered from the recorded outcome.
    produce_and_wait(
        &db,
        &topics,
        &[deposit.clone(), reused],
        timeout,
        &[&worker],
    )
    .await;

    let replies = replies_on(&topics.replies, 6);
    let by_id = |id: &str| -> Vec<&Reply> {
        replies
            .iter()
            .filter(|(k, _, _)| k == id)
            .map(|(_, r, _)| r)
            .collect()
    };
    assert_eq!(
        replies.len(),
        6,
        "one reply per delivery that asked: {replies:#?}"
    );
    let ids: std::collections::HashSet<&str> = replies.iter().map(|(_, _, m)| m.as_str()).collect();
    assert_eq!(ids.len(), 6, "every reply has its own message id");

    assert!(matches!(
        by_id("open")[..],
        [Reply {
            outcome: ReplyOutcome::Applied { version: 1, .. },
            duplicate: false,
            ..
        }]
    ));
    let deposits = by_id("dep-1");
    assert_eq!(deposits.len(), 3, "{deposits:#?}");
    let ReplyOutcome::Applied { version, events } = &deposits[0].outcome else {
        panic!("{deposits:#?}")
    };
    assert_eq!(
        (*version, events.len(), deposits[0].duplicate),
        (2, 1, false)
    );
    assert_eq!(
        (&deposits[1].outcome, deposits[1].duplicate),
        (&deposits[0].outcome, true),
        "a duplicate gets the recorded outcome again"
    );
    assert!(
        matches!(deposits[2].outcome, ReplyOutcome::KeyReused { .. }) && !deposits[2].duplicate,
        "{:?}",
        deposits[2]
    );
    assert!(matches!(
        &by_id("wd-1")[..],
        [Reply { outcome: ReplyOutcome::Rejected { code: Some(code), .. }, duplicate: false, .. }]
            if code == "insufficient_funds"
    ));
    assert!(matches!(
        &by_id("bad-1")[..],
        [Reply { outcome: ReplyOutcome::DeadLettered { kind, .. }, .. }] if kind == "schema"
    ));
    assert!(by_id("dep-2").is_empty(), "no replyto, no reply");
    assert_eq!(
        balance(&db).await,
        503,
        "the command whose reply topic is missing applied"
    );
    let dropped = metrics::REPLIES_UNDELIVERABLE_TOTAL;
    let deadline = Instant::now() + Duration::from_secs(30);
    while scrape(&addr, dropped) != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "{dropped}: {:?}",
            scrape(&addr, dropped)
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A replay re-reads every message: none is a new delivery, so no reply is added.
    let (ok, out) = cmdproc_on(
        &db,
        &topics,
        "replay",
        &["--partitions", "all", "--from-offset", "0"],
    );
    assert!(ok, "{out}");
    // A late duplicate after the replay is a new delivery: answered, once.
    produce_and_wait(
        &db,
        &topics,
        std::slice::from_ref(&open),
        timeout,
        &[&worker],
    )
    .await;
    let after = replies_on(&topics.replies, 7);
    assert_eq!(after.len(), 7, "{:#?}", &after[6..]);
    let (id, late, _) = &after[6];
    assert_eq!(id, "open");
    assert!(late.duplicate);
    assert_eq!(late.outcome, by_id("open")[0].outcome);
    // Nothing more arrives.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(replies_on(&topics.replies, 7).len(), 7);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_answer_every_delivery_once_through_a_kill_and_late_duplicates() {
    use rand::{Rng, SeedableRng};
    let db = TestDb::new().await;
    let topics = TestTopics::new(4).await;
    let mut workers: Vec<WorkerProcess> = (0..2)
        .map(|i| WorkerProcess::spawn(&db, &topics, &format!("w{i}"), &["--batch-size", "200"]))
        .collect();
    let to = topics.replies.clone();
    let commands: Vec<Command> = support::workload::generate(21, 3_000, 200, 50, 0)
        .into_iter()
        .map(|c| c.with_reply_to(to.clone()))
        .collect();
    let model = serial_model(&commands);
    // Schema-invalid deposits that still name a reply topic: dead-lettered, and answered.
    let invalid: Vec<Command> = (0..20)
        .map(|i| {
            cmd(
                &format!("bad-{i}"),
                "account.Deposit",
                &format!("acc-{i}"),
                json!({"amount": "lots"}),
            )
            .with_reply_to(to.clone())
        })
        .collect();
    let producer = topics.producer();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut deliveries = Vec::new();
    let (first, second) = commands.split_at(commands.len() / 2);
    deliveries.extend(support::produce_all(&producer, first).await);
    deliveries.extend(support::produce_all(&producer, &invalid).await);
    tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1500))).await;
    workers[0].kill9();
    workers[0] = WorkerProcess::spawn(&db, &topics, "w2", &["--batch-size", "200"]);
    deliveries.extend(support::produce_all(&producer, second).await);
    let refs: Vec<&WorkerProcess> = workers.iter().collect();
    let timeout = Duration::from_secs(240);
    support::wait_processed(
        &db,
        &topics.commands,
        &support::ends(&deliveries),
        timeout,
        &refs,
    )
    .await;
    // Late duplicates, long after their originals were applied.
    let resent: Vec<Command> = (0..300)
        .map(|_| commands[rng.gen_range(0..commands.len())].clone())
        .collect();
    let late = support::produce_all(&producer, &resent).await;
    support::wait_processed(&db, &topics.commands, &support::ends(&late), timeout, &refs).await;
    assert_matches_model(&db, &model).await;

    let want = commands.len() + invalid.len() + resent.len();
    let replies = support::read_topic_at_least(&topics.replies, want, Duration::from_secs(60));
    assert_eq!(replies.len(), want, "one reply per delivery, none twice");
    let message_ids: std::collections::HashSet<String> = replies
        .iter()
        .map(|r| r.header("cmdproc-message-id").expect("message id"))
        .collect();
    assert_eq!(message_ids.len(), want, "no reply published twice");
    let mut firsts: std::collections::HashMap<String, Reply> = Default::default();
    let mut duplicates: std::collections::HashMap<String, Vec<Reply>> = Default::default();
    for r in &replies {
        let reply = Reply::from_cloudevent(r.value.as_deref().unwrap()).unwrap();
        if reply.duplicate {
            duplicates
                .entry(reply.command.id.clone())
                .or_default()
                .push(reply);
        } else {
            let id = reply.command.id.clone();
            assert!(
                firsts.insert(id.clone(), reply).is_none(),
                "{id} answered twice"
            );
        }
    }
    for (i, c) in commands.iter().enumerate() {
        let reply = firsts
            .get(c.id.as_str())
            .unwrap_or_else(|| panic!("no reply to {}", c.id));
        let expected = match model.outcomes[i] {
            processor::harness::model::Outcome::Applied => "applied",
            processor::harness::model::Outcome::Rejected => "rejected",
            processor::harness::model::Outcome::Duplicate => unreachable!("no duplicates sent"),
        };
        assert_eq!(reply.outcome.name(), expected, "{}: {reply:?}", c.id);
        if let ReplyOutcome::Rejected { code, .. } = &reply.outcome {
            assert!(code.is_some(), "{reply:?}");
        }
    }
    for b in &invalid {
        let reply = &firsts[b.id.as_str()];
        assert!(
            matches!(&reply.outcome, ReplyOutcome::DeadLettered { kind, .. } if kind == "schema"),
            "{reply:?}"
        );
    }
    let mut resent_count: std::collections::HashMap<&str, usize> = Default::default();
    for c in &resent {
        *resent_count.entry(c.id.as_str()).or_default() += 1;
    }
    assert_eq!(duplicates.len(), resent_count.len());
    for (id, got) in &duplicates {
        assert_eq!(got.len(), resent_count[id.as_str()], "{id}");
        for d in got {
            assert_eq!(
                d.outcome, firsts[id].outcome,
                "a duplicate gets the recorded outcome"
            );
        }
    }
    drop(workers);
    db.drop_db().await;
}
