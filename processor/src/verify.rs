//! Verifying the stored aggregates against a re-execution of the retained commands.
//!
//! Handlers are pure (design §3.6), so re-applying a partition's commands from the start of
//! the log, in offset order, through the same [`plan`](crate::batch::plan) the workers use,
//! must yield exactly the aggregates stored in Postgres. [`verify`] does that in memory for
//! the chosen partitions, reading each one only up to the offset the workers stored (what
//! they have applied), and reports every aggregate whose state or version differs.
//!
//! What the workers decided outside the handlers is taken from Postgres so the re-execution
//! makes the same decisions: aggregates parked at a given offset have their commands set
//! aside from that offset on, and commands first processed on another partition or topic are
//! duplicates here. A partition whose log no longer starts at offset 0 (retention) cannot be
//! re-executed and is reported as skipped.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use commands::partitioner::partition_for_key;
use commands::{Registry, SchemaSet};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use sqlx::PgPool;

use crate::batch::{
    self, AggregateKey, CommandKey, Incoming, Loaded, Outcome, PlanOptions, PoisonPolicy,
};
use crate::error::{OperatorError, Result};
use crate::store;
use crate::topics::TopicError;
use crate::worker::MisroutedPolicy;

/// Messages planned at a time: bounds memory per step while keeping the Postgres look-ups
/// (outcomes recorded on other partitions) set-based.
const CHUNK: usize = 5_000;

/// How long reading a partition may make no progress before verify gives up on the broker.
const STALL_LIMIT: Duration = Duration::from_secs(60);

/// What to verify and how the workers decoded messages.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// The commands topic.
    pub topic: String,
    /// Partitions to verify; `None` means all.
    pub partitions: Option<BTreeSet<i32>>,
    /// The workers' `--max-command-bytes`.
    pub max_command_bytes: usize,
    /// The workers' `--misrouted` policy.
    pub misrouted: MisroutedPolicy,
}

/// One aggregate whose stored form differs from the re-execution.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    /// The aggregate.
    pub aggregate: AggregateKey,
    /// What Postgres holds; `None` when it has no row.
    pub stored: Option<Loaded>,
    /// What re-executing gave; `None` when no command created it.
    pub reexecuted: Option<Loaded>,
}

impl Difference {
    /// A one-line description naming the aggregate and what differs.
    pub fn describe(&self) -> String {
        let (t, id) = &self.aggregate;
        let compact = |v: &Value| serde_json::to_string(v).unwrap_or_else(|_| v.to_string());
        match (&self.stored, &self.reexecuted) {
            (Some(s), None) => format!(
                "{t}/{id}: missing in re-execution; postgres has version {} state {}",
                s.version,
                compact(&s.state)
            ),
            (None, Some(r)) => format!(
                "{t}/{id}: missing in postgres; re-execution gives version {} state {}",
                r.version,
                compact(&r.state)
            ),
            (Some(s), Some(r)) => {
                let mut parts = Vec::new();
                if s.version != r.version {
                    parts.push(format!(
                        "version differs: postgres {}, re-executed {}",
                        s.version, r.version
                    ));
                }
                if s.state != r.state {
                    parts.push(format!(
                        "state differs: postgres {}, re-executed {}",
                        compact(&s.state),
                        compact(&r.state)
                    ));
                }
                format!("{t}/{id}: {}", parts.join("; "))
            }
            (None, None) => format!("{t}/{id}: absent on both sides"),
        }
    }
}

/// What re-executing one partition did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionReport {
    /// The partition.
    pub partition: i32,
    /// Why it was not verified, if it was not.
    pub skipped: Option<String>,
    /// The stored next offset the re-execution stopped at.
    pub next_offset: i64,
    /// Messages read.
    pub messages: u64,
    /// Commands re-executed (applied or rejected).
    pub commands: u64,
    /// Deliveries of commands already processed.
    pub duplicates: u64,
    /// Deliveries refused for reusing a processed command's key with another payload.
    pub key_reused: u64,
    /// Messages that became dead letters (including parked ones).
    pub dead_letters: u64,
    /// Commands set aside because their aggregate is parked.
    pub parked: u64,
}

impl PartitionReport {
    /// The progress line printed once the partition is done.
    pub fn line(&self) -> String {
        match &self.skipped {
            Some(why) => format!("partition {}: skipped: {why}", self.partition),
            None => format!(
                "partition {}: {} messages up to offset {}, {} commands re-executed, {} duplicates, {} refused (key reused), {} dead letters, {} set aside (parked)",
                self.partition,
                self.messages,
                self.next_offset,
                self.commands,
                self.duplicates,
                self.key_reused,
                self.dead_letters,
                self.parked
            ),
        }
    }
}

/// The outcome of a verification.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Per partition, in partition order.
    pub partitions: Vec<PartitionReport>,
    /// Aggregates compared.
    pub compared: u64,
    /// Every difference, sorted by aggregate.
    pub differences: Vec<Difference>,
}

impl Report {
    /// Partitions re-executed and compared.
    pub fn checked(&self) -> usize {
        self.partitions
            .iter()
            .filter(|p| p.skipped.is_none())
            .count()
    }

    /// Partitions that could not be verified.
    pub fn skipped(&self) -> usize {
        self.partitions.len() - self.checked()
    }

    /// Commands re-executed over all partitions.
    pub fn commands(&self) -> u64 {
        self.partitions.iter().map(|p| p.commands).sum()
    }

    /// The summary line.
    pub fn summary(&self) -> String {
        format!(
            "verify: {} partitions checked, {} skipped, {} commands re-executed, {} aggregates compared, {} differences",
            self.checked(),
            self.skipped(),
            self.commands(),
            self.compared,
            self.differences.len()
        )
    }
}

/// Parses `--partitions`: `all`, or a comma-separated list such as `0,3`.
pub fn parse_partitions(s: &str) -> Result<Option<BTreeSet<i32>>, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("all") {
        return Ok(None);
    }
    let mut out = BTreeSet::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p: i32 = part.parse().ok().filter(|p| *p >= 0).ok_or_else(|| {
            format!("`{part}` is not a partition number; use e.g. `0,3` or `all`")
        })?;
        out.insert(p);
    }
    if out.is_empty() {
        return Err("no partition given; use e.g. `0,3` or `all`".into());
    }
    Ok(Some(out))
}

/// The in-memory state of a re-execution, carried from chunk to chunk and partition to
/// partition as the store carries it between batches.
#[derive(Default)]
struct Replay {
    /// Outcomes by command, for deduplication.
    outcomes: HashMap<CommandKey, Outcome>,
    /// Aggregates written so far.
    aggregates: HashMap<AggregateKey, Loaded>,
}

/// Re-executes the chosen partitions and compares the aggregates with Postgres, calling
/// `progress` with a line per partition (and periodically on long partitions).
pub async fn verify(
    pool: &PgPool,
    registry: &Registry,
    config: &VerifyConfig,
    mut progress: impl FnMut(&str),
) -> Result<Report> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        // Never used to join a group or commit: partitions are assigned explicitly.
        .set("group.id", format!("cmdproc-verify-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // The workers read committed messages only (librdkafka's default); so must we.
        .set("isolation.level", "read_committed")
        .set(
            "max.partition.fetch.bytes",
            (config.max_command_bytes.max(1 << 20) * 2).to_string(),
        )
        .create()?;
    let topic = config.topic.as_str();
    let partitions = tokio::task::block_in_place(|| {
        crate::topics::partition_count(consumer.client(), topic, Duration::from_secs(10))
    })?;
    let chosen: Vec<i32> = match &config.partitions {
        None => (0..partitions).collect(),
        Some(set) => {
            if let Some(bad) = set.iter().find(|p| **p >= partitions) {
                return Err(OperatorError::Refused(format!(
                    "topic `{topic}` has {partitions} partitions; there is no partition {bad}"
                )));
            }
            set.iter().copied().collect()
        }
    };

    let stored_next = store::stored_next_offsets(pool, topic).await?;
    let mut parked_by_partition: HashMap<i32, Vec<(i64, AggregateKey)>> = HashMap::new();
    for p in store::parked_since(pool, topic).await? {
        parked_by_partition
            .entry(p.partition)
            .or_default()
            .push((p.first_offset, p.aggregate));
    }

    let schemas = registry.schemas();
    // A panic re-executed in memory becomes a dead letter and the aggregate goes on: it is a
    // difference only if Postgres disagrees. Parking is reproduced from Postgres instead.
    let options = PlanOptions {
        poison: PoisonPolicy::DeadLetter,
        ..PlanOptions::default()
    };
    let mut replay = Replay::default();
    let mut report = Report::default();
    for &partition in &chosen {
        let next_offset = stored_next.get(&partition).copied().unwrap_or(0);
        let mut bounds = parked_by_partition.remove(&partition).unwrap_or_default();
        bounds.sort();
        let r = replay_partition(
            pool,
            &consumer,
            config,
            registry,
            schemas,
            &options,
            partitions,
            partition,
            next_offset,
            &bounds,
            &mut replay,
            &mut progress,
        )
        .await?;
        progress(&r.line());
        report.partitions.push(r);
    }

    let verified: HashSet<i32> = report
        .partitions
        .iter()
        .filter(|p| p.skipped.is_none())
        .map(|p| p.partition)
        .collect();
    let mut stored: BTreeMap<AggregateKey, Loaded> = BTreeMap::new();
    for (key, loaded) in store::aggregates_of_topic(pool, topic).await? {
        let home = partition_for_key(key.1.as_bytes(), partitions);
        // Aggregates live on their key's partition; with `--misrouted accept` one may also
        // have been re-executed from another partition, and then it is compared too.
        if home.is_some_and(|p| verified.contains(&p)) || replay.aggregates.contains_key(&key) {
            stored.insert(key, loaded);
        }
    }
    let mut keys: BTreeSet<AggregateKey> = stored.keys().cloned().collect();
    keys.extend(replay.aggregates.keys().cloned());
    report.compared = keys.len() as u64;
    for key in keys {
        let s = stored.remove(&key);
        let r = replay.aggregates.remove(&key);
        if s != r {
            report.differences.push(Difference {
                aggregate: key,
                stored: s,
                reexecuted: r,
            });
        }
    }
    Ok(report)
}

/// Reads one partition from the log start up to `next_offset` and plans it in chunks.
#[allow(clippy::too_many_arguments)]
async fn replay_partition(
    pool: &PgPool,
    consumer: &BaseConsumer,
    config: &VerifyConfig,
    registry: &Registry,
    schemas: &SchemaSet,
    options: &PlanOptions,
    partitions: i32,
    partition: i32,
    next_offset: i64,
    parked_bounds: &[(i64, AggregateKey)],
    replay: &mut Replay,
    progress: &mut impl FnMut(&str),
) -> Result<PartitionReport> {
    let topic = config.topic.as_str();
    let mut report = PartitionReport {
        partition,
        next_offset,
        ..Default::default()
    };
    let (low, high) = tokio::task::block_in_place(|| {
        consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))
    })
    .map_err(|source| TopicError::Kafka {
        what: format!("cannot read the watermarks of {topic}/{partition}"),
        source,
    })?;
    if low > 0 {
        report.skipped = Some(format!(
            "history truncated: the log starts at offset {low} (retention), so earlier commands cannot be re-executed"
        ));
        return Ok(report);
    }
    if next_offset > high {
        report.skipped = Some(format!(
            "the stored next offset {next_offset} is past the end of the log ({high}); was the topic recreated?"
        ));
        return Ok(report);
    }
    if next_offset == 0 {
        return Ok(report);
    }

    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Beginning)?;
    consumer.assign(&tpl)?;

    let mut parked: HashSet<AggregateKey> = HashSet::new();
    let mut next_bound = 0;
    let mut chunk = Chunk {
        pool,
        topic,
        partition,
        registry,
        options,
        pending: Vec::with_capacity(CHUNK),
    };
    let mut last_progress = Instant::now();
    let mut last_read = Instant::now();
    loop {
        let polled = tokio::task::block_in_place(|| {
            consumer.poll(Duration::from_millis(200)).map(|r| {
                r.map(|m| {
                    crate::decode::decode_message(
                        &m,
                        partitions,
                        config.max_command_bytes,
                        config.misrouted,
                        schemas,
                    )
                })
            })
        });
        let m = match polled {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::warn!(partition, error = %e, "consumer error while verifying");
                continue;
            }
            None => {
                // The last offsets below the stored one may be transaction markers or
                // aborted messages, which read_committed never delivers: stop by position.
                if position(consumer, topic, partition).is_some_and(|p| p >= next_offset) {
                    break;
                }
                if last_read.elapsed() > STALL_LIMIT {
                    return Err(OperatorError::Refused(format!(
                        "reading {topic}/{partition} made no progress for {STALL_LIMIT:?} (at offset {:?}, stopping at {next_offset}); is Kafka reachable?",
                        position(consumer, topic, partition)
                    )));
                }
                continue;
            }
        };
        last_read = Instant::now();
        if m.offset >= next_offset {
            break;
        }
        // The workers set an aggregate's commands aside from the offset it was parked at:
        // plan the messages before that offset with the old parked set.
        if parked_bounds
            .get(next_bound)
            .is_some_and(|(o, _)| *o <= m.offset)
        {
            chunk.flush(&parked, replay, &mut report).await?;
            while let Some((o, key)) = parked_bounds.get(next_bound) {
                if *o > m.offset {
                    break;
                }
                parked.insert(key.clone());
                next_bound += 1;
            }
        }
        let done = m.offset + 1 >= next_offset;
        chunk.pending.push(m);
        report.messages += 1;
        if chunk.pending.len() >= CHUNK {
            chunk.flush(&parked, replay, &mut report).await?;
        }
        if done {
            break;
        }
        if last_progress.elapsed() > Duration::from_secs(5) {
            last_progress = Instant::now();
            progress(&format!(
                "partition {partition}: {} of {next_offset} messages read",
                report.messages
            ));
        }
    }
    chunk.flush(&parked, replay, &mut report).await?;
    consumer.unassign()?;
    Ok(report)
}

/// A partition's messages read but not yet re-executed, with what planning them needs.
struct Chunk<'a> {
    pool: &'a PgPool,
    topic: &'a str,
    partition: i32,
    registry: &'a Registry,
    options: &'a PlanOptions,
    pending: Vec<Incoming>,
}

impl Chunk<'_> {
    /// Plans the pending messages with the carried state, then carries the plan's outcomes
    /// and aggregate writes into that state for the next chunk.
    async fn flush(
        &mut self,
        parked: &HashSet<AggregateKey>,
        replay: &mut Replay,
        report: &mut PartitionReport,
    ) -> Result<()> {
        let (pool, topic, partition) = (self.pool, self.topic, self.partition);
        let (registry, options) = (self.registry, self.options);
        if self.pending.is_empty() {
            return Ok(());
        }
        let messages = std::mem::take(&mut self.pending);
        let unknown: Vec<CommandKey> = messages
            .iter()
            .filter_map(|m| m.decoded.as_ref().ok())
            .map(|c| (c.source.as_str().to_owned(), c.id.as_str().to_owned()))
            .filter(|k| !replay.outcomes.contains_key(k))
            .collect();
        let elsewhere =
            store::outcomes_recorded_elsewhere(pool, topic, partition, &unknown).await?;
        replay.outcomes.extend(elsewhere);
        let plan = batch::plan(
            registry,
            options,
            &messages,
            &replay.outcomes,
            &replay.aggregates,
            parked,
        );
        report.commands += plan.processed.len() as u64;
        // Outcomes carry their payload digests (those recorded elsewhere from Postgres, the
        // others from this re-execution), so a delivery that reused a key is refused again.
        let key_reused = plan.key_reused() as u64;
        report.key_reused += key_reused;
        report.duplicates += plan.duplicates.len() as u64 - key_reused;
        report.dead_letters += plan.dead_letters.len() as u64;
        report.parked += plan.parked.len() as u64;
        for p in plan.processed {
            replay.outcomes.insert((p.source, p.command_id), p.outcome);
        }
        for w in plan.writes {
            replay.aggregates.insert(
                (w.aggregate_type, w.aggregate_id),
                Loaded {
                    version: w.new_version,
                    state: w.state,
                },
            );
        }
        Ok(())
    }
}

/// The consumer's position in the partition, when it has one.
fn position(consumer: &BaseConsumer, topic: &str, partition: i32) -> Option<i64> {
    let pos = consumer.position().ok()?;
    match pos.find_partition(topic, partition)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn partitions_parse() {
        assert_eq!(parse_partitions("all"), Ok(None));
        assert_eq!(parse_partitions(" 3, 0 ,3"), Ok(Some([0, 3].into())));
        assert!(parse_partitions("x").is_err());
        assert!(parse_partitions("-1").is_err());
        assert!(parse_partitions(",").is_err());
    }

    #[test]
    fn differences_name_what_differs() {
        let key = ("account".to_owned(), "acc-1".to_owned());
        let d = Difference {
            aggregate: key.clone(),
            stored: Some(Loaded {
                version: 3,
                state: json!({"balance": 999}),
            }),
            reexecuted: Some(Loaded {
                version: 2,
                state: json!({"balance": 5}),
            }),
        };
        let text = d.describe();
        assert!(text.starts_with("account/acc-1: "), "{text}");
        assert!(
            text.contains("version differs: postgres 3, re-executed 2"),
            "{text}"
        );
        assert!(
            text.contains(r#"state differs: postgres {"balance":999}, re-executed {"balance":5}"#),
            "{text}"
        );
        let missing = Difference {
            aggregate: key,
            stored: None,
            reexecuted: Some(Loaded {
                version: 1,
                state: json!({}),
            }),
        };
        assert!(missing.describe().contains("missing in postgres"));
    }
}
