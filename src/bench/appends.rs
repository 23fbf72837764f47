//! The writing half of `bench log`: plain sled flushes, durable appends from
//! concurrent appenders, and filling a log with the realistic mix.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use switchboard_events::{EventLog, ExpectedVersion, NewEvent, OpenMode, StreamId};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;
use uuid::Uuid;

use super::log::{rate, FillFigures};
use super::workload::{self, Plan};

/// Concurrent appenders filling the log; group commit turns them into few flushes.
const FILL_APPENDERS: usize = 64;

pub struct RawFlushes {
    pub records: u64,
    pub flushes: u64,
    pub seconds: f64,
    /// `Db::size_on_disk` after the last flush.
    pub bytes_on_disk: u64,
}

/// A plain sled database for the raw baselines, with the log's configuration
/// (sled's defaults) in a fresh dir: records inserted under increasing keys,
/// each batch made durable by one flush. Plain inserts, as the log writes its
/// groups, not a sled `Batch`: from the first batch on, every sled operation
/// of the process takes sled's process-wide lock, so a batch here would slow
/// every phase of the bench after it, which `serve` never does.
pub struct RawSled {
    db: sled::Db,
    tree: sled::Tree,
    /// Records inserted so far; the last one's key.
    seq: u64,
}

impl RawSled {
    pub fn open(path: &Path) -> anyhow::Result<RawSled> {
        let db = sled::Config::new()
            .path(path)
            .open()
            .with_context(|| format!("cannot open a sled database in {}", path.display()))?;
        let tree = db.open_tree("raw")?;
        Ok(RawSled { db, tree, seq: 0 })
    }

    /// Inserts `count` copies of `record`, then flushes once.
    pub fn store(&mut self, count: usize, record: &[u8]) -> sled::Result<()> {
        for _ in 0..count {
            self.seq += 1;
            let mut key = [b'r'; 9];
            key[1..].copy_from_slice(&self.seq.to_be_bytes());
            self.tree.insert(&key[..], record)?;
        }
        self.db.flush().map(drop)
    }
}

/// Plain sled ([`RawSled`]): `batch` records inserted, then a flush, for
/// `window`. Also measures what the records take on disk, sled's own share
/// of the log's size.
pub fn raw_sled(
    path: &Path,
    batch: usize,
    record: &[u8],
    window: Duration,
) -> anyhow::Result<RawFlushes> {
    let mut raw = RawSled::open(path)?;
    let mut flushes = 0u64;
    let started = Instant::now();
    while started.elapsed() < window {
        raw.store(batch, record)?;
        flushes += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(RawFlushes {
        records: raw.seq,
        flushes,
        seconds,
        bytes_on_disk: raw.db.size_on_disk()?,
    })
}

pub struct LogAppends {
    pub appends: u64,
    /// Summed over appends: from calling `append` to its durable answer.
    pub waited: Duration,
    pub seconds: f64,
}

/// `appenders` tasks, each appending one `message_received` at a time to its own
/// conversation until `window` has passed.
pub fn durable_appends(
    runtime: &Runtime,
    path: &Path,
    appenders: usize,
    window: Duration,
) -> anyhow::Result<LogAppends> {
    let log = EventLog::open(path, OpenMode::CreateIfMissing)?;
    let measured = runtime.block_on(async {
        let started = Instant::now();
        let deadline = started + window;
        let mut tasks = JoinSet::new();
        for appender in 0..appenders {
            tasks.spawn(append_until(log.clone(), appender as u64, deadline));
        }
        let mut appends = 0;
        let mut waited = Duration::ZERO;
        while let Some(joined) = tasks.join_next().await {
            let (n, w) = joined.context("an appender panicked")??;
            appends += n;
            waited += w;
        }
        anyhow::Ok(LogAppends {
            appends,
            waited,
            seconds: started.elapsed().as_secs_f64(),
        })
    })?;
    anyhow::ensure!(
        log.head() == measured.appends,
        "the log holds {} events after {} acknowledged appends",
        log.head(),
        measured.appends
    );
    Ok(measured)
}

async fn append_until(
    log: EventLog,
    appender: u64,
    deadline: Instant,
) -> anyhow::Result<(u64, Duration)> {
    let conversation = workload::conversation_id(appender);
    let stream = StreamId::conversation(&conversation)?;
    let mut appends = 0;
    let mut waited = Duration::ZERO;
    while Instant::now() < deadline {
        let message_id = Uuid::now_v7().to_string();
        let event = workload::message_received(&conversation, &message_id, "key_0001", appends);
        let started = Instant::now();
        log.append(
            stream.clone(),
            ExpectedVersion::Any,
            vec![NewEvent::new(event)],
        )
        .await?;
        waited += started.elapsed();
        appends += 1;
    }
    Ok((appends, waited))
}

/// Fills a fresh log in `path` with `events` events of the realistic mix, from
/// [`FILL_APPENDERS`] concurrent appenders, one conversation per append.
pub fn fill(
    runtime: &Runtime,
    path: &Path,
    events: u64,
    quiet: bool,
) -> anyhow::Result<(EventLog, FillFigures)> {
    let plan = Arc::new(Plan::new(events));
    let log = EventLog::open(path, OpenMode::CreateIfMissing)?;
    let bar = crate::cmd::progress_bar(events, "filling the log", quiet);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    runtime.block_on(async {
        let mut tasks = JoinSet::new();
        for _ in 0..FILL_APPENDERS {
            let (log, plan, next, bar) = (log.clone(), plan.clone(), next.clone(), bar.clone());
            tasks.spawn(async move {
                while let Some(&unit) = plan.units.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let events = plan.events(unit);
                    let count = events.len() as u64;
                    log.append(plan.stream(unit), ExpectedVersion::Any, events)
                        .await?;
                    bar.inc(count);
                }
                anyhow::Ok(())
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.context("a filling appender panicked")??;
        }
        anyhow::Ok(())
    })?;
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    anyhow::ensure!(
        log.head() == events,
        "the log holds {} events after filling {events}",
        log.head()
    );
    let figures = FillFigures {
        events,
        appenders: FILL_APPENDERS,
        seconds,
        events_per_sec: rate(events, seconds),
    };
    Ok((log, figures))
}
