//! The agent actor (DESIGN §5): one per configured agent, it turns a
//! conversation into a reply through its provider and ends every turn with
//! `reply_completed` or `reply_failed`.
//!
//! It does not write to the log. A conversation's stream `conv/<id>` has one
//! writer, its `ConversationActor`, so a turn *returns* the events to append
//! ([`TurnOutcome`]) and the conversation appends them at its own version.
//!
//! What a turn goes through, in order:
//! - **circuit** ([`circuit`]): after `circuit_failure_threshold` consecutive
//!   transient failures the agent refuses turns with code `unavailable`,
//!   without calling the provider, for `circuit_open_for`; then one trial call
//!   decides whether it closes again. State changes are sent as
//!   [`CircuitAlert`]s for the owner to publish on `sb.alert.agent.<name>`.
//! - **concurrency**: at most `max_concurrency` provider calls at once; other
//!   turns wait for a slot (the actor itself never waits: each turn runs in its
//!   own task, so a slow model does not hold up the agent's mailbox).
//! - **timeout**: each attempt ends within `timeout`, streaming included.
//! - **retries**: transient errors (timeouts, 429, 5xx, cut streams, refused
//!   connections) are retried up to `max_retries` times with exponential
//!   backoff and jitter, obeying `Retry-After` — but never once the attempt has
//!   streamed deltas to the caller, since a second attempt would stream the
//!   reply again from its start.
//! - **usage**: a completed turn is followed by `usage_recorded` with the
//!   provider's token counts, or tokenizer counts marked `estimated` when it
//!   reported none, priced with [`Price::cost_micros`].
//!
//! A turn cut off after streaming part of its reply (the stream dropped, the
//! server went silent past the timeout, or it reported an error mid-stream)
//! ends with `reply_failed` — the partial text is not stored as a reply —
//! followed by `usage_recorded` charging what was streamed: the tokens the
//! provider reported, or else the context and the partial text counted with
//! the tokenizer and marked `estimated`. That `usage_recorded` is caused by
//! the `reply_failed` (its `causation_id`), which is how a partial charge is
//! told from a completed one. Attempts that failed before streaming anything
//! are not charged (model servers do not bill refused or failed requests).

pub mod circuit;
mod pricing;
mod retry;
mod turn;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, MessagingErr, RpcReplyPort};
use switchboard_events::catalog::{ReplyCompleted, ReplyFailed, UsageRecorded};
use switchboard_events::{Event, NewEvent};
use tokio::sync::{mpsc, Semaphore};
use uuid::Uuid;

use crate::provider::{ChatMessage, Provider};
use circuit::{CircuitBreaker, CircuitState, CircuitTransition};

pub use pricing::Price;

/// How an agent calls its provider. Built from the `[[agents]]` table of the
/// config; [`AgentConfig::new`] fills in the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// The agent's name: what the router and `reply_*.agent` say.
    pub name: String,
    /// Provider calls in flight at once, at most (at least 1).
    pub max_concurrency: usize,
    /// How long one attempt may take, from the request to the last token.
    pub timeout: Duration,
    /// Further attempts after a transient failure (0: try once).
    pub max_retries: u32,
    /// The wait before the first retry (doubling each time, with jitter).
    pub backoff_base: Duration,
    /// The longest wait between attempts; a `Retry-After` beyond it is not waited for.
    pub backoff_max: Duration,
    /// Consecutive transient failures that open the circuit.
    pub circuit_failure_threshold: u32,
    /// How long an open circuit refuses turns before letting a trial through.
    pub circuit_open_for: Duration,
    /// What the agent's tokens cost.
    pub prices: Price,
    /// Earlier messages of the conversation sent with each turn, at most:
    /// the newest whole exchanges (a user message and its reply) that fit,
    /// then the message answered. 0 sends the message alone.
    pub context_messages: usize,
    /// At most this many tokens of earlier messages (counted by
    /// [`crate::provider::messages_tokens`], as usage is estimated) sent with each
    /// turn: of the exchanges `context_messages` allows, the newest whole ones
    /// that fit. `None`: no cap but `context_messages`.
    pub context_tokens: Option<u64>,
}

impl AgentConfig {
    /// Provider calls in flight at once per agent.
    pub const DEFAULT_MAX_CONCURRENCY: usize = 16;
    /// Generous: a CPU-bound local model may take a minute for a long reply.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
    /// Three attempts in all.
    pub const DEFAULT_MAX_RETRIES: u32 = 2;
    /// First retry after 0.25–0.5 s.
    pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(500);
    /// No wait between attempts longer than this.
    pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(10);
    /// The last 50 exchanges: a long conversation neither outgrows a model's
    /// context window nor makes each turn dearer than the one before.
    pub const DEFAULT_CONTEXT_MESSAGES: usize = 100;
    /// Five transient failures in a row: the server is down, not unlucky.
    pub const DEFAULT_CIRCUIT_FAILURE_THRESHOLD: u32 = 5;
    /// Then leave it alone for half a minute.
    pub const DEFAULT_CIRCUIT_OPEN_FOR: Duration = Duration::from_secs(30);

    /// An agent called `name` with the default limits and free tokens.
    pub fn new(name: impl Into<String>) -> Self {
        AgentConfig {
            name: name.into(),
            max_concurrency: Self::DEFAULT_MAX_CONCURRENCY,
            timeout: Self::DEFAULT_TIMEOUT,
            max_retries: Self::DEFAULT_MAX_RETRIES,
            backoff_base: Self::DEFAULT_BACKOFF_BASE,
            backoff_max: Self::DEFAULT_BACKOFF_MAX,
            circuit_failure_threshold: Self::DEFAULT_CIRCUIT_FAILURE_THRESHOLD,
            circuit_open_for: Self::DEFAULT_CIRCUIT_OPEN_FOR,
            prices: Price::FREE,
            context_messages: Self::DEFAULT_CONTEXT_MESSAGES,
            context_tokens: None,
        }
    }
}

/// One turn to answer: the message and its context, and who pays.
#[derive(Debug, Clone)]
pub struct TurnRequest {
    /// The conversation the turn belongs to.
    pub conversation_id: String,
    /// The user message being answered.
    pub message_id: String,
    /// The API key charged in `usage_recorded`.
    pub key_id: String,
    /// The user (key owner) charged alongside the key, if known.
    pub user: Option<String>,
    /// The reply's id (UUID v7), chosen up front so the caller can label the
    /// `reply_delta`s it publishes before the turn ends.
    pub reply_id: String,
    /// The context sent to the model, oldest first, ending with the message
    /// being answered.
    pub history: Vec<ChatMessage>,
    /// Where to stream the reply's pieces as they arrive, if anyone listens.
    /// The receiver must be drained while the turn runs (a full channel holds
    /// the model back); dropping it is fine.
    pub deltas: Option<mpsc::Sender<String>>,
    /// Copied onto the events the turn produces.
    pub correlation_id: Option<Uuid>,
    /// The event that asked for the turn (`agent_routed`): the cause of the
    /// reply event.
    pub causation_id: Option<Uuid>,
    /// W3C trace context, copied onto the events.
    pub traceparent: Option<String>,
}

impl TurnRequest {
    /// A turn with a fresh `reply_id`, no user, no delta stream and no trace
    /// context; set the public fields for those.
    pub fn new(
        conversation_id: impl Into<String>,
        message_id: impl Into<String>,
        key_id: impl Into<String>,
        history: Vec<ChatMessage>,
    ) -> Self {
        TurnRequest {
            conversation_id: conversation_id.into(),
            message_id: message_id.into(),
            key_id: key_id.into(),
            user: None,
            reply_id: Uuid::now_v7().to_string(),
            history,
            deltas: None,
            correlation_id: None,
            causation_id: None,
            traceparent: None,
        }
    }

    /// The request without its context or delta stream: enough to write the
    /// turn's failure if the turn itself is lost.
    fn ids_only(&self) -> TurnRequest {
        TurnRequest {
            conversation_id: self.conversation_id.clone(),
            message_id: self.message_id.clone(),
            key_id: self.key_id.clone(),
            user: self.user.clone(),
            reply_id: self.reply_id.clone(),
            history: Vec::new(),
            deltas: None,
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            traceparent: self.traceparent.clone(),
        }
    }

    /// A new event carrying this turn's correlation and trace context.
    fn event(&self, event: Event, causation_id: Option<Uuid>) -> NewEvent {
        let mut new = NewEvent::new(event);
        new.correlation_id = self.correlation_id;
        new.causation_id = causation_id;
        new.traceparent = self.traceparent.clone();
        new
    }
}

/// How a turn ended: the events for the conversation to append, in order —
/// `[reply_completed, usage_recorded]`, `[reply_failed]`, or
/// `[reply_failed, usage_recorded]` when a cut-off turn is charged for what it
/// streamed (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnOutcome {
    /// To be appended to `conv/<conversation_id>` in this order, in one append.
    pub events: Vec<NewEvent>,
}

impl TurnOutcome {
    /// A turn that ended with `reply_failed` and no usage: for callers whose
    /// turn never reached (or never came back from) the agent.
    pub fn failure(
        request: &TurnRequest,
        agent: &str,
        code: &str,
        message: impl Into<String>,
    ) -> Self {
        let failed = Event::ReplyFailed(ReplyFailed {
            conversation_id: request.conversation_id.clone(),
            message_id: request.message_id.clone(),
            agent: agent.to_owned(),
            code: code.to_owned(),
            message: message.into(),
        });
        TurnOutcome {
            events: vec![request.event(failed, request.causation_id)],
        }
    }

    /// The `reply_completed`, if the turn completed.
    pub fn completed(&self) -> Option<&ReplyCompleted> {
        self.events.iter().find_map(|new| match &new.event {
            Event::ReplyCompleted(completed) => Some(completed),
            _ => None,
        })
    }

    /// The `reply_failed`, if the turn failed.
    pub fn failed(&self) -> Option<&ReplyFailed> {
        self.events.iter().find_map(|new| match &new.event {
            Event::ReplyFailed(failed) => Some(failed),
            _ => None,
        })
    }

    /// The `usage_recorded`, if the turn is charged.
    pub fn usage(&self) -> Option<&UsageRecorded> {
        self.events.iter().find_map(|new| match &new.event {
            Event::UsageRecorded(usage) => Some(usage),
            _ => None,
        })
    }
}

/// A change of an agent's circuit, for `sb.alert.agent.<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitAlert {
    /// The agent's name.
    pub agent: String,
    /// What changed.
    pub transition: CircuitTransition,
    /// The failure that opened (or reopened) the circuit, as text.
    pub cause: Option<String>,
}

/// An agent's turn-running core: its config, provider, concurrency slots and
/// circuit. [`AgentActor`] runs turns on it; it is shared (`Arc`) so that an
/// actor restarted with the same `Arc` keeps its slots and circuit, and so
/// turns can run without an actor where one is not wanted (benchmarks).
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    provider: Arc<dyn Provider>,
    slots: Semaphore,
    breaker: Mutex<CircuitBreaker>,
    alerts: Option<mpsc::UnboundedSender<CircuitAlert>>,
}

impl Agent {
    /// An agent calling `provider` as `config` says.
    pub fn new(config: AgentConfig, provider: Arc<dyn Provider>) -> Self {
        let breaker =
            CircuitBreaker::new(config.circuit_failure_threshold, config.circuit_open_for);
        metrics::gauge!("switchboard_circuit_state", "agent" => config.name.clone())
            .set(CircuitState::Closed.gauge());
        Agent {
            slots: Semaphore::new(config.max_concurrency.max(1)),
            breaker: Mutex::new(breaker),
            config,
            provider,
            alerts: None,
        }
    }

    /// Send every circuit state change to `alerts` (unbounded: changes are rare,
    /// and a slow publisher must not hold up turns).
    pub fn with_alerts(mut self, alerts: mpsc::UnboundedSender<CircuitAlert>) -> Self {
        self.alerts = Some(alerts);
        self
    }

    /// The agent's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The agent's configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// Where the circuit stands now.
    pub fn circuit_state(&self) -> CircuitState {
        self.breaker().state(tokio::time::Instant::now())
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, CircuitBreaker> {
        // The breaker is plain data updated in one step: a panic elsewhere
        // while it was locked cannot have left it half-changed.
        self.breaker.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What an [`AgentActor`] is asked.
#[derive(Debug)]
// Nearly every message is a turn; boxing it would cost an allocation per turn
// to shrink the rare circuit query.
#[allow(clippy::large_enum_variant)]
pub enum AgentMsg {
    /// Run a turn; the outcome comes back on the port when the turn ends.
    Turn(TurnRequest, RpcReplyPort<TurnOutcome>),
    /// Where the circuit stands (for health and readiness).
    Circuit(RpcReplyPort<CircuitState>),
}

/// The actor of one agent. Spawn it with its [`Agent`]:
///
/// ```
/// use std::sync::Arc;
/// use ractor::Actor;
/// use switchboard_actors::agent::{request_turn, Agent, AgentActor, AgentConfig, TurnRequest};
/// use switchboard_actors::provider::{ChatMessage, EchoProvider};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let agent = Arc::new(Agent::new(AgentConfig::new("echo"), Arc::new(EchoProvider::new())));
/// let (actor, _) = Actor::spawn(Some("agent/echo".into()), AgentActor, agent).await.unwrap();
/// let request = TurnRequest::new("c1", "m1", "key_1", vec![ChatMessage::user("hi")]);
/// let outcome = request_turn(&actor, "echo", request).await;
/// assert_eq!(outcome.completed().unwrap().content, "echo: hi");
/// # });
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct AgentActor;

#[ractor::async_trait]
impl Actor for AgentActor {
    type Msg = AgentMsg;
    type State = Arc<Agent>;
    type Arguments = Arc<Agent>;

    async fn pre_start(
        &self,
        _myself: ActorRef<AgentMsg>,
        agent: Arc<Agent>,
    ) -> Result<Arc<Agent>, ActorProcessingErr> {
        Ok(agent)
    }

    async fn handle(
        &self,
        _myself: ActorRef<AgentMsg>,
        message: AgentMsg,
        agent: &mut Arc<Agent>,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            AgentMsg::Turn(request, reply) => {
                let agent = agent.clone();
                // The turn outlives a stop of the actor: its caller still gets an end.
                tokio::spawn(async move {
                    let outcome = agent.run_turn(request).await;
                    // A caller that stopped waiting has nothing left to tell.
                    let _ = reply.send(outcome);
                });
            }
            AgentMsg::Circuit(reply) => {
                let _ = reply.send(agent.circuit_state());
            }
        }
        Ok(())
    }
}

/// Ask `actor` (the agent called `agent`) for a turn and wait for its end.
/// Never fails: an agent that is gone, or loses the turn, yields a
/// `reply_failed` with code `unavailable`.
pub async fn request_turn(
    actor: &ActorRef<AgentMsg>,
    agent: &str,
    request: TurnRequest,
) -> TurnOutcome {
    let ids = request.ids_only();
    match actor
        .call(|reply| AgentMsg::Turn(request, reply), None)
        .await
    {
        Ok(ractor::rpc::CallResult::Success(outcome)) => outcome,
        Ok(_) => TurnOutcome::failure(&ids, agent, "unavailable", "the agent lost the turn"),
        Err(MessagingErr::SendErr(AgentMsg::Turn(request, _))) => {
            TurnOutcome::failure(&request, agent, "unavailable", "the agent is not running")
        }
        Err(_) => TurnOutcome::failure(&ids, agent, "unavailable", "the agent is not running"),
    }
}
