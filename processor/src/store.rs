//! Every SQL statement of the engine, in one place.
//!
//! A batch is one transaction: lock the partition row and check the epoch (fencing), load
//! the recorded outcomes and aggregates the batch names, [`plan`](crate::batch::plan) it,
//! then write processed commands, aggregates (version-checked), events, dead letters,
//! outbox rows and the next offset with set-based statements.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use commands::envelope::CLOUDEVENTS_JSON;
use commands::Registry;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::batch::{
    self, headers_to_json, AggregateKey, CommandKey, Header, Incoming, Loaded, Outcome,
    OutcomeKind, Plan, PlanOptions,
};

// Re-exported for callers not yet moved to `crate::cache`, where it now lives.
pub use crate::cache::AggregateCache;

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
    /// between writers: [`process_batches`] retries the batch at once looking the commands'
    /// events up, and only returns this when that did not resolve it.
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

/// A partition as acquired by a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acquired {
    /// The new epoch, the worker's fencing token.
    pub epoch: i64,
    /// The stored next offset to consume.
    pub next_offset: i64,
    /// The Kafka timestamp of the message at `next_offset - 1` (the last one applied), when
    /// known: the fingerprint of the log the stored position belongs to.
    pub last_timestamp: Option<i64>,
}

/// Takes a partition: moves its epoch past every earlier one (fencing every earlier owner)
/// and reads its stored next offset. The new epoch is at least the current time in
/// microseconds, so even after the database is restored from a backup (which rolls epochs
/// back) no epoch a stale worker still remembers is handed out again.
pub async fn acquire_partition(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    owner: &str,
) -> Result<Acquired> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        "INSERT INTO partitions (topic, partition, epoch, owner, acquired_at, acquisitions)
         VALUES ($1, $2, GREATEST(1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint), $3, now(), 1)
         ON CONFLICT (topic, partition) DO UPDATE
           SET epoch = GREATEST(partitions.epoch + 1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint),
               owner = EXCLUDED.owner, acquired_at = now(), updated_at = now(),
               acquisitions = partitions.acquisitions + 1
         RETURNING epoch, next_offset, last_timestamp",
    )
    .bind(topic)
    .bind(partition)
    .bind(owner)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO relay_positions (topic, partition) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(topic)
    .bind(partition)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Acquired {
        epoch: row.get(0),
        next_offset: row.get(1),
        last_timestamp: row.get(2),
    })
}

/// A partition's fencing state as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionState {
    /// Current epoch.
    pub epoch: i64,
    /// Worker named as owner.
    pub owner: Option<String>,
    /// Stored next offset.
    pub next_offset: i64,
}

/// The stored state of each of `partitions` of `topic`.
pub async fn epochs(
    pool: &PgPool,
    topic: &str,
    partitions: &[i32],
) -> Result<HashMap<i32, PartitionState>> {
    let rows = sqlx::query(
        "SELECT partition, epoch, owner, next_offset FROM partitions WHERE topic = $1 AND partition = ANY($2)",
    )
    .bind(topic)
    .bind(partitions)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                r.get(0),
                PartitionState {
                    epoch: r.get(1),
                    owner: r.get(2),
                    next_offset: r.get(3),
                },
            )
        })
        .collect())
}

/// Moves a partition's stored position back to `offset` (never forward) and increments its
/// epoch, so the live owner is fenced and consumes again from there. A position that moves
/// loses its log fingerprint (the timestamp of the message before it), which belonged to the
/// old position. Returns the position before the rewind, or `None` when no worker ever took
/// the partition.
pub async fn rewind_partition(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<Option<i64>> {
    let mut tx = pool.begin().await?;
    let before: Option<i64> = sqlx::query_scalar(
        "SELECT next_offset FROM partitions WHERE topic = $1 AND partition = $2 FOR UPDATE",
    )
    .bind(topic)
    .bind(partition)
    .fetch_optional(&mut *tx)
    .await?;
    crate::failpoint::sleep_if("rewind-hold-lock").await;
    if before.is_some() {
        sqlx::query(
            "UPDATE partitions SET next_offset = LEAST(next_offset, $3),
               last_timestamp = CASE WHEN $3 < next_offset THEN NULL ELSE last_timestamp END,
               epoch = GREATEST(epoch + 1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint),
               updated_at = now()
             WHERE topic = $1 AND partition = $2",
        )
        .bind(topic)
        .bind(partition)
        .bind(offset)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(before)
}

/// What one pruning pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Recorded outcomes of processed commands.
    pub outcomes: u64,
    /// Recorded duplicate deliveries.
    pub duplicates: u64,
    /// Published outbox rows.
    pub outbox: u64,
}

impl Pruned {
    /// Rows deleted in all.
    pub fn total(&self) -> u64 {
        self.outcomes + self.duplicates + self.outbox
    }
}

/// Deletes, in slices small enough for the worker's statement timeout, the outcomes and
/// duplicate deliveries of commands of `topic` recorded before `window` ago, and the outbox
/// rows of `topic` published before then. Event rows, aggregates, dead letters and skips
/// (outcome `skipped`: an operator's decision, honoured however late the command comes
/// back) are kept. Other commands topics sharing the database keep theirs: each is pruned by its own
/// workers, with their own window.
///
/// The horizon is recorded first (in `prune_horizons`, never moved back), so `cmdproc
/// replay` knows from where on outcomes may be missing even while the deletes run.
pub async fn prune(pool: &PgPool, topic: &str, window: Duration) -> Result<Pruned> {
    let horizon = chrono::Utc::now()
        - chrono::Duration::from_std(window).map_err(|e| StoreError::Database(e.to_string()))?;
    sqlx::query(
        "INSERT INTO prune_horizons (topic, pruned_before) VALUES ($1, $2)
         ON CONFLICT (topic) DO UPDATE
           SET pruned_before = GREATEST(prune_horizons.pruned_before, EXCLUDED.pruned_before),
               updated_at = now()",
    )
    .bind(topic)
    .bind(horizon)
    .execute(pool)
    .await?;
    let statements = [
        "DELETE FROM processed_commands WHERE ctid = ANY(ARRAY(
           SELECT ctid FROM processed_commands
           WHERE topic = $2 AND processed_at < $1 AND outcome <> 'skipped' LIMIT 5000))",
        "DELETE FROM duplicate_deliveries WHERE ctid = ANY(ARRAY(
           SELECT ctid FROM duplicate_deliveries WHERE topic = $2 AND seen_at < $1 LIMIT 5000))",
        "DELETE FROM outbox WHERE ctid = ANY(ARRAY(
           SELECT o.ctid FROM outbox o JOIN relay_positions r
             ON r.topic = o.commands_topic AND r.partition = o.partition
           WHERE o.commands_topic = $2 AND o.seq <= r.published_seq AND o.created_at < $1 LIMIT 5000))",
        // Identities the relay found on a topic, whose rows were never re-derived.
        "DELETE FROM relay_published WHERE ctid = ANY(ARRAY(
           SELECT ctid FROM relay_published WHERE commands_topic = $2 AND found_at < $1 LIMIT 5000))",
    ];
    let mut counts = [0u64; 4];
    for (i, sql) in statements.iter().enumerate() {
        loop {
            let n = sqlx::query(sql)
                .bind(horizon)
                .bind(topic)
                .execute(pool)
                .await?
                .rows_affected();
            counts[i] += n;
            if n < 5000 {
                break;
            }
        }
    }
    Ok(Pruned {
        outcomes: counts[0],
        duplicates: counts[1],
        outbox: counts[2] + counts[3],
    })
}

/// The time before which outcomes of `topic` may have been pruned (the latest horizon any
/// of its workers pruned with), or `None` if none ever pruned.
pub async fn prune_horizon(
    pool: &PgPool,
    topic: &str,
) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
    Ok(
        sqlx::query_scalar("SELECT pruned_before FROM prune_horizons WHERE topic = $1")
            .bind(topic)
            .fetch_optional(pool)
            .await?,
    )
}

/// What a committed batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchResult {
    /// Messages in the batch, after dropping those below the stored offset.
    pub messages: usize,
    /// Commands applied.
    pub applied: usize,
    /// Commands rejected.
    pub rejected: usize,
    /// Duplicate deliveries.
    pub duplicates: usize,
    /// Dead letters.
    pub dead_letters: usize,
    /// Events stored.
    pub events: usize,
    /// Commands set aside because their aggregate is parked (the poison one included).
    pub parked: usize,
    /// Aggregates this batch parked.
    pub newly_parked: Vec<AggregateKey>,
    /// With the halt policy, the offset of the poison command the partition stopped at.
    pub halted_at: Option<i64>,
    /// The stored next offset after the batch.
    pub next_offset: i64,
}

/// Where a batch goes.
#[derive(Debug, Clone)]
pub struct BatchTarget<'a> {
    /// Commands topic.
    pub topic: &'a str,
    /// Its dead-letter topic.
    pub dead_letter_topic: &'a str,
    /// Events topic.
    pub events_topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// The worker's epoch for it.
    pub epoch: i64,
    /// The position the worker last stored for it, when it knows one. A different stored
    /// position means the row was changed behind its back (a database restore, or a commit
    /// whose acknowledgement was lost), and the batch is refused as [`StoreError::Moved`].
    pub expected_next: Option<i64>,
}

/// One partition's share of a batch.
#[derive(Debug, Clone)]
pub struct PartitionBatch<'a> {
    /// Where it goes.
    pub target: BatchTarget<'a>,
    /// Its messages, in strictly increasing offset order.
    pub messages: &'a [Incoming],
}

/// Applies a batch spanning several partitions of one commands topic in one transaction:
/// every partition row is locked and its epoch and position checked, the outcomes and
/// aggregates of all messages are read with one statement each, each partition is planned
/// in offset order, and everything is written with one set-based statement per table.
/// Messages below a partition's stored next offset were applied before and are dropped.
///
/// A partition whose epoch is stale ([`StoreError::Fenced`]) or whose position moved
/// ([`StoreError::Moved`]) gets that error in its slot of the result and the others go
/// on. An error of the whole transaction (database, conflict) is the outer error; then
/// nothing was written, and the cache has forgotten the batch's partitions.
///
/// Partitions normally hold disjoint aggregates (keys map to one partition). When they do
/// not (misrouted commands accepted), they are applied one transaction each, in order.
pub async fn process_batches(
    pool: &PgPool,
    batches: &[PartitionBatch<'_>],
    registry: &Registry,
    options: &PlanOptions,
    mut cache: Option<&mut AggregateCache>,
) -> Result<Vec<(i32, Result<BatchResult>)>> {
    if batches.len() > 1 && share_aggregates(batches) {
        let mut out = Vec::with_capacity(batches.len());
        for b in batches {
            let one = std::slice::from_ref(b);
            out.extend(process_deduped(pool, one, registry, options, cache.as_deref_mut()).await?);
        }
        return Ok(out);
    }
    process_deduped(pool, batches, registry, options, cache).await
}

/// Runs [`process_group`]; when that fails because an event id it derived is stored
/// already, runs it once more at once, this time also looking up the stored events of the
/// commands without a recorded outcome.
///
/// That happens when a command is delivered again after its recorded outcome was pruned
/// (a client retry older than the dedupe window, `replay --force`, a dead letter redriven
/// again much later): the plan applies it again and its deterministic first event id hits
/// the primary key of `events`. Its events say what it did, so the second pass rebuilds
/// its outcome from them and the delivery is a duplicate, without a second effect. The
/// lookup is only made after such a failure, so ordinary batches pay nothing for it.
async fn process_deduped(
    pool: &PgPool,
    batches: &[PartitionBatch<'_>],
    registry: &Registry,
    options: &PlanOptions,
    mut cache: Option<&mut AggregateCache>,
) -> Result<Vec<(i32, Result<BatchResult>)>> {
    match process_group(
        pool,
        batches,
        registry,
        options,
        cache.as_deref_mut(),
        false,
    )
    .await
    {
        Err(StoreError::EventExists(reason)) => {
            tracing::warn!(
                %reason,
                partitions = ?batches.iter().map(|b| b.target.partition).collect::<Vec<_>>(),
                "a command's events are stored but its outcome is not (delivered again after \
                 its outcome was pruned); applying the batch again with its commands' events \
                 looked up"
            );
            process_group(pool, batches, registry, options, cache, true).await
        }
        other => other,
    }
}

fn share_aggregates(batches: &[PartitionBatch<'_>]) -> bool {
    let mut owner: HashMap<(&str, &str), i32> = HashMap::new();
    for b in batches {
        for c in b.messages.iter().filter_map(|m| m.decoded.as_ref().ok()) {
            let key = (c.command_type.aggregate_type(), c.subject.as_str());
            if *owner.entry(key).or_insert(b.target.partition) != b.target.partition {
                return true;
            }
        }
    }
    false
}

/// A partition of a batch that passed the fencing checks.
struct Work<'b, 'a> {
    batch: &'b PartitionBatch<'a>,
    fresh: &'a [Incoming],
    outbox_seq: i64,
}

/// One transaction over `batches`. With `look_up_events`, commands without a recorded
/// outcome whose events are stored count as duplicates (see [`process_deduped`]).
async fn process_group(
    pool: &PgPool,
    batches: &[PartitionBatch<'_>],
    registry: &Registry,
    options: &PlanOptions,
    cache: Option<&mut AggregateCache>,
    look_up_events: bool,
) -> Result<Vec<(i32, Result<BatchResult>)>> {
    let Some(first) = batches.first() else {
        return Ok(Vec::new());
    };
    let topic = first.target.topic;
    debug_assert!(batches.iter().all(|b| b.target.topic == topic));
    let mut tx = pool.begin().await?;
    let partitions: Vec<i32> = batches.iter().map(|b| b.target.partition).collect();
    // Locked in partition order, so two transactions over overlapping sets cannot deadlock.
    let stored: HashMap<i32, (i64, i64, i64)> = sqlx::query(
        "SELECT partition, epoch, next_offset, outbox_seq FROM partitions
         WHERE topic = $1 AND partition = ANY($2) ORDER BY partition FOR UPDATE",
    )
    .bind(topic)
    .bind(&partitions)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
    .collect();

    let mut out: Vec<(i32, Result<BatchResult>)> = Vec::with_capacity(batches.len());
    let mut work: Vec<Work<'_, '_>> = Vec::with_capacity(batches.len());
    for b in batches {
        let t = &b.target;
        let Some(&(epoch, stored_next, outbox_seq)) = stored.get(&t.partition) else {
            out.push((
                t.partition,
                Err(StoreError::Fenced {
                    partition: t.partition,
                    mine: t.epoch,
                    current: 0,
                }),
            ));
            continue;
        };
        if epoch != t.epoch {
            out.push((
                t.partition,
                Err(StoreError::Fenced {
                    partition: t.partition,
                    mine: t.epoch,
                    current: epoch,
                }),
            ));
            continue;
        }
        if let Some(expected) = t.expected_next.filter(|e| *e != stored_next) {
            out.push((
                t.partition,
                Err(StoreError::Moved {
                    partition: t.partition,
                    expected,
                    stored: stored_next,
                }),
            ));
            continue;
        }
        // Messages come in offset order, so those below the stored offset (applied before)
        // are a prefix; the rest is planned in place, without copying.
        debug_assert!(b.messages.windows(2).all(|w| w[0].offset < w[1].offset));
        let fresh = &b.messages[b.messages.partition_point(|m| m.offset < stored_next)..];
        if fresh.is_empty() {
            out.push((
                t.partition,
                Ok(BatchResult {
                    next_offset: stored_next,
                    ..Default::default()
                }),
            ));
        } else {
            work.push(Work {
                batch: b,
                fresh,
                outbox_seq,
            });
        }
    }
    if work.is_empty() {
        tx.rollback().await?;
        return Ok(out);
    }

    // Nothing of the batch is kept if any of this fails (the transaction rolls back when
    // dropped): the offsets stay, the caller retries, and the cache forgets the partitions,
    // whose entries may hold states this transaction computed.
    let written = async {
        let commands: usize = work.iter().map(|w| w.fresh.len()).sum();
        if crate::failpoint::slow_batch(commands) {
            sqlx::query("SELECT pg_sleep(60)").execute(&mut *tx).await?;
        }
        let plans = write_group(
            &mut tx,
            &work,
            registry,
            options,
            cache.as_deref(),
            look_up_events,
        )
        .await?;
        // With the position goes the log's fingerprint: the Kafka timestamp of the message
        // just before it. A position that did not move keeps the one it has.
        let updated = sqlx::query(
            "UPDATE partitions p SET next_offset = u.next_offset, outbox_seq = u.outbox_seq, updated_at = now(),
                 last_timestamp = CASE WHEN u.next_offset = p.next_offset THEN p.last_timestamp ELSE u.last_timestamp END
             FROM UNNEST($2::int[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[])
                  AS u(partition, next_offset, outbox_seq, epoch, last_timestamp)
             WHERE p.topic = $1 AND p.partition = u.partition AND p.epoch = u.epoch",
        )
        .bind(topic)
        .bind(work.iter().map(|w| w.batch.target.partition).collect::<Vec<_>>())
        .bind(plans.iter().map(|(p, _)| p.next_offset).collect::<Vec<_>>())
        .bind(plans.iter().map(|(_, end)| *end).collect::<Vec<_>>())
        .bind(work.iter().map(|w| w.batch.target.epoch).collect::<Vec<_>>())
        .bind(
            work.iter()
                .zip(&plans)
                .map(|(w, (p, _))| timestamp_before(w.fresh, p.next_offset))
                .collect::<Vec<_>>(),
        )
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != work.len() as u64 {
            // The rows are locked by this transaction; only a bug gets here.
            return Err(StoreError::Conflict(format!(
                "{} of {} partition rows changed under their lock",
                work.len() as u64 - updated.rows_affected(),
                work.len()
            )));
        }
        tx.commit().await?;
        Ok(plans)
    }
    .await;
    let mut cache = cache;
    let plans = match written {
        Ok(plans) => plans,
        Err(e) => {
            if let Some(cache) = cache {
                for w in &work {
                    cache.forget(w.batch.target.partition);
                }
            }
            return Err(e);
        }
    };
    for (w, (plan, _)) in work.iter().zip(&plans) {
        if let Some(cache) = cache.as_deref_mut() {
            cache.store(w.batch.target.partition, w.batch.target.epoch, &plan.writes);
        }
        out.push((
            w.batch.target.partition,
            Ok(BatchResult {
                messages: plan.processed.len() + plan.duplicates.len() + plan.dead_letters.len(),
                applied: plan.applied(),
                rejected: plan.rejected(),
                duplicates: plan.duplicates.len(),
                dead_letters: plan.dead_letters.len(),
                events: plan.events.len(),
                parked: plan.parked.len(),
                newly_parked: plan
                    .newly_parked
                    .iter()
                    .map(|(a, _, _)| a.clone())
                    .collect(),
                halted_at: plan.halted_at,
                next_offset: plan.next_offset,
            }),
        ));
    }
    Ok(out)
}

/// The Kafka timestamp of the message at `next_offset - 1` among `messages` (in offset
/// order), if it is there.
fn timestamp_before(messages: &[Incoming], next_offset: i64) -> Option<i64> {
    let i = messages.partition_point(|m| m.offset < next_offset - 1);
    messages
        .get(i)
        .filter(|m| m.offset == next_offset - 1)
        .and_then(|m| m.timestamp)
}

/// Loads what the partitions' fresh messages need (aggregates from `cache` where it has
/// them), plans each partition in turn, and writes all plans. A command planned in an
/// earlier partition of the group counts as known in the later ones. Returns each plan with
/// its partition's last outbox sequence. With `look_up_events`, the outcome of a command
/// that has none recorded but whose events are stored is rebuilt from those events.
async fn write_group(
    tx: &mut Transaction<'_, Postgres>,
    work: &[Work<'_, '_>],
    registry: &Registry,
    options: &PlanOptions,
    cache: Option<&AggregateCache>,
    look_up_events: bool,
) -> Result<Vec<(Plan, i64)>> {
    let mut known = load_outcomes(tx, work.iter().flat_map(|w| w.fresh.iter())).await?;
    if look_up_events {
        let without: Vec<&commands::Command> = work
            .iter()
            .flat_map(|w| w.fresh.iter())
            .filter_map(|m| m.decoded.as_ref().ok())
            .filter(|c| !known.contains_key(&(c.source.to_string(), c.id.to_string())))
            .collect();
        let found = load_outcomes_from_events(tx, &without).await?;
        if !found.is_empty() {
            tracing::warn!(
                commands = found.len(),
                "commands delivered again after their outcome was pruned: their events are \
                 stored, so they are duplicates"
            );
        }
        known.extend(found);
    }
    // A command with a recorded outcome is a duplicate whatever its aggregate's state, so
    // only the others need their aggregates and parking (a replay needs neither).
    // Looked up without allocating a key per command.
    let recorded: HashSet<(&str, &str)> = known
        .keys()
        .map(|(s, i)| (s.as_str(), i.as_str()))
        .collect();
    let unknown: Vec<(&BatchTarget<'_>, &Incoming)> = work
        .iter()
        .flat_map(|w| w.fresh.iter().map(|m| (&w.batch.target, m)))
        .filter(|(_, m)| {
            m.decoded
                .as_ref()
                .is_ok_and(|c| !recorded.contains(&(c.source.as_str(), c.id.as_str())))
        })
        .collect();
    drop(recorded);
    let mut aggregates: HashMap<AggregateKey, Loaded> = HashMap::new();
    let mut missing: Vec<(&str, &str)> = Vec::new();
    for (t, m) in &unknown {
        if let Ok(c) = &m.decoded {
            let key = (c.command_type.aggregate_type(), c.subject.as_str());
            let owned = (key.0.to_owned(), key.1.to_owned());
            if aggregates.contains_key(&owned) {
                continue;
            }
            match cache.and_then(|cache| cache.get(t.partition, t.epoch, &owned)) {
                Some(loaded) => {
                    aggregates.insert(owned, loaded.clone());
                }
                None => missing.push(key),
            }
        }
    }
    aggregates.extend(load_aggregates(tx, missing).await?);
    let parked = load_parked(tx, unknown.iter().map(|(_, m)| *m)).await?;
    let mut plans = Vec::with_capacity(work.len());
    for w in work {
        let plan = batch::plan(registry, options, w.fresh, &known, &aggregates, &parked);
        for r in &plan.processed {
            known.insert((r.source.clone(), r.command_id.clone()), r.outcome.clone());
        }
        plans.push(plan);
    }
    let targets: Vec<(&BatchTarget<'_>, &Plan, i64)> = work
        .iter()
        .zip(&plans)
        .map(|(w, p)| (&w.batch.target, p, w.outbox_seq))
        .collect();
    let ends = write_plans(tx, &targets).await?;
    for (target, plan, _) in &targets {
        write_parked(tx, target, plan).await?;
    }
    Ok(plans.into_iter().zip(ends).collect())
}

/// Inside `tx`, which holds the partition's row lock: loads the outcomes, aggregates and
/// parked aggregates `messages` name, plans them, and writes the plan (outcomes,
/// aggregates, events, dead letters, parking, and outbox rows numbered after
/// `outbox_seq`). Returns the plan and the last outbox sequence; the caller stores that.
pub(crate) async fn plan_and_write(
    tx: &mut Transaction<'_, Postgres>,
    target: &BatchTarget<'_>,
    registry: &Registry,
    options: &PlanOptions,
    messages: &[Incoming],
    outbox_seq: i64,
) -> Result<(Plan, i64)> {
    let batch = PartitionBatch {
        target: target.clone(),
        messages,
    };
    let work = [Work {
        batch: &batch,
        fresh: messages,
        outbox_seq,
    }];
    // An operator's release is rare and small: it always looks events up, so a command
    // whose outcome was pruned is never applied twice through it.
    let mut written = write_group(tx, &work, registry, options, None, true).await?;
    Ok(written.pop().expect("one plan"))
}

/// An aggregate from a row of `aggregate_type, aggregate_id, version, state`.
fn loaded_row(r: &sqlx::postgres::PgRow) -> (AggregateKey, Loaded) {
    (
        (r.get(0), r.get(1)),
        Loaded {
            version: r.get(2),
            state: r.get(3),
        },
    )
}

/// A recorded outcome from a row of `source, command_id, outcome, reason, version, event_ids,
/// code`.
fn outcome_row(r: &sqlx::postgres::PgRow) -> (CommandKey, Outcome) {
    let recorded = Outcome {
        outcome: OutcomeKind::parse(r.get::<&str, _>(2)),
        code: r.get(6),
        reason: r.get(3),
        version: r.get(4),
        event_ids: r.get(5),
    };
    ((r.get(0), r.get(1)), recorded)
}

async fn load_outcomes<'m>(
    tx: &mut Transaction<'_, Postgres>,
    msgs: impl Iterator<Item = &'m Incoming>,
) -> Result<HashMap<CommandKey, Outcome>> {
    let (sources, ids): (Vec<&str>, Vec<&str>) = msgs
        .filter_map(|m| m.decoded.as_ref().ok())
        .map(|c| (c.source.as_str(), c.id.as_str()))
        .unzip();
    if sources.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query(
        "SELECT p.source, p.command_id, p.outcome, p.reason, p.version, p.event_ids, p.code
         FROM processed_commands p
         JOIN UNNEST($1::text[], $2::text[]) AS k(source, command_id)
           ON p.source = k.source AND p.command_id = k.command_id",
    )
    .bind(&sources)
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.iter().map(outcome_row).collect())
}

/// The outcomes of `without_outcome` rebuilt from their stored events: for each command whose
/// first event (its id is derived from the command's identity) is stored, `applied` at the
/// version of its last event, with the ids of its events. A command's events have
/// consecutive versions of one aggregate, so they are found by walking the unique
/// `(aggregate_type, aggregate_id, version)` index from the first one.
async fn load_outcomes_from_events(
    tx: &mut Transaction<'_, Postgres>,
    without_outcome: &[&commands::Command],
) -> Result<HashMap<CommandKey, Outcome>> {
    let mut keys: Vec<(Uuid, &str, &str)> = without_outcome
        .iter()
        .map(|c| {
            (
                commands::envelope::event_id(&c.source, &c.id, 0),
                c.source.as_str(),
                c.id.as_str(),
            )
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query(
        "WITH RECURSIVE wanted AS (
           SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[]) AS k(first_event_id, source, command_id)
         ), command_events AS (
           SELECT w.source, w.command_id, e.aggregate_type, e.aggregate_id, e.version, e.event_id
           FROM wanted w JOIN events e ON e.event_id = w.first_event_id
           WHERE e.source = w.source AND e.command_id = w.command_id
           UNION ALL
           SELECT c.source, c.command_id, e.aggregate_type, e.aggregate_id, e.version, e.event_id
           FROM command_events c
           JOIN events e ON e.aggregate_type = c.aggregate_type AND e.aggregate_id = c.aggregate_id
                        AND e.version = c.version + 1
           WHERE e.source = c.source AND e.command_id = c.command_id
         )
         SELECT source, command_id, version, event_id FROM command_events
         ORDER BY source, command_id, version",
    )
    .bind(keys.iter().map(|k| k.0).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.1).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.2).collect::<Vec<_>>())
    .fetch_all(&mut **tx)
    .await?;
    let mut out: HashMap<CommandKey, Outcome> = HashMap::new();
    for r in rows {
        let outcome = out.entry((r.get(0), r.get(1))).or_insert_with(|| Outcome {
            outcome: OutcomeKind::Applied,
            code: None,
            reason: None,
            version: 0,
            event_ids: Vec::new(),
        });
        outcome.version = r.get(2);
        outcome.event_ids.push(r.get(3));
    }
    Ok(out)
}

async fn load_aggregates(
    tx: &mut Transaction<'_, Postgres>,
    mut keys: Vec<(&str, &str)>,
) -> Result<HashMap<AggregateKey, Loaded>> {
    keys.sort_unstable();
    keys.dedup();
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let (types, ids): (Vec<&str>, Vec<&str>) = keys.into_iter().unzip();
    let rows = sqlx::query(
        "SELECT a.aggregate_type, a.aggregate_id, a.version, a.state
         FROM aggregates a
         JOIN UNNEST($1::text[], $2::text[]) AS k(t, i) ON a.aggregate_type = k.t AND a.aggregate_id = k.i",
    )
    .bind(&types)
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.iter().map(loaded_row).collect())
}

async fn load_parked<'m>(
    tx: &mut Transaction<'_, Postgres>,
    msgs: impl Iterator<Item = &'m Incoming>,
) -> Result<HashSet<AggregateKey>> {
    let mut keys: Vec<(&str, &str)> = msgs
        .filter_map(|m| m.decoded.as_ref().ok())
        .map(|c| (c.command_type.aggregate_type(), c.subject.as_str()))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let (types, ids): (Vec<&str>, Vec<&str>) = keys.into_iter().unzip();
    if types.is_empty() {
        return Ok(HashSet::new());
    }
    let rows = sqlx::query(
        "SELECT DISTINCT p.aggregate_type, p.aggregate_id FROM parked_aggregates p
         JOIN UNNEST($1::text[], $2::text[]) AS k(t, i) ON p.aggregate_type = k.t AND p.aggregate_id = k.i",
    )
    .bind(&types)
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
}

async fn write_parked(
    tx: &mut Transaction<'_, Postgres>,
    target: &BatchTarget<'_>,
    plan: &Plan,
) -> Result<()> {
    if !plan.newly_parked.is_empty() {
        let n = &plan.newly_parked;
        sqlx::query(
            "INSERT INTO parked_aggregates (aggregate_type, aggregate_id, reason, topic, partition, first_offset)
             SELECT t, i, r, $4, $5, o FROM UNNEST($1::text[], $2::text[], $3::text[], $6::bigint[]) AS u(t, i, r, o)
             ON CONFLICT DO NOTHING",
        )
        .bind(n.iter().map(|(a, _, _)| a.0.as_str()).collect::<Vec<_>>())
        .bind(n.iter().map(|(a, _, _)| a.1.as_str()).collect::<Vec<_>>())
        .bind(n.iter().map(|(_, r, _)| r.as_str()).collect::<Vec<_>>())
        .bind(target.topic)
        .bind(target.partition)
        .bind(n.iter().map(|(_, _, o)| *o).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    if !plan.parked.is_empty() {
        let p = &plan.parked;
        sqlx::query(
            "INSERT INTO parked_commands (topic, partition, \"offset\", aggregate_type, aggregate_id, source, command_id, reason)
             SELECT $1, $2, o, t, i, s, c, r
             FROM UNNEST($3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[]) AS u(o, t, i, s, c, r)
             ON CONFLICT DO NOTHING",
        )
        .bind(target.topic)
        .bind(target.partition)
        .bind(p.iter().map(|r| r.offset).collect::<Vec<_>>())
        .bind(p.iter().map(|r| r.aggregate.0.as_str()).collect::<Vec<_>>())
        .bind(p.iter().map(|r| r.aggregate.1.as_str()).collect::<Vec<_>>())
        .bind(p.iter().map(|r| r.source.as_str()).collect::<Vec<_>>())
        .bind(p.iter().map(|r| r.command_id.as_str()).collect::<Vec<_>>())
        .bind(p.iter().map(|r| r.reason.as_str()).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// What an outbox row is made from, before it is numbered.
enum Pending<'p> {
    Event(&'p commands::EventEnvelope),
    DeadLetter(&'p batch::DeadLetterRow),
}

/// An outbox row to insert.
struct OutboxRow<'t> {
    topic: &'t str,
    /// The row's stable identity (see [`OutboxMessage::message_id`]).
    message_id: String,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Value,
}

async fn write_plans(
    tx: &mut Transaction<'_, Postgres>,
    plans: &[(&BatchTarget<'_>, &Plan, i64)],
) -> Result<Vec<i64>> {
    let Some((first, _, _)) = plans.first() else {
        return Ok(Vec::new());
    };
    let topic = first.topic;
    // Aggregates first: a version conflict aborts before anything else is written.
    let (inserts, updates): (Vec<_>, Vec<_>) = plans
        .iter()
        .flat_map(|(_, p, _)| &p.writes)
        .partition(|w| w.read_version == 0);
    if !inserts.is_empty() {
        let n = sqlx::query(
            "INSERT INTO aggregates (aggregate_type, aggregate_id, version, state)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::jsonb[])
             ON CONFLICT DO NOTHING",
        )
        .bind(
            inserts
                .iter()
                .map(|w| w.aggregate_type.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            inserts
                .iter()
                .map(|w| w.aggregate_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(inserts.iter().map(|w| w.new_version).collect::<Vec<_>>())
        .bind(inserts.iter().map(|w| &w.state).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if n != inserts.len() as u64 {
            return Err(StoreError::Conflict(format!(
                "{} of {} new aggregates already exist",
                inserts.len() as u64 - n,
                inserts.len()
            )));
        }
    }
    if !updates.is_empty() {
        let n = sqlx::query(
            "UPDATE aggregates a SET version = u.new_version, state = u.state, updated_at = now()
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::jsonb[])
               AS u(t, i, read_version, new_version, state)
             WHERE a.aggregate_type = u.t AND a.aggregate_id = u.i AND a.version = u.read_version",
        )
        .bind(
            updates
                .iter()
                .map(|w| w.aggregate_type.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            updates
                .iter()
                .map(|w| w.aggregate_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(updates.iter().map(|w| w.read_version).collect::<Vec<_>>())
        .bind(updates.iter().map(|w| w.new_version).collect::<Vec<_>>())
        .bind(updates.iter().map(|w| &w.state).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if n != updates.len() as u64 {
            return Err(StoreError::Conflict(format!(
                "{} of {} aggregates changed since they were read",
                updates.len() as u64 - n,
                updates.len()
            )));
        }
    }

    // Rows of every table carry their partition, so all partitions go in one statement.
    let processed: Vec<(i32, &batch::ProcessedRow)> = plans
        .iter()
        .flat_map(|(t, p, _)| p.processed.iter().map(|r| (t.partition, r)))
        .collect();
    if !processed.is_empty() {
        let p = &processed;
        sqlx::query(
            "INSERT INTO processed_commands
               (source, command_id, aggregate_type, aggregate_id, command_type, outcome, code, reason,
                version, event_ids, topic, partition, \"offset\")
             SELECT s, c, t, i, ct, o, code, r, v, COALESCE(string_to_array(e, ',')::uuid[], '{}'), $10,
                    part, off
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::bigint[], $9::text[], $11::int[], $12::bigint[], $13::text[])
               AS u(s, c, t, i, ct, o, r, v, e, part, off, code)",
        )
        .bind(p.iter().map(|(_, r)| r.source.as_str()).collect::<Vec<_>>())
        .bind(p.iter().map(|(_, r)| r.command_id.as_str()).collect::<Vec<_>>())
        .bind(p.iter().map(|(_, r)| r.aggregate_type.as_str()).collect::<Vec<_>>())
        .bind(p.iter().map(|(_, r)| r.aggregate_id.as_str()).collect::<Vec<_>>())
        .bind(p.iter().map(|(_, r)| r.command_type.as_str()).collect::<Vec<_>>())
        .bind(p.iter().map(|(_, r)| r.outcome.outcome.as_str()).collect::<Vec<_>>())
        .bind(p.iter().map(|(_, r)| r.outcome.reason.as_deref()).collect::<Vec<_>>())
        .bind(p.iter().map(|(_, r)| r.outcome.version).collect::<Vec<_>>())
        .bind(p.iter().map(|(_, r)| join_ids(&r.outcome.event_ids)).collect::<Vec<_>>())
        .bind(topic)
        .bind(p.iter().map(|(part, _)| *part).collect::<Vec<_>>())
        .bind(p.iter().map(|(_, r)| r.offset).collect::<Vec<_>>())
        .bind(p.iter().map(|(_, r)| r.outcome.code.as_deref()).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }

    let duplicates: Vec<(i32, &batch::DuplicateRow)> = plans
        .iter()
        .flat_map(|(t, p, _)| p.duplicates.iter().map(|r| (t.partition, r)))
        .collect();
    if !duplicates.is_empty() {
        let d = &duplicates;
        sqlx::query(
            "INSERT INTO duplicate_deliveries (topic, partition, \"offset\", source, command_id)
             SELECT $1, part, off, s, c FROM UNNEST($2::int[], $3::bigint[], $4::text[], $5::text[]) AS u(part, off, s, c)
             ON CONFLICT (topic, partition, \"offset\") DO UPDATE SET seen_at = now()",
        )
        .bind(topic)
        .bind(d.iter().map(|(part, _)| *part).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.offset).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.source.as_str()).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.command_id.as_str()).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }

    let events: Vec<&batch::EventRow> = plans.iter().flat_map(|(_, p, _)| &p.events).collect();
    if !events.is_empty() {
        let e = &events;
        sqlx::query(
            "INSERT INTO events (event_id, aggregate_type, aggregate_id, version, event_type, data, source, command_id)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::jsonb[],
                                  $7::text[], $8::text[])",
        )
        .bind(e.iter().map(|r| r.envelope.id).collect::<Vec<Uuid>>())
        .bind(e.iter().map(|r| r.envelope.aggregate_type.as_str()).collect::<Vec<_>>())
        .bind(e.iter().map(|r| r.envelope.subject.as_str()).collect::<Vec<_>>())
        .bind(e.iter().map(|r| r.envelope.aggregate_version as i64).collect::<Vec<_>>())
        .bind(e.iter().map(|r| r.envelope.event_type.as_str()).collect::<Vec<_>>())
        .bind(e.iter().map(|r| &r.envelope.data).collect::<Vec<_>>())
        .bind(e.iter().map(|r| r.envelope.command_source.as_str()).collect::<Vec<_>>())
        .bind(e.iter().map(|r| r.envelope.command_id.as_str()).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }

    let dead_letters: Vec<(i32, &batch::DeadLetterRow)> = plans
        .iter()
        .flat_map(|(t, p, _)| p.dead_letters.iter().map(|r| (t.partition, r)))
        .collect();
    // A dead letter is published when it is first recorded: a replay (or a restore) that
    // meets the same message again finds its row and publishes nothing.
    let mut new_dead_letters: HashSet<(i32, i64)> = HashSet::new();
    if !dead_letters.is_empty() {
        let d = &dead_letters;
        let recorded = sqlx::query(
            "INSERT INTO dead_letters (topic, partition, \"offset\", kind, message, key, value, headers,
                                       aggregate_type, aggregate_id)
             SELECT $1, part, off, k, m, key, val, h, t, i
             FROM UNNEST($2::int[], $3::bigint[], $4::text[], $5::text[], $6::bytea[], $7::bytea[], $8::jsonb[],
                         $9::text[], $10::text[]) AS u(part, off, k, m, key, val, h, t, i)
             ON CONFLICT DO NOTHING
             RETURNING partition, \"offset\"",
        )
        .bind(topic)
        .bind(d.iter().map(|(part, _)| *part).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.offset).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.kind.as_str()).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.message.as_str()).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.key.as_deref()).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.value.as_deref()).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| headers_to_json(&r.headers)).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.aggregate.as_ref().map(|a| a.0.as_str())).collect::<Vec<_>>())
        .bind(d.iter().map(|(_, r)| r.aggregate.as_ref().map(|a| a.1.as_str())).collect::<Vec<_>>())
        .fetch_all(&mut **tx)
        .await?;
        new_dead_letters.extend(recorded.iter().map(|r| (r.get(0), r.get(1))));
    }

    // Each partition's outbox rows, numbered in offset order (a command's events keep their
    // own order), so the sequence depends only on the partition's messages, not on where
    // batches happened to split them: after a database restore the re-derived rows get the
    // same numbers, and the relay's recovered position skips exactly what was published.
    let mut ends = Vec::with_capacity(plans.len());
    let mut outbox: Vec<(i32, i64, OutboxRow)> = Vec::new();
    for (target, plan, outbox_seq) in plans {
        let mut pending: Vec<(i64, Pending<'_>)> =
            Vec::with_capacity(plan.events.len() + plan.dead_letters.len());
        pending.extend(
            plan.events
                .iter()
                .map(|e| (e.offset, Pending::Event(&e.envelope))),
        );
        pending.extend(
            plan.dead_letters
                .iter()
                .filter(|d| new_dead_letters.contains(&(target.partition, d.offset)))
                .map(|d| (d.offset, Pending::DeadLetter(d))),
        );
        pending.sort_by_key(|(offset, _)| *offset);
        let mut seq = *outbox_seq;
        for (_, p) in pending {
            seq += 1;
            outbox.push((target.partition, seq, outbox_row(target, p, seq)));
        }
        ends.push(seq);
    }
    if !outbox.is_empty() {
        sqlx::query(
            "INSERT INTO outbox (commands_topic, partition, seq, topic, key, payload, headers, message_id)
             SELECT $1, part, s, t, k, p, h, m
             FROM UNNEST($2::int[], $3::bigint[], $4::text[], $5::bytea[], $6::bytea[], $7::jsonb[], $8::text[])
               AS u(part, s, t, k, p, h, m)",
        )
        .bind(topic)
        .bind(outbox.iter().map(|(part, _, _)| *part).collect::<Vec<_>>())
        .bind(outbox.iter().map(|(_, seq, _)| *seq).collect::<Vec<_>>())
        .bind(outbox.iter().map(|(_, _, o)| o.topic).collect::<Vec<_>>())
        .bind(
            outbox
                .iter()
                .map(|(_, _, o)| o.key.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            outbox
                .iter()
                .map(|(_, _, o)| o.payload.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            outbox
                .iter()
                .map(|(_, _, o)| &o.headers)
                .collect::<Vec<_>>(),
        )
        .bind(
            outbox
                .iter()
                .map(|(_, _, o)| o.message_id.as_str())
                .collect::<Vec<_>>(),
        )
        .execute(&mut **tx)
        .await?;
    }
    Ok(ends)
}

/// The outbox row of an event (on the events topic, keyed by its aggregate, numbered
/// `seq`) or of a dead letter (on the dead-letter topic, the original bytes and headers
/// plus the `cmdproc-error-*` and `cmdproc-original-*` headers).
fn outbox_row<'t>(target: &BatchTarget<'t>, pending: Pending<'_>, seq: i64) -> OutboxRow<'t> {
    match pending {
        Pending::Event(envelope) => {
            let mut envelope = envelope.clone();
            envelope.sequence = seq as u64;
            OutboxRow {
                topic: target.events_topic,
                message_id: envelope.id.to_string(),
                key: Some(envelope.subject.clone().into_bytes()),
                payload: Some(serde_json::to_vec(&envelope.to_json()).expect("JSON serializes")),
                headers: headers_to_json(&[(
                    "content-type".into(),
                    Some(CLOUDEVENTS_JSON.as_bytes().to_vec()),
                )]),
            }
        }
        Pending::DeadLetter(dl) => {
            let mut headers: Vec<Header> = dl.headers.clone();
            let mut add = |k: &str, v: String| headers.push((k.to_owned(), Some(v.into_bytes())));
            add("cmdproc-error-kind", dl.kind.as_str().to_owned());
            add("cmdproc-error-message", dl.message.clone());
            add("cmdproc-original-topic", target.topic.to_owned());
            add("cmdproc-original-partition", target.partition.to_string());
            add("cmdproc-original-offset", dl.offset.to_string());
            OutboxRow {
                topic: target.dead_letter_topic,
                message_id: dead_letter_message_id(target.topic, target.partition, dl.offset),
                key: dl.key.clone(),
                payload: dl.value.clone(),
                headers: headers_to_json(&headers),
            }
        }
    }
}

/// The stable identity of a dead letter's outbox row: its place in the commands log.
pub fn dead_letter_message_id(topic: &str, partition: i32, offset: i64) -> String {
    format!("dead-letter/{topic}/{partition}/{offset}")
}

fn join_ids(ids: &[Uuid]) -> Option<String> {
    if ids.is_empty() {
        None
    } else {
        Some(
            ids.iter()
                .map(Uuid::to_string)
                .collect::<Vec<_>>()
                .join(","),
        )
    }
}

/// A partition whose outbox has rows the relay has not published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// The commands partition.
    pub partition: i32,
    /// Rows waiting.
    pub pending: i64,
}

/// Partitions with unpublished outbox rows, largest backlog first.
pub async fn outbox_backlog(pool: &PgPool, topic: &str) -> Result<Vec<Backlog>> {
    let rows = sqlx::query(
        "SELECT r.partition, p.outbox_seq - r.published_seq AS pending
         FROM relay_positions r JOIN partitions p ON p.topic = r.topic AND p.partition = r.partition
         WHERE r.topic = $1 AND p.outbox_seq > r.published_seq
         ORDER BY pending DESC",
    )
    .bind(topic)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Backlog {
            partition: r.get(0),
            pending: r.get(1),
        })
        .collect())
}

/// An outbox row read by the relay.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    /// Sequence within the commands partition.
    pub seq: i64,
    /// The row's stable identity, the same however the row is re-derived: the event id of
    /// an event, `dead-letter/<topic>/<partition>/<offset>` of a dead letter. `None` for
    /// rows written before identities existed.
    pub message_id: Option<String>,
    /// Destination topic.
    pub topic: String,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Message value.
    pub payload: Option<Vec<u8>>,
    /// Message headers.
    pub headers: Vec<Header>,
}

/// Locks a partition's relay position for this transaction, or returns `None` when another
/// relay holds it. Returns the last published sequence.
pub async fn lock_relay_position(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    partition: i32,
) -> Result<Option<i64>> {
    let row = sqlx::query(
        "SELECT published_seq FROM relay_positions WHERE topic = $1 AND partition = $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(topic)
    .bind(partition)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map(|r| r.get(0)))
}

/// The next unpublished outbox rows of a partition, in sequence order.
pub async fn next_outbox_rows(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    partition: i32,
    after: i64,
    limit: i64,
) -> Result<Vec<OutboxMessage>> {
    let rows = sqlx::query(
        "SELECT seq, topic, key, payload, headers, message_id FROM outbox
         WHERE commands_topic = $4 AND partition = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    )
    .bind(partition)
    .bind(after)
    .bind(limit)
    .bind(topic)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| OutboxMessage {
            seq: r.get(0),
            topic: r.get(1),
            key: r.get(2),
            payload: r.get(3),
            headers: batch::headers_from_json(&r.get::<Value, _>(4)),
            message_id: r.get(5),
        })
        .collect())
}

/// Records that a partition's outbox is published up to `seq`.
pub async fn mark_published(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    partition: i32,
    seq: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE relay_positions SET published_seq = $2, published_at = now() WHERE topic = $3 AND partition = $1",
    )
    .bind(partition)
    .bind(seq)
    .bind(topic)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// This database's deployment id (`relay_identity`), which names the relay's Kafka
/// transactional ids and offsets group.
pub async fn relay_deployment(pool: &PgPool) -> Result<Uuid> {
    Ok(
        sqlx::query_scalar("SELECT deployment FROM relay_identity WHERE singleton")
            .fetch_one(pool)
            .await?,
    )
}

/// When a partition's relay position was last recorded, `None` if never.
pub async fn relay_published_at(
    pool: &PgPool,
    topic: &str,
    partition: i32,
) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
    Ok(sqlx::query_scalar(
        "SELECT published_at FROM relay_positions WHERE topic = $1 AND partition = $2",
    )
    .bind(topic)
    .bind(partition)
    .fetch_optional(pool)
    .await?
    .flatten())
}

/// Stores identities found on the destination topics for a partition, leaving out those of
/// outbox rows already recorded as published (at or below `published`): only rows still to
/// come are skipped. Returns how many were stored.
pub async fn record_found_published(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    published: i64,
    ids: &[String],
) -> Result<u64> {
    let mut stored = 0;
    for chunk in ids.chunks(10_000) {
        stored += sqlx::query(
            "INSERT INTO relay_published (commands_topic, partition, message_id)
             SELECT $1, $2, m FROM (
               SELECT unnest($4::text[]) AS m
               EXCEPT SELECT message_id FROM outbox
                 WHERE commands_topic = $1 AND partition = $2 AND seq <= $3 AND message_id IS NOT NULL
             ) f
             ON CONFLICT DO NOTHING",
        )
        .bind(topic)
        .bind(partition)
        .bind(published)
        .bind(chunk)
        .execute(pool)
        .await?
        .rows_affected();
    }
    Ok(stored)
}

/// The destination topics of a partition's outbox rows.
pub async fn outbox_topics(pool: &PgPool, topic: &str, partition: i32) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT topic FROM outbox WHERE commands_topic = $1 AND partition = $2",
    )
    .bind(topic)
    .bind(partition)
    .fetch_all(pool)
    .await?)
}

/// The identities of a partition's outbox rows known to be on their topic already.
pub async fn found_published(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    partition: i32,
) -> Result<HashSet<String>> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT message_id FROM relay_published WHERE commands_topic = $1 AND partition = $2",
    )
    .bind(topic)
    .bind(partition)
    .fetch_all(&mut **tx)
    .await?;
    Ok(ids.into_iter().collect())
}

/// Forgets identities whose outbox rows were skipped: a later row with the same identity
/// (a replay of deleted effects) is published again.
pub async fn forget_found_published(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    partition: i32,
    ids: &[String],
) -> Result<()> {
    sqlx::query(
        "DELETE FROM relay_published WHERE commands_topic = $1 AND partition = $2 AND message_id = ANY($3)",
    )
    .bind(topic)
    .bind(partition)
    .bind(ids)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Read-only queries of `cmdproc verify`.

/// The stored next offset of every partition of `topic` that a worker has acquired: what
/// the workers have applied, and so where a re-execution must stop.
pub async fn stored_next_offsets(pool: &PgPool, topic: &str) -> Result<HashMap<i32, i64>> {
    let rows = sqlx::query("SELECT partition, next_offset FROM partitions WHERE topic = $1")
        .bind(topic)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// A parked aggregate as `verify` needs it: which partition parked it and from which offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedSince {
    /// The aggregate.
    pub aggregate: AggregateKey,
    /// The commands partition its poison command was on.
    pub partition: i32,
    /// Offset of the poison command: from there on its commands are set aside.
    pub first_offset: i64,
}

/// The aggregates parked by the workers of `topic`.
pub async fn parked_since(pool: &PgPool, topic: &str) -> Result<Vec<ParkedSince>> {
    let rows = sqlx::query(
        "SELECT aggregate_type, aggregate_id, partition, first_offset FROM parked_aggregates
         WHERE topic = $1 ORDER BY partition, first_offset",
    )
    .bind(topic)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| ParkedSince {
            aggregate: (r.get(0), r.get(1)),
            partition: r.get(2),
            first_offset: r.get(3),
        })
        .collect())
}

/// The recorded outcomes of `keys` whose first delivery was processed somewhere other than
/// `topic`/`partition`, and those an operator skipped. Deduplication is global, so a command
/// first processed on another partition (or topic) is a duplicate here, whatever a
/// re-execution of this partition alone would think; a skipped command never takes effect.
pub async fn outcomes_recorded_elsewhere(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    keys: &[CommandKey],
) -> Result<HashMap<CommandKey, Outcome>> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let (sources, ids): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(s, i)| (s.as_str(), i.as_str())).unzip();
    let rows = sqlx::query(
        "SELECT p.source, p.command_id, p.outcome, p.reason, p.version, p.event_ids, p.code
         FROM processed_commands p
         JOIN UNNEST($1::text[], $2::text[]) AS k(source, command_id)
           ON p.source = k.source AND p.command_id = k.command_id
         WHERE p.topic <> $3 OR p.partition <> $4 OR p.outcome = 'skipped'",
    )
    .bind(&sources)
    .bind(&ids)
    .bind(topic)
    .bind(partition)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(outcome_row).collect())
}

/// Every stored aggregate that a command of `topic` was processed for. The aggregates
/// table has no topic column (several topics may share a database), so the recorded
/// commands tell which aggregates belong to this topic.
pub async fn aggregates_of_topic(
    pool: &PgPool,
    topic: &str,
) -> Result<Vec<(AggregateKey, Loaded)>> {
    let rows = sqlx::query(
        "SELECT a.aggregate_type, a.aggregate_id, a.version, a.state FROM aggregates a
         WHERE EXISTS (SELECT 1 FROM processed_commands p
                       WHERE p.aggregate_type = a.aggregate_type AND p.aggregate_id = a.aggregate_id
                         AND p.topic = $1)",
    )
    .bind(topic)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(loaded_row).collect())
}

/// The partition count recorded for `topic`, recording `partitions` first when none is (the
/// first worker on a topic records what it found).
pub async fn record_layout(pool: &PgPool, topic: &str, partitions: i32) -> Result<i32> {
    sqlx::query(
        "INSERT INTO topic_layouts (topic, partitions) VALUES ($1, $2) ON CONFLICT (topic) DO NOTHING",
    )
    .bind(topic)
    .bind(partitions)
    .execute(pool)
    .await?;
    Ok(recorded_layout(pool, topic).await?.unwrap_or(partitions))
}

/// The partition count recorded for `topic`, if any.
pub async fn recorded_layout(pool: &PgPool, topic: &str) -> Result<Option<i32>> {
    Ok(
        sqlx::query_scalar("SELECT partitions FROM topic_layouts WHERE topic = $1")
            .bind(topic)
            .fetch_optional(pool)
            .await?,
    )
}

/// Records `partitions` as `topic`'s partition count, an operator's decision with its
/// reason. Returns the count recorded before, if any.
pub async fn accept_partitions(
    pool: &PgPool,
    topic: &str,
    partitions: i32,
    why: &str,
) -> Result<Option<i32>> {
    let mut tx = pool.begin().await?;
    let before: Option<i32> =
        sqlx::query_scalar("SELECT partitions FROM topic_layouts WHERE topic = $1 FOR UPDATE")
            .bind(topic)
            .fetch_optional(&mut *tx)
            .await?;
    if before == Some(partitions) {
        // Nothing changed: no decision to record.
        tx.rollback().await?;
        return Ok(before);
    }
    sqlx::query(
        "INSERT INTO topic_layouts (topic, partitions) VALUES ($1, $2)
         ON CONFLICT (topic) DO UPDATE SET partitions = EXCLUDED.partitions, recorded_at = now()",
    )
    .bind(topic)
    .bind(partitions)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO log_decisions (topic, decision, from_value, to_value, why)
         VALUES ($1, 'accept-partitions', $2, $3, $4)",
    )
    .bind(topic)
    .bind(before.map(i64::from))
    .bind(i64::from(partitions))
    .bind(why)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(before)
}

/// A partition's stored next offset and the Kafka timestamp of the message before it (the
/// log fingerprint), `None` when no worker ever took the partition.
pub async fn stored_position(
    pool: &PgPool,
    topic: &str,
    partition: i32,
) -> Result<Option<(i64, Option<i64>)>> {
    let row = sqlx::query(
        "SELECT next_offset, last_timestamp FROM partitions WHERE topic = $1 AND partition = $2",
    )
    .bind(topic)
    .bind(partition)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// Moves a partition's stored position to `offset` (either way), clears its log
/// fingerprint and increments its epoch, so the live owner takes it back and consumes from
/// there; records the operator's decision with its reason. Returns the position before, or
/// `None` when no worker ever took the partition (nothing is changed then).
pub async fn accept_log(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    offset: i64,
    why: &str,
) -> Result<Option<i64>> {
    let mut tx = pool.begin().await?;
    let before: Option<i64> = sqlx::query_scalar(
        "SELECT next_offset FROM partitions WHERE topic = $1 AND partition = $2 FOR UPDATE",
    )
    .bind(topic)
    .bind(partition)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(before) = before {
        sqlx::query(
            "UPDATE partitions SET next_offset = $3, last_timestamp = NULL,
               epoch = GREATEST(epoch + 1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint),
               updated_at = now()
             WHERE topic = $1 AND partition = $2",
        )
        .bind(topic)
        .bind(partition)
        .bind(offset)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO log_decisions (topic, decision, partition, from_value, to_value, why)
             VALUES ($1, 'accept-log', $2, $3, $4, $5)",
        )
        .bind(topic)
        .bind(partition)
        .bind(before)
        .bind(offset)
        .bind(why)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(before)
}
