//! `cmdproc replay`: rewind partitions so the live workers consume them again.

use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use commands::Registry;

use super::{parse_duration, Common};
use crate::replay::{self, From, Range};

/// Arguments of `replay`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("from").required(true).args(["from_offset", "from_time"])))]
pub struct ReplayArgs {
    /// Partitions to replay: `0,3` or `all`.
    #[arg(long)]
    pub partitions: String,
    /// Replay from this offset (clamped to the oldest retained one).
    #[arg(long)]
    pub from_offset: Option<i64>,
    /// Replay from the first command written at or after this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    pub from_time: Option<DateTime<Utc>>,
    /// Last offset of interest: bounds the dry-run report and what the progress waits for
    /// (the workers go on consuming past it, in order, as always).
    #[arg(long)]
    pub to_offset: Option<i64>,
    /// Report, per partition, how many commands in the range are already processed, not
    /// processed, or invalid; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also refuse (without --force) a range older than this. Whatever it says, a range is
    /// refused when its first message is older than the prune horizon the workers of the
    /// topic recorded in the database (outcomes processed before it may be deleted).
    #[arg(long, env = "CMDPROC_DEDUPE_WINDOW", value_parser = parse_duration)]
    pub dedupe_window: Option<Duration>,
    /// Replay even past the prune horizon (or --dedupe-window). Commands applied before it
    /// are still recognised by their stored events and have no second effect; a command
    /// rejected before it is evaluated again, against the aggregate's current state.
    #[arg(long)]
    pub force: bool,
    /// Larger messages count as invalid in the dry run, as in `cmdproc run`.
    #[arg(long, default_value_t = 256 * 1024)]
    pub max_command_bytes: usize,
    /// How long to wait for the workers to consume the rewound range again.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("`{s}` is not an RFC 3339 time such as 2026-11-26T10:00:00Z: {e}"))
}

/// Rewinds (or, with --dry-run, reports on) the chosen partitions.
pub async fn run(common: &Common, registry: &Registry, args: ReplayArgs) -> anyhow::Result<()> {
    let topic = common.commands_topic.as_str();
    let partitions =
        crate::verify::parse_partitions(&args.partitions).map_err(|e| anyhow::anyhow!(e))?;
    let chosen: Option<Vec<i32>> = partitions.map(|s| s.into_iter().collect());
    let from = match (args.from_offset, args.from_time) {
        (Some(o), _) => From::Offset(o.max(0)),
        (None, Some(t)) => From::Time(t),
        (None, None) => anyhow::bail!("give --from-offset or --from-time"),
    };
    crate::topics::check_reachable(&common.brokers, common.connect_timeout)?;
    let brokers = common.brokers.clone();
    let topic_owned = topic.to_owned();
    let to = args.to_offset;
    let ranges = tokio::task::spawn_blocking(move || {
        replay::ranges(&brokers, &topic_owned, chosen.as_deref(), from, to)
    })
    .await
    .context("resolving offsets")??;

    // Sessions with timeouts: the rewind holds partition row locks, and a suspended replay
    // process must not keep the partitions' owners from committing.
    let pool =
        crate::store::connect_operator(&common.database_url, 4, common.connect_timeout).await?;
    crate::store::migrate(&pool).await?;

    // The prune horizon: outcomes of commands processed before it may be deleted, so such a
    // command is no longer recognised as a duplicate from its outcome. The workers record
    // it as they prune; `--dedupe-window` can only make the check stricter.
    let pruned_before = crate::store::prune_horizon(&pool, topic).await?;
    let window_start = match args.dedupe_window {
        Some(w) => Some(Utc::now() - chrono::Duration::from_std(w)?),
        None => None,
    };
    let horizon = pruned_before.max(window_start);
    let too_old: Vec<&Range> = ranges
        .iter()
        .filter(|r| r.start_time.zip(horizon).is_some_and(|(t, h)| t < h))
        .collect();
    if !too_old.is_empty() && !args.force && !args.dry_run {
        for r in &too_old {
            eprintln!(
                "partition {}: offset {} was written at {}, before {}",
                r.partition,
                r.start,
                r.start_time.map(|t| t.to_rfc3339()).unwrap_or_default(),
                describe_horizon(pruned_before, args.dedupe_window, horizon)
            );
        }
        anyhow::bail!(
            "refusing to replay past the dedupe window: {}; commands that old may have lost their \
             recorded outcomes (one that was applied is still recognised by its stored events, but \
             one that was rejected would be evaluated again); pass --force to replay anyway",
            describe_horizon(pruned_before, args.dedupe_window, horizon)
        );
    }

    if args.dry_run {
        let total: u64 = ranges.iter().map(|r| (r.end - r.start) as u64).sum();
        let bar = bar(total, "reading");
        println!("dry run of {topic}: nothing changes");
        println!(
            "{:>9} {:>12} {:>12} {:>10} {:>14} {:>8}",
            "partition", "from", "to", "processed", "not processed", "invalid"
        );
        let mut sum = replay::DryRun::default();
        let mut lines = Vec::new();
        for r in &ranges {
            let d = replay::dry_run(
                &pool,
                registry,
                &common.brokers,
                topic,
                r,
                args.max_command_bytes,
                &bar,
            )
            .await?;
            sum.processed += d.processed;
            sum.not_processed += d.not_processed;
            sum.invalid += d.invalid;
            lines.push(format!(
                "{:>9} {:>12} {:>12} {:>10} {:>14} {:>8}",
                r.partition, r.start, r.end, d.processed, d.not_processed, d.invalid
            ));
        }
        bar.finish_and_clear();
        for l in lines {
            println!("{l}");
        }
        println!(
            "total: {} already processed (would be duplicates), {} not processed (would be applied), {} invalid",
            sum.processed, sum.not_processed, sum.invalid
        );
        if !too_old.is_empty() {
            println!(
                "note: {} partition(s) reach past the dedupe window ({}); a real replay needs --force",
                too_old.len(),
                describe_horizon(pruned_before, args.dedupe_window, horizon)
            );
        }
        return Ok(());
    }

    let started = Utc::now();
    let mut waits = Vec::new();
    for r in &ranges {
        match crate::store::rewind_partition(&pool, topic, r.partition, r.start).await? {
            Some(before) => {
                println!(
                    "partition {}: rewound from {before} to {}",
                    r.partition,
                    r.start.min(before)
                );
                waits.push((*r, before.max(r.start).min(r.end.max(r.start))));
            }
            None => println!(
                "partition {}: no worker has taken it yet; nothing to rewind",
                r.partition
            ),
        }
    }
    let total: u64 = waits
        .iter()
        .map(|(r, until)| (until - r.start).max(0) as u64)
        .sum();
    let bar = bar(total, "re-consumed");
    let deadline = Instant::now() + args.timeout;
    loop {
        let stored = crate::store::stored_next_offsets(&pool, topic).await?;
        let done: u64 = waits
            .iter()
            .map(|(r, until)| {
                (stored.get(&r.partition).copied().unwrap_or(0).min(*until) - r.start).max(0) as u64
            })
            .sum();
        bar.set_position(done);
        if done >= total {
            break;
        }
        if Instant::now() > deadline {
            bar.abandon();
            anyhow::bail!(
                "the workers re-consumed {done} of {total} offsets within {}; is `cmdproc run` running for {topic}?",
                humantime(args.timeout)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bar.finish_and_clear();
    let (mut applied, mut duplicates) = (0, 0);
    for (r, _) in &waits {
        let (a, d) = replay::outcome_since(&pool, topic, r, started).await?;
        println!("partition {}: {a} applied, {d} duplicate(s)", r.partition);
        applied += a;
        duplicates += d;
    }
    println!(
        "replayed {total} offset(s) of {} partition(s): {applied} command(s) applied, {duplicates} duplicate(s) without effect",
        waits.len()
    );
    Ok(())
}

/// Names what `horizon` (the later of the recorded prune horizon and `--dedupe-window`)
/// comes from.
fn describe_horizon(
    pruned_before: Option<DateTime<Utc>>,
    window: Option<Duration>,
    horizon: Option<DateTime<Utc>>,
) -> String {
    match (pruned_before, window, horizon) {
        (Some(p), _, Some(h)) if p == h => format!(
            "the prune horizon {} recorded by the workers (outcomes processed before it may be deleted)",
            p.to_rfc3339()
        ),
        (_, Some(w), Some(h)) => format!(
            "the --dedupe-window of {} given ({})",
            humantime(w),
            h.to_rfc3339()
        ),
        _ => "no horizon".to_owned(),
    }
}

fn bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:40}} {{pos}}/{{len}} offsets ({{per_sec}}, eta {{eta}})"
        ))
        .expect("valid template"),
    );
    bar
}

fn humantime(d: Duration) -> String {
    let s = d.as_secs();
    if s % 86_400 == 0 && s > 0 {
        format!("{}d", s / 86_400)
    } else if s % 3600 == 0 && s > 0 {
        format!("{}h", s / 3600)
    } else {
        format!("{s}s")
    }
}
