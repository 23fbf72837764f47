//! Helpers shared by the integration tests in `tests/*.rs`.
//!
//! Each test binary includes this with `mod support;` and uses only some of it,
//! so unused helpers are allowed here rather than warned about in every binary.
#![allow(dead_code)]

pub mod bus;
pub mod front;
pub mod nats;
pub mod serve;
pub mod sse;
