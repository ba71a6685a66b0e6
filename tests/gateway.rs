//! `cmdproc gateway` against the real broker, database and worker processes: HTTP in,
//! outcome out. Every answer has the right status, a retry gets the same bytes, balances
//! equal a serial model of the applied commands, a request past its deadline gets 202 and a
//! `Location` that later holds the outcome, the served OpenAPI document is the repository's,
//! and schemathesis finds no server error and no answer the document does not describe.
//! Needs `deploy/local/up.sh`, and `deploy/local/python.sh` for the schemathesis test.

mod support;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use support::{free_addr, on_test_services, KillOnDrop, TestDb, TestTopics, WorkerProcess};

/// A `cmdproc gateway` process on a free port, killed when dropped.
struct GatewayProcess {
    addr: String,
    log: PathBuf,
    _child: KillOnDrop,
}

impl GatewayProcess {
    /// Starts the gateway with `extra` flags and waits until `/readyz` says ready.
    fn start(db: &TestDb, topics: &TestTopics, extra: &[&str]) -> GatewayProcess {
        let addr = free_addr();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("worker-logs");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(format!(
            "{}-gateway-{}.log",
            topics.group,
            support::unique()
        ));
        let file = std::fs::File::create(&log).unwrap();
        let mut command = on_test_services(support::cmdproc(), &db.url, topics);
        command
            .args(["gateway", "--listen", &addr])
            .args(extra)
            .env("CMDPROC_LOG", "info,sqlx=warn,rdkafka=warn")
            .stdout(Stdio::null())
            .stderr(file);
        let gateway = GatewayProcess {
            addr,
            log,
            _child: KillOnDrop(command.spawn().expect("spawn cmdproc gateway")),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((200, _)) = support::http_get(&gateway.addr, "/readyz") {
                return gateway;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway is not ready after 30s:\n{}",
                gateway.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// One HTTP answer: status, `Idempotent-Replayed`, `Location`, body bytes.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    replayed: Option<String>,
    location: Option<String>,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

async fn answer(response: reqwest::Response) -> Answer {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (replayed, location) = (header("idempotent-replayed"), header("location"));
    Answer {
        status: response.status().as_u16(),
        replayed,
        location,
        body: response.bytes().await.expect("read the body").to_vec(),
    }
}

/// `POST /commands` with a compact body and the idempotency key `key`.
async fn post(
    client: &reqwest::Client,
    gateway: &GatewayProcess,
    key: &str,
    body: &Value,
) -> Answer {
    let response = client
        .post(gateway.url("/commands"))
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(body.to_string())
        .send()
        .await
        .expect("the gateway answers");
    answer(response).await
}

async fn get(client: &reqwest::Client, gateway: &GatewayProcess, path: &str) -> Answer {
    answer(
        client
            .get(gateway.url(path))
            .send()
            .await
            .expect("the gateway answers"),
    )
    .await
}

fn command(kind: &str, account: &str, data: Value) -> Value {
    json!({"type": format!("account.{kind}"), "subject": account, "data": data})
}

/// An account's balance and version as the workers stored them.
async fn stored_account(db: &TestDb, account: &str) -> (i64, i64) {
    let (state, version): (Value, i64) = sqlx::query_as(
        "SELECT state, version FROM aggregates WHERE aggregate_type = 'account' AND aggregate_id = $1",
    )
    .bind(account)
    .fetch_one(&db.pool)
    .await
    .expect("the account is stored");
    (state["balance"].as_i64().expect("a balance"), version)
}

/// A new deposit or withdrawal to send: account, `Deposit` or `Withdraw`, amount.
type Planned = (String, &'static str, i64);

/// A deposit or withdrawal sent once, with its answer.
#[derive(Debug, Clone)]
struct Sent {
    key: String,
    account: String,
    kind: &'static str,
    amount: i64,
    body: Value,
    answer: Answer,
}

/// The load test: 1,000 requests over 20 connections, 10 % of them retries of an
/// earlier key (a third of those with another body), deposits and withdrawals on four
/// accounts. Every answer has the right status, a retry with the same body gets the same
/// bytes, one with another body gets 409 `key_reused`, and each account's stored balance and
/// version equal a serial model of its applied commands in version order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_requests_with_retries_match_a_serial_model() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(3).await;
    let _workers = [
        WorkerProcess::spawn(&db, &topics, "w1", &["--metrics-addr", &free_addr()]),
        WorkerProcess::spawn(&db, &topics, "w2", &["--metrics-addr", &free_addr()]),
    ];
    let gateway = GatewayProcess::start(&db, &topics, &["--deadline", "60s"]);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(20)
        .build()
        .unwrap();

    let accounts: Vec<String> = (0..4).map(|i| format!("acc-{i}")).collect();
    for account in &accounts {
        let open = command("Open", account, json!({"owner": account}));
        let a = post(&client, &gateway, &format!("open-{account}"), &open).await;
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        assert_eq!(a.json()["version"], 1);
    }

    // 996 more requests: 896 new commands and 100 retries, the retries spread after the
    // first 50 requests so that they find earlier answers to repeat.
    let mut rng = StdRng::seed_from_u64(13);
    let mut slots: Vec<Option<usize>> = (0..896).map(Some).collect();
    for _ in 0..100 {
        let at = rng.gen_range(50..=slots.len());
        slots.insert(at, None);
    }
    let plan: Vec<(usize, Option<Planned>)> = slots
        .iter()
        .enumerate()
        .map(|(n, slot)| {
            let new = slot.map(|_| {
                let account = accounts[rng.gen_range(0..accounts.len())].clone();
                if rng.gen_bool(0.5) {
                    (account, "Deposit", rng.gen_range(1..=100))
                } else {
                    (account, "Withdraw", rng.gen_range(1..=150))
                }
            });
            (n, new)
        })
        .collect();
    assert_eq!(plan.len() + accounts.len(), 1000);
    let queue = Arc::new(Mutex::new(VecDeque::from(plan)));
    let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
    // (the first answer, the retry's body, the retry's answer)
    let retries: Arc<Mutex<Vec<(Sent, Value, Answer)>>> = Arc::default();
    let mut tasks = Vec::new();
    for connection in 0..20u64 {
        let (queue, sent, retries) = (queue.clone(), sent.clone(), retries.clone());
        let client = client.clone();
        let url = gateway.url("/commands");
        let mut rng = StdRng::seed_from_u64(100 + connection);
        tasks.push(tokio::spawn(async move {
            let send = |key: String, body: Value| {
                let request = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("idempotency-key", key)
                    .body(body.to_string());
                async move { answer(request.send().await.expect("the gateway answers")).await }
            };
            loop {
                let Some((n, slot)) = queue.lock().unwrap().pop_front() else {
                    return;
                };
                match slot {
                    Some((account, kind, amount)) => {
                        let key = format!("op-{n}");
                        let body = command(kind, &account, json!({"amount": amount}));
                        let answer = send(key.clone(), body.clone()).await;
                        sent.lock().unwrap().push(Sent {
                            key,
                            account,
                            kind,
                            amount,
                            body,
                            answer,
                        });
                    }
                    None => {
                        let earlier = {
                            let sent = sent.lock().unwrap();
                            sent[rng.gen_range(0..sent.len())].clone()
                        };
                        let body = if rng.gen_bool(1.0 / 3.0) {
                            command(
                                earlier.kind,
                                &earlier.account,
                                json!({"amount": earlier.amount + 1}),
                            )
                        } else {
                            earlier.body.clone()
                        };
                        let answer = send(earlier.key.clone(), body.clone()).await;
                        retries.lock().unwrap().push((earlier, body, answer));
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("a client task");
    }
    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let retries = std::mem::take(&mut *retries.lock().unwrap());
    assert_eq!(sent.len() + retries.len() + accounts.len(), 1000);

    // Every first answer: deposits applied, withdrawals applied or refused for want of funds.
    for s in &sent {
        let body = s.answer.json();
        assert_eq!(
            s.answer.replayed.as_deref(),
            Some("false"),
            "{}: {body}",
            s.key
        );
        assert_eq!(body["command"]["id"], s.key.as_str());
        match (s.answer.status, s.kind) {
            (200, _) => {
                assert_eq!(body["outcome"], "applied", "{body}");
                assert_eq!(body["events"].as_array().map(Vec::len), Some(1), "{body}");
            }
            (409, "Withdraw") => {
                assert_eq!(body["outcome"], "rejected", "{body}");
                assert_eq!(body["code"], "insufficient_funds", "{body}");
            }
            (status, kind) => panic!("{kind} {} answered {status}: {body}", s.key),
        }
    }
    let rejected = sent.iter().filter(|s| s.answer.status == 409).count();
    assert!(
        rejected > 0 && rejected < sent.len(),
        "{rejected} of {} withdrawals and deposits refused",
        sent.len()
    );
    // Every retry: the same bytes for the same body, key_reused for another body.
    let (mut same, mut other) = (0, 0);
    for (first, body, retry) in &retries {
        if *body == first.body {
            same += 1;
            assert_eq!(
                (retry.status, String::from_utf8_lossy(&retry.body)),
                (
                    first.answer.status,
                    String::from_utf8_lossy(&first.answer.body)
                ),
                "a retry of {} gets the first answer",
                first.key
            );
            assert_eq!(retry.replayed.as_deref(), Some("true"), "{}", first.key);
        } else {
            other += 1;
            let answer = retry.json();
            assert_eq!(retry.status, 409, "{answer}");
            assert_eq!(answer["outcome"], "key_reused", "{answer}");
        }
    }
    assert!(
        same > 0 && other > 0,
        "{same} same-body and {other} other-body retries"
    );

    // The serial model: each account's applied commands in version order, from the open
    // (version 1) on, never overdraw, and end at the stored balance and version.
    let mut applied: BTreeMap<&str, Vec<(u64, &Sent)>> = BTreeMap::new();
    for s in sent.iter().filter(|s| s.answer.status == 200) {
        let version = s.answer.json()["version"].as_u64().unwrap();
        applied
            .entry(s.account.as_str())
            .or_default()
            .push((version, s));
    }
    for account in &accounts {
        let mut ops = applied.remove(account.as_str()).unwrap_or_default();
        ops.sort_by_key(|(version, _)| *version);
        let mut balance = 0i64;
        for (i, (version, s)) in ops.iter().enumerate() {
            assert_eq!(
                *version,
                i as u64 + 2,
                "{account}: versions follow each other"
            );
            balance += if s.kind == "Deposit" {
                s.amount
            } else {
                -s.amount
            };
            assert!(balance >= 0, "{account} overdrawn at version {version}");
        }
        let stored = stored_account(&db, account).await;
        assert_eq!(
            stored,
            (balance, ops.len() as i64 + 1),
            "{account}: (balance, version)"
        );
    }

    let log = gateway.log_text();
    assert!(
        !log.contains("amount"),
        "command data logged at info:\n{log}"
    );
    let metrics = get(&client, &gateway, "/metrics").await;
    let text = String::from_utf8(metrics.body).unwrap();
    assert!(
        text.contains("cmdproc_gateway_reply_seconds_count 1000"),
        "every request got a reply:\n{text}"
    );
    drop(gateway);
    db.drop_db().await;
}

/// A retry arriving while the first attempt still waits gets the same outcome, and the
/// deposit counts once; the same key with another body, in flight at once, gets key_reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_in_flight_gets_the_same_outcome() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(2).await;
    let _worker = WorkerProcess::spawn(&db, &topics, "w1", &["--metrics-addr", &free_addr()]);
    let gateway = GatewayProcess::start(&db, &topics, &["--deadline", "30s"]);
    let client = reqwest::Client::new();
    let open = command("Open", "acc-1", json!({"owner": "ann"}));
    assert_eq!(post(&client, &gateway, "open", &open).await.status, 200);

    let deposit = command("Deposit", "acc-1", json!({"amount": 70}));
    let (first, retry) = tokio::join!(
        post(&client, &gateway, "dep-1", &deposit),
        post(&client, &gateway, "dep-1", &deposit)
    );
    assert_eq!(
        first.status,
        200,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    assert_eq!((retry.status, &retry.body), (first.status, &first.body));
    let mut replayed = [first.replayed.clone(), retry.replayed.clone()];
    replayed.sort();
    assert_eq!(replayed, [Some("false".into()), Some("true".into())]);

    let other = command("Deposit", "acc-1", json!({"amount": 5}));
    let (a, b) = tokio::join!(
        post(&client, &gateway, "dep-2", &deposit),
        post(&client, &gateway, "dep-2", &other)
    );
    let mut outcomes = [
        (a.status, a.json()["outcome"].as_str().unwrap().to_owned()),
        (b.status, b.json()["outcome"].as_str().unwrap().to_owned()),
    ];
    outcomes.sort();
    assert_eq!(
        outcomes,
        [(200, "applied".to_owned()), (409, "key_reused".to_owned())]
    );
    let applied_amount = if a.status == 200 { 70 } else { 5 };
    assert_eq!(stored_account(&db, "acc-1").await, (70 + applied_amount, 3));
    db.drop_db().await;
}

/// With no worker, a request gets 202 and a Location once the deadline passes; the Location
/// says 404 until a worker runs, then the outcome, which a retry of the request also gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_deadline_the_location_holds_the_outcome() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(2).await;
    let gateway = GatewayProcess::start(
        &db,
        &topics,
        &["--deadline", "1s", "--default-source", "/shop/checkout"],
    );
    let client = reqwest::Client::new();
    let open = command("Open", "acc-9", json!({"owner": "bo"}));
    let pending = post(&client, &gateway, "open 9/a", &open).await;
    assert_eq!(
        pending.status,
        202,
        "{}",
        String::from_utf8_lossy(&pending.body)
    );
    let location = pending.location.clone().expect("a Location header");
    assert_eq!(location, "/commands/%2Fshop%2Fcheckout/open%209%2Fa");
    assert_eq!(pending.json()["location"], location.as_str());
    assert_eq!(get(&client, &gateway, &location).await.status, 404);

    let _worker = WorkerProcess::spawn(&db, &topics, "w1", &["--metrics-addr", &free_addr()]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let outcome = loop {
        let polled = get(&client, &gateway, &location).await;
        if polled.status != 404 {
            break polled;
        }
        assert!(
            Instant::now() < deadline,
            "no outcome at {location} after 60s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        outcome.status,
        200,
        "{}",
        String::from_utf8_lossy(&outcome.body)
    );
    let body = outcome.json();
    assert_eq!(body["outcome"], "applied");
    assert_eq!(
        body["command"],
        json!({"source": "/shop/checkout", "id": "open 9/a"})
    );
    let retried = post(&client, &gateway, "open 9/a", &open).await;
    assert_eq!((retried.status, &retried.body), (200, &outcome.body));
    assert_eq!(retried.replayed.as_deref(), Some("true"));
    db.drop_db().await;
}

/// Requests that cannot be commands: 422 naming the schema error or the unknown type, 400
/// without an idempotency key, 413 over the body limit, 415 for another media type, 404 for
/// an unknown command; and the served OpenAPI document is the repository's file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_requests_get_the_documented_problems() {
    let db = TestDb::new().await;
    let topics = TestTopics::new(1).await;
    let gateway = GatewayProcess::start(&db, &topics, &["--max-body-bytes", "2048"]);
    let client = reqwest::Client::new();

    let negative = post(
        &client,
        &gateway,
        "k-1",
        &command("Deposit", "a", json!({"amount": -1})),
    )
    .await;
    let problem = negative.json();
    assert_eq!(
        (negative.status, &problem["kind"]),
        (422, &json!("schema")),
        "{problem}"
    );
    assert!(
        problem["detail"].as_str().unwrap().contains("amount"),
        "{problem}"
    );

    let unknown = post(&client, &gateway, "k-2", &command("Close", "a", json!({}))).await;
    let problem = unknown.json();
    assert_eq!(
        (unknown.status, &problem["kind"]),
        (422, &json!("unknown_type")),
        "{problem}"
    );

    let ce = json!({"specversion": "1.0", "id": "c-1", "source": "/s", "type": "account.Open",
                    "subject": "a", "data": {"owner": "x"}});
    let disagreeing = post(&client, &gateway, "c-2", &ce).await;
    assert_eq!(disagreeing.status, 422, "{}", disagreeing.json());

    let no_key = client
        .post(gateway.url("/commands"))
        .header("content-type", "application/json")
        .body(command("Open", "a", json!({"owner": "x"})).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 400);

    let large = command("Open", "a", json!({"owner": "x".repeat(4000)}));
    let too_large = post(&client, &gateway, "k-3", &large).await;
    assert_eq!(
        too_large.status,
        413,
        "{}",
        String::from_utf8_lossy(&too_large.body)
    );
    assert_eq!(too_large.json()["status"], 413);

    let form = client
        .post(gateway.url("/commands"))
        .header("content-type", "text/plain")
        .header("idempotency-key", "k-4")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 415);

    let missing = get(&client, &gateway, "/commands/%2Fnobody/nothing").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["status"], 404);

    let served = get(&client, &gateway, "/openapi.json").await;
    assert_eq!(served.status, 200);
    let file = std::fs::read(support::repo_root().join("docs/openapi.json")).unwrap();
    assert!(
        served.body == file,
        "/openapi.json differs from docs/openapi.json"
    );
    let document: Value = serde_json::from_slice(&file).unwrap();
    assert_eq!(document["openapi"], "3.1.0");

    let metrics = String::from_utf8(get(&client, &gateway, "/metrics").await.body).unwrap();
    for (status, count) in [("422", 3), ("400", 1), ("413", 1), ("415", 1), ("404", 1)] {
        let series = format!("cmdproc_gateway_requests_total{{status=\"{status}\"}} {count}");
        assert!(metrics.contains(&series), "no `{series}` in\n{metrics}");
    }
    assert_eq!(get(&client, &gateway, "/healthz").await.status, 200);
    db.drop_db().await;
}

/// schemathesis (from PyPI, installed by `deploy/local/python.sh`) generates requests from
/// the served document, with a worker applying what it produces, and finds no server error
/// and no answer the document does not describe.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schemathesis_finds_no_server_error_and_no_undocumented_answer() {
    let venv = std::env::var("CMDPROC_VENV").unwrap_or_else(|_| "/var/cache/cmdproc/venv".into());
    let schemathesis = PathBuf::from(&venv).join("bin/schemathesis");
    assert!(
        schemathesis.exists(),
        "{} is missing: run deploy/local/python.sh (it installs the pinned schemathesis into \
         {venv}, or CMDPROC_VENV)",
        schemathesis.display()
    );
    let db = TestDb::new().await;
    let topics = TestTopics::new(2).await;
    let _worker = WorkerProcess::spawn(&db, &topics, "w1", &["--metrics-addr", &free_addr()]);
    let gateway = GatewayProcess::start(&db, &topics, &["--deadline", "2s"]);
    let reports =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("schemathesis-{}", topics.group));
    std::fs::create_dir_all(&reports).unwrap();
    let output = tokio::task::spawn_blocking({
        let url = gateway.url("/openapi.json");
        move || {
            std::process::Command::new(&schemathesis)
                .args(["run", &url])
                .args([
                    "--checks",
                    "not_a_server_error,response_schema_conformance,status_code_conformance,\
                     content_type_conformance,response_headers_conformance",
                ])
                .args(["--max-examples", "50", "--no-color"])
                .args(["--generation-database", "none"])
                // schemathesis keeps state in its working directory: not in the clone.
                .current_dir(&reports)
                .env("SCHEMATHESIS_HOOKS", "")
                .output()
                .expect("run schemathesis")
        }
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "schemathesis failed ({}):\n{text}\n--- gateway log ---\n{}",
        output.status,
        gateway.log_text()
    );
    assert!(text.contains("passed"), "{text}");
    db.drop_db().await;
}
