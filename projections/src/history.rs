//! history: each conversation's ordered messages, and the conversations of each key.
//!
//! Rows: `c` conv → [`ConversationSummary`]; `m` conv 0 seq → a chunk of the
//! conversation's messages, the first at `seq`; `k` key 0 conv → () for listing
//! a key's conversations. Erasure deletes every message row, so an erased
//! conversation holds no content.
//!
//! A chunk is the postcard encodings of one or more [`HistoryMessage`]s, one
//! after another, oldest first. The messages a fold stages for a conversation
//! before its commit go into one chunk (up to [`CHUNK_BYTES`]), so a replay
//! writes a row per conversation and commit, not per message; a committed
//! chunk is never written again. Where the chunks end depends on when the fold
//! committed, so two views of the same log compare equal message by message
//! ([`rows`]), not row by row. A row of a single message is the layout from
//! before chunks, so older views read as they are.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use switchboard_events::{time, Envelope, Event};

use crate::view::{decode_row, row_key, ProjectionError, Staged};
use crate::RowResult;

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

/// Where a page of a conversation's history starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageFrom {
    /// The oldest messages with a seq above this (0: from the first).
    After(u64),
    /// The newest messages with a seq below this (`u64::MAX`: the last ones).
    Before(u64),
}

/// One page of a conversation's messages, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    pub summary: ConversationSummary,
    pub messages: Vec<HistoryMessage>,
    /// More messages lie beyond the page, in the direction it was read.
    pub has_more: bool,
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
            if view.get_mut::<ConversationSummary>(&key)?.is_none() {
                view.put_typed(
                    key,
                    ConversationSummary {
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
            MessageFields {
                message_id: &e.message_id,
                role: Role::User,
                content: &e.content,
                agent: e.agent.as_deref(),
                at: envelope.at,
                seq: envelope.seq,
            },
        ),
        Event::ReplyCompleted(e) => (
            &e.conversation_id,
            MessageFields {
                message_id: &e.message_id,
                role: Role::Assistant,
                content: &e.content,
                agent: Some(&e.agent),
                at: envelope.at,
                seq: envelope.seq,
            },
        ),
        Event::ConversationErased(e) => {
            view.delete_prefix(&messages_prefix(&e.conversation_id))?;
            let key = summary_key(&e.conversation_id);
            if let Some(summary) = view.get_mut::<ConversationSummary>(&key)? {
                summary.erased = true;
                summary.messages = 0;
                summary.last_at = envelope.at;
            }
            return Ok(());
        }
        _ => return Ok(()),
    };
    if let Some(summary) = view.get_mut::<ConversationSummary>(&summary_key(conversation_id))? {
        summary.messages += 1;
        summary.last_at = envelope.at;
    }
    let prefix = messages_prefix(conversation_id);
    match view.last_staged_mut(&prefix) {
        Some(chunk) if chunk.len() < CHUNK_BYTES => message.encode_onto(chunk),
        _ => {
            let mut row = prefix;
            row.extend_from_slice(&envelope.seq.to_be_bytes());
            let mut chunk = Vec::new();
            message.encode_onto(&mut chunk);
            view.put_encoded(row, chunk);
        }
    }
    Ok(())
}

/// A [`HistoryMessage`] borrowing its text from the event, encoded exactly
/// as one: a fold writes messages without copying them first.
#[derive(Serialize)]
struct MessageFields<'a> {
    message_id: &'a str,
    role: Role,
    content: &'a str,
    agent: Option<&'a str>,
    #[serde(with = "time::serde_at")]
    at: DateTime<Utc>,
    seq: u64,
}

impl MessageFields<'_> {
    /// Appends the message's encoding to `chunk`.
    fn encode_onto(&self, chunk: &mut Vec<u8>) {
        *chunk = postcard::to_extend(self, std::mem::take(chunk))
            .expect("history messages always serialize");
    }
}

/// A staged chunk takes more messages while it is shorter than this. sled
/// writes a node of a tree (up to 17 rows) as one item, and an item over
/// 128 KiB as a file of its own: rows of a few KiB keep nodes below that,
/// however long the conversations.
pub const CHUNK_BYTES: usize = 4 * 1024;

/// The messages of the chunk stored at `key`, oldest first, each with its
/// encoding.
fn chunk_messages<'a>(
    key: &[u8],
    mut chunk: &'a [u8],
) -> Result<Vec<(HistoryMessage, &'a [u8])>, ProjectionError> {
    let corrupt = |detail: String| ProjectionError::CorruptRow {
        projection: NAME,
        key: String::from_utf8_lossy(key).into_owned(),
        detail,
    };
    if chunk.is_empty() {
        return Err(corrupt("a message row without a message".to_owned()));
    }
    let mut messages = Vec::new();
    while !chunk.is_empty() {
        let (message, rest) = postcard::take_from_bytes::<HistoryMessage>(chunk)
            .map_err(|e| corrupt(e.to_string()))?;
        messages.push((message, &chunk[..chunk.len() - rest.len()]));
        chunk = rest;
    }
    Ok(messages)
}

/// The rows of a history tree as two views of the same log share them: every
/// row as stored, but each message chunk as one row a message, keyed
/// `m` conv 0 seq, in key order.
pub fn rows(tree: &sled::Tree) -> impl Iterator<Item = RowResult> + '_ {
    tree.iter().flat_map(|entry| {
        let expanded = entry
            .map_err(ProjectionError::from)
            .and_then(|(key, value)| {
                if key.first() != Some(&b'm') || key.len() < 9 {
                    return Ok(vec![(key.to_vec(), value.to_vec())]);
                }
                let conversation = &key[..key.len() - 8];
                Ok(chunk_messages(&key, &value)?
                    .into_iter()
                    .map(|(message, encoded)| {
                        let mut row = conversation.to_vec();
                        row.extend_from_slice(&message.seq.to_be_bytes());
                        (row, encoded.to_vec())
                    })
                    .collect())
            });
        match expanded {
            Ok(rows) => rows.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(error) => vec![Err(error)],
        }
    })
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
            let (key, chunk) = entry?;
            messages.extend(
                chunk_messages(&key, &chunk)?
                    .into_iter()
                    .map(|(message, _)| message),
            );
        }
        Ok(Some(Conversation { summary, messages }))
    }

    /// One page of a conversation's messages, oldest first, or `None` if it
    /// never started: from where `from` says, at most `limit` of them, and no
    /// more once `fits` says a message no longer fits (it is asked of each
    /// message in reading order; the first is taken whatever it says), with
    /// whether more lie beyond the page in that direction. Reads only the
    /// chunks the page touches, however long the conversation.
    pub fn page(
        &self,
        conversation_id: &str,
        from: PageFrom,
        limit: usize,
        mut fits: impl FnMut(&HistoryMessage) -> bool,
    ) -> Result<Option<HistoryPage>, ProjectionError> {
        let key = summary_key(conversation_id);
        let Some(summary) = self.tree.get(&key)? else {
            return Ok(None);
        };
        let summary: ConversationSummary = decode_row(NAME, &key, &summary)?;
        let prefix = messages_prefix(conversation_id);
        let at = |seq: u64| {
            let mut key = prefix.clone();
            key.extend_from_slice(&seq.to_be_bytes());
            key
        };
        // Takes `message` onto the page, or says (false) the page is full.
        let mut take = |messages: &mut Vec<HistoryMessage>, message: HistoryMessage| {
            let fitting = fits(&message);
            if messages.len() == limit || (!fitting && !messages.is_empty()) {
                return false;
            }
            messages.push(message);
            true
        };
        let mut messages = Vec::new();
        let mut has_more = false;
        match from {
            PageFrom::After(after) => {
                let first = at(after.saturating_add(1));
                // The chunk holding `after + 1` starts at or before it.
                let start = match self.tree.range(prefix.clone()..=first.clone()).next_back() {
                    Some(entry) => entry?.0.to_vec(),
                    None => first,
                };
                'chunks: for entry in self.tree.range(start..) {
                    let (key, chunk) = entry?;
                    if !key.starts_with(&prefix) {
                        break;
                    }
                    for (message, _) in chunk_messages(&key, &chunk)? {
                        if message.seq > after && !take(&mut messages, message) {
                            has_more = true;
                            break 'chunks;
                        }
                    }
                }
            }
            PageFrom::Before(before) => {
                // A chunk starting below `before` may run past it.
                'chunks: for entry in self.tree.range(prefix.clone()..at(before)).rev() {
                    let (key, chunk) = entry?;
                    for (message, _) in chunk_messages(&key, &chunk)?.into_iter().rev() {
                        if message.seq < before && !take(&mut messages, message) {
                            has_more = true;
                            break 'chunks;
                        }
                    }
                }
                messages.reverse();
            }
        }
        Ok(Some(HistoryPage {
            summary,
            messages,
            has_more,
        }))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_fields_encode_as_the_history_message_they_borrow_from() {
        let at = time::now();
        for agent in [None, Some("echo")] {
            let message = HistoryMessage {
                message_id: "m-1".into(),
                role: Role::Assistant,
                content: "some words, and then ünïcode".into(),
                agent: agent.map(str::to_owned),
                at,
                seq: 300,
            };
            let fields = MessageFields {
                message_id: &message.message_id,
                role: message.role,
                content: &message.content,
                agent: message.agent.as_deref(),
                at,
                seq: message.seq,
            };
            let mut chunk = vec![7];
            fields.encode_onto(&mut chunk);
            assert_eq!(chunk[0], 7, "appended after what the chunk held");
            assert_eq!(chunk[1..], postcard::to_stdvec(&message).expect("encodes"));
        }
    }
}
