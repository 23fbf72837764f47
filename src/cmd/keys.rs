//! `switchboard keys issue|list|revoke|update`.

use std::process::ExitCode;

use anyhow::{bail, Context};
use serde_json::json;
use switchboard::keys::{self, public, KeySpec};
use switchboard_events::catalog::{Budget, BudgetPeriod, KeyRevoked, KeyUpdated, Limits};
use switchboard_events::{time, Event, ExpectedVersion, NewEvent, OpenMode, StreamId};
use switchboard_projections::KeyRecord;

use crate::cli::{IssueArgs, LimitArgs, RevokeArgs, UpdateArgs};
use crate::config::Settings;
use crate::datadir;

/// Who the offline CLI acts as, in `by` fields of the events it appends.
const CLI_ACTOR: &str = "cli";

pub fn issue(settings: &Settings, args: IssueArgs) -> anyhow::Result<ExitCode> {
    if args.name.trim().is_empty() {
        bail!("--name must not be empty");
    }
    if args.limits.budget_period.is_some() && args.limits.budget_usd.is_none() {
        bail!("--budget-period needs --budget-usd");
    }
    let spec = KeySpec {
        name: args.name,
        owner: args.owner,
        scopes: args.scopes,
        limits: limits(&args.limits),
        budget: budget(&args.limits, None),
        expires_at: args.expires_in.map(|d| time::now() + d),
    };
    let (key_id, key, event) = keys::issue_event(spec, time::now())?;
    let store = datadir::open(&settings.data_dir, OpenMode::CreateIfMissing)?;
    store.log.append_blocking(
        StreamId::key(&key_id)?,
        ExpectedVersion::Exact(0),
        vec![NewEvent::new(Event::KeyIssued(event))],
    )?;
    if settings.json {
        out!("{}", json!({ "key_id": key_id, "key": key.expose() }));
    } else {
        out!("key_id: {key_id}");
        out!("key:    {}", key.expose());
        out!("Store the key now: it is not shown again (only its SHA-256 is kept).");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn list(settings: &Settings) -> anyhow::Result<ExitCode> {
    let store = datadir::open_caught_up(&settings.data_dir, OpenMode::MustExist)?;
    let keys = store.projections.keys().list()?;
    if settings.json {
        for record in &keys {
            out!("{}", serde_json::to_string(&public(record))?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if keys.is_empty() {
        out!("no keys");
    }
    let now = time::now();
    for record in &keys {
        let state = match (&record.revoked, record.is_active(now)) {
            (Some(_), _) => "revoked",
            (None, false) => "expired",
            (None, true) => "active",
        };
        let scopes: Vec<&str> = record.scopes.iter().map(|s| s.as_str()).collect();
        out!(
            "{}  {:<8} {:<24} owner={} scopes={}",
            record.key_id,
            state,
            record.name,
            record.owner.as_deref().unwrap_or("-"),
            scopes.join(",")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn revoke(settings: &Settings, args: RevokeArgs) -> anyhow::Result<ExitCode> {
    let store = datadir::open_caught_up(&settings.data_dir, OpenMode::MustExist)?;
    let record = find(&store, &args.key_id)?;
    if let Some(revocation) = &record.revoked {
        let at = time::to_rfc3339(&revocation.at);
        if settings.json {
            out!(
                "{}",
                json!({ "key_id": record.key_id, "revoked": true, "already": true, "at": at })
            );
        } else {
            out!("key {} was already revoked at {at}", record.key_id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let event = Event::KeyRevoked(KeyRevoked {
        key_id: record.key_id.clone(),
        by: CLI_ACTOR.to_owned(),
        reason: args.reason,
    });
    let appended = store.log.append_blocking(
        StreamId::key(&record.key_id)?,
        ExpectedVersion::Any,
        vec![NewEvent::new(event)],
    )?;
    if settings.json {
        out!(
            "{}",
            json!({ "key_id": record.key_id, "revoked": true, "seq": appended.first().seq })
        );
    } else {
        out!("revoked key {}", record.key_id);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn update(settings: &Settings, args: UpdateArgs) -> anyhow::Result<ExitCode> {
    let store = datadir::open_caught_up(&settings.data_dir, OpenMode::MustExist)?;
    let record = find(&store, &args.key_id)?;
    // As the admin API answers.
    if record.revoked.is_some() {
        bail!(
            "key {} is revoked; a revoked key cannot be changed",
            record.key_id
        );
    }
    let given = &args.limits;
    let new_limits = (given.rpm.is_some() || given.tpm.is_some() || given.max_parallel.is_some())
        .then(|| Limits {
            rpm: given.rpm.or(record.limits.rpm),
            tpm: given.tpm.or(record.limits.tpm),
            max_parallel: given.max_parallel.or(record.limits.max_parallel),
        });
    let new_budget = budget(given, record.budget.as_ref());
    if given.budget_period.is_some() && given.budget_usd.is_none() && record.budget.is_none() {
        bail!(
            "--budget-period needs --budget-usd: key {} has no budget",
            record.key_id
        );
    }
    if new_limits.is_none() && new_budget.is_none() {
        bail!(
            "nothing to update: give --rpm, --tpm, --max-parallel, --budget-usd or --budget-period"
        );
    }
    let event = Event::KeyUpdated(KeyUpdated {
        key_id: record.key_id.clone(),
        limits: new_limits,
        budget: new_budget,
    });
    store.log.append_blocking(
        StreamId::key(&record.key_id)?,
        ExpectedVersion::Any,
        vec![NewEvent::new(event)],
    )?;
    store.projections.catch_up(&mut |_| {})?;
    let updated = find(&store, &record.key_id)?;
    if settings.json {
        out!("{}", serde_json::to_string(&public(&updated))?);
    } else {
        out!("updated key {}", updated.key_id);
    }
    Ok(ExitCode::SUCCESS)
}

fn find(store: &datadir::Store, key_id: &str) -> anyhow::Result<KeyRecord> {
    store
        .projections
        .keys()
        .get(key_id)
        .context("cannot read the keys view")?
        .ok_or_else(|| anyhow::anyhow!("no key with id {key_id:?} (see `switchboard keys list`)"))
}

fn limits(args: &LimitArgs) -> Limits {
    Limits {
        rpm: args.rpm,
        tpm: args.tpm,
        max_parallel: args.max_parallel,
    }
}

/// The budget the flags ask for: a new amount and/or period over `current`.
/// A new budget's period defaults to a month.
fn budget(args: &LimitArgs, current: Option<&Budget>) -> Option<Budget> {
    let micros = args.budget_usd.or(current.map(|b| b.micros))?;
    if args.budget_usd.is_none() && args.budget_period.is_none() {
        return None;
    }
    Some(Budget {
        micros,
        period: args
            .budget_period
            .or(current.map(|b| b.period))
            .unwrap_or(BudgetPeriod::Month),
    })
}
