//! The cmdproc engine: consumer-group workers that apply commands in Postgres
//! transactions, the outbox relay, and the operator commands behind the `cmdproc` binary.
//!
//! A processor binary is one call: [`cli::main`] with the registry of its aggregates gives
//! it every `cmdproc` subcommand (`migrate`, `topics`, `run`, `relay`, `produce`,
//! `inspect`, `verify`, `replay`, `dlq`, `demo`, `bench`), run with those handlers:
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     let registry = commands::Registry::new()
//!         .with::<bank::Account>(bank::account_schemas())
//!         .with::<bank::Room>(commands::Schemas::dir("schemas/room"));
//!     processor::cli::main(registry)
//! }
//! ```
//!
//! To run a worker inside a larger program, build an [`engine::Processor`] instead.
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
//! - [`pipeline`]: a batch's transaction: load through the store, plan with [`batch`],
//!   write the plan through the store.
//! - [`cache`]: the aggregates a worker keeps in memory between batches.
//! - [`store`]: the engine's SQL statements, one file per family of tables.
//! - [`relay`]: publishes the outbox to Kafka in order per partition.
//! - [`topics`]: admin API.
//! - [`producer`]: the command producer client (idempotent, `acks=all`, murmur2).
//! - [`replies`]: waiting for the reply to a command one produced (gateway, `produce --wait`).
//! - [`inspect`]: reading an aggregate with its recent commands and events.
//! - [`metrics`]: every Prometheus metric name, and the per-process registry.
//! - [`http`]: the `/metrics`, `/healthz` and `/readyz` endpoint of `cmdproc run`.
//! - [`gateway`]: `cmdproc gateway`, HTTP in, outcome out.
//! - [`cli`]: the `cmdproc` subcommands.
//! - [`harness`]: the workload, serial model and topic reader that `demo`, `bench` and the
//!   integration tests share.

#![warn(missing_docs)]

pub mod batch;
pub mod cache;
pub mod cli;
pub mod commands_log;
pub mod config;
pub mod decode;
pub mod dlq;
pub mod engine;
pub mod error;
pub mod failpoint;
pub mod gateway;
pub mod harness;
pub mod http;
pub mod inspect;
pub mod metrics;
pub mod pipeline;
pub mod producer;
pub mod relay;
pub mod replay;
pub mod replies;
pub mod retry;
pub mod store;
pub mod topics;
pub mod verify;
pub mod worker;
