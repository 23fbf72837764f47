//! The request/reply half of `bench nats`: against a started service, one
//! warm-up send to every conversation, then at each client count plain NATS
//! request/reply, the durable raw responder (request/reply plus a
//! group-committed sled insert and flush) and the service's sends, from the
//! same clients over the same connections, with the CPU each side spent per
//! request.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use switchboard::bus::{Bus, Headers};

use super::load::{
    self, Driven, Percentiles, ReplyCounter, Responder, Until, DURABLE_PREFIX, RAW_PREFIX,
};
use super::{phase, procfs, ClientFigures, CpuPerRequest, NatsBenchArgs, PREFIX};
use crate::bench::log::rate;
use crate::bench::{median, share, thousands};

/// How long to wait for the replies of one measurement before the next.
const REPLY_DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Replies still coming this long after a window are reported.
const REPLIES_LATE: Duration = Duration::from_millis(500);

/// What the durable raw responder stores: a sled database of its own in
/// `path`, `record` per request (the raw flush's).
pub struct DurableRaw<'a> {
    pub path: &'a Path,
    pub record: Vec<u8>,
}

/// Against a started service: issues a chat key, starts every conversation
/// once, then measures raw request/reply, the durable raw responder and the
/// service at each client count.
pub async fn measure_requests(
    args: &NatsBenchArgs,
    url: &str,
    nats_pid: u32,
    admin_key: &str,
    durable: DurableRaw<'_>,
    bar: &indicatif::ProgressBar,
    show: &impl Fn(String),
) -> anyhow::Result<(f64, Vec<ClientFigures>)> {
    let window = Duration::from_secs_f64(args.duration_secs);
    let buses = load::connect(url, args.connections).await?;
    let key = issue_key(&buses[0], admin_key).await?;
    let _raw = Responder::raw(url).await?;
    let _durable = Responder::durable(url, durable.path, durable.record).await?;
    let replies = ReplyCounter::start(url, PREFIX).await?;
    let widest = args.clients.iter().copied().max().unwrap_or(1);

    // Every conversation's first send spawns its actor and starts it:
    // done once, unmeasured, so each measurement sees live conversations.
    phase(
        bar,
        format!(
            "warm-up: one send to each of {} conversations",
            args.conversations
        ),
    );
    let warm = load::drive(
        &buses,
        PREFIX,
        &key,
        widest,
        args.conversations,
        Until::OnePass,
        "warm",
    )
    .await?;
    ensure_answered(&warm, "the warm-up")?;
    let mut acked = warm.ok;
    let (drained, _) = replies.wait_for(acked, REPLY_DRAIN_TIMEOUT).await;
    show(format!(
        "warm-up: one send to each of {} conversations in {:.2} s; their replies in {:.2} s more",
        thousands(args.conversations as f64),
        warm.seconds,
        drained.as_secs_f64()
    ));

    show(format!(
        "request/reply (raw: plain NATS request/reply to a trivial responder; service: {PREFIX}.conv.<id>.send acked after the durable append)"
    ));
    show(
        "  (durable raw: raw request/reply answered once a sled insert for it is flushed, one flush for all requests waiting)"
            .into(),
    );
    show(
        "  (CPU \"here\" is this process: the clients, and the raw responder or the service)"
            .into(),
    );
    show(format!(
        "  {:>7} | {:>10} {:>8} {:>8} {:>8} | {:>10} {:>8} {:>8} {:>8} | {:>10} | {:>8}",
        "clients",
        "raw req/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "acks/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "replies/s",
        "acks/raw"
    ));
    let mut runs = Vec::new();
    let windows = Windows {
        buses: &buses,
        key: &key,
        conversations: args.conversations,
        slice: window / args.rounds,
        nats_pid,
    };
    for &clients in &args.clients {
        let (mut raw, mut durable, mut sent) =
            (Driven::default(), Driven::default(), Driven::default());
        let (mut raw_cpu, mut durable_cpu, mut service_cpu) = (
            CpuSpent::default(),
            CpuSpent::default(),
            CpuSpent::default(),
        );
        let (mut round_ratios, mut durable_round_ratios) = (Vec::new(), Vec::new());
        let (mut replies_in_windows, mut behind, mut drain, mut caught_up) =
            (0, 0, Duration::ZERO, true);
        for round in 1..=args.rounds {
            let of = format!("{clients} clients, round {round}/{}", args.rounds);
            phase(bar, format!("raw request/reply, {of}"));
            let (raw_round, cpu) = windows
                .drive(RAW_PREFIX, clients, format!("raw{clients}-{round}"))
                .await?;
            ensure_answered(&raw_round, "raw request/reply")?;
            raw_cpu.add(cpu);

            phase(bar, format!("durable raw request/reply, {of}"));
            let (durable_round, cpu) = windows
                .drive(DURABLE_PREFIX, clients, format!("durable{clients}-{round}"))
                .await?;
            ensure_answered(&durable_round, "durable raw request/reply")?;
            durable_cpu.add(cpu);

            phase(bar, format!("service sends, {of}"));
            let replies_before = replies.seen();
            let (sent_round, cpu) = windows
                .drive(PREFIX, clients, format!("c{clients}-{round}"))
                .await?;
            replies_in_windows += replies.seen().saturating_sub(replies_before);
            service_cpu.add(cpu);
            ensure_answered(&sent_round, "the service")?;
            acked += sent_round.ok;
            behind = behind.max(acked.saturating_sub(replies.seen()));
            // Every reply comes before the next round, so the service's
            // leftover work never falls in a raw window.
            phase(bar, format!("waiting for the replies of {of}"));
            let (drained, all_came) = replies.wait_for(acked, REPLY_DRAIN_TIMEOUT).await;
            drain = drain.max(drained);
            caught_up &= all_came;
            let acks_per_sec = rate(sent_round.ok, sent_round.seconds);
            round_ratios.push(share(acks_per_sec, rate(raw_round.ok, raw_round.seconds)));
            durable_round_ratios.push(share(
                acks_per_sec,
                rate(durable_round.ok, durable_round.seconds),
            ));
            raw.absorb(raw_round);
            durable.absorb(durable_round);
            sent.absorb(sent_round);
        }

        let figures = ClientFigures {
            clients,
            raw_requests_per_sec: rate(raw.ok, raw.seconds),
            raw_latency: Percentiles::of(&mut raw.latencies),
            raw_failed: raw.failed,
            durable_raw_requests_per_sec: rate(durable.ok, durable.seconds),
            durable_raw_latency: Percentiles::of(&mut durable.latencies),
            durable_raw_failed: durable.failed,
            acks: sent.ok,
            acks_per_sec: rate(sent.ok, sent.seconds),
            ack_latency: Percentiles::of(&mut sent.latencies),
            failed: sent.failed,
            first_failure: sent.first_failure.take(),
            replies_per_sec: rate(replies_in_windows, sent.seconds),
            replies_behind_at_end: behind,
            reply_drain_seconds: drain.as_secs_f64(),
            ratio: median(&round_ratios),
            round_ratios,
            ratio_to_durable_raw: median(&durable_round_ratios),
            raw_cpu: raw_cpu.per_request(raw.ok),
            durable_raw_cpu: durable_cpu.per_request(durable.ok),
            service_cpu: service_cpu.per_request(sent.ok),
        };
        show(client_line(&figures));
        show(format!(
            "    durable raw: {} req/s, p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms; acks/durable raw {:.0}%; CPU per request {} µs here + {} µs nats-server",
            thousands(figures.durable_raw_requests_per_sec),
            figures.durable_raw_latency.p50_ms,
            figures.durable_raw_latency.p99_ms,
            figures.durable_raw_latency.p999_ms,
            figures.ratio_to_durable_raw * 100.0,
            thousands(figures.durable_raw_cpu.this_process_us),
            thousands(figures.durable_raw_cpu.nats_server_us),
        ));
        if figures.failed > 0 || figures.raw_failed > 0 || figures.durable_raw_failed > 0 {
            show(format!(
                "    {} sends, {} raw and {} durable raw requests failed; first: {}",
                figures.failed,
                figures.raw_failed,
                figures.durable_raw_failed,
                figures
                    .first_failure
                    .as_deref()
                    .or(raw.first_failure.as_deref())
                    .or(durable.first_failure.as_deref())
                    .unwrap_or("?")
            ));
        }
        show(format!(
            "    CPU per request: raw {} µs here + {} µs nats-server; service {} µs here + {} µs nats-server; acks/raw by round: {}",
            thousands(figures.raw_cpu.this_process_us),
            thousands(figures.raw_cpu.nats_server_us),
            thousands(figures.service_cpu.this_process_us),
            thousands(figures.service_cpu.nats_server_us),
            figures
                .round_ratios
                .iter()
                .map(|ratio| format!("{:.0}%", ratio * 100.0))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        if !caught_up || drain >= REPLIES_LATE {
            show(format!(
                "    {} replies were still to come when a round's window ended (at most); {} {:.2} s later",
                thousands(figures.replies_behind_at_end as f64),
                if caught_up {
                    "all came"
                } else {
                    "not all had come"
                },
                figures.reply_drain_seconds
            ));
        }
        runs.push(figures);
    }
    if replies.dropped() > 0 {
        show(format!(
            "  warning: the reply counter fell behind and NATS dropped {} of its messages; replies/s is low",
            replies.dropped()
        ));
    }
    Ok((warm.seconds, runs))
}

/// What every measured window of [`measure_requests`] shares: the clients'
/// connections and key, the conversations, the window's length.
struct Windows<'a> {
    buses: &'a [Bus],
    key: &'a str,
    conversations: usize,
    slice: Duration,
    nats_pid: u32,
}

impl Windows<'_> {
    /// `clients` clients sending to `{prefix}.conv.<id>.send` for one window
    /// (message ids starting with `run`), and the CPU spent meanwhile.
    async fn drive(
        &self,
        prefix: &str,
        clients: usize,
        run: String,
    ) -> anyhow::Result<(Driven, CpuSpent)> {
        let cpu = CpuMark::now(self.nats_pid);
        let driven = load::drive(
            self.buses,
            prefix,
            self.key,
            clients,
            self.conversations,
            Until::Elapsed(self.slice),
            &run,
        )
        .await?;
        Ok((driven, cpu.spent(self.nats_pid)))
    }
}

/// Issues the chat key the clients send with.
async fn issue_key(bus: &Bus, admin_key: &str) -> anyhow::Result<String> {
    let headers = Headers::new().with("Authorization", format!("Bearer {admin_key}"));
    let body = serde_json::to_vec(&json!({ "name": "bench" }))?;
    let reply = bus
        .request(
            &format!("{PREFIX}.admin.keys.issue"),
            headers,
            body,
            Duration::from_secs(30),
        )
        .await
        .context("issuing the bench's key")?;
    let reply: serde_json::Value =
        serde_json::from_slice(&reply.payload).context("the key issue reply is not JSON")?;
    reply["key"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("the key was not issued: {reply}"))
}

/// Fails the bench when nothing was answered: the figures would mean nothing.
fn ensure_answered(driven: &Driven, what: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        driven.ok > 0 || driven.failed == 0,
        "{what} answered none of {} requests; first failure: {}",
        driven.failed,
        driven.first_failure.as_deref().unwrap_or("?")
    );
    Ok(())
}

fn client_line(f: &ClientFigures) -> String {
    format!(
        "  {:>7} | {:>10} {:>8.3} {:>8.3} {:>8.3} | {:>10} {:>8.3} {:>8.3} {:>8.3} | {:>10} | {:>7.0}%",
        f.clients,
        thousands(f.raw_requests_per_sec),
        f.raw_latency.p50_ms,
        f.raw_latency.p99_ms,
        f.raw_latency.p999_ms,
        thousands(f.acks_per_sec),
        f.ack_latency.p50_ms,
        f.ack_latency.p99_ms,
        f.ack_latency.p999_ms,
        thousands(f.replies_per_sec),
        f.ratio * 100.0
    )
}

/// CPU seconds used so far by this process and by `nats-server`.
#[derive(Clone, Copy)]
pub(crate) struct CpuMark {
    this_process: f64,
    nats_server: f64,
}

impl CpuMark {
    pub(crate) fn now(nats_pid: u32) -> CpuMark {
        CpuMark {
            this_process: procfs::cpu_seconds(None).unwrap_or(0.0),
            nats_server: procfs::cpu_seconds(Some(nats_pid)).unwrap_or(0.0),
        }
    }

    /// Per request of `requests`, since `self`.
    pub(crate) fn per_request(self, nats_pid: u32, requests: u64) -> CpuPerRequest {
        self.spent(nats_pid).per_request(requests)
    }

    /// What each spent since `self`.
    pub(crate) fn spent(self, nats_pid: u32) -> CpuSpent {
        let now = CpuMark::now(nats_pid);
        CpuSpent {
            this_process: now.this_process - self.this_process,
            nats_server: now.nats_server - self.nats_server,
        }
    }
}

/// CPU seconds spent by this process and by `nats-server`, summed over windows.
#[derive(Clone, Copy, Default)]
pub(crate) struct CpuSpent {
    this_process: f64,
    nats_server: f64,
}

impl CpuSpent {
    pub(crate) fn add(&mut self, more: CpuSpent) {
        self.this_process += more.this_process;
        self.nats_server += more.nats_server;
    }

    pub(crate) fn per_request(self, requests: u64) -> CpuPerRequest {
        let per = |seconds: f64| share(seconds * 1e6, requests as f64);
        CpuPerRequest {
            this_process_us: per(self.this_process),
            nats_server_us: per(self.nats_server),
        }
    }
}
