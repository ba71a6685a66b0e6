//! Operator commands against the real broker and database: verifying stored state and
//! handling dead letters and parked aggregates. Needs `deploy/local/up.sh`.

mod dlq;
mod replay;
mod support;
mod verify;
