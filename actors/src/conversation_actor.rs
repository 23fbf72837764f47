//! The `ConversationActor`, one per live conversation and the single writer of
//! its stream `conv/<id>` (DESIGN §5). The [`ConversationRegistry`] that
//! spawns, routes to and passivates them lives in
//! [`crate::conversation_registry`] and is re-exported here.
//!
//! The rules of a send live in [`crate::conversation`]; this module adds what
//! needs a process: recovery from the log on spawn, an acknowledgment only
//! after the durable append, one mailbox per conversation so its appends never
//! race each other, and a bound on how many conversations are held in memory.
//! It also appends the end of each turn ([`ConversationMsg::EndTurn`]), which
//! the agent returns rather than writes, so the stream keeps one writer.
//!
//! ```no_run
//! use switchboard_actors::conversation::SendCommand;
//! use switchboard_actors::conversation_actor::{ConversationRegistry, RegistryConfig};
//! use switchboard_events::{EventLog, OpenMode};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let log = EventLog::open("./data".as_ref(), OpenMode::CreateIfMissing)?;
//! let registry = ConversationRegistry::new(log, RegistryConfig::default());
//! let send = SendCommand {
//!     message_id: "m1".into(),
//!     key_id: "key_1".into(),
//!     user: None,
//!     content: "hello".into(),
//!     requested_agent: None,
//!     agent: "echo".into(),
//!     rule: None,
//!     correlation_id: None,
//!     traceparent: None,
//! };
//! let first = registry.send("c1", send.clone()).await?;
//! let again = registry.send("c1", send).await?;
//! assert_eq!((again.seq, again.duplicate), (first.seq, true));
//! registry.shutdown().await;
//! # Ok(()) }
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use switchboard_events::catalog::ConversationErased;
use switchboard_events::{
    AppendError, Appended, Event, EventLog, ExpectedVersion, NewEvent, StreamId, WhenDurable,
};
use tokio::sync::{watch, Notify};
use uuid::Uuid;

use crate::conversation::{ConversationState, SendCommand, SendPlan, TurnOutcome};
pub use crate::conversation_registry::{ConversationRegistry, RegistryConfig};
use crate::stream_read::fold_stream;
use crate::turn_context::ContextReader;

/// The acknowledgment of a send: the message is durably stored at `seq` (the
/// seq of its `message_received`). `duplicate`: it was stored by an earlier send
/// with the same `message_id`, and this one appended nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub conversation_id: String,
    pub message_id: String,
    pub seq: u64,
    pub duplicate: bool,
}

/// When the message of an ack given early ([`ConversationMsg::SendEarly`])
/// is durable. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Durable(watch::Receiver<Option<Result<(), ConversationError>>>);

impl Durable {
    /// Already durable: a duplicate's message, or one appended the usual way.
    pub(crate) fn already() -> Durable {
        Durable(watch::channel(Some(Ok(()))).1)
    }

    /// Waits until the message is durable; an error when it could not be
    /// made so (the log failed) or the actor stopped first.
    pub async fn wait(mut self) -> Result<(), ConversationError> {
        match self.0.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().unwrap_or(Ok(())),
            Err(_) => Err(ConversationError::Unavailable(
                "the conversation stopped before its message was stored; resend with the same message_id"
                    .into(),
            )),
        }
    }
}

/// Why a send was not acknowledged; [`ConversationError::code`] is the error
/// code of DESIGN §6.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversationError {
    /// The request can never succeed as it is (bad conversation id, no message id).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The caller's key may not do this (the conversation belongs to another key).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// Another writer kept appending to the conversation's stream; resending
    /// with the same `message_id` is safe.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The log or the conversation's actor is unavailable, or stopped before
    /// answering. The message may or may not be stored: resend it with the
    /// same `message_id`, which is deduplicated.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The conversation has no events (nobody started it).
    #[error("not found: {0}")]
    NotFound(String),
    /// A bug or a corrupt log; retrying will not help.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ConversationError {
    /// The code of DESIGN §6: `invalid_request`, `forbidden`, `conflict`,
    /// `unavailable` or `internal`; and `not_found` for a conversation
    /// nobody started (HTTP's 404).
    pub fn code(&self) -> &'static str {
        match self {
            ConversationError::NotFound(_) => "not_found",
            ConversationError::InvalidRequest(_) => "invalid_request",
            ConversationError::Forbidden(_) => "forbidden",
            ConversationError::Conflict(_) => "conflict",
            ConversationError::Unavailable(_) => "unavailable",
            ConversationError::Internal(_) => "internal",
        }
    }

    /// The human-readable message, without the code.
    pub fn message(&self) -> &str {
        match self {
            ConversationError::InvalidRequest(m)
            | ConversationError::Forbidden(m)
            | ConversationError::Conflict(m)
            | ConversationError::Unavailable(m)
            | ConversationError::NotFound(m)
            | ConversationError::Internal(m) => m,
        }
    }
}

/// Checks a conversation id against DESIGN §6: `[A-Za-z0-9_-]{1,128}`.
/// (Stream names allow `.` and `:` too; conversation ids on the wire do not.)
pub fn validate_conversation_id(id: &str) -> Result<(), ConversationError> {
    let valid = (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        let shown: String = id.chars().take(140).collect();
        Err(ConversationError::InvalidRequest(format!(
            "conversation id {shown:?} must be 1-128 characters from [A-Za-z0-9_-]"
        )))
    }
}

/// The actor of one conversation. Spawn it with [`ConversationArgs`]; the
/// [`ConversationRegistry`] does, and is the way to reach it.
pub struct ConversationActor;

/// What a [`ConversationActor`] starts from.
pub struct ConversationArgs {
    pub conversation_id: String,
    pub log: EventLog,
    /// Where the actor folds what it appends, for the turns' contexts.
    pub(crate) contexts: Option<Arc<ContextReader>>,
    /// Held for the actor's lifetime so the registry knows when it is gone.
    pub(crate) alive: Option<AliveToken>,
}

impl ConversationArgs {
    pub fn new(conversation_id: impl Into<String>, log: EventLog) -> Self {
        ConversationArgs {
            conversation_id: conversation_id.into(),
            log,
            contexts: None,
            alive: None,
        }
    }
}

/// The messages a [`ConversationActor`] handles.
pub enum ConversationMsg {
    /// Store a message (once per `message_id`) and acknowledge it. The reply
    /// comes only after the durable append, or with a coded error.
    Send(SendCommand, RpcReplyPort<Result<Ack, ConversationError>>),
    /// [`ConversationMsg::Send`], answered as soon as the message is written,
    /// before it is durable, with what says when it is: for a caller that
    /// tells nobody of the ack before then, and would rather start the turn
    /// while the flush runs. The actor takes its next message only once the
    /// message is durable, so nothing else it answers is ahead of the disk.
    SendEarly(
        SendCommand,
        RpcReplyPort<Result<(Ack, Durable), ConversationError>>,
    ),
    /// Append the events that end the turn of `message_id` (an agent's
    /// [`crate::agent::TurnOutcome::events`]), in one append at the stream's
    /// version, answering the seq of the first. Idempotent: a turn that
    /// already ended appends nothing and answers `Ok(None)`, so a late or
    /// repeated end cannot give a message two replies.
    EndTurn {
        message_id: String,
        events: Vec<NewEvent>,
        reply: RpcReplyPort<Result<Option<u64>, ConversationError>>,
    },
    /// The turns received but not yet ended, oldest first.
    Pending(RpcReplyPort<Result<Vec<PendingTurn>, ConversationError>>),
    /// The duplicate ack a send of `message_id` by `key_id` would get, if the
    /// message is stored; nothing is appended. `Forbidden` when another key
    /// started the conversation.
    Stored {
        key_id: String,
        message_id: String,
        reply: RpcReplyPort<Result<Option<Ack>, ConversationError>>,
    },
    /// Erase the conversation's content: append `conversation_erased` (by the
    /// single writer, at the stream's version). Erasing an erased
    /// conversation appends nothing; one nobody started is `NotFound`.
    Erase {
        by: String,
        reply: RpcReplyPort<Result<Erased, ConversationError>>,
    },
}

/// What an erase did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Erased {
    /// The seq of the `conversation_erased` appended now; `None` when the
    /// conversation was already erased and nothing was written since.
    pub seq: Option<u64>,
}

/// A turn received but not yet ended (no `reply_completed` or `reply_failed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTurn {
    pub message_id: String,
    /// The seq of its `message_received`.
    pub message_seq: u64,
    /// The agent it was routed to, if `agent_routed` is stored.
    pub agent: Option<String>,
}

/// A [`ConversationActor`]'s state: the folded stream and where to append.
pub struct ConversationActorState {
    conversation_id: String,
    stream: StreamId,
    log: EventLog,
    contexts: Option<Arc<ContextReader>>,
    /// `None` until recovered: a failed recovery is retried by the next command,
    /// so a passing storage error costs answers, not the actor.
    folded: Option<ConversationState>,
    _alive: Option<AliveToken>,
}

#[ractor::async_trait]
impl Actor for ConversationActor {
    type Msg = ConversationMsg;
    type State = ConversationActorState;
    type Arguments = ConversationArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<ConversationMsg>,
        args: ConversationArgs,
    ) -> Result<ConversationActorState, ActorProcessingErr> {
        let stream = StreamId::conversation(&args.conversation_id)?;
        let mut state = ConversationActorState {
            conversation_id: args.conversation_id,
            stream,
            log: args.log,
            contexts: args.contexts,
            folded: None,
            _alive: args.alive,
        };
        if let Err(error) = state.recovered().await {
            tracing::warn!(conversation_id = %state.conversation_id, %error,
                "conversation not recovered; the next command retries");
        }
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<ConversationMsg>,
        message: ConversationMsg,
        state: &mut ConversationActorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ConversationMsg::Send(command, reply) => {
                let answer = state.traced_send(&command, false).await;
                // A caller that gave up can resend; the stored message is deduplicated.
                let _ = reply.send(answer.map(|(ack, _)| ack));
            }
            ConversationMsg::SendEarly(command, reply) => {
                let (answer, written) = match state.traced_send(&command, true).await {
                    Ok((ack, written)) => (Ok(ack), written),
                    Err(error) => (Err(error), None),
                };
                let Some(written) = written else {
                    let _ = reply.send(answer.map(|ack| (ack, Durable::already())));
                    return Ok(());
                };
                let (durable, durable_seen) = watch::channel(None);
                let _ = reply.send(answer.map(|ack| (ack, Durable(durable_seen))));
                let outcome = written
                    .wait()
                    .await
                    .map(drop)
                    .map_err(|error| append_error(&state.conversation_id, error));
                if outcome.is_err() {
                    // Folded, but not stored: recovered from the log next time.
                    state.folded = None;
                }
                durable.send_replace(Some(outcome));
            }
            ConversationMsg::EndTurn {
                message_id,
                events,
                reply,
            } => {
                let answer = state.end_turn(&message_id, events).await;
                if let Err(error) = &answer {
                    tracing::warn!(conversation_id = %state.conversation_id,
                        %message_id, code = error.code(), %error, "ending a turn failed");
                }
                let _ = reply.send(answer);
            }
            ConversationMsg::Erase { by, reply } => {
                let answer = state.erase(&by).await;
                if let Err(error) = &answer {
                    tracing::warn!(conversation_id = %state.conversation_id,
                        code = error.code(), %error, "erasing failed");
                }
                let _ = reply.send(answer);
            }
            ConversationMsg::Stored {
                key_id,
                message_id,
                reply,
            } => {
                let conversation_id = state.conversation_id.clone();
                let answer = state.recovered().await.and_then(|folded| {
                    match folded.stored_message(&key_id, &message_id) {
                        Ok(seq) => Ok(seq.map(|seq| Ack {
                            conversation_id: conversation_id.clone(),
                            message_id,
                            seq,
                            duplicate: true,
                        })),
                        Err(()) => Err(ConversationError::Forbidden(format!(
                            "conversation {conversation_id} was started by another key"
                        ))),
                    }
                });
                let _ = reply.send(answer);
            }
            ConversationMsg::Pending(reply) => {
                let answer = state.recovered().await.map(|folded| {
                    folded
                        .pending_turns()
                        .into_iter()
                        .map(|(message_id, turn)| PendingTurn {
                            message_id: message_id.to_owned(),
                            message_seq: turn.message_seq,
                            agent: turn.agent.clone(),
                        })
                        .collect()
                });
                let _ = reply.send(answer);
            }
        }
        Ok(())
    }
}

/// How often a send is re-planned after a version conflict. The actor is the
/// single writer, so a conflict means someone else wrote (an offline CLI, a
/// node that had not yet stopped); catching up once is enough in practice.
const CONFLICT_RETRIES: usize = 1;

impl ConversationActorState {
    /// The folded state, recovering it from the stream when it is not known.
    async fn recovered(&mut self) -> Result<&mut ConversationState, ConversationError> {
        if self.folded.is_none() {
            let folded = fold_stream(
                &self.log,
                &self.stream,
                1,
                ConversationState::new(&self.conversation_id),
                |folded, envelope| folded.apply(&envelope),
            )
            .await?;
            self.folded = Some(folded);
        }
        Ok(self.folded.as_mut().expect("recovered just above"))
    }

    /// Folds this actor's own append from what it appended (`events`, with
    /// their `ids`) and the positions the log gave it, without reading the
    /// events back — into its state and the turns' contexts. The append
    /// expected the stream at the state's version, so nothing can lie between.
    fn fold_own(&mut self, appended: &Appended, ids: &[Uuid], events: &[Event]) {
        if let Some(folded) = self.folded.as_mut() {
            for (position, event) in appended.positions.iter().zip(events) {
                folded.apply_event(position.seq, position.version, event);
            }
        }
        if let Some(contexts) = self.contexts.as_ref().filter(|_| !appended.deduplicated) {
            let folded = appended.positions.iter().zip(ids).zip(events);
            contexts.appended(
                &self.stream,
                folded.map(|((position, id), event)| (position.version, *id, event)),
            );
        }
    }

    /// Folds what another writer added to the stream since the state's version.
    /// On failure the state is dropped, to be recovered whole by the next command.
    fn catch_up(&mut self) {
        let Some(folded) = self.folded.as_mut() else {
            return;
        };
        for envelope in self.log.read_stream(&self.stream, folded.version + 1) {
            match envelope {
                Ok(envelope) => folded.apply(&envelope),
                Err(error) => {
                    tracing::warn!(conversation_id = %self.conversation_id, %error,
                        "cannot read back the stream; recovering it on the next command");
                    self.folded = None;
                    return;
                }
            }
        }
    }

    /// [`ConversationActorState::send`] in its span, logging a failure.
    async fn traced_send(
        &mut self,
        command: &SendCommand,
        early: bool,
    ) -> Result<(Ack, Option<WhenDurable>), ConversationError> {
        #[cfg(test)]
        if command.content == tests::PANIC {
            panic!("a conversation actor panics, as a bug would");
        }
        let span = tracing::debug_span!(
            "conversation.send",
            conversation_id = %self.conversation_id,
            message_id = %command.message_id,
            key_id = %command.key_id,
            seq = tracing::field::Empty,
        );
        crate::trace::continue_trace(&span, command.traceparent.as_deref());
        let answer = tracing::Instrument::instrument(self.send(command, early), span.clone()).await;
        if let Ok((ack, _)) = &answer {
            span.record("seq", ack.seq);
        }
        if let Err(error) = &answer {
            tracing::warn!(conversation_id = %self.conversation_id,
                message_id = %command.message_id, code = error.code(), %error, "send failed");
        }
        answer
    }

    /// Stores the message unless it is stored already, and acknowledges it:
    /// once durable, or with `early` once written, with what says when it is
    /// durable (`None` when it is already).
    async fn send(
        &mut self,
        command: &SendCommand,
        early: bool,
    ) -> Result<(Ack, Option<WhenDurable>), ConversationError> {
        let mut retries = CONFLICT_RETRIES;
        loop {
            let plan = self.recovered().await?.plan_send(command);
            let (expected, events) = match plan {
                SendPlan::Duplicate { message_seq } => {
                    return Ok((self.ack(command, message_seq, true), None))
                }
                SendPlan::NotOwner => {
                    return Err(ConversationError::Forbidden(format!(
                        "conversation {} was started by another key",
                        self.conversation_id
                    )))
                }
                SendPlan::Append { expected, events } => (expected, events),
            };
            let received = events
                .iter()
                .position(|e| matches!(e.event, Event::MessageReceived(_)))
                .ok_or_else(|| {
                    ConversationError::Internal("a send plan without message_received".into())
                })?;
            let appending: Vec<Event> = events.iter().map(|e| e.event.clone()).collect();
            let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
            let appended = match early {
                true => self
                    .log
                    .append_early(self.stream.clone(), expected, events)
                    .await
                    .map(|(appended, durable)| (appended, Some(durable))),
                false => self
                    .log
                    .append(self.stream.clone(), expected, events)
                    .await
                    .map(|appended| (appended, None)),
            };
            match appended {
                Ok((appended, durable)) => {
                    let seq = appended
                        .positions
                        .get(received)
                        .map(|p| p.seq)
                        .ok_or_else(|| {
                            ConversationError::Internal("the log returned too few positions".into())
                        })?;
                    self.fold_own(&appended, &ids, &appending);
                    return Ok((self.ack(command, seq, appended.deduplicated), durable));
                }
                Err(AppendError::Conflict { actual, .. }) if retries > 0 => {
                    retries -= 1;
                    tracing::info!(conversation_id = %self.conversation_id, actual,
                        "another writer appended to the conversation; catching up");
                    self.catch_up();
                }
                Err(error) => return Err(append_error(&self.conversation_id, error)),
            }
        }
    }

    /// Appends a turn's end unless the turn already ended; see [`ConversationMsg::EndTurn`].
    async fn end_turn(
        &mut self,
        message_id: &str,
        events: Vec<NewEvent>,
    ) -> Result<Option<u64>, ConversationError> {
        if events.is_empty() {
            return Err(ConversationError::InvalidRequest(
                "a turn ends with at least one event".into(),
            ));
        }
        let mut retries = CONFLICT_RETRIES;
        loop {
            let folded = self.recovered().await?;
            match folded.turn(message_id).map(|turn| turn.outcome) {
                None => {
                    return Err(ConversationError::InvalidRequest(format!(
                        "conversation {} has no message {message_id:?} to answer",
                        self.conversation_id
                    )))
                }
                Some(TurnOutcome::Completed | TurnOutcome::Failed) => return Ok(None),
                Some(TurnOutcome::Pending) => {}
            }
            let expected = ExpectedVersion::Exact(folded.version);
            // Cloned so a conflict can retry; a turn's end is two small events.
            match self
                .log
                .append(self.stream.clone(), expected, events.clone())
                .await
            {
                Ok(appended) => {
                    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
                    let appending: Vec<Event> = events.into_iter().map(|e| e.event).collect();
                    self.fold_own(&appended, &ids, &appending);
                    return Ok(Some(appended.first().seq));
                }
                Err(AppendError::Conflict { actual, .. }) if retries > 0 => {
                    retries -= 1;
                    tracing::info!(conversation_id = %self.conversation_id, actual,
                        "another writer appended to the conversation; catching up");
                    self.catch_up();
                }
                Err(error) => return Err(append_error(&self.conversation_id, error)),
            }
        }
    }

    /// See [`ConversationMsg::Erase`].
    async fn erase(&mut self, by: &str) -> Result<Erased, ConversationError> {
        let mut retries = CONFLICT_RETRIES;
        loop {
            let conversation_id = self.conversation_id.clone();
            let folded = self.recovered().await?;
            if folded.version == 0 {
                return Err(ConversationError::NotFound(format!(
                    "no conversation {conversation_id}"
                )));
            }
            if folded.erased && !folded.has_content_after_erasure() {
                return Ok(Erased { seq: None });
            }
            let expected = ExpectedVersion::Exact(folded.version);
            let event = Event::ConversationErased(ConversationErased {
                conversation_id,
                by: by.to_owned(),
            });
            let erasure = NewEvent::new(event.clone());
            let id = erasure.id;
            match self
                .log
                .append(self.stream.clone(), expected, vec![erasure])
                .await
            {
                Ok(appended) => {
                    self.fold_own(&appended, &[id], std::slice::from_ref(&event));
                    return Ok(Erased {
                        seq: Some(appended.first().seq),
                    });
                }
                Err(AppendError::Conflict { actual, .. }) if retries > 0 => {
                    retries -= 1;
                    tracing::info!(conversation_id = %self.conversation_id, actual,
                        "another writer appended to the conversation; catching up");
                    self.catch_up();
                }
                Err(error) => return Err(append_error(&self.conversation_id, error)),
            }
        }
    }

    fn ack(&self, command: &SendCommand, seq: u64, duplicate: bool) -> Ack {
        Ack {
            conversation_id: self.conversation_id.clone(),
            message_id: command.message_id.clone(),
            seq,
            duplicate,
        }
    }
}

fn append_error(conversation_id: &str, error: AppendError) -> ConversationError {
    match error {
        AppendError::Conflict { .. } => ConversationError::Conflict(format!(
            "conversation {conversation_id} kept changing under its writer: {error}"
        )),
        AppendError::Closed | AppendError::Storage(_) => {
            ConversationError::Unavailable(format!("the event log refused the append: {error}"))
        }
        AppendError::Empty
        | AppendError::DuplicateInAppend { .. }
        | AppendError::PartialDuplicate { .. } => {
            ConversationError::Internal(format!("the event log refused the append: {error}"))
        }
    }
}

/// Counts actors whose state still exists: dropped with the state, so also
/// when an actor panics or is killed.
pub(crate) struct AliveToken {
    alive: Arc<Alive>,
}

#[derive(Default)]
pub(crate) struct Alive {
    pub(crate) count: AtomicUsize,
    pub(crate) gone: Notify,
}

impl AliveToken {
    pub(crate) fn new(alive: &Arc<Alive>) -> Self {
        alive.count.fetch_add(1, Ordering::SeqCst);
        AliveToken {
            alive: alive.clone(),
        }
    }
}

impl Drop for AliveToken {
    fn drop(&mut self) {
        self.alive.count.fetch_sub(1, Ordering::SeqCst);
        self.alive.gone.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_events::OpenMode;

    /// The content that makes an actor panic while handling the send.
    pub(super) const PANIC: &str = "\u{0}panic";

    fn command(message_id: &str) -> SendCommand {
        SendCommand {
            message_id: message_id.into(),
            key_id: "key_1".into(),
            user: None,
            content: format!("content of {message_id}"),
            requested_agent: None,
            agent: "echo".into(),
            rule: None,
            correlation_id: None,
            traceparent: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_actor_answers_unavailable_and_is_respawned_from_the_log() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open");
        let registry = ConversationRegistry::new(log.clone(), RegistryConfig::default());
        let first = registry.send("c1", command("m1")).await.expect("m1");

        let actor = registry.actor("c1").expect("c1 is live");
        let mut panicking = command("m2");
        panicking.content = PANIC.into();
        let refused = registry
            .send("c1", panicking)
            .await
            .expect_err("the actor died handling m2");
        assert_eq!(refused.code(), "unavailable");
        assert_eq!(registry.live_count(), 0, "the dead actor is forgotten");

        // Respawned from the log: m1 is known, m2 was never stored.
        let again = registry.send("c1", command("m1")).await.expect("m1 again");
        assert_eq!((again.seq, again.duplicate), (first.seq, true));
        let m2 = registry.send("c1", command("m2")).await.expect("m2");
        assert!(!m2.duplicate);
        assert_ne!(actor.get_id(), registry.actor("c1").expect("live").get_id());

        // An actor that died while idle is replaced without the caller noticing.
        registry
            .actor("c1")
            .expect("live")
            .kill_and_wait(None)
            .await
            .expect("killed");
        let m3 = registry.send("c1", command("m3")).await.expect("m3");
        assert!(!m3.duplicate && m3.seq > m2.seq);
        registry.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_conflicting_writer_is_caught_up_with() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open");
        let registry = ConversationRegistry::new(log.clone(), RegistryConfig::default());
        registry.send("c1", command("m1")).await.expect("m1");

        // Another writer (an offline tool, a node not yet stopped) appends m2.
        let stream = StreamId::conversation("c1").expect("valid");
        let other = ConversationState::recover(
            "c1",
            log.read_stream(&stream, 1).map(|e| e.expect("decodes")),
        );
        let SendPlan::Append { expected, events } = other.plan_send(&command("m2")) else {
            panic!("m2 is new");
        };
        let appended = log
            .append(stream.clone(), expected, events)
            .await
            .expect("other writer");

        // The actor's state is stale: its append conflicts, it catches up and
        // finds m2 stored — a duplicate, answered with the other writer's seq.
        let m2 = registry.send("c1", command("m2")).await.expect("m2");
        assert_eq!((m2.seq, m2.duplicate), (appended.first().seq, true));
        let m3 = registry.send("c1", command("m3")).await.expect("m3");
        assert!(!m3.duplicate);
        assert_eq!(
            log.stream_version(&stream).expect("version"),
            appended.last().version + 2
        );
        registry.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_turn_ends_once_and_only_for_a_known_message() {
        use switchboard_events::catalog::ReplyFailed;
        let dir = tempfile::tempdir().expect("temp dir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open");
        let registry = ConversationRegistry::new(log.clone(), RegistryConfig::default());
        registry.send("c1", command("m1")).await.expect("m1");
        let pending = registry.pending_turns("c1").await.expect("pending");
        assert_eq!(pending.len(), 1);
        assert_eq!(
            (pending[0].message_id.as_str(), pending[0].agent.as_deref()),
            ("m1", Some("echo"))
        );

        let failed = |message_id: &str| {
            vec![NewEvent::new(Event::ReplyFailed(ReplyFailed {
                conversation_id: "c1".into(),
                message_id: message_id.into(),
                agent: "echo".into(),
                code: "unavailable".into(),
                message: "down".into(),
            }))]
        };
        let ended = registry
            .end_turn("c1", "m1", failed("m1"))
            .await
            .expect("ended");
        assert_eq!(ended, Some(log.head()));
        // A second end (fresh event ids) appends nothing.
        let again = registry
            .end_turn("c1", "m1", failed("m1"))
            .await
            .expect("idempotent");
        assert_eq!(again, None);
        let stream = StreamId::conversation("c1").expect("valid");
        assert_eq!(log.stream_version(&stream).expect("version"), 4);
        assert!(registry
            .pending_turns("c1")
            .await
            .expect("pending")
            .is_empty());

        let unknown = registry
            .end_turn("c1", "m9", failed("m9"))
            .await
            .expect_err("no such message");
        assert_eq!(unknown.code(), "invalid_request");
        registry.shutdown().await;
    }
}
