//! Registration with the NATS service API (DESIGN §6): switchboard answers
//! `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS` the way services built with the
//! NATS clients' `micro`/`service` packages do (ADR-32), so `nats micro ls`,
//! `nats micro info switchboard` and `nats micro stats switchboard` see it.
//!
//! The protocol is three verbs, each on three subjects:
//! `$SRV.<VERB>` (every service), `$SRV.<VERB>.<name>` (every instance of a
//! service) and `$SRV.<VERB>.<name>.<id>` (one instance). They are plain
//! subscriptions, not queue groups, so every instance answers a discovery
//! request and the caller collects the replies.
//!
//! This module only answers those verbs; it does not receive the endpoints'
//! own requests. Whoever does (the gateway) holds each [`Endpoint`]'s
//! [`EndpointStats`] and calls [`EndpointStats::record`] once per request it
//! answers. It is written against [`Bus`], so it works the same on the
//! embedded bus and on NATS.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use switchboard::bus::{Bus, Headers, LocalBus};
//! use switchboard::service::{register, Endpoint, ServiceInfo};
//!
//! let bus = Bus::from(LocalBus::new());
//! let send = Endpoint::new("send", "sb.conv.*.send", "switchboard");
//! let stats = send.stats.clone();
//! let service = register(bus.clone(), ServiceInfo::new("switchboard", "0.1.0"), vec![send]).await?;
//!
//! stats.record(Duration::from_millis(3), None);
//! let reply = bus
//!     .request("$SRV.STATS.switchboard", Headers::new(), "", Duration::from_secs(5))
//!     .await?;
//! let reply: serde_json::Value = serde_json::from_slice(&reply.payload)?;
//! assert_eq!(reply["endpoints"][0]["num_requests"], 1);
//! service.stop().await?;
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use futures::stream::{SelectAll, StreamExt};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::bus::subject::{self, SubjectError};
use crate::bus::{Bus, BusError, Headers, Message, Subscription};

/// The root of the control subjects.
const API_PREFIX: &str = "$SRV";
const PING_RESPONSE: &str = "io.nats.micro.v1.ping_response";
const INFO_RESPONSE: &str = "io.nats.micro.v1.info_response";
const STATS_RESPONSE: &str = "io.nats.micro.v1.stats_response";

/// The verbs answered, as they appear in the control subjects.
const VERBS: [&str; 3] = ["PING", "INFO", "STATS"];

/// Why a service could not be registered. Each kind has a stable
/// [`code`](Self::code).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The service name is not `[A-Za-z0-9_-]+`; it is a subject token and
    /// discovery tools match on it.
    #[error("invalid service name {name:?}: only A-Z, a-z, 0-9, '-' and '_' are allowed")]
    InvalidName {
        /// The refused name.
        name: String,
    },
    /// The version is not a semantic version (`1.2.3`, `1.2.3-rc.1+build`).
    #[error("invalid service version {version:?}: not a semantic version")]
    InvalidVersion {
        /// The refused version.
        version: String,
    },
    /// An endpoint name is not `[A-Za-z0-9_-]+`.
    #[error("invalid endpoint name {name:?}: only A-Z, a-z, 0-9, '-' and '_' are allowed")]
    InvalidEndpointName {
        /// The refused name.
        name: String,
    },
    /// An endpoint's subject is not a valid subscription pattern.
    #[error("invalid subject {subject:?} of endpoint {endpoint:?}: {source}")]
    InvalidEndpointSubject {
        /// The endpoint's name.
        endpoint: String,
        /// The refused subject.
        subject: String,
        /// What is wrong with it.
        #[source]
        source: SubjectError,
    },
    /// An endpoint's queue group is not a valid queue group name.
    #[error("invalid queue group {group:?} of endpoint {endpoint:?}: {source}")]
    InvalidQueueGroup {
        /// The endpoint's name.
        endpoint: String,
        /// The refused queue group.
        group: String,
        /// What is wrong with it.
        #[source]
        source: SubjectError,
    },
    /// Subscribing, flushing or unsubscribing on the bus failed.
    #[error(transparent)]
    Bus(#[from] BusError),
}

impl ServiceError {
    /// A stable machine-readable code for the kind of error.
    pub fn code(&self) -> &'static str {
        match self {
            ServiceError::InvalidName { .. } => "invalid_service_name",
            ServiceError::InvalidVersion { .. } => "invalid_service_version",
            ServiceError::InvalidEndpointName { .. } => "invalid_endpoint_name",
            ServiceError::InvalidEndpointSubject { .. } => "invalid_endpoint_subject",
            ServiceError::InvalidQueueGroup { .. } => "invalid_queue_group",
            ServiceError::Bus(error) => error.code(),
        }
    }
}

/// What the service says about itself in every reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    /// The kind of service, shared by all its instances: `[A-Za-z0-9_-]+`.
    pub name: String,
    /// A semantic version (`0.1.0`).
    pub version: String,
    /// Free text for humans (INFO).
    pub description: String,
    /// Free key/value annotations (all verbs).
    pub metadata: BTreeMap<String, String>,
}

impl ServiceInfo {
    /// A service with no description and no metadata.
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> ServiceInfo {
        ServiceInfo {
            name: name.into(),
            version: version.into(),
            description: String::new(),
            metadata: BTreeMap::new(),
        }
    }
}

/// One request subject the service handles, as INFO and STATS report it.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// A short name: `[A-Za-z0-9_-]+`.
    pub name: String,
    /// The subject or pattern the handler subscribes to (`sb.conv.*.send`).
    pub subject: String,
    /// The queue group the handler subscribes in.
    pub queue_group: String,
    /// Free key/value annotations (INFO).
    pub metadata: BTreeMap<String, String>,
    /// Shared with the handler, which records each request here.
    pub stats: Arc<EndpointStats>,
}

impl Endpoint {
    /// An endpoint with fresh statistics and no metadata.
    pub fn new(
        name: impl Into<String>,
        subject: impl Into<String>,
        queue_group: impl Into<String>,
    ) -> Endpoint {
        Endpoint {
            name: name.into(),
            subject: subject.into(),
            queue_group: queue_group.into(),
            metadata: BTreeMap::new(),
            stats: Arc::new(EndpointStats::default()),
        }
    }
}

/// Request counters of one endpoint. Cheap to update from many tasks at once:
/// the counters are atomics, and only an error takes a lock.
#[derive(Debug, Default)]
pub struct EndpointStats {
    requests: AtomicU64,
    errors: AtomicU64,
    /// Total processing time, in nanoseconds.
    processing_nanos: AtomicU64,
    last_error: Mutex<String>,
}

impl EndpointStats {
    /// Counts one answered request that took `elapsed`. `error` is set when
    /// the answer was an error; it becomes `last_error` (other NATS clients
    /// write `"<code>:<description>"` there). A later success does not clear
    /// it.
    pub fn record(&self, elapsed: Duration, error: Option<&str>) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        // Saturates instead of wrapping: a total never runs backwards.
        let _ = self
            .processing_nanos
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |total| {
                Some(total.saturating_add(nanos))
            });
        if let Some(error) = error {
            self.errors.fetch_add(1, Ordering::Relaxed);
            *lock(&self.last_error) = error.to_string();
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now. Each is read on its own, so while requests are
    /// being recorded they may be a request apart from each other.
    pub fn snapshot(&self) -> StatsSnapshot {
        let requests = self.requests.load(Ordering::Relaxed);
        let errors = self.errors.load(Ordering::Relaxed);
        let processing_nanos = self.processing_nanos.load(Ordering::Relaxed);
        let average_nanos = processing_nanos.checked_div(requests).unwrap_or(0);
        StatsSnapshot {
            requests,
            errors,
            processing_time: Duration::from_nanos(processing_nanos),
            average_processing_time: Duration::from_nanos(average_nanos),
            last_error: lock(&self.last_error).clone(),
        }
    }
}

/// [`EndpointStats`] at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Requests answered.
    pub requests: u64,
    /// Of those, answered with an error.
    pub errors: u64,
    /// Total time spent on them.
    pub processing_time: Duration,
    /// `processing_time / requests` (zero before the first request).
    pub average_processing_time: Duration,
    /// The last error recorded; empty when there was none.
    pub last_error: String,
}

/// A registered service instance. [`stop`](Self::stop) ends it cleanly;
/// dropping the handle ends it too, unsubscribing in the background.
///
/// Either way, a request that reached the instance but was not answered yet
/// is dropped unanswered (the bus discards what an unsubscribed
/// subscription had buffered); discovery clients wait for replies with a
/// timeout, so they just miss this instance, which is leaving anyway.
#[derive(Debug)]
pub struct ServiceHandle {
    id: String,
    stop: Option<oneshot::Sender<()>>,
    responder: JoinHandle<Result<(), BusError>>,
}

impl ServiceHandle {
    /// This instance's id, the last token of its `$SRV.<VERB>.<name>.<id>`
    /// subjects.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Stops answering: unsubscribes from the control subjects and returns
    /// once the bus has processed that (on NATS, a round trip to the server).
    pub async fn stop(mut self) -> Result<(), ServiceError> {
        if let Some(stop) = self.stop.take() {
            // An error means the responder already ended on its own.
            let _ = stop.send(());
        }
        match (&mut self.responder).await {
            Ok(outcome) => Ok(outcome?),
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // Cancelled: the runtime is shutting down, nothing left to stop.
            Err(_) => Ok(()),
        }
    }
}

/// Registers a service instance on `bus` and answers its PING, INFO and
/// STATS requests until the returned handle is stopped or dropped.
///
/// Returns once the subscriptions are in place on the server (the bus is
/// flushed), so a discovery request made afterwards from any connection
/// finds the instance. The instance gets a fresh random id.
pub async fn register(
    bus: Bus,
    info: ServiceInfo,
    endpoints: Vec<Endpoint>,
) -> Result<ServiceHandle, ServiceError> {
    validate(&info, &endpoints)?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let replies = Replies::new(info, id.clone(), endpoints, Utc::now());

    let mut requests = SelectAll::new();
    for verb in VERBS {
        for subject in control_subjects(verb, &replies.info.name, &id) {
            requests.push(bus.subscribe(&subject).await?);
        }
    }
    bus.flush().await?;

    let (stop, stopped) = oneshot::channel();
    let responder = tokio::spawn(answer(bus, replies, requests, stopped));
    Ok(ServiceHandle {
        id,
        stop: Some(stop),
        responder,
    })
}

/// `$SRV.<verb>`, `$SRV.<verb>.<name>`, `$SRV.<verb>.<name>.<id>`.
fn control_subjects(verb: &str, name: &str, id: &str) -> [String; 3] {
    [
        format!("{API_PREFIX}.{verb}"),
        format!("{API_PREFIX}.{verb}.{name}"),
        format!("{API_PREFIX}.{verb}.{name}.{id}"),
    ]
}

/// The responder: one task answering all nine subscriptions in turn (control
/// requests are rare, so there is nothing to gain from answering in
/// parallel). On stop it unsubscribes and flushes, so that once
/// [`ServiceHandle::stop`] returns no request reaches this instance.
async fn answer(
    bus: Bus,
    replies: Replies,
    mut requests: SelectAll<Subscription>,
    mut stopped: oneshot::Receiver<()>,
) -> Result<(), BusError> {
    loop {
        tokio::select! {
            // Sent by `stop`, or the handle was dropped.
            _ = &mut stopped => break,
            request = requests.next() => match request {
                Some(request) => replies.answer(&bus, &request).await,
                // Every subscription ended: the NATS client was closed.
                None => return Ok(()),
            },
        }
    }
    let mut outcome = Ok(());
    for subscription in requests {
        // Bounded: with NATS away and the client's queue full, the command
        // would wait for the server, and a stop must not.
        match tokio::time::timeout(STOP_WAIT, subscription.unsubscribe()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => outcome = outcome.and(Err(error)),
            Err(_) => {
                tracing::warn!("unsubscribing the service API timed out");
                return outcome;
            }
        }
    }
    outcome?;
    bus.flush().await
}

/// The longest a stop waits for one unsubscribe.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// What the instance answers. PING and INFO never change, so they are
/// encoded once; STATS is encoded per request.
struct Replies {
    info: ServiceInfo,
    id: String,
    started: String,
    endpoints: Vec<Endpoint>,
    ping: Bytes,
    info_reply: Bytes,
}

impl Replies {
    fn new(
        info: ServiceInfo,
        id: String,
        endpoints: Vec<Endpoint>,
        started: DateTime<Utc>,
    ) -> Self {
        let ping = encode(&PingResponse {
            kind: PING_RESPONSE,
            identity: Identity::of(&info, &id),
        });
        let info_reply = encode(&InfoResponse {
            kind: INFO_RESPONSE,
            identity: Identity::of(&info, &id),
            description: &info.description,
            endpoints: endpoints
                .iter()
                .map(|endpoint| EndpointInfo {
                    name: &endpoint.name,
                    subject: &endpoint.subject,
                    queue_group: &endpoint.queue_group,
                    metadata: &endpoint.metadata,
                })
                .collect(),
        });
        Replies {
            started: started.to_rfc3339_opts(SecondsFormat::Nanos, true),
            info,
            id,
            endpoints,
            ping,
            info_reply,
        }
    }

    /// The reply to a request on one of the control subjects.
    fn reply(&self, subject: &str) -> Option<Bytes> {
        match subject.split('.').nth(1)? {
            "PING" => Some(self.ping.clone()),
            "INFO" => Some(self.info_reply.clone()),
            "STATS" => Some(self.stats()),
            _ => None,
        }
    }

    fn stats(&self) -> Bytes {
        let endpoints = self
            .endpoints
            .iter()
            .map(|endpoint| {
                let stats = endpoint.stats.snapshot();
                EndpointStatsReply {
                    name: &endpoint.name,
                    subject: &endpoint.subject,
                    queue_group: &endpoint.queue_group,
                    num_requests: wire_integer(stats.requests),
                    num_errors: wire_integer(stats.errors),
                    processing_time: wire_nanos(stats.processing_time),
                    average_processing_time: wire_nanos(stats.average_processing_time),
                    last_error: stats.last_error,
                }
            })
            .collect();
        encode(&StatsResponse {
            kind: STATS_RESPONSE,
            identity: Identity::of(&self.info, &self.id),
            started: &self.started,
            endpoints,
        })
    }

    async fn answer(&self, bus: &Bus, request: &Message) {
        if request.reply.is_none() {
            tracing::debug!(subject = %request.subject, "service API request without a reply subject");
            return;
        }
        let Some(reply) = self.reply(&request.subject) else {
            return;
        };
        if let Err(error) = bus.respond(request, Headers::new(), reply).await {
            tracing::warn!(subject = %request.subject, %error, "could not answer a service API request");
        }
    }
}

/// The fields every reply starts with.
#[derive(Serialize)]
struct Identity<'a> {
    name: &'a str,
    id: &'a str,
    version: &'a str,
    metadata: &'a BTreeMap<String, String>,
}

impl<'a> Identity<'a> {
    fn of(info: &'a ServiceInfo, id: &'a str) -> Identity<'a> {
        Identity {
            name: &info.name,
            id,
            version: &info.version,
            metadata: &info.metadata,
        }
    }
}

#[derive(Serialize)]
struct PingResponse<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    identity: Identity<'a>,
}

#[derive(Serialize)]
struct InfoResponse<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    identity: Identity<'a>,
    description: &'a str,
    endpoints: Vec<EndpointInfo<'a>>,
}

#[derive(Serialize)]
struct EndpointInfo<'a> {
    name: &'a str,
    subject: &'a str,
    queue_group: &'a str,
    metadata: &'a BTreeMap<String, String>,
}

#[derive(Serialize)]
struct StatsResponse<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    identity: Identity<'a>,
    /// RFC 3339, UTC.
    started: &'a str,
    endpoints: Vec<EndpointStatsReply<'a>>,
}

#[derive(Serialize)]
struct EndpointStatsReply<'a> {
    name: &'a str,
    subject: &'a str,
    queue_group: &'a str,
    num_requests: i64,
    num_errors: i64,
    /// Nanoseconds.
    processing_time: i64,
    /// Nanoseconds.
    average_processing_time: i64,
    last_error: String,
}

fn encode(reply: &impl Serialize) -> Bytes {
    serde_json::to_vec(reply)
        .expect("service API replies are strings, string maps and integers, which always encode")
        .into()
}

/// The schemas type counts and durations as signed 64-bit integers (Go's
/// `int` and `time.Duration`); saturate rather than overflow them.
fn wire_integer(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn wire_nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

fn validate(info: &ServiceInfo, endpoints: &[Endpoint]) -> Result<(), ServiceError> {
    if !is_name(&info.name) {
        return Err(ServiceError::InvalidName {
            name: info.name.clone(),
        });
    }
    if !is_semver(&info.version) {
        return Err(ServiceError::InvalidVersion {
            version: info.version.clone(),
        });
    }
    for endpoint in endpoints {
        if !is_name(&endpoint.name) {
            return Err(ServiceError::InvalidEndpointName {
                name: endpoint.name.clone(),
            });
        }
        subject::validate_pattern(&endpoint.subject).map_err(|source| {
            ServiceError::InvalidEndpointSubject {
                endpoint: endpoint.name.clone(),
                subject: endpoint.subject.clone(),
                source,
            }
        })?;
        subject::validate_queue_group(&endpoint.queue_group).map_err(|source| {
            ServiceError::InvalidQueueGroup {
                endpoint: endpoint.name.clone(),
                group: endpoint.queue_group.clone(),
                source,
            }
        })?;
    }
    Ok(())
}

/// `[A-Za-z0-9_-]+`, the names ADR-32 allows for services and endpoints.
fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
}

/// Semantic Versioning 2.0.0, as the regular expression semver.org suggests
/// and the NATS clients use: `MAJOR.MINOR.PATCH`, numbers without leading
/// zeros, then an optional `-pre.release` and an optional `+build.metadata`.
fn is_semver(version: &str) -> bool {
    let (rest, build) = match version.split_once('+') {
        Some((rest, build)) => (rest, Some(build)),
        None => (version, None),
    };
    let (core, pre_release) = match rest.split_once('-') {
        Some((core, pre_release)) => (core, Some(pre_release)),
        None => (rest, None),
    };
    let mut numbers = core.split('.');
    let core_ok = (0..3).all(|_| numbers.next().is_some_and(is_number)) && numbers.next().is_none();
    let pre_release_ok = pre_release.is_none_or(|pre_release| {
        pre_release.split('.').all(|identifier| {
            is_identifier(identifier)
                && (!identifier.bytes().all(|byte| byte.is_ascii_digit()) || is_number(identifier))
        })
    });
    let build_ok = build.is_none_or(|build| build.split('.').all(is_identifier));
    core_ok && pre_release_ok && build_ok
}

/// `0|[1-9][0-9]*`.
fn is_number(text: &str) -> bool {
    !text.is_empty()
        && text.bytes().all(|byte| byte.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'))
}

/// `[0-9A-Za-z-]+`.
fn is_identifier(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
}

/// The last error, even if a thread panicked while holding the lock: it is
/// only ever replaced whole.
fn lock(last_error: &Mutex<String>) -> std::sync::MutexGuard<'_, String> {
    last_error
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn decode(bytes: &Bytes) -> Value {
        serde_json::from_slice(bytes).expect("replies are JSON")
    }

    fn sample() -> Replies {
        let mut info = ServiceInfo::new("switchboard", "1.2.3-rc.1");
        info.description = "chat backbone".to_string();
        info.metadata.insert("region".to_string(), "eu".to_string());
        let mut send = Endpoint::new("send", "sb.conv.*.send", "switchboard");
        send.metadata
            .insert("kind".to_string(), "write".to_string());
        let history = Endpoint::new("history", "sb.conv.*.history", "switchboard");
        let started = DateTime::parse_from_rfc3339("2024-05-06T07:08:09.123456789Z")
            .expect("valid timestamp")
            .with_timezone(&Utc);
        Replies::new(info, "abc123".to_string(), vec![send, history], started)
    }

    #[test]
    fn names() {
        for good in ["switchboard", "a", "A-b_9", "-", "_"] {
            assert!(is_name(good), "{good:?}");
        }
        for bad in ["", "a.b", "a b", "a*", "a>", "ä", "$SRV", "a/b"] {
            assert!(!is_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn semantic_versions() {
        let good = [
            "0.0.0",
            "0.1.0",
            "1.2.3",
            "10.20.30",
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-0.3.7",
            "1.0.0-x.7.z.92",
            "1.0.0-x-y-z.--",
            "1.0.0-alpha+001",
            "1.0.0+20130313144700",
            "1.0.0-beta+exp.sha.5114f85",
            "1.0.0+21AF26D3----117B344092BD",
            "1.0.0-0A.is.legal",
        ];
        for version in good {
            assert!(is_semver(version), "{version:?} is semver");
        }
        let bad = [
            "",
            "1",
            "1.2",
            "1.2.3.4",
            "01.2.3",
            "1.02.3",
            "1.2.03",
            "v1.2.3",
            "1.2.3-",
            "1.2.3+",
            "1.2.3-01",
            "1.2.3-a..b",
            "1.2.3+a..b",
            "1.2.3-a_b",
            "1.2.3+a+b",
            "1.2.-3",
            "-1.2.3",
            "1.2.3 ",
            "a.b.c",
        ];
        for version in bad {
            assert!(!is_semver(version), "{version:?} is not semver");
        }
    }

    #[test]
    fn validation_errors_have_codes() {
        let endpoint = || Endpoint::new("send", "sb.conv.*.send", "switchboard");
        let check = |info: ServiceInfo, endpoints: Vec<Endpoint>| {
            validate(&info, &endpoints).map_err(|error| error.code())
        };
        assert_eq!(
            check(ServiceInfo::new("sb", "0.1.0"), vec![endpoint()]),
            Ok(())
        );
        assert_eq!(
            check(ServiceInfo::new("s.b", "0.1.0"), vec![]),
            Err("invalid_service_name")
        );
        assert_eq!(
            check(ServiceInfo::new("sb", "0.1"), vec![]),
            Err("invalid_service_version")
        );
        let mut bad = endpoint();
        bad.name = "conv.send".to_string();
        assert_eq!(
            check(ServiceInfo::new("sb", "0.1.0"), vec![bad]),
            Err("invalid_endpoint_name")
        );
        let mut bad = endpoint();
        bad.subject = "sb..send".to_string();
        assert_eq!(
            check(ServiceInfo::new("sb", "0.1.0"), vec![bad]),
            Err("invalid_endpoint_subject")
        );
        let mut bad = endpoint();
        bad.queue_group = String::new();
        assert_eq!(
            check(ServiceInfo::new("sb", "0.1.0"), vec![bad]),
            Err("invalid_queue_group")
        );
    }

    #[test]
    fn control_subjects_per_verb() {
        assert_eq!(
            control_subjects("PING", "switchboard", "abc"),
            [
                "$SRV.PING".to_string(),
                "$SRV.PING.switchboard".to_string(),
                "$SRV.PING.switchboard.abc".to_string(),
            ]
        );
        for verb in VERBS {
            for subject in control_subjects(verb, "switchboard", "abc") {
                assert_eq!(subject::validate_subject(&subject), Ok(()), "{subject}");
            }
        }
    }

    #[test]
    fn ping_shape() {
        let replies = sample();
        assert_eq!(
            decode(&replies.reply("$SRV.PING").expect("a reply")),
            json!({
                "type": "io.nats.micro.v1.ping_response",
                "name": "switchboard",
                "id": "abc123",
                "version": "1.2.3-rc.1",
                "metadata": {"region": "eu"},
            })
        );
    }

    #[test]
    fn info_shape() {
        let replies = sample();
        assert_eq!(
            decode(&replies.reply("$SRV.INFO.switchboard").expect("a reply")),
            json!({
                "type": "io.nats.micro.v1.info_response",
                "name": "switchboard",
                "id": "abc123",
                "version": "1.2.3-rc.1",
                "metadata": {"region": "eu"},
                "description": "chat backbone",
                "endpoints": [
                    {
                        "name": "send",
                        "subject": "sb.conv.*.send",
                        "queue_group": "switchboard",
                        "metadata": {"kind": "write"},
                    },
                    {
                        "name": "history",
                        "subject": "sb.conv.*.history",
                        "queue_group": "switchboard",
                        "metadata": {},
                    },
                ],
            })
        );
    }

    #[test]
    fn stats_shape() {
        let replies = sample();
        let send = &replies.endpoints[0].stats;
        send.record(Duration::from_millis(10), None);
        send.record(
            Duration::from_millis(30),
            Some("rate_limited:too many requests"),
        );
        send.record(Duration::from_millis(20), None);
        assert_eq!(
            decode(
                &replies
                    .reply("$SRV.STATS.switchboard.abc123")
                    .expect("a reply")
            ),
            json!({
                "type": "io.nats.micro.v1.stats_response",
                "name": "switchboard",
                "id": "abc123",
                "version": "1.2.3-rc.1",
                "metadata": {"region": "eu"},
                "started": "2024-05-06T07:08:09.123456789Z",
                "endpoints": [
                    {
                        "name": "send",
                        "subject": "sb.conv.*.send",
                        "queue_group": "switchboard",
                        "num_requests": 3,
                        "num_errors": 1,
                        "processing_time": 60_000_000,
                        "average_processing_time": 20_000_000,
                        "last_error": "rate_limited:too many requests",
                    },
                    {
                        "name": "history",
                        "subject": "sb.conv.*.history",
                        "queue_group": "switchboard",
                        "num_requests": 0,
                        "num_errors": 0,
                        "processing_time": 0,
                        "average_processing_time": 0,
                        "last_error": "",
                    },
                ],
            })
        );
    }

    #[test]
    fn only_the_three_verbs_are_answered() {
        let replies = sample();
        assert!(replies.reply("$SRV.SCHEMA").is_none());
        assert!(replies.reply("$SRV").is_none());
    }

    #[test]
    fn snapshots_average_and_keep_the_last_error() {
        let stats = EndpointStats::default();
        assert_eq!(
            stats.snapshot(),
            StatsSnapshot {
                requests: 0,
                errors: 0,
                processing_time: Duration::ZERO,
                average_processing_time: Duration::ZERO,
                last_error: String::new(),
            }
        );
        stats.record(Duration::from_nanos(5), Some("first"));
        stats.record(Duration::from_nanos(3), Some("second"));
        stats.record(Duration::from_nanos(1), None);
        assert_eq!(
            stats.snapshot(),
            StatsSnapshot {
                requests: 3,
                errors: 2,
                processing_time: Duration::from_nanos(9),
                average_processing_time: Duration::from_nanos(3),
                last_error: "second".to_string(),
            }
        );
    }

    #[test]
    fn huge_values_saturate_on_the_wire() {
        assert_eq!(wire_integer(u64::MAX), i64::MAX);
        assert_eq!(wire_nanos(Duration::MAX), i64::MAX);
        let stats = EndpointStats::default();
        stats.record(Duration::MAX, None);
        stats.record(Duration::MAX, None);
        assert_eq!(
            stats.snapshot().processing_time,
            Duration::from_nanos(u64::MAX)
        );
    }
}
