//! spend: micro-USD spent per API key and per user, by UTC day, held in
//! memory for budget checks — an exact fold of `usage_recorded`, never a
//! cache refreshed on a timer.
//!
//! A user here is a key's owner (`key_issued.owner`): a user's spend is what
//! all the keys they own spent, whatever `user` a request named (that field is
//! the caller's end user, which a key holder chooses).
//!
//! [`SpendIndex::load`] starts from the committed costs and keys views, so it
//! must be called while nothing folds them (after [`Projections::catch_up`],
//! before [`Projections::run_live`]); it then stands exactly at their
//! checkpoint. [`SpendIndex::follow`] tails the log from there, folding each
//! event as soon as it is durable, and [`SpendIndex::catch_up`] folds what is
//! durable and not yet folded on the spot, for a check that must see it.
//! Every answer says which seq it is exact through, so a caller that knows
//! of later charges can add exactly those.
//!
//! Memory: per key and per user, the all-time total and the last
//! [`DAYS_KEPT`] days (enough for the longest period, a month).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, RwLock};

use chrono::{Days, NaiveDate, Utc};
use switchboard_events::catalog::BudgetScope;
use switchboard_events::{Envelope, Event, EventLog, ReadError};

use crate::view::ProjectionError;
use crate::{ProjectionName, Projections};

/// Days of per-day spend kept before today (a month and then some).
pub const DAYS_KEPT: u64 = 62;

/// Who a budget is for: a key (by id) or a user (a keys' owner).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Spender {
    pub scope: BudgetScope,
    pub id: String,
}

impl Spender {
    pub fn key(key_id: &str) -> Self {
        Spender {
            scope: BudgetScope::Key,
            id: key_id.to_owned(),
        }
    }

    pub fn user(user: &str) -> Self {
        Spender {
            scope: BudgetScope::User,
            id: user.to_owned(),
        }
    }
}

/// What a spender spent, as of a seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spent {
    pub micros: u64,
    /// The last seq folded: every `usage_recorded` up to it is counted, none after.
    pub through: u64,
}

/// Spend per key and per user, shared by its clones.
#[derive(Clone, Default)]
pub struct SpendIndex {
    state: Arc<RwLock<State>>,
}

#[derive(Default)]
struct State {
    through: u64,
    owners: HashMap<String, String>,
    spend: HashMap<Spender, Spend>,
}

#[derive(Default)]
struct Spend {
    total: u64,
    days: BTreeMap<NaiveDate, u64>,
}

impl Spend {
    fn add(&mut self, day: NaiveDate, micros: u64) {
        self.total = self.total.saturating_add(micros);
        let entry = self.days.entry(day).or_default();
        *entry = entry.saturating_add(micros);
        if self.days.len() as u64 > DAYS_KEPT + 1 {
            let keep_from = oldest_kept(Utc::now().date_naive()).min(day);
            self.days = self.days.split_off(&keep_from);
        }
    }

    fn since(&self, since: Option<NaiveDate>) -> u64 {
        match since {
            None => self.total,
            Some(day) => self.days.range(day..).map(|(_, micros)| micros).sum(),
        }
    }
}

fn oldest_kept(today: NaiveDate) -> NaiveDate {
    today
        .checked_sub_days(Days::new(DAYS_KEPT))
        .unwrap_or(NaiveDate::MIN)
}

impl SpendIndex {
    /// The spend the committed costs and keys views hold. Nothing may fold
    /// them meanwhile; see the module doc.
    pub fn load(projections: &Projections) -> Result<SpendIndex, ProjectionError> {
        let through = projections.checkpoint(ProjectionName::Costs)?;
        let owners: HashMap<String, String> = projections
            .keys()
            .list()?
            .into_iter()
            .filter_map(|record| Some((record.key_id, record.owner?)))
            .collect();
        let mut state = State {
            through,
            owners,
            spend: HashMap::new(),
        };
        let keep_from = oldest_kept(Utc::now().date_naive());
        for row in projections.costs().day_rows(None) {
            let row = row?;
            let micros = row.totals.cost_micros;
            for spender in state.spenders(&row.key_id) {
                let spend = state.spend.entry(spender).or_default();
                spend.total = spend.total.saturating_add(micros);
                if row.day >= keep_from {
                    let day = spend.days.entry(row.day).or_default();
                    *day = day.saturating_add(micros);
                }
            }
        }
        Ok(SpendIndex {
            state: Arc::new(RwLock::new(state)),
        })
    }

    /// What `spender` spent on UTC days from `since` (all time when `None`;
    /// at most [`DAYS_KEPT`] days back), exact through the returned seq.
    pub fn spent(&self, spender: &Spender, since: Option<NaiveDate>) -> Spent {
        let state = self.read();
        Spent {
            micros: state.spend.get(spender).map_or(0, |s| s.since(since)),
            through: state.through,
        }
    }

    /// The owner of `key_id`, if it has one.
    pub fn owner(&self, key_id: &str) -> Option<String> {
        self.read().owners.get(key_id).cloned()
    }

    /// The last seq folded.
    pub fn through(&self) -> u64 {
        self.read().through
    }

    /// Folds one event; events at or before the index's seq are skipped.
    pub fn apply(&self, envelope: &Envelope) {
        let mut state = self.state.write().expect("spend index lock");
        if envelope.seq <= state.through {
            return;
        }
        state.through = envelope.seq;
        match &envelope.event {
            Event::KeyIssued(issued) => match &issued.owner {
                Some(owner) => {
                    state.owners.insert(issued.key_id.clone(), owner.clone());
                }
                None => {
                    state.owners.remove(&issued.key_id);
                }
            },
            Event::UsageRecorded(usage) => {
                let day = envelope.at.date_naive();
                for spender in state.spenders(&usage.key_id) {
                    state
                        .spend
                        .entry(spender)
                        .or_default()
                        .add(day, usage.cost_micros);
                }
            }
            _ => {}
        }
    }

    /// Folds every durable event of `log` past the index's seq now, on the
    /// caller's thread, rather than when [`SpendIndex::follow`] gets to it:
    /// a budget check that calls it first counts every charge that is
    /// durable when it looks — every one the outbox may have published.
    /// Folds nothing twice: `follow` skips what this folded, and the other
    /// way round.
    pub fn catch_up(&self, log: &EventLog) -> Result<(), ReadError> {
        let through = self.through();
        if through >= log.head() {
            return Ok(());
        }
        // Recent records come shared from the log's in-memory tail.
        let mut records = log.subscribe(through + 1);
        while let Some(envelope) = records.try_next() {
            self.apply(&*envelope?);
        }
        Ok(())
    }

    /// Tails `log` from the index's seq, folding each event as it becomes
    /// durable, until `shutdown` completes or the log closes.
    pub async fn follow(
        &self,
        log: &EventLog,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ReadError> {
        let mut subscription = log.subscribe(self.through() + 1);
        tokio::pin!(shutdown);
        loop {
            let next = tokio::select! {
                next = subscription.next() => next,
                () = &mut shutdown => return Ok(()),
            };
            match next {
                Some(envelope) => self.apply(&*envelope?),
                None => return Ok(()),
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().expect("spend index lock")
    }
}

impl State {
    /// The key, and its owner if it has one.
    fn spenders(&self, key_id: &str) -> Vec<Spender> {
        let mut spenders = vec![Spender::key(key_id)];
        if let Some(owner) = self.owners.get(key_id) {
            spenders.push(Spender::user(owner));
        }
        spenders
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_days_are_dropped_but_the_total_stays() {
        let today = Utc::now().date_naive();
        let mut spend = Spend::default();
        for back in (0..DAYS_KEPT + 10).rev() {
            spend.add(today - Days::new(back), 1);
        }
        assert_eq!(spend.total, DAYS_KEPT + 10);
        assert_eq!(spend.days.len() as u64, DAYS_KEPT + 1);
        assert_eq!(spend.since(None), DAYS_KEPT + 10);
        assert_eq!(spend.since(Some(today)), 1);
        assert_eq!(spend.since(Some(today - Days::new(9))), 10);
    }
}
