//! The cmdproc engine: consumer-group workers that apply commands in Postgres
//! transactions, the outbox relay, and the operator commands behind the `cmdproc` binary.
//!
//! # Layout
//! - [`worker`]: the consumer loop, partition ownership (rebalance-time fencing, take-back),
//!   micro-batches and their retries, the metrics they feed, the lag monitor.
//! - [`commands_log`]: checks that the commands log is the one the stored positions belong
//!   to, and the halts when it is not.
//! - [`decode`]: a consumed message to a command or a dead-letter reason.
//! - [`config`]: the engine's policies (misrouted and poison commands) and plan options.
//! - [`engine`]: [`engine::Processor`], one worker with its relay and HTTP endpoint, and the
//!   order in which they stop.
//! - [`batch`]: the pure planning step of a batch (outcomes, events, dead letters).
//! - [`store`]: every SQL statement.
//! - [`relay`]: publishes the outbox to Kafka in order per partition.
//! - [`topics`]: admin API.
//! - [`producer`]: the command producer client (idempotent, `acks=all`, murmur2).
//! - [`inspect`]: reading an aggregate with its recent commands and events.
//! - [`metrics`]: every Prometheus metric name, and the per-process registry.
//! - [`http`]: the `/metrics`, `/healthz` and `/readyz` endpoint of `cmdproc run`.
//! - [`cli`]: the `cmdproc` subcommands.

pub mod batch;
pub mod cli;
pub mod commands_log;
pub mod config;
pub mod decode;
pub mod dlq;
pub mod engine;
pub mod failpoint;
pub mod http;
pub mod inspect;
pub mod metrics;
pub mod producer;
pub mod relay;
pub mod replay;
pub mod retry;
pub mod store;
pub mod topics;
pub mod verify;
pub mod worker;
