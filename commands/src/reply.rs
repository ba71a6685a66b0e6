//! Replies: how the caller of a command learns its outcome.
//!
//! A command with the extension `replyto` (a topic name) gets, for every delivery of it, one
//! reply on that topic: a structured-mode CloudEvent of type [`REPLY_TYPE`], keyed by the
//! command's id (so a waiter knows the partition: murmur2 of the id), whose `data` is a
//! [`Reply`]. A delivery of a command already processed gets the recorded outcome again,
//! with `duplicate: true`; a delivery reusing a processed command's key with another payload
//! gets `key_reused`.
//!
//! ```
//! use commands::reply::{Reply, ReplyCommand, ReplyOutcome};
//!
//! let reply = Reply {
//!     command: ReplyCommand { source: "/checkout".into(), id: "c-1".into() },
//!     outcome: ReplyOutcome::Rejected {
//!         code: Some("insufficient_funds".into()),
//!         reason: "balance 10 is below 50".into(),
//!     },
//!     duplicate: false,
//! };
//! let bytes = commands::wire::reply_message(&reply, "reply/commands/0/7", None).payload.unwrap();
//! assert_eq!(Reply::from_cloudevent(&bytes).unwrap(), reply);
//! ```

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

/// The CloudEvents `type` of a reply.
pub const REPLY_TYPE: &str = "cmdproc.reply";

/// The CloudEvents `source` of a reply.
pub const REPLY_SOURCE: &str = "cmdproc";

/// The namespace of reply ids (UUIDv5 over the reply's stable message identity).
pub const REPLY_NAMESPACE: Uuid = Uuid::from_bytes([
    0x5b, 0x1e, 0x0c, 0x3d, 0x9a, 0x47, 0x4e, 0x21, 0x8f, 0x6a, 0x2c, 0x90, 0x71, 0xd4, 0x3e, 0x58,
]);

/// The outcome of one delivery of a command, as its reply carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The command the reply answers.
    pub command: ReplyCommand,
    /// What happened to it.
    #[serde(flatten)]
    pub outcome: ReplyOutcome,
    /// Whether this delivery was a duplicate of a command already processed: the outcome is
    /// then the recorded one, not re-run.
    pub duplicate: bool,
}

/// The idempotency key of the command a reply answers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReplyCommand {
    /// The command's `source`.
    pub source: String,
    /// The command's `id`.
    pub id: String,
}

/// What happened to a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ReplyOutcome {
    /// The aggregate accepted the command; `events` were stored and the aggregate is now at
    /// `version`.
    Applied {
        /// The aggregate's version after the command.
        version: u64,
        /// The ids of the events it emitted, in order.
        events: Vec<Uuid>,
    },
    /// The aggregate refused the command.
    Rejected {
        /// The machine-readable code (`version_mismatch`, `insufficient_funds`, ...).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
        /// Why, for a human.
        reason: String,
    },
    /// The command's key `(source, id)` was processed before with another payload: refused,
    /// without effect.
    KeyReused {
        /// What the key stands for.
        reason: String,
    },
    /// The command could not be applied and was set aside on the dead-letter topic.
    DeadLettered {
        /// The dead-letter kind (`schema`, `unknown_type`, `handler_panic`, `parked`, ...).
        kind: String,
        /// What is wrong, for a human.
        message: String,
    },
    /// An operator dropped the command (`cmdproc dlq skip`); it never takes effect.
    Skipped {
        /// The operator's reason.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

impl ReplyOutcome {
    /// The outcome's wire name: `applied`, `rejected`, `key_reused`, `dead_lettered` or
    /// `skipped`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Applied { .. } => "applied",
            Self::Rejected { .. } => "rejected",
            Self::KeyReused { .. } => "key_reused",
            Self::DeadLettered { .. } => "dead_lettered",
            Self::Skipped { .. } => "skipped",
        }
    }
}

/// Why a message is not a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a cmdproc reply: {0}")]
pub struct NotAReply(String);

impl Reply {
    /// The reply's id: UUIDv5 of its stable message identity (one per delivery of the
    /// command), so a re-derived reply has the same id.
    pub fn id_for(message_id: &str) -> Uuid {
        Uuid::new_v5(&REPLY_NAMESPACE, message_id.as_bytes())
    }

    /// The structured-mode CloudEvent with this reply as `data`.
    pub fn to_cloudevent(&self, message_id: &str, correlation_id: Option<&str>) -> Value {
        let mut ce = json!({
            "specversion": "1.0",
            "id": Self::id_for(message_id).to_string(),
            "source": REPLY_SOURCE,
            "type": REPLY_TYPE,
            "subject": self.command.id,
            "datacontenttype": "application/json",
            "data": self,
        });
        if let Some(c) = correlation_id {
            ce["correlationid"] = c.into();
        }
        ce
    }

    /// Reads a reply from a structured-mode CloudEvent's bytes.
    pub fn from_cloudevent(bytes: &[u8]) -> Result<Self, NotAReply> {
        let mut ce: Value =
            serde_json::from_slice(bytes).map_err(|e| NotAReply(format!("not JSON: {e}")))?;
        match ce.get("type").and_then(Value::as_str) {
            Some(REPLY_TYPE) => {}
            other => return Err(NotAReply(format!("type is {other:?}"))),
        }
        let data = ce
            .get_mut("data")
            .map(Value::take)
            .ok_or_else(|| NotAReply("no data".into()))?;
        serde_json::from_value(data).map_err(|e| NotAReply(format!("data: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_reads_back_as_written_and_matches_the_published_schema() {
        let schema: Value = serde_json::from_str(include_str!("../../schemas/reply.json")).unwrap();
        let schema = jsonschema::draft202012::new(&schema).unwrap();
        let command = ReplyCommand {
            source: "/s".into(),
            id: "c-1".into(),
        };
        for outcome in [
            ReplyOutcome::Applied {
                version: 3,
                events: vec![Uuid::nil()],
            },
            ReplyOutcome::Rejected {
                code: Some("x".into()),
                reason: "r".into(),
            },
            ReplyOutcome::Rejected {
                code: None,
                reason: "r".into(),
            },
            ReplyOutcome::KeyReused { reason: "k".into() },
            ReplyOutcome::DeadLettered {
                kind: "schema".into(),
                message: "m".into(),
            },
            ReplyOutcome::Skipped { reason: None },
        ] {
            let reply = Reply {
                command: command.clone(),
                outcome,
                duplicate: true,
            };
            let ce = reply.to_cloudevent("reply/t/0/1", Some("corr"));
            assert_eq!(ce["data"]["outcome"], reply.outcome.name());
            assert_eq!(ce["subject"], "c-1");
            assert_eq!(ce["correlationid"], "corr");
            let errors: Vec<String> = schema.iter_errors(&ce).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{ce}: {errors:?}");
            let back = Reply::from_cloudevent(&serde_json::to_vec(&ce).unwrap()).unwrap();
            assert_eq!(back, reply);
        }
    }

    #[test]
    fn a_reply_id_is_stable_per_delivery() {
        assert_eq!(Reply::id_for("reply/t/0/1"), Reply::id_for("reply/t/0/1"));
        assert_ne!(Reply::id_for("reply/t/0/1"), Reply::id_for("reply/t/0/2"));
    }

    #[test]
    fn an_event_is_not_a_reply() {
        let event = br#"{"specversion":"1.0","type":"account.Deposited","data":{}}"#;
        assert!(Reply::from_cloudevent(event).is_err());
        assert!(Reply::from_cloudevent(b"nope").is_err());
    }
}
