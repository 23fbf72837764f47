//! `switchboard verify`: the hash chain, then every projection against its rebuild.

use std::process::ExitCode;

use serde_json::json;
use switchboard_events::OpenMode;

use crate::config::Settings;
use crate::datadir;

pub fn run(settings: &Settings) -> anyhow::Result<ExitCode> {
    let store = datadir::open(&settings.data_dir, OpenMode::MustExist)?;
    let head = store.log.head();
    let mut problems = Vec::new();

    let bar = super::progress_bar(head, "checking the hash chain", settings.json);
    let chain = store.log.verify_chain(|seq| bar.set_position(seq));
    bar.finish_and_clear();
    let head_hash = match chain {
        Ok(report) => Some(report.head_hash),
        Err(broken) => {
            problems.push(format!("log: {broken}"));
            None
        }
    };

    let bar = super::progress_bar(head, "rebuilding projections", settings.json);
    match store.projections.verify(&mut |seq| bar.set_position(seq)) {
        Ok(differences) => problems.extend(differences.iter().map(ToString::to_string)),
        Err(error) => problems.push(format!("projections: cannot rebuild: {error}")),
    }
    bar.finish_and_clear();

    if settings.json {
        out!(
            "{}",
            json!({ "ok": problems.is_empty(), "events": head, "head_hash": head_hash, "problems": problems })
        );
    } else if problems.is_empty() {
        out!(
            "ok: {head} events, hash chain intact (head {}), every projection matches its rebuild",
            head_hash.as_deref().unwrap_or("-")
        );
    } else {
        for problem in &problems {
            out!("FAILED {problem}");
        }
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
