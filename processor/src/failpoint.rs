//! Failure injection for tests, driven by the `CMDPROC_FAILPOINT` environment variable, and
//! compiled in only with the cargo feature `failpoints` (the test command enables it).
//!
//! The failure suites need to stop a process at an exact point (between publishing a batch
//! to Kafka and recording it in Postgres) or make a handler panic, which no real input can
//! do with the shipped domains. Without the variable every failpoint is a no-op; without the
//! feature every failpoint is an empty function the compiler removes, so production builds
//! carry no injection checks, and a process started with the variable refuses to run
//! ([`refuse_without_feature`]) rather than silently ignoring it.
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
#[cfg(feature = "failpoints")]
use std::sync::OnceLock;

/// The failpoints set in `CMDPROC_FAILPOINT`.
#[cfg(feature = "failpoints")]
#[inline]
fn points() -> &'static [String] {
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

/// No failpoints in a build without the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
fn points() -> &'static [String] {
    &[]
}

/// An error when `CMDPROC_FAILPOINT` is set in a build without failpoints, so a failure
/// test run against the wrong build says why instead of passing or failing for nothing.
pub fn refuse_without_feature() -> Result<(), String> {
    let set = std::env::var_os("CMDPROC_FAILPOINT").is_some_and(|v| !v.is_empty());
    if set && !cfg!(feature = "failpoints") {
        return Err(
            "CMDPROC_FAILPOINT is set, but this build has no failpoints; build with \
                    `--features processor/failpoints`"
                .to_owned(),
        );
    }
    Ok(())
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
