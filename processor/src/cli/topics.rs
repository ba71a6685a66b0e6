//! `cmdproc topics create` (commands, events, dead letters and replies), and the operator's decisions about a commands log that changed
//! under the workers: `topics accept-log` and `topics accept-partitions`.

use clap::{Args, Subcommand};

use super::Common;
use crate::topics::{self, TopicStatus};

/// Topic subcommands.
#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Create the commands, events and dead-letter topics, and the default reply topic
    /// `<commands-topic>.replies` with as many partitions as the commands topic (idempotent).
    ///
    /// The reply topic receives the outcome of every command sent with the `replyto`
    /// extension naming it: `cmdproc produce --wait` and other clients read their replies
    /// there, keyed by command id.
    Create(CreateArgs),
    /// Accept the commands log as it is now for partitions the workers halted because it
    /// changed under them (topic deleted and re-created, commands deleted by retention
    /// before they were applied): move their stored position to the log's start (or
    /// --offset), and the owners resume from there. Commands between the old position and
    /// the new one are never applied; the decision is recorded with its reason. A partition
    /// whose log still holds its stored position (and the message applied before it) is
    /// left as it is unless --force or --offset is given.
    AcceptLog(AcceptLogArgs),
    /// Accept the commands topic's current partition count after partitions were added,
    /// so the halted workers resume. This breaks per-aggregate order for every key that now
    /// maps to another partition (its older commands may still wait on the old one): the
    /// safe way to grow is a new topic, moved to deliberately (README: growing a topic).
    AcceptPartitions(AcceptPartitionsArgs),
}

/// Arguments of `topics create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Partitions of the commands, events and dead-letter topics (the reply topic gets the
    /// commands topic's count): the most workers that can share the load. Size it for the largest deployment expected: partitions added to a live commands
    /// topic move keys, and the workers halt it (README: growing a topic).
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub partitions: i32,
    /// Replication factor (1 for a single local broker).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=10))]
    pub replication_factor: i32,
}

/// Arguments of `topics accept-log`.
#[derive(Debug, Args)]
pub struct AcceptLogArgs {
    /// Partitions whose log to accept: `0,3` or `all`.
    #[arg(long)]
    pub partitions: String,
    /// Why: what happened to the topic. Recorded with the decision.
    #[arg(long)]
    pub why: String,
    /// The stored position to move to, instead of the log's current start.
    #[arg(long, value_parser = clap::value_parser!(i64).range(0..))]
    pub offset: Option<i64>,
    /// Also move partitions whose log still holds their stored position (by default they
    /// are left as they are: moving them would replay or skip commands).
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `topics accept-partitions`.
#[derive(Debug, Args)]
pub struct AcceptPartitionsArgs {
    /// Why the partition count changed. Recorded with the decision.
    #[arg(long)]
    pub why: String,
}

/// Runs a topics subcommand.
pub async fn run(common: &Common, cmd: TopicsCommand) -> anyhow::Result<()> {
    match cmd {
        TopicsCommand::Create(args) => create(common, args).await,
        TopicsCommand::AcceptLog(args) => accept_log(common, args).await,
        TopicsCommand::AcceptPartitions(args) => accept_partitions(common, args).await,
    }
}

/// Creates the topics and reports each.
async fn create(common: &Common, args: CreateArgs) -> anyhow::Result<()> {
    topics::check_reachable(&common.brokers, common.connect_timeout)?;
    // Replies are keyed by command id and partitioned by murmur2 like the commands, over the
    // reply topic's own partitions: it gets the commands topic's count, also when that topic
    // existed before with another count than --partitions.
    let reply_partitions = topics::partitions_of(
        &common.brokers,
        common.commands_topic.as_str(),
        common.connect_timeout,
    )?
    .unwrap_or(args.partitions);
    let wanted = vec![
        (common.commands_topic.to_string(), args.partitions),
        (common.events_topic.to_string(), args.partitions),
        (
            common.commands_topic.dead_letter().to_string(),
            args.partitions,
        ),
        (
            common.commands_topic.replies().to_string(),
            reply_partitions,
        ),
    ];
    let results = topics::create(
        &common.brokers,
        &wanted,
        args.replication_factor,
        common.connect_timeout,
    )
    .await?;
    for ((topic, status), (_, asked)) in results.into_iter().zip(&wanted) {
        match status {
            TopicStatus::Created { partitions } => println!("created {topic} ({partitions} partitions)"),
            TopicStatus::Exists { partitions } if partitions != *asked => println!(
                "{topic} exists with {partitions} partitions (not {asked}); left as it is, since changing the \
                 partition count would move keys between partitions"
            ),
            TopicStatus::Exists { partitions } => println!("{topic} exists ({partitions} partitions)"),
        }
    }
    Ok(())
}

/// Moves the chosen partitions' stored positions to the log start (or `--offset`).
async fn accept_log(common: &Common, args: AcceptLogArgs) -> anyhow::Result<()> {
    anyhow::ensure!(!args.why.trim().is_empty(), "--why must say what happened");
    let topic = common.commands_topic.to_string();
    let chosen: Option<Vec<i32>> = crate::verify::parse_partitions(&args.partitions)
        .map_err(|e| anyhow::anyhow!(e))?
        .map(|s| s.into_iter().collect());
    topics::check_reachable(&common.brokers, common.connect_timeout)?;
    let (brokers, t, timeout) = (
        common.brokers.clone(),
        topic.clone(),
        common.connect_timeout,
    );
    let marks = tokio::task::spawn_blocking(move || {
        topics::watermarks(&brokers, &t, chosen.as_deref(), timeout)
    })
    .await??;
    let pool = super::pool(common, 2).await?;
    for (partition, low, high) in marks {
        if args.offset.is_none() && !args.force {
            if let Some(same) = log_unchanged(common, &pool, &topic, partition, low, high).await? {
                println!(
                    "partition {partition}: {same}; left as it is (--force to move it to the log start anyway)"
                );
                continue;
            }
        }
        let to = args.offset.unwrap_or(low);
        match crate::store::accept_log(&pool, &topic, partition, to, &args.why).await? {
            Some(before) => {
                tracing::warn!(%topic, partition, from = before, to, log_start = low, log_end = high, why = %args.why, "commands log accepted");
                println!(
                    "partition {partition}: stored position {before} -> {to} (log {low}..{high}); \
                     its owner resumes from there"
                );
            }
            None => println!("partition {partition}: no worker ever took it; nothing to accept"),
        }
    }
    Ok(())
}

/// Why a partition's log still belongs to its stored position, or `None` when it changed
/// (the same judgment as the workers': the log ends below the stored offset, starts above
/// it, or holds another message than the one applied just before it).
async fn log_unchanged(
    common: &Common,
    pool: &sqlx::PgPool,
    topic: &str,
    partition: i32,
    low: i64,
    high: i64,
) -> anyhow::Result<Option<String>> {
    let Some((stored, fingerprint)) = crate::store::stored_position(pool, topic, partition).await?
    else {
        // Never taken: nothing to compare; accept_log leaves it as it is too.
        return Ok(None);
    };
    if crate::commands_log::judge_watermarks(low, high, stored, None).is_some() {
        return Ok(None);
    }
    let (_, expected) = crate::commands_log::start_at(stored, fingerprint);
    let Some(expected) = expected.filter(|e| e.offset >= low) else {
        return Ok(Some(format!(
            "its log ({low}..{high}) still holds its stored position {stored}"
        )));
    };
    let (brokers, t, timeout) = (
        common.brokers.clone(),
        topic.to_owned(),
        common.connect_timeout,
    );
    let first = tokio::task::spawn_blocking(move || {
        topics::first_message_at(&brokers, &t, partition, expected.offset, timeout)
    })
    .await??;
    use crate::commands_log::FirstMessage;
    Ok(match first.map(|(offset, timestamp)| {
        crate::commands_log::judge_first_message(&expected, offset, timestamp)
    }) {
        Some(FirstMessage::Matches) | Some(FirstMessage::After) => Some(format!(
            "its log ({low}..{high}) still holds its stored position {stored} and the message applied before it"
        )),
        Some(FirstMessage::Differs(_)) | Some(FirstMessage::Before) | None => None,
    })
}

/// Records the broker's current partition count as the topic's.
async fn accept_partitions(common: &Common, args: AcceptPartitionsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(!args.why.trim().is_empty(), "--why must say why");
    let topic = common.commands_topic.to_string();
    let partitions = topics::partitions_of(&common.brokers, &topic, common.connect_timeout)?
        .ok_or_else(|| anyhow::anyhow!("topic `{topic}` does not exist"))?;
    let pool = super::pool(common, 2).await?;
    let before = crate::store::accept_partitions(&pool, &topic, partitions, &args.why).await?;
    if before != Some(partitions) {
        tracing::warn!(%topic, from = before, to = partitions, why = %args.why, "partition count accepted");
    }
    match before {
        Some(b) if b == partitions => println!("{topic}: {partitions} partitions, as recorded already"),
        Some(b) => println!(
            "{topic}: partition count {b} -> {partitions} accepted; the workers resume from their stored \
             offsets (keys that moved partitions lose their order with their older commands)"
        ),
        None => println!("{topic}: {partitions} partitions recorded"),
    }
    Ok(())
}
