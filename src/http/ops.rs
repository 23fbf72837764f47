//! `/v1/usage`, `/healthz`, `/readyz` and `/metrics`.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::{copy_rate_headers, ApiError};
use super::openapi::{
    Forbidden, Health, Internal, NotReady, Ready, Unauthorized, Unavailable, Usage,
};
use super::{within, AppState};

/// `GET /v1/usage`: the calling key's spend, tokens, limits and budget.
#[utoipa::path(
    get,
    path = "/v1/usage",
    tag = "ops",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The calling key, its limits and what it spent", body = Usage),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn usage(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let reply = within(&state, state.core.request("usage", &headers, &json!({}))).await?;
    let mut out = HeaderMap::new();
    copy_rate_headers(&reply.headers, &mut out);
    Ok((out, Json(reply.body)).into_response())
}

/// `GET /healthz`: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "ops",
    responses((status = 200, description = "The process answers", body = Health)),
)]
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: 200 when the core answers over the bus (so the bus is
/// connected and the core's log is open), 503 otherwise: also when the
/// core's event log refuses appends after a failed write, or its
/// projections stopped.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "ops",
    responses(
        (status = 200, description = "The core answers; how far it is", body = Ready),
        (status = 503, description = "The core does not answer, its bus is not connected, its \
            event log refuses appends after a failed write, or its projections stopped", body = NotReady),
    ),
)]
pub async fn readyz(State(state): State<AppState>) -> Response {
    match state.core.request("health", &HeaderMap::new(), &json!({})).await {
        Ok(reply) => {
            let mut body = reply.body;
            body["status"] = json!("ready");
            (StatusCode::OK, Json(body)).into_response()
        }
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "unavailable", "error": { "code": error.code, "message": error.message } })),
        )
            .into_response(),
    }
}

/// `GET /metrics`: this process's metrics in the Prometheus text format
/// (docs/operations.md lists them).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    responses(
        (status = 200, description = "Prometheus text format: requests, ack latency, the log's \
            group commits, projection and outbox lag, live actors, passivations, rate-limit \
            refusals, agent latency and errors, circuits, tokens, cost, budgets, NATS, disk \
            (docs/operations.md#metrics)", content_type = "text/plain; version=0.0.4", body = String),
    ),
)]
pub async fn metrics() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(),
    )
        .into_response()
}
