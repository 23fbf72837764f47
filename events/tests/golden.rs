//! Golden fixtures of the storage format (DESIGN §2: "old records must keep decoding").
//!
//! `tests/fixtures/v1/<type>.bin` holds the bytes `codec::encode` wrote at format
//! version 1 for one fixed envelope of each event type; `<type>.json` holds the same
//! envelope as wire JSON. The test decodes every `.bin`, compares it with its `.json`
//! and checks that encoding it again gives the very same bytes.
//!
//! Regenerate the fixtures (only when the change to the stored bytes is intended,
//! e.g. after adding an event type) with:
//!
//! ```sh
//! SWITCHBOARD_BLESS_FIXTURES=1 cargo test -p switchboard-events --test golden
//! ```
//!
//! Blessing writes the envelopes built by `fixture_envelope` below. Once a format
//! version is released its fixtures are never regenerated: a new format version gets
//! a new `v<N>` directory, and the `v1` files must keep decoding (upcast on read).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Once;

use chrono::{DateTime, Utc};
use serde_json::Value;
use switchboard_events::catalog::{
    AdminAction, AgentRouted, AuthChannel, AuthFailed, Budget, BudgetExceeded, BudgetPeriod,
    BudgetScope, BudgetThresholdCrossed, ConversationErased, ConversationStarted, KeyHash,
    KeyIssued, KeyRevoked, KeyUpdated, LimitKind, Limits, MessageReceived, RateLimited,
    ReplyCompleted, ReplyFailed, Scope, UsageRecorded,
};
use switchboard_events::codec::{self, FORMAT_VERSION};
use switchboard_events::{Envelope, Event, StreamId, EVENT_TYPES};
use uuid::Uuid;

const BLESS_VAR: &str = "SWITCHBOARD_BLESS_FIXTURES";

/// 2024-05-17T09:21:33.123456Z: a timestamp with microseconds, so the fixtures
/// prove storage keeps them.
const FIXTURE_AT_MICROS: i64 = 1_715_937_693_123_456;

/// The v1 fixture directory; blessed first (once per test run) when asked to.
fn fixtures_dir() -> PathBuf {
    static BLESSED: Once = Once::new();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1");
    if blessing() {
        BLESSED.call_once(|| bless(&dir));
    }
    dir
}

fn blessing() -> bool {
    std::env::var(BLESS_VAR).is_ok_and(|v| v == "1")
}

fn micros(at: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(at).expect("fixture timestamps are in range")
}

fn uuid(n: u128) -> Uuid {
    // A UUID v7 layout (version nibble 7, variant 10) with fixed bits.
    Uuid::from_u128(0x018f_8a3e_1c2b_7000_8000_0000_0000_0000 | n)
}

fn stream(name: &str) -> StreamId {
    StreamId::parse(name).expect("fixture stream names are valid")
}

fn key_hash() -> KeyHash {
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(0xa5);
    }
    KeyHash(bytes)
}

/// The event of each fixture. Adding an event type to the catalog without a fixture
/// here makes blessing panic and the golden test fail.
fn fixture_event(type_name: &str) -> Event {
    match type_name {
        "conversation_started" => Event::ConversationStarted(ConversationStarted {
            conversation_id: "c-7f3a".into(),
            key_id: "key_01hx".into(),
            user: Some("ana@example.com".into()),
        }),
        "message_received" => Event::MessageReceived(MessageReceived {
            conversation_id: "c-7f3a".into(),
            message_id: "m-0001".into(),
            key_id: "key_01hx".into(),
            user: Some("ana@example.com".into()),
            content: "Grüß dich — 你好 👋 \"quoted\"\nsecond line".into(),
            agent: Some("helper".into()),
        }),
        "agent_routed" => Event::AgentRouted(AgentRouted {
            conversation_id: "c-7f3a".into(),
            message_id: "m-0001".into(),
            agent: "helper".into(),
            rule: Some("^help".into()),
        }),
        "reply_completed" => Event::ReplyCompleted(ReplyCompleted {
            conversation_id: "c-7f3a".into(),
            message_id: "m-0001".into(),
            reply_id: "r-0001".into(),
            agent: "helper".into(),
            content: "Hallo! Wie kann ich helfen?".into(),
            finish_reason: "stop".into(),
            latency_ms: 1_234,
        }),
        "reply_failed" => Event::ReplyFailed(ReplyFailed {
            conversation_id: "c-7f3a".into(),
            message_id: "m-0002".into(),
            agent: "helper".into(),
            code: "upstream_timeout".into(),
            message: "the model did not answer within 30 s".into(),
        }),
        "conversation_erased" => Event::ConversationErased(ConversationErased {
            conversation_id: "c-7f3a".into(),
            by: "admin".into(),
        }),
        "usage_recorded" => Event::UsageRecorded(UsageRecorded {
            conversation_id: "c-7f3a".into(),
            message_id: "m-0001".into(),
            key_id: "key_01hx".into(),
            user: Some("ana@example.com".into()),
            agent: "helper".into(),
            model: "gpt-4o-mini".into(),
            prompt_tokens: 1_530,
            completion_tokens: 211,
            estimated: true,
            input_price: 150_000,
            output_price: 600_000,
            cost_micros: 356,
        }),
        "budget_threshold_crossed" => Event::BudgetThresholdCrossed(BudgetThresholdCrossed {
            scope: BudgetScope::User,
            subject_id: "ana@example.com".into(),
            period: BudgetPeriod::Month,
            period_start: micros(1_714_521_600_000_000),
            threshold_pct: 80,
            spent_micros: 8_000_001,
            budget_micros: 10_000_000,
        }),
        "budget_exceeded" => Event::BudgetExceeded(BudgetExceeded {
            scope: BudgetScope::Key,
            subject_id: "key_01hx".into(),
            period: BudgetPeriod::Day,
            spent_micros: u64::MAX,
            budget_micros: 5_000_000,
        }),
        "key_issued" => Event::KeyIssued(KeyIssued {
            key_id: "key_01hx".into(),
            name: "ana's laptop".into(),
            owner: Some("ana@example.com".into()),
            key_hash: key_hash(),
            scopes: vec![Scope::Chat, Scope::Admin],
            limits: Limits {
                rpm: Some(60),
                tpm: Some(100_000),
                max_parallel: Some(4),
            },
            budget: Some(Budget {
                micros: 10_000_000,
                period: BudgetPeriod::Month,
            }),
            expires_at: Some(micros(1_767_225_599_999_999)),
        }),
        "key_updated" => Event::KeyUpdated(KeyUpdated {
            key_id: "key_01hx".into(),
            limits: Some(Limits {
                rpm: Some(120),
                tpm: None,
                max_parallel: Some(8),
            }),
            budget: Some(Budget {
                micros: 0,
                period: BudgetPeriod::Total,
            }),
        }),
        // All optional fields None, in the data and in the envelope.
        "key_revoked" => Event::KeyRevoked(KeyRevoked {
            key_id: "key_01hx".into(),
            by: "admin".into(),
            reason: None,
        }),
        "auth_failed" => Event::AuthFailed(AuthFailed {
            channel: AuthChannel::Http,
            reason: "unknown key".into(),
            key_prefix: Some("sb_live_9f".into()),
            remote: Some("203.0.113.7:51234".into()),
        }),
        "rate_limited" => Event::RateLimited(RateLimited {
            key_id: "key_01hx".into(),
            limit: LimitKind::Tpm,
            count: 17,
            retry_after_ms: 850,
        }),
        "admin_action" => Event::AdminAction(AdminAction {
            actor: "key_admin".into(),
            action: "keys.revoke".into(),
            target: "key_01hx".into(),
        }),
        other => panic!("no golden fixture for event type {other:?}: add one to fixture_event"),
    }
}

/// The fixed envelope of the event type at `index` in the catalog.
fn fixture_envelope(index: usize, type_name: &str) -> Envelope {
    let event = fixture_event(type_name);
    let n = index as u128;
    let stream = match &event {
        Event::KeyIssued(_) | Event::KeyUpdated(_) | Event::KeyRevoked(_) => stream("key/key_01hx"),
        Event::AuthFailed(_) | Event::RateLimited(_) | Event::AdminAction(_) => StreamId::system(),
        Event::BudgetThresholdCrossed(_) | Event::BudgetExceeded(_) => stream("agent/helper"),
        _ => stream("conv/c-7f3a"),
    };
    // The second fixture with every optional field None is `conversation_erased`,
    // whose data has no optional field.
    let bare = matches!(type_name, "key_revoked" | "conversation_erased");
    Envelope {
        seq: index as u64 + 1,
        id: uuid(0x100 + n),
        stream,
        version: 1_000 + index as u64,
        at: micros(FIXTURE_AT_MICROS + index as i64),
        correlation_id: (!bare).then(|| uuid(0x200 + n)),
        causation_id: (!bare).then(|| uuid(0x300 + n)),
        traceparent: (!bare)
            .then(|| format!("00-4bf92f3577b34da6a3ce929d0e0e47{n:02x}-00f067aa0ba902b7-01")),
        event,
    }
}

/// The fixed envelope of a named event type.
fn fixture(type_name: &str) -> Envelope {
    let index = EVENT_TYPES
        .iter()
        .position(|t| *t == type_name)
        .unwrap_or_else(|| panic!("{type_name} is not in the catalog"));
    fixture_envelope(index, type_name)
}

fn bless(dir: &Path) {
    assert_eq!(
        FORMAT_VERSION, 1,
        "blessing writes fixtures/v1; a new format version needs its own fixture directory"
    );
    std::fs::create_dir_all(dir).expect("create the fixture directory");
    for (index, type_name) in EVENT_TYPES.iter().enumerate() {
        let envelope = fixture_envelope(index, type_name);
        std::fs::write(
            dir.join(format!("{type_name}.bin")),
            codec::encode(&envelope),
        )
        .expect("write a .bin fixture");
        let json = serde_json::to_string_pretty(&envelope).expect("an envelope is JSON") + "\n";
        std::fs::write(dir.join(format!("{type_name}.json")), json).expect("write a .json fixture");
    }
}

fn read_fixture(type_name: &str, ext: &str) -> Vec<u8> {
    let path = fixtures_dir().join(format!("{type_name}.{ext}"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "missing golden fixture {} ({e}); generate it with {BLESS_VAR}=1",
            path.display()
        )
    })
}

#[test]
fn every_v1_fixture_decodes_to_its_json_and_reencodes_to_the_same_bytes() {
    for (index, type_name) in EVENT_TYPES.iter().enumerate() {
        let bin = read_fixture(type_name, "bin");
        let json = read_fixture(type_name, "json");
        assert_eq!(
            bin.first(),
            Some(&1),
            "{type_name}.bin: format version byte"
        );

        let expected: Envelope = serde_json::from_slice(&json)
            .unwrap_or_else(|e| panic!("{type_name}.json does not parse as an envelope: {e}"));
        let decoded = codec::decode(index as u64 + 1, &bin)
            .unwrap_or_else(|e| panic!("{type_name}.bin does not decode: {e}"));
        assert_eq!(decoded, expected, "{type_name}: .bin and .json disagree");
        assert_eq!(decoded.event.type_name(), *type_name);

        // The JSON file is exactly the decoded envelope's wire JSON, key for key.
        let on_disk: Value = serde_json::from_slice(&json).expect("fixture JSON");
        let rendered: Value = serde_json::from_str(&decoded.to_json()).expect("wire JSON");
        assert_eq!(rendered, on_disk, "{type_name}: wire JSON changed shape");

        assert_eq!(
            codec::encode(&decoded),
            bin,
            "{type_name}: encoding the decoded envelope changed the stored bytes"
        );
    }
}

#[test]
fn there_is_a_fixture_for_every_event_type_and_no_other() {
    let dir = fixtures_dir();
    let mut missing = Vec::new();
    for type_name in EVENT_TYPES {
        for ext in ["bin", "json"] {
            let path = dir.join(format!("{type_name}.{ext}"));
            if !path.is_file() {
                missing.push(path.display().to_string());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "event types without golden fixtures (generate with {BLESS_VAR}=1): {missing:?}"
    );

    let known: BTreeSet<&str> = EVENT_TYPES.iter().copied().collect();
    for entry in std::fs::read_dir(&dir).expect("read the fixture directory") {
        let path = entry.expect("fixture directory entry").path();
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        let ext = path
            .extension()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        assert!(
            known.contains(stem) && matches!(ext, "bin" | "json"),
            "stray file in the fixture directory: {}",
            path.display()
        );
    }
}

#[test]
fn fixtures_cover_both_filled_and_empty_optional_fields() {
    let envelopes: Vec<Envelope> = EVENT_TYPES
        .iter()
        .map(|t| serde_json::from_slice(&read_fixture(t, "json")).expect("fixture JSON"))
        .collect();
    let filled = envelopes
        .iter()
        .filter(|e| e.correlation_id.is_some() && e.traceparent.is_some())
        .count();
    let bare = envelopes
        .iter()
        .filter(|e| e.correlation_id.is_none() && e.causation_id.is_none())
        .count();
    assert!(
        filled > envelopes.len() / 2,
        "most fixtures fill optional fields"
    );
    assert!(
        bare >= 1,
        "at least one fixture leaves optional fields None"
    );
    assert!(
        envelopes
            .iter()
            .all(|e| e.at.timestamp_subsec_micros() != 0),
        "fixture timestamps carry microseconds"
    );
}

#[test]
fn a_fixture_stays_decodable_under_any_seq() {
    // The seq is the record's key, not part of its bytes.
    let bin = read_fixture("message_received", "bin");
    for seq in [0, 1, 42, u64::MAX] {
        let envelope = codec::decode(seq, &bin).expect("fixture decodes");
        assert_eq!(envelope.seq, seq);
        assert_eq!(codec::encode(&envelope), bin);
    }
}

#[test]
fn envelope_json_has_exactly_the_wire_keys() {
    const WIRE_KEYS: [&str; 10] = [
        "seq",
        "id",
        "stream",
        "version",
        "at",
        "correlation_id",
        "causation_id",
        "traceparent",
        "type",
        "data",
    ];
    let wire_keys: BTreeSet<&str> = WIRE_KEYS.into_iter().collect();
    for (index, type_name) in EVENT_TYPES.iter().enumerate() {
        let envelope = fixture_envelope(index, type_name);
        let json: Value = serde_json::from_str(&envelope.to_json()).expect("wire JSON");
        let object = json.as_object().expect("an envelope is a JSON object");
        let keys: BTreeSet<&str> = object.keys().map(String::as_str).collect();
        assert_eq!(keys, wire_keys, "{type_name}: top-level keys");
        assert_eq!(object["type"], *type_name);
        assert!(object["data"].is_object(), "{type_name}: data is an object");
        assert_eq!(object["seq"], envelope.seq);
        assert_eq!(object["id"], envelope.id.to_string());
        assert_eq!(object["stream"], envelope.stream.as_str());

        let at = object["at"].as_str().expect("at is a string");
        assert_rfc3339_utc(at);
        let parsed = DateTime::parse_from_rfc3339(at).expect("at parses as RFC 3339");
        assert_eq!(
            parsed, envelope.at,
            "{type_name}: at keeps its microseconds"
        );
    }

    // Optional envelope fields are present as null, never left out.
    let bare = fixture("key_revoked");
    let json: Value = serde_json::from_str(&bare.to_json()).expect("wire JSON");
    for key in ["correlation_id", "causation_id", "traceparent"] {
        assert_eq!(json[key], Value::Null, "{key} of a bare envelope");
    }
    assert_eq!(json["data"]["reason"], Value::Null);
}

#[test]
fn key_issued_json_has_a_hex_key_hash_and_utc_timestamps() {
    let envelope = fixture("key_issued");
    let json: Value = serde_json::from_str(&envelope.to_json()).expect("wire JSON");
    let data = &json["data"];

    let key_hash = data["key_hash"].as_str().expect("key_hash is a string");
    assert_eq!(key_hash.len(), 64, "key_hash: {key_hash}");
    assert!(
        key_hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "key_hash is lowercase hex: {key_hash}"
    );
    let Event::KeyIssued(issued) = &envelope.event else {
        unreachable!("the key_issued fixture is a KeyIssued");
    };
    let mut raw = [0u8; 32];
    for (i, byte) in raw.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&key_hash[2 * i..2 * i + 2], 16).expect("hex digit pair");
    }
    assert_eq!(raw, issued.key_hash.0);

    assert_rfc3339_utc(data["expires_at"].as_str().expect("expires_at is a string"));
    assert_eq!(data["scopes"], serde_json::json!(["chat", "admin"]));
    assert_eq!(
        data["limits"],
        serde_json::json!({"rpm": 60, "tpm": 100_000, "max_parallel": 4})
    );
    assert_eq!(
        data["budget"],
        serde_json::json!({"micros": 10_000_000, "period": "month"})
    );

    let envelope = fixture("budget_threshold_crossed");
    let json: Value = serde_json::from_str(&envelope.to_json()).expect("wire JSON");
    assert_rfc3339_utc(json["data"]["period_start"].as_str().expect("period_start"));
    assert_eq!(json["data"]["scope"], "user");
}

/// `2024-05-17T09:21:33.123456Z`: RFC 3339, UTC written as `Z`, microseconds.
fn assert_rfc3339_utc(text: &str) {
    assert!(text.ends_with('Z'), "{text:?} ends with Z");
    assert!(!text.contains("+00:00"), "{text:?} writes UTC as Z");
    let parsed = DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text:?} is not RFC 3339: {e}"));
    assert_eq!(parsed.offset().local_minus_utc(), 0);
    let fraction = text
        .split_once('.')
        .map(|(_, f)| f.trim_end_matches('Z'))
        .unwrap_or_else(|| panic!("{text:?} has a fraction of a second"));
    assert_eq!(fraction.len(), 6, "{text:?} has microsecond precision");
}
