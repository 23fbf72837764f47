//! Message headers: a small multi-valued map that both buses carry unchanged.

use std::collections::BTreeMap;

/// The header JetStream uses to drop a duplicate publish (DESIGN §6: the
/// outbox publishes each event once per event id).
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";

/// Message headers: names map to one or more values, in the order added.
///
/// Names compare exactly (case-sensitive), as NATS does, so use one spelling
/// everywhere (`Nats-Msg-Id`, `Authorization`, `Content-Type`, `traceparent`).
/// Values have surrounding whitespace trimmed when added, because the NATS
/// wire format trims it on receipt; trimming here means both buses deliver the
/// same value.
///
/// Adding never fails; names and values are checked when a message carrying
/// them is published ([`HeaderError`]).
///
/// ```
/// use switchboard::bus::Headers;
///
/// let headers = Headers::new()
///     .with("Authorization", "Bearer sb-123")
///     .with("X-Tag", "a")
///     .with("X-Tag", "b");
/// assert_eq!(headers.get("Authorization"), Some("Bearer sb-123"));
/// assert_eq!(headers.get_all("X-Tag").collect::<Vec<_>>(), ["a", "b"]);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers {
    // A BTreeMap, not a HashMap: iteration order (and so `Debug` output and
    // equality in tests) is the same on both buses.
    entries: BTreeMap<String, Vec<String>>,
}

/// Why a header cannot go on the wire.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Names are printable ASCII without spaces or `:`.
    #[error("invalid header name {name:?}: must be printable ASCII without spaces or ':'")]
    BadName {
        /// The refused name.
        name: String,
    },
    /// Values cannot hold a line break: NATS headers are lines.
    #[error("invalid value for header {name:?}: must not contain CR or LF")]
    BadValue {
        /// The header whose value was refused.
        name: String,
    },
}

impl HeaderError {
    /// A stable machine-readable code for the kind of error.
    pub fn code(&self) -> &'static str {
        match self {
            HeaderError::BadName { .. } => "bad_header_name",
            HeaderError::BadValue { .. } => "bad_header_value",
        }
    }
}

impl Headers {
    /// No headers.
    pub fn new() -> Headers {
        Headers::default()
    }

    /// Adds a value to `name`, keeping the values it already has; returns the
    /// headers, for building them in one expression.
    pub fn with(mut self, name: impl Into<String>, value: impl Into<String>) -> Headers {
        self.append(name, value);
        self
    }

    /// Adds a value to `name`, keeping the values it already has.
    pub fn append(&mut self, name: impl Into<String>, value: impl Into<String>) -> &mut Headers {
        self.entries
            .entry(name.into())
            .or_default()
            .push(trimmed(value.into()));
        self
    }

    /// Sets `name` to this one value, replacing any it had.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) -> &mut Headers {
        self.entries
            .insert(name.into(), vec![trimmed(value.into())]);
        self
    }

    /// Removes `name`, returning its values.
    pub fn remove(&mut self, name: &str) -> Vec<String> {
        self.entries.remove(name).unwrap_or_default()
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .get(name)
            .and_then(|values| values.first())
            .map(String::as_str)
    }

    /// Every value of `name`, in the order added.
    pub fn get_all<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a str> + 'a {
        self.entries
            .get(name)
            .into_iter()
            .flatten()
            .map(String::as_str)
    }

    /// Every `(name, value)` pair: names in sorted order, each name's values
    /// in the order added.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.entries.iter().flat_map(|(name, values)| {
            values
                .iter()
                .map(move |value| (name.as_str(), value.as_str()))
        })
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many values there are, over all names.
    pub fn len(&self) -> usize {
        self.entries.values().map(Vec::len).sum()
    }

    /// Checks every name and value can be written as a NATS header line.
    pub fn validate(&self) -> Result<(), HeaderError> {
        for (name, values) in &self.entries {
            let good_name = !name.is_empty()
                && name
                    .bytes()
                    .all(|byte| byte.is_ascii_graphic() && byte != b':');
            if !good_name {
                return Err(HeaderError::BadName { name: name.clone() });
            }
            if values.iter().any(|value| value.contains(['\r', '\n'])) {
                return Err(HeaderError::BadValue { name: name.clone() });
            }
        }
        Ok(())
    }

    /// The bytes these headers take on the NATS wire (`NATS/1.0` line, one
    /// `Name: value` line per value, blank line); 0 when there are none. The
    /// server counts them against its maximum payload.
    pub(crate) fn wire_len(&self) -> usize {
        if self.is_empty() {
            return 0;
        }
        let lines: usize = self
            .iter()
            .map(|(name, value)| name.len() + 2 + value.len() + 2)
            .sum();
        "NATS/1.0\r\n".len() + lines + 2
    }
}

impl<N: Into<String>, V: Into<String>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(pairs: I) -> Headers {
        let mut headers = Headers::new();
        for (name, value) in pairs {
            headers.append(name, value);
        }
        headers
    }
}

fn trimmed(value: String) -> String {
    if value.trim().len() == value.len() {
        value
    } else {
        value.trim().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_valued_in_order() {
        let mut headers = Headers::new().with("X", "1").with("X", "2").with("A", "a");
        assert_eq!(headers.get("X"), Some("1"));
        assert_eq!(headers.get_all("X").collect::<Vec<_>>(), ["1", "2"]);
        assert_eq!(headers.len(), 3);
        assert_eq!(
            headers.iter().collect::<Vec<_>>(),
            [("A", "a"), ("X", "1"), ("X", "2")]
        );
        headers.insert("X", "3");
        assert_eq!(headers.get_all("X").collect::<Vec<_>>(), ["3"]);
        assert_eq!(headers.remove("X"), ["3"]);
        assert_eq!(headers.get("X"), None);
        assert_eq!(headers.get_all("X").count(), 0);
    }

    #[test]
    fn values_are_trimmed_and_names_exact() {
        let headers = Headers::new().with("Nats-Msg-Id", "  id-1 \t");
        assert_eq!(headers.get("Nats-Msg-Id"), Some("id-1"));
        assert_eq!(headers.get("nats-msg-id"), None);
    }

    #[test]
    fn validation() {
        assert_eq!(
            Headers::new().with("Good-Name", "any value").validate(),
            Ok(())
        );
        for name in ["", "has space", "has:colon", "tab\t", "é"] {
            let error = Headers::new().with(name, "v").validate().expect_err(name);
            assert_eq!(error.code(), "bad_header_name", "{name:?}");
        }
        let error = Headers::new()
            .with("X", "line\r\nInjected: yes")
            .validate()
            .expect_err("CRLF");
        assert_eq!(error.code(), "bad_header_value");
    }

    #[test]
    fn wire_length() {
        assert_eq!(Headers::new().wire_len(), 0);
        // "NATS/1.0\r\n" + "A: b\r\n" + "\r\n"
        assert_eq!(Headers::new().with("A", "b").wire_len(), 10 + 6 + 2);
    }
}
