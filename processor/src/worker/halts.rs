//! The loop's side of the commands-log checks ([`crate::commands_log`]): the recorded
//! partition count, halting a partition or the whole topic, what the lag monitor reports,
//! screening a poll's first messages against the fingerprints, and seeks that must succeed
//! before a partition's messages are applied.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{Consumer as _, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::lag::LogReport;
use super::{Consumer, Worker};
use crate::batch::Incoming;
use crate::commands_log::{self, FirstMessage, HaltReason};
use crate::retry::Backoff;
use crate::store;

impl Worker {
    /// The partition count recorded for the topic, recording `partitions` when none is;
    /// retried while the database is unavailable. `None` when shut down meanwhile.
    pub(super) async fn record_layout(
        &self,
        partitions: i32,
        shutdown: &CancellationToken,
    ) -> Option<i32> {
        let topic = self.config.commands_topic.as_str();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match store::record_layout(&self.pool, topic, partitions).await {
                Ok(recorded) => return Some(recorded),
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot read the topic's recorded partition count; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Halts `partition`: paused, nothing of it applied, still owned; logged once per reason.
    pub(super) fn halt(&self, consumer: &Consumer, partition: i32, reason: HaltReason) {
        let new = {
            let mut halted = self.halted.lock().expect("halted set");
            let new = halted.insert(partition, reason.clone());
            halted.publish(&self.metrics);
            new
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(self.config.commands_topic.as_str(), partition);
        let _ = consumer.pause(&tpl);
        if new {
            tracing::error!(
                partition,
                reason = reason.label(),
                "partition halted, nothing of it is applied: {}",
                reason.describe(partition)
            );
        }
    }

    /// Halts every owned partition, and every one assigned later, until the topic's
    /// partition count is accepted.
    pub(super) fn halt_topic(&self, consumer: &Consumer, reason: HaltReason) {
        let mine = self.owned_partitions();
        let new = {
            let mut halted = self.halted.lock().expect("halted set");
            let new = halted.topic() != Some(&reason);
            halted.halt_topic(reason.clone(), mine.iter().copied());
            halted.publish(&self.metrics);
            new
        };
        let topic = self.config.commands_topic.as_str();
        let mut tpl = TopicPartitionList::new();
        for p in &mine {
            tpl.add_partition(topic, *p);
        }
        let _ = consumer.pause(&tpl);
        if new {
            tracing::error!(
                topic,
                reason = reason.label(),
                "topic halted, nothing of any partition is applied: {}",
                reason.describe(-1)
            );
        }
    }

    /// Handles what the log monitor found.
    pub(super) async fn on_log_report(
        &self,
        consumer: &Consumer,
        known: &mut i32,
        report: LogReport,
    ) {
        match report {
            LogReport::PartitionCount(broker) => {
                let halted = self.halted.lock().expect("halted set").topic().is_some();
                if broker != *known || halted {
                    self.layout_changed(consumer, known, broker).await;
                }
            }
            LogReport::Bounds(bounds) => {
                // How far each partition's messages were delivered to this worker.
                let delivered: HashMap<i32, i64> = consumer
                    .position()
                    .map(|tpl| {
                        tpl.elements()
                            .iter()
                            .filter_map(|e| match e.offset() {
                                Offset::Offset(o) => Some((e.partition(), o)),
                                _ => None,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                for b in bounds {
                    let p = b.partition;
                    // A position that moved since the monitor read it makes the reading
                    // stale; a partition no longer owned has none.
                    if self.next_offset(p) != Some(b.stored)
                        || self.halted.lock().expect("halted set").contains(&p)
                    {
                        continue;
                    }
                    if let Some(detail) = commands_log::judge_watermarks(
                        b.low,
                        b.high,
                        b.stored,
                        delivered.get(&p).copied(),
                    ) {
                        self.halt(consumer, p, HaltReason::LogChanged(detail));
                        continue;
                    }
                    // The fingerprinted message itself is gone (retention of applied
                    // commands only): nothing to compare, start at the stored offset.
                    let gone = {
                        let mut checks = self.checks.lock().expect("log checks");
                        let gone = checks.expected.get(&p).is_some_and(|e| e.offset < b.low);
                        if gone {
                            checks.expected.remove(&p);
                        }
                        gone
                    };
                    if gone {
                        tracing::info!(partition = p, low = b.low, stored = b.stored, "the last applied command was deleted by retention; consuming from the stored offset");
                        self.seek_or_defer(consumer, p, b.stored, true);
                    }
                }
            }
        }
    }

    /// Reads the topic's partition count now; when it is not the known one, halts the topic
    /// (or takes its partitions again under an accepted count). Returns whether it did.
    pub(super) async fn partition_count_changed(
        &self,
        consumer: &Consumer,
        known: &mut i32,
    ) -> bool {
        let topic = self.config.commands_topic.as_str();
        let count = tokio::task::block_in_place(|| {
            crate::topics::partition_count(consumer.client(), topic, Duration::from_secs(5))
        });
        match count {
            Ok(broker) if broker != *known => {
                self.layout_changed(consumer, known, broker).await;
                true
            }
            Ok(_) => false,
            Err(e) => {
                // The message is dead-lettered as misrouted only if the count is known to
                // be the same; without an answer, nothing is applied and the poll is read
                // again.
                tracing::warn!(error = %e, "cannot read the partition count; the poll is consumed again");
                self.take_back_all(
                    consumer,
                    "reading the partition count failed: consuming again from the stored offsets",
                )
                .await;
                true
            }
        }
    }

    /// The broker reports `broker` partitions, and the worker knew `known`: adopts the count
    /// if an operator accepted it (taking every owned partition again, to consume under it
    /// from the stored offsets), or halts the topic.
    async fn layout_changed(&self, consumer: &Consumer, known: &mut i32, broker: i32) {
        let topic = self.config.commands_topic.as_str();
        let recorded = match store::recorded_layout(&self.pool, topic).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the recorded partition count");
                None
            }
        };
        if recorded == Some(broker) {
            let lifted = {
                let mut halted = self.halted.lock().expect("halted set");
                let lifted = halted.lift_topic();
                halted.publish(&self.metrics);
                lifted
            };
            tracing::warn!(
                topic,
                from = *known,
                to = broker,
                lifted = lifted.len(),
                "partition count accepted: consuming again from the stored offsets under the new count"
            );
            *known = broker;
            self.take_back_all(consumer, "partition count accepted")
                .await;
        } else {
            self.halt_topic(
                consumer,
                HaltReason::PartitionCount {
                    recorded: recorded.unwrap_or(*known),
                    broker,
                },
            );
        }
    }

    /// Holds back the messages of a poll that must not be applied (yet): those of a
    /// partition whose seek failed, and checks each fingerprinted partition's first message.
    /// One lock and one test per poll when nothing is pending.
    pub(super) fn screen(&self, consumer: &Consumer, groups: &mut Vec<(i32, Vec<Incoming>)>) {
        let mut after: Vec<(i32, i64)> = Vec::new();
        let mut differs: Vec<(i32, String)> = Vec::new();
        {
            let mut checks = self.checks.lock().expect("log checks");
            if checks.is_empty() {
                return;
            }
            groups.retain(|(p, messages)| {
                if checks.pending_seeks.contains_key(p) {
                    return false;
                }
                let Some(expected) = checks.expected.get(p).copied() else {
                    return true;
                };
                let Some(first) = messages.iter().find(|m| m.offset >= expected.offset) else {
                    // From before the start: below the stored offset, dropped by the store.
                    return true;
                };
                match commands_log::judge_first_message(&expected, first.offset, first.timestamp) {
                    FirstMessage::Matches => {
                        checks.expected.remove(p);
                        true
                    }
                    FirstMessage::Differs(detail) => {
                        differs.push((*p, detail));
                        false
                    }
                    FirstMessage::After => {
                        after.push((*p, expected.stored));
                        true
                    }
                    FirstMessage::Before => true,
                }
            });
            for (p, _) in &after {
                checks.expected.remove(p);
            }
        }
        for (p, detail) in differs {
            self.halt(consumer, p, HaltReason::LogChanged(detail));
        }
        // A gap where the fingerprinted message was: fine when the log still starts at or
        // below the stored offset (transaction markers, retention of applied commands).
        let topic = self.config.commands_topic.as_str();
        for (p, stored) in after {
            let marks = tokio::task::block_in_place(|| {
                consumer.fetch_watermarks(topic, p, Duration::from_secs(5))
            });
            let verdict = match marks {
                Ok((low, high)) => commands_log::judge_watermarks(low, high, stored, None),
                Err(e) => Some(format!("the log start could not be read ({e}) after a gap below the stored offset {stored}")),
            };
            if let Some(detail) = verdict {
                groups.retain(|(q, _)| *q != p);
                self.halt(consumer, p, HaltReason::LogChanged(detail));
            }
        }
    }

    /// Seeks `partition` to `offset`, resuming it when `resume`. A failed seek leaves the
    /// consumer where it was, so the partition is paused, its messages are discarded, and
    /// the seek is retried every second: nothing is applied from anywhere but the stored
    /// position. Returns whether the seek succeeded.
    pub(super) fn seek_or_defer(
        &self,
        consumer: &Consumer,
        partition: i32,
        offset: i64,
        resume: bool,
    ) -> bool {
        let topic = self.config.commands_topic.as_str();
        let result = if crate::failpoint::once("seek-fails-once") {
            Err("failpoint seek-fails-once".to_owned())
        } else {
            match consumer.seek(
                topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(10),
            ) {
                Ok(()) => Ok(()),
                // After an offset outside the log (`auto.offset.reset=error`) librdkafka
                // stops fetching the partition, and refuses seeks: only assigning it again
                // starts it. (rdkafka reports the seek's error code only as librdkafka's
                // text for it, `RD_KAFKA_RESP_ERR__STATE`.)
                Err(KafkaError::Seek(e)) if e == "Local: Erroneous state" => {
                    reassign(consumer, topic, partition, offset)
                }
                Err(e) => Err(e.to_string()),
            }
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let mut checks = self.checks.lock().expect("log checks");
        match result {
            Ok(()) => {
                if checks.pending_seeks.remove(&partition).is_some() {
                    tracing::info!(
                        partition,
                        offset,
                        "seek succeeded; consuming from the stored position"
                    );
                }
                if resume {
                    let _ = consumer.resume(&tpl);
                }
                true
            }
            Err(e) => {
                let _ = consumer.pause(&tpl);
                if checks.pending_seeks.insert(partition, offset).is_none() {
                    tracing::error!(partition, offset, error = %e, "seek to the stored position failed: partition paused and its messages discarded; retrying every second");
                }
                false
            }
        }
    }

    /// Retries the failed seeks of partitions still owned.
    pub(super) fn retry_seeks(&self, consumer: &Consumer) {
        let pending: Vec<(i32, i64)> = {
            let mut checks = self.checks.lock().expect("log checks");
            if checks.pending_seeks.is_empty() {
                return;
            }
            let owned = self.owned.lock().expect("owned map");
            checks.pending_seeks.retain(|p, _| owned.contains_key(p));
            checks.pending_seeks.iter().map(|(p, o)| (*p, *o)).collect()
        };
        for (partition, offset) in pending {
            let resume = !self.halted.lock().expect("halted set").contains(&partition);
            self.seek_or_defer(consumer, partition, offset, resume);
        }
    }
}

/// Assigns `partition` again at `offset`, to restart a fetcher that stopped.
fn reassign(consumer: &Consumer, topic: &str, partition: i32, offset: i64) -> Result<(), String> {
    if !matches!(
        consumer.rebalance_protocol(),
        RebalanceProtocol::Cooperative
    ) {
        return Err("the partition's fetcher stopped and the group is not cooperative".into());
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    // Not assigned any more (an earlier attempt got this far): assigning is what is left.
    let _ = consumer.incremental_unassign(&tpl);
    let mut at = TopicPartitionList::new();
    at.add_partition_offset(topic, partition, Offset::Offset(offset))
        .map_err(|e| e.to_string())?;
    consumer.incremental_assign(&at).map_err(|e| e.to_string())
}
