//! Where the outbox publishes an event and under which `Nats-Msg-Id`: the
//! subject table, the id scheme and the token encoding of the
//! [module doc](super).

use std::borrow::Cow;

use switchboard_events::catalog::BudgetScope;
use switchboard_events::{Envelope, Event};

use crate::bus::{Headers, NATS_MSG_ID};

/// One message the outbox sends for an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub subject: String,
    /// The `Nats-Msg-Id`: the event's UUID on the primary subject,
    /// `<uuid>:<kind>` on the others.
    pub msg_id: String,
}

/// What a subject is for; names the secondary message ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Conv,
    Usage,
    Audit,
    Alert,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Conv => "conv",
            Kind::Usage => "usage",
            Kind::Audit => "audit",
            Kind::Alert => "alert",
        }
    }
}

/// Where an event is published, primary subject first; see the module doc.
///
/// ```
/// # use switchboard_events::{catalog::ConversationStarted, Envelope, Event, StreamId};
/// # let envelope = Envelope {
/// #     seq: 1, id: uuid::Uuid::now_v7(), stream: StreamId::conversation("c1").unwrap(),
/// #     version: 1, at: chrono::Utc::now(), correlation_id: None, causation_id: None,
/// #     traceparent: None,
/// #     event: Event::ConversationStarted(ConversationStarted {
/// #         conversation_id: "c1".into(), key_id: "key_1".into(), user: None,
/// #     }),
/// # };
/// use switchboard::outbox::subjects;
/// assert_eq!(subjects("sb", &envelope), ["sb.evt.conv.c1.conversation_started"]);
/// ```
pub fn subjects(prefix: &str, envelope: &Envelope) -> Vec<String> {
    routes(prefix, envelope)
        .into_iter()
        .map(|route| route.subject)
        .collect()
}

/// [`subjects`] with each subject's `Nats-Msg-Id`.
pub fn routes(prefix: &str, envelope: &Envelope) -> Vec<Route> {
    let kind = envelope.event.type_name();
    let conv = |id: &str| {
        let subject = format!("{prefix}.evt.conv.{}.{kind}", subject_token(id));
        (Kind::Conv, subject)
    };
    let audit = || (Kind::Audit, format!("{prefix}.evt.audit.{kind}"));
    let budget = |scope: BudgetScope, id: &str| {
        let scope = match scope {
            BudgetScope::Key => "",
            BudgetScope::User => "user.",
        };
        let subject = format!("{prefix}.alert.budget.{scope}{}", subject_token(id));
        (Kind::Alert, subject)
    };
    // Exhaustive on purpose: a new event type needs a decision here.
    let targets = match &envelope.event {
        Event::ConversationStarted(e) => vec![conv(&e.conversation_id)],
        Event::MessageReceived(e) => vec![conv(&e.conversation_id)],
        Event::AgentRouted(e) => vec![conv(&e.conversation_id)],
        Event::ReplyCompleted(e) => vec![conv(&e.conversation_id)],
        Event::ReplyFailed(e) => vec![conv(&e.conversation_id)],
        Event::ConversationErased(e) => vec![conv(&e.conversation_id), audit()],
        Event::UsageRecorded(e) => vec![
            (
                Kind::Usage,
                format!("{prefix}.evt.usage.{}", subject_token(&e.key_id)),
            ),
            conv(&e.conversation_id),
        ],
        Event::BudgetThresholdCrossed(e) => vec![audit(), budget(e.scope, &e.subject_id)],
        Event::BudgetExceeded(e) => vec![audit(), budget(e.scope, &e.subject_id)],
        Event::RateLimited(e) => vec![
            audit(),
            (
                Kind::Alert,
                format!("{prefix}.alert.rate_limit.{}", subject_token(&e.key_id)),
            ),
        ],
        Event::KeyIssued(_)
        | Event::KeyUpdated(_)
        | Event::KeyRevoked(_)
        | Event::AuthFailed(_)
        | Event::AdminAction(_) => vec![audit()],
    };
    targets
        .into_iter()
        .enumerate()
        .map(|(index, (kind, subject))| Route {
            subject,
            msg_id: match index {
                0 => envelope.id.to_string(),
                _ => format!("{}:{}", envelope.id, kind.as_str()),
            },
        })
        .collect()
}

/// An id as one subject token: `.`, `*`, `>`, `%`, whitespace and control
/// characters percent-encoded per UTF-8 byte, the empty id as `%`. Anything
/// that publishes or subscribes to a subject naming an id uses this, so both
/// sides agree.
///
/// ```
/// use switchboard::outbox::subject_token;
/// assert_eq!(subject_token("c1"), "c1");
/// assert_eq!(subject_token("bob@example.com"), "bob@example%2Ecom");
/// assert_eq!(subject_token(""), "%");
/// ```
pub fn subject_token(id: &str) -> Cow<'_, str> {
    fn unsafe_char(ch: char) -> bool {
        matches!(ch, '.' | '*' | '>' | '%') || ch.is_whitespace() || ch.is_control()
    }
    if id.is_empty() {
        return Cow::Borrowed("%");
    }
    if !id.contains(unsafe_char) {
        return Cow::Borrowed(id);
    }
    let mut token = String::with_capacity(id.len() + 8);
    for ch in id.chars() {
        if unsafe_char(ch) {
            for byte in ch.encode_utf8(&mut [0; 4]).bytes() {
                token.push_str(&format!("%{byte:02X}"));
            }
        } else {
            token.push(ch);
        }
    }
    Cow::Owned(token)
}

/// The body published for `envelope`: its wire JSON, except that a
/// `key_issued` goes out without `key_hash`. The hash stays in the log (and
/// in `switchboard log`, for auditors with the data dir); on the bus it would
/// let any subscriber try guesses offline against a human-chosen key such as
/// `SWITCHBOARD_ADMIN_KEY`.
pub(crate) fn payload(envelope: &Envelope) -> Vec<u8> {
    if !matches!(envelope.event, Event::KeyIssued(_)) {
        return envelope.to_json().into_bytes();
    }
    let mut value = serde_json::to_value(envelope).expect("an envelope serializes");
    if let Some(data) = value.get_mut("data").and_then(|d| d.as_object_mut()) {
        data.remove("key_hash");
    }
    serde_json::to_vec(&value).expect("a JSON value serializes")
}

/// The body published for `envelope` when its [`payload`] (`size` bytes
/// with headers) is over the bus's maximum: the envelope's wire JSON with
/// `data` null, `"truncated": true` and that `size`. The log holds the event
/// whole (`switchboard log --from <seq>`).
pub(super) fn stub_payload(envelope: &Envelope, size: usize) -> Vec<u8> {
    let mut value = serde_json::to_value(envelope).expect("an envelope serializes");
    if let Some(object) = value.as_object_mut() {
        object.insert("data".to_owned(), serde_json::Value::Null);
        object.insert("truncated".to_owned(), serde_json::Value::Bool(true));
        object.insert("size".to_owned(), size.into());
    }
    serde_json::to_vec(&value).expect("a JSON value serializes")
}

/// The headers of one message for `envelope`.
pub(crate) fn headers(envelope: &Envelope, msg_id: &str) -> Headers {
    let mut headers = Headers::new()
        .with(NATS_MSG_ID, msg_id)
        .with("Content-Type", "application/json");
    if let Some(traceparent) = &envelope.traceparent {
        if traceparent.trim().is_empty() || traceparent.contains(['\r', '\n']) {
            tracing::warn!(
                seq = envelope.seq,
                "traceparent cannot be a header; left out"
            );
        } else {
            headers.append("traceparent", traceparent.as_str());
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::subject;
    use switchboard_events::catalog::*;
    use switchboard_events::{StreamId, EVENT_TYPES};

    fn envelope(event: Event) -> Envelope {
        Envelope {
            seq: 7,
            id: uuid::Uuid::now_v7(),
            stream: StreamId::system(),
            version: 1,
            at: chrono::Utc::now(),
            correlation_id: None,
            causation_id: None,
            traceparent: None,
            event,
        }
    }

    /// One event of every type, with `conv` as conversation id, `key` as key
    /// id and `user` as budget user.
    fn one_of_each(conv: &str, key: &str, user: &str) -> Vec<Event> {
        let at = chrono::Utc::now();
        vec![
            Event::ConversationStarted(ConversationStarted {
                conversation_id: conv.into(),
                key_id: key.into(),
                user: None,
            }),
            Event::MessageReceived(MessageReceived {
                conversation_id: conv.into(),
                message_id: "m1".into(),
                key_id: key.into(),
                user: None,
                content: "hi".into(),
                agent: None,
            }),
            Event::AgentRouted(AgentRouted {
                conversation_id: conv.into(),
                message_id: "m1".into(),
                agent: "echo".into(),
                rule: None,
            }),
            Event::ReplyCompleted(ReplyCompleted {
                conversation_id: conv.into(),
                message_id: "m1".into(),
                reply_id: "r1".into(),
                agent: "echo".into(),
                content: "echo: hi".into(),
                finish_reason: "stop".into(),
                latency_ms: 3,
            }),
            Event::ReplyFailed(ReplyFailed {
                conversation_id: conv.into(),
                message_id: "m1".into(),
                agent: "echo".into(),
                code: "timeout".into(),
                message: "slow".into(),
            }),
            Event::ConversationErased(ConversationErased {
                conversation_id: conv.into(),
                by: "admin".into(),
            }),
            Event::UsageRecorded(UsageRecorded {
                conversation_id: conv.into(),
                message_id: "m1".into(),
                key_id: key.into(),
                user: None,
                agent: "echo".into(),
                model: "echo".into(),
                prompt_tokens: 1,
                completion_tokens: 2,
                estimated: true,
                input_price: 0,
                output_price: 0,
                cost_micros: 0,
            }),
            Event::BudgetThresholdCrossed(BudgetThresholdCrossed {
                scope: BudgetScope::Key,
                subject_id: key.into(),
                period: BudgetPeriod::Day,
                period_start: at,
                threshold_pct: 80,
                spent_micros: 80,
                budget_micros: 100,
            }),
            Event::BudgetExceeded(BudgetExceeded {
                scope: BudgetScope::User,
                subject_id: user.into(),
                period: BudgetPeriod::Month,
                spent_micros: 101,
                budget_micros: 100,
            }),
            Event::KeyIssued(KeyIssued {
                key_id: key.into(),
                name: "k".into(),
                owner: None,
                key_hash: KeyHash([0; 32]),
                scopes: vec![Scope::Chat],
                limits: Limits::default(),
                budget: None,
                expires_at: None,
            }),
            Event::KeyUpdated(KeyUpdated {
                key_id: key.into(),
                limits: None,
                budget: None,
            }),
            Event::KeyRevoked(KeyRevoked {
                key_id: key.into(),
                by: "admin".into(),
                reason: None,
            }),
            Event::AuthFailed(AuthFailed {
                channel: AuthChannel::Nats,
                reason: "unknown key".into(),
                key_prefix: None,
                remote: None,
            }),
            Event::RateLimited(RateLimited {
                key_id: key.into(),
                limit: LimitKind::Rpm,
                count: 1,
                retry_after_ms: 100,
            }),
            Event::AdminAction(AdminAction {
                actor: "admin".into(),
                action: "rotate".into(),
                target: "x".into(),
            }),
        ]
    }

    #[test]
    fn subjects_of_every_type() {
        let expected: &[(&str, &[&str])] = &[
            (
                "conversation_started",
                &["sb.evt.conv.c1.conversation_started"],
            ),
            ("message_received", &["sb.evt.conv.c1.message_received"]),
            ("agent_routed", &["sb.evt.conv.c1.agent_routed"]),
            ("reply_completed", &["sb.evt.conv.c1.reply_completed"]),
            ("reply_failed", &["sb.evt.conv.c1.reply_failed"]),
            (
                "conversation_erased",
                &[
                    "sb.evt.conv.c1.conversation_erased",
                    "sb.evt.audit.conversation_erased",
                ],
            ),
            (
                "usage_recorded",
                &["sb.evt.usage.key_1", "sb.evt.conv.c1.usage_recorded"],
            ),
            (
                "budget_threshold_crossed",
                &[
                    "sb.evt.audit.budget_threshold_crossed",
                    "sb.alert.budget.key_1",
                ],
            ),
            (
                "budget_exceeded",
                &["sb.evt.audit.budget_exceeded", "sb.alert.budget.user.alice"],
            ),
            ("key_issued", &["sb.evt.audit.key_issued"]),
            ("key_updated", &["sb.evt.audit.key_updated"]),
            ("key_revoked", &["sb.evt.audit.key_revoked"]),
            ("auth_failed", &["sb.evt.audit.auth_failed"]),
            (
                "rate_limited",
                &["sb.evt.audit.rate_limited", "sb.alert.rate_limit.key_1"],
            ),
            ("admin_action", &["sb.evt.audit.admin_action"]),
        ];
        let events = one_of_each("c1", "key_1", "alice");
        assert_eq!(events.len(), EVENT_TYPES.len(), "one of each type");
        for (event, (kind, subjects_of)) in events.into_iter().zip(expected) {
            assert_eq!(event.type_name(), *kind);
            assert_eq!(subjects("sb", &envelope(event)), *subjects_of, "{kind}");
        }
    }

    #[test]
    fn audit_events_and_only_they_reach_the_audit_subjects() {
        for event in one_of_each("c1", "key_1", "alice") {
            let audit = format!("acme.sb.evt.audit.{}", event.type_name());
            let subjects = subjects("acme.sb", &envelope(event.clone()));
            assert_eq!(
                subjects.contains(&audit),
                event.is_audit(),
                "{}: {subjects:?}",
                event.type_name()
            );
        }
    }

    #[test]
    fn msg_ids_are_the_event_id_then_unique_per_subject() {
        for event in one_of_each("c1", "key_1", "alice") {
            let envelope = envelope(event);
            let routes = routes("sb", &envelope);
            assert_eq!(routes[0].msg_id, envelope.id.to_string());
            let mut ids: Vec<_> = routes.iter().map(|route| route.msg_id.as_str()).collect();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), routes.len(), "{routes:?}");
            for route in &routes[1..] {
                assert!(route.msg_id.starts_with(&format!("{}:", envelope.id)));
            }
        }
    }

    #[test]
    fn tokens_are_encoded_only_when_needed() {
        let table = [
            ("c1", "c1"),
            ("key_1-A", "key_1-A"),
            ("", "%"),
            ("a.b", "a%2Eb"),
            ("*", "%2A"),
            (">", "%3E"),
            ("a*b>c", "a%2Ab%3Ec"),
            ("100%", "100%25"),
            ("two words", "two%20words"),
            ("tab\there", "tab%09here"),
            ("line\r\n", "line%0D%0A"),
            ("nb\u{a0}sp", "nb%C2%A0sp"),
            ("bob@example.com", "bob@example%2Ecom"),
            ("key:1", "key:1"),
            ("zoë", "zoë"),
        ];
        for (id, token) in table {
            assert_eq!(subject_token(id), token, "{id:?}");
        }
        assert!(matches!(subject_token("c1"), Cow::Borrowed(_)));
    }

    #[test]
    fn hostile_ids_still_make_valid_distinct_subjects() {
        let ids = [
            "", ".", "..", "*", ">", "a.*", "a.>", " ", "%", "%2E", "a\u{0}b",
        ];
        let mut seen = std::collections::HashSet::new();
        for id in ids {
            for event in one_of_each(id, id, id) {
                for subject in subjects("sb", &envelope(event)) {
                    assert_eq!(
                        subject::validate_subject(&subject),
                        Ok(()),
                        "{id:?}: {subject}"
                    );
                }
            }
            assert!(
                seen.insert(subject_token(id).into_owned()),
                "{id:?} collides"
            );
        }
    }

    #[test]
    fn key_hashes_never_reach_the_bus() {
        let key = switchboard_events::apikey::ApiKey::generate();
        let issued = envelope(Event::KeyIssued(KeyIssued {
            key_id: "key_1".into(),
            name: "n".into(),
            owner: None,
            key_hash: key.hash(),
            scopes: vec![Scope::Chat],
            limits: Limits::default(),
            budget: None,
            expires_at: None,
        }));
        let body: serde_json::Value = serde_json::from_slice(&payload(&issued)).expect("JSON");
        assert_eq!(body["type"], "key_issued");
        assert_eq!(body["data"]["key_id"], "key_1");
        assert!(body["data"].get("key_hash").is_none(), "{body}");
        let hex = serde_json::to_value(key.hash()).expect("JSON");
        assert!(!String::from_utf8_lossy(&payload(&issued)).contains(hex.as_str().expect("hex")));
        let other = envelope(Event::AdminAction(AdminAction {
            actor: "a".into(),
            action: "b".into(),
            target: "c".into(),
        }));
        assert_eq!(payload(&other), other.to_json().into_bytes());
    }

    #[test]
    fn headers_carry_id_content_type_and_a_usable_traceparent() {
        let mut envelope = envelope(one_of_each("c1", "k", "u").remove(0));
        let plain = headers(&envelope, "id-1");
        assert_eq!(plain.get(NATS_MSG_ID), Some("id-1"));
        assert_eq!(plain.get("Content-Type"), Some("application/json"));
        assert_eq!(plain.get("traceparent"), None);

        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        envelope.traceparent = Some(traceparent.into());
        assert_eq!(
            headers(&envelope, "x").get("traceparent"),
            Some(traceparent)
        );

        envelope.traceparent = Some("bad\r\nInjected: yes".into());
        let refused = headers(&envelope, "x");
        assert_eq!(refused.get("traceparent"), None);
        assert_eq!(refused.validate(), Ok(()));
    }
}
