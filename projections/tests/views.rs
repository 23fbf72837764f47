//! The read API of each view: history, audit, costs and keys, queried after a
//! fold of a hand-written log.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use switchboard_events::catalog::{
    Budget, BudgetPeriod, BudgetScope, Limits, MessageReceived, UsageRecorded,
};
use switchboard_events::{Envelope, Event};
use switchboard_projections::{
    history, AuditQuery, CostGroup, CostRow, CostTotals, HistoryMessage, ProjectionError,
    ProjectionName, Revocation, Role,
};

use common::*;

fn message_to(conversation: &str, message_id: &str, content: &str, agent: &str) -> Event {
    Event::MessageReceived(MessageReceived {
        conversation_id: conversation.into(),
        message_id: message_id.into(),
        key_id: "k1".into(),
        user: Some("alice".into()),
        content: content.into(),
        agent: Some(agent.into()),
    })
}

// ---------------------------------------------------------------- history

/// A conversation of many chunks, written over several folds and mixed with
/// another conversation's messages, read in pages from every kind of start.
#[test]
fn history_pages_read_a_long_conversation_from_either_end() {
    let f = Fixture::new();
    f.append_one(started("long", "k1", None));
    f.append_one(started("other", "k1", None));
    let mut seqs = Vec::new();
    for round in 0..6 {
        for i in 0..40 {
            let id = format!("m{round}-{i}");
            // Each fold's 40 messages start a chunk of their own.
            let content = format!("{id} {}", "x".repeat(90));
            seqs.push(f.append_one(message("long", &id, "k1", &content)));
            f.append_one(message("other", &id, "k1", "elsewhere"));
        }
        f.fold();
    }
    let history = f.projections.history();
    let whole = history
        .conversation("long")
        .expect("read")
        .expect("started");
    assert_eq!(
        whole.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        seqs
    );

    // A page's seqs and has_more, within `units` (each message weighs one,
    // the first is taken whatever the budget).
    let budgeted = |from: history::PageFrom, limit: usize, mut units: usize| {
        let fits = move |_: &HistoryMessage| {
            let fits = units > 0;
            units = units.saturating_sub(1);
            fits
        };
        let page = history
            .page("long", from, limit, fits)
            .expect("read")
            .expect("started");
        (
            page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            page.has_more,
        )
    };
    let page_seqs = |from, limit| budgeted(from, limit, usize::MAX);
    use history::PageFrom::{After, Before};
    assert_eq!(page_seqs(After(0), 7), (seqs[..7].to_vec(), true));
    assert_eq!(
        page_seqs(Before(u64::MAX), 7),
        (seqs[seqs.len() - 7..].to_vec(), true)
    );
    // From a message's own seq, and from another conversation's seq next to it.
    assert_eq!(
        page_seqs(After(seqs[100]), 3),
        (seqs[101..104].to_vec(), true)
    );
    assert_eq!(
        page_seqs(After(seqs[100] + 1), 3),
        (seqs[101..104].to_vec(), true)
    );
    assert_eq!(
        page_seqs(Before(seqs[100]), 3),
        (seqs[97..100].to_vec(), true)
    );
    assert_eq!(
        page_seqs(Before(seqs[100] + 1), 3),
        (seqs[98..101].to_vec(), true)
    );
    // The ends: exactly the rest is no more; past the ends is empty.
    assert_eq!(
        page_seqs(After(seqs[230]), 9),
        (seqs[231..].to_vec(), false)
    );
    assert_eq!(page_seqs(Before(seqs[9]), 9), (seqs[..9].to_vec(), false));
    assert_eq!(page_seqs(After(*seqs.last().unwrap()), 5), (vec![], false));
    assert_eq!(page_seqs(Before(seqs[0]), 5), (vec![], false));
    assert_eq!(page_seqs(After(u64::MAX), 5), (vec![], false));
    // Every page of 13, both ways, is the whole conversation.
    for from in [After(0), Before(u64::MAX)] {
        let (messages, largest) = read_in_pages(&history, "long", from, 13);
        assert!(largest <= 13);
        assert_eq!(messages.iter().map(|m| m.seq).collect::<Vec<_>>(), seqs);
    }
    // A page stops where the caller's budget says, but takes its first
    // message whatever the budget.
    assert_eq!(budgeted(After(0), 100, 5), (seqs[..5].to_vec(), true));
    assert_eq!(
        budgeted(Before(u64::MAX), 100, 0),
        (seqs[seqs.len() - 1..].to_vec(), true)
    );
    assert_eq!(
        history.page("never", After(0), 5, |_| true).expect("read"),
        None
    );
}

#[test]
fn history_lists_messages_in_order_with_roles_agents_and_seqs() {
    let f = Fixture::new();
    let first = f.append(vec![
        started("c1", "k1", Some("alice")),
        message_to("c1", "m1", "hello", "assistant"),
        routed("c1", "m1", "assistant"),
        reply("c1", "m1", "assistant", "hi there"),
        usage("c1", "k1", Some("alice"), "gpt", (3, 4), 10),
    ]);
    // Another conversation in between must not leak into c1.
    f.append(vec![
        started("c2", "k1", None),
        message("c2", "x1", "k1", "other"),
    ]);
    let second = f.append(vec![
        message("c1", "m2", "k1", "second"),
        reply_failed("c1", "m2", "assistant"),
    ]);
    let third = f.append_one(reply("c1", "m2", "echo", "echo: second"));
    f.fold();

    let history = f.projections.history();
    let conversation = history
        .conversation("c1")
        .expect("query history")
        .expect("c1 started");
    let got: Vec<(&str, Role, &str, Option<&str>, u64)> = conversation
        .messages
        .iter()
        .map(|m| {
            (
                m.message_id.as_str(),
                m.role,
                m.content.as_str(),
                m.agent.as_deref(),
                m.seq,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("m1", Role::User, "hello", Some("assistant"), first[1]),
            (
                "m1",
                Role::Assistant,
                "hi there",
                Some("assistant"),
                first[3]
            ),
            ("m2", Role::User, "second", None, second[0]),
            ("m2", Role::Assistant, "echo: second", Some("echo"), third),
        ]
    );
    for m in &conversation.messages {
        assert_eq!(
            m.at,
            f.envelope(m.seq).at,
            "a message's time is its event's"
        );
    }

    let summary = &conversation.summary;
    assert_eq!(summary.conversation_id, "c1");
    assert_eq!(summary.key_id, "k1");
    assert_eq!(summary.user.as_deref(), Some("alice"));
    assert_eq!(summary.messages, 4);
    assert!(!summary.erased);
    assert_eq!(summary.started_at, f.envelope(first[0]).at);
    assert_eq!(summary.last_at, f.envelope(third).at);

    let other = history
        .conversation("c2")
        .expect("query")
        .expect("c2 started");
    assert_eq!(other.messages.len(), 1);
    assert_eq!(other.messages[0].content, "other");
    assert_eq!(other.summary.user, None);

    assert!(history.conversation("never").expect("query").is_none());
}

#[test]
fn erased_conversation_holds_no_content_and_later_messages_appear() {
    let f = Fixture::new();
    f.append(vec![
        started("c1", "k1", None),
        message("c1", "m1", "k1", "my secret plan"),
        reply("c1", "m1", "echo", "echo: my secret plan"),
    ]);
    f.append(vec![
        started("c2", "k1", None),
        message("c2", "m1", "k1", "kept"),
    ]);
    // An id that starts with the erased one's is another conversation.
    f.append(vec![
        started("c10", "k1", None),
        message("c10", "m1", "k1", "mine"),
    ]);
    f.fold();
    assert_eq!(f.conversation("c1").messages.len(), 2);

    let erasure = f.append_one(erased("c1", "admin"));
    f.fold();
    let c1 = f.conversation("c1");
    assert!(c1.messages.is_empty(), "{:?}", c1.messages);
    assert!(c1.summary.erased);
    assert_eq!(c1.summary.messages, 0);
    assert_eq!(c1.summary.last_at, f.envelope(erasure).at);
    // No row of the history view holds the content any more.
    let rows = &dump(&f.log)["history"];
    assert!(
        !rows
            .iter()
            .any(|(k, v)| contains(k, b"secret") || contains(v, b"secret")),
        "erased content is still in the history view"
    );
    // Other conversations keep theirs.
    let c2 = f.conversation("c2");
    assert_eq!(c2.messages.len(), 1);
    assert!(!c2.summary.erased);
    let c10 = f.conversation("c10");
    assert_eq!(c10.messages.len(), 1);
    assert_eq!(c10.messages[0].content, "mine");
    assert!(!c10.summary.erased);

    // A message after the erasure is history again.
    let after = f.append_one(message("c1", "m2", "k1", "a fresh start"));
    f.fold();
    let c1 = f.conversation("c1");
    assert_eq!(c1.messages.len(), 1);
    assert_eq!(c1.messages[0].content, "a fresh start");
    assert_eq!(c1.messages[0].seq, after);
    assert_eq!(c1.summary.messages, 1);
}

/// The raw rows of the history view holding `conversation`'s messages.
fn message_rows(f: &Fixture, conversation: &str) -> usize {
    let mut prefix = vec![b'm'];
    prefix.extend_from_slice(conversation.as_bytes());
    prefix.push(0);
    history_tree(f).scan_prefix(prefix).count()
}

fn history_tree(f: &Fixture) -> sled::Tree {
    f.log
        .db()
        .open_tree(ProjectionName::History.tree_name())
        .expect("the history tree")
}

/// The key of a history row of `conversation`'s messages from `seq` on.
fn message_row(conversation: &str, seq: u64) -> Vec<u8> {
    let mut key = vec![b'm'];
    key.extend_from_slice(conversation.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

#[test]
fn messages_folded_together_share_rows_and_read_back_in_order() {
    let f = Fixture::new();
    f.append_one(started("c1", "k1", None));
    f.fold();
    // Folded one at a time, as live commits under light load: a row each.
    let mut seqs = Vec::new();
    for n in 0..3 {
        seqs.push(f.append_one(message("c1", &format!("m{n}"), "k1", "short")));
        f.fold();
    }
    assert_eq!(message_rows(&f, "c1"), 3);
    // Folded in one commit: twice a chunk's messages take two rows, as a row
    // takes messages until it holds a chunk's worth.
    let long = "x".repeat(1000);
    let many = 2 * history::CHUNK_MESSAGES;
    for n in 3..3 + many {
        seqs.push(f.append_one(message("c1", &format!("m{n}"), "k1", &long)));
    }
    // Another conversation's messages in between stay out of c1's rows.
    f.append(vec![
        started("c2", "k1", None),
        message("c2", "x1", "k1", "other"),
    ]);
    let last = format!("m{}", 2 + many);
    seqs.push(f.append_one(reply("c1", &last, "echo", "done")));
    f.fold();
    // The reply starts a third: the second row is full.
    assert_eq!(message_rows(&f, "c1"), 3 + 3);

    let read = |f: &Fixture| {
        let c1 = f.conversation("c1");
        assert_eq!(c1.summary.messages, 4 + many as u64);
        c1.messages
            .iter()
            .map(|m| (m.seq, m.message_id.clone(), m.role, m.content.len()))
            .collect::<Vec<_>>()
    };
    let before = read(&f);
    assert_eq!(before.iter().map(|m| m.0).collect::<Vec<_>>(), seqs);
    assert_eq!(before[2], (seqs[2], "m2".to_owned(), Role::User, 5));
    assert_eq!(before[3], (seqs[3], "m3".to_owned(), Role::User, 1000));
    assert_eq!(
        before[3 + many],
        (seqs[3 + many], last.clone(), Role::Assistant, 4)
    );

    // A replay folds all of them in one commit: fewer rows (the three short
    // messages share the first with the first long ones), the same messages,
    // and verify compares them message by message.
    f.assert_verifies();
    let live = logical_dump(&f.log);
    f.projections
        .replay(Some(ProjectionName::History), &mut |_| {})
        .expect("replay history");
    assert_eq!(message_rows(&f, "c1"), 3);
    assert_eq!(read(&f), before);
    assert_dumps_equal(&live, &logical_dump(&f.log), "replayed history");
    f.assert_verifies();
}

/// A history view of layout 1 (messages held in the view, no layout marker),
/// as an older switchboard left it, is dropped when the projections open and
/// folded again from the log; the other views stay as they were.
#[test]
fn a_history_view_of_the_older_layout_is_folded_again() {
    let f = Fixture::new();
    let seqs = f.append(vec![
        started("c1", "k1", None),
        message("c1", "m1", "k1", "hello"),
        reply("c1", "m1", "echo", "echo: hello"),
    ]);
    f.fold();
    let history = history_tree(&f);
    // Layout 1: one row per message holding the message, no marker.
    for seq in &seqs[1..] {
        history
            .remove(message_row("c1", *seq))
            .expect("remove a row");
    }
    history
        .insert(message_row("c1", seqs[1]), &b"\x02m1\x00\x05hello\x00"[..])
        .expect("write a layout 1 row");
    history
        .remove(switchboard_projections::view::LAYOUT_KEY)
        .expect("remove the marker");
    let audit_at = f
        .projections
        .checkpoint(ProjectionName::Audit)
        .expect("checkpoint");
    drop(history);

    let f = f.reopen();
    assert_eq!(
        f.projections
            .checkpoint(ProjectionName::History)
            .expect("checkpoint"),
        0,
        "the old view is dropped"
    );
    assert_eq!(
        f.projections
            .checkpoint(ProjectionName::Audit)
            .expect("checkpoint"),
        audit_at,
        "the other views stay"
    );
    f.fold();
    let c1 = f.conversation("c1");
    let messages: Vec<(u64, &str)> = c1
        .messages
        .iter()
        .map(|m| (m.seq, m.content.as_str()))
        .collect();
    assert_eq!(messages, [(seqs[1], "hello"), (seqs[2], "echo: hello")]);
    f.assert_verifies();
    // Opened again, the view of the current layout stays.
    let f = f.reopen();
    assert_eq!(
        f.projections
            .checkpoint(ProjectionName::History)
            .expect("checkpoint"),
        f.log.head()
    );
}

/// A chunk naming a seq that is not one of its conversation's messages is a
/// corrupt row, named in the error, not a panic or a wrong message.
#[test]
fn a_chunk_naming_no_message_of_its_conversation_is_a_corrupt_row() {
    let f = Fixture::new();
    let seqs = f.append(vec![
        started("c1", "k1", None),
        message("c1", "m1", "k1", "hello"),
    ]);
    let other = f.append(vec![
        started("c2", "k1", None),
        message("c2", "m1", "k1", "elsewhere"),
    ]);
    f.fold();
    let history = history_tree(&f);
    let key = message_row("c1", seqs[1]);
    for (chunk, says) in [
        (seqs[0].to_be_bytes().to_vec(), "conversation_started event"),
        (other[1].to_be_bytes().to_vec(), "conversation \"c2\""),
        (1_000u64.to_be_bytes().to_vec(), "does not hold"),
        (vec![1, 2, 3], "not a list of seqs"),
    ] {
        history.insert(&key, chunk).expect("corrupt the chunk");
        let error = f
            .projections
            .history()
            .page("c1", history::PageFrom::After(0), 10, |_| true)
            .expect_err("a corrupt chunk");
        assert!(
            matches!(
                &error,
                ProjectionError::CorruptRow {
                    projection: "history",
                    ..
                }
            ),
            "{error}"
        );
        assert!(error.to_string().contains(says), "{error}");
    }
}

#[test]
fn erasure_in_the_same_fold_as_the_messages_removes_them() {
    let f = Fixture::new();
    f.append(vec![
        started("c1", "k1", None),
        message("c1", "m1", "k1", "gone"),
        reply("c1", "m1", "echo", "echo: gone"),
        erased("c1", "k1"),
        message("c1", "m2", "k1", "stays"),
    ]);
    f.fold();
    let c1 = f.conversation("c1");
    let contents: Vec<&str> = c1.messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(contents, vec!["stays"]);
}

#[test]
fn conversations_of_key_pages_by_conversation_id() {
    let f = Fixture::new();
    for conversation in ["c05", "c01", "c03", "c02", "c04"] {
        f.append_one(started(conversation, "k1", None));
    }
    f.append_one(started("c10", "k2", None));
    // A key whose id starts with another's must not show in its list.
    f.append_one(started("c99", "k10", None));
    // A second start by another key changes nothing: c01 stays k1's.
    f.append_one(started("c01", "k2", None));
    f.fold();
    let history = f.projections.history();
    let ids = |key: &str, after: Option<&str>, limit: usize| -> Vec<String> {
        history
            .conversations_of_key(key, after, limit)
            .expect("conversations of key")
            .into_iter()
            .map(|s| s.conversation_id)
            .collect()
    };

    assert_eq!(ids("k1", None, 100), ["c01", "c02", "c03", "c04", "c05"]);
    assert_eq!(ids("k1", None, 2), ["c01", "c02"]);
    assert_eq!(ids("k1", Some("c02"), 2), ["c03", "c04"]);
    assert_eq!(ids("k1", Some("c04"), 2), ["c05"]);
    assert!(ids("k1", Some("c05"), 2).is_empty());
    // `after` need not be one of the key's conversations.
    assert_eq!(ids("k1", Some("c025"), 1), ["c03"]);
    assert!(ids("k1", None, 0).is_empty());
    assert_eq!(ids("k2", None, 100), ["c10"]);
    assert_eq!(ids("k10", None, 100), ["c99"]);
    assert!(ids("nobody", None, 100).is_empty());

    // Paging visits every conversation exactly once.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = ids("k1", after.as_deref(), 2);
        if page.is_empty() {
            break;
        }
        after = page.last().cloned();
        seen.extend(page);
    }
    assert_eq!(seen, ["c01", "c02", "c03", "c04", "c05"]);

    let summaries = history
        .conversations_of_key("k1", None, 1)
        .expect("conversations of key");
    assert_eq!(summaries[0].key_id, "k1");
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------- audit

const AUDIT_TYPES: [&str; 9] = [
    "key_issued",
    "key_updated",
    "key_revoked",
    "auth_failed",
    "rate_limited",
    "admin_action",
    "conversation_erased",
    "budget_threshold_crossed",
    "budget_exceeded",
];

/// A log with audit and other events, each appended alone and a little apart so
/// their times differ (expectations are computed from the stored times anyway).
fn audit_fixture() -> Fixture {
    let f = Fixture::new();
    let events = vec![
        issued("k1", hash(1), None),
        started("c1", "k1", None),
        message("c1", "m1", "k1", "hello"),
        auth_failed("unknown key"),
        rate_limited("k1"),
        usage("c1", "k1", None, "gpt", (1, 1), 1),
        issued("k2", hash(2), None),
        rate_limited("k2"),
        threshold_crossed(BudgetScope::Key, "k1"),
        budget_exceeded(BudgetScope::User, "alice"),
        admin_action("keys.issue", "k2"),
        erased("c1", "admin"),
        updated("k1", None, None),
        revoked("k1", "admin", Some("leaked")),
        reply("c1", "m1", "echo", "echo: hello"),
        rate_limited("k1"),
        threshold_crossed(BudgetScope::User, "k1"),
        // An id that starts with k1's is another key.
        rate_limited("k10"),
    ];
    for event in events {
        f.append_one(event);
        std::thread::sleep(Duration::from_millis(2));
    }
    f.fold();
    f
}

fn audit_events(f: &Fixture) -> Vec<Envelope> {
    let mut events: Vec<Envelope> = f
        .envelopes()
        .into_iter()
        .filter(|e| AUDIT_TYPES.contains(&e.event.type_name()))
        .collect();
    events.sort_by_key(|e| (e.at, e.seq));
    events
}

fn query(f: &Fixture, query: &AuditQuery) -> Vec<Envelope> {
    let page = f
        .projections
        .audit()
        .query(&AuditQuery {
            limit: 1000,
            ..query.clone()
        })
        .expect("audit query");
    assert!(page.next_cursor.is_none());
    page.events
}

fn seqs(events: &[Envelope]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

#[test]
fn audit_keeps_only_audit_events() {
    let f = audit_fixture();
    let all = query(&f, &AuditQuery::default());
    assert_eq!(all, audit_events(&f));
    let types: BTreeSet<&str> = all.iter().map(|e| e.event.type_name()).collect();
    assert_eq!(types, AUDIT_TYPES.into_iter().collect());
    // Each is the stored envelope, whole.
    for event in &all {
        assert_eq!(event, &f.envelope(event.seq));
    }
    assert_eq!(all.len(), 14);
}

#[test]
fn audit_filters_by_time_since_inclusive_until_exclusive() {
    let f = audit_fixture();
    let audit = audit_events(&f);
    let since = audit[2].at;
    let until = audit[8].at;
    let between = |since: Option<DateTime<Utc>>, until: Option<DateTime<Utc>>| -> Vec<u64> {
        audit
            .iter()
            .filter(|e| since.into_iter().all(|s| e.at >= s) && until.into_iter().all(|u| e.at < u))
            .map(|e| e.seq)
            .collect()
    };
    let range = |since, until| {
        seqs(&query(
            &f,
            &AuditQuery {
                since,
                until,
                ..AuditQuery::default()
            },
        ))
    };

    let got = range(Some(since), Some(until));
    assert_eq!(got, between(Some(since), Some(until)));
    assert_eq!(got.first(), Some(&audit[2].seq), "since is inclusive");
    assert!(!got.contains(&audit[8].seq), "until is exclusive");
    assert!(got.contains(&audit[7].seq));

    assert_eq!(range(Some(since), None), between(Some(since), None));
    assert_eq!(range(None, Some(until)), between(None, Some(until)));
    assert!(range(Some(since), Some(since)).is_empty());
    assert!(range(Some(until), Some(since)).is_empty());
    let one_micro = TimeDelta::microseconds(1);
    assert_eq!(
        range(Some(since), Some(since + one_micro)),
        vec![audit[2].seq]
    );
    assert_eq!(
        range(Some(since + one_micro), None),
        between(Some(since + one_micro), None)
    );
    assert!(range(Some(Utc::now() + TimeDelta::days(1)), None).is_empty());
    assert!(range(None, Some(audit[0].at)).is_empty());
    assert_eq!(
        range(None, Some(audit[0].at + one_micro)),
        vec![audit[0].seq]
    );
}

#[test]
fn audit_filters_by_key_type_and_both() {
    let f = audit_fixture();
    let audit = audit_events(&f);
    let filtered = |key: Option<&str>, kind: Option<&str>| -> Vec<u64> {
        audit
            .iter()
            .filter(|e| key.into_iter().all(|k| e.event.key_id() == Some(k)))
            .filter(|e| kind.into_iter().all(|t| e.event.type_name() == t))
            .map(|e| e.seq)
            .collect()
    };
    let ask = |key: Option<&str>, kind: Option<&str>| {
        seqs(&query(
            &f,
            &AuditQuery {
                key_id: key.map(Into::into),
                event_type: kind.map(Into::into),
                ..AuditQuery::default()
            },
        ))
    };

    let k1 = ask(Some("k1"), None);
    assert_eq!(k1, filtered(Some("k1"), None));
    let k1_types: Vec<&str> = k1
        .iter()
        .map(|&seq| f.envelope(seq).event.type_name())
        .collect();
    assert_eq!(
        k1_types,
        [
            "key_issued",
            "rate_limited",
            "budget_threshold_crossed",
            "key_updated",
            "key_revoked",
            "rate_limited"
        ],
        "k1's audit events, and not its conversation or usage events"
    );
    assert_eq!(ask(Some("k2"), None), filtered(Some("k2"), None));
    assert_eq!(ask(Some("k2"), None).len(), 2);
    assert_eq!(ask(Some("k10"), None), filtered(Some("k10"), None));
    assert_eq!(ask(Some("k10"), None).len(), 1);
    // A user-scoped budget alert concerns no key, even one spelled like a key.
    assert!(ask(Some("alice"), None).is_empty());
    assert!(
        ask(Some("k"), None).is_empty(),
        "a key id prefix matches nothing"
    );

    let limited = ask(None, Some("rate_limited"));
    assert_eq!(limited, filtered(None, Some("rate_limited")));
    assert_eq!(limited.len(), 4);
    assert_eq!(ask(None, Some("key_issued")).len(), 2);
    // A known type that is not an audit event: nothing, not an error.
    assert!(ask(None, Some("message_received")).is_empty());

    let both = ask(Some("k1"), Some("rate_limited"));
    assert_eq!(both, filtered(Some("k1"), Some("rate_limited")));
    assert_eq!(both.len(), 2);
    assert!(ask(Some("k2"), Some("key_revoked")).is_empty());

    // Key, type and time together.
    let since = f.envelope(both[1]).at;
    let got = seqs(&query(
        &f,
        &AuditQuery {
            key_id: Some("k1".into()),
            event_type: Some("rate_limited".into()),
            since: Some(since),
            ..AuditQuery::default()
        },
    ));
    assert_eq!(got, vec![both[1]]);
    let got = seqs(&query(
        &f,
        &AuditQuery {
            key_id: Some("k1".into()),
            event_type: Some("rate_limited".into()),
            until: Some(since),
            ..AuditQuery::default()
        },
    ));
    assert_eq!(got, vec![both[0]]);
}

#[test]
fn audit_pages_return_every_match_exactly_once() {
    let f = audit_fixture();
    let audit = audit_events(&f);
    let queries = vec![
        AuditQuery::default(),
        AuditQuery {
            key_id: Some("k1".into()),
            ..AuditQuery::default()
        },
        AuditQuery {
            event_type: Some("rate_limited".into()),
            ..AuditQuery::default()
        },
        AuditQuery {
            key_id: Some("k1".into()),
            event_type: Some("rate_limited".into()),
            ..AuditQuery::default()
        },
        AuditQuery {
            since: Some(audit[1].at),
            until: Some(audit[11].at),
            ..AuditQuery::default()
        },
        AuditQuery {
            key_id: Some("k1".into()),
            since: Some(audit[3].at),
            ..AuditQuery::default()
        },
        AuditQuery {
            event_type: Some("key_issued".into()),
            until: Some(audit[12].at),
            ..AuditQuery::default()
        },
    ];
    for q in queries {
        let whole = seqs(&query(&f, &q));
        assert!(!whole.is_empty(), "{q:?} matches something");
        let mut paged = Vec::new();
        let mut cursor = None;
        let mut pages = 0;
        loop {
            let page = f
                .projections
                .audit()
                .query(&AuditQuery {
                    cursor: cursor.clone(),
                    limit: 3,
                    ..q.clone()
                })
                .expect("a page of the audit trail");
            pages += 1;
            assert!(page.events.len() <= 3);
            assert!(pages <= whole.len() + 1, "paging does not end for {q:?}");
            paged.extend(seqs(&page.events));
            match page.next_cursor {
                Some(next) => {
                    assert_eq!(page.events.len(), 3, "a page with a next cursor is full");
                    cursor = Some(next);
                }
                None => break,
            }
        }
        assert_eq!(paged, whole, "pages of {q:?}");
        // Only the last page may be short (or, after a full page, empty).
        assert!(pages <= whole.len() / 3 + 1, "{pages} pages of {q:?}");
    }
}

#[test]
fn audit_refuses_unknown_type_and_malformed_cursor() {
    let f = audit_fixture();
    let audit = f.projections.audit();
    let refused = |query: AuditQuery| {
        matches!(
            audit.query(&AuditQuery { limit: 10, ..query }),
            Err(ProjectionError::InvalidQuery(_))
        )
    };
    assert!(refused(AuditQuery {
        event_type: Some("no_such_type".into()),
        ..AuditQuery::default()
    }));
    assert!(refused(AuditQuery {
        event_type: Some("Key_Issued".into()),
        ..AuditQuery::default()
    }));
    for cursor in ["zz", "", "00ff", "not a cursor at all", &"ab".repeat(17)] {
        assert!(
            refused(AuditQuery {
                cursor: Some(cursor.into()),
                ..AuditQuery::default()
            }),
            "cursor {cursor:?}"
        );
    }
}

// ---------------------------------------------------------------- costs

fn estimated(event: Event) -> Event {
    match event {
        Event::UsageRecorded(usage) => Event::UsageRecorded(UsageRecorded {
            estimated: true,
            ..usage
        }),
        other => other,
    }
}

fn totals(requests: u64, tokens_in: u64, tokens_out: u64, cost: u64, est: u64) -> CostTotals {
    CostTotals {
        requests,
        tokens_in,
        tokens_out,
        cost_micros: cost,
        estimated_requests: est,
    }
}

fn row(group: &str, totals: CostTotals) -> CostRow {
    CostRow {
        group: group.into(),
        totals,
    }
}

fn costs_fixture() -> Fixture {
    let f = Fixture::new();
    f.append(vec![
        started("c1", "k1", Some("alice")),
        usage("c1", "k1", Some("alice"), "model-a", (10, 20), 100),
        usage("c1", "k1", Some("alice"), "model-b", (1, 2), 7),
    ]);
    f.append_one(usage("c2", "k1", None, "model-a", (5, 5), 50));
    f.append_one(estimated(usage(
        "c3",
        "k2",
        Some("bob"),
        "model-a",
        (100, 200),
        1_000,
    )));
    // Not usage: no effect on costs.
    f.append_one(issued("k1", hash(1), None));
    f.append_one(reply("c1", "m", "echo", "hi"));
    f.fold();
    f
}

#[test]
fn costs_report_groups_by_key_user_model_and_day() {
    let f = costs_fixture();
    let costs = f.projections.costs();
    let report = |by| costs.report(by, None, None).expect("cost report");

    assert_eq!(
        report(CostGroup::Key),
        vec![
            row("k1", totals(3, 16, 27, 157, 0)),
            row("k2", totals(1, 100, 200, 1_000, 1)),
        ]
    );
    assert_eq!(
        report(CostGroup::User),
        vec![
            row("", totals(1, 5, 5, 50, 0)),
            row("alice", totals(2, 11, 22, 107, 0)),
            row("bob", totals(1, 100, 200, 1_000, 1)),
        ]
    );
    assert_eq!(
        report(CostGroup::Model),
        vec![
            row("model-a", totals(3, 115, 225, 1_150, 1)),
            row("model-b", totals(1, 1, 2, 7, 0)),
        ]
    );
    // By day: the log stamps the times, so group the expected sums by them.
    let mut by_day: BTreeMap<String, CostTotals> = BTreeMap::new();
    for envelope in f.envelopes() {
        if let Event::UsageRecorded(u) = &envelope.event {
            let day = by_day
                .entry(envelope.at.date_naive().to_string())
                .or_default();
            day.requests += 1;
            day.tokens_in += u.prompt_tokens;
            day.tokens_out += u.completion_tokens;
            day.cost_micros += u.cost_micros;
            day.estimated_requests += u64::from(u.estimated);
        }
    }
    let expected: Vec<CostRow> = by_day.into_iter().map(|(d, t)| row(&d, t)).collect();
    assert_eq!(report(CostGroup::Day), expected);

    assert_eq!(
        costs.key_totals("k1").expect("totals"),
        totals(3, 16, 27, 157, 0)
    );
    assert_eq!(
        costs.key_totals("k2").expect("totals"),
        totals(1, 100, 200, 1_000, 1)
    );
    assert_eq!(
        costs.key_totals("nobody").expect("totals"),
        CostTotals::default()
    );
}

#[test]
fn costs_saturate_instead_of_wrapping_on_huge_reported_usage() {
    let f = Fixture::new();
    f.append(vec![
        started("c1", "k1", None),
        usage("c1", "k1", None, "model-a", (u64::MAX, 1), u64::MAX),
        usage("c1", "k1", None, "model-a", (u64::MAX, 1), u64::MAX),
    ]);
    f.fold();
    let costs = f.projections.costs();
    let saturated = totals(2, u64::MAX, 2, u64::MAX, 0);
    assert_eq!(costs.key_totals("k1").expect("totals"), saturated);
    assert_eq!(
        costs.report(CostGroup::Model, None, None).expect("report"),
        vec![row("model-a", saturated)]
    );
}

#[test]
fn costs_report_filters_by_day_range() {
    let f = costs_fixture();
    let costs = f.projections.costs();
    let usage_days: BTreeMap<NaiveDate, u64> =
        f.envelopes()
            .iter()
            .fold(BTreeMap::new(), |mut days, envelope| {
                if let Event::UsageRecorded(u) = &envelope.event {
                    *days.entry(envelope.at.date_naive()).or_default() += u.cost_micros;
                }
                days
            });
    let first = *usage_days.keys().next().expect("usage was recorded");
    let last = *usage_days.keys().last().expect("usage was recorded");
    let day = TimeDelta::days(1);
    let cost_over = |since: Option<NaiveDate>, until: Option<NaiveDate>| -> u64 {
        costs
            .report(CostGroup::Key, since, until)
            .expect("cost report")
            .iter()
            .map(|r| r.totals.cost_micros)
            .sum()
    };

    assert_eq!(cost_over(None, None), 1_157);
    for (&today, &cost) in &usage_days {
        assert_eq!(cost_over(Some(today), Some(today)), cost, "{today}");
    }
    assert_eq!(cost_over(Some(first - day), Some(last + day)), 1_157);
    assert_eq!(cost_over(Some(first), None), 1_157);
    assert_eq!(cost_over(None, Some(last)), 1_157);
    // Yesterday and tomorrow hold nothing.
    assert_eq!(cost_over(Some(first - day), Some(first - day)), 0);
    assert_eq!(cost_over(None, Some(first - day)), 0);
    assert_eq!(cost_over(Some(last + day), None), 0);
    assert_eq!(cost_over(Some(last + day), Some(last + day)), 0);
    assert!(costs
        .report(CostGroup::Model, Some(last + day), None)
        .expect("cost report")
        .is_empty());
    // Grouped by day within a range: one row per day.
    let days: Vec<String> = costs
        .report(CostGroup::Day, Some(first), Some(last))
        .expect("cost report")
        .into_iter()
        .map(|r| r.group)
        .collect();
    let expected: Vec<String> = usage_days.keys().map(|d| d.to_string()).collect();
    assert_eq!(days, expected);
}

// ---------------------------------------------------------------- keys

#[test]
fn keys_are_found_by_hash_and_id_and_listed_by_id() {
    let f = Fixture::new();
    let expiry = DateTime::from_timestamp(4_000_000_000, 0).expect("valid");
    let k2 = f.append_one(issued("k2", hash(2), None));
    let k1 = f.append_one(issued("k1", hash(1), Some(expiry)));
    f.append_one(started("c1", "k1", None));
    f.fold();
    let keys = f.projections.keys();

    let record = keys
        .by_hash(&hash(1))
        .expect("by hash")
        .expect("k1 by hash");
    assert_eq!(record.key_id, "k1");
    assert_eq!(record.name, "name of k1");
    assert_eq!(record.owner.as_deref(), Some("alice"));
    assert_eq!(record.key_hash, hash(1));
    assert_eq!(
        record.scopes,
        vec![switchboard_events::catalog::Scope::Chat]
    );
    assert_eq!(record.limits.rpm, Some(60));
    assert_eq!(record.limits.max_parallel, Some(2));
    assert_eq!(record.limits.tpm, None);
    assert_eq!(
        record.budget,
        Some(Budget {
            micros: 5_000_000,
            period: BudgetPeriod::Month
        })
    );
    assert_eq!(record.expires_at, Some(expiry));
    assert_eq!(record.issued_at, f.envelope(k1).at);
    assert_eq!(record.revoked, None);
    assert_eq!(keys.get("k1").expect("get"), Some(record.clone()));

    let other = keys.by_hash(&hash(2)).expect("by hash").expect("k2");
    assert_eq!(other.key_id, "k2");
    assert_eq!(other.issued_at, f.envelope(k2).at);

    assert_eq!(keys.by_hash(&hash(3)).expect("by hash"), None);
    assert_eq!(keys.get("k3").expect("get"), None);
    let listed: Vec<String> = keys
        .list()
        .expect("list")
        .into_iter()
        .map(|r| r.key_id)
        .collect();
    assert_eq!(listed, ["k1", "k2"]);
}

#[test]
fn revoked_key_records_its_revocation_once() {
    let f = Fixture::new();
    f.append_one(issued("k1", hash(1), None));
    f.append_one(issued("k2", hash(2), None));
    let revocation = f.append_one(revoked("k1", "admin", Some("leaked")));
    f.append_one(revoked("k1", "ops", None));
    // Revoking a key nobody issued creates nothing.
    f.append_one(revoked("ghost", "admin", None));
    f.fold();
    let keys = f.projections.keys();

    let record = keys.by_hash(&hash(1)).expect("by hash").expect("k1");
    assert_eq!(
        record.revoked,
        Some(Revocation {
            at: f.envelope(revocation).at,
            by: "admin".into(),
            reason: Some("leaked".into()),
        }),
        "the first revocation stands"
    );
    assert!(!record.is_active(Utc::now()));
    assert_eq!(keys.get("k2").expect("get").expect("k2").revoked, None);
    assert_eq!(keys.get("ghost").expect("get"), None);
    assert_eq!(keys.list().expect("list").len(), 2);
}

#[test]
fn update_changes_limits_and_budget_and_leaves_the_rest() {
    let f = Fixture::new();
    f.append_one(issued("k1", hash(1), None));
    f.fold();
    let keys = f.projections.keys();
    let before = keys.get("k1").expect("get").expect("k1");

    let limits = Limits {
        rpm: Some(5),
        tpm: Some(1000),
        max_parallel: None,
    };
    f.append_one(updated("k1", Some(limits.clone()), None));
    f.fold();
    let after = keys.get("k1").expect("get").expect("k1");
    assert_eq!(after.limits, limits);
    assert_eq!(after.budget, before.budget, "budget untouched");

    let budget = Budget {
        micros: 42,
        period: BudgetPeriod::Day,
    };
    f.append_one(updated("k1", None, Some(budget.clone())));
    f.fold();
    let after = keys.get("k1").expect("get").expect("k1");
    assert_eq!(after.limits, limits, "limits untouched");
    assert_eq!(after.budget, Some(budget));

    let both_limits = Limits::default();
    let both_budget = Budget {
        micros: 7,
        period: BudgetPeriod::Total,
    };
    f.append_one(updated(
        "k1",
        Some(both_limits.clone()),
        Some(both_budget.clone()),
    ));
    // Updating a key nobody issued creates nothing.
    f.append_one(updated("ghost", Some(Limits::default()), None));
    f.fold();
    let after = keys.by_hash(&hash(1)).expect("by hash").expect("k1");
    assert_eq!(after.limits, both_limits);
    assert_eq!(after.budget, Some(both_budget));
    assert_eq!(
        (
            &after.name,
            &after.owner,
            &after.scopes,
            after.issued_at,
            after.key_hash
        ),
        (
            &before.name,
            &before.owner,
            &before.scopes,
            before.issued_at,
            before.key_hash
        )
    );
    assert_eq!(after.revoked, None);
    assert_eq!(keys.get("ghost").expect("get"), None);
}

#[test]
fn expired_keys_are_not_active() {
    let f = Fixture::new();
    let now = Utc::now();
    let soon = now + TimeDelta::hours(1);
    let past = now - TimeDelta::hours(1);
    f.append_one(issued("soon", hash(1), Some(soon)));
    f.append_one(issued("past", hash(2), Some(past)));
    f.append_one(issued("never", hash(3), None));
    f.append_one(issued("revoked", hash(4), Some(soon)));
    f.append_one(revoked("revoked", "admin", None));
    f.fold();
    let keys = f.projections.keys();
    let key = |id: &str| keys.get(id).expect("get").expect("issued");

    assert!(key("soon").is_active(now));
    assert!(!key("soon").is_active(soon), "expiry is exclusive");
    assert!(!key("soon").is_active(soon + TimeDelta::seconds(1)));
    assert!(!key("past").is_active(now));
    assert!(key("past").is_active(past - TimeDelta::seconds(1)));
    assert!(key("never").is_active(now + TimeDelta::days(365 * 100)));
    assert!(!key("revoked").is_active(now));
}

/// A key id issued again with a new secret: the old secret must no longer
/// authenticate — `by_hash` of the old hash must not return a record whose
/// `key_hash` is a different one.
#[test]
fn reissued_key_id_retires_its_old_hash() {
    let f = Fixture::new();
    f.append_one(issued("k1", hash(1), None));
    f.append_one(issued("k1", hash(9), None));
    f.fold();
    let keys = f.projections.keys();
    let current = keys
        .by_hash(&hash(9))
        .expect("by hash")
        .expect("new secret");
    assert_eq!(current.key_hash, hash(9));
    let old = keys.by_hash(&hash(1)).expect("by hash");
    assert!(
        old.iter().all(|r| r.key_hash == hash(1)),
        "the retired hash {:?} still finds key {:?} whose hash is {:?}",
        hash(1),
        old.as_ref().map(|r| &r.key_id),
        old.as_ref().map(|r| r.key_hash),
    );
}

#[test]
fn issuing_a_revoked_key_id_again_does_not_revive_it() {
    let f = Fixture::new();
    f.append_one(issued("k1", hash(1), None));
    f.append_one(revoked("k1", "admin", Some("leaked")));
    f.append_one(issued("k1", hash(2), None));
    f.fold();
    let record = f
        .projections
        .keys()
        .by_hash(&hash(2))
        .expect("by hash")
        .expect("the new secret finds the key");
    assert!(
        record.revoked.is_some(),
        "re-issue revived a revoked key: {record:?}"
    );
    assert!(!record.is_active(chrono::Utc::now()));
    assert!(f
        .projections
        .keys()
        .by_hash(&hash(1))
        .expect("by hash")
        .is_none());
}
