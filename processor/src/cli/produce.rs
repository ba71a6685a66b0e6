//! `cmdproc produce`: one command from flags, or JSON lines from a file or stdin; with
//! `--wait`, each command asks for a reply and the exit code says its outcome.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use crate::producer::CommandProducer;
use crate::replies::ReplyWaiter;
use anyhow::Context;
use clap::Args;
use commands::reply::{Reply, ReplyOutcome};
use commands::{AggregateId, Command, CommandId, CommandType, Source, Topic};
use commands::{Registry, SchemaSet};
use futures::StreamExt;
use serde_json::Value;

use super::Common;

/// Exit code of `produce --wait` when a command was rejected by its aggregate, or its
/// idempotency key was reused with another payload (`key_reused`).
pub const EXIT_REJECTED: u8 = 3;
/// Exit code of `produce --wait` when a command was dead-lettered, or skipped by an operator.
pub const EXIT_DEAD_LETTERED: u8 = 4;
/// Exit code of `produce --wait` when no reply came within `--timeout`.
pub const EXIT_TIMED_OUT: u8 = 5;

/// Arguments of `produce`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["command_type", "file"])))]
#[command(after_help = "\
With --wait, each command carries the `replyto` extension and the reply is printed on \
stdout (where each command landed goes to stderr). Exit codes with --wait: 0 applied \
(also a duplicate of an applied command), 3 rejected or key reused, 4 dead-lettered or \
skipped, 5 no reply within --timeout, 1 an error (no broker, no reply topic, ...), 2 a wrong \
command line. With several commands (--file) the exit code is the worst of theirs, in \
that order: 5, 4, 3, 0.")]
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
    /// Print only the summary (and, with --wait, the replies).
    #[arg(long)]
    pub quiet: bool,
    /// Ask for each command's outcome (the `replyto` extension), wait for the replies and
    /// print them; the exit code says the outcome (below). Needs a worker running and the
    /// reply topic (`cmdproc topics create` makes the default one).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits for the replies after producing, e.g. 500ms, 10s, 2m.
    #[arg(long, default_value = "10s", value_parser = super::parse_duration, requires = "wait")]
    pub timeout: Duration,
    /// The topic the replies go to (default: `<commands-topic>.replies`).
    #[arg(long, requires = "wait")]
    pub reply_topic: Option<Topic>,
    /// Print each reply as one JSON line (the reply's `data`: command, outcome, ...,
    /// duplicate) instead of a sentence.
    #[arg(long, requires = "wait")]
    pub json: bool,
}

/// Validates every command, then produces them in order and prints where each landed.
///
/// With `--wait` it then waits for the replies, prints them and ends the process with the
/// exit code of the worst outcome (see [`EXIT_REJECTED`] and the others) when that is not 0.
pub async fn run(common: &Common, registry: &Registry, args: ProduceArgs) -> anyhow::Result<()> {
    let schemas = registry.schemas();
    let mut commands = match &args.file {
        Some(path) => read_lines(path, schemas)?,
        None => vec![from_flags(&args, schemas)?],
    };
    let producer = CommandProducer::new(
        &common.brokers,
        common.commands_topic.clone(),
        Duration::from_secs(30),
    )?;
    crate::topics::check_reachable(&common.brokers, common.connect_timeout)?;
    // The waiter reads the reply topic from where it ends now and every command says what it
    // waits for before it is produced, so no reply can come too early to be seen. A missing
    // reply topic fails here, before anything is produced.
    let mut waiting = None;
    if args.wait {
        let reply_topic = args
            .reply_topic
            .clone()
            .unwrap_or_else(|| common.commands_topic.replies());
        let waiter = ReplyWaiter::start(&common.brokers, &reply_topic).await?;
        let pending: Vec<_> = commands
            .iter()
            .map(|c| waiter.expect(c.source.as_str(), c.id.as_str()))
            .collect();
        commands = commands
            .into_iter()
            .map(|c| c.with_reply_to(reply_topic.clone()))
            .collect();
        waiting = Some((waiter, pending));
    }
    let total = commands.len();
    // Futures are polled in order, so messages are enqueued in order: per-key order holds.
    let mut results =
        futures::stream::iter(commands.iter().map(|c| producer.send(c))).buffered(1000);
    let mut i = 0;
    while let Some(r) = results.next().await {
        let c = &commands[i];
        i += 1;
        let d = r.with_context(|| format!("producing command {} ({})", c.id, c.command_type))?;
        let landed = format!(
            "{} {} {} -> partition {} offset {}",
            c.id, c.command_type, c.subject, d.partition, d.offset
        );
        match (args.quiet, args.wait) {
            (true, _) => {}
            // With --wait, stdout carries the replies alone.
            (false, true) => eprintln!("{landed}"),
            (false, false) => println!("{landed}"),
        }
    }
    drop(results);
    eprintln!("produced {total} command(s) to {}", common.commands_topic);
    let Some((waiter, pending)) = waiting else {
        return Ok(());
    };
    let code = print_replies(&commands, pending, &args, waiter.topic()).await;
    drop(waiter);
    if code != 0 {
        // An outcome is not an error of this process: its code is the answer.
        return Err(super::ExitWith(code).into());
    }
    Ok(())
}

/// Waits for every reply (each up to `--timeout`, all at once), prints them in the commands'
/// order as they come, and returns the worst exit code.
async fn print_replies(
    commands: &[Command],
    pending: Vec<crate::replies::PendingReply>,
    args: &ProduceArgs,
    reply_topic: &Topic,
) -> u8 {
    let timeout = args.timeout;
    let count = pending.len().max(1);
    let mut replies =
        futures::stream::iter(pending.into_iter().map(|p| p.wait(timeout))).buffered(count);
    let mut worst = 0;
    let mut i = 0;
    while let Some(reply) = replies.next().await {
        let c = &commands[i];
        i += 1;
        let code = match reply {
            Some(reply) => {
                if args.json {
                    println!(
                        "{}",
                        serde_json::to_string(&reply).expect("a reply always serializes")
                    );
                } else {
                    println!("{}", describe(&reply));
                }
                exit_code(&reply.outcome)
            }
            None => {
                eprintln!(
                    "{} {}: no reply within {} on {reply_topic} (is a worker running? the command \
                     may still be applied later; `cmdproc inspect` shows its outcome)",
                    c.id,
                    c.command_type,
                    humanize(timeout)
                );
                EXIT_TIMED_OUT
            }
        };
        worst = worst.max(code);
    }
    worst
}

/// The exit code of one outcome; a larger code is a worse outcome.
pub fn exit_code(outcome: &ReplyOutcome) -> u8 {
    match outcome {
        ReplyOutcome::Applied { .. } => 0,
        ReplyOutcome::Rejected { .. } | ReplyOutcome::KeyReused { .. } => EXIT_REJECTED,
        ReplyOutcome::DeadLettered { .. } | ReplyOutcome::Skipped { .. } => EXIT_DEAD_LETTERED,
        // An outcome this binary does not know yet is no success.
        _ => EXIT_DEAD_LETTERED,
    }
}

/// One line for a person: `<id> <outcome>: <details>[ (duplicate)]`.
pub fn describe(reply: &Reply) -> String {
    let details = match &reply.outcome {
        ReplyOutcome::Applied { version, events } => {
            let ids: Vec<String> = events.iter().map(ToString::to_string).collect();
            format!("version {version}, events [{}]", ids.join(", "))
        }
        ReplyOutcome::Rejected {
            code: Some(code),
            reason,
        } => format!("{code}: {reason}"),
        ReplyOutcome::Rejected { code: None, reason } => reason.clone(),
        ReplyOutcome::KeyReused { reason } => reason.clone(),
        ReplyOutcome::DeadLettered { kind, message } => format!("{kind}: {message}"),
        ReplyOutcome::Skipped { reason } => reason
            .clone()
            .unwrap_or_else(|| "dropped by an operator".to_owned()),
        _ => String::new(),
    };
    format!(
        "{} {}: {details}{}",
        reply.command.id,
        reply.outcome.name(),
        if reply.duplicate { " (duplicate)" } else { "" }
    )
}

fn humanize(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
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
    // The handler's only clock (a hold's expiry, a saga's deadline).
    c.time = Some(chrono::Utc::now());
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
            .and_then(|v| Command::from_json(v, schemas).map_err(|e| e.to_string()))
            .map(|mut c| {
                // A command without `time` gets the moment it is produced.
                c.time.get_or_insert_with(chrono::Utc::now);
                c
            });
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
