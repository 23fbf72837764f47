//! `/admin/…`: key management, cost reports, the audit trail and erasure,
//! for the admin key (the core answers 403 to any other).

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::core::CoreReply;
use super::error::{copy_rate_headers, ApiError};
use super::{conversation_id, within, ApiJson, AppState};

fn answer(status: StatusCode, reply: CoreReply) -> Response {
    let mut headers = HeaderMap::new();
    copy_rate_headers(&reply.headers, &mut headers);
    (status, headers, Json(reply.body)).into_response()
}

/// `POST /admin/keys`: 201 with the key, shown this once.
pub async fn issue_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    if !body.is_object() {
        return Err(ApiError::invalid("the body must be a JSON object"));
    }
    let reply = within(
        &state,
        state.core.request("admin.keys.issue", &headers, &body),
    )
    .await?;
    Ok(answer(StatusCode::CREATED, reply))
}

/// `GET /admin/keys`.
pub async fn list_keys(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let reply = within(
        &state,
        state.core.request("admin.keys.list", &headers, &json!({})),
    )
    .await?;
    Ok(answer(StatusCode::OK, reply))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeQuery {
    reason: Option<String>,
}

/// `DELETE /admin/keys/{id}?reason=`.
pub async fn revoke_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(key_id): Path<String>,
    Query(query): Query<RevokeQuery>,
) -> Result<Response, ApiError> {
    let body = json!({ "key_id": key_id, "reason": query.reason });
    let reply = within(
        &state,
        state.core.request("admin.keys.revoke", &headers, &body),
    )
    .await?;
    Ok(answer(StatusCode::OK, reply))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostsQuery {
    by: Option<String>,
    since: Option<String>,
    until: Option<String>,
}

/// `GET /admin/costs?by=key|user|model|day&since=&until=` (UTC days).
pub async fn costs(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<CostsQuery>,
) -> Result<Response, ApiError> {
    let body = json!({
        "by": query.by.as_deref().unwrap_or("key"),
        "since": query.since,
        "until": query.until,
    });
    let reply = within(&state, state.core.request("admin.costs", &headers, &body)).await?;
    Ok(answer(StatusCode::OK, reply))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    since: Option<String>,
    until: Option<String>,
    key: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

/// `GET /admin/audit?since=&until=&key=&type=&cursor=&limit=`.
pub async fn audit(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<AuditQuery>,
) -> Result<Response, ApiError> {
    let body = json!({
        "since": query.since,
        "until": query.until,
        "key": query.key,
        "type": query.event_type,
        "cursor": query.cursor,
        "limit": query.limit,
    });
    let reply = within(&state, state.core.request("admin.audit", &headers, &body)).await?;
    Ok(answer(StatusCode::OK, reply))
}

/// `DELETE /admin/conversations/{id}`: appends `conversation_erased`.
pub async fn erase(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = conversation_id(&id)?;
    let subject = format!("admin.conv.{id}.erase");
    let reply = within(&state, state.core.request(&subject, &headers, &json!({}))).await?;
    Ok(answer(StatusCode::OK, reply))
}
