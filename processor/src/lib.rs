//! The cmdproc engine: consumer-group workers that apply commands in Postgres
//! transactions, the outbox relay, and the operator commands behind the `cmdproc` binary.
//!
//! # Layout
//! - [`worker`]: the consumer loop, rebalance-time fencing, micro-batches.
//! - [`batch`]: the pure planning step of a batch (outcomes, events, dead letters).
//! - [`store`]: every SQL statement.
//! - [`relay`]: publishes the outbox to Kafka in order per partition.
//! - [`topics`]: admin API.
//! - [`inspect`]: reading an aggregate with its recent commands and events.
//! - [`cli`]: the `cmdproc` subcommands.

pub mod batch;
pub mod cli;
pub mod failpoint;
pub mod inspect;
pub mod relay;
pub mod retry;
pub mod stats;
pub mod store;
pub mod topics;
pub mod worker;
