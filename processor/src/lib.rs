//! The cmdproc engine: consumer-group workers that apply commands in Postgres
//! transactions, the outbox relay, and the operator commands behind the `cmdproc` binary.
//!
//! # Layout
//! - [`worker`]: the consumer loop, rebalance-time fencing, micro-batches.
//! - [`commands_log`]: checks that the commands log is the one the stored positions belong
//!   to, and the halts when it is not.
//! - [`batch`]: the pure planning step of a batch (outcomes, events, dead letters).
//! - [`store`]: every SQL statement.
//! - [`relay`]: publishes the outbox to Kafka in order per partition.
//! - [`topics`]: admin API.
//! - [`producer`]: the command producer client (idempotent, `acks=all`, murmur2).
//! - [`inspect`]: reading an aggregate with its recent commands and events.
//! - [`metrics`]: every Prometheus metric name, and the per-process registry.
//! - [`http`]: the `/metrics`, `/healthz` and `/readyz` endpoint of `cmdproc run`.
//! - [`cli`]: the `cmdproc` subcommands.
//! - [`harness`]: the workload, serial model and topic reader that `demo`, `bench` and the
//!   integration tests share.

pub mod batch;
pub mod cli;
pub mod commands_log;
pub mod decode;
pub mod dlq;
pub mod engine;
pub mod failpoint;
pub mod harness;
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
