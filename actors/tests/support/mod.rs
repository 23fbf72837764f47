//! Test support shared by the integration tests of this crate.

pub mod fake_openai;

use switchboard_actors::conversation::SendCommand;

/// A send of `message_id` (content "content of <message_id>") by `key_id`,
/// routed to the echo agent.
#[allow(dead_code)] // not every test binary sends through the registry
pub fn send_command(message_id: &str, key_id: &str) -> SendCommand {
    SendCommand {
        message_id: message_id.to_owned(),
        key_id: key_id.to_owned(),
        user: None,
        content: format!("content of {message_id}"),
        requested_agent: None,
        agent: "echo".into(),
        rule: None,
        correlation_id: None,
        traceparent: None,
    }
}
