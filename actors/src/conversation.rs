//! What a conversation knows about itself, folded from its own stream — the
//! state a `ConversationActor` recovers on spawn and keeps as the single writer
//! of `conv/<id>`.
//!
//! Kept apart from the actor so the rules can be tested without one: a resend of
//! a `message_id` is answered with the first acknowledgment and starts no second
//! turn; a send appends `conversation_started` (first time only),
//! `message_received` and `agent_routed` in one append at the stream's version,
//! so a concurrent writer shows up as a conflict rather than interleaving. Only
//! the key that started a conversation may send into it: the conversation's
//! history is the agent's context, so another key's send would read it.

use std::collections::HashMap;

use switchboard_events::catalog::{AgentRouted, ConversationStarted, MessageReceived};
use switchboard_events::{Envelope, Event, ExpectedVersion, NewEvent};
use uuid::Uuid;

/// A turn: one user message and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// The seq of the `message_received` event: what the acknowledgment carries.
    pub message_seq: u64,
    /// The agent the turn was routed to (once `agent_routed` is stored).
    pub agent: Option<String>,
    pub outcome: TurnOutcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnOutcome {
    /// Received; no `reply_completed` or `reply_failed` yet.
    Pending,
    Completed,
    Failed,
}

/// A send, authenticated, admitted and routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendCommand {
    pub message_id: String,
    pub key_id: String,
    pub user: Option<String>,
    pub content: String,
    /// The agent the sender named, if any.
    pub requested_agent: Option<String>,
    /// The agent the router chose, and the rule that chose it.
    pub agent: String,
    pub rule: Option<String>,
    pub correlation_id: Option<Uuid>,
    pub traceparent: Option<String>,
}

/// What to do with a send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendPlan {
    /// The message was received before: answer with its first acknowledgment.
    Duplicate { message_seq: u64 },
    /// The conversation was started by another key; nothing is appended.
    NotOwner,
    /// Append these events, expecting the stream at `expected`.
    Append {
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    },
}

/// The folded state of one conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationState {
    pub conversation_id: String,
    /// The stream's version: what the next append expects.
    pub version: u64,
    pub started: bool,
    /// The key that started the conversation: the only one that may send.
    pub owner_key: Option<String>,
    pub erased: bool,
    /// Messages or replies stored since the last erasure (or ever, if never
    /// erased): what an erasure now would remove.
    content_since_erasure: bool,
    turns: HashMap<String, Turn>,
}

impl ConversationState {
    /// A conversation with no events yet.
    pub fn new(conversation_id: &str) -> Self {
        ConversationState {
            conversation_id: conversation_id.to_owned(),
            version: 0,
            started: false,
            owner_key: None,
            erased: false,
            content_since_erasure: false,
            turns: HashMap::new(),
        }
    }

    /// Folds the conversation's stream, oldest first.
    pub fn recover(conversation_id: &str, stream: impl IntoIterator<Item = Envelope>) -> Self {
        let mut state = ConversationState::new(conversation_id);
        for envelope in stream {
            state.apply(&envelope);
        }
        state
    }

    /// Folds one event of this conversation's stream.
    pub fn apply(&mut self, envelope: &Envelope) {
        self.apply_event(envelope.seq, envelope.version, &envelope.event);
    }

    /// Folds an event stored at `seq`, `version` of this conversation's stream —
    /// for a writer that knows what it just appended and where.
    pub fn apply_event(&mut self, seq: u64, version: u64, event: &Event) {
        self.version = self.version.max(version);
        match event {
            Event::ConversationStarted(e) => {
                self.started = true;
                self.owner_key.get_or_insert_with(|| e.key_id.clone());
            }
            Event::MessageReceived(e) => {
                self.content_since_erasure = true;
                self.turns.entry(e.message_id.clone()).or_insert(Turn {
                    message_seq: seq,
                    agent: None,
                    outcome: TurnOutcome::Pending,
                });
            }
            Event::AgentRouted(e) => {
                if let Some(turn) = self.turns.get_mut(&e.message_id) {
                    turn.agent = Some(e.agent.clone());
                }
            }
            Event::ReplyCompleted(e) => {
                self.content_since_erasure = true;
                self.end_turn(&e.message_id, TurnOutcome::Completed);
            }
            Event::ReplyFailed(e) => self.end_turn(&e.message_id, TurnOutcome::Failed),
            Event::ConversationErased(_) => {
                self.erased = true;
                self.content_since_erasure = false;
            }
            _ => {}
        }
    }

    fn end_turn(&mut self, message_id: &str, outcome: TurnOutcome) {
        if let Some(turn) = self.turns.get_mut(message_id) {
            if turn.outcome == TurnOutcome::Pending {
                turn.outcome = outcome;
            }
        }
    }

    /// Whether anything an erasure removes was stored since the last one.
    pub fn has_content_after_erasure(&self) -> bool {
        self.content_since_erasure
    }

    pub fn turn(&self, message_id: &str) -> Option<&Turn> {
        self.turns.get(message_id)
    }

    /// Turns received but never answered — after a crash, the actor must finish
    /// or fail each of them, so no request is left without an end.
    pub fn pending_turns(&self) -> Vec<(&str, &Turn)> {
        let mut pending: Vec<(&str, &Turn)> = self
            .turns
            .iter()
            .filter(|(_, turn)| turn.outcome == TurnOutcome::Pending)
            .map(|(id, turn)| (id.as_str(), turn))
            .collect();
        pending.sort_by_key(|(_, turn)| turn.message_seq);
        pending
    }

    /// The seq of the `message_received` of `message_id` when it is stored;
    /// `Err(())` when another key than `key_id` started the conversation.
    #[allow(clippy::result_unit_err)]
    pub fn stored_message(&self, key_id: &str, message_id: &str) -> Result<Option<u64>, ()> {
        if self.owner_key.as_ref().is_some_and(|owner| owner != key_id) {
            return Err(());
        }
        Ok(self.turns.get(message_id).map(|turn| turn.message_seq))
    }

    /// Decides what a send does; see the module doc.
    pub fn plan_send(&self, send: &SendCommand) -> SendPlan {
        if self
            .owner_key
            .as_ref()
            .is_some_and(|owner| *owner != send.key_id)
        {
            return SendPlan::NotOwner;
        }
        if let Some(turn) = self.turns.get(&send.message_id) {
            return SendPlan::Duplicate {
                message_seq: turn.message_seq,
            };
        }
        let mut events = Vec::with_capacity(3);
        if !self.started {
            events.push(Event::ConversationStarted(ConversationStarted {
                conversation_id: self.conversation_id.clone(),
                key_id: send.key_id.clone(),
                user: send.user.clone(),
            }));
        }
        events.push(Event::MessageReceived(MessageReceived {
            conversation_id: self.conversation_id.clone(),
            message_id: send.message_id.clone(),
            key_id: send.key_id.clone(),
            user: send.user.clone(),
            content: send.content.clone(),
            agent: send.requested_agent.clone(),
        }));
        events.push(Event::AgentRouted(AgentRouted {
            conversation_id: self.conversation_id.clone(),
            message_id: send.message_id.clone(),
            agent: send.agent.clone(),
            rule: send.rule.clone(),
        }));
        let mut causation = None;
        let events = events
            .into_iter()
            .map(|event| {
                let mut new = NewEvent::new(event);
                new.correlation_id = send.correlation_id;
                new.causation_id = causation;
                new.traceparent = send.traceparent.clone();
                causation = Some(new.id);
                new
            })
            .collect();
        SendPlan::Append {
            expected: ExpectedVersion::Exact(self.version),
            events,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_events::catalog::{ReplyCompleted, ReplyFailed};
    use switchboard_events::{EventLog, OpenMode, StreamId};

    fn send(message_id: &str) -> SendCommand {
        SendCommand {
            message_id: message_id.into(),
            key_id: "key_1".into(),
            user: Some("ana".into()),
            content: format!("content of {message_id}"),
            requested_agent: None,
            agent: "echo".into(),
            rule: None,
            correlation_id: Some(Uuid::now_v7()),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        }
    }

    /// Appends what the plan says and folds the stored events back, as the actor does.
    fn execute(log: &EventLog, state: &mut ConversationState, plan: SendPlan) -> u64 {
        match plan {
            SendPlan::Duplicate { message_seq } => message_seq,
            SendPlan::NotOwner => panic!("the test's sends all come from one key"),
            SendPlan::Append { expected, events } => {
                let stream = StreamId::conversation(&state.conversation_id).expect("valid id");
                let appended = log
                    .append_blocking(stream.clone(), expected, events)
                    .expect("append");
                for envelope in log.read_stream(&stream, state.version + 1) {
                    state.apply(&envelope.expect("decodes"));
                }
                appended
                    .positions
                    .iter()
                    .map(|p| p.seq)
                    .find(|seq| {
                        matches!(
                            log.get(*seq).ok().flatten().map(|e| e.event),
                            Some(Event::MessageReceived(_))
                        )
                    })
                    .expect("a message_received was appended")
            }
        }
    }

    fn reply(state: &ConversationState, message_id: &str, failed: bool) -> NewEvent {
        let conversation_id = state.conversation_id.clone();
        NewEvent::new(if failed {
            Event::ReplyFailed(ReplyFailed {
                conversation_id,
                message_id: message_id.into(),
                agent: "echo".into(),
                code: "unavailable".into(),
                message: "down".into(),
            })
        } else {
            Event::ReplyCompleted(ReplyCompleted {
                conversation_id,
                message_id: message_id.into(),
                reply_id: format!("r-{message_id}"),
                agent: "echo".into(),
                content: "hi".into(),
                finish_reason: "stop".into(),
                latency_ms: 3,
            })
        })
    }

    #[test]
    fn first_send_starts_the_conversation_and_a_resend_is_answered_with_the_first_ack() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open");
        let mut state = ConversationState::new("c1");

        let plan = state.plan_send(&send("m1"));
        let SendPlan::Append { expected, events } = &plan else {
            panic!("a new message must be appended: {plan:?}");
        };
        assert_eq!(*expected, ExpectedVersion::Exact(0));
        let types: Vec<&str> = events.iter().map(|e| e.event.type_name()).collect();
        assert_eq!(
            types,
            ["conversation_started", "message_received", "agent_routed"]
        );
        assert_eq!(events[1].causation_id, Some(events[0].id));
        assert!(events
            .iter()
            .all(|e| e.correlation_id.is_some() && e.traceparent.is_some()));
        let first_ack = execute(&log, &mut state, plan);
        assert_eq!(first_ack, 2);
        assert!(state.started);
        assert_eq!(state.version, 3);
        assert_eq!(
            state.turn("m1").and_then(|t| t.agent.as_deref()),
            Some("echo")
        );

        assert_eq!(
            state.plan_send(&send("m1")),
            SendPlan::Duplicate { message_seq: 2 }
        );

        let second = state.plan_send(&send("m2"));
        let SendPlan::Append { expected, events } = &second else {
            panic!("a new message must be appended: {second:?}");
        };
        assert_eq!(*expected, ExpectedVersion::Exact(3));
        assert_eq!(events.len(), 2, "no second conversation_started");
        // m2's message_received follows m1's three events.
        assert_eq!(execute(&log, &mut state, second), 4);
    }

    #[test]
    fn recovered_state_equals_the_live_one_and_knows_unanswered_turns() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open");
        let stream = StreamId::conversation("c2").expect("valid id");
        let mut live = ConversationState::new("c2");
        for message_id in ["m1", "m2", "m3"] {
            let plan = live.plan_send(&send(message_id));
            execute(&log, &mut live, plan);
        }
        for (message_id, failed) in [("m1", false), ("m3", true)] {
            let event = reply(&live, message_id, failed);
            log.append_blocking(
                stream.clone(),
                ExpectedVersion::Exact(live.version),
                vec![event],
            )
            .expect("reply");
            live = ConversationState::recover(
                "c2",
                log.read_stream(&stream, 1).map(|e| e.expect("decodes")),
            );
        }
        drop(log);

        let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("reopen");
        let recovered = ConversationState::recover(
            "c2",
            log.read_stream(&stream, 1).map(|e| e.expect("decodes")),
        );
        assert_eq!(recovered, live);
        assert_eq!(
            recovered.turn("m1").map(|t| t.outcome),
            Some(TurnOutcome::Completed)
        );
        assert_eq!(
            recovered.turn("m3").map(|t| t.outcome),
            Some(TurnOutcome::Failed)
        );
        let pending: Vec<&str> = recovered
            .pending_turns()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(pending, ["m2"]);
        // After recovery a resend is still answered with the original ack.
        let m2_seq = recovered
            .turn("m2")
            .map(|t| t.message_seq)
            .expect("m2 known");
        assert_eq!(
            recovered.plan_send(&send("m2")),
            SendPlan::Duplicate {
                message_seq: m2_seq
            }
        );
    }

    #[test]
    fn a_stale_plan_conflicts_instead_of_interleaving() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open");
        let mut state = ConversationState::new("c3");
        let stale = state.clone();
        let plan = state.plan_send(&send("m1"));
        execute(&log, &mut state, plan);
        let SendPlan::Append { expected, events } = stale.plan_send(&send("m9")) else {
            panic!("expected an append plan");
        };
        let stream = StreamId::conversation("c3").expect("valid id");
        let refused = log
            .append_blocking(stream, expected, events)
            .expect_err("stale version");
        assert!(matches!(
            refused,
            switchboard_events::AppendError::Conflict { actual: 3, .. }
        ));
    }

    #[test]
    fn an_erased_conversation_is_marked() {
        let mut state = ConversationState::new("c4");
        state.apply(&Envelope {
            seq: 9,
            id: Uuid::now_v7(),
            stream: StreamId::conversation("c4").expect("valid id"),
            version: 4,
            at: switchboard_events::time::now(),
            correlation_id: None,
            causation_id: None,
            traceparent: None,
            event: Event::ConversationErased(switchboard_events::catalog::ConversationErased {
                conversation_id: "c4".into(),
                by: "admin".into(),
            }),
        });
        assert!(state.erased);
        assert_eq!(state.version, 4);
    }

    #[test]
    fn only_the_key_that_started_a_conversation_may_send_into_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open");
        let mut state = ConversationState::new("c5");
        let plan = state.plan_send(&send("m1"));
        execute(&log, &mut state, plan);
        assert_eq!(state.owner_key.as_deref(), Some("key_1"));
        let mut intruder = send("m2");
        intruder.key_id = "key_2".into();
        assert_eq!(state.plan_send(&intruder), SendPlan::NotOwner);
        // Not even a resend of the owner's message id reveals its ack.
        intruder.message_id = "m1".into();
        assert_eq!(state.plan_send(&intruder), SendPlan::NotOwner);
        let stream = StreamId::conversation("c5").expect("valid id");
        let recovered = ConversationState::recover(
            "c5",
            log.read_stream(&stream, 1).map(|e| e.expect("decodes")),
        );
        assert_eq!(recovered.owner_key.as_deref(), Some("key_1"));
        assert!(matches!(
            recovered.plan_send(&send("m3")),
            SendPlan::Append { .. }
        ));
    }
}
