//! The read and admin requests an HTTP front (or any client) makes over the
//! bus, beyond send and history: conversation lists and events, usage,
//! agents, costs, audit, erasure, health, and the rate-limit headers on
//! keyed replies. In-process on the embedded bus.

use std::time::Duration;

use serde_json::{json, Value};
use switchboard::bus::{Bus, Headers, Message};
use switchboard::server::{Server, ServerConfig};

const WAIT: Duration = Duration::from_secs(20);
const ADMIN_KEY: &str = "sb-admin-key-for-tests-0123456789";

async fn start(dir: &std::path::Path) -> Server {
    let mut config = ServerConfig::new(dir.join("data"));
    config.admin_key = Some(ADMIN_KEY.to_owned());
    Server::start(config).await.expect("the server starts")
}

async fn raw(bus: &Bus, subject: &str, key: Option<&str>, body: Value) -> Message {
    let mut headers = Headers::new();
    if let Some(key) = key {
        headers.insert("Authorization", format!("Bearer {key}"));
    }
    bus.request(
        subject,
        headers,
        serde_json::to_vec(&body).expect("JSON"),
        WAIT,
    )
    .await
    .unwrap_or_else(|error| panic!("{subject}: {error}"))
}

async fn request(bus: &Bus, subject: &str, key: Option<&str>, body: Value) -> Value {
    let reply = raw(bus, subject, key, body).await;
    serde_json::from_slice(&reply.payload).expect("replies are JSON")
}

#[track_caller]
fn assert_error(reply: &Value, code: &str) {
    assert_eq!(reply["ok"], json!(false), "{reply}");
    assert_eq!(reply["error"]["code"], json!(code), "{reply}");
}

async fn issue(bus: &Bus, body: Value) -> (String, String) {
    let issued = request(bus, "sb.admin.keys.issue", Some(ADMIN_KEY), body).await;
    (
        issued["key_id"].as_str().expect("key_id").to_owned(),
        issued["key"].as_str().expect("key").to_owned(),
    )
}

/// Sends and waits until the reply is in the history.
async fn exchange(bus: &Bus, key: &str, conversation: &str, content: &str) {
    let ack = request(
        bus,
        &format!("sb.conv.{conversation}.send"),
        Some(key),
        json!({ "content": content }),
    )
    .await;
    assert_eq!(ack["ok"], json!(true), "{ack}");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let history = request(
            bus,
            &format!("sb.conv.{conversation}.history"),
            Some(key),
            json!({}),
        )
        .await;
        let replies = history["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter(|m| {
                m["role"] == json!("assistant") && m["content"] == json!(format!("echo: {content}"))
            })
            .count();
        if replies == 1 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{history}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_key_lists_its_own_conversations_and_reads_their_events_after_a_seq() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start(dir.path()).await;
    let bus = server.bus().clone();
    let (_, ana) = issue(&bus, json!({ "name": "ana" })).await;
    let (_, bob) = issue(&bus, json!({ "name": "bob" })).await;
    exchange(&bus, &ana, "a1", "one").await;
    exchange(&bus, &ana, "a2", "two").await;
    exchange(&bus, &bob, "b1", "three").await;

    let listed = request(&bus, "sb.conv.list", Some(&ana), json!({})).await;
    let ids: Vec<&str> = listed["conversations"]
        .as_array()
        .expect("conversations")
        .iter()
        .map(|c| c["conversation_id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["a1", "a2"]);
    let page = request(
        &bus,
        "sb.conv.list",
        Some(&ana),
        json!({ "after": "a1", "limit": 1 }),
    )
    .await;
    assert_eq!(page["conversations"][0]["conversation_id"], json!("a2"));
    // An empty body is an empty request.
    let headers = Headers::new().with("Authorization", format!("Bearer {bob}"));
    let reply = bus
        .request("sb.conv.list", headers, "", WAIT)
        .await
        .expect("answered");
    let reply: Value = serde_json::from_slice(&reply.payload).expect("JSON");
    assert_eq!(
        reply["conversations"][0]["conversation_id"],
        json!("b1"),
        "{reply}"
    );

    let all = request(&bus, "sb.conv.a1.events", Some(&ana), json!({})).await;
    let events = all["events"].as_array().expect("events");
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["type"].as_str().expect("type"))
        .collect();
    assert_eq!(
        types,
        [
            "conversation_started",
            "message_received",
            "agent_routed",
            "reply_completed",
            "usage_recorded"
        ]
    );
    let second = events[1]["seq"].as_u64().expect("seq");
    let after = request(
        &bus,
        "sb.conv.a1.events",
        Some(&ana),
        json!({ "after_seq": second }),
    )
    .await;
    assert_eq!(after["events"].as_array().expect("events").len(), 3);
    assert!(after["head"].as_u64().expect("head") >= second);

    // Another key's conversation: forbidden, unless admin.
    assert_error(
        &request(&bus, "sb.conv.a1.events", Some(&bob), json!({})).await,
        "forbidden",
    );
    let admin = request(&bus, "sb.conv.a1.events", Some(ADMIN_KEY), json!({})).await;
    assert_eq!(admin["events"].as_array().expect("events").len(), 5);
    assert_error(
        &request(
            &bus,
            "sb.conv.a1.events",
            Some(&ana),
            json!({ "after_seq": "x" }),
        )
        .await,
        "invalid_request",
    );
    server.shutdown().await;
}

#[tokio::test]
async fn usage_agents_costs_and_audit_answer_from_the_projections() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start(dir.path()).await;
    let bus = server.bus().clone();
    let (key_id, key) = issue(
        &bus,
        json!({ "name": "ana", "owner": "team-a", "limits": { "rpm": 100 } }),
    )
    .await;
    exchange(&bus, &key, "u1", "hello there").await;

    let usage = request(&bus, "sb.usage", Some(&key), json!({})).await;
    assert_eq!(usage["key_id"], json!(key_id));
    assert_eq!(usage["limits"]["rpm"], json!(100));
    assert_eq!(usage["spent"]["requests"], json!(1));
    assert!(usage["spent"]["tokens_in"].as_u64().expect("tokens") > 0);
    assert!(!usage.to_string().contains(&key), "the key is never echoed");

    let agents = request(&bus, "sb.agents", Some(&key), json!({})).await;
    assert_eq!(
        agents["agents"],
        json!([{ "name": "echo", "default": true }])
    );

    assert_error(
        &request(&bus, "sb.admin.costs", Some(&key), json!({ "by": "key" })).await,
        "forbidden",
    );
    let costs = request(
        &bus,
        "sb.admin.costs",
        Some(ADMIN_KEY),
        json!({ "by": "model" }),
    )
    .await;
    assert_eq!(costs["rows"][0]["group"], json!("echo"), "{costs}");
    assert_eq!(costs["rows"][0]["requests"], json!(1));
    for bad in [
        json!({}),
        json!({ "by": "planet" }),
        json!({ "by": "day", "since": "2026-13-01" }),
        json!({ "by": "day", "since": "2026-02-02", "until": "2026-02-01" }),
    ] {
        assert_error(
            &request(&bus, "sb.admin.costs", Some(ADMIN_KEY), bad).await,
            "invalid_request",
        );
    }

    let audit = request(
        &bus,
        "sb.admin.audit",
        Some(ADMIN_KEY),
        json!({ "type": "key_issued" }),
    )
    .await;
    let issued: Vec<&str> = audit["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["data"]["key_id"].as_str().expect("key_id"))
        .collect();
    assert_eq!(issued, ["admin", key_id.as_str()]);
    let page = request(
        &bus,
        "sb.admin.audit",
        Some(ADMIN_KEY),
        json!({ "limit": 1 }),
    )
    .await;
    let cursor = page["next_cursor"].as_str().expect("more pages").to_owned();
    let next = request(
        &bus,
        "sb.admin.audit",
        Some(ADMIN_KEY),
        json!({ "limit": 1, "cursor": cursor }),
    )
    .await;
    assert_ne!(next["events"][0]["seq"], page["events"][0]["seq"]);
    assert_error(
        &request(
            &bus,
            "sb.admin.audit",
            Some(ADMIN_KEY),
            json!({ "type": "no_such_type" }),
        )
        .await,
        "invalid_request",
    );
    server.shutdown().await;
}

#[tokio::test]
async fn an_admin_erases_a_conversation_and_its_history_keeps_no_content() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start(dir.path()).await;
    let bus = server.bus().clone();
    let (_, key) = issue(&bus, json!({ "name": "ana" })).await;
    exchange(&bus, &key, "e1", "secret stuff").await;

    assert_error(
        &request(&bus, "sb.admin.conv.e1.erase", Some(&key), json!({})).await,
        "forbidden",
    );
    let erased = request(&bus, "sb.admin.conv.e1.erase", Some(ADMIN_KEY), json!({})).await;
    assert_eq!(erased["ok"], json!(true), "{erased}");
    assert_eq!(erased["already"], json!(false));
    let again = request(&bus, "sb.admin.conv.e1.erase", Some(ADMIN_KEY), json!({})).await;
    assert_eq!(again["already"], json!(true));
    assert_error(
        &request(
            &bus,
            "sb.admin.conv.nobody.erase",
            Some(ADMIN_KEY),
            json!({}),
        )
        .await,
        "not_found",
    );

    let history = request(&bus, "sb.conv.e1.history", Some(&key), json!({})).await;
    assert_eq!(history["erased"], json!(true), "{history}");
    assert_eq!(history["messages"], json!([]));
    assert!(!history.to_string().contains("secret"));
    let audit = request(
        &bus,
        "sb.admin.audit",
        Some(ADMIN_KEY),
        json!({ "type": "conversation_erased" }),
    )
    .await;
    assert_eq!(audit["events"][0]["data"]["by"], json!("admin"));
    server.shutdown().await;
}

#[tokio::test]
async fn health_needs_no_key_and_keyed_replies_carry_rate_limit_headers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start(dir.path()).await;
    let bus = server.bus().clone();
    let health = request(&bus, "sb.health", None, json!({})).await;
    assert_eq!(health["ok"], json!(true));
    assert!(health["log_head"].as_u64().expect("head") >= 1);

    let (_, key) = issue(
        &bus,
        json!({ "name": "slow", "limits": { "rpm": 2, "tpm": 5000 } }),
    )
    .await;
    let first = raw(
        &bus,
        "sb.conv.h1.send",
        Some(&key),
        json!({ "content": "a" }),
    )
    .await;
    assert_eq!(first.headers.get("RateLimit-Limit"), Some("2"));
    assert_eq!(first.headers.get("RateLimit-Remaining"), Some("1"));
    assert_eq!(first.headers.get("x-ratelimit-limit-tokens"), Some("5000"));
    assert!(first.headers.get("RateLimit-Reset").is_some());
    let history = raw(&bus, "sb.conv.h1.history", Some(&key), json!({})).await;
    assert_eq!(
        history.headers.get("RateLimit-Limit"),
        Some("2"),
        "reads carry them too"
    );
    raw(
        &bus,
        "sb.conv.h1.send",
        Some(&key),
        json!({ "content": "b" }),
    )
    .await;
    let refused = raw(
        &bus,
        "sb.conv.h1.send",
        Some(&key),
        json!({ "content": "c" }),
    )
    .await;
    let body: Value = serde_json::from_slice(&refused.payload).expect("JSON");
    assert_error(&body, "rate_limited");
    assert_eq!(refused.headers.get("RateLimit-Remaining"), Some("0"));
    let retry: u64 = refused
        .headers
        .get("Retry-After")
        .expect("Retry-After")
        .parse()
        .expect("secs");
    assert!((1..=60).contains(&retry), "{retry}");

    // A key without limits gets no rate-limit headers.
    let (_, free) = issue(&bus, json!({ "name": "free" })).await;
    let reply = raw(
        &bus,
        "sb.conv.h2.send",
        Some(&free),
        json!({ "content": "a" }),
    )
    .await;
    assert_eq!(reply.headers.get("RateLimit-Limit"), None);
    server.shutdown().await;
}
