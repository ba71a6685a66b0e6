//! The gateway's Prometheus metrics: every name here, in a registry of the gateway's own
//! (as [`crate::metrics`] does for workers), served at `/metrics`.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

/// Answers to `POST /commands` and `GET /commands/{source}/{id}`, by HTTP `status`.
pub const REQUESTS_TOTAL: &str = "cmdproc_gateway_requests_total";
/// From producing a command to receiving its reply, in seconds (answers that got a reply
/// within the deadline).
pub const REPLY_SECONDS: &str = "cmdproc_gateway_reply_seconds";
/// Requests waiting for their reply now.
pub const WAITING: &str = "cmdproc_gateway_waiting_requests";

/// The statuses the gateway answers commands with, so that each series exists (at 0) from
/// the start.
const STATUSES: [u16; 10] = [200, 202, 400, 404, 409, 413, 415, 422, 503, 500];

/// Buckets from a millisecond to the longest sensible deadline.
const REPLY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The metrics of one gateway.
#[derive(Debug, Clone)]
pub struct GatewayMetrics {
    registry: Registry,
    /// [`REQUESTS_TOTAL`].
    pub requests: IntCounterVec,
    /// [`REPLY_SECONDS`].
    pub reply_seconds: Histogram,
    /// [`WAITING`].
    pub waiting: IntGauge,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl GatewayMetrics {
    /// Registers every metric in a new registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(REQUESTS_TOTAL, "Command requests answered, by HTTP status."),
            &["status"],
        )
        .expect("valid metric");
        let reply_seconds = Histogram::with_opts(
            HistogramOpts::new(
                REPLY_SECONDS,
                "From producing a command to receiving its reply, in seconds.",
            )
            .buckets(REPLY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let waiting =
            IntGauge::new(WAITING, "Requests waiting for their reply now.").expect("valid metric");
        for status in STATUSES {
            requests.with_label_values(&[&status.to_string()]);
        }
        registry
            .register(Box::new(requests.clone()))
            .expect("registered once");
        registry
            .register(Box::new(reply_seconds.clone()))
            .expect("registered once");
        registry
            .register(Box::new(waiting.clone()))
            .expect("registered once");
        Self {
            registry,
            requests,
            reply_seconds,
            waiting,
        }
    }

    /// Counts an answer with `status`.
    pub fn answered(&self, status: u16) {
        self.requests
            .with_label_values(&[&status.to_string()])
            .inc();
    }

    /// The Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into memory");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}
