//! `cmdproc dlq list|redrive|skip`: dead letters and parked aggregates.

use std::time::Duration;

use crate::producer::CommandProducer;
use clap::{Args, Subcommand};

use commands::Registry;

use super::Common;
use crate::batch::{value_preview, PlanOptions};
use crate::dlq::{self, Filter, Topics};

/// Dead-letter subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters (reason, original position, aggregate, a preview) and parked
    /// aggregates with the commands waiting behind them.
    List(ListArgs),
    /// Submit dead letters again (after a schema or handler fix) and release parked
    /// aggregates by re-applying their commands in their original order. Command ids are
    /// kept, so redriving twice is harmless.
    Redrive(RedriveArgs),
    /// Drop one dead letter for good (a waiting command of a parked aggregate, or any other
    /// dead letter), with the reason recorded. The command gets the outcome `skipped`: a
    /// replay, a redrive or a client's retry of it later has no effect.
    Skip(SkipArgs),
}

/// Which dead letters.
#[derive(Debug, Args)]
pub struct Selection {
    /// Only this kind: malformed, schema, unknown_type, key_mismatch, misrouted, too_large,
    /// handler_panic, parked.
    #[arg(long)]
    pub reason: Option<String>,
    /// Only this aggregate, as TYPE/ID (e.g. account/acc-42).
    #[arg(long, value_parser = parse_aggregate)]
    pub aggregate: Option<(String, String)>,
    /// Only these positions in the commands topic, as PARTITION:OFFSET, comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = parse_position)]
    pub ids: Vec<(i32, i64)>,
}

impl Selection {
    fn filter(&self) -> Filter {
        Filter {
            reason: self.reason.clone(),
            aggregate: self.aggregate.clone(),
            ids: self.ids.clone(),
        }
    }
}

/// Arguments of `dlq list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Which dead letters.
    #[command(flatten)]
    pub selection: Selection,
    /// At most this many dead letters.
    #[arg(long, default_value_t = 100)]
    pub limit: i64,
}

/// Arguments of `dlq redrive`.
#[derive(Debug, Args)]
pub struct RedriveArgs {
    /// Which dead letters and parked aggregates.
    #[command(flatten)]
    pub selection: Selection,
    /// Also submit dead letters that were redriven or skipped before (left out by default;
    /// a skipped command stays without effect either way).
    #[arg(long)]
    pub again: bool,
}

/// Arguments of `dlq skip`.
#[derive(Debug, Args)]
pub struct SkipArgs {
    /// The dead letter, as PARTITION:OFFSET (see `dlq list`).
    #[arg(value_parser = parse_position)]
    pub id: (i32, i64),
    /// Why it is dropped (recorded).
    #[arg(long)]
    pub why: String,
}

fn parse_aggregate(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((t, i)) if !t.is_empty() && !i.is_empty() => Ok((t.to_owned(), i.to_owned())),
        _ => Err(format!("`{s}` is not TYPE/ID, e.g. account/acc-42")),
    }
}

fn parse_position(s: &str) -> Result<(i32, i64), String> {
    let bad = || format!("`{s}` is not PARTITION:OFFSET, e.g. 3:1042");
    let (p, o) = s.split_once(':').ok_or_else(bad)?;
    Ok((
        p.trim().parse().map_err(|_| bad())?,
        o.trim().parse().map_err(|_| bad())?,
    ))
}

/// Runs a dead-letter subcommand.
pub async fn run(common: &Common, registry: &Registry, cmd: DlqCommand) -> anyhow::Result<()> {
    // Releasing holds a partition's row lock: sessions with timeouts, so that a suspended
    // `dlq` process cannot keep the partition's owner from committing.
    let pool =
        crate::store::connect_operator(&common.database_url, 2, common.connect_timeout).await?;
    crate::store::migrate(&pool).await?;
    let topic = common.commands_topic.as_str();
    match cmd {
        DlqCommand::List(args) => {
            let filter = args.selection.filter();
            let letters = dlq::list(&pool, topic, &filter, args.limit).await?;
            println!("{} dead letter(s) of {topic}", letters.len());
            for d in &letters {
                let aggregate = d
                    .aggregate
                    .as_ref()
                    .map_or("-".to_owned(), |(t, i)| format!("{t}/{i}"));
                let redriven = match (&d.skipped, d.redriven_at) {
                    (Some((at, why)), _) => format!("  (skipped {}: {why})", at.format("%F %T")),
                    (None, Some(t)) => format!("  (redriven {})", t.format("%F %T")),
                    (None, None) => String::new(),
                };
                println!(
                    "{}:{}  {:<13} {}  {}{redriven}",
                    d.partition, d.offset, d.kind, aggregate, d.message
                );
                println!("        {}", value_preview(d.value.as_deref()));
            }
            let parked = dlq::parked(&pool, topic, filter.aggregate.as_ref()).await?;
            println!("{} parked aggregate(s)", parked.len());
            for p in &parked {
                println!(
                    "{}/{}  parked {} at {}:{}, {} command(s) waiting, {} skipped: {}",
                    p.aggregate_type,
                    p.aggregate_id,
                    p.parked_at.format("%F %T"),
                    p.partition,
                    p.first_offset,
                    p.waiting,
                    p.skipped,
                    p.reason
                );
            }
            Ok(())
        }
        DlqCommand::Redrive(args) => {
            let filter = args.selection.filter();
            // Parked aggregates are released, not resubmitted: resubmitting would put their
            // commands behind newer ones of the same aggregate.
            let parked = dlq::parked(&pool, topic, filter.aggregate.as_ref()).await?;
            let parked_keys: Vec<(String, String)> = parked
                .iter()
                .map(|p| (p.aggregate_type.clone(), p.aggregate_id.clone()))
                .collect();
            let (letters, handled): (Vec<dlq::DeadLetter>, Vec<dlq::DeadLetter>) =
                dlq::list(&pool, topic, &filter, i64::MAX)
                    .await?
                    .into_iter()
                    .filter(|d| {
                        d.kind != "parked"
                            && !d
                                .aggregate
                                .as_ref()
                                .is_some_and(|a| parked_keys.contains(a))
                    })
                    .partition(|d| args.again || !d.handled());
            if !handled.is_empty() {
                println!(
                    "left out {} dead letter(s) redriven or skipped before (--again to submit them too)",
                    handled.len()
                );
            }
            let releasing: Vec<&(String, String)> = parked_keys
                .iter()
                .filter(|_| match &filter.reason {
                    None => true,
                    Some(r) => r == "handler_panic" || r == "parked",
                })
                .filter(|a| {
                    filter.ids.is_empty()
                        || parked.iter().any(|p| {
                            p.aggregate_type == a.0
                                && p.aggregate_id == a.1
                                && filter.ids.iter().any(|(part, _)| *part == p.partition)
                        })
                })
                .collect();
            let topics = Topics {
                commands: topic,
                dead_letters: &common.commands_topic.dead_letter().to_string(),
                events: common.events_topic.as_str(),
            };
            for a in releasing {
                match dlq::release(&pool, registry, topics, a, &PlanOptions::default()).await? {
                    Some(r) if r.parked_again => println!(
                        "{}/{}: failed again and stays parked ({} applied, {} rejected before it)",
                        a.0, a.1, r.applied, r.rejected
                    ),
                    Some(r) => println!(
                        "{}/{}: released; {} applied, {} rejected, {} duplicate(s), {} skipped",
                        a.0, a.1, r.applied, r.rejected, r.duplicates, r.skipped
                    ),
                    None => println!("{}/{}: not parked any more", a.0, a.1),
                }
            }
            if !letters.is_empty() {
                crate::topics::check_reachable(&common.brokers, common.connect_timeout)?;
                let producer = CommandProducer::new(
                    &common.brokers,
                    common.commands_topic.clone(),
                    Duration::from_secs(30),
                )?;
                let n = dlq::resubmit(&pool, &producer, &letters).await?;
                println!("submitted {n} dead letter(s) to {topic} again");
            } else {
                println!("no dead letters to submit");
            }
            Ok(())
        }
        DlqCommand::Skip(args) => {
            let (partition, offset) = args.id;
            let skipped = dlq::skip(&pool, registry, topic, partition, offset, &args.why).await?;
            let aggregate = skipped
                .aggregate
                .map_or("-".to_owned(), |(t, i)| format!("{t}/{i}"));
            match &skipped.command {
                Some((source, id)) => println!(
                    "skipped {partition}:{offset} of {aggregate} (command {id} from {source}, recorded as skipped): {}",
                    args.why
                ),
                None => println!(
                    "skipped {partition}:{offset} of {aggregate} (not a decodable command; the dead letter is marked): {}",
                    args.why
                ),
            }
            if skipped.was_parked {
                println!("a release of the aggregate leaves it out");
            }
            Ok(())
        }
    }
}
