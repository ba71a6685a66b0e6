//! In-process counters of what a worker did, for its logs and its exit summary.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by a worker's tasks.
#[derive(Debug, Default)]
pub struct Stats {
    /// Batches committed.
    pub batches: AtomicU64,
    /// Commands applied.
    pub applied: AtomicU64,
    /// Commands rejected by their aggregate.
    pub rejected: AtomicU64,
    /// Duplicate deliveries.
    pub duplicates: AtomicU64,
    /// Messages dead-lettered.
    pub dead_letters: AtomicU64,
    /// Events stored.
    pub events: AtomicU64,
    /// Commands set aside because their aggregate is parked.
    pub parked: AtomicU64,
    /// Batches refused because the worker's epoch was stale.
    pub fenced: AtomicU64,
    /// Version conflicts (another writer existed).
    pub conflicts: AtomicU64,
    /// Database errors retried.
    pub db_retries: AtomicU64,
    /// Rebalances seen.
    pub rebalances: AtomicU64,
}

impl Stats {
    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
