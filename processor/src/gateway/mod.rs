//! `cmdproc gateway`: an HTTP front door for callers who do not speak Kafka.
//!
//! `POST /commands` reads a command (a CloudEvent, or `{type, subject, data}` with an
//! `Idempotency-Key` header), validates it with the registry's schemas, produces it with the
//! murmur2 key and `replyto` set to the gateway's reply topic, and waits up to a deadline for
//! its reply: 200 applied, 409 rejected or key reused, 422 invalid, 202 with a `Location` to
//! poll when the deadline passes. `GET /commands/{source}/{id}` reads a recorded outcome.
//! `/openapi.json` is `docs/openapi.json`, and `/healthz`, `/readyz` and `/metrics` follow
//! the conventions of `cmdproc run`.
//!
//! The gateway keeps no state but the requests waiting for their replies: each gateway reads
//! every reply on the topic and keeps those it waits for, so any number can run side by side.
//!
//! # Layout
//! - `request`: a request to a validated command.
//! - `answer`: an outcome to a status and body; problems.
//! - [`metrics`]: the gateway's metric names and registry.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use sqlx::{Connection, PgPool};
use tokio_util::sync::CancellationToken;

use commands::{CommandId, Registry, ReplyCommand, Source, Topic};

use crate::producer::{CommandProducer, ProduceError};
use crate::replies::{ReplyError, ReplyWaiter};

mod answer;
pub mod metrics;
mod request;

pub use answer::{location, status_of, IDEMPOTENT_REPLAYED};
pub use metrics::GatewayMetrics;
pub use request::{COMMAND_SOURCE, IDEMPOTENCY_KEY};

use answer::Problem;

/// The OpenAPI 3.1 document of the gateway, as kept in the repository.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// How long `/readyz` waits for the database or the broker before calling it unavailable.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the gateway listens when no address is given.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8080";

/// The gateway's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// The commands topic.
    pub commands_topic: Topic,
    /// The topic the gateway asks replies on and reads them from.
    pub reply_topic: Topic,
    /// The source of commands whose request names none.
    pub default_source: Source,
    /// How long a request waits for its reply before it gets 202.
    pub deadline: Duration,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
}

/// Why the gateway cannot start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The reply topic cannot be read.
    #[error(transparent)]
    Replies(#[from] ReplyError),
    /// The producer cannot be created.
    #[error(transparent)]
    Produce(#[from] ProduceError),
}

/// A running gateway's shared state: cheap to clone.
#[derive(Debug, Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Arc<Registry>,
    producer: CommandProducer,
    replies: ReplyWaiter,
    pool: PgPool,
    settings: Settings,
    metrics: GatewayMetrics,
    shutdown: CancellationToken,
}

impl Gateway {
    /// Starts reading the reply topic (from its current end) and creates the producer.
    /// `shutdown` cancelled makes `/readyz` answer 503.
    pub async fn start(
        registry: Arc<Registry>,
        pool: PgPool,
        settings: Settings,
        shutdown: CancellationToken,
    ) -> Result<Self, GatewayError> {
        let replies = ReplyWaiter::start(&settings.brokers, &settings.reply_topic).await?;
        // A broker that does not acknowledge within the deadline fails the request (503)
        // instead of holding it.
        let producer = CommandProducer::new(
            &settings.brokers,
            settings.commands_topic.clone(),
            settings.deadline.max(Duration::from_secs(1)),
        )?;
        Ok(Self {
            inner: Arc::new(Inner {
                registry,
                producer,
                replies,
                pool,
                settings,
                metrics: GatewayMetrics::new(),
                shutdown,
            }),
        })
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &GatewayMetrics {
        &self.inner.metrics
    }

    /// Every route of the gateway.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/commands", post(post_command))
            .route("/commands/{source}/{id}", get(get_command))
            .route("/openapi.json", get(openapi))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics_text))
            .fallback(|| async { Problem::not_found("no such resource; see /openapi.json") })
            .with_state(self.clone())
    }

    /// Produces `command` and waits for its reply: the answer of `POST /commands`.
    async fn submit(&self, headers: &HeaderMap, body: Body) -> Response {
        let started = Instant::now();
        let settings = &self.inner.settings;
        if let Some(problem) = unsupported_media_type(headers) {
            return problem.into_response();
        }
        let bytes = match axum::body::to_bytes(body, settings.max_body_bytes).await {
            Ok(bytes) => bytes,
            Err(e) if is_length_limit(&e) => {
                return Problem {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    title: "body too large",
                    detail: format!(
                        "the body is larger than this gateway's limit of {} bytes",
                        settings.max_body_bytes
                    ),
                    kind: None,
                }
                .into_response()
            }
            Err(e) => {
                return Problem::bad_request(format!("cannot read the body: {e}")).into_response()
            }
        };
        let command = match request::command(
            &bytes,
            headers,
            &self.inner.registry,
            &settings.default_source,
            &settings.reply_topic,
        ) {
            Ok(command) => command,
            Err(problem) => {
                tracing::debug!(detail = %problem.detail, "refused a request");
                return problem.into_response();
            }
        };
        let key = ReplyCommand {
            source: command.source.to_string(),
            id: command.id.to_string(),
        };
        let deadline = started + settings.deadline;
        // Each request takes the reply to its own delivery: a retry in flight gets the
        // recorded outcome as a duplicate, a request reusing the key with another body gets
        // key_reused, whatever gateway or attempt the other delivery came from.
        let mut pending = self.inner.replies.expect_delivery(&key.source, &key.id);
        self.inner.metrics.waiting.inc();
        let _waiting = Decrement(&self.inner.metrics.waiting);
        let produced = Instant::now();
        match self.inner.producer.send(&command).await {
            Ok(delivery) => pending.for_delivery(&settings.commands_topic, delivery),
            Err(e) => {
                tracing::warn!(error = %e, source = %key.source, id = %key.id, "cannot produce a command");
                return Problem::unavailable(format!("the command was not accepted by Kafka: {e}"))
                    .into_response();
            }
        }
        match pending
            .wait(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            Some(reply) => {
                self.inner
                    .metrics
                    .reply_seconds
                    .observe(produced.elapsed().as_secs_f64());
                tracing::debug!(source = %key.source, id = %key.id, outcome = reply.outcome.name(), duplicate = reply.duplicate, "replied");
                answer::outcome(&reply.command, &reply.outcome, Some(reply.duplicate))
            }
            None => answer::pending(&key),
        }
    }

    /// The recorded outcome of `(source, id)`: the answer of `GET /commands/{source}/{id}`.
    async fn lookup(&self, source: String, id: String) -> Response {
        let unknown = || {
            Problem::not_found(format!(
                "no outcome is recorded for command `{id}` of source `{source}`: not processed \
                 yet, dead-lettered (see `cmdproc dlq list`), or older than the dedupe window"
            ))
            .into_response()
        };
        if Source::parse(source.as_str()).is_err() || CommandId::parse(id.as_str()).is_err() {
            return unknown();
        }
        match crate::store::recorded_command(&self.inner.pool, &source, &id).await {
            Ok(Some(recorded)) => {
                let command = ReplyCommand { source, id };
                answer::outcome(&command, &recorded.reply_outcome(), None)
            }
            Ok(None) => unknown(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a recorded outcome");
                Problem::unavailable("the database did not answer").into_response()
            }
        }
    }
}

/// Decrements a gauge when dropped: the request stopped waiting, however it ended.
struct Decrement<'a>(&'a prometheus::IntGauge);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// 415 unless the content type is JSON (`application/json`, `application/cloudevents+json`,
/// any `+json`); a request without one is read as JSON.
fn unsupported_media_type(headers: &HeaderMap) -> Option<Problem> {
    let content_type = headers.get(header::CONTENT_TYPE)?;
    let essence = content_type
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let json = essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    (!json).then(|| Problem {
        status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
        title: "unsupported media type",
        detail: format!(
            "the body must be application/json or application/cloudevents+json, not `{essence}`"
        ),
        kind: None,
    })
}

/// Whether reading a body failed on the size limit (rather than a broken connection).
fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.to_string().contains("length limit exceeded") {
            return true;
        }
        source = e.source();
    }
    false
}

async fn post_command(State(gateway): State<Gateway>, headers: HeaderMap, body: Body) -> Response {
    let response = gateway.submit(&headers, body).await;
    gateway.inner.metrics.answered(response.status().as_u16());
    response
}

async fn get_command(
    State(gateway): State<Gateway>,
    Path((source, id)): Path<(String, String)>,
) -> Response {
    let response = gateway.lookup(source, id).await;
    gateway.inner.metrics.answered(response.status().as_u16());
    response
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn metrics_text(State(gateway): State<Gateway>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        gateway.inner.metrics.render(),
    )
}

/// Ready means able to answer commands: reading replies, and the database and the broker
/// answer.
async fn readyz(State(gateway): State<Gateway>) -> (StatusCode, String) {
    let inner = &gateway.inner;
    let unavailable = |reason: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
    };
    if inner.shutdown.is_cancelled() {
        return unavailable("shutting down".into());
    }
    if !inner.replies.is_running() {
        return unavailable(format!(
            "not reading the reply topic {}",
            inner.settings.reply_topic
        ));
    }
    let database = async { inner.pool.acquire().await?.ping().await };
    match tokio::time::timeout(CHECK_TIMEOUT, database).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return unavailable(format!("database unavailable: {e}")),
        Err(_) => return unavailable("database did not answer within 2s".into()),
    }
    let brokers = inner.settings.brokers.clone();
    let broker = tokio::task::spawn_blocking(move || {
        crate::topics::check_reachable(&brokers, CHECK_TIMEOUT)
    })
    .await;
    match broker {
        Ok(Ok(())) => (
            StatusCode::OK,
            format!(
                "ready: reading replies on {}, database and broker answer\n",
                inner.settings.reply_topic
            ),
        ),
        Ok(Err(e)) => unavailable(e.to_string()),
        Err(e) => unavailable(format!("broker check failed: {e}")),
    }
}

/// Serves the gateway on `listener` until `stop` is cancelled; requests in flight then get
/// their answers (within the deadline) before it returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    gateway: Gateway,
    stop: CancellationToken,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let app = gateway.router();
    // An answer is one small write; Nagle's algorithm would hold it back waiting for the
    // client's delayed ACK.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

/// Binds the gateway's address, with an error naming it.
pub async fn listen(addr: SocketAddr) -> Result<tokio::net::TcpListener, crate::http::ListenError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| crate::http::ListenError { addr, source })
}
