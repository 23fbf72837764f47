//! The `switchboard` library: the parts of the binary that integration tests
//! and other processes reach directly. For now that is the message bus
//! ([`bus`]): NATS, or the embedded bus with the same semantics.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod alerts;
pub mod bus;
pub mod gateway;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod outbox;
pub mod server;
pub mod service;
pub mod telemetry;
