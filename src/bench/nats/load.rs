//! The traffic of `bench nats`: concurrent clients sending requests, the
//! trivial responder of the raw baseline, the durable raw responder (the
//! raw baseline plus a group-committed sled insert and flush), the counter
//! of published replies, and plain sled append+flush.
//!
//! The raw baseline and the service are driven by the same code over the same
//! client connections with the same headers and bodies: only the subject
//! prefix differs (`raw.conv.<id>.send` against `sb.conv.<id>.send`), so the
//! ratio of the two is the cost of the service itself. Both replies are
//! parsed as JSON and checked for `"ok":true`.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::json;
use switchboard::bus::{Bus, Headers, NatsBus};
use tokio::task::{JoinHandle, JoinSet};

use crate::bench::appends::RawSled;
use crate::bench::workload;

/// The subject prefix the raw responder answers under.
pub const RAW_PREFIX: &str = "raw";
/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A user message of typical length (the log bench's is 100 characters).
const CONTENT: &str = "Could you summarise the attached contract and tell me which clauses \
    differ from our standard one?";
/// What the raw responder answers: an ack of the service's shape and size.
const RAW_ACK: &[u8] =
    br#"{"ok":true,"conversation_id":"c-0000000123","message_id":"c64-12-12345","seq":123456}"#;

/// Connects `count` client connections and waits until each reaches the server.
pub async fn connect(url: &str, count: usize) -> anyhow::Result<Vec<Bus>> {
    let mut buses = Vec::with_capacity(count);
    for _ in 0..count {
        let bus = Bus::from(NatsBus::connect(url).await?);
        bus.flush()
            .await
            .with_context(|| format!("a client cannot reach {url}"))?;
        buses.push(bus);
    }
    Ok(buses)
}

/// What one run of concurrent clients did.
#[derive(Default)]
pub struct Driven {
    pub ok: u64,
    pub failed: u64,
    pub first_failure: Option<String>,
    pub seconds: f64,
    /// Of the successful requests, in nanoseconds.
    pub latencies: Vec<u64>,
}

impl Driven {
    /// Adds `other`'s requests to these, as one longer window.
    pub fn absorb(&mut self, other: Driven) {
        self.ok += other.ok;
        self.failed += other.failed;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
        self.seconds += other.seconds;
        self.latencies.extend(other.latencies);
    }
}

/// How long the clients of [`drive`] keep sending.
#[derive(Debug, Clone, Copy)]
pub enum Until {
    /// Until this much time has passed.
    Elapsed(Duration),
    /// Until each client has sent once to each of its conversations, so every
    /// conversation gets exactly one send.
    OnePass,
}

/// What one client request of [`drive`] is: a send, or a read of the
/// conversation's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// `{prefix}.conv.<id>.send` with the typical message.
    Send,
    /// `{prefix}.conv.<id>.history`: its newest [`HISTORY_PAGE`] messages.
    History,
}

/// The messages one history read asks for: a chat view's first page.
pub const HISTORY_PAGE: usize = 20;

/// `clients` tasks, client `i` on connection `i % buses.len()`, each sending
/// one request at a time to `{prefix}.conv.<id>.send` [`Until`] told to stop.
/// Client `i` takes conversations `i`, `i + clients`, ... in turn, so no two
/// clients share a conversation unless there are fewer conversations than
/// clients. Message ids start with `run`, which must differ between runs to
/// the same service (a resent id is a duplicate, answered without append).
pub async fn drive(
    buses: &[Bus],
    prefix: &str,
    key: &str,
    clients: usize,
    conversations: usize,
    until: Until,
    run: &str,
) -> anyhow::Result<Driven> {
    drive_asking(
        buses,
        prefix,
        key,
        clients,
        conversations,
        until,
        run,
        Ask::Send,
    )
    .await
}

/// [`drive`], each request being `ask`.
#[allow(clippy::too_many_arguments)]
pub async fn drive_asking(
    buses: &[Bus],
    prefix: &str,
    key: &str,
    clients: usize,
    conversations: usize,
    until: Until,
    run: &str,
    ask: Ask,
) -> anyhow::Result<Driven> {
    let headers = Headers::new().with("Authorization", format!("Bearer {key}"));
    let started = Instant::now();
    let deadline = match until {
        Until::Elapsed(window) => Some(started + window),
        Until::OnePass => None,
    };
    let mut tasks = JoinSet::new();
    for client in 0..clients {
        let bus = buses[client % buses.len()].clone();
        let (headers, prefix, run) = (headers.clone(), prefix.to_owned(), run.to_owned());
        tasks.spawn(async move {
            let mut driven = Driven {
                ok: 0,
                failed: 0,
                first_failure: None,
                seconds: 0.0,
                latencies: Vec::new(),
            };
            // Slots `client`, `client + clients`, ...; the conversation is
            // the slot modulo their number.
            let mut slot = client;
            let mut sent = 0u64;
            loop {
                let more = match deadline {
                    Some(deadline) => Instant::now() < deadline,
                    None => slot < conversations,
                };
                if !more {
                    break;
                }
                let id = workload::conversation_id((slot % conversations) as u64);
                slot += clients;
                sent += 1;
                let (subject, body) = match ask {
                    Ask::Send => (
                        format!("{prefix}.conv.{id}.send"),
                        json!({ "content": CONTENT, "message_id": format!("{run}-{client}-{sent}") }),
                    ),
                    Ask::History => (
                        format!("{prefix}.conv.{id}.history"),
                        json!({ "latest": true, "limit": HISTORY_PAGE }),
                    ),
                };
                let payload = serde_json::to_vec(&body).expect("a JSON value always serializes");
                let asked = Instant::now();
                let reply = bus
                    .request(&subject, headers.clone(), payload, REQUEST_TIMEOUT)
                    .await;
                let took = asked.elapsed();
                let failure = match reply {
                    Ok(reply) => refusal(&reply.payload, ask),
                    Err(error) => Some(error.to_string()),
                };
                match failure {
                    None => {
                        driven.ok += 1;
                        driven.latencies.push(took.as_nanos() as u64);
                    }
                    Some(why) => {
                        driven.failed += 1;
                        driven.first_failure.get_or_insert(why);
                    }
                }
            }
            driven
        });
    }
    let mut total = Driven {
        ok: 0,
        failed: 0,
        first_failure: None,
        seconds: 0.0,
        latencies: Vec::new(),
    };
    while let Some(joined) = tasks.join_next().await {
        let driven = joined.context("a client panicked")?;
        total.ok += driven.ok;
        total.failed += driven.failed;
        total.first_failure = total.first_failure.or(driven.first_failure);
        total.latencies.extend(driven.latencies);
    }
    total.seconds = started.elapsed().as_secs_f64();
    Ok(total)
}

/// What the bench reads of a reply or a history page: one parse, into no
/// values (the clients share this process's CPU with the service, so what
/// they spend counts against it).
#[derive(Deserialize)]
struct Reply {
    #[serde(default)]
    ok: bool,
    #[serde(default)]
    error: Option<serde_json::Value>,
    #[serde(default)]
    messages: Option<Vec<IgnoredAny>>,
}

impl Reply {
    /// `None` for a history page with messages; otherwise what it was.
    fn empty_page(&self, payload: &[u8]) -> Option<String> {
        match &self.messages {
            Some(messages) if !messages.is_empty() => None,
            _ => Some(format!(
                "a history page without messages: {}",
                String::from_utf8_lossy(payload)
            )),
        }
    }
}

fn parse_reply(payload: &[u8]) -> Result<Reply, String> {
    serde_json::from_slice(payload).map_err(|_| {
        format!(
            "a reply that is not JSON: {}",
            String::from_utf8_lossy(payload)
        )
    })
}

/// `None` for a history page with messages; otherwise what it was. Every
/// conversation read has been sent to, so an empty page is a failure.
pub fn empty_page(payload: &[u8]) -> Option<String> {
    match parse_reply(payload) {
        Ok(page) => page.empty_page(payload),
        Err(why) => Some(why),
    }
}

/// `None` for a reply `{"ok":true,...}` (with messages, for a history
/// page: see [`empty_page`]); otherwise what it said.
fn refusal(payload: &[u8], ask: Ask) -> Option<String> {
    match parse_reply(payload) {
        Ok(reply) if reply.ok => match ask {
            Ask::Send => None,
            Ask::History => reply.empty_page(payload),
        },
        Ok(reply) => Some(reply.error.unwrap_or_default().to_string()),
        Err(why) => Some(why),
    }
}

/// The subject prefix the durable raw responder answers under.
pub const DURABLE_PREFIX: &str = "durable";
/// The most requests the durable raw responder stores under one flush (the
/// log's own bound on a group).
const DURABLE_MAX_GROUP: usize = 4096;

/// A baseline responder, on a connection of its own as the service has, on
/// one queue subscription (as the gateway subscribes); stops when dropped.
///
/// - [`Responder::raw`]: the trivial responder, answering each request with
///   [`RAW_ACK`] as it comes.
/// - [`Responder::durable`]: the least a service that acknowledges only what
///   is on disk must do. It takes every request waiting, inserts a record
///   for each into plain sled, flushes once and answers them all (a group
///   commit, as the log does; one request alone is one insert and one
///   flush), on the runtime's worker thread, as the log's lone appends do.
///   Nothing is published, checked or routed: no events, no keys, no turn.
pub struct Responder {
    task: JoinHandle<()>,
}

impl Responder {
    /// Answers every `raw.conv.*.send`. In place for other connections when
    /// this returns.
    pub async fn raw(url: &str) -> anyhow::Result<Responder> {
        Responder::start(url, RAW_PREFIX, None).await
    }

    /// Answers every `durable.conv.*.send` once `record` is stored for it in
    /// a sled database of its own in `path`. In place for other connections
    /// when this returns.
    pub async fn durable(url: &str, path: &Path, record: Vec<u8>) -> anyhow::Result<Responder> {
        let sled = RawSled::open(path)?;
        Responder::start(url, DURABLE_PREFIX, Some((sled, record))).await
    }

    async fn start(
        url: &str,
        prefix: &str,
        mut store: Option<(RawSled, Vec<u8>)>,
    ) -> anyhow::Result<Responder> {
        let bus = Bus::from(NatsBus::connect(url).await?);
        let mut requests = bus
            .queue_subscribe(&format!("{prefix}.conv.*.send"), prefix)
            .await?;
        bus.flush()
            .await
            .with_context(|| format!("the {prefix} responder cannot reach NATS"))?;
        let ack = Bytes::from_static(RAW_ACK);
        let task = tokio::spawn(async move {
            let mut group = Vec::new();
            while let Some(first) = requests.recv().await {
                group.push(first);
                if let Some((sled, record)) = &mut store {
                    while group.len() < DURABLE_MAX_GROUP {
                        match futures::FutureExt::now_or_never(requests.recv()) {
                            Some(Some(more)) => group.push(more),
                            _ => break,
                        }
                    }
                    let stored = tokio::task::block_in_place(|| sled.store(group.len(), record));
                    if let Err(error) = stored {
                        tracing::warn!(%error, "the durable responder could not store; its requests go unanswered");
                        group.clear();
                        continue;
                    }
                }
                for request in group.drain(..) {
                    let headers = Headers::new().with("Content-Type", "application/json");
                    if let Err(error) = bus.respond(&request, headers, ack.clone()).await {
                        tracing::warn!(%error, "a baseline responder could not answer");
                    }
                }
            }
        });
        Ok(Responder { task })
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Counts the `reply_completed` events the outbox publishes, on a connection
/// of its own; stops when dropped.
pub struct ReplyCounter {
    bus: Bus,
    seen: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl ReplyCounter {
    pub async fn start(url: &str, prefix: &str) -> anyhow::Result<ReplyCounter> {
        let bus = Bus::from(NatsBus::connect(url).await?);
        let mut replies = bus
            .subscribe(&format!("{prefix}.evt.conv.*.reply_completed"))
            .await?;
        bus.flush()
            .await
            .context("the reply counter cannot reach NATS")?;
        let seen = Arc::new(AtomicU64::new(0));
        let counted = seen.clone();
        let task = tokio::spawn(async move {
            while replies.recv().await.is_some() {
                counted.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(ReplyCounter { bus, seen, task })
    }

    /// Replies seen so far.
    pub fn seen(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }

    /// Replies this connection dropped because it fell behind (then the
    /// replies/s figure is low).
    pub fn dropped(&self) -> u64 {
        self.bus.dropped_messages()
    }

    /// Waits until `count` replies were seen, or `timeout` passed; returns
    /// how long it waited and whether they all came.
    pub async fn wait_for(&self, count: u64, timeout: Duration) -> (Duration, bool) {
        let started = Instant::now();
        while self.seen() < count {
            if started.elapsed() >= timeout {
                return (started.elapsed(), false);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (started.elapsed(), true)
    }
}

impl Drop for ReplyCounter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Plain sled, one record per `insert` + `flush`, for `window`: the floor
/// under a durable append of one message. Same configuration as the log
/// (sled's defaults) in a fresh dir; the record is the log bench's.
pub fn raw_flushes(path: &Path, record: &[u8], window: Duration) -> anyhow::Result<Driven> {
    let mut sled = RawSled::open(path)?;
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed() < window {
        let asked = Instant::now();
        sled.store(1, record)?;
        latencies.push(asked.elapsed().as_nanos() as u64);
    }
    let seq = latencies.len() as u64;
    Ok(Driven {
        ok: seq,
        failed: 0,
        first_failure: None,
        seconds: started.elapsed().as_secs_f64(),
        latencies,
    })
}

/// Percentiles of one set of latencies, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
}

impl Percentiles {
    /// Of latencies in nanoseconds (sorts them); all zero when empty.
    pub fn of(latencies: &mut [u64]) -> Percentiles {
        latencies.sort_unstable();
        let at = |share: f64| {
            if latencies.is_empty() {
                return 0.0;
            }
            // The nearest-rank percentile: the smallest value with at least
            // `share` of the values at or below it.
            let rank = (share * latencies.len() as f64).ceil() as usize;
            latencies[rank.clamp(1, latencies.len()) - 1] as f64 / 1e6
        };
        Percentiles {
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut latencies: Vec<u64> = (1..=1000).rev().map(|ms| ms * 1_000_000).collect();
        let p = Percentiles::of(&mut latencies);
        assert_eq!((p.p50_ms, p.p99_ms, p.p999_ms), (500.0, 990.0, 999.0));
        let empty = Percentiles::of(&mut []);
        assert_eq!(empty.p50_ms, 0.0);
    }

    #[test]
    fn only_ok_replies_count_as_acks() {
        assert_eq!(refusal(RAW_ACK, Ask::Send), None);
        let refused = br#"{"ok":false,"error":{"code":"unauthorized"}}"#;
        assert!(refusal(refused, Ask::Send)
            .unwrap()
            .contains("unauthorized"));
        assert!(refusal(b"nope", Ask::Send).is_some());
        let page = br#"{"ok":true,"messages":[{"role":"user","content":"hi"}],"has_more":false}"#;
        assert_eq!(refusal(page, Ask::History), None);
        assert_eq!(empty_page(page), None);
        let empty = br#"{"ok":true,"messages":[],"has_more":false}"#;
        assert!(refusal(empty, Ask::History).is_some());
        assert!(empty_page(empty).is_some());
        assert!(refusal(br#"{"ok":true}"#, Ask::History).is_some());
    }
}
