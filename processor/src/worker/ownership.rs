//! Which partitions the worker owns: the one ownership map, taking partitions in the
//! rebalance callback, fencing, taking a partition back and dropping it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, RebalanceProtocol};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::lag::forget_lag;
use super::{Consumer, Worker};
use crate::commands_log::{self, HaltReason, Halted, SharedLogChecks};
use crate::metrics::Metrics;
use crate::retry::Backoff;
use crate::store;

/// What a worker holds of a partition it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnedPartition {
    /// The epoch the worker took the partition at: its fencing token.
    pub epoch: i64,
    /// The stored next offset, as this worker last read or wrote it: at acquisition, then
    /// after each of its commits. Only the epoch holder moves a partition's offset, so
    /// while the worker owns a partition this is the value in Postgres.
    pub next_offset: i64,
}

/// The partitions a worker owns, with their epochs and stored positions: the worker's one
/// ownership map. Written by the worker's loop and its rebalance callback; read by the lag
/// monitor, by the relay running beside the worker (which publishes only these partitions'
/// outbox) and by `/readyz`.
pub type Owned = Arc<Mutex<HashMap<i32, OwnedPartition>>>;

/// Shared state of a worker and its rebalance callback.
pub(super) struct WorkerContext {
    pub(super) pool: PgPool,
    pub(super) runtime: tokio::runtime::Handle,
    pub(super) topic: String,
    pub(super) owner: String,
    pub(super) owned: Owned,
    pub(super) shutdown: CancellationToken,
    pub(super) metrics: Arc<Metrics>,
    pub(super) halted: Halted,
    pub(super) checks: SharedLogChecks,
}

impl ClientContext for WorkerContext {}

impl ConsumerContext for WorkerContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        self.metrics.rebalances.inc();
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut assign = TopicPartitionList::new();
                for elem in tpl.elements() {
                    let partition = elem.partition();
                    let Some(acquired) = self.acquire(partition) else {
                        continue;
                    };
                    tracing::info!(
                        partition,
                        epoch = acquired.epoch,
                        offset = acquired.next_offset,
                        "partition assigned"
                    );
                    let start = note_acquired(&self.owned, &self.checks, partition, &acquired);
                    let _ =
                        assign.add_partition_offset(elem.topic(), partition, Offset::Offset(start));
                }
                let result = if cooperative {
                    consumer.incremental_assign(&assign)
                } else {
                    consumer.assign(&assign)
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, "assigning partitions failed");
                }
                // A partition fenced earlier was paused; owning it again means consuming again.
                let _ = consumer.resume(&assign);
                // Unless the whole topic is halted: then so is every partition it gets.
                let mut halted = self.halted.lock().expect("halted set");
                if let Some(reason) = halted.topic().cloned() {
                    for elem in assign.elements() {
                        halted.insert(elem.partition(), reason.clone());
                    }
                    let _ = consumer.pause(&assign);
                }
                halted.publish(&self.metrics);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let lost = consumer.assignment_lost();
                {
                    let mut owned = self.owned.lock().expect("owned map");
                    let mut checks = self.checks.lock().expect("log checks");
                    let mut halted = self.halted.lock().expect("halted set");
                    for elem in tpl.elements() {
                        owned.remove(&elem.partition());
                        forget_lag(&self.metrics, elem.partition());
                        checks.forget(elem.partition());
                        // Whoever owns it next checks its log again.
                        halted.lift_if(elem.partition(), |r| {
                            !matches!(r, HaltReason::Poison { .. })
                        });
                        tracing::info!(partition = elem.partition(), lost, "partition revoked");
                    }
                    halted.publish(&self.metrics);
                }
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "unassigning partitions failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance failed; dropping every partition");
                let dropped: Vec<i32> = self
                    .owned
                    .lock()
                    .expect("owned map")
                    .drain()
                    .map(|(p, _)| p)
                    .collect();
                for p in dropped {
                    forget_lag(&self.metrics, p);
                    self.checks.lock().expect("log checks").forget(p);
                }
                let _ = consumer.unassign();
            }
        }
    }
}

impl WorkerContext {
    /// Takes a partition in Postgres, retrying while the database is unavailable. Runs
    /// inside the rebalance callback, which is synchronous, hence the blocking bridge.
    fn acquire(&self, partition: i32) -> Option<store::Acquired> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let result = tokio::task::block_in_place(|| {
                self.runtime.block_on(store::acquire_partition(
                    &self.pool,
                    &self.topic,
                    partition,
                    &self.owner,
                ))
            });
            match result {
                Ok(a) => return Some(a),
                Err(e) => {
                    if self.shutdown.is_cancelled() {
                        return None;
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(partition, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot take partition; retrying");
                    std::thread::sleep(delay);
                }
            }
        }
    }
}

/// Records a partition just taken in Postgres as owned at `acquired`'s epoch and position,
/// and returns the offset to consume from: one message early when the last applied message
/// is fingerprinted, to check that the log is still the one the stored offset belongs to.
fn note_acquired(
    owned: &Owned,
    checks: &SharedLogChecks,
    partition: i32,
    acquired: &store::Acquired,
) -> i64 {
    owned.lock().expect("owned map").insert(
        partition,
        OwnedPartition {
            epoch: acquired.epoch,
            next_offset: acquired.next_offset,
        },
    );
    let (start, expected) = commands_log::start_at(acquired.next_offset, acquired.last_timestamp);
    let mut checks = checks.lock().expect("log checks");
    checks.forget(partition);
    if let Some(e) = expected {
        checks.expected.insert(partition, e);
    }
    start
}

impl Worker {
    /// The partitions this worker owns now.
    pub(super) fn owned_partitions(&self) -> Vec<i32> {
        self.owned
            .lock()
            .expect("owned map")
            .keys()
            .copied()
            .collect()
    }

    /// `partition`'s stored next offset as this worker knows it, while it owns it.
    /// The owned partitions with this worker's epoch of each.
    pub(super) fn owned_epochs(&self) -> std::collections::HashMap<i32, i64> {
        self.owned
            .lock()
            .expect("owned map")
            .iter()
            .map(|(p, o)| (*p, o.epoch))
            .collect()
    }

    pub(super) fn next_offset(&self, partition: i32) -> Option<i64> {
        self.owned
            .lock()
            .expect("owned map")
            .get(&partition)
            .map(|o| o.next_offset)
    }

    /// Compares the epochs and stored positions of the owned partitions with Postgres and
    /// handles any change; and takes back a partition it dropped as fenced if Kafka still
    /// assigns it here a session timeout later (whoever fenced it was a zombie that has
    /// since stopped, or a restore confused the ownership), so no partition stays paused
    /// on the member the group gave it to.
    pub(super) async fn check_epochs(&self, consumer: &Consumer) {
        self.retake_dropped(consumer).await;
        let mine: Vec<(i32, i64)> = self.owned_epochs().into_iter().collect();
        if mine.is_empty() {
            return;
        }
        let parts: Vec<i32> = mine.iter().map(|(p, _)| *p).collect();
        let Ok(stored) =
            store::epochs(&self.pool, self.config.commands_topic.as_str(), &parts).await
        else {
            // The database is away; the next batch will find out and retry.
            return;
        };
        for (partition, epoch) in mine {
            let Some(state) = stored.get(&partition) else {
                continue;
            };
            let last_stored = self.next_offset(partition);
            if state.epoch != epoch {
                let owner = state.owner.as_deref();
                self.fenced(consumer, partition, epoch, state.epoch, owner)
                    .await;
            } else if last_stored.is_some_and(|p| p != state.next_offset) {
                // Same epoch, other position: restored from a backup taken since we took
                // the partition (or a commit whose acknowledgement was lost).
                tracing::warn!(
                    partition,
                    expected = last_stored,
                    stored = state.next_offset,
                    "stored position moved behind this worker's back"
                );
                self.fenced(consumer, partition, epoch, epoch, None).await;
            }
        }
    }

    async fn retake_dropped(&self, consumer: &Consumer) {
        let due: Vec<i32> = {
            let owned = self.owned.lock().expect("owned map");
            let mut dropped = self.dropped.lock().expect("dropped partitions");
            // Reassigned through a rebalance meanwhile: taken in the callback already.
            dropped.retain(|p, _| !owned.contains_key(p));
            dropped
                .iter()
                .filter(|(_, since)| since.elapsed() >= self.config.session_timeout)
                .map(|(p, _)| *p)
                .collect()
        };
        if due.is_empty() {
            return;
        }
        let assigned = consumer.assignment().unwrap_or_default();
        let topic = self.config.commands_topic.as_str();
        for partition in due {
            self.dropped
                .lock()
                .expect("dropped partitions")
                .remove(&partition);
            if assigned.find_partition(topic, partition).is_none() {
                continue;
            }
            if !self
                .take_back(
                    consumer,
                    partition,
                    "still assigned here after the session timeout: taking the partition back",
                )
                .await
            {
                self.drop_partition(consumer, partition);
            }
        }
    }

    /// Handles a partition whose epoch or stored position moved (`owner` is the row's
    /// owner when the caller read it). When the row still names this worker, or the epoch
    /// went back (a database restore), it was not another worker: take the partition
    /// again and consume from the stored offset. Otherwise another worker owns it now:
    /// drop it without committing anything.
    pub(super) async fn fenced(
        &self,
        consumer: &Consumer,
        partition: i32,
        mine: i64,
        current: i64,
        owner: Option<&str>,
    ) {
        // Epochs only grow, so one lower than ours (or our own, with the position moved)
        // means the database was restored: nobody took the partition since we did.
        let restored = current <= mine;
        let named = match owner {
            Some(o) => o == self.config.owner,
            None => matches!(
                store::epochs(&self.pool, self.config.commands_topic.as_str(), &[partition])
                    .await
                    .map(|m| m.get(&partition).cloned()),
                Ok(Some(store::PartitionState { owner: Some(o), .. })) if o == self.config.owner
            ),
        };
        if (restored || named)
            && self
                .take_back(consumer, partition, "partition rewound (replay, accepted log or database restore): consuming again from the stored offset")
                .await
        {
            return;
        }
        if !(restored || named) {
            tracing::warn!(
                partition,
                epoch = mine,
                current_epoch = current,
                "fenced: another worker owns this partition now; dropping it"
            );
        }
        self.drop_partition(consumer, partition);
        self.dropped
            .lock()
            .expect("dropped partitions")
            .insert(partition, Instant::now());
    }

    /// Takes `partition` again in Postgres (a new epoch) and seeks to its stored offset.
    pub(super) async fn take_back(&self, consumer: &Consumer, partition: i32, why: &str) -> bool {
        let topic = self.config.commands_topic.as_str();
        match store::acquire_partition(&self.pool, topic, partition, &self.config.owner).await {
            Ok(acquired) => {
                let start = note_acquired(&self.owned, &self.checks, partition, &acquired);
                // A log halt is judged again from the new start (after `topics accept-log`
                // the position is where the operator put it); other halts stay.
                let (lifted, still_halted) = {
                    let mut halted = self.halted.lock().expect("halted set");
                    let lifted =
                        halted.lift_if(partition, |r| matches!(r, HaltReason::LogChanged(_)));
                    halted.publish(&self.metrics);
                    (lifted, halted.contains(&partition))
                };
                tracing::warn!(
                    partition,
                    epoch = acquired.epoch,
                    offset = acquired.next_offset,
                    log_halt_lifted = lifted,
                    "{why}"
                );
                self.seek_or_defer(consumer, partition, start, !still_halted);
                true
            }
            Err(e) => {
                tracing::warn!(partition, error = %e, "cannot take the partition again; dropping it for now");
                false
            }
        }
    }

    /// Takes every owned partition again, so each consumes from its stored offset.
    pub(super) async fn take_back_all(&self, consumer: &Consumer, why: &str) {
        for partition in self.owned_partitions() {
            if !self.take_back(consumer, partition, why).await {
                self.drop_partition(consumer, partition);
            }
        }
    }

    /// Stops consuming `partition` and forgets it as owned.
    pub(super) fn drop_partition(&self, consumer: &Consumer, partition: i32) {
        self.owned.lock().expect("owned map").remove(&partition);
        forget_lag(&self.metrics, partition);
        // Its log is checked again by whoever takes it (this worker too, when it does).
        self.checks.lock().expect("log checks").forget(partition);
        {
            let mut halted = self.halted.lock().expect("halted set");
            halted.lift_if(partition, |r| matches!(r, HaltReason::LogChanged(_)));
            halted.publish(&self.metrics);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(self.config.commands_topic.as_str(), partition);
        let _ = consumer.pause(&tpl);
    }
}
