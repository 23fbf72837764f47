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
/// connected and the core's log is open), 503 otherwise.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "ops",
    responses(
        (status = 200, description = "The core answers; how far it is", body = Ready),
        (status = 503, description = "The core does not answer", body = NotReady),
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

/// `GET /metrics`: the core's figures in the Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    responses(
        (status = 200, description = "Prometheus text format: `switchboard_log_head_seq`, \
            `switchboard_projections_seq`, `switchboard_live_conversations`, \
            `switchboard_turns_in_flight`, `switchboard_cost_micros_total{model}`, \
            `switchboard_tokens_total{model,direction}`, \
            `switchboard_budget_remaining_micros{scope,subject}`", content_type = "text/plain; version=0.0.4", body = String),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let health = state
        .core
        .request("health", &HeaderMap::new(), &json!({}))
        .await?
        .body;
    let gauge = |name: &str, help: &str, field: &str| {
        let value = health[field].as_u64().unwrap_or(0);
        format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n")
    };
    let text = [
        gauge(
            "switchboard_log_head_seq",
            "The seq of the last event in the log.",
            "log_head",
        ),
        gauge(
            "switchboard_projections_seq",
            "The seq every projection has folded up to.",
            "projections_at",
        ),
        gauge(
            "switchboard_live_conversations",
            "Conversation actors alive now.",
            "live_conversations",
        ),
        gauge(
            "switchboard_turns_in_flight",
            "Agent turns running now.",
            "turns_in_flight",
        ),
        crate::metrics::render(),
    ]
    .concat();
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
