//! What the gateway answers: an outcome as a status and a JSON body, or a problem
//! (RFC 9457 `application/problem+json`) when the request itself is wrong.
//!
//! The body of an outcome depends on the outcome only, so a retry of a request gets the
//! same bytes as the first answer; whether the answer was replayed from a recorded outcome
//! is in the `Idempotent-Replayed` header instead.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

use commands::{ReplyCommand, ReplyOutcome};

/// The response header saying whether the outcome was recorded before this request
/// (`true`: a duplicate delivery got the recorded outcome) or decided for it (`false`).
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

const JSON: &str = "application/json";
const PROBLEM_JSON: &str = "application/problem+json";

/// The dead-letter kinds that say the command itself is invalid (422); the others (a
/// panicking handler, a parked aggregate, ...) say it could not be applied now (409).
const INVALID_KINDS: [&str; 5] = [
    "malformed",
    "schema",
    "unknown_type",
    "too_large",
    "key_mismatch",
];

/// The HTTP status of an outcome: 200 applied; 409 rejected, key reused, skipped or
/// dead-lettered for a reason other than its content; 422 dead-lettered as invalid.
pub fn status_of(outcome: &ReplyOutcome) -> StatusCode {
    match outcome {
        ReplyOutcome::Applied { .. } => StatusCode::OK,
        ReplyOutcome::DeadLettered { kind, .. } if INVALID_KINDS.contains(&kind.as_str()) => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        _ => StatusCode::CONFLICT,
    }
}

#[derive(Serialize)]
struct Body<'a> {
    command: &'a ReplyCommand,
    #[serde(flatten)]
    outcome: &'a ReplyOutcome,
}

/// The answer for `command`'s `outcome`; `replayed` sets the `Idempotent-Replayed` header
/// (a `GET` of a recorded outcome sets none).
pub(super) fn outcome(
    command: &ReplyCommand,
    outcome: &ReplyOutcome,
    replayed: Option<bool>,
) -> Response {
    let body = serde_json::to_vec(&Body { command, outcome }).expect("JSON serializes");
    let mut response = (
        status_of(outcome),
        [(header::CONTENT_TYPE, HeaderValue::from_static(JSON))],
        body,
    )
        .into_response();
    if let Some(replayed) = replayed {
        response.headers_mut().insert(
            IDEMPOTENT_REPLAYED,
            HeaderValue::from_static(if replayed { "true" } else { "false" }),
        );
    }
    response
}

/// `/commands/{source}/{id}` with both parts percent-encoded (a source holds slashes).
pub fn location(command: &ReplyCommand) -> String {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    // Everything but the RFC 3986 unreserved characters is encoded.
    const SEGMENT: &percent_encoding::AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    format!(
        "/commands/{}/{}",
        utf8_percent_encode(&command.source, SEGMENT),
        utf8_percent_encode(&command.id, SEGMENT)
    )
}

/// 202: no reply within the deadline; the command was produced (or is being produced by an
/// earlier request with the same key) and its outcome can be read at `Location`.
pub(super) fn pending(command: &ReplyCommand) -> Response {
    let location = location(command);
    let body = json!({"command": command, "outcome": "pending", "location": location});
    (
        StatusCode::ACCEPTED,
        [
            (header::CONTENT_TYPE, JSON.to_owned()),
            (header::LOCATION, location),
            (header::RETRY_AFTER, "1".to_owned()),
        ],
        body.to_string(),
    )
        .into_response()
}

/// A request the gateway cannot act on, or a failure to act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Problem {
    /// The status.
    pub(super) status: StatusCode,
    /// A short summary, the same for every problem of its sort.
    pub(super) title: &'static str,
    /// What is wrong with this request.
    pub(super) detail: String,
    /// The dead-letter kind the command would have had (`schema`, `unknown_type`, ...),
    /// for invalid commands.
    pub(super) kind: Option<&'static str>,
}

impl Problem {
    /// 400: the request cannot be read.
    pub(super) fn bad_request(detail: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            title: "bad request",
            detail: detail.into(),
            kind: None,
        }
    }

    /// 422: the request is readable but is not a valid command.
    pub(super) fn invalid(kind: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            title: "invalid command",
            detail: detail.into(),
            kind: Some(kind),
        }
    }

    /// 404: nothing is recorded for the key.
    pub(super) fn not_found(detail: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            title: "not found",
            detail: detail.into(),
            kind: None,
        }
    }

    /// 503: a dependency (the broker, the database) did not answer.
    pub(super) fn unavailable(detail: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            title: "service unavailable",
            detail: detail.into(),
            kind: None,
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut body = json!({
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let Some(kind) = self.kind {
            body["kind"] = kind.into();
        }
        (
            self.status,
            [(header::CONTENT_TYPE, PROBLEM_JSON)],
            body.to_string(),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_location_keeps_the_slashes_of_a_source_inside_its_segment() {
        let command = ReplyCommand {
            source: "/shop/checkout".into(),
            id: "order 7/a".into(),
        };
        assert_eq!(
            location(&command),
            "/commands/%2Fshop%2Fcheckout/order%207%2Fa"
        );
    }

    #[test]
    fn statuses_of_outcomes() {
        let dead = |kind: &str| ReplyOutcome::DeadLettered {
            kind: kind.into(),
            message: "m".into(),
        };
        assert_eq!(status_of(&dead("schema")), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(status_of(&dead("handler_panic")), StatusCode::CONFLICT);
        assert_eq!(
            status_of(&ReplyOutcome::KeyReused { reason: "r".into() }),
            StatusCode::CONFLICT
        );
    }
}
