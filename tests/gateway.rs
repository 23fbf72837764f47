//! The NATS gateway (DESIGN §6) end to end: a real log in a temp dir, live
//! projections, the turn coordinator with the echo agent, and requests over
//! the bus. Every scenario runs twice: on the embedded bus, and on a real
//! `nats-server` with the client on its own connection.

mod support;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ractor::Actor;
use serde_json::{json, Value};
use switchboard::bus::{Bus, Headers, LocalBus, NatsBus};
use switchboard::gateway::wire::{SendRequest, MAX_BODY_BYTES};
use switchboard::gateway::{GatewayHandle, NatsGateway, DEFAULT_PREFIX};
use switchboard_actors::agent::{Agent, AgentActor, AgentConfig};
use switchboard_actors::conversation_actor::{ConversationRegistry, RegistryConfig};
use switchboard_actors::provider::EchoProvider;
use switchboard_actors::router::Router;
use switchboard_actors::turns::TurnCoordinator;
use switchboard_events::apikey::ApiKey;
use switchboard_events::catalog::{
    AuthChannel, AuthFailed, ConversationStarted, KeyIssued, KeyRevoked, Limits, MessageReceived,
    Scope,
};
use switchboard_events::{
    Envelope, Event, EventLog, ExpectedVersion, NewEvent, OpenMode, StreamId,
};
use switchboard_projections::Projections;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use support::nats::NatsServer;

/// How long any one wait may take on a busy 2-core CI machine.
const WAIT: Duration = Duration::from_secs(20);
/// The pace of the "slow" agent's words.
const SLOW_WORD: Duration = Duration::from_millis(100);
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

#[derive(Debug, Clone, Copy)]
enum Transport {
    Local,
    Nats,
}

/// The service (log, projections, coordinator, gateway) and a client bus.
struct Service {
    _dir: TempDir,
    log: EventLog,
    projections: Projections,
    registry: ConversationRegistry,
    turns: TurnCoordinator,
    gateway: GatewayHandle,
    client: Bus,
    stop_projections: oneshot::Sender<()>,
    projections_task: JoinHandle<()>,
    server: Option<NatsServer>,
}

impl Service {
    async fn start(transport: Transport) -> Service {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open the log");
        let projections = Projections::open(&log).expect("open the projections");
        let (stop_projections, stopped) = oneshot::channel::<()>();
        let live = projections.clone();
        let projections_task = tokio::spawn(async move {
            live.run_live(async {
                let _ = stopped.await;
            })
            .await
            .expect("the projections fold");
        });

        let registry = ConversationRegistry::new(log.clone(), RegistryConfig::default());
        let echo = Arc::new(Agent::new(
            AgentConfig::new("echo"),
            Arc::new(EchoProvider::new()),
        ));
        let (echo, _) = Actor::spawn(None, AgentActor, echo)
            .await
            .expect("the agent starts");
        // "slow": a turn of n words takes n × 100 ms.
        let slow = Arc::new(Agent::new(
            AgentConfig::new("slow"),
            Arc::new(EchoProvider::with_word_delay(SLOW_WORD)),
        ));
        let (slow, _) = Actor::spawn(None, AgentActor, slow)
            .await
            .expect("the agent starts");
        // "chatty": a delta per word, a word every 500 µs.
        let chatty = Arc::new(Agent::new(
            AgentConfig::new("chatty"),
            Arc::new(EchoProvider::with_word_delay(Duration::from_micros(500))),
        ));
        let (chatty, _) = Actor::spawn(None, AgentActor, chatty)
            .await
            .expect("the agent starts");
        let agents = HashMap::from([
            ("echo".to_owned(), echo),
            ("slow".to_owned(), slow),
            ("chatty".to_owned(), chatty),
        ]);
        let router = Router::new(vec![], "echo").expect("valid router");
        let turns =
            TurnCoordinator::new(registry.clone(), router, agents, log.clone()).expect("agents");

        let (service_bus, client, server) = match transport {
            Transport::Local => {
                let bus = Bus::from(LocalBus::new());
                (bus.clone(), bus, None)
            }
            Transport::Nats => {
                let server = NatsServer::start();
                let service = connect(&server, Side::Service).await;
                let client = connect(&server, Side::Application).await;
                (service, client, Some(server))
            }
        };
        let gateway = NatsGateway::start(
            service_bus,
            DEFAULT_PREFIX,
            turns.clone(),
            projections.clone(),
            log.clone(),
        )
        .await
        .expect("the gateway starts");
        Service {
            _dir: dir,
            log,
            projections,
            registry,
            turns,
            gateway,
            client,
            stop_projections,
            projections_task,
            server,
        }
    }

    /// Stops the service; hands back the NATS server (if any), which stops
    /// when dropped: a test may still have requests on their way.
    async fn shutdown(self) -> Option<NatsServer> {
        self.gateway.stop().await;
        let after = self
            .client
            .request("sb.conv.c1.send", Headers::new(), "{}", WAIT)
            .await
            .expect_err("a stopped gateway answers nothing");
        assert_eq!(after.code(), "no_responders", "{after}");
        self.turns.drain().await;
        self.registry.shutdown().await;
        let _ = self.stop_projections.send(());
        self.projections_task.await.expect("the projections stop");
        self.server
    }

    /// Issues a key (appends `key_issued`) and waits until it authenticates.
    async fn issue_key(&self, key_id: &str, scopes: &[Scope]) -> String {
        let key = ApiKey::generate();
        let issued = Event::KeyIssued(KeyIssued {
            key_id: key_id.into(),
            name: format!("test key {key_id}"),
            owner: Some(format!("owner-of-{key_id}")),
            key_hash: key.hash(),
            scopes: scopes.to_vec(),
            limits: Limits::default(),
            budget: None,
            expires_at: None,
        });
        self.append(StreamId::key(key_id).expect("valid key id"), issued)
            .await;
        key.expose().to_owned()
    }

    async fn revoke_key(&self, key_id: &str) {
        let revoked = Event::KeyRevoked(KeyRevoked {
            key_id: key_id.into(),
            by: "test".into(),
            reason: Some("leaked".into()),
        });
        self.append(StreamId::key(key_id).expect("valid key id"), revoked)
            .await;
    }

    async fn append(&self, stream: StreamId, event: Event) {
        let appended = self
            .log
            .append(stream, ExpectedVersion::Any, vec![NewEvent::new(event)])
            .await
            .expect("append");
        within(
            "the projections",
            self.projections.wait_for(appended.last().seq),
        )
        .await;
    }

    /// A request on `sb.conv.<id>.<operation>`; the JSON reply.
    async fn request(
        &self,
        conversation_id: &str,
        operation: &str,
        headers: Headers,
        body: impl Into<bytes::Bytes>,
    ) -> Value {
        let subject = format!("{DEFAULT_PREFIX}.conv.{conversation_id}.{operation}");
        let reply = self
            .client
            .request(&subject, headers, body.into(), WAIT)
            .await
            .unwrap_or_else(|error| panic!("request on {subject}: {error}"));
        serde_json::from_slice(&reply.payload)
            .unwrap_or_else(|error| panic!("reply on {subject} is not JSON: {error}"))
    }

    async fn send(&self, conversation_id: &str, key: &str, body: Value) -> Value {
        self.request(
            conversation_id,
            "send",
            bearer(key),
            serde_json::to_vec(&body).expect("JSON"),
        )
        .await
    }

    /// A send with `Switchboard-Wait: <wait>`.
    async fn send_waiting(
        &self,
        conversation_id: &str,
        key: &str,
        wait: &str,
        body: Value,
    ) -> Value {
        self.request(
            conversation_id,
            "send",
            bearer(key).with("Switchboard-Wait", wait),
            serde_json::to_vec(&body).expect("JSON"),
        )
        .await
    }

    async fn history(&self, conversation_id: &str, key: &str) -> Value {
        self.request(conversation_id, "history", bearer(key), "{}")
            .await
    }

    fn events(&self) -> Vec<Envelope> {
        self.log
            .read_from(1)
            .map(|envelope| envelope.expect("decodes"))
            .collect()
    }

    fn auth_failures(&self) -> Vec<AuthFailed> {
        self.events()
            .into_iter()
            .filter_map(|envelope| match envelope.event {
                Event::AuthFailed(failed) => Some(failed),
                _ => None,
            })
            .collect()
    }
}

/// Who a connection is: the service (its own inbox prefix, as `serve`
/// connects) or an application (NATS's default inbox).
enum Side {
    Service,
    Application,
}

async fn connect(server: &NatsServer, side: Side) -> Bus {
    let bus = match side {
        Side::Service => NatsBus::connect(&server.url()).await,
        Side::Application => {
            NatsBus::connect_with_options(&server.url(), async_nats::ConnectOptions::new()).await
        }
    }
    .unwrap_or_else(|error| panic!("connect to {}: {error}", server.url()));
    within("the connection", async {
        while !bus.is_connected() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    bus.into()
}

async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
}

fn bearer(key: &str) -> Headers {
    Headers::new().with("Authorization", format!("Bearer {key}"))
}

#[track_caller]
fn assert_error(reply: &Value, code: &str) {
    assert_eq!(reply["ok"], json!(false), "{reply}");
    assert_eq!(reply["error"]["code"], json!(code), "{reply}");
    let message = reply["error"]["message"].as_str().unwrap_or("");
    assert!(!message.is_empty(), "an error says what is wrong: {reply}");
}

/// Polls the history until it holds `count` messages.
async fn history_with(service: &Service, conversation_id: &str, key: &str, count: usize) -> Value {
    within("the reply in the history", async {
        loop {
            let history = service.history(conversation_id, key).await;
            assert_eq!(history["ok"], json!(true), "{history}");
            if history["messages"].as_array().map_or(0, Vec::len) >= count {
                return history;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

async fn send_ack_resend_and_history(transport: Transport) {
    let service = Service::start(transport).await;
    let key = service.issue_key("key_a", &[Scope::Chat]).await;

    let ack = service
        .send(
            "c1",
            &key,
            json!({"content": "hello there", "message_id": "m1"}),
        )
        .await;
    assert_eq!(ack["ok"], json!(true), "{ack}");
    assert_eq!(ack["conversation_id"], json!("c1"));
    assert_eq!(ack["message_id"], json!("m1"));
    let seq = ack["seq"].as_u64().expect("a seq");
    assert!(seq > 0);
    assert!(ack.get("duplicate").is_none(), "{ack}");

    let again = service
        .send(
            "c1",
            &key,
            json!({"content": "hello there", "message_id": "m1"}),
        )
        .await;
    assert_eq!(again["ok"], json!(true), "{again}");
    assert_eq!(again["seq"].as_u64(), Some(seq));
    assert_eq!(again["duplicate"], json!(true));

    let history = history_with(&service, "c1", &key, 2).await;
    assert_eq!(history["conversation_id"], json!("c1"));
    assert_eq!(history["erased"], json!(false));
    let messages = history["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 2, "one message, one reply: {history}");
    assert_eq!(messages[0]["role"], json!("user"));
    assert_eq!(messages[0]["message_id"], json!("m1"));
    assert_eq!(messages[0]["content"], json!("hello there"));
    assert_eq!(messages[0]["seq"].as_u64(), Some(seq));
    assert_eq!(messages[1]["role"], json!("assistant"));
    assert_eq!(messages[1]["content"], json!("echo: hello there"));
    assert_eq!(messages[1]["agent"], json!("echo"));
    assert!(messages[1]["at"].is_string());

    // Sends without a message_id get one; the user defaults to the key's owner.
    let ack = service.send("c1", &key, json!({"content": "again"})).await;
    assert_eq!(ack["ok"], json!(true), "{ack}");
    assert!(ack["message_id"].as_str().is_some_and(|id| !id.is_empty()));
    let received = service.events().into_iter().find_map(|e| match e.event {
        Event::MessageReceived(m) if m.content == "again" => Some(m),
        _ => None,
    });
    let received = received.expect("the message is stored");
    assert_eq!(received.key_id, "key_a");
    assert_eq!(received.user.as_deref(), Some("owner-of-key_a"));
    assert!(service.auth_failures().is_empty());
    service.shutdown().await;
}

async fn a_waited_send_answers_with_its_stored_reply(transport: Transport) {
    let service = Service::start(transport).await;
    let key = service.issue_key("key_w", &[Scope::Chat]).await;
    let body = json!({"content": "hello there", "message_id": "w1"});

    let answer = service
        .send_waiting("cw", &key, "reply", body.clone())
        .await;
    assert_eq!(answer["ok"], json!(true), "{answer}");
    let seq = answer["seq"].as_u64().expect("a seq");
    let turn = answer["turn"].as_array().expect("the turn's end");
    let types: Vec<&str> = turn.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(types, ["reply_completed", "usage_recorded"], "{answer}");
    assert_eq!(turn[0]["data"]["content"], json!("echo: hello there"));
    assert_eq!(turn[0]["data"]["message_id"], json!("w1"));
    assert!(turn[1]["data"]["completion_tokens"].as_u64() > Some(0));
    // Exactly the stored events, as the log holds them.
    let stored: Vec<Value> = service
        .events()
        .into_iter()
        .filter(|e| e.seq > seq)
        .filter(|e| matches!(e.event, Event::ReplyCompleted(_) | Event::UsageRecorded(_)))
        .map(|e| serde_json::to_value(e).expect("JSON"))
        .collect();
    assert_eq!(turn, &stored);

    // A resend starts no turn, so it has no end to wait for: the ack alone.
    let again = service.send_waiting("cw", &key, "reply", body).await;
    assert_eq!(again["duplicate"], json!(true), "{again}");
    assert!(again.get("turn").is_none(), "{again}");

    // Any other value is refused before anything is stored.
    let head = service.log.head();
    let refused = service
        .send_waiting("cw", &key, "forever", json!({"content": "x"}))
        .await;
    assert_error(&refused, "invalid_request");
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Switchboard-Wait")),
        "{refused}"
    );
    assert_eq!(service.log.head(), head, "a refused send stores nothing");
    service.shutdown().await;
}

async fn a_stopping_gateway_answers_a_waiting_send_with_its_ack(transport: Transport) {
    let service = Service::start(transport).await;
    let key = service.issue_key("key_s", &[Scope::Chat]).await;
    let words = 30;
    let body = json!({
        "content": vec!["word"; words].join(" "),
        "message_id": "s1",
        "agent": "slow",
    });
    let client = service.client.clone();
    let headers = bearer(&key).with("Switchboard-Wait", "reply");
    let waiting = tokio::spawn(async move {
        let payload = serde_json::to_vec(&body).expect("JSON");
        client
            .request("sb.conv.cs.send", headers, payload, WAIT)
            .await
    });
    within("the message is stored", async {
        while !service
            .events()
            .iter()
            .any(|e| matches!(&e.event, Event::MessageReceived(m) if m.message_id == "s1"))
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    let stopped_at = std::time::Instant::now();
    let shutdown = tokio::spawn(service.shutdown());
    let reply = within("the waiting send's answer", waiting)
        .await
        .expect("the task")
        .expect("answered");
    let answered_in = stopped_at.elapsed();
    let answer: Value = serde_json::from_slice(&reply.payload).expect("JSON");
    assert_eq!(answer["ok"], json!(true), "{answer}");
    assert_eq!(answer["message_id"], json!("s1"));
    assert!(answer.get("turn").is_none(), "{answer}");
    let turn = SLOW_WORD * words as u32;
    assert!(
        answered_in < turn / 2,
        "answered {answered_in:?} after the stop; the turn takes {turn:?}"
    );
    shutdown.await.expect("the service stops");
}

async fn every_request_delivered_to_a_stopping_gateway_is_answered(transport: Transport) {
    let service = Service::start(transport).await;
    let key = service.issue_key("key_d", &[Scope::Chat]).await;
    let mut requests = tokio::task::JoinSet::new();
    // Half at once, to be queued when the gateway stops; the rest over about
    // 75 ms, so that the stop comes in their midst.
    let start = tokio::time::Instant::now();
    for i in 0..300u32 {
        let client = service.client.clone();
        let headers = bearer(&key);
        requests.spawn(async move {
            let paced = Duration::from_micros(500) * i.saturating_sub(150);
            tokio::time::sleep_until(start + paced).await;
            let body = json!({ "content": "hi", "message_id": format!("d{i}") });
            let payload = serde_json::to_vec(&body).expect("JSON");
            let subject = format!("sb.conv.d{}.send", i % 30);
            client
                .request(&subject, headers, payload, Duration::from_secs(10))
                .await
        });
    }
    // Stop once the first is answered, while the rest are still arriving
    // and queued (a fixed pause could, on a busy machine, stop the gateway
    // before any request reached it). Those that arrive after the stop find
    // no responders.
    let (mut answered, mut no_responders, mut lost) = (0, 0, Vec::new());
    let (mut service, mut shutdown) = (Some(service), None);
    while let Some(outcome) = requests.join_next().await {
        match outcome.expect("the request task") {
            Ok(_) => answered += 1,
            Err(error) if error.code() == "no_responders" => no_responders += 1,
            Err(error) => lost.push(error.to_string()),
        }
        if let Some(service) = service.take() {
            shutdown = Some(tokio::spawn(service.shutdown()));
        }
    }
    // Before the drain, a stop lost about half of them (108 to 155 of 300 in
    // three of four runs). Then async-nats forgot a drained subscription once
    // its UNSUB was written, a round trip early, and requests the server
    // routed in that window were dropped unread: up to 254 of 300 beside two
    // busy cores, when the requests came in just as the gateway stopped. The
    // vendored async-nats keeps the subscription until the server has
    // answered a PING sent after the UNSUB; the gateway then reads all 300.
    // The 1 to 3 still lost under load (beside four busy loops) had been
    // answered: the harness stopped nats-server as soon as the service had
    // stopped, with the last answers on their way. Now the stop flushes its
    // answers before it returns, and this test keeps NATS up until every
    // request is done. None may be lost.
    assert!(
        lost.is_empty(),
        "requests delivered to the gateway went unanswered: {lost:?}"
    );
    assert_eq!(answered + no_responders + lost.len(), 300);
    assert!(answered > 0, "the stop came before any request");
    // Only now may NATS stop: requests were on their way until just now.
    let nats = shutdown
        .expect("the service was stopped")
        .await
        .expect("the service stops");
    drop(nats);
}

/// With NATS away, a turn's reply deltas cannot be published; they must not
/// hold up the turn (async-nats queues 2048 commands, then a publish waits
/// for the server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_ends_on_time_while_nats_is_away() {
    let mut service = Service::start(Transport::Nats).await;
    let key = service.issue_key("key_n", &[Scope::Chat]).await;
    let words = 6000;
    let body = json!({
        "content": vec!["w"; words].join(" "),
        "message_id": "n1",
        "agent": "chatty",
    });
    let reply = service
        .request(
            "cn",
            "send",
            bearer(&key),
            serde_json::to_vec(&body).expect("JSON"),
        )
        .await;
    assert_eq!(reply["ok"], json!(true), "{reply}");
    service.server.as_mut().expect("NATS").stop();
    // 6000 words at 500 µs: about 3 s of turn; far less than the agent's
    // 120 s timeout, which a turn held up by its deltas would run into.
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let ended = service.events().into_iter().find_map(|e| match e.event {
                Event::ReplyCompleted(_) => Some("completed"),
                Event::ReplyFailed(_) => Some("failed"),
                _ => None,
            });
            if let Some(ended) = ended {
                return ended;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the turn ends while NATS is away");
    assert_eq!(ended, "completed");
    service.server.as_mut().expect("NATS").restart();
    service.shutdown().await;
}

async fn bad_keys_are_unauthorized_and_audited(transport: Transport) {
    let service = Service::start(transport).await;
    let revoked = service.issue_key("key_r", &[Scope::Chat]).await;
    service.revoke_key("key_r").await;
    let unknown = ApiKey::generate().expose().to_owned();
    let body = serde_json::to_vec(&json!({"content": "hi"})).expect("JSON");

    let cases = [
        ("missing", Headers::new(), "missing_key"),
        (
            "garbage",
            Headers::new().with("Authorization", "not-a-bearer-at-all"),
            "malformed_authorization",
        ),
        (
            "garbage bearer",
            // A client claiming to be the HTTP front.
            Headers::new()
                .with("Authorization", "Bearer not-a-real-key-at-all")
                .with("Switchboard-Channel", "http")
                .with("Switchboard-Remote", "192.0.2.1:4444"),
            "unknown_key",
        ),
        ("unknown", bearer(&unknown), "unknown_key"),
        ("revoked", bearer(&revoked), "revoked_key"),
    ];
    for (what, headers, reason) in cases {
        let before = service.auth_failures().len();
        let head = service.log.head();
        let reply = service.request("c1", "send", headers, body.clone()).await;
        assert_error(&reply, "unauthorized");
        let failures = service.auth_failures();
        assert_eq!(failures.len(), before + 1, "{what}: one auth_failed");
        assert_eq!(
            service.log.head(),
            head + 1,
            "{what}: nothing else appended"
        );
        let failure = failures.last().expect("one");
        assert_eq!(failure.reason, reason, "{what}");
        assert!(
            failure
                .key_prefix
                .as_ref()
                .is_none_or(|p| p.chars().count() <= 8),
            "{what}: {failure:?}"
        );
    }
    let prefixes: Vec<Option<String>> = service
        .auth_failures()
        .into_iter()
        .map(|f| f.key_prefix)
        .collect();
    // Over NATS a client's claim to be the front is not believed; the
    // embedded bus carries only this process's own requests.
    let claimed = &service.auth_failures()[2];
    match transport {
        Transport::Nats => {
            assert_eq!(claimed.channel, AuthChannel::Nats, "{claimed:?}");
            assert_eq!(claimed.remote, None, "{claimed:?}");
        }
        Transport::Local => {
            assert_eq!(claimed.channel, AuthChannel::Http, "{claimed:?}");
            assert_eq!(claimed.remote.as_deref(), Some("192.0.2.1:4444"));
        }
    }
    assert_eq!(prefixes[0], None, "no key, no prefix");
    assert_eq!(prefixes[3], Some(unknown.chars().take(8).collect()));
    assert_eq!(prefixes[4], Some(revoked.chars().take(8).collect()));
    // History is guarded the same way.
    let reply = service.history("c1", &unknown).await;
    assert_error(&reply, "unauthorized");

    let everything: String = service.events().iter().map(Envelope::to_json).collect();
    for key in [&revoked, &unknown] {
        assert!(
            !everything.contains(key.as_str()),
            "a whole key is in the log"
        );
    }
    assert!(!everything.contains("not-a-real-key-at-all"));
    assert!(
        !service.events().iter().any(|e| matches!(
            e.event,
            Event::MessageReceived(_) | Event::ConversationStarted(_)
        )),
        "nothing was sent"
    );
    service.shutdown().await;
}

async fn bad_input_is_refused_and_stores_nothing(transport: Transport) {
    let service = Service::start(transport).await;
    let chat = service.issue_key("key_c", &[Scope::Chat]).await;
    let admin_only = service.issue_key("key_x", &[Scope::Admin]).await;
    let head = service.log.head();

    let reply = service
        .send("c1", &admin_only, json!({"content": "hi"}))
        .await;
    assert_error(&reply, "forbidden");
    assert_eq!(service.auth_failures().len(), 1, "forbidden is audited");
    assert_eq!(
        service.auth_failures()[0].reason,
        "missing_scope",
        "{:?}",
        service.auth_failures()
    );
    let head = head + 1;

    let long_id = "a".repeat(129);
    let reply = service
        .send(&long_id, &chat, json!({"content": "hi"}))
        .await;
    assert_error(&reply, "invalid_request");
    assert!(reply["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("conversation id")));

    let bodies: Vec<(&str, Headers, Vec<u8>, &str)> = vec![
        (
            "malformed JSON",
            bearer(&chat),
            b"{\"content\":".to_vec(),
            "JSON",
        ),
        ("not an object", bearer(&chat), b"[1,2]".to_vec(), "JSON"),
        (
            "empty content",
            bearer(&chat),
            br#"{"content":""}"#.to_vec(),
            "content",
        ),
        (
            "missing content",
            bearer(&chat),
            br#"{"message_id":"m1"}"#.to_vec(),
            "content",
        ),
        (
            "wrong type",
            bearer(&chat),
            br#"{"content":42}"#.to_vec(),
            "JSON",
        ),
        (
            "huge body",
            bearer(&chat),
            serde_json::to_vec(&json!({"content": "x".repeat(MAX_BODY_BYTES + 10)})).expect("JSON"),
            "exceeds",
        ),
        (
            "bad postcard",
            bearer(&chat).with("Content-Type", "application/postcard"),
            vec![0xff, 0xff, 0xff],
            "postcard",
        ),
        (
            "unknown content type",
            bearer(&chat).with("Content-Type", "text/plain"),
            b"hi".to_vec(),
            "Content-Type",
        ),
        (
            "unknown agent",
            bearer(&chat),
            br#"{"content":"hi","agent":"nobody"}"#.to_vec(),
            "agent",
        ),
    ];
    for (what, headers, body, needle) in bodies {
        let reply = service.request("c1", "send", headers, body).await;
        assert_error(&reply, "invalid_request");
        let message = reply["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains(needle), "{what}: {reply}");
    }
    assert_eq!(service.log.head(), head, "bad input appends nothing");
    assert_eq!(service.auth_failures().len(), 1);
    service.shutdown().await;
}

async fn postcard_bodies_work(transport: Transport) {
    let service = Service::start(transport).await;
    let key = service.issue_key("key_p", &[Scope::Chat]).await;
    let request = SendRequest {
        content: "binary hello".into(),
        message_id: Some("pc-1".into()),
        agent: Some("echo".into()),
        user: Some("bob".into()),
    };
    let body = postcard::to_stdvec(&request).expect("postcard");
    let headers = bearer(&key)
        .with("Content-Type", "application/postcard")
        .with("traceparent", TRACEPARENT);
    let ack = service.request("pc", "send", headers, body).await;
    assert_eq!(ack["ok"], json!(true), "{ack}");
    assert_eq!(ack["message_id"], json!("pc-1"));

    let history = history_with(&service, "pc", &key, 2).await;
    assert_eq!(history["messages"][0]["content"], json!("binary hello"));
    assert_eq!(
        history["messages"][1]["content"],
        json!("echo: binary hello")
    );
    let received = service.events().into_iter().find_map(|e| match e.event {
        Event::MessageReceived(m) => Some(m),
        _ => None,
    });
    assert_eq!(received.expect("stored").user.as_deref(), Some("bob"));
    let stored = service.events();
    let traced = stored.iter().filter(|e| {
        matches!(
            e.event,
            Event::MessageReceived(_) | Event::ReplyCompleted(_)
        )
    });
    for envelope in traced {
        assert_eq!(
            envelope.traceparent.as_deref(),
            Some(TRACEPARENT),
            "{envelope:?}"
        );
        assert!(envelope.correlation_id.is_some());
    }
    service.shutdown().await;
}

/// A history longer than a bus message can carry (1 MiB) is read in pages,
/// forwards and backwards; a bad paging request is refused and stores nothing.
async fn a_long_history_is_read_in_pages(transport: Transport) {
    let service = Service::start(transport).await;
    let key = service.issue_key("key_p", &[Scope::Chat]).await;
    let stream = StreamId::conversation("long").expect("valid id");
    service
        .append(
            stream.clone(),
            Event::ConversationStarted(ConversationStarted {
                conversation_id: "long".into(),
                key_id: "key_p".into(),
                user: None,
            }),
        )
        .await;
    let mut ids = Vec::new();
    for i in 0..40 {
        let id = format!("m{i:02}");
        let message = Event::MessageReceived(MessageReceived {
            conversation_id: "long".into(),
            message_id: id.clone(),
            key_id: "key_p".into(),
            user: None,
            // 40 × 32 KiB: 1.3 MB of history.
            content: format!("{id} {}", "x".repeat(32 * 1024)),
            agent: None,
        });
        service.append(stream.clone(), message).await;
        ids.push(id);
    }
    let page = |body: Value| {
        let service = &service;
        let key = key.clone();
        async move {
            let reply = service
                .request("long", "history", bearer(&key), body.to_string())
                .await;
            assert_eq!(reply["ok"], json!(true), "{body}: {reply}");
            let messages = reply["messages"].as_array().expect("messages").clone();
            let seqs: Vec<u64> = messages
                .iter()
                .map(|m| m["seq"].as_u64().expect("seq"))
                .collect();
            let ids: Vec<String> = messages
                .iter()
                .map(|m| m["message_id"].as_str().expect("id").to_owned())
                .collect();
            (ids, seqs, reply["has_more"].as_bool().expect("has_more"))
        }
    };

    // The first page stops at about 256 KiB; the next ones follow it.
    let (first, seqs, more) = page(json!({})).await;
    assert!(more && !first.is_empty() && first.len() < 10, "{first:?}");
    assert_eq!(first, ids[..first.len()]);
    let (mut forwards, mut after) = (first, *seqs.last().expect("a message"));
    loop {
        let (got, seqs, more) = page(json!({"after_seq": after})).await;
        forwards.extend(got);
        if !more {
            break;
        }
        after = *seqs.last().expect("a page with more is not empty");
    }
    assert_eq!(forwards, ids);

    // Backwards from the end, three at a time.
    let (last, seqs, more) = page(json!({"latest": true, "limit": 3})).await;
    assert!(more);
    assert_eq!(last, ids[37..]);
    let (mut backwards, mut before) = (last, seqs[0]);
    loop {
        let (got, seqs, more) = page(json!({"before_seq": before, "limit": 3})).await;
        backwards.splice(0..0, got);
        if !more {
            break;
        }
        before = seqs[0];
    }
    assert_eq!(backwards, ids);

    let head = service.log.head();
    for (body, needle) in [
        (r#"{"after_seq":1,"before_seq":9}"#, "direction"),
        (r#"{"after_seq":1,"latest":true}"#, "direction"),
        (r#"{"before_seq":9,"latest":true}"#, "give one"),
        (r#"{"limit":"ten"}"#, "JSON"),
        (r#"{"after_seq":-1}"#, "JSON"),
        (r#"{"page":2}"#, "page"),
        ("{\"after_seq\":", "JSON"),
    ] {
        let reply = service.request("long", "history", bearer(&key), body).await;
        assert_error(&reply, "invalid_request");
        let message = reply["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains(needle), "{body}: {reply}");
    }
    assert_eq!(service.log.head(), head, "a bad request stores nothing");
    service.shutdown().await;
}

async fn history_of_another_keys_conversation_is_forbidden(transport: Transport) {
    let service = Service::start(transport).await;
    let alice = service.issue_key("key_alice", &[Scope::Chat]).await;
    let mallory = service.issue_key("key_mallory", &[Scope::Chat]).await;
    let admin = service.issue_key("key_admin", &[Scope::Admin]).await;

    let ack = service
        .send("private", &alice, json!({"content": "secret"}))
        .await;
    assert_eq!(ack["ok"], json!(true), "{ack}");
    let mine = service.history("private", &alice).await;
    assert_eq!(mine["ok"], json!(true), "{mine}");
    assert!(!mine["messages"].as_array().expect("messages").is_empty());

    let before = service.auth_failures().len();
    let theirs = service.history("private", &mallory).await;
    assert_error(&theirs, "forbidden");
    assert!(!theirs.to_string().contains("secret"));
    let failures = service.auth_failures();
    assert_eq!(failures.len(), before + 1);
    assert_eq!(failures.last().expect("one").reason, "not_owner");

    let audited = service.history("private", &admin).await;
    assert_eq!(audited["ok"], json!(true), "admin reads any: {audited}");

    // Nobody started this one: an empty history, not an error.
    let empty = service.history("nobody-here", &mallory).await;
    assert_eq!(empty["ok"], json!(true), "{empty}");
    assert_eq!(empty["messages"], json!([]));
    assert_eq!(empty["erased"], json!(false));
    service.shutdown().await;
}

/// The conversation's history is the agent's context, so a send from another
/// key would read it through the reply: it is refused and audited, and nothing
/// is stored.
async fn sending_into_another_keys_conversation_is_forbidden(transport: Transport) {
    let service = Service::start(transport).await;
    let alice = service.issue_key("key_alice", &[Scope::Chat]).await;
    let mallory = service.issue_key("key_mallory", &[Scope::Chat]).await;

    let ack = service
        .send(
            "private",
            &alice,
            json!({"content": "secret", "message_id": "m1"}),
        )
        .await;
    assert_eq!(ack["ok"], json!(true), "{ack}");
    // Alice's turn appends its reply on its own; let it finish first.
    service.turns.wait_idle().await;
    let before = service.auth_failures().len();
    let head = service.log.head();

    let intrusion = service
        .send(
            "private",
            &mallory,
            json!({"content": "what did alice say?"}),
        )
        .await;
    assert_error(&intrusion, "forbidden");
    // Resending alice's message id does not reveal her ack either.
    let probe = service
        .send(
            "private",
            &mallory,
            json!({"content": "x", "message_id": "m1"}),
        )
        .await;
    assert_error(&probe, "forbidden");
    assert!(!probe.to_string().contains("seq"), "{probe}");

    let failures = service.auth_failures();
    assert_eq!(failures.len(), before + 2, "each refusal is audited");
    assert!(failures[before..].iter().all(|f| f.reason == "not_owner"));
    service.turns.wait_idle().await;
    assert_eq!(
        service.log.head(),
        head + 2,
        "nothing but the two auth_failed events is stored"
    );
    service.shutdown().await;
}

/// A send published with no reply subject is stored all the same, and its
/// turn (which starts once the request is done with) runs: the history gets
/// its reply.
async fn a_send_without_a_reply_subject_is_stored_and_its_turn_runs(transport: Transport) {
    let service = Service::start(transport).await;
    let key = service.issue_key("key_a", &[Scope::Chat]).await;
    let body = serde_json::to_vec(&json!({"content": "no answer wanted", "message_id": "m1"}))
        .expect("JSON");
    service
        .client
        .publish(
            "sb.conv.quiet.send",
            bearer(&key).with("Content-Type", "application/json"),
            body,
        )
        .await
        .expect("published");
    service.client.flush().await.expect("flushed");
    let history = history_with(&service, "quiet", &key, 2).await;
    let messages = history["messages"].as_array().expect("messages");
    assert_eq!(
        messages[0]["content"],
        json!("no answer wanted"),
        "{history}"
    );
    assert_eq!(
        messages[1]["content"],
        json!("echo: no answer wanted"),
        "{history}"
    );
    service.shutdown().await;
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
    send_ack_resend_and_history,
    a_waited_send_answers_with_its_stored_reply,
    a_stopping_gateway_answers_a_waiting_send_with_its_ack,
    every_request_delivered_to_a_stopping_gateway_is_answered,
    bad_keys_are_unauthorized_and_audited,
    bad_input_is_refused_and_stores_nothing,
    postcard_bodies_work,
    history_of_another_keys_conversation_is_forbidden,
    a_long_history_is_read_in_pages,
    sending_into_another_keys_conversation_is_forbidden,
    a_send_without_a_reply_subject_is_stored_and_its_turn_runs,
);
