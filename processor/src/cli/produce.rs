//! `cmdproc produce`: one command from flags, or JSON lines from a file or stdin.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use crate::producer::CommandProducer;
use anyhow::Context;
use clap::Args;
use commands::{AggregateId, Command, CommandId, CommandType, Source};
use commands::{Registry, SchemaSet};
use futures::StreamExt;
use serde_json::Value;

use super::Common;

/// Arguments of `produce`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["command_type", "file"])))]
pub struct ProduceArgs {
    /// Command type, e.g. `account.Deposit`.
    #[arg(long = "type", requires_all = ["subject"])]
    pub command_type: Option<String>,
    /// Aggregate id, e.g. `acc-42`; also the message key.
    #[arg(long)]
    pub subject: Option<String>,
    /// The command's data as JSON, e.g. '{"amount": 500}'.
    #[arg(long, default_value = "{}")]
    pub data: String,
    /// Command id; with the source it is the idempotency key (default: a new UUID).
    #[arg(long)]
    pub id: Option<String>,
    /// The sender, a URI-reference.
    #[arg(long, default_value = "/cmdproc-cli")]
    pub source: String,
    /// Reject unless the aggregate is at this version.
    #[arg(long)]
    pub expected_version: Option<u64>,
    /// Carried onto the resulting events.
    #[arg(long)]
    pub correlation_id: Option<String>,
    /// JSON lines of structured CloudEvents to produce; `-` reads stdin.
    #[arg(long, conflicts_with_all = ["command_type", "subject", "id", "expected_version", "correlation_id"])]
    pub file: Option<PathBuf>,
    /// Print only the summary.
    #[arg(long)]
    pub quiet: bool,
}

/// Validates every command, then produces them in order and prints where each landed.
pub async fn run(common: &Common, registry: &Registry, args: ProduceArgs) -> anyhow::Result<()> {
    let schemas = registry.schemas();
    let commands = match &args.file {
        Some(path) => read_lines(path, schemas)?,
        None => vec![from_flags(&args, schemas)?],
    };
    let producer = CommandProducer::new(
        &common.brokers,
        common.commands_topic.clone(),
        Duration::from_secs(30),
    )?;
    crate::topics::check_reachable(&common.brokers, common.connect_timeout)?;
    let total = commands.len();
    // Futures are polled in order, so messages are enqueued in order: per-key order holds.
    let mut results =
        futures::stream::iter(commands.iter().map(|c| producer.send(c))).buffered(1000);
    let mut i = 0;
    while let Some(r) = results.next().await {
        let c = &commands[i];
        i += 1;
        let d = r.with_context(|| format!("producing command {} ({})", c.id, c.command_type))?;
        if !args.quiet {
            println!(
                "{} {} {} -> partition {} offset {}",
                c.id, c.command_type, c.subject, d.partition, d.offset
            );
        }
    }
    eprintln!("produced {total} command(s) to {}", common.commands_topic);
    Ok(())
}

fn from_flags(args: &ProduceArgs, schemas: &SchemaSet) -> anyhow::Result<Command> {
    let data: Value = serde_json::from_str(&args.data).context("--data is not valid JSON")?;
    let ty = CommandType::parse(args.command_type.clone().unwrap_or_default())?;
    let subject = AggregateId::parse(args.subject.clone().unwrap_or_default())?;
    let id = CommandId::parse(
        args.id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
    )?;
    let mut c = Command::new(Source::parse(args.source.clone())?, id, ty, subject, data);
    c.expected_version = args.expected_version;
    c.correlation_id = args.correlation_id.clone();
    Command::from_json(c.to_json(), schemas).map_err(|e| anyhow::anyhow!("invalid command: {e}"))
}

fn read_lines(path: &PathBuf, schemas: &SchemaSet) -> anyhow::Result<Vec<Command>> {
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        ))
    };
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading line {}", n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(&line)
            .map_err(|e| format!("not JSON: {e}"))
            .and_then(|v| Command::from_json(v, schemas).map_err(|e| e.to_string()));
        match parsed {
            Ok(c) => out.push(c),
            Err(e) => errors.push(format!("line {}: {e}", n + 1)),
        }
    }
    if !errors.is_empty() {
        for e in errors.iter().take(20) {
            eprintln!("{e}");
        }
        anyhow::bail!("{} invalid line(s); nothing was produced", errors.len());
    }
    Ok(out)
}
