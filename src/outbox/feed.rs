//! The front's feed: beside the HTTP front, the log's conversation events on
//! the front's in-process bus as well as on NATS.
//!
//! In `serve --nats-url` with the HTTP front, the front reaches the core over
//! an in-process bus ([`crate::gateway::NatsGateway::start_with_front`]), and
//! its streams (a streamed send, a streamed completion, `GET …/events`)
//! follow a conversation's events there too. The gateway publishes every
//! reply's deltas on that bus; this feed publishes each stored conversation
//! event there once it is durable, on the subject and with the headers and
//! body the outbox gives it on NATS. Neither waits for NATS, so the streams
//! go on while NATS is away.
//!
//! The gateway queues each delta with the feed (a [`DeltaQueue`]), which
//! publishes it once it has published the delta's message, and before the
//! next event: so the front's streams see a message, its reply's deltas,
//! then the reply's end.
//!
//! The feed is live only: it starts at the log's head and keeps no
//! checkpoint. A follower reads what came before its subscription from the
//! log (`conv.<id>.events`), as it does on NATS. Only the conversation
//! subjects (`{prefix}.evt.conv.<id>.<type>`) are fed, and an event's body
//! is built only when someone follows its subject.

use std::time::Duration;

use switchboard_events::EventLog;
use tokio::task::JoinHandle;

use super::route::{headers, payload, routes};
use super::DeltaQueue;
use crate::bus::Bus;

/// How long the feed waits before reading again after the log failed a read.
const READ_RETRY: Duration = Duration::from_secs(1);

/// Spawns the feed of `log`'s conversation events, and of the reply deltas
/// queued on `deltas`, onto `front` (see the module doc), from the events
/// appended after this call on. It runs until the log closes or the handle
/// is aborted; a record it cannot read it tries again every second, holding
/// up the feed, as the outbox does.
pub fn spawn_front_feed(
    log: &EventLog,
    front: Bus,
    prefix: &str,
    deltas: DeltaQueue,
) -> JoinHandle<()> {
    let conversations = format!("{prefix}.evt.conv.");
    let prefix = prefix.to_owned();
    let mut fed = log.head();
    let mut events = log.subscribe(fed + 1);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                next = events.next() => next,
                () = deltas.pushed() => {
                    deltas.publish_through(&front, fed).await;
                    continue;
                }
            };
            let Some(next) = next else { break };
            let envelope = match next {
                Ok(envelope) => envelope,
                Err(error) => {
                    // The subscription reads that record again next time.
                    let at = events.position();
                    tracing::error!(%error, seq = at, "the front's feed cannot read the log; trying again");
                    tokio::time::sleep(READ_RETRY).await;
                    continue;
                }
            };
            deltas.publish_through(&front, envelope.seq - 1).await;
            for route in routes(&prefix, &envelope) {
                if !route.subject.starts_with(&conversations)
                    || !front.has_subscriber(&route.subject)
                {
                    continue;
                }
                let headers = headers(&envelope, &route.msg_id);
                if let Err(error) = front
                    .publish(&route.subject, headers, payload(&envelope))
                    .await
                {
                    tracing::warn!(%error, subject = route.subject, "an event was not fed to the front");
                }
            }
            fed = envelope.seq;
            deltas.publish_through(&front, fed).await;
        }
    })
}
