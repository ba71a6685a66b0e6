//! Prometheus metrics of a `cmdproc` process: every metric name in one place, and the
//! per-process [`Metrics`] that the worker, the relay and the HTTP endpoint share.
//!
//! Each process has its own [`prometheus::Registry`] rather than the global default one, so
//! that tests and embedders can run several workers in one process without their counters
//! colliding.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Commands by outcome (`outcome` = `applied`, `rejected`, `duplicate`, `key_reused`,
/// `dead_lettered`, `parked`). The outcomes partition the messages a worker committed: a parked command is
/// counted as `parked`, not also as `dead_lettered`, although it goes to the dead-letter
/// topic too.
pub const COMMANDS_TOTAL: &str = "cmdproc_commands_total";
/// Dead letters by kind (`kind` = `malformed`, `schema`, `unknown_type`, ...).
pub const DEAD_LETTERS_TOTAL: &str = "cmdproc_dead_letters_total";
/// Batches committed.
pub const BATCHES_TOTAL: &str = "cmdproc_batches_total";
/// Messages per committed batch.
pub const BATCH_SIZE: &str = "cmdproc_batch_size";
/// Time of a committed batch's Postgres transaction, in seconds.
pub const BATCH_APPLY_SECONDS: &str = "cmdproc_batch_apply_seconds";
/// From a command's CloudEvents `time` to the commit of its batch, in seconds.
pub const END_TO_END_SECONDS: &str = "cmdproc_end_to_end_latency_seconds";
/// Version conflicts: another writer existed, the batch was retried.
pub const VERSION_CONFLICTS_TOTAL: &str = "cmdproc_version_conflicts_total";
/// Batches refused because the worker's epoch was stale.
pub const FENCED_BATCHES_TOTAL: &str = "cmdproc_fenced_batches_total";
/// Batches retried after a database error.
pub const DB_RETRIES_TOTAL: &str = "cmdproc_db_retries_total";
/// Rebalance callbacks seen (assignments and revocations).
pub const REBALANCES_TOTAL: &str = "cmdproc_rebalances_total";
/// Per owned partition (`partition`): the Kafka high watermark minus the stored next offset.
pub const PARTITION_LAG: &str = "cmdproc_partition_lag";
/// Per partition (`partition`) the relay serves: outbox rows written but not yet published.
pub const OUTBOX_BACKLOG: &str = "cmdproc_outbox_backlog";
/// From the relay reading a batch of outbox rows to the commit of its Kafka transaction.
pub const PUBLISH_SECONDS: &str = "cmdproc_publish_latency_seconds";
/// Events the relay published (committed in a Kafka transaction).
pub const EVENTS_PUBLISHED_TOTAL: &str = "cmdproc_events_published_total";
/// Timers fired (their commands written to the outbox) by this worker.
pub const TIMERS_FIRED_TOTAL: &str = "cmdproc_timers_fired_total";
/// Timers set (or replaced) by handlers.
pub const TIMERS_SCHEDULED_TOTAL: &str = "cmdproc_timers_scheduled_total";
/// Timer cancellations handlers asked for.
pub const TIMERS_CANCELLED_TOTAL: &str = "cmdproc_timers_cancelled_total";
/// Pending timers per owned partition.
pub const TIMERS_PENDING: &str = "cmdproc_timers_pending";
/// How late a timer fired: from its due time to the commit that fired it.
pub const TIMER_LATENESS_SECONDS: &str = "cmdproc_timer_lateness_seconds";
/// Pending timers of the owned partitions that are more than 10 s past due: nothing fires
/// them (no owner, the database away), or their commands wait behind a backlog.
pub const TIMERS_OVERDUE: &str = "cmdproc_timers_overdue";
/// Seconds the most overdue pending timer of the owned partitions is past due (0: none).
pub const TIMERS_OVERDUE_SECONDS: &str = "cmdproc_timers_overdue_seconds";
/// Aggregates by type and status (`Aggregate::status`: a saga's step, a cancellation's
/// reason), across the whole deployment: every worker reports the same counts.
pub const AGGREGATES: &str = "cmdproc_aggregates";
/// Events stored, by CloudEvents type (`inventory.Expired`, `order.Cancelled`, ...).
pub const EVENTS_TOTAL: &str = "cmdproc_events_total";
/// Commands the relay published to the commands topic: emitted by handlers, sent by timers,
/// or outcomes going back to the aggregates that emitted commands.
pub const COMMANDS_PUBLISHED_TOTAL: &str = "cmdproc_commands_published_total";
/// Commands handlers emitted for other aggregates (or their own).
pub const COMMANDS_EMITTED_TOTAL: &str = "cmdproc_commands_emitted_total";
/// Replies the relay published to the reply topics commands named (`replyto`).
pub const REPLIES_PUBLISHED_TOTAL: &str = "cmdproc_replies_published_total";
/// Replies the relay dropped because the reply topic their command named does not exist.
pub const REPLIES_UNDELIVERABLE_TOTAL: &str = "cmdproc_replies_undeliverable_total";
/// Dead letters the relay published to the dead-letter topic.
pub const DEAD_LETTERS_PUBLISHED_TOTAL: &str = "cmdproc_dead_letters_published_total";
/// Times a relay, taking a partition whose Kafka position was not exactly the recorded one
/// (a crash after publishing, a restore, expired or reset offsets), read the destination
/// topics back to find what it had published.
pub const RELAY_RECONCILES_TOTAL: &str = "cmdproc_relay_reconciles_total";
/// Outbox rows the relay did not send again because it found them on their topic.
pub const RELAY_ROWS_SKIPPED_TOTAL: &str = "cmdproc_relay_rows_skipped_total";
/// Messages published with their payload replaced by a reference, being too large for Kafka.
pub const PAYLOADS_OMITTED_TOTAL: &str = "cmdproc_payloads_omitted_total";
/// Times a partition was set aside (paused, tried again later) because its batch kept
/// failing in a transaction of its own, so that the worker's other partitions went on.
pub const PARTITIONS_SET_ASIDE_TOTAL: &str = "cmdproc_partitions_set_aside_total";

/// Partitions this worker owns but applies nothing of, by `reason` (see [`halt_reason`]):
/// paused until an operator acts, which the error log of the halt names.
pub const PARTITIONS_HALTED: &str = "cmdproc_partitions_halted";

/// Values of the `reason` label of [`PARTITIONS_HALTED`].
pub mod halt_reason {
    /// A poison command with `--on-poison halt`.
    pub const POISON: &str = "poison";
    /// The commands log is not the one the stored position belongs to: the topic was
    /// re-created, or retention deleted commands before they were consumed.
    pub const LOG_CHANGED: &str = "log_changed";
    /// The commands topic's partition count differs from the recorded one.
    pub const PARTITION_COUNT: &str = "partition_count";
    /// Every value, so that each series exists (at 0) from the start.
    pub const ALL: [&str; 3] = [POISON, LOG_CHANGED, PARTITION_COUNT];
}

/// Values of the `outcome` label of [`COMMANDS_TOTAL`].
pub mod outcome {
    /// Applied: the handler produced events (or none) and the aggregate was written.
    pub const APPLIED: &str = "applied";
    /// Rejected by the aggregate: a business outcome, recorded.
    pub const REJECTED: &str = "rejected";
    /// A re-delivery of a command already processed: no effect.
    pub const DUPLICATE: &str = "duplicate";
    /// A command reusing the idempotency key `(source, id)` of one processed before, with
    /// another type, subject or data: refused, no effect.
    pub const KEY_REUSED: &str = "key_reused";
    /// Dead-lettered (everything but parked).
    pub const DEAD_LETTERED: &str = "dead_lettered";
    /// Set aside because its aggregate is parked (the poison command included).
    pub const PARKED: &str = "parked";
    /// Every value, so that each series exists (at 0) from the start.
    pub const ALL: [&str; 6] = [
        APPLIED,
        REJECTED,
        DUPLICATE,
        KEY_REUSED,
        DEAD_LETTERED,
        PARKED,
    ];
}

/// Buckets for latencies from a millisecond to a minute.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Buckets for batch sizes up to the largest `--batch-size` that makes sense.
const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
];

/// The metrics of one process, registered in its own registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// [`COMMANDS_TOTAL`].
    pub commands: IntCounterVec,
    /// [`DEAD_LETTERS_TOTAL`].
    pub dead_letters: IntCounterVec,
    /// [`BATCHES_TOTAL`].
    pub batches: IntCounter,
    /// [`BATCH_SIZE`].
    pub batch_size: Histogram,
    /// [`BATCH_APPLY_SECONDS`].
    pub batch_apply_seconds: Histogram,
    /// [`END_TO_END_SECONDS`].
    pub end_to_end_seconds: Histogram,
    /// [`VERSION_CONFLICTS_TOTAL`].
    pub version_conflicts: IntCounter,
    /// [`FENCED_BATCHES_TOTAL`].
    pub fenced_batches: IntCounter,
    /// [`DB_RETRIES_TOTAL`].
    pub db_retries: IntCounter,
    /// [`REBALANCES_TOTAL`].
    pub rebalances: IntCounter,
    /// [`PARTITION_LAG`].
    pub partition_lag: IntGaugeVec,
    /// [`OUTBOX_BACKLOG`].
    pub outbox_backlog: IntGaugeVec,
    /// [`PUBLISH_SECONDS`].
    pub publish_seconds: Histogram,
    /// [`EVENTS_PUBLISHED_TOTAL`].
    pub events_published: IntCounter,
    /// [`DEAD_LETTERS_PUBLISHED_TOTAL`].
    pub dead_letters_published: IntCounter,
    /// [`TIMERS_FIRED_TOTAL`].
    pub timers_fired: IntCounter,
    /// [`TIMERS_SCHEDULED_TOTAL`].
    pub timers_scheduled: IntCounter,
    /// [`TIMERS_CANCELLED_TOTAL`].
    pub timers_cancelled: IntCounter,
    /// [`TIMERS_PENDING`].
    pub timers_pending: IntGaugeVec,
    /// [`TIMER_LATENESS_SECONDS`].
    pub timer_lateness: Histogram,
    /// [`TIMERS_OVERDUE`].
    pub timers_overdue: IntGauge,
    /// [`TIMERS_OVERDUE_SECONDS`].
    pub timers_overdue_seconds: Gauge,
    /// [`AGGREGATES`].
    pub aggregates: IntGaugeVec,
    /// [`EVENTS_TOTAL`].
    pub events: IntCounterVec,
    /// [`COMMANDS_PUBLISHED_TOTAL`].
    pub commands_published: IntCounter,
    /// [`COMMANDS_EMITTED_TOTAL`].
    pub commands_emitted: IntCounter,
    /// [`REPLIES_PUBLISHED_TOTAL`].
    pub replies_published: IntCounter,
    /// [`REPLIES_UNDELIVERABLE_TOTAL`].
    pub replies_undeliverable: IntCounter,
    /// [`PARTITIONS_SET_ASIDE_TOTAL`].
    pub partitions_set_aside: IntCounter,
    /// [`RELAY_RECONCILES_TOTAL`].
    pub relay_reconciles: IntCounter,
    /// [`RELAY_ROWS_SKIPPED_TOTAL`].
    pub relay_rows_skipped: IntCounter,
    /// [`PAYLOADS_OMITTED_TOTAL`].
    pub payloads_omitted: IntCounter,
    /// [`PARTITIONS_HALTED`].
    pub partitions_halted: IntGaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates every metric in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        // The names and labels are constants, so a failure here is a programming error that
        // every test run would hit at once.
        fn register<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("metric names are unique and valid");
            c
        }
        let counter = |name: &str, help: &str| {
            register(
                &registry,
                IntCounter::new(name, help).expect("valid counter"),
            )
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            register(
                &registry,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
                    .expect("valid histogram"),
            )
        };
        let gauges = |name: &str, help: &str| {
            register(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), &["partition"]).expect("valid gauge"),
            )
        };
        let commands = register(
            &registry,
            IntCounterVec::new(
                Opts::new(COMMANDS_TOTAL, "Commands committed, by outcome."),
                &["outcome"],
            )
            .expect("valid counter"),
        );
        let dead_letters = register(
            &registry,
            IntCounterVec::new(
                Opts::new(DEAD_LETTERS_TOTAL, "Dead letters recorded, by kind."),
                &["kind"],
            )
            .expect("valid counter"),
        );
        // Series that exist at 0 from the start make `rate()` and `increase()` see the first
        // increment, and let a dashboard show "none" rather than "no data".
        for o in outcome::ALL {
            commands.with_label_values(&[o]);
        }
        for k in commands::envelope::DeadLetterKind::ALL {
            dead_letters.with_label_values(&[k.as_str()]);
        }
        let partitions_halted = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    PARTITIONS_HALTED,
                    "Owned partitions halted (nothing applied until an operator acts), by reason.",
                ),
                &["reason"],
            )
            .expect("valid gauge"),
        );
        for r in halt_reason::ALL {
            partitions_halted.with_label_values(&[r]);
        }
        Self {
            commands,
            dead_letters,
            batches: counter(BATCHES_TOTAL, "Batches committed."),
            batch_size: histogram(BATCH_SIZE, "Messages per committed batch.", SIZE_BUCKETS),
            batch_apply_seconds: histogram(
                BATCH_APPLY_SECONDS,
                "Time of a committed batch's Postgres transaction, in seconds.",
                LATENCY_BUCKETS,
            ),
            end_to_end_seconds: histogram(
                END_TO_END_SECONDS,
                "From a command's CloudEvents time to the commit of its batch, in seconds.",
                LATENCY_BUCKETS,
            ),
            version_conflicts: counter(
                VERSION_CONFLICTS_TOTAL,
                "Version conflicts: batches retried because another writer existed.",
            ),
            fenced_batches: counter(
                FENCED_BATCHES_TOTAL,
                "Batches refused because this worker's epoch was stale.",
            ),
            db_retries: counter(DB_RETRIES_TOTAL, "Batches retried after a database error."),
            rebalances: counter(REBALANCES_TOTAL, "Consumer group rebalance callbacks."),
            partition_lag: gauges(
                PARTITION_LAG,
                "Kafka high watermark minus the stored next offset, per owned partition.",
            ),
            outbox_backlog: gauges(
                OUTBOX_BACKLOG,
                "Outbox rows written but not yet published, per partition the relay serves.",
            ),
            publish_seconds: histogram(
                PUBLISH_SECONDS,
                "From the relay reading outbox rows to the commit of their Kafka transaction, in seconds.",
                LATENCY_BUCKETS,
            ),
            events_published: counter(EVENTS_PUBLISHED_TOTAL, "Events published by the relay."),
            dead_letters_published: counter(
                DEAD_LETTERS_PUBLISHED_TOTAL,
                "Dead letters published by the relay.",
            ),
            timers_fired: counter(TIMERS_FIRED_TOTAL, "Timers fired by this worker."),
            timers_scheduled: counter(TIMERS_SCHEDULED_TOTAL, "Timers set or replaced by handlers."),
            timers_cancelled: counter(
                TIMERS_CANCELLED_TOTAL,
                "Timer cancellations handlers asked for.",
            ),
            timers_pending: gauges(TIMERS_PENDING, "Pending timers, per owned partition."),
            timer_lateness: histogram(
                TIMER_LATENESS_SECONDS,
                "From a timer's due time to the commit that fired it, in seconds.",
                LATENCY_BUCKETS,
            ),
            timers_overdue: register(
                &registry,
                IntGauge::new(
                    TIMERS_OVERDUE,
                    "Pending timers of the owned partitions more than 10 s past due.",
                )
                .expect("valid gauge"),
            ),
            timers_overdue_seconds: register(
                &registry,
                Gauge::new(
                    TIMERS_OVERDUE_SECONDS,
                    "Seconds the most overdue pending timer of the owned partitions is past due.",
                )
                .expect("valid gauge"),
            ),
            aggregates: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        AGGREGATES,
                        "Aggregates by type and status, deployment-wide (every worker reports the same).",
                    ),
                    &["type", "status"],
                )
                .expect("valid gauge"),
            ),
            events: register(
                &registry,
                IntCounterVec::new(Opts::new(EVENTS_TOTAL, "Events stored, by type."), &["type"])
                    .expect("valid counter"),
            ),
            commands_published: counter(
                COMMANDS_PUBLISHED_TOTAL,
                "Commands the relay published to the commands topic (emitted, timers, outcomes).",
            ),
            commands_emitted: counter(
                COMMANDS_EMITTED_TOTAL,
                "Commands emitted by handlers (published to the commands topic).",
            ),
            replies_published: counter(
                REPLIES_PUBLISHED_TOTAL,
                "Replies published by the relay to the topics commands named.",
            ),
            replies_undeliverable: counter(
                REPLIES_UNDELIVERABLE_TOTAL,
                "Replies dropped because the reply topic their command named does not exist.",
            ),
            partitions_set_aside: counter(
                PARTITIONS_SET_ASIDE_TOTAL,
                "Partitions set aside because their batch kept failing.",
            ),
            relay_reconciles: counter(
                RELAY_RECONCILES_TOTAL,
                "Times the relay read the topics back on taking a partition.",
            ),
            relay_rows_skipped: counter(
                RELAY_ROWS_SKIPPED_TOTAL,
                "Outbox rows not sent again because they were found on their topic.",
            ),
            payloads_omitted: counter(
                PAYLOADS_OMITTED_TOTAL,
                "Messages published with their payload replaced by a reference (too large).",
            ),
            partitions_halted,
            registry,
        }
    }

    /// Adds `n` commands with `outcome` (one of [`outcome::ALL`]).
    pub fn count_commands(&self, outcome: &str, n: usize) {
        if n > 0 {
            self.commands.with_label_values(&[outcome]).inc_by(n as u64);
        }
    }

    /// The current value of [`COMMANDS_TOTAL`] for `outcome`, for log lines.
    pub fn commands_with(&self, outcome: &str) -> u64 {
        self.commands.with_label_values(&[outcome]).get()
    }

    /// Every metric in Prometheus's text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec fails only on an invalid metric family, which `new` rules out.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_renders_with_its_name() {
        let m = Metrics::new();
        m.count_commands(outcome::APPLIED, 3);
        m.partition_lag.with_label_values(&["0"]).set(7);
        m.outbox_backlog.with_label_values(&["0"]).set(0);
        m.batch_size.observe(3.0);
        let text = m.render();
        for name in [
            COMMANDS_TOTAL,
            DEAD_LETTERS_TOTAL,
            BATCHES_TOTAL,
            BATCH_SIZE,
            BATCH_APPLY_SECONDS,
            END_TO_END_SECONDS,
            VERSION_CONFLICTS_TOTAL,
            FENCED_BATCHES_TOTAL,
            DB_RETRIES_TOTAL,
            REBALANCES_TOTAL,
            PARTITION_LAG,
            OUTBOX_BACKLOG,
            PUBLISH_SECONDS,
            EVENTS_PUBLISHED_TOTAL,
            DEAD_LETTERS_PUBLISHED_TOTAL,
            PARTITIONS_HALTED,
        ] {
            assert!(text.contains(name), "{name} missing");
        }
        assert!(text.contains("cmdproc_commands_total{outcome=\"applied\"} 3"));
        assert!(text.contains("cmdproc_commands_total{outcome=\"parked\"} 0"));
        assert!(text.contains("cmdproc_partition_lag{partition=\"0\"} 7"));
        assert!(text.contains("cmdproc_partitions_halted{reason=\"log_changed\"} 0"));
    }

    #[test]
    fn registries_are_per_process_objects() {
        // Two workers in one process must not share or collide on counters.
        let a = Metrics::new();
        let b = Metrics::new();
        a.fenced_batches.inc();
        assert_eq!(b.fenced_batches.get(), 0);
    }
}
