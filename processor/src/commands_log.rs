//! Whether the commands log a worker consumes is still the log its stored positions belong
//! to, and the halts that stop a partition (or the whole topic) loudly when it is not.
//!
//! A stored position is an offset, and an offset means something only in the log it was
//! taken from. A topic deleted and re-created, commands deleted by retention before they
//! were applied, or a partition count that moved keys to other partitions all leave
//! offsets that look valid. Consuming on would drop acknowledged commands as "applied
//! before", or apply commands out of their aggregate's order. So the worker checks, off the
//! hot path:
//!
//! - at every consumer error (with `auto.offset.reset=error` an offset outside the log is
//!   one) and every few seconds, each owned partition's log start and end against its
//!   stored position ([`judge_watermarks`]);
//! - when it takes a partition whose last applied message has a recorded Kafka timestamp,
//!   it reads from that message and compares ([`judge_first_message`]): a log re-created
//!   and grown past the stored offset has another message there;
//! - the partition count, against the one recorded in Postgres.
//!
//! What fails a check is halted: paused, nothing of it applied, still owned (its relay
//! publishes on), an error logged with what the operator should run, a metric, and
//! `/readyz` answering 503. The data here is shared by the worker's loop, its rebalance
//! callback and the HTTP endpoint.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use crate::metrics::{halt_reason, Metrics};

/// Why a partition is halted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HaltReason {
    /// A poison command, with `--on-poison halt`, at this offset.
    Poison {
        /// The poison command's offset.
        offset: i64,
    },
    /// The log is not the one the stored position belongs to.
    LogChanged(String),
    /// The topic's partition count is not the recorded one.
    PartitionCount {
        /// The count recorded in Postgres.
        recorded: i32,
        /// The count the broker reports.
        broker: i32,
    },
}

impl HaltReason {
    /// The value of the metric's `reason` label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Poison { .. } => halt_reason::POISON,
            Self::LogChanged(_) => halt_reason::LOG_CHANGED,
            Self::PartitionCount { .. } => halt_reason::PARTITION_COUNT,
        }
    }

    /// What happened and what the operator runs, for logs and `/readyz`.
    pub fn describe(&self, partition: i32) -> String {
        match self {
            Self::Poison { offset } => format!(
                "poison command at offset {offset} (--on-poison halt); restart the worker once the handler is fixed"
            ),
            Self::LogChanged(detail) => format!(
                "the commands log changed: {detail}; find out what happened to the topic, then run \
                 `cmdproc topics accept-log --partitions {partition} --why \"<what happened>\"`"
            ),
            Self::PartitionCount { recorded, broker } => format!(
                "the commands topic has {broker} partitions, {recorded} recorded: keys moved between \
                 partitions, which breaks their order; move to a new topic (README: growing a topic), \
                 or run `cmdproc topics accept-partitions --why \"<reason>\"`"
            ),
        }
    }
}

/// The halted partitions of one worker.
#[derive(Debug, Default)]
pub struct HaltedPartitions {
    partitions: BTreeMap<i32, HaltReason>,
    /// Set while the whole topic is halted: every partition assigned meanwhile is halted too.
    topic: Option<HaltReason>,
}

/// [`HaltedPartitions`], shared.
pub type Halted = Arc<Mutex<HaltedPartitions>>;

impl HaltedPartitions {
    /// Whether nothing of `partition` may be applied.
    pub fn contains(&self, partition: &i32) -> bool {
        self.topic.is_some() || self.partitions.contains_key(partition)
    }

    /// Whether no partition is halted.
    pub fn is_empty(&self) -> bool {
        self.partitions.is_empty() && self.topic.is_none()
    }

    /// Why `partition` is halted, if it is.
    pub fn reason(&self, partition: i32) -> Option<&HaltReason> {
        self.partitions.get(&partition)
    }

    /// The topic-wide halt, if any.
    pub fn topic(&self) -> Option<&HaltReason> {
        self.topic.as_ref()
    }

    /// Halts `partition`; returns whether it was not halted already for that reason.
    pub fn insert(&mut self, partition: i32, reason: HaltReason) -> bool {
        self.partitions.insert(partition, reason.clone()) != Some(reason)
    }

    /// Halts the whole topic: `partitions` (those owned now) and every one assigned later.
    pub fn halt_topic(&mut self, reason: HaltReason, partitions: impl IntoIterator<Item = i32>) {
        for p in partitions {
            self.partitions.insert(p, reason.clone());
        }
        self.topic = Some(reason);
    }

    /// Lifts the topic-wide halt; returns the partitions it had halted.
    pub fn lift_topic(&mut self) -> Vec<i32> {
        self.topic = None;
        let lifted: Vec<i32> = self
            .partitions
            .iter()
            .filter(|(_, r)| matches!(r, HaltReason::PartitionCount { .. }))
            .map(|(p, _)| *p)
            .collect();
        for p in &lifted {
            self.partitions.remove(p);
        }
        lifted
    }

    /// Lifts `partition`'s halt if `lift` says so for its reason; returns whether it did.
    pub fn lift_if(&mut self, partition: i32, lift: impl Fn(&HaltReason) -> bool) -> bool {
        if self.partitions.get(&partition).is_some_and(lift) {
            self.partitions.remove(&partition);
            return true;
        }
        false
    }

    /// One line naming every halted partition and why, for `/readyz`.
    pub fn summary(&self) -> String {
        let mut parts: Vec<String> = self
            .partitions
            .iter()
            .map(|(p, r)| format!("partition {p} ({})", r.label()))
            .collect();
        if let Some(r) = &self.topic {
            parts.push(format!("the whole topic ({})", r.label()));
        }
        parts.join(", ")
    }

    /// Sets the halted-partitions gauge to what is halted now.
    pub fn publish(&self, metrics: &Metrics) {
        let mut counts: HashMap<&'static str, i64> =
            halt_reason::ALL.iter().map(|r| (*r, 0)).collect();
        for r in self.partitions.values() {
            *counts.entry(r.label()).or_default() += 1;
        }
        for (label, n) in counts {
            metrics.partitions_halted.with_label_values(&[label]).set(n);
        }
    }
}

/// A partition taken at the message before its stored offset, to compare that message with
/// the recorded fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// The offset sought: the stored offset minus one.
    pub offset: i64,
    /// The recorded Kafka timestamp of the message there.
    pub timestamp: i64,
    /// The stored next offset.
    pub stored: i64,
}

/// Per owned partition, what must happen before its messages may be applied.
#[derive(Debug, Default)]
pub struct LogChecks {
    /// Partitions whose first delivered message must match the fingerprint.
    pub expected: HashMap<i32, Expected>,
    /// Partitions whose seek to the stored offset failed, with the offset: paused, and their
    /// messages discarded, until a retried seek succeeds.
    pub pending_seeks: HashMap<i32, i64>,
}

/// [`LogChecks`], shared.
pub type SharedLogChecks = Arc<Mutex<LogChecks>>;

impl LogChecks {
    /// Whether nothing is waiting (the common case: one lock and this test per poll).
    pub fn is_empty(&self) -> bool {
        self.expected.is_empty() && self.pending_seeks.is_empty()
    }

    /// Forgets a partition (revoked, or taken again).
    pub fn forget(&mut self, partition: i32) {
        self.expected.remove(&partition);
        self.pending_seeks.remove(&partition);
    }
}

/// Where to start consuming a partition whose stored next offset is `next_offset`, and the
/// check to make on its first message: the message before the stored offset when its
/// timestamp was recorded (it is below the stored offset, so the store drops it as applied).
pub fn start_at(next_offset: i64, last_timestamp: Option<i64>) -> (i64, Option<Expected>) {
    match last_timestamp {
        Some(timestamp) if next_offset > 0 => (
            next_offset - 1,
            Some(Expected {
                offset: next_offset - 1,
                timestamp,
                stored: next_offset,
            }),
        ),
        _ => (next_offset, None),
    }
}

/// What the first message delivered after a fingerprinted start says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstMessage {
    /// The message sought, with the recorded timestamp: the same log.
    Matches,
    /// Another message where the sought one was: another log.
    Differs(String),
    /// The first message is past the one sought: fine if the log start is not above the
    /// stored offset (transaction markers, or retention of applied commands only); the
    /// caller reads the log start to decide.
    After,
    /// A message from before the seek: not the first of this start.
    Before,
}

/// Compares the first message delivered (`offset`, `timestamp`) with `expected`.
pub fn judge_first_message(
    expected: &Expected,
    offset: i64,
    timestamp: Option<i64>,
) -> FirstMessage {
    if offset < expected.offset {
        FirstMessage::Before
    } else if offset > expected.offset {
        FirstMessage::After
    } else if timestamp == Some(expected.timestamp) {
        FirstMessage::Matches
    } else {
        FirstMessage::Differs(format!(
            "the message at offset {offset} has timestamp {} but the one applied there had {}: \
             the topic was re-created (or its log replaced) and already holds other commands",
            timestamp.map_or_else(|| "none".to_owned(), |t| t.to_string()),
            expected.timestamp
        ))
    }
}

/// Judges a partition's log start (`low`) and end (`high`) against its stored next offset
/// (read before the watermarks, so a log end below it is not a race with this worker's own
/// progress) and the worker's consumer position (how far messages were delivered to it):
/// `Some(detail)` when commands the worker never applied are gone, or the log ends below
/// what was applied.
pub fn judge_watermarks(
    low: i64,
    high: i64,
    stored: i64,
    delivered_to: Option<i64>,
) -> Option<String> {
    if high < stored {
        return Some(format!(
            "the log ends at offset {high}, below the stored offset {stored}: the topic was \
             re-created or truncated, and later commands would be dropped as applied before"
        ));
    }
    // Messages below the consumer's position were delivered to this worker (and are being
    // applied); only those it never saw are lost.
    if low > stored && delivered_to.is_none_or(|d| d < low) {
        return Some(format!(
            "the log starts at offset {low}, above the stored offset {stored}: commands \
             {stored}..{low} were deleted (retention, or deleted records) before they were applied"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprinted_position_starts_one_message_early() {
        assert_eq!(start_at(0, Some(5)), (0, None));
        assert_eq!(start_at(7, None), (7, None));
        let (at, expected) = start_at(7, Some(123));
        assert_eq!(at, 6);
        let expected = expected.unwrap();
        assert_eq!(
            judge_first_message(&expected, 6, Some(123)),
            FirstMessage::Matches
        );
        assert!(matches!(
            judge_first_message(&expected, 6, Some(124)),
            FirstMessage::Differs(_)
        ));
        assert!(matches!(
            judge_first_message(&expected, 6, None),
            FirstMessage::Differs(_)
        ));
        assert_eq!(
            judge_first_message(&expected, 8, Some(1)),
            FirstMessage::After
        );
        assert_eq!(
            judge_first_message(&expected, 2, Some(1)),
            FirstMessage::Before
        );
    }

    #[test]
    fn watermarks_halt_only_for_lost_commands() {
        // A log that covers the stored offset.
        assert_eq!(judge_watermarks(0, 10, 10, Some(10)), None);
        assert_eq!(judge_watermarks(4, 10, 6, None), None);
        // Re-created below the stored offset.
        assert!(judge_watermarks(0, 3, 10, None).is_some());
        // Deleted before being applied, and never delivered.
        assert!(judge_watermarks(8, 20, 5, Some(5)).is_some());
        assert!(judge_watermarks(8, 20, 5, None).is_some());
        // Delivered already (in the batch being applied): nothing lost.
        assert_eq!(judge_watermarks(8, 20, 5, Some(9)), None);
    }

    #[test]
    fn a_topic_halt_covers_later_partitions_and_lifts_alone() {
        let mut h = HaltedPartitions::default();
        assert!(h.is_empty());
        h.insert(3, HaltReason::Poison { offset: 1 });
        h.halt_topic(
            HaltReason::PartitionCount {
                recorded: 2,
                broker: 4,
            },
            [0, 1],
        );
        assert!(h.contains(&7));
        assert!(h.summary().contains("the whole topic"));
        assert_eq!(h.lift_topic(), vec![0, 1]);
        assert!(!h.contains(&0));
        assert!(h.contains(&3));
        assert!(!h.lift_if(3, |r| matches!(r, HaltReason::LogChanged(_))));
        h.insert(2, HaltReason::LogChanged("x".into()));
        assert!(h.lift_if(2, |r| matches!(r, HaltReason::LogChanged(_))));
    }

    #[test]
    fn pending_seeks_and_expectations_are_forgotten_together() {
        let mut c = LogChecks::default();
        assert!(c.is_empty());
        c.pending_seeks.insert(1, 10);
        c.expected.insert(
            1,
            Expected {
                offset: 9,
                timestamp: 1,
                stored: 10,
            },
        );
        c.forget(1);
        assert!(c.is_empty());
    }
}
