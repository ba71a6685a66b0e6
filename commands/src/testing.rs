//! Given/when/then tests of an aggregate, without Kafka or Postgres.
//!
//! `given` the events an aggregate already has, `when` a command arrives, `then` expect the
//! events it records, or a rejection with a code, or a state:
//!
//! ```
//! # use commands::{Aggregate, Context, Decision, Rejection};
//! # use serde::{Deserialize, Serialize};
//! # struct Counter;
//! # #[derive(Debug, Deserialize)] enum CounterCommand { Add { by: u32 } }
//! # #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)] enum CounterEvent { Added { by: u32 } }
//! # impl Aggregate for Counter {
//! #     const TYPE: &'static str = "counter";
//! #     type State = u64; type Command = CounterCommand; type Event = CounterEvent;
//! #     fn handle(_: &u64, c: &CounterCommand, _: &Context<'_>) -> Result<Decision<CounterEvent>, Rejection> {
//! #         let CounterCommand::Add { by } = c;
//! #         if *by == 0 { return Err(Rejection::new("zero", "adding zero changes nothing")); }
//! #         Ok(Decision::event(CounterEvent::Added { by: *by }))
//! #     }
//! #     fn apply(total: &mut u64, e: &CounterEvent) { let CounterEvent::Added { by } = e; *total += u64::from(*by); }
//! # }
//! use commands::testing::given;
//!
//! given::<Counter>([CounterEvent::Added { by: 2 }])
//!     .when(CounterCommand::Add { by: 3 })
//!     .then_expect([CounterEvent::Added { by: 3 }])
//!     .then_state(|total| assert_eq!(*total, 5));
//!
//! given::<Counter>([]).when(CounterCommand::Add { by: 0 }).then_reject("zero");
//! ```
//!
//! The command's context (id `test-1`, source `/test`, aggregate `test-aggregate`, the
//! version after the given events, no `time`) can be set with [`When::at`],
//! [`When::correlated`], [`When::with_id`] and [`When::on`].

use chrono::{DateTime, Utc};

use crate::aggregate::{Aggregate, Context, Decision, Rejection};
use crate::ids::{CommandId, Source};

/// Starts a test from the events aggregate `A` already recorded, applied in order.
pub fn given<A: Aggregate>(events: impl IntoIterator<Item = A::Event>) -> Given<A> {
    let mut state = A::State::default();
    let mut version = 0;
    for event in events {
        A::apply(&mut state, &event);
        version += 1;
    }
    Given { state, version }
}

/// An aggregate's state before the command under test.
#[derive(Debug)]
pub struct Given<A: Aggregate> {
    state: A::State,
    version: u64,
}

impl<A: Aggregate> Given<A> {
    /// The command under test.
    pub fn when(self, command: A::Command) -> When<A> {
        When {
            given: self,
            command,
            id: "test-1".to_owned(),
            source: "/test".to_owned(),
            time: None,
            correlation_id: None,
            aggregate_id: "test-aggregate".to_owned(),
        }
    }

    /// The state the given events produced.
    pub fn state(&self) -> &A::State {
        &self.state
    }
}

/// A command about to be handled; handled by the first `then_*` call.
#[derive(Debug)]
pub struct When<A: Aggregate> {
    given: Given<A>,
    command: A::Command,
    id: String,
    source: String,
    time: Option<DateTime<Utc>>,
    correlation_id: Option<String>,
    aggregate_id: String,
}

impl<A: Aggregate> When<A> {
    /// Sets the aggregate's id (the command's subject; `test-aggregate` by default).
    pub fn on(mut self, aggregate_id: impl Into<String>) -> Self {
        self.aggregate_id = aggregate_id.into();
        self
    }

    /// Sets the command's `time`, the handler's only clock.
    pub fn at(mut self, time: DateTime<Utc>) -> Self {
        self.time = Some(time);
        self
    }

    /// Sets the command's correlation id.
    pub fn correlated(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    /// Sets the command's id and source.
    ///
    /// # Panics
    ///
    /// If either is not a valid id or source.
    pub fn with_id(mut self, source: &str, id: &str) -> Self {
        self.source = source.to_owned();
        self.id = id.to_owned();
        self
    }

    /// Handles the command and returns what the handler decided, with the state after it.
    ///
    /// # Panics
    ///
    /// If the id or source set with [`When::with_id`] is invalid.
    pub fn outcome(self) -> Then<A> {
        let id = CommandId::parse(self.id.as_str()).expect("a valid test command id");
        let source = Source::parse(self.source.as_str()).expect("a valid test source");
        let context = Context::new(&id, &source, self.given.version)
            .with_time(self.time)
            .with_correlation_id(self.correlation_id.as_deref())
            .with_aggregate_id(&self.aggregate_id);
        let decision = A::handle(&self.given.state, &self.command, &context);
        let mut state = self.given.state;
        if let Ok(decision) = &decision {
            for event in &decision.events {
                A::apply(&mut state, event);
            }
        }
        Then { decision, state }
    }

    /// Asserts the command is accepted with exactly `events`.
    ///
    /// # Panics
    ///
    /// If the command is rejected or records other events.
    #[track_caller]
    pub fn then_expect(self, events: impl IntoIterator<Item = A::Event>) -> Then<A>
    where
        A::Event: PartialEq,
    {
        let then = self.outcome();
        let expected: Vec<A::Event> = events.into_iter().collect();
        match &then.decision {
            Ok(decision) => assert_eq!(decision.events, expected, "recorded events"),
            Err(rejection) => panic!("expected events {expected:?}, but rejected: {rejection}"),
        }
        then
    }

    /// Asserts the command is rejected with `code`.
    ///
    /// # Panics
    ///
    /// If the command is accepted or rejected with another code.
    #[track_caller]
    pub fn then_reject(self, code: &str) -> Then<A> {
        let then = self.outcome();
        match &then.decision {
            Ok(decision) => panic!(
                "expected rejection `{code}`, but accepted with {:?}",
                decision.events
            ),
            Err(rejection) => assert_eq!(rejection.code, code, "rejection code ({rejection})"),
        }
        then
    }
}

/// What the handler decided, and the state after applying it.
#[derive(Debug)]
pub struct Then<A: Aggregate> {
    decision: Result<Decision<A::Event>, Rejection>,
    state: A::State,
}

impl<A: Aggregate> Then<A> {
    /// Runs `check` on the state after the command's events were applied (unchanged if it
    /// was rejected).
    pub fn then_state(self, check: impl FnOnce(&A::State)) -> Self {
        check(&self.state);
        self
    }

    /// The handler's decision.
    pub fn decision(&self) -> &Result<Decision<A::Event>, Rejection> {
        &self.decision
    }

    /// The rejection, if the command was rejected.
    pub fn rejection(&self) -> Option<&Rejection> {
        self.decision.as_ref().err()
    }

    /// The state after the command.
    pub fn state(&self) -> &A::State {
        &self.state
    }
}
