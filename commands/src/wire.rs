//! The Kafka messages cmdproc publishes, as bytes: an event as a structured-mode
//! CloudEvent keyed by its aggregate id, a dead letter as the original message with headers
//! saying why it was set aside and where it came from.
//!
//! Pure formatting: the engine stores these messages in its outbox and its relay publishes
//! them as they are.

use crate::envelope::ReplyAddress;
use crate::envelope::{DeadLetterKind, EventEnvelope, CLOUDEVENTS_JSON};
use crate::reply::{Reply, ReplyOutcome};
use crate::workflow::{outcome_id, CommandOutcome, OutcomeOf, OUTCOME_COMMAND, OUTCOME_SOURCE};

/// A Kafka header: name and raw value.
pub type Header = (String, Option<Vec<u8>>);

/// The header naming the content type of an event's value.
pub const CONTENT_TYPE: &str = "content-type";
/// The header of a dead letter holding its [`DeadLetterKind`] (its wire name).
pub const ERROR_KIND: &str = "cmdproc-error-kind";
/// The header of a dead letter saying, for a human, what is wrong.
pub const ERROR_MESSAGE: &str = "cmdproc-error-message";
/// The header of a dead letter naming the commands topic it was consumed from.
pub const ORIGINAL_TOPIC: &str = "cmdproc-original-topic";
/// The header of a dead letter holding its commands partition, in decimal.
pub const ORIGINAL_PARTITION: &str = "cmdproc-original-partition";
/// The header of a dead letter holding its offset in the commands partition, in decimal.
pub const ORIGINAL_OFFSET: &str = "cmdproc-original-offset";

/// A message to publish, without its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Message value.
    pub payload: Option<Vec<u8>>,
    /// Message headers, in order.
    pub headers: Vec<Header>,
}

/// An event numbered `sequence` (its outbox sequence within the commands partition): the
/// structured-mode CloudEvent as the value, the aggregate id as the key, so an aggregate's
/// events keep their order on the events topic.
pub fn event_message(envelope: &EventEnvelope, sequence: u64) -> Message {
    let mut envelope = envelope.clone();
    envelope.sequence = sequence;
    Message {
        key: Some(envelope.subject.clone().into_bytes()),
        payload: Some(serde_json::to_vec(&envelope.to_json()).expect("JSON serializes")),
        headers: vec![(
            CONTENT_TYPE.into(),
            Some(CLOUDEVENTS_JSON.as_bytes().to_vec()),
        )],
    }
}

/// A reply to one delivery of a command, whose stable identity is `message_id`: the
/// structured-mode CloudEvent `cmdproc.reply`, keyed by the command's id (a waiter reads the
/// partition murmur2 gives that id).
pub fn reply_message(reply: &Reply, message_id: &str, correlation_id: Option<&str>) -> Message {
    Message {
        key: Some(reply.command.id.clone().into_bytes()),
        payload: Some(
            serde_json::to_vec(&reply.to_cloudevent(message_id, correlation_id))
                .expect("JSON serializes"),
        ),
        headers: vec![(
            CONTENT_TYPE.into(),
            Some(CLOUDEVENTS_JSON.as_bytes().to_vec()),
        )],
    }
}

/// A command cmdproc itself sends to the commands topic (emitted by a handler, or a
/// timer's): the structured CloudEvent `payload`, keyed by its subject.
pub fn command_message(subject: &str, payload: Vec<u8>) -> Message {
    Message {
        key: Some(subject.as_bytes().to_vec()),
        payload: Some(payload),
        headers: vec![(
            CONTENT_TYPE.into(),
            Some(CLOUDEVENTS_JSON.as_bytes().to_vec()),
        )],
    }
}

/// The `Outcome` command that tells the aggregate `to.outcome_to` what became of the
/// command it emitted (`to` names that command): id derived from the command's key, so a
/// repeated outcome is a duplicate; no `duplicate` flag, so its payload never differs.
///
/// # Panics
/// If `to.outcome_to` is `None`.
pub fn outcome_message(to: &ReplyAddress, outcome: &ReplyOutcome) -> Message {
    let emitter = to.outcome_to.as_ref().expect("an outcome address");
    let data = CommandOutcome {
        command: OutcomeOf {
            id: to.id.clone(),
            source: to.source.clone(),
            command_type: to.command_type.clone(),
            subject: to.subject.clone(),
        },
        outcome: outcome.clone(),
    };
    let mut ce = serde_json::json!({
        "specversion": "1.0",
        "id": outcome_id(&to.source, &to.id),
        "source": OUTCOME_SOURCE,
        "type": format!("{}.{OUTCOME_COMMAND}", emitter.aggregate_type),
        "subject": emitter.aggregate_id,
        "datacontenttype": "application/json",
        "data": data,
    });
    if let Some(c) = &to.correlation_id {
        ce["correlationid"] = c.as_str().into();
    }
    command_message(
        &emitter.aggregate_id,
        serde_json::to_vec(&ce).expect("JSON serializes"),
    )
}

/// Where a dead letter was consumed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin<'a> {
    /// The commands topic.
    pub topic: &'a str,
    /// Its partition.
    pub partition: i32,
    /// The message's offset there.
    pub offset: i64,
}

/// A dead letter: the original key, value and headers untouched, followed by the
/// `cmdproc-error-*` headers (why) and the `cmdproc-original-*` headers (where from).
pub fn dead_letter_message(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[Header],
    kind: DeadLetterKind,
    message: &str,
    origin: Origin<'_>,
) -> Message {
    let mut headers: Vec<Header> = headers.to_vec();
    let mut add = |k: &str, v: String| headers.push((k.to_owned(), Some(v.into_bytes())));
    add(ERROR_KIND, kind.as_str().to_owned());
    add(ERROR_MESSAGE, message.to_owned());
    add(ORIGINAL_TOPIC, origin.topic.to_owned());
    add(ORIGINAL_PARTITION, origin.partition.to_string());
    add(ORIGINAL_OFFSET, origin.offset.to_string());
    Message {
        key: key.map(<[u8]>::to_vec),
        payload: value.map(<[u8]>::to_vec),
        headers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use uuid::Uuid;

    fn envelope() -> EventEnvelope {
        EventEnvelope {
            id: Uuid::from_u128(7),
            event_type: "account.Deposited".into(),
            aggregate_type: "account".into(),
            subject: "acc-1".into(),
            aggregate_version: 3,
            command_source: "teller".into(),
            command_id: "c-1".into(),
            correlation_id: None,
            time: None,
            sequence: 0,
            data: json!({"amount": 5}),
        }
    }

    #[test]
    fn an_event_is_a_structured_cloudevent_keyed_by_its_aggregate() {
        let event = envelope();
        let message = event_message(&event, 42);
        assert_eq!(message.key.as_deref(), Some(&b"acc-1"[..]));
        assert_eq!(
            message.headers,
            vec![(
                "content-type".to_owned(),
                Some(b"application/cloudevents+json".to_vec())
            )]
        );
        let value: Value = serde_json::from_slice(message.payload.as_deref().unwrap()).unwrap();
        let mut numbered = event.clone();
        numbered.sequence = 42;
        assert_eq!(value, numbered.to_json());
        assert_eq!(value["sequence"], 42);
        assert_eq!(value["id"], Uuid::from_u128(7).to_string());
        // The envelope given is not changed.
        assert_eq!(event.sequence, 0);
    }

    #[test]
    fn a_dead_letter_keeps_the_original_and_says_why_and_where_from() {
        let original: Vec<Header> = vec![
            ("trace".into(), Some(vec![0, 159, 146, 150])),
            ("empty".into(), None),
        ];
        let message = dead_letter_message(
            Some(b"k"),
            Some(b"\xffnot json"),
            &original,
            DeadLetterKind::Malformed,
            "not UTF-8",
            Origin {
                topic: "bank.commands",
                partition: 3,
                offset: 17,
            },
        );
        assert_eq!(message.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(message.payload.as_deref(), Some(&b"\xffnot json"[..]));
        let text = |v: &str| Some(v.as_bytes().to_vec());
        assert_eq!(
            message.headers,
            vec![
                ("trace".to_owned(), Some(vec![0, 159, 146, 150])),
                ("empty".to_owned(), None),
                ("cmdproc-error-kind".to_owned(), text("malformed")),
                ("cmdproc-error-message".to_owned(), text("not UTF-8")),
                ("cmdproc-original-topic".to_owned(), text("bank.commands")),
                ("cmdproc-original-partition".to_owned(), text("3")),
                ("cmdproc-original-offset".to_owned(), text("17")),
            ]
        );
    }

    #[test]
    fn a_dead_letter_without_key_or_value_has_none() {
        let message = dead_letter_message(
            None,
            None,
            &[],
            DeadLetterKind::TooLarge,
            "too large",
            Origin {
                topic: "t",
                partition: 0,
                offset: 0,
            },
        );
        assert_eq!(message.key, None);
        assert_eq!(message.payload, None);
        assert_eq!(message.headers.len(), 5);
    }
}
