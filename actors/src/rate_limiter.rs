//! The `RateLimiter` actors, one per API key (DESIGN §5): requests per minute,
//! tokens per minute and concurrent requests, answering allow (a [`Permit`]) or
//! refuse (with `retry_after_ms`), around the state machine of
//! [`crate::rate_limit`].
//!
//! Why an actor per key: a key's counters are read and changed by every request
//! made with it, from any connection; one mailbox serialises them without a
//! lock held across requests, while different keys proceed in parallel.
//! [`RateLimiters`] only routes — a map lookup under a short lock never held
//! across an await, as in [`crate::conversation_registry`].
//!
//! Refusals are audited as `rate_limited` events on `key/<key_id>`, coalesced
//! to at most one per key per second carrying the count since the last one, so
//! a client hammering a limit cannot flood the log (nor `sb.alert.rate_limit.*`,
//! which the outbox publishes from the log). Refusals inside the interval are
//! flushed by a timer at its end, so every refusal is counted exactly once. The
//! appends run beside the actor: a refusal is answered before its report
//! reaches the disk, and a failed append is logged and retried at the next flush.
//!
//! Time is read from `tokio::time::Instant`, so tests drive windows, reports
//! and passivation with `tokio::time::pause` and `advance` instead of sleeping.
//!
//! Memory stays bounded with many keys: an actor with nothing in flight, empty
//! windows and nothing to report stops after [`RateLimiterConfig::idle_after`];
//! the key comes back fresh, which is exactly the state it had. A crashed actor
//! loses its windows (it has nothing in the log to recover from): the caller
//! gets a fresh actor's answer, or `unavailable`, never silence.
//!
//! ```no_run
//! use switchboard_actors::rate_limiter::{AdmitError, RateLimiterConfig, RateLimiters};
//! use switchboard_events::catalog::Limits;
//! use switchboard_events::{EventLog, OpenMode};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let log = EventLog::open("./data".as_ref(), OpenMode::CreateIfMissing)?;
//! let limiters = RateLimiters::new(log, RateLimiterConfig::default());
//! let limits = Limits { rpm: Some(60), tpm: Some(100_000), max_parallel: Some(4) };
//! match limiters.admit("key_1", limits).await {
//!     Ok(permit) => {
//!         // ... run the turn ...
//!         permit.finish(1_234); // the turn's tokens; frees the concurrency slot
//!     }
//!     Err(AdmitError::RateLimited(refused)) => {
//!         println!("retry after {} ms", refused.retry_after_ms);
//!     }
//!     Err(other) => println!("{}: {other}", other.code()),
//! }
//! limiters.shutdown().await;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::concurrency::JoinHandle;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, ActorRuntime, ActorStatus};
use switchboard_events::catalog::{LimitKind, Limits, RateLimited};
use switchboard_events::{AppendError, Event, EventLog, ExpectedVersion, NewEvent, StreamId};
use tokio::task::{AbortHandle, JoinSet};

use crate::rate_limit::{KeyRateLimit, RefusalReport, Remaining, REFUSAL_REPORT_INTERVAL};

/// Settings of [`RateLimiters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimiterConfig {
    /// A key's actor unused for this long is stopped once it holds nothing
    /// worth keeping (no request in flight, empty windows, no unreported
    /// refusal). It is checked this often, so an idle key is stopped within
    /// about a window plus twice this. At least a second (the report
    /// interval), so reports stay one a second across a passivation.
    pub idle_after: Duration,
}

impl Default for RateLimiterConfig {
    fn default() -> Self {
        RateLimiterConfig {
            idle_after: Duration::from_secs(60),
        }
    }
}

/// A refusal: which limit, and when trying again can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub limit: LimitKind,
    /// Rounded up, so a retry after this many milliseconds is not early.
    pub retry_after_ms: u64,
    /// What is left of each limit, for `RateLimit-*` headers.
    pub remaining: Remaining,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the key's {} limit is reached; retry after {} ms",
            limit_name(self.limit),
            self.retry_after_ms
        )
    }
}

/// Why a request was not admitted; [`AdmitError::code`] is the error code of
/// DESIGN §6.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    /// A limit of the key refuses the request for now.
    #[error("rate limited: {0}")]
    RateLimited(Refused),
    /// The limiter is shutting down, or the key's actor failed repeatedly.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The key id cannot name a stream, or an actor could not be spawned.
    #[error("internal error: {0}")]
    Internal(String),
}

impl AdmitError {
    /// `rate_limited`, `unavailable` or `internal`.
    pub fn code(&self) -> &'static str {
        match self {
            AdmitError::RateLimited(_) => "rate_limited",
            AdmitError::Unavailable(_) => "unavailable",
            AdmitError::Internal(_) => "internal",
        }
    }

    /// The `retry_after_ms` of a refusal.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            AdmitError::RateLimited(refused) => Some(refused.retry_after_ms),
            _ => None,
        }
    }
}

/// An admitted request, holding one of its key's concurrency slots until
/// [`Permit::finish`] — or until dropped, which frees the slot with no tokens,
/// so a caller that fails or panics mid-turn never leaks a slot.
#[must_use = "dropping a permit at once ends the request it admitted"]
pub struct Permit {
    /// The actor holding the slot; `None` once released, or for an unlimited key.
    slot: Option<ActorRef<KeyMsg>>,
    remaining: Remaining,
}

impl Permit {
    fn unlimited() -> Self {
        Permit {
            slot: None,
            remaining: UNLIMITED,
        }
    }

    /// What was left of each limit right after this admission, for
    /// `RateLimit-*` headers.
    pub fn remaining(&self) -> Remaining {
        self.remaining
    }

    /// Ends the request: counts the turn's tokens against `tpm` and frees the
    /// concurrency slot.
    pub fn finish(mut self, tokens: u64) {
        self.release(tokens);
    }

    fn release(&mut self, tokens: u64) {
        if let Some(actor) = self.slot.take() {
            // A stopped actor took its counters with it: nothing to free.
            let _ = actor.cast(KeyMsg::Finish { tokens });
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.release(0);
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("held", &self.slot.is_some())
            .field("remaining", &self.remaining)
            .finish()
    }
}

const UNLIMITED: Remaining = Remaining {
    requests: None,
    tokens: None,
    reset: Duration::ZERO,
};

/// How often `admit` tries a fresh actor after the key's actor stopped
/// (passivated or crashed) before taking the request.
const ATTEMPTS: usize = 3;

/// The rate limits of every API key: one actor per key with limits, spawned on
/// first use and stopped when idle. Cheap to clone; the last clone to drop
/// stops the actors (call [`RateLimiters::shutdown`] first to store their
/// pending refusal reports).
#[derive(Clone)]
pub struct RateLimiters {
    inner: Arc<Inner>,
}

struct Inner {
    log: EventLog,
    config: RateLimiterConfig,
    live: Arc<Live>,
}

/// The live actors, shared with them so an idle one can take itself out.
#[derive(Default)]
struct Live {
    actors: Mutex<Actors>,
}

#[derive(Default)]
struct Actors {
    by_key: HashMap<String, ActorRef<KeyMsg>>,
    closed: bool,
}

impl RateLimiters {
    /// Limiters appending their refusal reports to `log`. Call it inside a
    /// tokio runtime.
    pub fn new(log: EventLog, config: RateLimiterConfig) -> Self {
        RateLimiters {
            inner: Arc::new(Inner {
                log,
                config,
                live: Arc::new(Live::default()),
            }),
        }
    }

    /// Admits a request of `key_id` under `limits` — the key's current limits,
    /// passed with every call so a `key_updated` takes effect at once — or
    /// refuses it. A key without limits is admitted without an actor.
    pub async fn admit(&self, key_id: &str, limits: Limits) -> Result<Permit, AdmitError> {
        if is_unlimited(&limits) {
            return Ok(Permit::unlimited());
        }
        for _ in 0..ATTEMPTS {
            let actor = self.inner.actor(key_id)?;
            let limits = limits.clone();
            match actor
                .call(|reply| KeyMsg::Admit { limits, reply }, None)
                .await
            {
                Ok(CallResult::Success(answer)) => {
                    if let Err(refused) = &answer {
                        metrics::counter!(
                            "switchboard_rate_limit_refusals_total",
                            "key_id" => key_id.to_owned(),
                            "limit" => limit_name(refused.limit),
                        )
                        .increment(1);
                    }
                    return answer.map_err(AdmitError::RateLimited);
                }
                // The actor stopped before answering (passivated while the
                // request was on its way, or crashed): nothing was admitted.
                _ => self.inner.live.forget(key_id, actor.get_id(), true),
            }
        }
        Err(AdmitError::Unavailable(format!(
            "the rate limiter of key {key_id} stopped {ATTEMPTS} times before answering"
        )))
    }

    /// What is left of each of `key_id`'s limits, for `RateLimit-*` headers.
    /// Spawns no actor: a key without one has full limits.
    pub async fn remaining(&self, key_id: &str, limits: Limits) -> Remaining {
        if is_unlimited(&limits) {
            return UNLIMITED;
        }
        let actor = self.inner.live.get(key_id);
        if let Some(actor) = actor {
            let asked = limits.clone();
            let call = actor
                .call(
                    |reply| KeyMsg::Remaining {
                        limits: asked,
                        reply,
                    },
                    None,
                )
                .await;
            if let Ok(CallResult::Success(remaining)) = call {
                return remaining;
            }
        }
        KeyRateLimit::new(limits).remaining(now())
    }

    /// How many key actors are live. A passivated actor leaves this count at
    /// once.
    pub fn live_count(&self) -> usize {
        self.inner.live.lock().by_key.len()
    }

    /// Stops admitting (later calls answer `unavailable`), stores every key's
    /// pending refusal report — waiting out the rest of its second, so even
    /// the last report keeps to one a second — and returns once every actor
    /// has stopped. Permits still held stay valid to finish and drop; they
    /// free nothing any more.
    pub async fn shutdown(&self) {
        let actors: Vec<ActorRef<KeyMsg>> = {
            let mut live = self.inner.live.lock();
            live.closed = true;
            live.by_key.drain().map(|(_, actor)| actor).collect()
        };
        futures::future::join_all(actors.iter().map(|actor| async move {
            // An actor that already stopped has nothing pending to store.
            let _ = actor.call(KeyMsg::Shutdown, None).await;
            actor.stop(Some("shutdown".into()));
            let _ = actor.wait(None).await;
        }))
        .await;
    }

    #[cfg(test)]
    fn actor_of(&self, key_id: &str) -> Option<ActorRef<KeyMsg>> {
        self.inner.live.get(key_id)
    }
}

impl Inner {
    /// The key's live actor, spawned when there is none.
    fn actor(&self, key_id: &str) -> Result<ActorRef<KeyMsg>, AdmitError> {
        let mut live = self.live.lock();
        if live.closed {
            return Err(AdmitError::Unavailable(
                "the rate limiter is shutting down".into(),
            ));
        }
        if let Some(actor) = live.by_key.get(key_id) {
            if actor.get_status() < ActorStatus::Draining {
                return Ok(actor.clone());
            }
        }
        let stream = StreamId::key(key_id).map_err(|e| AdmitError::Internal(e.to_string()))?;
        let args = KeyArgs {
            key_id: key_id.to_owned(),
            stream,
            log: self.log.clone(),
            // A key refused within the last second must not come back fresh,
            // or its next refusal would be reported at once.
            idle_after: self.config.idle_after.max(REFUSAL_REPORT_INTERVAL),
            live: Arc::clone(&self.live),
        };
        // Instant: the mailbox exists at once, so spawning never waits under the lock.
        let (actor, _started) = ActorRuntime::spawn_instant(None, KeyRateLimiter, args)
            .map_err(|e| AdmitError::Internal(format!("cannot spawn a rate limiter: {e}")))?;
        live.by_key.insert(key_id.to_owned(), actor.clone());
        Ok(actor)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let mut live = self.live.lock();
        for (_, actor) in live.by_key.drain() {
            actor.stop(Some("rate limiters dropped".into()));
        }
    }
}

impl Live {
    fn lock(&self) -> std::sync::MutexGuard<'_, Actors> {
        self.actors.lock().expect("rate limiter map lock")
    }

    fn get(&self, key_id: &str) -> Option<ActorRef<KeyMsg>> {
        self.lock().by_key.get(key_id).cloned()
    }

    /// Removes the key's entry if it is still `actor` (a newer actor of the
    /// same key stays), optionally stopping it.
    fn forget(&self, key_id: &str, actor: ActorId, stop: bool) {
        let mut live = self.lock();
        if live
            .by_key
            .get(key_id)
            .is_some_and(|entry| entry.get_id() == actor)
        {
            if let Some(entry) = live.by_key.remove(key_id) {
                if stop {
                    entry.stop(Some("stopped answering".into()));
                }
            }
        }
    }
}

fn is_unlimited(limits: &Limits) -> bool {
    limits.rpm.is_none() && limits.tpm.is_none() && limits.max_parallel.is_none()
}

fn limit_name(limit: LimitKind) -> &'static str {
    match limit {
        LimitKind::Rpm => "rpm",
        LimitKind::Tpm => "tpm",
        LimitKind::Parallel => "parallel",
    }
}

/// The limiter's clock: tokio's, so paused test time drives it.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

fn millis_rounded_up(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// The actor of one key.
struct KeyRateLimiter;

struct KeyArgs {
    key_id: String,
    stream: StreamId,
    log: EventLog,
    idle_after: Duration,
    live: Arc<Live>,
}

enum KeyMsg {
    Admit {
        limits: Limits,
        reply: ractor::RpcReplyPort<Result<Permit, Refused>>,
    },
    /// A permit ended (finished or dropped).
    Finish { tokens: u64 },
    Remaining {
        limits: Limits,
        reply: ractor::RpcReplyPort<Remaining>,
    },
    /// Report refusals whose interval has ended; also sent by a failed append.
    FlushRefusals,
    /// Stop if idle; otherwise check again later.
    CheckIdle,
    /// Store what is pending, then answer (the limiter stops the actor).
    Shutdown(ractor::RpcReplyPort<()>),
    #[cfg(test)]
    Crash,
    #[cfg(test)]
    FailAppends(u32),
}

struct KeyState {
    key_id: String,
    stream: StreamId,
    log: EventLog,
    limit: KeyRateLimit,
    idle_after: Duration,
    last_used: Instant,
    /// Appends of `rate_limited` in progress.
    appends: JoinSet<()>,
    /// Reports whose append failed, waiting to be counted into the next one.
    failed: Arc<Mutex<Vec<RefusalReport>>>,
    /// When the flush timer fires, if one is set.
    flush_at: Option<Instant>,
    timers: Vec<AbortHandle>,
    /// Takes the map entry out when the state goes, however the actor ends.
    registration: Registration,
    /// How many of the next appends fail without reaching the log.
    #[cfg(test)]
    failing_appends: u32,
}

struct Registration {
    live: Arc<Live>,
    key_id: String,
    actor: ActorId,
}

impl Registration {
    fn forget(&self) {
        self.live.forget(&self.key_id, self.actor, false);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.forget();
    }
}

impl Drop for KeyState {
    fn drop(&mut self) {
        for timer in &self.timers {
            timer.abort();
        }
    }
}

#[ractor::async_trait]
impl Actor for KeyRateLimiter {
    type Msg = KeyMsg;
    type State = KeyState;
    type Arguments = KeyArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<KeyMsg>,
        args: KeyArgs,
    ) -> Result<KeyState, ActorProcessingErr> {
        let mut state = KeyState {
            limit: KeyRateLimit::new(Limits::default()),
            idle_after: args.idle_after,
            last_used: now(),
            appends: JoinSet::new(),
            failed: Arc::default(),
            flush_at: None,
            timers: Vec::new(),
            registration: Registration {
                live: args.live,
                key_id: args.key_id.clone(),
                actor: myself.get_id(),
            },
            #[cfg(test)]
            failing_appends: 0,
            key_id: args.key_id,
            stream: args.stream,
            log: args.log,
        };
        state.schedule_idle_check(&myself);
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<KeyMsg>,
        message: KeyMsg,
        state: &mut KeyState,
    ) -> Result<(), ActorProcessingErr> {
        state.collect_appends(&myself);
        match message {
            KeyMsg::Admit { limits, reply } => {
                let now = now();
                state.last_used = now;
                state.apply(limits);
                match state.limit.try_admit(now) {
                    Ok(()) => {
                        let permit = Permit {
                            slot: Some(myself.clone()),
                            remaining: state.limit.remaining(now),
                        };
                        // A caller gone meanwhile drops the permit with the
                        // failed send, which frees its slot.
                        let _ = reply.send(Ok(permit));
                    }
                    Err(refusal) => {
                        let _ = reply.send(Err(Refused {
                            limit: refusal.limit,
                            retry_after_ms: millis_rounded_up(refusal.retry_after),
                            remaining: state.limit.remaining(now),
                        }));
                        match state.limit.note_refusal(now, refusal) {
                            Some(report) => state.append(&myself, report),
                            None => state.schedule_flush(&myself, now),
                        }
                    }
                }
            }
            KeyMsg::Finish { tokens } => {
                let now = now();
                state.last_used = now;
                state.limit.finish(now, tokens);
            }
            KeyMsg::Remaining { limits, reply } => {
                state.apply(limits);
                let _ = reply.send(state.limit.remaining(now()));
            }
            KeyMsg::FlushRefusals => {
                let now = now();
                if state.flush_at.is_some_and(|at| at <= now) {
                    state.flush_at = None;
                }
                match state.limit.flush_refusals(now) {
                    Some(report) => state.append(&myself, report),
                    None => state.schedule_flush(&myself, now),
                }
            }
            KeyMsg::CheckIdle => {
                let now = now();
                let unused = now.saturating_duration_since(state.last_used) >= state.idle_after;
                if unused && state.appends.is_empty() && state.limit.is_idle(now) {
                    tracing::debug!(key_id = %state.key_id, "passivating an idle rate limiter");
                    // Out of the map first: no request reaches it from here,
                    // and those already queued are dropped by the stop, unanswered,
                    // so their callers retry with a fresh actor.
                    state.registration.forget();
                    myself.stop(Some("passivated".into()));
                } else {
                    state.schedule_idle_check(&myself);
                }
            }
            KeyMsg::Shutdown(reply) => {
                state.store_pending().await;
                let _ = reply.send(());
            }
            #[cfg(test)]
            KeyMsg::Crash => panic!("a rate limiter panics, as a bug would"),
            #[cfg(test)]
            KeyMsg::FailAppends(count) => state.failing_appends = count,
        }
        Ok(())
    }
}

impl KeyState {
    fn apply(&mut self, limits: Limits) {
        #[cfg(test)]
        if self.key_id == tests::PANICS {
            panic!("the rate limiter of {} panics", tests::PANICS);
        }
        if *self.limit.limits() != limits {
            self.limit.set_limits(limits);
        }
    }

    /// Stores `report` beside the actor, so answers never wait for the disk.
    fn append(&mut self, myself: &ActorRef<KeyMsg>, report: RefusalReport) {
        let event = self.event(&report);
        let (log, stream, failed) = (self.log.clone(), self.stream.clone(), self.failed.clone());
        let (key_id, myself) = (self.key_id.clone(), myself.clone());
        let fails = self.simulated_failure();
        self.appends.spawn(async move {
            let stored = match fails {
                Some(error) => Err(error),
                None => log.append(stream, ExpectedVersion::Any, vec![event]).await,
            };
            if let Err(error) = stored {
                tracing::warn!(%key_id, %error, count = report.count,
                    "cannot store rate_limited; retrying at the next flush");
                failed.lock().expect("failed reports lock").push(report);
                let _ = myself.cast(KeyMsg::FlushRefusals);
            }
        });
    }

    #[cfg(not(test))]
    fn simulated_failure(&mut self) -> Option<AppendError> {
        None
    }

    #[cfg(test)]
    fn simulated_failure(&mut self) -> Option<AppendError> {
        let fails = self.failing_appends > 0;
        self.failing_appends = self.failing_appends.saturating_sub(1);
        fails.then(|| AppendError::Storage("a simulated storage failure".into()))
    }

    fn event(&self, report: &RefusalReport) -> NewEvent {
        NewEvent::new(Event::RateLimited(RateLimited {
            key_id: self.key_id.clone(),
            limit: report.limit,
            count: report.count,
            retry_after_ms: millis_rounded_up(report.retry_after),
        }))
    }

    /// Forgets finished appends and takes back the reports of failed ones.
    fn collect_appends(&mut self, myself: &ActorRef<KeyMsg>) {
        while let Some(done) = self.appends.try_join_next() {
            if let Err(error) = done {
                tracing::warn!(key_id = %self.key_id, %error, "a rate_limited append task failed");
            }
        }
        let failed = std::mem::take(&mut *self.failed.lock().expect("failed reports lock"));
        if failed.is_empty() {
            return;
        }
        for report in failed {
            self.limit.restore_report(report);
        }
        self.schedule_flush(myself, now());
    }

    /// Sets the flush timer for the pending refusals, unless one fires by then.
    fn schedule_flush(&mut self, myself: &ActorRef<KeyMsg>, now: Instant) {
        let Some(due) = self.limit.report_due_at(now) else {
            return;
        };
        if self.flush_at.is_some_and(|at| at <= due) {
            return;
        }
        self.flush_at = Some(due);
        let timer = myself.send_after(due.saturating_duration_since(now), || KeyMsg::FlushRefusals);
        self.keep_timer(timer);
    }

    fn schedule_idle_check(&mut self, myself: &ActorRef<KeyMsg>) {
        let timer = myself.send_after(self.idle_after, || KeyMsg::CheckIdle);
        self.keep_timer(timer);
    }

    /// Keeps a timer's handle so a stopped actor leaves no timers behind.
    fn keep_timer<T>(&mut self, timer: JoinHandle<T>) {
        self.timers.retain(|t| !t.is_finished());
        self.timers.push(timer.abort_handle());
    }

    /// Waits for the appends in progress, then stores the pending refusals
    /// once their interval is over.
    async fn store_pending(&mut self) {
        while let Some(done) = self.appends.join_next().await {
            if let Err(error) = done {
                tracing::warn!(key_id = %self.key_id, %error, "a rate_limited append task failed");
            }
        }
        for report in std::mem::take(&mut *self.failed.lock().expect("failed reports lock")) {
            self.limit.restore_report(report);
        }
        let Some(due) = self.limit.report_due_at(now()) else {
            return;
        };
        tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        if let Some(report) = self.limit.flush_refusals(now()) {
            let event = self.event(&report);
            let stored = self
                .log
                .append(self.stream.clone(), ExpectedVersion::Any, vec![event])
                .await;
            if let Err(error) = stored {
                tracing::warn!(key_id = %self.key_id, %error, count = report.count,
                    "cannot store rate_limited at shutdown; these refusals go unreported");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use switchboard_events::catalog::Limits;
    use switchboard_events::{Event, EventLog, OpenMode, StreamId};

    use super::{KeyMsg, RateLimiterConfig, RateLimiters};

    /// Admissions of this key panic in its actor, every time.
    pub(super) const PANICS: &str = "key_that_panics";

    fn rpm(rpm: u32) -> Limits {
        Limits {
            rpm: Some(rpm),
            ..Limits::default()
        }
    }

    /// Yields (keeping paused time still) until `done` holds.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let started = std::time::Instant::now();
        while !done() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "still waiting for {what}"
            );
            tokio::task::yield_now().await;
        }
    }

    fn counts(log: &EventLog, key_id: &str) -> Vec<u64> {
        let stream = StreamId::key(key_id).expect("valid key id");
        log.read_stream(&stream, 1)
            .map(|e| match e.expect("decodes").event {
                Event::RateLimited(limited) => limited.count,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_crashed_actor_is_replaced_and_callers_always_get_an_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open");
        let limiters = RateLimiters::new(log, RateLimiterConfig::default());

        let permit = limiters.admit("k1", rpm(10)).await.expect("admitted");
        let actor = limiters.actor_of("k1").expect("spawned");
        actor.cast(KeyMsg::Crash).expect("delivered");
        // Queued behind the crash: dropped unanswered, retried with a fresh actor.
        let again = limiters
            .admit("k1", rpm(10))
            .await
            .expect("a fresh actor answers");
        assert_eq!(
            again.remaining().requests,
            Some(9),
            "the crash lost the window"
        );
        assert_ne!(
            limiters.actor_of("k1").map(|a| a.get_id()),
            Some(actor.get_id())
        );
        // Its actor is gone: finishing frees nothing and does not fail.
        permit.finish(5);
        again.finish(0);

        // An actor that panics on every request: a coded answer, not a hang.
        let error = limiters
            .admit(PANICS, rpm(10))
            .await
            .expect_err("never admitted");
        assert_eq!(error.code(), "unavailable");
        until("the panicked actors to leave the map", || {
            limiters.actor_of(PANICS).is_none()
        })
        .await;
        assert_eq!(limiters.live_count(), 1);
        limiters.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_append_is_retried_at_the_next_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open");
        let limiters = RateLimiters::new(log.clone(), RateLimiterConfig::default());
        let _held = limiters.admit("k1", rpm(1)).await.expect("admitted");
        let actor = limiters.actor_of("k1").expect("spawned");
        actor.cast(KeyMsg::FailAppends(1)).expect("delivered");
        for _ in 0..3 {
            limiters
                .admit("k1", rpm(1))
                .await
                .expect_err("over the limit");
        }
        // The first report (1 refusal) failed; nothing is stored yet.
        assert!(counts(&log, "k1").is_empty());
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        until("the retried report", || !counts(&log, "k1").is_empty()).await;
        assert_eq!(
            counts(&log, "k1"),
            [3],
            "the failed report counted into the next"
        );
        limiters.shutdown().await;
        assert_eq!(counts(&log, "k1"), [3]);
    }
}
