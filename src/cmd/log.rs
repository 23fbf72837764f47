//! `switchboard log [--from SEQ] [--stream S]`.

use std::io::Write;
use std::process::ExitCode;

use switchboard_events::{time, Envelope, EventLog, OpenMode, StreamId};

use crate::cli::LogArgs;
use crate::config::Settings;

pub fn run(settings: &Settings, args: LogArgs) -> anyhow::Result<ExitCode> {
    let stream = args.stream.as_deref().map(StreamId::parse).transpose()?;
    let log = EventLog::open(&settings.data_dir, OpenMode::MustExist)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut print = |envelope: Envelope| -> std::io::Result<()> {
        if settings.json {
            writeln!(out, "{}", envelope.to_json())
        } else {
            let data = serde_json::to_value(&envelope)
                .ok()
                .and_then(|v| v.get("data").map(|d| d.to_string()))
                .unwrap_or_default();
            writeln!(
                out,
                "{:>8}  {}  {}@{}  {}  {}",
                envelope.seq,
                time::to_rfc3339(&envelope.at),
                envelope.stream,
                envelope.version,
                envelope.event.type_name(),
                data
            )
        }
    };
    match stream {
        Some(stream) => {
            for envelope in log.read_stream(&stream, 1) {
                let envelope = envelope?;
                if envelope.seq >= args.from {
                    super::exit_on_broken_pipe(print(envelope));
                }
            }
        }
        None => {
            for envelope in log.read_from(args.from) {
                super::exit_on_broken_pipe(print(envelope?));
            }
        }
    }
    super::exit_on_broken_pipe(out.flush());
    Ok(ExitCode::SUCCESS)
}
