//! Applying a poll: one transaction for every partition it brought, retried while the
//! database is unavailable or (a few times) after a conflict; otherwise one transaction per
//! partition, split while they time out, and a partition that still fails set aside and
//! tried again later, so it never holds back the others.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use commands::Registry;
use rdkafka::consumer::Consumer as _;
use rdkafka::TopicPartitionList;
use tokio_util::sync::CancellationToken;

use super::{Consumer, Worker};
use crate::batch::Incoming;
use crate::commands_log::HaltReason;
use crate::retry::Backoff;
use crate::store::{self, AggregateCache, BatchTarget, PartitionBatch, StoreError};

/// How many times a poll whose transaction hit a version conflict is retried whole before
/// its partitions are applied one transaction each.
const WHOLE_CONFLICT_RETRIES: u32 = 3;
/// First and longest wait before a partition set aside is tried again.
const SET_ASIDE_FIRST_RETRY: Duration = Duration::from_secs(1);
const SET_ASIDE_LONGEST_RETRY: Duration = Duration::from_secs(60);

/// After how many transactions of a remembered split size passed the size doubles.
const SPLIT_GROWS_AFTER: u32 = 8;

/// The transaction size that passed for a partition whose transactions timed out.
#[derive(Debug, Clone, Copy)]
pub(super) struct SplitLimit {
    /// Most commands per transaction.
    per_transaction: usize,
    /// Transactions of that size that passed since it was set.
    passed: u32,
}

/// A partition set aside after its batch kept failing.
#[derive(Debug)]
pub(super) struct SetAside {
    /// When to try it again; `None` while it is being tried.
    retry_at: Option<Instant>,
    /// Grows with every failed try; the entry goes once the partition commits again.
    backoff: Backoff,
}

impl Worker {
    /// Applies one poll's messages, grouped by partition, in one transaction, and handles
    /// each partition found fenced or moved on its own. While the database is unavailable
    /// the whole poll is retried with backoff; a conflict is retried whole a few times. Any
    /// other failure (a statement timeout, a persistent conflict, a database error) must not
    /// hold back the partitions that are fine: each partition is then applied in a
    /// transaction of its own ([`Worker::apply_partition`]).
    #[tracing::instrument(skip_all, fields(
        partitions = groups.len(),
        messages = groups.iter().map(|(_, m)| m.len()).sum::<usize>(),
    ))]
    pub(super) async fn apply(
        &self,
        consumer: &Consumer,
        registry: &Registry,
        groups: &[(i32, Vec<Incoming>)],
        cache: &mut AggregateCache,
        shutdown: &CancellationToken,
    ) {
        let cfg = &self.config;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut conflict_backoff = Backoff::new(Duration::from_millis(5), Duration::from_secs(1));
        for (partition, messages) in groups {
            super::record::trace_commands(*partition, messages);
        }
        // A partition whose transactions timed out recently is applied in transactions no
        // larger than those that passed, rather than timing out whole again first.
        let limited: HashMap<i32, usize> = {
            let limits = self.split_limits.lock().expect("split limits");
            if limits.is_empty() {
                HashMap::new()
            } else {
                groups
                    .iter()
                    .filter_map(|(p, _)| limits.get(p).map(|l| (*p, l.per_transaction)))
                    .collect()
            }
        };
        for (partition, messages) in groups {
            if let Some(limit) = limited.get(partition) {
                self.apply_partition(
                    consumer, registry, *partition, messages, cache, shutdown, None, *limit,
                )
                .await;
            }
        }
        loop {
            {
                let owned = self.owned.lock().expect("owned map");
                cache.retain(|p| owned.contains_key(&p));
            }
            let batches: Vec<PartitionBatch<'_>> = groups
                .iter()
                .filter(|(partition, _)| !limited.contains_key(partition))
                .filter_map(|(partition, messages)| self.partition_batch(*partition, messages))
                .collect();
            if batches.is_empty() {
                return;
            }
            let started = Instant::now();
            let result = store::process_batches(
                &self.pool,
                &batches,
                registry,
                &cfg.plan,
                Some(&mut *cache),
            )
            .await;
            let elapsed = started.elapsed();
            match result {
                Ok(results) => {
                    let slices: Vec<(i32, &[Incoming])> =
                        groups.iter().map(|(p, m)| (*p, m.as_slice())).collect();
                    self.batch_done(consumer, registry, &slices, results, elapsed)
                        .await;
                    return;
                }
                Err(StoreError::Unavailable(e)) => {
                    self.metrics.db_retries.inc();
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, attempt = backoff.attempts, retry_in_ms = delay.as_millis() as u64, "batch failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(StoreError::Conflict(reason))
                    if conflict_backoff.attempts < WHOLE_CONFLICT_RETRIES =>
                {
                    // Another writer existed (or a concurrent duplicate on another
                    // partition): reload and retry, soon but not in a tight loop, since a
                    // conflict that keeps coming back must not burn the CPU or block shutdown.
                    self.metrics.version_conflicts.inc();
                    let delay = conflict_backoff.next_delay();
                    tracing::warn!(
                        %reason,
                        attempt = conflict_backoff.attempts,
                        "version conflict; reloading and retrying the batch"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => {
                    if matches!(e, StoreError::Conflict(_)) {
                        self.metrics.version_conflicts.inc();
                    }
                    let alone = batches.len() == 1;
                    tracing::warn!(
                        error = %e,
                        partitions = batches.len(),
                        "batch failed; applying its partitions one transaction each"
                    );
                    drop(batches);
                    for (partition, messages) in groups {
                        if shutdown.is_cancelled() {
                            return;
                        }
                        if limited.contains_key(partition) {
                            continue;
                        }
                        // With one partition in the poll, the attempt that failed was
                        // already its own transaction.
                        let failed = alone.then_some(&e);
                        self.apply_partition(
                            consumer,
                            registry,
                            *partition,
                            messages,
                            cache,
                            shutdown,
                            failed,
                            messages.len(),
                        )
                        .await;
                    }
                    return;
                }
            }
        }
    }

    /// The batch of one partition's `messages`, or `None` when this worker does not own the
    /// partition, or has halted or set it aside.
    fn partition_batch<'m>(
        &'m self,
        partition: i32,
        messages: &'m [Incoming],
    ) -> Option<PartitionBatch<'m>> {
        let cfg = &self.config;
        if self.halted.lock().expect("halted set").contains(&partition)
            || self.is_set_aside(partition)
        {
            return None;
        }
        let Some(owned) = self
            .owned
            .lock()
            .expect("owned map")
            .get(&partition)
            .copied()
        else {
            tracing::debug!(
                partition,
                "skipping messages of a partition this worker does not own"
            );
            return None;
        };
        Some(PartitionBatch {
            target: BatchTarget {
                topic: cfg.commands_topic.as_str(),
                dead_letter_topic: self.dead_letter_topic.as_str(),
                events_topic: cfg.events_topic.as_str(),
                partition,
                epoch: owned.epoch,
                expected_next: Some(owned.next_offset),
            },
            messages,
        })
    }

    /// Applies one partition's messages of a poll in transactions of its own, at most
    /// `per_transaction` commands each, after the poll failed as a whole (`failed` is that
    /// failure when the poll held only this partition) or because the partition's
    /// transactions timed out recently. A transaction that times out is split: half the
    /// commands per transaction, then half again, down to one command; the size that passes
    /// is remembered for the partition's next polls and doubled again after
    /// [`SPLIT_GROWS_AFTER`] transactions pass. A partition that still fails (a single
    /// command timing out, a persistent conflict, any other database error) is set aside
    /// ([`Worker::set_aside`]) and tried again later, while the others go on. Only an
    /// unavailable database is waited for, as always.
    #[allow(clippy::too_many_arguments)]
    async fn apply_partition(
        &self,
        consumer: &Consumer,
        registry: &Registry,
        partition: i32,
        messages: &[Incoming],
        cache: &mut AggregateCache,
        shutdown: &CancellationToken,
        failed: Option<&StoreError>,
        per_transaction: usize,
    ) {
        let cfg = &self.config;
        let mut per_transaction = per_transaction.clamp(1, messages.len().max(1));
        match failed {
            Some(StoreError::Timeout(_)) if messages.len() > 1 => {
                per_transaction = messages.len() / 2;
                self.log_split(partition, messages, per_transaction);
            }
            Some(e) => {
                self.set_aside(consumer, partition, e);
                return;
            }
            None => {}
        }
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut conflicts = 0;
        let mut start = 0;
        while start < messages.len() {
            let end = (start + per_transaction).min(messages.len());
            let Some(batch) = self.partition_batch(partition, &messages[start..end]) else {
                return;
            };
            let started = Instant::now();
            let result = store::process_batches(
                &self.pool,
                std::slice::from_ref(&batch),
                registry,
                &cfg.plan,
                Some(&mut *cache),
            )
            .await;
            let elapsed = started.elapsed();
            match result {
                Ok(results) => {
                    // A partition fenced, moved or halted meanwhile is handled by
                    // `partition_done`; its remaining messages are not this worker's to apply.
                    let go_on = results
                        .iter()
                        .all(|(_, r)| matches!(r, Ok(b) if b.halted_at.is_none()));
                    let slices = [(partition, &messages[start..end])];
                    self.batch_done(consumer, registry, &slices, results, elapsed)
                        .await;
                    if !go_on {
                        return;
                    }
                    self.split_passed(partition);
                    start = end;
                    backoff.reset();
                    conflicts = 0;
                }
                Err(StoreError::Unavailable(e)) => {
                    self.metrics.db_retries.inc();
                    let delay = backoff.next_delay();
                    tracing::warn!(partition, error = %e, attempt = backoff.attempts, retry_in_ms = delay.as_millis() as u64, "batch failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(StoreError::Timeout(_)) if end - start > 1 => {
                    per_transaction = (end - start) / 2;
                    self.log_split(partition, &messages[start..], per_transaction);
                }

                Err(StoreError::Conflict(reason)) if conflicts < WHOLE_CONFLICT_RETRIES => {
                    self.metrics.version_conflicts.inc();
                    conflicts += 1;
                    tracing::warn!(partition, %reason, attempt = conflicts, "version conflict; reloading and retrying the partition's batch");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(10 << conflicts)) => {}
                    }
                }
                Err(e) => {
                    self.set_aside(consumer, partition, &e);
                    return;
                }
            }
        }
    }

    fn log_split(&self, partition: i32, messages: &[Incoming], per_transaction: usize) {
        self.split_limits.lock().expect("split limits").insert(
            partition,
            SplitLimit {
                per_transaction,
                passed: 0,
            },
        );
        tracing::warn!(
            partition,
            first_offset = messages.first().map(|m| m.offset),
            commands = messages.len(),
            per_transaction,
            "batch timed out (statement timeout); splitting it into smaller transactions"
        );
    }

    /// Counts a transaction that passed for a partition with a
    /// remembered split size; after [`SPLIT_GROWS_AFTER`] of them the size doubles, and once
    /// it reaches the batch size the partition is applied with the others again.
    fn split_passed(&self, partition: i32) {
        let mut limits = self.split_limits.lock().expect("split limits");
        if limits.is_empty() {
            return;
        }
        let Some(limit) = limits.get_mut(&partition) else {
            return;
        };
        limit.passed += 1;
        if limit.passed >= SPLIT_GROWS_AFTER {
            limit.per_transaction *= 2;
            limit.passed = 0;
            if limit.per_transaction >= self.config.batch_size {
                limits.remove(&partition);
            }
        }
    }

    /// Feeds the metrics and handles each partition's result of a committed transaction
    /// (`slices` are the messages it carried, per partition), then wakes the relay.
    async fn batch_done(
        &self,
        consumer: &Consumer,
        registry: &Registry,
        slices: &[(i32, &[Incoming])],
        results: Vec<(i32, store::Result<store::BatchResult>)>,
        elapsed: Duration,
    ) {
        super::record::record_transaction(&self.metrics, &results, elapsed);
        let mut committed = false;
        for (partition, result) in results {
            if let Ok(r) = &result {
                self.clear_set_aside(partition, r.next_offset);
            }
            let messages = slices
                .iter()
                .find(|(p, _)| *p == partition)
                .map(|(_, m)| *m)
                .unwrap_or_default();
            committed |= self
                .partition_done(consumer, registry, partition, messages, result)
                .await;
        }
        if committed {
            self.wake_relay();
        }
    }

    /// Tells the relay the outbox has new rows: in-process, or with `NOTIFY` for a
    /// standalone `cmdproc relay` (off the batch loop: the next batch need not wait for it).
    pub(super) fn wake_relay(&self) {
        match &self.relay_wake {
            Some(w) => w.notify_one(),
            None => {
                let (pool, topic) = (self.pool.clone(), self.config.commands_topic.to_string());
                tokio::spawn(async move { crate::store::notify_outbox(&pool, &topic).await });
            }
        }
    }

    /// Handles one partition's result of a batch. Returns whether it committed anything.
    async fn partition_done(
        &self,
        consumer: &Consumer,
        registry: &Registry,
        partition: i32,
        messages: &[Incoming],
        result: store::Result<store::BatchResult>,
    ) -> bool {
        let cfg = &self.config;
        match result {
            Ok(r) => {
                self.record_batch(registry, partition, messages, &r);
                for (aggregate_type, aggregate_id) in &r.newly_parked {
                    tracing::error!(
                        partition,
                        %aggregate_type,
                        %aggregate_id,
                        "poison command: aggregate parked; its later commands are set aside in order"
                    );
                }
                tracing::debug!(
                    partition,
                    applied = r.applied,
                    rejected = r.rejected,
                    duplicates = r.duplicates,
                    dead_letters = r.dead_letters,
                    next_offset = r.next_offset,
                    "batch committed"
                );
                self.offsets.committed(
                    consumer,
                    cfg.commands_topic.as_str(),
                    partition,
                    r.next_offset,
                );
                if let Some(offset) = r.halted_at {
                    tracing::error!(
                        partition,
                        offset,
                        "poison command: partition halted (--on-poison halt); restart the worker once the handler is fixed"
                    );
                    {
                        let mut halted = self.halted.lock().expect("halted set");
                        halted.insert(partition, HaltReason::Poison { offset });
                        halted.publish(&self.metrics);
                    }
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition(cfg.commands_topic.as_str(), partition);
                    let _ = consumer.pause(&tpl);
                }
                r.messages > 0
            }
            Err(StoreError::Fenced { mine, current, .. }) => {
                self.metrics.fenced_batches.inc();
                self.fenced(consumer, partition, mine, current, None).await;
                false
            }
            Err(StoreError::Moved {
                expected, stored, ..
            }) => {
                // Restored from a backup (older) or an unacknowledged commit (newer):
                // consume again from what the database holds.
                tracing::warn!(
                    partition,
                    expected,
                    stored,
                    "stored position moved behind this worker's back"
                );
                let epoch = self
                    .owned
                    .lock()
                    .expect("owned map")
                    .get(&partition)
                    .map(|o| o.epoch);
                if let Some(epoch) = epoch {
                    self.fenced(consumer, partition, epoch, epoch, None).await;
                }
                false
            }
            Err(e) => {
                tracing::error!(partition, error = %e, "unexpected result for a partition");
                false
            }
        }
    }

    /// Whether `partition` is set aside and waiting for its next try.
    fn is_set_aside(&self, partition: i32) -> bool {
        let set_aside = self.set_aside.lock().expect("set-aside partitions");
        !set_aside.is_empty()
            && set_aside
                .get(&partition)
                .is_some_and(|s| s.retry_at.is_some())
    }

    /// Forgets that `partition` was set aside: it committed again.
    fn clear_set_aside(&self, partition: i32, next_offset: i64) {
        let mut set_aside = self.set_aside.lock().expect("set-aside partitions");
        if !set_aside.is_empty() && set_aside.remove(&partition).is_some() {
            tracing::info!(
                partition,
                next_offset,
                "partition set aside earlier commits again"
            );
        }
    }

    /// Sets a partition whose batch keeps failing aside: pauses it, drops its messages of
    /// this poll (they are consumed again from the stored offset), and schedules a retry
    /// with a per-partition backoff, so the worker's other partitions go on meanwhile.
    fn set_aside(&self, consumer: &Consumer, partition: i32, error: &StoreError) {
        let delay = {
            let mut set_aside = self.set_aside.lock().expect("set-aside partitions");
            let entry = set_aside.entry(partition).or_insert_with(|| SetAside {
                retry_at: None,
                backoff: Backoff::new(SET_ASIDE_FIRST_RETRY, SET_ASIDE_LONGEST_RETRY),
            });
            let delay = entry.backoff.next_delay();
            entry.retry_at = Some(Instant::now() + delay);
            (delay, entry.backoff.attempts)
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(self.config.commands_topic.as_str(), partition);
        let _ = consumer.pause(&tpl);
        self.metrics.partitions_set_aside.inc();
        tracing::error!(
            partition,
            error = %error,
            attempt = delay.1,
            retry_in_ms = delay.0.as_millis() as u64,
            "a batch of this partition keeps failing: partition set aside (paused, tried again \
             later from its stored offset) while the other partitions go on"
        );
    }

    /// Tries the set-aside partitions whose time has come again: seeks each back to its
    /// stored offset and resumes it. Partitions no longer owned are forgotten.
    pub(super) fn retry_set_aside(&self, consumer: &Consumer) {
        let now = Instant::now();
        let due: Vec<i32> = {
            let mut set_aside = self.set_aside.lock().expect("set-aside partitions");
            if set_aside.is_empty() {
                return;
            }
            let owned = self.owned.lock().expect("owned map");
            set_aside.retain(|p, _| owned.contains_key(p));
            // A halted partition waits for its operator, not for this retry.
            let halted = self.halted.lock().expect("halted set");
            set_aside
                .iter()
                .filter(|(p, _)| !halted.contains(p))
                .filter(|(_, s)| s.retry_at.is_some_and(|at| at <= now))
                .map(|(p, _)| *p)
                .collect()
        };
        let topic = self.config.commands_topic.as_str();
        for partition in due {
            let Some(offset) = self.next_offset(partition) else {
                continue;
            };
            let seek = consumer.seek(
                topic,
                partition,
                rdkafka::Offset::Offset(offset),
                Duration::from_secs(10),
            );
            let mut set_aside = self.set_aside.lock().expect("set-aside partitions");
            let Some(entry) = set_aside.get_mut(&partition) else {
                continue;
            };
            match seek {
                Ok(()) => {
                    entry.retry_at = None;
                    drop(set_aside);
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition(topic, partition);
                    let _ = consumer.resume(&tpl);
                    tracing::info!(
                        partition,
                        offset,
                        "trying a partition set aside again, from its stored offset"
                    );
                }
                Err(e) => {
                    let delay = entry.backoff.next_delay();
                    entry.retry_at = Some(Instant::now() + delay);
                    tracing::warn!(partition, offset, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot seek a partition set aside back to its stored offset; trying later");
                }
            }
        }
    }
}
