//! Firing the due timers of the partitions this worker owns.

use std::time::{Duration, Instant};

use super::Worker;
use crate::store;

/// Most timers fired in one transaction; more wait for the next tick.
const FIRE_LIMIT: i64 = 2_000;

/// A pending timer this far past due counts as overdue.
const OVERDUE_AFTER: Duration = Duration::from_secs(10);

/// How often the pending-timers gauge is refreshed.
pub(super) const PENDING_EVERY: Duration = Duration::from_secs(5);

impl Worker {
    /// Fires the due timers of the owned partitions, fenced by this worker's epochs, and
    /// wakes the relay when it fired any. Returns whether it fired as many as it may in one
    /// go (more may be due).
    pub(super) async fn fire_timers(&self) -> bool {
        let epochs = self.owned_epochs();
        let topic = self.config.commands_topic.as_str();
        match store::fire_due_timers(&self.pool, topic, &epochs, FIRE_LIMIT).await {
            Ok(fired) if !fired.lateness.is_empty() => {
                let n = fired.lateness.len();
                self.metrics.timers_fired.inc_by(n as u64);
                for late in &fired.lateness {
                    self.metrics.timer_lateness.observe(*late);
                }
                self.wake_relay();
                tracing::debug!(fired = n, partitions = ?fired.per_partition, "fired due timers");
                n as i64 >= FIRE_LIMIT
            }
            Ok(_) => false,
            Err(e) => {
                // The database is away, or the partition rows are busy: the next tick tries
                // again, and a batch meanwhile finds out the same way.
                tracing::warn!(error = %e, "firing due timers failed; will retry");
                false
            }
        }
    }

    /// Sets the timer gauges of the owned partitions and the aggregates-by-status gauge,
    /// at most every [`PENDING_EVERY`].
    pub(super) async fn report_pending_timers(&self, last: &mut Instant) {
        if last.elapsed() < PENDING_EVERY {
            return;
        }
        *last = Instant::now();
        let owned: Vec<i32> = self
            .owned
            .lock()
            .expect("owned map")
            .keys()
            .copied()
            .collect();
        let topic = self.config.commands_topic.as_str();
        if let Ok(pending) = store::pending_timers(&self.pool, topic, &owned, OVERDUE_AFTER).await {
            let m = &self.metrics;
            m.timers_pending.reset();
            for p in owned {
                m.timers_pending
                    .with_label_values(&[&p.to_string()])
                    .set(pending.per_partition.get(&p).copied().unwrap_or(0));
            }
            m.timers_overdue.set(pending.overdue);
            m.timers_overdue_seconds.set(pending.oldest_overdue);
        }
        if let Ok(statuses) = store::statuses(&self.pool).await {
            self.metrics.aggregates.reset();
            for (ty, status, n) in statuses {
                self.metrics
                    .aggregates
                    .with_label_values(&[&ty, &status])
                    .set(n);
            }
        }
    }
}
