//! The wire contract of cmdproc: command and event envelopes (CloudEvents 1.0), identity
//! newtypes, the Java-compatible murmur2 partitioner, JSON Schema validation, the example
//! domains as pure aggregates. It does no I/O and depends on no Kafka client, async runtime
//! or database driver, so a domain crate depends on it alone.
//!
//! # Layout
//! - [`ids`]: `AggregateId`, `CommandId`, `Source`, `CommandType`, `Topic`.
//! - [`envelope`]: decoding commands (structured and binary mode), encoding events,
//!   deterministic event ids, dead-letter kinds.
//! - [`partitioner`]: murmur2 exactly as Kafka's Java client computes it.
//! - [`schema`]: the embedded `schemas/` and their validators.
//! - [`aggregate`] and [`domain`]: the `Aggregate` trait and the `account` and `room` domains.

pub mod aggregate;
pub mod domain;
pub mod envelope;
pub mod ids;
pub mod partitioner;
pub mod schema;

pub use aggregate::{Aggregate, DomainEvent, DynAggregate, Rejection};
pub use envelope::{Command, DeadLetterKind, DecodeError, EventEnvelope};
pub use ids::{AggregateId, CommandId, CommandType, Source, Topic};
