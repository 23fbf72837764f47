//! `switchboard replay [--projection NAME]`: rebuild from seq 1.

use std::process::ExitCode;
use std::time::Instant;

use serde_json::json;
use switchboard_events::OpenMode;
use switchboard_projections::ProjectionName;

use crate::cli::ReplayArgs;
use crate::config::Settings;
use crate::datadir;

pub fn run(settings: &Settings, args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let only: Option<ProjectionName> = args.projection.as_deref().map(str::parse).transpose()?;
    let store = datadir::open(&settings.data_dir, OpenMode::MustExist)?;
    let head = store.log.head();
    let what = only.map_or("all projections".to_owned(), |p| p.to_string());
    let bar = super::progress_bar(head, &format!("replaying {what}"), settings.json);
    let started = Instant::now();
    store
        .projections
        .replay(only, &mut |seq| bar.set_position(seq))?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    if settings.json {
        out!(
            "{}",
            json!({ "projections": what, "events": head, "seconds": seconds })
        );
    } else {
        out!("replayed {what}: {head} events in {seconds:.2}s");
    }
    Ok(ExitCode::SUCCESS)
}
