//! `switchboard serve` as a library: one [`Server`] wires the log, the
//! projections, the actors and the NATS gateway together on one bus (DESIGN
//! §1, §8), and takes them apart again in an order that loses nothing.
//!
//! Start-up: check the configuration, try the HTTP address and connect the
//! bus (NATS, or the embedded bus) — so a mistake, a busy port or an
//! unreachable NATS is refused before anything is created — then open the log
//! (refusing a dir another process holds), bring the projections up to its
//! head (a stop signal interrupts that, see [`Server::start_unless`]), make
//! sure the admin key exists, start the agents, the conversations and the
//! gateway, then publish events from the log (the outbox) and end turns an
//! earlier process left without a reply.
//!
//! Shutdown ([`Server::shutdown`]): stop taking requests (answering those
//! already taken), let running turns finish — each ends `reply_completed` or
//! `reply_failed` — for up to [`ServerConfig::drain_timeout`], stop the
//! actors, publish what the log holds, stop the projections, flush. Turns
//! still running after the drain timeout are ended `reply_failed` by the next
//! start, never left open.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorRef};
use serde_json::json;
use switchboard_actors::agent::circuit::CircuitTransition;
use switchboard_actors::agent::{Agent, AgentActor, AgentConfig, AgentMsg, CircuitAlert};
use switchboard_actors::budget::{BudgetConfig, Budgets};
use switchboard_actors::conversation_actor::{ConversationRegistry, RegistryConfig};
use switchboard_actors::provider::{EchoProvider, OpenAiProvider, Provider};
use switchboard_actors::router::Router;
use switchboard_actors::turns::TurnCoordinator;
use switchboard_events::{EventLog, OpenMode};
use switchboard_projections::{ProjectionError, Projections, SpendIndex};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::alerts::{WebhookConfig, WebhookHandle, WebhookSink};
use crate::bus::{Bus, Headers, LocalBus, LocalBusConfig, NatsBus};
use crate::gateway::{FrontBus, GatewayHandle, NatsGateway};
use crate::http::{HttpConfig, HttpHandle};
use crate::keys::{self, AdminBootstrap};
use crate::outbox::{DeltaQueue, Outbox, OutboxError, OutboxHandle};
use crate::service::{self, ServiceHandle, ServiceInfo};

/// How long start-up waits for the first NATS connection.
const NATS_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest message on the in-process bus of the HTTP front beside a
/// core on NATS. It carries only this process's own messages, so it need
/// not keep to NATS's 1 MiB: a reply over it reaches the front whole (the
/// front's request bodies are limited to 256 KiB anyway).
const FRONT_MAX_PAYLOAD: usize = 64 * 1024 * 1024;

/// Everything `serve` is configured with, resolved from flags, environment,
/// config file and defaults.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// `None`: the embedded bus.
    pub nats_url: Option<String>,
    /// The first token of every subject (`sb`).
    pub prefix: String,
    /// Publish events whose subjects match this pattern through JetStream
    /// and advance the outbox only on the stream's acknowledgment (set it
    /// when a stream captures them, e.g. `sb.evt.>`; every matching subject
    /// must then be captured). NATS only.
    pub outbox_jetstream: Option<String>,
    /// `SWITCHBOARD_ADMIN_KEY`; without it the first start generates one.
    pub admin_key: Option<String>,
    pub agents: Vec<AgentSpec>,
    /// `(pattern, agent)` routing rules, in order.
    pub routes: Vec<(String, String)>,
    pub default_agent: String,
    pub conversations: RegistryConfig,
    /// How long shutdown waits for running turns.
    pub drain_timeout: Duration,
    /// The HTTP front, if any.
    pub http: Option<HttpConfig>,
    /// Alert thresholds and user budgets (key budgets come with the keys).
    pub budgets: BudgetConfig,
    /// Alert webhooks (`[alerts] webhooks`); Debug shows only their hosts.
    pub webhooks: WebhookConfig,
}

impl ServerConfig {
    /// The defaults of DESIGN §8: `./data`, the embedded bus, one `echo` agent.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ServerConfig {
            data_dir: data_dir.into(),
            nats_url: None,
            prefix: crate::gateway::DEFAULT_PREFIX.to_owned(),
            outbox_jetstream: None,
            admin_key: None,
            agents: vec![AgentSpec {
                config: AgentConfig::new("echo"),
                provider: ProviderSpec::Echo {
                    word_delay: Duration::ZERO,
                },
            }],
            routes: Vec::new(),
            default_agent: "echo".to_owned(),
            conversations: RegistryConfig::default(),
            drain_timeout: Duration::from_secs(30),
            http: None,
            budgets: BudgetConfig::default(),
            webhooks: WebhookConfig::default(),
        }
    }
}

/// One configured agent.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub config: AgentConfig,
    pub provider: ProviderSpec,
}

/// The model behind an agent.
#[derive(Clone)]
pub enum ProviderSpec {
    /// The built-in echo, its words paced by `word_delay` (zero: all at once).
    Echo { word_delay: Duration },
    /// An OpenAI-compatible chat-completions server.
    OpenAi {
        base_url: String,
        model: String,
        /// The secret itself (read from the environment variable the config
        /// names); never printed.
        api_key: Option<String>,
    },
}

impl std::fmt::Debug for ProviderSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProviderSpec::Echo { word_delay } => f
                .debug_struct("Echo")
                .field("word_delay", word_delay)
                .finish(),
            ProviderSpec::OpenAi {
                base_url,
                model,
                api_key,
            } => f
                .debug_struct("OpenAi")
                .field("base_url", base_url)
                .field("model", model)
                .field("api_key", &api_key.as_ref().map(|_| "<set>"))
                .finish(),
        }
    }
}

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Open(#[from] switchboard_events::OpenError),
    #[error("the projections: {0}")]
    Projections(#[from] switchboard_projections::ProjectionError),
    #[error("the admin key: {0}")]
    AdminKey(#[from] keys::KeyAdminError),
    #[error("the bus: {0}")]
    Bus(#[from] crate::bus::BusError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Http {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach NATS at {url} within {}s: is nats-server running there?", waited.as_secs())]
    NatsUnreachable { url: String, waited: Duration },
    #[error("{0}")]
    Actor(String),
    #[error("stopped before it was ready")]
    Interrupted,
}

/// A running switchboard; see the module doc.
pub struct Server {
    log: EventLog,
    projections: Projections,
    bus: Bus,
    registry: ConversationRegistry,
    coordinator: TurnCoordinator,
    agents: Vec<ActorRef<AgentMsg>>,
    gateway: GatewayHandle,
    http: Option<HttpHandle>,
    service: ServiceHandle,
    outbox: OutboxHandle,
    /// The front's feed of the log's events, beside an HTTP front on NATS.
    front_feed: Option<JoinHandle<()>>,
    webhooks: WebhookHandle,
    stop_sampler: oneshot::Sender<()>,
    sampler_task: JoinHandle<()>,
    /// Keeps the budget gauges in `/metrics` until the server stops.
    shown_budgets: crate::metrics::ShownBudgets,
    admin: AdminBootstrap,
    stop_projections: oneshot::Sender<()>,
    projections_task: JoinHandle<()>,
    budgets: Budgets,
    stop_spend: oneshot::Sender<()>,
    spend_task: JoinHandle<()>,
    alerts_task: JoinHandle<()>,
    /// Ends turns an earlier process left open; true once all are ended.
    recovery_task: JoinHandle<bool>,
    drain_timeout: Duration,
}

impl Server {
    /// Starts everything; see the module doc. Returns once requests are
    /// being taken.
    pub async fn start(config: ServerConfig) -> Result<Server, ServerError> {
        Server::start_unless(config, Arc::new(AtomicBool::new(false))).await
    }

    /// [`Server::start`] that gives up once `interrupt` is set (a stop signal
    /// before the server is ready), with [`ServerError::Interrupted`]. The
    /// projections' catch-up, the long part of a start after an upgrade or
    /// a replay, commits what it has folded and stops within a batch; what
    /// else start does is async, and the caller may drop it. The stop note
    /// start takes is put back, so the next start knows the last stop was
    /// clean.
    pub async fn start_unless(
        config: ServerConfig,
        interrupt: Arc<AtomicBool>,
    ) -> Result<Server, ServerError> {
        // A configuration mistake is reported before anything is opened or created.
        let router = Router::new(config.routes.clone(), config.default_agent.clone())
            .map_err(|e| ServerError::Config(e.to_string()))?;
        router
            .check(|name| config.agents.iter().any(|a| a.config.name == name))
            .map_err(|e| ServerError::Config(e.to_string()))?;
        let providers = config
            .agents
            .iter()
            .map(|spec| provider(&spec.provider))
            .collect::<Result<Vec<_>, _>>()?;

        let budget_config = config
            .budgets
            .clone()
            .validated()
            .map_err(ServerError::Config)?;
        config
            .webhooks
            .check()
            .map_err(|e| ServerError::Config(format!("the alert webhooks: {e}")))?;
        let outbox_error = |e: OutboxError| ServerError::Config(format!("the outbox: {e}"));
        if let Some(pattern) = &config.outbox_jetstream {
            crate::outbox::jetstream_pattern(pattern).map_err(outbox_error)?;
        }
        // Then what lies outside: a busy HTTP address or an unreachable NATS
        // is refused before the data dir is created or the admin key made.
        // The address is only tried here and bound again once the server is
        // ready: a connection made during a long start-up is refused, not
        // left waiting unanswered.
        if let Some(http) = &config.http {
            std::net::TcpListener::bind(http.addr).map_err(|source| ServerError::Http {
                addr: http.addr,
                source,
            })?;
        }
        let bus = match &config.nats_url {
            Some(url) => Bus::from(connect_nats(url).await?),
            None => Bus::from(LocalBus::new()),
        };

        let dir = config.data_dir.clone();
        crate::metrics::install();
        let (log, projections, spend, clean_stop) = tokio::task::spawn_blocking(move || {
            let log = EventLog::open(&dir, OpenMode::CreateIfMissing)?;
            let clean_stop = take_clean_stop(&log)?;
            let projections = Projections::open(&log)?;
            let caught_up =
                projections.catch_up_unless(&mut catch_up_progress(log.head()), Some(&interrupt));
            if let Err(ProjectionError::Interrupted) = caught_up {
                if let Some(head) = clean_stop {
                    note_clean_stop_at(&log, head).map_err(|e| {
                        ServerError::Actor(format!("putting the stop note back: {e}"))
                    })?;
                }
                tracing::info!("start interrupted while catching up the projections");
                return Err(ServerError::Interrupted);
            }
            caught_up?;
            // Before the live fold starts: the index must match the views.
            let spend = SpendIndex::load(&projections)?;
            Ok::<_, ServerError>((log, projections, spend, clean_stop))
        })
        .await
        .map_err(|e| ServerError::Actor(format!("opening the data dir panicked: {e}")))??;
        let admin = keys::bootstrap_admin(&log, &projections, config.admin_key.as_deref()).await?;

        let (stop_projections, stopped) = oneshot::channel::<()>();
        let live = projections.clone();
        let projections_task = tokio::spawn(async move {
            if let Err(error) = live
                .run_live(async {
                    let _ = stopped.await;
                })
                .await
            {
                tracing::error!(%error, "the projections stopped");
            }
        });

        let (stop_spend, spend_stopped) = oneshot::channel::<()>();
        let following = spend.clone();
        let spend_log = log.clone();
        let spend_task = tokio::spawn(async move {
            let stopped = async {
                let _ = spend_stopped.await;
            };
            if let Err(error) = following.follow(&spend_log, stopped).await {
                tracing::error!(%error, "the spend index stopped; budgets see no new spend");
            }
        });
        let budgets = Budgets::new(log.clone(), spend, budget_config);
        let now = chrono::Utc::now();
        let active_keys: Vec<_> = projections
            .keys()
            .list()?
            .into_iter()
            .filter(|record| record.is_active(now))
            .collect();
        budgets.review_all(active_keys.iter().map(|record| {
            (
                record.key_id.as_str(),
                record.owner.as_deref(),
                record.budget.as_ref(),
            )
        }));

        let (alerts, alert_stream) = mpsc::unbounded_channel();
        let alerts_task = tokio::spawn(publish_agent_alerts(
            bus.clone(),
            config.prefix.clone(),
            alert_stream,
        ));
        let mut agent_refs = HashMap::new();
        for (spec, provider) in config.agents.iter().zip(providers) {
            let agent = Agent::new(spec.config.clone(), provider).with_alerts(alerts.clone());
            let (actor, _) = Actor::spawn(None, AgentActor, Arc::new(agent))
                .await
                .map_err(|e| ServerError::Actor(format!("agent {}: {e}", spec.config.name)))?;
            agent_refs.insert(spec.config.name.clone(), actor);
        }
        let registry = ConversationRegistry::new(log.clone(), config.conversations);
        let agents: Vec<_> = agent_refs.values().cloned().collect();
        let coordinator = TurnCoordinator::new(registry.clone(), router, agent_refs, log.clone())
            .map_err(|e| ServerError::Config(e.to_string()))?;
        coordinator.charge_to(budgets.clone());
        let context = config
            .agents
            .iter()
            .map(|spec| spec.config.context_messages);
        coordinator.keep_context(context.max().unwrap_or(0));

        // An HTTP front beside a gateway on NATS sends its requests over an
        // in-process bus the gateway serves too, and its streams follow the
        // conversations' events there: the feed publishes the stored events
        // and the replies' deltas on it (NATS or not).
        let front = match (&config.http, &bus) {
            (Some(_), Bus::Nats(_)) => Some(FrontBus {
                bus: Bus::from(LocalBus::with_config(LocalBusConfig {
                    max_payload: FRONT_MAX_PAYLOAD,
                    ..LocalBusConfig::default()
                })),
                deltas: DeltaQueue::new(),
            }),
            _ => None,
        };
        let front_feed = front.clone().map(|front| {
            crate::outbox::spawn_front_feed(&log, front.bus, &config.prefix, front.deltas)
        });
        // Published by the outbox, each after its message.
        let deltas = DeltaQueue::new();
        let gateway = NatsGateway::start_with_front(
            bus.clone(),
            front.clone(),
            Some(deltas.clone()),
            &config.prefix,
            coordinator.clone(),
            projections.clone(),
            log.clone(),
        )
        .await?;

        let mut info = ServiceInfo::new("switchboard", env!("CARGO_PKG_VERSION"));
        info.description = "conversations, keys and agents over NATS (DESIGN §6)".to_owned();
        info.metadata
            .insert("prefix".to_owned(), config.prefix.clone());
        let service = service::register(bus.clone(), info, gateway.endpoints())
            .await
            .map_err(|e| ServerError::Actor(format!("the service API registration: {e}")))?;

        let http = match &config.http {
            Some(http) => {
                let mut http = http.clone();
                http.prefix = config.prefix.clone();
                Some(
                    crate::http::serve(
                        http.clone(),
                        front.map_or_else(|| bus.clone(), |front| front.bus),
                    )
                    .await
                    .map_err(|source| ServerError::Http {
                        addr: http.addr,
                        source,
                    })?,
                )
            }
            None => None,
        };

        let mut outbox = Outbox::new(log.clone(), bus.clone(), &config.prefix).with_deltas(deltas);
        if let Some(pattern) = &config.outbox_jetstream {
            outbox = outbox
                .confirm_with_jetstream(pattern)
                .map_err(outbox_error)?;
        }
        let outbox = outbox.spawn().map_err(outbox_error)?;
        let webhooks = WebhookSink::spawn(log.clone(), config.webhooks.clone())
            .map_err(|e| ServerError::Config(format!("the alert webhooks: {e}")))?;
        let (stop_sampler, sampler_stopped) = oneshot::channel::<()>();
        let shown_budgets = crate::metrics::show_budgets(budgets.clone(), projections.clone());
        let sampler_task = tokio::spawn(crate::metrics::sample(
            crate::metrics::Sources {
                log: log.clone(),
                projections: projections.clone(),
                outbox: outbox.progress(),
                registry: registry.clone(),
                limiters: gateway.limiters().clone(),
                coordinator: coordinator.clone(),
                agents: agents.len(),
                bus: bus.clone(),
                webhooks: webhooks.progress(),
            },
            async {
                let _ = sampler_stopped.await;
            },
        ));

        let recovery_task = tokio::spawn(finish_lost_turns(
            coordinator.clone(),
            projections.clone(),
            log.clone(),
            clean_stop,
        ));

        Ok(Server {
            log,
            projections,
            bus,
            registry,
            coordinator,
            agents,
            gateway,
            http,
            service,
            outbox,
            front_feed,
            webhooks,
            stop_sampler,
            sampler_task,
            shown_budgets,
            admin,
            stop_projections,
            projections_task,
            budgets,
            stop_spend,
            spend_task,
            alerts_task,
            recovery_task,
            drain_timeout: config.drain_timeout,
        })
    }

    /// Where the HTTP front listens, if it runs.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http.as_ref().map(HttpHandle::local_addr)
    }

    /// What start-up did about the admin key.
    pub fn admin_bootstrap(&self) -> &AdminBootstrap {
        &self.admin
    }

    /// The bus the server serves on (a client of the embedded bus uses it).
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    pub fn log(&self) -> &EventLog {
        &self.log
    }

    pub fn projections(&self) -> &Projections {
        &self.projections
    }

    /// Conversation actors alive now.
    pub fn live_conversations(&self) -> usize {
        self.registry.live_count()
    }

    /// Stops in the order of the module doc; returns once the log is flushed.
    pub async fn shutdown(self) {
        if let Some(http) = self.http {
            http.shutdown().await;
        }
        let _ = self.stop_sampler.send(());
        let _ = self.sampler_task.await;
        drop(self.shown_budgets);
        if let Err(error) = self.service.stop().await {
            tracing::warn!(%error, "leaving the service API failed");
        }
        self.gateway.stop().await;
        let drain = async {
            let recovered = self.recovery_task.await.unwrap_or_else(|error| {
                tracing::error!(%error, "ending lost turns failed");
                false
            });
            self.coordinator.drain().await;
            recovered
        };
        // Clean: no turn of this or an earlier process is left open.
        let clean = match tokio::time::timeout(self.drain_timeout, drain).await {
            Ok(recovered) => recovered && self.coordinator.all_turns_ended(),
            Err(_) => {
                tracing::warn!(
                    turns = self.coordinator.turns_in_flight(),
                    "turns still running at shutdown; the next start ends them reply_failed"
                );
                self.coordinator.abort_all();
                self.coordinator.wait_idle().await;
                false
            }
        };
        self.registry.shutdown().await;
        for agent in &self.agents {
            agent.stop(None);
        }
        self.alerts_task.abort();
        self.budgets.shutdown().await;
        let _ = self.stop_spend.send(());
        if let Err(error) = self.spend_task.await {
            tracing::error!(%error, "the spend index task failed");
        }
        self.outbox.stop().await;
        if let Some(feed) = self.front_feed {
            // Its subscription to the log goes with it, before the log closes.
            feed.abort();
            let _ = feed.await;
        }
        self.webhooks.stop().await;
        let _ = self.stop_projections.send(());
        if let Err(error) = self.projections_task.await {
            tracing::error!(%error, "the projections task failed");
        }
        if let Err(error) = self.bus.flush().await {
            tracing::warn!(%error, "the bus did not flush at shutdown");
        }
        let log = self.log;
        if clean {
            if let Err(error) = note_clean_stop(&log) {
                tracing::warn!(%error, "the clean stop was not noted; the next start checks every conversation");
            }
        }
        let flushed = tokio::task::spawn_blocking(move || log.db().flush()).await;
        if !matches!(flushed, Ok(Ok(_))) {
            tracing::error!("the data dir did not flush at shutdown");
        }
    }
}

/// Connects to NATS, waiting up to [`NATS_CONNECT_TIMEOUT`] for the first
/// connection: a server that cannot be reached at start is a clear error, not
/// a service that silently answers nobody. (Later disconnects are waited out.)
async fn connect_nats(url: &str) -> Result<NatsBus, ServerError> {
    let bus = NatsBus::connect(url).await?;
    let connected = async {
        while !bus.is_connected() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(NATS_CONNECT_TIMEOUT, connected)
        .await
        .map_err(|_| ServerError::NatsUnreachable {
            url: crate::bus::redact_url(url),
            waited: NATS_CONNECT_TIMEOUT,
        })?;
    Ok(bus)
}

fn provider(spec: &ProviderSpec) -> Result<Arc<dyn Provider>, ServerError> {
    Ok(match spec {
        ProviderSpec::Echo { word_delay } => Arc::new(EchoProvider::with_word_delay(*word_delay)),
        ProviderSpec::OpenAi {
            base_url,
            model,
            api_key,
        } => Arc::new(
            OpenAiProvider::new(base_url, model.clone(), api_key.clone())
                .map_err(|e| ServerError::Config(e.to_string()))?,
        ),
    })
}

/// Publishes each circuit change on `<prefix>.alert.agent.<name>`. Alerts are
/// not events (the circuit is process state, rebuilt on restart), so they
/// are published directly; one lost while NATS is away is not retried.
async fn publish_agent_alerts(
    bus: Bus,
    prefix: String,
    mut alerts: mpsc::UnboundedReceiver<CircuitAlert>,
) {
    while let Some(alert) = alerts.recv().await {
        let (transition, state, failures) = match alert.transition {
            CircuitTransition::Opened {
                consecutive_failures,
            } => ("opened", "open", Some(consecutive_failures)),
            CircuitTransition::HalfOpened => ("half_opened", "half_open", None),
            CircuitTransition::Reopened => ("reopened", "open", None),
            CircuitTransition::Closed => ("closed", "closed", None),
        };
        let body = json!({
            "agent": alert.agent,
            "transition": transition,
            "state": state,
            "consecutive_failures": failures,
            "cause": alert.cause,
            "at": switchboard_events::time::to_rfc3339(&switchboard_events::time::now()),
        });
        let subject = format!("{prefix}.alert.agent.{}", alert.agent);
        let headers = Headers::new().with("Content-Type", "application/json");
        let payload = serde_json::to_vec(&body).expect("a JSON value always serializes");
        if let Err(error) = bus.publish(&subject, headers, payload).await {
            tracing::warn!(%subject, %error, "an agent alert was not published");
        }
    }
}

/// The sled tree (beside the log) where a clean stop is noted.
const STOPS_TREE: &str = "serve";
/// Its key: the log's head at a stop that left no turn open (u64 big-endian).
const CLEAN_STOP_KEY: &[u8] = b"clean_stop";

/// The head noted by the last stop if it was clean, removed so that a crash
/// of this run is never taken for a clean stop. (The removal is durable by
/// the first append of this run, which flushes the whole database; before
/// that the head has not moved, so the note is still true.)
fn take_clean_stop(log: &EventLog) -> Result<Option<u64>, ServerError> {
    let stops = |e: sled::Error| ServerError::Actor(format!("reading the stop note: {e}"));
    let tree = log.db().open_tree(STOPS_TREE).map_err(stops)?;
    Ok(tree
        .remove(CLEAN_STOP_KEY)
        .map_err(stops)?
        .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_ref()).ok())
        .map(u64::from_be_bytes))
}

/// How often a start's catch-up of the projections says how far it is.
const CATCH_UP_REPORT_EVERY: Duration = Duration::from_secs(2);

/// The progress of a start's catch-up of the projections up to `head`: a
/// line when it starts folding and then every [`CATCH_UP_REPORT_EVERY`], so
/// an operator watching a slow start knows what it is doing.
fn catch_up_progress(head: u64) -> impl FnMut(u64) {
    let mut next_report = None;
    move |seq| {
        // The clock is read every 1,024 events, not every event.
        if next_report.is_some() && seq % 1024 != 0 {
            return;
        }
        let now = Instant::now();
        match next_report {
            Some(at) if now < at => return,
            None => tracing::info!(head, from = seq, "catching up the projections"),
            Some(_) => tracing::info!(head, folded = seq, "catching up the projections"),
        }
        next_report = Some(now + CATCH_UP_REPORT_EVERY);
    }
}

/// Notes that this process stops with no turn open, at the log's head.
fn note_clean_stop(log: &EventLog) -> Result<(), sled::Error> {
    note_clean_stop_at(log, log.head())
}

/// Notes that a process stopped with no turn open when the log's head was `head`.
fn note_clean_stop_at(log: &EventLog, head: u64) -> Result<(), sled::Error> {
    let tree = log.db().open_tree(STOPS_TREE)?;
    tree.insert(CLEAN_STOP_KEY, &head.to_be_bytes())?;
    Ok(())
}

/// Ends turns an earlier process left without a reply, in the background (a
/// send reaching a conversation first does the same for it before its turn
/// starts); returns whether all are ended. After a clean stop only the
/// conversations written since (by offline commands) can hold one; after a
/// crash, or with no note, every conversation the history knows is checked.
async fn finish_lost_turns(
    coordinator: TurnCoordinator,
    projections: Projections,
    log: EventLog,
    clean_stop: Option<u64>,
) -> bool {
    let conversations = tokio::task::spawn_blocking(move || match clean_stop {
        Some(head) => {
            let mut ids = std::collections::BTreeSet::new();
            for envelope in log.read_from(head + 1) {
                let envelope = envelope.map_err(|e| e.to_string())?;
                if let Some(id) = envelope.stream.as_str().strip_prefix("conv/") {
                    ids.insert(id.to_owned());
                }
            }
            Ok(ids.into_iter().collect())
        }
        None => all_conversations(&projections).map_err(|e| e.to_string()),
    })
    .await;
    let ids: Vec<String> = match conversations {
        Ok(Ok(ids)) => ids,
        Ok(Err(error)) => {
            tracing::error!(%error, "cannot list conversations to end lost turns");
            return false;
        }
        Err(error) => {
            tracing::error!(%error, "listing conversations panicked");
            return false;
        }
    };
    match coordinator.finish_all_pending(ids).await {
        Ok(0) => true,
        Ok(ended) => {
            tracing::info!(ended, "ended turns lost in the last shutdown");
            true
        }
        Err(error) => {
            tracing::warn!(%error, "could not end every lost turn");
            false
        }
    }
}

/// Every conversation the history knows, key by key.
fn all_conversations(
    projections: &Projections,
) -> Result<Vec<String>, switchboard_projections::ProjectionError> {
    let history = projections.history();
    let mut ids = Vec::new();
    for key in projections.keys().list()? {
        let mut after: Option<String> = None;
        loop {
            let page = history.conversations_of_key(&key.key_id, after.as_deref(), 1000)?;
            let Some(last) = page.last() else { break };
            after = Some(last.conversation_id.clone());
            ids.extend(page.into_iter().map(|c| c.conversation_id));
        }
    }
    Ok(ids)
}
