//! `cmdproc replay`: rewinding partitions so the live workers consume them again.
//!
//! A rewind moves a partition's stored position back and increments its epoch in one
//! statement under the partition's row lock. The live owner is fenced at its next batch
//! (or within a second when idle), sees that the row still names it, takes the partition
//! again and seeks to the stored position. Commands already applied come back as
//! duplicates and have no effect; commands never applied are applied.

use std::time::Duration;

use chrono::{DateTime, Utc};
use commands::Registry;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::PgPool;

use crate::error::{OperatorError, Result};
use crate::store;
use crate::worker::MisroutedPolicy;

/// Where a partition's replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// This offset.
    Offset(i64),
    /// The first message written at or after this time.
    Time(DateTime<Utc>),
}

/// A partition's range to replay: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// The partition.
    pub partition: i32,
    /// First offset replayed.
    pub start: i64,
    /// One past the last offset of interest (the high watermark, or `--to-offset` + 1).
    pub end: i64,
    /// When the message at `start` was written, if there is one.
    pub start_time: Option<DateTime<Utc>>,
}

/// What `--dry-run` found in a partition's range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DryRun {
    /// Valid commands already processed (applied or rejected): duplicates on replay.
    pub processed: u64,
    /// Valid commands never processed: applied on replay.
    pub not_processed: u64,
    /// Messages that are dead letters.
    pub invalid: u64,
}

fn reader(brokers: &str) -> Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "cmdproc-replay-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?)
}

/// Resolves each partition's range from the broker: clamps to the retained log, finds the
/// offset for a time, and reads when the first message was written (for the dedupe window).
pub fn ranges(
    brokers: &str,
    topic: &str,
    partitions: Option<&[i32]>,
    from: From,
    to_offset: Option<i64>,
) -> Result<Vec<Range>> {
    let consumer = reader(brokers)?;
    let all = crate::topics::partition_count(consumer.client(), topic, Duration::from_secs(10))?;
    let chosen: Vec<i32> = match partitions {
        Some(ps) => {
            if let Some(bad) = ps.iter().find(|p| **p < 0 || **p >= all) {
                return Err(OperatorError::Refused(format!(
                    "partition {bad} does not exist: `{topic}` has {all} partitions (0 to {})",
                    all - 1
                )));
            }
            ps.to_vec()
        }
        None => (0..all).collect(),
    };
    let timeout = Duration::from_secs(10);
    let mut out = Vec::new();
    for p in chosen {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        let start = match from {
            From::Offset(o) => o.max(low),
            From::Time(t) => {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(topic, p, Offset::Offset(t.timestamp_millis()))?;
                let found = consumer.offsets_for_times(tpl, timeout)?;
                match found.find_partition(topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => high,
                }
            }
        };
        let end = to_offset.map_or(high, |t| (t + 1).min(high)).max(start);
        let start_time = if start < high {
            crate::topics::first_message_at(brokers, topic, p, start, timeout)?
                .and_then(|(_, timestamp)| timestamp)
                .and_then(DateTime::from_timestamp_millis)
        } else {
            None
        };
        out.push(Range {
            partition: p,
            start,
            end,
            start_time,
        });
    }
    Ok(out)
}

/// Counts, without changing anything, what a replay of `range` would do.
pub async fn dry_run(
    pool: &PgPool,
    registry: &Registry,
    brokers: &str,
    topic: &str,
    range: &Range,
    max_command_bytes: usize,
    progress: &indicatif::ProgressBar,
) -> Result<DryRun> {
    let consumer = reader(brokers)?;
    let partitions =
        crate::topics::partition_count(consumer.client(), topic, Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, range.partition, Offset::Offset(range.start))?;
    consumer.assign(&tpl)?;
    let mut report = DryRun::default();
    let mut pending: Vec<(String, String)> = Vec::new();
    let mut next = range.start;
    let mut idle = std::time::Instant::now();
    while next < range.end {
        match consumer.poll(Duration::from_millis(200)) {
            Some(m) => {
                let m = m?;
                idle = std::time::Instant::now();
                if m.offset() >= range.end {
                    break;
                }
                next = m.offset() + 1;
                progress.inc(1);
                let incoming = crate::decode::decode_message(
                    &m,
                    partitions,
                    max_command_bytes,
                    MisroutedPolicy::DeadLetter,
                    registry.schemas(),
                );
                match incoming.decoded {
                    Ok(c) => pending.push((c.source.to_string(), c.id.to_string())),
                    Err(_) => report.invalid += 1,
                }
                if pending.len() >= 1000 {
                    count_processed(pool, &mut pending, &mut report).await?;
                }
            }
            None => {
                // Transaction markers can leave the last offsets of the range unreadable.
                let pos = consumer.position()?;
                if let Some(Offset::Offset(o)) = pos
                    .find_partition(topic, range.partition)
                    .map(|e| e.offset())
                {
                    if o >= range.end {
                        break;
                    }
                }
                if idle.elapsed() > Duration::from_secs(30) {
                    return Err(OperatorError::Refused(format!(
                        "partition {} stopped delivering at offset {next}",
                        range.partition
                    )));
                }
            }
        }
    }
    count_processed(pool, &mut pending, &mut report).await?;
    Ok(report)
}

async fn count_processed(
    pool: &PgPool,
    pending: &mut Vec<(String, String)>,
    report: &mut DryRun,
) -> Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let known = store::with_outcome(pool, pending).await?;
    for key in pending.drain(..) {
        if known.contains(&key) {
            report.processed += 1;
        } else {
            report.not_processed += 1;
        }
    }
    Ok(())
}

/// Commands applied and duplicates seen in `[start, end)` of a partition since `since`.
pub async fn outcome_since(
    pool: &PgPool,
    topic: &str,
    range: &Range,
    since: DateTime<Utc>,
) -> Result<(i64, i64)> {
    let recorded = store::recorded_since(
        pool,
        topic,
        range.partition,
        (range.start, range.end),
        since,
    )
    .await?;
    Ok((recorded.processed, recorded.duplicates))
}
