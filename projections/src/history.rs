//! history: each conversation's ordered messages, and the conversations of each key.
//!
//! Rows: `c` conv → [`ConversationSummary`]; `m` conv 0 seq → [`HistoryMessage`];
//! `k` key 0 conv → () for listing a key's conversations. Erasure deletes every
//! message row, so an erased conversation holds no content.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use switchboard_events::{time, Envelope, Event};

use crate::view::{decode_row, row_key, ProjectionError, Staged};

pub const NAME: &str = "history";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Assistant,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryMessage {
    pub message_id: String,
    pub role: Role,
    pub content: String,
    /// The agent asked for (user) or that replied (assistant).
    pub agent: Option<String>,
    #[serde(with = "time::serde_at")]
    pub at: DateTime<Utc>,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationSummary {
    pub conversation_id: String,
    pub key_id: String,
    pub user: Option<String>,
    #[serde(with = "time::serde_at")]
    pub started_at: DateTime<Utc>,
    #[serde(with = "time::serde_at")]
    pub last_at: DateTime<Utc>,
    pub messages: u64,
    pub erased: bool,
}

/// A conversation with its messages, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    #[serde(flatten)]
    pub summary: ConversationSummary,
    pub messages: Vec<HistoryMessage>,
}

fn summary_key(conversation_id: &str) -> Vec<u8> {
    row_key(b'c', &[conversation_id.as_bytes()])
}

fn messages_prefix(conversation_id: &str) -> Vec<u8> {
    row_key(b'm', &[conversation_id.as_bytes(), b""])
}

fn key_index(key_id: &str, conversation_id: &str) -> Vec<u8> {
    row_key(b'k', &[key_id.as_bytes(), conversation_id.as_bytes()])
}

pub fn apply(view: &mut Staged, envelope: &Envelope) -> Result<(), ProjectionError> {
    let (conversation_id, message) = match &envelope.event {
        Event::ConversationStarted(e) => {
            let key = summary_key(&e.conversation_id);
            if view.get::<ConversationSummary>(&key)?.is_none() {
                view.put(
                    key,
                    &ConversationSummary {
                        conversation_id: e.conversation_id.clone(),
                        key_id: e.key_id.clone(),
                        user: e.user.clone(),
                        started_at: envelope.at,
                        last_at: envelope.at,
                        messages: 0,
                        erased: false,
                    },
                );
                view.put(key_index(&e.key_id, &e.conversation_id), &());
            }
            return Ok(());
        }
        Event::MessageReceived(e) => (
            &e.conversation_id,
            HistoryMessage {
                message_id: e.message_id.clone(),
                role: Role::User,
                content: e.content.clone(),
                agent: e.agent.clone(),
                at: envelope.at,
                seq: envelope.seq,
            },
        ),
        Event::ReplyCompleted(e) => (
            &e.conversation_id,
            HistoryMessage {
                message_id: e.message_id.clone(),
                role: Role::Assistant,
                content: e.content.clone(),
                agent: Some(e.agent.clone()),
                at: envelope.at,
                seq: envelope.seq,
            },
        ),
        Event::ConversationErased(e) => {
            view.delete_prefix(&messages_prefix(&e.conversation_id))?;
            let key = summary_key(&e.conversation_id);
            if let Some(mut summary) = view.get::<ConversationSummary>(&key)? {
                summary.erased = true;
                summary.messages = 0;
                summary.last_at = envelope.at;
                view.put(key, &summary);
            }
            return Ok(());
        }
        _ => return Ok(()),
    };
    let key = summary_key(conversation_id);
    if let Some(mut summary) = view.get::<ConversationSummary>(&key)? {
        summary.messages += 1;
        summary.last_at = envelope.at;
        view.put(key, &summary);
    }
    let mut row = messages_prefix(conversation_id);
    row.extend_from_slice(&envelope.seq.to_be_bytes());
    view.put(row, &message);
    Ok(())
}

/// Read access to the history view.
#[derive(Clone)]
pub struct HistoryView {
    pub(crate) tree: sled::Tree,
}

impl HistoryView {
    /// A conversation and its messages in order, or `None` if it never started.
    pub fn conversation(
        &self,
        conversation_id: &str,
    ) -> Result<Option<Conversation>, ProjectionError> {
        let key = summary_key(conversation_id);
        let Some(summary) = self.tree.get(&key)? else {
            return Ok(None);
        };
        let summary: ConversationSummary = decode_row(NAME, &key, &summary)?;
        let mut messages = Vec::new();
        for entry in self.tree.scan_prefix(messages_prefix(conversation_id)) {
            let (key, value) = entry?;
            messages.push(decode_row(NAME, &key, &value)?);
        }
        Ok(Some(Conversation { summary, messages }))
    }

    /// The conversations a key started, by conversation id, after `after` (paging).
    pub fn conversations_of_key(
        &self,
        key_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ConversationSummary>, ProjectionError> {
        let prefix = row_key(b'k', &[key_id.as_bytes(), b""]);
        let start = match after {
            Some(after) => {
                let mut start = key_index(key_id, after);
                start.push(0);
                start
            }
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        for entry in self.tree.range(start..) {
            let (key, _) = entry?;
            if !key.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            let conversation_id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            let summary_key = summary_key(&conversation_id);
            if let Some(summary) = self.tree.get(&summary_key)? {
                out.push(decode_row(NAME, &summary_key, &summary)?);
            }
        }
        Ok(out)
    }
}
