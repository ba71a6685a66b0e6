//! The database ceiling: the workers' batched SQL ([`store::process_batches`], the very
//! function the workers call, with the same aggregate cache) driven straight from memory
//! against Postgres, with no Kafka on either side. Commands are routed to partitions with
//! murmur2 as a producer would, and applied by one task per worker, each owning every
//! `workers`-th partition and taking batches of the workers' size across them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use commands::envelope::CLOUDEVENTS_JSON;
use commands::partitioner::partition_for_key;
use commands::Command;
use commands::Registry;
use sqlx::PgPool;

use crate::batch::{Incoming, PlanOptions};
use crate::cli::demo::Namespace;
use crate::store::{self, AggregateCache, BatchTarget, PartitionBatch};

/// Applies `commands` (to the namespace's topics) through `workers` concurrent tasks in batches of `batch_size`;
/// returns how long it took and the number of commands applied or rejected.
// The bench's knobs, passed as they are; bundling them would only rename them.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    pool: &PgPool,
    registry: &Arc<Registry>,
    ns: &Namespace,
    partitions: i32,
    workers: u32,
    batch_size: usize,
    cache_capacity: usize,
    commands: &[Command],
) -> anyhow::Result<(Duration, usize)> {
    let (topic, events_topic) = (ns.commands.as_str(), ns.events.as_str());
    let mut by_partition: BTreeMap<i32, Vec<Incoming>> = BTreeMap::new();
    for c in commands {
        let p =
            partition_for_key(c.subject.as_str().as_bytes(), partitions).expect("partitions > 0");
        let list = by_partition.entry(p).or_default();
        list.push(Incoming {
            offset: list.len() as i64,
            timestamp: None,
            key: Some(c.subject.as_str().as_bytes().to_vec()),
            value: Some(c.encode()),
            headers: vec![(
                "content-type".into(),
                Some(CLOUDEVENTS_JSON.as_bytes().to_vec()),
            )],
            decoded: Ok(c.clone()),
        });
    }
    let mut shares: Vec<Vec<(i32, i64, Vec<Incoming>)>> =
        (0..workers).map(|_| Vec::new()).collect();
    for (p, list) in by_partition {
        let acquired = store::acquire_partition(pool, topic, p, "bench-ceiling").await?;
        shares[(p as u32 % workers) as usize].push((p, acquired.epoch, list));
    }

    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for share in shares {
        let pool = pool.clone();
        let (topic, events_topic) = (topic.to_owned(), events_topic.to_owned());
        let registry = Arc::clone(registry);
        tasks.spawn(async move {
            let options = PlanOptions::default();
            let dead_letter_topic = format!("{topic}.dlq");
            let mut cache = AggregateCache::new(cache_capacity);
            let mut done = 0usize;
            // Like a worker's poll: up to `batch_size` messages in all, an equal share from
            // each partition, applied in one transaction.
            let mut cursors: Vec<(i32, i64, usize, &[Incoming])> = share
                .iter()
                .map(|(p, e, l)| (*p, *e, 0, l.as_slice()))
                .collect();
            while !cursors.is_empty() {
                let each = (batch_size / cursors.len()).max(1);
                let batches: Vec<PartitionBatch<'_>> = cursors
                    .iter()
                    .map(|(partition, epoch, at, list)| PartitionBatch {
                        target: BatchTarget {
                            topic: &topic,
                            dead_letter_topic: &dead_letter_topic,
                            events_topic: &events_topic,
                            partition: *partition,
                            epoch: *epoch,
                            expected_next: Some(*at as i64),
                        },
                        messages: &list[*at..(*at + each).min(list.len())],
                    })
                    .collect();
                let results =
                    store::process_batches(&pool, &batches, &registry, &options, Some(&mut cache))
                        .await?;
                for (_, r) in results {
                    let r = r?;
                    done += r.applied + r.rejected;
                }
                for (_, _, at, list) in &mut cursors {
                    *at = (*at + each).min(list.len());
                }
                cursors.retain(|(_, _, at, list)| *at < list.len());
            }
            anyhow::Ok(done)
        });
    }
    let mut total = 0;
    while let Some(r) = tasks.join_next().await {
        total += r??;
    }
    Ok((started.elapsed(), total))
}
