//! `cmdproc bench`: throughput, latency and replay speed of real worker processes against
//! the local Kafka and Postgres, side by side with a naive baseline and the database's own
//! ceiling, in one run.
//!
//! Every run gets a namespace of its own (topics, group, fresh database, as the demo's), so
//! runs never see each other's data. The runs:
//!
//! - `ceiling`: the workers' batched SQL driven from memory, no Kafka (see `ceiling`);
//! - `uniform`, `zipf`: N commands produced as fast as the producer goes while W worker
//!   processes apply them; time from the first produce to the last event published;
//!   exactly-once effects checked against the serial model at the end;
//! - `replay`: the `uniform` run's partitions rewound to offset 0 (as `cmdproc replay`
//!   does) and consumed again: every command is a duplicate without effect;
//! - `naive`: the same as `uniform` (fewer commands) with workers in `--naive-baseline` mode;
//! - `latency`: deposits offered at a fixed rate, end-to-end latency percentiles;
//! - `gateway` (only when asked for): time to an outcome through `cmdproc gateway`, against
//!   produce-and-wait-for-the-reply and produce-and-poll (see `gateway`).

mod ceiling;
mod chart;
mod gateway;
mod latency;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::producer::{CommandProducer, Delivery};
use anyhow::Context;
use chrono::Utc;
use clap::{Args, ValueEnum};
use commands::envelope::CLOUDEVENTS_JSON;
use commands::{Command, Registry};
use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::message::{Header, OwnedHeaders};
use serde::Serialize;
use sqlx::{PgPool, Row};

use super::demo::verify;
use super::demo::workers::Workers;
use super::demo::{self, Namespace};
use super::{parse_duration, Common};
use crate::harness::model::Model;
use crate::harness::workload::{Options, Skew, Workload};
use latency::Latency;

/// The runs of a benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Run {
    /// The workers' batched SQL straight against Postgres, without Kafka.
    Ceiling,
    /// Commands spread uniformly over the aggregates.
    Uniform,
    /// The uniform run's partitions replayed: every command already applied.
    Replay,
    /// Commands Zipf-skewed over the aggregates, one hot key.
    Zipf,
    /// Workers in `--naive-baseline` mode: one transaction and one offset commit per command.
    Naive,
    /// End-to-end latency at a fixed offered rate.
    Latency,
    /// Time to an outcome through `cmdproc gateway`, `produce --wait` and produce-and-poll
    /// at `--gateway-rate` (writes bench-gateway.json; not among the default runs).
    Gateway,
}

impl Run {
    fn name(self) -> &'static str {
        match self {
            Run::Ceiling => "ceiling",
            Run::Uniform => "uniform",
            Run::Replay => "replay",
            Run::Zipf => "zipf",
            Run::Naive => "naive",
            Run::Latency => "latency",
            Run::Gateway => "gateway",
        }
    }
}

/// Arguments of `bench`.
#[derive(Debug, Clone, Args, Serialize)]
#[command(
    after_help = "Writes <out>/bench.json and <out>/bench.svg. Each run creates its own \
    topics, consumer group and database (cmdproc_bench_<time>) on the servers of --brokers and \
    --database-url and drops the database and deletes the topics afterwards. Workers are real `cmdproc run` processes \
    of this executable: benchmark a release build (cargo build --release)."
)]
pub struct BenchArgs {
    /// Commands of each throughput run (ceiling, uniform, zipf).
    #[arg(long, default_value_t = 200_000)]
    pub commands: usize,
    /// Aggregates (accounts) the commands are spread over; each is opened first.
    #[arg(long, default_value_t = 10_000)]
    pub aggregates: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: u32,
    /// Partitions of the commands and events topics.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(i32).range(1..=256))]
    pub partitions: i32,
    /// Exponent of the Zipf run: the account of rank k is picked with probability
    /// proportional to 1/k^s (with 10,000 accounts and 1.1, the hottest gets about 15 %).
    #[arg(long, default_value_t = 1.1)]
    pub zipf_exponent: f64,
    /// Commands of the naive baseline (it is slow: about a minute at the default).
    #[arg(long, default_value_t = 10_000)]
    pub naive_commands: usize,
    /// Offered rate of the latency run, commands per second.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate: u32,
    /// Length of the latency run.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub latency_duration: Duration,
    /// Offered rate of the gateway run (each of its three ways), requests per second.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub gateway_rate: u32,
    /// Batch size of the workers (and of the ceiling).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,
    /// Which runs, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Run::Ceiling, Run::Uniform, Run::Replay, Run::Zipf, Run::Naive, Run::Latency])]
    pub runs: Vec<Run>,
    /// Directory for bench.json and bench.svg.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// Seed of the workload.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Fail a run that takes longer than this.
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    #[serde(skip)]
    pub timeout: Duration,
    /// Target of the uniform run, commands per second with exactly-once effects verified:
    /// reported as met or missed. No target unless given (BENCHMARKS.md has the project's).
    #[arg(long, value_name = "COMMANDS_PER_S")]
    pub target_throughput: Option<f64>,
    /// Target of the uniform run's rate divided by the naive baseline's (e.g. 15).
    #[arg(long, value_name = "RATIO")]
    pub target_vs_naive: Option<f64>,
    /// Target of the uniform run's rate divided by the database ceiling's (e.g. 0.6).
    #[arg(long, value_name = "RATIO")]
    pub target_vs_ceiling: Option<f64>,
    /// Target of the latency run's p99 end-to-end latency, milliseconds at most.
    #[arg(long, value_name = "MS")]
    pub target_p99_ms: Option<f64>,
    /// Target of the replay run, commands per second.
    #[arg(long, value_name = "COMMANDS_PER_S")]
    pub target_replay: Option<f64>,
}

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// Which run.
    pub run: Run,
    /// What was measured, in words.
    pub measured: String,
    /// Messages the run processed.
    pub commands: usize,
    /// Seconds the measured span took.
    pub seconds: f64,
    /// `commands / seconds`.
    pub commands_per_second: f64,
    /// Latency percentiles (latency run only).
    #[serde(skip_serializing_if = "Option::is_none")]
    latency: Option<Latency>,
    /// Peak resident memory of the largest worker, MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_worker_memory_mib: Option<f64>,
    /// Every effect exactly once, as the serial model says (None: not checked in this run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exactly_once: Option<bool>,
    /// The checks behind `exactly_once`, one line each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<String>,
}

/// A target of the benchmark and whether this run met it.
#[derive(Debug, Clone, Serialize)]
struct Target {
    what: &'static str,
    target: String,
    measured: String,
    met: bool,
}

/// The JSON report.
#[derive(Debug, Serialize)]
struct Report {
    started_at: String,
    seconds: f64,
    machine: Machine,
    settings: BenchArgs,
    runs: Vec<RunResult>,
    targets: Vec<Target>,
}

/// What the figures were measured on.
#[derive(Debug, Serialize)]
struct Machine {
    cpus: usize,
    cpu_model: String,
    memory_gib: f64,
    kernel: String,
    cmdproc_version: &'static str,
    build: &'static str,
}

impl Machine {
    fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |text: &str, name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_default()
        };
        let mem_kib: f64 = field(&meminfo, "MemTotal")
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap_or(0.0);
        Self {
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model: field(&cpuinfo, "model name"),
            memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            cmdproc_version: env!("CARGO_PKG_VERSION"),
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        }
    }
}

/// Runs the benchmark; fails if a run fails or its effects are not exactly once.
pub async fn run(common: &Common, registry: Arc<Registry>, args: BenchArgs) -> anyhow::Result<()> {
    demo::require_example_domains(&registry)?;
    anyhow::ensure!(
        args.commands >= 1 && args.naive_commands >= 1,
        "--commands and --naive-commands must be at least 1"
    );
    anyhow::ensure!(
        args.zipf_exponent > 0.0 && args.zipf_exponent.is_finite(),
        "--zipf-exponent must be a positive number"
    );
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut runs = args.runs.clone();
    runs.sort_unstable();
    runs.dedup();
    if runs.contains(&Run::Replay) && !runs.contains(&Run::Uniform) {
        anyhow::bail!("--runs replay replays the uniform run: add uniform");
    }
    let started = Instant::now();
    let started_at = Utc::now().to_rfc3339();
    let machine = Machine::read();
    println!(
        "cmdproc bench: {} worker(s), {} partitions, {} commands over {} aggregates, runs: {} ({} build, {} CPUs)",
        args.workers,
        args.partitions,
        args.commands,
        args.aggregates,
        runs.iter().map(|r| r.name()).collect::<Vec<_>>().join(", "),
        machine.build,
        machine.cpus,
    );
    if machine.build == "debug" {
        println!("      note: this is a debug build; figures are far below a release build's");
    }

    let mut results: Vec<RunResult> = Vec::new();
    for run in &runs {
        let got = match run {
            Run::Ceiling => vec![ceiling_run(common, &registry, &args).await?],
            Run::Uniform => {
                let commands = throughput_commands(&args, Skew::Uniform)?;
                let replay = runs.contains(&Run::Replay);
                with_workers(
                    common,
                    &registry,
                    &args,
                    Run::Uniform,
                    commands,
                    &[],
                    replay,
                )
                .await?
            }
            Run::Replay => Vec::new(),
            Run::Zipf => {
                let commands = throughput_commands(&args, Skew::Zipf(args.zipf_exponent))?;
                with_workers(common, &registry, &args, Run::Zipf, commands, &[], false).await?
            }
            Run::Naive => {
                let commands = commands(
                    args.seed,
                    args.naive_commands,
                    args.aggregates.min(args.naive_commands),
                    Skew::Uniform,
                    Mix::DepositsAndWithdrawals,
                )?;
                with_workers(
                    common,
                    &registry,
                    &args,
                    Run::Naive,
                    commands,
                    &["--naive-baseline"],
                    false,
                )
                .await?
            }
            Run::Latency => {
                let total = (f64::from(args.rate) * args.latency_duration.as_secs_f64()) as usize;
                let commands = commands(
                    args.seed,
                    total.max(1),
                    args.aggregates.min(total.max(1) / 4).max(1),
                    Skew::Uniform,
                    Mix::DepositsOnly,
                )?;
                with_workers(common, &registry, &args, Run::Latency, commands, &[], false).await?
            }
            Run::Gateway => {
                gateway::run(common, &registry, &args).await?;
                Vec::new()
            }
        };
        for r in &got {
            print_result(r);
        }
        results.extend(got);
    }

    let targets = targets(&args, &results);
    if !targets.is_empty() {
        println!("targets");
        for t in &targets {
            println!(
                "  [{}] {}: {} (target {})",
                if t.met { "met" } else { "MISSED" },
                t.what,
                t.measured,
                t.target
            );
        }
    }
    let report = Report {
        started_at,
        seconds: started.elapsed().as_secs_f64(),
        machine,
        settings: args.clone(),
        runs: results.clone(),
        targets,
    };
    let json_path = args.out.join("bench.json");
    std::fs::write(&json_path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    let svg_path = args.out.join("bench.svg");
    let throughput: Vec<(String, f64)> = results
        .iter()
        .filter(|r| r.run != Run::Latency)
        .map(|r| (r.run.name().to_owned(), r.commands_per_second))
        .collect();
    let latency: Vec<(String, f64)> = results
        .iter()
        .filter_map(|r| r.latency.as_ref())
        .flat_map(|l| {
            [
                ("p50".to_owned(), l.end_to_end.p50_ms),
                ("p95".to_owned(), l.end_to_end.p95_ms),
                ("p99".to_owned(), l.end_to_end.p99_ms),
            ]
        })
        .collect();
    let title = format!(
        "cmdproc bench: {} workers, {} partitions, {} CPUs ({})",
        args.workers, args.partitions, report.machine.cpus, report.machine.build
    );
    chart::draw(&svg_path, &title, &throughput, &latency)?;
    println!(
        "wrote {} and {} in {:.0}s",
        json_path.display(),
        svg_path.display(),
        report.seconds
    );
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| r.exactly_once == Some(false))
        .map(|r| r.run.name())
        .collect();
    if !failed.is_empty() {
        anyhow::bail!(
            "effects were not exactly once in: {}; see the checks above",
            failed.join(", ")
        );
    }
    Ok(())
}

fn print_result(r: &RunResult) {
    let mut line = format!(
        "{:<8} {:>9.0} commands/s  ({} in {:.2}s: {})",
        r.run.name(),
        r.commands_per_second,
        r.commands,
        r.seconds,
        r.measured
    );
    if let Some(l) = &r.latency {
        let p = |p: &latency::Percentiles| {
            format!(
                "p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                p.p50_ms, p.p95_ms, p.p99_ms, p.max_ms
            )
        };
        line.push_str(&format!(
            "\n         latency {} ({} samples)\n           to the relay's send: {}\n           relay's send to visible: {}",
            p(&l.end_to_end),
            l.samples,
            p(&l.to_relay_send),
            p(&l.relay_send_to_visible)
        ));
    }
    if let Some(m) = r.peak_worker_memory_mib {
        line.push_str(&format!("\n         peak worker memory {m:.0} MiB"));
    }
    if let Some(ok) = r.exactly_once {
        line.push_str(&format!(
            "\n         exactly-once effects: {}",
            if ok { "verified" } else { "FAILED" }
        ));
        if !ok {
            for c in &r.checks {
                line.push_str(&format!("\n           {c}"));
            }
        }
    }
    println!("{line}");
}

/// The targets given as flags, judged on whatever runs there are. None is built in:
/// whether a figure is good enough depends on the machine, so it is the caller's to say.
fn targets(args: &BenchArgs, results: &[RunResult]) -> Vec<Target> {
    let get = |run: Run| results.iter().find(|r| r.run == run);
    let mut out = Vec::new();
    if let Some(u) = get(Run::Uniform) {
        if let Some(target) = args.target_throughput {
            out.push(Target {
                what: "sustained throughput, exactly-once verified (uniform)",
                target: format!(">= {target} commands/s"),
                measured: format!("{:.0} commands/s", u.commands_per_second),
                met: u.commands_per_second >= target && u.exactly_once == Some(true),
            });
        }
        if let (Some(n), Some(target)) = (get(Run::Naive), args.target_vs_naive) {
            let ratio = u.commands_per_second / n.commands_per_second;
            out.push(Target {
                what: "uniform / naive baseline",
                target: format!(">= {target}x"),
                measured: format!("{ratio:.1}x"),
                met: ratio >= target,
            });
        }
        if let (Some(c), Some(target)) = (get(Run::Ceiling), args.target_vs_ceiling) {
            let ratio = u.commands_per_second / c.commands_per_second;
            out.push(Target {
                what: "uniform / database ceiling",
                target: format!(">= {target}"),
                measured: format!("{ratio:.2}"),
                met: ratio >= target,
            });
        }
    }
    if let (Some(l), Some(target)) = (
        get(Run::Latency).and_then(|r| r.latency.as_ref()),
        args.target_p99_ms,
    ) {
        out.push(Target {
            what: "p99 end-to-end latency at the offered rate",
            target: format!("<= {target} ms"),
            measured: format!("{:.1} ms", l.end_to_end.p99_ms),
            met: l.end_to_end.p99_ms <= target,
        });
    }
    if let (Some(r), Some(target)) = (get(Run::Replay), args.target_replay) {
        out.push(Target {
            what: "replay of already-applied commands",
            target: format!(">= {target} commands/s"),
            measured: format!("{:.0} commands/s", r.commands_per_second),
            met: r.commands_per_second >= target,
        });
    }
    out
}

/// The aggregate cache of the ceiling's tasks: the workers' default (`cmdproc run
/// --aggregate-cache`).
const CEILING_CACHE: usize = 100_000;

/// A fresh database of its own for a run; dropped when the run ends.
struct RunDatabase {
    admin: PgPool,
    ns: Namespace,
    url: String,
    pool: PgPool,
}

impl RunDatabase {
    async fn create(common: &Common) -> anyhow::Result<Self> {
        let ns = Namespace::new("bench")?;
        let admin = demo::admin_pool(common).await?;
        demo::create_database(&admin, &ns.database).await?;
        let url = demo::database_url(&common.database_url, &ns.database)?;
        let pool = crate::store::connect(&url, 8, common.connect_timeout).await?;
        crate::store::migrate(&pool).await?;
        Ok(Self {
            admin,
            ns,
            url,
            pool,
        })
    }

    /// Drops the database and deletes the run's topics: a benchmark's topics are large,
    /// and a broker carrying thousands of stale partitions is slower for the next run.
    async fn drop(self, common: &Common) {
        let topics = [
            self.ns.commands.as_str(),
            self.ns.events.as_str(),
            self.ns.dead_letters.as_str(),
        ];
        if let Err(e) =
            crate::topics::delete(&common.brokers, &topics, common.connect_timeout).await
        {
            println!("      could not delete the run's topics: {e}");
        }
        self.pool.close().await;
        if let Err(e) = demo::drop_database(&self.admin, &self.ns.database).await {
            println!("      could not drop database {}: {e:#}", self.ns.database);
        }
        self.admin.close().await;
    }
}

/// The `source` of every benchmark command.
const SOURCE: &str = "/cmdproc-bench";

/// What the commands after the opens do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mix {
    /// 80 % deposits, 20 % withdrawals (a few refused for insufficient funds).
    DepositsAndWithdrawals,
    /// Deposits only: every command emits exactly one event.
    DepositsOnly,
}

/// `total` commands from the shared workload generator: one `account.Open` for each of
/// `aggregates` accounts (fewer when `total` is smaller), then deposits and withdrawals
/// picked by `skew`. Seeded, so a rerun produces the same commands.
fn commands(
    seed: u64,
    total: usize,
    aggregates: usize,
    skew: Skew,
    mix: Mix,
) -> anyhow::Result<Vec<Command>> {
    anyhow::ensure!(aggregates >= 1, "--aggregates must be at least 1");
    let workload = Workload::generate(&Options {
        source: SOURCE.to_owned(),
        accounts: aggregates,
        rooms: 0,
        skew,
        withdrawals: match mix {
            Mix::DepositsAndWithdrawals => 0.2,
            Mix::DepositsOnly => 0.0,
        },
        overdrafts: 0.0,
        ..Options::new(seed, total)
    })?;
    Ok(workload.valid)
}

/// The commands of a throughput run (ceiling, uniform, zipf).
fn throughput_commands(args: &BenchArgs, skew: Skew) -> anyhow::Result<Vec<Command>> {
    commands(
        args.seed,
        args.commands,
        args.aggregates,
        skew,
        Mix::DepositsAndWithdrawals,
    )
}

async fn ceiling_run(
    common: &Common,
    registry: &Arc<Registry>,
    args: &BenchArgs,
) -> anyhow::Result<RunResult> {
    let commands = throughput_commands(args, Skew::Uniform)?;
    println!(
        "ceiling  applying {} commands straight to Postgres",
        commands.len()
    );
    let db = RunDatabase::create(common).await?;
    let result = ceiling::run(
        &db.pool,
        registry,
        &db.ns,
        args.partitions,
        args.workers,
        args.batch_size as usize,
        CEILING_CACHE,
        &commands,
    )
    .await;
    db.drop(common).await;
    let (elapsed, processed) = result?;
    anyhow::ensure!(
        processed == commands.len(),
        "the ceiling run processed {processed} of {} commands",
        commands.len()
    );
    Ok(RunResult {
        run: Run::Ceiling,
        measured: format!(
            "{} tasks calling the workers' batch function, no Kafka, no relay",
            args.workers
        ),
        commands: processed,
        seconds: elapsed.as_secs_f64(),
        commands_per_second: processed as f64 / elapsed.as_secs_f64(),
        latency: None,
        peak_worker_memory_mib: None,
        exactly_once: None,
        checks: Vec::new(),
    })
}

/// A run with real worker processes: namespace, workers, the run, checks, cleanup.
async fn with_workers(
    common: &Common,
    registry: &Registry,
    args: &BenchArgs,
    run: Run,
    commands: Vec<Command>,
    extra: &[&str],
    replay: bool,
) -> anyhow::Result<Vec<RunResult>> {
    let db = RunDatabase::create(common).await?;
    let ns = &db.ns;
    let topics: Vec<(String, i32)> = [&ns.commands, &ns.events, &ns.dead_letters]
        .iter()
        .map(|t| (t.to_string(), args.partitions))
        .collect();
    let result = async {
        crate::topics::create(&common.brokers, &topics, 1, common.connect_timeout).await?;
        let dir = std::env::temp_dir().join(format!("cmdproc-bench-{}", ns.id));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut workers = Workers::new(dir.clone());
        let batch = args.batch_size.to_string();
        let mut worker_args = vec!["--batch-size", batch.as_str()];
        worker_args.extend_from_slice(extra);
        demo::spawn_workers(
            common,
            ns,
            &db.url,
            &mut workers,
            args.workers,
            &worker_args,
        )?;
        let outcome = tokio::select! {
            r = measure(common, registry, args, run, &db, &mut workers, commands, replay) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        };
        workers.stop(demo::STOP_GRACE).await;
        if outcome.is_err() {
            eprint!("{}", workers.log_tails(demo::LOG_TAIL));
            eprintln!("worker logs are in {}", dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&dir);
        }
        outcome
    }
    .await;
    db.drop(common).await;
    result
}

fn bar(len: u64, prefix: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix:<8} [{bar:40}] {pos}/{len} {msg} ({elapsed})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_owned());
    bar
}

// The bench's knobs, passed as they are; bundling them would only rename them.
#[allow(clippy::too_many_arguments)]
async fn measure(
    common: &Common,
    registry: &Registry,
    args: &BenchArgs,
    run: Run,
    db: &RunDatabase,
    workers: &mut Workers,
    commands: Vec<Command>,
    replay: bool,
) -> anyhow::Result<Vec<RunResult>> {
    let ns = &db.ns;
    let expected = (args.workers as usize).min(args.partitions as usize);
    verify::wait_ready(
        &db.pool,
        ns.commands.as_str(),
        args.partitions,
        expected,
        workers,
        demo::JOIN_TIMEOUT,
    )
    .await?;
    let model = Model::run(registry, &commands)?;
    let n = commands.len();
    let mut out = Vec::new();

    if run == Run::Latency {
        let progress = bar(n as u64, "latency");
        progress.set_message(format!("sent at {}/s", args.rate));
        let latency = latency::measure(
            &common.brokers,
            ns,
            args.partitions,
            commands.clone(),
            args.rate,
            Duration::from_secs(2),
            &progress,
        )
        .await;
        progress.finish_and_clear();
        let (latency, deliveries) = latency?;
        let seconds = n as f64 / f64::from(args.rate);
        let (exactly_once, checks) = check(common, db, commands, &deliveries, &model).await?;
        out.push(RunResult {
            run,
            measured: format!(
                "offered {} commands/s; produce call to event visible to a read_committed consumer; first 2 s not counted",
                args.rate
            ),
            commands: n,
            seconds,
            commands_per_second: n as f64 / seconds,
            latency: Some(latency),
            peak_worker_memory_mib: peak_mib(workers),
            exactly_once: Some(exactly_once),
            checks,
        });
        return Ok(out);
    }

    // Payloads are encoded before the clock starts: the benchmark measures cmdproc, not
    // the encoding of its input.
    let payloads: Vec<(Vec<u8>, Vec<u8>)> = commands
        .iter()
        .map(|c| (c.subject.as_str().as_bytes().to_vec(), c.encode()))
        .collect();
    let producer = CommandProducer::new(
        &common.brokers,
        ns.commands.clone(),
        Duration::from_secs(60),
    )?;
    let progress = bar(n as u64, run.name());
    progress.set_message("producing");
    let started = Instant::now();
    let sends = payloads.iter().map(|(k, v)| {
        let producer = &producer;
        async move {
            let headers = OwnedHeaders::new().insert(Header {
                key: "content-type",
                value: Some(CLOUDEVENTS_JSON),
            });
            producer.send_raw(Some(k), Some(v), Some(headers)).await
        }
    });
    let deliveries: Vec<Delivery> = futures::stream::iter(sends)
        .buffered(10_000)
        .inspect(|_| progress.inc(1))
        .try_collect()
        .await?;
    let produced_in = started.elapsed();
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for d in &deliveries {
        let end = ends.entry(d.partition).or_default();
        *end = (*end).max(d.offset + 1);
    }
    let (elapsed, _) = wait_done(db, &ends, workers, &progress, started, args.timeout).await?;
    progress.finish_and_clear();
    let peak = peak_mib(workers);
    let (exactly_once, checks) = check(common, db, commands, &deliveries, &model).await?;
    out.push(RunResult {
        run,
        measured: format!(
            "first produce to last event published (produced in {:.2}s){}",
            produced_in.as_secs_f64(),
            if run == Run::Naive {
                "; one transaction and one synchronous offset commit per command"
            } else {
                ""
            }
        ),
        commands: n,
        seconds: elapsed.as_secs_f64(),
        commands_per_second: n as f64 / elapsed.as_secs_f64(),
        latency: None,
        peak_worker_memory_mib: peak,
        exactly_once: Some(exactly_once),
        checks,
    });

    if replay {
        out.push(replay_run(db, &ends, workers, args.timeout).await?);
    }
    Ok(out)
}

/// Waits until every partition's stored offset reaches `ends` and the outbox is published,
/// polling every 10 ms; returns the time since `since`, and when processing first showed.
async fn wait_done(
    db: &RunDatabase,
    ends: &BTreeMap<i32, i64>,
    workers: &mut Workers,
    progress: &ProgressBar,
    since: Instant,
    timeout: Duration,
) -> anyhow::Result<(Duration, Option<(Instant, i64)>)> {
    let mut first = None;
    loop {
        let p = verify::progress(&db.pool, db.ns.commands.as_str(), ends).await?;
        if first.is_none() && p.processed > 0 {
            first = Some((Instant::now(), p.processed));
        }
        progress.set_length(p.produced as u64);
        progress.set_position(p.processed as u64);
        progress.set_message(format!(
            "processed; {} / {} events published",
            p.published, p.outbox
        ));
        if p.done {
            return Ok((since.elapsed(), first));
        }
        if since.elapsed() > timeout {
            anyhow::bail!("timed out after {}s: {p}", timeout.as_secs());
        }
        workers.check_alive()?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Rewinds every partition to offset 0 as `cmdproc replay` does, and measures how fast the
/// workers get through the already-applied commands again. Checks that nothing changed.
async fn replay_run(
    db: &RunDatabase,
    ends: &BTreeMap<i32, i64>,
    workers: &mut Workers,
    timeout: Duration,
) -> anyhow::Result<RunResult> {
    let topic = db.ns.commands.as_str();
    let before = fingerprint(&db.pool, topic).await?;
    let total: i64 = ends.values().sum();
    let progress = bar(total as u64, "replay");
    let started = Instant::now();
    for p in ends.keys() {
        crate::store::rewind_partition(&db.pool, topic, *p, 0).await?;
    }
    let (elapsed, first) = wait_done(db, ends, workers, &progress, started, timeout).await?;
    progress.finish_and_clear();
    let (noticed, at_first) = first.context("the replay made no progress")?;
    // The workers notice a rewind at their next epoch check (every second); the rate is
    // measured from the first progress seen, over what was left to do then.
    let busy = started
        .elapsed()
        .saturating_sub(noticed.duration_since(started));
    let done = (total - at_first) as f64;
    let after = fingerprint(&db.pool, topic).await?;
    let mut checks = Vec::new();
    let unchanged = before == after;
    checks.push(format!(
        "{} aggregates, processed commands, events and outbox unchanged: {}",
        if unchanged { "pass" } else { "FAIL" },
        if unchanged {
            format!("{before:?}")
        } else {
            format!("before {before:?}, after {after:?}")
        }
    ));
    Ok(RunResult {
        run: Run::Replay,
        measured: format!(
            "all partitions rewound to offset 0; rate from the first re-processed batch (noticed after {:.2}s, {:.2}s in all)",
            noticed.duration_since(started).as_secs_f64(),
            elapsed.as_secs_f64()
        ),
        commands: total as usize,
        seconds: busy.as_secs_f64(),
        commands_per_second: done / busy.as_secs_f64().max(1e-9),
        latency: None,
        peak_worker_memory_mib: peak_mib(workers),
        exactly_once: Some(unchanged),
        checks,
    })
}

/// A summary of everything a replay must leave alone: an md5 of the aggregates, and the
/// counts of processed commands, events and outbox rows.
async fn fingerprint(pool: &PgPool, topic: &str) -> anyhow::Result<(String, i64, i64, i64)> {
    let row = sqlx::query(
        "SELECT (SELECT md5(string_agg(aggregate_type || '/' || aggregate_id || '@' || version || state::text, ',' ORDER BY aggregate_type, aggregate_id)) FROM aggregates),
                (SELECT count(*) FROM processed_commands WHERE topic = $1),
                (SELECT count(*) FROM events),
                (SELECT COALESCE(sum(outbox_seq), 0)::bigint FROM partitions WHERE topic = $1)",
    )
    .bind(topic)
    .fetch_one(pool)
    .await?;
    Ok((
        row.get::<Option<String>, _>(0).unwrap_or_default(),
        row.get(1),
        row.get(2),
        row.get(3),
    ))
}

/// The demo's invariants over this run: state, versions and outcomes equal the serial
/// model's, the events topic holds each stored event exactly once, and nothing landing
/// where `deliveries` (command for command) says was dead-lettered or taken for a duplicate.
async fn check(
    common: &Common,
    db: &RunDatabase,
    commands: Vec<Command>,
    deliveries: &[Delivery],
    model: &Model,
) -> anyhow::Result<(bool, Vec<String>)> {
    let ns = &db.ns;
    let observed = verify::observe(
        &db.pool,
        &common.brokers,
        ns.commands.as_str(),
        ns.events.as_str(),
        ns.dead_letters.as_str(),
    )
    .await?;
    let workload = Workload::of_commands(commands);
    let checks = verify::checks(&workload, model, deliveries, &observed);
    let ok = checks.iter().all(|c| c.pass);
    Ok((ok, checks.iter().map(|c| c.to_string()).collect()))
}

fn peak_mib(workers: &Workers) -> Option<f64> {
    workers
        .peak_memory()
        .into_iter()
        .filter_map(|(_, b)| b)
        .max()
        .map(|b| b as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn result(run: Run, commands_per_second: f64) -> RunResult {
        RunResult {
            run,
            measured: String::new(),
            commands: 1,
            seconds: 1.0,
            commands_per_second,
            latency: None,
            peak_worker_memory_mib: None,
            exactly_once: Some(true),
            checks: Vec::new(),
        }
    }

    #[test]
    fn targets_are_only_the_ones_given() {
        let results = [
            result(Run::Ceiling, 1_000.0),
            result(Run::Uniform, 700.0),
            result(Run::Replay, 5_000.0),
            result(Run::Naive, 10.0),
        ];
        let none = Cli::parse_from(["bench"]).bench;
        assert!(targets(&none, &results).is_empty());

        let given = Cli::parse_from([
            "bench",
            "--target-throughput",
            "500",
            "--target-vs-ceiling",
            "0.8",
            "--target-replay",
            "4000",
        ])
        .bench;
        let judged: Vec<(&str, bool)> = targets(&given, &results)
            .iter()
            .map(|t| (t.what, t.met))
            .collect();
        assert_eq!(
            judged,
            [
                (
                    "sustained throughput, exactly-once verified (uniform)",
                    true
                ),
                ("uniform / database ceiling", false),
                ("replay of already-applied commands", true),
            ]
        );
    }
}
