//! The engine's storage: the SQL statements of the workers, the relay and the operator
//! commands (`replay`, `dlq`, `inspect`, ...), one file per family of tables, each
//! statement in one place. The operator commands open and commit their own transactions
//! where several statements must hold together, and pass them in.
//!
//! - `partitions`: the partition rows (epochs, stored positions, outbox sequences), topic
//!   layouts and the operator's log decisions.
//! - `outcomes`: recorded outcomes (`processed_commands`), duplicate deliveries, and their
//!   pruning with its horizons.
//! - `aggregates`, `events`, `dead_letters`: the batch's effects (and what an operator did
//!   with a dead letter).
//! - `parking`: parked aggregates and the commands set aside for them.
//! - `outbox`: the outbox, the relay's positions, the identities it found published, and
//!   the deployment id.
//! - `timers`: durable timers, set and cancelled by batches, fired by the partition's owner.
//!
//! The store plans nothing: [`crate::pipeline`] loads through it, plans a batch with
//! [`batch::plan`](crate::batch::plan) and writes the plan through it, in one transaction.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};

mod aggregates;
mod dead_letters;
mod events;
mod lookup;
mod outbox;
mod outcomes;
mod parking;
mod partitions;
mod timers;

pub use aggregates::{aggregates_of_topic, statuses};
pub(crate) use aggregates::{load_aggregates, stored_aggregate, write_aggregates};
pub(crate) use dead_letters::{
    list_dead_letters, lock_dead_letter, mark_dead_letter_skipped, mark_redriven,
    write_dead_letters,
};
pub(crate) use events::{load_outcomes_from_events, recent_events, write_events};
pub use lookup::recorded_command;
pub use outbox::{
    dead_letter_message_id, forget_found_published, found_published, lock_relay_position,
    mark_published, next_outbox_rows, outbox_backlog, outbox_topics, record_found_published,
    relay_deployment, relay_published_at, reply_message_id, Backlog, OutboxMessage,
    REPLY_MESSAGE_PREFIX,
};
pub use outbox::{notify_outbox, OUTBOX_CHANNEL};
pub(crate) use outbox::{write_outbox, OutboxRow};
pub(crate) use outcomes::{
    load_outcomes, recent_commands, record_skipped, recorded_outcome, recorded_since,
    refused_deliveries, with_outcome, write_duplicates, write_processed, SkippedCommand,
};
pub use outcomes::{outcomes_recorded_elsewhere, prune, prune_horizon, Pruned};
pub(crate) use parking::{
    list_parked, load_parked, mark_parked_redriven, mark_parked_skipped, parked_partition, unpark,
    waiting_commands, write_parked,
};
pub use parking::{parked_since, ParkedSince};
pub use partitions::{
    accept_log, accept_partitions, acquire_partition, epochs, record_layout, recorded_layout,
    rewind_partition, stored_next_offsets, stored_position, Acquired, PartitionState,
};
pub(crate) use partitions::{
    lock_partition, lock_partitions, store_outbox_seq, store_positions, Position,
};
pub(crate) use timers::{aggregate_timers, write_timers};
pub use timers::{fire_due_timers, pending_timers, Fired, PendingTimers, TimerChanges};

// Re-exported for callers not yet moved to the modules these items now live in
// (`crate::pipeline`, `crate::cache`); new code names those modules.
pub use crate::cache::AggregateCache;
pub(crate) use crate::pipeline::plan_and_write;
pub use crate::pipeline::{process_batches, BatchResult, BatchTarget, PartitionBatch};

/// Errors of the store layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another worker took the partition: this worker's epoch is stale.
    #[error(
        "partition {partition} is fenced: epoch {mine} is stale, the current epoch is {current}"
    )]
    Fenced {
        /// The partition.
        partition: i32,
        /// The epoch this worker holds.
        mine: i64,
        /// The epoch in the database.
        current: i64,
    },
    /// The partition's stored position is not the one this worker last stored.
    #[error("partition {partition} moved: this worker stored offset {expected}, the database holds {stored}")]
    Moved {
        /// The partition.
        partition: i32,
        /// What the worker last stored.
        expected: i64,
        /// What the database holds.
        stored: i64,
    },
    /// A versioned write found another version: another writer existed.
    #[error("version conflict: {0}")]
    Conflict(String),
    /// An event id the batch derived is stored already: a command re-delivered after its
    /// recorded outcome was pruned, whose effects are still in the database. Not a conflict
    /// between writers: [`crate::pipeline::process_batches`] retries the batch at once
    /// looking the commands' events up, and only returns this when that did not resolve it.
    #[error("events of a command in the batch are stored already: {0}")]
    EventExists(String),
    /// A statement ran past `statement_timeout` (SQLSTATE 57014): the batch may be too
    /// heavy for one transaction, so the worker splits it rather than retrying it as is.
    #[error("statement timed out: {0}")]
    Timeout(String),
    /// The database cannot be reached or dropped the connection.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Any other database error.
    #[error("database error: {0}")]
    Database(String),
}

/// The store's result type.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) => {
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                if code == "23505" && db.constraint() == Some("events_pkey") {
                    StoreError::EventExists(db.message().to_owned())
                } else if code == "57014" {
                    // query_canceled: the statement timeout (or an operator's
                    // pg_cancel_backend). Other class 57 codes are the server going away.
                    StoreError::Timeout(db.message().to_owned())
                } else if code == "23505" || code == "40001" || code == "40P01" {
                    StoreError::Conflict(db.message().to_owned())
                } else if code.starts_with("08") || code.starts_with("57") || code == "53300" {
                    StoreError::Unavailable(db.message().to_owned())
                } else {
                    StoreError::Database(format!("{} ({code})", db.message()))
                }
            }
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
            _ => StoreError::Database(e.to_string()),
        }
    }
}

/// Opens a pool, failing within `timeout` with a message naming the server when it cannot
/// be reached.
pub async fn connect(url: &str, max_connections: u32, timeout: Duration) -> Result<PgPool> {
    connect_limited(url, max_connections, timeout, None).await
}

/// Like [`connect`], for a worker whose consumer-group session lasts `session_timeout`:
///
/// - `idle_in_transaction_session_timeout` = the session timeout. A worker frozen in the
///   middle of a batch (SIGSTOP, a stuck VM) would otherwise hold its partition's row lock,
///   and so block the epoch bump of the worker taking over, until it woke up.
/// - `statement_timeout` = half of it. A batch stuck behind a slow write aborts (and is
///   split and retried) well before the group gives its partition away, instead of
///   overrunning.
pub async fn connect_with(
    url: &str,
    max_connections: u32,
    timeout: Duration,
    session_timeout: Option<Duration>,
) -> Result<PgPool> {
    let limits = session_timeout.map(|session| SessionLimits {
        idle_in_transaction: session,
        statement: session / 2,
        lock: None,
    });
    connect_limited(url, max_connections, timeout, limits).await
}

/// How long an operator command's session may sit idle inside a transaction, and wait for
/// a lock, before Postgres ends it (see [`connect_operator`]).
pub const OPERATOR_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one statement of an operator command may run.
pub const OPERATOR_STATEMENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Like [`connect`], for the operator commands that lock partition rows (`cmdproc replay`'s
/// rewind, `cmdproc dlq`'s release): a partition row locked by an operator process is a
/// partition its owner cannot commit to. So the session is ended by Postgres when it sits
/// idle inside a transaction for [`OPERATOR_IDLE_TIMEOUT`] (an operator process suspended
/// with SIGSTOP or a laptop's lid closed), a lock wait gives up after as long (a waiting
/// lock request would queue the owner's next batch behind it), and a statement after
/// [`OPERATOR_STATEMENT_TIMEOUT`]. The operator's transaction then rolls back whole.
pub async fn connect_operator(
    url: &str,
    max_connections: u32,
    timeout: Duration,
) -> Result<PgPool> {
    let limits = SessionLimits {
        idle_in_transaction: OPERATOR_IDLE_TIMEOUT,
        statement: OPERATOR_STATEMENT_TIMEOUT,
        lock: Some(OPERATOR_IDLE_TIMEOUT),
    };
    connect_limited(url, max_connections, timeout, Some(limits)).await
}

/// Server-side limits of every session of a pool.
#[derive(Debug, Clone, Copy)]
struct SessionLimits {
    idle_in_transaction: Duration,
    statement: Duration,
    lock: Option<Duration>,
}

async fn connect_limited(
    url: &str,
    max_connections: u32,
    timeout: Duration,
    limits: Option<SessionLimits>,
) -> Result<PgPool> {
    let mut options: PgConnectOptions = url
        .parse()
        .map_err(|e| StoreError::Database(format!("invalid database URL: {e}")))?;
    // Every statement of the engine looks rows up by key, joined against a handful of keys
    // passed as arrays (`UNNEST`). Statements are prepared once per connection; a plan made
    // while a table was empty or without statistics (a new deployment) scans the whole
    // table and stays cached while the table grows. Index lookups in nested loops are always
    // right here, so the planner is told so.
    options = options.options([
        ("enable_seqscan", "off"),
        ("enable_hashjoin", "off"),
        ("enable_mergejoin", "off"),
    ]);
    let ms = |d: Duration| format!("{}ms", d.as_millis().max(1));
    if let Some(limits) = limits {
        options = options.options([
            (
                "idle_in_transaction_session_timeout",
                ms(limits.idle_in_transaction),
            ),
            ("statement_timeout", ms(limits.statement)),
        ]);
        if let Some(lock) = limits.lock {
            options = options.options([("lock_timeout", ms(lock))]);
        }
    }
    let target = format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("")
    );
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(timeout)
        .connect_with(options)
        .await
        .map_err(|e| {
            StoreError::Unavailable(format!("cannot connect to Postgres at {target}: {e}"))
        })
}

/// Applies the embedded migrations; idempotent.
pub async fn migrate(pool: &PgPool) -> Result<usize> {
    let migrator = sqlx::migrate!("../migrations");
    migrator
        .run(pool)
        .await
        .map_err(|e| StoreError::Database(format!("migration failed: {e}")))?;
    Ok(migrator.iter().count())
}

/// The `slow-batch` failpoint: holds `tx` in a statement that outlasts any statement
/// timeout, as a batch stuck behind a slow write would.
pub(crate) async fn stall(tx: &mut Transaction<'_, Postgres>) -> Result<()> {
    sqlx::query("SELECT pg_sleep(60)")
        .execute(&mut **tx)
        .await?;
    Ok(())
}
