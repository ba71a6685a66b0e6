//! The engine as a library: a [`Processor`] runs one worker (with its outbox relay, its
//! pruning and its `/metrics` endpoint) for a user's registry, until a token is cancelled.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use processor::engine::{Options, Processor};
//! use tokio_util::sync::CancellationToken;
//!
//! let processor = Processor::builder(Arc::new(bank::registry()))
//!     .database_url("postgres://cmdproc:cmdproc@127.0.0.1:5432/cmdproc")
//!     .brokers("127.0.0.1:9092")
//!     .options(Options { batch_size: 200, ..Options::default() })
//!     .build()?;
//! let shutdown = CancellationToken::new();
//! // Cancel `shutdown` (on SIGTERM, say) to drain and leave the group.
//! processor.run(shutdown).await?;
//! # Ok(())
//! # }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use commands::{ContractErrors, Registry, Topic};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{MisroutedPolicy, PlanOptions, PoisonPolicy};
use crate::http::{self, HttpState};
use crate::metrics::{outcome, Metrics};
use crate::relay::Relay;
use crate::store::StoreError;
use crate::worker::{Owned, Worker, WorkerConfig, WorkerError};

/// How a processor works; `Options::default()` matches the defaults of `cmdproc run`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Most commands applied in one transaction.
    pub batch_size: usize,
    /// Longest wait for a batch to fill before it is applied.
    pub batch_linger: Duration,
    /// Larger messages are dead-lettered as `too_large`.
    pub max_command_bytes: usize,
    /// Consumer group session timeout: how long a silent worker keeps its partitions.
    pub session_timeout: Duration,
    /// What to do with a command on a partition its key does not map to.
    pub misrouted: MisroutedPolicy,
    /// What to do with a command whose handler keeps panicking.
    pub poison: PoisonPolicy,
    /// How many times a panicking handler is tried before its command counts as poison.
    pub poison_attempts: u32,
    /// Run the outbox relay in this process (otherwise run `cmdproc relay` elsewhere).
    pub relay: bool,
    /// How long processed commands' outcomes are kept.
    pub dedupe_window: Duration,
    /// How often to forget outcomes past the dedupe window and published outbox rows.
    pub prune_every: Duration,
    /// On shutdown, how long to drain in-flight work.
    pub shutdown_timeout: Duration,
    /// Database connections of this worker.
    pub db_connections: u32,
    /// Name of this worker in logs and in the database (default: host, pid, random suffix).
    pub name: Option<String>,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` (default 127.0.0.1:9464 when
    /// free).
    pub metrics_addr: Option<SocketAddr>,
    /// Most aggregates kept in memory between batches; 0 turns the cache off.
    pub aggregate_cache: usize,
    /// How often the worker fires its partitions' due timers.
    pub timer_tick: Duration,
    /// Benchmark baseline, not for production: one command per transaction.
    pub naive_baseline: bool,
    /// How long to wait for Postgres when connecting.
    pub connect_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            batch_size: 500,
            batch_linger: Duration::from_millis(5),
            max_command_bytes: 256 * 1024,
            session_timeout: Duration::from_secs(10),
            misrouted: MisroutedPolicy::DeadLetter,
            poison: PoisonPolicy::Park,
            poison_attempts: 3,
            relay: true,
            dedupe_window: Duration::from_secs(7 * 86_400),
            prune_every: Duration::from_secs(600),
            shutdown_timeout: Duration::from_secs(8),
            db_connections: 8,
            name: None,
            metrics_addr: None,
            aggregate_cache: 100_000,
            timer_tick: Duration::from_millis(200),
            naive_baseline: false,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a processor could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The registry's aggregates and schemas disagree.
    #[error("the aggregates and their schemas disagree:\n{0}")]
    Contract(#[from] ContractErrors),
    /// The registry knows no aggregate.
    #[error("no aggregate is registered; add one with Registry::with")]
    EmptyRegistry,
}

/// Why a processor stopped on an error it cannot retry.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Postgres could not be reached or migrated at start.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The metrics address could not be bound.
    #[error(transparent)]
    Metrics(#[from] crate::http::ListenError),
    /// The relay could not be created.
    #[error(transparent)]
    Relay(#[from] crate::relay::RelayError),
    /// The worker stopped on an error.
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

/// Checks what a processor needs of its registry before it touches Kafka or Postgres: a
/// sound contract between aggregates and schemas, and at least one aggregate.
///
/// # Errors
///
/// Every contract error, or an empty registry.
pub fn check_registry(registry: &Registry) -> Result<(), BuildError> {
    registry.check()?;
    if registry.types().next().is_none() {
        return Err(BuildError::EmptyRegistry);
    }
    Ok(())
}

/// Builds a [`Processor`]; see [`Processor::builder`].
#[derive(Debug)]
pub struct ProcessorBuilder {
    /// The processor as configured so far; `build` checks it.
    processor: Processor,
}

impl ProcessorBuilder {
    /// The Postgres URL (default: the local database of `deploy/local`).
    pub fn database_url(mut self, url: &str) -> Self {
        url.clone_into(&mut self.processor.database_url);
        self
    }

    /// Kafka bootstrap servers (default `127.0.0.1:9092`).
    pub fn brokers(mut self, brokers: &str) -> Self {
        brokers.clone_into(&mut self.processor.brokers);
        self
    }

    /// The consumer group of the workers (default `cmdproc`).
    pub fn group(mut self, group: &str) -> Self {
        group.clone_into(&mut self.processor.group);
        self
    }

    /// The commands topic (default `commands`); dead letters go to `<topic>.dlq`.
    pub fn commands_topic(mut self, topic: Topic) -> Self {
        self.processor.commands_topic = topic;
        self
    }

    /// The events topic (default `events`).
    pub fn events_topic(mut self, topic: Topic) -> Self {
        self.processor.events_topic = topic;
        self
    }

    /// How the processor works.
    pub fn options(mut self, options: Options) -> Self {
        self.processor.options = options;
        self
    }

    /// Checks the registry and builds the processor.
    ///
    /// # Errors
    ///
    /// Every contract error of the registry (a command or event without a schema, a type
    /// registered twice, ...), or an empty registry.
    pub fn build(self) -> Result<Processor, BuildError> {
        check_registry(&self.processor.registry)?;
        Ok(self.processor)
    }
}

/// One worker of a consumer group, with its relay, pruning and HTTP endpoint: what
/// `cmdproc run` runs, for any registry.
#[derive(Debug)]
pub struct Processor {
    registry: Arc<Registry>,
    database_url: String,
    brokers: String,
    group: String,
    commands_topic: Topic,
    events_topic: Topic,
    options: Options,
}

impl Processor {
    /// A builder with the defaults of `cmdproc run`, for the aggregates of `registry`.
    pub fn builder(registry: Arc<Registry>) -> ProcessorBuilder {
        ProcessorBuilder {
            processor: Processor {
                registry,
                database_url: crate::cli::DEFAULT_DATABASE_URL.to_owned(),
                brokers: "127.0.0.1:9092".to_owned(),
                group: "cmdproc".to_owned(),
                commands_topic: Topic::parse("commands").expect("a valid topic name"),
                events_topic: Topic::parse("events").expect("a valid topic name"),
                options: Options::default(),
            },
        }
    }

    /// Migrates the database, joins the group and applies commands until `shutdown` is
    /// cancelled; then finishes the current batch, lets the relay drain within the shutdown
    /// timeout while the worker still owns its partitions, and leaves the group.
    ///
    /// # Errors
    ///
    /// When Postgres or Kafka cannot be reached at start, the metrics address cannot be
    /// bound, or the worker stops on an error it cannot retry.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RunError> {
        let options = self.options.clone();
        // A healthy batch never idles inside its transaction; a frozen worker must not keep its
        // partition locked past the point where the group has given the partition away.
        let pool = crate::store::connect_with(
            &self.database_url,
            options.db_connections,
            options.connect_timeout,
            Some(options.session_timeout),
        )
        .await?;
        crate::store::migrate(&pool).await?;
        // Bound before joining the group, so a configuration error is reported at once.
        let listener = http::listen(options.metrics_addr).await?;
        let owner = options
            .name
            .clone()
            .unwrap_or_else(crate::cli::run::default_worker_name);
        let config = WorkerConfig {
            brokers: self.brokers.clone(),
            group: self.group.clone(),
            commands_topic: self.commands_topic.clone(),
            events_topic: self.events_topic.clone(),
            batch_size: options.batch_size,
            batch_linger: options.batch_linger,
            naive: false,
            aggregate_cache: options.aggregate_cache,
            timer_tick: options.timer_tick,
            max_command_bytes: options.max_command_bytes,
            session_timeout: options.session_timeout,
            misrouted: options.misrouted,
            owner,
            plan: PlanOptions {
                poison: options.poison,
                attempts: options.poison_attempts,
            },
        };
        let config = if options.naive_baseline {
            config.naive_baseline()
        } else {
            config
        };
        let relay_tasks = TaskTracker::new();
        let metrics = Arc::new(Metrics::new());
        let relay_stop = CancellationToken::new();
        let owned = Owned::default();
        let halted = crate::commands_log::Halted::default();
        let relay_wake = if !options.relay {
            None
        } else {
            let relay = Relay::new(
                pool.clone(),
                &self.brokers,
                self.commands_topic.as_str(),
                1000,
                Some(owned.clone()),
            )?
            .with_metrics(metrics.clone())
            .with_destinations(&[self.events_topic.as_str()]);
            let wake = relay.waker();
            let token = relay_stop.clone();
            let drain = options.shutdown_timeout / 2;
            relay_tasks.spawn(async move { relay.run(token, drain).await });
            Some(wake)
        };
        tokio::spawn(prune(
            pool.clone(),
            self.commands_topic.to_string(),
            options.dedupe_window,
            options.prune_every,
            shutdown.clone(),
        ));
        let http_stop = CancellationToken::new();
        let http_task = http::spawn(
            listener,
            HttpState {
                metrics: metrics.clone(),
                owned: Some(owned.clone()),
                halted: Some(halted.clone()),
                pool: pool.clone(),
                shutdown: shutdown.clone(),
            },
            http_stop.clone(),
        );
        let worker = Worker::new(config, pool, self.registry, relay_wake, owned)
            .with_metrics(metrics.clone())
            .with_halted(halted);
        // Shutdown, in this order, owned here and nowhere else:
        // 1. the worker finishes the batch at hand and stops taking more, still a member of
        //    the group, so the partitions it committed to are still its own;
        // 2. the relay drains their outbox (within the shutdown timeout), while no other
        //    worker's relay publishes them yet;
        // 3. the worker leaves the group, and its partitions go to the other workers;
        // 4. the HTTP endpoint stops last, so a scrape during the drain still answers
        //    (`/readyz` with 503 since `shutdown`).
        // A worker that failed has left the group already; the relay still drains.
        let stopped = worker.run(shutdown.clone()).await;
        drain_relay(&relay_stop, &relay_tasks, options.shutdown_timeout).await;
        let result = stopped.map(crate::worker::InGroup::leave);
        http_stop.cancel();
        if let Some(task) = http_task {
            let _ = task.await;
        }
        tracing::info!(
            applied = metrics.commands_with(outcome::APPLIED),
            rejected = metrics.commands_with(outcome::REJECTED),
            duplicates = metrics.commands_with(outcome::DUPLICATE),
            key_reused = metrics.commands_with(outcome::KEY_REUSED),
            dead_letters = metrics.commands_with(outcome::DEAD_LETTERED),
            parked = metrics.commands_with(outcome::PARKED),
            fenced = metrics.fenced_batches.get(),
            events_published = metrics.events_published.get(),
            "worker stopped"
        );
        Ok(result?)
    }
}

/// Stops the relay running beside the worker (when there is one) and waits, at most
/// `deadline`, until it has drained the outbox.
async fn drain_relay(stop: &CancellationToken, tasks: &TaskTracker, deadline: Duration) {
    if !tasks.is_empty() {
        tracing::info!("worker stopping: draining the relay");
    }
    stop.cancel();
    tasks.close();
    if tokio::time::timeout(deadline, tasks.wait()).await.is_err() {
        tracing::warn!("relay did not drain within the shutdown timeout");
    }
}

/// Forgets, every `every`, what of `topic` is older than the dedupe window: recorded
/// outcomes, duplicate deliveries, and outbox rows already published; and records the
/// horizon for `cmdproc replay`. Every worker of the topic does it; the deletes are
/// idempotent.
async fn prune(
    pool: sqlx::PgPool,
    topic: String,
    window: Duration,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match crate::store::prune(&pool, &topic, window).await {
            Ok(p) if p.total() > 0 => tracing::info!(
                outcomes = p.outcomes,
                duplicates = p.duplicates,
                outbox = p.outbox,
                "forgot what is older than the dedupe window"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning failed; trying again later"),
        }
    }
}
