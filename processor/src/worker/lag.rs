//! The lag monitor: the lag gauge of every owned partition, and with the same reads, the
//! log bounds and partition count the worker's loop checks.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::Owned;
use crate::commands_log;
use crate::metrics::Metrics;

/// How often the lag gauge is refreshed.
const LAG_INTERVAL: Duration = Duration::from_secs(5);

/// Drops a partition's lag series: lag of a partition another worker owns now would be
/// reported twice, once stale.
pub(super) fn forget_lag(metrics: &Metrics, partition: i32) {
    let _ = metrics
        .partition_lag
        .remove_label_values(&[&partition.to_string()]);
}

/// A partition's log bounds as the monitor read them.
#[derive(Debug, Clone, Copy)]
pub(super) struct LogBounds {
    pub(super) partition: i32,
    /// The log start offset (low watermark).
    pub(super) low: i64,
    /// The log end offset (high watermark).
    pub(super) high: i64,
    /// The stored next offset, read before the watermarks.
    pub(super) stored: i64,
}

/// What the monitor tells the worker's loop.
#[derive(Debug)]
pub(super) enum LogReport {
    /// Bounds that look wrong, or every owned partition's after a consumer error.
    Bounds(Vec<LogBounds>),
    /// The commands topic's partition count, as the broker reports it now.
    PartitionCount(i32),
}

/// Refreshes the lag gauge of every owned partition until `stop`: the Kafka high watermark
/// minus the stored next offset. It has its own client, because `fetch_watermarks` blocks
/// and the worker's consumer is busy in its loop.
///
/// With the same reads it watches the commands log: every tick it reports the topic's
/// partition count, and the bounds of partitions whose log no longer covers the stored
/// offset; when `check_now` is notified (a consumer error) it looks at once and reports
/// every owned partition's bounds.
pub(super) async fn monitor_lag(
    brokers: String,
    topic: String,
    owned: Owned,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    reports: mpsc::Sender<LogReport>,
    check_now: Arc<Notify>,
) {
    let consumer: Arc<BaseConsumer> = match ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("client.id", "cmdproc-lag-monitor")
        .create()
    {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::warn!(error = %e, "cannot create the lag monitor's client; no lag metric");
            return;
        }
    };
    let mut tick = tokio::time::interval(LAG_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let poked = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => false,
            _ = check_now.notified() => true,
        };
        // Read before the watermarks: a log end below this is not this worker's progress.
        let before: Vec<(i32, i64)> = owned
            .lock()
            .expect("owned map")
            .iter()
            .map(|(p, o)| (*p, o.next_offset))
            .collect();
        let (c, t) = (consumer.clone(), topic.clone());
        let partitions: Vec<i32> = before.iter().map(|(p, _)| *p).collect();
        let fetch = tokio::task::spawn_blocking(move || {
            let count = crate::topics::partition_count(c.client(), &t, Duration::from_secs(2));
            let marks = partitions
                .into_iter()
                .map(|p| (p, c.fetch_watermarks(&t, p, Duration::from_secs(2))))
                .collect::<Vec<_>>();
            (count, marks)
        });
        let (count, marks) = tokio::select! {
            _ = stop.cancelled() => return,
            r = fetch => match r { Ok(h) => h, Err(_) => continue },
        };
        if let Ok(count) = count {
            let _ = reports.try_send(LogReport::PartitionCount(count));
        }
        let mut report = Vec::new();
        {
            let owned = owned.lock().expect("owned map");
            for (p, marks) in marks {
                match (marks, owned.get(&p).map(|o| o.next_offset)) {
                    // The position read now is at least as new as the watermark, so the lag
                    // is at worst a little low, never negative.
                    (Ok((low, high)), Some(next)) => {
                        metrics
                            .partition_lag
                            .with_label_values(&[&p.to_string()])
                            .set((high - next).max(0));
                        let stored = before
                            .iter()
                            .find(|(q, _)| *q == p)
                            .map_or(next, |(_, o)| *o);
                        let bounds = LogBounds {
                            partition: p,
                            low,
                            high,
                            stored,
                        };
                        if poked
                            || commands_log::judge_watermarks(low, high, stored, None).is_some()
                        {
                            report.push(bounds);
                        }
                    }
                    (Err(e), _) => {
                        tracing::debug!(partition = p, error = %e, "reading the watermarks failed")
                    }
                    // Revoked meanwhile; the revocation dropped its series.
                    (Ok(_), None) => {}
                }
            }
        }
        if !report.is_empty() {
            let _ = reports.try_send(LogReport::Bounds(report));
        }
    }
}
