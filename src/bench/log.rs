//! `switchboard bench log`: the event log against plain sled, in one run.
//!
//! Every figure stands beside a baseline measured in the same run (DESIGN §10),
//! so the ratios hold on a noisy machine:
//! - durable appends from 1, 16 and 256 concurrent appenders, beside sled's own
//!   inserts + `flush` of as many records per flush (the best group commit
//!   could do), the two taking turns in rounds (`--rounds`) and compared by
//!   the median of the rounds' ratios;
//! - replaying every projection, beside reading and decoding the log alone;
//! - bytes on disk per event, beside the event's encoded size and beside what
//!   plain sled takes on disk per raw record (its own share of the ratio).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use switchboard_events::{codec, EventLog};
use switchboard_projections::Projections;

use super::appends;
use super::workload;
use super::{mark, median, positive_seconds, share, thousands};
use crate::config::Settings;

#[derive(Debug, clap::Args)]
pub struct LogBenchArgs {
    /// Events to fill the log with for the replay and size figures.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub events: u64,
    /// Seconds each append measurement (raw sled and log) runs in all.
    #[arg(long, default_value_t = 3.0, value_parser = positive_seconds)]
    pub seconds: f64,
    /// Rounds each append measurement's seconds are split into, raw sled and
    /// the log taking turns, so that a slow spell of the machine weighs on
    /// both; the ratio is the median of the rounds' ratios.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// Run in this directory, which must be empty or missing, and keep what is
    /// written there (default: a fresh temporary directory, removed after).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Appenders (and records per flush of the raw baseline) measured.
const CONCURRENCY: [usize; 3] = [1, 16, 256];
/// The log's appends/s must reach this share of raw sled's records/s.
const APPEND_TARGET_RATIO: f64 = 0.5;
/// Replaying every projection must fold at least this many events/s.
const REPLAY_TARGET_PER_SEC: f64 = 1_000_000.0;
/// The log may take at most this many times the encoded size on disk.
const SIZE_TARGET_RATIO: f64 = 3.0;
/// The log stores a chain hash of this size before each record, so the raw
/// baseline's records carry as many bytes.
const CHAIN_HASH_BYTES: usize = 32;

/// Everything one run measured; `--json` prints it as one object.
#[derive(Debug, Serialize)]
pub struct LogBenchReport {
    pub events: u64,
    pub seconds_per_measurement: f64,
    /// Rounds each append measurement's seconds were split into.
    pub rounds: u32,
    /// Bytes of the raw baseline's record: a chain hash and a typical encoded event.
    pub raw_record_bytes: usize,
    pub appends: Vec<AppendFigures>,
    pub fill: FillFigures,
    pub replay: ReplayFigures,
    pub size: SizeFigures,
}

/// Durable appends at one concurrency, beside raw sled at the same batch size.
#[derive(Debug, Serialize)]
pub struct AppendFigures {
    /// Concurrent appenders of the log; records per flush of raw sled.
    pub concurrency: usize,
    pub raw_records_per_sec: f64,
    pub raw_flushes_per_sec: f64,
    pub log_appends: u64,
    pub log_appends_per_sec: f64,
    pub log_mean_latency_ms: f64,
    /// Each round's log appends/s over its raw sled records/s, in the order
    /// measured.
    pub round_ratios: Vec<f64>,
    /// The median of `round_ratios` (with two rounds, their mean).
    pub ratio: f64,
    pub target_ratio: f64,
    pub pass: bool,
}

#[derive(Debug, Serialize)]
pub struct FillFigures {
    pub events: u64,
    pub appenders: usize,
    pub seconds: f64,
    pub events_per_sec: f64,
}

#[derive(Debug, Serialize)]
pub struct ReplayFigures {
    /// Events folded by `Projections::replay` (equals the events filled).
    pub events: u64,
    pub seconds: f64,
    pub events_per_sec: f64,
    /// Baseline: `EventLog::read_from(1)`, which reads and decodes every record.
    pub decode_events_per_sec: f64,
    /// Below the baseline: iterating the log's sled records without decoding.
    pub scan_records_per_sec: f64,
    /// `events_per_sec / decode_events_per_sec`.
    pub ratio_to_decode: f64,
    pub target_events_per_sec: f64,
    pub pass: bool,
}

#[derive(Debug, Serialize)]
pub struct SizeFigures {
    /// `EventLog::size_on_disk` after filling, before any projection is built.
    pub log_bytes_on_disk: u64,
    pub log_bytes_per_event: f64,
    /// The mean of `codec::encode` over every stored event.
    pub mean_encoded_bytes: f64,
    /// `log_bytes_per_event / mean_encoded_bytes`.
    pub ratio: f64,
    pub target_ratio: f64,
    pub pass: bool,
    /// The whole database after the replay, projections' trees included.
    pub bytes_on_disk_with_projections: u64,
    pub bytes_per_event_with_projections: f64,
    /// Baseline, beside `ratio`: plain sled's database after the raw append
    /// measurement with the largest batch (the most records, so sled's fixed
    /// overhead weighs least), holding `raw_sled_records` records of
    /// `raw_record_bytes` under sequential keys. Not part of the target.
    pub raw_sled_batch: usize,
    pub raw_sled_records: u64,
    pub raw_sled_bytes_on_disk: u64,
    pub raw_sled_bytes_per_record: f64,
    /// `raw_sled_bytes_per_record / raw_record_bytes`.
    pub raw_sled_ratio: f64,
}

pub fn run(settings: &Settings, args: LogBenchArgs) -> anyhow::Result<ExitCode> {
    let scratch = Scratch::new(args.dir.clone())?;
    if !settings.json {
        println!(
            "bench log: {} events, {} s per append measurement in {} rounds (raw sled and the log taking turns), in {}",
            thousands(args.events as f64),
            args.seconds,
            args.rounds,
            scratch.path.display()
        );
    }
    let report = measure(&args, &scratch.path, settings.json)?;
    if settings.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs every measurement in `dir`; prints each figure as it is measured unless
/// `quiet`.
pub fn measure(args: &LogBenchArgs, dir: &Path, quiet: bool) -> anyhow::Result<LogBenchReport> {
    let show = |line: String| {
        if !quiet {
            println!("{line}");
        }
    };
    let window = Duration::from_secs_f64(args.seconds);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;

    let encoded = codec::encode(&workload::typical_envelope());
    let mut record = vec![0xa5; CHAIN_HASH_BYTES];
    record.extend_from_slice(&encoded);
    show(format!(
        "durable appends (target: log >= {:.0}% of raw sled; raw record {} bytes = {CHAIN_HASH_BYTES}-byte hash + {}-byte encoded message_received)",
        APPEND_TARGET_RATIO * 100.0,
        record.len(),
        encoded.len()
    ));
    let mut appends = Vec::new();
    // The raw baseline of the size figures: the last, so the largest, batch.
    let mut raw_size = (0, 0, 0);
    let slice = window / args.rounds;
    for concurrency in CONCURRENCY {
        let (mut raw_records, mut raw_flushes, mut raw_seconds) = (0, 0, 0.0);
        let (mut log_appends, mut log_waited, mut log_seconds) = (0, Duration::ZERO, 0.0);
        let mut round_ratios = Vec::new();
        for round in 0..args.rounds {
            let raw = appends::raw_sled(
                &dir.join(format!("raw-{concurrency}-{round}")),
                concurrency,
                &record,
                slice,
            )?;
            let log = appends::durable_appends(
                &runtime,
                &dir.join(format!("appends-{concurrency}-{round}")),
                concurrency,
                slice,
            )?;
            round_ratios.push(share(
                rate(log.appends, log.seconds),
                rate(raw.records, raw.seconds),
            ));
            raw_size = (concurrency, raw.records, raw.bytes_on_disk);
            raw_records += raw.records;
            raw_flushes += raw.flushes;
            raw_seconds += raw.seconds;
            log_appends += log.appends;
            log_waited += log.waited;
            log_seconds += log.seconds;
        }
        let ratio = median(&round_ratios);
        let figures = AppendFigures {
            concurrency,
            raw_records_per_sec: rate(raw_records, raw_seconds),
            raw_flushes_per_sec: rate(raw_flushes, raw_seconds),
            log_appends,
            log_appends_per_sec: rate(log_appends, log_seconds),
            log_mean_latency_ms: log_waited.as_secs_f64() * 1000.0 / log_appends.max(1) as f64,
            round_ratios,
            ratio,
            target_ratio: APPEND_TARGET_RATIO,
            pass: ratio >= APPEND_TARGET_RATIO,
        };
        show(append_line(&figures));
        appends.push(figures);
    }
    show("  mean group size: not observable from outside the log (it counts no flushes)".into());

    let (log, fill) = appends::fill(&runtime, &dir.join("replay"), args.events, quiet)?;
    show(format!(
        "fill: {} events in {:.2} s ({} events/s; {} concurrent appenders, one conversation per append)",
        thousands(fill.events as f64),
        fill.seconds,
        thousands(fill.events_per_sec),
        fill.appenders
    ));

    // Measured before the projections exist, so this is the log alone.
    log.db().flush()?;
    let log_bytes = log.size_on_disk()?;
    let scan_records_per_sec = scan(&log, args.events)?;
    let decode_events_per_sec = decode(&log, args.events)?;
    let mean_encoded_bytes = mean_encoded_size(&log)?;

    let projections = Projections::open(&log)?;
    let mut replayed = 0u64;
    let started = Instant::now();
    projections.replay(None, &mut |_| replayed += 1)?;
    let replay_seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        replayed == args.events,
        "replay folded {replayed} events of the {} filled",
        args.events
    );
    let events_per_sec = rate(replayed, replay_seconds);
    let replay = ReplayFigures {
        events: replayed,
        seconds: replay_seconds,
        events_per_sec,
        decode_events_per_sec,
        scan_records_per_sec,
        ratio_to_decode: share(events_per_sec, decode_events_per_sec),
        target_events_per_sec: REPLAY_TARGET_PER_SEC,
        pass: events_per_sec >= REPLAY_TARGET_PER_SEC,
    };
    show(format!(
        "replay (target: >= {} events/s)",
        thousands(REPLAY_TARGET_PER_SEC)
    ));
    show(format!(
        "  {:<32}{:>11} records/s",
        "sled scan of the log, no decode:",
        thousands(replay.scan_records_per_sec)
    ));
    show(format!(
        "  {:<32}{:>11} events/s",
        "read_from(1) + decode:",
        thousands(replay.decode_events_per_sec)
    ));
    show(format!(
        "  {:<32}{:>11} events/s ({:.0}% of decode; {} events in {:.2} s)  {}",
        "replay, all projections:",
        thousands(replay.events_per_sec),
        replay.ratio_to_decode * 100.0,
        thousands(replay.events as f64),
        replay.seconds,
        mark(replay.pass)
    ));

    log.db().flush()?;
    let total_bytes = log.size_on_disk()?;
    let log_bytes_per_event = log_bytes as f64 / args.events as f64;
    let size_ratio = share(log_bytes_per_event, mean_encoded_bytes);
    let (raw_sled_batch, raw_sled_records, raw_sled_bytes_on_disk) = raw_size;
    let raw_sled_bytes_per_record = share(raw_sled_bytes_on_disk as f64, raw_sled_records as f64);
    let size = SizeFigures {
        log_bytes_on_disk: log_bytes,
        log_bytes_per_event,
        mean_encoded_bytes,
        ratio: size_ratio,
        target_ratio: SIZE_TARGET_RATIO,
        pass: size_ratio <= SIZE_TARGET_RATIO,
        bytes_on_disk_with_projections: total_bytes,
        bytes_per_event_with_projections: total_bytes as f64 / args.events as f64,
        raw_sled_batch,
        raw_sled_records,
        raw_sled_bytes_on_disk,
        raw_sled_bytes_per_record,
        raw_sled_ratio: share(raw_sled_bytes_per_record, record.len() as f64),
    };
    show(format!(
        "bytes on disk (target: <= {SIZE_TARGET_RATIO:.1}x the encoded size)"
    ));
    show(format!(
        "  {:<32}{:>9.1} bytes/event on disk vs {:.1} encoded ({:.2}x; {} bytes)  {}",
        "log only (before replay):",
        size.log_bytes_per_event,
        size.mean_encoded_bytes,
        size.ratio,
        thousands(size.log_bytes_on_disk as f64),
        mark(size.pass)
    ));
    show(format!(
        "  {:<32}{:>9.1} bytes/record on disk vs {} raw ({:.2}x; {} records at batch={})",
        format!("raw sled, {}-byte records:", record.len()),
        size.raw_sled_bytes_per_record,
        record.len(),
        size.raw_sled_ratio,
        thousands(size.raw_sled_records as f64),
        size.raw_sled_batch
    ));
    show(format!(
        "  {:<32}{:>9.1} bytes/event on disk ({} bytes)",
        "log + projections (after):",
        size.bytes_per_event_with_projections,
        thousands(size.bytes_on_disk_with_projections as f64)
    ));

    Ok(LogBenchReport {
        events: args.events,
        seconds_per_measurement: args.seconds,
        rounds: args.rounds,
        raw_record_bytes: record.len(),
        appends,
        fill,
        replay,
        size,
    })
}

/// Records/s of iterating the log's sled tree without decoding. Reaches past
/// the log's API into its layout (tree `log`; rows keyed `r` seq for one
/// record, `r` first ‖ last for several): it only splits the decode baseline
/// into storage and codec.
fn scan(log: &EventLog, events: u64) -> anyhow::Result<f64> {
    let tree = log.db().open_tree("log")?;
    let started = Instant::now();
    let mut records = 0u64;
    for entry in tree.scan_prefix([b'r']) {
        let (key, value) = entry?;
        black_box(value);
        let seq_at = |at: usize| {
            key.get(at..at + 8)
                .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
        };
        records += match (seq_at(1), seq_at(9)) {
            (Some(first), Some(last)) if key.len() == 17 && first < last => last - first + 1,
            (Some(_), None) if key.len() == 9 => 1,
            _ => anyhow::bail!("a record row's key is malformed: the log's layout changed"),
        };
    }
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        records == events,
        "the scan found {records} records of {events}: the log's layout changed"
    );
    Ok(rate(records, seconds))
}

/// Events/s of reading and decoding the whole log: replay's floor.
fn decode(log: &EventLog, events: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut decoded = 0u64;
    for envelope in log.read_from(1) {
        black_box(envelope?);
        decoded += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        decoded == events,
        "read_from(1) gave {decoded} events of {events}"
    );
    Ok(rate(decoded, seconds))
}

/// The mean encoded size of the log's events, as the codec writes them.
fn mean_encoded_size(log: &EventLog) -> anyhow::Result<f64> {
    let mut events = 0u64;
    let mut bytes = 0u64;
    for envelope in log.read_from(1) {
        bytes += codec::encode(&envelope?).len() as u64;
        events += 1;
    }
    Ok(bytes as f64 / events.max(1) as f64)
}

/// Where the bench's databases live: a fresh temporary dir removed on drop, or
/// the caller's `--dir`, kept.
struct Scratch {
    path: PathBuf,
    remove: bool,
}

impl Scratch {
    fn new(dir: Option<PathBuf>) -> anyhow::Result<Scratch> {
        let Some(path) = dir else {
            let path = std::env::temp_dir().join(format!(
                "switchboard-bench-log-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or_default()
            ));
            std::fs::create_dir_all(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            return Ok(Scratch { path, remove: true });
        };
        if path.exists() {
            let mut entries = std::fs::read_dir(&path)
                .with_context(|| format!("cannot use {} for the bench", path.display()))?;
            anyhow::ensure!(
                entries.next().is_none(),
                "{} is not empty; bench log needs an empty or missing directory",
                path.display()
            );
        } else {
            std::fs::create_dir_all(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
        }
        Ok(Scratch {
            path,
            remove: false,
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn append_line(f: &AppendFigures) -> String {
    let appenders = if f.concurrency == 1 {
        "appender"
    } else {
        "appenders"
    };
    let rounds: Vec<String> = f
        .round_ratios
        .iter()
        .map(|ratio| format!("{:.0}", ratio * 100.0))
        .collect();
    format!(
        "  raw sled batch={:<4}{:>9} rec/s {:>7} flushes/s | log {:>3} {appenders:<9}{:>9} appends/s {:>7.2} ms each ({:>3.0}% of raw; rounds {}%)  {}",
        f.concurrency,
        thousands(f.raw_records_per_sec),
        thousands(f.raw_flushes_per_sec),
        f.concurrency,
        thousands(f.log_appends_per_sec),
        f.log_mean_latency_ms,
        f.ratio * 100.0,
        rounds.join(", "),
        mark(f.pass)
    )
}

pub(super) fn rate(count: u64, seconds: f64) -> f64 {
    share(count as f64, seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_run_reports_positive_consistent_figures() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let args = LogBenchArgs {
            events: 3_000,
            seconds: 0.06,
            rounds: 3,
            dir: None,
        };
        let report = measure(&args, dir.path(), true).expect("the bench runs");

        assert_eq!(report.appends.len(), CONCURRENCY.len());
        for figures in &report.appends {
            assert!(figures.raw_records_per_sec > 0.0, "{figures:?}");
            assert!(figures.raw_flushes_per_sec > 0.0, "{figures:?}");
            assert!(figures.log_appends > 0, "{figures:?}");
            assert!(figures.log_appends_per_sec > 0.0, "{figures:?}");
            assert!(figures.ratio > 0.0, "{figures:?}");
            assert_eq!(figures.round_ratios.len(), 3, "{figures:?}");
            assert_eq!(figures.ratio, median(&figures.round_ratios), "{figures:?}");
        }
        assert_eq!(report.fill.events, 3_000);
        assert_eq!(report.replay.events, report.fill.events);
        assert!(report.replay.events_per_sec > 0.0);
        assert!(report.replay.decode_events_per_sec > 0.0);
        assert!(report.replay.scan_records_per_sec > 0.0);
        assert!(report.size.log_bytes_on_disk > 0);
        assert!(report.size.mean_encoded_bytes > 0.0);
        assert!(report.size.ratio > 0.0);
        assert!(report.size.bytes_on_disk_with_projections > 0);
        assert_eq!(
            report.size.raw_sled_batch,
            CONCURRENCY[CONCURRENCY.len() - 1]
        );
        assert!(report.size.raw_sled_records > 0);
        assert!(report.size.raw_sled_bytes_on_disk > 0);
        assert!(report.size.raw_sled_bytes_per_record > 0.0);
        assert!(report.size.raw_sled_ratio > 0.0);

        let json = serde_json::to_value(&report).expect("the report serializes");
        assert_eq!(json["replay"]["events"], 3_000);
        assert!(json["size"]["raw_sled_bytes_per_record"].as_f64() > Some(0.0));
    }

    #[test]
    fn a_given_dir_must_be_empty_and_is_kept() {
        let dir = tempfile::tempdir().expect("a temp dir");
        std::fs::write(dir.path().join("precious"), b"data").expect("a file");
        assert!(Scratch::new(Some(dir.path().to_owned())).is_err());

        let fresh = dir.path().join("fresh");
        drop(Scratch::new(Some(fresh.clone())).expect("a missing dir is fine"));
        assert!(fresh.is_dir());
    }

    #[test]
    fn the_median_is_the_middle_value_or_the_mean_of_the_middle_two() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[0.4]), 0.4);
        assert_eq!(median(&[0.9, 0.2, 0.5]), 0.5);
        assert_eq!(median(&[0.9, 0.2, 0.5, 0.3]), 0.4);
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
    }
}
