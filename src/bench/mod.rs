//! `switchboard bench`: benchmarks that print their figures beside a raw
//! baseline measured in the same run, so the ratio holds on a noisy machine.

mod appends;
pub mod http;
pub mod log;
pub mod nats;
mod workload;
