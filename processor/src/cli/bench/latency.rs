//! End-to-end latency at a fixed offered rate: commands are produced on a schedule (command
//! `i` at `i / rate` seconds), each stamped with the time it is handed to the producer, and
//! a `read_committed` consumer of the events topic notes when each command's event
//! becomes visible. Latency is that difference: produce, consume, apply, commit, relay,
//! Kafka transaction commit, and the consumer's fetch, all included.
//!
//! Each sample is also split where the relay hands the event to Kafka (the event's
//! timestamp, set by the relay's producer): before it, the worker's part (consume, apply,
//! commit) and the relay's wait for the partition; after it, the Kafka transaction, its
//! commit markers and the consumer's fetch. Both clocks are this machine's, at millisecond
//! resolution.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::producer::{CommandProducer, Delivery};
use anyhow::Context;
use chrono::Utc;
use commands::Command;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::cli::demo::Namespace;

/// Percentiles of the samples, in milliseconds, end to end and split at the relay's send.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Latency {
    /// Samples counted (events seen after the warm-up).
    pub(super) samples: usize,
    /// Commands sent during the warm-up and not counted.
    pub(super) warm_up: usize,
    /// Produce call to event visible.
    #[serde(flatten)]
    pub(super) end_to_end: Percentiles,
    /// Produce call to the relay handing the event to Kafka.
    pub(super) to_relay_send: Percentiles,
    /// The relay handing the event to Kafka to event visible.
    pub(super) relay_send_to_visible: Percentiles,
}

/// One sample: the time from the produce call to the event's visibility, split at the
/// relay's send.
#[derive(Debug, Clone, Copy)]
struct Sample {
    total: Duration,
    to_relay_send: Duration,
    relay_send_to_visible: Duration,
}

/// Nearest-rank percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct Percentiles {
    /// Median.
    pub(super) p50_ms: f64,
    /// 95th percentile.
    pub(super) p95_ms: f64,
    /// 99th percentile.
    pub(super) p99_ms: f64,
    /// Largest.
    pub(super) max_ms: f64,
}

impl Percentiles {
    /// Percentiles of `samples` (any order), nearest-rank; `None` without samples.
    fn of(mut samples: Vec<Duration>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1].as_secs_f64() * 1000.0
        };
        Some(Self {
            p50_ms: at(0.50),
            p95_ms: at(0.95),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        })
    }
}

impl Latency {
    fn of(samples: &[Sample], warm_up: usize) -> Option<Self> {
        let each = |f: fn(&Sample) -> Duration| Percentiles::of(samples.iter().map(f).collect());
        Some(Self {
            samples: samples.len(),
            warm_up,
            end_to_end: each(|s| s.total)?,
            to_relay_send: each(|s| s.to_relay_send)?,
            relay_send_to_visible: each(|s| s.relay_send_to_visible)?,
        })
    }
}

/// Produces `commands` at `rate` per second to the namespace's commands topic and measures
/// each one's end-to-end latency to its event on the events topic. Commands sent in the
/// first `warm_up` are not counted (connections, statement caches and the broker's code
/// warm up then). Every command must emit exactly one event. Returns the percentiles and
/// where each command landed, in order.
pub(super) async fn measure(
    brokers: &str,
    ns: &Namespace,
    partitions: i32,
    mut commands: Vec<Command>,
    rate: u32,
    warm_up: Duration,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<(Latency, Vec<Delivery>)> {
    let sent: Arc<Mutex<HashMap<String, (Instant, SystemTime)>>> = Arc::default();
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
    let mut landed: Vec<(usize, Delivery)> = Vec::with_capacity(commands.len());
    let mut counted_from = None;
    for (i, c) in commands.iter_mut().enumerate() {
        let due = started + Duration::from_secs_f64(i as f64 / f64::from(rate));
        // Acknowledgements are collected while waiting for the next slot.
        while Instant::now() < due {
            tokio::select! {
                Some(r) = in_flight.next(), if !in_flight.is_empty() => { landed.push(r?); }
                _ = tokio::time::sleep_until(due.into()) => {}
            }
        }
        if counted_from.is_none() && started.elapsed() >= warm_up {
            counted_from = Some(i);
        }
        c.time = Some(Utc::now());
        sent.lock()
            .expect("sent map")
            .insert(c.id.to_string(), (Instant::now(), SystemTime::now()));
        let producer = &producer;
        let c: &Command = c;
        in_flight.push(async move { producer.send(c).await.map(|d| (i, d)) });
        progress.set_position(i as u64 + 1);
    }
    while let Some(r) = in_flight.next().await {
        landed.push(r?);
    }
    drop(in_flight);
    landed.sort_unstable_by_key(|(i, _)| *i);
    let deliveries = landed.into_iter().map(|(_, d)| d).collect();
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
    let samples: Vec<Sample> = seen
        .into_iter()
        .filter(|(id, _)| !warm_up_ids.contains(id))
        .map(|(_, s)| s)
        .collect();
    let latency = Latency::of(&samples, warm_up_ids.len()).context("no event was seen")?;
    Ok((latency, deliveries))
}

/// Reads `topic` (read_committed) from the beginning until `expected` events are seen,
/// returning each event's command id and its sample.
fn read_events(
    brokers: &str,
    topic: &str,
    partitions: i32,
    expected: usize,
    sent: &Mutex<HashMap<String, (Instant, SystemTime)>>,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<Vec<(String, Sample)>> {
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
        let (arrived, arrived_at) = (Instant::now(), SystemTime::now());
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
        let Some((at, at_wall)) = sent.lock().expect("sent map").get(&command_id).copied() else {
            continue;
        };
        let total = arrived - at;
        // The relay's send, as the producer stamped it; clamped into [sent, arrived] against
        // the millisecond rounding.
        let relay_send = m
            .timestamp()
            .to_millis()
            .and_then(|ms| u64::try_from(ms).ok())
            .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
            .unwrap_or(arrived_at);
        let to_relay_send = relay_send
            .duration_since(at_wall)
            .unwrap_or_default()
            .min(total);
        out.push((
            command_id,
            Sample {
                total,
                to_relay_send,
                relay_send_to_visible: total - to_relay_send,
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let l = Percentiles::of(samples).unwrap();
        assert_eq!(
            (l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms),
            (50.0, 95.0, 99.0, 100.0)
        );
        assert!(Percentiles::of(Vec::new()).is_none());
    }

    #[test]
    fn samples_split_at_the_relay_send() {
        let samples: Vec<Sample> = (1..=10)
            .map(|i| Sample {
                total: Duration::from_millis(10 * i),
                to_relay_send: Duration::from_millis(7 * i),
                relay_send_to_visible: Duration::from_millis(3 * i),
            })
            .collect();
        let l = Latency::of(&samples, 2).unwrap();
        assert_eq!((l.samples, l.warm_up), (10, 2));
        assert_eq!(l.end_to_end.p50_ms, 50.0);
        assert_eq!(l.to_relay_send.p50_ms, 35.0);
        assert_eq!(l.relay_send_to_visible.max_ms, 30.0);
        let json = serde_json::to_value(&l).unwrap();
        assert_eq!(json["p99_ms"], 100.0);
        assert_eq!(json["to_relay_send"]["p99_ms"], 70.0);
    }
}
