//! The deployment files under `deploy/`, checked as far as this machine can:
//! `nats.conf` in a real `nats-server` (what the `client` user may and may
//! not do, and the real service working as the `switchboard` user), the YAML
//! files parsed and cross-checked (every `depends_on` a service, every mounted
//! file present, every path a config names mounted where it is read), and
//! every metric the alert rules and the Grafana dashboard query exported by
//! the real service. Docker is not needed; nothing here starts a container.
//!
//! `promtool` runs the alert rules' unit tests (`deploy/prometheus/alerts.test.yml`)
//! in an ignored test: `cargo test --test deploy -- --ignored` where it is
//! installed (Debian's `prometheus` package has it).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::{ConnectErrorKind, ConnectOptions, Event, ServerError};
use futures::{FutureExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value as Json};
use serde_yaml_ng::Value as Yaml;
use switchboard::bus::SERVICE_INBOX_PREFIX;
use switchboard::server::{AgentSpec, ProviderSpec};
use switchboard_actors::agent::AgentConfig;

use support::front::{Front, ADMIN_KEY, WAIT};
use support::nats::{listening_port, nats_server_bin, NatsServer};

/// Every metric the binary exports (issue 6). The dashboard and the alert
/// rules may name these and nothing else.
const EXPORTED: &[&str] = &[
    "switchboard_requests_total",
    "switchboard_ack_latency_seconds",
    "switchboard_log_batch_size",
    "switchboard_log_flush_seconds",
    "switchboard_log_head_seq",
    "switchboard_log_failed",
    "switchboard_projection_lag_events",
    "switchboard_outbox_lag_events",
    "switchboard_live_actors",
    "switchboard_passivations_total",
    "switchboard_rate_limit_refusals_total",
    "switchboard_agent_latency_seconds",
    "switchboard_agent_ttft_seconds",
    "switchboard_upstream_errors_total",
    "switchboard_circuit_state",
    "switchboard_tokens_total",
    "switchboard_cost_micros_total",
    "switchboard_budget_remaining_micros",
    "switchboard_budget_micros",
    "switchboard_nats_connected",
    "switchboard_nats_reconnects_total",
    "switchboard_data_dir_bytes",
    "switchboard_turns_in_flight",
    "switchboard_projections_seq",
    "switchboard_live_conversations",
];

/// The histograms among [`EXPORTED`]: queried as `_bucket`, `_sum`, `_count`.
const HISTOGRAMS: &[&str] = &[
    "switchboard_ack_latency_seconds",
    "switchboard_log_batch_size",
    "switchboard_log_flush_seconds",
    "switchboard_agent_latency_seconds",
    "switchboard_agent_ttft_seconds",
];

/// The alerts the issue asks for, one per concern: error rate, p99 ack
/// latency, projection lag, outbox lag, circuit open, NATS disconnected,
/// budget near exhaustion, data dir growth.
const REQUIRED_ALERTS: &[&str] = &[
    "SwitchboardHighErrorRate",
    "SwitchboardAckLatencyHigh",
    "SwitchboardProjectionLag",
    "SwitchboardOutboxLag",
    "SwitchboardCircuitOpen",
    "SwitchboardNatsDisconnected",
    "SwitchboardBudgetNearExhaustion",
    "SwitchboardDataDirGrowth",
];

const COMPOSE_SERVICES: &[&str] = &[
    "nats",
    "switchboard",
    "prometheus",
    "grafana",
    "otel-collector",
    "jaeger",
];

/// The passwords `nats.conf` reads from the environment, as the test sets them.
const SERVICE_PASSWORD: &str = "sw-service-password-0123";
const CLIENT_PASSWORD: &str = "cl-client-password-4567";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn read_deploy(file: &str) -> String {
    let path = deploy_dir().join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

fn yaml(file: &str) -> Yaml {
    serde_yaml_ng::from_str(&read_deploy(file))
        .unwrap_or_else(|error| panic!("deploy/{file} is not valid YAML: {error}"))
}

/// `value[key]` as a string, or a panic naming `what`.
#[track_caller]
fn str_at<'a>(value: &'a Yaml, key: &str, what: &str) -> &'a str {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: `{key}` is not a string: {value:?}"))
}

#[track_caller]
fn seq_at<'a>(value: &'a Yaml, key: &str, what: &str) -> &'a Vec<Yaml> {
    value[key]
        .as_sequence()
        .unwrap_or_else(|| panic!("{what}: `{key}` is not a list: {value:?}"))
}

#[track_caller]
fn map_at<'a>(value: &'a Yaml, key: &str, what: &str) -> &'a serde_yaml_ng::Mapping {
    value[key]
        .as_mapping()
        .unwrap_or_else(|| panic!("{what}: `{key}` is not a mapping: {value:?}"))
}

fn keys(mapping: &serde_yaml_ng::Mapping) -> BTreeSet<String> {
    mapping
        .keys()
        .filter_map(|key| key.as_str().map(str::to_owned))
        .collect()
}

// ---------------------------------------------------------------------------
// Metric names in PromQL

/// The metric names a PromQL expression uses: every `switchboard_…` token,
/// with a histogram's `_bucket` / `_sum` / `_count` suffix taken off. A suffix
/// on anything but a histogram is kept, so the name is then unknown.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let bytes = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut at = 0;
    while let Some(found) = expr[at..].find("switchboard_") {
        let start = at + found;
        let mut end = start + "switchboard_".len();
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        // Part of a longer identifier (e.g. `my_switchboard_x`): not a metric.
        let inside_word =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if !inside_word {
            names.insert(base_name(&expr[start..end]).to_owned());
        }
        at = end;
    }
    names
}

fn base_name(name: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if HISTOGRAMS.contains(&base) {
                return base;
            }
        }
    }
    name
}

#[test]
fn metric_names_are_read_from_promql() {
    let expr =
        "histogram_quantile(0.99, sum by (le) (rate(switchboard_ack_latency_seconds_bucket[5m]))) \
                / rate(switchboard_requests_total{outcome!=\"ok\"}[5m]) + my_switchboard_x \
                + switchboard_requests_total_count";
    assert_eq!(
        metric_names(expr),
        BTreeSet::from([
            "switchboard_ack_latency_seconds".to_owned(),
            "switchboard_requests_total".to_owned(),
            "switchboard_requests_total_count".to_owned(),
        ])
    );
}

/// The names among `used` that the binary does not export.
fn unknown(used: &BTreeSet<String>) -> Vec<&String> {
    used.iter()
        .filter(|name| !EXPORTED.contains(&name.as_str()))
        .collect()
}

// ---------------------------------------------------------------------------
// nats.conf in a real nats-server

/// `deploy/nats.conf` running in `nats-server`, on free loopback ports, with
/// its JetStream store in a temp dir; killed on drop.
struct ConfiguredNats {
    child: Child,
    port: u16,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

/// The line of `nats.conf` the test rewrites to keep JetStream's store in a
/// temp dir (nats-server refuses `-sd` beside a `store_dir` in the file).
const STORE_DIR_LINE: &str = "store_dir: \"/data/jetstream\"";

impl ConfiguredNats {
    /// Starts the server on a copy of `deploy/nats.conf` with both passwords
    /// in its environment. The client and monitoring ports come from flags
    /// (`-p -1 -m -1`: any free port), which override the file's 4222/8222.
    fn start() -> ConfiguredNats {
        ConfiguredNats::start_with("")
    }

    /// As [`start`](Self::start), with `extra` appended to the copy.
    fn start_with(extra: &str) -> ConfiguredNats {
        let bin = nats_server_bin();
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = read_deploy("nats.conf");
        assert!(
            conf.contains(STORE_DIR_LINE),
            "nats.conf keeps JetStream's store in /data/jetstream ({STORE_DIR_LINE})"
        );
        let store = dir.path().join("jetstream");
        let conf = conf.replace(
            STORE_DIR_LINE,
            &format!("store_dir: \"{}\"", store.display()),
        ) + "\n"
            + extra
            + "\n";
        let conf_path = dir.path().join("nats.conf");
        std::fs::write(&conf_path, conf).expect("the temp dir is writable");

        let mut child = Command::new(&bin)
            .arg("-c")
            .arg(&conf_path)
            .args(["-a", "127.0.0.1", "-p", "-1", "-m", "-1"])
            .env("SWITCHBOARD_NATS_PASSWORD", SERVICE_PASSWORD)
            .env("CLIENT_NATS_PASSWORD", CLIENT_PASSWORD)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("could not run {}: {error}", bin.display()));
        let log = Arc::new(Mutex::new(String::new()));
        let (port_tx, port_rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr is piped");
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(port) = listening_port(&line) {
                        let _ = port_tx.send(port);
                    }
                    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let mut server = ConfiguredNats {
            child,
            port: 0,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(port) = port_rx.try_recv() {
                server.port = port;
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "nats-server -c nats.conf exited ({status}):\n{}",
                    server.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nats-server -c nats.conf did not listen within 30 s:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The monitoring port, from `Starting http monitor on 127.0.0.1:<port>`
    /// (logged before the client port).
    fn monitor_port(&self) -> u16 {
        let log = self.log();
        log.lines()
            .find_map(|line| line.split_once("Starting http monitor on "))
            .and_then(|(_, addr)| addr.trim().rsplit_once(':'))
            .and_then(|(_, port)| port.parse().ok())
            .unwrap_or_else(|| panic!("no monitoring port in the log:\n{log}"))
    }
}

/// Sends one HTTP/1.0 GET to a loopback port and returns the status line.
fn http_status_line(port: u16, path: &str) -> String {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, WAIT).expect("the port answers");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("request sent");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("a response");
    response.lines().next().unwrap_or_default().to_owned()
}

impl Drop for ConfiguredNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connection as `user`, with the server's errors (permission violations
/// among them) sent to the returned channel.
async fn connect_as(
    url: &str,
    user: &str,
    password: &str,
) -> (
    async_nats::Client,
    tokio::sync::mpsc::UnboundedReceiver<Event>,
) {
    let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
    let mut options = ConnectOptions::with_user_and_password(user.to_owned(), password.to_owned());
    if user == "switchboard" {
        // The service's own inbox; nats.conf does not give it `_INBOX.>`.
        options = options.custom_inbox_prefix(SERVICE_INBOX_PREFIX);
    }
    let client = options
        .event_callback(move |event| {
            let events_tx = events_tx.clone();
            async move {
                let _ = events_tx.send(event);
            }
        })
        .connect(url)
        .await
        .unwrap_or_else(|error| panic!("{user} connects: {error}"));
    (client, events)
}

/// Waits for the server to report a permissions violation naming `subject`
/// and `what` (`Publish` or `Subscription`); returns its text.
async fn violation(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
    what: &str,
    subject: &str,
) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("no permissions violation reported for {what} to {subject}"))
            .expect("the connection's event callback lives");
        if let Event::ServerError(ServerError::Other(message)) = &event {
            let lower = message.to_lowercase();
            if lower.contains("permissions violation")
                && lower.contains(&what.to_lowercase())
                && message.contains(subject)
            {
                return message.clone();
            }
        }
    }
}

/// Returns once the server has handled everything `client` sent before:
/// a message to a fresh inbox of its own comes back. (`Client::flush` only
/// writes the buffer; it does not wait for the server.)
async fn round_trip(client: &async_nats::Client) {
    let inbox = client.new_inbox();
    let mut echo = client
        .subscribe(inbox.clone())
        .await
        .expect("subscribe to an inbox");
    client
        .publish(inbox, "ping".into())
        .await
        .expect("publish to an inbox");
    next_message(&mut echo, "the round trip").await;
}

/// Requests `subject` as `client` and returns the reply. The client may
/// publish nothing but requests, so this is also its round trip: once the
/// reply is in, the server has handled everything it sent before.
async fn answered(client: &async_nats::Client, subject: &str) -> String {
    let reply = tokio::time::timeout(WAIT, client.request(subject.to_owned(), "".into()))
        .await
        .unwrap_or_else(|_| panic!("{subject} is answered in time"))
        .unwrap_or_else(|error| panic!("the client may request {subject}: {error}"));
    String::from_utf8_lossy(&reply.payload).into_owned()
}

/// The next message of `subscription`, within [`WAIT`].
async fn next_message(
    subscription: &mut async_nats::Subscriber,
    what: &str,
) -> async_nats::Message {
    tokio::time::timeout(WAIT, subscription.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing arrived"))
        .unwrap_or_else(|| panic!("{what}: the subscription ended"))
}

#[tokio::test]
async fn nats_conf_lets_the_client_user_do_what_design_6_allows_and_nothing_more() {
    let server = ConfiguredNats::start();
    let log = server.log();
    assert!(
        log.contains("Starting JetStream"),
        "JetStream is on:\n{log}"
    );
    // The monitoring endpoint compose's health check asks.
    let status = http_status_line(server.monitor_port(), "/healthz");
    assert!(status.contains(" 200 "), "{status}");
    let url = server.url();

    let (service, _service_events) = connect_as(&url, "switchboard", SERVICE_PASSWORD).await;
    let (client, mut client_events) = connect_as(&url, "client", CLIENT_PASSWORD).await;

    // The service answers sends; the client's request reaches it and the
    // reply comes back through the client's inbox.
    let mut sends = service
        .queue_subscribe("sb.conv.*.send", "switchboard".to_owned())
        .await
        .expect("the service subscribes to sends");
    let responder = {
        let service = service.clone();
        tokio::spawn(async move {
            while let Some(request) = sends.next().await {
                if let Some(reply) = request.reply {
                    let body = format!("ack {}", request.subject);
                    let _ = service.publish(reply, body.into()).await;
                }
            }
        })
    };
    round_trip(&service).await;
    assert_eq!(
        answered(&client, "sb.conv.c1.send").await,
        "ack sb.conv.c1.send"
    );

    // The client follows events and alerts, but audit events do not reach
    // it: the service publishes one first, and the first two messages the
    // client gets are the conversation event and the alert.
    let mut events = client
        .subscribe("sb.evt.>")
        .await
        .expect("the client may subscribe to sb.evt.>");
    let mut alerts = client
        .subscribe("sb.alert.>")
        .await
        .expect("the client may subscribe to sb.alert.>");
    answered(&client, "sb.conv.barrier.send").await;
    for (subject, body) in [
        ("sb.evt.audit.key_issued", "audit"),
        ("sb.evt.conv.c1.reply_completed", "reply"),
        ("sb.alert.budget.key_1", "alert"),
    ] {
        service
            .publish(subject, body.into())
            .await
            .unwrap_or_else(|error| panic!("the service may publish {subject}: {error}"));
    }
    round_trip(&service).await;
    let event = next_message(&mut events, "sb.evt.>").await;
    assert_eq!(
        (event.subject.as_str(), &event.payload[..]),
        ("sb.evt.conv.c1.reply_completed", &b"reply"[..]),
        "the first event the client gets is the conversation's: the audit event published \
         before it must not reach the client"
    );
    let alert = next_message(&mut alerts, "sb.alert.>").await;
    assert_eq!(alert.subject.as_str(), "sb.alert.budget.key_1");

    // Refused: publishing admin requests or events, reading requests (they
    // carry the callers' keys) or audit events. The server reports each.
    let mut everything = service.subscribe("sb.>").await.expect("subscribe sb.>");
    round_trip(&service).await;
    client
        .publish("sb.admin.keys.issue", "{}".into())
        .await
        .expect("queued");
    violation(&mut client_events, "Publish", "sb.admin.keys.issue").await;
    client
        .publish("sb.evt.x", "forged".into())
        .await
        .expect("queued");
    violation(&mut client_events, "Publish", "sb.evt.x").await;
    let mut requests = client
        .subscribe("sb.conv.>")
        .await
        .expect("the subscription is sent");
    violation(&mut client_events, "Subscription", "sb.conv.>").await;
    let mut audit = client
        .subscribe("sb.evt.audit.>")
        .await
        .expect("the subscription is sent");
    violation(&mut client_events, "Subscription", "sb.evt.audit.>").await;

    // And nothing got through: the server handles one connection's messages
    // in order, so the marker published last is the first the service sees,
    // and a request the service relays after that reaches the client only on
    // its allowed subscription.
    client
        .publish("sb.conv.marker.send", "marker".into())
        .await
        .expect("queued");
    answered(&client, "sb.conv.barrier.send").await;
    let first = next_message(&mut everything, "the service's sb.> subscription").await;
    assert_eq!(
        first.subject.as_str(),
        "sb.conv.marker.send",
        "a refused publish reached the service"
    );
    service
        .publish("sb.conv.c2.send", "someone's request".into())
        .await
        .expect("publish");
    service
        .publish("sb.evt.audit.auth_failed", "audit".into())
        .await
        .expect("publish");
    service
        .publish("sb.evt.conv.c2.marker", "marker".into())
        .await
        .expect("publish");
    round_trip(&service).await;
    let marker = next_message(&mut events, "sb.evt.>").await;
    assert_eq!(marker.subject.as_str(), "sb.evt.conv.c2.marker");
    assert!(
        !matches!(requests.next().now_or_never(), Some(Some(_))),
        "the client read a request"
    );
    assert!(
        !matches!(audit.next().now_or_never(), Some(Some(_))),
        "the client read an audit event"
    );

    // Wrong or missing credentials are refused.
    for (user, password) in [
        ("client", "wrong-password"),
        ("switchboard", CLIENT_PASSWORD),
        ("nobody", CLIENT_PASSWORD),
    ] {
        let refused = tokio::time::timeout(
            WAIT,
            ConnectOptions::with_user_and_password(user.to_owned(), password.to_owned())
                .connect(&url),
        )
        .await
        .expect("the connection attempt ends");
        match refused {
            Err(error) => assert_eq!(
                error.kind(),
                ConnectErrorKind::AuthorizationViolation,
                "{user}: {error}"
            ),
            Ok(_) => panic!("{user} with a wrong password was let in"),
        }
    }
    let anonymous = tokio::time::timeout(WAIT, async_nats::connect(&url))
        .await
        .expect("the connection attempt ends");
    assert!(
        matches!(&anonymous, Err(error) if error.kind() == ConnectErrorKind::AuthorizationViolation),
        "a connection without credentials is refused: {:?}",
        anonymous.err()
    );

    responder.abort();
}

/// The real service within the `switchboard` user's permissions, with its
/// outbox confirmed by a JetStream stream the same user created: a `client`
/// connection sends with a key and follows the conversation's events, and
/// the server logs no violation by the service.
///
/// The service connects without credentials here, made the `switchboard`
/// user by `no_auth_user` in the test's copy of nats.conf, because it does
/// not yet use the credentials in its URL (see the next test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_works_within_the_switchboard_users_permissions() {
    let server = ConfiguredNats::start_with("no_auth_user: switchboard");
    let (operator, _) = connect_as(&server.url(), "switchboard", SERVICE_PASSWORD).await;
    let jetstream = async_nats::jetstream::new(operator);
    let mut stream = jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: "SB_EVENTS".to_owned(),
            subjects: vec!["sb.evt.>".to_owned()],
            ..Default::default()
        })
        .await
        .expect("the switchboard user creates the stream (docs/operations.md)");

    // An application may read `_INBOX.>`, where its replies come; the
    // service's replies to its own HTTP front (here, a raw key) go elsewhere.
    let (snooper, _) = connect_as(&server.url(), "client", CLIENT_PASSWORD).await;
    let mut snooped = snooper.subscribe("_INBOX.>").await.expect("subscribe");
    // The client may not publish to `_INBOX.>`; the service's user may, so
    // its probes show when the subscription is in place and when everything
    // before them was delivered.
    let (prober, _) = connect_as(&server.url(), "switchboard", SERVICE_PASSWORD).await;
    let probe = || async {
        prober
            .publish("_INBOX.probe", "probe".into())
            .await
            .expect("publish a probe");
        prober.flush().await.expect("flush");
    };
    let probe_arrived = |message: &async_nats::Message| message.subject.as_str() == "_INBOX.probe";
    loop {
        probe().await;
        match tokio::time::timeout(Duration::from_millis(200), snooped.next()).await {
            Ok(Some(message)) if probe_arrived(&message) => break,
            Ok(Some(_)) | Err(_) => continue,
            Ok(None) => panic!("the subscription ended"),
        }
    }

    let service_url = server.url();
    let front = Front::start_with(move |config| {
        config.nats_url = Some(service_url);
        config.outbox_jetstream = Some("sb.evt.>".to_owned());
    })
    .await;
    let issued: Json = front
        .request(Method::POST, "/admin/keys", Some(ADMIN_KEY))
        .json(&json!({ "name": "bot" }))
        .send()
        .await
        .expect("answered")
        .json()
        .await
        .expect("JSON");
    let key = issued["key"].as_str().expect("the key");
    probe().await;
    loop {
        let message = tokio::time::timeout(WAIT, snooped.next())
            .await
            .expect("the probe arrives")
            .expect("subscribed");
        assert!(
            !String::from_utf8_lossy(&message.payload).contains(key),
            "an application read the issued key on {}",
            message.subject
        );
        if probe_arrived(&message) {
            break;
        }
    }

    let (client, _) = connect_as(&server.url(), "client", CLIENT_PASSWORD).await;
    let mut events = client
        .subscribe("sb.evt.conv.d1.reply_completed")
        .await
        .expect("subscribe");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Authorization", format!("Bearer {key}").as_str());
    // The subscription is in place once a round trip is back.
    client.flush().await.expect("flushes");

    let ack = keyed_request(
        &client,
        "sb.conv.d1.send",
        &headers,
        r#"{"content":"hello"}"#,
    )
    .await;
    assert_eq!(ack["ok"], json!(true), "{ack}");
    let reply = next_message(&mut events, "the reply").await;
    let reply: Json = serde_json::from_slice(&reply.payload).expect("JSON");
    assert_eq!(reply["data"]["content"], json!("echo: hello"), "{reply}");

    // The outbox waited for the stream's acks, so the stream holds the events.
    let stored = stream.info().await.expect("stream info").state.messages;
    assert!(stored > 0, "the stream captured the events");

    front.server.shutdown().await;
    let log = server.log();
    let refused: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("user:switchboard") && line.contains("Violation"))
        .collect();
    assert!(
        refused.is_empty(),
        "nats.conf refused the service:\n{}",
        refused.join("\n")
    );
}

/// Compose gives the service its NATS user in the URL
/// (`nats://switchboard:<password>@nats:4222`), as DESIGN §8 has only
/// `SWITCHBOARD_NATS_URL`. async-nats 0.42 does not send a URL's
/// credentials itself (nats-io/nats.rs#1623); the bus passes them on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_authenticates_with_the_credentials_in_its_nats_url() {
    let server = ConfiguredNats::start();
    let url = format!(
        "nats://switchboard:{SERVICE_PASSWORD}@127.0.0.1:{}",
        server.port
    );
    let front = Front::start_with(move |config| config.nats_url = Some(url)).await;
    let (client, _) = connect_as(&server.url(), "client", CLIENT_PASSWORD).await;
    // Answered (refused: no key) only if the service is connected.
    let refused = keyed_request(
        &client,
        "sb.conv.c1.send",
        &async_nats::HeaderMap::new(),
        r#"{"content":"hi"}"#,
    )
    .await;
    assert_eq!(refused["error"]["code"], json!("unauthorized"), "{refused}");
    front.server.shutdown().await;
}

/// A request with `headers`, answered in time with JSON.
async fn keyed_request(
    client: &async_nats::Client,
    subject: &str,
    headers: &async_nats::HeaderMap,
    body: &'static str,
) -> Json {
    let reply = tokio::time::timeout(
        WAIT,
        client.request_with_headers(subject.to_owned(), headers.clone(), body.into()),
    )
    .await
    .unwrap_or_else(|_| panic!("{subject} is answered in time"))
    .unwrap_or_else(|error| panic!("the client may request {subject}: {error}"));
    serde_json::from_slice(&reply.payload)
        .unwrap_or_else(|error| panic!("{subject} answers JSON: {error}"))
}

#[test]
fn nats_conf_refuses_to_start_without_the_passwords() {
    let dir = tempfile::tempdir().expect("temp dir");
    let conf_path = dir.path().join("nats.conf");
    std::fs::write(&conf_path, read_deploy("nats.conf")).expect("write");
    // `-t` checks the configuration and exits.
    let output = Command::new(nats_server_bin())
        .arg("-t")
        .arg("-c")
        .arg(&conf_path)
        .env_remove("SWITCHBOARD_NATS_PASSWORD")
        .env("CLIENT_NATS_PASSWORD", CLIENT_PASSWORD)
        .output()
        .expect("nats-server runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("SWITCHBOARD_NATS_PASSWORD"), "{stderr}");

    let output = Command::new(nats_server_bin())
        .arg("-t")
        .arg("-c")
        .arg(&conf_path)
        .env("SWITCHBOARD_NATS_PASSWORD", SERVICE_PASSWORD)
        .env("CLIENT_NATS_PASSWORD", CLIENT_PASSWORD)
        .output()
        .expect("nats-server runs");
    assert!(
        output.status.success(),
        "with both passwords the file is valid: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn nats_conf_listens_where_compose_expects() {
    let conf = read_deploy("nats.conf");
    let settings: BTreeMap<&str, &str> = conf
        .lines()
        .filter_map(|line| line.split('#').next())
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim(), value.trim()))
        .collect();
    assert_eq!(settings.get("port"), Some(&"4222"));
    assert_eq!(settings.get("http_port"), Some(&"8222"));
    assert!(conf.contains("$SWITCHBOARD_NATS_PASSWORD"));
    assert!(conf.contains("$CLIENT_NATS_PASSWORD"));
}

// ---------------------------------------------------------------------------
// docker-compose.yml and the Dockerfile

/// A compose volume entry's host path, when it is a bind mount of a path
/// relative to the compose file (`./x:/y[:ro]` or the long syntax).
fn bind_source(volume: &Yaml) -> Option<(String, String)> {
    match volume {
        Yaml::String(short) => {
            let mut parts = short.split(':');
            let source = parts.next()?;
            let target = parts.next()?;
            (source.starts_with("./") || source.starts_with("../"))
                .then(|| (source.to_owned(), target.to_owned()))
        }
        Yaml::Mapping(_) => {
            let source = volume["source"].as_str()?;
            let target = volume["target"].as_str()?;
            (volume["type"].as_str() == Some("bind"))
                .then(|| (source.to_owned(), target.to_owned()))
        }
        _ => None,
    }
}

/// `service`'s bind mounts: container path → host path relative to deploy/.
fn mounts(compose: &Yaml, service: &str) -> BTreeMap<String, String> {
    compose["services"][service]["volumes"]
        .as_sequence()
        .map(|volumes| {
            volumes
                .iter()
                .filter_map(bind_source)
                .map(|(source, target)| (target, source))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn compose_wires_the_six_services_together() {
    let compose = yaml("docker-compose.yml");
    let services = map_at(&compose, "services", "docker-compose.yml");
    let names = keys(services);
    assert_eq!(
        names,
        COMPOSE_SERVICES.iter().map(|s| s.to_string()).collect(),
        "the services"
    );
    let networks = keys(map_at(&compose, "networks", "docker-compose.yml"));
    let named_volumes = keys(map_at(&compose, "volumes", "docker-compose.yml"));

    for name in &names {
        let service = &compose["services"][name.as_str()];
        let what = format!("service {name}");
        assert!(
            service["image"].is_string() || service["build"].is_mapping(),
            "{what} has an image or a build"
        );

        // depends_on: a list of names or a map of name → condition.
        let depends: Vec<String> = match &service["depends_on"] {
            Yaml::Null => Vec::new(),
            Yaml::Sequence(list) => list
                .iter()
                .map(|d| d.as_str().expect("a service name").to_owned())
                .collect(),
            Yaml::Mapping(map) => {
                for (dependency, condition) in map {
                    let condition = condition["condition"].as_str().unwrap_or("");
                    assert!(
                        [
                            "service_started",
                            "service_healthy",
                            "service_completed_successfully"
                        ]
                        .contains(&condition),
                        "{what}: depends_on {dependency:?} has condition {condition:?}"
                    );
                    if condition == "service_healthy" {
                        let dependency = dependency.as_str().expect("a service name");
                        assert!(
                            compose["services"][dependency]["healthcheck"].is_mapping(),
                            "{what} waits for {dependency} to be healthy, which has no healthcheck"
                        );
                    }
                }
                keys(map).into_iter().collect()
            }
            other => panic!("{what}: depends_on is {other:?}"),
        };
        for dependency in depends {
            assert!(
                names.contains(&dependency),
                "{what} depends on {dependency}, which is not a service"
            );
        }

        // Every bind-mounted file is in deploy/; every named volume declared.
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            if let Some((source, _)) = bind_source(volume) {
                let path = deploy_dir().join(&source);
                assert!(
                    path.exists(),
                    "{what} mounts {source}, which is not in deploy/"
                );
            } else if let Some(short) = volume.as_str() {
                let source = short.split(':').next().unwrap_or_default();
                assert!(
                    named_volumes.contains(source),
                    "{what} mounts volume {source}, which is not declared"
                );
            }
        }

        // One network for everyone.
        let joined: BTreeSet<String> = seq_at(service, "networks", &what)
            .iter()
            .filter_map(|n| n.as_str().map(str::to_owned))
            .collect();
        assert_eq!(joined, BTreeSet::from(["switchboard".to_owned()]), "{what}");
        assert!(networks.contains("switchboard"));
    }

    // switchboard: built from deploy/Dockerfile with the repo as context,
    // configured by the environment, its data in a volume.
    let switchboard = &compose["services"]["switchboard"];
    let build = &switchboard["build"];
    let context = deploy_dir().join(str_at(build, "context", "switchboard's build"));
    assert!(
        context.join("Cargo.toml").exists(),
        "the build context is the repo root"
    );
    assert!(context
        .join(str_at(build, "dockerfile", "switchboard's build"))
        .exists());
    let environment = &switchboard["environment"];
    let nats_url = str_at(environment, "SWITCHBOARD_NATS_URL", "switchboard");
    assert!(
        nats_url.starts_with("nats://switchboard:${SWITCHBOARD_NATS_PASSWORD")
            && nats_url.ends_with("}@nats:4222"),
        "{nats_url}"
    );
    assert_eq!(
        str_at(environment, "SWITCHBOARD_HTTP", "switchboard"),
        "0.0.0.0:8080"
    );
    assert_eq!(
        str_at(environment, "OTEL_EXPORTER_OTLP_ENDPOINT", "switchboard"),
        "http://otel-collector:4318"
    );
    assert!(str_at(environment, "SWITCHBOARD_ADMIN_KEY", "switchboard")
        .starts_with("${SWITCHBOARD_ADMIN_KEY"));
    assert!(
        seq_at(switchboard, "volumes", "switchboard")
            .iter()
            .filter_map(Yaml::as_str)
            .any(|volume| volume.ends_with(":/data")),
        "switchboard keeps /data in a volume"
    );

    // NATS gets both passwords and reads the mounted nats.conf.
    let nats = &compose["services"]["nats"];
    for variable in ["SWITCHBOARD_NATS_PASSWORD", "CLIENT_NATS_PASSWORD"] {
        assert!(
            str_at(&nats["environment"], variable, "nats").starts_with(&format!("${{{variable}")),
            "nats gets {variable}"
        );
    }
    let nats_mounts = mounts(&compose, "nats");
    let command: Vec<&str> = seq_at(nats, "command", "nats")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    let conf = command
        .windows(2)
        .find(|pair| pair[0] == "-c" || pair[0] == "--config")
        .map(|pair| pair[1])
        .expect("nats runs with -c <file>");
    assert_eq!(
        nats_mounts.get(conf).map(String::as_str),
        Some("./nats.conf"),
        "nats reads the mounted deploy/nats.conf"
    );

    // The collector reads the mounted otel-collector.yaml.
    let collector = &compose["services"]["otel-collector"];
    let config = seq_at(collector, "command", "otel-collector")
        .iter()
        .filter_map(Yaml::as_str)
        .find_map(|arg| arg.strip_prefix("--config="))
        .expect("the collector runs with --config=<file>");
    assert_eq!(
        mounts(&compose, "otel-collector")
            .get(config)
            .map(String::as_str),
        Some("./otel-collector.yaml")
    );

    // Jaeger's UI is published on 16686.
    assert!(seq_at(&compose["services"]["jaeger"], "ports", "jaeger")
        .iter()
        .filter_map(Yaml::as_str)
        .any(|port| port.ends_with(":16686")));
}

#[test]
fn dockerfile_builds_locked_and_runs_unprivileged() {
    let dockerfile = read_deploy("Dockerfile");
    let instructions: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    let from: Vec<&&str> = instructions
        .iter()
        .filter(|line| line.starts_with("FROM "))
        .collect();
    assert!(from.len() >= 2, "multi-stage: {from:?}");
    assert!(dockerfile.contains("cargo build --release --locked"));
    let user = instructions
        .iter()
        .rev()
        .find_map(|line| line.strip_prefix("USER "))
        .expect("the runtime stage sets a USER");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "runs as {user}"
    );
    for line in [
        "EXPOSE 8080",
        r#"ENTRYPOINT ["switchboard"]"#,
        r#"CMD ["serve", "--data-dir", "/data"]"#,
    ] {
        assert!(instructions.contains(&line), "the Dockerfile has {line}");
    }
    // The context is the repo root; its ignore file keeps the build output
    // and the installed tools out of it.
    let ignore = read_deploy("Dockerfile.dockerignore");
    for pattern in ["target", ".tools", ".git"] {
        assert!(
            ignore.lines().any(|line| line.trim() == pattern),
            "Dockerfile.dockerignore leaves out {pattern}"
        );
    }
}

// ---------------------------------------------------------------------------
// Prometheus, the collector and Grafana

#[test]
fn prometheus_scrapes_switchboard_and_loads_the_mounted_rules() {
    let prometheus = yaml("prometheus/prometheus.yml");
    let jobs = seq_at(&prometheus, "scrape_configs", "prometheus.yml");
    let job = jobs
        .iter()
        .find(|job| job["job_name"].as_str() == Some("switchboard"))
        .expect("a switchboard job");
    assert_eq!(job["scrape_interval"].as_str(), Some("15s"));
    assert!(matches!(
        job["metrics_path"].as_str(),
        None | Some("/metrics")
    ));
    let targets: Vec<&str> = seq_at(job, "static_configs", "the switchboard job")
        .iter()
        .flat_map(|config| seq_at(config, "targets", "static_configs").iter())
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(targets, ["switchboard:8080"]);

    // Each rule file is the mounted alerts.yml; and prometheus.yml itself is
    // mounted where Prometheus reads it.
    let compose = yaml("docker-compose.yml");
    let mounted = mounts(&compose, "prometheus");
    let rule_files = seq_at(&prometheus, "rule_files", "prometheus.yml");
    assert!(!rule_files.is_empty());
    for file in rule_files {
        let file = file.as_str().expect("a path");
        assert_eq!(
            mounted.get(file).map(String::as_str),
            Some("./prometheus/alerts.yml"),
            "rule file {file} is the mounted deploy/prometheus/alerts.yml"
        );
    }
    let config = seq_at(&compose["services"]["prometheus"], "command", "prometheus")
        .iter()
        .filter_map(Yaml::as_str)
        .find_map(|arg| arg.strip_prefix("--config.file="))
        .expect("--config.file");
    assert_eq!(
        mounted.get(config).map(String::as_str),
        Some("./prometheus/prometheus.yml")
    );
}

/// Every rule of alerts.yml, with its group's name.
fn alert_rules() -> Vec<(String, Yaml)> {
    let alerts = yaml("prometheus/alerts.yml");
    seq_at(&alerts, "groups", "alerts.yml")
        .iter()
        .flat_map(|group| {
            let name = str_at(group, "name", "a rule group").to_owned();
            seq_at(group, "rules", &name)
                .iter()
                .map(move |rule| (name.clone(), rule.clone()))
        })
        .collect()
}

#[test]
fn alert_rules_cover_each_concern_with_exported_metrics_only() {
    let rules = alert_rules();
    let names: BTreeSet<&str> = rules
        .iter()
        .filter_map(|(_, rule)| rule["alert"].as_str())
        .collect();
    for required in REQUIRED_ALERTS {
        assert!(names.contains(required), "alerts.yml has {required}");
    }
    assert_eq!(names.len(), rules.len(), "alert names are unique");

    let tests = read_deploy("prometheus/alerts.test.yml");
    for (group, rule) in &rules {
        let name = str_at(rule, "alert", group);
        let expr = str_at(rule, "expr", name);
        let duration = str_at(rule, "for", name);
        assert!(
            duration.ends_with('s') || duration.ends_with('m') || duration.ends_with('h'),
            "{name}: for: {duration}"
        );
        let severity = str_at(&rule["labels"], "severity", name);
        assert!(
            ["warning", "critical"].contains(&severity),
            "{name}: severity {severity}"
        );
        for annotation in ["summary", "description"] {
            assert!(
                !str_at(&rule["annotations"], annotation, name)
                    .trim()
                    .is_empty(),
                "{name}: {annotation}"
            );
        }
        let used = metric_names(expr);
        assert!(
            !used.is_empty() || expr.contains("up{"),
            "{name} queries no switchboard metric: {expr}"
        );
        assert!(
            unknown(&used).is_empty(),
            "{name} queries metrics the binary does not export: {:?}",
            unknown(&used)
        );
        assert!(
            tests.contains(&format!("alertname: {name}\n")),
            "alerts.test.yml tests {name}"
        );
    }
}

/// The alert rules check, and their unit tests pass, in promtool: on PATH
/// (or `PROMTOOL`); scripts/setup installs it.
#[test]
fn alert_rules_pass_promtool() {
    let promtool = std::env::var_os("PROMTOOL").unwrap_or_else(|| "promtool".into());
    let dir = deploy_dir().join("prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let output = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|error| {
                panic!("promtool does not run ({error}): run scripts/setup, or set PROMTOOL")
            });
        assert!(
            output.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn otel_collector_takes_otlp_and_sends_traces_to_jaeger() {
    let collector = yaml("otel-collector.yaml");
    let protocols = &collector["receivers"]["otlp"]["protocols"];
    assert!(str_at(&protocols["grpc"], "endpoint", "otlp grpc").ends_with(":4317"));
    assert!(str_at(&protocols["http"], "endpoint", "otlp http").ends_with(":4318"));

    let traces = &collector["service"]["pipelines"]["traces"];
    for (section, kind) in [
        ("receivers", "receivers"),
        ("processors", "processors"),
        ("exporters", "exporters"),
    ] {
        let defined = keys(map_at(&collector, kind, "otel-collector.yaml"));
        for used in seq_at(traces, section, "the traces pipeline") {
            let used = used.as_str().expect("a component name");
            assert!(
                defined.contains(used),
                "the traces pipeline uses {kind} {used}, which is not defined"
            );
        }
    }
    let to_jaeger = seq_at(traces, "exporters", "the traces pipeline")
        .iter()
        .filter_map(Yaml::as_str)
        .map(|name| &collector["exporters"][name])
        .any(|exporter| exporter["endpoint"].as_str() == Some("jaeger:4317"));
    assert!(to_jaeger, "traces go to jaeger:4317 (OTLP gRPC)");
    for extension in seq_at(&collector["service"], "extensions", "service") {
        let extension = extension.as_str().expect("a name");
        assert!(keys(map_at(&collector, "extensions", "otel-collector.yaml")).contains(extension));
    }
}

#[test]
fn grafana_provisions_the_prometheus_datasource_and_the_dashboard() {
    let compose = yaml("docker-compose.yml");
    let mounted = mounts(&compose, "grafana");
    assert_eq!(
        mounted.get("/etc/grafana/provisioning").map(String::as_str),
        Some("./grafana/provisioning")
    );

    let datasources = yaml("grafana/provisioning/datasources/prometheus.yml");
    let sources = seq_at(&datasources, "datasources", "datasources");
    assert_eq!(sources.len(), 1);
    let prometheus = &sources[0];
    assert_eq!(prometheus["type"].as_str(), Some("prometheus"));
    assert_eq!(prometheus["url"].as_str(), Some("http://prometheus:9090"));
    let uid = str_at(prometheus, "uid", "the datasource");

    let dashboards = yaml("grafana/provisioning/dashboards/switchboard.yml");
    let providers = seq_at(&dashboards, "providers", "dashboards");
    assert_eq!(providers.len(), 1);
    let path = str_at(&providers[0]["options"], "path", "the provider");
    assert_eq!(
        mounted.get(path).map(String::as_str),
        Some("./grafana/dashboards"),
        "the provider reads the mounted deploy/grafana/dashboards"
    );

    // The dashboard's panels use the provisioned datasource.
    for panel in dashboard_panels() {
        if let Some(source) = panel["datasource"].as_object() {
            assert_eq!(source["uid"], json!(uid), "panel {}", panel["title"]);
        }
    }
}

// ---------------------------------------------------------------------------
// The dashboard

fn dashboard() -> Json {
    serde_json::from_str(&read_deploy("grafana/dashboards/switchboard.json"))
        .unwrap_or_else(|error| panic!("the dashboard is not valid JSON: {error}"))
}

/// Every panel, rows' nested panels included; rows themselves are left out.
fn dashboard_panels() -> Vec<Json> {
    fn collect(panels: &Json, into: &mut Vec<Json>) {
        for panel in panels.as_array().into_iter().flatten() {
            if panel["type"] == "row" {
                collect(&panel["panels"], into);
            } else {
                into.push(panel.clone());
            }
        }
    }
    let mut panels = Vec::new();
    collect(&dashboard()["panels"], &mut panels);
    panels
}

/// The metrics the dashboard's queries name.
fn dashboard_metrics() -> BTreeSet<String> {
    dashboard_panels()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|target| target["expr"].as_str().map(metric_names))
        .flatten()
        .collect()
}

/// The metrics the alert rules name.
fn alert_metrics() -> BTreeSet<String> {
    alert_rules()
        .iter()
        .filter_map(|(_, rule)| rule["expr"].as_str().map(metric_names))
        .flatten()
        .collect()
}

#[test]
fn every_dashboard_panel_queries_exported_metrics_and_every_metric_has_a_panel() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], json!("switchboard"));
    let panels = dashboard_panels();
    assert!(!panels.is_empty());
    let mut ids = BTreeSet::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        assert!(
            ids.insert(panel["id"].as_u64().expect("a numeric id")),
            "panel ids are unique"
        );
        assert!(panel["gridPos"].is_object(), "{title} has a place");
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel {title} has no targets"));
        assert!(!targets.is_empty(), "panel {title} has no targets");
        for target in targets {
            let expr = target["expr"]
                .as_str()
                .filter(|expr| !expr.trim().is_empty())
                .unwrap_or_else(|| panic!("panel {title}: a target without expr"));
            let used = metric_names(expr);
            assert!(!used.is_empty(), "panel {title} queries no metric: {expr}");
            assert!(
                unknown(&used).is_empty(),
                "panel {title} queries metrics the binary does not export: {:?}",
                unknown(&used)
            );
        }
    }
    let used = dashboard_metrics();
    let missing: Vec<&&str> = EXPORTED
        .iter()
        .filter(|name| !used.contains(**name))
        .collect();
    assert!(missing.is_empty(), "no panel shows {missing:?}");
}

/// The sample names of a Prometheus text exposition (`name{…} value`).
fn scraped_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// What the scrape must hold for `metric`: a histogram's buckets, or the
/// sample itself.
fn sample_name(metric: &str) -> String {
    if HISTOGRAMS.contains(&metric) {
        format!("{metric}_bucket")
    } else {
        metric.to_owned()
    }
}

/// Runs the real service (on a real NATS server, with an agent whose model
/// server refuses connections, a cap of one live conversation and a key
/// with an rpm limit and a budget), makes it do a bit of everything the
/// metrics count, and scrapes `/metrics`: every metric the dashboard and the
/// alert rules query must be there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_metrics_are_exported_by_the_binary() {
    let nats = tokio::task::block_in_place(NatsServer::start);
    // A port just freed: connections to it are refused.
    let refusing = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let nats_url = nats.url();
    let front = Front::start_with(move |config| {
        config.nats_url = Some(nats_url);
        config.conversations.max_live = 1;
        config.conversations.idle_passivate = Duration::from_secs(1);
        config.agents.push(AgentSpec {
            config: AgentConfig {
                max_retries: 0,
                circuit_failure_threshold: 1,
                circuit_open_for: Duration::from_secs(600),
                ..AgentConfig::new("down")
            },
            provider: ProviderSpec::OpenAi {
                base_url: format!("http://127.0.0.1:{refusing}/v1"),
                model: "nothing".to_owned(),
                api_key: None,
            },
        });
    })
    .await;

    let issued: Json = front
        .request(Method::POST, "/admin/keys", Some(ADMIN_KEY))
        .json(&json!({
            "name": "metrics",
            "limits": { "rpm": 3 },
            "budget": { "micros": 1_000_000, "period": "day" },
        }))
        .send()
        .await
        .expect("answered")
        .json()
        .await
        .expect("JSON");
    let key = issued["key"].as_str().expect("the key").to_owned();

    // Three sends (two conversations past a cap of one, one turn to the
    // failing agent), then one over the rpm limit.
    for (conversation, body) in [
        ("m1", json!({ "content": "hello" })),
        ("m2", json!({ "content": "hello again" })),
        ("m3", json!({ "content": "anyone?", "agent": "down" })),
    ] {
        let response = front
            .request(
                Method::POST,
                &format!("/v1/conversations/{conversation}/messages"),
                Some(&key),
            )
            .json(&body)
            .send()
            .await
            .expect("answered");
        assert_eq!(response.status(), StatusCode::ACCEPTED, "{conversation}");
    }
    let refused = front
        .request(Method::POST, "/v1/conversations/m1/messages", Some(&key))
        .json(&json!({ "content": "one too many" }))
        .send()
        .await
        .expect("answered");
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    for path in ["/v1/conversations/m1", "/v1/usage"] {
        let response = front
            .request(Method::GET, path, Some(&key))
            .send()
            .await
            .expect("answered");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }

    let wanted: BTreeSet<String> = dashboard_metrics()
        .union(&alert_metrics())
        .map(|metric| sample_name(metric))
        .collect();
    // Turns, passivations and projections catch up in the background: scrape
    // until everything is there, or for as long as a request may take.
    let deadline = Instant::now() + WAIT;
    let (missing, scrape) = loop {
        let response = front
            .request(Method::GET, "/metrics", None)
            .send()
            .await
            .expect("answered");
        assert_eq!(response.status(), StatusCode::OK);
        let scrape = response.text().await.expect("text");
        let present = scraped_names(&scrape);
        let missing: Vec<String> = wanted.difference(&present).cloned().collect();
        if missing.is_empty() || Instant::now() > deadline {
            break (missing, scrape);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    front.server.shutdown().await;
    drop(nats);
    assert!(
        missing.is_empty(),
        "the dashboard and alert rules query {} metrics /metrics does not have:\n  {}\n--- /metrics ---\n{scrape}",
        missing.len(),
        missing.join("\n  ")
    );
}
