//! The contract crate of cmdproc: what a domain crate depends on to write its aggregates.
//!
//! It holds the command and event envelopes (CloudEvents 1.0), the identity newtypes, the
//! Java-compatible murmur2 partitioner, the [`Aggregate`] trait with its [`Context`],
//! [`Decision`] and [`Rejection`], the [`Registry`] that pairs each aggregate with its JSON
//! Schemas, and [`testing`] for given/when/then tests. It does no network or database I/O
//! and depends on no Kafka client, async runtime or database driver (it reads schema files
//! only when [`Schemas::dir`] points it at some).
//!
//! # Example
//!
//! An aggregate, its schemas, a registry, and a test, with no broker and no database:
//!
//! ```
//! use commands::testing::given;
//! use commands::{Aggregate, Context, Decision, Registry, Rejection, Schemas};
//! use serde::{Deserialize, Serialize};
//!
//! /// A ticket counter that never sells more than its capacity.
//! struct Gig;
//!
//! #[derive(Debug, Deserialize)]
//! enum GigCommand {
//!     Sell { seats: u32 },
//! }
//!
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
//! enum GigEvent {
//!     Sold { seats: u32 },
//! }
//!
//! impl Aggregate for Gig {
//!     const TYPE: &'static str = "gig";
//!     type State = u32;
//!     type Command = GigCommand;
//!     type Event = GigEvent;
//!
//!     fn handle(sold: &u32, command: &GigCommand, _: &Context<'_>)
//!         -> Result<Decision<GigEvent>, Rejection>
//!     {
//!         let GigCommand::Sell { seats } = command;
//!         if sold + seats > 100 {
//!             return Err(Rejection::new("sold_out", format!("{} seats left", 100 - sold)));
//!         }
//!         Ok(Decision::event(GigEvent::Sold { seats: *seats }))
//!     }
//!
//!     fn apply(sold: &mut u32, event: &GigEvent) {
//!         let GigEvent::Sold { seats } = event;
//!         *sold += seats;
//!     }
//! }
//!
//! let schema = r#"{"type": "object", "required": ["seats"],
//!                  "properties": {"seats": {"type": "integer", "minimum": 1}}}"#;
//! let registry = Registry::new().with::<Gig>(Schemas::embedded(
//!     "gig",
//!     &[("commands/Sell.json", schema), ("events/Sold.json", schema)],
//! ));
//! registry.check().expect("every command and event has a schema");
//!
//! given::<Gig>([GigEvent::Sold { seats: 99 }])
//!     .when(GigCommand::Sell { seats: 2 })
//!     .then_reject("sold_out");
//! ```
//!
//! A processor binary hands such a registry to `processor::cli::main`, which gives it every
//! `cmdproc` subcommand with these handlers.
//!
//! # Layout
//! - [`ids`]: `AggregateId`, `CommandId`, `Source`, `CommandType`, `Topic`.
//! - [`envelope`]: decoding commands (structured and binary mode), encoding events,
//!   deterministic event ids, dead-letter kinds.
//! - [`partitioner`]: murmur2 exactly as Kafka's Java client computes it.
//! - [`aggregate`]: the `Aggregate` trait, its context, decision and rejection, and the
//!   type-erased `DynAggregate` the engine drives.
//! - [`registry`]: the `Registry` of aggregates with their `Schemas`, checked at start.
//! - [`reply`]: the `cmdproc.reply` a command with `replyto` gets for every delivery.
//! - [`workflow`]: commands a handler emits, their outcomes coming back, durable timers.
//! - [`schema`]: the embedded envelopes and the compiled `SchemaSet`.
//! - [`testing`]: given/when/then for aggregates.
//! - [`wire`]: the messages the engine publishes, as bytes: events as structured-mode
//!   CloudEvents, dead letters with their `cmdproc-error-*` and `cmdproc-original-*` headers.

#![warn(missing_docs)]

pub mod aggregate;
pub mod envelope;
pub mod ids;
pub mod partitioner;
pub mod registry;
pub mod reply;
pub mod schema;
pub mod testing;
pub mod wire;
pub mod workflow;

pub use aggregate::{
    Aggregate, CommandError, Context, Decision, DomainEvent, DynAggregate, Handled, Rejection,
};
pub use envelope::{Command, DeadLetterKind, DecodeError, EventEnvelope, OutcomeTo, ReplyAddress};
pub use ids::{AggregateId, CommandId, CommandType, Source, Topic};
pub use registry::{ContractErrors, Registry, RegistryError, Schemas, Typed};
pub use reply::{Reply, ReplyCommand, ReplyOutcome};
pub use schema::{DataKind, SchemaError, SchemaSet};
