//! `switchboard costs [--by key|user|model|day] [--since] [--until]`.

use std::process::ExitCode;

use serde_json::json;
use switchboard_events::OpenMode;
use switchboard_projections::CostGroup;

use crate::cli::CostsArgs;
use crate::config::Settings;
use crate::datadir;

pub fn run(settings: &Settings, args: CostsArgs) -> anyhow::Result<ExitCode> {
    let store = datadir::open_caught_up(&settings.data_dir, OpenMode::MustExist)?;
    let rows = store
        .projections
        .costs()
        .report(args.by, args.since, args.until)?;
    let column = match args.by {
        CostGroup::Key => "key",
        CostGroup::User => "user",
        CostGroup::Model => "model",
        CostGroup::Day => "day",
    };
    if settings.json {
        for row in &rows {
            out!(
                "{}",
                json!({
                    column: row.group,
                    "requests": row.totals.requests,
                    "tokens_in": row.totals.tokens_in,
                    "tokens_out": row.totals.tokens_out,
                    "cost_micros": row.totals.cost_micros,
                    "estimated_requests": row.totals.estimated_requests,
                })
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    out!(
        "{:<24} {:>10} {:>12} {:>12} {:>16}",
        column,
        "requests",
        "tokens_in",
        "tokens_out",
        "cost_usd"
    );
    for row in &rows {
        let group = if row.group.is_empty() {
            "-"
        } else {
            &row.group
        };
        out!(
            "{:<24} {:>10} {:>12} {:>12} {:>16}",
            group,
            row.totals.requests,
            row.totals.tokens_in,
            row.totals.tokens_out,
            format_usd(row.totals.cost_micros)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Micro-USD as dollars with all six decimals: exact, no floats.
fn format_usd(micros: u64) -> String {
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}
