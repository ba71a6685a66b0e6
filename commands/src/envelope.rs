//! CloudEvents 1.0 envelopes for commands (in) and events (out).
//!
//! Commands arrive in structured mode (`application/cloudevents+json`, the whole envelope
//! in the value) or binary mode (`ce_*` headers, the data alone in the value). Events are
//! always written in structured mode.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::ids::{AggregateId, CommandId, CommandType, IdError, Source, Topic};
use crate::schema::{SchemaError, SchemaSet};

/// The content type of a structured-mode CloudEvent.
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";

/// Namespace of the UUIDv5 event ids, fixed forever so re-derived events keep their ids.
pub const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6d3c_2f1e_8a4b_4c59_9b0e_5f7a_1d2c_3e4f);

/// Namespace of the UUIDv5 payload digests (see [`payload_digest`]), fixed forever: digests
/// are stored with recorded outcomes and compared with those of later deliveries.
pub const PAYLOAD_DIGEST_NAMESPACE: Uuid =
    Uuid::from_u128(0x184c_3c4b_49b6_47ee_b3eb_2bd6_7511_426c);

/// Why a message became a dead letter. The string forms are the wire contract (the
/// `cmdproc-error-kind` header and the `dead_letters.kind` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterKind {
    /// Not a CloudEvent at all: empty, not UTF-8, not JSON, not an object, bad headers.
    Malformed,
    /// A CloudEvent whose envelope or data violates `schemas/`.
    Schema,
    /// A well-formed command whose aggregate type or command name is not known.
    UnknownType,
    /// The Kafka key is missing or differs from the command's `subject`.
    KeyMismatch,
    /// The command sits on a partition other than the one its key maps to.
    Misrouted,
    /// The message is larger than the configured limit.
    TooLarge,
    /// The handler panicked on this command.
    HandlerPanic,
    /// Set aside because an earlier command of the same aggregate parked it.
    Parked,
}

impl DeadLetterKind {
    /// Every kind, for listings and metrics.
    pub const ALL: [DeadLetterKind; 8] = [
        Self::Malformed,
        Self::Schema,
        Self::UnknownType,
        Self::KeyMismatch,
        Self::Misrouted,
        Self::TooLarge,
        Self::HandlerPanic,
        Self::Parked,
    ];

    /// The wire name, e.g. `unknown_type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Schema => "schema",
            Self::UnknownType => "unknown_type",
            Self::KeyMismatch => "key_mismatch",
            Self::Misrouted => "misrouted",
            Self::TooLarge => "too_large",
            Self::HandlerPanic => "handler_panic",
            Self::Parked => "parked",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for DeadLetterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message that cannot be a command, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct DecodeError {
    /// The dead-letter kind.
    pub kind: DeadLetterKind,
    /// What is wrong, for a human.
    pub message: String,
    /// The aggregate the message named, when it got that far: `(type, id)`.
    pub aggregate: Option<(String, String)>,
}

impl DecodeError {
    fn new(kind: DeadLetterKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            aggregate: None,
        }
    }
}

/// A decoded, validated command.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The command's `id`.
    pub id: CommandId,
    /// The command's `source`.
    pub source: Source,
    /// `<aggregate_type>.<CommandName>`.
    pub command_type: CommandType,
    /// The aggregate id (`subject`), equal to the Kafka key.
    pub subject: AggregateId,
    /// The command's payload.
    pub data: Value,
    /// Reject unless the aggregate is at this version.
    pub expected_version: Option<u64>,
    /// Carried onto the resulting events.
    pub correlation_id: Option<String>,
    /// When the sender issued the command; the only clock a handler sees.
    pub time: Option<DateTime<Utc>>,
    /// The `replyto` extension: the topic that gets a [`crate::reply::Reply`] for every
    /// delivery of the command.
    pub reply_to: Option<Topic>,
    /// The `outcometo` extension (`<aggregate type>/<aggregate id>`): the aggregate that
    /// emitted the command and gets its outcome as its `Outcome` command.
    pub outcome_to: Option<OutcomeTo>,
}

/// The aggregate an emitted command's outcome goes back to (the `outcometo` extension,
/// `<aggregate type>/<aggregate id>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeTo {
    /// The emitter's aggregate type.
    pub aggregate_type: String,
    /// The emitter's aggregate id.
    pub aggregate_id: String,
}

impl OutcomeTo {
    /// Reads `<aggregate type>/<aggregate id>`.
    pub fn parse(s: &str) -> Option<Self> {
        let (t, id) = s.split_once('/')?;
        let type_ok = t.starts_with(|c: char| c.is_ascii_lowercase())
            && t.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        (type_ok && !id.is_empty() && !id.contains('\0')).then(|| Self {
            aggregate_type: t.to_owned(),
            aggregate_id: id.to_owned(),
        })
    }
}

impl std::fmt::Display for OutcomeTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.aggregate_type, self.aggregate_id)
    }
}

impl Command {
    /// Builds a command from checked parts.
    pub fn new(
        source: Source,
        id: CommandId,
        command_type: CommandType,
        subject: AggregateId,
        data: Value,
    ) -> Self {
        Self {
            id,
            source,
            command_type,
            subject,
            data,
            expected_version: None,
            correlation_id: None,
            time: None,
            reply_to: None,
            outcome_to: None,
        }
    }

    /// The same command, asking for its outcome on `topic`.
    pub fn with_reply_to(mut self, topic: Topic) -> Self {
        self.reply_to = Some(topic);
        self
    }

    /// The structured-mode CloudEvent.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("specversion".into(), "1.0".into());
        m.insert("id".into(), self.id.as_str().into());
        m.insert("source".into(), self.source.as_str().into());
        m.insert("type".into(), self.command_type.as_str().into());
        m.insert("subject".into(), self.subject.as_str().into());
        m.insert("datacontenttype".into(), "application/json".into());
        if let Some(v) = self.expected_version {
            m.insert("expectedversion".into(), v.into());
        }
        if let Some(c) = &self.correlation_id {
            m.insert("correlationid".into(), c.as_str().into());
        }
        if let Some(t) = self.time {
            m.insert(
                "time".into(),
                t.to_rfc3339_opts(SecondsFormat::AutoSi, true).into(),
            );
        }
        if let Some(r) = &self.reply_to {
            m.insert("replyto".into(), r.as_str().into());
        }
        if let Some(o) = &self.outcome_to {
            m.insert("outcometo".into(), o.to_string().into());
        }
        m.insert("data".into(), self.data.clone());
        Value::Object(m)
    }

    /// The structured-mode CloudEvent as bytes, ready to produce.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&self.to_json()).expect("a JSON value always serializes")
    }

    /// Parses and validates a structured-mode CloudEvent from JSON, without a Kafka key
    /// (the producer's path: the key is derived from `subject`).
    pub fn from_json(value: Value, schemas: &SchemaSet) -> Result<Self, DecodeError> {
        Self::from_envelope(value, schemas)
    }

    /// Decodes a Kafka message into a command: binary mode when a `ce_specversion` header
    /// is present, structured mode otherwise. Checks the envelope and data against the
    /// schemas and the key against `subject`.
    pub fn decode(
        key: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
        value: Option<&[u8]>,
        schemas: &SchemaSet,
    ) -> Result<Self, DecodeError> {
        let binary = headers.iter().any(|(k, _)| *k == "ce_specversion");
        let envelope = if binary {
            binary_envelope(headers, value)?
        } else {
            let value = value.filter(|v| !v.is_empty()).ok_or_else(|| {
                DecodeError::new(DeadLetterKind::Malformed, "empty message value")
            })?;
            serde_json::from_slice::<Value>(value).map_err(|e| {
                DecodeError::new(
                    DeadLetterKind::Malformed,
                    format!("value is not valid JSON: {e}"),
                )
            })?
        };
        let command = Self::from_envelope(envelope, schemas)?;
        let aggregate = Some((
            command.command_type.aggregate_type().to_owned(),
            command.subject.as_str().to_owned(),
        ));
        match key {
            Some(k) if k == command.subject.as_str().as_bytes() => Ok(command),
            Some(k) => Err(DecodeError {
                kind: DeadLetterKind::KeyMismatch,
                message: format!(
                    "message key `{}` differs from subject `{}`",
                    preview(k, 80),
                    command.subject
                ),
                aggregate,
            }),
            None => Err(DecodeError {
                kind: DeadLetterKind::KeyMismatch,
                message: format!(
                    "message has no key; it must equal subject `{}`",
                    command.subject
                ),
                aggregate,
            }),
        }
    }

    fn from_envelope(envelope: Value, schemas: &SchemaSet) -> Result<Self, DecodeError> {
        let Value::Object(mut m) = envelope else {
            return Err(DecodeError::new(
                DeadLetterKind::Malformed,
                "value is JSON but not an object; expected a CloudEvent",
            ));
        };
        if !m.contains_key("specversion") && !m.contains_key("type") {
            return Err(DecodeError::new(
                DeadLetterKind::Malformed,
                "JSON object is not a CloudEvent (no specversion, no type)",
            ));
        }
        let as_value = Value::Object(m);
        schemas
            .validate_command_envelope(&as_value)
            .map_err(|e| DecodeError::new(DeadLetterKind::Schema, format!("envelope: {e}")))?;
        let Value::Object(m2) = as_value else {
            unreachable!("checked above")
        };
        m = m2;
        let schema_err = |e: IdError| DecodeError::new(DeadLetterKind::Schema, e.to_string());
        let text =
            |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
        let command_type =
            CommandType::parse(text(&m, "type").unwrap_or_default()).map_err(schema_err)?;
        let subject =
            AggregateId::parse(text(&m, "subject").unwrap_or_default()).map_err(schema_err)?;
        let id = CommandId::parse(text(&m, "id").unwrap_or_default()).map_err(schema_err)?;
        let source = Source::parse(text(&m, "source").unwrap_or_default()).map_err(schema_err)?;
        let aggregate = Some((
            command_type.aggregate_type().to_owned(),
            subject.as_str().to_owned(),
        ));
        let with_aggregate = |kind, message: String| DecodeError {
            kind,
            message,
            aggregate: aggregate.clone(),
        };
        let expected_version = match m.get("expectedversion") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                with_aggregate(
                    DeadLetterKind::Schema,
                    "expectedversion must be a non-negative integer".into(),
                )
            })?),
        };
        let time = match text(&m, "time") {
            None => None,
            Some(t) => Some(
                DateTime::parse_from_rfc3339(&t)
                    .map_err(|e| {
                        with_aggregate(
                            DeadLetterKind::Schema,
                            format!("time `{t}` is not RFC 3339: {e}"),
                        )
                    })?
                    .with_timezone(&Utc),
            ),
        };
        let correlation_id = text(&m, "correlationid");
        let reply_to = match text(&m, "replyto") {
            None => None,
            Some(t) => Some(
                Topic::parse(t)
                    .map_err(|e| with_aggregate(DeadLetterKind::Schema, format!("replyto: {e}")))?,
            ),
        };
        let outcome_to = match text(&m, "outcometo") {
            None => None,
            Some(o) => Some(OutcomeTo::parse(&o).ok_or_else(|| {
                with_aggregate(
                    DeadLetterKind::Schema,
                    format!(
                        "outcometo `{}` is not `<aggregate type>/<aggregate id>`",
                        preview(o.as_bytes(), 80)
                    ),
                )
            })?),
        };
        let data = m.remove("data").unwrap_or(Value::Null);
        // Postgres stores neither `text` nor `jsonb` with U+0000, so a command carrying it
        // could never be recorded; it is refused here rather than retried forever.
        if let Some(path) = nul_path(&data, "data").or_else(|| {
            correlation_id
                .as_deref()
                .filter(|c| c.contains('\0'))
                .map(|_| "correlationid".to_owned())
        }) {
            return Err(with_aggregate(
                DeadLetterKind::Schema,
                format!("{path} contains the NUL character (U+0000), which cannot be stored"),
            ));
        }
        schemas
            .validate_command_data(command_type.aggregate_type(), command_type.name(), &data)
            .map_err(|e| match e {
                SchemaError::UnknownType(_) => with_aggregate(
                    DeadLetterKind::UnknownType,
                    format!("unknown command type `{command_type}`"),
                ),
                other => with_aggregate(
                    DeadLetterKind::Schema,
                    format!("data of {command_type}: {other}"),
                ),
            })?;
        Ok(Self {
            id,
            source,
            command_type,
            subject,
            data,
            expected_version,
            correlation_id,
            time,
            reply_to,
            outcome_to,
        })
    }
}

/// Where the answers to a message go, read leniently from its envelope when it did not
/// decode: its `replyto` topic and `outcometo` aggregate, with the command's key, type and
/// subject (a dead letter still answers its caller when it named where, and its
/// idempotency key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyAddress {
    /// The reply topic (`replyto`).
    pub topic: Option<Topic>,
    /// The aggregate that gets the outcome as a command (`outcometo`).
    pub outcome_to: Option<OutcomeTo>,
    /// The command's `source`.
    pub source: String,
    /// The command's `id`.
    pub id: String,
    /// The command's `type` (empty when unreadable).
    pub command_type: String,
    /// The command's `subject` (empty when unreadable).
    pub subject: String,
    /// The command's `correlationid`, if any.
    pub correlation_id: Option<String>,
}

impl ReplyAddress {
    /// Where a decoded command's answers go, if it asked for any.
    pub fn of(command: &Command) -> Option<Self> {
        if command.reply_to.is_none() && command.outcome_to.is_none() {
            return None;
        }
        Some(Self {
            topic: command.reply_to.clone(),
            outcome_to: command.outcome_to.clone(),
            source: command.source.to_string(),
            id: command.id.to_string(),
            command_type: command.command_type.to_string(),
            subject: command.subject.to_string(),
            correlation_id: command.correlation_id.clone(),
        })
    }

    /// Where a raw message's answers go (structured or binary mode), whatever else is wrong
    /// with it; `None` unless `source` and `id` are valid and `replyto` or `outcometo` is.
    pub fn read(headers: &[(&str, Option<&[u8]>)], value: Option<&[u8]>) -> Option<Self> {
        let binary = headers.iter().any(|(k, _)| *k == "ce_specversion");
        let structured: Option<Value> = if binary {
            None
        } else {
            Some(serde_json::from_slice(value?).ok()?)
        };
        let attr = |name: &str| -> Option<String> {
            match &structured {
                Some(v) => v.get(name).and_then(Value::as_str).map(str::to_owned),
                None => {
                    let header = format!("ce_{name}");
                    let (_, v) = headers.iter().find(|(k, _)| *k == header)?;
                    std::str::from_utf8((*v)?).ok().map(str::to_owned)
                }
            }
        };
        let topic = attr("replyto").and_then(|t| Topic::parse(t).ok());
        let outcome_to = attr("outcometo").and_then(|o| OutcomeTo::parse(&o));
        if topic.is_none() && outcome_to.is_none() {
            return None;
        }
        let source = Source::parse(attr("source")?).ok()?.to_string();
        let id = CommandId::parse(attr("id")?).ok()?.to_string();
        let clean = |s: Option<String>| s.filter(|s| !s.contains('\0'));
        Some(Self {
            topic,
            outcome_to,
            source,
            id,
            command_type: clean(attr("type")).unwrap_or_default(),
            subject: clean(attr("subject")).unwrap_or_default(),
            correlation_id: clean(attr("correlationid")),
        })
    }
}

fn binary_envelope(
    headers: &[(&str, Option<&[u8]>)],
    value: Option<&[u8]>,
) -> Result<Value, DecodeError> {
    let mut m = Map::new();
    for (k, v) in headers {
        let Some(attr) = k.strip_prefix("ce_") else {
            continue;
        };
        let v = v.unwrap_or_default();
        let s = std::str::from_utf8(v).map_err(|_| {
            DecodeError::new(
                DeadLetterKind::Malformed,
                format!("header `{k}` is not UTF-8"),
            )
        })?;
        let v = if attr == "expectedversion" {
            s.parse::<u64>().map(Value::from).map_err(|_| {
                DecodeError::new(
                    DeadLetterKind::Schema,
                    format!("header `{k}` is not a non-negative integer"),
                )
            })?
        } else {
            Value::String(s.to_owned())
        };
        m.insert(attr.to_owned(), v);
    }
    let data = match value {
        None | Some([]) => Value::Null,
        Some(bytes) => serde_json::from_slice(bytes).map_err(|e| {
            DecodeError::new(
                DeadLetterKind::Malformed,
                format!("binary-mode data is not valid JSON: {e}"),
            )
        })?,
    };
    m.insert("data".into(), data);
    Ok(Value::Object(m))
}

/// The path of the first string (or object key) in `v` holding U+0000, if any.
fn nul_path(v: &Value, at: &str) -> Option<String> {
    match v {
        Value::String(s) if s.contains('\0') => Some(at.to_owned()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, x)| nul_path(x, &format!("{at}/{i}"))),
        Value::Object(m) => m.iter().find_map(|(k, x)| {
            if k.contains('\0') {
                Some(format!("{at}/<key>"))
            } else {
                nul_path(x, &format!("{at}/{k}"))
            }
        }),
        _ => None,
    }
}

/// A printable preview of possibly binary bytes, at most `max` characters.
pub fn preview(bytes: &[u8], max: usize) -> String {
    let s = String::from_utf8_lossy(bytes);
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_control() { '.' } else { c })
        .collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

/// The deterministic id of the `index`th event of a command: UUIDv5 of its identity.
pub fn event_id(source: &Source, command_id: &CommandId, index: usize) -> Uuid {
    let name = format!("{}\u{0}{}\u{0}{}", source, command_id, index);
    Uuid::new_v5(&EVENT_ID_NAMESPACE, name.as_bytes())
}

/// The digest of what a command asks for: UUIDv5 of its type, subject and data
/// (`type \0 subject \0 data`, the data as compact JSON with object keys sorted).
///
/// Stored with a command's recorded outcome, it tells a re-delivery of the command (same
/// digest: a duplicate) from another command that reuses its idempotency key `(source, id)`
/// (another digest: refused as `key_reused`). The envelope's other attributes (`time`,
/// `expectedversion`, `correlationid`) are not part of it: a client retrying later with a
/// new timestamp sends the same command.
///
/// Keys are sorted here rather than by relying on serde_json's default map, so the digest
/// does not change when some dependency turns on serde_json's `preserve_order` feature.
pub fn payload_digest(command: &Command) -> Uuid {
    let mut name = Vec::with_capacity(128);
    name.extend_from_slice(command.command_type.as_str().as_bytes());
    name.push(0);
    name.extend_from_slice(command.subject.as_str().as_bytes());
    name.push(0);
    canonical_json(&command.data, &mut name);
    Uuid::new_v5(&PAYLOAD_DIGEST_NAMESPACE, &name)
}

/// Appends `value` as compact JSON with every object's keys in sorted order: what
/// `serde_json::to_string` writes with its default (sorted) map. Written straight into
/// `out`, without a string per key or value: every command of a batch (and of a replay) has
/// its digest computed.
fn canonical_json(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_json(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            out.push(b'{');
            // The default map iterates in key order already; sort only a map that does not.
            let in_order = map.keys().zip(map.keys().skip(1)).all(|(a, b)| a < b);
            let mut write = |i: usize, key: &String, item: &Value| {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(key, out);
                out.push(b':');
                canonical_json(item, out);
            };
            if in_order {
                for (i, (key, item)) in map.iter().enumerate() {
                    write(i, key, item);
                }
            } else {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
                for (i, (key, item)) in entries.into_iter().enumerate() {
                    write(i, key, item);
                }
            }
            out.push(b'}');
        }
        // Strings, numbers, booleans and null have one compact form.
        scalar => write_scalar(scalar, out),
    }
}

/// Appends the compact JSON of a string or scalar.
fn write_scalar<T: serde::Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    // Writing JSON of a string or scalar into memory cannot fail.
    serde_json::to_writer(&mut *out, value).expect("JSON of a scalar writes into memory");
}

/// An event as published on the events topic.
#[derive(Debug, Clone, PartialEq)]
pub struct EventEnvelope {
    /// Deterministic id, see [`event_id`].
    pub id: Uuid,
    /// `<aggregate_type>.<EventName>`.
    pub event_type: String,
    /// The aggregate type, for the event's `source`.
    pub aggregate_type: String,
    /// The aggregate id.
    pub subject: String,
    /// The aggregate's version after this event.
    pub aggregate_version: u64,
    /// The command's source and id.
    pub command_source: String,
    /// The command's id.
    pub command_id: String,
    /// Carried from the command.
    pub correlation_id: Option<String>,
    /// Carried from the command.
    pub time: Option<DateTime<Utc>>,
    /// The outbox sequence number within the commands partition.
    pub sequence: u64,
    /// The event's payload.
    pub data: Value,
}

impl EventEnvelope {
    /// The structured-mode CloudEvent.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("specversion".into(), "1.0".into());
        m.insert("id".into(), self.id.to_string().into());
        m.insert(
            "source".into(),
            format!("/cmdproc/{}", self.aggregate_type).into(),
        );
        m.insert("type".into(), self.event_type.as_str().into());
        m.insert("subject".into(), self.subject.as_str().into());
        m.insert("datacontenttype".into(), "application/json".into());
        if let Some(t) = self.time {
            m.insert(
                "time".into(),
                t.to_rfc3339_opts(SecondsFormat::AutoSi, true).into(),
            );
        }
        m.insert("aggregateversion".into(), self.aggregate_version.into());
        m.insert("commandsource".into(), self.command_source.as_str().into());
        m.insert("commandid".into(), self.command_id.as_str().into());
        if let Some(c) = &self.correlation_id {
            m.insert("correlationid".into(), c.as_str().into());
        }
        m.insert("sequence".into(), self.sequence.into());
        m.insert("data".into(), self.data.clone());
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A minimal `account` (Open, Deposit with a positive amount) and `room` (Book), enough
    /// for decoding; the example domains' own schemas are tested in their crate.
    fn schemas() -> &'static SchemaSet {
        use crate::aggregate::{Aggregate, Context, Decision, Rejection};
        use std::sync::OnceLock;

        #[derive(Debug, serde::Deserialize, serde::Serialize, Clone)]
        enum AccountCommand {
            Open { owner: String },
            Deposit { amount: i64 },
        }
        #[derive(Debug, serde::Deserialize, serde::Serialize, Clone)]
        enum RoomCommand {
            Book { night: String, guest: String },
        }
        struct Account;
        struct Room;
        impl Aggregate for Account {
            const TYPE: &'static str = "account";
            type State = ();
            type Command = AccountCommand;
            type Event = AccountCommand;
            fn handle(
                _: &(),
                _: &AccountCommand,
                _: &Context<'_>,
            ) -> Result<Decision<AccountCommand>, Rejection> {
                Ok(Decision::new())
            }
            fn apply(_: &mut (), _: &AccountCommand) {}
        }
        impl Aggregate for Room {
            const TYPE: &'static str = "room";
            type State = ();
            type Command = RoomCommand;
            type Event = RoomCommand;
            fn handle(
                _: &(),
                _: &RoomCommand,
                _: &Context<'_>,
            ) -> Result<Decision<RoomCommand>, Rejection> {
                Ok(Decision::new())
            }
            fn apply(_: &mut (), _: &RoomCommand) {}
        }
        static REGISTRY: OnceLock<crate::Registry> = OnceLock::new();
        REGISTRY
            .get_or_init(|| {
                let open = r#"{"type":"object","properties":{"owner":{"type":"string"}}}"#;
                let deposit = r#"{"type":"object","required":["amount"],
                    "properties":{"amount":{"type":"integer","minimum":1}}}"#;
                let book = r#"{"type":"object"}"#;
                let registry = crate::Registry::new()
                    .with::<Account>(crate::Schemas::embedded(
                        "account",
                        &[
                            ("commands/Open.json", open),
                            ("commands/Deposit.json", deposit),
                            ("events/Open.json", open),
                            ("events/Deposit.json", deposit),
                        ],
                    ))
                    .with::<Room>(crate::Schemas::embedded(
                        "room",
                        &[("commands/Book.json", book), ("events/Book.json", book)],
                    ));
                registry.check().expect("test contract");
                registry
            })
            .schemas()
    }

    fn deposit() -> Value {
        json!({"specversion":"1.0","id":"c-1","source":"/test","type":"account.Deposit",
               "subject":"acc-1","data":{"amount":5},"correlationid":"k-9",
               "time":"2026-11-26T10:00:00Z","expectedversion":3})
    }

    #[test]
    fn structured_round_trip() {
        let bytes = serde_json::to_vec(&deposit()).unwrap();
        let c = Command::decode(Some(b"acc-1"), &[], Some(&bytes), schemas()).unwrap();
        assert_eq!(c.command_type.as_str(), "account.Deposit");
        assert_eq!(c.expected_version, Some(3));
        assert_eq!(c.correlation_id.as_deref(), Some("k-9"));
        let again = Command::decode(Some(b"acc-1"), &[], Some(&c.encode()), schemas()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn binary_mode_is_accepted() {
        let headers: Vec<(&str, Option<&[u8]>)> = vec![
            ("ce_specversion", Some(b"1.0")),
            ("ce_id", Some(b"c-2")),
            ("ce_source", Some(b"/test")),
            ("ce_type", Some(b"room.Book")),
            ("ce_subject", Some(b"room-1")),
            ("content-type", Some(b"application/json")),
        ];
        let c = Command::decode(
            Some(b"room-1"),
            &headers,
            Some(br#"{"night":"2026-12-24","guest":"ada"}"#),
            schemas(),
        )
        .unwrap();
        assert_eq!(c.command_type.name(), "Book");
    }

    #[test]
    fn each_bad_input_gets_its_kind() {
        let kind = |key: Option<&[u8]>, v: &[u8]| {
            Command::decode(key, &[], Some(v), schemas())
                .unwrap_err()
                .kind
        };
        assert_eq!(
            kind(Some(b"acc-1"), b"{not json"),
            DeadLetterKind::Malformed
        );
        assert_eq!(kind(Some(b"acc-1"), b"\xff\xfe"), DeadLetterKind::Malformed);
        assert_eq!(kind(Some(b"acc-1"), b"[1,2]"), DeadLetterKind::Malformed);
        let mut v = deposit();
        v["type"] = "account.Teleport".into();
        assert_eq!(
            kind(Some(b"acc-1"), &serde_json::to_vec(&v).unwrap()),
            DeadLetterKind::UnknownType
        );
        let mut v = deposit();
        v["data"]["amount"] = (-5).into();
        assert_eq!(
            kind(Some(b"acc-1"), &serde_json::to_vec(&v).unwrap()),
            DeadLetterKind::Schema
        );
        let bytes = serde_json::to_vec(&deposit()).unwrap();
        assert_eq!(kind(Some(b"acc-2"), &bytes), DeadLetterKind::KeyMismatch);
        assert_eq!(kind(None, &bytes), DeadLetterKind::KeyMismatch);
        let mut v = deposit();
        v["type"] = "account.Open".into();
        v["data"] = json!({"owner": "a\u{0}b"});
        assert_eq!(
            kind(Some(b"acc-1"), &serde_json::to_vec(&v).unwrap()),
            DeadLetterKind::Schema
        );
        let nested = "[".repeat(10_000);
        assert_eq!(
            kind(Some(b"acc-1"), nested.as_bytes()),
            DeadLetterKind::Malformed
        );
    }

    #[test]
    fn event_ids_are_deterministic_and_distinct() {
        let s = Source::parse("/a").unwrap();
        let c = CommandId::parse("1").unwrap();
        assert_eq!(event_id(&s, &c, 0), event_id(&s, &c, 0));
        assert_ne!(event_id(&s, &c, 0), event_id(&s, &c, 1));
        assert_ne!(
            event_id(&s, &c, 0),
            event_id(&Source::parse("/b").unwrap(), &c, 0)
        );
    }

    fn command(ty: &str, subject: &str, data: Value) -> Command {
        Command::new(
            Source::parse("/a").unwrap(),
            CommandId::parse("1").unwrap(),
            CommandType::parse(ty).unwrap(),
            AggregateId::parse(subject).unwrap(),
            data,
        )
    }

    #[test]
    fn payload_digests_name_type_subject_and_data() {
        let deposit = command("account.Deposit", "acc-1", json!({"amount": 500}));
        let expected = Uuid::new_v5(
            &PAYLOAD_DIGEST_NAMESPACE,
            b"account.Deposit\0acc-1\0{\"amount\":500}",
        );
        assert_eq!(payload_digest(&deposit), expected);

        // What is not the payload does not count: the id, source, time, expected version.
        let mut retried = deposit.clone();
        retried.time = Some(Utc::now());
        retried.expected_version = Some(3);
        retried.source = Source::parse("/b").unwrap();
        assert_eq!(payload_digest(&retried), expected);

        for other in [
            command("account.Deposit", "acc-1", json!({"amount": 700})),
            command("account.Withdraw", "acc-1", json!({"amount": 500})),
            command("account.Deposit", "acc-2", json!({"amount": 500})),
            command("account.Deposit", "acc-1", json!({"amount": "500"})),
        ] {
            assert_ne!(payload_digest(&other), expected, "{other:?}");
        }
    }

    #[test]
    fn payload_digests_ignore_the_order_of_object_keys() {
        let sorted = command(
            "room.Book",
            "r",
            json!({"guest": "g", "night": "2026-12-24", "extra": {"b": [1, {"d": 1, "c": null}], "a": "\u{1}\""}}),
        );
        let text = r#"{"night":"2026-12-24","extra":{"a":"\u0001\"","b":[1,{"c":null,"d":1}]},"guest":"g"}"#;
        let reordered = command("room.Book", "r", serde_json::from_str(text).unwrap());
        assert_eq!(payload_digest(&sorted), payload_digest(&reordered));
        // With serde_json's default (sorted) map, the canonical form is its compact output.
        let mut canonical = Vec::new();
        canonical_json(&sorted.data, &mut canonical);
        assert_eq!(
            String::from_utf8(canonical).unwrap(),
            serde_json::to_string(&sorted.data).unwrap()
        );
    }
}
