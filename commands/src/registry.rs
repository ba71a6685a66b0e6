//! The registry: the aggregate types a processor knows, each with the schemas of its
//! commands and events, checked against each other when they are registered.
//!
//! The engine only sees JSON (commands arrive as CloudEvents, state and events are stored
//! as JSONB), so [`Typed`] adapts any [`Aggregate`] to [`DynAggregate`], and [`Registry`]
//! maps an aggregate type (the part of a CloudEvents `type` before the dot) to its adapter
//! and its compiled schemas.
//!
//! ```
//! # use commands::{Aggregate, Context, Decision, Rejection, Registry, Schemas};
//! # use serde::{Deserialize, Serialize};
//! # struct Counter;
//! # #[derive(Debug, Deserialize)] enum CounterCommand { Add { by: u32 } }
//! # #[derive(Debug, Clone, Serialize, Deserialize)] enum CounterEvent { Added { by: u32 } }
//! # impl Aggregate for Counter {
//! #     const TYPE: &'static str = "counter";
//! #     type State = u64; type Command = CounterCommand; type Event = CounterEvent;
//! #     fn handle(_: &u64, c: &CounterCommand, _: &Context<'_>) -> Result<Decision<CounterEvent>, Rejection> {
//! #         let CounterCommand::Add { by } = c; Ok(Decision::event(CounterEvent::Added { by: *by }))
//! #     }
//! #     fn apply(total: &mut u64, e: &CounterEvent) { let CounterEvent::Added { by } = e; *total += u64::from(*by); }
//! # }
//! const ADD: &str = r#"{"type": "object", "required": ["by"],
//!     "properties": {"by": {"type": "integer", "minimum": 1}}, "additionalProperties": false}"#;
//! const ADDED: &str = r#"{"type": "object"}"#;
//!
//! let registry = Registry::new().with::<Counter>(Schemas::embedded(
//!     "counter",
//!     &[("commands/Add.json", ADD), ("events/Added.json", ADDED)],
//! ));
//! registry.check().expect("the contract holds");
//! assert_eq!(registry.types().collect::<Vec<_>>(), ["counter"]);
//!
//! // A registry missing a schema says so when it is checked, naming what is missing.
//! let broken = Registry::new().with::<Counter>(Schemas::embedded("counter", &[("commands/Add.json", ADD)]));
//! let error = broken.check().unwrap_err().to_string();
//! assert!(error.contains("aggregate `counter`: event `Added` has no schema"), "{error}");
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeOwned, Visitor};
use serde_json::{Map, Value};

use crate::aggregate::{Aggregate, CommandError, Context, DomainEvent, DynAggregate, Handled};
use crate::schema::{compile_data_schema, AggregateValidators, DataKind, SchemaSet};

/// Where an aggregate's JSON Schemas come from: a directory read when the aggregate is
/// registered, or files embedded in the binary at build time.
///
/// Either way the layout is `commands/<Name>.json` and `events/<Name>.json`, one file per
/// command and event variant, each a JSON Schema (draft 2020-12) of the variant's `data`.
#[derive(Debug, Clone)]
pub struct Schemas {
    origin: String,
    files: SchemaFiles,
}

#[derive(Debug, Clone)]
enum SchemaFiles {
    Dir(PathBuf),
    Embedded(Vec<(String, String)>),
}

impl Schemas {
    /// The schemas in directory `path` (`<path>/commands/*.json`, `<path>/events/*.json`),
    /// read when the aggregate is registered. A relative path is relative to the process's
    /// working directory.
    pub fn dir(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        Self {
            origin: path.display().to_string(),
            files: SchemaFiles::Dir(path),
        }
    }

    /// Schemas embedded in the binary, e.g. with `include_str!`: `(path, text)` pairs with
    /// paths like `commands/Reserve.json`. `origin` names them in error messages (the
    /// directory they were embedded from, say).
    pub fn embedded(origin: impl Into<String>, files: &[(&str, &str)]) -> Self {
        Self {
            origin: origin.into(),
            files: SchemaFiles::Embedded(
                files
                    .iter()
                    .map(|(path, text)| ((*path).to_owned(), (*text).to_owned()))
                    .collect(),
            ),
        }
    }

    /// Reads the files: `(kind, name) -> (path for messages, text)`.
    fn load(&self) -> Result<SchemaTexts, RegistryError> {
        let mut out = BTreeMap::new();
        match &self.files {
            SchemaFiles::Dir(dir) => {
                if !dir.is_dir() {
                    // A relative path depends on where the process was started (a service
                    // manager's working directory is often `/`), so say where it was looked up.
                    let problem = match std::env::current_dir() {
                        Ok(cwd) if dir.is_relative() => format!(
                            "is not a directory (looked up from the working directory {})",
                            cwd.display()
                        ),
                        _ => "is not a directory".to_owned(),
                    };
                    return Err(RegistryError::SchemaDirectory {
                        path: dir.display().to_string(),
                        problem,
                    });
                }
                for kind in [DataKind::Command, DataKind::Event] {
                    let sub = dir.join(kind.folder());
                    if !sub.exists() {
                        continue;
                    }
                    let entries = std::fs::read_dir(&sub).map_err(|error| {
                        RegistryError::SchemaDirectory {
                            path: sub.display().to_string(),
                            problem: error.to_string(),
                        }
                    })?;
                    for entry in entries {
                        let path = entry
                            .map_err(|error| RegistryError::SchemaDirectory {
                                path: sub.display().to_string(),
                                problem: error.to_string(),
                            })?
                            .path();
                        let Some(name) = json_stem(&path) else {
                            continue;
                        };
                        let text = std::fs::read_to_string(&path).map_err(|error| {
                            RegistryError::SchemaFile {
                                path: path.display().to_string(),
                                problem: error.to_string(),
                            }
                        })?;
                        out.insert((kind, name), (path.display().to_string(), text));
                    }
                }
            }
            SchemaFiles::Embedded(files) => {
                for (path, text) in files {
                    let shown = format!("{}/{path}", self.origin);
                    let (folder, file) = path.split_once('/').unwrap_or(("", path));
                    let kind =
                        match folder {
                            "commands" => DataKind::Command,
                            "events" => DataKind::Event,
                            _ => return Err(RegistryError::SchemaFile {
                                path: shown,
                                problem:
                                    "expected a path `commands/<Name>.json` or `events/<Name>.json`"
                                        .into(),
                            }),
                        };
                    let Some(name) = json_stem(Path::new(file)) else {
                        return Err(RegistryError::SchemaFile {
                            path: shown,
                            problem: "expected a `.json` file".into(),
                        });
                    };
                    if out
                        .insert((kind, name), (shown.clone(), text.clone()))
                        .is_some()
                    {
                        return Err(RegistryError::SchemaFile {
                            path: shown,
                            problem: "embedded twice".into(),
                        });
                    }
                }
            }
        }
        Ok(out)
    }
}

/// An aggregate's schema files as read: `(kind, name) -> (path for messages, text)`.
type SchemaTexts = BTreeMap<(DataKind, String), (String, String)>;

/// `Name` of `.../Name.json`.
fn json_stem(path: &Path) -> Option<String> {
    if path.extension().and_then(|e| e.to_str()) != Some("json") {
        return None;
    }
    path.file_stem().and_then(|s| s.to_str()).map(str::to_owned)
}

/// A broken contract between an aggregate's code and its schemas, found at registration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// Two aggregates were registered under one type.
    #[error("aggregate `{aggregate}` is registered twice")]
    DuplicateType {
        /// The aggregate type.
        aggregate: String,
    },
    /// The aggregate type cannot appear in a command type.
    #[error("aggregate type `{aggregate}` must start with a lowercase letter and hold only lowercase letters, digits and `_`")]
    BadType {
        /// The aggregate type.
        aggregate: String,
    },
    /// The command or event type is not an enum serde tags externally.
    #[error("aggregate `{aggregate}`: its {kind} type must be an enum in serde's default (externally tagged) form, one variant per {kind}")]
    NotAnEnum {
        /// The aggregate type.
        aggregate: String,
        /// `command` or `event`.
        kind: DataKind,
    },
    /// A variant name cannot be a command or event name.
    #[error("aggregate `{aggregate}`: {kind} `{name}` must start with an uppercase letter and hold only letters and digits")]
    BadName {
        /// The aggregate type.
        aggregate: String,
        /// `command` or `event`.
        kind: DataKind,
        /// The variant name.
        name: String,
    },
    /// A command or event has no schema file.
    #[error("aggregate `{aggregate}`: {kind} `{name}` has no schema (expected {expected})")]
    MissingSchema {
        /// The aggregate type.
        aggregate: String,
        /// `command` or `event`.
        kind: DataKind,
        /// The command or event name.
        name: String,
        /// Where the schema was looked for.
        expected: String,
    },
    /// A schema file names no command or event of the aggregate.
    #[error("aggregate `{aggregate}`: schema {path} names no {kind} of the aggregate (its {kind}s: {known})")]
    UnknownSchema {
        /// The aggregate type.
        aggregate: String,
        /// `command` or `event`.
        kind: DataKind,
        /// The file.
        path: String,
        /// The names the enum has.
        known: String,
    },
    /// A schema directory cannot be read.
    #[error("schema directory {path} {problem}")]
    SchemaDirectory {
        /// The directory.
        path: String,
        /// What went wrong.
        problem: String,
    },
    /// A schema file cannot be read or compiled.
    #[error("schema {path}: {problem}")]
    SchemaFile {
        /// The file.
        path: String,
        /// What went wrong.
        problem: String,
    },
}

/// Every contract error a registry found, one per line when displayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContractErrors(pub Vec<RegistryError>);

impl fmt::Display for ContractErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ContractErrors {}

/// Adapts a typed [`Aggregate`] to the JSON-facing [`DynAggregate`] the engine drives.
///
/// It holds no data: the aggregate's logic is in associated functions, so one `Typed<A>`
/// serves every aggregate instance of the type.
///
/// # Panics
///
/// `handle` and `apply` panic if the stored state or an event is not JSON this adapter
/// produced. That is a bug (or a state-shape change without a migration), not bad input:
/// the engine treats the panic as a handler failure and parks the aggregate, whereas
/// returning [`CommandError::InvalidData`] would dead-letter a good command and let later
/// commands for the same aggregate overtake it.
pub struct Typed<A> {
    commands: Vec<String>,
    _aggregate: PhantomData<fn() -> A>,
}

// Written by hand because a derive would demand `A: Debug`, yet only the type name matters.
impl<A: Aggregate> fmt::Debug for Typed<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Typed").field(&A::TYPE).finish()
    }
}

impl<A: Aggregate> Typed<A> {
    /// Creates the adapter, reading the command names from the command enum.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotAnEnum`] if the command type is not an externally tagged enum.
    pub fn new() -> Result<Self, RegistryError> {
        Ok(Self {
            commands: variants::<A::Command>(A::TYPE, DataKind::Command)?,
            _aggregate: PhantomData,
        })
    }

    /// Reads a stored state; `Null` is the state of an aggregate that does not exist yet.
    ///
    /// # Panics
    ///
    /// If `state` is not the JSON of `A::State`; see [`Typed`] for why this panics.
    fn load(state: &Value) -> A::State {
        if state.is_null() {
            return A::State::default();
        }
        match serde_json::from_value(state.clone()) {
            Ok(state) => state,
            Err(error) => panic!("stored {} state does not deserialize: {error}", A::TYPE),
        }
    }

    /// Splits a typed event into its name and data (see [`Aggregate`]'s conventions).
    fn to_domain_event(event: &A::Event) -> DomainEvent {
        let value = serde_json::to_value(event)
            .unwrap_or_else(|error| panic!("{} event does not serialize: {error}", A::TYPE));
        match value {
            Value::Object(map) if map.len() == 1 => {
                let (name, data) = map.into_iter().next().expect("one entry");
                DomainEvent { name, data }
            }
            // A unit variant serializes as its bare name.
            Value::String(name) => DomainEvent {
                name,
                data: Value::Null,
            },
            other => panic!(
                "{} event is not an externally tagged enum variant: {other}",
                A::TYPE
            ),
        }
    }

    /// Rebuilds a typed event from its name and data.
    ///
    /// # Panics
    ///
    /// If the event was not produced by this aggregate's handler (see [`Typed`]).
    fn from_domain_event(event: &DomainEvent) -> A::Event {
        match serde_json::from_value(tagged(&event.name, &event.data)) {
            Ok(event) => event,
            Err(error) => panic!(
                "stored {}.{} event does not deserialize: {error}",
                A::TYPE,
                event.name
            ),
        }
    }
}

/// Builds serde's externally tagged form `{name: data}`.
fn tagged(name: &str, data: &Value) -> Value {
    let mut map = Map::with_capacity(1);
    map.insert(name.to_owned(), data.clone());
    Value::Object(map)
}

impl<A: Aggregate> DynAggregate for Typed<A> {
    fn aggregate_type(&self) -> &'static str {
        A::TYPE
    }

    /// # Panics
    ///
    /// If `state` is not a state this adapter produced (see [`Typed`]).
    fn handle(
        &self,
        state: &Value,
        command_name: &str,
        data: &Value,
        context: &Context<'_>,
    ) -> Handled {
        // Checked before deserializing so that an unknown name is reported as such, not as
        // serde's "unknown variant" inside `InvalidData`.
        if !self.commands.iter().any(|name| name == command_name) {
            return Handled::Invalid(CommandError::UnknownCommand(command_name.to_owned()));
        }
        let command: A::Command = match serde_json::from_value(tagged(command_name, data)) {
            Ok(command) => command,
            Err(error) => return Handled::Invalid(CommandError::InvalidData(error.to_string())),
        };
        let state = Self::load(state);
        match A::handle(&state, &command, context) {
            Ok(decision) => Handled::Accepted(decision.map(|event| Self::to_domain_event(&event))),
            Err(rejection) => Handled::Rejected(rejection),
        }
    }

    /// # Panics
    ///
    /// If `state` or an event was not produced by this adapter (see [`Typed`]).
    fn apply(&self, state: &Value, events: &[DomainEvent]) -> Value {
        self.apply_with_status(state, events).0
    }

    /// # Panics
    ///
    /// If `state` or an event was not produced by this adapter (see [`Typed`]).
    fn apply_with_status(&self, state: &Value, events: &[DomainEvent]) -> (Value, Option<String>) {
        let mut state = Self::load(state);
        for event in events {
            A::apply(&mut state, &Self::from_domain_event(event));
        }
        let status = A::status(&state);
        let json = serde_json::to_value(&state)
            .unwrap_or_else(|error| panic!("{} state does not serialize: {error}", A::TYPE));
        (json, status)
    }
}

/// The variant names of enum `T`, read from its `Deserialize` impl: serde's derive hands
/// the list to `deserialize_enum`, so the names are exactly the ones it accepts (renames
/// included), with no list kept by hand beside the enum.
fn variants<T: DeserializeOwned>(
    aggregate: &str,
    kind: DataKind,
) -> Result<Vec<String>, RegistryError> {
    match T::deserialize(VariantProbe) {
        Err(Probe::Variants(names)) => Ok(names.iter().map(|n| (*n).to_owned()).collect()),
        _ => Err(RegistryError::NotAnEnum {
            aggregate: aggregate.to_owned(),
            kind,
        }),
    }
}

/// A deserializer that only answers `deserialize_enum`, by failing with the variant names.
struct VariantProbe;

#[derive(Debug)]
enum Probe {
    Variants(&'static [&'static str]),
    Other,
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("variant probe")
    }
}

impl std::error::Error for Probe {}

impl de::Error for Probe {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Probe::Other
    }
}

impl<'de> de::Deserializer<'de> for VariantProbe {
    type Error = Probe;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Probe> {
        Err(Probe::Other)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        variants: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Probe> {
        Err(Probe::Variants(variants))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

/// One registered aggregate type.
#[derive(Debug)]
struct Entry {
    aggregate: Box<dyn DynAggregate>,
    commands: Vec<String>,
    events: Vec<String>,
}

/// The aggregate types a processor knows, by name, with their compiled schemas.
///
/// Build it with [`Registry::with`] (or [`Registry::register`], which returns the error
/// at once) and hand it to the engine, which calls [`Registry::check`] before it starts.
/// A `BTreeMap` keeps [`Registry::types`] in a stable order, so CLI listings do not depend
/// on hashing.
#[derive(Debug, Default)]
pub struct Registry {
    entries: BTreeMap<String, Entry>,
    schemas: SchemaSet,
    errors: Vec<RegistryError>,
}

impl Registry {
    /// An empty registry: it knows the envelopes and no aggregate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds aggregate `A` with its schemas. A broken contract is kept and reported by
    /// [`Registry::check`] (which the engine and `cli::main` call at start), so a chain of
    /// `with` calls reads like the list of aggregates it builds.
    pub fn with<A: Aggregate>(mut self, schemas: Schemas) -> Self {
        if let Err(error) = self.register::<A>(schemas) {
            self.errors.push(error);
        }
        self
    }

    /// Adds aggregate `A` with its schemas, checking the contract between them: a valid
    /// type, not registered before, command and event types that are externally tagged
    /// enums, a schema that compiles for every variant and no schema for a name the enums
    /// lack.
    ///
    /// # Errors
    ///
    /// The first broken rule, naming the aggregate and the command or event; the registry
    /// is left unchanged.
    pub fn register<A: Aggregate>(&mut self, schemas: Schemas) -> Result<&mut Self, RegistryError> {
        let aggregate = A::TYPE;
        let type_ok = aggregate.starts_with(|c: char| c.is_ascii_lowercase())
            && aggregate
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !type_ok {
            return Err(RegistryError::BadType {
                aggregate: aggregate.to_owned(),
            });
        }
        if self.entries.contains_key(aggregate) {
            return Err(RegistryError::DuplicateType {
                aggregate: aggregate.to_owned(),
            });
        }
        let adapter = Typed::<A>::new()?;
        let commands = adapter.commands.clone();
        let events = variants::<A::Event>(aggregate, DataKind::Event)?;
        let mut files = schemas.load()?;
        let mut validators = AggregateValidators::default();
        for (kind, names) in [(DataKind::Command, &commands), (DataKind::Event, &events)] {
            for name in names {
                let name_ok = name.starts_with(|c: char| c.is_ascii_uppercase())
                    && name.chars().all(|c| c.is_ascii_alphanumeric());
                if !name_ok {
                    return Err(RegistryError::BadName {
                        aggregate: aggregate.to_owned(),
                        kind,
                        name: name.clone(),
                    });
                }
                let Some((path, text)) = files.remove(&(kind, name.clone())) else {
                    return Err(RegistryError::MissingSchema {
                        aggregate: aggregate.to_owned(),
                        kind,
                        name: name.clone(),
                        expected: format!("{}/{}/{name}.json", schemas.origin, kind.folder()),
                    });
                };
                let validator = compile_data_schema(&text)
                    .map_err(|problem| RegistryError::SchemaFile { path, problem })?;
                validators.insert(kind, name.clone(), validator);
            }
        }
        if let Some(((kind, _), (path, _))) = files.into_iter().next() {
            let known = match kind {
                DataKind::Command => &commands,
                DataKind::Event => &events,
            };
            return Err(RegistryError::UnknownSchema {
                aggregate: aggregate.to_owned(),
                kind,
                path,
                known: known.join(", "),
            });
        }
        self.schemas.insert(aggregate, validators);
        self.entries.insert(
            aggregate.to_owned(),
            Entry {
                aggregate: Box::new(adapter),
                commands,
                events,
            },
        );
        Ok(self)
    }

    /// Every contract error found by [`Registry::with`], or `Ok` if the registry is sound.
    ///
    /// # Errors
    ///
    /// All the errors found, one per line when displayed.
    pub fn check(&self) -> Result<(), ContractErrors> {
        if !self.errors.is_empty() {
            return Err(ContractErrors(self.errors.clone()));
        }
        Ok(())
    }

    /// The aggregate for `aggregate_type` (e.g. `account`), if registered.
    pub fn get(&self, aggregate_type: &str) -> Option<&dyn DynAggregate> {
        self.entries
            .get(aggregate_type)
            .map(|entry| entry.aggregate.as_ref())
    }

    /// The registered aggregate types, in lexical order.
    pub fn types(&self) -> impl Iterator<Item = &str> + '_ {
        self.entries.keys().map(String::as_str)
    }

    /// The command names of `aggregate_type`, or `None` if it is not registered.
    pub fn command_names(&self, aggregate_type: &str) -> Option<&[String]> {
        self.entries
            .get(aggregate_type)
            .map(|entry| entry.commands.as_slice())
    }

    /// The event names of `aggregate_type`, or `None` if it is not registered.
    pub fn event_names(&self, aggregate_type: &str) -> Option<&[String]> {
        self.entries
            .get(aggregate_type)
            .map(|entry| entry.events.as_slice())
    }

    /// The compiled schemas: the envelopes and every registered command's and event's data.
    pub fn schemas(&self) -> &SchemaSet {
        &self.schemas
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::aggregate::{Decision, Rejection};

    struct Shelf;

    #[derive(Debug, Deserialize)]
    enum ShelfCommand {
        Stock { qty: u32 },
        Clear {},
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    enum ShelfEvent {
        Stocked { qty: u32 },
    }

    impl Aggregate for Shelf {
        const TYPE: &'static str = "shelf";
        type State = u32;
        type Command = ShelfCommand;
        type Event = ShelfEvent;
        fn handle(
            _: &u32,
            command: &ShelfCommand,
            _: &Context<'_>,
        ) -> Result<Decision<ShelfEvent>, Rejection> {
            match command {
                ShelfCommand::Stock { qty } => {
                    Ok(Decision::event(ShelfEvent::Stocked { qty: *qty }))
                }
                ShelfCommand::Clear {} => Err(Rejection::new("not_supported", "cannot clear")),
            }
        }
        fn apply(state: &mut u32, ShelfEvent::Stocked { qty }: &ShelfEvent) {
            *state += qty;
        }
    }

    /// An aggregate whose commands are not an enum.
    struct Flat;

    #[derive(Debug, Deserialize)]
    struct FlatCommand {
        #[allow(dead_code)]
        qty: u32,
    }

    impl Aggregate for Flat {
        const TYPE: &'static str = "flat";
        type State = u32;
        type Command = FlatCommand;
        type Event = ShelfEvent;
        fn handle(
            _: &u32,
            _: &FlatCommand,
            _: &Context<'_>,
        ) -> Result<Decision<ShelfEvent>, Rejection> {
            Ok(Decision::new())
        }
        fn apply(_: &mut u32, _: &ShelfEvent) {}
    }

    const OBJECT: &str = r#"{"type": "object"}"#;

    fn all_files() -> Vec<(&'static str, &'static str)> {
        vec![
            ("commands/Stock.json", OBJECT),
            ("commands/Clear.json", OBJECT),
            ("events/Stocked.json", OBJECT),
        ]
    }

    fn errors(registry: &Registry) -> Vec<String> {
        match registry.check() {
            Ok(()) => Vec::new(),
            Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn a_sound_registry_reads_names_from_the_enums() {
        let registry = Registry::new().with::<Shelf>(Schemas::embedded("shelf", &all_files()));
        assert_eq!(errors(&registry), Vec::<String>::new());
        assert_eq!(
            registry.command_names("shelf").expect("registered"),
            ["Stock", "Clear"]
        );
        assert_eq!(
            registry.event_names("shelf").expect("registered"),
            ["Stocked"]
        );
        assert!(registry
            .schemas()
            .has_data_schema(DataKind::Command, "shelf", "Clear"));
    }

    #[test]
    fn a_missing_schema_names_the_aggregate_and_the_command() {
        let files: Vec<_> = all_files()
            .into_iter()
            .filter(|(path, _)| *path != "commands/Clear.json")
            .collect();
        let registry = Registry::new().with::<Shelf>(Schemas::embedded("schemas/shelf", &files));
        assert_eq!(
            errors(&registry),
            ["aggregate `shelf`: command `Clear` has no schema (expected schemas/shelf/commands/Clear.json)"]
        );
        assert!(
            registry.get("shelf").is_none(),
            "a broken aggregate is not registered"
        );
    }

    #[test]
    fn registering_a_type_twice_is_refused() {
        let registry = Registry::new()
            .with::<Shelf>(Schemas::embedded("shelf", &all_files()))
            .with::<Shelf>(Schemas::embedded("shelf", &all_files()));
        assert_eq!(errors(&registry), ["aggregate `shelf` is registered twice"]);
    }

    #[test]
    fn a_schema_for_a_name_the_enum_lacks_is_refused() {
        let mut files = all_files();
        files.push(("events/Cleared.json", OBJECT));
        let registry = Registry::new().with::<Shelf>(Schemas::embedded("shelf", &files));
        assert_eq!(
            errors(&registry),
            ["aggregate `shelf`: schema shelf/events/Cleared.json names no event of the aggregate (its events: Stocked)"]
        );
    }

    #[test]
    fn commands_that_are_not_an_enum_are_refused() {
        let registry = Registry::new().with::<Flat>(Schemas::embedded("flat", &[]));
        let errors = errors(&registry);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].starts_with("aggregate `flat`: its command type must be an enum"),
            "{errors:?}"
        );
    }

    #[test]
    fn a_schema_that_is_not_json_names_its_file() {
        let mut files = all_files();
        files[0] = ("commands/Stock.json", "{not json");
        let registry = Registry::new().with::<Shelf>(Schemas::embedded("shelf", &files));
        let errors = errors(&registry);
        assert!(
            errors[0].starts_with("schema shelf/commands/Stock.json: not JSON"),
            "{errors:?}"
        );
    }

    #[test]
    fn schemas_are_read_from_a_directory() {
        let dir = std::env::temp_dir().join(format!("cmdproc-registry-{}", std::process::id()));
        for (path, text) in all_files() {
            let file = dir.join(path);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
            std::fs::write(file, text).expect("write");
        }
        let registry = Registry::new().with::<Shelf>(Schemas::dir(&dir));
        assert_eq!(errors(&registry), Vec::<String>::new());
        std::fs::remove_file(dir.join("events/Stocked.json")).expect("remove");
        let registry = Registry::new().with::<Shelf>(Schemas::dir(&dir));
        assert_eq!(
            errors(&registry),
            [format!(
                "aggregate `shelf`: event `Stocked` has no schema (expected {}/events/Stocked.json)",
                dir.display()
            )]
        );
        let missing = Registry::new().with::<Shelf>(Schemas::dir(dir.join("nope")));
        assert!(errors(&missing)[0].ends_with("nope is not a directory"));
        let relative = Registry::new().with::<Shelf>(Schemas::dir("no/such/schemas"));
        let message = &errors(&relative)[0];
        assert!(
            message.starts_with("schema directory no/such/schemas is not a directory (looked up from the working directory /"),
            "{message}"
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
