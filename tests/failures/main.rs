//! Failure injection against the real broker and database: a worker paused past its session
//! (a zombie), a lease that expires during a slow write, workers joining and leaving under
//! load, graceful shutdown, Postgres and Kafka outages, hostile input and a hot key. Every
//! test asserts what a user would check: the final state equals the serial model, every
//! event is on the events topic exactly once, nothing is lost and nothing applied twice.
//!
//! Some tests stop Kafka or Postgres with `deploy/local/{kafka,postgres}.sh`, so every test
//! in this binary holds one global lock and none overlap; a stopped service is started
//! again even when a test panics. Other suites running against the same services at the
//! same time would see those outages too. Needs `deploy/local/up.sh`.
//!
//! One file per failure family: `fencing` (zombies and expired leases), `membership`
//! (joining, leaving, SIGTERM), `database` and `broker` (outages), `hostile` (hostile
//! input), `hot_key`, and `poison` (poison commands, and a relay dying mid-publish). The
//! shared fixtures live here.

mod broker;
mod database;
mod fencing;
mod hostile;
mod hot_key;
mod membership;
mod poison;
#[path = "../support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use commands::{AggregateId, Command, CommandId, CommandType, Source};
use serde_json::Value;
use sqlx::Row;
use support::{partition_owners, TestDb, TestTopics};

/// Serializes every test of this binary: some stop the broker or the database, which would
/// break whatever else runs at that moment.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The lock of [`SERIAL`], for the tests in submodules.
pub(crate) async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// Generous bound for a run to finish after a failure; a healthy run needs a few seconds.
const WAIT: Duration = Duration::from_secs(180);

/// What a worker logs when a batch finds its epoch stale (the relay's Kafka producer being
/// fenced is another matter, and logged differently).
const BATCH_FENCED: &str = "fenced: another worker owns";

/// `WorkerProcess::spawn` runs workers with a 6 s session timeout.
const SESSION: Duration = Duration::from_secs(6);

/// A local service stopped for an outage. Dropping it, also while a test panics, starts the
/// service again, so one failing test cannot leave the broker or the database down for the
/// rest of the suite.
struct Outage {
    service: &'static str,
    down: bool,
}

impl Outage {
    /// Stops `service` (`kafka` or `postgres`); returns once it is down.
    fn begin(service: &'static str) -> Outage {
        let mut outage = Outage {
            service,
            down: true,
        };
        if !tokio::task::block_in_place(|| service_ctl(service, "stop")) {
            outage.end();
            panic!("could not stop {service}");
        }
        outage
    }

    /// Starts the service again; the scripts return once it answers clients.
    fn end(&mut self) {
        if self.down {
            assert!(
                tokio::task::block_in_place(|| service_ctl(self.service, "start")),
                "could not start {} again",
                self.service
            );
            self.down = false;
        }
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if self.down && !service_ctl(self.service, "start") {
            eprintln!(
                "!!! could not restart {}: run deploy/local/{}.sh start",
                self.service, self.service
            );
        }
    }
}

/// Runs `deploy/local/<service>.sh <action>` synchronously.
fn service_ctl(service: &str, action: &str) -> bool {
    let script = support::repo_root()
        .join("deploy/local")
        .join(format!("{service}.sh"));
    let started = Instant::now();
    let ok = std::process::Command::new(&script)
        .arg(action)
        .status()
        .is_ok_and(|s| s.success());
    eprintln!(
        "{service}.sh {action}: {} in {:.1?}",
        if ok { "ok" } else { "FAILED" },
        started.elapsed()
    );
    ok
}

/// Polls `check` every 200 ms until it holds or `timeout` passes; returns whether it held.
async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The partitions `name` owns, with their epochs.
async fn owned_by(db: &TestDb, topics: &TestTopics, name: &str) -> BTreeMap<i32, i64> {
    partition_owners(db, &topics.commands)
        .await
        .into_iter()
        .filter(|(_, (owner, _))| owner == name)
        .map(|(p, (_, epoch))| (p, epoch))
        .collect()
}

/// Waits until every worker in `names` owns at least one partition.
async fn wait_all_own(db: &TestDb, topics: &TestTopics, names: &[&str]) -> bool {
    wait_until(Duration::from_secs(60), || async {
        let owners = partition_owners(db, &topics.commands).await;
        owners.len() == topics.partitions as usize
            && names.iter().all(|n| owners.values().any(|(o, _)| o == n))
    })
    .await
}

/// Whether every partition in `before` has an epoch above the one recorded there.
async fn epochs_moved_past(db: &TestDb, topics: &TestTopics, before: &BTreeMap<i32, i64>) -> bool {
    let now = partition_owners(db, &topics.commands).await;
    before
        .iter()
        .all(|(p, e)| now.get(p).is_some_and(|(_, cur)| cur > e))
}

/// Backends of this test's database that wait for a lock, with what they run.
async fn lock_waiters(db: &TestDb) -> Vec<String> {
    sqlx::query(
        "SELECT pid, left(regexp_replace(query, '\\s+', ' ', 'g'), 70) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_all(&db.pool)
    .await
    .map(|rows| {
        rows.iter()
            .map(|r| format!("pid {}: {}", r.get::<i32, _>(0), r.get::<String, _>(1)))
            .collect()
    })
    .unwrap_or_default()
}

/// Log lines of `text` that contain any of `needles`, for the test's own output.
fn lines_with<'a>(text: &'a str, needles: &[&str]) -> Vec<&'a str> {
    text.lines()
        .filter(|l| needles.iter().any(|n| l.contains(n)))
        .collect()
}

/// `commands` (each produced to where `deliveries` says, index for index) in the order
/// the commands topic holds them: by partition, then offset. Every aggregate lives on one
/// partition, so this is the order a single serial writer would apply them in.
fn in_topic_order(
    commands: &[Command],
    deliveries: &[processor::producer::Delivery],
) -> Vec<Command> {
    assert_eq!(commands.len(), deliveries.len());
    let mut placed: Vec<(i32, i64, &Command)> = deliveries
        .iter()
        .zip(commands)
        .map(|(d, c)| (d.partition, d.offset, c))
        .collect();
    placed.sort_by_key(|(p, o, _)| (*p, *o));
    placed.into_iter().map(|(_, _, c)| c.clone()).collect()
}

fn command(source: &str, id: String, ty: &str, subject: &str, data: Value) -> Command {
    Command::new(
        Source::parse(source).unwrap(),
        CommandId::parse(id).unwrap(),
        CommandType::parse(ty).unwrap(),
        AggregateId::parse(subject).unwrap(),
        data,
    )
}
