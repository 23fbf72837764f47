//! Shared by the projections' integration tests: a log in a temporary dir, event
//! builders, the stream each event belongs on, and dumps of the views' rows.

#![allow(dead_code)]

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use switchboard_events::catalog::{
    AdminAction, AgentRouted, AuthChannel, AuthFailed, Budget, BudgetExceeded, BudgetPeriod,
    BudgetScope, BudgetThresholdCrossed, ConversationErased, ConversationStarted, KeyHash,
    KeyIssued, KeyRevoked, KeyUpdated, LimitKind, Limits, MessageReceived, RateLimited,
    ReplyCompleted, ReplyFailed, Scope, UsageRecorded,
};
use switchboard_events::{
    Envelope, Event, EventLog, ExpectedVersion, NewEvent, OpenMode, StreamId,
};
use switchboard_projections::{
    Conversation, HistoryMessage, HistoryView, PageFrom, ProjectionName, Projections,
};

/// Every row of every view, by projection name.
pub type Dump = BTreeMap<&'static str, Vec<(Vec<u8>, Vec<u8>)>>;

/// Every row of every view tree exactly as stored.
pub fn dump(log: &EventLog) -> Dump {
    dump_with(log, |_, tree| {
        tree.iter()
            .map(|entry| {
                let (key, value) = entry.expect("read a view row");
                (key.to_vec(), value.to_vec())
            })
            .collect()
    })
}

/// Every row of every view as two folds of the same log share them
/// ([`ProjectionName::rows`]: history one message a row, wherever the fold's
/// commits ended its chunks). For a replay against a live fold.
pub fn logical_dump(log: &EventLog) -> Dump {
    dump_with(log, |name, tree| {
        name.rows(tree)
            .collect::<Result<_, _>>()
            .expect("read a view's rows")
    })
}

fn dump_with(
    log: &EventLog,
    rows: impl Fn(ProjectionName, &sled::Tree) -> Vec<(Vec<u8>, Vec<u8>)>,
) -> Dump {
    ProjectionName::ALL
        .into_iter()
        .map(|name| {
            let tree = log
                .db()
                .open_tree(name.tree_name())
                .expect("open a view tree");
            (name.as_str(), rows(name, &tree))
        })
        .collect()
}

/// Panics with the first differing row when two dumps differ (a plain
/// `assert_eq!` of two large dumps is unreadable).
pub fn assert_dumps_equal(left: &Dump, right: &Dump, what: &str) {
    for name in ProjectionName::ALL.map(ProjectionName::as_str) {
        let (l, r) = (&left[name], &right[name]);
        for (i, (a, b)) in l.iter().zip(r.iter()).enumerate() {
            assert_eq!(a, b, "{what}: tree {name} differs at row {i}");
        }
        assert_eq!(l.len(), r.len(), "{what}: tree {name} row counts differ");
    }
}

/// The stream an event is appended on, as the services would choose it.
pub fn stream_of(event: &Event) -> StreamId {
    let stream = match event {
        Event::ConversationStarted(e) => StreamId::conversation(&e.conversation_id),
        Event::MessageReceived(e) => StreamId::conversation(&e.conversation_id),
        Event::AgentRouted(e) => StreamId::conversation(&e.conversation_id),
        Event::ReplyCompleted(e) => StreamId::conversation(&e.conversation_id),
        Event::ReplyFailed(e) => StreamId::conversation(&e.conversation_id),
        Event::ConversationErased(e) => StreamId::conversation(&e.conversation_id),
        Event::UsageRecorded(e) => StreamId::conversation(&e.conversation_id),
        Event::KeyIssued(e) => StreamId::key(&e.key_id),
        Event::KeyUpdated(e) => StreamId::key(&e.key_id),
        Event::KeyRevoked(e) => StreamId::key(&e.key_id),
        Event::RateLimited(e) => StreamId::key(&e.key_id),
        Event::BudgetThresholdCrossed(_)
        | Event::BudgetExceeded(_)
        | Event::AuthFailed(_)
        | Event::AdminAction(_) => Ok(StreamId::system()),
    };
    stream.expect("test ids are valid stream ids")
}

/// A log and its projections in a temporary data dir.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub log: EventLog,
    pub projections: Projections,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("create a temporary dir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open the log");
        let projections = Projections::open(&log).expect("open the projections");
        Fixture {
            dir,
            log,
            projections,
        }
    }

    /// Closes the log and the projections and opens them again from the same
    /// data dir, as a restarted process would.
    pub fn reopen(self) -> Fixture {
        let Fixture {
            dir,
            log,
            projections,
        } = self;
        drop(projections);
        drop(log);
        let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("reopen the log");
        let projections = Projections::open(&log).expect("reopen the projections");
        Fixture {
            dir,
            log,
            projections,
        }
    }

    /// Appends `events` (all on the first one's stream) in one append and returns
    /// their seqs. Not for use inside an async runtime.
    pub fn append(&self, events: Vec<Event>) -> Vec<u64> {
        let stream = stream_of(&events[0]);
        let appended = self
            .log
            .append_blocking(
                stream,
                ExpectedVersion::Any,
                events.into_iter().map(NewEvent::new).collect(),
            )
            .expect("append");
        appended.positions.iter().map(|p| p.seq).collect()
    }

    /// Appends one event and returns its seq.
    pub fn append_one(&self, event: Event) -> u64 {
        self.append(vec![event])[0]
    }

    /// A conversation from the history view; panics if it never started.
    pub fn conversation(&self, id: &str) -> Conversation {
        self.projections
            .history()
            .conversation(id)
            .expect("query history")
            .unwrap_or_else(|| panic!("conversation {id} never started"))
    }

    /// Panics naming the differences when `verify` finds any.
    pub fn assert_verifies(&self) {
        let differences = self.projections.verify(&mut |_| {}).expect("verify");
        assert!(differences.is_empty(), "verify found {differences:?}");
    }

    /// Folds every projection up to the head.
    pub fn fold(&self) -> u64 {
        self.projections.catch_up(&mut |_| {}).expect("catch up")
    }

    /// The stored envelope at `seq`.
    pub fn envelope(&self, seq: u64) -> Envelope {
        self.log
            .get(seq)
            .expect("read the log")
            .expect("the record exists")
    }

    /// Every stored envelope, in seq order.
    pub fn envelopes(&self) -> Vec<Envelope> {
        self.log
            .read_from(1)
            .collect::<Result<_, _>>()
            .expect("read the log")
    }
}

/// A key hash whose bytes are all `n`.
pub fn hash(n: u8) -> KeyHash {
    KeyHash([n; 32])
}

pub fn started(conversation: &str, key: &str, user: Option<&str>) -> Event {
    Event::ConversationStarted(ConversationStarted {
        conversation_id: conversation.into(),
        key_id: key.into(),
        user: user.map(Into::into),
    })
}

pub fn message(conversation: &str, message_id: &str, key: &str, content: &str) -> Event {
    Event::MessageReceived(MessageReceived {
        conversation_id: conversation.into(),
        message_id: message_id.into(),
        key_id: key.into(),
        user: None,
        content: content.into(),
        agent: None,
    })
}

pub fn routed(conversation: &str, message_id: &str, agent: &str) -> Event {
    Event::AgentRouted(AgentRouted {
        conversation_id: conversation.into(),
        message_id: message_id.into(),
        agent: agent.into(),
        rule: None,
    })
}

pub fn reply(conversation: &str, message_id: &str, agent: &str, content: &str) -> Event {
    Event::ReplyCompleted(ReplyCompleted {
        conversation_id: conversation.into(),
        message_id: message_id.into(),
        reply_id: format!("r-{message_id}"),
        agent: agent.into(),
        content: content.into(),
        finish_reason: "stop".into(),
        latency_ms: 12,
    })
}

pub fn reply_failed(conversation: &str, message_id: &str, agent: &str) -> Event {
    Event::ReplyFailed(ReplyFailed {
        conversation_id: conversation.into(),
        message_id: message_id.into(),
        agent: agent.into(),
        code: "unavailable".into(),
        message: "upstream down".into(),
    })
}

pub fn erased(conversation: &str, by: &str) -> Event {
    Event::ConversationErased(ConversationErased {
        conversation_id: conversation.into(),
        by: by.into(),
    })
}

/// Usage of one turn: `tokens` = (prompt, completion).
pub fn usage(
    conversation: &str,
    key: &str,
    user: Option<&str>,
    model: &str,
    tokens: (u64, u64),
    cost_micros: u64,
) -> Event {
    Event::UsageRecorded(UsageRecorded {
        conversation_id: conversation.into(),
        message_id: "m".into(),
        key_id: key.into(),
        user: user.map(Into::into),
        agent: "echo".into(),
        model: model.into(),
        prompt_tokens: tokens.0,
        completion_tokens: tokens.1,
        estimated: false,
        input_price: 1_000_000,
        output_price: 2_000_000,
        cost_micros,
    })
}

pub fn threshold_crossed(scope: BudgetScope, subject: &str) -> Event {
    Event::BudgetThresholdCrossed(BudgetThresholdCrossed {
        scope,
        subject_id: subject.into(),
        period: BudgetPeriod::Day,
        period_start: DateTime::from_timestamp(1_700_000_000, 0).expect("valid timestamp"),
        threshold_pct: 80,
        spent_micros: 800,
        budget_micros: 1000,
    })
}

pub fn budget_exceeded(scope: BudgetScope, subject: &str) -> Event {
    Event::BudgetExceeded(BudgetExceeded {
        scope,
        subject_id: subject.into(),
        period: BudgetPeriod::Month,
        spent_micros: 1001,
        budget_micros: 1000,
    })
}

pub fn issued(key: &str, key_hash: KeyHash, expires_at: Option<DateTime<Utc>>) -> Event {
    Event::KeyIssued(KeyIssued {
        key_id: key.into(),
        name: format!("name of {key}"),
        owner: Some("alice".into()),
        key_hash,
        scopes: vec![Scope::Chat],
        limits: Limits {
            rpm: Some(60),
            tpm: None,
            max_parallel: Some(2),
        },
        budget: Some(Budget {
            micros: 5_000_000,
            period: BudgetPeriod::Month,
        }),
        expires_at,
    })
}

pub fn updated(key: &str, limits: Option<Limits>, budget: Option<Budget>) -> Event {
    Event::KeyUpdated(KeyUpdated {
        key_id: key.into(),
        limits,
        budget,
    })
}

pub fn revoked(key: &str, by: &str, reason: Option<&str>) -> Event {
    Event::KeyRevoked(KeyRevoked {
        key_id: key.into(),
        by: by.into(),
        reason: reason.map(Into::into),
    })
}

pub fn auth_failed(reason: &str) -> Event {
    Event::AuthFailed(AuthFailed {
        channel: AuthChannel::Http,
        reason: reason.into(),
        key_prefix: Some("sb-abcde".into()),
        remote: None,
    })
}

pub fn rate_limited(key: &str) -> Event {
    Event::RateLimited(RateLimited {
        key_id: key.into(),
        limit: LimitKind::Rpm,
        count: 3,
        retry_after_ms: 1200,
    })
}

pub fn admin_action(action: &str, target: &str) -> Event {
    Event::AdminAction(AdminAction {
        actor: "admin".into(),
        action: action.into(),
        target: target.into(),
    })
}

/// A started conversation read whole in pages of `limit`, from where `from`
/// says (`After(0)`: forwards from the first; `Before(u64::MAX)`: backwards
/// from the last), each next page starting where `has_more` says; the
/// messages in order, and the largest page.
pub fn read_in_pages(
    history: &HistoryView,
    conversation: &str,
    mut from: PageFrom,
    limit: usize,
) -> (Vec<HistoryMessage>, usize) {
    let (mut all, mut largest) = (Vec::new(), 0);
    loop {
        let page = history
            .page(conversation, from, limit, |_| true)
            .expect("a page")
            .expect("started");
        largest = largest.max(page.messages.len());
        let (first, last) = match (page.messages.first(), page.messages.last()) {
            (Some(first), Some(last)) => (first.seq, last.seq),
            _ => return (all, largest),
        };
        let more = page.has_more;
        match from {
            PageFrom::After(_) => {
                from = PageFrom::After(last);
                all.extend(page.messages);
            }
            PageFrom::Before(_) => {
                from = PageFrom::Before(first);
                all.splice(0..0, page.messages);
            }
        }
        if !more {
            return (all, largest);
        }
    }
}
