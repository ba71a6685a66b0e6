//! Decoding a consumed Kafka message into a command or a dead letter, shared by the worker
//! and `cmdproc verify`.

use commands::envelope::{Command, DeadLetterKind, DecodeError};
use commands::partitioner::partition_for_key;
use commands::SchemaSet;
use rdkafka::message::{BorrowedMessage, Headers, Message};

use crate::batch::Incoming;
use crate::config::MisroutedPolicy;

/// Decodes a consumed message into a command, or the reason it is a dead letter: header
/// names that are not UTF-8, the size limit, the envelope and schema, the key, and the
/// murmur2 route. The worker and `cmdproc verify` both use it, so a re-execution decodes
/// exactly as the workers did.
pub fn decode_message(
    m: &BorrowedMessage<'_>,
    partitions: i32,
    max_command_bytes: usize,
    misrouted: MisroutedPolicy,
    schemas: &SchemaSet,
) -> Incoming {
    let key = m.key().map(<[u8]>::to_vec);
    let value = m.payload().map(<[u8]>::to_vec);
    // rdkafka panics on a header name that is not UTF-8; the worker dead-letters such a
    // message, so the re-execution must too.
    let headers = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        m.headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect::<Vec<(String, Option<Vec<u8>>)>>()
            })
            .unwrap_or_default()
    }));
    let (headers, bad_headers) = match headers {
        Ok(h) => (h, false),
        Err(_) => (Vec::new(), true),
    };
    let size = key.as_ref().map_or(0, Vec::len) + value.as_ref().map_or(0, Vec::len);
    let decoded = if bad_headers {
        Err(DecodeError {
            kind: DeadLetterKind::Malformed,
            message: "a header name is not valid UTF-8; headers dropped".into(),
            aggregate: None,
        })
    } else if size > max_command_bytes {
        Err(DecodeError {
            kind: DeadLetterKind::TooLarge,
            message: format!("message is {size} bytes, more than the limit of {max_command_bytes}"),
            aggregate: None,
        })
    } else {
        let hs: Vec<(&str, Option<&[u8]>)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        Command::decode(key.as_deref(), &hs, value.as_deref(), schemas)
            .and_then(|c| check_route(c, m.partition(), partitions, misrouted))
    };
    Incoming {
        offset: m.offset(),
        timestamp: m.timestamp().to_millis(),
        key,
        value,
        headers,
        decoded,
    }
}

fn check_route(
    c: Command,
    partition: i32,
    partitions: i32,
    misrouted: MisroutedPolicy,
) -> Result<Command, DecodeError> {
    if misrouted == MisroutedPolicy::Accept {
        return Ok(c);
    }
    let expected = partition_for_key(c.subject.as_str().as_bytes(), partitions);
    if expected == Some(partition) {
        return Ok(c);
    }
    Err(DecodeError {
        kind: DeadLetterKind::Misrouted,
        message: format!(
            "key `{}` maps to partition {} of {partitions} (murmur2) but the command is on partition {partition}; \
             producers must use the murmur2 partitioner",
            c.subject,
            expected.unwrap_or(-1)
        ),
        aggregate: Some((c.command_type.aggregate_type().to_owned(), c.subject.to_string())),
    })
}
