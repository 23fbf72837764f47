//! The `ConversationActor`, one per live conversation and the single writer of
//! its stream `conv/<id>`, and the `ConversationRegistry` that spawns, routes
//! to and passivates them (DESIGN §5).
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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{
    Actor, ActorProcessingErr, ActorRef, ActorRuntime, ActorStatus, MessagingErr, RpcReplyPort,
};
use serde::{Deserialize, Serialize};
use switchboard_events::{
    AppendError, Event, EventLog, ExpectedVersion, NewEvent, ReadError, StreamId,
};
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};

use crate::conversation::{ConversationState, SendCommand, SendPlan, TurnOutcome};

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

/// Why a send was not acknowledged; [`ConversationError::code`] is the error
/// code of DESIGN §6.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversationError {
    /// The request can never succeed as it is (bad conversation id, no message id).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Another writer kept appending to the conversation's stream; resending
    /// with the same `message_id` is safe.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The log or the conversation's actor is unavailable, or stopped before
    /// answering. The message may or may not be stored: resend it with the
    /// same `message_id`, which is deduplicated.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug or a corrupt log; retrying will not help.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ConversationError {
    /// The code of DESIGN §6: `invalid_request`, `conflict`, `unavailable` or `internal`.
    pub fn code(&self) -> &'static str {
        match self {
            ConversationError::InvalidRequest(_) => "invalid_request",
            ConversationError::Conflict(_) => "conflict",
            ConversationError::Unavailable(_) => "unavailable",
            ConversationError::Internal(_) => "internal",
        }
    }

    /// The human-readable message, without the code.
    pub fn message(&self) -> &str {
        match self {
            ConversationError::InvalidRequest(m)
            | ConversationError::Conflict(m)
            | ConversationError::Unavailable(m)
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
    /// Held for the actor's lifetime so the registry knows when it is gone.
    alive: Option<AliveToken>,
}

impl ConversationArgs {
    pub fn new(conversation_id: impl Into<String>, log: EventLog) -> Self {
        ConversationArgs {
            conversation_id: conversation_id.into(),
            log,
            alive: None,
        }
    }
}

/// The messages a [`ConversationActor`] handles.
pub enum ConversationMsg {
    /// Store a message (once per `message_id`) and acknowledge it. The reply
    /// comes only after the durable append, or with a coded error.
    Send(SendCommand, RpcReplyPort<Result<Ack, ConversationError>>),
    /// Append the events that end the turn of `message_id` (an agent's
    /// [`crate::agent::TurnOutcome::events`]), in one append at the stream's
    /// version. Idempotent: a turn that already ended appends nothing and
    /// answers `Ok`, so a late or repeated end cannot give a message two replies.
    EndTurn {
        message_id: String,
        events: Vec<NewEvent>,
        reply: RpcReplyPort<Result<(), ConversationError>>,
    },
    /// The turns received but not yet ended, oldest first.
    Pending(RpcReplyPort<Result<Vec<PendingTurn>, ConversationError>>),
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
                #[cfg(test)]
                if command.content == tests::PANIC {
                    panic!("a conversation actor panics, as a bug would");
                }
                let answer = state.send(&command).await;
                if let Err(error) = &answer {
                    tracing::warn!(conversation_id = %state.conversation_id,
                        message_id = %command.message_id, code = error.code(), %error, "send failed");
                }
                // A caller that gave up can resend; the stored message is deduplicated.
                let _ = reply.send(answer);
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
            let (log, stream, id) = (
                self.log.clone(),
                self.stream.clone(),
                self.conversation_id.clone(),
            );
            // A long conversation is many reads: keep them off the async workers.
            let folded = tokio::task::spawn_blocking(move || {
                let mut folded = ConversationState::new(&id);
                for envelope in log.read_stream(&stream, 1) {
                    folded.apply(&envelope.map_err(|e| read_error(&stream, e))?);
                }
                Ok(folded)
            })
            .await
            .map_err(|e| ConversationError::Internal(format!("recovery task failed: {e}")))??;
            self.folded = Some(folded);
        }
        Ok(self.folded.as_mut().expect("recovered just above"))
    }

    /// Folds what the stream gained since the state's version: this actor's own
    /// append, or another writer's. On failure the state is dropped, to be
    /// recovered whole by the next command.
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

    async fn send(&mut self, command: &SendCommand) -> Result<Ack, ConversationError> {
        let mut retries = CONFLICT_RETRIES;
        loop {
            let plan = self.recovered().await?.plan_send(command);
            let (expected, events) = match plan {
                SendPlan::Duplicate { message_seq } => {
                    return Ok(self.ack(command, message_seq, true))
                }
                SendPlan::Append { expected, events } => (expected, events),
            };
            let received = events
                .iter()
                .position(|e| matches!(e.event, Event::MessageReceived(_)))
                .ok_or_else(|| {
                    ConversationError::Internal("a send plan without message_received".into())
                })?;
            match self.log.append(self.stream.clone(), expected, events).await {
                Ok(appended) => {
                    let seq = appended
                        .positions
                        .get(received)
                        .map(|p| p.seq)
                        .ok_or_else(|| {
                            ConversationError::Internal("the log returned too few positions".into())
                        })?;
                    // The append is durable: the ack stands even if the read-back fails.
                    self.catch_up();
                    return Ok(self.ack(command, seq, appended.deduplicated));
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
    ) -> Result<(), ConversationError> {
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
                Some(TurnOutcome::Completed | TurnOutcome::Failed) => return Ok(()),
                Some(TurnOutcome::Pending) => {}
            }
            let expected = ExpectedVersion::Exact(folded.version);
            // Cloned so a conflict can retry; a turn's end is two small events.
            match self
                .log
                .append(self.stream.clone(), expected, events.clone())
                .await
            {
                Ok(_) => {
                    self.catch_up();
                    return Ok(());
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

fn read_error(stream: &StreamId, error: ReadError) -> ConversationError {
    match error {
        ReadError::Storage(_) => {
            ConversationError::Unavailable(format!("cannot read {stream}: {error}"))
        }
        ReadError::Decode { .. } | ReadError::Corrupt { .. } => {
            ConversationError::Internal(format!("cannot read {stream}: {error}"))
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
struct AliveToken {
    alive: Arc<Alive>,
}

#[derive(Default)]
struct Alive {
    count: AtomicUsize,
    gone: Notify,
}

impl AliveToken {
    fn new(alive: &Arc<Alive>) -> Self {
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

/// Limits of the [`ConversationRegistry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryConfig {
    /// At most this many conversation actors are kept; past it, the least
    /// recently used idle one is passivated. Actors with a command in flight are
    /// never passivated, so the cap is exceeded only while more than `max_live`
    /// conversations each have a command in flight.
    pub max_live: usize,
    /// An actor with no command for this long is passivated.
    pub idle_passivate: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            max_live: 10_000,
            idle_passivate: Duration::from_secs(300),
        }
    }
}

/// Spawns a [`ConversationActor`] on a conversation's first command, routes
/// later ones to it, and passivates actors when idle or over the cap; a
/// passivated conversation is respawned and recovered from its stream when
/// addressed again. Cheap to clone; the last clone to drop stops the actors.
///
/// A plain struct behind a short, never-awaited lock rather than an actor:
/// routing is a map lookup, and an actor in front of every conversation would
/// put one mailbox (and one task's latency) before all sends. Callers await
/// their conversation's actor directly, so conversations proceed in parallel
/// while each stays serial.
#[derive(Clone)]
pub struct ConversationRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    log: EventLog,
    config: RegistryConfig,
    live: Mutex<Live>,
    /// Signalled whenever a command finishes, for `shutdown` to wait on.
    checked_in: Notify,
    alive: Arc<Alive>,
    sweeper: Mutex<Option<tokio::task::AbortHandle>>,
}

#[derive(Default)]
struct Live {
    actors: HashMap<String, Entry>,
    /// Use order, oldest first: `Entry::tick` → conversation id.
    by_use: BTreeMap<u64, String>,
    next_tick: u64,
    closed: bool,
}

struct Entry {
    actor: ActorRef<ConversationMsg>,
    in_flight: usize,
    tick: u64,
    last_used: Instant,
}

impl ConversationRegistry {
    /// A registry appending to `log`. Call it inside a tokio runtime: it spawns
    /// the idle sweep, which ends with the registry.
    pub fn new(log: EventLog, config: RegistryConfig) -> Self {
        let inner = Arc::new(Inner {
            log,
            config,
            live: Mutex::new(Live::default()),
            checked_in: Notify::new(),
            alive: Arc::new(Alive::default()),
            sweeper: Mutex::new(None),
        });
        let registry = Arc::downgrade(&inner);
        let period =
            (config.idle_passivate / 4).clamp(Duration::from_millis(10), Duration::from_secs(5));
        let sweeper = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(inner) = registry.upgrade() else {
                    break;
                };
                inner.passivate_idle();
            }
        });
        *inner.sweeper.lock().expect("sweeper lock") = Some(sweeper.abort_handle());
        ConversationRegistry { inner }
    }

    /// Stores a message in a conversation, once per `message_id`, and answers
    /// once it is durable. A resend answers the first ack with `duplicate: true`.
    pub async fn send(
        &self,
        conversation_id: &str,
        command: SendCommand,
    ) -> Result<Ack, ConversationError> {
        validate_conversation_id(conversation_id)?;
        if command.message_id.is_empty() {
            return Err(ConversationError::InvalidRequest(
                "message_id must not be empty".into(),
            ));
        }
        self.call(
            conversation_id,
            command,
            ConversationMsg::Send,
            |undelivered| match undelivered {
                ConversationMsg::Send(command, _) => Some(command),
                _ => None,
            },
        )
        .await
    }

    /// Appends the events that end the turn of `message_id` — unless the turn
    /// already ended, which appends nothing and answers `Ok`.
    pub async fn end_turn(
        &self,
        conversation_id: &str,
        message_id: &str,
        events: Vec<NewEvent>,
    ) -> Result<(), ConversationError> {
        validate_conversation_id(conversation_id)?;
        self.call(
            conversation_id,
            (message_id.to_owned(), events),
            |(message_id, events), reply| ConversationMsg::EndTurn {
                message_id,
                events,
                reply,
            },
            |undelivered| match undelivered {
                ConversationMsg::EndTurn {
                    message_id, events, ..
                } => Some((message_id, events)),
                _ => None,
            },
        )
        .await
    }

    /// The conversation's turns received but not yet ended, oldest first.
    pub async fn pending_turns(
        &self,
        conversation_id: &str,
    ) -> Result<Vec<PendingTurn>, ConversationError> {
        validate_conversation_id(conversation_id)?;
        self.call(
            conversation_id,
            (),
            |(), reply| ConversationMsg::Pending(reply),
            |undelivered| matches!(undelivered, ConversationMsg::Pending(_)).then_some(()),
        )
        .await
    }

    /// Delivers one command to the conversation's actor and waits for its answer.
    /// `undelivered` takes the payload back out of a message the actor never
    /// received, for the one retry with a fresh actor.
    async fn call<P, T>(
        &self,
        conversation_id: &str,
        payload: P,
        message: impl Fn(P, RpcReplyPort<Result<T, ConversationError>>) -> ConversationMsg,
        undelivered: impl Fn(ConversationMsg) -> Option<P>,
    ) -> Result<T, ConversationError>
    where
        T: Send + 'static,
    {
        let mut payload = payload;
        // A second attempt only when the first message was never delivered (the
        // actor had stopped): then nothing can have been stored.
        for _ in 0..2 {
            let mut lease = self.inner.checkout(conversation_id)?;
            let call = lease
                .actor
                .call(|reply| message(payload, reply), None)
                .await;
            match call {
                Ok(CallResult::Success(answer)) => return answer,
                Err(MessagingErr::SendErr(message)) => {
                    lease.forget = true;
                    payload = undelivered(message).ok_or_else(|| {
                        ConversationError::Internal("a different message came back".into())
                    })?;
                }
                Ok(CallResult::SenderError | CallResult::Timeout) => {
                    lease.forget = true;
                    return Err(ConversationError::Unavailable(format!(
                        "the actor of conversation {conversation_id} stopped before answering; \
                         resend with the same message_id"
                    )));
                }
                Err(error) => {
                    lease.forget = true;
                    return Err(ConversationError::Unavailable(format!(
                        "the actor of conversation {conversation_id} is unreachable: {error}"
                    )));
                }
            }
        }
        Err(ConversationError::Unavailable(format!(
            "the actor of conversation {conversation_id} stopped twice before taking the command"
        )))
    }

    /// How many conversation actors the registry holds. A passivated actor
    /// leaves this count at once and exits as soon as it has stopped.
    pub fn live_count(&self) -> usize {
        self.inner.live().actors.len()
    }

    /// Stops taking commands (later sends answer `unavailable`), lets commands
    /// in flight finish, stops every actor and returns once all have exited —
    /// so the log can be closed and reopened.
    pub async fn shutdown(&self) {
        self.inner.live().closed = true;
        loop {
            let finished = self.inner.checked_in.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            if self.inner.live().actors.values().all(|e| e.in_flight == 0) {
                break;
            }
            finished.await;
        }
        self.inner.stop_all("shutdown");
        loop {
            let gone = self.inner.alive.gone.notified();
            tokio::pin!(gone);
            gone.as_mut().enable();
            if self.inner.alive.count.load(Ordering::SeqCst) == 0 {
                break;
            }
            gone.await;
        }
    }

    #[cfg(test)]
    fn actor(&self, conversation_id: &str) -> Option<ActorRef<ConversationMsg>> {
        self.inner
            .live()
            .actors
            .get(conversation_id)
            .map(|e| e.actor.clone())
    }
}

/// A command on its way to an actor: counted in flight until dropped, even when
/// the caller's future is cancelled.
struct Lease<'a> {
    inner: &'a Inner,
    conversation_id: &'a str,
    actor: ActorRef<ConversationMsg>,
    /// The actor stopped: the registry forgets it and the next command respawns it.
    forget: bool,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let actor_id = self.actor.get_id();
        let mut live = self.inner.live();
        let same_actor = live
            .actors
            .get(self.conversation_id)
            .is_some_and(|e| e.actor.get_id() == actor_id);
        if same_actor {
            if self.forget {
                if let Some(entry) = live.remove(self.conversation_id) {
                    entry.actor.stop(Some("failed".into()));
                }
            } else {
                let tick = live.tick();
                if let Some(entry) = live.actors.get_mut(self.conversation_id) {
                    entry.in_flight -= 1;
                    let previous = std::mem::replace(&mut entry.tick, tick);
                    entry.last_used = Instant::now();
                    live.by_use.remove(&previous);
                    live.by_use.insert(tick, self.conversation_id.to_owned());
                }
            }
        }
        drop(live);
        self.inner.checked_in.notify_waiters();
    }
}

impl Inner {
    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().expect("registry lock")
    }

    /// The conversation's actor, spawned when there is none, counted in flight.
    fn checkout<'a>(&'a self, conversation_id: &'a str) -> Result<Lease<'a>, ConversationError> {
        let mut live = self.live();
        if live.closed {
            return Err(ConversationError::Unavailable(
                "the conversation service is shutting down".into(),
            ));
        }
        let stopped = live
            .actors
            .get(conversation_id)
            .is_some_and(|e| e.actor.get_status() >= ActorStatus::Draining);
        if stopped {
            live.remove(conversation_id);
        }
        let tick = live.tick();
        let now = Instant::now();
        if let Some(entry) = live.actors.get_mut(conversation_id) {
            entry.in_flight += 1;
            entry.last_used = now;
            let previous = std::mem::replace(&mut entry.tick, tick);
            let actor = entry.actor.clone();
            live.by_use.remove(&previous);
            live.by_use.insert(tick, conversation_id.to_owned());
            return Ok(self.lease(conversation_id, actor));
        }
        if live.actors.len() >= self.config.max_live.max(1) {
            if let Some(victim) = live.least_recently_used_idle() {
                tracing::debug!(conversation_id = %victim, "passivating: over max_live");
                if let Some(entry) = live.remove(&victim) {
                    entry.actor.stop(Some("passivated".into()));
                }
            }
        }
        let args = ConversationArgs {
            conversation_id: conversation_id.to_owned(),
            log: self.log.clone(),
            alive: Some(AliveToken::new(&self.alive)),
        };
        // Instant: the mailbox exists at once and queues commands while the
        // actor recovers, so spawning never waits under the lock.
        let (actor, _started) = ActorRuntime::spawn_instant(None, ConversationActor, args)
            .map_err(|e| ConversationError::Internal(format!("cannot spawn the actor: {e}")))?;
        live.actors.insert(
            conversation_id.to_owned(),
            Entry {
                actor: actor.clone(),
                in_flight: 1,
                tick,
                last_used: now,
            },
        );
        live.by_use.insert(tick, conversation_id.to_owned());
        Ok(self.lease(conversation_id, actor))
    }

    fn lease<'a>(
        &'a self,
        conversation_id: &'a str,
        actor: ActorRef<ConversationMsg>,
    ) -> Lease<'a> {
        Lease {
            inner: self,
            conversation_id,
            actor,
            forget: false,
        }
    }

    /// Passivates every actor idle for `idle_passivate`.
    fn passivate_idle(&self) {
        let now = Instant::now();
        let mut live = self.live();
        let mut idle = Vec::new();
        for id in live.by_use.values() {
            let Some(entry) = live.actors.get(id) else {
                continue;
            };
            if now.duration_since(entry.last_used) < self.config.idle_passivate {
                // Use order is last_used order: everyone after is more recent.
                break;
            }
            if entry.in_flight == 0 {
                idle.push(id.clone());
            }
        }
        for id in idle {
            tracing::debug!(conversation_id = %id, "passivating: idle");
            if let Some(entry) = live.remove(&id) {
                entry.actor.stop(Some("passivated".into()));
            }
        }
    }

    fn stop_all(&self, reason: &str) {
        let mut live = self.live();
        live.by_use.clear();
        for (_, entry) in live.actors.drain() {
            entry.actor.stop(Some(reason.to_owned()));
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(sweeper) = self.sweeper.lock().expect("sweeper lock").take() {
            sweeper.abort();
        }
        self.stop_all("registry dropped");
    }
}

impl Live {
    fn tick(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }

    fn remove(&mut self, conversation_id: &str) -> Option<Entry> {
        let entry = self.actors.remove(conversation_id)?;
        self.by_use.remove(&entry.tick);
        Some(entry)
    }

    fn least_recently_used_idle(&self) -> Option<String> {
        self.by_use
            .values()
            .find(|id| self.actors.get(*id).is_some_and(|e| e.in_flight == 0))
            .cloned()
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
        registry
            .end_turn("c1", "m1", failed("m1"))
            .await
            .expect("ended");
        // A second end (fresh event ids) appends nothing.
        registry
            .end_turn("c1", "m1", failed("m1"))
            .await
            .expect("idempotent");
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
