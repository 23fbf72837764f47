//! `switchboard bench nats`: the service over a real `nats-server`, beside
//! plain NATS and plain sled, in one run.
//!
//! Every figure stands beside a baseline measured in the same run (DESIGN §10),
//! so the ratios hold on a noisy machine:
//! - sends acknowledged per second and their latency, from 1, 16 and 64
//!   concurrent clients, beside plain NATS request/reply to a trivial
//!   responder from the same clients over the same connections;
//! - replies (`reply_completed` published by the outbox) per second;
//! - a send's floor at one client: a request/reply plus one sled flush;
//! - beside the targets, not part of them: a durable raw responder, the raw
//!   responder answering once a sled insert for the request is flushed (one
//!   flush for all requests waiting), the least any service that
//!   acknowledges only what is on disk does — no events published, no key,
//!   no actor, no turn;
//! - the CPU this process and `nats-server` spend per request, on each side,
//!   which says whether a shortfall is work or waiting;
//! - resident memory per live conversation actor, beside the same events in
//!   a log without actors ([`memory`]).
//!
//! The service, the clients and the raw responder share this process (and the
//! machine with `nats-server`), so the clients' own cost weighs on both sides.
//! At each client count the raw, durable raw and service windows take turns in rounds
//! (`--rounds`), so that a slow spell of a shared machine falls on both; the
//! acks/raw ratio is the median of the rounds' ratios.

pub(crate) mod launcher;
pub(crate) mod load;
mod memory;
pub(crate) mod procfs;
pub(crate) mod requests;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use switchboard::server::{Server, ServerConfig};
use switchboard_events::codec;

use super::log::rate;
use super::workload;
use super::{mark, positive_count, positive_seconds, share, thousands};
use crate::config::Settings;
use launcher::NatsServerProcess;
use load::Percentiles;
use memory::MemoryFigures;

#[derive(Debug, clap::Args)]
pub struct NatsBenchArgs {
    /// Concurrent clients to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64", value_parser = positive_count)]
    pub clients: Vec<usize>,
    /// Seconds each measurement runs (raw flush, raw request/reply, service).
    #[arg(long, default_value_t = 5.0, value_parser = positive_seconds)]
    pub duration_secs: f64,
    /// Rounds each client count's raw and service seconds are split into,
    /// the two taking turns, so that a slow spell of the machine weighs on
    /// both; the acks/raw ratio is the median of the rounds' ratios.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// Conversations the clients spread their sends over.
    #[arg(long, default_value_t = 1000, value_parser = positive_count)]
    pub conversations: usize,
    /// Live conversation actors for the memory figure.
    #[arg(long, default_value_t = 100_000, value_parser = positive_count)]
    pub actors: usize,
    /// NATS connections the clients share (client i uses connection i mod this).
    #[arg(long, default_value_t = 8, value_parser = positive_count)]
    pub connections: usize,
}

/// The clients at which acks/s must reach [`ACK_TARGET_RATIO`] of raw.
const THROUGHPUT_TARGET_CLIENTS: usize = 64;
/// acks/s >= this share of raw request/reply at [`THROUGHPUT_TARGET_CLIENTS`].
const ACK_TARGET_RATIO: f64 = 0.4;
/// The clients at which the p50 ack latency is held to [`P50_TARGET_RATIO`].
const LATENCY_TARGET_CLIENTS: usize = 1;
/// p50 ack <= this times (p50 raw request/reply + p50 raw flush).
const P50_TARGET_RATIO: f64 = 1.5;
/// The subject prefix the service is started with.
const PREFIX: &str = "sb";
/// The log stores a chain hash of this size before each record, so the raw
/// flush's record carries as many bytes (as in `bench log`).
const CHAIN_HASH_BYTES: usize = 32;

/// Everything one run measured; `--json` prints it as one object.
#[derive(Debug, Serialize)]
pub struct NatsBenchReport {
    pub clients: Vec<usize>,
    pub connections: usize,
    pub seconds_per_measurement: f64,
    /// Rounds each client count's seconds were split into.
    pub rounds: u32,
    pub conversations: usize,
    pub nats_server: String,
    pub memory: MemoryFigures,
    pub raw_flush: FlushFigures,
    pub warm_up_seconds: f64,
    pub runs: Vec<ClientFigures>,
    /// `None` when `--clients` leaves out 64.
    pub throughput_target: Option<ThroughputTarget>,
    /// `None` when `--clients` leaves out 1.
    pub latency_target: Option<LatencyTarget>,
}

/// Plain sled, one record per insert + flush.
#[derive(Debug, Serialize)]
pub struct FlushFigures {
    pub record_bytes: usize,
    pub flushes_per_sec: f64,
    pub latency: Percentiles,
}

/// One client count: raw request/reply and the service, taking turns in
/// rounds; rates and percentiles are over all the rounds.
#[derive(Debug, Serialize)]
pub struct ClientFigures {
    pub clients: usize,
    pub raw_requests_per_sec: f64,
    pub raw_latency: Percentiles,
    pub raw_failed: u64,
    /// The durable raw responder: raw request/reply, answered once a sled
    /// insert for the request is flushed (one flush for all waiting).
    pub durable_raw_requests_per_sec: f64,
    pub durable_raw_latency: Percentiles,
    pub durable_raw_failed: u64,
    pub acks: u64,
    pub acks_per_sec: f64,
    pub ack_latency: Percentiles,
    /// Sends answered with an error or not answered in time.
    pub failed: u64,
    pub first_failure: Option<String>,
    /// `reply_completed` events seen on NATS during the service's window.
    pub replies_per_sec: f64,
    /// Acknowledged sends whose reply had not been seen when a round's
    /// window ended, at most.
    pub replies_behind_at_end: u64,
    /// How long after a round's window its last reply was seen, at most.
    pub reply_drain_seconds: f64,
    /// Each round's acks/s over its raw requests/s, in the order measured.
    pub round_ratios: Vec<f64>,
    /// The median of `round_ratios` (with two rounds, their mean).
    pub ratio: f64,
    /// The median of the rounds' acks/s over their durable raw requests/s.
    pub ratio_to_durable_raw: f64,
    pub raw_cpu: CpuPerRequest,
    pub durable_raw_cpu: CpuPerRequest,
    pub service_cpu: CpuPerRequest,
}

/// CPU time (user + system, 10 ms ticks) over a window, per answered request.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuPerRequest {
    /// This process: the clients, and the raw responder or the service.
    pub this_process_us: f64,
    pub nats_server_us: f64,
}

#[derive(Debug, Serialize)]
pub struct ThroughputTarget {
    pub clients: usize,
    pub acks_per_sec: f64,
    pub raw_requests_per_sec: f64,
    /// `acks_per_sec / raw_requests_per_sec`.
    pub ratio: f64,
    pub target_ratio: f64,
    pub pass: bool,
    /// Beside the target, not part of it: the durable raw responder's rate
    /// and acks/s over it.
    pub durable_raw_requests_per_sec: f64,
    pub ratio_to_durable_raw: f64,
}

impl ThroughputTarget {
    fn of(run: &ClientFigures) -> ThroughputTarget {
        ThroughputTarget {
            clients: run.clients,
            acks_per_sec: run.acks_per_sec,
            raw_requests_per_sec: run.raw_requests_per_sec,
            ratio: run.ratio,
            target_ratio: ACK_TARGET_RATIO,
            pass: run.ratio >= ACK_TARGET_RATIO,
            durable_raw_requests_per_sec: run.durable_raw_requests_per_sec,
            ratio_to_durable_raw: run.ratio_to_durable_raw,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct LatencyTarget {
    pub clients: usize,
    pub ack_p50_ms: f64,
    pub raw_p50_ms: f64,
    pub raw_flush_p50_ms: f64,
    /// `raw_p50_ms + raw_flush_p50_ms`: a send's floor.
    pub floor_p50_ms: f64,
    /// `ack_p50_ms / floor_p50_ms`.
    pub ratio: f64,
    pub target_ratio: f64,
    pub pass: bool,
    /// Beside the target, not part of it: the durable raw responder's p50
    /// and `ack_p50_ms` over it.
    pub durable_raw_p50_ms: f64,
    pub ratio_to_durable_raw: f64,
}

impl LatencyTarget {
    fn of(run: &ClientFigures, raw_flush: &FlushFigures) -> LatencyTarget {
        let floor_p50_ms = run.raw_latency.p50_ms + raw_flush.latency.p50_ms;
        let ratio = share(run.ack_latency.p50_ms, floor_p50_ms);
        LatencyTarget {
            clients: run.clients,
            ack_p50_ms: run.ack_latency.p50_ms,
            raw_p50_ms: run.raw_latency.p50_ms,
            raw_flush_p50_ms: raw_flush.latency.p50_ms,
            floor_p50_ms,
            ratio,
            target_ratio: P50_TARGET_RATIO,
            pass: ratio <= P50_TARGET_RATIO,
            durable_raw_p50_ms: run.durable_raw_latency.p50_ms,
            ratio_to_durable_raw: share(run.ack_latency.p50_ms, run.durable_raw_latency.p50_ms),
        }
    }
}

pub fn run(settings: &Settings, args: NatsBenchArgs) -> anyhow::Result<ExitCode> {
    let scratch = Scratch::new("nats")?;
    let report = measure(&args, &scratch.path, settings.json)?;
    if settings.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs every measurement in `dir`; prints each figure as it is measured
/// unless `quiet`, and shows progress on stderr when it is a terminal.
pub fn measure(args: &NatsBenchArgs, dir: &Path, quiet: bool) -> anyhow::Result<NatsBenchReport> {
    let bar = progress_bar(quiet);
    let show = |line: String| {
        if !quiet {
            bar.suspend(|| println!("{line}"));
        }
    };
    let window = Duration::from_secs_f64(args.duration_secs);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let nats = NatsServerProcess::start(&dir.join("nats-server.log"))?;
    let nats_server = nats.bin.display().to_string();
    show(format!(
        "bench nats: clients {} over {} NATS connections; {} s per measurement, raw and service taking turns in {} rounds; sends to {} conversations (echo agent)\n  nats-server {} on {}; in {}",
        args.clients.iter().map(usize::to_string).collect::<Vec<_>>().join(","),
        args.connections,
        args.duration_secs,
        args.rounds,
        thousands(args.conversations as f64),
        nats_server,
        nats.url(),
        dir.display()
    ));

    // First, while the heap is fresh (see `memory`).
    counting(&bar);
    let memory = runtime.block_on(memory::measure(&dir.join("memory"), args.actors, &bar))?;
    show(format!(
        "memory ({} live conversation actors, one send each; RSS of this process, now {:.0} MiB)",
        thousands(memory.actors as f64),
        mib(memory.rss_after_bytes)
    ));
    show(format!(
        "  {:<36}{:>+9.1} MiB {:>7} bytes/conversation",
        "the same events in a log, no actors:",
        mib(memory.log_only_bytes),
        thousands(memory.log_only_bytes_per_conversation)
    ));
    show(format!(
        "  {:<36}{:>+9.1} MiB {:>7} bytes/actor ({} beyond the log alone; includes the registry's bookkeeping)",
        "registry + actors + their log:",
        mib(memory.with_actors_bytes),
        thousands(memory.bytes_per_actor),
        thousands(memory.bytes_per_actor_beyond_log)
    ));
    if memory.live_actors != memory.actors {
        show(format!(
            "  warning: the registry held {} actors after the fill, not {}",
            thousands(memory.live_actors as f64),
            thousands(memory.actors as f64)
        ));
    }

    let mut record = vec![0xa5; CHAIN_HASH_BYTES];
    record.extend_from_slice(&codec::encode(&workload::typical_envelope()));
    phase(&bar, "raw sled insert + flush".into());
    let mut flushed = load::raw_flushes(&dir.join("raw-flush"), &record, window)?;
    let raw_flush = FlushFigures {
        record_bytes: record.len(),
        flushes_per_sec: rate(flushed.ok, flushed.seconds),
        latency: Percentiles::of(&mut flushed.latencies),
    };
    show(format!(
        "raw sled insert + flush, one {}-byte record per flush: {} flushes/s, p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms",
        raw_flush.record_bytes,
        thousands(raw_flush.flushes_per_sec),
        raw_flush.latency.p50_ms,
        raw_flush.latency.p99_ms,
        raw_flush.latency.p999_ms
    ));

    let (warm_up_seconds, runs) = runtime.block_on(async {
        let mut config = ServerConfig::new(dir.join("data"));
        config.nats_url = Some(nats.url());
        let admin_key = format!("sb-bench-admin-{}", uuid::Uuid::new_v4().simple());
        config.admin_key = Some(admin_key.clone());
        config.prefix = PREFIX.to_owned();
        config.conversations.max_live = config.conversations.max_live.max(args.conversations);
        let server = Server::start(config)
            .await
            .context("the service did not start")?;
        let durable = requests::DurableRaw {
            path: &dir.join("durable-raw"),
            record: record.clone(),
        };
        let measured = requests::measure_requests(
            args,
            &nats.url(),
            nats.pid(),
            &admin_key,
            durable,
            &bar,
            &show,
        )
        .await;
        phase(&bar, "stopping the service".into());
        server.shutdown().await;
        measured
    })?;
    bar.finish_and_clear();
    drop(nats);

    let throughput_target = runs
        .iter()
        .find(|run| run.clients == THROUGHPUT_TARGET_CLIENTS)
        .map(ThroughputTarget::of);
    let latency_target = runs
        .iter()
        .find(|run| run.clients == LATENCY_TARGET_CLIENTS)
        .map(|run| LatencyTarget::of(run, &raw_flush));
    show("targets".into());
    show(match &throughput_target {
        Some(target) => format!(
            "  acks/s at {} clients >= {:.0}% of raw request/reply: {} vs {} ({:.0}%)  {}",
            target.clients,
            target.target_ratio * 100.0,
            thousands(target.acks_per_sec),
            thousands(target.raw_requests_per_sec),
            target.ratio * 100.0,
            mark(target.pass)
        ),
        None => format!(
            "  acks/s at {THROUGHPUT_TARGET_CLIENTS} clients: not measured (not in --clients)"
        ),
    });
    if let Some(target) = &throughput_target {
        show(format!(
            "    (beside the durable raw responder, not a target: {} vs {} ({:.0}%))",
            thousands(target.acks_per_sec),
            thousands(target.durable_raw_requests_per_sec),
            target.ratio_to_durable_raw * 100.0
        ));
    }
    show(match &latency_target {
        Some(target) => format!(
            "  p50 ack at {} client <= {:.1}x (raw request/reply + raw flush): {:.3} ms vs {:.3} + {:.3} = {:.3} ms ({:.2}x)  {}",
            target.clients,
            target.target_ratio,
            target.ack_p50_ms,
            target.raw_p50_ms,
            target.raw_flush_p50_ms,
            target.floor_p50_ms,
            target.ratio,
            mark(target.pass)
        ),
        None => format!(
            "  p50 ack at {LATENCY_TARGET_CLIENTS} client: not measured (not in --clients)"
        ),
    });
    if let Some(target) = &latency_target {
        show(format!(
            "    (beside the durable raw responder's p50, not a target: {:.3} ms vs {:.3} ms ({:.2}x))",
            target.ack_p50_ms, target.durable_raw_p50_ms, target.ratio_to_durable_raw
        ));
    }

    Ok(NatsBenchReport {
        clients: args.clients.clone(),
        connections: args.connections,
        seconds_per_measurement: args.duration_secs,
        rounds: args.rounds,
        conversations: args.conversations,
        nats_server,
        memory,
        raw_flush,
        warm_up_seconds,
        runs,
        throughput_target,
        latency_target,
    })
}

/// A progress bar on stderr, hidden when stderr is not a terminal or `--json`
/// is set (as `bench log`'s).
pub(crate) fn progress_bar(quiet: bool) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// Shows a timed phase: a spinner, `what` and the time spent on it.
pub(crate) fn phase(bar: &indicatif::ProgressBar, what: String) {
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .expect("the template is valid"),
    );
    bar.set_message(what);
    bar.reset_elapsed();
}

/// Shows a counted phase; its owner sets the length and the message.
fn counting(bar: &indicatif::ProgressBar) {
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} conversations ({per_sec}, eta {eta})",
        )
        .expect("the template is valid")
        .progress_chars("=> "),
    );
}

/// The bench's files: a fresh temporary directory, removed on drop.
pub(crate) struct Scratch {
    pub(crate) path: PathBuf,
}

impl Scratch {
    /// `switchboard-bench-<bench>-<pid>-<nanos>` in the temp dir.
    pub(crate) fn new(bench: &str) -> anyhow::Result<Scratch> {
        let path = std::env::temp_dir().join(format!(
            "switchboard-bench-{bench}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Scratch { path })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::median;

    /// Needs a nats-server (`scripts/setup`); fails, never skips, without one.
    #[test]
    fn a_tiny_run_reports_positive_consistent_figures() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let args = NatsBenchArgs {
            clients: vec![1, 4],
            duration_secs: 0.2,
            rounds: 2,
            conversations: 10,
            actors: 300,
            connections: 2,
        };
        let report = measure(&args, dir.path(), true).expect("the bench runs");

        assert_eq!(report.memory.live_actors, 300);
        // RSS growth itself can be 0 this small: the allocator reuses memory.
        assert!(report.memory.rss_after_bytes > 0, "{:?}", report.memory);
        assert!(report.raw_flush.flushes_per_sec > 0.0);
        assert!(report.raw_flush.latency.p50_ms > 0.0);
        assert_eq!(report.runs.len(), 2);
        for run in &report.runs {
            assert!(run.raw_requests_per_sec > 0.0, "{run:?}");
            assert!(run.acks > 0, "{run:?}");
            assert_eq!(run.failed, 0, "{run:?}");
            assert!(run.ack_latency.p50_ms > 0.0, "{run:?}");
            assert!(run.ack_latency.p50_ms <= run.ack_latency.p999_ms, "{run:?}");
            assert!(run.ratio > 0.0, "{run:?}");
            assert_eq!(run.round_ratios.len(), 2, "{run:?}");
            assert_eq!(run.ratio, median(&run.round_ratios), "{run:?}");
        }
        assert!(report.runs.iter().any(|run| run.replies_per_sec > 0.0));
        let latency = report
            .latency_target
            .as_ref()
            .expect("1 client was measured");
        assert!(latency.ratio > 0.0, "{latency:?}");
        assert!(report.throughput_target.is_none(), "64 clients were not");

        let json = serde_json::to_value(&report).expect("the report serializes");
        assert_eq!(json["runs"][1]["clients"], 4);
    }

    #[test]
    fn thousands_are_separated_and_keep_their_sign() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
        assert_eq!(thousands(-1_234.4), "-1,234");
        assert_eq!(thousands(-0.2), "0");
    }

    #[test]
    fn counts_must_be_positive() {
        assert_eq!(positive_count(" 16"), Ok(16));
        assert!(positive_count("0").is_err());
        assert!(positive_count("x").is_err());
    }
}
