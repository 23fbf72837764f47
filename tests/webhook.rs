//! The webhook alert sink against a real log in a temporary data dir and a
//! real HTTP receiver (axum on 127.0.0.1): alerts arrive with their body and
//! headers and nothing else does, a receiver that was down gets every alert in
//! order once it is back, a restart resumes from the checkpoint, and a URL
//! that is not http(s) is refused.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use serde_json::Value;
use switchboard::alerts::{alert_text, WebhookConfig, WebhookError, WebhookHandle, WebhookSink};
use switchboard::outbox::routes;
use switchboard_events::catalog::{
    AdminAction, AgentRouted, AuthChannel, AuthFailed, BudgetExceeded, BudgetPeriod, BudgetScope,
    BudgetThresholdCrossed, ConversationErased, ConversationStarted, KeyHash, KeyIssued,
    KeyRevoked, KeyUpdated, LimitKind, Limits, MessageReceived, RateLimited, ReplyCompleted,
    ReplyFailed, Scope, UsageRecorded,
};
use switchboard_events::{
    Envelope, Event, EventLog, ExpectedVersion, NewEvent, OpenMode, StreamId, EVENT_TYPES,
};
use tempfile::TempDir;
use uuid::Uuid;

/// How long any one wait may take on a busy 2-core CI machine.
const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);
/// The path of the receiver's URL: in a Slack webhook URL, the secret part.
const SECRET_PATH: &str = "/services/T0001/B0001/hunter2hunter2";

/// Waits until `state` says nothing is missing (`None`); otherwise panics
/// after [`WAIT`] with what was still missing.
async fn wait_until(what: &str, mut state: impl FnMut() -> Option<String>) {
    let deadline = Instant::now() + WAIT;
    loop {
        let Some(missing) = state() else { return };
        if Instant::now() >= deadline {
            panic!("timed out after {WAIT:?} waiting for {what}: {missing}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One request the receiver got, and what it answered.
#[derive(Debug, Clone)]
struct Received {
    method: String,
    path: String,
    status: u16,
    content_type: Option<String>,
    event_id: Option<String>,
    idempotency_key: Option<String>,
    body: Value,
}

#[derive(Default)]
struct Shared {
    /// What the receiver answers now.
    status: AtomicU16,
    received: Mutex<Vec<Received>>,
}

/// The async tests take turns: one of them captures logs with a thread-local
/// subscriber, and the sink's log callsites hit first from another test's
/// thread (with no subscriber) can be cached as uninteresting meanwhile.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Log output, kept for checking what it says (and does not).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// Captures what this thread logs (all of a current-thread test's tasks)
    /// while the guard lives.
    fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("logs lock")).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("logs lock").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

/// A local webhook receiver; what it answers can be changed as it runs.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Receiver {
    /// A receiver answering 200 on a free port.
    async fn start() -> Receiver {
        Receiver::start_on(free_addr(), 200).await
    }

    /// A receiver on `addr` (which may have been used before) answering `status`.
    async fn start_on(addr: SocketAddr, status: u16) -> Receiver {
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket
            .bind(addr)
            .unwrap_or_else(|error| panic!("bind {addr}: {error}"));
        let listener = socket.listen(64).expect("listen");
        let shared = Arc::new(Shared {
            status: AtomicU16::new(status),
            received: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(shared.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.expect("the receiver runs");
        });
        Receiver { addr, shared }
    }

    /// Shaped like a Slack incoming webhook URL, secret path included.
    fn url(&self) -> String {
        format!("http://{}{SECRET_PATH}", self.addr)
    }

    fn answer(&self, status: u16) {
        self.shared.status.store(status, Ordering::SeqCst);
    }

    fn received(&self) -> Vec<Received> {
        self.shared.received.lock().expect("received lock").clone()
    }

    /// The requests answered 2xx.
    fn delivered(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|received| (200..300).contains(&received.status))
            .collect()
    }

    /// The event ids of the requests answered 2xx, in arrival order.
    fn delivered_ids(&self) -> Vec<String> {
        self.delivered()
            .into_iter()
            .map(|received| received.event_id.unwrap_or_default())
            .collect()
    }
}

async fn receive(State(shared): State<Arc<Shared>>, request: Request) -> StatusCode {
    let (parts, body) = request.into_parts();
    let body: Bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .expect("a readable body");
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .map(|value| value.to_str().expect("an ASCII header").to_owned())
    };
    let status = shared.status.load(Ordering::SeqCst);
    shared
        .received
        .lock()
        .expect("received lock")
        .push(Received {
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            status,
            content_type: header("content-type"),
            event_id: header("x-switchboard-event-id"),
            idempotency_key: header("idempotency-key"),
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        });
    StatusCode::from_u16(status).expect("a valid status")
}

/// A port nobody listens on now (it may be bound again later).
fn free_addr() -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket
        .bind("127.0.0.1:0".parse().expect("an address"))
        .expect("bind a free port");
    socket.local_addr().expect("the bound address")
}

fn config(urls: Vec<String>) -> WebhookConfig {
    WebhookConfig {
        urls,
        timeout: Duration::from_secs(5),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
    }
}

fn open_log(dir: &TempDir) -> EventLog {
    EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open the log")
}

fn spawn(log: &EventLog, url: String) -> WebhookHandle {
    WebhookSink::spawn(log.clone(), config(vec![url])).expect("start the webhook sink")
}

/// Appends `event` to `key/<key_id>`; returns it as stored.
async fn append(log: &EventLog, key_id: &str, event: Event) -> Envelope {
    let stream = StreamId::key(key_id).expect("a valid key id");
    let seq = log
        .append(stream, ExpectedVersion::Any, vec![NewEvent::new(event)])
        .await
        .expect("append")
        .last()
        .seq;
    log.get(seq).expect("read back").expect("the stored event")
}

async fn delivered_through(handle: &WebhookHandle, seq: u64) {
    wait_until(&format!("the sink to get through seq {seq}"), || {
        let through = handle.delivered_through(0);
        (through < seq).then(|| format!("delivered through {through}"))
    })
    .await;
}

fn threshold(key_id: &str, pct: u32, spent_micros: u64) -> Event {
    Event::BudgetThresholdCrossed(BudgetThresholdCrossed {
        scope: BudgetScope::Key,
        subject_id: key_id.into(),
        period: BudgetPeriod::Day,
        period_start: chrono::Utc::now(),
        threshold_pct: pct,
        spent_micros,
        budget_micros: 1_000_000,
    })
}

fn exceeded(subject_id: &str) -> Event {
    Event::BudgetExceeded(BudgetExceeded {
        scope: BudgetScope::User,
        subject_id: subject_id.into(),
        period: BudgetPeriod::Month,
        spent_micros: 25_001_234,
        budget_micros: 25_000_000,
    })
}

fn rate_limited(key_id: &str, count: u64) -> Event {
    Event::RateLimited(RateLimited {
        key_id: key_id.into(),
        limit: LimitKind::Rpm,
        count,
        retry_after_ms: 1_250,
    })
}

fn admin_action(target: &str) -> Event {
    Event::AdminAction(AdminAction {
        actor: "admin".into(),
        action: "keys.list".into(),
        target: target.into(),
    })
}

fn key_issued(key_id: &str) -> Event {
    Event::KeyIssued(KeyIssued {
        key_id: key_id.into(),
        name: "test".into(),
        owner: None,
        key_hash: KeyHash([7; 32]),
        scopes: vec![Scope::Chat],
        limits: Limits::default(),
        budget: None,
        expires_at: None,
    })
}

fn ids(envelopes: &[&Envelope]) -> Vec<String> {
    envelopes.iter().map(|e| e.id.to_string()).collect()
}

#[tokio::test]
async fn alerts_reach_the_receiver_with_their_body_and_headers_and_nothing_else_does() {
    let _serial = SERIAL.lock().await;
    let dir = TempDir::new().expect("a temp dir");
    let log = open_log(&dir);
    let receiver = Receiver::start().await;
    let sink = spawn(&log, receiver.url());

    let _issued = append(&log, "key_ab12", key_issued("key_ab12")).await;
    let crossed = append(&log, "key_ab12", threshold("key_ab12", 80, 800_000)).await;
    let _admin = append(&log, "key_ab12", admin_action("key_ab12")).await;
    let used_up = append(&log, "key_ab12", exceeded("alice")).await;
    let refused = append(&log, "key_ab12", rate_limited("key_ab12", 3)).await;
    let last = append(&log, "key_ab12", admin_action("key_ab12")).await;
    delivered_through(&sink, last.seq).await;

    let received = receiver.received();
    assert_eq!(
        received
            .iter()
            .map(|r| r.event_id.clone())
            .collect::<Vec<_>>(),
        ids(&[&crossed, &used_up, &refused])
            .into_iter()
            .map(Some)
            .collect::<Vec<_>>(),
        "exactly the three alerts, in seq order: {received:#?}"
    );
    let texts = [
        ":warning: key key_ab12 reached 80% of its day budget: $0.80 of $1.00",
        ":no_entry: user alice used up its month budget: $25.001234 of $25.00",
        ":hourglass: key key_ab12 hit its requests-per-minute limit: 3 requests refused, retry after 1.2 s",
    ];
    for ((request, envelope), text) in received
        .iter()
        .zip([&crossed, &used_up, &refused])
        .zip(texts)
    {
        let id = envelope.id.to_string();
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, SECRET_PATH);
        assert_eq!(request.status, 200);
        assert_eq!(request.content_type.as_deref(), Some("application/json"));
        assert_eq!(request.event_id.as_deref(), Some(id.as_str()));
        assert_eq!(request.idempotency_key.as_deref(), Some(id.as_str()));
        assert_eq!(request.body["text"], text, "{request:#?}");
        let event: Value = serde_json::from_str(&envelope.to_json()).expect("wire JSON");
        assert_eq!(request.body["event"], event, "{request:#?}");
        assert_eq!(
            request.body.as_object().map(|body| body.len()),
            Some(2),
            "only text and event: {request:#?}"
        );
    }

    sink.stop().await;
}

#[tokio::test]
async fn a_receiver_that_was_down_gets_every_alert_once_in_order() {
    let _serial = SERIAL.lock().await;
    let (logs, _logging) = Logs::capture();
    let dir = TempDir::new().expect("a temp dir");
    let log = open_log(&dir);
    let addr = free_addr();
    let sink = spawn(&log, format!("http://{addr}{SECRET_PATH}"));

    // Nobody listens: every attempt is refused.
    let mut alerts = Vec::new();
    for n in 1..=4u64 {
        alerts.push(append(&log, "key_down", rate_limited("key_down", n)).await);
        append(&log, "key_down", admin_action("key_down")).await;
    }
    // The sink tries, fails to connect, and says so (by host only).
    wait_until("a failed attempt in the logs", || {
        let text = logs.text();
        (!text.contains("webhook request failed"))
            .then(|| text.lines().count().to_string() + " log lines")
    })
    .await;
    assert_eq!(sink.delivered_through(0), 0, "nothing is delivered yet");

    // Up, but refusing: the first alert is retried, nothing after it is sent.
    let receiver = Receiver::start_on(addr, 503).await;
    wait_until("three refused attempts", || {
        let attempts = receiver.received().len();
        (attempts < 3).then(|| format!("{attempts} attempts so far"))
    })
    .await;
    let first = alerts[0].id.to_string();
    for attempt in receiver.received() {
        assert_eq!(
            attempt.event_id.as_deref(),
            Some(first.as_str()),
            "{attempt:#?}"
        );
    }
    assert!(sink.delivered_through(0) < alerts[0].seq);

    receiver.answer(200);
    let last = log.head();
    delivered_through(&sink, last).await;

    let expected = ids(&alerts.iter().collect::<Vec<_>>());
    assert_eq!(
        receiver.delivered_ids(),
        expected,
        "each alert once, in seq order"
    );
    // Every attempt, refused or not, came in seq order: no alert overtook one
    // that was still being retried.
    let mut attempted: Vec<String> = receiver
        .received()
        .into_iter()
        .map(|attempt| attempt.event_id.unwrap_or_default())
        .collect();
    attempted.dedup();
    assert_eq!(attempted, expected);

    sink.stop().await;
    // The failures were logged, by host, never with the URL's secret path.
    let logs = logs.text();
    assert!(logs.contains("webhook request failed"), "{logs}");
    assert!(logs.contains("webhook refused the alert"), "{logs}");
    assert!(logs.contains(&format!("http://{addr} #")), "{logs}");
    assert!(!logs.contains("hunter2"), "{logs}");
}

#[tokio::test]
async fn a_receiver_that_is_down_holds_up_only_its_own_alerts() {
    let _serial = SERIAL.lock().await;
    let dir = TempDir::new().expect("a temp dir");
    let log = open_log(&dir);
    let down = format!("http://{}{SECRET_PATH}", free_addr());
    let receiver = Receiver::start().await;
    let sink = WebhookSink::spawn(log.clone(), config(vec![down, receiver.url()]))
        .expect("start the webhook sink");

    let one = append(&log, "key_two", rate_limited("key_two", 1)).await;
    let two = append(&log, "key_two", threshold("key_two", 90, 900_000)).await;
    wait_until("the receiver that is up to get both alerts", || {
        let through = sink.delivered_through(1);
        (through < two.seq).then(|| format!("delivered through {through}"))
    })
    .await;
    assert_eq!(receiver.delivered_ids(), ids(&[&one, &two]));
    assert_eq!(
        sink.delivered_through(0),
        0,
        "nobody listens on the first URL"
    );

    sink.stop().await;
}

#[tokio::test]
async fn a_restarted_sink_resumes_from_its_checkpoint() {
    let _serial = SERIAL.lock().await;
    let dir = TempDir::new().expect("a temp dir");
    let receiver = Receiver::start().await;
    let log = open_log(&dir);
    // Before the URL's first start: history, not sent.
    append(&log, "key_r", threshold("key_r", 50, 500_000)).await;

    let sink = spawn(&log, receiver.url());
    let one = append(&log, "key_r", threshold("key_r", 80, 800_000)).await;
    let two = append(&log, "key_r", rate_limited("key_r", 1)).await;
    delivered_through(&sink, two.seq).await;
    sink.stop().await;

    let three = append(&log, "key_r", rate_limited("key_r", 2)).await;
    append(&log, "key_r", admin_action("key_r")).await;
    let four = append(&log, "key_r", exceeded("key_r")).await;
    drop(log);

    let log = open_log(&dir);
    let sink = spawn(&log, receiver.url());
    delivered_through(&sink, four.seq).await;
    assert_eq!(
        receiver.delivered_ids(),
        ids(&[&one, &two, &three, &four]),
        "the first start's alerts once, then the new ones"
    );
    assert_eq!(receiver.received().len(), 4, "no request was refused");
    sink.stop().await;
}

#[tokio::test]
async fn a_url_that_is_not_http_is_refused() {
    let _serial = SERIAL.lock().await;
    let dir = TempDir::new().expect("a temp dir");
    let log = open_log(&dir);
    let secret = "ftp://user:hunter2@example.com/very/secret/path";

    let error = WebhookSink::spawn(log.clone(), config(vec![secret.into()]))
        .err()
        .expect("an ftp URL is refused");
    assert!(
        matches!(error, WebhookError::UnsupportedScheme { index: 0, .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("http or https"), "{message}");
    assert!(
        !message.contains("hunter2") && !message.contains("secret"),
        "{message}"
    );

    let error = WebhookSink::spawn(
        log.clone(),
        config(vec![
            "https://example.com/hook".into(),
            "hooks.slack.com/x".into(),
        ]),
    )
    .err()
    .expect("a URL without a scheme is refused");
    assert!(
        matches!(error, WebhookError::InvalidUrl { index: 1, .. }),
        "{error:?}"
    );

    let twice = vec![
        "https://example.com/hook".into(),
        "HTTPS://Example.com/hook".into(),
    ];
    let error = WebhookSink::spawn(log.clone(), config(twice))
        .err()
        .expect("one URL twice is refused");
    assert!(
        matches!(error, WebhookError::Duplicate { index: 1, first: 0 }),
        "{error:?}"
    );

    let shown = format!(
        "{:?}",
        config(vec![format!("https://hooks.slack.com{SECRET_PATH}")])
    );
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("https://hooks.slack.com #"), "{shown}");
}

#[test]
fn the_alerts_are_the_events_the_outbox_routes_to_an_alert_subject() {
    let events = [
        Event::ConversationStarted(ConversationStarted {
            conversation_id: "c1".into(),
            key_id: "key_1".into(),
            user: None,
        }),
        Event::MessageReceived(MessageReceived {
            conversation_id: "c1".into(),
            message_id: "m1".into(),
            key_id: "key_1".into(),
            user: None,
            content: "hi".into(),
            agent: None,
        }),
        Event::AgentRouted(AgentRouted {
            conversation_id: "c1".into(),
            message_id: "m1".into(),
            agent: "echo".into(),
            rule: None,
        }),
        Event::ReplyCompleted(ReplyCompleted {
            conversation_id: "c1".into(),
            message_id: "m1".into(),
            reply_id: "r1".into(),
            agent: "echo".into(),
            content: "echo: hi".into(),
            finish_reason: "stop".into(),
            latency_ms: 1,
        }),
        Event::ReplyFailed(ReplyFailed {
            conversation_id: "c1".into(),
            message_id: "m1".into(),
            agent: "echo".into(),
            code: "unavailable".into(),
            message: "down".into(),
        }),
        Event::ConversationErased(ConversationErased {
            conversation_id: "c1".into(),
            by: "admin".into(),
        }),
        Event::UsageRecorded(UsageRecorded {
            conversation_id: "c1".into(),
            message_id: "m1".into(),
            key_id: "key_1".into(),
            user: None,
            agent: "echo".into(),
            model: "echo".into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            estimated: false,
            input_price: 0,
            output_price: 0,
            cost_micros: 0,
        }),
        threshold("key_1", 80, 800_000),
        exceeded("alice"),
        key_issued("key_1"),
        Event::KeyUpdated(KeyUpdated {
            key_id: "key_1".into(),
            limits: None,
            budget: None,
        }),
        Event::KeyRevoked(KeyRevoked {
            key_id: "key_1".into(),
            by: "admin".into(),
            reason: None,
        }),
        Event::AuthFailed(AuthFailed {
            channel: AuthChannel::Http,
            reason: "unknown key".into(),
            key_prefix: None,
            remote: None,
        }),
        rate_limited("key_1", 1),
        admin_action("key_1"),
    ];
    let covered: Vec<&str> = events.iter().map(Event::type_name).collect();
    assert_eq!(covered, EVENT_TYPES, "one event of every type");

    for event in events {
        let envelope = Envelope {
            seq: 1,
            id: Uuid::now_v7(),
            stream: StreamId::system(),
            version: 1,
            at: chrono::Utc::now(),
            correlation_id: None,
            causation_id: None,
            traceparent: None,
            event,
        };
        let routed_as_alert = routes("sb", &envelope)
            .iter()
            .any(|route| route.subject.starts_with("sb.alert."));
        assert_eq!(
            alert_text(&envelope.event).is_some(),
            routed_as_alert,
            "{}",
            envelope.event.type_name()
        );
    }
}

#[test]
fn alert_lines_format_money_without_floats_and_escape_ids() {
    let line = |event: Event| alert_text(&event).expect("an alert");
    assert_eq!(
        line(threshold("key_x", 50, 0)),
        ":warning: key key_x reached 50% of its day budget: $0.00 of $1.00"
    );
    assert_eq!(
        line(threshold("key_x", 90, 1_999_999_999_999)),
        ":warning: key key_x reached 90% of its day budget: $1999999.999999 of $1.00"
    );
    assert_eq!(
        line(threshold("key_x", 10, 1_230)),
        ":warning: key key_x reached 10% of its day budget: $0.00123 of $1.00"
    );
    assert_eq!(
        line(exceeded("<!channel> & co")),
        ":no_entry: user &lt;!channel&gt; &amp; co used up its month budget: $25.001234 of $25.00"
    );
    let refused = |count, retry_after_ms, limit| {
        line(Event::RateLimited(RateLimited {
            key_id: "key_x".into(),
            limit,
            count,
            retry_after_ms,
        }))
    };
    assert_eq!(
        refused(1, 250, LimitKind::Tpm),
        ":hourglass: key key_x hit its tokens-per-minute limit: 1 request refused, retry after 250 ms"
    );
    assert_eq!(
        refused(2, 60_000, LimitKind::Parallel),
        ":hourglass: key key_x hit its concurrent-requests limit: 2 requests refused, retry after 60 s"
    );
}
