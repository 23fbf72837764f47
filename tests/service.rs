//! The NATS service API (DESIGN §6, ADR-32): a registered instance answers
//! `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS` on all three subject forms,
//! every instance answers, and other services' subjects get nothing from it.
//! Each scenario runs on the embedded bus (`local_bus::*`) and on a real
//! `nats-server` (`nats_bus::*`); `a_nats_client_reads_the_replies` checks
//! the replies the way another NATS client would read them.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use support::nats::NatsServer;
use switchboard::bus::{
    Bus, BusError, Headers, LocalBus, NatsBus, Subscription, SERVICE_INBOX_PREFIX,
};
use switchboard::service::{register, Endpoint, ServiceHandle, ServiceInfo};

/// No step should come near this; it only keeps a broken run from hanging.
const WAIT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug)]
enum Transport {
    Local,
    Nats,
}

/// One embedded bus, or one `nats-server`, per test.
struct Fixture {
    local: LocalBus,
    server: Option<NatsServer>,
}

impl Fixture {
    fn start(transport: Transport) -> Fixture {
        Fixture {
            local: LocalBus::new(),
            server: match transport {
                Transport::Local => None,
                Transport::Nats => Some(NatsServer::start()),
            },
        }
    }

    /// Another handle on the bus: a clone of the embedded bus, or a separate
    /// NATS connection (as another process would have).
    async fn bus(&self) -> Bus {
        let Some(server) = &self.server else {
            return Bus::from(self.local.clone());
        };
        let bus = NatsBus::connect(&server.url())
            .await
            .unwrap_or_else(|error| panic!("connect to {}: {error}", server.url()));
        within("the connection", async {
            while !bus.is_connected() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        Bus::from(bus)
    }
}

async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
}

fn info() -> ServiceInfo {
    let mut info = ServiceInfo::new("switchboard", "0.1.0-test.1");
    info.description = "event-sourced chat backbone".to_string();
    info.metadata
        .insert("instance".to_string(), "test".to_string());
    info
}

/// The gateway's two endpoints, as it would register them.
fn endpoints() -> Vec<Endpoint> {
    let mut send = Endpoint::new("send", "sb.conv.*.send", "switchboard");
    send.metadata
        .insert("body".to_string(), "json or postcard".to_string());
    let history = Endpoint::new("history", "sb.conv.*.history", "switchboard");
    vec![send, history]
}

async fn start_service(bus: &Bus, endpoints: Vec<Endpoint>) -> ServiceHandle {
    register(bus.clone(), info(), endpoints)
        .await
        .unwrap_or_else(|error| panic!("register: {error}"))
}

/// The first reply to a request on `subject`, as JSON.
async fn ask(bus: &Bus, subject: &str) -> Value {
    let reply = bus
        .request(subject, Headers::new(), "", WAIT)
        .await
        .unwrap_or_else(|error| panic!("request on {subject}: {error}"));
    serde_json::from_slice(&reply.payload)
        .unwrap_or_else(|error| panic!("reply on {subject} is not JSON: {error}"))
}

async fn ping_answers_on_all_three_subjects(transport: Transport) {
    let fixture = Fixture::start(transport);
    let service_bus = fixture.bus().await;
    let client = fixture.bus().await;
    let service = start_service(&service_bus, endpoints()).await;
    let id = service.id().to_string();
    assert!(!id.is_empty());

    for subject in [
        "$SRV.PING".to_string(),
        "$SRV.PING.switchboard".to_string(),
        format!("$SRV.PING.switchboard.{id}"),
    ] {
        assert_eq!(
            ask(&client, &subject).await,
            json!({
                "type": "io.nats.micro.v1.ping_response",
                "name": "switchboard",
                "id": id,
                "version": "0.1.0-test.1",
                "metadata": {"instance": "test"},
            }),
            "PING on {subject}"
        );
    }
    service.stop().await.expect("stop");
}

async fn info_lists_the_endpoints(transport: Transport) {
    let fixture = Fixture::start(transport);
    let service_bus = fixture.bus().await;
    let client = fixture.bus().await;
    let service = start_service(&service_bus, endpoints()).await;
    let id = service.id().to_string();

    let expected = json!({
        "type": "io.nats.micro.v1.info_response",
        "name": "switchboard",
        "id": id,
        "version": "0.1.0-test.1",
        "metadata": {"instance": "test"},
        "description": "event-sourced chat backbone",
        "endpoints": [
            {
                "name": "send",
                "subject": "sb.conv.*.send",
                "queue_group": "switchboard",
                "metadata": {"body": "json or postcard"},
            },
            {
                "name": "history",
                "subject": "sb.conv.*.history",
                "queue_group": "switchboard",
                "metadata": {},
            },
        ],
    });
    for subject in [
        "$SRV.INFO".to_string(),
        "$SRV.INFO.switchboard".to_string(),
        format!("$SRV.INFO.switchboard.{id}"),
    ] {
        assert_eq!(ask(&client, &subject).await, expected, "INFO on {subject}");
    }
    service.stop().await.expect("stop");
}

async fn stats_reflect_recorded_requests(transport: Transport) {
    let fixture = Fixture::start(transport);
    let service_bus = fixture.bus().await;
    let client = fixture.bus().await;
    let endpoints = endpoints();
    let send = endpoints[0].stats.clone();
    let history = endpoints[1].stats.clone();
    let before = Utc::now();
    let service = start_service(&service_bus, endpoints).await;
    let after = Utc::now();
    let id = service.id().to_string();
    let subject = format!("$SRV.STATS.switchboard.{id}");

    let fresh = ask(&client, &subject).await;
    assert_eq!(fresh["type"], "io.nats.micro.v1.stats_response");
    assert_eq!(fresh["name"], "switchboard");
    assert_eq!(fresh["id"], id.as_str());
    assert_eq!(fresh["version"], "0.1.0-test.1");
    assert_eq!(fresh["metadata"], json!({"instance": "test"}));
    let started = fresh["started"].as_str().expect("started is a string");
    let started = DateTime::parse_from_rfc3339(started)
        .unwrap_or_else(|error| panic!("started {started:?} is not RFC 3339: {error}"));
    assert!(
        before <= started && started <= after,
        "started {started} is when the service was registered ({before} .. {after})"
    );
    assert_eq!(fresh["endpoints"][0]["num_requests"], 0);
    assert_eq!(fresh["endpoints"][0]["last_error"], "");

    send.record(Duration::from_millis(10), None);
    send.record(Duration::from_millis(30), Some("rate_limited:slow down"));
    send.record(Duration::from_millis(20), None);
    history.record(Duration::from_micros(7), None);

    for subject in [
        "$SRV.STATS".to_string(),
        "$SRV.STATS.switchboard".to_string(),
        subject,
    ] {
        let stats = ask(&client, &subject).await;
        assert_eq!(stats["started"], fresh["started"], "STATS on {subject}");
        assert_eq!(
            stats["endpoints"],
            json!([
                {
                    "name": "send",
                    "subject": "sb.conv.*.send",
                    "queue_group": "switchboard",
                    "num_requests": 3,
                    "num_errors": 1,
                    "processing_time": 60_000_000,
                    "average_processing_time": 20_000_000,
                    "last_error": "rate_limited:slow down",
                },
                {
                    "name": "history",
                    "subject": "sb.conv.*.history",
                    "queue_group": "switchboard",
                    "num_requests": 1,
                    "num_errors": 0,
                    "processing_time": 7_000,
                    "average_processing_time": 7_000,
                    "last_error": "",
                },
            ]),
            "STATS on {subject}"
        );
    }
    service.stop().await.expect("stop");
}

/// `Bus::request` returns only the first reply, so a plain subscription on
/// the reply inboxes (on the requesting handle) collects them
/// all. Replies are told from anything else there by their `type`.
async fn collect_ping_ids(inboxes: &mut Subscription, count: usize) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    within("a PING reply from every instance", async {
        while ids.len() < count {
            let message = inboxes.recv().await.expect("the inbox subscription ended");
            let Ok(reply) = serde_json::from_slice::<Value>(&message.payload) else {
                continue;
            };
            if reply["type"] == "io.nats.micro.v1.ping_response" {
                let id = reply["id"].as_str().expect("the id is a string");
                ids.insert(id.to_string());
            }
        }
    })
    .await;
    ids
}

async fn every_instance_answers_a_ping(transport: Transport) {
    let fixture = Fixture::start(transport);
    let first_bus = fixture.bus().await;
    let second_bus = fixture.bus().await;
    let client = fixture.bus().await;
    let first = start_service(&first_bus, endpoints()).await;
    let second = start_service(&second_bus, endpoints()).await;
    assert_ne!(first.id(), second.id(), "each instance has its own id");

    // The service's own connections use a private inbox prefix.
    let inboxes = match fixture.server {
        Some(_) => format!("{SERVICE_INBOX_PREFIX}.>"),
        None => "_INBOX.>".to_owned(),
    };
    let mut inboxes = client.subscribe(&inboxes).await.expect("subscribe");
    client.flush().await.expect("flush");
    for subject in ["$SRV.PING", "$SRV.PING.switchboard"] {
        ask(&client, subject).await;
        let ids = collect_ping_ids(&mut inboxes, 2).await;
        let expected: BTreeSet<String> = [first.id().to_string(), second.id().to_string()].into();
        assert_eq!(ids, expected, "both instances answer {subject}");
    }

    // Addressed by id, only that instance answers.
    let reply = ask(&client, &format!("$SRV.PING.switchboard.{}", second.id())).await;
    assert_eq!(reply["id"], second.id());

    first.stop().await.expect("stop");
    second.stop().await.expect("stop");
}

async fn other_names_and_ids_get_no_answer(transport: Transport) {
    let fixture = Fixture::start(transport);
    let service_bus = fixture.bus().await;
    let client = fixture.bus().await;
    let service = start_service(&service_bus, endpoints()).await;

    for subject in [
        "$SRV.INFO.other".to_string(),
        "$SRV.PING.other".to_string(),
        "$SRV.STATS.Switchboard".to_string(),
        "$SRV.INFO.switchboard.not-our-id".to_string(),
        format!("$SRV.INFO.other.{}", service.id()),
        "$SRV.SCHEMA.switchboard".to_string(),
    ] {
        let outcome = client.request(&subject, Headers::new(), "", WAIT).await;
        assert!(
            matches!(outcome, Err(BusError::NoResponders { .. })),
            "{subject} is not ours: {outcome:?}"
        );
    }
    service.stop().await.expect("stop");
}

async fn stopped_and_dropped_instances_stop_answering(transport: Transport) {
    let fixture = Fixture::start(transport);
    let service_bus = fixture.bus().await;
    let client = fixture.bus().await;

    let service = start_service(&service_bus, endpoints()).await;
    ask(&client, "$SRV.PING").await;
    service.stop().await.expect("stop");
    let outcome = client.request("$SRV.PING", Headers::new(), "", WAIT).await;
    assert!(
        matches!(outcome, Err(BusError::NoResponders { .. })),
        "nothing answers once stopped: {outcome:?}"
    );

    // Dropping the handle unsubscribes in the background. A request that
    // reaches the instance while it is unsubscribing goes unanswered (a
    // timeout), so each try waits only briefly; a slow machine just tries
    // again.
    let service = start_service(&service_bus, endpoints()).await;
    ask(&client, "$SRV.INFO").await;
    drop(service);
    let attempt = Duration::from_secs(2);
    within("the dropped instance to unsubscribe", async {
        loop {
            match client
                .request("$SRV.INFO", Headers::new(), "", attempt)
                .await
            {
                Err(BusError::NoResponders { .. }) => break,
                Ok(_) | Err(BusError::Timeout { .. }) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(error) => panic!("request: {error}"),
            }
        }
    })
    .await;
}

async fn invalid_services_are_refused(transport: Transport) {
    let fixture = Fixture::start(transport);
    let bus = fixture.bus().await;

    let mut bad_name = info();
    bad_name.name = "switch.board".to_string();
    let mut bad_version = info();
    bad_version.version = "1.0".to_string();
    let mut bad_endpoint = endpoints();
    bad_endpoint[1].name = "conv history".to_string();
    for (info, endpoints, code) in [
        (bad_name, endpoints(), "invalid_service_name"),
        (bad_version, endpoints(), "invalid_service_version"),
        (info(), bad_endpoint, "invalid_endpoint_name"),
    ] {
        let error = register(bus.clone(), info, endpoints)
            .await
            .expect_err("refused");
        assert_eq!(error.code(), code, "{error}");
    }
    let outcome = bus.request("$SRV.PING", Headers::new(), "", WAIT).await;
    assert!(
        matches!(outcome, Err(BusError::NoResponders { .. })),
        "a refused service subscribes nothing: {outcome:?}"
    );
}

/// Each scenario as two tests: embedded bus and real NATS.
macro_rules! on_both_buses {
    ($($scenario:ident),* $(,)?) => {
        mod local_bus {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Transport::Local).await;
                }
            )*
        }
        mod nats_bus {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Transport::Nats).await;
                }
            )*
        }
    };
}

on_both_buses!(
    ping_answers_on_all_three_subjects,
    info_lists_the_endpoints,
    stats_reflect_recorded_requests,
    every_instance_answers_a_ping,
    other_names_and_ids_get_no_answer,
    stopped_and_dropped_instances_stop_answering,
    invalid_services_are_refused,
);

// The reply types as async-nats 0.42 reads them (`async_nats::service::{
// PingResponse, Info, Stats}` and `service::endpoint::{Info, Stats}`, behind
// its `service` feature): every field it requires is required here too, and
// `metadata`, which it defaults, is required as well. Unknown fields are
// allowed, as there.

#[derive(Debug, Deserialize)]
struct PingReply {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    id: String,
    version: String,
    metadata: HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct InfoReply {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    id: String,
    description: String,
    version: String,
    metadata: HashMap<String, String>,
    endpoints: Vec<EndpointInfoReply>,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
struct EndpointInfoReply {
    name: String,
    subject: String,
    queue_group: String,
    metadata: HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct StatsReply {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    id: String,
    version: String,
    /// RFC 3339 (async-nats: `time::serde::rfc3339`).
    started: DateTime<Utc>,
    endpoints: Vec<EndpointStatsReply>,
}

#[derive(Debug, Deserialize)]
struct EndpointStatsReply {
    name: String,
    subject: String,
    num_requests: usize,
    num_errors: usize,
    /// Nanoseconds (async-nats: `serde_nanos`).
    processing_time: u64,
    average_processing_time: u64,
    last_error: String,
    queue_group: String,
}

/// Publishes one discovery request with its own reply inbox, as `nats micro`
/// does, and decodes the first `count` replies.
async fn discover<T: for<'de> Deserialize<'de>>(
    client: &async_nats::Client,
    subject: &str,
    count: usize,
) -> Vec<T> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.expect("subscribe");
    client
        .publish_with_reply(subject.to_string(), inbox, "".into())
        .await
        .expect("publish");
    let mut decoded = Vec::new();
    within(&format!("{count} replies on {subject}"), async {
        while decoded.len() < count {
            let reply = replies.next().await.expect("the inbox subscription ended");
            let value = serde_json::from_slice(&reply.payload).unwrap_or_else(|error| {
                panic!(
                    "reply on {subject} does not decode as async-nats would: {error}: {}",
                    String::from_utf8_lossy(&reply.payload)
                )
            });
            decoded.push(value);
        }
    })
    .await;
    decoded
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_client_reads_the_replies() {
    let fixture = Fixture::start(Transport::Nats);
    let server = fixture.server.as_ref().expect("a NATS fixture");
    let first_bus = fixture.bus().await;
    let second_bus = fixture.bus().await;
    let first_endpoints = endpoints();
    first_endpoints[0]
        .stats
        .record(Duration::from_millis(4), Some("500:internal"));
    let first = start_service(&first_bus, first_endpoints).await;
    let second = start_service(&second_bus, endpoints()).await;
    let ids: BTreeSet<String> = [first.id().to_string(), second.id().to_string()].into();
    let client = async_nats::connect(server.url())
        .await
        .expect("connect a plain NATS client");

    let pings: Vec<PingReply> = discover(&client, "$SRV.PING", 2).await;
    assert_eq!(
        pings
            .iter()
            .map(|ping| ping.id.clone())
            .collect::<BTreeSet<_>>(),
        ids
    );
    for ping in &pings {
        assert_eq!(ping.kind, "io.nats.micro.v1.ping_response");
        assert_eq!(ping.name, "switchboard");
        assert_eq!(ping.version, "0.1.0-test.1");
        assert_eq!(
            ping.metadata.get("instance").map(String::as_str),
            Some("test")
        );
    }

    let infos: Vec<InfoReply> = discover(&client, "$SRV.INFO.switchboard", 2).await;
    assert_eq!(
        infos
            .iter()
            .map(|info| info.id.clone())
            .collect::<BTreeSet<_>>(),
        ids
    );
    for info in &infos {
        assert_eq!(info.kind, "io.nats.micro.v1.info_response");
        assert_eq!(info.name, "switchboard");
        assert_eq!(info.version, "0.1.0-test.1");
        assert_eq!(info.description, "event-sourced chat backbone");
        assert_eq!(info.metadata.len(), 1);
        let names: Vec<&str> = info.endpoints.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["send", "history"]);
        assert_eq!(
            info.endpoints[1],
            EndpointInfoReply {
                name: "history".to_string(),
                subject: "sb.conv.*.history".to_string(),
                queue_group: "switchboard".to_string(),
                metadata: HashMap::new(),
            }
        );
    }

    let stats: Vec<StatsReply> = discover(&client, "$SRV.STATS", 2).await;
    let by_id: BTreeMap<&str, &StatsReply> = stats.iter().map(|s| (s.id.as_str(), s)).collect();
    assert_eq!(
        by_id
            .keys()
            .map(|id| id.to_string())
            .collect::<BTreeSet<_>>(),
        ids
    );
    let busy = &by_id[first.id()].endpoints[0];
    assert_eq!(by_id[first.id()].kind, "io.nats.micro.v1.stats_response");
    assert_eq!(by_id[first.id()].name, "switchboard");
    assert_eq!(by_id[first.id()].version, "0.1.0-test.1");
    assert!(by_id[first.id()].started <= Utc::now());
    assert_eq!(
        (
            busy.name.as_str(),
            busy.subject.as_str(),
            busy.queue_group.as_str()
        ),
        ("send", "sb.conv.*.send", "switchboard")
    );
    assert_eq!((busy.num_requests, busy.num_errors), (1, 1));
    assert_eq!(busy.processing_time, 4_000_000);
    assert_eq!(busy.average_processing_time, 4_000_000);
    assert_eq!(busy.last_error, "500:internal");
    let idle = &by_id[second.id()].endpoints[0];
    assert_eq!((idle.num_requests, idle.num_errors), (0, 0));
    assert_eq!(idle.last_error, "");

    first.stop().await.expect("stop");
    second.stop().await.expect("stop");
}
