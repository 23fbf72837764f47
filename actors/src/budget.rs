//! Budgets per API key and per user (a keys' owner): admission against what
//! was spent in the budget's period, threshold alerts, and refusals.
//!
//! # Where spend comes from
//!
//! Never from a cache refreshed on a timer. What a spender spent is the
//! [`SpendIndex`] — an in-memory fold of every `usage_recorded` in the log,
//! exact through a seq — plus the charges of turns that ended after that seq
//! (a turn reports its `usage_recorded`'s seq and cost right after the append,
//! [`Budgets::charge`]), each counted once: a charge the index has folded is
//! dropped from the pending ones. Each check first brings the index up to the
//! log's durable head ([`SpendIndex::catch_up`]), so it counts every
//! `usage_recorded` stored before it, whether or not the turn has reported
//! it yet — among them every one the outbox has published.
//!
//! # The overspend bound
//!
//! A request is admitted while the spender's spend is below the budget; a
//! turn's cost is known only when it ends. So the spend can pass the budget by
//! at most the cost of the turns admitted and still running when it reached
//! it: with `max_parallel = P` on the key, at most P turns (the one that
//! crossed and P − 1 others), each at most its model's price times its tokens.
//! A turn already running when the budget runs out completes and is charged;
//! the next request is refused with `budget_exceeded` until the period rolls
//! over (UTC midnight for `day`, the 1st for `month`, never for `total`) or the
//! budget is raised.
//!
//! # Alerts, exactly once
//!
//! Reaching each threshold (default 50, 80 and 100 %) appends one
//! `budget_threshold_crossed`, and the first refusal one `budget_exceeded`,
//! per spender, period and budget amount: a raised budget is a new one whose
//! thresholds are alerted again as the spend reaches them. Their event ids
//! are derived from exactly that (a UUID v5), so an alert appended twice — by
//! a retry, or by the check every start makes of every budget — is stored
//! once. The outbox publishes them on `<prefix>.alert.budget.<key_id>` (and
//! `….alert.budget.user.<user>`) from the log, so they outlive a crash too.
//! Key alerts go on the key's stream `key/<key_id>`, user alerts on `system`.
//! Alerts are appended in order, by one task, beside the request that caused
//! them: admission never waits for them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Datelike, Days, Months, NaiveDate, TimeZone, Utc};
use switchboard_events::catalog::{
    Budget, BudgetExceeded, BudgetPeriod, BudgetScope, BudgetThresholdCrossed,
};
use switchboard_events::{Event, EventLog, ExpectedVersion, NewEvent, StreamId};
use switchboard_projections::{SpendIndex, Spender};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// The thresholds alerted when none are configured, in percent of the budget.
pub const DEFAULT_THRESHOLDS: [u32; 3] = [50, 80, 100];

/// Settings of [`Budgets`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetConfig {
    /// Percentages of a budget whose crossing is alerted, each 1-100.
    pub thresholds: Vec<u32>,
    /// Budgets of users (keys' owners), by user.
    pub users: HashMap<String, Budget>,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            thresholds: DEFAULT_THRESHOLDS.to_vec(),
            users: HashMap::new(),
        }
    }
}

impl BudgetConfig {
    /// Checks the thresholds (1-100, sorted and deduplicated here).
    pub fn validated(mut self) -> Result<Self, String> {
        if let Some(bad) = self.thresholds.iter().find(|t| !(1..=100).contains(*t)) {
            return Err(format!(
                "a budget threshold is a percentage from 1 to 100, not {bad}"
            ));
        }
        self.thresholds.sort_unstable();
        self.thresholds.dedup();
        Ok(self)
    }
}

/// A request refused because a budget is spent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetRefused {
    pub scope: BudgetScope,
    pub subject_id: String,
    pub period: BudgetPeriod,
    pub spent_micros: u64,
    pub budget_micros: u64,
    /// Until the period rolls over; `None` for a `total` budget.
    pub retry_after: Option<Duration>,
}

impl fmt::Display for BudgetRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the {} budget of {} {} is spent ({} of {} micro-USD)",
            self.period.as_str(),
            self.scope.as_str(),
            self.subject_id,
            self.spent_micros,
            self.budget_micros
        )?;
        if self.retry_after.is_some() {
            write!(f, " until the period rolls over")?;
        }
        Ok(())
    }
}

impl std::error::Error for BudgetRefused {}

/// Where a budget stands, for `/v1/usage` and the metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BudgetStatus {
    pub scope: BudgetScope,
    pub subject_id: String,
    pub period: BudgetPeriod,
    #[serde(with = "switchboard_events::time::serde_at")]
    pub period_start: DateTime<Utc>,
    pub budget_micros: u64,
    pub spent_micros: u64,
    pub remaining_micros: u64,
}

/// The budgets of every key and user; cheap to clone.
#[derive(Clone)]
pub struct Budgets {
    inner: Arc<Inner>,
}

struct Inner {
    index: SpendIndex,
    /// The log the index folds, for [`SpendIndex::catch_up`] before a check.
    log: EventLog,
    config: BudgetConfig,
    ledgers: Mutex<HashMap<Spender, Ledger>>,
    alerts: Mutex<Option<mpsc::UnboundedSender<(StreamId, NewEvent)>>>,
    appender: Mutex<Option<JoinHandle<()>>>,
}

/// What this process knows of one spender beyond the index.
#[derive(Default)]
struct Ledger {
    /// The budget last checked against (a key's can change with `key_updated`).
    budget: Option<Budget>,
    /// Charges of ended turns, by seq, that the index may not have folded yet.
    pending: BTreeMap<u64, (u64, DateTime<Utc>)>,
    /// Alerts already queued: (period start, budget, threshold or [`EXCEEDED`]).
    alerted: HashSet<(DateTime<Utc>, u64, u32)>,
}

/// The `alerted` entry of a `budget_exceeded`.
const EXCEEDED: u32 = 0;

/// Delay before retrying an alert the log refused, doubling to a minute.
const APPEND_RETRY: Duration = Duration::from_millis(100);

impl Budgets {
    /// Budgets over `index`, appending alerts to `log`. Call it inside a
    /// tokio runtime; call [`Budgets::shutdown`] before closing the log.
    pub fn new(log: EventLog, index: SpendIndex, config: BudgetConfig) -> Budgets {
        let (alerts, queued) = mpsc::unbounded_channel();
        let appender = tokio::spawn(append_alerts(log.clone(), queued));
        Budgets {
            inner: Arc::new(Inner {
                index,
                log,
                config,
                ledgers: Mutex::new(HashMap::new()),
                alerts: Mutex::new(Some(alerts)),
                appender: Mutex::new(Some(appender)),
            }),
        }
    }

    /// Admits a request of `key_id` (owned by `owner`, with the key's current
    /// `budget`), or refuses it because the key's or the owner's budget is
    /// spent. A refusal appends `budget_exceeded` (once per period and budget).
    pub fn admit(
        &self,
        key_id: &str,
        owner: Option<&str>,
        budget: Option<&Budget>,
    ) -> Result<(), BudgetRefused> {
        let budgets = self.budgets_of(key_id, owner, budget);
        if budgets.is_empty() {
            return Ok(());
        }
        self.inner.catch_up();
        let now = Utc::now();
        let mut ledgers = self.inner.lock();
        for (spender, budget) in budgets {
            let ledger = ledgers.entry(spender.clone()).or_default();
            ledger.budget = Some(budget.clone());
            let status = self.inner.review(&spender, ledger, &budget, now);
            if status.spent_micros >= budget.micros {
                let refused = BudgetRefused {
                    scope: spender.scope,
                    subject_id: spender.id.clone(),
                    period: budget.period,
                    spent_micros: status.spent_micros,
                    budget_micros: budget.micros,
                    retry_after: period_end(budget.period, now)
                        .and_then(|end| (end - now).to_std().ok()),
                };
                self.inner.alert_exceeded(ledger, &status);
                return Err(refused);
            }
        }
        Ok(())
    }

    /// Counts the cost of a turn of `key_id` whose `usage_recorded` is stored
    /// at `seq`, and appends the alerts of the thresholds it reaches.
    pub fn charge(&self, key_id: &str, seq: u64, cost_micros: u64) {
        let now = Utc::now();
        let owner = self.inner.index.owner(key_id);
        let mut ledgers = self.inner.lock();
        let spenders =
            std::iter::once(Spender::key(key_id)).chain(owner.map(|o| Spender::user(&o)));
        for spender in spenders {
            // A spender without a ledger was never checked against a budget
            // here, so this turn was admitted unchecked (the budget came
            // later): the index folds its cost within moments, and until
            // then it is one of the running turns the overspend bound allows.
            let Some(ledger) = ledgers.get_mut(&spender) else {
                continue;
            };
            ledger.pending.insert(seq, (cost_micros, now));
            if let Some(budget) = ledger.budget.clone() {
                self.inner.review(&spender, ledger, &budget, now);
            }
        }
    }

    /// Where the budgets of `key_id` and its owner stand.
    pub fn status(
        &self,
        key_id: &str,
        owner: Option<&str>,
        budget: Option<&Budget>,
    ) -> Vec<BudgetStatus> {
        let budgets = self.budgets_of(key_id, owner, budget);
        if !budgets.is_empty() {
            self.inner.catch_up();
        }
        let now = Utc::now();
        let mut ledgers = self.inner.lock();
        budgets
            .into_iter()
            .map(|(spender, budget)| {
                let ledger = ledgers.entry(spender.clone()).or_default();
                self.inner.status(&spender, ledger, &budget, now)
            })
            .collect()
    }

    /// Checks every given budget against the spend (appending the alerts of
    /// thresholds reached but not stored, as after a crash between a turn's
    /// usage and its alert): `keys` are (key id, owner, budget).
    pub fn review_all<'a>(
        &self,
        keys: impl IntoIterator<Item = (&'a str, Option<&'a str>, Option<&'a Budget>)>,
    ) {
        let now = Utc::now();
        let mut ledgers = self.inner.lock();
        let mut seen = HashSet::new();
        for (key_id, owner, budget) in keys {
            for (spender, budget) in self.budgets_of(key_id, owner, budget) {
                if !seen.insert(spender.clone()) {
                    continue;
                }
                let ledger = ledgers.entry(spender.clone()).or_default();
                ledger.budget = Some(budget.clone());
                self.inner.review(&spender, ledger, &budget, now);
            }
        }
    }

    /// Where every budget stands at `now`, for the metrics: the budget of
    /// each key in `keys` (the active keys: id and budget, as the keys view
    /// has them now), and each user budget checked here. A key not in `keys`
    /// (revoked or expired) or without a budget there shows nothing; a key
    /// never checked here shows its whole budget. Changes nothing but the
    /// trimming of charges the index has folded. Appends nothing.
    pub fn statuses<'a>(
        &self,
        keys: impl IntoIterator<Item = (&'a str, Option<&'a Budget>)>,
        now: DateTime<Utc>,
    ) -> Vec<BudgetStatus> {
        self.inner.catch_up();
        let mut ledgers = self.inner.lock();
        let mut statuses = Vec::new();
        for (key_id, budget) in keys {
            let Some(budget) = budget else { continue };
            let spender = Spender::key(key_id);
            let mut unchecked = Ledger::default();
            let ledger = ledgers.get_mut(&spender).unwrap_or(&mut unchecked);
            statuses.push(self.inner.status(&spender, ledger, budget, now));
        }
        for (spender, ledger) in ledgers.iter_mut() {
            if let (BudgetScope::User, Some(budget)) = (spender.scope, ledger.budget.clone()) {
                statuses.push(self.inner.status(spender, ledger, &budget, now));
            }
        }
        statuses
    }

    /// Stores the alerts still queued and stops the task appending them.
    pub async fn shutdown(&self) {
        drop(self.inner.alerts.lock().expect("alerts lock").take());
        let appender = self.inner.appender.lock().expect("appender lock").take();
        if let Some(appender) = appender {
            let _ = appender.await;
        }
    }

    fn budgets_of(
        &self,
        key_id: &str,
        owner: Option<&str>,
        budget: Option<&Budget>,
    ) -> Vec<(Spender, Budget)> {
        let mut budgets = Vec::new();
        if let Some(budget) = budget {
            budgets.push((Spender::key(key_id), budget.clone()));
        }
        if let Some((owner, budget)) =
            owner.and_then(|owner| Some((owner, self.inner.config.users.get(owner)?)))
        {
            budgets.push((Spender::user(owner), budget.clone()));
        }
        budgets
    }
}

impl Inner {
    /// Brings the index up to the durable head, so a check counts every
    /// charge stored before it: a client that saw a turn's `usage_recorded`
    /// published and sends again is checked against it. A read error leaves
    /// the index where it stands (its follower reports it); the check then
    /// counts what the index and this process's charges hold.
    fn catch_up(&self) {
        if let Err(error) = self.index.catch_up(&self.log) {
            tracing::warn!(%error, "the spend index could not catch up with the log for a budget check");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Spender, Ledger>> {
        self.ledgers.lock().expect("budget ledgers lock")
    }

    /// What `spender` spent in `budget`'s current period: the index plus the
    /// charges after it.
    fn status(
        &self,
        spender: &Spender,
        ledger: &mut Ledger,
        budget: &Budget,
        now: DateTime<Utc>,
    ) -> BudgetStatus {
        let start = period_start(budget.period, now);
        let since = match budget.period {
            BudgetPeriod::Total => None,
            BudgetPeriod::Day | BudgetPeriod::Month => Some(start.date_naive()),
        };
        let indexed = self.index.spent(spender, since);
        if ledger
            .pending
            .first_key_value()
            .is_some_and(|(seq, _)| *seq <= indexed.through)
        {
            ledger.pending = ledger.pending.split_off(&(indexed.through + 1));
        }
        let pending: u64 = ledger
            .pending
            .values()
            .filter(|(_, at)| *at >= start)
            .map(|(micros, _)| micros)
            .sum();
        let spent = indexed.micros.saturating_add(pending);
        let remaining = budget.micros.saturating_sub(spent);
        BudgetStatus {
            scope: spender.scope,
            subject_id: spender.id.clone(),
            period: budget.period,
            period_start: start,
            budget_micros: budget.micros,
            spent_micros: spent,
            remaining_micros: remaining,
        }
    }

    /// The spender's status, after queueing the alerts of the thresholds it
    /// has reached.
    fn review(
        &self,
        spender: &Spender,
        ledger: &mut Ledger,
        budget: &Budget,
        now: DateTime<Utc>,
    ) -> BudgetStatus {
        let status = self.status(spender, ledger, budget, now);
        ledger
            .alerted
            .retain(|(start, _, _)| *start == status.period_start);
        for &pct in &self.config.thresholds {
            let threshold = u128::from(budget.micros) * u128::from(pct);
            if u128::from(status.spent_micros) * 100 < threshold {
                break;
            }
            self.alert_once(ledger, &status, pct, || {
                Event::BudgetThresholdCrossed(BudgetThresholdCrossed {
                    scope: spender.scope,
                    subject_id: spender.id.clone(),
                    period: budget.period,
                    period_start: status.period_start,
                    threshold_pct: pct,
                    spent_micros: status.spent_micros,
                    budget_micros: budget.micros,
                })
            });
        }
        status
    }

    fn alert_exceeded(&self, ledger: &mut Ledger, status: &BudgetStatus) {
        self.alert_once(ledger, status, EXCEEDED, || {
            Event::BudgetExceeded(BudgetExceeded {
                scope: status.scope,
                subject_id: status.subject_id.clone(),
                period: status.period,
                spent_micros: status.spent_micros,
                budget_micros: status.budget_micros,
            })
        });
    }

    /// Queues alert `which` (a threshold, or [`EXCEEDED`]) of `status`'s
    /// spender, period and budget, unless this process queued it already.
    fn alert_once(
        &self,
        ledger: &mut Ledger,
        status: &BudgetStatus,
        which: u32,
        event: impl FnOnce() -> Event,
    ) {
        if !ledger
            .alerted
            .insert((status.period_start, status.budget_micros, which))
        {
            return;
        }
        let spender = Spender {
            scope: status.scope,
            id: status.subject_id.clone(),
        };
        let stream = match spender.scope {
            BudgetScope::Key => StreamId::key(&spender.id).unwrap_or_else(|_| StreamId::system()),
            BudgetScope::User => StreamId::system(),
        };
        let id = alert_id(&spender, status, which);
        let sender = self.alerts.lock().expect("alerts lock");
        let queued = sender.as_ref().is_some_and(|alerts| {
            alerts
                .send((stream, NewEvent::with_id(id, event())))
                .is_ok()
        });
        if !queued {
            tracing::warn!(scope = ?spender.scope, subject = %spender.id, which,
                "a budget alert was not queued (shutting down); the next start stores it");
        }
    }
}

/// The id of an alert: the same for the same spender, period, budget and
/// threshold, so the log stores it once however often it is appended.
fn alert_id(spender: &Spender, status: &BudgetStatus, which: u32) -> Uuid {
    let name = format!(
        "switchboard:budget:{}:{}:{}:{}:{}:{which}",
        spender.scope.as_str(),
        spender.id,
        status.period.as_str(),
        status.period_start.timestamp(),
        status.budget_micros,
    );
    Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes())
}

/// Appends queued alerts in order, retrying one the log refuses (with a
/// growing delay) until it is stored or the queue closes.
async fn append_alerts(log: EventLog, mut queued: mpsc::UnboundedReceiver<(StreamId, NewEvent)>) {
    while let Some((stream, event)) = queued.recv().await {
        let mut wait = APPEND_RETRY;
        loop {
            match log
                .append(stream.clone(), ExpectedVersion::Any, vec![event.clone()])
                .await
            {
                Ok(_) => break,
                Err(error) if queued.is_closed() => {
                    tracing::error!(%error, "a budget alert was not stored; the next start stores it");
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, "storing a budget alert failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(60));
                }
            }
        }
    }
}

/// When the period containing `now` began: UTC midnight, the 1st of the
/// month, or the Unix epoch for `total`.
pub fn period_start(period: BudgetPeriod, now: DateTime<Utc>) -> DateTime<Utc> {
    let day = now.date_naive();
    let first = match period {
        BudgetPeriod::Day => day,
        BudgetPeriod::Month => day.with_day(1).unwrap_or(day),
        BudgetPeriod::Total => return DateTime::UNIX_EPOCH,
    };
    midnight(first)
}

/// When the period containing `now` ends (the next one begins); `None` for
/// `total`.
pub fn period_end(period: BudgetPeriod, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let start = period_start(period, now).date_naive();
    let next = match period {
        BudgetPeriod::Day => start.checked_add_days(Days::new(1)),
        BudgetPeriod::Month => start.checked_add_months(Months::new(1)),
        BudgetPeriod::Total => None,
    }?;
    Some(midnight(next))
}

fn midnight(day: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&day.and_time(chrono::NaiveTime::MIN))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().expect("RFC 3339")
    }

    #[test]
    fn periods_start_and_end_at_utc_midnight() {
        let now = at("2026-02-28T23:59:59.5Z");
        assert_eq!(
            period_start(BudgetPeriod::Day, now),
            at("2026-02-28T00:00:00Z")
        );
        assert_eq!(
            period_end(BudgetPeriod::Day, now),
            Some(at("2026-03-01T00:00:00Z"))
        );
        assert_eq!(
            period_start(BudgetPeriod::Month, now),
            at("2026-02-01T00:00:00Z")
        );
        assert_eq!(
            period_end(BudgetPeriod::Month, now),
            Some(at("2026-03-01T00:00:00Z"))
        );
        let december = at("2026-12-31T12:00:00Z");
        assert_eq!(
            period_end(BudgetPeriod::Month, december),
            Some(at("2027-01-01T00:00:00Z"))
        );
        assert_eq!(period_start(BudgetPeriod::Total, now), DateTime::UNIX_EPOCH);
        assert_eq!(period_end(BudgetPeriod::Total, now), None);
    }

    #[test]
    fn an_alert_id_names_its_spender_period_budget_and_threshold() {
        let status = |budget_micros, start: &str| BudgetStatus {
            scope: BudgetScope::Key,
            subject_id: "key_1".into(),
            period: BudgetPeriod::Day,
            period_start: at(start),
            budget_micros,
            spent_micros: 7,
            remaining_micros: 0,
        };
        let key = Spender::key("key_1");
        let first = alert_id(&key, &status(100, "2026-01-01T00:00:00Z"), 50);
        // The spend at the time is no part of it: a repeat is the same alert.
        let mut repeat = status(100, "2026-01-01T00:00:00Z");
        repeat.spent_micros = 90;
        assert_eq!(alert_id(&key, &repeat, 50), first);
        for other in [
            alert_id(&key, &status(100, "2026-01-01T00:00:00Z"), 80),
            alert_id(&key, &status(200, "2026-01-01T00:00:00Z"), 50),
            alert_id(&key, &status(100, "2026-01-02T00:00:00Z"), 50),
            alert_id(
                &Spender::user("key_1"),
                &status(100, "2026-01-01T00:00:00Z"),
                50,
            ),
            alert_id(&key, &status(100, "2026-01-01T00:00:00Z"), EXCEEDED),
        ] {
            assert_ne!(other, first);
        }
    }

    #[test]
    fn thresholds_are_percentages() {
        let config = |thresholds: Vec<u32>| BudgetConfig {
            thresholds,
            users: HashMap::new(),
        };
        assert_eq!(
            config(vec![100, 50, 80, 50])
                .validated()
                .map(|c| c.thresholds),
            Ok(vec![50, 80, 100])
        );
        assert!(config(vec![0]).validated().is_err());
        assert!(config(vec![150]).validated().is_err());
    }

    /// A turn's `usage_recorded` of key `key_1` in conversation `c1`.
    fn usage(cost_micros: u64) -> NewEvent {
        NewEvent::new(Event::UsageRecorded(
            switchboard_events::catalog::UsageRecorded {
                conversation_id: "c1".into(),
                message_id: "m1".into(),
                key_id: "key_1".into(),
                user: None,
                agent: "echo".into(),
                model: "echo".into(),
                prompt_tokens: 1,
                completion_tokens: 1,
                estimated: false,
                input_price: 0,
                output_price: 0,
                cost_micros,
            },
        ))
    }

    /// Budgets over a fresh log and an index no follower folds into, and a
    /// day budget of 100 micro-USD that admits `key_1` so far.
    struct Fixture {
        _dir: tempfile::TempDir,
        log: EventLog,
        index: SpendIndex,
        budgets: Budgets,
        budget: Budget,
    }

    fn fixture() -> Fixture {
        use switchboard_events::OpenMode;
        use switchboard_projections::Projections;

        let dir = tempfile::tempdir().expect("temp dir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("opens");
        let projections = Projections::open(&log).expect("opens");
        let index = SpendIndex::load(&projections).expect("loads");
        let budgets = Budgets::new(log.clone(), index.clone(), BudgetConfig::default());
        let budget = Budget {
            micros: 100,
            period: BudgetPeriod::Day,
        };
        assert_eq!(budgets.admit("key_1", None, Some(&budget)), Ok(()));
        Fixture {
            _dir: dir,
            log,
            index,
            budgets,
            budget,
        }
    }

    #[tokio::test]
    async fn a_charge_counts_once_whether_or_not_the_index_has_folded_it() {
        let Fixture {
            _dir,
            log,
            index,
            budgets,
            budget,
        } = fixture();

        let stream = StreamId::conversation("c1").expect("valid");
        let seq = log
            .append(stream.clone(), ExpectedVersion::Any, vec![usage(60)])
            .await
            .expect("appends")
            .first()
            .seq;
        // Charged, and folded by the index when the check catches it up
        // with the log: counted once.
        budgets.charge("key_1", seq, 60);
        let spent =
            |budgets: &Budgets| budgets.status("key_1", None, Some(&budget))[0].spent_micros;
        assert_eq!(spent(&budgets), 60);
        // Folded again: skipped, still counted once.
        for envelope in log.read_from(1) {
            index.apply(&envelope.expect("decodes"));
        }
        assert_eq!(spent(&budgets), 60);
        // A late charge the index already holds changes nothing.
        budgets.charge("key_1", seq, 60);
        assert_eq!(spent(&budgets), 60);

        let seq = log
            .append(stream, ExpectedVersion::Any, vec![usage(40)])
            .await
            .expect("appends")
            .first()
            .seq;
        budgets.charge("key_1", seq, 40);
        let refused = budgets
            .admit("key_1", None, Some(&budget))
            .expect_err("the budget is spent");
        assert_eq!((refused.spent_micros, refused.budget_micros), (100, 100));
        assert!(refused.retry_after.is_some());
        budgets.shutdown().await;

        // 50 %, 100 % and the refusal, each stored once, in order.
        let alerts: Vec<(String, Option<u32>)> = log
            .read_from(1)
            .map(|envelope| envelope.expect("decodes").event)
            .filter_map(|event| match event {
                Event::BudgetThresholdCrossed(e) => Some(("crossed".into(), Some(e.threshold_pct))),
                Event::BudgetExceeded(_) => Some(("exceeded".into(), None)),
                _ => None,
            })
            .collect();
        assert_eq!(
            alerts,
            vec![
                ("crossed".into(), Some(50)),
                ("crossed".into(), Some(80)),
                ("crossed".into(), Some(100)),
                ("exceeded".into(), None),
            ]
        );
    }

    #[tokio::test]
    async fn statuses_show_a_new_period_without_a_request() {
        let Fixture {
            _dir,
            log,
            budgets,
            budget,
            ..
        } = fixture();
        let stream = StreamId::conversation("c1").expect("valid");
        let seq = log
            .append(stream, ExpectedVersion::Any, vec![usage(60)])
            .await
            .expect("appends")
            .first()
            .seq;
        budgets.charge("key_1", seq, 60);
        let remaining = |now| {
            let statuses = budgets.statuses([("key_1", Some(&budget))], now);
            assert_eq!(statuses.len(), 1, "{statuses:?}");
            (statuses[0].remaining_micros, statuses[0].period_start)
        };
        let now = Utc::now();
        assert_eq!(remaining(now), (40, period_start(BudgetPeriod::Day, now)));
        // A day later, with no request since: the whole budget again.
        let tomorrow = now + chrono::TimeDelta::days(1);
        assert_eq!(
            remaining(tomorrow),
            (100, period_start(BudgetPeriod::Day, tomorrow))
        );
        budgets.shutdown().await;
    }

    #[tokio::test]
    async fn statuses_follow_the_active_keys_and_their_budgets() {
        let Fixture {
            _dir,
            budgets,
            budget,
            ..
        } = fixture();
        let now = Utc::now();
        let shown = |statuses: Vec<BudgetStatus>| -> Vec<(String, u64)> {
            statuses
                .into_iter()
                .map(|status| (status.subject_id, status.budget_micros))
                .collect()
        };
        assert_eq!(
            shown(budgets.statuses([("key_1", Some(&budget))], now)),
            vec![("key_1".to_owned(), 100)]
        );
        // A key never checked here shows at once; a changed budget too.
        let raised = Budget {
            micros: 250,
            ..budget.clone()
        };
        let mut both =
            shown(budgets.statuses([("key_1", Some(&raised)), ("key_2", Some(&budget))], now));
        both.sort();
        assert_eq!(
            both,
            vec![("key_1".to_owned(), 250), ("key_2".to_owned(), 100)]
        );
        // key_1 revoked (no longer active), key_2 without a budget: gone.
        assert_eq!(shown(budgets.statuses([("key_2", None)], now)), vec![]);
        assert_eq!(shown(budgets.statuses([], now)), vec![]);
        budgets.shutdown().await;
    }

    #[tokio::test]
    async fn a_check_counts_a_durable_charge_that_nothing_has_reported_yet() {
        // No follower folds the log into the index, and no turn charges.
        let Fixture {
            _dir,
            log,
            budgets,
            budget,
            ..
        } = fixture();
        // A turn's usage is stored (and so may be published) before the
        // turn reports its charge.
        let stream = StreamId::conversation("c1").expect("valid");
        log.append(stream, ExpectedVersion::Any, vec![usage(100)])
            .await
            .expect("appends");
        let refused = budgets
            .admit("key_1", None, Some(&budget))
            .expect_err("the stored charge spends the budget");
        assert_eq!((refused.spent_micros, refused.budget_micros), (100, 100));
        budgets.shutdown().await;
    }
}
