//! Turn coordination: from an acknowledged send to the reply stored in the
//! conversation (DESIGN §5).
//!
//! The [`TurnCoordinator`] routes a message, stores it through its
//! conversation's actor, and — once the ack is durable and the message is new —
//! runs the turn in its own task: it builds the context from the stream, asks
//! the routed agent, forwards the streamed pieces as [`ReplyDelta`]s, and hands
//! the events that end the turn back to the conversation's actor, which stays
//! the single writer of `conv/<id>`. So every acknowledged message ends with
//! `reply_completed` (+ `usage_recorded`) or `reply_failed` in its stream, and a
//! resend (a duplicate ack) starts no second turn.
//!
//! **Context.** [`ConversationState`](crate::conversation::ConversationState)
//! keeps no content, so the context is read from the log here (readers never
//! race the writer): every earlier exchange that completed, as a `user` and an
//! `assistant` message, then the message being answered. Failed turns and
//! turns still running are left out (the model sees strictly alternating
//! roles), as is everything before a `conversation_erased`. A bounded cache
//! of each conversation's fold ([`crate::turn_context`]), which the
//! conversation's actor keeps up with its own appends, spares most turns any
//! read.
//!
//! **Turns lost in a restart.** A turn runs in memory; if the process dies
//! between the ack and the reply, the stream keeps a message with no end. The
//! coordinator does not rerun such turns (the caller may have given up, and a
//! reply long after the fact surprises more than it helps): the first time it
//! touches a conversation it ends each of them with `reply_failed`, code
//! `unavailable` ([`TurnCoordinator::finish_pending`]); startup can do the same
//! for every known conversation with [`TurnCoordinator::finish_all_pending`].
//! This happens once per conversation per coordinator, before any of its own
//! turns there start, so it can never fail a turn that is really running.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use ractor::ActorRef;
use serde::{Deserialize, Serialize};
use switchboard_events::catalog::UsageRecorded;
use switchboard_events::{Event, EventLog};
use tokio::sync::{mpsc, oneshot, Notify, OnceCell};
use uuid::Uuid;

use crate::agent::{request_turn, AgentMsg, TurnOutcome, TurnRequest};
use crate::budget::Budgets;
use crate::conversation::SendCommand;
use crate::conversation_actor::{
    validate_conversation_id, Ack, ConversationError, ConversationRegistry, Durable, Erased,
};
use crate::provider::ChatMessage;
use crate::rate_limiter::Permit;
use crate::router::{RouteError, Router};
use crate::turn_context::ContextReader;
pub use crate::turn_context::TurnContext;

/// The code of the `reply_failed` that ends a turn lost in a restart.
pub const LOST_TURN_CODE: &str = "unavailable";
/// Its message: a resend of the same `message_id` is a duplicate, so retrying
/// takes a new one.
pub const LOST_TURN_MESSAGE: &str =
    "the turn was lost in a restart; send the message again with a new message_id to retry";

/// Deltas buffered between the agent and the caller's channel.
const DELTA_BUFFER: usize = 64;
/// Conversations whose lost turns are finished at once by `finish_all_pending`.
const RECOVERY_PARALLELISM: usize = 16;
/// Attempts at storing a turn's end while the conversation is unavailable
/// (or its stream keeps changing): 50 ms, then doubling up to 5 s between
/// them, about 40 s in all, before the turn is left pending for the next
/// start to fail.
const END_TURN_ATTEMPTS: u32 = 12;
const END_TURN_MAX_WAIT: Duration = Duration::from_secs(5);
/// Conversations whose lost turns the coordinator remembers having finished.
const MAX_RECOVERED: usize = 100_000;

/// A message to send, as a gateway hands it over (already authenticated and
/// admitted by the rate limiter).
#[derive(Debug, Default)]
pub struct SendInput {
    /// The caller's id for the message; a UUID v7 is generated when absent.
    pub message_id: Option<String>,
    pub key_id: String,
    pub user: Option<String>,
    pub content: String,
    /// The agent the caller asks for; the router decides otherwise.
    pub agent: Option<String>,
    pub correlation_id: Option<Uuid>,
    pub traceparent: Option<String>,
    /// Where to stream the reply's pieces. Drain it while the turn runs (a full
    /// channel holds the model back); dropping the receiver is fine.
    pub deltas: Option<mpsc::Sender<ReplyDelta>>,
    /// Completed (or dropped) by the caller once it has handed on every delta
    /// (after `deltas` closes). The turn's end is stored only after that, or
    /// after [`DELTAS_HANDED_ON_WAIT`]: so where the caller publishes deltas
    /// on the bus that later carries the stored end (the outbox), no delta
    /// comes after `reply_completed`.
    pub deltas_handed_on: Option<oneshot::Receiver<()>>,
    /// The rate limiter's admission: held until the turn ends, then finished
    /// with the turn's tokens (dropped at once when no turn starts).
    pub permit: Option<Permit>,
    /// Told where the turn's end is once it is stored. Dropped unanswered
    /// when no turn starts (a duplicate) or its end could not be stored.
    pub ended: Option<oneshot::Sender<TurnEnd>>,
}

/// Where a turn's stored end is in the log: `reply_completed` and
/// `usage_recorded`, or `reply_failed`, at `first_seq` onwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TurnEnd {
    pub first_seq: u64,
    pub events: usize,
}

/// One streamed piece of a reply (`reply_delta`, DESIGN §6); not stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyDelta {
    pub conversation_id: String,
    pub message_id: String,
    /// The `reply_id` the turn's `reply_completed` will carry.
    pub reply_id: String,
    /// 0, 1, 2, … in the order the pieces were streamed.
    pub index: u64,
    pub delta: String,
}

/// Runs the turn of every new message; see the module doc. Cheap to clone.
///
/// ```no_run
/// # use std::collections::HashMap;
/// # use std::sync::Arc;
/// # use ractor::Actor;
/// use switchboard_actors::agent::{Agent, AgentActor, AgentConfig};
/// use switchboard_actors::conversation_actor::{ConversationRegistry, RegistryConfig};
/// use switchboard_actors::provider::EchoProvider;
/// use switchboard_actors::router::Router;
/// use switchboard_actors::turns::{SendInput, TurnCoordinator};
/// use switchboard_events::{EventLog, OpenMode};
///
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let log = EventLog::open("./data".as_ref(), OpenMode::CreateIfMissing)?;
/// let registry = ConversationRegistry::new(log.clone(), RegistryConfig::default());
/// let echo = Arc::new(Agent::new(AgentConfig::new("echo"), Arc::new(EchoProvider::new())));
/// let (echo, _) = Actor::spawn(None, AgentActor, echo).await?;
/// let agents = HashMap::from([("echo".to_owned(), echo)]);
/// let turns = TurnCoordinator::new(registry.clone(), Router::new(vec![], "echo")?, agents, log)?;
/// let ack = turns
///     .send("c1", SendInput { key_id: "key_1".into(), content: "hi".into(), ..Default::default() })
///     .await?;
/// turns.drain().await; // the reply `echo: hi` is stored
/// registry.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TurnCoordinator {
    inner: Arc<Inner>,
}

struct Inner {
    registry: ConversationRegistry,
    router: Router,
    agents: HashMap<String, ActorRef<AgentMsg>>,
    /// Reads each turn's context from the log (through its cache, which the
    /// conversations' actors keep up with their appends).
    contexts: Arc<ContextReader>,
    /// Conversations whose lost turns were (or are being) finished; forgotten
    /// wholesale past `max_recovered`, which only costs a second look.
    recovered: Mutex<HashMap<String, Arc<OnceCell<()>>>>,
    max_recovered: AtomicUsize,
    /// The log's head when this coordinator started: a turn is lost only if
    /// its message is at or below it (later ones are this coordinator's own).
    started_at: u64,
    in_flight: InFlight,
    closed: AtomicBool,
    /// Charged with each turn's cost once its usage is stored.
    budgets: OnceLock<Budgets>,
}

#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    done: Notify,
    /// Whether a turn of this coordinator ended without its end stored.
    left_open: AtomicBool,
    /// The running turn tasks, for [`TurnCoordinator::abort_all`].
    tasks: Mutex<HashMap<u64, tokio::task::AbortHandle>>,
    next_task: AtomicU64,
}

/// A running turn, counted until dropped (also when its task panics or is
/// aborted).
struct TurnGuard {
    inner: Arc<Inner>,
    task: u64,
    /// Set once the turn's end is stored; a guard dropped without it (the
    /// store failed, the task panicked or was aborted) leaves a turn open.
    ended: bool,
}

impl TurnGuard {
    fn new(inner: &Arc<Inner>) -> Self {
        inner.in_flight.count.fetch_add(1, Ordering::SeqCst);
        TurnGuard {
            inner: inner.clone(),
            task: inner.in_flight.next_task.fetch_add(1, Ordering::SeqCst),
            ended: false,
        }
    }
}

impl Drop for TurnGuard {
    fn drop(&mut self) {
        let in_flight = &self.inner.in_flight;
        if !self.ended {
            in_flight.left_open.store(true, Ordering::SeqCst);
        }
        in_flight
            .tasks
            .lock()
            .expect("tasks lock")
            .remove(&self.task);
        in_flight.count.fetch_sub(1, Ordering::SeqCst);
        in_flight.done.notify_waiters();
    }
}

/// A stored message's turn, not started yet (see
/// [`TurnCoordinator::send_unstarted`]): [`NextTurn::start`] or a drop starts
/// it. Empty for a duplicate, whose turn started with the first send.
#[must_use = "the turn starts when this is started or dropped"]
pub struct NextTurn(Option<(TurnGuard, TurnJob)>);

impl NextTurn {
    /// Starts the turn in its own task (now rather than at the drop).
    pub fn start(self) {}
}

impl std::fmt::Debug for NextTurn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let job = self.0.as_ref().map(|(_, job)| &job.message_id);
        f.debug_tuple("NextTurn").field(&job).finish()
    }
}

impl Drop for NextTurn {
    fn drop(&mut self) {
        let Some((guard, job)) = self.0.take() else {
            return;
        };
        let task = guard.task;
        let inner = guard.inner.clone();
        // Registered under the lock the guard's drop takes, so a turn that
        // ends at once still finds (and removes) its entry.
        let mut tasks = inner.in_flight.tasks.lock().expect("tasks lock");
        let handle = tokio::spawn(async move {
            let mut guard = guard;
            let inner = guard.inner.clone();
            guard.ended = inner.run_turn(job).await;
            drop(guard);
        });
        tasks.insert(task, handle.abort_handle());
    }
}

/// What a turn task needs once the message is stored.
struct TurnJob {
    conversation_id: String,
    message_id: String,
    key_id: String,
    user: Option<String>,
    agent: String,
    correlation_id: Option<Uuid>,
    traceparent: Option<String>,
    deltas: Option<mpsc::Sender<ReplyDelta>>,
    deltas_handed_on: Option<oneshot::Receiver<()>>,
    permit: Option<Permit>,
    ended: Option<oneshot::Sender<TurnEnd>>,
    /// When the message is durable: a turn may start before (see
    /// [`TurnCoordinator::send_early`]), and then reads its context from the
    /// log only once it is.
    durable: Durable,
}

/// The longest a turn's end waits for its caller to hand on its deltas
/// ([`SendInput::deltas_handed_on`]) before it is stored all the same.
pub const DELTAS_HANDED_ON_WAIT: Duration = Duration::from_secs(2);

impl TurnCoordinator {
    /// A coordinator sending through `registry`, routing with `router` to
    /// `agents` (by name) and reading context from `log`. Fails if a rule or
    /// the default agent names an agent that is not in `agents`.
    pub fn new(
        registry: ConversationRegistry,
        router: Router,
        agents: HashMap<String, ActorRef<AgentMsg>>,
        log: EventLog,
    ) -> Result<Self, RouteError> {
        router.check(|name| agents.contains_key(name))?;
        Ok(TurnCoordinator {
            inner: Arc::new(Inner {
                contexts: registry.contexts().clone(),
                registry,
                router,
                agents,
                started_at: log.head(),
                recovered: Mutex::new(HashMap::new()),
                max_recovered: AtomicUsize::new(MAX_RECOVERED),
                in_flight: InFlight::default(),
                closed: AtomicBool::new(false),
                budgets: OnceLock::new(),
            }),
        })
    }

    /// Charges each turn's cost to `budgets` from now on (once; later calls
    /// are ignored).
    pub fn charge_to(&self, budgets: Budgets) {
        let _ = self.inner.budgets.set(budgets);
    }

    /// The budgets turns are charged to, if any.
    pub fn budgets(&self) -> Option<&Budgets> {
        self.inner.budgets.get()
    }

    /// What a send must be refused for before it is admitted (rate limits,
    /// budgets): `invalid_request` for an agent that is not configured.
    pub fn check_agent(&self, agent: Option<&str>) -> Result<(), ConversationError> {
        match agent {
            Some(agent) if !self.inner.agents.contains_key(agent) => Err(
                ConversationError::InvalidRequest(format!("unknown agent {agent:?}")),
            ),
            _ => Ok(()),
        }
    }

    /// The duplicate ack of a message already stored in the conversation,
    /// so that a resend is answered before it is admitted: it uses no rate
    /// limit or budget, and is never refused by one.
    pub async fn stored_ack(
        &self,
        conversation_id: &str,
        key_id: &str,
        message_id: &str,
    ) -> Result<Option<Ack>, ConversationError> {
        self.inner
            .registry
            .stored_ack(conversation_id, key_id, message_id)
            .await
    }

    /// Routes and stores a message, answers once it is durable, and starts
    /// its turn unless the message was stored before (a duplicate ack). An
    /// unknown agent is `invalid_request` and stores nothing.
    pub async fn send(
        &self,
        conversation_id: &str,
        input: SendInput,
    ) -> Result<Ack, ConversationError> {
        let (ack, turn) = self.send_unstarted(conversation_id, input).await?;
        turn.start();
        Ok(ack)
    }

    /// [`TurnCoordinator::send`], but the turn starts only when the returned
    /// [`NextTurn`] is started or dropped (within the runtime): a caller that
    /// answers the ack first gets it on its way before the turn competes for
    /// the CPU. The turn counts as in flight from now.
    pub async fn send_unstarted(
        &self,
        conversation_id: &str,
        input: SendInput,
    ) -> Result<(Ack, NextTurn), ConversationError> {
        let (ack, turn, _) = self.send_with(conversation_id, input, false).await?;
        Ok((ack, turn))
    }

    /// [`TurnCoordinator::send_unstarted`], answered as soon as the message
    /// is written, before it is durable, with what says when it is
    /// ([`Durable`]). For a caller that tells nobody of the ack before the
    /// turn's end (which is stored after the message, so durable after it)
    /// or before [`Durable::wait`] says so: the turn, started at once, then
    /// overlaps the message's flush instead of waiting for it.
    pub async fn send_early(
        &self,
        conversation_id: &str,
        input: SendInput,
    ) -> Result<(Ack, NextTurn, Durable), ConversationError> {
        self.send_with(conversation_id, input, true).await
    }

    async fn send_with(
        &self,
        conversation_id: &str,
        input: SendInput,
        early: bool,
    ) -> Result<(Ack, NextTurn, Durable), ConversationError> {
        validate_conversation_id(conversation_id)?;
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(ConversationError::Unavailable(
                "the service is shutting down".into(),
            ));
        }
        let known = |name: &str| self.inner.agents.contains_key(name);
        let routed = self
            .inner
            .router
            .route(&input.content, input.agent.as_deref(), known)
            .map_err(|RouteError::UnknownAgent(agent)| {
                ConversationError::InvalidRequest(format!("unknown agent {agent:?}"))
            })?;
        self.finish_pending(conversation_id).await?;

        let message_id = input
            .message_id
            .unwrap_or_else(|| Uuid::now_v7().to_string());
        let command = SendCommand {
            message_id: message_id.clone(),
            key_id: input.key_id.clone(),
            user: input.user.clone(),
            content: input.content,
            requested_agent: input.agent,
            agent: routed.agent.clone(),
            rule: routed.rule,
            correlation_id: input.correlation_id,
            traceparent: input.traceparent.clone(),
        };
        let (ack, durable) = match early {
            true => {
                self.inner
                    .registry
                    .send_early(conversation_id, command)
                    .await?
            }
            false => {
                let ack = self.inner.registry.send(conversation_id, command).await?;
                (ack, Durable::already())
            }
        };
        if ack.duplicate {
            return Ok((ack, NextTurn(None), durable));
        }
        let job = TurnJob {
            conversation_id: conversation_id.to_owned(),
            message_id,
            key_id: input.key_id,
            user: input.user,
            agent: routed.agent,
            correlation_id: input.correlation_id,
            traceparent: input.traceparent,
            deltas: input.deltas,
            deltas_handed_on: input.deltas_handed_on,
            permit: input.permit,
            ended: input.ended,
            durable: durable.clone(),
        };
        // Counted before the task exists, so `wait_idle` cannot miss it.
        let guard = TurnGuard::new(&self.inner);
        Ok((ack, NextTurn(Some((guard, job))), durable))
    }

    /// Keeps, per conversation, only the exchanges the longest context needs:
    /// `messages` earlier messages (the largest `context_messages` of the
    /// agents), so a long conversation's cached fold stays small and the
    /// cache holds every busy conversation. [`Self::context`] then returns
    /// the newest of them only.
    pub fn keep_context(&self, messages: usize) {
        self.inner.contexts.keep(messages.div_ceil(2));
    }

    /// The conversation's chat history as an agent sees it: its completed
    /// exchanges, oldest first (see the module doc).
    pub async fn context(
        &self,
        conversation_id: &str,
    ) -> Result<Vec<ChatMessage>, ConversationError> {
        validate_conversation_id(conversation_id)?;
        self.inner
            .contexts
            .read(conversation_id, None)
            .await
            .map(|context| context.history)
    }

    /// Ends every turn of the conversation left without a reply by an earlier
    /// process with `reply_failed` ([`LOST_TURN_CODE`]); returns how many.
    /// Only turns whose message was stored before this coordinator started
    /// are lost; later pending turns are its own, still running. `send` calls
    /// it before a conversation's first message; it looks once per
    /// conversation (remembering up to [`MAX_RECOVERED`] conversations, then
    /// starting over: a second look finds nothing left to end).
    pub async fn finish_pending(&self, conversation_id: &str) -> Result<usize, ConversationError> {
        validate_conversation_id(conversation_id)?;
        let once = {
            let max = self.inner.max_recovered.load(Ordering::Relaxed);
            let mut recovered = self.inner.recovered.lock().expect("recovered lock");
            if recovered.len() >= max && !recovered.contains_key(conversation_id) {
                switchboard_events::forget::start_over(&mut *recovered);
            }
            recovered
                .entry(conversation_id.to_owned())
                .or_default()
                .clone()
        };
        let mut ended = 0;
        once.get_or_try_init(|| async {
            ended = self.inner.fail_lost_turns(conversation_id).await?;
            Ok::<(), ConversationError>(())
        })
        .await?;
        Ok(ended)
    }

    /// How many conversations [`Self::finish_pending`] remembers having
    /// looked at ([`MAX_RECOVERED`] unless set; at least 1).
    pub fn remember_recovered(&self, conversations: usize) {
        self.inner
            .max_recovered
            .store(conversations.max(1), Ordering::Relaxed);
    }

    /// [`Self::finish_pending`] for each of `conversation_ids` (at startup,
    /// every conversation the history projection knows), a few at a time;
    /// returns how many turns were ended. A conversation that fails does
    /// not stop the others: each failure is logged, and the first is
    /// returned once every conversation was tried (the failed ones are
    /// looked at again before their next turn).
    pub async fn finish_all_pending(
        &self,
        conversation_ids: impl IntoIterator<Item = String>,
    ) -> Result<usize, ConversationError> {
        let mut finished = futures::stream::iter(conversation_ids)
            .map(|id| async move { (self.finish_pending(&id).await, id) })
            .buffer_unordered(RECOVERY_PARALLELISM);
        let mut ended = 0;
        let mut first_error = None;
        while let Some((result, conversation_id)) = finished.next().await {
            match result {
                Ok(count) => ended += count,
                Err(error) => {
                    tracing::warn!(%conversation_id, %error, "its lost turns could not be ended");
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(ended),
        }
    }

    /// The configured agents' names, sorted.
    pub fn agent_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.inner.agents.keys().cloned().collect();
        names.sort();
        names
    }

    /// The agent messages go to when nothing else decides.
    pub fn default_agent(&self) -> &str {
        self.inner.router.default_agent()
    }

    /// Conversation actors alive now.
    pub fn live_conversations(&self) -> usize {
        self.inner.registry.live_count()
    }

    /// Erases a conversation's content on behalf of `by`
    /// ([`ConversationRegistry::erase`]).
    pub async fn erase(
        &self,
        conversation_id: &str,
        by: &str,
    ) -> Result<Erased, ConversationError> {
        self.inner.registry.erase(conversation_id, by).await
    }

    /// Whether every turn this coordinator started has its end stored (none
    /// failed to store, panicked or was aborted). After [`Self::drain`], true
    /// means this process leaves no open turn behind.
    pub fn all_turns_ended(&self) -> bool {
        !self.inner.in_flight.left_open.load(Ordering::SeqCst)
    }

    /// How many turns are running.
    pub fn turns_in_flight(&self) -> usize {
        self.inner.in_flight.count.load(Ordering::SeqCst)
    }

    /// Waits until no turn is running (new sends may start more).
    pub async fn wait_idle(&self) {
        loop {
            let done = self.inner.in_flight.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.turns_in_flight() == 0 {
                return;
            }
            done.await;
        }
    }

    /// For shutdown after [`Self::drain`] timed out: aborts the turns still
    /// running. Their ends are not stored; the next start ends them
    /// `reply_failed` ([`LOST_TURN_CODE`]). Their tasks drop their handles
    /// on the log, so the data dir can be closed.
    pub fn abort_all(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let tasks: Vec<_> = self
            .inner
            .in_flight
            .tasks
            .lock()
            .expect("tasks lock")
            .values()
            .cloned()
            .collect();
        for task in tasks {
            task.abort();
        }
    }

    /// For shutdown: stops taking sends (they answer `unavailable`) and waits
    /// for the running turns to store their end. Call it before
    /// [`ConversationRegistry::shutdown`], which the turns still need.
    pub async fn drain(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.wait_idle().await;
    }
}

/// Counts a stored turn's tokens and cost in the process's metrics.
fn record_usage(usage: &UsageRecorded) {
    let model = usage.model.clone();
    metrics::counter!("switchboard_cost_micros_total", "model" => model.clone())
        .increment(usage.cost_micros);
    metrics::counter!("switchboard_tokens_total", "model" => model.clone(), "direction" => "input")
        .increment(usage.prompt_tokens);
    metrics::counter!("switchboard_tokens_total", "model" => model, "direction" => "output")
        .increment(usage.completion_tokens);
}

impl Inner {
    /// Runs one turn; returns whether its end is stored.
    async fn run_turn(&self, job: TurnJob) -> bool {
        let TurnJob {
            conversation_id,
            message_id,
            key_id,
            user,
            agent,
            correlation_id,
            traceparent,
            deltas,
            deltas_handed_on,
            permit,
            ended,
            durable,
        } = job;
        let mut request = TurnRequest::new(&conversation_id, &message_id, key_id, Vec::new());
        request.user = user;
        request.correlation_id = correlation_id;
        request.traceparent = traceparent;
        let mut context = self
            .contexts
            .read(&conversation_id, Some(&message_id))
            .await;
        // A message acknowledged early is in the context cache, which its
        // actor keeps up with what it writes, but not yet in the log: a fold
        // that has to read the log finds it once it is durable.
        if context.is_err() && durable.wait().await.is_ok() {
            context = self
                .contexts
                .read(&conversation_id, Some(&message_id))
                .await;
        }
        let outcome = match context {
            Ok(context) => {
                request.history = context.history;
                request.causation_id = context.routed_event;
                self.ask_agent(&agent, request, deltas).await
            }
            Err(error) => {
                tracing::warn!(%conversation_id, %message_id, %error, "no context for the turn");
                TurnOutcome::failure(&request, &agent, "internal", error.to_string())
            }
        };
        let usage = outcome
            .events
            .iter()
            .enumerate()
            .find_map(|(offset, new)| match &new.event {
                Event::UsageRecorded(usage) => Some((offset as u64, usage.clone())),
                _ => None,
            });
        let events = outcome.events.len();
        // The relay has closed `deltas`; once the caller has handed them on,
        // the end may follow them.
        if let Some(handed_on) = deltas_handed_on {
            let _ = tokio::time::timeout(DELTAS_HANDED_ON_WAIT, handed_on).await;
        }
        let stored = self.store_end(&conversation_id, &message_id, outcome).await;
        if let (Some(Some(first)), Some((offset, usage))) = (stored, &usage) {
            record_usage(usage);
            if let Some(budgets) = self.budgets.get() {
                budgets.charge(&usage.key_id, first + offset, usage.cost_micros);
            }
        }
        if let (Some(Some(first_seq)), Some(ended)) = (stored, ended) {
            let _ = ended.send(TurnEnd { first_seq, events });
        }
        if let Some(permit) = permit {
            permit.finish(usage.map_or(0, |(_, u)| u.prompt_tokens + u.completion_tokens));
        }
        stored.is_some()
    }

    /// Runs the turn on the agent, relaying its deltas to the caller as
    /// [`ReplyDelta`]s; returns once both the turn and the relay are done.
    async fn ask_agent(
        &self,
        agent: &str,
        mut request: TurnRequest,
        caller: Option<mpsc::Sender<ReplyDelta>>,
    ) -> TurnOutcome {
        let Some(actor) = self.agents.get(agent) else {
            return TurnOutcome::failure(
                &request,
                agent,
                "internal",
                "the agent is not configured",
            );
        };
        let Some(caller) = caller else {
            return request_turn(actor, agent, request).await;
        };
        let (pieces, mut received) = mpsc::channel::<String>(DELTA_BUFFER);
        request.deltas = Some(pieces);
        let (conversation_id, message_id, reply_id) = (
            request.conversation_id.clone(),
            request.message_id.clone(),
            request.reply_id.clone(),
        );
        // Pieces that queued up while the last delta was being handed on go
        // out as one: a burst (a model's SSE chunks read together, or echo's
        // instant words) costs one message, and a model streaming token by
        // token still streams token by token.
        let relay = async move {
            let mut index = 0;
            let mut pieces = Vec::new();
            while received.recv_many(&mut pieces, DELTA_BUFFER).await > 0 {
                let delta = ReplyDelta {
                    conversation_id: conversation_id.clone(),
                    message_id: message_id.clone(),
                    reply_id: reply_id.clone(),
                    index,
                    delta: pieces.concat(),
                };
                pieces.clear();
                index += 1;
                // A caller that stopped listening does not stop the turn.
                let _ = caller.send(delta).await;
            }
        };
        let (outcome, ()) = tokio::join!(request_turn(actor, agent, request), relay);
        outcome
    }

    /// Hands the turn's end to the conversation's actor, retrying while the
    /// conversation is unavailable or conflicted ([`END_TURN_ATTEMPTS`]; if
    /// it still cannot be stored, the turn stays pending in the log and a
    /// later start fails it).
    /// `None` when it was not stored; otherwise the seq of its first event,
    /// `Some(None)` when the turn had already ended.
    async fn store_end(
        &self,
        conversation_id: &str,
        message_id: &str,
        outcome: TurnOutcome,
    ) -> Option<Option<u64>> {
        let mut wait = Duration::from_millis(50);
        for attempt in 1..=END_TURN_ATTEMPTS {
            let result = self
                .registry
                .end_turn(conversation_id, message_id, outcome.events.clone())
                .await;
            match result {
                Ok(first) => return Some(first),
                Err(
                    error @ (ConversationError::Unavailable(_) | ConversationError::Conflict(_)),
                ) if attempt < END_TURN_ATTEMPTS && !self.closed.load(Ordering::SeqCst) => {
                    // (Not while shutting down: the next start fails the turn.)
                    tracing::info!(%conversation_id, %message_id, %error, "retrying the turn's end");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(END_TURN_MAX_WAIT);
                }
                Err(error) => {
                    tracing::error!(%conversation_id, %message_id, code = error.code(), %error,
                        "the turn's end was not stored; it stays pending until a restart fails it");
                    return None;
                }
            }
        }
        None
    }

    async fn fail_lost_turns(&self, conversation_id: &str) -> Result<usize, ConversationError> {
        let mut pending = self.registry.pending_turns(conversation_id).await?;
        pending.retain(|turn| turn.message_seq <= self.started_at);
        for turn in &pending {
            let agent = turn.agent.as_deref().unwrap_or(self.router.default_agent());
            // Only the ids matter for a failure: no context, no usage.
            let request = TurnRequest::new(conversation_id, &turn.message_id, "", Vec::new());
            let outcome = TurnOutcome::failure(&request, agent, LOST_TURN_CODE, LOST_TURN_MESSAGE);
            self.registry
                .end_turn(conversation_id, &turn.message_id, outcome.events)
                .await?;
        }
        if !pending.is_empty() {
            tracing::warn!(%conversation_id, turns = pending.len(), "failed turns lost in a restart");
        }
        Ok(pending.len())
    }
}
