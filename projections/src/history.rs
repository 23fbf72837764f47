//! history: each conversation's ordered messages, and the conversations of each key.
//!
//! Rows: `c` conv → [`ConversationSummary`]; `m` conv 0 seq → a chunk of the
//! conversation's message seqs, the first `seq`; `k` key 0 conv → () for
//! listing a key's conversations. Erasure deletes every message row, so an
//! erased conversation has no messages.
//!
//! The view holds where each message is in the log, not the message: a
//! message is its `message_received` or `reply_completed` event, read from
//! the log when a page is read ([`HistoryView::page`]). The log holds every
//! message already; a second copy in the view made a replay write four times
//! the conversations' text through sled.
//!
//! A chunk is the seqs of one or more messages, u64 big-endian, oldest
//! first. The messages a fold stages for a conversation before its commit go
//! into one chunk (up to [`CHUNK_MESSAGES`]), so a replay writes a row per
//! conversation and commit, not per message; a committed chunk is never
//! written again. Where the chunks end depends on when the fold committed, so
//! two views of the same log compare equal message by message ([`rows`]),
//! not row by row. Views of layout 1, which held the messages themselves, are
//! folded again (`ProjectionName::layout`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use switchboard_events::{time, Envelope, Event, EventLog};

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
    let conversation_id = match &envelope.event {
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
        Event::MessageReceived(e) => &e.conversation_id,
        Event::ReplyCompleted(e) => &e.conversation_id,
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
    let seq = envelope.seq.to_be_bytes();
    match view.last_staged_mut(&prefix) {
        Some(chunk) if chunk.len() < CHUNK_MESSAGES * SEQ_BYTES => chunk.extend_from_slice(&seq),
        _ => {
            let mut row = prefix;
            row.extend_from_slice(&seq);
            view.put_encoded(row, seq.to_vec());
        }
    }
    Ok(())
}

/// The most messages one chunk row holds.
pub const CHUNK_MESSAGES: usize = 256;

const SEQ_BYTES: usize = 8;

/// The seqs of a chunk row, oldest first.
fn chunk_seqs(key: &[u8], chunk: &[u8]) -> Result<Vec<u64>, ProjectionError> {
    if chunk.is_empty() || !chunk.len().is_multiple_of(SEQ_BYTES) {
        return Err(corrupt(
            key,
            format!("a chunk of {} bytes is not a list of seqs", chunk.len()),
        ));
    }
    Ok(chunk
        .chunks_exact(SEQ_BYTES)
        .map(|seq| u64::from_be_bytes(seq.try_into().expect("8 bytes")))
        .collect())
}

/// A message row `key` that says something the log does not bear out.
fn corrupt(key: &[u8], detail: String) -> ProjectionError {
    ProjectionError::CorruptRow {
        projection: NAME,
        key: String::from_utf8_lossy(key).into_owned(),
        detail,
    }
}

/// Every row of `tree` in key order, one row per message (its conversation
/// and seq → its seq) instead of its chunk: what two views of the same log
/// share, wherever their folds' commits ended the chunks.
pub fn rows(tree: &sled::Tree) -> impl Iterator<Item = RowResult> + '_ {
    tree.iter().flat_map(|entry| {
        let expanded = entry
            .map_err(ProjectionError::from)
            .and_then(|(key, value)| {
                if key.first() != Some(&b'm') || key.len() < 9 {
                    return Ok(vec![(key.to_vec(), value.to_vec())]);
                }
                let conversation = &key[..key.len() - 8];
                Ok(chunk_seqs(&key, &value)?
                    .into_iter()
                    .map(|seq| {
                        let mut row = conversation.to_vec();
                        row.extend_from_slice(&seq.to_be_bytes());
                        (row, seq.to_be_bytes().to_vec())
                    })
                    .collect())
            });
        match expanded {
            Ok(rows) => rows.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(error) => vec![Err(error)],
        }
    })
}

/// Read access to the history view, with the log its messages are read from.
#[derive(Clone)]
pub struct HistoryView {
    pub(crate) tree: sled::Tree,
    pub(crate) log: EventLog,
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
            for seq in chunk_seqs(&key, &chunk)? {
                messages.push(self.message(conversation_id, &key, seq)?);
            }
        }
        Ok(Some(Conversation { summary, messages }))
    }

    /// The message at `seq` of the log, which chunk row `key` of
    /// `conversation_id` names.
    fn message(
        &self,
        conversation_id: &str,
        key: &[u8],
        seq: u64,
    ) -> Result<HistoryMessage, ProjectionError> {
        let corrupt = |detail: String| corrupt(key, detail);
        let Some(envelope) = self.log.get(seq)? else {
            return Err(corrupt(format!(
                "names seq {seq}, which the log does not hold"
            )));
        };
        let (conversation, message) = match envelope.event {
            Event::MessageReceived(e) => (
                e.conversation_id,
                HistoryMessage {
                    message_id: e.message_id,
                    role: Role::User,
                    content: e.content,
                    agent: e.agent,
                    at: envelope.at,
                    seq,
                },
            ),
            Event::ReplyCompleted(e) => (
                e.conversation_id,
                HistoryMessage {
                    message_id: e.message_id,
                    role: Role::Assistant,
                    content: e.content,
                    agent: Some(e.agent),
                    at: envelope.at,
                    seq,
                },
            ),
            other => {
                return Err(corrupt(format!(
                    "names seq {seq}, a {} event, not a message",
                    other.type_name()
                )))
            }
        };
        if conversation != conversation_id {
            return Err(corrupt(format!(
                "names seq {seq}, a message of conversation {conversation:?}"
            )));
        }
        Ok(message)
    }

    /// One page of a conversation's messages, oldest first, or `None` if it
    /// never started: from where `from` says, at most `limit` of them, and no
    /// more once `fits` says a message no longer fits (it is asked of each
    /// message in reading order; the first is taken whatever it says), with
    /// whether more lie beyond the page in that direction. Reads only the
    /// chunks the page touches, and from the log only the messages it takes
    /// (and the one that did not fit).
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
        // Takes the message at `seq` onto the page, or says (false) the page
        // is full.
        let mut take = |messages: &mut Vec<HistoryMessage>,
                        key: &[u8],
                        seq: u64|
         -> Result<bool, ProjectionError> {
            if messages.len() == limit {
                return Ok(false);
            }
            let message = self.message(conversation_id, key, seq)?;
            if !fits(&message) && !messages.is_empty() {
                return Ok(false);
            }
            messages.push(message);
            Ok(true)
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
                    for seq in chunk_seqs(&key, &chunk)? {
                        if seq > after && !take(&mut messages, &key, seq)? {
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
                    for seq in chunk_seqs(&key, &chunk)?.into_iter().rev() {
                        if seq < before && !take(&mut messages, &key, seq)? {
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
