//! The Python example (`examples/python/reply.py`, confluent-kafka) against a real worker:
//! it sends a command with `replyto`, prints the reply and exits like `produce --wait`.
//! Needs `deploy/local/up.sh` and `deploy/local/python.sh` (the virtualenv it runs in).

mod support;

use std::path::PathBuf;

use serde_json::{json, Value};
use support::{cmdproc_on, repo_root, TestDb, TestTopics, WorkerProcess, BROKERS};

/// The virtualenv `deploy/local/python.sh` makes.
fn python() -> PathBuf {
    let venv = std::env::var("CMDPROC_VENV").unwrap_or_else(|_| "/var/cache/cmdproc/venv".into());
    let python = PathBuf::from(venv).join("bin/python");
    assert!(
        python.exists(),
        "{} not found: run deploy/local/python.sh first",
        python.display()
    );
    python
}

/// What one run of the example printed on stdout (the reply, parsed) and its exit code.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    reply: Option<Value>,
    stdout: String,
    stderr: String,
}

fn reply_py(topics: &TestTopics, id: &str, ty: &str, data: Value, extra: &[&str]) -> Run {
    let out = std::process::Command::new(python())
        .arg(repo_root().join("examples/python/reply.py"))
        .args(["--brokers", BROKERS, "--topic", topics.commands.as_str()])
        .args(["--source", "/python-test", "--id", id, "--type", ty])
        .args(["--subject", "acc-1", "--data", &data.to_string()])
        // Long enough for a worker that is still joining its group.
        .args(["--timeout", "90"])
        .args(extra)
        .output()
        .expect("run examples/python/reply.py");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Run {
        code: out.status.code(),
        reply: serde_json::from_str(stdout.trim()).ok(),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_example_prints_each_reply_and_exits_with_its_code() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(3).await;
    let worker = WorkerProcess::spawn(&db, &topics, "w1", &[]);

    let open = reply_py(
        &topics,
        "py-open",
        "account.Open",
        json!({"owner": "ada"}),
        &[],
    );
    assert_eq!(open.code, Some(0), "{open:?}\n{}", worker.log_tail(30));
    let reply = open.reply.clone().expect("the reply as JSON");
    assert_eq!(
        reply["command"],
        json!({"source": "/python-test", "id": "py-open"})
    );
    assert_eq!(reply["outcome"], "applied");
    assert_eq!(reply["version"], 1);
    assert_eq!(reply["events"].as_array().map(Vec::len), Some(1));
    assert_eq!(reply["duplicate"], false);

    let too_much = reply_py(
        &topics,
        "py-wd",
        "account.Withdraw",
        json!({"amount": 10}),
        &[],
    );
    assert_eq!(too_much.code, Some(3), "rejected: {too_much:?}");
    let reply = too_much.reply.clone().expect("the reply as JSON");
    assert_eq!(reply["outcome"], "rejected");
    assert_eq!(reply["code"], "insufficient_funds");
    assert_eq!(
        reply["reason"],
        "insufficient funds: balance 0, withdrawal 10"
    );

    // The first command again: its recorded outcome, marked as a duplicate.
    let again = reply_py(
        &topics,
        "py-open",
        "account.Open",
        json!({"owner": "ada"}),
        &[],
    );
    assert_eq!(again.code, Some(0), "{again:?}");
    let mut expected = open.reply.clone().unwrap();
    expected["duplicate"] = json!(true);
    assert_eq!(again.reply, Some(expected), "{again:?}");

    // The aggregate saw one Open and nothing else.
    let (ok, out) = cmdproc_on(&db, &topics, "inspect", &["account", "acc-1"]);
    assert!(ok, "{out}");
    let shown: Value = serde_json::from_str(&out).expect("inspect prints JSON");
    assert_eq!(shown["version"], 1);
    assert_eq!(shown["state"]["balance"], 0);
    drop(worker);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_example_refuses_a_missing_reply_topic() {
    let topics = TestTopics::new(1).await;
    let missing = format!("{}.nowhere", topics.commands);
    let run = reply_py(
        &topics,
        "py-1",
        "account.Open",
        json!({"owner": "ada"}),
        &["--reply-topic", &missing],
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("cmdproc topics create"), "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
    assert!(
        support::read_topic(&topics.commands).is_empty(),
        "nothing was produced"
    );
}
