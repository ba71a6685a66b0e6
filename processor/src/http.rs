//! The operator endpoint of `cmdproc run`: `/metrics` (Prometheus text format), `/healthz`
//! (the process runs) and `/readyz` (it owns partitions, none of them halted, and the
//! database answers).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use sqlx::{Connection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::commands_log::Halted;
use crate::metrics::Metrics;
use crate::relay::Owned;

/// How long `/readyz` waits for the database before calling it unavailable; shorter than a
/// typical probe timeout, so the probe gets a reason rather than a timeout.
const DB_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What the endpoint reads.
#[derive(Debug, Clone)]
pub struct HttpState {
    /// The process's metrics.
    pub metrics: Arc<Metrics>,
    /// The partitions the worker owns; `None` for the standalone relay, which serves every
    /// partition and is ready whenever the database answers.
    pub owned: Option<Owned>,
    /// The worker's halted partitions: while any is halted the process is not ready, since
    /// it cannot make progress on them until an operator acts. `None` for the relay.
    pub halted: Option<Halted>,
    /// The worker's database.
    pub pool: PgPool,
    /// Cancelled when the process starts shutting down; from then on it is not ready.
    pub shutdown: CancellationToken,
}

/// Where the endpoint listens when no address is given.
pub const DEFAULT_ADDR: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    9464,
));

/// The endpoint's address cannot be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr}: {source}")]
pub struct ListenError {
    /// The address.
    pub addr: SocketAddr,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// Binds the endpoint's address now, before the process joins anything, so a configuration
/// error is reported at once. An address the operator gave that cannot be bound is an error;
/// when the default port is taken (several processes on one host) the process runs without
/// the endpoint and says so in its log.
pub async fn listen(
    addr: Option<SocketAddr>,
) -> Result<Option<tokio::net::TcpListener>, ListenError> {
    let bind = |a: SocketAddr| async move {
        tokio::net::TcpListener::bind(a)
            .await
            .map_err(|source| ListenError { addr: a, source })
    };
    match addr {
        Some(a) => Ok(Some(bind(a).await?)),
        None => match bind(DEFAULT_ADDR).await {
            Ok(l) => Ok(Some(l)),
            Err(e) => {
                tracing::warn!(error = %e, "no metrics endpoint; give each process its own --metrics-addr");
                Ok(None)
            }
        },
    }
}

/// Serves the endpoint in a task when there is a listener; returns the task.
pub fn spawn(
    listener: Option<tokio::net::TcpListener>,
    state: HttpState,
    stop: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let listener = listener?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    }
    Some(tokio::spawn(serve(listener, state, stop)))
}

/// Serves the endpoint on `listener` until `stop` is cancelled.
pub async fn serve(listener: tokio::net::TcpListener, state: HttpState, stop: CancellationToken) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "metrics endpoint failed");
    }
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// Ready means able to make progress: partitions to work on, none of them halted, and a
/// database that answers.
async fn readyz(State(state): State<HttpState>) -> (StatusCode, String) {
    if state.shutdown.is_cancelled() {
        return unavailable("shutting down");
    }
    let partitions = match &state.owned {
        Some(owned) => match owned.lock().expect("owned map").len() {
            0 => return unavailable("no partitions assigned"),
            n => format!("{n} partition(s) assigned"),
        },
        None => "every partition".to_owned(),
    };
    if let Some(halted) = &state.halted {
        let halted = halted.lock().expect("halted set");
        if !halted.is_empty() {
            return unavailable(&format!(
                "halted: {}; the worker's error log says why and what to run",
                halted.summary()
            ));
        }
    }
    match tokio::time::timeout(DB_CHECK_TIMEOUT, database_answers(&state.pool)).await {
        Ok(Ok(())) => (
            StatusCode::OK,
            format!("ready: {partitions}, database answers\n"),
        ),
        Ok(Err(e)) => unavailable(&format!("database unavailable: {e}")),
        Err(_) => unavailable("database did not answer within 2s"),
    }
}

/// A round trip to Postgres on a pooled connection. The driver's ping is a protocol-level
/// `SELECT 1` equivalent, so no SQL statement lives outside the store module.
async fn database_answers(pool: &PgPool) -> Result<(), sqlx::Error> {
    pool.acquire().await?.ping().await
}

fn unavailable(reason: &str) -> (StatusCode, String) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not ready: {reason}\n"),
    )
}
