//! The proxy half of `bench http`: what `/v1/chat/completions` adds in
//! front of an OpenAI-compatible server.
//!
//! The server is a fake in this process ([`FakeUpstream`]): it reads the
//! request and answers at once with a fixed streamed completion — the shape
//! the `openai` provider asks for — so what is left is the path, not a model.
//! The same requests are offered at a fixed rate, open-loop (a request is
//! sent on every tick whether or not the last was answered, and timed from
//! its tick, so a stall shows in the latencies instead of slowing the
//! offer), to the fake directly and to switchboard with `model` naming the
//! agent in front of it, not streamed, the two taking turns in rounds. The
//! difference of the percentiles is the added latency: the HTTP front, the
//! bus, the durable appends of the message and the reply, the turn, and the
//! provider's call. The added p99 is the median of the rounds' own: a stall
//! of the shared machine in one slice sets that slice's p99.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::http::header::CONTENT_TYPE;
use axum::routing::post;
use axum::serve::ListenerExt;
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::clients::{client, cut, CONTENT};
use super::PROXY_AGENT;
use crate::bench::log::rate;
use crate::bench::nats::load::Percentiles;
use crate::bench::nats::requests::{CpuMark, CpuSpent};
use crate::bench::nats::{phase, CpuPerRequest};
use crate::bench::{median, thousands};

/// The model the fake upstream says it is.
pub const UPSTREAM_MODEL: &str = "bench-model";
/// Requests in flight at once, at most; past it a tick is skipped.
const MAX_IN_FLIGHT: usize = 4096;
/// Unmeasured time at the offered rate before each measurement, so the
/// connection pools are filled and the conversations' code paths warm.
const WARM_UP: Duration = Duration::from_secs(1);
/// A side sustained the offered rate when it completed at least this share
/// of it, skipping none and failing none.
const SUSTAINED_SHARE: f64 = 0.95;
/// How long the requests in flight at the end of a window are waited for.
const TAIL_TIMEOUT: Duration = Duration::from_secs(60);

/// What the fake answers every request with: the role, the text, the finish
/// reason, the usage, `[DONE]`, as OpenAI streams a completion.
fn completion_stream() -> String {
    let chunk = |choices: serde_json::Value, usage: Option<serde_json::Value>| {
        let mut chunk = json!({
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": UPSTREAM_MODEL,
            "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        format!("data: {chunk}\n\n")
    };
    let choice = |delta: serde_json::Value, finish_reason: Option<&str>| {
        chunk(
            json!([{ "index": 0, "delta": delta, "finish_reason": finish_reason }]),
            None,
        )
    };
    let text = "Clauses 4.2 (liability) and 9 (termination) differ from the standard contract.";
    let usage = json!({ "prompt_tokens": 24, "completion_tokens": 17, "total_tokens": 41 });
    [
        choice(json!({ "role": "assistant", "content": "" }), None),
        choice(json!({ "content": text }), None),
        choice(json!({}), Some("stop")),
        chunk(json!([]), Some(usage)),
        "data: [DONE]\n\n".to_owned(),
    ]
    .concat()
}

/// A fake OpenAI-compatible server on a loopback port, in this process;
/// stop it with [`stop`](Self::stop).
pub struct FakeUpstream {
    base_url: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl FakeUpstream {
    pub async fn start() -> anyhow::Result<FakeUpstream> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("cannot bind the fake upstream")?;
        let addr = listener.local_addr()?;
        let completion = axum::body::Bytes::from(completion_stream());
        let app = axum::Router::new().route(
            "/v1/chat/completions",
            post(move |_request: axum::body::Bytes| async move {
                ([(CONTENT_TYPE, "text/event-stream")], completion)
            }),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            // As model servers do (uvicorn sets it): no delayed-ACK stalls.
            let listener = listener.tap_io(|stream| {
                let _ = stream.set_nodelay(true);
            });
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "the fake upstream stopped");
            }
        });
        Ok(FakeUpstream {
            base_url: format!("http://{addr}/v1"),
            stop,
            task,
        })
    }

    /// What an agent's `base_url` is set to.
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// One side at one offered rate.
#[derive(Debug, Serialize)]
pub struct PacedFigures {
    pub sent: u64,
    /// Ticks skipped because [`MAX_IN_FLIGHT`] requests were open.
    pub skipped: u64,
    pub ok: u64,
    pub failed: u64,
    pub first_failure: Option<String>,
    pub sent_per_sec: f64,
    /// Completed per second, from the first tick to the last answer.
    pub done_per_sec: f64,
    /// From each request's tick to its whole answer.
    pub latency: Percentiles,
    pub sustained: bool,
    /// Over the window and its tail.
    pub cpu: CpuPerRequest,
}

/// Both sides at `offered` requests per second, each after a warm-up, taking
/// turns in `rounds` slices of `window`, so that a slow spell of a shared
/// machine falls on both; each side's figures pool its slices.
/// Each measured request also goes to `log`, if given.
#[allow(clippy::too_many_arguments)]
pub async fn measure(
    base: &str,
    key: &str,
    upstream: &FakeUpstream,
    nats_pid: u32,
    offered: usize,
    window: Duration,
    rounds: u32,
    bar: &indicatif::ProgressBar,
    mut log: Option<&mut LatencyLog>,
) -> anyhow::Result<super::ProxyRun> {
    let sides = [Side::direct(upstream)?, Side::proxied(base, key)?];
    for side in &sides {
        phase(bar, format!("{} at {offered}/s: settling", side.name));
        super::settle().await;
        phase(bar, format!("{} at {offered}/s: warm-up", side.name));
        paced(side, offered, WARM_UP).await;
    }
    let slice = window / rounds;
    let mut pooled = [Paced::default(), Paced::default()];
    let mut round_added_p99_ms = Vec::new();
    for round in 1..=rounds {
        let mut p99_ms = [0.0; 2];
        for (i, (side, pool)) in sides.iter().zip(&mut pooled).enumerate() {
            phase(
                bar,
                format!(
                    "{} at {offered}/s, round {round} of {rounds}: settling",
                    side.name
                ),
            );
            super::settle().await;
            phase(
                bar,
                format!("{} at {offered}/s, round {round} of {rounds}", side.name),
            );
            let cpu = CpuMark::now(nats_pid);
            let mut measured = paced(side, offered, slice).await;
            measured.cpu = cpu.spent(nats_pid);
            if let Some(log) = log.as_deref_mut() {
                log.write(["direct", "proxied"][i], offered, round, &measured)?;
            }
            p99_ms[i] = Percentiles::of(&mut measured.latencies_ns()).p99_ms;
            pool.absorb(measured);
        }
        round_added_p99_ms.push(p99_ms[1] - p99_ms[0]);
    }
    let [direct, proxied] = pooled.map(|pool| pool.figures(offered));
    Ok(super::ProxyRun {
        offered_per_sec: offered,
        added_p50_ms: proxied.latency.p50_ms - direct.latency.p50_ms,
        // A stall of the machine in one side's slice (tens of ms at a few
        // hundred requests) sets that slice's p99, and would set the pooled
        // one: the median of the rounds stands.
        added_p99_ms: median(&round_added_p99_ms),
        round_added_p99_ms,
        direct,
        proxied,
    })
}

/// When switchboard did not sustain a run's rate: a lower one it should —
/// 70% of what it completed, in steps of 50 (10 at least).
pub fn sustainable_below(run: &super::ProxyRun) -> Option<usize> {
    if run.proxied.sustained {
        return None;
    }
    let lower = (run.proxied.done_per_sec * 0.7 / 50.0).floor() as usize * 50;
    Some(lower.max(10)).filter(|&lower| lower < run.offered_per_sec)
}

pub fn line(offered: usize, path: &str, f: &PacedFigures) -> String {
    let mut line = format!(
        "  {:>6}/s {:<22} | {:>9} {:>9} | {:>8.3} {:>8.3} {:>8.3} | {:>6} {:>7} | {}{}",
        offered,
        path,
        thousands(f.sent_per_sec),
        thousands(f.done_per_sec),
        f.latency.p50_ms,
        f.latency.p99_ms,
        f.latency.p999_ms,
        f.failed,
        f.skipped,
        super::cpu_cell(&f.cpu),
        if f.sustained { "" } else { "  not sustained" }
    );
    if let Some(first) = &f.first_failure {
        line.push_str(&format!("\n    first failure: {first}"));
    }
    line
}

/// Where the requests of one side go, and how an answer is judged.
struct Side {
    name: &'static str,
    http: reqwest::Client,
    request: Arc<dyn Fn(&reqwest::Client) -> reqwest::RequestBuilder + Send + Sync>,
    judge: fn(reqwest::StatusCode, &[u8]) -> Result<(), String>,
}

impl Side {
    /// The body the `openai` provider sends, to the fake itself.
    fn direct(upstream: &FakeUpstream) -> anyhow::Result<Side> {
        let url = format!("{}/chat/completions", upstream.base_url());
        let body = serde_json::to_vec(&json!({
            "model": UPSTREAM_MODEL,
            "messages": [{ "role": "user", "content": CONTENT }],
            "stream": true,
            "stream_options": { "include_usage": true },
        }))?;
        Ok(Side {
            name: "direct to the upstream",
            http: client(MAX_IN_FLIGHT)?,
            request: Arc::new(move |http| {
                http.post(&url)
                    .header(CONTENT_TYPE, "application/json")
                    .header("accept", "text/event-stream")
                    .body(body.clone())
            }),
            judge: |status, body| {
                let text = String::from_utf8_lossy(body);
                if status.is_success() && text.trim_end().ends_with("data: [DONE]") {
                    Ok(())
                } else {
                    Err(format!("{status}: {}", cut(&text)))
                }
            },
        })
    }

    /// A non-streamed chat completion to the proxy agent; each starts a
    /// conversation, as a client that sends no `X-Conversation-Id` does.
    fn proxied(base: &str, key: &str) -> anyhow::Result<Side> {
        let url = format!("{base}/v1/chat/completions");
        let authorization = format!("Bearer {key}");
        let body = serde_json::to_vec(&json!({
            "model": PROXY_AGENT,
            "messages": [{ "role": "user", "content": CONTENT }],
        }))?;
        Ok(Side {
            name: "through switchboard",
            http: client(MAX_IN_FLIGHT)?,
            request: Arc::new(move |http| {
                http.post(&url)
                    .header("authorization", &authorization)
                    .header(CONTENT_TYPE, "application/json")
                    .body(body.clone())
            }),
            judge: |status, body| {
                let completion: serde_json::Value =
                    serde_json::from_slice(body).unwrap_or_default();
                if status.is_success() && completion["choices"][0]["finish_reason"] == "stop" {
                    Ok(())
                } else {
                    Err(format!("{status}: {}", cut(&String::from_utf8_lossy(body))))
                }
            },
        })
    }
}

/// Every measured request of the proxy runs, a line each
/// (`bench http --latency-log`).
pub struct LatencyLog(BufWriter<File>);

impl LatencyLog {
    pub fn create(path: &Path) -> anyhow::Result<LatencyLog> {
        let file =
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut log = LatencyLog(BufWriter::new(file));
        writeln!(
            log.0,
            "path\toffered_per_sec\tround\toffered_at_us\tlatency_us"
        )?;
        Ok(log)
    }

    /// The answered requests of one side's round.
    fn write(
        &mut self,
        path: &str,
        offered: usize,
        round: u32,
        paced: &Paced,
    ) -> anyhow::Result<()> {
        for (at, latency) in &paced.timeline {
            let (at, latency) = (at.as_micros(), latency.as_micros());
            writeln!(self.0, "{path}\t{offered}\t{round}\t{at}\t{latency}")?;
        }
        self.0.flush().context("cannot write the latency log")
    }
}

/// What [`paced`] saw of one side: counts, latencies, and the time the
/// requests took from the first tick to the last answer, summed over the
/// windows it pools.
#[derive(Default)]
struct Paced {
    sent: u64,
    skipped: u64,
    ok: u64,
    failed: u64,
    first_failure: Option<String>,
    sending: Duration,
    answering: Duration,
    /// Of the answered requests, in the order answered: when each was
    /// offered, into the window, and its latency.
    timeline: Vec<(Duration, Duration)>,
    cpu: CpuSpent,
}

impl Paced {
    fn absorb(&mut self, other: Paced) {
        self.sent += other.sent;
        self.skipped += other.skipped;
        self.ok += other.ok;
        self.failed += other.failed;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
        self.sending += other.sending;
        self.answering += other.answering;
        self.timeline.extend(other.timeline);
        self.cpu.add(other.cpu);
    }

    /// The answered requests' latencies, in nanoseconds.
    fn latencies_ns(&self) -> Vec<u64> {
        let nanos = |latency: &Duration| latency.as_nanos() as u64;
        self.timeline
            .iter()
            .map(|(_, latency)| nanos(latency))
            .collect()
    }

    fn figures(self, offered: usize) -> PacedFigures {
        let done_per_sec = rate(self.ok, self.answering.as_secs_f64());
        PacedFigures {
            sent: self.sent,
            skipped: self.skipped,
            ok: self.ok,
            failed: self.failed,
            sent_per_sec: rate(self.sent, self.sending.as_secs_f64()),
            done_per_sec,
            latency: Percentiles::of(&mut self.latencies_ns()),
            sustained: self.skipped == 0
                && self.failed == 0
                && self.ok == self.sent
                && done_per_sec >= offered as f64 * SUSTAINED_SHARE,
            cpu: self.cpu.per_request(self.ok),
            first_failure: self.first_failure,
        }
    }
}

/// Offers `side` one request per tick at `offered`/s for `window`, then waits
/// for the answers still out.
async fn paced(side: &Side, offered: usize, window: Duration) -> Paced {
    let period = Duration::from_secs_f64(1.0 / offered as f64);
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let open = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let (answers, mut answered) = mpsc::unbounded_channel();
    let started = Instant::now();
    let (mut sent, mut skipped) = (0u64, 0u64);
    while started.elapsed() < window {
        let tick = ticks.tick().await.into_std();
        let Ok(permit) = open.clone().try_acquire_owned() else {
            skipped += 1;
            continue;
        };
        sent += 1;
        let request = (side.request)(&side.http);
        let (judge, answers) = (side.judge, answers.clone());
        tokio::spawn(async move {
            let outcome = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    match response.bytes().await {
                        Ok(body) => judge(status, &body),
                        Err(error) => Err(error.to_string()),
                    }
                }
                Err(error) => Err(error.to_string()),
            };
            let _ = answers.send((tick.elapsed(), Instant::now(), outcome));
            drop(permit);
        });
    }
    let sending = started.elapsed();
    drop(answers);
    let mut paced = Paced {
        sent,
        skipped,
        ok: 0,
        failed: 0,
        first_failure: None,
        sending,
        answering: Duration::ZERO,
        timeline: Vec::with_capacity(sent as usize),
        cpu: CpuSpent::default(),
    };
    let mut last = started;
    let tail = tokio::time::sleep(TAIL_TIMEOUT);
    tokio::pin!(tail);
    loop {
        let answer = tokio::select! {
            answer = answered.recv() => answer,
            () = &mut tail => None,
        };
        let Some((took, at, outcome)) = answer else {
            break;
        };
        last = last.max(at);
        match outcome {
            Ok(()) => {
                paced.ok += 1;
                let offered_at = (at - took).saturating_duration_since(started);
                paced.timeline.push((offered_at, took));
            }
            Err(why) => {
                paced.failed += 1;
                paced.first_failure.get_or_insert(why);
            }
        }
    }
    paced.answering = last - started;
    paced
}
