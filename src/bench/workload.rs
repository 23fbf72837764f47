//! The traffic the log benchmark writes: realistic events in a realistic mix.
//!
//! A conversation is `conversation_started`, then turns of `message_received`,
//! `agent_routed`, `reply_completed` and `usage_recorded` (1 to 12 turns, 6.5 on
//! average). Keys are issued first, and one `auth_failed` lands every 64
//! conversations, so the keys and audit projections have work too. Turn events
//! carry the request's correlation id and the event that caused them, as the
//! conversation actor records them; no traceparent (tracing is optional).
//!
//! Everything but the event ids is derived from indices, so the plan for a
//! million events is a few tens of thousands of small values and the events of a
//! conversation are built only when it is appended.

use switchboard_events::catalog::{
    AgentRouted, AuthChannel, AuthFailed, Budget, BudgetPeriod, ConversationStarted, KeyHash,
    KeyIssued, Limits, MessageReceived, ReplyCompleted, Scope, UsageRecorded,
};
use switchboard_events::{time, Envelope, Event, NewEvent, StreamId};
use uuid::Uuid;

/// Characters in a user message.
const MESSAGE_CHARS: usize = 100;
/// Characters in an agent's reply.
const REPLY_CHARS: usize = 200;
/// Turns in the longest conversation.
const MAX_TURNS: u64 = 12;
/// Events per turn: message, routing, reply, usage.
const EVENTS_PER_TURN: u64 = 4;
/// One `auth_failed` per this many conversations.
const AUTH_FAILED_EVERY: u64 = 64;
/// One issued key per this many events, at most [`MAX_KEYS`].
const EVENTS_PER_KEY: u64 = 20_000;
const MAX_KEYS: u64 = 50;

const TEXT: &str = "Could you summarise the attached contract and tell me which clauses \
    about termination, liability and renewal differ from our standard template? \
    Sure: the termination notice is sixty days instead of thirty, liability is capped \
    at the fees of the last twelve months, and renewal is automatic unless either side \
    objects in writing. ";

/// What one append call of the fill writes.
#[derive(Debug, Clone, Copy)]
pub enum Unit {
    /// `key_issued` for key number `k` on `key/<id>`.
    Key(u64),
    /// The first `events` events of conversation number `index` on `conv/<id>`.
    Conversation { index: u64, events: u64 },
    /// One `auth_failed` on `system`.
    AuthFailed(u64),
}

/// The appends that fill a log with exactly `total` events.
pub struct Plan {
    pub keys: u64,
    pub units: Vec<Unit>,
}

impl Plan {
    pub fn new(total: u64) -> Plan {
        let keys = (total / EVENTS_PER_KEY).clamp(1, MAX_KEYS).min(total);
        let mut units: Vec<Unit> = (0..keys).map(Unit::Key).collect();
        let mut left = total - keys;
        let mut index = 0;
        while left > 0 {
            if index % AUTH_FAILED_EVERY == AUTH_FAILED_EVERY - 1 {
                units.push(Unit::AuthFailed(index));
                left -= 1;
                if left == 0 {
                    break;
                }
            }
            let events = conversation_events(index).min(left);
            units.push(Unit::Conversation { index, events });
            left -= events;
            index += 1;
        }
        Plan { keys, units }
    }

    /// The stream a unit appends to.
    pub fn stream(&self, unit: Unit) -> StreamId {
        let stream = match unit {
            Unit::Key(k) => StreamId::key(&key_id(k)),
            Unit::Conversation { index, .. } => StreamId::conversation(&conversation_id(index)),
            Unit::AuthFailed(_) => Ok(StreamId::system()),
        };
        stream.expect("bench ids are valid stream ids")
    }

    /// The events of a unit, built now.
    pub fn events(&self, unit: Unit) -> Vec<NewEvent> {
        match unit {
            Unit::Key(k) => vec![NewEvent::new(key_issued(k))],
            Unit::AuthFailed(index) => vec![NewEvent::new(auth_failed(index))],
            Unit::Conversation { index, events } => {
                let key = key_id(index % self.keys);
                let mut out = Vec::with_capacity(events as usize);
                out.push(NewEvent::new(Event::ConversationStarted(
                    ConversationStarted {
                        conversation_id: conversation_id(index),
                        key_id: key.clone(),
                        user: Some(user(index)),
                    },
                )));
                let mut turn = 0;
                while (out.len() as u64) < events {
                    out.extend(turn_events(index, turn, &key));
                    turn += 1;
                }
                out.truncate(events as usize);
                out
            }
        }
    }
}

/// The events conversation number `index` has when complete.
fn conversation_events(index: u64) -> u64 {
    let turns = 1 + (index * 7) % MAX_TURNS;
    1 + turns * EVENTS_PER_TURN
}

/// One turn's events, linked by correlation and causation ids.
fn turn_events(index: u64, turn: u64, key: &str) -> Vec<NewEvent> {
    let conversation_id = conversation_id(index);
    let message_id = Uuid::now_v7().to_string();
    // One turn in five goes to the assistant.
    let assistant = (index + turn) % 5 == 4;
    let agent = if assistant { "assistant" } else { "echo" };
    let prompt_tokens = 24 + turn * 60;
    let completion_tokens = 40 + (index + turn) % 30;
    let (input_price, output_price) = if assistant {
        (150_000, 600_000)
    } else {
        (0, 0)
    };
    let events = [
        message_received(&conversation_id, &message_id, key, index + turn),
        Event::AgentRouted(AgentRouted {
            conversation_id: conversation_id.clone(),
            message_id: message_id.clone(),
            agent: agent.to_owned(),
            rule: assistant.then(|| "(?i)\\b(contract|lawsuit)\\b".to_owned()),
        }),
        Event::ReplyCompleted(ReplyCompleted {
            conversation_id: conversation_id.clone(),
            message_id: message_id.clone(),
            reply_id: Uuid::now_v7().to_string(),
            agent: agent.to_owned(),
            content: text(index * 31 + turn, REPLY_CHARS),
            finish_reason: "stop".to_owned(),
            latency_ms: 180 + (index * 13 + turn) % 1500,
        }),
        Event::UsageRecorded(UsageRecorded {
            conversation_id,
            message_id,
            key_id: key.to_owned(),
            user: Some(user(index)),
            agent: agent.to_owned(),
            model: if assistant { "llama3.2" } else { "echo" }.to_owned(),
            prompt_tokens,
            completion_tokens,
            estimated: !assistant,
            input_price,
            output_price,
            cost_micros: (prompt_tokens * input_price + completion_tokens * output_price)
                / 1_000_000,
        }),
    ];
    let correlation_id = Some(Uuid::now_v7());
    let mut cause = None;
    events
        .into_iter()
        .map(|event| {
            let mut new = NewEvent::new(event);
            new.correlation_id = correlation_id;
            new.causation_id = cause;
            cause = Some(new.id);
            new
        })
        .collect()
}

/// A user's message of [`MESSAGE_CHARS`] characters; `variant` picks the text.
pub fn message_received(
    conversation_id: &str,
    message_id: &str,
    key_id: &str,
    variant: u64,
) -> Event {
    Event::MessageReceived(MessageReceived {
        conversation_id: conversation_id.to_owned(),
        message_id: message_id.to_owned(),
        key_id: key_id.to_owned(),
        user: Some(user(variant)),
        content: text(variant, MESSAGE_CHARS),
        agent: None,
    })
}

/// A typical stored event: a `message_received` as appended mid-conversation.
pub fn typical_envelope() -> Envelope {
    Envelope {
        seq: 123_456,
        id: Uuid::now_v7(),
        stream: StreamId::conversation(&conversation_id(4_321)).expect("a valid stream id"),
        version: 10,
        at: time::now(),
        correlation_id: Some(Uuid::now_v7()),
        causation_id: None,
        traceparent: None,
        event: message_received(
            &conversation_id(4_321),
            &Uuid::now_v7().to_string(),
            &key_id(7),
            4_321,
        ),
    }
}

pub fn conversation_id(index: u64) -> String {
    format!("c-{index:010}")
}

fn key_id(k: u64) -> String {
    format!("key_{k:04}")
}

fn user(index: u64) -> String {
    format!("user-{:03}@example.com", index % 500)
}

/// `chars` characters of [`TEXT`], starting at a place picked by `variant`.
fn text(variant: u64, chars: usize) -> String {
    let start = (variant as usize * 17) % TEXT.len();
    TEXT.chars().cycle().skip(start).take(chars).collect()
}

fn key_issued(k: u64) -> Event {
    let mut hash = [0u8; 32];
    for (i, chunk) in hash.chunks_mut(8).enumerate() {
        let mixed = (k + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15 ^ i as u64);
        chunk.copy_from_slice(&mixed.to_be_bytes());
    }
    Event::KeyIssued(KeyIssued {
        key_id: key_id(k),
        name: format!("bench key {k}"),
        owner: Some(format!("team-{}", k % 5)),
        key_hash: KeyHash(hash),
        scopes: vec![Scope::Chat],
        limits: Limits {
            rpm: Some(600),
            tpm: Some(100_000),
            max_parallel: Some(8),
        },
        budget: Some(Budget {
            micros: 25_000_000,
            period: BudgetPeriod::Month,
        }),
        expires_at: None,
    })
}

fn auth_failed(index: u64) -> Event {
    Event::AuthFailed(AuthFailed {
        channel: if index % 2 == 1 {
            AuthChannel::Nats
        } else {
            AuthChannel::Http
        },
        reason: "unknown key".to_owned(),
        key_prefix: Some(format!("sb-{:04x}", index % 0xffff)),
        remote: Some(format!(
            "10.0.{}.{}:52144",
            index % 256,
            (index / 256) % 256
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_holds_exactly_the_events_asked_for() {
        for total in [1, 2, 49, 50, 1_000, 20_000, 40_001] {
            let plan = Plan::new(total);
            let planned: u64 = plan
                .units
                .iter()
                .map(|&unit| plan.events(unit).len() as u64)
                .sum();
            assert_eq!(planned, total, "plan for {total} events");
        }
    }
}
