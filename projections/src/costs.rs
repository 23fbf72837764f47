//! costs: tokens and micro-USD per key, user, model and UTC day, summed from
//! `usage_recorded` events only — so the view always equals the sum of those
//! events, after any crash or replay.
//!
//! Rows: `d` day 0 key 0 user 0 model → [`CostTotals`] (the finest grain; any
//! grouping over a day range is a scan of it); `a` key → the key's all-time
//! [`CostTotals`], for `/v1/usage` without a scan.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use switchboard_events::{Envelope, Event};

use crate::view::{decode_row, row_key, ProjectionError, Staged};

pub const NAME: &str = "costs";

/// Sums over a set of `usage_recorded` events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CostTotals {
    pub requests: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub cost_micros: u64,
    /// Requests whose tokens were counted locally, not reported by the provider.
    pub estimated_requests: u64,
}

impl CostTotals {
    /// Saturating, as the spend index and pricing are: a provider may report
    /// any token count.
    fn add(&mut self, other: &CostTotals) {
        self.requests = self.requests.saturating_add(other.requests);
        self.tokens_in = self.tokens_in.saturating_add(other.tokens_in);
        self.tokens_out = self.tokens_out.saturating_add(other.tokens_out);
        self.cost_micros = self.cost_micros.saturating_add(other.cost_micros);
        self.estimated_requests = self
            .estimated_requests
            .saturating_add(other.estimated_requests);
    }
}

/// The column a cost report groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CostGroup {
    Key,
    User,
    Model,
    Day,
}

impl std::str::FromStr for CostGroup {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "key" => Ok(Self::Key),
            "user" => Ok(Self::User),
            "model" => Ok(Self::Model),
            "day" => Ok(Self::Day),
            other => Err(format!(
                "unknown grouping {other:?} (expected key, user, model or day)"
            )),
        }
    }
}

/// One line of a cost report: the group's value and its totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CostRow {
    pub group: String,
    #[serde(flatten)]
    pub totals: CostTotals,
}

/// One finest-grain row: a day's totals of one key, user and model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayRow {
    pub day: NaiveDate,
    pub key_id: String,
    /// Empty for usage without a user.
    pub user: String,
    pub model: String,
    pub totals: CostTotals,
}

/// The user column of usage without a user.
const NO_USER: &str = "";

pub fn apply(view: &mut Staged, envelope: &Envelope) -> Result<(), ProjectionError> {
    let Event::UsageRecorded(usage) = &envelope.event else {
        return Ok(());
    };
    let delta = CostTotals {
        requests: 1,
        tokens_in: usage.prompt_tokens,
        tokens_out: usage.completion_tokens,
        cost_micros: usage.cost_micros,
        estimated_requests: u64::from(usage.estimated),
    };
    let day = envelope.at.date_naive().to_string();
    let user = usage.user.as_deref().unwrap_or(NO_USER);
    for key in [
        row_key(
            b'd',
            &[
                day.as_bytes(),
                usage.key_id.as_bytes(),
                user.as_bytes(),
                usage.model.as_bytes(),
            ],
        ),
        row_key(b'a', &[usage.key_id.as_bytes()]),
    ] {
        match view.get_mut::<CostTotals>(&key)? {
            Some(totals) => totals.add(&delta),
            None => view.put_typed(key, delta),
        }
    }
    Ok(())
}

/// Read access to the costs view.
#[derive(Clone)]
pub struct CostsView {
    pub(crate) tree: sled::Tree,
}

impl CostsView {
    /// Totals grouped by `by` over the UTC days `since..=until` (both optional),
    /// sorted by the group's value.
    pub fn report(
        &self,
        by: CostGroup,
        since: Option<NaiveDate>,
        until: Option<NaiveDate>,
    ) -> Result<Vec<CostRow>, ProjectionError> {
        let mut groups: BTreeMap<String, CostTotals> = BTreeMap::new();
        for row in self.day_rows(since) {
            let row = row?;
            if until.is_some_and(|until| row.day > until) {
                break;
            }
            let group = match by {
                CostGroup::Key => row.key_id,
                CostGroup::User => row.user,
                CostGroup::Model => row.model,
                CostGroup::Day => row.day.to_string(),
            };
            groups.entry(group).or_default().add(&row.totals);
        }
        Ok(groups
            .into_iter()
            .map(|(group, totals)| CostRow { group, totals })
            .collect())
    }

    /// The finest-grain rows, by day (from `since`, when given), then key,
    /// user and model.
    pub fn day_rows(
        &self,
        since: Option<NaiveDate>,
    ) -> impl Iterator<Item = Result<DayRow, ProjectionError>> + '_ {
        let start = match since {
            Some(day) => row_key(b'd', &[day.to_string().as_bytes()]),
            None => vec![b'd'],
        };
        self.tree
            .range(start..)
            .map_while(|entry| match entry {
                Ok((key, _)) if key.first() != Some(&b'd') => None,
                other => Some(other),
            })
            .map(|entry| {
                let (key, value) = entry?;
                let corrupt = |detail: &str| ProjectionError::CorruptRow {
                    projection: NAME,
                    key: String::from_utf8_lossy(&key).into_owned(),
                    detail: detail.to_owned(),
                };
                let parts: Vec<&[u8]> = key[1..].split(|b| *b == 0).collect();
                let [day, key_id, user, model] = parts[..] else {
                    return Err(corrupt("expected day, key, user and model"));
                };
                let day = std::str::from_utf8(day)
                    .ok()
                    .and_then(|day| day.parse::<NaiveDate>().ok())
                    .ok_or_else(|| corrupt("the day is not a date"))?;
                let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
                Ok(DayRow {
                    day,
                    key_id: text(key_id),
                    user: text(user),
                    model: text(model),
                    totals: decode_row(NAME, &key, &value)?,
                })
            })
    }

    /// A key's all-time totals.
    pub fn key_totals(&self, key_id: &str) -> Result<CostTotals, ProjectionError> {
        let key = row_key(b'a', &[key_id.as_bytes()]);
        match self.tree.get(&key)? {
            None => Ok(CostTotals::default()),
            Some(value) => decode_row(NAME, &key, &value),
        }
    }
}
