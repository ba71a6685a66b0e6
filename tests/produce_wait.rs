//! `cmdproc produce --wait`: the command asks for its outcome, the reply is printed and the
//! exit code says what happened (0 applied, 3 rejected or key reused, 5 no reply in time, 1
//! no reply topic), against a real worker, Kafka and Postgres. Needs `deploy/local/up.sh`.

mod support;

use std::time::Duration;

use commands::reply::{Reply, ReplyOutcome};
use commands::Topic;
use serde_json::Value;
use support::{cmdproc, cmdproc_on, on_test_services, read_topic, TestDb, TestTopics, BROKERS};
use support::{KillOnDrop, WorkerProcess};

/// What one `cmdproc produce` run said and how it ended.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `cmdproc produce <args>` against the test's services.
fn produce(db: &TestDb, topics: &TestTopics, args: &[&str]) -> Run {
    let mut command = cmdproc();
    command.arg("produce").args(args);
    let out = on_test_services(command, &db.url, topics)
        .output()
        .expect("run cmdproc produce");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `produce --wait` for one command given by flags, with a deadline long enough for a
/// worker that is still joining its group.
fn produce_wait(db: &TestDb, topics: &TestTopics, id: &str, ty: &str, data: &str) -> Run {
    produce(
        db,
        topics,
        &[
            "--wait",
            "--timeout",
            "90s",
            "--source",
            "/test",
            "--id",
            id,
            "--type",
            ty,
            "--subject",
            "acc-1",
            "--data",
            data,
        ],
    )
}

fn balance_of_acc_1(db: &TestDb, topics: &TestTopics) -> Value {
    let (ok, out) = cmdproc_on(db, topics, "inspect", &["account", "acc-1"]);
    assert!(ok, "{out}");
    let shown: Value = serde_json::from_str(&out).expect("inspect prints JSON");
    shown["state"]["balance"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_outcome_is_printed_with_its_exit_code() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(3).await;
    let worker = WorkerProcess::spawn(&db, &topics, "w1", &[]);

    let open = produce_wait(&db, &topics, "open", "account.Open", r#"{"owner": "ada"}"#);
    assert_eq!(open.code, Some(0), "{open:?}\n{}", worker.log_tail(30));
    assert!(
        open.stdout.starts_with("open applied: version 1, events ["),
        "{open:?}"
    );
    assert!(
        open.stderr.contains("open account.Open acc-1 -> partition"),
        "where it landed goes to stderr: {open:?}"
    );

    let deposit = produce_wait(
        &db,
        &topics,
        "dep-1",
        "account.Deposit",
        r#"{"amount": 500}"#,
    );
    assert_eq!(deposit.code, Some(0), "{deposit:?}");
    assert!(
        deposit
            .stdout
            .starts_with("dep-1 applied: version 2, events ["),
        "{deposit:?}"
    );
    assert!(!deposit.stdout.contains("duplicate"), "{deposit:?}");

    let too_much = produce_wait(
        &db,
        &topics,
        "wd-1",
        "account.Withdraw",
        r#"{"amount": 900}"#,
    );
    assert_eq!(too_much.code, Some(3), "rejected: {too_much:?}");
    assert_eq!(
        too_much.stdout.trim(),
        "wd-1 rejected: insufficient_funds: insufficient funds: balance 500, withdrawal 900",
        "{too_much:?}"
    );

    // The same command again: the recorded outcome, marked as a duplicate, without effect.
    let again = produce_wait(
        &db,
        &topics,
        "dep-1",
        "account.Deposit",
        r#"{"amount": 500}"#,
    );
    assert_eq!(again.code, Some(0), "{again:?}");
    assert_eq!(
        again.stdout.lines().next(),
        deposit
            .stdout
            .lines()
            .next()
            .map(|l| format!("{l} (duplicate)"))
            .as_deref(),
        "{again:?}"
    );

    // The same key with another payload: refused, with the rejection's code.
    let reused = produce_wait(
        &db,
        &topics,
        "dep-1",
        "account.Deposit",
        r#"{"amount": 700}"#,
    );
    assert_eq!(reused.code, Some(3), "key reused: {reused:?}");
    assert!(
        reused.stdout.starts_with("dep-1 key_reused: "),
        "{reused:?}"
    );

    // --json prints the reply's data, which reads back as a Reply.
    let json = produce(
        &db,
        &topics,
        &[
            "--wait",
            "--json",
            "--timeout",
            "90s",
            "--source",
            "/test",
            "--id",
            "dep-2",
            "--type",
            "account.Deposit",
            "--subject",
            "acc-1",
            "--data",
            r#"{"amount": 25}"#,
        ],
    );
    assert_eq!(json.code, Some(0), "{json:?}");
    let reply: Reply = serde_json::from_str(json.stdout.trim()).expect("one reply as JSON");
    assert_eq!(reply.command.id, "dep-2");
    assert_eq!(reply.command.source, "/test");
    assert!(!reply.duplicate);
    match reply.outcome {
        ReplyOutcome::Applied { version, events } => {
            assert_eq!(version, 3);
            assert_eq!(events.len(), 1);
        }
        other => panic!("not applied: {other:?}"),
    }

    assert_eq!(balance_of_acc_1(&db, &topics), 525);
    drop(worker);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_waits_for_every_reply_and_exits_with_the_worst() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(2).await;
    let worker = WorkerProcess::spawn(&db, &topics, "w1", &[]);

    let lines = [
        r#"{"specversion":"1.0","id":"f-open","source":"/file","type":"account.Open","subject":"acc-1","data":{"owner":"bo"}}"#,
        r#"{"specversion":"1.0","id":"f-dep","source":"/file","type":"account.Deposit","subject":"acc-1","data":{"amount":40}}"#,
        r#"{"specversion":"1.0","id":"f-wd","source":"/file","type":"account.Withdraw","subject":"acc-1","data":{"amount":41}}"#,
        r#"{"specversion":"1.0","id":"g-open","source":"/file","type":"account.Open","subject":"acc-2","data":{"owner":"cy"}}"#,
    ];
    let file = std::env::temp_dir().join(format!("produce-wait-{}.jsonl", topics.group));
    std::fs::write(&file, lines.join("\n")).unwrap();
    // A second `produce --wait` shares the reply topic at the same time: each prints only the
    // replies to its own commands.
    let mut other = on_test_services(cmdproc(), &db.url, &topics);
    other
        .args([
            "produce",
            "--wait",
            "--timeout",
            "90s",
            "--source",
            "/other",
            "--id",
            "o-1",
        ])
        .args([
            "--type",
            "account.Open",
            "--subject",
            "acc-3",
            "--data",
            r#"{"owner": "di"}"#,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut other = KillOnDrop(other.spawn().expect("spawn cmdproc produce"));

    let run = produce(
        &db,
        &topics,
        &[
            "--wait",
            "--timeout",
            "90s",
            "--file",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(
        run.code,
        Some(3),
        "the worst is the rejection: {run:?}\n{}",
        worker.log_tail(30)
    );
    let printed: Vec<(&str, &str)> = run
        .stdout
        .lines()
        .map(|l| {
            let mut words = l.split_whitespace();
            (words.next().unwrap(), words.next().unwrap())
        })
        .collect();
    assert_eq!(
        printed,
        [
            ("f-open", "applied:"),
            ("f-dep", "applied:"),
            ("f-wd", "rejected:"),
            ("g-open", "applied:"),
        ],
        "one reply per command, in the file's order: {run:?}"
    );

    let (other_code, other_stdout) = other.0.wait_with_output_and_keep();
    assert_eq!(other_code, Some(0));
    assert_eq!(other_stdout.lines().count(), 1, "{}", other_stdout);
    assert!(
        other_stdout.starts_with("o-1 applied: version 1"),
        "{}",
        other_stdout
    );
    let _ = std::fs::remove_file(&file);
    drop(worker);
    db.drop_db().await;
}

/// `wait_with_output` for a child kept in a [`KillOnDrop`].
trait WaitKept {
    fn wait_with_output_and_keep(&mut self) -> (Option<i32>, String);
}

impl WaitKept for std::process::Child {
    fn wait_with_output_and_keep(&mut self) -> (Option<i32>, String) {
        use std::io::Read;
        let mut stdout = String::new();
        if let Some(mut out) = self.stdout.take() {
            out.read_to_string(&mut stdout).expect("read stdout");
        }
        let status = self.wait().expect("wait for cmdproc produce");
        (status.code(), stdout)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_reply_topic_nothing_is_produced() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(1).await;
    let missing = format!("{}.nowhere", topics.commands);
    let run = produce(
        &db,
        &topics,
        &[
            "--wait",
            "--reply-topic",
            &missing,
            "--type",
            "account.Open",
            "--subject",
            "acc-1",
            "--data",
            r#"{"owner": "ada"}"#,
        ],
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains(&missing) && run.stderr.contains("cmdproc topics create"),
        "{run:?}"
    );
    assert!(
        read_topic(&topics.commands).is_empty(),
        "nothing was produced"
    );
    db.drop_db().await;
}

/// `cmdproc topics create` with a test's own topic names.
fn topics_create(commands: &Topic, events: &Topic, partitions: &str) -> String {
    let out = cmdproc()
        .args(["--brokers", BROKERS, "--commands-topic", commands.as_str()])
        .args(["--events-topic", events.as_str()])
        .args(["topics", "create", "--partitions", partitions])
        .output()
        .expect("run cmdproc topics create");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn topics_create_makes_the_reply_topic_like_the_commands_topic() {
    let id = support::unique();
    let commands = Topic::parse(format!("test-{id}-commands")).unwrap();
    let events = Topic::parse(format!("test-{id}-events")).unwrap();
    let replies = commands.replies();
    let all = [
        commands.to_string(),
        events.to_string(),
        commands.dead_letter().to_string(),
        replies.to_string(),
    ];
    // The commands topic was there before, with 3 partitions: its replies get 3 too.
    processor::topics::create(
        BROKERS,
        &[(commands.to_string(), 3)],
        1,
        Duration::from_secs(10),
    )
    .await
    .expect("create the commands topic");

    let first = topics_create(&commands, &events, "5");
    let second = topics_create(&commands, &events, "5");
    let _ = processor::topics::delete(
        BROKERS,
        &all.iter().map(String::as_str).collect::<Vec<_>>(),
        Duration::from_secs(3),
    )
    .await;

    assert!(
        first.contains(&format!("created {replies} (3 partitions)")),
        "{first}"
    );
    assert!(
        first.contains(&format!("created {events} (5 partitions)")),
        "{first}"
    );
    assert!(
        first.contains(&format!("{commands} exists with 3 partitions (not 5)")),
        "{first}"
    );
    // Idempotent: a second run creates nothing, and the reply topic is as it should be.
    assert!(!second.contains("created"), "{second}");
    assert!(
        second.contains(&format!("{replies} exists (3 partitions)")),
        "{second}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_worker_the_wait_times_out_with_its_own_code() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(1).await;
    let run = produce(
        &db,
        &topics,
        &[
            "--wait",
            "--timeout",
            "1s",
            "--id",
            "lonely",
            "--type",
            "account.Open",
            "--subject",
            "acc-1",
            "--data",
            r#"{"owner": "ada"}"#,
        ],
    );
    assert_eq!(run.code, Some(5), "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
    assert!(
        run.stderr
            .contains("lonely account.Open: no reply within 1s"),
        "{run:?}"
    );
    // The command was sent, and says where its reply goes.
    let sent = read_topic(&topics.commands);
    assert_eq!(sent.len(), 1);
    let value: Value = serde_json::from_slice(sent[0].value.as_deref().unwrap()).unwrap();
    assert_eq!(value["replyto"], format!("{}.replies", topics.commands));

    // Flags of --wait without --wait are a usage error.
    let usage = produce(
        &db,
        &topics,
        &["--json", "--type", "account.Open", "--subject", "a"],
    );
    assert_eq!(usage.code, Some(2), "{usage:?}");
    db.drop_db().await;
}
