//! The test harness shared by `cmdproc demo`, `cmdproc bench` and the integration tests:
//! one workload generator, one serial model of what the workers must make of it, and one
//! reader of a topic up to its end. Nothing here runs in `cmdproc run`.
//!
//! # Layout
//! - [`workload`]: seeded, reproducible commands over accounts and rooms, with re-sent
//!   duplicates and invalid messages on request, uniform or Zipf-skewed.
//! - [`model`]: the commands applied one at a time by the registry's pure handlers.
//! - [`topic`]: every message of a topic up to its high watermarks, past the transaction
//!   markers the relay leaves behind.

pub mod model;
pub mod topic;
pub mod workload;
