//! The projections' central property: for any sequence of catalog events, the
//! views folded live (while the log grows, possibly across a restart) are row
//! for row the views a full replay builds, `verify` finds nothing, and the read
//! API answers what the events say — costs to the exact micro-dollar.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::DateTime;
use proptest::prelude::*;
use proptest::strategy::Union;
use proptest::test_runner::TestCaseError;
use switchboard_events::catalog::{
    AdminAction, AgentRouted, AuthChannel, AuthFailed, Budget, BudgetExceeded, BudgetPeriod,
    BudgetScope, BudgetThresholdCrossed, ConversationErased, ConversationStarted, KeyHash,
    KeyIssued, KeyRevoked, KeyUpdated, LimitKind, Limits, MessageReceived, RateLimited,
    ReplyCompleted, ReplyFailed, Scope, UsageRecorded,
};
use switchboard_events::{
    Envelope, Event, EventLog, ExpectedVersion, NewEvent, OpenMode, EVENT_TYPES,
};
use switchboard_projections::{
    AuditQuery, Conversation, ConversationSummary, CostGroup, CostRow, CostTotals, HistoryMessage,
    KeyRecord, PageFrom, ProjectionName, Projections, Revocation, Role,
};

use common::{assert_dumps_equal, dump, logical_dump, read_in_pages, stream_of};

// A small universe, so events about the same conversation, key, user and model
// collide and interact.
const CONVERSATIONS: &[&str] = &["c0", "c1", "c2", "c3", "c4"];
const KEYS: &[&str] = &["k0", "k1", "k2", "k3"];
const USERS: &[&str] = &["u0", "u1", "u2"];
const MODELS: &[&str] = &["m0", "m1", "m2"];
const AGENTS: &[&str] = &["echo", "assistant"];
const MESSAGE_IDS: &[&str] = &["msg0", "msg1", "msg2", "msg3"];

/// How long a live fold may take to catch up before the test calls it hung.
/// A guard against a hang, not a speed assertion.
const HANG_GUARD: Duration = Duration::from_secs(120);

fn pick(items: &'static [&'static str]) -> BoxedStrategy<String> {
    prop::sample::select(items).prop_map(str::to_owned).boxed()
}

fn maybe(items: &'static [&'static str]) -> BoxedStrategy<Option<String>> {
    prop::option::of(pick(items)).boxed()
}

fn text() -> BoxedStrategy<String> {
    "\\PC{0,16}".boxed()
}

fn period() -> BoxedStrategy<BudgetPeriod> {
    prop_oneof![
        Just(BudgetPeriod::Day),
        Just(BudgetPeriod::Month),
        Just(BudgetPeriod::Total)
    ]
    .boxed()
}

fn scope_and_subject() -> BoxedStrategy<(BudgetScope, String)> {
    prop_oneof![
        pick(KEYS).prop_map(|key| (BudgetScope::Key, key)),
        pick(USERS).prop_map(|user| (BudgetScope::User, user)),
    ]
    .boxed()
}

fn limits() -> BoxedStrategy<Limits> {
    (
        prop::option::of(1u32..1000),
        prop::option::of(1u64..1_000_000),
        prop::option::of(1u32..16),
    )
        .prop_map(|(rpm, tpm, max_parallel)| Limits {
            rpm,
            tpm,
            max_parallel,
        })
        .boxed()
}

fn budget() -> BoxedStrategy<Option<Budget>> {
    prop::option::of(
        (0u64..100_000_000, period()).prop_map(|(micros, period)| Budget { micros, period }),
    )
    .boxed()
}

fn timestamp() -> BoxedStrategy<chrono::DateTime<chrono::Utc>> {
    (0i64..4_000_000_000)
        .prop_map(|secs| DateTime::from_timestamp(secs, 0).expect("in range"))
        .boxed()
}

/// One event of any catalog type. A `key_issued` gets a placeholder hash;
/// [`steps`] makes every issued hash distinct.
fn event() -> BoxedStrategy<Event> {
    let arms: Vec<BoxedStrategy<Event>> = vec![
        (pick(CONVERSATIONS), pick(KEYS), maybe(USERS))
            .prop_map(|(conversation_id, key_id, user)| {
                Event::ConversationStarted(ConversationStarted {
                    conversation_id,
                    key_id,
                    user,
                })
            })
            .boxed(),
        (
            pick(CONVERSATIONS),
            pick(MESSAGE_IDS),
            pick(KEYS),
            maybe(USERS),
            text(),
            maybe(AGENTS),
        )
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
        (
            pick(CONVERSATIONS),
            pick(MESSAGE_IDS),
            pick(AGENTS),
            prop::option::of("[a-z|()]{1,12}"),
        )
            .prop_map(|(conversation_id, message_id, agent, rule)| {
                Event::AgentRouted(AgentRouted {
                    conversation_id,
                    message_id,
                    agent,
                    rule,
                })
            })
            .boxed(),
        (
            pick(CONVERSATIONS),
            pick(MESSAGE_IDS),
            "r[0-9]{1,3}",
            pick(AGENTS),
            text(),
            pick(&["stop", "length"]),
            0u64..100_000,
        )
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
        (
            pick(CONVERSATIONS),
            pick(MESSAGE_IDS),
            pick(AGENTS),
            pick(&["unavailable", "timeout", "internal"]),
            text(),
        )
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
        (pick(CONVERSATIONS), pick(&["admin", "k0", "k1"]))
            .prop_map(|(conversation_id, by)| {
                Event::ConversationErased(ConversationErased {
                    conversation_id,
                    by,
                })
            })
            .boxed(),
        (
            (
                pick(CONVERSATIONS),
                pick(MESSAGE_IDS),
                pick(KEYS),
                maybe(USERS),
                pick(AGENTS),
                pick(MODELS),
            ),
            (
                0u64..2_000_000,
                0u64..2_000_000,
                any::<bool>(),
                0u64..50_000_000,
                0u64..50_000_000,
                0u64..1_000_000_000,
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
        (
            scope_and_subject(),
            period(),
            timestamp(),
            0u32..=100,
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(
                |(
                    (scope, subject_id),
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
        (scope_and_subject(), period(), any::<u64>(), any::<u64>())
            .prop_map(
                |((scope, subject_id), period, spent_micros, budget_micros)| {
                    Event::BudgetExceeded(BudgetExceeded {
                        scope,
                        subject_id,
                        period,
                        spent_micros,
                        budget_micros,
                    })
                },
            )
            .boxed(),
        (
            pick(KEYS),
            text(),
            maybe(USERS),
            prop::sample::subsequence(vec![Scope::Chat, Scope::Admin], 0..=2),
            limits(),
            budget(),
            prop::option::of(timestamp()),
        )
            .prop_map(
                |(key_id, name, owner, scopes, limits, budget, expires_at)| {
                    Event::KeyIssued(KeyIssued {
                        key_id,
                        name,
                        owner,
                        key_hash: KeyHash([0; 32]),
                        scopes,
                        limits,
                        budget,
                        expires_at,
                    })
                },
            )
            .boxed(),
        (pick(KEYS), prop::option::of(limits()), budget())
            .prop_map(|(key_id, limits, budget)| {
                Event::KeyUpdated(KeyUpdated {
                    key_id,
                    limits,
                    budget,
                })
            })
            .boxed(),
        (
            pick(KEYS),
            pick(&["admin", "ops"]),
            prop::option::of(text()),
        )
            .prop_map(|(key_id, by, reason)| Event::KeyRevoked(KeyRevoked { key_id, by, reason }))
            .boxed(),
        (
            prop_oneof![Just(AuthChannel::Nats), Just(AuthChannel::Http)],
            text(),
            prop::option::of("sb-[a-zA-Z0-9]{0,5}"),
            prop::option::of("[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}"),
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
        (
            pick(KEYS),
            prop_oneof![
                Just(LimitKind::Rpm),
                Just(LimitKind::Tpm),
                Just(LimitKind::Parallel)
            ],
            1u64..1000,
            0u64..120_000,
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
        (
            pick(&["admin", "ops"]),
            pick(&["keys.issue", "keys.revoke", "conversation.erase"]),
            pick(&["k0", "k1", "c0", "c3"]),
        )
            .prop_map(|(actor, action, target)| {
                Event::AdminAction(AdminAction {
                    actor,
                    action,
                    target,
                })
            })
            .boxed(),
    ];
    assert_eq!(arms.len(), EVENT_TYPES.len(), "one arm per catalog type");
    Union::new(arms).boxed()
}

/// One generated event and what to do after it.
#[derive(Debug, Clone)]
struct Step {
    event: Event,
    /// Close the current append after this event (an append is also closed
    /// whenever the next event belongs on another stream).
    end_append: bool,
    /// After closing the append, wait until the live fold has folded it.
    sync: bool,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec((event(), any::<bool>(), prop::bool::weighted(0.3)), 1..200).prop_map(
        |steps| {
            steps
                .into_iter()
                .enumerate()
                .map(|(i, (mut event, end_append, sync))| {
                    if let Event::KeyIssued(issued) = &mut event {
                        // Distinct per event: a hash never names two keys.
                        let mut hash = [0xa5; 32];
                        hash[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
                        issued.key_hash = KeyHash(hash);
                    }
                    Step {
                        event,
                        end_append,
                        sync,
                    }
                })
                .collect()
        },
    )
}

/// The steps as appends: (events on one stream, wait for them afterwards).
fn appends(steps: &[Step]) -> Vec<(Vec<Event>, bool)> {
    let mut out: Vec<(Vec<Event>, bool)> = Vec::new();
    let mut open = false;
    for step in steps {
        let joins = open
            && out
                .last()
                .is_some_and(|(events, _)| stream_of(&events[0]) == stream_of(&step.event));
        if joins {
            out.last_mut()
                .expect("an open append")
                .0
                .push(step.event.clone());
        } else {
            out.push((vec![step.event.clone()], false));
        }
        open = !step.end_append;
        if step.end_append {
            out.last_mut().expect("just pushed").1 = step.sync;
        }
    }
    out
}

/// Appends everything while the live fold runs, waiting for it at the sync
/// points, then stops it. Checks read-your-writes at every sync point.
async fn fold_live(
    log: &EventLog,
    projections: &Projections,
    appends: Vec<(Vec<Event>, bool)>,
) -> Result<(), TestCaseError> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let live = projections.clone();
    let task = tokio::spawn(async move {
        live.run_live(async {
            let _ = stopped.await;
        })
        .await
    });
    for (events, sync) in appends {
        let stream = stream_of(&events[0]);
        let appended = log
            .append(
                stream,
                ExpectedVersion::Any,
                events.into_iter().map(NewEvent::new).collect(),
            )
            .await
            .map_err(|e| TestCaseError::fail(format!("append: {e}")))?;
        prop_assert!(!appended.deduplicated);
        if sync {
            let seq = appended.last().seq;
            tokio::time::timeout(HANG_GUARD, projections.wait_for(seq))
                .await
                .map_err(|_| TestCaseError::fail(format!("live fold never reached seq {seq}")))?;
            for name in ProjectionName::ALL {
                let checkpoint = projections.checkpoint(name).expect("checkpoint");
                prop_assert!(
                    checkpoint >= seq,
                    "after wait_for({seq}) {name} is at {checkpoint}"
                );
            }
        }
    }
    let head = log.head();
    tokio::time::timeout(HANG_GUARD, projections.wait_for(head))
        .await
        .map_err(|_| TestCaseError::fail(format!("live fold never reached the head {head}")))?;
    let _ = stop.send(());
    task.await
        .map_err(|e| TestCaseError::fail(format!("live fold panicked: {e}")))?
        .map_err(|e| TestCaseError::fail(format!("live fold failed: {e}")))?;
    Ok(())
}

fn add_usage(totals: &mut CostTotals, usage: &UsageRecorded) {
    totals.requests += 1;
    totals.tokens_in += usage.prompt_tokens;
    totals.tokens_out += usage.completion_tokens;
    totals.cost_micros += usage.cost_micros;
    totals.estimated_requests += u64::from(usage.estimated);
}

fn rows(groups: BTreeMap<String, CostTotals>) -> Vec<CostRow> {
    groups
        .into_iter()
        .map(|(group, totals)| CostRow { group, totals })
        .collect()
}

/// The costs view against sums computed straight from the generated events
/// (and, for days, from the log's timestamps).
fn check_costs(
    projections: &Projections,
    steps: &[Step],
    envelopes: &[Envelope],
) -> Result<(), TestCaseError> {
    let mut by_key: BTreeMap<String, CostTotals> = BTreeMap::new();
    let mut by_user: BTreeMap<String, CostTotals> = BTreeMap::new();
    let mut by_model: BTreeMap<String, CostTotals> = BTreeMap::new();
    for step in steps {
        if let Event::UsageRecorded(usage) = &step.event {
            add_usage(by_key.entry(usage.key_id.clone()).or_default(), usage);
            add_usage(
                by_user
                    .entry(usage.user.clone().unwrap_or_default())
                    .or_default(),
                usage,
            );
            add_usage(by_model.entry(usage.model.clone()).or_default(), usage);
        }
    }
    let mut by_day: BTreeMap<String, CostTotals> = BTreeMap::new();
    for envelope in envelopes {
        if let Event::UsageRecorded(usage) = &envelope.event {
            add_usage(
                by_day
                    .entry(envelope.at.date_naive().to_string())
                    .or_default(),
                usage,
            );
        }
    }

    let costs = projections.costs();
    for key in KEYS {
        prop_assert_eq!(
            costs.key_totals(key).expect("key totals"),
            by_key.get(*key).copied().unwrap_or_default(),
            "key_totals({})",
            key
        );
    }
    let report = |by| costs.report(by, None, None).expect("cost report");
    prop_assert_eq!(report(CostGroup::Key), rows(by_key), "report by key");
    prop_assert_eq!(report(CostGroup::User), rows(by_user), "report by user");
    prop_assert_eq!(report(CostGroup::Model), rows(by_model), "report by model");
    prop_assert_eq!(report(CostGroup::Day), rows(by_day), "report by day");
    Ok(())
}

/// The audit trail: exactly the audit events, oldest first.
fn check_audit(projections: &Projections, envelopes: &[Envelope]) -> Result<(), TestCaseError> {
    let mut expected: Vec<Envelope> = envelopes
        .iter()
        .filter(|e| e.event.is_audit())
        .cloned()
        .collect();
    expected.sort_by_key(|e| (e.at, e.seq));
    let page = projections
        .audit()
        .query(&AuditQuery {
            limit: 100_000,
            ..AuditQuery::default()
        })
        .expect("audit query");
    prop_assert!(page.next_cursor.is_none());
    prop_assert_eq!(page.events, expected);
    Ok(())
}

/// History as DESIGN §4 describes it, computed from the log.
fn check_history(projections: &Projections, envelopes: &[Envelope]) -> Result<(), TestCaseError> {
    let mut summaries: BTreeMap<String, ConversationSummary> = BTreeMap::new();
    let mut messages: BTreeMap<String, Vec<HistoryMessage>> = BTreeMap::new();
    let mut of_key: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for envelope in envelopes {
        let (conversation, message) = match &envelope.event {
            Event::ConversationStarted(e) => {
                if !summaries.contains_key(&e.conversation_id) {
                    summaries.insert(
                        e.conversation_id.clone(),
                        ConversationSummary {
                            conversation_id: e.conversation_id.clone(),
                            key_id: e.key_id.clone(),
                            user: e.user.clone(),
                            started_at: envelope.at,
                            last_at: envelope.at,
                            messages: 0,
                            erased: false,
                        },
                    );
                    of_key
                        .entry(e.key_id.clone())
                        .or_default()
                        .insert(e.conversation_id.clone());
                }
                continue;
            }
            Event::MessageReceived(e) => (
                &e.conversation_id,
                HistoryMessage {
                    message_id: e.message_id.clone(),
                    role: Role::User,
                    content: e.content.clone(),
                    agent: e.agent.clone(),
                    at: envelope.at,
                    seq: envelope.seq,
                },
            ),
            Event::ReplyCompleted(e) => (
                &e.conversation_id,
                HistoryMessage {
                    message_id: e.message_id.clone(),
                    role: Role::Assistant,
                    content: e.content.clone(),
                    agent: Some(e.agent.clone()),
                    at: envelope.at,
                    seq: envelope.seq,
                },
            ),
            Event::ConversationErased(e) => {
                messages.remove(&e.conversation_id);
                if let Some(summary) = summaries.get_mut(&e.conversation_id) {
                    summary.erased = true;
                    summary.messages = 0;
                    summary.last_at = envelope.at;
                }
                continue;
            }
            _ => continue,
        };
        if let Some(summary) = summaries.get_mut(conversation) {
            summary.messages += 1;
            summary.last_at = envelope.at;
        }
        messages
            .entry(conversation.clone())
            .or_default()
            .push(message);
    }

    let history = projections.history();
    for conversation in CONVERSATIONS {
        let expected = summaries.get(*conversation).map(|summary| Conversation {
            summary: summary.clone(),
            messages: messages.get(*conversation).cloned().unwrap_or_default(),
        });
        let actual = history.conversation(conversation).expect("conversation");
        if let Some(actual) = &actual {
            // Erased content is gone, whatever else the summary says.
            if actual.summary.erased {
                let erased_at = envelopes
                    .iter()
                    .filter(|e| matches!(&e.event, Event::ConversationErased(x) if x.conversation_id == *conversation))
                    .map(|e| e.seq)
                    .max()
                    .expect("an erased conversation has an erasure");
                prop_assert!(actual.messages.iter().all(|m| m.seq > erased_at));
            }
        }
        // The same messages read in pages, forwards and backwards.
        if let Some(expected) = &expected {
            let first = history
                .page(conversation, PageFrom::After(0), 1, |_| true)
                .expect("a page")
                .expect("started");
            prop_assert_eq!(&first.summary, &expected.summary);
            for limit in [1, 2, 5] {
                for from in [PageFrom::After(0), PageFrom::Before(u64::MAX)] {
                    let (messages, largest) = read_in_pages(&history, conversation, from, limit);
                    prop_assert!(largest <= limit);
                    prop_assert_eq!(&messages, &expected.messages, "{:?} by {}", from, limit);
                }
            }
        } else {
            prop_assert_eq!(
                history
                    .page(conversation, PageFrom::After(0), 5, |_| true)
                    .expect("a page"),
                None
            );
        }
        prop_assert_eq!(actual, expected, "conversation {}", conversation);
    }
    for key in KEYS {
        let expected: Vec<ConversationSummary> = of_key
            .get(*key)
            .into_iter()
            .flatten()
            .map(|c| summaries[c].clone())
            .collect();
        prop_assert_eq!(
            &history
                .conversations_of_key(key, None, 100)
                .expect("of key"),
            &expected
        );
        // The same in pages of two.
        let mut paged = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = history
                .conversations_of_key(key, after.as_deref(), 2)
                .expect("a page of conversations");
            if page.is_empty() {
                break;
            }
            after = Some(page.last().expect("non-empty").conversation_id.clone());
            paged.extend(page);
        }
        prop_assert_eq!(&paged, &expected);
    }
    Ok(())
}

/// Keys: the latest issue of each key id, updated after it; a revocation stands
/// even when the id is issued again.
fn check_keys(projections: &Projections, envelopes: &[Envelope]) -> Result<(), TestCaseError> {
    let mut records: BTreeMap<String, KeyRecord> = BTreeMap::new();
    for envelope in envelopes {
        match &envelope.event {
            Event::KeyIssued(e) => {
                let revoked = records.get(&e.key_id).and_then(|r| r.revoked.clone());
                records.insert(
                    e.key_id.clone(),
                    KeyRecord {
                        key_id: e.key_id.clone(),
                        name: e.name.clone(),
                        owner: e.owner.clone(),
                        key_hash: e.key_hash,
                        scopes: e.scopes.clone(),
                        limits: e.limits.clone(),
                        budget: e.budget.clone(),
                        issued_at: envelope.at,
                        expires_at: e.expires_at,
                        revoked,
                    },
                );
            }
            Event::KeyUpdated(e) => {
                if let Some(record) = records.get_mut(&e.key_id) {
                    if let Some(limits) = &e.limits {
                        record.limits = limits.clone();
                    }
                    if let Some(budget) = &e.budget {
                        record.budget = Some(budget.clone());
                    }
                }
            }
            Event::KeyRevoked(e) => {
                if let Some(record) = records.get_mut(&e.key_id) {
                    if record.revoked.is_none() {
                        record.revoked = Some(Revocation {
                            at: envelope.at,
                            by: e.by.clone(),
                            reason: e.reason.clone(),
                        });
                    }
                }
            }
            _ => {}
        }
    }
    let keys = projections.keys();
    prop_assert_eq!(
        keys.list().expect("list keys"),
        records.values().cloned().collect::<Vec<_>>()
    );
    for key in KEYS {
        prop_assert_eq!(keys.get(key).expect("get key"), records.get(*key).cloned());
    }
    for record in records.values() {
        prop_assert_eq!(
            keys.by_hash(&record.key_hash).expect("by hash"),
            Some(record.clone())
        );
    }
    prop_assert_eq!(keys.by_hash(&KeyHash([0x5a; 32])).expect("by hash"), None);
    Ok(())
}

fn live_fold_equals_replay(
    steps: Vec<Step>,
    restart: Option<prop::sample::Index>,
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("temporary dir");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut appends = appends(&steps);

    // (a) fold live while the log grows — optionally stopping part way, closing
    // everything and resuming in a new session, as after a restart.
    if let Some(restart) = restart {
        let later = appends.split_off(restart.index(appends.len() + 1));
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open the log");
        let projections = Projections::open(&log).expect("open the projections");
        runtime.block_on(fold_live(&log, &projections, appends))?;
        appends = later;
    }
    let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open the log");
    let projections = Projections::open(&log).expect("open the projections");
    runtime.block_on(fold_live(&log, &projections, appends))?;
    let head = log.head();
    prop_assert_eq!(head, steps.len() as u64);
    for name in ProjectionName::ALL {
        prop_assert_eq!(projections.checkpoint(name).expect("checkpoint"), head);
    }

    // (b) every row of every view, as folded live.
    let live = dump(&log);
    prop_assert!(live.values().all(|rows| !rows.is_empty()));
    let live_messages = logical_dump(&log);

    // (d) the live views are what the log gives, and verifying changes nothing.
    let differences = projections.verify(&mut |_| {}).expect("verify");
    prop_assert!(differences.is_empty(), "verify found {:?}", differences);
    assert_dumps_equal(&live, &dump(&log), "verify changed the live views");

    // (e) and the read API answers what the events say.
    let envelopes: Vec<Envelope> = log
        .read_from(1)
        .collect::<Result<_, _>>()
        .expect("read the log");
    check_costs(&projections, &steps, &envelopes)?;
    check_audit(&projections, &envelopes)?;
    check_history(&projections, &envelopes)?;
    check_keys(&projections, &envelopes)?;

    // (c) a rebuild from seq 1 gives the same rows.
    prop_assert_eq!(projections.replay(None, &mut |_| {}).expect("replay"), head);
    assert_dumps_equal(
        &live_messages,
        &logical_dump(&log),
        "replay differs from the live fold",
    );
    let differences = projections.verify(&mut |_| {}).expect("verify");
    prop_assert!(
        differences.is_empty(),
        "verify after replay found {:?}",
        differences
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        failure_persistence: None,
        max_shrink_iters: 512,
        ..ProptestConfig::default()
    })]

    #[test]
    fn live_fold_equals_replay_and_sums_match(
        steps in steps(),
        restart in prop::option::of(any::<prop::sample::Index>()),
    ) {
        live_fold_equals_replay(steps, restart)?;
    }
}

/// The generator reaches every catalog type (so the property above covers them).
#[test]
fn generator_covers_every_event_type() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let steps = steps()
            .new_tree(&mut runner)
            .expect("generate steps")
            .current();
        seen.extend(steps.iter().map(|s| s.event.type_name()));
    }
    let all: BTreeSet<&str> = EVENT_TYPES.iter().copied().collect();
    assert_eq!(seen, all);
}
