//! The aggregates a worker keeps in memory between batches.

use std::collections::HashMap;

use crate::batch::{AggregateKey, AggregateWrite, Loaded};

/// The aggregates a worker keeps in memory between batches, per owned partition, so a
/// batch reads from Postgres only those it has not seen. Writes stay version-checked: an
/// entry that went stale (which only another writer can cause) makes the batch fail with
/// [`StoreError::Conflict`](crate::store::StoreError::Conflict), and the batch's partitions
/// are forgotten and read again.
#[derive(Debug, Default)]
pub struct AggregateCache {
    /// Per partition: the epoch the entries were read or written under, and the entries.
    /// A partition taken again has a new epoch, so what was cached before is not used.
    by_partition: HashMap<i32, (i64, HashMap<AggregateKey, Loaded>)>,
    entries: usize,
    capacity: usize,
}

impl AggregateCache {
    /// A cache of at most `capacity` aggregates; 0 turns it off.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }

    /// Forgets a partition's aggregates (it was revoked or fenced, or a batch failed).
    pub fn forget(&mut self, partition: i32) {
        if let Some((_, gone)) = self.by_partition.remove(&partition) {
            self.entries -= gone.len();
        }
    }

    /// Forgets every partition `keep` rejects (those no longer owned).
    pub fn retain(&mut self, mut keep: impl FnMut(i32) -> bool) {
        let gone: Vec<i32> = self
            .by_partition
            .keys()
            .copied()
            .filter(|p| !keep(*p))
            .collect();
        for p in gone {
            self.forget(p);
        }
    }

    /// Aggregates held.
    pub fn len(&self) -> usize {
        self.entries
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// The aggregate `key` as cached for `partition` under `epoch`; nothing when the
    /// partition's entries belong to another epoch.
    pub(crate) fn get(&self, partition: i32, epoch: i64, key: &AggregateKey) -> Option<&Loaded> {
        let (at, map) = self.by_partition.get(&partition)?;
        if *at != epoch {
            return None;
        }
        map.get(key)
    }

    /// Takes in what a committed plan wrote under `epoch`.
    pub(crate) fn store(&mut self, partition: i32, epoch: i64, writes: &[AggregateWrite]) {
        if self.capacity == 0 {
            return;
        }
        if self
            .by_partition
            .get(&partition)
            .is_some_and(|(at, _)| *at != epoch)
        {
            self.forget(partition);
        }
        if self.entries + writes.len() > self.capacity {
            // Simple and bounded: start over rather than track recency.
            self.by_partition.clear();
            self.entries = 0;
        }
        let (_, map) = self
            .by_partition
            .entry(partition)
            .or_insert_with(|| (epoch, HashMap::new()));
        for w in writes {
            let loaded = Loaded {
                version: w.new_version,
                state: w.state.clone(),
            };
            if map
                .insert((w.aggregate_type.clone(), w.aggregate_id.clone()), loaded)
                .is_none()
            {
                self.entries += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(id: &str) -> AggregateKey {
        ("account".to_owned(), id.to_owned())
    }

    fn write(id: &str, version: i64) -> AggregateWrite {
        AggregateWrite {
            aggregate_type: "account".into(),
            aggregate_id: id.into(),
            read_version: version - 1,
            new_version: version,
            state: json!({ "balance": version * 10 }),
            status: None,
        }
    }

    fn loaded(version: i64) -> Loaded {
        Loaded {
            version,
            state: json!({ "balance": version * 10 }),
        }
    }

    #[test]
    fn a_write_is_read_back_under_its_partition_and_epoch() {
        let mut cache = AggregateCache::new(10);
        assert!(cache.is_empty());
        cache.store(1, 100, &[write("a", 1), write("b", 2)]);
        assert_eq!(cache.len(), 2);
        assert!(!cache.is_empty());
        assert_eq!(cache.get(1, 100, &key("a")), Some(&loaded(1)));
        assert_eq!(cache.get(1, 100, &key("b")), Some(&loaded(2)));
        assert_eq!(cache.get(1, 100, &key("c")), None);
        // Another partition, or another epoch of the same one, sees nothing.
        assert_eq!(cache.get(2, 100, &key("a")), None);
        assert_eq!(cache.get(1, 101, &key("a")), None);
    }

    #[test]
    fn a_later_write_replaces_the_entry_without_counting_it_twice() {
        let mut cache = AggregateCache::new(10);
        cache.store(1, 100, &[write("a", 1)]);
        cache.store(1, 100, &[write("a", 2)]);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get(1, 100, &key("a")), Some(&loaded(2)));
    }

    #[test]
    fn a_new_epoch_drops_what_the_partition_held_before() {
        let mut cache = AggregateCache::new(10);
        cache.store(1, 100, &[write("a", 1), write("b", 1)]);
        cache.store(2, 200, &[write("c", 1)]);
        cache.store(1, 101, &[write("d", 1)]);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(1, 100, &key("a")), None);
        assert_eq!(cache.get(1, 101, &key("a")), None);
        assert_eq!(cache.get(1, 101, &key("d")), Some(&loaded(1)));
        assert_eq!(cache.get(2, 200, &key("c")), Some(&loaded(1)));
    }

    #[test]
    fn capacity_zero_holds_nothing() {
        let mut cache = AggregateCache::new(0);
        cache.store(1, 100, &[write("a", 1)]);
        assert!(cache.is_empty());
        assert_eq!(cache.get(1, 100, &key("a")), None);
    }

    #[test]
    fn going_past_capacity_starts_over_with_the_new_writes() {
        let mut cache = AggregateCache::new(3);
        cache.store(1, 100, &[write("a", 1), write("b", 1)]);
        cache.store(2, 200, &[write("c", 1)]);
        assert_eq!(cache.len(), 3);
        cache.store(2, 200, &[write("d", 1)]);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get(1, 100, &key("a")), None);
        assert_eq!(cache.get(2, 200, &key("c")), None);
        assert_eq!(cache.get(2, 200, &key("d")), Some(&loaded(1)));
    }

    #[test]
    fn forget_drops_one_partition() {
        let mut cache = AggregateCache::new(10);
        cache.store(1, 100, &[write("a", 1), write("b", 1)]);
        cache.store(2, 200, &[write("c", 1)]);
        cache.forget(1);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get(1, 100, &key("a")), None);
        assert_eq!(cache.get(2, 200, &key("c")), Some(&loaded(1)));
        // Forgetting a partition it does not hold changes nothing.
        cache.forget(7);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn retain_keeps_only_the_partitions_still_owned() {
        let mut cache = AggregateCache::new(10);
        cache.store(1, 100, &[write("a", 1)]);
        cache.store(2, 200, &[write("b", 1), write("c", 1)]);
        cache.store(3, 300, &[write("d", 1)]);
        cache.retain(|p| p != 2);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(1, 100, &key("a")), Some(&loaded(1)));
        assert_eq!(cache.get(2, 200, &key("b")), None);
        assert_eq!(cache.get(3, 300, &key("d")), Some(&loaded(1)));
        cache.retain(|_| false);
        assert!(cache.is_empty());
    }
}
