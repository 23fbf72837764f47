//! The event catalog of DESIGN §2: every fact switchboard records.
//!
//! Each variant's data is a plain struct named like the variant, so the storage
//! codec (postcard, positional) and the wire codec (JSON, named) see one shape.
//! Two rules keep old logs
//! readable: variants are only ever appended to the end of [`Event`] (postcard
//! stores the variant index), and a field is never reused for a different shape.
//! Optional fields are `Option` and always serialized — `skip_serializing_if` would
//! break the positional storage format.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::time;

macro_rules! catalog {
    ($($variant:ident = $name:literal,)*) => {
        /// One recorded fact. On the wire (JSON) it is `{"type": "...", "data": {...}}`;
        /// in storage (postcard) it is the variant's catalog index and its data.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Event {
            $($variant($variant),)*
        }

        /// The snake_case names of every event type, in catalog order.
        pub const EVENT_TYPES: &[&str] = &[$($name,)*];

        impl Event {
            /// The event's `type` as written on the wire, e.g. `message_received`.
            pub fn type_name(&self) -> &'static str {
                match self {
                    $(Event::$variant(_) => $name,)*
                }
            }
        }

        mod repr {
            use super::*;

            #[derive(Serialize)]
            #[serde(tag = "type", content = "data", rename_all = "snake_case")]
            pub enum WireRef<'a> {
                $($variant(&'a $variant),)*
            }

            #[derive(Deserialize)]
            #[serde(tag = "type", content = "data", rename_all = "snake_case")]
            pub enum Wire {
                $($variant($variant),)*
            }

            #[derive(Serialize)]
            pub enum StoredRef<'a> {
                $($variant(&'a $variant),)*
            }

            #[derive(Deserialize)]
            pub enum Stored {
                $($variant($variant),)*
            }

            impl Serialize for Event {
                fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                    if s.is_human_readable() {
                        match self {
                            $(Event::$variant(data) => WireRef::$variant(data).serialize(s),)*
                        }
                    } else {
                        match self {
                            $(Event::$variant(data) => StoredRef::$variant(data).serialize(s),)*
                        }
                    }
                }
            }

            impl<'de> Deserialize<'de> for Event {
                fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                    if d.is_human_readable() {
                        Ok(match Wire::deserialize(d)? {
                            $(Wire::$variant(data) => Event::$variant(data),)*
                        })
                    } else {
                        Ok(match Stored::deserialize(d)? {
                            $(Stored::$variant(data) => Event::$variant(data),)*
                        })
                    }
                }
            }
        }
    };
}

// Append only: storage records the position in this list.
catalog! {
    ConversationStarted = "conversation_started",
    MessageReceived = "message_received",
    AgentRouted = "agent_routed",
    ReplyCompleted = "reply_completed",
    ReplyFailed = "reply_failed",
    ConversationErased = "conversation_erased",
    UsageRecorded = "usage_recorded",
    BudgetThresholdCrossed = "budget_threshold_crossed",
    BudgetExceeded = "budget_exceeded",
    KeyIssued = "key_issued",
    KeyUpdated = "key_updated",
    KeyRevoked = "key_revoked",
    AuthFailed = "auth_failed",
    RateLimited = "rate_limited",
    AdminAction = "admin_action",
}

impl Event {
    /// True for the events the audit trail keeps (security and administration).
    pub fn is_audit(&self) -> bool {
        matches!(
            self,
            Event::KeyIssued(_)
                | Event::KeyUpdated(_)
                | Event::KeyRevoked(_)
                | Event::AuthFailed(_)
                | Event::RateLimited(_)
                | Event::AdminAction(_)
                | Event::ConversationErased(_)
                | Event::BudgetThresholdCrossed(_)
                | Event::BudgetExceeded(_)
        )
    }

    /// The API key this event concerns, if any (used to filter the audit trail).
    pub fn key_id(&self) -> Option<&str> {
        match self {
            Event::ConversationStarted(e) => Some(&e.key_id),
            Event::MessageReceived(e) => Some(&e.key_id),
            Event::UsageRecorded(e) => Some(&e.key_id),
            Event::KeyIssued(e) => Some(&e.key_id),
            Event::KeyUpdated(e) => Some(&e.key_id),
            Event::KeyRevoked(e) => Some(&e.key_id),
            Event::RateLimited(e) => Some(&e.key_id),
            Event::BudgetThresholdCrossed(e) if e.scope == BudgetScope::Key => Some(&e.subject_id),
            Event::BudgetExceeded(e) if e.scope == BudgetScope::Key => Some(&e.subject_id),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationStarted {
    pub conversation_id: String,
    pub key_id: String,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageReceived {
    pub conversation_id: String,
    pub message_id: String,
    pub key_id: String,
    #[serde(default)]
    pub user: Option<String>,
    pub content: String,
    /// The agent the sender asked for, if any; routing decides otherwise.
    #[serde(default)]
    pub agent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRouted {
    pub conversation_id: String,
    pub message_id: String,
    pub agent: String,
    /// The routing rule's pattern that matched; `None` for a named or default agent.
    #[serde(default)]
    pub rule: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyCompleted {
    pub conversation_id: String,
    pub message_id: String,
    pub reply_id: String,
    pub agent: String,
    pub content: String,
    pub finish_reason: String,
    pub latency_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyFailed {
    pub conversation_id: String,
    pub message_id: String,
    pub agent: String,
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationErased {
    pub conversation_id: String,
    /// Who erased it: a key id or `admin`.
    pub by: String,
}

/// Tokens and money for one completed (or partial) turn. Prices are micro-USD per
/// million tokens, copied into the event so later price changes never rewrite history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecorded {
    pub conversation_id: String,
    pub message_id: String,
    pub key_id: String,
    #[serde(default)]
    pub user: Option<String>,
    pub agent: String,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// True when the tokens were counted locally because the provider reported none.
    pub estimated: bool,
    pub input_price: u64,
    pub output_price: u64,
    pub cost_micros: u64,
}

/// Whose budget: an API key's or a user's (the key owner).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetScope {
    Key,
    User,
}

/// The window a budget covers, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriod {
    Day,
    Month,
    Total,
}

impl BudgetScope {
    /// The name on the wire: `key` or `user`.
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetScope::Key => "key",
            BudgetScope::User => "user",
        }
    }
}

impl BudgetPeriod {
    /// The name on the wire: `day`, `month` or `total`.
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Month => "month",
            BudgetPeriod::Total => "total",
        }
    }
}

impl std::str::FromStr for BudgetPeriod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "day" => Ok(Self::Day),
            "month" => Ok(Self::Month),
            "total" => Ok(Self::Total),
            other => Err(format!(
                "unknown budget period {other:?} (expected day, month or total)"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetThresholdCrossed {
    pub scope: BudgetScope,
    pub subject_id: String,
    pub period: BudgetPeriod,
    #[serde(with = "time::serde_at")]
    pub period_start: DateTime<Utc>,
    pub threshold_pct: u32,
    pub spent_micros: u64,
    pub budget_micros: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetExceeded {
    pub scope: BudgetScope,
    pub subject_id: String,
    pub period: BudgetPeriod,
    pub spent_micros: u64,
    pub budget_micros: u64,
}

/// Per-key limits; `None` means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    #[serde(default)]
    pub rpm: Option<u32>,
    #[serde(default)]
    pub tpm: Option<u64>,
    #[serde(default)]
    pub max_parallel: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    pub micros: u64,
    pub period: BudgetPeriod,
}

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Send messages, read history and usage.
    Chat,
    /// Manage keys, read costs and the audit trail, erase conversations.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 2] = [Scope::Chat, Scope::Admin];

    /// The scope's name, as on the wire and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Chat => "chat",
            Scope::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| format!("unknown scope {s:?} (expected chat or admin)"))
    }
}

/// SHA-256 of an API key. Hex on the wire, 32 raw bytes in storage.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHash(pub [u8; 32]);

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyHash({})", hex::encode(&self.0[..4]))
    }
}

impl Serialize for KeyHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(self.0))
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for KeyHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let text = String::deserialize(d)?;
            let mut bytes = [0u8; 32];
            hex::decode_to_slice(&text, &mut bytes).map_err(serde::de::Error::custom)?;
            Ok(KeyHash(bytes))
        } else {
            Ok(KeyHash(<[u8; 32]>::deserialize(d)?))
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyIssued {
    pub key_id: String,
    pub name: String,
    #[serde(default)]
    pub owner: Option<String>,
    pub key_hash: KeyHash,
    pub scopes: Vec<Scope>,
    pub limits: Limits,
    #[serde(default)]
    pub budget: Option<Budget>,
    #[serde(default, with = "time::serde_opt_at")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// A change to a key's limits or budget; a `None` field is left as it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyUpdated {
    pub key_id: String,
    #[serde(default)]
    pub limits: Option<Limits>,
    #[serde(default)]
    pub budget: Option<Budget>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRevoked {
    pub key_id: String,
    pub by: String,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthChannel {
    Nats,
    Http,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthFailed {
    pub channel: AuthChannel,
    pub reason: String,
    /// The first characters of the presented key (never the whole key).
    #[serde(default)]
    pub key_prefix: Option<String>,
    #[serde(default)]
    pub remote: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    Rpm,
    Tpm,
    Parallel,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimited {
    pub key_id: String,
    pub limit: LimitKind,
    /// Refusals coalesced into this event (at most one event per key per second).
    pub count: u64,
    pub retry_after_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminAction {
    pub actor: String,
    pub action: String,
    pub target: String,
}
