//! The NATS gateway (DESIGN §6): answers `<prefix>.conv.<id>.send` and
//! `<prefix>.conv.<id>.history` requests on the [`Bus`], handing sends to the
//! [`TurnCoordinator`] and reading history from the [`Projections`].
//!
//! Every request is answered with JSON: an ack, a history, or
//! `{"ok":false,"error":{"code","message"}}` ([`wire`]). In order, a request
//! is
//! 1. authenticated ([`auth`]): `Authorization: Bearer <key>`; a missing,
//!    malformed, unknown, revoked or expired key is `unauthorized`, a key
//!    without the right scope (`chat` to send; `chat` or `admin` to read) is
//!    `forbidden`, and each refusal appends one `auth_failed` to `system`;
//! 2. checked: the conversation id (the subject's token) and the body (size,
//!    encoding, fields) — a bad one is `invalid_request` and appends nothing;
//! 3. served: a send is acknowledged once durable (`"duplicate":true` on a
//!    resend of a stored `message_id`); a history is read after the
//!    projections have folded the log's head, so a caller sees its own acked
//!    sends. Reading another key's conversation is `forbidden` (and audited)
//!    unless the key has the `admin` scope. A conversation nobody started
//!    reads as empty (`"messages":[]`), not as an error: a client can poll a
//!    conversation it is about to start without special-casing it.
//!
//! The gateway subscribes in the queue group `switchboard`, so each request
//! is served once even while a replacement process starts beside a stopping
//! one. Each process has its own log, though: run one `serve` per NATS
//! account and prefix, or conversations split across logs. Each request runs
//! in its own task, so a slow send never holds up the others.
//!
//! An HTTP front in the gateway's own process need not take the trip
//! through NATS: [`NatsGateway::start_with_front`] also serves the same
//! subjects on the front's in-process bus, and answers each request on the
//! bus it came from. Replies' deltas go out on both buses; the outbox
//! publishes the stored events on the main bus, and the front's feed the
//! conversations' events on the front's ([`crate::outbox::spawn_front_feed`]).
//!
//! ```no_run
//! # use switchboard::bus::{Bus, LocalBus};
//! # use switchboard::gateway::{NatsGateway, DEFAULT_PREFIX};
//! # async fn example(
//! #     coordinator: switchboard_actors::turns::TurnCoordinator,
//! #     projections: switchboard_projections::Projections,
//! #     log: switchboard_events::EventLog,
//! # ) -> Result<(), switchboard::bus::BusError> {
//! let bus = Bus::from(LocalBus::new());
//! let gateway = NatsGateway::start(bus, DEFAULT_PREFIX, coordinator, projections, log).await?;
//! // ... serve until shutdown ...
//! gateway.stop().await;
//! # Ok(()) }
//! ```

mod admin;
pub mod auth;
mod query;
pub mod ratelimit;
pub mod wire;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use serde_json::Value;
use switchboard_actors::conversation_actor::{validate_conversation_id, ConversationError};
use switchboard_actors::rate_limiter::{AdmitError, RateLimiterConfig, RateLimiters};
use switchboard_actors::turns::{NextTurn, ReplyDelta, SendInput, TurnCoordinator, TurnEnd};
use switchboard_events::catalog::{AuthChannel, Scope};
use switchboard_events::{Envelope, EventLog, ReadError};
use switchboard_projections::{HistoryMessage, HistoryPage, PageFrom, Projections};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;
use uuid::Uuid;

use crate::bus::{Bus, BusError, Headers, Message, Subscription};
use crate::outbox::{Delta, DeltaQueue};
use crate::service::{Endpoint, EndpointStats};
use auth::{AuthFailure, Authenticator, Caller};
use wire::{ack_json, BodyFormat, GatewayError, SendRequest};

/// The subject prefix of DESIGN §6 when none is configured.
pub const DEFAULT_PREFIX: &str = "sb";
/// The queue group every gateway joins, so each request is served once.
pub const QUEUE_GROUP: &str = "switchboard";
/// Reply deltas buffered on their way to the bus.
const DELTA_BUFFER: usize = 64;
/// How long a read waits for the projections to fold the log's head before
/// answering `unavailable`.
const FRESHNESS_WAIT: Duration = Duration::from_secs(5);
/// The longest a reply delta's publish may wait (NATS away, its queue full)
/// before the turn's later deltas are dropped instead.
const DELTA_PUBLISH_WAIT: Duration = Duration::from_secs(1);
/// How long a stopping gateway reads the requests delivered before its
/// unsubscribe took effect.
const DRAIN_WAIT: Duration = Duration::from_secs(2);
/// History pages of at most this many messages are read on the request's
/// own task; larger ones on a blocking thread ([`Gateway::read_history`]).
const INLINE_PAGE_LIMIT: usize = 100;

/// The request kinds, each one endpoint of the service API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Send,
    History,
    Events,
    ConvList,
    Usage,
    Agents,
    Health,
    AdminKeys,
    AdminCosts,
    AdminAudit,
    AdminErase,
}

impl Operation {
    const ALL: [Operation; 11] = [
        Operation::Send,
        Operation::History,
        Operation::Events,
        Operation::ConvList,
        Operation::Usage,
        Operation::Agents,
        Operation::Health,
        Operation::AdminKeys,
        Operation::AdminCosts,
        Operation::AdminAudit,
        Operation::AdminErase,
    ];

    /// The endpoint's name in the service API.
    fn name(self) -> &'static str {
        match self {
            Operation::Send => "send",
            Operation::History => "history",
            Operation::Events => "events",
            Operation::ConvList => "conversations",
            Operation::Usage => "usage",
            Operation::Agents => "agents",
            Operation::Health => "health",
            Operation::AdminKeys => "admin_keys",
            Operation::AdminCosts => "admin_costs",
            Operation::AdminAudit => "admin_audit",
            Operation::AdminErase => "admin_erase",
        }
    }

    /// The subject pattern, after `{prefix}.`.
    fn pattern(self) -> &'static str {
        match self {
            Operation::Send => "conv.*.send",
            Operation::History => "conv.*.history",
            Operation::Events => "conv.*.events",
            Operation::ConvList => "conv.list",
            Operation::Usage => "usage",
            Operation::Agents => "agents",
            Operation::Health => "health",
            Operation::AdminKeys => "admin.keys.*",
            Operation::AdminCosts => "admin.costs",
            Operation::AdminAudit => "admin.audit",
            Operation::AdminErase => "admin.conv.*.erase",
        }
    }

    fn index(self) -> usize {
        Operation::ALL
            .iter()
            .position(|op| *op == self)
            .expect("every operation is in ALL")
    }
}

/// What is known about a request before it is served: the correlation id its
/// events carry, and its `traceparent` when it sent a valid one; and, once
/// the caller is known, the rate-limit headers of its reply.
#[derive(Debug)]
pub struct RequestMeta {
    pub correlation_id: Uuid,
    pub traceparent: Option<String>,
    /// How the request reached the service, and from where (HTTP only), as
    /// `auth_failed` records them.
    pub channel: AuthChannel,
    pub remote: Option<String>,
    reply_headers: std::sync::Mutex<Headers>,
    /// The turn of a send answered with its ack alone: it starts when this
    /// is dropped, after the answer is on its way.
    turn: std::sync::Mutex<Option<NextTurn>>,
}

/// Bus headers by which the HTTP front says a request came over HTTP, and
/// from which address. They are believed only from the service's own
/// requests (see [`RequestMeta`]).
pub const CHANNEL_HEADER: &str = "Switchboard-Channel";
pub const REMOTE_BUS_HEADER: &str = "Switchboard-Remote";

impl RequestMeta {
    /// `from_front`: the request came from this service's own connection
    /// (the embedded bus, or a reply subject in the service's private inbox,
    /// which applications cannot read), so its front's headers are believed.
    fn new(headers: &Headers, from_front: bool) -> Self {
        let channel = match header(headers, CHANNEL_HEADER) {
            Some("http") if from_front => AuthChannel::Http,
            _ => AuthChannel::Nats,
        };
        let remote = header(headers, REMOTE_BUS_HEADER)
            .filter(|remote| channel == AuthChannel::Http && remote.len() <= 64)
            .map(str::to_owned);
        RequestMeta {
            correlation_id: Uuid::now_v7(),
            traceparent: header(headers, "traceparent")
                .filter(|value| valid_traceparent(value))
                .map(str::to_owned),
            channel,
            remote,
            reply_headers: std::sync::Mutex::new(Headers::new()),
            turn: std::sync::Mutex::new(None),
        }
    }

    /// Sets headers of the reply (the rate-limit ones), replacing earlier
    /// values of the same names.
    fn set_reply_headers(&self, headers: Headers) {
        let mut reply = self.reply_headers.lock().expect("reply headers lock");
        for (name, value) in headers.iter() {
            reply.insert(name.to_owned(), value.to_owned());
        }
    }
}

/// Starts gateways; see the module doc.
pub struct NatsGateway;

/// The in-process bus of an HTTP front beside the gateway
/// ([`NatsGateway::start_with_front`]).
#[derive(Clone)]
pub struct FrontBus {
    pub bus: Bus,
    /// Where reply deltas for the front wait for the front's feed
    /// ([`crate::outbox::spawn_front_feed`]) to publish them there.
    pub deltas: DeltaQueue,
}

impl NatsGateway {
    /// Subscribes (queue group [`QUEUE_GROUP`]) to `{prefix}.conv.*.send` and
    /// `{prefix}.conv.*.history` and serves them until
    /// [`GatewayHandle::stop`]. The subscriptions are in place, also for other
    /// NATS connections, when this returns.
    pub async fn start(
        bus: Bus,
        prefix: &str,
        coordinator: TurnCoordinator,
        projections: Projections,
        log: EventLog,
    ) -> Result<GatewayHandle, BusError> {
        Self::start_with_front(bus, None, None, prefix, coordinator, projections, log).await
    }

    /// [`NatsGateway::start`], also serving the same subjects on `front`:
    /// the in-process bus of an HTTP front running beside the gateway, whose
    /// requests then skip NATS (two hops and two encodings each way). Only
    /// this process reaches `front`, so its requests' front headers are
    /// believed. Its requests count in the same endpoint statistics.
    ///
    /// With `deltas`, the queue of the outbox on `bus`
    /// ([`crate::outbox::Outbox::with_deltas`]), reply deltas are published
    /// on `bus` by the outbox, each after its turn's `message_received` (so
    /// no subscriber hears of a reply before its message, nor of a message
    /// that is not durable yet); without it, at once by the gateway. On
    /// `front` they go through the front's feed the same way.
    pub async fn start_with_front(
        bus: Bus,
        front: Option<FrontBus>,
        deltas: Option<DeltaQueue>,
        prefix: &str,
        coordinator: TurnCoordinator,
        projections: Projections,
        log: EventLog,
    ) -> Result<GatewayHandle, BusError> {
        let mut subscriptions = Vec::new();
        let mut endpoints = Vec::new();
        for operation in Operation::ALL {
            let subject = format!("{prefix}.{}", operation.pattern());
            let subscription = bus.queue_subscribe(&subject, QUEUE_GROUP).await?;
            subscriptions.push((operation, Via::Bus, subscription));
            if let Some(front) = &front {
                let subscription = front.bus.queue_subscribe(&subject, QUEUE_GROUP).await?;
                subscriptions.push((operation, Via::Front, subscription));
            }
            endpoints.push(Endpoint::new(operation.name(), subject, QUEUE_GROUP));
        }
        bus.flush().await?;
        let limiters = RateLimiters::new(log.clone(), RateLimiterConfig::default());
        let gateway = Arc::new(Gateway {
            stats: endpoints
                .iter()
                .map(|endpoint| endpoint.stats.clone())
                .collect(),
            bus,
            front,
            deltas,
            subject_start: format!("{prefix}.conv."),
            admin_keys_start: format!("{prefix}.admin.keys."),
            prefix: prefix.to_owned(),
            auth: Authenticator::new(projections.clone(), log.clone()),
            limiters: limiters.clone(),
            coordinator,
            projections,
            log,
            stopping: watch::Sender::new(false),
        });
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(gateway, subscriptions, stopped));
        Ok(GatewayHandle {
            stop: Some(stop),
            task,
            endpoints,
            limiters,
        })
    }
}

/// A running gateway. Dropping it stops the gateway too, without waiting.
pub struct GatewayHandle {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    endpoints: Vec<Endpoint>,
    limiters: RateLimiters,
}

impl GatewayHandle {
    /// The per-key rate limiters (for their live count).
    pub fn limiters(&self) -> &RateLimiters {
        &self.limiters
    }

    /// The gateway's endpoints, whose statistics it keeps, for registering
    /// with the NATS service API ([`crate::service::register`]).
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.endpoints.clone()
    }

    /// Stops taking requests (drains its subscriptions, also as other NATS
    /// connections see it), answers those already taken or delivered, and
    /// returns once they are answered.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Err(error) = (&mut self.task).await {
            tracing::error!(%error, "the gateway task failed");
        }
    }
}

/// Receives requests and runs each in its own task; on stop, unsubscribes
/// and waits for the running ones.
async fn serve(
    gateway: Arc<Gateway>,
    subscriptions: Vec<(Operation, Via, Subscription)>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut incoming = futures::stream::select_all(subscriptions.into_iter().map(
        |(operation, via, subscription)| subscription.map(move |message| (operation, via, message)),
    ));
    let mut in_flight = JoinSet::new();
    loop {
        let (operation, via, message) = tokio::select! {
            _ = &mut stop => break,
            Some(request) = incoming.next() => request,
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                if let Err(error) = done {
                    tracing::error!(%error, "a gateway request task failed");
                }
                continue;
            }
            else => break,
        };
        let gateway = gateway.clone();
        in_flight.spawn(async move { gateway.answer(operation, via, message).await });
    }
    gateway.stopping.send_replace(true);
    for subscription in incoming.iter_mut() {
        // Bounded: with NATS away and the client's queue full, the command
        // would wait for the server.
        match tokio::time::timeout(DRAIN_WAIT, subscription.get_mut().drain()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "unsubscribing the gateway failed"),
            Err(_) => tracing::warn!("unsubscribing the gateway timed out"),
        }
    }
    // So that, once `stop` returns, no other connection's request reaches us.
    if let Err(error) = gateway.bus.flush().await {
        tracing::warn!(%error, "flushing the gateway's unsubscribe failed");
    }
    // (The front's bus is in-process: its unsubscribe took effect at once.)
    // Requests delivered before the unsubscribe took effect are answered,
    // not dropped: nobody else will (core NATS does not redeliver). On NATS
    // the drained subscription ends once the server has answered a PING sent
    // after its UNSUB, so every request routed here before the UNSUB comes
    // out of it first (vendored async-nats; upstream ends it a round trip
    // early and loses those requests: vendor/README.md).
    loop {
        match tokio::time::timeout(DRAIN_WAIT, incoming.next()).await {
            Ok(Some((operation, via, message))) => {
                let gateway = gateway.clone();
                in_flight.spawn(async move { gateway.answer(operation, via, message).await });
            }
            Ok(None) => break,
            Err(_) => {
                tracing::warn!("the gateway's subscriptions did not end after their drain");
                break;
            }
        }
    }
    while let Some(done) = in_flight.join_next().await {
        if let Err(error) = done {
            tracing::error!(%error, "a gateway request task failed");
        }
    }
    // The last answers may still be queued in the client: once `stop`
    // returns, the connection may be closed, and they would be lost with it.
    if let Err(error) = gateway.bus.flush().await {
        tracing::warn!(%error, "flushing the gateway's last answers failed");
    }
    // Stores the refusals not yet reported.
    gateway.limiters.shutdown().await;
}

/// Which bus a request came in on, and so is answered on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// The main bus: NATS, or the embedded bus of a process without NATS.
    Bus,
    /// The in-process bus of the HTTP front beside the gateway.
    Front,
}

struct Gateway {
    /// Where requests come from anywhere, and where deltas are published.
    bus: Bus,
    /// The HTTP front's in-process bus, when the front runs beside a
    /// gateway on NATS ([`NatsGateway::start_with_front`]).
    front: Option<FrontBus>,
    /// Where reply deltas wait for the outbox to publish them on `bus`, each
    /// after its message ([`NatsGateway::start_with_front`]).
    deltas: Option<DeltaQueue>,
    /// Request statistics per [`Operation`], in the order of `Operation::ALL`.
    stats: Vec<Arc<EndpointStats>>,
    /// `{prefix}.conv.`: what precedes the conversation id in a subject.
    subject_start: String,
    /// `{prefix}.admin.keys.`: what precedes a key operation.
    admin_keys_start: String,
    prefix: String,
    auth: Authenticator,
    /// Per-key admission of sends (rpm, tpm, concurrent turns).
    limiters: RateLimiters,
    coordinator: TurnCoordinator,
    projections: Projections,
    log: EventLog,
    /// Turns true when the gateway stops: sends still waiting for their
    /// reply answer with the ack alone, so stopping waits for no turn.
    stopping: watch::Sender<bool>,
}

impl Gateway {
    /// Serves one request and publishes the answer (when it has a reply
    /// subject). A panic while serving is answered `internal`, never silence.
    async fn answer(&self, operation: Operation, via: Via, message: Message) {
        let started = Instant::now();
        let bus = match (via, &self.front) {
            (Via::Front, Some(front)) => &front.bus,
            _ => &self.bus,
        };
        let from_front = match bus {
            Bus::Local(_) => true,
            Bus::Nats(_) => message.reply.as_deref().is_some_and(|reply| {
                reply
                    .strip_prefix(crate::bus::SERVICE_INBOX_PREFIX)
                    .is_some_and(|rest| rest.starts_with('.'))
            }),
        };
        let mut meta = RequestMeta::new(&message.headers, from_front);
        let span = tracing::debug_span!(
            "gateway",
            otel.name = %format_args!("{} process", operation.name()),
            otel.kind = "server",
            messaging.system = "nats",
            messaging.destination.name = %message.subject,
            operation = operation.name(),
            correlation_id = %meta.correlation_id,
            outcome = tracing::field::Empty,
        );
        switchboard_actors::trace::continue_trace(&span, meta.traceparent.as_deref());
        // What this request stores and answers carries its span's context.
        if let Some(traceparent) = switchboard_actors::trace::traceparent_of(&span) {
            meta.traceparent = Some(traceparent);
        }
        let served = AssertUnwindSafe(self.serve(operation, &message, &meta))
            .catch_unwind()
            .instrument(span.clone())
            .await
            .unwrap_or_else(|_| {
                tracing::error!(subject = %message.subject, "a gateway request panicked");
                Err(GatewayError::Internal("the request failed".into()))
            });
        let stats = &self.stats[operation.index()];
        let outcome = match &served {
            Ok(_) => "ok",
            Err(error) => error.code(),
        };
        span.record("outcome", outcome);
        metrics::counter!(
            "switchboard_requests_total",
            "operation" => operation.name(),
            "outcome" => outcome,
        )
        .increment(1);
        if operation == Operation::Send && served.is_ok() {
            metrics::histogram!("switchboard_ack_latency_seconds")
                .record(started.elapsed().as_secs_f64());
        }
        let body = match served {
            Ok(body) => {
                stats.record(started.elapsed(), None);
                body
            }
            Err(error) => {
                // Refusals of bad input are the caller's errors, not ours:
                // the service API's error count is for failures.
                let failure = matches!(error.code(), "internal" | "unavailable");
                let described = format!("{}:{}", error.code(), error.message());
                stats.record(started.elapsed(), failure.then_some(described.as_str()));
                tracing::debug!(
                    subject = %message.subject,
                    code = error.code(),
                    correlation_id = %meta.correlation_id,
                    "request refused: {}", error.message()
                );
                error.to_json()
            }
        };
        if message.reply.is_none() {
            return;
        }
        let mut headers =
            std::mem::take(&mut *meta.reply_headers.lock().expect("reply headers lock"));
        headers.insert("Content-Type", "application/json");
        if let Some(traceparent) = &meta.traceparent {
            headers.insert("traceparent", traceparent.clone());
        }
        let body = serde_json::to_vec(&body).expect("a JSON value always serializes");
        let error = match bus.respond(&message, headers.clone(), body).await {
            Ok(()) => return,
            Err(BusError::PayloadTooLarge { size, max }) => {
                // Say so, rather than leave the caller to its timeout.
                let error = GatewayError::Internal(format!(
                    "the reply of {size} bytes is over the bus's maximum payload of {max} bytes"
                ));
                let body = serde_json::to_vec(&error.to_json()).expect("JSON serializes");
                match bus.respond(&message, headers, body).await {
                    Ok(()) => BusError::PayloadTooLarge { size, max },
                    Err(error) => error,
                }
            }
            Err(error) => error,
        };
        tracing::warn!(subject = %message.subject, %error, "the reply was not sent");
    }

    async fn serve(
        &self,
        operation: Operation,
        message: &Message,
        meta: &RequestMeta,
    ) -> Result<Value, GatewayError> {
        match operation {
            Operation::Send => self.send(message, meta).await,
            Operation::History => self.history(message, meta).await,
            Operation::Events => {
                let id = self.conversation_id(&message.subject, "events")?;
                self.conversation_events(message, meta, id).await
            }
            Operation::ConvList => self.list_conversations(message, meta).await,
            Operation::Usage => self.usage(message, meta).await,
            Operation::Agents => self.agents(message, meta).await,
            Operation::Health => self.health().await,
            Operation::AdminKeys => self.admin_keys(message, meta).await,
            Operation::AdminCosts => self.costs(message, meta).await,
            Operation::AdminAudit => self.audit(message, meta).await,
            Operation::AdminErase => {
                let id = self.erased_conversation_id(&message.subject)?;
                self.erase(message, meta, id).await
            }
        }
    }

    async fn send(&self, message: &Message, meta: &RequestMeta) -> Result<Value, GatewayError> {
        let caller = self
            .auth
            .authenticate(&message.headers, &[Scope::Chat], meta)
            .await?;
        let conversation_id = self.conversation_id(&message.subject, "send")?;
        let format = BodyFormat::from_content_type(header(&message.headers, "Content-Type"))?;
        let body = SendRequest::decode(&message.payload, format)?;
        let wait = waits_for_reply(&message.headers)?;
        // A resend of a stored message is answered with its ack before the
        // budgets and rate limits, which it must neither use nor be refused
        // by. (A key that neither has nor falls under any of them cannot be
        // refused: the conversation's own dedup answers its resends, and its
        // sends skip this extra round trip.)
        self.coordinator.check_agent(body.agent.as_deref())?;
        let record = &caller.record;
        let limited = record.limits.rpm.is_some()
            || record.limits.tpm.is_some()
            || record.limits.max_parallel.is_some()
            || (self.coordinator.budgets().is_some()
                && (record.budget.is_some() || record.owner.is_some()));
        if let Some(message_id) = body.message_id.as_ref().filter(|_| limited) {
            let stored = self
                .coordinator
                .stored_ack(conversation_id, &caller.record.key_id, message_id)
                .await;
            match stored {
                Ok(Some(ack)) => {
                    self.note_rate(&caller, meta).await;
                    return Ok(ack_json(&ack));
                }
                Ok(None) => {}
                Err(ConversationError::Forbidden(reason)) => {
                    let failure = AuthFailure::forbidden("not_owner", &reason, &caller);
                    return Err(self.auth.refuse(failure, meta).await);
                }
                Err(error) => return Err(error.into()),
            }
        }
        let limits = &caller.record.limits;
        if let Some(budgets) = self.coordinator.budgets() {
            let record = &caller.record;
            // Before the rate limits, so a refused request uses none of them.
            if let Err(refused) = budgets.admit(
                &record.key_id,
                record.owner.as_deref(),
                record.budget.as_ref(),
            ) {
                let remaining = self
                    .limiters
                    .remaining(&record.key_id, limits.clone())
                    .await;
                meta.set_reply_headers(ratelimit::headers(limits, &remaining, refused.retry_after));
                return Err(refused.into());
            }
        }
        let permit = match self
            .limiters
            .admit(&caller.record.key_id, limits.clone())
            .await
        {
            Ok(permit) => {
                meta.set_reply_headers(ratelimit::headers(limits, &permit.remaining(), None));
                permit
            }
            Err(error) => {
                if let AdmitError::RateLimited(refused) = &error {
                    let wait = Duration::from_millis(refused.retry_after_ms);
                    meta.set_reply_headers(ratelimit::headers(
                        limits,
                        &refused.remaining,
                        Some(wait),
                    ));
                }
                return Err(error.into());
            }
        };
        let (ended, turn_end) = wait.then(oneshot::channel).unzip();
        let (message_seq, deltas, handed_on) = self.publish_deltas(conversation_id, meta);
        let input = SendInput {
            message_id: body.message_id,
            key_id: caller.record.key_id.clone(),
            user: body.user.or_else(|| caller.record.owner.clone()),
            content: body.content,
            agent: body.agent,
            correlation_id: Some(meta.correlation_id),
            traceparent: meta.traceparent.clone(),
            deltas: Some(deltas),
            deltas_handed_on: Some(handed_on),
            permit: Some(permit),
            ended,
        };
        // A send that waits for its reply tells nobody of its ack before its
        // turn's end is stored (or its message durable): its turn starts as
        // soon as the message is written, and overlaps the message's flush.
        let sent = match wait {
            true => {
                let sent = self.coordinator.send_early(conversation_id, input).await;
                sent.map(|(ack, turn, durable)| (ack, turn, Some(durable)))
            }
            false => {
                let sent = self
                    .coordinator
                    .send_unstarted(conversation_id, input)
                    .await;
                sent.map(|(ack, turn)| (ack, turn, None))
            }
        };
        match sent {
            Ok((ack, turn, durable)) => {
                // Before the turn starts, so before its first delta.
                message_seq.send_replace(Some(ack.seq));
                let mut reply = ack_json(&ack);
                let Some(turn_end) = turn_end else {
                    // Started once the ack is answered.
                    *meta.turn.lock().expect("turn lock") = Some(turn);
                    return Ok(reply);
                };
                turn.start();
                // No end comes for a duplicate, nor for a turn whose end was
                // not stored, nor once the gateway stops: then the answer is
                // the ack alone.
                if !ack.duplicate {
                    let mut stopping = self.stopping.subscribe();
                    let end = tokio::select! {
                        end = turn_end => end.ok(),
                        _ = stopping.wait_for(|stopping| *stopping) => None,
                    };
                    // The message is stored (see below): a failure to read
                    // the end back still answers the ack, never an error a
                    // client would resend on.
                    if let Some(end) = end {
                        match self.stored_events(end) {
                            Ok(turn) => reply["turn"] = turn,
                            Err(error) => tracing::warn!(%conversation_id,
                                "the turn's end could not be read back: {}", error.message()),
                        }
                    }
                }
                // No ack before its message is durable. A stored end was
                // appended after the message was, so this only waits when
                // there is no end.
                if let Some(durable) = durable {
                    durable.wait().await?;
                }
                Ok(reply)
            }
            Err(ConversationError::Forbidden(reason)) => {
                let failure = AuthFailure::forbidden("not_owner", &reason, &caller);
                Err(self.auth.refuse(failure, meta).await)
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn history(&self, message: &Message, meta: &RequestMeta) -> Result<Value, GatewayError> {
        let caller = self
            .keyed(message, &[Scope::Chat, Scope::Admin], meta)
            .await?;
        let conversation_id = self.conversation_id(&message.subject, "history")?;
        let request = query::HistoryRequest::decode(message)?;
        self.history_page(&caller, conversation_id, request, meta)
            .await
    }

    /// A page of a conversation from the history view (see
    /// [`switchboard_projections::HistoryView::page`]; `fits` is its budget),
    /// once the view has folded the log's head; `forbidden` (audited) when
    /// another key started it and the caller is no admin; `None` when nobody
    /// started it.
    async fn read_history(
        &self,
        caller: &Caller,
        conversation_id: &str,
        from: PageFrom,
        limit: usize,
        fits: impl FnMut(&HistoryMessage) -> bool + Send + 'static,
        meta: &RequestMeta,
    ) -> Result<Option<HistoryPage>, GatewayError> {
        self.caught_up().await?;
        let history = self.projections.history();
        let id = conversation_id.to_owned();
        // A small page (a chat view's) is a few reads of rows sled keeps in
        // memory: read here, as handing it to a blocking thread and back
        // cost more than the read (`bench http`, history reads of 20
        // messages: 15–25% more reads/s, about 35 µs less CPU each). A large
        // one may take a while, and goes to a blocking thread.
        let read = if limit <= INLINE_PAGE_LIMIT {
            history.page(&id, from, limit, fits)
        } else {
            tokio::task::spawn_blocking(move || history.page(&id, from, limit, fits))
                .await
                .map_err(|e| GatewayError::Internal(format!("history read failed: {e}")))?
        };
        let page = read.map_err(|error| {
            tracing::error!(%error, "cannot read the history projection");
            GatewayError::Unavailable("the history cannot be read".into())
        })?;
        if let Some(page) = &page {
            if page.summary.key_id != caller.record.key_id && !caller.has(Scope::Admin) {
                return Err(self.refuse_not_owner(caller, meta).await);
            }
        }
        Ok(page)
    }

    /// `forbidden`, audited: the conversation was started by another key.
    async fn refuse_not_owner(&self, caller: &Caller, meta: &RequestMeta) -> GatewayError {
        let failure = AuthFailure::forbidden(
            "not_owner",
            "the conversation was started by another key",
            caller,
        );
        self.auth.refuse(failure, meta).await
    }

    /// The caller's rate-limit figures, as reply headers.
    async fn note_rate(&self, caller: &Caller, meta: &RequestMeta) {
        let limits = &caller.record.limits;
        if limits.rpm.is_none() && limits.tpm.is_none() {
            return;
        }
        let remaining = self
            .limiters
            .remaining(&caller.record.key_id, limits.clone())
            .await;
        meta.set_reply_headers(ratelimit::headers(limits, &remaining, None));
    }

    /// A channel whose [`ReplyDelta`]s are published, in order, on
    /// `{prefix}.evt.conv.<id>.reply_delta` (live only: deltas are not
    /// stored, so one published while NATS is away is gone — the stored
    /// `reply_completed` holds the whole reply); and the signal that all of
    /// them are handed on once the channel closes, which the turn waits for
    /// before storing its end.
    ///
    /// Each delta is queued for the outbox ([`crate::outbox::DeltaQueue`])
    /// with the seq of its turn's message, which the caller sends on the
    /// first channel returned: the outbox publishes it after that message
    /// and before the turn's end, stored later. Beside an HTTP front, it is
    /// queued for the front's feed too, which publishes it on the front's
    /// in-process bus the same way, whatever NATS does. Without an outbox
    /// queue, it is published on the bus at once.
    fn publish_deltas(
        &self,
        conversation_id: &str,
        meta: &RequestMeta,
    ) -> (
        watch::Sender<Option<u64>>,
        mpsc::Sender<ReplyDelta>,
        oneshot::Receiver<()>,
    ) {
        let (message_seq, mut seq_known) = watch::channel(None);
        let (handed_on, handed_on_seen) = oneshot::channel();
        let (deltas, mut received) = mpsc::channel::<ReplyDelta>(DELTA_BUFFER);
        let (bus, front, queue) = (self.bus.clone(), self.front.clone(), self.deltas.clone());
        let subject = format!("{}.evt.conv.{conversation_id}.reply_delta", self.prefix);
        let mut headers = Headers::new().with("Content-Type", "application/json");
        if let Some(traceparent) = &meta.traceparent {
            headers.insert("traceparent", traceparent.clone());
        }
        tokio::spawn(async move {
            let mut giving_up = false;
            while let Some(delta) = received.recv().await {
                // Known before the turn starts; none when the send failed.
                let Ok(seq) = seq_known.wait_for(Option::is_some).await.map(|seq| *seq) else {
                    break;
                };
                let delta = Delta {
                    message_seq: seq.expect("waited for a seq"),
                    subject: subject.clone(),
                    headers: headers.clone(),
                    payload: Bytes::from(
                        serde_json::to_vec(&delta).expect("a delta always serializes"),
                    ),
                };
                if let Some(front) = front.as_ref().filter(|f| f.bus.has_subscriber(&subject)) {
                    front.deltas.push(delta.clone());
                }
                match &queue {
                    Some(queue) => {
                        queue.push(delta);
                    }
                    None if giving_up => {}
                    None => giving_up = !publish_now(&bus, delta).await,
                }
            }
            // Every delta is queued (or published): the turn's end may be
            // stored, and so published after them.
            let _ = handed_on.send(());
        });
        (message_seq, deltas, handed_on_seen)
    }

    /// The stored events of a turn's end, as the outbox publishes them. Read
    /// in place: two or three records just written, so in sled's cache.
    fn stored_events(&self, end: TurnEnd) -> Result<Value, GatewayError> {
        stored_end(&self.log, end)
            .map(|envelopes| {
                let values = envelopes.iter().map(serde_json::to_value);
                Value::Array(values.map(|v| v.expect("envelopes serialize")).collect())
            })
            .map_err(|error| {
                tracing::error!(%error, "cannot read a stored turn's end");
                GatewayError::Unavailable("the turn's end cannot be read".into())
            })
    }

    /// The valid conversation id in `{prefix}.admin.conv.<id>.erase`.
    fn erased_conversation_id<'a>(&self, subject: &'a str) -> Result<&'a str, GatewayError> {
        let id = subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix(".admin.conv."))
            .and_then(|rest| rest.strip_suffix(".erase"))
            .ok_or_else(|| {
                GatewayError::Internal(format!("unexpected subject {subject:?} for the gateway"))
            })?;
        validate_conversation_id(id)?;
        Ok(id)
    }

    /// Waits until the projections have folded the log's head as it is now,
    /// so a caller reads its own writes.
    async fn caught_up(&self) -> Result<(), GatewayError> {
        let head = self.log.head();
        tokio::time::timeout(FRESHNESS_WAIT, self.projections.wait_for(head))
            .await
            .map_err(|_| GatewayError::Unavailable("the projections are behind the log".into()))
    }

    /// Waits until the projections have folded `seq`, which stored `what`:
    /// `unavailable` (saying it is stored) when they do not within
    /// [`FRESHNESS_WAIT`].
    async fn folded(&self, seq: u64, what: &str) -> Result<(), GatewayError> {
        tokio::time::timeout(FRESHNESS_WAIT, self.projections.wait_for(seq))
            .await
            .map_err(|_| {
                GatewayError::Unavailable(format!(
                    "{what} is stored (seq {seq}) but the key store has not taken it in yet"
                ))
            })
    }

    /// The valid conversation id in `subject`
    /// (`{prefix}.conv.<id>.<operation>`).
    fn conversation_id<'a>(&self, subject: &'a str, suffix: &str) -> Result<&'a str, GatewayError> {
        let id = subject
            .strip_prefix(self.subject_start.as_str())
            .and_then(|rest| rest.strip_suffix(suffix))
            .and_then(|rest| rest.strip_suffix('.'))
            .ok_or_else(|| {
                GatewayError::Internal(format!("unexpected subject {subject:?} for the gateway"))
            })?;
        validate_conversation_id(id)?;
        Ok(id)
    }
}

/// Publishes a delta on `bus` at once (a gateway without an outbox queue);
/// `false` when the bus did not take it within [`DELTA_PUBLISH_WAIT`] (NATS
/// away, its queue full): the turn's later deltas are then dropped.
async fn publish_now(bus: &Bus, delta: Delta) -> bool {
    let subject = delta.subject;
    let published = tokio::time::timeout(
        DELTA_PUBLISH_WAIT,
        bus.publish(&subject, delta.headers, delta.payload),
    )
    .await;
    match published {
        Ok(Ok(())) => true,
        Ok(Err(error)) => {
            tracing::debug!(%subject, %error, "a reply delta was not published");
            true
        }
        Err(_) => {
            tracing::warn!(%subject, "reply deltas dropped: the bus is not taking them");
            false
        }
    }
}

/// The request header that makes a send answer once its turn's end is
/// stored, with that end as `turn` (DESIGN §6; `docs/subjects.md`).
pub const WAIT_HEADER: &str = "Switchboard-Wait";

/// The envelopes of a turn's stored end.
fn stored_end(log: &EventLog, end: TurnEnd) -> Result<Vec<Envelope>, ReadError> {
    let last = end.first_seq + end.events as u64 - 1;
    log.read_range(end.first_seq, last).collect()
}

/// Whether a send asks to wait for its reply (`Switchboard-Wait: reply`).
fn waits_for_reply(headers: &Headers) -> Result<bool, GatewayError> {
    match header(headers, WAIT_HEADER) {
        None => Ok(false),
        Some(value) if value.eq_ignore_ascii_case("reply") => Ok(true),
        Some(value) => Err(GatewayError::InvalidRequest(format!(
            "{WAIT_HEADER} must be \"reply\", not {value:?}"
        ))),
    }
}

/// A header's first value; the name matched exactly first, then ignoring
/// ASCII case (NATS header names are case-sensitive, callers' spellings vary).
pub(crate) fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers.get(name).or_else(|| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
    })
}

/// Whether `value` is a W3C `traceparent`: `vv-<32 hex>-<16 hex>-<2 hex>`,
/// lowercase, version not `ff`, trace and parent ids not all zero. An invalid
/// one is dropped, as the spec says, and the work starts a new trace.
fn valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    parts.len() >= 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && (parts.len() == 4 || parts[0] != "00")
        && hex(parts[1], 32)
        && nonzero(parts[1])
        && hex(parts[2], 16)
        && nonzero(parts[2])
        && hex(parts[3], 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents() {
        let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert!(valid_traceparent(good));
        assert!(!valid_traceparent(&good.to_uppercase()));
        assert!(!valid_traceparent(
            "00-00000000000000000000000000000000-b7ad6b7169203331-01"
        ));
        assert!(!valid_traceparent(
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        ));
        assert!(!valid_traceparent("00-0af7-b7ad-01"));
        assert!(!valid_traceparent("garbage"));
    }

    #[test]
    fn headers_match_case_insensitively() {
        let headers = Headers::new().with("authorization", "Bearer x");
        assert_eq!(header(&headers, "Authorization"), Some("Bearer x"));
        assert_eq!(header(&headers, "Content-Type"), None);
    }
}
