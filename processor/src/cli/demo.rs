//! `cmdproc demo`: the project's demonstration, end to end against the real Kafka and
//! Postgres that `deploy/local/up.sh` starts.
//!
//! A run gets a namespace of its own (topics, consumer group and a fresh database), so runs
//! never interfere with each other or with real data. It starts real worker processes,
//! produces a seeded mix of valid commands, re-sent duplicates and invalid messages, waits
//! until everything is processed and published, prints a summary, and checks the
//! invariants the product promises against a serial in-memory model. A failed invariant
//! makes the command fail.
//!
//! # Layout
//! - the seeded messages and the serial model are [`crate::harness`]'s, shared with the
//!   bench and the integration tests.
//! - `workers`: the worker processes and the guard that stops them.
//! - `verify`: waiting, reading back, the summary and the invariants.
//! - `sagas`: orders (the `order` saga over `inventory` and `account`, with timers), and
//!   the invariants of workflows; run when the registry has those domains.

pub(super) mod sagas;
pub(super) mod verify;
pub(super) mod workers;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::producer::{CommandProducer, Delivery};
use anyhow::Context;
use chrono::Utc;
use clap::Args;
use commands::envelope::CLOUDEVENTS_JSON;
use commands::{Registry, Topic};
use futures::{StreamExt, TryStreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use super::{parse_duration, Common, LogFormat};
use crate::harness::model::Model;
use crate::harness::workload::{Options, Send, Workload};
use workers::Workers;

/// Arguments of `demo`.
#[derive(Debug, Args)]
#[command(
    after_help = "Each run creates its own topics, consumer group and database \
    (cmdproc_demo_<time>) on the servers of --brokers and --database-url, so --group and the \
    topic options are not used. The database is dropped at the end unless --keep is given or \
    the demo fails."
)]
pub struct DemoArgs {
    /// How many commands to produce; duplicates and invalid messages come on top.
    #[arg(long, default_value_t = 4000)]
    pub commands: usize,
    /// How many worker processes to start.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: u32,
    /// Partitions of the demo's topics.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(i32).range(1..=256))]
    pub partitions: i32,
    /// Seed of the workload: the same seed produces the same commands.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Fail when processing takes longer than this.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Keep the demo database for inspection. By default it is dropped at the end unless
    /// the demo failed; the demo's topics are always left in place.
    #[arg(long)]
    pub keep: bool,
}

/// The `source` of every demo command; with the id it is the idempotency key.
pub(super) const SOURCE: &str = "/cmdproc-demo";
/// Accounts the workload opens and then moves money in and out of.
const ACCOUNTS: usize = 50;
/// Orders the saga part places.
const ORDERS: usize = 300;
/// Rooms the workload books and cancels.
const ROOMS: usize = 20;
/// Share of valid commands that are sent a second time.
const DUPLICATE_SHARE: f64 = 0.05;

/// The demo's workload: valid commands for [`ACCOUNTS`] accounts and [`ROOMS`] rooms,
/// some re-sent, and one message of each way a message can be invalid.
pub(super) fn demo_workload(
    seed: u64,
    commands: usize,
    partitions: i32,
) -> anyhow::Result<Workload> {
    Ok(Workload::generate(&Options {
        source: SOURCE.to_owned(),
        accounts: ACCOUNTS,
        rooms: ROOMS,
        duplicates: DUPLICATE_SHARE,
        invalid: Some(partitions),
        ..Options::new(seed, commands)
    })?)
}

/// Refuses a registry without the domains the demo and the bench generate commands for.
pub(super) fn require_example_domains(registry: &Registry) -> anyhow::Result<()> {
    for needed in ["account", "room"] {
        if registry.get(needed).is_none() {
            anyhow::bail!(
                "the demo and the bench generate `account` and `room` commands, and this \
                 processor does not know `{needed}` (it knows {}); run them with the stock \
                 `cmdproc` binary, or register `bank::Account` and `bank::Room`",
                registry.types().collect::<Vec<_>>().join(", ")
            );
        }
    }
    Ok(())
}

/// The session timeout of the demo's workers: short, so a rebalance settles quickly.
pub(super) const SESSION_TIMEOUT: &str = "6s";
/// How long workers get to drain and leave the group before they are killed.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(15);
/// How long workers get to join the group and take every partition.
pub(super) const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Lines of each worker log shown when the demo fails.
pub(super) const LOG_TAIL: usize = 25;

/// The names one run uses, all derived from a timestamp and a random suffix.
#[derive(Debug, Clone)]
pub(super) struct Namespace {
    pub(super) id: String,
    pub(super) commands: Topic,
    pub(super) events: Topic,
    pub(super) dead_letters: Topic,
    pub(super) group: String,
    pub(super) database: String,
}

impl Namespace {
    /// Fresh names starting with `prefix` (`demo`, `bench`).
    pub(super) fn new(prefix: &str) -> anyhow::Result<Self> {
        // The suffix keeps two runs started in the same second apart.
        let id = format!(
            "{}-{:04x}",
            Utc::now().format("%Y%m%d%H%M%S"),
            rand::random::<u16>()
        );
        let commands = Topic::parse(format!("{prefix}-{id}-commands"))?;
        Ok(Self {
            events: Topic::parse(format!("{prefix}-{id}-events"))?,
            dead_letters: commands.dead_letter(),
            commands,
            group: format!("{prefix}-{id}"),
            database: format!("cmdproc_{prefix}_{}", id.replace('-', "_")),
            id,
        })
    }
}

/// The demo stopped because of Ctrl-C.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
struct Interrupted;

/// Some invariant does not hold.
#[derive(Debug, thiserror::Error)]
#[error("{0} of {1} invariants failed")]
struct InvariantsFailed(usize, usize);

/// Runs the demonstration; fails if any invariant does not hold.
pub async fn run(common: &Common, registry: &Registry, args: DemoArgs) -> anyhow::Result<()> {
    require_example_domains(registry)?;
    let min = ACCOUNTS * 2;
    if args.commands < min {
        anyhow::bail!(
            "--commands must be at least {min}: the demo opens {} accounts first",
            ACCOUNTS
        );
    }
    let started = Instant::now();
    let ns = Namespace::new("demo")?;
    println!(
        "cmdproc demo {}: {} worker(s), {} commands, seed {}",
        ns.id, args.workers, args.commands, args.seed
    );

    let admin = admin_pool(common).await?;
    let url = database_url(&common.database_url, &ns.database)?;
    create_database(&admin, &ns.database).await?;
    println!(
        "[1/8] database    created {} on {}",
        ns.database,
        server(&common.database_url)
    );

    let result = with_database(common, registry, &args, &ns, &url).await;

    let failed = matches!(&result, Err(e) if !e.is::<Interrupted>());
    if args.keep || failed {
        println!("      kept database {} at {}", ns.database, redact(&url));
        println!(
            "      look inside: cmdproc --database-url <that URL> inspect account acc-1; \
             drop it: DROP DATABASE {} WITH (FORCE)",
            ns.database
        );
    } else {
        match drop_database(&admin, &ns.database).await {
            Ok(()) => println!("      dropped database {}", ns.database),
            Err(e) => println!("      could not drop database {}: {e:#}", ns.database),
        }
    }
    admin.close().await;
    if result.is_ok() {
        println!(
            "demo passed in {:.1}s: every invariant holds",
            started.elapsed().as_secs_f64()
        );
    }
    result
}

/// Everything that needs the demo database: topics, workers, the scenario, and stopping
/// the workers whatever happened.
async fn with_database(
    common: &Common,
    registry: &Registry,
    args: &DemoArgs,
    ns: &Namespace,
    url: &str,
) -> anyhow::Result<()> {
    let pool = crate::store::connect(url, 4, common.connect_timeout).await?;
    let migrations = crate::store::migrate(&pool).await?;
    println!("      applied {migrations} migration(s)");

    let topics: Vec<(String, i32)> = [&ns.commands, &ns.events, &ns.dead_letters]
        .iter()
        .map(|t| (t.to_string(), args.partitions))
        .collect();
    crate::topics::create(&common.brokers, &topics, 1, common.connect_timeout).await?;
    println!(
        "[2/8] topics      created {}, {}, {} with {} partitions each",
        ns.commands, ns.events, ns.dead_letters, args.partitions
    );

    let dir = std::env::temp_dir().join(format!("cmdproc-demo-{}", ns.id));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut workers = Workers::new(dir.clone());

    // Ctrl-C ends the scenario early but still runs the cleanup below. The workers share
    // the terminal's process group, so they receive the same signal and drain on their own.
    let result = tokio::select! {
        r = scenario(common, registry, args, ns, url, &pool, &mut workers) => r,
        _ = tokio::signal::ctrl_c() => Err(Interrupted.into()),
    };

    println!(
        "[8/8] stop        stopping the workers (SIGTERM, then SIGKILL after {}s)",
        STOP_GRACE.as_secs()
    );
    for (name, ended) in workers.stop(STOP_GRACE).await {
        println!("      {name}: {ended}");
    }
    if let Err(e) = &result {
        if !e.is::<InvariantsFailed>() && !e.is::<Interrupted>() {
            eprint!("{}", workers.log_tails(LOG_TAIL));
        }
    }
    println!("      worker logs are in {}", dir.display());
    pool.close().await;
    result
}

/// Starts the workers, produces the workload, waits for it, then reports and checks.
async fn scenario(
    common: &Common,
    registry: &Registry,
    args: &DemoArgs,
    ns: &Namespace,
    url: &str,
    pool: &PgPool,
    workers: &mut Workers,
) -> anyhow::Result<()> {
    println!("[3/8] workers     starting {}", args.workers);
    for log in spawn_workers(common, ns, url, workers, args.workers, &[])? {
        println!("      logs to {}", log.display());
    }
    let expected = (args.workers as usize).min(args.partitions as usize);
    let joining = Instant::now();
    let owners = verify::wait_ready(
        pool,
        ns.commands.as_str(),
        args.partitions,
        expected,
        workers,
        JOIN_TIMEOUT,
    )
    .await?;
    println!(
        "      joined in {:.1}s; partitions owned: {}",
        joining.elapsed().as_secs_f64(),
        owners
            .iter()
            .map(|(o, n)| format!(
                "{} {n}",
                o.strip_prefix(&format!("{}-", ns.group)).unwrap_or(o)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let workload = demo_workload(args.seed, args.commands, args.partitions)?;
    let model = Model::run(registry, &workload.valid)?;
    println!(
        "[4/8] produce     {} messages: {} commands for {} accounts and {} rooms, {} re-sent duplicates, {} invalid",
        workload.messages.len(),
        workload.valid.len(),
        ACCOUNTS,
        ROOMS,
        workload.duplicates(),
        workload.invalid()
    );
    let producing = Instant::now();
    let deliveries = produce(common, ns, &workload).await?;
    let produce_time = producing.elapsed();
    println!("      acknowledged in {:.1}s", produce_time.as_secs_f64());

    // The offset after each partition's last message: where the stored offsets must get.
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for d in &deliveries {
        let end = ends.entry(d.partition).or_default();
        *end = (*end).max(d.offset + 1);
    }
    println!("[5/8] process     waiting for the workers and the relay");
    verify::wait_processed(pool, ns.commands.as_str(), &ends, workers, args.timeout).await?;
    let timings = verify::Timings {
        produce: produce_time,
        process: producing.elapsed(),
    };

    println!("[6/8] summary");
    let observed = verify::observe(
        pool,
        &common.brokers,
        ns.commands.as_str(),
        ns.events.as_str(),
        ns.dead_letters.as_str(),
    )
    .await?;
    verify::print_summary(&workload, &model, &observed, timings);

    println!("[7/8] invariants");
    let mut checks = verify::checks(&workload, &model, &deliveries, &observed);
    for c in &checks {
        println!("  {c}");
    }
    if sagas::available(registry) {
        println!(
            "      sagas: {ORDERS} orders over the accounts and 10 SKUs (2 scarce), each \
             reserving stock, paying, confirming or compensating"
        );
        let placing = Instant::now();
        let outcome = sagas::run(
            &common.brokers,
            ns,
            pool,
            workers,
            sagas::Orders {
                seed: args.seed,
                orders: ORDERS,
                accounts: ACCOUNTS,
                timeout: args.timeout,
            },
        )
        .await?;
        println!("      settled in {:.1}s", placing.elapsed().as_secs_f64());
        let first = (b'a' + checks.len() as u8) as char;
        let more = sagas::checks(&outcome, first);
        for c in &more {
            println!("  {c}");
        }
        checks.extend(more);
    }
    let failed = checks.iter().filter(|c| !c.pass).count();
    if failed > 0 {
        return Err(InvariantsFailed(failed, checks.len()).into());
    }
    Ok(())
}

/// Starts `count` real `cmdproc run` processes (this executable) on the namespace's topics
/// and database, with `extra` arguments; returns their log files.
pub(super) fn spawn_workers(
    common: &Common,
    ns: &Namespace,
    url: &str,
    workers: &mut Workers,
    count: u32,
    extra: &[&str],
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let exe = std::env::current_exe().context("cannot find the cmdproc executable")?;
    let log_format = match common.log_format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    let mut logs = Vec::new();
    for i in 1..=count {
        let name = format!("worker-{i}");
        let mut worker_args: Vec<String> = [
            "run",
            "--brokers",
            &common.brokers,
            "--group",
            &ns.group,
            "--commands-topic",
            ns.commands.as_str(),
            "--events-topic",
            ns.events.as_str(),
            "--session-timeout",
            SESSION_TIMEOUT,
            "--log-format",
            log_format,
            "--name",
            &format!("{}-{name}", ns.group),
        ]
        .map(str::to_owned)
        .into();
        worker_args.extend(extra.iter().map(|a| (*a).to_owned()));
        // The URL travels in the environment, not the arguments, so its password does not
        // show in the process list. The logs are files: no terminal colour codes in them.
        let env = [("CMDPROC_DATABASE_URL", url), ("NO_COLOR", "1")];
        logs.push(workers.spawn(&exe, &name, &worker_args, &env)?);
    }
    Ok(logs)
}

/// Produces the workload in order and returns where each message landed.
///
/// Futures are polled in order, so messages are enqueued in order and the idempotent
/// producer keeps that order per partition: each aggregate's commands arrive in the order
/// the model applies them.
async fn produce(
    common: &Common,
    ns: &Namespace,
    workload: &Workload,
) -> anyhow::Result<Vec<Delivery>> {
    let timeout = Duration::from_secs(30);
    let producer = CommandProducer::new(&common.brokers, ns.commands.clone(), timeout)?;
    // The command producer always partitions by key; misrouting needs a partition of our
    // choosing, hence a plain producer for those few messages.
    let misrouter: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &common.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", timeout.as_millis().to_string())
        .create()
        .context("cannot create the Kafka producer")?;
    let (producer, misrouter) = (&producer, &misrouter);
    let sends = workload.messages.iter().map(|m| async move {
        let delivery = match &m.send {
            Send::Command(i) => producer.send(&workload.valid[*i]).await?,
            Send::Raw { key, value } => {
                producer
                    .send_raw(key.as_deref(), value.as_deref(), None)
                    .await?
            }
            Send::Misrouted { command, partition } => {
                let value = command.encode();
                let record = FutureRecord::to(ns.commands.as_str())
                    .key(command.subject.as_str())
                    .payload(&value)
                    .partition(*partition)
                    .headers(OwnedHeaders::new().insert(Header {
                        key: "content-type",
                        value: Some(CLOUDEVENTS_JSON),
                    }));
                let d = misrouter
                    .send(record, timeout)
                    .await
                    .map_err(|(e, _)| anyhow::anyhow!("producing a misrouted command: {e}"))?;
                Delivery {
                    partition: d.partition,
                    offset: d.offset,
                }
            }
        };
        anyhow::Ok(delivery)
    });
    futures::stream::iter(sends)
        .buffered(1000)
        .try_collect()
        .await
}

/// `url` with its database replaced by `database`; user, password, host and parameters
/// stay as they are.
pub(super) fn database_url(url: &str, database: &str) -> anyhow::Result<String> {
    let authority_at = url
        .find("://")
        .map(|i| i + 3)
        .context("the database URL has no scheme; expected postgres://user:password@host/db")?;
    let rest = &url[authority_at..];
    let path_at = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, after) = rest.split_at(path_at);
    let query_at = after.find(['?', '#']).unwrap_or(after.len());
    let new = format!(
        "{}{authority}/{database}{}",
        &url[..authority_at],
        &after[query_at..]
    );
    // A `dbname` parameter would override the path; parsing tells.
    let parsed: PgConnectOptions = new
        .parse()
        .with_context(|| format!("invalid database URL {}", redact(url)))?;
    if parsed.get_database() != Some(database) {
        anyhow::bail!(
            "cannot point {} at another database; give the database in the URL's path",
            redact(url)
        );
    }
    Ok(new)
}

/// `host:port` of a database URL, for output.
pub(super) fn server(url: &str) -> String {
    url.parse::<PgConnectOptions>()
        .map(|o| format!("{}:{}", o.get_host(), o.get_port()))
        .unwrap_or_else(|_| "the server".into())
}

/// The URL with its password masked, so it can be printed.
pub(super) fn redact(url: &str) -> String {
    let Some(authority_at) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[authority_at..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..authority_at],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

/// A Postgres identifier in double quotes.
pub(super) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A connection to `--database-url` for creating and dropping the demo database.
pub(super) async fn admin_pool(common: &Common) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = common
        .database_url
        .parse()
        .with_context(|| format!("invalid database URL {}", redact(&common.database_url)))?;
    // Dropping a database takes a second or so, which sqlx would log as a slow statement.
    let options = options.disable_statement_logging();
    PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(common.connect_timeout)
        .connect_with(options)
        .await
        .with_context(|| {
            format!(
                "cannot connect to Postgres at {}",
                server(&common.database_url)
            )
        })
}

pub(super) async fn create_database(admin: &PgPool, name: &str) -> anyhow::Result<()> {
    // `raw_sql` runs a simple query; CREATE DATABASE cannot be a prepared statement's
    // parameter, and the name is ours, made of [a-z0-9_].
    sqlx::raw_sql(&format!("CREATE DATABASE {}", quote(name)))
        .execute(admin)
        .await
        .with_context(|| {
            format!("cannot create database {name} (the role needs the CREATEDB privilege)")
        })?;
    Ok(())
}

pub(super) async fn drop_database(admin: &PgPool, name: &str) -> anyhow::Result<()> {
    // FORCE ends sessions a killed worker may have left behind. It cannot end an autovacuum
    // worker that happens to be in the database (only a superuser could), so try again.
    let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote(name));
    let mut attempt = 1;
    loop {
        match sqlx::raw_sql(&sql).execute(admin).await {
            Ok(_) => return Ok(()),
            Err(e) if attempt >= 5 => return Err(e.into()),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_url_swaps_only_the_database() {
        let swap = |u: &str| database_url(u, "demo_1").unwrap();
        assert_eq!(
            swap("postgres://u:p@127.0.0.1:5432/cmdproc"),
            "postgres://u:p@127.0.0.1:5432/demo_1"
        );
        assert_eq!(
            swap("postgresql://u:p@db/cmdproc?sslmode=disable"),
            "postgresql://u:p@db/demo_1?sslmode=disable"
        );
        assert_eq!(swap("postgres://u@db"), "postgres://u@db/demo_1");
        assert_eq!(
            swap("postgres://u@db?application_name=x"),
            "postgres://u@db/demo_1?application_name=x"
        );
        assert!(database_url("cmdproc", "demo_1").is_err());
        assert!(database_url("postgres://u@db/x?dbname=y", "demo_1").is_err());
    }

    #[test]
    fn redact_masks_the_password_only() {
        assert_eq!(
            redact("postgres://cmdproc:secret@127.0.0.1:5432/db"),
            "postgres://cmdproc:***@127.0.0.1:5432/db"
        );
        assert_eq!(
            redact("postgres://cmdproc@host/db"),
            "postgres://cmdproc@host/db"
        );
        assert_eq!(redact("postgres://host/db"), "postgres://host/db");
    }

    #[test]
    fn namespace_names_are_valid() {
        let a = Namespace::new("demo").unwrap();
        assert!(a
            .database
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
        assert!(a.database.len() < 64, "Postgres truncates longer names");
        assert_eq!(a.dead_letters.as_str(), format!("{}.dlq", a.commands));
    }
}
