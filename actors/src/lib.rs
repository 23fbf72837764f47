//! switchboard-actors: the live core — per-conversation, per-key rate-limit and
//! per-agent actors, the router and the agent providers (DESIGN §5).
//!
//! Boundary: depends on `switchboard-events` (it appends to the log and recovers
//! state from it) and, once the actors land, `switchboard-projections` (keys);
//! it serves neither HTTP nor NATS — the binary's gateways do, and hand it
//! commands. Its only network use is the `openai` provider calling model servers.
//!
//! What exists so far:
//! - [`provider`]: the [`provider::Provider`] trait agents call, with the
//!   deterministic [`provider::EchoProvider`] and [`provider::OpenAiProvider`]
//!   for any OpenAI-compatible chat-completions server (streaming SSE, usage
//!   reported by the server or counted with tiktoken), and the error kinds an
//!   agent retries on or gives up on;
//! - [`router`]: ordered regex rules, a default agent, and messages naming their
//!   agent;
//! - [`conversation`]: a conversation's state folded from its stream, and what a
//!   send appends (idempotent on `message_id`, at the stream's version);
//! - [`rate_limit`]: one key's sliding-window rpm and tpm and its concurrency,
//!   with exact `retry_after` and refusals coalesced to one report a second;
//! - [`rate_limiter`]: the `RateLimiter` actor per key around it — admits a
//!   send with a `Permit` held for its turn, refuses with `retry_after_ms`, and
//!   appends the coalesced `rate_limited` events;
//! - [`conversation_actor`]: the `ConversationActor` (single writer of
//!   `conv/<id>`, acks only after the durable append) and the
//!   `ConversationRegistry` (spawn on first command, LRU and idle passivation,
//!   respawn from the log after a crash);
//! - [`agent`]: the `AgentActor` — concurrency cap, per-attempt timeout, retries
//!   with backoff honouring `Retry-After`, a circuit breaker, integer micro-USD
//!   pricing — returning the events that end a turn (`reply_completed` +
//!   `usage_recorded`, or `reply_failed`) for the conversation to append;
//! - [`turns`]: the `TurnCoordinator` between the two — route, store, run the
//!   turn with the conversation's history as context, stream `reply_delta`s,
//!   store the end through the conversation's actor, and fail turns lost in a
//!   restart.
//!
//! The binary's NATS gateway drives it all (`switchboard serve`).

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod agent;
pub mod budget;
pub mod conversation;
pub mod conversation_actor;
pub mod conversation_registry;
pub mod provider;
pub mod rate_limit;
pub mod rate_limiter;
pub mod router;
mod stream_read;
pub mod trace;
mod turn_context;
pub mod turns;
