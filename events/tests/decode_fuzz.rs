//! The storage codec against hostile and random input: decoding never panics,
//! broken records are refused, and every event round-trips exactly.

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use switchboard_events::catalog::{
    AdminAction, AgentRouted, AuthChannel, AuthFailed, Budget, BudgetExceeded, BudgetPeriod,
    BudgetScope, BudgetThresholdCrossed, ConversationErased, ConversationStarted, KeyHash,
    KeyIssued, KeyRevoked, KeyUpdated, LimitKind, Limits, MessageReceived, RateLimited,
    ReplyCompleted, ReplyFailed, Scope, UsageRecorded,
};
use switchboard_events::codec::{self, DecodeError};
use switchboard_events::{Envelope, Event, StreamId, EVENT_TYPES};
use uuid::Uuid;

// ---- strategies -------------------------------------------------------------

/// Any timestamp chrono can hold, at the microsecond precision storage keeps.
fn any_time() -> BoxedStrategy<DateTime<Utc>> {
    let min = DateTime::<Utc>::MIN_UTC.timestamp_micros();
    let max = DateTime::<Utc>::MAX_UTC.timestamp_micros();
    prop_oneof![
        (min..=max).boxed(),
        // Realistic times get most of the cases.
        (0i64..4_102_444_800_000_000).boxed(),
    ]
    .prop_map(|micros| DateTime::from_timestamp_micros(micros).expect("in chrono's range"))
    .boxed()
}

/// Timestamps RFC 3339 can write: years 0000 to 9999.
fn rfc3339_time() -> BoxedStrategy<DateTime<Utc>> {
    (-62_167_219_200_000_000i64..=253_402_300_799_999_999)
        .prop_map(|micros| DateTime::from_timestamp_micros(micros).expect("in chrono's range"))
        .boxed()
}

fn text() -> BoxedStrategy<String> {
    prop_oneof![
        "[a-z0-9_.-]{0,16}",
        any::<String>(),
        // Multi-byte characters, emoji and control characters.
        "[\\u{0}-\\u{1f}äöüß你好👋🎉\\u{feff}\\u{10ffff} a-z\"\\\\]{0,48}",
    ]
    .boxed()
}

fn opt_text() -> BoxedStrategy<Option<String>> {
    proptest::option::of(text()).boxed()
}

fn any_uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

fn any_stream() -> impl Strategy<Value = StreamId> {
    prop_oneof![
        Just("system".to_owned()),
        "(conv|key|agent)/[A-Za-z0-9_.:-]{1,128}",
    ]
    .prop_map(|name| StreamId::parse(&name).expect("the strategy only makes valid names"))
}

fn period() -> impl Strategy<Value = BudgetPeriod> {
    prop_oneof![
        Just(BudgetPeriod::Day),
        Just(BudgetPeriod::Month),
        Just(BudgetPeriod::Total),
    ]
}

fn budget_scope() -> impl Strategy<Value = BudgetScope> {
    prop_oneof![Just(BudgetScope::Key), Just(BudgetScope::User)]
}

fn limits() -> impl Strategy<Value = Limits> {
    (
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(|(rpm, tpm, max_parallel)| Limits {
            rpm,
            tpm,
            max_parallel,
        })
}

fn budget() -> impl Strategy<Value = Budget> {
    (any::<u64>(), period()).prop_map(|(micros, period)| Budget { micros, period })
}

/// Random events of the catalog entry at `index`. A new catalog entry without a
/// strategy here fails `every_event_type_has_a_strategy`.
fn event_of_type(index: usize, time: BoxedStrategy<DateTime<Utc>>) -> BoxedStrategy<Event> {
    match EVENT_TYPES[index] {
        "conversation_started" => (text(), text(), opt_text())
            .prop_map(|(conversation_id, key_id, user)| {
                Event::ConversationStarted(ConversationStarted {
                    conversation_id,
                    key_id,
                    user,
                })
            })
            .boxed(),
        "message_received" => (text(), text(), text(), opt_text(), text(), opt_text())
            .prop_map(
                |(conversation_id, message_id, key_id, user, content, agent)| {
                    Event::MessageReceived(MessageReceived {
                        conversation_id,
                        message_id,
                        key_id,
                        user,
                        content,
                        agent,
                    })
                },
            )
            .boxed(),
        "agent_routed" => (text(), text(), text(), opt_text())
            .prop_map(|(conversation_id, message_id, agent, rule)| {
                Event::AgentRouted(AgentRouted {
                    conversation_id,
                    message_id,
                    agent,
                    rule,
                })
            })
            .boxed(),
        "reply_completed" => (text(), text(), text(), text(), text(), text(), any::<u64>())
            .prop_map(
                |(
                    conversation_id,
                    message_id,
                    reply_id,
                    agent,
                    content,
                    finish_reason,
                    latency_ms,
                )| {
                    Event::ReplyCompleted(ReplyCompleted {
                        conversation_id,
                        message_id,
                        reply_id,
                        agent,
                        content,
                        finish_reason,
                        latency_ms,
                    })
                },
            )
            .boxed(),
        "reply_failed" => (text(), text(), text(), text(), text())
            .prop_map(|(conversation_id, message_id, agent, code, message)| {
                Event::ReplyFailed(ReplyFailed {
                    conversation_id,
                    message_id,
                    agent,
                    code,
                    message,
                })
            })
            .boxed(),
        "conversation_erased" => (text(), text())
            .prop_map(|(conversation_id, by)| {
                Event::ConversationErased(ConversationErased {
                    conversation_id,
                    by,
                })
            })
            .boxed(),
        "usage_recorded" => (
            (text(), text(), text(), opt_text(), text(), text()),
            (
                any::<u64>(),
                any::<u64>(),
                any::<bool>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
            ),
        )
            .prop_map(
                |(
                    (conversation_id, message_id, key_id, user, agent, model),
                    (
                        prompt_tokens,
                        completion_tokens,
                        estimated,
                        input_price,
                        output_price,
                        cost_micros,
                    ),
                )| {
                    Event::UsageRecorded(UsageRecorded {
                        conversation_id,
                        message_id,
                        key_id,
                        user,
                        agent,
                        model,
                        prompt_tokens,
                        completion_tokens,
                        estimated,
                        input_price,
                        output_price,
                        cost_micros,
                    })
                },
            )
            .boxed(),
        "budget_threshold_crossed" => (
            budget_scope(),
            text(),
            period(),
            time,
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(
                |(
                    scope,
                    subject_id,
                    period,
                    period_start,
                    threshold_pct,
                    spent_micros,
                    budget_micros,
                )| {
                    Event::BudgetThresholdCrossed(BudgetThresholdCrossed {
                        scope,
                        subject_id,
                        period,
                        period_start,
                        threshold_pct,
                        spent_micros,
                        budget_micros,
                    })
                },
            )
            .boxed(),
        "budget_exceeded" => (budget_scope(), text(), period(), any::<u64>(), any::<u64>())
            .prop_map(|(scope, subject_id, period, spent_micros, budget_micros)| {
                Event::BudgetExceeded(BudgetExceeded {
                    scope,
                    subject_id,
                    period,
                    spent_micros,
                    budget_micros,
                })
            })
            .boxed(),
        "key_issued" => (
            text(),
            text(),
            opt_text(),
            any::<[u8; 32]>(),
            proptest::collection::vec(prop_oneof![Just(Scope::Chat), Just(Scope::Admin)], 0..4),
            limits(),
            proptest::option::of(budget()),
            proptest::option::of(time),
        )
            .prop_map(
                |(key_id, name, owner, hash, scopes, limits, budget, expires_at)| {
                    Event::KeyIssued(KeyIssued {
                        key_id,
                        name,
                        owner,
                        key_hash: KeyHash(hash),
                        scopes,
                        limits,
                        budget,
                        expires_at,
                    })
                },
            )
            .boxed(),
        "key_updated" => (
            text(),
            proptest::option::of(limits()),
            proptest::option::of(budget()),
        )
            .prop_map(|(key_id, limits, budget)| {
                Event::KeyUpdated(KeyUpdated {
                    key_id,
                    limits,
                    budget,
                })
            })
            .boxed(),
        "key_revoked" => (text(), text(), opt_text())
            .prop_map(|(key_id, by, reason)| Event::KeyRevoked(KeyRevoked { key_id, by, reason }))
            .boxed(),
        "auth_failed" => (
            prop_oneof![Just(AuthChannel::Nats), Just(AuthChannel::Http)],
            text(),
            opt_text(),
            opt_text(),
        )
            .prop_map(|(channel, reason, key_prefix, remote)| {
                Event::AuthFailed(AuthFailed {
                    channel,
                    reason,
                    key_prefix,
                    remote,
                })
            })
            .boxed(),
        "rate_limited" => (
            text(),
            prop_oneof![
                Just(LimitKind::Rpm),
                Just(LimitKind::Tpm),
                Just(LimitKind::Parallel)
            ],
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(key_id, limit, count, retry_after_ms)| {
                Event::RateLimited(RateLimited {
                    key_id,
                    limit,
                    count,
                    retry_after_ms,
                })
            })
            .boxed(),
        "admin_action" => (text(), text(), text())
            .prop_map(|(actor, action, target)| {
                Event::AdminAction(AdminAction {
                    actor,
                    action,
                    target,
                })
            })
            .boxed(),
        other => panic!("no proptest strategy for event type {other:?}: add one to event_of_type"),
    }
}

/// Events of every catalog type, each type equally likely.
fn any_event(time: BoxedStrategy<DateTime<Utc>>) -> BoxedStrategy<Event> {
    (0..EVENT_TYPES.len())
        .prop_flat_map(move |index| event_of_type(index, time.clone()))
        .boxed()
}

fn envelope_with(time: fn() -> BoxedStrategy<DateTime<Utc>>) -> BoxedStrategy<Envelope> {
    (
        (any::<u64>(), any_uuid(), any_stream(), any::<u64>(), time()),
        (
            proptest::option::of(any_uuid()),
            proptest::option::of(any_uuid()),
            opt_text(),
            any_event(time()),
        ),
    )
        .prop_map(
            |(
                (seq, id, stream, version, at),
                (correlation_id, causation_id, traceparent, event),
            )| {
                Envelope {
                    seq,
                    id,
                    stream,
                    version,
                    at,
                    correlation_id,
                    causation_id,
                    traceparent,
                    event,
                }
            },
        )
        .boxed()
}

fn any_envelope() -> BoxedStrategy<Envelope> {
    envelope_with(any_time)
}

// ---- tests ------------------------------------------------------------------

#[test]
fn every_event_type_has_a_strategy() {
    let mut runner = TestRunner::deterministic();
    for (index, type_name) in EVENT_TYPES.iter().enumerate() {
        let event = event_of_type(index, any_time())
            .new_tree(&mut runner)
            .expect("a strategy makes a value")
            .current();
        assert_eq!(event.type_name(), *type_name);
    }
}

#[test]
fn empty_and_unknown_format_bytes_are_refused_by_name() {
    assert!(matches!(codec::decode(1, &[]), Err(DecodeError::Empty)));
    for format in (0..=u8::MAX).filter(|f| *f != codec::FORMAT_VERSION) {
        for body in [&[][..], &[0u8; 64][..]] {
            let mut bytes = vec![format];
            bytes.extend_from_slice(body);
            match codec::decode(1, &bytes) {
                Err(DecodeError::UnknownFormat(got)) => assert_eq!(got, format),
                other => panic!("format byte {format}: expected UnknownFormat, got {other:?}"),
            }
        }
    }
}

#[test]
fn a_trailing_byte_is_refused() {
    let mut runner = TestRunner::deterministic();
    for _ in 0..64 {
        let envelope = any_envelope()
            .new_tree(&mut runner)
            .expect("an envelope")
            .current();
        let mut bytes = codec::encode(&envelope);
        bytes.push(0);
        assert!(
            matches!(
                codec::decode(envelope.seq, &bytes),
                Err(DecodeError::TrailingBytes(1))
            ),
            "{envelope:?} with a trailing byte"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = codec::decode(7, &bytes);
    }

    #[test]
    fn arbitrary_v1_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = vec![codec::FORMAT_VERSION];
        bytes.extend_from_slice(&body);
        let _ = codec::decode(7, &bytes);
    }

    #[test]
    fn unknown_format_versions_are_refused(
        format in any::<u8>().prop_filter("not the current format", |f| *f != codec::FORMAT_VERSION),
        body in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut bytes = vec![format];
        bytes.extend_from_slice(&body);
        match codec::decode(1, &bytes) {
            Err(DecodeError::UnknownFormat(got)) => prop_assert_eq!(got, format),
            other => prop_assert!(false, "expected UnknownFormat({}), got {:?}", format, other),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn envelopes_round_trip_through_storage(envelope in any_envelope()) {
        let bytes = codec::encode(&envelope);
        prop_assert_eq!(bytes[0], codec::FORMAT_VERSION);
        let decoded = codec::decode(envelope.seq, &bytes);
        prop_assert!(decoded.is_ok(), "does not decode: {:?}", decoded);
        let decoded = decoded.unwrap();
        prop_assert_eq!(&decoded, &envelope);
        prop_assert_eq!(codec::encode(&decoded), bytes);
    }

    #[test]
    fn envelopes_round_trip_through_wire_json(envelope in envelope_with(rfc3339_time)) {
        let json = envelope.to_json();
        let parsed: Result<Envelope, _> = serde_json::from_str(&json);
        prop_assert!(parsed.is_ok(), "{} does not parse: {:?}", json, parsed);
        prop_assert_eq!(parsed.unwrap(), envelope);
    }

    #[test]
    fn every_truncation_is_refused(envelope in any_envelope()) {
        let bytes = codec::encode(&envelope);
        for len in 0..bytes.len() {
            let decoded = codec::decode(envelope.seq, &bytes[..len]);
            prop_assert!(decoded.is_err(), "prefix of {} of {} bytes decoded: {:?}", len, bytes.len(), decoded);
        }
    }

    #[test]
    fn single_byte_flips_never_panic(
        envelope in any_envelope(),
        position in any::<prop::sample::Index>(),
        mask in 1u8..=u8::MAX,
    ) {
        let mut bytes = codec::encode(&envelope);
        let at = position.index(bytes.len());
        bytes[at] ^= mask;
        // Either outcome is fine; a panic fails the test.
        if codec::decode(envelope.seq, &bytes).is_ok() {
            prop_assert!(at != 0, "a changed format byte must not decode");
        }
    }

    #[test]
    fn every_single_byte_flip_of_a_record_is_survived(envelope in any_envelope()) {
        let bytes = codec::encode(&envelope);
        for at in 0..bytes.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut flipped = bytes.clone();
                flipped[at] ^= mask;
                let _ = codec::decode(envelope.seq, &flipped);
            }
        }
    }
}
