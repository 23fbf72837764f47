//! `/admin/…`: key management, cost reports, the audit trail and erasure,
//! for the admin key (the core answers 403 to any other).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::IntoParams;

use super::error::ApiError;
use super::openapi::{
    AuditPage, BadRequest, CostReport, Erased, Forbidden, Internal, Invalid, KeyChange, KeyChanged,
    KeyIssued, KeyList, KeyRevoked, KeySpec, NotFound, PayloadTooLarge, Unauthorized, Unavailable,
    UnsupportedMediaType,
};
use super::{conversation_id, within, ApiJson, ApiPath, ApiQuery, AppState};

/// `POST /admin/keys`: 201 with the key, shown this once.
#[utoipa::path(
    post,
    path = "/admin/keys",
    tag = "admin",
    request_body = KeySpec,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The key, shown this once", body = KeyIssued),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Invalid),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
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
    Ok(reply.into_response(StatusCode::CREATED))
}

/// `GET /admin/keys`.
#[utoipa::path(
    get,
    path = "/admin/keys",
    tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every key, without secrets or hashes", body = KeyList),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn list_keys(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let reply = within(
        &state,
        state.core.request("admin.keys.list", &headers, &json!({})),
    )
    .await?;
    Ok(reply.into_response(StatusCode::OK))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RevokeQuery {
    /// Why; stored with the revocation.
    reason: Option<String>,
}

/// `DELETE /admin/keys/{id}?reason=`.
#[utoipa::path(
    delete,
    path = "/admin/keys/{id}",
    tag = "admin",
    params(("id" = String, Path, description = "The key id"), RevokeQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Revoked (now, or before: `already`)", body = KeyRevoked),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 422, response = Invalid),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn revoke_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(key_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<RevokeQuery>,
) -> Result<Response, ApiError> {
    let body = json!({ "key_id": key_id, "reason": query.reason });
    let reply = within(
        &state,
        state.core.request("admin.keys.revoke", &headers, &body),
    )
    .await?;
    Ok(reply.into_response(StatusCode::OK))
}

/// `PATCH /admin/keys/{id}`: changes a key's limits or budget (appends
/// `key_updated`); the next request with the key sees the change.
#[utoipa::path(
    patch,
    path = "/admin/keys/{id}",
    tag = "admin",
    params(("id" = String, Path, description = "The key id")),
    request_body = KeyChange,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The key, changed", body = KeyChanged),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Invalid),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn update_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(key_id): ApiPath<String>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let Value::Object(mut fields) = body else {
        return Err(ApiError::invalid("the body must be a JSON object"));
    };
    fields.insert("key_id".to_owned(), Value::String(key_id));
    let reply = within(
        &state,
        state
            .core
            .request("admin.keys.update", &headers, &Value::Object(fields)),
    )
    .await?;
    Ok(reply.into_response(StatusCode::OK))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CostsQuery {
    /// The grouping (default `key`).
    #[param(value_type = Option<super::openapi::CostGroup>)]
    by: Option<String>,
    /// First UTC day, `YYYY-MM-DD`, inclusive.
    #[param(format = Date)]
    since: Option<String>,
    /// Last UTC day, `YYYY-MM-DD`, inclusive.
    #[param(format = Date)]
    until: Option<String>,
}

/// `GET /admin/costs?by=key|user|model|day&since=&until=` (UTC days).
#[utoipa::path(
    get,
    path = "/admin/costs",
    tag = "admin",
    params(CostsQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Totals per group", body = CostReport),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 422, response = Invalid),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn costs(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<CostsQuery>,
) -> Result<Response, ApiError> {
    let body = json!({
        "by": query.by.as_deref().unwrap_or("key"),
        "since": query.since,
        "until": query.until,
    });
    let reply = within(&state, state.core.request("admin.costs", &headers, &body)).await?;
    Ok(reply.into_response(StatusCode::OK))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// RFC 3339, inclusive.
    #[param(format = DateTime)]
    since: Option<String>,
    /// RFC 3339, exclusive.
    #[param(format = DateTime)]
    until: Option<String>,
    /// Only events about this key id.
    key: Option<String>,
    /// Only events of this type (`auth_failed`, `key_issued`, …).
    #[serde(rename = "type")]
    event_type: Option<String>,
    /// The previous page's `next_cursor`.
    cursor: Option<String>,
    /// At most this many (default 100, at most 1000).
    limit: Option<usize>,
}

/// `GET /admin/audit?since=&until=&key=&type=&cursor=&limit=`.
#[utoipa::path(
    get,
    path = "/admin/audit",
    tag = "admin",
    params(AuditQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of the audit trail, oldest first", body = AuditPage),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 422, response = Invalid),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn audit(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<AuditQuery>,
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
    Ok(reply.into_response(StatusCode::OK))
}

/// `DELETE /admin/conversations/{id}`: appends `conversation_erased`.
#[utoipa::path(
    delete,
    path = "/admin/conversations/{id}",
    tag = "admin",
    params(("id" = String, Path, description = "The conversation")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Erased (now, or before: `already`)", body = Erased),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 422, response = Invalid),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn erase(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = conversation_id(&id)?;
    let subject = format!("admin.conv.{id}.erase");
    let reply = within(&state, state.core.request(&subject, &headers, &json!({}))).await?;
    Ok(reply.into_response(StatusCode::OK))
}
