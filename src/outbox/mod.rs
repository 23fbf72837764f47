//! The outbox (DESIGN §6): the checkpointed publisher that carries stored
//! events from the log to NATS.
//!
//! The log is the source of truth; NATS is how others hear about it. Publishing
//! straight after an append would lose every event appended while NATS is
//! away, so instead one task follows the log ([`EventLog::subscribe`]) from a
//! checkpoint kept beside the projections (sled tree `outbox`, key
//! `checkpoint`, u64 big-endian) and publishes each event in seq order.
//!
//! What that gives:
//! - **At-least-once delivery.** No event is skipped: after any failure (NATS
//!   away, a flush timing out, a read error) the outbox backs off (100 ms
//!   doubling to 5 s), waits until a flush reaches the server, and publishes
//!   again from the checkpoint. Core NATS subscribers may then see an event
//!   twice.
//! - **Once per id where it counts.** Every message carries `Nats-Msg-Id`, so a
//!   JetStream stream capturing these subjects drops the re-publishes (within
//!   its duplicate window, 2 minutes by default).
//! - **The checkpoint never runs ahead of the server.** Seq N is checkpointed
//!   only after a flush (a round trip to the server) that followed every
//!   publish up to N, with no reconnect in between: a reconnect may have
//!   dropped what sat in the old connection's buffers, so the batch is
//!   published again. Losing a checkpoint write in a crash only re-publishes,
//!   so the checkpoint is not fsynced per batch (sled flushes it within
//!   half a second, and [`OutboxHandle::stop`] flushes it).
//! - **One round trip per window, not per event.** Events go out as soon as
//!   they are durable, but on NATS at most one burst of them per millisecond
//!   (the timer's resolution may make it two): the commits of a busy log are
//!   gathered into one write to the server, which then wakes once for them
//!   all. A batch is confirmed (flushed, then
//!   checkpointed) once 20 ms have passed since its first event or it holds
//!   1024 events, so a trickle of single commits costs one round trip to the
//!   server per window.
//! - **Optionally, never ahead of a stream.** A flush proves the server took
//!   a message, not that a JetStream stream stored it (around a server
//!   restart, a message the server took can miss the stream). With
//!   [`Outbox::confirm_with_jetstream`], subjects a stream captures are
//!   published as JetStream publishes and a batch is checkpointed only once
//!   each has its acknowledgment.
//!
//! # Subjects
//!
//! | event | subjects (first one primary) |
//! |---|---|
//! | conversation events¹ | `{prefix}.evt.conv.<conversation_id>.<type>` |
//! | `conversation_erased` | the conversation subject, then `{prefix}.evt.audit.conversation_erased` |
//! | `usage_recorded` | `{prefix}.evt.usage.<key_id>`, then `{prefix}.evt.conv.<conversation_id>.usage_recorded` |
//! | `rate_limited` | `{prefix}.evt.audit.rate_limited`, then `{prefix}.alert.rate_limit.<key_id>` |
//! | `budget_threshold_crossed`, `budget_exceeded` | `{prefix}.evt.audit.<type>`, then `{prefix}.alert.budget.<key_id>` (scope key) or `{prefix}.alert.budget.user.<user>` (scope user) |
//! | other audit events | `{prefix}.evt.audit.<type>` |
//!
//! ¹ `conversation_started`, `message_received`, `agent_routed`,
//! `reply_completed`, `reply_failed`. User budget alerts have one token more
//! than key alerts, so `{prefix}.alert.budget.*` is every key's and
//! `{prefix}.alert.budget.user.*` every user's.
//!
//! The body is the envelope's wire JSON ([`Envelope::to_json`]) on every
//! subject; headers are `Nats-Msg-Id`, `Content-Type: application/json` and
//! the envelope's `traceparent`, when it has one that can be a header value.
//! An event too big for the server's maximum payload (a huge reply, or a
//! server configured small) goes out as a stub: `data` null, `"truncated":
//! true`, `"size"` (what it would have taken), and the header
//! `Switchboard-Truncated: true`; the log holds it whole.
//!
//! # Message ids
//!
//! JetStream deduplicates per stream, and one stream may well capture several
//! of an event's subjects (`{prefix}.evt.>` holds both subjects of a
//! `usage_recorded`). So the id is unique per (event, subject): the primary
//! subject gets the event's UUID, each other one `<uuid>:<kind>` with kind
//! `conv`, `usage`, `audit` or `alert` ([`Route::msg_id`]).
//!
//! # Tokens that are not subject tokens
//!
//! Ids come from event data and may hold characters a subject token cannot
//! (a user's e-mail address has dots; stream names allow `.`). Rather than
//! drop such an event, each id is percent-encoded ([`subject_token`]): `.`,
//! `*`, `>`, `%`, whitespace and control characters become `%XX` per UTF-8
//! byte, and the empty id becomes a lone `%`, which nothing else encodes to.
//! Ids made of `[A-Za-z0-9_-]` (all conversation ids, DESIGN §6) are unchanged.
//!
//! An event over the server's maximum payload goes out as a stub (see
//! above). A message the bus refuses outright otherwise (a subject or header
//! it cannot carry, or a stub still too big) can never be published; it is
//! logged with `tracing::error!` and left out, rather than stalling every
//! later event.

mod deltas;
mod feed;
mod route;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use switchboard_events::{Envelope, EventLog, ReadError};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::bus::subject::{self, SubjectError};
use crate::bus::{Bus, BusError, Headers};
pub use deltas::{Delta, DeltaQueue, DELTAS_QUEUED_MAX};
pub use feed::spawn_front_feed;
use route::headers;
pub use route::{routes, subject_token, subjects, Route};

/// The sled tree (beside the log and the projections) holding the checkpoint.
pub const TREE: &str = "outbox";
/// The checkpoint's key: the last published seq, u64 big-endian.
const CHECKPOINT_KEY: &[u8] = b"checkpoint";
/// Set (`true`) on the stub published for an event over the bus's maximum
/// payload ([`route::stub_payload`]).
pub const TRUNCATED_HEADER: &str = "Switchboard-Truncated";
/// Events published between two flushes at most.
const BATCH: usize = 1024;
/// How long after a batch's first event its confirmation (a flush, then the
/// checkpoint) waits for more events to publish with it, unless the batch is
/// full or the outbox is stopping first. The checkpoint lags the published
/// events by as much at most, which after a crash only means re-publishing
/// them (deduplicated by their `Nats-Msg-Id`).
const CONFIRM_WINDOW: Duration = Duration::from_millis(20);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often a batch awaiting confirmation checks for a reconnect.
const RECONNECT_POLL: Duration = Duration::from_millis(50);
/// How long [`OutboxHandle::stop`] keeps publishing what is in the log.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// The least time between two bursts of publishes. Commits coming faster
/// than this are gathered and go out together, in one write to the server
/// instead of one each; an event after a quiet spell goes out at once.
const GATHER: Duration = Duration::from_millis(1);

/// Waits out what is left of `gather` since the last burst ended.
async fn gather(burst_end: Instant, gather: Duration) {
    let until = burst_end + gather;
    if Instant::now() < until {
        tokio::time::sleep_until(until).await;
    }
}

/// Why the outbox could not start, or has stopped.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("invalid subject prefix {prefix:?}: {source}")]
    InvalidPrefix {
        prefix: String,
        #[source]
        source: SubjectError,
    },
    #[error("invalid JetStream subject pattern {pattern:?}: {source}")]
    InvalidPattern {
        pattern: String,
        #[source]
        source: SubjectError,
    },
    #[error("JetStream confirmation needs the NATS bus")]
    JetStreamNeedsNats,
    #[error("outbox checkpoint storage: {0}")]
    Storage(#[from] sled::Error),
    #[error("the outbox checkpoint is corrupt: {len} bytes where 8 were expected")]
    CorruptCheckpoint { len: usize },
    /// The publisher task has ended (stopped or failed) before reaching the
    /// awaited seq.
    #[error("the outbox has stopped")]
    Stopped,
}

/// An outbox about to start; see the module doc.
///
/// ```no_run
/// # use switchboard::bus::Bus;
/// # use switchboard::outbox::{Outbox, OutboxError};
/// # async fn example(log: switchboard_events::EventLog, bus: Bus) -> Result<(), OutboxError> {
/// let outbox = Outbox::new(log, bus, "sb")
///     .confirm_with_jetstream("sb.evt.>")?
///     .spawn()?;
/// // ... serve until shutdown ...
/// outbox.stop().await;
/// # Ok(()) }
/// ```
pub struct Outbox {
    log: EventLog,
    bus: Bus,
    prefix: String,
    jetstream: Option<subject::Pattern>,
    deltas: DeltaQueue,
}

/// The subjects a JetStream stream captures, as [`Outbox::confirm_with_jetstream`]
/// takes them; checked on its own so a start can refuse a bad one early.
pub fn jetstream_pattern(pattern: &str) -> Result<subject::Pattern, OutboxError> {
    subject::Pattern::parse(pattern).map_err(|source| OutboxError::InvalidPattern {
        pattern: pattern.to_owned(),
        source,
    })
}

impl Outbox {
    /// An outbox publishing `log`'s events on `bus` under `prefix`. Each
    /// batch is checkpointed once a flush says the server has it (and, see
    /// [`confirm_with_jetstream`](Self::confirm_with_jetstream), once a
    /// stream has it).
    pub fn new(log: EventLog, bus: Bus, prefix: &str) -> Outbox {
        Outbox {
            log,
            bus,
            prefix: prefix.to_owned(),
            jetstream: None,
            deltas: DeltaQueue::new(),
        }
    }

    /// Publishes the reply deltas queued on `deltas` too, each once its
    /// message is published and before the next event (see
    /// [`deltas`](self::deltas)).
    pub fn with_deltas(mut self, deltas: DeltaQueue) -> Outbox {
        self.deltas = deltas;
        self
    }

    /// Publishes subjects matching `pattern` through JetStream and checkpoints
    /// a batch only once a stream has acknowledged each of them (a duplicate
    /// counts). A flush only says the server has a message, not that a stream
    /// stored it: around a server restart, a message the server took can miss
    /// the stream. Every subject matching `pattern` must be captured by a
    /// stream, or the outbox retries forever (and logs why). NATS only.
    pub fn confirm_with_jetstream(mut self, pattern: &str) -> Result<Outbox, OutboxError> {
        self.jetstream = Some(jetstream_pattern(pattern)?);
        Ok(self)
    }

    /// Starts an outbox that needs no JetStream acknowledgments:
    /// [`Outbox::new`] then [`Outbox::spawn`].
    pub fn start(log: EventLog, bus: Bus, prefix: &str) -> Result<OutboxHandle, OutboxError> {
        Outbox::new(log, bus, prefix).spawn()
    }

    /// Reads the checkpoint and spawns the publisher on the current Tokio
    /// runtime (so call it inside one). It publishes every event after the
    /// checkpoint, then each new one as it becomes durable, until
    /// [`OutboxHandle::stop`].
    pub fn spawn(self) -> Result<OutboxHandle, OutboxError> {
        let Outbox {
            log,
            bus,
            prefix,
            jetstream,
            deltas,
        } = self;
        subject::validate_subject(&prefix).map_err(|source| OutboxError::InvalidPrefix {
            prefix: prefix.clone(),
            source,
        })?;
        let jetstream = match (jetstream, &bus) {
            (None, _) => None,
            (Some(pattern), Bus::Nats(nats)) => {
                Some((async_nats::jetstream::new(nats.client().clone()), pattern))
            }
            (Some(_), Bus::Local(_)) => return Err(OutboxError::JetStreamNeedsNats),
        };
        let tree = log.db().open_tree(TREE)?;
        let mut checkpoint = match tree.get(CHECKPOINT_KEY)? {
            None => 0,
            Some(bytes) => u64::from_be_bytes(
                bytes
                    .as_ref()
                    .try_into()
                    .map_err(|_| OutboxError::CorruptCheckpoint { len: bytes.len() })?,
            ),
        };
        let head = log.head();
        if checkpoint > head {
            // The log was replaced by a shorter one: what comes next is new.
            tracing::warn!(checkpoint, head, "outbox checkpoint is past the log's head");
            checkpoint = head;
        }
        tracing::info!(checkpoint, head, prefix, "outbox publishing");
        let (through, published) = watch::channel(checkpoint);
        let (stop, stopped) = oneshot::channel();
        let gather = match &bus {
            Bus::Nats(_) => GATHER,
            Bus::Local(_) => Duration::ZERO,
        };
        let publisher = Publisher {
            log: log.clone(),
            bus,
            prefix,
            jetstream,
            tree,
            checkpoint,
            through,
            gather,
            deltas,
        };
        Ok(OutboxHandle {
            published,
            stop: Some(stop),
            task: Some(tokio::spawn(publisher.run(stopped))),
            log,
        })
    }
}

/// A running outbox. Dropping it aborts the publisher without waiting (the
/// checkpoint stays at the last flushed batch); [`stop`](Self::stop) first
/// publishes what is in the log.
pub struct OutboxHandle {
    published: watch::Receiver<u64>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    log: EventLog,
}

impl OutboxHandle {
    /// The checkpoint: every event up to this seq has reached the server.
    pub fn published_through(&self) -> u64 {
        *self.published.borrow()
    }

    /// A watch of [`Self::published_through`], for readers elsewhere (metrics).
    pub fn progress(&self) -> watch::Receiver<u64> {
        self.published.clone()
    }

    /// Waits until every event up to `seq` has reached the server;
    /// [`OutboxError::Stopped`] if the publisher ended first.
    pub async fn wait_for(&self, seq: u64) -> Result<(), OutboxError> {
        let mut published = self.published.clone();
        let reached = published.wait_for(|through| *through >= seq).await.is_ok();
        if reached {
            Ok(())
        } else {
            Err(OutboxError::Stopped)
        }
    }

    /// Publishes the events up to the log's head at the time of the call (for
    /// at most 5 seconds: NATS may be away), checkpoints them, flushes the
    /// checkpoint to disk and returns.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            match tokio::time::timeout(STOP_TIMEOUT, &mut task).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(%error, "the outbox task failed"),
                Err(_) => {
                    tracing::warn!(
                        published_through = self.published_through(),
                        head = self.log.head(),
                        "outbox stopped before publishing the whole log; the rest goes out on the next start"
                    );
                    task.abort();
                    let _ = task.await;
                }
            }
        }
        if let Err(error) = self.log.db().flush_async().await {
            tracing::error!(%error, "flushing the outbox checkpoint failed");
        }
    }
}

impl Drop for OutboxHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Why a batch did not get checkpointed; each is retried from the checkpoint.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("reading the log: {0}")]
    Read(#[from] ReadError),
    #[error("publishing: {0}")]
    Bus(#[from] BusError),
    #[error("JetStream: {0}")]
    JetStream(#[from] async_nats::jetstream::context::PublishError),
    #[error("writing the checkpoint: {0}")]
    Storage(#[from] sled::Error),
    #[error("NATS reconnected during the batch")]
    Reconnected,
}

/// A JetStream acknowledgment still to come.
type Ack = async_nats::jetstream::context::PublishAckFuture;

/// The publisher task's state.
struct Publisher {
    log: EventLog,
    bus: Bus,
    prefix: String,
    /// Subjects that need a stream's acknowledgment, and how to publish them.
    jetstream: Option<(async_nats::jetstream::Context, subject::Pattern)>,
    tree: sled::Tree,
    checkpoint: u64,
    through: watch::Sender<u64>,
    /// [`GATHER`] on NATS; nothing on the embedded bus, which has no
    /// server to wake.
    gather: Duration,
    /// Reply deltas to publish among the events ([`Outbox::with_deltas`]).
    deltas: DeltaQueue,
}

/// Set once [`OutboxHandle::stop`] is asked: the log's head at that moment.
type DrainTo = Option<u64>;

impl Publisher {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        let mut drain_to: DrainTo = None;
        let mut backoff = BACKOFF_MIN;
        loop {
            let failure = match self
                .publish_from_checkpoint(&mut stop, &mut drain_to, &mut backoff)
                .await
            {
                Ok(()) => return,
                Err(failure) => failure,
            };
            if let Failure::Reconnected = failure {
                // Publish the batch again on the new connection, at once.
                tracing::info!(
                    checkpoint = self.checkpoint,
                    "NATS reconnected mid-batch; publishing the batch again"
                );
                continue;
            }
            tracing::error!(
                checkpoint = self.checkpoint,
                error = %failure,
                retry_in = ?backoff,
                "outbox batch failed"
            );
            // Publish again only once the server answers, so an outage does not
            // pile copies of the batch into the client's queue.
            loop {
                self.pause(backoff, &mut stop, &mut drain_to).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                match self.bus.flush().await {
                    Ok(()) => break,
                    Err(error) => {
                        tracing::warn!(%error, retry_in = ?backoff, "outbox waiting for the bus")
                    }
                }
            }
        }
    }

    /// Publishes batches from the checkpoint on until drained or failed.
    async fn publish_from_checkpoint(
        &mut self,
        stop: &mut oneshot::Receiver<()>,
        drain_to: &mut DrainTo,
        backoff: &mut Duration,
    ) -> Result<(), Failure> {
        let mut events = self.log.subscribe(self.checkpoint + 1);
        let mut acks = Vec::new();
        let mut burst_end = Instant::now() - GATHER;
        loop {
            if drain_to.is_some_and(|to| self.checkpoint >= to) {
                return Ok(());
            }
            let next = if drain_to.is_some() {
                // Everything up to the drain target is durable: no waiting.
                events.next().await
            } else {
                let next = tokio::select! {
                    next = events.next() => next,
                    _ = &mut *stop => {
                        *drain_to = Some(self.log.head());
                        continue;
                    }
                    () = self.deltas.pushed() => {
                        self.publish_deltas(self.checkpoint).await;
                        continue;
                    }
                };
                gather(burst_end, self.gather).await;
                next
            };
            let Some(first) = next else {
                return Ok(()); // the log has closed
            };
            let connects = self.connects();
            let mut last = self.publish(&*first?, &mut acks).await?;
            let mut published = 1;
            // What comes during the window is published as it comes and
            // confirmed with the rest: one round trip to the server per window
            // instead of one per commit of the log.
            let window_end = tokio::time::Instant::now() + CONFIRM_WINDOW;
            while published < BATCH {
                let next = match events.try_next() {
                    Some(next) => Some(next),
                    // Stopping: confirm at once what is at hand.
                    None if drain_to.is_some() => break,
                    None => {
                        burst_end = Instant::now();
                        let next = tokio::select! {
                            next = events.next() => next,
                            () = tokio::time::sleep_until(window_end) => break,
                            _ = &mut *stop => {
                                *drain_to = Some(self.log.head());
                                break;
                            }
                            () = self.deltas.pushed() => {
                                self.publish_deltas(last).await;
                                continue;
                            }
                        };
                        gather(burst_end, self.gather).await;
                        next
                    }
                };
                let Some(next) = next else {
                    break; // the log has closed: confirm what went out
                };
                last = self.publish(&*next?, &mut acks).await?;
                published += 1;
            }
            let confirmed = async {
                self.bus.flush().await?;
                let acks = acks.drain(..).map(std::future::IntoFuture::into_future);
                futures::future::try_join_all(acks).await?;
                Ok::<(), Failure>(())
            };
            tokio::select! {
                confirmed = confirmed => confirmed?,
                () = self.reconnect_after(connects) => return Err(Failure::Reconnected),
            }
            if self.connects() != connects {
                return Err(Failure::Reconnected);
            }
            self.tree.insert(CHECKPOINT_KEY, &last.to_be_bytes())?;
            self.checkpoint = last;
            self.through.send_replace(last);
            *backoff = BACKOFF_MIN;
        }
    }

    /// Publishes the queued deltas of the messages up to seq `through`.
    async fn publish_deltas(&self, through: u64) {
        self.deltas.publish_through(&self.bus, through).await;
    }

    /// Publishes one event on each of its subjects, after the deltas queued
    /// for the messages before it and before those of its own; returns its
    /// seq.
    async fn publish(&self, envelope: &Envelope, acks: &mut Vec<Ack>) -> Result<u64, Failure> {
        self.publish_deltas(envelope.seq - 1).await;
        let payload = Bytes::from(route::payload(envelope));
        for route in routes(&self.prefix, envelope) {
            let mut published = self
                .publish_one(
                    &route.subject,
                    headers(envelope, &route.msg_id),
                    &payload,
                    acks,
                )
                .await?;
            if let Err(BusError::PayloadTooLarge { size, .. }) = published {
                // Too big for NATS: subscribers hear of it all the same, and
                // where to read it whole.
                let stub = Bytes::from(route::stub_payload(envelope, size));
                let headers = headers(envelope, &route.msg_id).with(TRUNCATED_HEADER, "true");
                published = self
                    .publish_one(&route.subject, headers, &stub, acks)
                    .await?;
                if published.is_ok() {
                    tracing::warn!(
                        seq = envelope.seq,
                        id = %envelope.id,
                        subject = route.subject,
                        size,
                        "event over the bus's maximum payload published without its data"
                    );
                }
            }
            match published {
                Ok(()) => {}
                Err(
                    error @ (BusError::InvalidSubject { .. }
                    | BusError::InvalidHeader(_)
                    | BusError::PayloadTooLarge { .. }),
                ) => tracing::error!(
                    seq = envelope.seq,
                    id = %envelope.id,
                    subject = route.subject,
                    %error,
                    "event can never be published on this subject; left out"
                ),
                Err(error) => return Err(error.into()),
            }
        }
        self.publish_deltas(envelope.seq).await;
        Ok(envelope.seq)
    }

    /// Publishes one message of an event: through JetStream when a stream
    /// confirms its subject (its acknowledgment joins `acks`), else on the
    /// bus. The inner result is the bus's answer about this message; the
    /// outer error is a JetStream failure that stops the batch.
    async fn publish_one(
        &self,
        subject: &str,
        headers: Headers,
        payload: &Bytes,
        acks: &mut Vec<Ack>,
    ) -> Result<Result<(), BusError>, Failure> {
        Ok(match &self.jetstream {
            Some((jetstream, pattern)) if pattern.matches(subject) => {
                match self.stream_message(subject, headers, payload) {
                    Ok(message) => {
                        acks.push(jetstream.send_publish(subject.to_owned(), message).await?);
                        Ok(())
                    }
                    Err(refused) => Err(refused),
                }
            }
            _ => self.bus.publish(subject, headers, payload.clone()).await,
        })
    }

    /// The checks [`Bus::publish`] makes, for a message that goes through
    /// JetStream instead: a refused one would get the connection closed.
    fn stream_message(
        &self,
        subject: &str,
        headers: Headers,
        payload: &Bytes,
    ) -> Result<async_nats::jetstream::context::Publish, BusError> {
        subject::validate_subject(subject).map_err(|source| BusError::InvalidSubject {
            subject: subject.to_owned(),
            source,
        })?;
        headers.validate()?;
        let max = match &self.bus {
            Bus::Nats(nats) => nats.client().server_info().max_payload,
            Bus::Local(_) => 0,
        };
        // Before the first connect the limit is unknown; assume the default.
        let max = if max == 0 { 1024 * 1024 } else { max };
        let size = headers.wire_len() + payload.len();
        if size > max {
            return Err(BusError::PayloadTooLarge { size, max });
        }
        let mut map = async_nats::HeaderMap::new();
        for (name, value) in headers.iter() {
            map.append(name, value);
        }
        Ok(async_nats::jetstream::context::Publish::build()
            .payload(payload.clone())
            .headers(map))
    }

    /// How often the NATS client has connected: a change between a batch's
    /// first publish and its confirmation means the batch may have been lost
    /// with the old connection.
    fn connects(&self) -> u64 {
        match &self.bus {
            Bus::Local(_) => 0,
            Bus::Nats(nats) => nats.client().statistics().connects.load(Ordering::Relaxed),
        }
    }

    /// Completes once the client has connected again since `connects` was
    /// read; then what is awaited on the old connection may never come.
    async fn reconnect_after(&self, connects: u64) {
        if let Bus::Local(_) = self.bus {
            return std::future::pending().await;
        }
        while self.connects() == connects {
            tokio::time::sleep(RECONNECT_POLL).await;
        }
    }

    /// Sleeps for `duration`, noting a stop request meanwhile.
    async fn pause(
        &self,
        duration: Duration,
        stop: &mut oneshot::Receiver<()>,
        drain_to: &mut DrainTo,
    ) {
        tokio::select! {
            () = tokio::time::sleep(duration) => {}
            _ = &mut *stop, if drain_to.is_none() => *drain_to = Some(self.log.head()),
        }
    }
}
