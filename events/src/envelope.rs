//! The envelope every event travels in, and the names of the streams it belongs to.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::catalog::Event;
use crate::time;

/// A stored event with its position in the log. JSON on the wire is the envelope's
/// fields beside `"type"` and `"data"` (DESIGN §2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Global position in the log: 1-based and gapless.
    pub seq: u64,
    /// The event's identity (UUID v7); appending the same id twice is a no-op.
    pub id: Uuid,
    pub stream: StreamId,
    /// Position inside `stream`, 1-based.
    pub version: u64,
    #[serde(with = "time::serde_at")]
    pub at: DateTime<Utc>,
    #[serde(default)]
    pub correlation_id: Option<Uuid>,
    #[serde(default)]
    pub causation_id: Option<Uuid>,
    #[serde(default)]
    pub traceparent: Option<String>,
    #[serde(flatten)]
    pub event: Event,
}

impl Envelope {
    /// The envelope as one line of JSON (for `log --json`, `audit export`, NATS, HTTP).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an envelope always serializes to JSON")
    }
}

/// An event about to be appended: everything but the position and the time, which
/// the log assigns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub id: Uuid,
    pub event: Event,
    pub correlation_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
    pub traceparent: Option<String>,
}

impl NewEvent {
    /// A new event with a fresh UUID v7 and no causal context.
    pub fn new(event: Event) -> Self {
        Self::with_id(Uuid::now_v7(), event)
    }

    /// A new event with a caller-chosen id, e.g. derived from a request so a retry
    /// is deduplicated by the log.
    pub fn with_id(id: Uuid, event: Event) -> Self {
        Self {
            id,
            event,
            correlation_id: None,
            causation_id: None,
            traceparent: None,
        }
    }
}

/// The name of a stream: `conv/<id>`, `key/<id>`, `agent/<name>` or `system`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StreamId(String);

/// Why a stream name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid stream name {name:?}: expected system, conv/<id>, key/<id> or agent/<name> with an id of 1-128 characters from [A-Za-z0-9_.:-]")]
pub struct InvalidStreamId {
    pub name: String,
}

impl StreamId {
    /// The conversation stream `conv/<id>`.
    pub fn conversation(id: &str) -> Result<Self, InvalidStreamId> {
        Self::parse(&format!("conv/{id}"))
    }

    /// The key stream `key/<id>`.
    pub fn key(id: &str) -> Result<Self, InvalidStreamId> {
        Self::parse(&format!("key/{id}"))
    }

    /// The agent stream `agent/<name>`.
    pub fn agent(name: &str) -> Result<Self, InvalidStreamId> {
        Self::parse(&format!("agent/{name}"))
    }

    /// The `system` stream.
    pub fn system() -> Self {
        StreamId("system".to_owned())
    }

    /// Checks a stream name's form.
    pub fn parse(name: &str) -> Result<Self, InvalidStreamId> {
        let valid = name == "system"
            || match name.split_once('/') {
                Some(("conv" | "key" | "agent", id)) => {
                    (1..=128).contains(&id.len())
                        && id
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
                }
                _ => false,
            };
        if valid {
            Ok(StreamId(name.to_owned()))
        } else {
            Err(InvalidStreamId {
                name: name.chars().take(200).collect(),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for StreamId {
    type Error = InvalidStreamId;
    fn try_from(name: String) -> Result<Self, InvalidStreamId> {
        Self::parse(&name)
    }
}

impl From<StreamId> for String {
    fn from(id: StreamId) -> String {
        id.0
    }
}

impl std::str::FromStr for StreamId {
    type Err = InvalidStreamId;
    fn from_str(s: &str) -> Result<Self, InvalidStreamId> {
        Self::parse(s)
    }
}
