//! Failure injection for tests, driven by the `CMDPROC_FAILPOINT` environment variable.
//!
//! The failure suites need to stop a process at an exact point (between publishing a batch
//! to Kafka and recording it in Postgres) or make a handler panic, which no real input can
//! do with the shipped domains. Without the variable every failpoint is a no-op.
//!
//! Values, comma-separated:
//! - `relay-crash-after-publish`: abort the process right after a relay batch is committed
//!   in Kafka and before its position is recorded in Postgres.
//! - `handler-panic:<aggregate id>`: every command for that aggregate panics in its handler.
//! - `relay-fail-partition:<partition>`: every relay step of that commands partition fails.
//! - `slow-batch-over:<n>`: a batch transaction carrying more than `n` commands runs a
//!   statement longer than any statement timeout (`pg_sleep(60)`), as a batch too heavy
//!   for its transaction would.
//! - `rewind-hold-lock`: `cmdproc replay` sleeps for a minute while it holds a partition's
//!   row lock, as an operator process suspended at that moment would.
//! - `seek-fails-once`: the first seek of a partition back to its stored position (a worker
//!   taking a partition again) reports failure without seeking.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

fn points() -> &'static Vec<String> {
    static POINTS: OnceLock<Vec<String>> = OnceLock::new();
    POINTS.get_or_init(|| {
        std::env::var("CMDPROC_FAILPOINT")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Whether the named failpoint is set.
pub fn is_set(name: &str) -> bool {
    points().iter().any(|p| p == name)
}

/// Panics when `handler-panic:<aggregate_id>` is set for this aggregate.
pub fn handler_panic(aggregate_id: &str) {
    if points()
        .iter()
        .any(|p| p.strip_prefix("handler-panic:") == Some(aggregate_id))
    {
        panic!("failpoint handler-panic:{aggregate_id}");
    }
}

/// Aborts the process when the named failpoint is set, as a SIGKILL would end it.
pub fn crash_if(name: &str) {
    if is_set(name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}

/// Fails when `relay-fail-partition:<partition>` is set for this partition.
pub fn fail_relay_partition(partition: i32) -> Result<(), String> {
    if points()
        .iter()
        .any(|p| p.strip_prefix("relay-fail-partition:") == Some(partition.to_string().as_str()))
    {
        return Err(format!("failpoint relay-fail-partition:{partition}"));
    }
    Ok(())
}

/// Whether a batch transaction of `commands` commands must be slow
/// (`slow-batch-over:<n>` with `commands > n`).
pub fn slow_batch(commands: usize) -> bool {
    points().iter().any(|p| {
        p.strip_prefix("slow-batch-over:")
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| commands > n)
    })
}

/// Sleeps for a minute when the named failpoint is set.
pub async fn sleep_if(name: &str) {
    if is_set(name) {
        eprintln!("failpoint {name}: sleeping");
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    }
}

/// Whether the named failpoint is set and has not fired yet; it fires once per process.
/// Only `seek-fails-once` uses it, so one flag is enough.
pub fn once(name: &str) -> bool {
    static FIRED: AtomicBool = AtomicBool::new(false);
    is_set(name) && !FIRED.swap(true, Ordering::SeqCst)
}
