//! `switchboard audit export`: the audit trail as JSON lines.

use std::io::Write;
use std::process::ExitCode;

use switchboard_events::OpenMode;
use switchboard_projections::AuditQuery;

use crate::cli::AuditExportArgs;
use crate::config::Settings;
use crate::datadir;

/// Events fetched per page while exporting.
const PAGE: usize = 1000;

pub fn export(settings: &Settings, args: AuditExportArgs) -> anyhow::Result<ExitCode> {
    let store = datadir::open_caught_up(&settings.data_dir, OpenMode::MustExist)?;
    let audit = store.projections.audit();
    let mut query = AuditQuery {
        since: args.since,
        until: args.until,
        key_id: args.key,
        event_type: args.event_type,
        cursor: None,
        limit: PAGE,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    loop {
        let page = audit.query(&query)?;
        for envelope in &page.events {
            super::exit_on_broken_pipe(writeln!(out, "{}", envelope.to_json()));
        }
        match page.next_cursor {
            Some(cursor) => query.cursor = Some(cursor),
            None => break,
        }
    }
    super::exit_on_broken_pipe(out.flush());
    Ok(ExitCode::SUCCESS)
}
