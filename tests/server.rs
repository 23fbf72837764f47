//! The [`Server`] in-process on the embedded bus: the admin key's bootstrap,
//! the admin key subjects, and conversation passivation under a small cap.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::bus::request;
use switchboard::bus::{Bus, Headers};
use switchboard::keys::{AdminBootstrap, ADMIN_KEY_FILE};
use switchboard::server::{Server, ServerConfig};

const WAIT: Duration = Duration::from_secs(20);
const ADMIN_KEY: &str = "sb-admin-key-for-tests-0123456789";

async fn start(config: ServerConfig) -> Server {
    Server::start(config).await.expect("the server starts")
}

fn config(dir: &std::path::Path) -> ServerConfig {
    let mut config = ServerConfig::new(dir.join("data"));
    config.admin_key = Some(ADMIN_KEY.to_owned());
    config
}

/// A key named `name`, issued with the admin key.
async fn issue_key(bus: &Bus, name: &str) -> String {
    let issued = request(
        bus,
        "sb.admin.keys.issue",
        ADMIN_KEY,
        json!({ "name": name }),
    )
    .await;
    issued["key"].as_str().expect("key").to_owned()
}

#[track_caller]
fn assert_error(reply: &Value, code: &str) {
    assert_eq!(reply["ok"], json!(false), "{reply}");
    assert_eq!(reply["error"]["code"], json!(code), "{reply}");
}

fn events_of_type(server: &Server, kind: &str) -> Vec<Value> {
    server
        .log()
        .read_from(1)
        .map(|envelope| serde_json::to_value(envelope.expect("decodes")).expect("JSON"))
        .filter(|event| event["type"] == json!(kind))
        .collect()
}

#[tokio::test]
async fn first_start_generates_an_admin_key_file_readable_by_its_owner_only() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = ServerConfig::new(dir.path().join("data"));
    config.admin_key = None;
    let server = start(config.clone()).await;
    let AdminBootstrap::Generated(path) = server.admin_bootstrap().clone() else {
        panic!(
            "expected a generated key, got {:?}",
            server.admin_bootstrap()
        );
    };
    assert_eq!(path, dir.path().join("data").join(ADMIN_KEY_FILE));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let key = std::fs::read_to_string(&path).expect("readable");
    let key = key.trim();
    let listed = request(server.bus(), "sb.admin.keys.list", key, json!({})).await;
    assert_eq!(listed["ok"], json!(true), "{listed}");
    // Only its hash is stored: the log never holds the key itself.
    let issued = events_of_type(&server, "key_issued");
    assert_eq!(issued.len(), 1);
    assert!(!issued[0].to_string().contains(key));
    server.shutdown().await;

    let server = start(config).await;
    assert_eq!(server.admin_bootstrap(), &AdminBootstrap::Existing);
    assert_eq!(std::fs::read_to_string(&path).expect("kept").trim(), key);
    assert_eq!(events_of_type(&server, "key_issued").len(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn a_configured_admin_key_is_stored_once_and_a_new_one_replaces_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start(config(dir.path())).await;
    assert_eq!(server.admin_bootstrap(), &AdminBootstrap::FromConfig);
    assert!(!dir.path().join("data").join(ADMIN_KEY_FILE).exists());
    server.shutdown().await;

    let server = start(config(dir.path())).await;
    assert_eq!(server.admin_bootstrap(), &AdminBootstrap::Existing);
    server.shutdown().await;

    let mut changed = config(dir.path());
    changed.admin_key = Some("sb-another-admin-key-9876543210".into());
    let server = start(changed).await;
    assert_eq!(server.admin_bootstrap(), &AdminBootstrap::FromConfig);
    let old = request(server.bus(), "sb.admin.keys.list", ADMIN_KEY, json!({})).await;
    assert_error(&old, "unauthorized");
    let new = request(
        server.bus(),
        "sb.admin.keys.list",
        "sb-another-admin-key-9876543210",
        json!({}),
    )
    .await;
    assert_eq!(new["ok"], json!(true), "{new}");
    server.shutdown().await;

    let mut short = config(dir.path());
    short.admin_key = Some("short".into());
    let refused = Server::start(short)
        .await
        .err()
        .expect("a short key is refused");
    assert!(
        refused.to_string().contains("SWITCHBOARD_ADMIN_KEY"),
        "{refused}"
    );
}

#[tokio::test]
async fn admins_issue_list_and_revoke_keys_over_the_bus() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start(config(dir.path())).await;
    let bus = server.bus().clone();

    let issued = request(
        &bus,
        "sb.admin.keys.issue",
        ADMIN_KEY,
        json!({ "name": "support bot", "owner": "team-a", "limits": { "rpm": 100 } }),
    )
    .await;
    assert_eq!(issued["ok"], json!(true), "{issued}");
    let key_id = issued["key_id"].as_str().expect("key_id").to_owned();
    let key = issued["key"].as_str().expect("key").to_owned();
    assert!(key.starts_with("sb-"));

    // The new key works at once, and only for chat.
    let ack = request(&bus, "sb.conv.c1.send", &key, json!({ "content": "hi" })).await;
    assert_eq!(ack["ok"], json!(true), "{ack}");
    let denied = request(&bus, "sb.admin.keys.list", &key, json!({})).await;
    assert_error(&denied, "forbidden");

    let listed = request(&bus, "sb.admin.keys.list", ADMIN_KEY, json!({})).await;
    let keys = listed["keys"].as_array().expect("keys");
    let record = keys
        .iter()
        .find(|k| k["key_id"] == json!(key_id))
        .expect("listed");
    assert_eq!(record["name"], json!("support bot"));
    assert_eq!(record["limits"]["rpm"], json!(100));
    assert!(
        record.get("key_hash").is_none(),
        "no hash in lists: {record}"
    );
    assert!(!listed.to_string().contains(&key), "no key in lists");

    let revoked = request(
        &bus,
        "sb.admin.keys.revoke",
        ADMIN_KEY,
        json!({ "key_id": key_id, "reason": "rotated" }),
    )
    .await;
    assert_eq!(revoked["ok"], json!(true), "{revoked}");
    assert_eq!(revoked["already"], json!(false));
    let again = request(
        &bus,
        "sb.admin.keys.revoke",
        ADMIN_KEY,
        json!({ "key_id": key_id }),
    )
    .await;
    assert_eq!(again["already"], json!(true), "{again}");
    let refused = request(&bus, "sb.conv.c1.send", &key, json!({ "content": "hi" })).await;
    assert_error(&refused, "unauthorized");

    // Who did what is in the audit trail.
    let actions: Vec<(String, String)> = events_of_type(&server, "admin_action")
        .iter()
        .map(|e| {
            assert_eq!(e["data"]["actor"], json!("admin"));
            (
                e["data"]["action"].as_str().expect("action").to_owned(),
                e["data"]["target"].as_str().expect("target").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        vec![
            ("issue_key".to_owned(), key_id.clone()),
            ("revoke_key".to_owned(), key_id.clone())
        ]
    );
    let revocations = events_of_type(&server, "key_revoked");
    assert_eq!(revocations.len(), 1);
    assert_eq!(revocations[0]["data"]["by"], json!("admin"));
    server.shutdown().await;
}

#[tokio::test]
async fn bad_admin_requests_get_coded_errors_and_change_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start(config(dir.path())).await;
    let bus = server.bus().clone();
    let head = server.log().head();
    for (subject, body, code) in [
        ("sb.admin.keys.issue", json!({}), "invalid_request"),
        (
            "sb.admin.keys.issue",
            json!({ "name": " " }),
            "invalid_request",
        ),
        (
            "sb.admin.keys.issue",
            json!({ "name": "x", "key": "sb-mine" }),
            "invalid_request",
        ),
        (
            "sb.admin.keys.issue",
            json!({ "name": "x", "scopes": ["root"] }),
            "invalid_request",
        ),
        (
            "sb.admin.keys.revoke",
            json!({ "key_id": "key_nope" }),
            "not_found",
        ),
        ("sb.admin.keys.update", json!({}), "invalid_request"),
    ] {
        let reply = request(&bus, subject, ADMIN_KEY, body.clone()).await;
        assert_error(&reply, code);
        assert!(
            reply["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{subject} {body}: {reply}"
        );
    }
    assert_eq!(server.log().head(), head, "bad requests append nothing");
    let unknown = request(&bus, "sb.admin.keys.list", "sb-not-a-key-at-all", json!({})).await;
    assert_error(&unknown, "unauthorized");
    assert_eq!(events_of_type(&server, "auth_failed").len(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn a_small_live_cap_bounds_the_actors_and_keeps_every_history() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = config(dir.path());
    config.conversations.max_live = 10;
    let server = start(config).await;
    let bus = server.bus().clone();
    let key = issue_key(&bus, "many").await;

    // One conversation at a time, each turn finished before the next: the
    // cap holds exactly (the actor spawned for a new conversation passivates
    // the least recently used one).
    let mut most_live = 0;
    for c in 0..100 {
        let body = json!({ "content": "r0", "message_id": format!("c{c}-r0") });
        let ack = request(&bus, &format!("sb.conv.c{c}.send"), &key, body).await;
        assert_eq!(ack["ok"], json!(true), "{ack}");
        history_of_length(&bus, &key, c, 2).await;
        most_live = most_live.max(server.live_conversations());
    }
    assert!(most_live <= 10, "{most_live} conversation actors were live");

    // All at once: actors with a command in flight (a send, a turn's end
    // being stored) are never passivated, so they may pass the cap while
    // busy; once idle, it holds again.
    for round in 1..3 {
        let mut sends = tokio::task::JoinSet::new();
        for c in 0..100 {
            let (bus, key) = (bus.clone(), key.clone());
            sends.spawn(async move {
                let body = json!({ "content": format!("r{round}"), "message_id": format!("c{c}-r{round}") });
                request(&bus, &format!("sb.conv.c{c}.send"), &key, body).await
            });
        }
        while let Some(ack) = sends.join_next().await {
            let ack = ack.expect("a send task failed");
            assert_eq!(ack["ok"], json!(true), "{ack}");
        }
    }
    for c in 0..100 {
        let messages = history_of_length(&bus, &key, c, 6).await;
        let mut contents: Vec<&str> = messages
            .iter()
            .filter(|m| m["role"] == json!("user"))
            .map(|m| m["content"].as_str().expect("content"))
            .collect();
        assert_eq!(contents[0], "r0", "c{c}");
        contents.sort_unstable();
        assert_eq!(contents, ["r0", "r1", "r2"], "c{c}");
    }
    // Once idle, the cap holds exactly.
    assert!(
        server.live_conversations() <= 10,
        "{}",
        server.live_conversations()
    );
    // A resend to a passivated conversation is still a duplicate.
    let again = request(
        &bus,
        "sb.conv.c0.send",
        &key,
        json!({ "content": "r0", "message_id": "c0-r0" }),
    )
    .await;
    assert_eq!(again["duplicate"], json!(true), "{again}");
    server.shutdown().await;
}

/// Polls conversation `c{c}`'s history until it holds `length` messages.
async fn history_of_length(bus: &Bus, key: &str, c: usize, length: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let history = request(bus, &format!("sb.conv.c{c}.history"), key, json!({})).await;
        let messages = history["messages"].as_array().expect("messages").clone();
        if messages.len() == length {
            return messages;
        }
        assert!(tokio::time::Instant::now() < deadline, "c{c}: {history}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_key_with_rpm_5_gets_five_acks_then_rate_limited_with_retry_after() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start(config(dir.path())).await;
    let bus = server.bus().clone();
    let issued = request(
        &bus,
        "sb.admin.keys.issue",
        ADMIN_KEY,
        json!({ "name": "slow", "limits": { "rpm": 5 } }),
    )
    .await;
    let key = issued["key"].as_str().expect("key").to_owned();
    let key_id = issued["key_id"].as_str().expect("key_id").to_owned();
    let mut alerts = bus
        .subscribe(&format!("sb.alert.rate_limit.{key_id}"))
        .await
        .expect("subscribes");

    let mut acks = 0;
    let mut refusals = Vec::new();
    for m in 0..8 {
        let body = json!({ "content": "hi", "message_id": format!("m{m}") });
        let reply = request(&bus, &format!("sb.conv.rl{m}.send"), &key, body).await;
        if reply["ok"] == json!(true) {
            acks += 1;
        } else {
            refusals.push(reply);
        }
    }
    assert_eq!(acks, 5, "refusals: {refusals:?}");
    assert_eq!(refusals.len(), 3);
    for refusal in &refusals {
        assert_error(refusal, "rate_limited");
        let retry = refusal["error"]["retry_after_ms"]
            .as_u64()
            .expect("retry_after_ms");
        assert!(retry > 0 && retry <= 60_000, "{refusal}");
    }
    // A resend of a stored message gets its ack, though the window is full;
    // an unknown agent is a bad request, not a rate-limited one. Neither
    // counts as a refusal.
    let resent = request(
        &bus,
        "sb.conv.rl0.send",
        &key,
        json!({ "content": "hi", "message_id": "m0" }),
    )
    .await;
    assert_eq!(resent["ok"], json!(true), "{resent}");
    assert_eq!(resent["duplicate"], json!(true), "{resent}");
    let unknown = request(
        &bus,
        "sb.conv.rl9.send",
        &key,
        json!({ "content": "hi", "agent": "nobody" }),
    )
    .await;
    assert_error(&unknown, "invalid_request");
    // Refused sends store no message.
    for m in 5..8 {
        let history = request(&bus, &format!("sb.conv.rl{m}.history"), &key, json!({})).await;
        assert_eq!(history["messages"], json!([]), "{history}");
    }
    // The refusals are on the log (coalesced) and published as an alert.
    let alert = tokio::time::timeout(WAIT, alerts.recv())
        .await
        .expect("a rate-limit alert arrives")
        .expect("open");
    let alert: Value = serde_json::from_slice(&alert.payload).expect("JSON");
    assert_eq!(alert["type"], json!("rate_limited"), "{alert}");
    assert_eq!(alert["data"]["key_id"], json!(key_id));
    assert_eq!(alert["data"]["limit"], json!("rpm"));
    server.shutdown().await;
    let log = switchboard_events::EventLog::open(
        &dir.path().join("data"),
        switchboard_events::OpenMode::MustExist,
    )
    .expect("reopens");
    let counted: u64 = log
        .read_from(1)
        .filter_map(|e| match e.expect("decodes").event {
            switchboard_events::Event::RateLimited(r) => Some(r.count),
            _ => None,
        })
        .sum();
    assert_eq!(counted, 3, "every refusal is counted once");
}

#[tokio::test]
async fn the_service_answers_srv_ping_info_and_stats_with_request_counts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start(config(dir.path())).await;
    let bus = server.bus().clone();
    let ask = |subject: &'static str| {
        let bus = bus.clone();
        async move {
            let reply = bus
                .request(subject, Headers::new(), "", WAIT)
                .await
                .unwrap_or_else(|error| panic!("{subject}: {error}"));
            serde_json::from_slice::<Value>(&reply.payload).expect("JSON")
        }
    };
    let ping = ask("$SRV.PING.switchboard").await;
    assert_eq!(ping["type"], json!("io.nats.micro.v1.ping_response"));
    assert_eq!(ping["name"], json!("switchboard"));
    assert_eq!(ping["version"], json!(env!("CARGO_PKG_VERSION")));

    let info = ask("$SRV.INFO.switchboard").await;
    let subjects: Vec<&str> = info["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| e["subject"].as_str().expect("subject"))
        .collect();
    assert_eq!(
        subjects,
        [
            "sb.conv.*.send",
            "sb.conv.*.history",
            "sb.conv.*.events",
            "sb.conv.list",
            "sb.usage",
            "sb.agents",
            "sb.health",
            "sb.admin.keys.*",
            "sb.admin.costs",
            "sb.admin.audit",
            "sb.admin.conv.*.erase"
        ]
    );

    let key = issue_key(&bus, "n").await;
    for m in 0..3 {
        let body = json!({ "content": "hi", "message_id": format!("m{m}") });
        let ack = request(&bus, "sb.conv.st.send", &key, body).await;
        assert_eq!(ack["ok"], json!(true));
    }
    let refused = request(
        &bus,
        "sb.conv.st.send",
        "sb-wrong-key-000000",
        json!({ "content": "x" }),
    )
    .await;
    assert_error(&refused, "unauthorized");

    let stats = ask("$SRV.STATS").await;
    assert_eq!(stats["type"], json!("io.nats.micro.v1.stats_response"));
    let send = &stats["endpoints"][0];
    assert_eq!(send["name"], json!("send"));
    assert_eq!(send["num_requests"], json!(4), "{stats}");
    // A refused caller is the caller's error, not the service's.
    assert_eq!(send["num_errors"], json!(0), "{stats}");
    assert!(send["processing_time"].as_u64().is_some_and(|ns| ns > 0));
    assert_eq!(stats["endpoints"][7]["name"], json!("admin_keys"));
    assert_eq!(stats["endpoints"][7]["num_requests"], json!(1));
    server.shutdown().await;
}

#[tokio::test]
async fn a_traceparent_travels_to_the_ack_the_deltas_and_the_published_events() {
    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start(config(dir.path())).await;
    let bus = server.bus().clone();
    let key = issue_key(&bus, "t").await;
    let mut published = bus.subscribe("sb.evt.conv.tp.>").await.expect("subscribes");

    let headers = Headers::new()
        .with("Authorization", format!("Bearer {key}"))
        .with("traceparent", TRACEPARENT);
    let body = serde_json::to_vec(&json!({ "content": "one two three" })).expect("JSON");
    let ack = bus
        .request("sb.conv.tp.send", headers, body, WAIT)
        .await
        .expect("answered");
    assert_eq!(ack.headers.get("traceparent"), Some(TRACEPARENT));

    let mut seen = std::collections::BTreeSet::new();
    while !seen.contains("reply_completed") {
        let message = tokio::time::timeout(WAIT, published.recv())
            .await
            .expect("the turn's messages arrive")
            .expect("open");
        let kind = message
            .subject
            .rsplit('.')
            .next()
            .expect("a type")
            .to_owned();
        assert_eq!(
            message.headers.get("traceparent"),
            Some(TRACEPARENT),
            "{} lacks the trace",
            message.subject
        );
        if kind != "reply_delta" {
            let event: Value = serde_json::from_slice(&message.payload).expect("JSON");
            assert_eq!(event["traceparent"], json!(TRACEPARENT), "{event}");
        }
        seen.insert(kind);
    }
    for kind in [
        "message_received",
        "agent_routed",
        "reply_delta",
        "reply_completed",
    ] {
        assert!(seen.contains(kind), "no {kind} among {seen:?}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_revoked_admin_key_is_replaced_not_a_dead_end() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start(config(dir.path())).await;
    let revoked = request(
        server.bus(),
        "sb.admin.keys.revoke",
        ADMIN_KEY,
        json!({ "key_id": "admin", "reason": "leaked" }),
    )
    .await;
    assert_eq!(revoked["ok"], json!(true), "{revoked}");
    server.shutdown().await;

    // The revoked key itself is refused, with a reason.
    let refused = Server::start(config(dir.path()))
        .await
        .err()
        .expect("refused");
    assert!(refused.to_string().contains("was revoked"), "{refused}");

    // Another configured key takes over under a new id.
    let mut fresh = config(dir.path());
    fresh.admin_key = Some("sb-fresh-admin-key-0000000001".into());
    let server = start(fresh.clone()).await;
    assert_eq!(server.admin_bootstrap(), &AdminBootstrap::FromConfig);
    let listed = request(
        server.bus(),
        "sb.admin.keys.list",
        "sb-fresh-admin-key-0000000001",
        json!({}),
    )
    .await;
    assert_eq!(listed["ok"], json!(true), "{listed}");
    server.shutdown().await;
    let server = start(fresh).await;
    assert_eq!(server.admin_bootstrap(), &AdminBootstrap::Existing);
    server.shutdown().await;

    // Without a configured key, an active admin key is enough.
    let mut unset = config(dir.path());
    unset.admin_key = None;
    let server = start(unset).await;
    assert_eq!(server.admin_bootstrap(), &AdminBootstrap::Existing);
    server.shutdown().await;
}

#[tokio::test]
async fn a_turn_left_open_after_a_clean_stop_is_still_ended_at_the_next_start() {
    use switchboard_events::catalog::MessageReceived;
    use switchboard_events::{Event, EventLog, ExpectedVersion, NewEvent, OpenMode, StreamId};

    let dir = tempfile::tempdir().expect("temp dir");
    let server = start(config(dir.path())).await;
    let issued = request(
        server.bus(),
        "sb.admin.keys.issue",
        ADMIN_KEY,
        json!({ "name": "k" }),
    )
    .await;
    let key = issued["key"].as_str().expect("key").to_owned();
    let key_id = issued["key_id"].as_str().expect("key_id").to_owned();
    let ack = request(
        server.bus(),
        "sb.conv.open1.send",
        &key,
        json!({ "content": "hi" }),
    )
    .await;
    assert_eq!(ack["ok"], json!(true), "{ack}");
    server.shutdown().await;

    // Written after the clean stop, by another writer: a message with no end.
    let log = EventLog::open(&dir.path().join("data"), OpenMode::MustExist).expect("opens");
    let received = Event::MessageReceived(MessageReceived {
        conversation_id: "open1".into(),
        message_id: "written-offline".into(),
        key_id,
        user: None,
        content: "no reply yet".into(),
        agent: None,
    });
    log.append(
        StreamId::conversation("open1").expect("valid"),
        ExpectedVersion::Any,
        vec![NewEvent::new(received)],
    )
    .await
    .expect("appends");
    drop(log);

    let server = start(config(dir.path())).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let failed = events_of_type(&server, "reply_failed");
        if failed
            .iter()
            .any(|e| e["data"]["message_id"] == json!("written-offline"))
        {
            assert_eq!(failed.len(), 1, "only the open turn is ended: {failed:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the open turn was never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown().await;
}

/// Under load, every `reply_delta` of a turn reaches a subscriber after the
/// turn's `message_received` and before its `reply_completed` (both of which
/// the outbox publishes from the log), whether the send waits for its reply
/// (whose turn starts before the message is durable) or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_delta_comes_between_its_message_and_its_turns_end() {
    use switchboard::server::{AgentSpec, ProviderSpec};
    use switchboard_actors::agent::AgentConfig;

    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = config(dir.path());
    config.agents.push(AgentSpec {
        config: AgentConfig::new("paced"),
        provider: ProviderSpec::Echo {
            word_delay: Duration::from_micros(200),
        },
    });
    let server = start(config).await;
    let bus = server.bus().clone();
    let key = issue_key(&bus, "o").await;
    let mut events = bus.subscribe("sb.evt.conv.*.>").await.expect("subscribes");

    let content = vec!["word"; 200].join(" ");
    let turns = 120;
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..turns {
        let bus = bus.clone();
        let mut headers = Headers::new().with("Authorization", format!("Bearer {key}"));
        if i % 4 < 2 {
            headers.insert("Switchboard-Wait", "reply".to_owned());
        }
        let agent = if i % 2 == 0 { "echo" } else { "paced" };
        let body = json!({ "content": content, "message_id": format!("o{i}"), "agent": agent });
        sends.spawn(async move {
            let subject = format!("sb.conv.o{}.send", i % 12);
            let body = serde_json::to_vec(&body).expect("JSON");
            bus.request(&subject, headers, body, WAIT)
                .await
                .expect("acked")
        });
    }
    while let Some(sent) = sends.join_next().await {
        sent.expect("the send task");
    }
    let mut received = std::collections::HashSet::new();
    let mut ended = std::collections::HashMap::new();
    let (mut early, mut late) = (Vec::new(), Vec::new());
    while ended.len() < turns {
        let message = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("every turn ends")
            .expect("open");
        let kind = message.subject.rsplit('.').next().unwrap_or("").to_owned();
        let body: Value = serde_json::from_slice(&message.payload).expect("JSON");
        let message_id = match kind.as_str() {
            "reply_delta" => body["message_id"].as_str(),
            "message_received" | "reply_completed" | "reply_failed" => {
                body["data"]["message_id"].as_str()
            }
            _ => None,
        };
        let Some(message_id) = message_id.map(str::to_owned) else {
            continue;
        };
        match kind.as_str() {
            "message_received" => {
                received.insert(message_id);
            }
            "reply_delta" if !received.contains(&message_id) => early.push(message_id),
            "reply_delta" if ended.contains_key(&message_id) => late.push(message_id),
            "reply_delta" => {}
            _ => {
                ended.insert(message_id, kind);
            }
        }
    }
    assert!(early.is_empty(), "deltas before their message: {early:?}");
    assert!(late.is_empty(), "deltas after their turn's end: {late:?}");
    assert!(
        ended.values().all(|kind| kind == "reply_completed"),
        "{ended:?}"
    );
    server.shutdown().await;
}
