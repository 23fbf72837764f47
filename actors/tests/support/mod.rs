//! Test support shared by the integration tests of this crate.

pub mod fake_openai;
