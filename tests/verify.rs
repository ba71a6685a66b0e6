//! `cmdproc verify` finds every difference between the stored aggregates and a re-execution.
