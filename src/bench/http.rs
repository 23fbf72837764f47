//! `switchboard bench http`: the HTTP front over a real `nats-server`, beside
//! the NATS path it fronts, in one run (issue 4).
//!
//! - keyed sends: `POST /v1/conversations/{id}/messages` (202 once stored)
//!   from `--connections` HTTP/1.1 keep-alive connections, beside
//!   `sb.conv.<id>.send` from as many NATS clients measured just before —
//!   the front is a bus client, so the NATS path is its ceiling;
//! - history reads, with no target: a chat view's first page
//!   (`GET /v1/conversations/{id}?latest=true&limit=20`) of the baseline's
//!   conversations, beside `sb.conv.<id>.history` asking the same;
//! - streamed chat completions (`/v1/chat/completions`, `stream: true`)
//!   against the `echo` agent: whole streams per second and the time to the
//!   first chunk;
//! - the latency proxying adds: non-streamed `/v1/chat/completions` to an
//!   agent whose provider is a fake OpenAI-compatible server in this
//!   process, beside the same server called directly, both at a fixed
//!   offered rate ([`proxy`]).
//!
//! The service, the clients and the fake upstream share this process (and the
//! machine with `nats-server`), so the clients' own cost weighs on every side.
//! Before each measurement the process is let go quiet ([`settle`]), so none
//! is charged for the work the last one left behind.

mod clients;
mod proxy;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use switchboard::http::HttpConfig;
use switchboard::server::{AgentSpec, ProviderSpec, Server, ServerConfig};
use switchboard_actors::agent::AgentConfig;

use super::log::rate;
use super::nats::launcher::NatsServerProcess;
use super::nats::load::{self, Ask, Driven, Percentiles, ReplyCounter, Until, HISTORY_PAGE};
use super::nats::procfs;
use super::nats::requests::CpuMark;
use super::nats::{phase, progress_bar, CpuPerRequest, Scratch};
use super::{mark, positive_count, positive_seconds, share, thousands};
use crate::config::Settings;
use proxy::{FakeUpstream, LatencyLog, PacedFigures};

#[derive(Debug, clap::Args)]
pub struct HttpBenchArgs {
    /// Concurrent HTTP/1.1 keep-alive connections (and NATS clients for the
    /// baseline), each with one request at a time.
    #[arg(long, default_value_t = 64, value_parser = positive_count)]
    pub connections: usize,
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 5.0, value_parser = positive_seconds)]
    pub duration_secs: f64,
    /// Conversations each path's sends (and the streams) spread over: the
    /// NATS baseline and the HTTP sends each have this many of their own.
    #[arg(long, default_value_t = 1000, value_parser = positive_count)]
    pub conversations: usize,
    /// NATS connections the baseline's clients share (as `bench nats`).
    #[arg(long, default_value_t = 8, value_parser = positive_count)]
    pub nats_connections: usize,
    /// Chat completions per second offered for the proxy overhead.
    #[arg(long, default_value_t = 1000, value_parser = positive_count)]
    pub proxy_rate: usize,
    /// A lower rate measured next, where queueing does not dominate (lower
    /// still when switchboard did not sustain `--proxy-rate`).
    #[arg(long, default_value_t = 200, value_parser = positive_count)]
    pub proxy_low_rate: usize,
    /// Rounds each offered rate's seconds are split into, the direct and the
    /// proxied side taking turns, so that a slow spell of the machine weighs
    /// on both.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub proxy_rounds: u32,
    /// Also write every measured request of the proxy overhead to this file,
    /// one tab-separated line each: the path (direct or proxied), the offered
    /// rate, the round, when it was offered (µs into its round) and its
    /// latency (µs). Slow requests on consecutive ticks are a stall of the
    /// whole service; their times show whether stalls come at a steady period.
    #[arg(long)]
    pub latency_log: Option<std::path::PathBuf>,
}

/// HTTP acks/s >= this share of NATS acks/s.
const SEND_TARGET_RATIO: f64 = 0.6;
/// Added p99 of a proxied completion, at most, at [`PROXY_TARGET_RATE`].
const PROXY_TARGET_MS: f64 = 1.0;
/// The offered rate the proxy target is stated at.
const PROXY_TARGET_RATE: usize = 1000;
/// The subject prefix the service is started with.
const PREFIX: &str = "sb";
/// The agent whose provider is the fake upstream.
const PROXY_AGENT: &str = "proxy";
/// How long to wait for the replies of the sends before the next measurement.
const REPLY_DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything one run measured; `--json` prints it as one object.
#[derive(Debug, Serialize)]
pub struct HttpBenchReport {
    pub connections: usize,
    pub nats_connections: usize,
    pub seconds_per_measurement: f64,
    pub conversations: usize,
    pub nats_server: String,
    /// `/proc/loadavg` (1, 5, 15 minutes) before and after the run.
    pub load_before: Option<[f64; 3]>,
    pub load_after: Option<[f64; 3]>,
    pub nats_send: ClosedFigures,
    pub http_send: ClosedFigures,
    /// Not a target: a chat view's first page of history, over NATS and HTTP.
    pub history_reads: HistoryFigures,
    pub chat_stream: StreamFigures,
    pub send_target: SendTarget,
    /// At `--proxy-rate`, then at `--proxy-low-rate` (or lower, when
    /// switchboard did not sustain the first).
    pub proxy_runs: Vec<ProxyRun>,
    pub proxy_target: ProxyTarget,
}

/// History reads (`latest`, [`HISTORY_PAGE`] messages) of the NATS
/// baseline's conversations, at the sends' concurrency, with no target.
#[derive(Debug, Serialize)]
pub struct HistoryFigures {
    pub limit: usize,
    /// `sb.conv.<id>.history` over NATS: the baseline.
    pub nats: ClosedFigures,
    /// `GET /v1/conversations/{id}?latest=true&limit=`.
    pub http: ClosedFigures,
    /// `http.per_sec / nats.per_sec`.
    pub ratio: f64,
}

/// Closed-loop requests: each connection sends its next when answered.
#[derive(Debug, Serialize)]
pub struct ClosedFigures {
    pub ok: u64,
    pub per_sec: f64,
    pub latency: Percentiles,
    pub failed: u64,
    pub first_failure: Option<String>,
    pub cpu: CpuPerRequest,
}

impl ClosedFigures {
    /// Of `driven`, which ran since `cpu` was marked.
    fn of(mut driven: Driven, cpu: CpuMark, nats_pid: u32) -> ClosedFigures {
        ClosedFigures {
            cpu: cpu.per_request(nats_pid, driven.ok),
            ok: driven.ok,
            per_sec: rate(driven.ok, driven.seconds),
            latency: Percentiles::of(&mut driven.latencies),
            failed: driven.failed,
            first_failure: driven.first_failure,
        }
    }
}

/// Streamed chat completions that ended `data: [DONE]` without an error.
#[derive(Debug, Serialize)]
pub struct StreamFigures {
    pub streams: ClosedFigures,
    /// From the request to the first `data:` chunk.
    pub first_chunk: Percentiles,
}

#[derive(Debug, Serialize)]
pub struct SendTarget {
    pub http_acks_per_sec: f64,
    pub nats_acks_per_sec: f64,
    /// `http_acks_per_sec / nats_acks_per_sec`.
    pub ratio: f64,
    pub target_ratio: f64,
    pub pass: bool,
}

/// One offered rate: the upstream called directly, then through switchboard.
#[derive(Debug, Serialize)]
pub struct ProxyRun {
    pub offered_per_sec: usize,
    pub direct: PacedFigures,
    pub proxied: PacedFigures,
    /// Of the pooled rounds.
    pub added_p50_ms: f64,
    /// The median of the rounds' own, [`Self::round_added_p99_ms`].
    pub added_p99_ms: f64,
    pub round_added_p99_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct ProxyTarget {
    pub offered_per_sec: usize,
    pub added_p99_ms: f64,
    pub target_ms: f64,
    /// Both sides completed the offered rate.
    pub sustained: bool,
    pub pass: bool,
}

pub fn run(settings: &Settings, args: HttpBenchArgs) -> anyhow::Result<ExitCode> {
    let scratch = Scratch::new("http")?;
    let report = measure(&args, &scratch.path, settings.json)?;
    if settings.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs every measurement in `dir`; prints each figure as it is measured
/// unless `quiet`, and shows progress on stderr when it is a terminal.
pub fn measure(
    args: &HttpBenchArgs,
    dir: &std::path::Path,
    quiet: bool,
) -> anyhow::Result<HttpBenchReport> {
    let bar = progress_bar(quiet);
    let show = |line: String| {
        if !quiet {
            bar.suspend(|| println!("{line}"));
        }
    };
    let window = Duration::from_secs_f64(args.duration_secs);
    let load_before = load_average();
    let mut latency_log = args
        .latency_log
        .as_deref()
        .map(LatencyLog::create)
        .transpose()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let nats = NatsServerProcess::start(&dir.join("nats-server.log"))?;
    let nats_server = nats.bin.display().to_string();

    let report = runtime.block_on(async {
        let upstream = FakeUpstream::start().await?;
        let admin_key = format!("sb-bench-admin-{}", uuid::Uuid::new_v4().simple());
        let server = start_service(dir, &nats.url(), &admin_key, &upstream).await?;
        let front = server.http_addr().context("the HTTP front did not start")?;
        let base = format!("http://{front}");
        show(format!(
            "bench http: {} HTTP/1.1 keep-alive connections (NATS baseline: {} clients over {} \
             NATS connections); {} s per measurement; {} conversations per path (echo agent)",
            args.connections,
            args.connections,
            args.nats_connections,
            args.duration_secs,
            thousands(args.conversations as f64),
        ));
        show(format!(
            "  nats-server {nats_server} on {}; HTTP front on {front}; fake upstream on {}; in {}",
            nats.url(),
            upstream.base_url(),
            dir.display(),
        ));
        show(format!("  load average before: {}", loads(load_before)));
        let running = Running {
            nats_url: nats.url(),
            nats_pid: nats.pid(),
            base,
            admin_key,
            upstream: &upstream,
        };
        let measured = measure_all(args, &running, window, &bar, &show, &mut latency_log).await;
        phase(&bar, "stopping the service".into());
        server.shutdown().await;
        upstream.stop().await;
        measured
    })?;
    bar.finish_and_clear();
    drop(nats);
    let load_after = load_average();
    show(format!("load average after: {}", loads(load_after)));

    let (nats_send, http_send, history_reads, chat_stream, proxy_runs) = report;
    let send_target = SendTarget {
        http_acks_per_sec: http_send.per_sec,
        nats_acks_per_sec: nats_send.per_sec,
        ratio: share(http_send.per_sec, nats_send.per_sec),
        target_ratio: SEND_TARGET_RATIO,
        pass: share(http_send.per_sec, nats_send.per_sec) >= SEND_TARGET_RATIO,
    };
    let first = proxy_runs.first().context("the proxy was not measured")?;
    let sustained = first.direct.sustained && first.proxied.sustained;
    let proxy_target = ProxyTarget {
        offered_per_sec: first.offered_per_sec,
        added_p99_ms: first.added_p99_ms,
        target_ms: PROXY_TARGET_MS,
        sustained,
        pass: sustained
            && first.offered_per_sec >= PROXY_TARGET_RATE
            && first.added_p99_ms <= PROXY_TARGET_MS,
    };
    show("targets".into());
    show(format!(
        "  HTTP sends >= {:.0}% of NATS sends at {} connections: {} vs {} acks/s ({:.0}%)  {}",
        SEND_TARGET_RATIO * 100.0,
        args.connections,
        thousands(send_target.http_acks_per_sec),
        thousands(send_target.nats_acks_per_sec),
        send_target.ratio * 100.0,
        mark(send_target.pass)
    ));
    show(format!(
        "  added p99 of proxying <= {PROXY_TARGET_MS} ms at {PROXY_TARGET_RATE}/s: {:+.3} ms at \
         {}/s offered{}  {}",
        proxy_target.added_p99_ms,
        proxy_target.offered_per_sec,
        if sustained { "" } else { " (not sustained)" },
        mark(proxy_target.pass)
    ));

    Ok(HttpBenchReport {
        connections: args.connections,
        nats_connections: args.nats_connections,
        seconds_per_measurement: args.duration_secs,
        conversations: args.conversations,
        nats_server,
        load_before,
        load_after,
        nats_send,
        http_send,
        history_reads,
        chat_stream,
        send_target,
        proxy_runs,
        proxy_target,
    })
}

/// The service on `nats_url`, with the HTTP front on a free loopback port
/// and, beside the default `echo` agent, [`PROXY_AGENT`] in front of `upstream`.
async fn start_service(
    dir: &std::path::Path,
    nats_url: &str,
    admin_key: &str,
    upstream: &FakeUpstream,
) -> anyhow::Result<Server> {
    let mut config = ServerConfig::new(dir.join("data"));
    config.nats_url = Some(nats_url.to_owned());
    config.admin_key = Some(admin_key.to_owned());
    config.prefix = PREFIX.to_owned();
    config.http = Some(HttpConfig::new(SocketAddr::from(([127, 0, 0, 1], 0))));
    config.agents.push(AgentSpec {
        config: AgentConfig::new(PROXY_AGENT),
        provider: ProviderSpec::OpenAi {
            base_url: upstream.base_url(),
            model: proxy::UPSTREAM_MODEL.to_owned(),
            api_key: None,
        },
    });
    // Every proxied completion starts a conversation: keep them all live.
    config.conversations.max_live = config.conversations.max_live.max(200_000);
    Server::start(config)
        .await
        .context("the service did not start")
}

type Measured = (
    ClosedFigures,
    ClosedFigures,
    HistoryFigures,
    StreamFigures,
    Vec<ProxyRun>,
);

/// What the measurements run against.
struct Running<'a> {
    nats_url: String,
    nats_pid: u32,
    /// `http://<the front's address>`.
    base: String,
    admin_key: String,
    upstream: &'a FakeUpstream,
}

/// Against a started service: the sends, the streams, then the proxy.
async fn measure_all(
    args: &HttpBenchArgs,
    running: &Running<'_>,
    window: Duration,
    bar: &indicatif::ProgressBar,
    show: &impl Fn(String),
    latency_log: &mut Option<LatencyLog>,
) -> anyhow::Result<Measured> {
    let (url, base, nats_pid) = (
        running.nats_url.as_str(),
        running.base.as_str(),
        running.nats_pid,
    );
    let key = clients::issue_key(base, &running.admin_key).await?;
    let buses = load::connect(url, args.nats_connections).await?;
    let replies = ReplyCounter::start(url, PREFIX).await?;

    // Every conversation's first send spawns its actor: done once, unmeasured.
    // The NATS baseline and the HTTP sends each get `args.conversations` of
    // their own (the HTTP sends the second half): a turn's cost grows with
    // its conversation's history, so sharing them would hand the HTTP sends,
    // measured second, conversations the baseline had already lengthened.
    let warmed = 2 * args.conversations;
    phase(
        bar,
        format!("warm-up: one send to each of {warmed} conversations"),
    );
    let warm = load::drive(
        &buses,
        PREFIX,
        &key,
        args.connections,
        warmed,
        Until::OnePass,
        "warm",
    )
    .await?;
    anyhow::ensure!(
        warm.failed == 0,
        "the warm-up failed: {}",
        warm.first_failure.as_deref().unwrap_or("?")
    );
    let mut acked = warm.ok;
    replies.wait_for(acked, REPLY_DRAIN_TIMEOUT).await;
    show(format!(
        "warm-up: one send to each of {} conversations in {:.2} s",
        thousands(warmed as f64),
        warm.seconds
    ));

    show(format!(
        "keyed sends at {} connections, acked once stored",
        args.connections
    ));
    show(format!(
        "  {:<46} | {:>10} {:>8} {:>8} {:>8} | {:>6} | {}",
        "path", "acks/s", "p50 ms", "p99 ms", "p99.9 ms", "failed", CPU_HEADER
    ));
    phase(bar, format!("NATS sends, {} clients", args.connections));
    let nats = closed(
        nats_pid,
        load::drive(
            &buses,
            PREFIX,
            &key,
            args.connections,
            args.conversations,
            Until::Elapsed(window),
            "nats",
        ),
    )
    .await?;
    acked += nats.ok;
    show(closed_line(
        &format!("NATS {PREFIX}.conv.<id>.send (baseline)"),
        &nats,
    ));
    phase(bar, "waiting for the replies of the NATS sends".into());
    replies.wait_for(acked, REPLY_DRAIN_TIMEOUT).await;

    phase(bar, format!("HTTP sends, {} connections", args.connections));
    let http = closed(
        nats_pid,
        clients::sends(base, &key, args.connections, args.conversations, window),
    )
    .await?;
    acked += http.ok;
    show(closed_line(
        "HTTP POST /v1/conversations/{id}/messages",
        &http,
    ));
    show(format!(
        "  HTTP/NATS: {:.0}%",
        share(http.per_sec, nats.per_sec) * 100.0
    ));
    phase(bar, "waiting for the replies of the HTTP sends".into());
    replies.wait_for(acked, REPLY_DRAIN_TIMEOUT).await;

    show(format!(
        "history reads (the newest {HISTORY_PAGE} messages: a chat view's first page) at {} connections",
        args.connections
    ));
    show(format!(
        "  {:<46} | {:>10} {:>8} {:>8} {:>8} | {:>6} | {}",
        "path", "reads/s", "p50 ms", "p99 ms", "p99.9 ms", "failed", CPU_HEADER
    ));
    phase(
        bar,
        format!("NATS history reads, {} clients", args.connections),
    );
    let nats_reads = closed(
        nats_pid,
        load::drive_asking(
            &buses,
            PREFIX,
            &key,
            args.connections,
            args.conversations,
            Until::Elapsed(window),
            "history",
            Ask::History,
        ),
    )
    .await?;
    show(closed_line(
        &format!("NATS {PREFIX}.conv.<id>.history (baseline)"),
        &nats_reads,
    ));
    phase(
        bar,
        format!("HTTP history reads, {} connections", args.connections),
    );
    let http_reads = closed(
        nats_pid,
        clients::history_reads(base, &key, args.connections, args.conversations, window),
    )
    .await?;
    show(closed_line("HTTP GET /v1/conversations/{id}", &http_reads));
    let history_reads = HistoryFigures {
        limit: HISTORY_PAGE,
        ratio: share(http_reads.per_sec, nats_reads.per_sec),
        nats: nats_reads,
        http: http_reads,
    };
    show(format!(
        "  HTTP/NATS: {:.0}% (no target)",
        history_reads.ratio * 100.0
    ));
    // Only the sends need the reply counter and the baseline's connections.
    // Kept, the counter had every later turn's `reply_completed` delivered
    // to this process, and the streams and the proxy pay for that.
    drop(replies);
    drop(buses);

    phase(
        bar,
        format!(
            "streamed chat completions, {} connections",
            args.connections
        ),
    );
    settle().await;
    let cpu = CpuMark::now(nats_pid);
    let (streams, mut first_chunks) =
        clients::streams(base, &key, args.connections, args.conversations, window).await?;
    let chat_stream = StreamFigures {
        streams: ClosedFigures::of(streams, cpu, nats_pid),
        first_chunk: Percentiles::of(&mut first_chunks),
    };
    show(format!(
        "streamed chat completions (POST /v1/chat/completions, stream: true, echo) at {} \
         connections",
        args.connections
    ));
    show(format!(
        "  {:<46} | {:>10} {:>8} {:>8} {:>8} | {:>6} | {}",
        "", "streams/s", "p50 ms", "p99 ms", "p99.9 ms", "failed", CPU_HEADER
    ));
    show(closed_line(
        "whole streams, to data: [DONE]",
        &chat_stream.streams,
    ));
    show(format!(
        "  {:<46} | {:>10} {:>8.3} {:>8.3} {:>8.3} |",
        "time to the first chunk",
        "",
        chat_stream.first_chunk.p50_ms,
        chat_stream.first_chunk.p99_ms,
        chat_stream.first_chunk.p999_ms
    ));

    show(format!(
        "proxy overhead: non-streamed /v1/chat/completions (model {PROXY_AGENT:?}, the agent's \
         default limits) beside the same upstream called directly; open-loop, fixed offered rate"
    ));
    show(format!(
        "  {:>8} {:<22} | {:>9} {:>9} | {:>8} {:>8} {:>8} | {:>6} {:>7} | {}",
        "offered",
        "path",
        "sent/s",
        "done/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "failed",
        "skipped",
        CPU_HEADER
    ));
    let mut proxy_runs = Vec::new();
    let mut offered = args.proxy_rate;
    loop {
        let (upstream, rounds) = (running.upstream, args.proxy_rounds);
        let log = latency_log.as_mut();
        let run = proxy::measure(
            base, &key, upstream, nats_pid, offered, window, rounds, bar, log,
        )
        .await?;
        show(proxy::line(offered, "direct to the upstream", &run.direct));
        show(proxy::line(offered, "through switchboard", &run.proxied));
        let by_round: Vec<String> = run
            .round_added_p99_ms
            .iter()
            .map(|ms| format!("{ms:+.3}"))
            .collect();
        show(format!(
            "  {:>8} added: p50 {:+.3} ms, p99 {:+.3} ms (median of the rounds: {} ms)",
            "",
            run.added_p50_ms,
            run.added_p99_ms,
            by_round.join(", ")
        ));
        let lower = proxy::sustainable_below(&run)
            .map_or(args.proxy_low_rate, |lower| lower.min(args.proxy_low_rate));
        proxy_runs.push(run);
        if proxy_runs.len() > 1 || lower >= offered {
            break;
        }
        offered = lower;
    }
    Ok((nats, http, history_reads, chat_stream, proxy_runs))
}

/// One closed-loop measurement: `run` once the process is quiet
/// ([`settle`]), with the CPU spent meanwhile. (`run` is a future, so it
/// starts only then.)
async fn closed(
    nats_pid: u32,
    run: impl std::future::Future<Output = anyhow::Result<Driven>>,
) -> anyhow::Result<ClosedFigures> {
    settle().await;
    let cpu = CpuMark::now(nats_pid);
    let driven = run.await?;
    Ok(ClosedFigures::of(driven, cpu, nats_pid))
}

fn closed_line(path: &str, f: &ClosedFigures) -> String {
    let mut line = format!(
        "  {:<46} | {:>10} {:>8.3} {:>8.3} {:>8.3} | {:>6} | {}",
        path,
        thousands(f.per_sec),
        f.latency.p50_ms,
        f.latency.p99_ms,
        f.latency.p999_ms,
        f.failed,
        cpu_cell(&f.cpu)
    );
    if let Some(first) = &f.first_failure {
        line.push_str(&format!("\n    first failure: {first}"));
    }
    line
}

/// The load averages of `/proc/loadavg`; `None` off Linux.
fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut fields = text.split_whitespace().map(|field| field.parse().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

fn loads(load: Option<[f64; 3]>) -> String {
    match load {
        Some([one, five, fifteen]) => format!("{one:.2} {five:.2} {fifteen:.2} (1, 5, 15 min)"),
        None => "unknown".into(),
    }
}

/// The CPU column's title: [`cpu_cell`]'s figures.
const CPU_HEADER: &str = "CPU µs/req: here + nats-server";

/// CPU per request of this process (service, clients, fake upstream) and of
/// `nats-server`.
fn cpu_cell(cpu: &CpuPerRequest) -> String {
    format!(
        "{:>5} + {:>4}",
        thousands(cpu.this_process_us),
        thousands(cpu.nats_server_us)
    )
}

/// This process is quiet when it used less than this share of one core over
/// [`QUIET_SPAN`]: the work a measurement left behind (projections, the
/// outbox, passivation) is done.
const QUIET_SHARE: f64 = 0.1;
const QUIET_SPAN: Duration = Duration::from_millis(500);
/// Give up waiting for quiet after this long, and measure anyway.
const QUIET_TIMEOUT: Duration = Duration::from_secs(15);

/// Waits until this process is quiet (see [`QUIET_SHARE`]), so the next
/// measurement is not charged for the last one's leftovers.
pub(super) async fn settle() {
    let deadline = std::time::Instant::now() + QUIET_TIMEOUT;
    while std::time::Instant::now() < deadline {
        let before = procfs::cpu_seconds(None).unwrap_or(0.0);
        tokio::time::sleep(QUIET_SPAN).await;
        if procfs::cpu_seconds(None).unwrap_or(0.0) - before
            < QUIET_SPAN.as_secs_f64() * QUIET_SHARE
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs a nats-server (`scripts/setup`); fails, never skips, without one.
    #[test]
    fn a_tiny_run_reports_positive_consistent_figures() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let args = HttpBenchArgs {
            connections: 4,
            duration_secs: 0.3,
            conversations: 10,
            nats_connections: 2,
            proxy_rate: 50,
            proxy_low_rate: 20,
            proxy_rounds: 2,
            latency_log: Some(dir.path().join("latencies.tsv")),
        };
        let report = measure(&args, dir.path(), true).expect("the bench runs");

        for sends in [
            &report.nats_send,
            &report.http_send,
            &report.chat_stream.streams,
        ] {
            assert!(sends.ok > 0, "{sends:?}");
            assert_eq!(sends.failed, 0, "{sends:?}");
            assert!(sends.latency.p50_ms > 0.0, "{sends:?}");
        }
        let streams = &report.chat_stream;
        assert!(streams.first_chunk.p50_ms > 0.0, "{streams:?}");
        assert!(streams.first_chunk.p50_ms <= streams.streams.latency.p999_ms);
        assert!(report.send_target.ratio > 0.0);
        assert_eq!(report.proxy_runs.len(), 2, "{:?}", report.proxy_runs);
        // The low rate, or lower still when the first rate was not sustained:
        // in a 0.3 s window a few slow answers are enough for that.
        let low = proxy::sustainable_below(&report.proxy_runs[0]).map_or(20, |lower| lower.min(20));
        assert_eq!(
            report.proxy_runs[1].offered_per_sec, low,
            "{:?}",
            report.proxy_runs[0].proxied
        );
        assert!((10..=20).contains(&low));
        for run in &report.proxy_runs {
            assert_eq!(run.round_added_p99_ms.len(), 2, "{run:?}");
            for side in [&run.direct, &run.proxied] {
                assert!(side.ok > 0, "{side:?}");
                assert_eq!(side.failed, 0, "{side:?}");
            }
        }
        let json = serde_json::to_value(&report).expect("the report serializes");
        assert_eq!(json["proxy_target"]["offered_per_sec"], 50);

        // A line for every answered request of the rounds, none for the
        // warm-ups, each offered within its round.
        let log = std::fs::read_to_string(dir.path().join("latencies.tsv")).expect("the log");
        let mut lines = log.lines();
        assert_eq!(
            lines.next(),
            Some("path\toffered_per_sec\tround\toffered_at_us\tlatency_us")
        );
        let rows: Vec<Vec<&str>> = lines.map(|line| line.split('\t').collect()).collect();
        for run in &report.proxy_runs {
            for (path, side) in [("direct", &run.direct), ("proxied", &run.proxied)] {
                let offered = run.offered_per_sec.to_string();
                let logged = rows
                    .iter()
                    .filter(|row| row[0] == path && row[1] == offered)
                    .collect::<Vec<_>>();
                assert_eq!(logged.len() as u64, side.ok, "{path} at {offered}/s");
                for row in logged {
                    let round: u32 = row[2].parse().expect("a round");
                    let at: u64 = row[3].parse().expect("a time");
                    let latency: u64 = row[4].parse().expect("a latency");
                    assert!((1..=2).contains(&round), "{row:?}");
                    assert!(at < 150_000 + 20_000, "{row:?}");
                    assert!(latency > 0, "{row:?}");
                }
            }
        }
    }
}
