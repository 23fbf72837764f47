//! The memory figure of `bench nats`: resident memory per live conversation
//! actor, beside the same events appended to a log with no actor at all.
//!
//! Each conversation gets one send. Through a [`ConversationRegistry`] that
//! spawns its actor (which keeps the conversation's folded state, here one
//! turn waiting for its reply) and an entry in the registry's map and LRU;
//! for the baseline, straight into another log, planned by the same
//! [`ConversationState::plan_send`]. Both grow sled's cache by about as
//! much, so the difference is what the actors and the registry hold.
//!
//! RSS is the process's (`VmRSS`), so the figures are approximate: the
//! allocator keeps freed memory and reuses it. This runs first, before any
//! other measurement has grown and freed the heap.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use switchboard_actors::conversation::{ConversationState, SendCommand, SendPlan};
use switchboard_actors::conversation_actor::{ConversationRegistry, RegistryConfig};
use switchboard_events::{EventLog, OpenMode, StreamId};
use tokio::task::JoinSet;

use super::procfs::rss_bytes;
use crate::bench::workload;

/// Sends in flight while filling: enough for the log's group commit.
const FILL_CONCURRENCY: usize = 64;

#[derive(Debug, Serialize)]
pub struct MemoryFigures {
    pub actors: usize,
    /// Actors the registry held after the fill (should equal `actors`).
    pub live_actors: usize,
    pub seconds: f64,
    /// RSS growth from appending one send's events for each of `actors`
    /// conversations to a log, without actors.
    pub log_only_bytes: u64,
    pub log_only_bytes_per_conversation: f64,
    /// RSS growth from one send to each of `actors` conversations through
    /// the registry: actors, registry bookkeeping and the log's share.
    pub with_actors_bytes: u64,
    pub bytes_per_actor: f64,
    /// `bytes_per_actor - log_only_bytes_per_conversation`.
    pub bytes_per_actor_beyond_log: f64,
    pub rss_after_bytes: u64,
}

/// Fills both logs in `dir`, measuring RSS around each fill.
pub async fn measure(
    dir: &Path,
    actors: usize,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<MemoryFigures> {
    let started = Instant::now();
    let plain = EventLog::open(&dir.join("log-only"), OpenMode::CreateIfMissing)?;
    let before = rss_bytes()?;
    bar.set_message("memory: the same events into a log, no actors");
    fill(actors, bar, {
        let log = plain.clone();
        move |index| {
            let log = log.clone();
            async move {
                let id = workload::conversation_id(index as u64);
                let plan = ConversationState::new(&id).plan_send(&send_command(index));
                let SendPlan::Append { expected, events } = plan else {
                    anyhow::bail!("a first send to {id} was planned as {plan:?}");
                };
                log.append(StreamId::conversation(&id)?, expected, events)
                    .await?;
                Ok(())
            }
        }
    })
    .await?;
    let log_only_bytes = rss_bytes()?.saturating_sub(before);

    let log = EventLog::open(&dir.join("actors"), OpenMode::CreateIfMissing)?;
    let registry = ConversationRegistry::new(
        log.clone(),
        RegistryConfig {
            max_live: actors,
            idle_passivate: Duration::from_secs(24 * 3600),
        },
    );
    let before = rss_bytes()?;
    bar.set_message("memory: one send per conversation through the registry");
    fill(actors, bar, {
        let registry = registry.clone();
        move |index| {
            let registry = registry.clone();
            async move {
                let id = workload::conversation_id(index as u64);
                registry.send(&id, send_command(index)).await?;
                Ok(())
            }
        }
    })
    .await?;
    let after = rss_bytes()?;
    let live_actors = registry.live_count();
    registry.shutdown().await;
    drop(plain);

    let with_actors_bytes = after.saturating_sub(before);
    let per = |bytes: u64| bytes as f64 / actors.max(1) as f64;
    Ok(MemoryFigures {
        actors,
        live_actors,
        seconds: started.elapsed().as_secs_f64(),
        log_only_bytes,
        log_only_bytes_per_conversation: per(log_only_bytes),
        with_actors_bytes,
        bytes_per_actor: per(with_actors_bytes),
        bytes_per_actor_beyond_log: per(with_actors_bytes) - per(log_only_bytes),
        rss_after_bytes: after,
    })
}

/// Runs `one(index)` for every index below `count`, [`FILL_CONCURRENCY`] at
/// a time.
async fn fill<F, Fut>(count: usize, bar: &indicatif::ProgressBar, one: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    bar.set_length(count as u64);
    bar.set_position(0);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..FILL_CONCURRENCY {
        let (next, one, bar) = (next.clone(), one.clone(), bar.clone());
        tasks.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= count {
                    return anyhow::Ok(());
                }
                one(index).await?;
                bar.inc(1);
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("a filling task panicked")??;
    }
    Ok(())
}

/// The first send to conversation `index`, as the gateway would hand it over.
fn send_command(index: usize) -> SendCommand {
    SendCommand {
        message_id: format!("m-{index}"),
        key_id: "key_bench".into(),
        user: None,
        content: "Could you summarise the attached contract and tell me which clauses \
                  differ from our standard one?"
            .into(),
        requested_agent: None,
        agent: "echo".into(),
        rule: None,
        correlation_id: Some(uuid::Uuid::now_v7()),
        traceparent: None,
    }
}
