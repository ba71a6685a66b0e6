//! Reading a `POST /commands` request into a validated [`Command`]: a structured-mode
//! CloudEvent, or the compact body `{type, subject, data}`, with the idempotency key and the
//! source from headers.

use axum::http::HeaderMap;
use serde_json::{Map, Value};

use commands::{Command, Registry, Source, Topic};

use super::answer::Problem;

/// The header holding the command's id, its idempotency key within its source.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The header holding the command's source (its sender, e.g. `/checkout`).
pub const COMMAND_SOURCE: &str = "command-source";

/// The attributes a compact body may have.
const COMPACT_FIELDS: [&str; 6] = [
    "type",
    "subject",
    "data",
    "expectedversion",
    "correlationid",
    "time",
];

/// Reads `body` and `headers` into a command asking for its reply on `reply_topic`, checked
/// against the registry's schemas and aggregates.
///
/// The id is the `Idempotency-Key` header or the CloudEvent's `id` (both given, they must
/// agree). The source is the CloudEvent's `source`, or the `Command-Source` header, or
/// `default_source` (a CloudEvent's `source` and the header, both given, must agree).
pub(super) fn command(
    body: &[u8],
    headers: &HeaderMap,
    registry: &Registry,
    default_source: &Source,
    reply_topic: &Topic,
) -> Result<Command, Problem> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Problem::bad_request(format!("the body is not JSON: {e}")))?;
    let Value::Object(mut fields) = value else {
        return Err(Problem::bad_request(
            "the body is not a JSON object: send a CloudEvent or {\"type\", \"subject\", \"data\"}",
        ));
    };
    let key = header(headers, IDEMPOTENCY_KEY)?;
    let source_header = header(headers, COMMAND_SOURCE)?;
    if fields.contains_key("specversion") {
        agree(&mut fields, "id", key, "Idempotency-Key header")?;
        agree(
            &mut fields,
            "source",
            source_header,
            "Command-Source header",
        )?;
    } else {
        if let Some(unknown) = fields
            .keys()
            .find(|k| !COMPACT_FIELDS.contains(&k.as_str()))
        {
            return Err(Problem::invalid(
                "schema",
                format!(
                    "unknown field `{unknown}`: a compact body has type, subject, data and \
                     optionally expectedversion, correlationid and time; a CloudEvent has \
                     specversion"
                ),
            ));
        }
        let Some(key) = key else {
            return Err(Problem::bad_request(
                "the Idempotency-Key header is missing: it is the command's id, the same \
                 for every retry of the request",
            ));
        };
        fields.insert("specversion".into(), "1.0".into());
        fields.insert("id".into(), key.into());
        if let Some(source) = source_header {
            fields.insert("source".into(), source.into());
        }
        fields.insert("datacontenttype".into(), "application/json".into());
    }
    if !fields.contains_key("id") {
        return Err(Problem::bad_request(
            "the command has no id: send the Idempotency-Key header (or the CloudEvent's id)",
        ));
    }
    fields
        .entry("source")
        .or_insert_with(|| default_source.as_str().into());
    // A command without `time` is stamped with the moment it arrived: the only clock its
    // handler sees (a hold's expiry, a saga's deadline). A retry stamped later is still a
    // duplicate: `time` is not part of what the idempotency key stands for.
    fields.entry("time").or_insert_with(|| now_rfc3339().into());
    // The gateway waits for the reply on its own topic, whatever the caller asked for.
    fields.insert("replyto".into(), reply_topic.as_str().into());
    let command = Command::from_json(Value::Object(fields), registry.schemas())
        .map_err(|e| Problem::invalid(e.kind.as_str(), e.message))?;
    let aggregate_type = command.command_type.aggregate_type();
    let known = registry
        .command_names(aggregate_type)
        .is_some_and(|names| names.iter().any(|n| n == command.command_type.name()));
    if !known {
        return Err(Problem::invalid(
            "unknown_type",
            format!(
                "unknown command type `{}`: this gateway's processor knows {}",
                command.command_type,
                registry.types().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    Ok(command)
}

/// Now, as a CloudEvents `time`.
pub(crate) fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A header's value as text, `None` when absent.
fn header(headers: &HeaderMap, name: &'static str) -> Result<Option<String>, Problem> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.to_owned()))
            .map_err(|_| Problem::bad_request(format!("the {name} header is not visible ASCII"))),
    }
}

/// Puts `given` (from a header) into the CloudEvent's `attribute` when the CloudEvent has
/// none; when it has one, they must be equal.
fn agree(
    fields: &mut Map<String, Value>,
    attribute: &str,
    given: Option<String>,
    what: &str,
) -> Result<(), Problem> {
    let Some(given) = given else { return Ok(()) };
    match fields.get(attribute) {
        None | Some(Value::Null) => {
            fields.insert(attribute.to_owned(), given.into());
            Ok(())
        }
        Some(Value::String(own)) if *own == given => Ok(()),
        Some(own) => Err(Problem::invalid(
            "schema",
            format!("the {what} `{given}` differs from the CloudEvent's {attribute} {own}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use serde_json::json;

    fn registry() -> Registry {
        Registry::new().with::<bank::Account>(bank::account_schemas())
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn read(body: Value, h: &[(&'static str, &str)]) -> Result<Command, Problem> {
        command(
            body.to_string().as_bytes(),
            &headers(h),
            &registry(),
            &Source::parse("/gw").unwrap(),
            &Topic::parse("commands.replies").unwrap(),
        )
    }

    #[test]
    fn a_compact_body_takes_its_id_and_source_from_headers() {
        let body = json!({"type": "account.Deposit", "subject": "acc-1", "data": {"amount": 5}});
        let c = read(body.clone(), &[(IDEMPOTENCY_KEY, "k-1")]).unwrap();
        assert_eq!((c.id.as_str(), c.source.as_str()), ("k-1", "/gw"));
        assert_eq!(c.reply_to.unwrap().as_str(), "commands.replies");
        let c = read(
            body.clone(),
            &[(IDEMPOTENCY_KEY, "k-1"), (COMMAND_SOURCE, "/shop")],
        )
        .unwrap();
        assert_eq!(c.source.as_str(), "/shop");
        assert_eq!(read(body, &[]).unwrap_err().status, 400);
    }

    #[test]
    fn a_cloudevent_id_must_agree_with_the_header() {
        let ce = json!({"specversion": "1.0", "id": "c-1", "source": "/s",
                        "type": "account.Open", "subject": "acc-1", "data": {"owner": "a"}});
        assert!(read(ce.clone(), &[]).is_ok());
        assert!(read(ce.clone(), &[(IDEMPOTENCY_KEY, "c-1")]).is_ok());
        let p = read(ce, &[(IDEMPOTENCY_KEY, "c-2")]).unwrap_err();
        assert_eq!(p.status, 422, "{p:?}");
    }

    #[test]
    fn schema_errors_and_unknown_types_are_invalid() {
        let h = [(IDEMPOTENCY_KEY, "k")];
        let p = read(
            json!({"type": "account.Deposit", "subject": "a", "data": {"amount": -1}}),
            &h,
        )
        .unwrap_err();
        assert_eq!((p.status.as_u16(), p.kind), (422, Some("schema")), "{p:?}");
        let p = read(
            json!({"type": "account.Close", "subject": "a", "data": {}}),
            &h,
        )
        .unwrap_err();
        assert_eq!(
            (p.status.as_u16(), p.kind),
            (422, Some("unknown_type")),
            "{p:?}"
        );
        let p = read(
            json!({"type": "account.Open", "subject": "a", "data": {}, "x": 1}),
            &h,
        )
        .unwrap_err();
        assert_eq!(p.status, 422);
        assert_eq!(read(json!([1]), &h).unwrap_err().status, 400);
    }
}
