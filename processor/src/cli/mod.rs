//! The `cmdproc` command line: one file per subcommand, tied together by [`Command`].

use std::time::Duration;

use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};
use commands::{Registry, Topic};

pub mod bench;
pub mod demo;
pub mod dlq;
pub mod gateway;
pub mod inspect;
pub mod migrate;
pub mod produce;
pub mod relay;
pub mod replay;
pub mod run;
pub mod topics;
pub mod verify;

/// The database `deploy/local/postgres.sh` creates.
pub const DEFAULT_DATABASE_URL: &str = "postgres://cmdproc:cmdproc@127.0.0.1:5432/cmdproc";

/// cmdproc: a Kafka-based single-writer command processor with exactly-once effects in
/// Postgres.
///
/// Produce commands (CloudEvents keyed by aggregate id), run workers that apply them in
/// order per aggregate, and inspect the results. Start a local Kafka and Postgres with
/// `deploy/local/up.sh`, then `cmdproc migrate` and `cmdproc topics create`.
#[derive(Debug, Parser)]
#[command(name = "cmdproc", version, max_term_width = 100)]
pub struct Cli {
    /// Settings shared by every subcommand.
    #[command(flatten)]
    pub common: Common,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Settings shared by every subcommand.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "CMDPROC_BROKERS",
        default_value = "127.0.0.1:9092",
        global = true
    )]
    pub brokers: String,
    /// Postgres URL (the password is never logged).
    #[arg(long, env = "CMDPROC_DATABASE_URL", default_value = DEFAULT_DATABASE_URL, global = true, hide_default_value = true)]
    pub database_url: String,
    /// Consumer group of the workers.
    #[arg(long, env = "CMDPROC_GROUP", default_value = "cmdproc", global = true)]
    pub group: String,
    /// Topic the commands are produced to; dead letters go to `<commands-topic>.dlq`.
    #[arg(
        long,
        env = "CMDPROC_COMMANDS_TOPIC",
        default_value = "commands",
        global = true
    )]
    pub commands_topic: Topic,
    /// Topic the relay publishes events to.
    #[arg(
        long,
        env = "CMDPROC_EVENTS_TOPIC",
        default_value = "events",
        global = true
    )]
    pub events_topic: Topic,
    /// Log format.
    #[arg(long, env = "CMDPROC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// How long to wait for Kafka or Postgres before giving up on a one-shot command.
    #[arg(long, default_value = "5s", value_parser = parse_duration, global = true)]
    pub connect_timeout: Duration,
}

/// Log output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the database migrations (idempotent).
    Migrate,
    /// Manage the commands, events and dead-letter topics.
    #[command(subcommand)]
    Topics(topics::TopicsCommand),
    /// Produce commands: one from flags, or many as JSON lines from a file or stdin.
    Produce(produce::ProduceArgs),
    /// Run a worker: join the group and apply commands, with the outbox relay inside.
    Run(run::RunArgs),
    /// Run the outbox relay alone.
    Relay(relay::RelayArgs),
    /// Print an aggregate as JSON with its recent commands and events.
    Inspect(inspect::InspectArgs),
    /// Re-execute each partition's retained commands in memory, through the same handlers,
    /// and compare every aggregate (state and version) with Postgres; exit 1 on a difference.
    Verify(verify::VerifyArgs),
    /// Rewind partitions so the live workers consume them again (applied commands come back
    /// as duplicates without effect; commands never applied are applied).
    Replay(replay::ReplayArgs),
    /// Inspect and redrive dead letters and parked aggregates.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Run a demonstration: two workers, thousands of commands, a summary and the invariants.
    Demo(demo::DemoArgs),
    /// Measure throughput, latency and replay speed against a naive baseline and the
    /// database's ceiling; writes JSON and an SVG chart.
    Bench(bench::BenchArgs),
    /// Serve HTTP: POST /commands produces a command and answers with its outcome;
    /// GET /commands/{source}/{id} reads a recorded one.
    Gateway(gateway::GatewayArgs),
}

/// Parses `500ms`, `5s`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as 500ms, 5s or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => return Err(format!("`{s}` has an unknown unit; use ms, s, m, h or d")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("`{s}` is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Runs a parsed command line with the aggregates of `registry`.
pub async fn dispatch(cli: Cli, registry: Arc<Registry>) -> anyhow::Result<()> {
    let common = cli.common;
    match cli.command {
        Command::Migrate => migrate::run(&common).await,
        Command::Topics(t) => topics::run(&common, t).await,
        Command::Produce(a) => produce::run(&common, &registry, a).await,
        Command::Run(a) => run::run(&common, registry, a).await,
        Command::Relay(a) => relay::run(&common, a).await,
        Command::Inspect(a) => inspect::run(&common, &registry, a).await,
        Command::Verify(a) => verify::run(&common, &registry, a).await,
        Command::Dlq(c) => dlq::run(&common, &registry, c).await,
        Command::Replay(a) => replay::run(&common, &registry, a).await,
        Command::Demo(a) => demo::run(&common, &registry, a).await,
        Command::Bench(a) => bench::run(&common, registry, a).await,
        Command::Gateway(a) => gateway::run(&common, registry, a).await,
    }
}

/// Exit code of a process whose registry breaks its contract, or whose command line is
/// wrong.
pub const EXIT_USAGE: u8 = 2;

/// The whole `cmdproc` command line for a processor binary with the aggregates of
/// `registry`: parses the arguments, sets up logging, checks the registry and runs the
/// subcommand on a multi-threaded Tokio runtime. A binary's `main` is this one call:
///
/// ```no_run
/// fn main() -> std::process::ExitCode {
///     processor::cli::main(bank::registry())
/// }
/// ```
///
/// The registry is checked before anything else runs: a command or event without a schema,
/// or a type registered twice, ends the process at once with exit code 2 and a message
/// naming the aggregate and the command, never a dead letter later. The help text and
/// error messages use the binary's own name.
pub fn main(registry: Registry) -> std::process::ExitCode {
    use clap::{CommandFactory, FromArgMatches};

    let name = std::env::args_os()
        .next()
        .and_then(|arg| {
            std::path::Path::new(&arg)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "cmdproc".to_owned());
    // clap keeps names as `&'static str`; the process has one name for its whole life.
    let name: &'static str = Box::leak(name.into_boxed_str());
    let matches = Cli::command().name(name).bin_name(name).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CMDPROC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,rdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.common.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    if let Err(message) = crate::failpoint::refuse_without_feature() {
        eprintln!("error: {message}");
        return std::process::ExitCode::from(EXIT_USAGE);
    }
    if let Err(error) = crate::engine::check_registry(&registry) {
        eprintln!("error: {error}");
        return std::process::ExitCode::from(EXIT_USAGE);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli, Arc::new(registry))) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) if error.downcast_ref::<ExitWith>().is_some() => {
            let ExitWith(code) = error.downcast_ref::<ExitWith>().copied().expect("checked");
            std::process::ExitCode::from(code)
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Ends a subcommand with this exit code and nothing more printed: what it answers (the
/// outcome `produce --wait` waited for) is not an error of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("exit code {0}")]
pub struct ExitWith(pub u8);

/// Connects to Postgres for a one-shot command.
pub async fn pool(common: &Common, max: u32) -> anyhow::Result<sqlx::PgPool> {
    Ok(crate::store::connect(&common.database_url, max, common.connect_timeout).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("5 parsecs").is_err());
    }
}
