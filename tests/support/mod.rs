//! Helpers shared by the integration suites: a fresh database and fresh topics per test,
//! real worker processes, producing, reading topics back, and waiting for the workers.
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use commands::{Command, Topic};
use processor::producer::{CommandProducer, Delivery};
use rdkafka::ClientConfig;
use sqlx::{Connection, PgPool, Row};

pub mod workload;

pub const BROKERS: &str = "127.0.0.1:9092";

/// The server URL tests create their databases on.
pub fn admin_url() -> String {
    std::env::var("CMDPROC_DATABASE_URL")
        .unwrap_or_else(|_| processor::cli::DEFAULT_DATABASE_URL.to_owned())
}

/// A short unique suffix for names.
pub fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// A database of its own for one test, migrated.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let name = format!("cmdproc_test_{}", unique());
        let admin = admin_url();
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .expect("connect to Postgres: is deploy/local/up.sh running?");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create database");
        let base = admin.rsplit_once('/').expect("database URL has a path").0;
        let url = format!("{base}/{name}");
        let pool = processor::store::connect(&url, 8, Duration::from_secs(5))
            .await
            .expect("connect test database");
        processor::store::migrate(&pool).await.expect("migrate");
        TestDb { name, url, pool }
    }

    /// Drops the database (call at the end of a passing test; a failing one keeps it).
    pub async fn drop_db(self) {
        self.pool.close().await;
        let mut conn = sqlx::PgConnection::connect(&admin_url())
            .await
            .expect("connect");
        let _ = sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .await;
    }
}

/// Fresh commands, events, dead-letter and reply topics.
pub struct TestTopics {
    pub commands: Topic,
    pub events: Topic,
    pub dead_letters: Topic,
    /// `<commands>.replies`, partitioned like the commands topic, as `topics create` makes it.
    pub replies: Topic,
    pub group: String,
    pub partitions: i32,
}

/// Deletes the topics when the test ends (passed or not): a broker that keeps thousands of
/// partitions from earlier runs gets slower for every later test and benchmark.
impl Drop for TestTopics {
    fn drop(&mut self) {
        let topics = [
            self.commands.to_string(),
            self.events.to_string(),
            self.dead_letters.to_string(),
            self.replies.to_string(),
        ];
        // Drop may run inside the test's runtime, which cannot be blocked on: use a thread
        // with a runtime of its own. Failures (a broker stopped by the test) are ignored.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            let _ = runtime.block_on(processor::topics::delete(
                BROKERS,
                &names,
                Duration::from_secs(3),
            ));
        })
        .join();
    }
}

impl TestTopics {
    pub async fn new(partitions: i32) -> TestTopics {
        let id = unique();
        let commands = Topic::parse(format!("test-{id}-commands")).unwrap();
        let events = Topic::parse(format!("test-{id}-events")).unwrap();
        let dead_letters = commands.dead_letter();
        let replies = commands.replies();
        let wanted = vec![
            (commands.to_string(), partitions),
            (events.to_string(), partitions),
            (dead_letters.to_string(), partitions),
            (replies.to_string(), partitions),
        ];
        processor::topics::create(BROKERS, &wanted, 1, Duration::from_secs(10))
            .await
            .expect("create topics");
        TestTopics {
            commands,
            events,
            dead_letters,
            replies,
            group: format!("test-{id}"),
            partitions,
        }
    }

    pub fn producer(&self) -> CommandProducer {
        CommandProducer::new(BROKERS, self.commands.clone(), Duration::from_secs(30))
            .expect("producer")
    }
}

/// The `cmdproc` binary under test.
pub fn cmdproc() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_cmdproc"))
}

/// Runs a one-shot `cmdproc` subcommand (`subcommand` then `args`) against a test's
/// database and topics; returns whether it succeeded and its stdout and stderr together.
pub fn cmdproc_on(
    db: &TestDb,
    topics: &TestTopics,
    subcommand: &str,
    args: &[&str],
) -> (bool, String) {
    let mut command = cmdproc();
    command.arg(subcommand).args(args);
    let out = on_test_services(command, &db.url, topics)
        .output()
        .expect("run cmdproc");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `program` (`cmdproc`, or a user's processor binary) pointed at a test's database,
/// topics and the local broker.
pub fn on_test_services(
    mut program: std::process::Command,
    database_url: &str,
    topics: &TestTopics,
) -> std::process::Command {
    program
        .args(["--database-url", database_url, "--brokers", BROKERS])
        .args([
            "--commands-topic",
            topics.commands.as_str(),
            "--events-topic",
            topics.events.as_str(),
        ]);
    program
}

fn log_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("worker-logs");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A real worker process (`cmdproc run`), killed when dropped.
pub struct WorkerProcess {
    pub child: std::process::Child,
    pub log: PathBuf,
    pub name: String,
}

impl WorkerProcess {
    pub fn spawn(db: &TestDb, topics: &TestTopics, name: &str, extra: &[&str]) -> WorkerProcess {
        Self::spawn_with_env(db, topics, name, extra, &[])
    }

    /// A worker with extra environment, e.g. `CMDPROC_FAILPOINT`.
    pub fn spawn_with_env(
        db: &TestDb,
        topics: &TestTopics,
        name: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> WorkerProcess {
        Self::spawn_program(cmdproc(), db, topics, name, extra, env)
    }

    /// `<program> run` with the test's database, topics and group: `cmdproc`, or a user's
    /// processor binary built with `processor::cli::main`.
    pub fn spawn_program(
        mut program: std::process::Command,
        db: &TestDb,
        topics: &TestTopics,
        name: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> WorkerProcess {
        let log = log_dir().join(format!("{}-{name}.log", topics.group));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = program
            .args([
                "run",
                "--brokers",
                BROKERS,
                "--database-url",
                &db.url,
                "--group",
                &topics.group,
            ])
            .args([
                "--commands-topic",
                topics.commands.as_str(),
                "--events-topic",
                topics.events.as_str(),
            ])
            .args(["--session-timeout", "6s", "--name", name])
            .args(extra)
            .env("CMDPROC_LOG", "info,sqlx=warn,rdkafka=warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn cmdproc run");
        WorkerProcess {
            child,
            log,
            name: name.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// A child process killed (and reaped) when the guard drops, also when a test panics.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Produces commands in order (per-key order holds), returning where each landed.
pub async fn produce_all(producer: &CommandProducer, commands: &[Command]) -> Vec<Delivery> {
    use futures::StreamExt;
    futures::stream::iter(commands.iter().map(|c| producer.send(c)))
        .buffered(2000)
        .map(|r| r.expect("produce"))
        .collect()
        .await
}

/// The offset after the last message of each partition, from deliveries.
pub fn ends(deliveries: &[Delivery]) -> BTreeMap<i32, i64> {
    let mut out = BTreeMap::new();
    for d in deliveries {
        let e = out.entry(d.partition).or_insert(0);
        *e = (*e).max(d.offset + 1);
    }
    out
}

/// Waits until the workers stored positions at or past `ends` and the relay published the
/// whole outbox; panics with the workers' logs after `timeout`.
pub async fn wait_processed(
    db: &TestDb,
    topic: &Topic,
    ends: &BTreeMap<i32, i64>,
    timeout: Duration,
    workers: &[&WorkerProcess],
) {
    let deadline = Instant::now() + timeout;
    loop {
        let rows = sqlx::query(
            "SELECT p.partition, p.next_offset, p.outbox_seq, COALESCE(r.published_seq, 0)
             FROM partitions p LEFT JOIN relay_positions r ON r.topic = p.topic AND r.partition = p.partition WHERE p.topic = $1",
        )
        .bind(topic.as_str())
        .fetch_all(&db.pool)
        .await
        .expect("read positions");
        let stored: HashMap<i32, (i64, i64, i64)> = rows
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
            .collect();
        let consumed = ends
            .iter()
            .all(|(p, end)| stored.get(p).is_some_and(|s| s.0 >= *end));
        let published = stored.values().all(|s| s.2 >= s.1);
        if consumed && published {
            return;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = workers
                .iter()
                .map(|w| format!("--- {}\n{}", w.log.display(), w.log_tail(30)))
                .collect();
            panic!(
                "not processed within {timeout:?}: positions {stored:?}, wanted {ends:?}\n{}",
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A message read back from a topic.
pub use processor::harness::topic::Record as Read;

/// Reads a whole topic from the beginning up to its current high watermarks.
pub fn read_topic(topic: &Topic) -> Vec<Read> {
    processor::harness::topic::read_blocking(BROKERS, topic.as_str(), Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("reading {topic}: {e}"))
}

/// Reads `topic` to its end until it holds at least `at_least` messages, or `within`
/// passes (a relay records its position right after its Kafka commit, and the broker can
/// still report the partition's end from before it); returns the last read.
pub fn read_topic_at_least(topic: &Topic, at_least: usize, within: Duration) -> Vec<Read> {
    let deadline = Instant::now() + within;
    loop {
        let read = read_topic(topic);
        if read.len() >= at_least || Instant::now() > deadline {
            return read;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

// ---------------------------------------------------------------------------------------
// Helpers for the failure-injection suite (tests/failures/).

/// The workspace root, where `deploy/local/` lives.
pub fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Sends a signal by name (`STOP`, `CONT`, `TERM`, ...) to a process; panics if `kill` fails.
pub fn send_signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed: {status}");
}

impl WorkerProcess {
    /// The worker's whole log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Every partition of `topic` with its stored owner and epoch.
pub async fn partition_owners(db: &TestDb, topic: &Topic) -> BTreeMap<i32, (String, i64)> {
    sqlx::query("SELECT partition, COALESCE(owner, ''), epoch FROM partitions WHERE topic = $1")
        .bind(topic.as_str())
        .fetch_all(&db.pool)
        .await
        .expect("read partition owners")
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

/// Outbox rows written but not yet published by a relay, over all partitions.
pub async fn outbox_backlog(db: &TestDb, topic: &Topic) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(sum(p.outbox_seq - COALESCE(r.published_seq, 0)), 0)::bigint
         FROM partitions p LEFT JOIN relay_positions r ON r.topic = p.topic AND r.partition = p.partition
         WHERE p.topic = $1",
    )
    .bind(topic.as_str())
    .fetch_one(&db.pool)
    .await
    .expect("read outbox backlog")
}

/// Produces `commands` in the background, `slice` at a time with `pause` between slices, so
/// that load keeps arriving while a test injects a failure. Returns every delivery.
pub fn produce_in_slices(
    topics: &TestTopics,
    commands: Vec<Command>,
    slice: usize,
    pause: Duration,
) -> tokio::task::JoinHandle<Vec<Delivery>> {
    let producer = topics.producer();
    tokio::spawn(async move {
        let mut deliveries = Vec::with_capacity(commands.len());
        for chunk in commands.chunks(slice) {
            // A loop rather than `produce_all`'s closure: a spawned task must be `Send` for
            // every lifetime, which the closure's inferred signature is not.
            let mut sends = Vec::with_capacity(chunk.len());
            for c in chunk {
                sends.push(producer.send(c));
            }
            for d in futures::future::join_all(sends).await {
                deliveries.push(d.expect("produce"));
            }
            tokio::time::sleep(pause).await;
        }
        deliveries
    })
}

/// A raw Kafka message for hostile-input tests: any key, value and headers, sent to an
/// explicit partition.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// Produces raw messages strictly in the given order (each is enqueued before the next, and
/// the producer is idempotent, so per-partition order holds), returning where each landed.
pub async fn produce_raw(topic: &Topic, messages: &[RawMessage]) -> Vec<Delivery> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.max.bytes", "2000000")
        .set("message.timeout.ms", "60000")
        .create()
        .expect("raw producer");
    let mut pending = Vec::with_capacity(messages.len());
    for m in messages {
        let mut headers = OwnedHeaders::new_with_capacity(m.headers.len());
        for (k, v) in &m.headers {
            headers = headers.insert(Header {
                key: k,
                value: v.as_deref(),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic.as_str())
            .partition(m.partition)
            .headers(headers);
        if let Some(k) = &m.key {
            record = record.key(k);
        }
        if let Some(v) = &m.value {
            record = record.payload(v);
        }
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((e, r)) => {
                    assert!(
                        matches!(
                            e,
                            rdkafka::error::KafkaError::MessageProduction(
                                rdkafka::types::RDKafkaErrorCode::QueueFull
                            )
                        ),
                        "enqueueing a raw message failed: {e}"
                    );
                    record = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
    let mut out = Vec::with_capacity(pending.len());
    for f in pending {
        let d = f
            .await
            .expect("delivery not cancelled")
            .map_err(|(e, _)| e)
            .expect("raw message delivered");
        out.push(Delivery {
            partition: d.partition,
            offset: d.offset,
        });
    }
    out
}

/// A port nothing listens on now (the kernel's choice), for a process's HTTP endpoint.
pub fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").to_string()
}

/// A plain HTTP/1.0 GET: the status code and the body, or `None` when nothing answers.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// The value of one metric series (name with its labels) in a process's `/metrics`.
pub fn scrape(addr: &str, series: &str) -> Option<f64> {
    let (_, text) = http_get(addr, "/metrics")?;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Produces `commands`, then waits (up to `timeout`) until the workers stored positions past
/// them and the relay published the whole outbox. Returns the deliveries.
pub async fn produce_and_wait(
    db: &TestDb,
    topics: &TestTopics,
    commands: &[Command],
    timeout: Duration,
    workers: &[&WorkerProcess],
) -> Vec<Delivery> {
    let deliveries = produce_all(&topics.producer(), commands).await;
    wait_processed(db, &topics.commands, &ends(&deliveries), timeout, workers).await;
    deliveries
}

/// A custom-format backup of the test's database.
pub fn backup(db: &TestDb) -> PathBuf {
    let dump = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{}.dump", db.name));
    let status = std::process::Command::new("pg_dump")
        .args(["--format=custom", "--file"])
        .arg(&dump)
        .arg(format!("--dbname={}", db.url))
        .status()
        .unwrap();
    assert!(status.success(), "pg_dump");
    dump
}

/// Replaces the test's database with the backup, under whatever runs against it.
pub async fn restore(db: &mut TestDb, dump: &PathBuf) {
    db.pool.close().await;
    {
        use sqlx::Connection;
        let mut admin = sqlx::PgConnection::connect(&admin_url()).await.unwrap();
        sqlx::query(&format!("DROP DATABASE {} WITH (FORCE)", db.name))
            .execute(&mut admin)
            .await
            .unwrap();
        sqlx::query(&format!("CREATE DATABASE {}", db.name))
            .execute(&mut admin)
            .await
            .unwrap();
    }
    let status = std::process::Command::new("pg_restore")
        .args(["--single-transaction", "--no-owner"])
        .arg(format!("--dbname={}", db.url))
        .arg(dump)
        .status()
        .unwrap();
    assert!(status.success(), "pg_restore");
    db.pool = processor::store::connect(&db.url, 4, Duration::from_secs(5))
        .await
        .unwrap();
}
