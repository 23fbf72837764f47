//! Following one message's turn on the conversation's events.

use std::collections::VecDeque;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::error::OpenAiError;
use crate::bus::Subscription;
use crate::http::core::Core;
use crate::http::ApiError;

/// The longest a reply is waited for; then 504 (or an error chunk). The turn
/// itself goes on and is stored.
pub(super) const REPLY_WAIT: Duration = Duration::from_secs(600);
/// How long a completed reply's `usage_recorded` is awaited live before it is
/// looked up in the log (both are appended together, so it is there).
const USAGE_WAIT: Duration = Duration::from_secs(5);

/// Token counts of a turn.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Usage {
    pub(super) prompt_tokens: u64,
    pub(super) completion_tokens: u64,
}

impl Usage {
    fn of(data: &Value) -> Usage {
        Usage {
            prompt_tokens: data["prompt_tokens"].as_u64().unwrap_or(0),
            completion_tokens: data["completion_tokens"].as_u64().unwrap_or(0),
        }
    }

    pub(super) fn to_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

/// What happens in one turn, in order: deltas, then `Completed` and `Usage`,
/// or `Failed`.
#[derive(Debug)]
pub(super) enum TurnStep {
    Delta {
        reply_id: String,
        index: u64,
        text: String,
    },
    Completed(Reply),
    Failed {
        code: String,
        message: String,
    },
    Usage(Usage),
}

/// A completed reply.
#[derive(Debug, Clone, Default)]
pub(super) struct Reply {
    pub(super) reply_id: String,
    pub(super) content: String,
    pub(super) finish_reason: String,
    pub(super) usage: Usage,
}

/// Follows one message's turn on the conversation's events: the live deltas
/// and the stored end, or the end already in the log when the send was a
/// duplicate. Repeats (the outbox delivers at least once) are dropped.
pub(super) struct TurnFollower {
    core: Core,
    caller: HeaderMap,
    conversation_id: String,
    message_id: String,
    /// The conversation's live events; `None` when the core's answer held
    /// the turn's whole end.
    events: Option<Subscription>,
    queued: VecDeque<TurnStep>,
    /// The seq of the `reply_completed`, once seen: then only usage is awaited.
    completed_seq: Option<u64>,
    /// For a resent message, or events subscribed after the send: the seq
    /// after which the log is read once, before `events`, for what may have
    /// been stored before the subscription.
    look_in_log: Option<u64>,
    done: bool,
    deadline: Instant,
}

impl TurnFollower {
    fn new(
        core: Core,
        caller: HeaderMap,
        conversation_id: String,
        ack: &Value,
        events: Option<Subscription>,
    ) -> TurnFollower {
        TurnFollower {
            core,
            caller,
            conversation_id,
            message_id: ack["message_id"].as_str().unwrap_or_default().to_owned(),
            events,
            queued: VecDeque::new(),
            completed_seq: None,
            look_in_log: None,
            done: false,
            deadline: Instant::now() + REPLY_WAIT,
        }
    }

    /// Follows the turn a send acknowledged (`ack`) on `events`, subscribed
    /// before the send — or after it when `subscribed_late`, so the log is
    /// read for what happened in between.
    pub(super) async fn start(
        core: Core,
        caller: HeaderMap,
        conversation_id: String,
        ack: &Value,
        events: Subscription,
        subscribed_late: bool,
    ) -> TurnFollower {
        let mut turn = TurnFollower::new(core, caller, conversation_id, ack, Some(events));
        // A resent message's turn may be over already: its end is then in
        // the log. One stored later comes on `events`.
        if subscribed_late || ack["duplicate"] == json!(true) {
            turn.look_in_log = Some(ack["seq"].as_u64().unwrap_or(1).saturating_sub(1));
        }
        turn
    }

    /// The turn whose stored end the core's answer to a waited send carries
    /// as `turn`; `None` when the answer has no whole end.
    pub(super) fn ended(
        core: Core,
        caller: HeaderMap,
        conversation_id: String,
        ack: &Value,
    ) -> Option<TurnFollower> {
        let end = ack["turn"].as_array()?;
        let mut turn = TurnFollower::new(core, caller, conversation_id, ack, None);
        for envelope in end {
            turn.take(envelope);
        }
        turn.done.then_some(turn)
    }

    /// Takes the conversation's stored events after `seq` until the turn is
    /// done or the log has no more; a failed read is tried again until
    /// `until`.
    async fn look_in_log(&mut self, seq: u64, until: Instant) -> Result<(), ApiError> {
        let (core, caller) = (self.core.clone(), self.caller.clone());
        let conversation_id = self.conversation_id.clone();
        core.look_in_log(&caller, &conversation_id, seq, until, |envelope| {
            self.take(envelope);
            self.done
        })
        .await
    }

    /// Queues what a stored event says about this turn, if anything.
    fn take(&mut self, envelope: &Value) {
        let data = &envelope["data"];
        if self.done || data["message_id"].as_str() != Some(self.message_id.as_str()) {
            return;
        }
        match (envelope["type"].as_str(), self.completed_seq) {
            (Some("reply_completed"), None) => {
                self.completed_seq = Some(envelope["seq"].as_u64().unwrap_or(0));
                self.queued.push_back(TurnStep::Completed(Reply {
                    reply_id: data["reply_id"].as_str().unwrap_or_default().to_owned(),
                    content: data["content"].as_str().unwrap_or_default().to_owned(),
                    finish_reason: data["finish_reason"].as_str().unwrap_or("stop").to_owned(),
                    usage: Usage::default(),
                }));
            }
            (Some("reply_failed"), None) => {
                self.done = true;
                self.queued.push_back(TurnStep::Failed {
                    code: data["code"].as_str().unwrap_or("internal").to_owned(),
                    message: data["message"].as_str().unwrap_or_default().to_owned(),
                });
            }
            (Some("usage_recorded"), Some(_)) => {
                self.done = true;
                self.queued.push_back(TurnStep::Usage(Usage::of(data)));
            }
            _ => {}
        }
    }

    /// The next step; `None` once the turn is over.
    pub(super) async fn next(&mut self) -> Result<Option<TurnStep>, OpenAiError> {
        loop {
            if let Some(step) = self.queued.pop_front() {
                return Ok(Some(step));
            }
            if self.done {
                return Ok(None);
            }
            let limit = match self.completed_seq {
                Some(_) => self.deadline.min(Instant::now() + USAGE_WAIT),
                None => self.deadline,
            };
            if let Some(after) = self.look_in_log.take() {
                let deadline = self.deadline;
                self.look_in_log(after, deadline).await?;
                continue;
            }
            let Some(events) = &mut self.events else {
                // Only a whole stored end is followed without events.
                return Ok(None);
            };
            let message = tokio::select! {
                message = events.recv() => message,
                () = tokio::time::sleep_until(limit) => {
                    let Some(seq) = self.completed_seq else {
                        return Err(OpenAiError::timeout());
                    };
                    if let Err(error) = self.look_in_log(seq, Instant::now()).await {
                        tracing::warn!(code = %error.code, "cannot read the conversation's events");
                    }
                    if !self.done {
                        let message_id = &self.message_id;
                        tracing::warn!(%message_id, "no usage_recorded for a completed reply");
                        self.done = true;
                    }
                    continue;
                }
            };
            let Some(message) = message else {
                return Err(OpenAiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "service_unavailable",
                    "the core's events stopped before the reply ended",
                ));
            };
            let Ok(body) = serde_json::from_slice::<Value>(&message.payload) else {
                continue;
            };
            if !message.subject.ends_with(".reply_delta") {
                self.take(&body);
                continue;
            }
            if self.completed_seq.is_none()
                && body["message_id"].as_str() == Some(self.message_id.as_str())
            {
                return Ok(Some(TurnStep::Delta {
                    reply_id: body["reply_id"].as_str().unwrap_or_default().to_owned(),
                    index: body["index"].as_u64().unwrap_or(0),
                    text: body["delta"].as_str().unwrap_or_default().to_owned(),
                }));
            }
        }
    }

    /// Waits for the whole reply and its usage, skipping the deltas.
    pub(super) async fn into_reply(mut self) -> Result<Reply, OpenAiError> {
        let mut reply = None;
        while let Some(step) = self.next().await? {
            match step {
                TurnStep::Delta { .. } => {}
                TurnStep::Completed(completed) => reply = Some(completed),
                TurnStep::Failed { code, message } => {
                    return Err(OpenAiError::turn_failed(&code, &message))
                }
                TurnStep::Usage(usage) => {
                    if let Some(reply) = &mut reply {
                        reply.usage = usage;
                    }
                }
            }
        }
        reply.ok_or_else(|| {
            OpenAiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal",
                "the turn ended without a reply",
            )
        })
    }
}
