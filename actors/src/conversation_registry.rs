//! The `ConversationRegistry`: spawns a [`ConversationActor`] on a
//! conversation's first command, routes later commands to it, and passivates
//! actors by a cap on live ones (least recently used first, never one with a
//! command in flight) and by idle time (DESIGN §5). A passivated or crashed
//! conversation is respawned from the log when it is addressed again.
//!
//! It is a plain struct, not an actor: routing is a map lookup under a short
//! lock never held across an await, and callers then await their own
//! conversation's actor, so conversations run in parallel. A registry actor
//! would put one mailbox in front of every send.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{ActorRef, ActorRuntime, ActorStatus, MessagingErr, RpcReplyPort};
use switchboard_events::{EventLog, NewEvent};
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};

use crate::conversation::SendCommand;
use crate::conversation_actor::{
    validate_conversation_id, Ack, Alive, AliveToken, ConversationActor, ConversationArgs,
    ConversationError, ConversationMsg, Durable, Erased, PendingTurn,
};
use crate::turn_context::ContextReader;

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
    /// Turn contexts, which the actors fold their own appends into.
    contexts: Arc<ContextReader>,
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
            contexts: Arc::new(ContextReader::new(log.clone())),
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
        checked(conversation_id, &command)?;
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

    /// [`ConversationRegistry::send`], answered once the message is written,
    /// before it is durable, with what says when it is
    /// ([`ConversationMsg::SendEarly`]).
    pub async fn send_early(
        &self,
        conversation_id: &str,
        command: SendCommand,
    ) -> Result<(Ack, Durable), ConversationError> {
        checked(conversation_id, &command)?;
        self.call(
            conversation_id,
            command,
            ConversationMsg::SendEarly,
            |undelivered| match undelivered {
                ConversationMsg::SendEarly(command, _) => Some(command),
                _ => None,
            },
        )
        .await
    }

    /// Appends the events that end the turn of `message_id`, answering the
    /// seq of the first — unless the turn already ended, which appends nothing
    /// and answers `Ok(None)`.
    pub async fn end_turn(
        &self,
        conversation_id: &str,
        message_id: &str,
        events: Vec<NewEvent>,
    ) -> Result<Option<u64>, ConversationError> {
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

    /// Erases the conversation's content on behalf of `by`; see
    /// [`ConversationMsg::Erase`].
    pub async fn erase(
        &self,
        conversation_id: &str,
        by: &str,
    ) -> Result<Erased, ConversationError> {
        validate_conversation_id(conversation_id)?;
        self.call(
            conversation_id,
            by.to_owned(),
            |by, reply| ConversationMsg::Erase { by, reply },
            |undelivered| match undelivered {
                ConversationMsg::Erase { by, .. } => Some(by),
                _ => None,
            },
        )
        .await
    }

    /// The duplicate ack a resend of `message_id` by `key_id` gets, if the
    /// message is stored; see [`ConversationMsg::Stored`].
    pub async fn stored_ack(
        &self,
        conversation_id: &str,
        key_id: &str,
        message_id: &str,
    ) -> Result<Option<Ack>, ConversationError> {
        validate_conversation_id(conversation_id)?;
        self.call(
            conversation_id,
            (key_id.to_owned(), message_id.to_owned()),
            |(key_id, message_id), reply| ConversationMsg::Stored {
                key_id,
                message_id,
                reply,
            },
            |undelivered| match undelivered {
                ConversationMsg::Stored {
                    key_id, message_id, ..
                } => Some((key_id, message_id)),
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

    /// The turn contexts its actors fold their appends into.
    pub(crate) fn contexts(&self) -> &Arc<ContextReader> {
        &self.inner.contexts
    }

    #[cfg(test)]
    pub(crate) fn actor(&self, conversation_id: &str) -> Option<ActorRef<ConversationMsg>> {
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
                // Actors busy when the cap was reached count against it
                // until they are idle: passivate down to it now.
                live.passivate_over(self.inner.config.max_live.max(1));
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
        // Room for the new actor.
        live.passivate_over(self.config.max_live.max(1) - 1);
        let args = ConversationArgs {
            conversation_id: conversation_id.to_owned(),
            log: self.log.clone(),
            contexts: Some(self.contexts.clone()),
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
                metrics::counter!("switchboard_passivations_total", "reason" => "idle")
                    .increment(1);
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

    /// Passivates idle actors, least recently used first, until at most
    /// `cap` are live or none of the rest is idle.
    fn passivate_over(&mut self, cap: usize) {
        while self.actors.len() > cap {
            let Some(victim) = self.least_recently_used_idle() else {
                break;
            };
            tracing::debug!(conversation_id = %victim, "passivating: over max_live");
            if let Some(entry) = self.remove(&victim) {
                entry.actor.stop(Some("passivated".into()));
                metrics::counter!("switchboard_passivations_total", "reason" => "capacity")
                    .increment(1);
            }
        }
    }

    fn least_recently_used_idle(&self) -> Option<String> {
        self.by_use
            .values()
            .find(|id| self.actors.get(*id).is_some_and(|e| e.in_flight == 0))
            .cloned()
    }
}

/// The errors of a send any conversation would refuse.
fn checked(conversation_id: &str, command: &SendCommand) -> Result<(), ConversationError> {
    validate_conversation_id(conversation_id)?;
    if command.message_id.is_empty() {
        return Err(ConversationError::InvalidRequest(
            "message_id must not be empty".into(),
        ));
    }
    Ok(())
}
