//! `cmdproc topics create`.

use clap::{Args, Subcommand};

use super::Common;
use crate::topics::{self, TopicStatus};

/// Topic subcommands.
#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Create the commands, events and dead-letter topics (idempotent).
    Create(CreateArgs),
}

/// Arguments of `topics create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Partitions of the commands and events topics: the most workers that can share the load.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub partitions: i32,
    /// Replication factor (1 for a single local broker).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=10))]
    pub replication_factor: i32,
}

/// Creates the topics and reports each.
pub async fn run(common: &Common, cmd: TopicsCommand) -> anyhow::Result<()> {
    let TopicsCommand::Create(args) = cmd;
    let wanted = vec![
        (common.commands_topic.to_string(), args.partitions),
        (common.events_topic.to_string(), args.partitions),
        (
            common.commands_topic.dead_letter().to_string(),
            args.partitions,
        ),
    ];
    let results = topics::create(
        &common.brokers,
        &wanted,
        args.replication_factor,
        common.connect_timeout,
    )
    .await?;
    for (topic, status) in results {
        match status {
            TopicStatus::Created { partitions } => println!("created {topic} ({partitions} partitions)"),
            TopicStatus::Exists { partitions } if partitions != args.partitions => println!(
                "{topic} exists with {partitions} partitions (not {}); left as it is, since changing the \
                 partition count would move keys between partitions",
                args.partitions
            ),
            TopicStatus::Exists { partitions } => println!("{topic} exists ({partitions} partitions)"),
        }
    }
    Ok(())
}
