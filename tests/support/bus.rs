//! Keyed requests on the service's own bus (embedded or NATS), as a client
//! sends them.

use serde_json::Value;
use switchboard::bus::{Bus, Headers};

use super::front::WAIT;

/// `body` as JSON to `subject` with `Authorization: Bearer <key>`; the JSON
/// answer. Panics when nothing answers within [`WAIT`].
pub async fn request(bus: &Bus, subject: &str, key: &str, body: Value) -> Value {
    let headers = Headers::new().with("Authorization", format!("Bearer {key}"));
    let reply = bus
        .request(
            subject,
            headers,
            serde_json::to_vec(&body).expect("JSON"),
            WAIT,
        )
        .await
        .unwrap_or_else(|error| panic!("{subject} was not answered: {error}"));
    serde_json::from_slice(&reply.payload).expect("replies are JSON")
}
