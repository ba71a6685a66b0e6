//! `room`: a hotel room booked at most once per night.
//!
//! The aggregate is the room, not the booking, so that all bookings that could collide on
//! a night go through one writer and the second one is rejected.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use commands::{Aggregate, Context, Decision, Rejection};

/// The room aggregate (type `room`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Room;

/// What a room accepts. Nights are ISO dates (`2026-12-24`), meaning the night starting
/// that day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Mirrors `additionalProperties: false` in the schemas.
#[serde(deny_unknown_fields)]
pub enum RoomCommand {
    /// Books `night` for `guest`, if the night is free.
    Book {
        /// The night to book.
        night: NaiveDate,
        /// Who the night is booked for.
        guest: String,
    },
    /// Cancels the booking of `night`, whoever holds it.
    Cancel {
        /// The night to free.
        night: NaiveDate,
    },
}

/// What happened to a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoomEvent {
    /// `night` was booked for `guest`.
    Booked {
        /// The booked night.
        night: NaiveDate,
        /// Who it is booked for.
        guest: String,
    },
    /// The booking of `night` was cancelled; `guest` is who held it, so consumers need not
    /// remember.
    Cancelled {
        /// The freed night.
        night: NaiveDate,
        /// Who had booked it.
        guest: String,
    },
}

/// A room's state: its booked nights.
///
/// Serializes as `{"booked": {"2026-12-24": "alice"}}`; keys are ISO dates, and the
/// `BTreeMap` keeps them in date order so the stored JSON is deterministic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomState {
    /// Guest per booked night.
    pub booked: BTreeMap<NaiveDate, String>,
}

impl Aggregate for Room {
    const TYPE: &'static str = "room";
    type State = RoomState;
    type Command = RoomCommand;
    type Event = RoomEvent;

    fn handle(
        state: &RoomState,
        command: &RoomCommand,
        _context: &Context<'_>,
    ) -> Result<Decision<RoomEvent>, Rejection> {
        match command {
            RoomCommand::Book { night, guest } => {
                if state.booked.contains_key(night) {
                    return Err(Rejection::new(
                        "already_booked",
                        format!("night {night} is already booked"),
                    ));
                }
                // The schema demands a non-empty guest; defend for callers that skip it.
                if guest.trim().is_empty() {
                    return Err(Rejection::new("empty_guest", "guest must not be empty"));
                }
                Ok(Decision::event(RoomEvent::Booked {
                    night: *night,
                    guest: guest.clone(),
                }))
            }
            RoomCommand::Cancel { night } => match state.booked.get(night) {
                Some(guest) => Ok(Decision::event(RoomEvent::Cancelled {
                    night: *night,
                    guest: guest.clone(),
                })),
                None => Err(Rejection::new(
                    "not_booked",
                    format!("night {night} is not booked"),
                )),
            },
        }
    }

    fn apply(state: &mut RoomState, event: &RoomEvent) {
        match event {
            RoomEvent::Booked { night, guest } => {
                state.booked.insert(*night, guest.clone());
            }
            RoomEvent::Cancelled { night, .. } => {
                state.booked.remove(night);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Handles one command with a fixed context, as the engine would, returning its events.
    fn handle(state: &RoomState, command: &RoomCommand) -> Result<Vec<RoomEvent>, Rejection> {
        let id = commands::CommandId::parse("c-1").expect("id");
        let source = commands::Source::parse("/test").expect("source");
        Room::handle(state, command, &Context::new(&id, &source, 0)).map(|decision| decision.events)
    }

    fn night(iso: &str) -> NaiveDate {
        iso.parse().expect("ISO date")
    }

    fn book(iso: &str, guest: &str) -> RoomCommand {
        RoomCommand::Book {
            night: night(iso),
            guest: guest.into(),
        }
    }

    fn cancel(iso: &str) -> RoomCommand {
        RoomCommand::Cancel { night: night(iso) }
    }

    fn run(commands: &[RoomCommand]) -> (RoomState, Vec<Result<Vec<RoomEvent>, Rejection>>) {
        let mut state = RoomState::default();
        let mut outcomes = Vec::new();
        for command in commands {
            let outcome = handle(&state, command);
            if let Ok(events) = &outcome {
                for event in events {
                    Room::apply(&mut state, event);
                }
            }
            outcomes.push(outcome);
        }
        (state, outcomes)
    }

    #[test]
    fn double_booking_is_rejected() {
        let (state, outcomes) = run(&[book("2026-12-24", "alice"), book("2026-12-24", "bob")]);
        assert_eq!(
            outcomes[1],
            Err(Rejection::new(
                "already_booked",
                "night 2026-12-24 is already booked"
            ))
        );
        assert_eq!(
            state.booked.get(&night("2026-12-24")).map(String::as_str),
            Some("alice")
        );
    }

    #[test]
    fn different_nights_do_not_collide() {
        let (state, outcomes) = run(&[book("2026-12-24", "alice"), book("2026-12-25", "bob")]);
        assert!(outcomes.iter().all(Result::is_ok));
        assert_eq!(state.booked.len(), 2);
    }

    #[test]
    fn cancel_then_rebook_works() {
        let (state, outcomes) = run(&[
            book("2026-12-24", "alice"),
            cancel("2026-12-24"),
            book("2026-12-24", "bob"),
        ]);
        assert_eq!(
            outcomes[1],
            Ok(vec![RoomEvent::Cancelled {
                night: night("2026-12-24"),
                guest: "alice".into()
            }])
        );
        assert!(outcomes[2].is_ok());
        assert_eq!(
            state.booked.get(&night("2026-12-24")).map(String::as_str),
            Some("bob")
        );
    }

    #[test]
    fn cancelling_a_free_night_is_rejected() {
        let (state, outcomes) = run(&[cancel("2026-12-24")]);
        assert_eq!(
            outcomes[0],
            Err(Rejection::new(
                "not_booked",
                "night 2026-12-24 is not booked"
            ))
        );
        assert!(state.booked.is_empty());
    }

    #[test]
    fn empty_guest_is_rejected() {
        let (_, outcomes) = run(&[book("2026-12-24", "")]);
        assert_eq!(
            outcomes[0],
            Err(Rejection::new("empty_guest", "guest must not be empty"))
        );
    }

    #[test]
    fn same_commands_give_same_state() {
        let commands = [
            book("2026-12-26", "carol"),
            book("2026-12-24", "alice"),
            cancel("2026-12-26"),
            book("2026-12-24", "bob"),
            book("2026-12-25", "bob"),
        ];
        assert_eq!(run(&commands), run(&commands));
    }

    #[test]
    fn state_serializes_as_a_map_of_iso_nights() {
        let (state, _) = run(&[book("2026-12-25", "bob"), book("2026-12-24", "alice")]);
        let json = serde_json::to_string(&state).expect("json");
        // Date order, whatever the booking order.
        assert_eq!(
            json,
            r#"{"booked":{"2026-12-24":"alice","2026-12-25":"bob"}}"#
        );
        assert_eq!(
            serde_json::from_str::<RoomState>(&json).expect("json"),
            state
        );
    }

    #[test]
    fn impossible_dates_do_not_deserialize() {
        let bad = serde_json::json!({"Book": {"night": "2026-02-30", "guest": "alice"}});
        assert!(serde_json::from_value::<RoomCommand>(bad).is_err());
    }
}
