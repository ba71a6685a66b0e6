//! End-to-end latency at a fixed offered rate: commands are produced on a schedule (command
//! `i` at `i / rate` seconds), each stamped with the time it is handed to the producer, and
//! a `read_committed` consumer of the events topic notes when each command's event
//! becomes visible. Latency is that difference: produce, consume, apply, commit, relay,
//! Kafka transaction commit, and the consumer's fetch, all included.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use commands::producer::CommandProducer;
use commands::Command;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::cli::demo::Namespace;

/// Percentiles of the samples, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Latency {
    /// Samples counted (events seen after the warm-up).
    pub(super) samples: usize,
    /// Commands sent during the warm-up and not counted.
    pub(super) warm_up: usize,
    /// Median.
    pub(super) p50_ms: f64,
    /// 95th percentile.
    pub(super) p95_ms: f64,
    /// 99th percentile.
    pub(super) p99_ms: f64,
    /// Largest.
    pub(super) max_ms: f64,
}

impl Latency {
    /// Percentiles of `samples` (any order), nearest-rank.
    pub(super) fn of(mut samples: Vec<Duration>, warm_up: usize) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1].as_secs_f64() * 1000.0
        };
        Some(Self {
            samples: samples.len(),
            warm_up,
            p50_ms: at(0.50),
            p95_ms: at(0.95),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        })
    }
}

/// Produces `commands` at `rate` per second to the namespace's commands topic and measures
/// each one's end-to-end latency to its event on the events topic. Commands sent in the first `warm_up` are not counted (the
/// relay's transactional producers start on first use). Every command must emit exactly
/// one event.
pub(super) async fn measure(
    brokers: &str,
    ns: &Namespace,
    partitions: i32,
    mut commands: Vec<Command>,
    rate: u32,
    warm_up: Duration,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Latency> {
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let expected = commands.len();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (brokers, topic, sent, stop) = (
            brokers.to_owned(),
            ns.events.to_string(),
            sent.clone(),
            stop.clone(),
        );
        tokio::task::spawn_blocking(move || {
            read_events(&brokers, &topic, partitions, expected, &sent, &stop)
        })
    };

    let producer = CommandProducer::new(brokers, ns.commands.clone(), Duration::from_secs(30))?;
    let started = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    let mut counted_from = None;
    for (i, c) in commands.iter_mut().enumerate() {
        let due = started + Duration::from_secs_f64(i as f64 / f64::from(rate));
        // Acknowledgements are collected while waiting for the next slot.
        while Instant::now() < due {
            tokio::select! {
                Some(r) = in_flight.next(), if !in_flight.is_empty() => { r?; }
                _ = tokio::time::sleep_until(due.into()) => {}
            }
        }
        if counted_from.is_none() && started.elapsed() >= warm_up {
            counted_from = Some(i);
        }
        c.time = Some(Utc::now());
        sent.lock()
            .expect("sent map")
            .insert(c.id.to_string(), Instant::now());
        let producer = &producer;
        let c: &Command = c;
        in_flight.push(async move { producer.send(c).await.map(|_| ()) });
        progress.set_position(i as u64 + 1);
    }
    while let Some(r) = in_flight.next().await {
        r?;
    }
    drop(in_flight);
    let result = tokio::time::timeout(Duration::from_secs(60), reader).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = result
        .context("the events of the latency run did not all arrive within 60 s")??
        .context("reading the events topic")?;
    let warm_up_ids: std::collections::HashSet<String> = commands
        [..counted_from.unwrap_or(commands.len())]
        .iter()
        .map(|c| c.id.to_string())
        .collect();
    let samples: Vec<Duration> = seen
        .into_iter()
        .filter(|(id, _)| !warm_up_ids.contains(id))
        .map(|(_, d)| d)
        .collect();
    Latency::of(samples, warm_up_ids.len()).context("no event was seen")
}

/// Reads `topic` (read_committed) from the beginning until `expected` events are seen,
/// returning each event's command id and the time from its send to its arrival.
fn read_events(
    brokers: &str,
    topic: &str,
    partitions: i32,
    expected: usize,
    sent: &Mutex<HashMap<String, Instant>>,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<Vec<(String, Duration)>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}-latency"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "5")
        .set("fetch.min.bytes", "1")
        .create()
        .context("cannot create the events consumer")?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::with_capacity(expected);
    while out.len() < expected && !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let arrived = Instant::now();
        let m = m?;
        let Some(command_id) = m
            .payload()
            .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
            .and_then(|v| {
                v.get("commandid")
                    .and_then(|c| c.as_str().map(str::to_owned))
            })
        else {
            continue;
        };
        if let Some(at) = sent.lock().expect("sent map").get(&command_id) {
            out.push((command_id, arrived - *at));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let l = Latency::of(samples, 0).unwrap();
        assert_eq!(
            (l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms),
            (50.0, 95.0, 99.0, 100.0)
        );
        assert!(Latency::of(Vec::new(), 0).is_none());
    }
}
