//! cmdproc's stock example domains, written the way a user writes theirs: against the
//! public API of the `commands` crate only.
//!
//! - [`Account`] (`account`): a balance in minor units that never goes negative.
//! - [`Room`] (`room`): a hotel room booked at most once per night.
//!
//! Their JSON Schemas live in the repository's `schemas/` folder (the contract clients in
//! other languages validate against) and are embedded here at build time, so a binary
//! built with [`registry`] validates with exactly the files it was built from.

#![warn(missing_docs)]

pub mod account;
pub mod room;

use commands::{Registry, Schemas};

pub use account::Account;
pub use room::Room;

/// The schema files of `account`, relative to `schemas/account`.
pub const ACCOUNT_SCHEMAS: &[(&str, &str)] = &[
    (
        "commands/Open.json",
        include_str!("../../../schemas/account/commands/Open.json"),
    ),
    (
        "commands/Deposit.json",
        include_str!("../../../schemas/account/commands/Deposit.json"),
    ),
    (
        "commands/Withdraw.json",
        include_str!("../../../schemas/account/commands/Withdraw.json"),
    ),
    (
        "events/Opened.json",
        include_str!("../../../schemas/account/events/Opened.json"),
    ),
    (
        "events/Deposited.json",
        include_str!("../../../schemas/account/events/Deposited.json"),
    ),
    (
        "events/Withdrawn.json",
        include_str!("../../../schemas/account/events/Withdrawn.json"),
    ),
];

/// The schema files of `room`, relative to `schemas/room`.
pub const ROOM_SCHEMAS: &[(&str, &str)] = &[
    (
        "commands/Book.json",
        include_str!("../../../schemas/room/commands/Book.json"),
    ),
    (
        "commands/Cancel.json",
        include_str!("../../../schemas/room/commands/Cancel.json"),
    ),
    (
        "events/Booked.json",
        include_str!("../../../schemas/room/events/Booked.json"),
    ),
    (
        "events/Cancelled.json",
        include_str!("../../../schemas/room/events/Cancelled.json"),
    ),
];

/// The schemas of [`Account`], embedded from `schemas/account`.
pub fn account_schemas() -> Schemas {
    Schemas::embedded("schemas/account", ACCOUNT_SCHEMAS)
}

/// The schemas of [`Room`], embedded from `schemas/room`.
pub fn room_schemas() -> Schemas {
    Schemas::embedded("schemas/room", ROOM_SCHEMAS)
}

/// Adds `account` and `room` to `registry`.
pub fn register(registry: Registry) -> Registry {
    registry
        .with::<Account>(account_schemas())
        .with::<Room>(room_schemas())
}

/// A registry of `account` and `room`.
pub fn registry() -> Registry {
    register(Registry::new())
}
