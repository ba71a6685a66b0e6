//! The serial model: commands applied one at a time, in the order given, by the registry's
//! pure handlers, with repeated `(source, id)` pairs skipped as the engine skips them.
//! Commands of one aggregate share a partition and are produced in order, so this is the
//! order the workers must apply them in; commands of different aggregates do not interact.

use std::collections::{BTreeMap, HashSet};

use commands::{Command, Context, Handled, Registry};
use serde_json::Value;

/// `(aggregate type, aggregate id)`.
pub type AggregateKey = (String, String);

/// Why the model cannot run the commands given.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command names an aggregate type the registry does not know.
    #[error("no aggregate type `{aggregate_type}` in the registry (command {command_id})")]
    UnknownType {
        /// The command's id.
        command_id: String,
        /// The aggregate type it names.
        aggregate_type: String,
    },
    /// A handler found a command invalid: a workload is made of valid commands only.
    #[error("command {command_id} is invalid: {reason}")]
    Invalid {
        /// The command's id.
        command_id: String,
        /// What the handler said.
        reason: String,
    },
}

/// An aggregate as the model leaves it.
#[derive(Debug, Clone, PartialEq)]
pub struct Modeled {
    /// Version: the number of events applied.
    pub version: i64,
    /// State as JSON, exactly as the engine stores it; `Null` if no event was applied.
    pub state: Value,
}

/// What became of one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted by its handler (with or without events).
    Applied,
    /// Refused by its handler: a business rejection.
    Rejected,
    /// An earlier command had the same `(source, id)`: no effect.
    Duplicate,
}

/// An event as the model emits it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEvent {
    /// The aggregate's key.
    pub aggregate: AggregateKey,
    /// The aggregate's version after the event.
    pub version: i64,
    /// `<aggregate_type>.<EventName>`, e.g. `account.Deposited`.
    pub event_type: String,
    /// The event's data.
    pub data: Value,
}

/// The result of applying commands one by one.
#[derive(Debug, Clone, Default)]
pub struct Model {
    /// Every aggregate a command named, at version 0 with `Null` state if no event was
    /// applied to it (the engine stores no row for those: see [`Model::stored`]).
    pub aggregates: BTreeMap<AggregateKey, Modeled>,
    /// The outcome of each command, index for index.
    pub outcomes: Vec<Outcome>,
    /// The events the applied commands emit, in order.
    pub events: Vec<ModelEvent>,
}

impl Model {
    /// Runs `registry`'s handlers over `commands` serially.
    pub fn run(registry: &Registry, commands: &[Command]) -> Result<Self, Error> {
        let mut model = Model::default();
        let mut seen = HashSet::new();
        for c in commands {
            if !seen.insert((c.source.to_string(), c.id.to_string())) {
                model.outcomes.push(Outcome::Duplicate);
                continue;
            }
            let ty = c.command_type.aggregate_type();
            let aggregate = registry.get(ty).ok_or_else(|| Error::UnknownType {
                command_id: c.id.to_string(),
                aggregate_type: ty.to_owned(),
            })?;
            let key = (ty.to_owned(), c.subject.to_string());
            let entry = model.aggregates.entry(key.clone()).or_insert(Modeled {
                version: 0,
                state: Value::Null,
            });
            let context = Context::new(&c.id, &c.source, entry.version as u64)
                .with_time(c.time)
                .with_correlation_id(c.correlation_id.as_deref())
                .with_aggregate_id(c.subject.as_str());
            match aggregate.handle(&entry.state, c.command_type.name(), &c.data, &context) {
                Handled::Invalid(e) => {
                    return Err(Error::Invalid {
                        command_id: c.id.to_string(),
                        reason: e.to_string(),
                    })
                }
                Handled::Rejected(_) => model.outcomes.push(Outcome::Rejected),
                Handled::Accepted(decision) => {
                    let emitted = decision.events;
                    // The engine leaves an aggregate untouched by a command without events.
                    if !emitted.is_empty() {
                        entry.state = aggregate.apply(&entry.state, &emitted);
                    }
                    for e in emitted {
                        entry.version += 1;
                        model.events.push(ModelEvent {
                            aggregate: key.clone(),
                            version: entry.version,
                            event_type: format!("{ty}.{}", e.name),
                            data: e.data,
                        });
                    }
                    model.outcomes.push(Outcome::Applied);
                }
            }
        }
        Ok(model)
    }

    /// How many commands were applied.
    pub fn applied(&self) -> usize {
        self.count(Outcome::Applied)
    }

    /// How many commands were rejected.
    pub fn rejected(&self) -> usize {
        self.count(Outcome::Rejected)
    }

    /// How many commands repeated an earlier `(source, id)`.
    pub fn duplicates(&self) -> usize {
        self.count(Outcome::Duplicate)
    }

    fn count(&self, outcome: Outcome) -> usize {
        self.outcomes.iter().filter(|o| **o == outcome).count()
    }

    /// The aggregates the engine stores a row for: those with at least one event.
    pub fn stored(&self) -> BTreeMap<AggregateKey, Modeled> {
        self.aggregates
            .iter()
            .filter(|(_, m)| m.version > 0)
            .map(|(k, m)| (k.clone(), m.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::workload::{Options, Workload};

    #[test]
    fn the_model_rejects_overdrafts_and_double_bookings() {
        let w = Workload::generate(&Options::new(42, 2000)).unwrap();
        let model = Model::run(&bank::registry(), &w.valid).expect("a valid workload");
        assert!(
            model.rejected() > 100,
            "only {} rejections",
            model.rejected()
        );
        assert_eq!(model.applied() + model.rejected(), 2000);
        for ((ty, _), m) in &model.aggregates {
            if ty == "account" {
                assert!(m.state["balance"].as_i64().is_some_and(|b| b >= 0));
            }
        }
    }

    #[test]
    fn repeated_ids_are_duplicates_without_effect() {
        let w = Workload::generate(&Options::new(9, 300)).unwrap();
        let mut again = w.valid.clone();
        again.extend(w.valid[..20].iter().cloned());
        let once = Model::run(&bank::registry(), &w.valid).unwrap();
        let twice = Model::run(&bank::registry(), &again).unwrap();
        assert_eq!(twice.duplicates(), 20);
        assert_eq!(once.aggregates, twice.aggregates);
        assert_eq!(once.events, twice.events);
    }
}
