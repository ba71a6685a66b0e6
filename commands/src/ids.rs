//! Newtypes for identities, so an unchecked string cannot reach the engine.

use std::fmt;

/// Longest identity accepted, in bytes. Ids are keys and primary-key columns, not payloads.
pub const MAX_ID_LEN: usize = 256;

/// Why a string is not a valid identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The string is empty.
    #[error("{0} is empty")]
    Empty(&'static str),
    /// The string is longer than [`MAX_ID_LEN`] bytes.
    #[error("{what} is {len} bytes long, more than {MAX_ID_LEN}")]
    TooLong {
        /// Which identity.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// The string holds a control character.
    #[error("{0} contains a control character")]
    Control(&'static str),
    /// The string does not have the expected shape.
    #[error("{what} `{value}` is invalid: {expected}")]
    Shape {
        /// Which identity.
        what: &'static str,
        /// The offending value, cut to a readable length.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
}

fn check(what: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty(what));
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { what, len: s.len() });
    }
    if s.chars().any(char::is_control) {
        return Err(IdError::Control(what));
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Checks and wraps an identity.
            pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check($what, &s)?;
                Ok(Self(s))
            }

            /// The identity as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<&str> for $name {
            type Error = IdError;
            fn try_from(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
    };
}

string_id!(
    /// The id of an aggregate instance (`acc-42`); the Kafka key of its commands.
    AggregateId,
    "aggregate id"
);
string_id!(
    /// A command's `id`; together with its [`Source`] it is the idempotency key.
    CommandId,
    "command id"
);
string_id!(
    /// A command's `source`, the URI-reference of its sender (`/checkout`).
    Source,
    "source"
);

/// A command type, `<aggregate_type>.<CommandName>` (`account.Deposit`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommandType {
    full: String,
    dot: usize,
}

impl CommandType {
    /// Parses `<aggregate_type>.<CommandName>`: a lowercase aggregate type, a dot, and a
    /// command name starting with an uppercase letter.
    pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
        let full = s.into();
        check("command type", &full)?;
        let bad = |full: &str| IdError::Shape {
            what: "command type",
            value: full.chars().take(80).collect(),
            expected: "expected <aggregate_type>.<CommandName>, e.g. account.Deposit",
        };
        let Some(dot) = full.find('.') else {
            return Err(bad(&full));
        };
        let (agg, name) = (&full[..dot], &full[dot + 1..]);
        let agg_ok = agg.starts_with(|c: char| c.is_ascii_lowercase())
            && agg
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        let name_ok = name.starts_with(|c: char| c.is_ascii_uppercase())
            && name.chars().all(|c| c.is_ascii_alphanumeric());
        if !agg_ok || !name_ok {
            return Err(bad(&full));
        }
        Ok(Self { full, dot })
    }

    /// The aggregate type, e.g. `account`.
    pub fn aggregate_type(&self) -> &str {
        &self.full[..self.dot]
    }

    /// The command name, e.g. `Deposit`.
    pub fn name(&self) -> &str {
        &self.full[self.dot + 1..]
    }

    /// The full type, e.g. `account.Deposit`.
    pub fn as_str(&self) -> &str {
        &self.full
    }
}

impl fmt::Display for CommandType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

/// A Kafka topic name, checked against Kafka's own rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic(String);

impl Topic {
    /// Checks a topic name: 1 to 249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`.
    pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= 249
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !ok {
            return Err(IdError::Shape {
                what: "topic",
                value: s.chars().take(80).collect(),
                expected: "1 to 249 characters of [a-zA-Z0-9._-]",
            });
        }
        Ok(Self(s))
    }

    /// The dead-letter topic of a commands topic: `<topic>.dlq`.
    pub fn dead_letter(&self) -> Topic {
        Topic(format!("{}.dlq", self.0))
    }

    /// The default reply topic of a commands topic: `<topic>.replies`.
    pub fn replies(&self) -> Topic {
        Topic(format!("{}.replies", self.0))
    }

    /// The topic name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Topic {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_type_splits_aggregate_and_name() {
        let t = CommandType::parse("account.Deposit").unwrap();
        assert_eq!(t.aggregate_type(), "account");
        assert_eq!(t.name(), "Deposit");
    }

    #[test]
    fn command_type_rejects_bad_shapes() {
        for bad in [
            "",
            "account",
            "account.",
            ".Deposit",
            "Account.Deposit",
            "account.deposit",
            "a.B.C",
        ] {
            assert!(CommandType::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ids_reject_empty_long_and_control() {
        assert_eq!(AggregateId::parse(""), Err(IdError::Empty("aggregate id")));
        assert!(AggregateId::parse("x".repeat(MAX_ID_LEN + 1)).is_err());
        assert!(CommandId::parse("a\nb").is_err());
        assert_eq!(AggregateId::parse("acc-1").unwrap().as_str(), "acc-1");
    }

    #[test]
    fn topic_rules() {
        assert!(Topic::parse("commands").is_ok());
        assert!(Topic::parse("bad topic").is_err());
        assert_eq!(
            Topic::parse("commands").unwrap().dead_letter().as_str(),
            "commands.dlq"
        );
    }
}
