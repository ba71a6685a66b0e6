//! The naive baseline of `cmdproc bench` (`cmdproc run --naive-baseline`), not for
//! production: what a hand-rolled consumer would do. Every command is applied in a
//! transaction of its own (batch size 1, no linger, no aggregate cache: [`settings`]) and
//! its Kafka offset is committed synchronously before the next one ([`SyncCommit`]). The
//! production worker only mirrors its stored positions into Kafka
//! ([`super::MirrorOffsets`]); nothing else of the worker knows about the baseline.

use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};

use super::{Consumer, KafkaOffsets, WorkerConfig};

/// `config` as the baseline: one command per transaction, no linger, no aggregate cache.
pub(super) fn settings(config: WorkerConfig) -> WorkerConfig {
    WorkerConfig {
        batch_size: 1,
        batch_linger: Duration::ZERO,
        aggregate_cache: 0,
        naive: true,
        ..config
    }
}

/// Commits each committed batch's offset to Kafka synchronously before going on.
#[derive(Debug)]
pub(super) struct SyncCommit;

impl KafkaOffsets for SyncCommit {
    fn committed(&self, consumer: &Consumer, topic: &str, partition: i32, next_offset: i64) {
        let mut tpl = TopicPartitionList::new();
        let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(next_offset));
        if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
            tracing::warn!(partition, error = %e, "offset commit failed");
        }
    }
}
