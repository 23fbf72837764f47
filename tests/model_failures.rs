//! The model server misbehaving, end to end (DESIGN §5): the whole service
//! in-process on the embedded bus, its one agent calling a fake
//! OpenAI-compatible server that hangs, answers 500, 429 or 400, cuts its
//! stream or cannot be reached. Each turn ends `reply_completed` (after
//! retrying what is worth retrying) or `reply_failed` with a code, exactly
//! once, and nothing hangs: every wait here is bounded, so a hang fails the
//! test instead of blocking it.

#[path = "../actors/tests/support/fake_openai.rs"]
mod fake_openai;
mod support;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use fake_openai::{Behaviour, FakeOpenAi, REPLY, USAGE};
use serde_json::{json, Value};
use support::bus::request;
use switchboard::bus::{Bus, Subscription};
use switchboard::server::{AgentSpec, ProviderSpec, Server, ServerConfig};
use switchboard_actors::agent::AgentConfig;
use switchboard_actors::turns::{LOST_TURN_CODE, LOST_TURN_MESSAGE};

/// The bound on every wait: only a hang should ever reach it.
const WAIT: Duration = Duration::from_secs(20);
const ADMIN_KEY: &str = "sb-admin-key-for-model-failures-0123456789";
const AGENT: &str = "model";
const MODEL: &str = "fake-model";
const CONVERSATION: &str = "c1";

/// An agent quick to give up: 2 s per attempt (ample for the fake's instant
/// replies on a loaded machine), two retries 50–100 ms and 100–200 ms apart,
/// and a circuit that stays closed unless a test lowers its threshold.
fn agent_config() -> AgentConfig {
    AgentConfig {
        timeout: Duration::from_secs(2),
        max_retries: 2,
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_secs(1),
        circuit_failure_threshold: 100,
        circuit_open_for: Duration::from_secs(60),
        ..AgentConfig::new(AGENT)
    }
}

/// The service on the embedded bus, with one `openai` agent at `base_url`.
fn server_config(data: &Path, base_url: String, agent: AgentConfig) -> ServerConfig {
    let mut config = ServerConfig::new(data);
    config.admin_key = Some(ADMIN_KEY.to_owned());
    config.agents = vec![AgentSpec {
        config: agent,
        provider: ProviderSpec::OpenAi {
            base_url,
            model: MODEL.to_owned(),
            api_key: None,
        },
    }];
    config.default_agent = AGENT.to_owned();
    config
}

/// A running service, the fake its agent calls, and a chat key.
struct Setup {
    server: Server,
    /// `None` when the agent points at a server that is not there.
    fake: Option<FakeOpenAi>,
    key: String,
    _dir: tempfile::TempDir,
}

impl Setup {
    /// A service whose agent calls a fake answering its requests with `script`.
    async fn start(script: Vec<Behaviour>, agent: AgentConfig) -> Setup {
        let fake = FakeOpenAi::start_script(script).await;
        let base_url = fake.base_url();
        Setup::start_at(base_url, Some(fake), agent).await
    }

    async fn start_at(base_url: String, fake: Option<FakeOpenAi>, agent: AgentConfig) -> Setup {
        let dir = tempfile::tempdir().expect("a temp dir");
        let config = server_config(&dir.path().join("data"), base_url, agent);
        let server = Server::start(config).await.expect("the server starts");
        let key = issue_key(server.bus()).await;
        Setup {
            server,
            fake,
            key,
            _dir: dir,
        }
    }

    fn bus(&self) -> &Bus {
        self.server.bus()
    }

    fn fake(&self) -> &FakeOpenAi {
        self.fake.as_ref().expect("this setup has a fake")
    }

    /// Sends `content` as `message_id` and returns the ack (asserting it is one).
    async fn send(&self, message_id: &str, content: &str) -> Value {
        send(self.bus(), &self.key, message_id, content).await
    }
}

/// Issues a chat key through the admin subject.
async fn issue_key(bus: &Bus) -> String {
    let issued = request(
        bus,
        "sb.admin.keys.issue",
        ADMIN_KEY,
        json!({ "name": "model failures" }),
    )
    .await;
    assert_eq!(issued["ok"], json!(true), "{issued}");
    issued["key"].as_str().expect("key").to_owned()
}

/// A request with `Authorization: Bearer <key>`, answered within [`WAIT`].
async fn send(bus: &Bus, key: &str, message_id: &str, content: &str) -> Value {
    let ack = request(
        bus,
        &format!("sb.conv.{CONVERSATION}.send"),
        key,
        json!({ "content": content, "message_id": message_id }),
    )
    .await;
    assert_eq!(ack["ok"], json!(true), "{ack}");
    assert_eq!(ack["message_id"], json!(message_id), "{ack}");
    ack
}

/// The conversation's history; answering it at all shows nothing is stuck.
async fn history(bus: &Bus, key: &str) -> Vec<Value> {
    let history = request(
        bus,
        &format!("sb.conv.{CONVERSATION}.history"),
        key,
        json!({}),
    )
    .await;
    assert_eq!(history["ok"], json!(true), "{history}");
    history["messages"].as_array().expect("messages").clone()
}

/// Every stored event, as the JSON of its envelope.
fn events(server: &Server) -> Vec<Value> {
    server
        .log()
        .read_from(1)
        .map(|envelope| serde_json::to_value(envelope.expect("decodes")).expect("JSON"))
        .collect()
}

/// The stored events of `kind` about `message_id`.
fn events_of(server: &Server, kind: &str, message_id: &str) -> Vec<Value> {
    events(server)
        .into_iter()
        .filter(|e| e["type"] == json!(kind) && e["data"]["message_id"] == json!(message_id))
        .collect()
}

/// No hung request: the history answers, and each message received in the
/// conversation has exactly one end (`reply_completed` or `reply_failed`)
/// in the log.
async fn assert_every_turn_ended_once(server: &Server, key: &str) {
    history(server.bus(), key).await;
    let mut ends: HashMap<String, usize> = HashMap::new();
    let mut received = Vec::new();
    for event in events(server) {
        if event["data"]["conversation_id"] != json!(CONVERSATION) {
            continue;
        }
        let message_id = event["data"]["message_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match event["type"].as_str() {
            Some("message_received") => received.push(message_id),
            Some("reply_completed" | "reply_failed") => *ends.entry(message_id).or_default() += 1,
            _ => {}
        }
    }
    assert!(!received.is_empty(), "no message was stored");
    for message_id in &received {
        let count = ends.get(message_id).copied().unwrap_or(0);
        assert_eq!(count, 1, "{message_id} has {count} turn ends");
    }
    assert_eq!(
        ends.len(),
        received.len(),
        "ends without a message: {ends:?}"
    );
}

/// Everything published about the conversation (stored events and the
/// ephemeral `reply_delta`s), in the order it arrived.
struct Watch {
    subscription: Subscription,
    /// `(type, payload)`; the type is the subject's last token.
    seen: Vec<(String, Value)>,
}

impl Watch {
    /// Subscribes before anything is sent, so nothing is missed.
    async fn start(bus: &Bus) -> Watch {
        let subscription = bus
            .subscribe(&format!("sb.evt.conv.{CONVERSATION}.*"))
            .await
            .expect("subscribes");
        Watch {
            subscription,
            seen: Vec::new(),
        }
    }

    /// Receives until a message of one of `kinds` about `message_id` arrives.
    async fn until(&mut self, kinds: &[&str], message_id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some((_, found)) = self.seen.iter().find(|(kind, payload)| {
                kinds.contains(&kind.as_str()) && message_id_of(kind, payload) == message_id
            }) {
                return found.clone();
            }
            let message = tokio::time::timeout_at(deadline, self.subscription.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no {kinds:?} for {message_id} within {WAIT:?}; seen: {:?}",
                        self.seen
                    )
                })
                .expect("the subscription stays open");
            let kind = message
                .subject
                .rsplit('.')
                .next()
                .expect("a subject has a last token")
                .to_owned();
            let payload = serde_json::from_slice(&message.payload).expect("JSON");
            self.seen.push((kind, payload));
        }
    }

    /// The event that ended the turn of `message_id`.
    async fn end_of(&mut self, message_id: &str) -> Value {
        self.until(&["reply_completed", "reply_failed"], message_id)
            .await
    }

    /// The text the turn of `message_id` streamed, once it reads `expected`
    /// (deltas are published live, apart from the stored events, so they
    /// may arrive after the turn's end).
    async fn streamed(&mut self, message_id: &str, expected: &str) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = self.deltas(message_id);
            if text == expected || tokio::time::Instant::now() >= deadline {
                return text;
            }
            let _ = tokio::time::timeout_at(deadline, async {
                if let Some(message) = self.subscription.recv().await {
                    let kind = message.subject.rsplit('.').next().unwrap_or("").to_owned();
                    let payload = serde_json::from_slice(&message.payload).expect("JSON");
                    self.seen.push((kind, payload));
                }
            })
            .await;
        }
    }

    /// The `reply_delta`s of `message_id` seen so far, concatenated in index order.
    fn deltas(&self, message_id: &str) -> String {
        let mut deltas: Vec<(u64, &str)> = self
            .seen
            .iter()
            .filter(|(kind, payload)| {
                kind == "reply_delta" && payload["message_id"] == json!(message_id)
            })
            .map(|(_, payload)| {
                (
                    payload["index"].as_u64().expect("index"),
                    payload["delta"].as_str().expect("delta"),
                )
            })
            .collect();
        deltas.sort_unstable();
        deltas.into_iter().map(|(_, delta)| delta).collect()
    }
}

/// A delta names its message at the top; a stored event inside `data`.
fn message_id_of<'a>(kind: &str, payload: &'a Value) -> &'a str {
    let id = if kind == "reply_delta" {
        &payload["message_id"]
    } else {
        &payload["data"]["message_id"]
    };
    id.as_str().unwrap_or_default()
}

/// Polls until `done` holds, for at most [`WAIT`].
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How one turn against a misbehaving fake must end.
struct Expect {
    /// `None`: `reply_completed` with the fake's reply.
    code: Option<&'static str>,
    /// Requests the fake gets: one per attempt.
    requests: usize,
    /// What the turn streams as `reply_delta`s.
    streamed: &'static str,
    /// Whether `usage_recorded` charges the turn (a completed turn, or one
    /// cut off after streaming).
    charged: bool,
}

/// What [`one_turn`] saw, for further checks.
struct Turn {
    setup: Setup,
    end: Value,
    watch: Watch,
}

/// Sends one message to a service whose fake plays `script`, and checks the
/// turn ends as `expect` says — once, with the partial text of a failed
/// turn stored nowhere, and the history still answering.
async fn one_turn(script: Vec<Behaviour>, agent: AgentConfig, expect: Expect) -> Turn {
    let setup = Setup::start(script, agent).await;
    check_turn(setup, expect).await
}

async fn check_turn(setup: Setup, expect: Expect) -> Turn {
    let mut watch = Watch::start(setup.bus()).await;
    let ack = setup.send("m1", "hello").await;
    assert!(ack["seq"].as_u64().is_some_and(|seq| seq > 0), "{ack}");
    let end = watch.end_of("m1").await;

    match expect.code {
        None => {
            assert_eq!(end["type"], json!("reply_completed"), "{end}");
            assert_eq!(end["data"]["content"], json!(REPLY.concat()), "{end}");
            assert_eq!(end["data"]["agent"], json!(AGENT), "{end}");
        }
        Some(code) => {
            assert_eq!(end["type"], json!("reply_failed"), "{end}");
            assert_eq!(end["data"]["code"], json!(code), "{end}");
            assert_eq!(end["data"]["agent"], json!(AGENT), "{end}");
            assert!(
                end["data"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{end}"
            );
        }
    }
    if let Some(fake) = &setup.fake {
        assert_eq!(
            fake.request_count(),
            expect.requests,
            "requests at the fake"
        );
    }

    // The turn's events are appended in one go, so its usage (if any) is in
    // the log by the time its end is published.
    let usage = events_of(&setup.server, "usage_recorded", "m1");
    if expect.charged {
        assert_eq!(usage.len(), 1, "{usage:?}");
        assert_eq!(
            usage[0]["causation_id"], end["id"],
            "the charge is caused by the turn's end"
        );
        assert_eq!(usage[0]["data"]["model"], json!(MODEL));
    } else {
        assert!(
            usage.is_empty(),
            "a turn that streamed nothing is not charged: {usage:?}"
        );
    }

    let streamed = watch.streamed("m1", expect.streamed).await;
    assert_eq!(streamed, expect.streamed, "the deltas published");

    let messages = history(setup.bus(), &setup.key).await;
    let roles: Vec<&Value> = messages.iter().map(|m| &m["role"]).collect();
    if expect.code.is_none() {
        assert_eq!(roles, [&json!("user"), &json!("assistant")], "{messages:?}");
        assert_eq!(messages[1]["content"], json!(REPLY.concat()));
    } else {
        // A failed turn stores no reply, not even the part it streamed.
        assert_eq!(roles, [&json!("user")], "{messages:?}");
        assert!(
            events_of(&setup.server, "reply_completed", "m1").is_empty(),
            "a failed turn has no reply_completed"
        );
    }
    assert_every_turn_ended_once(&setup.server, &setup.key).await;
    Turn { setup, end, watch }
}

#[tokio::test]
async fn a_model_that_never_answers_fails_the_turn_with_timeout_after_every_retry() {
    let setup = Setup::start(vec![Behaviour::Hang], agent_config()).await;
    let mut watch = Watch::start(setup.bus()).await;
    setup.send("m1", "hello").await;
    // The ack does not wait for the model: the turn cannot have ended yet
    // (each of its three attempts waits out a 2 s timeout).
    assert!(
        events_of(&setup.server, "reply_failed", "m1").is_empty(),
        "the ack came after the turn's end"
    );
    let end = watch.end_of("m1").await;
    assert_eq!(end["type"], json!("reply_failed"), "{end}");
    assert_eq!(end["data"]["code"], json!("timeout"), "{end}");
    assert_eq!(setup.fake().request_count(), 3, "1 attempt + 2 retries");
    assert!(events_of(&setup.server, "usage_recorded", "m1").is_empty());
    assert_eq!(history(setup.bus(), &setup.key).await.len(), 1);
    assert_every_turn_ended_once(&setup.server, &setup.key).await;
    setup.server.shutdown().await;
}

#[tokio::test]
async fn a_500_then_a_reply_completes_after_one_retry_and_records_the_reported_usage() {
    let turn = one_turn(
        vec![Behaviour::ServerError, Behaviour::Normal],
        agent_config(),
        Expect {
            code: None,
            requests: 2,
            streamed: "Hello from the fake model.",
            charged: true,
        },
    )
    .await;
    let Turn {
        setup,
        end,
        mut watch,
    } = turn;
    assert_eq!(end["data"]["finish_reason"], json!("stop"), "{end}");
    // `usage_recorded` follows the reply on the bus too, with the fake's counts.
    let usage = watch.until(&["usage_recorded"], "m1").await;
    let (prompt, completion) = USAGE;
    assert_eq!(usage["data"]["prompt_tokens"], json!(prompt), "{usage}");
    assert_eq!(
        usage["data"]["completion_tokens"],
        json!(completion),
        "{usage}"
    );
    assert_eq!(usage["data"]["estimated"], json!(false), "{usage}");
    assert_eq!(usage["data"]["agent"], json!(AGENT), "{usage}");
    let order: Vec<&str> = watch
        .seen
        .iter()
        .filter(|(kind, _)| kind == "reply_completed" || kind == "usage_recorded")
        .map(|(kind, _)| kind.as_str())
        .collect();
    assert_eq!(order, ["reply_completed", "usage_recorded"]);
    setup.server.shutdown().await;
}

#[tokio::test]
async fn a_500_on_every_attempt_fails_the_turn_upstream_after_every_retry() {
    let turn = one_turn(
        vec![Behaviour::ServerError],
        agent_config(),
        Expect {
            code: Some("upstream"),
            requests: 3,
            streamed: "",
            charged: false,
        },
    )
    .await;
    let message = turn.end["data"]["message"].as_str().expect("message");
    assert!(message.contains("500"), "{message}");
    turn.setup.server.shutdown().await;
}

#[tokio::test]
async fn a_429_with_a_short_retry_after_completes_after_one_retry() {
    let turn = one_turn(
        vec![Behaviour::RateLimitedMs(100), Behaviour::Normal],
        agent_config(),
        Expect {
            code: None,
            requests: 2,
            streamed: "Hello from the fake model.",
            charged: true,
        },
    )
    .await;
    turn.setup.server.shutdown().await;
}

#[tokio::test]
async fn a_429_asking_for_longer_than_backoff_max_fails_rate_limited_without_waiting() {
    // `Retry-After: 2` is beyond the agent's 1 s `backoff_max`: it gives up
    // at once rather than hold the turn for a wait it was told never to make.
    let turn = one_turn(
        vec![Behaviour::RateLimited, Behaviour::Normal],
        agent_config(),
        Expect {
            code: Some("rate_limited"),
            requests: 1,
            streamed: "",
            charged: false,
        },
    )
    .await;
    turn.setup.server.shutdown().await;
}

#[tokio::test]
async fn a_400_fails_the_turn_rejected_without_a_retry() {
    let turn = one_turn(
        vec![Behaviour::BadRequest, Behaviour::Normal],
        agent_config(),
        Expect {
            code: Some("rejected"),
            requests: 1,
            streamed: "",
            charged: false,
        },
    )
    .await;
    let message = turn.end["data"]["message"].as_str().expect("message");
    assert!(message.contains("does not exist"), "{message}");
    turn.setup.server.shutdown().await;
}

#[tokio::test]
async fn a_stream_dropped_mid_reply_fails_interrupted_without_a_retry_and_stores_no_partial_reply()
{
    // A retry after deltas went out would stream the reply again from its
    // start, so a cut stream is not retried: the turn fails, charged for
    // what it streamed (estimated: the fake was cut before reporting usage).
    let turn = one_turn(
        vec![Behaviour::DropAfter(2), Behaviour::Normal],
        agent_config(),
        Expect {
            code: Some("interrupted"),
            requests: 1,
            streamed: "Hello from",
            charged: true,
        },
    )
    .await;
    let Turn { setup, .. } = turn;
    let usage = events_of(&setup.server, "usage_recorded", "m1");
    assert_eq!(usage[0]["data"]["estimated"], json!(true), "{usage:?}");
    assert!(
        usage[0]["data"]["completion_tokens"]
            .as_u64()
            .is_some_and(|tokens| tokens > 0),
        "{usage:?}"
    );
    // Streamed text lives only on the bus: no stored event holds it.
    for event in events(&setup.server) {
        assert!(
            !event["data"].to_string().contains("Hello from"),
            "the partial reply was stored: {event}"
        );
    }

    // The next turn's context leaves the failed exchange out entirely.
    let mut watch = Watch::start(setup.bus()).await;
    setup.send("m2", "again").await;
    let end = watch.end_of("m2").await;
    assert_eq!(end["type"], json!("reply_completed"), "{end}");
    let requests = setup.fake().requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[1].body["messages"],
        json!([{ "role": "user", "content": "again" }])
    );
    assert_every_turn_ended_once(&setup.server, &setup.key).await;
    setup.server.shutdown().await;
}

#[tokio::test]
async fn a_stream_that_stalls_mid_reply_fails_timeout_without_a_retry() {
    let turn = one_turn(
        vec![Behaviour::StallAfter(2), Behaviour::Normal],
        agent_config(),
        Expect {
            code: Some("timeout"),
            requests: 1,
            streamed: "Hello from",
            charged: true,
        },
    )
    .await;
    turn.setup.server.shutdown().await;
}

#[tokio::test]
async fn a_stream_that_ends_early_fails_interrupted_without_a_retry() {
    let turn = one_turn(
        vec![Behaviour::EndAfter(3), Behaviour::Normal],
        agent_config(),
        Expect {
            code: Some("interrupted"),
            requests: 1,
            streamed: "Hello from the",
            charged: true,
        },
    )
    .await;
    turn.setup.server.shutdown().await;
}

#[tokio::test]
async fn an_error_inside_the_stream_fails_upstream_without_a_retry() {
    let turn = one_turn(
        vec![Behaviour::ErrorInStream, Behaviour::Normal],
        agent_config(),
        Expect {
            code: Some("upstream"),
            requests: 1,
            streamed: "Hello",
            charged: true,
        },
    )
    .await;
    turn.setup.server.shutdown().await;
}

#[tokio::test]
async fn a_malformed_chunk_fails_protocol_without_a_retry() {
    let turn = one_turn(
        vec![Behaviour::MalformedChunk, Behaviour::Normal],
        agent_config(),
        Expect {
            code: Some("protocol"),
            requests: 1,
            streamed: "Hello",
            charged: true,
        },
    )
    .await;
    turn.setup.server.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_model_server_fails_the_turn_connect_after_every_retry() {
    // A port that was just free: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
    let addr = listener.local_addr().expect("an address");
    drop(listener);
    let setup = Setup::start_at(format!("http://{addr}/v1"), None, agent_config()).await;
    let turn = check_turn(
        setup,
        Expect {
            code: Some("connect"),
            requests: 0,
            streamed: "",
            charged: false,
        },
    )
    .await;
    turn.setup.server.shutdown().await;
}

/// Receives the next alert, within [`WAIT`].
async fn next_alert(alerts: &mut Subscription) -> Value {
    let alert = tokio::time::timeout(WAIT, alerts.recv())
        .await
        .expect("an agent alert arrives")
        .expect("the subscription stays open");
    serde_json::from_slice(&alert.payload).expect("alerts are JSON")
}

#[tokio::test]
async fn repeated_failures_open_the_circuit_with_an_alert_and_later_turns_fail_fast() {
    let agent = AgentConfig {
        circuit_failure_threshold: 2,
        ..agent_config()
    };
    let setup = Setup::start(vec![Behaviour::ServerError], agent).await;
    let mut alerts = setup
        .bus()
        .subscribe(&format!("sb.alert.agent.{AGENT}"))
        .await
        .expect("subscribes");
    let mut watch = Watch::start(setup.bus()).await;

    // Two 500s open the circuit; the turn's second retry is refused by it.
    setup.send("m1", "hello").await;
    let end = watch.end_of("m1").await;
    assert_eq!(end["type"], json!("reply_failed"), "{end}");
    assert_eq!(end["data"]["code"], json!("unavailable"), "{end}");
    let message = end["data"]["message"].as_str().expect("message");
    assert!(message.contains("circuit is open"), "{message}");
    assert!(
        message.contains("500"),
        "the last error is named: {message}"
    );
    assert_eq!(setup.fake().request_count(), 2);

    let alert = next_alert(&mut alerts).await;
    assert_eq!(alert["agent"], json!(AGENT), "{alert}");
    assert_eq!(alert["transition"], json!("opened"), "{alert}");
    assert_eq!(alert["state"], json!("open"), "{alert}");
    assert_eq!(alert["consecutive_failures"], json!(2), "{alert}");
    assert!(
        alert["cause"].as_str().is_some_and(|c| c.contains("500")),
        "{alert}"
    );

    // Open: turns fail at once, without reaching the model server.
    for message_id in ["m2", "m3", "m4"] {
        setup.send(message_id, "anyone there?").await;
        let end = watch.end_of(message_id).await;
        assert_eq!(end["type"], json!("reply_failed"), "{end}");
        assert_eq!(end["data"]["code"], json!("unavailable"), "{end}");
    }
    assert_eq!(
        setup.fake().request_count(),
        2,
        "the open circuit calls nobody"
    );
    assert_every_turn_ended_once(&setup.server, &setup.key).await;
    setup.server.shutdown().await;
}

#[tokio::test]
async fn an_open_circuit_lets_one_trial_through_after_its_period_and_closes_on_success() {
    let open_for = Duration::from_millis(300);
    let agent = AgentConfig {
        circuit_failure_threshold: 2,
        circuit_open_for: open_for,
        max_retries: 0,
        ..agent_config()
    };
    let script = vec![
        Behaviour::ServerError,
        Behaviour::ServerError,
        Behaviour::Normal,
    ];
    let setup = Setup::start(script, agent).await;
    let mut alerts = setup
        .bus()
        .subscribe(&format!("sb.alert.agent.{AGENT}"))
        .await
        .expect("subscribes");
    let mut watch = Watch::start(setup.bus()).await;

    for message_id in ["m1", "m2"] {
        setup.send(message_id, "hello").await;
        let end = watch.end_of(message_id).await;
        assert_eq!(end["data"]["code"], json!("upstream"), "{end}");
    }
    assert_eq!(next_alert(&mut alerts).await["transition"], json!("opened"));

    // Past the open period the next turn is the trial; it succeeds.
    tokio::time::sleep(open_for + Duration::from_millis(100)).await;
    setup.send("m3", "hello again").await;
    let end = watch.end_of("m3").await;
    assert_eq!(end["type"], json!("reply_completed"), "{end}");
    assert_eq!(
        next_alert(&mut alerts).await["transition"],
        json!("half_opened")
    );
    let closed = next_alert(&mut alerts).await;
    assert_eq!(closed["transition"], json!("closed"), "{closed}");
    assert_eq!(closed["state"], json!("closed"), "{closed}");
    assert_eq!(setup.fake().request_count(), 3);
    assert_every_turn_ended_once(&setup.server, &setup.key).await;
    setup.server.shutdown().await;
}

#[tokio::test]
async fn shutdown_does_not_wait_past_the_drain_timeout_and_the_next_start_fails_the_lost_turn() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let data = dir.path().join("data");
    let hung = FakeOpenAi::start(Behaviour::Hang).await;
    // One attempt that outlasts the drain timeout by far.
    let agent = AgentConfig {
        timeout: Duration::from_secs(5),
        max_retries: 0,
        ..agent_config()
    };
    let mut config = server_config(&data, hung.base_url(), agent.clone());
    config.drain_timeout = Duration::from_secs(1);
    let server = Server::start(config).await.expect("the server starts");
    let key = issue_key(server.bus()).await;

    // Acked while the model has not answered.
    send(server.bus(), &key, "m1", "hello").await;
    eventually("the turn reaches the model", || hung.request_count() == 1).await;
    tokio::time::timeout(WAIT, server.shutdown())
        .await
        .expect("shutdown returns despite the hung turn");

    // The next start on the same dir, at once: shutdown aborted the turn
    // it gave up on, so nothing holds the log any more.
    let normal = FakeOpenAi::start(Behaviour::Normal).await;
    let config = server_config(&data, normal.base_url(), agent);
    let server = Server::start(config)
        .await
        .expect("the server restarts on the same dir at once");

    // It ends the lost turn `reply_failed unavailable`, without rerunning
    // it. (Had shutdown waited for the turn, it would have stored its own
    // `timeout` end instead.)
    eventually("the lost turn is ended", || {
        !events_of(&server, "reply_failed", "m1").is_empty()
    })
    .await;
    let failed = events_of(&server, "reply_failed", "m1");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["data"]["code"], json!(LOST_TURN_CODE));
    assert_eq!(failed[0]["data"]["message"], json!(LOST_TURN_MESSAGE));
    assert_eq!(failed[0]["data"]["agent"], json!(AGENT));
    assert!(
        events_of(&server, "reply_completed", "m1").is_empty(),
        "the abandoned turn stored nothing after shutdown"
    );
    assert_eq!(hung.request_count(), 1, "the lost turn is not retried");
    assert_eq!(normal.request_count(), 0, "nor rerun by the new process");

    // The conversation goes on, without the lost exchange in its context.
    let mut watch = Watch::start(server.bus()).await;
    send(server.bus(), &key, "m2", "again").await;
    let end = watch.end_of("m2").await;
    assert_eq!(end["type"], json!("reply_completed"), "{end}");
    assert_eq!(
        normal.requests()[0].body["messages"],
        json!([{ "role": "user", "content": "again" }])
    );
    assert_every_turn_ended_once(&server, &key).await;
    server.shutdown().await;
}
