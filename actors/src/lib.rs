//! switchboard-actors: the live core — per-conversation, per-key rate-limit and
//! per-agent actors, the router and the agent providers (DESIGN §5).
//!
//! Boundary: depends on `switchboard-events` (it appends to the log) and
//! `switchboard-projections` (it recovers state and reads keys through their read
//! API); it never talks HTTP or NATS itself — the binary's gateways do, and hand
//! it commands.
//!
//! The crate is empty until the actors issue lands; nothing here pretends to
//! work before then.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
