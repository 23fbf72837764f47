//! The thin axum front (DESIGN §7): HTTP in, bus requests to the core out.
//!
//! It authenticates nothing and decides nothing itself: every route turns
//! into a request on the bus ([`core::Core`]), with the caller's
//! `Authorization` and `traceparent` passed through, and the core's answer
//! (or coded error) becomes the response — status, JSON body and the
//! rate-limit headers the core attached. So an HTTP node can run apart from
//! a core node, on the same NATS.
//!
//! Hardening: a body limit (413), a timeout for requests that are not
//! streams (the core answers in time or the request gets a 503), JSON
//! validation naming the field (422), security headers on every response,
//! and CORS only for the origins configured.
//!
//! `GET /openapi.json` describes it all ([`openapi`]): each handler carries
//! its `#[utoipa::path]`, and `tests/http_openapi.rs` holds the description
//! to what the routes really answer.

pub mod core;
pub mod error;

pub mod openapi;

mod admin;
mod console;
mod conversations;
mod openai;
mod ops;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::serve::ListenerExt;
use axum::Router;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;

use crate::bus::Bus;
use error::ApiError;

/// The largest request body accepted; larger ones get 413.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// How the front is set up.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub addr: SocketAddr,
    /// The core's subject prefix.
    pub prefix: String,
    /// Origins allowed to call the API from a browser; none: CORS off.
    pub cors_origins: Vec<String>,
    /// How long a request that is not a stream may take.
    pub request_timeout: Duration,
}

impl HttpConfig {
    pub fn new(addr: SocketAddr) -> Self {
        HttpConfig {
            addr,
            prefix: crate::gateway::DEFAULT_PREFIX.to_owned(),
            cors_origins: Vec::new(),
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    pub core: core::Core,
    pub request_timeout: Duration,
    /// Turns true when the front shuts down: open streams end then.
    pub closing: watch::Receiver<bool>,
    /// The agents' names the core has listed, so a chat completion for a
    /// known one goes straight to the send (which checks the key anyway).
    pub known_agents: Arc<RwLock<HashSet<String>>>,
}

/// How long shutdown waits for open requests before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A running front.
pub struct HttpHandle {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    closing: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl HttpHandle {
    /// The address it listens on (the port, when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting connections, ends open event streams, and waits for
    /// open requests — at most [`SHUTDOWN_GRACE`], then drops them.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.closing.send_replace(true);
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.task).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "the HTTP server task failed"),
            Err(_) => {
                tracing::warn!("HTTP requests still open after the grace period; dropping them");
                self.task.abort();
            }
        }
    }
}

/// Binds `config.addr` and serves the API on `bus` until shutdown.
///
/// `bus` is where the core is: its in-process bus when it runs in this
/// process on NATS ([`crate::gateway::NatsGateway::start_with_front`]; its
/// conversations' events are fed there by [`crate::outbox::spawn_front_feed`]),
/// otherwise the bus the core serves and publishes on.
pub async fn serve(config: HttpConfig, bus: Bus) -> std::io::Result<HttpHandle> {
    let listener = TcpListener::bind(config.addr).await?;
    let addr = listener.local_addr()?;
    // Without TCP_NODELAY a stream's first event, written just after the
    // response's head, waits for the client's delayed ACK: 40 ms on Linux.
    let listener = listener.tap_io(|stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY on a connection");
        }
    });
    let (closing, closing_seen) = watch::channel(false);
    let app = router(&config, bus, closing_seen);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "the HTTP server stopped");
        }
    });
    tracing::info!(%addr, "HTTP front listening");
    Ok(HttpHandle {
        addr,
        stop: Some(stop),
        closing,
        task,
    })
}

/// The routes and layers; public for tests that drive it without a socket.
/// Open event streams end when `closing` turns true.
pub fn router(config: &HttpConfig, bus: Bus, closing: watch::Receiver<bool>) -> Router {
    let state = AppState {
        core: core::Core {
            bus,
            prefix: config.prefix.clone(),
        },
        request_timeout: config.request_timeout,
        closing,
        known_agents: Arc::default(),
    };
    let api = Router::new()
        .route("/v1/conversations", get(conversations::list))
        .route("/v1/conversations/{id}/messages", post(conversations::send))
        .route("/v1/conversations/{id}", get(conversations::history))
        .route("/v1/conversations/{id}/events", get(conversations::events))
        .route("/v1/usage", get(ops::usage))
        .route("/admin/keys", post(admin::issue_key).get(admin::list_keys))
        .route(
            "/admin/keys/{id}",
            delete(admin::revoke_key).patch(admin::update_key),
        )
        .route("/admin/costs", get(admin::costs))
        .route("/admin/audit", get(admin::audit))
        .route("/admin/conversations/{id}", delete(admin::erase))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(openapi::document))
        .merge(openai::routes())
        .merge(console::routes())
        .route_layer(axum::middleware::from_fn(trace_request))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state);
    let mut app = api
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(payload_too_large))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ));
    if !config.cors_origins.is_empty() {
        let origins: Vec<HeaderValue> = config
            .cors_origins
            .iter()
            .filter_map(|origin| HeaderValue::from_str(origin).ok())
            .collect();
        app = app.layer(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(origins))
                .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::PATCH])
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    header::ACCEPT,
                    HeaderName::from_static("x-conversation-id"),
                    HeaderName::from_static("last-event-id"),
                    HeaderName::from_static("idempotency-key"),
                    HeaderName::from_static("traceparent"),
                ])
                .expose_headers(
                    [
                        "x-conversation-id",
                        "ratelimit-limit",
                        "ratelimit-remaining",
                        "ratelimit-reset",
                        "retry-after",
                        "x-ratelimit-limit-requests",
                        "x-ratelimit-remaining-requests",
                        "x-ratelimit-reset-requests",
                        "x-ratelimit-limit-tokens",
                        "x-ratelimit-remaining-tokens",
                        "x-ratelimit-reset-tokens",
                        "traceparent",
                    ]
                    .map(HeaderName::from_static),
                ),
        );
    }
    app
}

/// Only the console's own scripts, styles and images; the API and its
/// streams on the same origin; no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

/// Turns axum's plain-text 413 into the JSON error shape.
async fn payload_too_large(request: Request, next: axum::middleware::Next) -> Response {
    let response = next.run(request).await;
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE
        && response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.as_bytes())
            != Some(b"application/json")
    {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body exceeds {MAX_BODY_BYTES} bytes"),
        )
        .into_response();
    }
    response
}

/// `Json<T>` whose rejections are the API's errors: 422 naming the field
/// for a body of the wrong shape, 415 without a JSON content type, 413 when
/// too large.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonDataError(error) => ApiError::invalid(error.body_text()),
        JsonRejection::JsonSyntaxError(error) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            error.body_text(),
        ),
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request",
            "expected Content-Type: application/json",
        ),
        JsonRejection::BytesRejection(error) => {
            if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the body exceeds {MAX_BODY_BYTES} bytes"),
                )
            } else {
                ApiError::new(error.status(), "invalid_request", error.body_text())
            }
        }
        other => ApiError::new(other.status(), "invalid_request", other.body_text()),
    }
}

/// `Query<T>` whose rejections are the API's errors: 422 naming the
/// parameter, not axum's plain-text 400.
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(ApiError::invalid(rejection.body_text())),
        }
    }
}

/// `Path<T>` whose rejections are the API's errors (a segment that is not
/// UTF-8, say): 422, not axum's plain-text 400.
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(ApiError::invalid(rejection.body_text())),
        }
    }
}

/// A conversation id from the path, checked as the core checks it, so a
/// bad one never reaches a subject.
pub fn conversation_id(id: &str) -> Result<&str, ApiError> {
    switchboard_actors::conversation_actor::validate_conversation_id(id)
        .map_err(|error| ApiError::invalid(error.message().to_owned()))?;
    Ok(id)
}

/// Runs `future` under the front's request timeout.
pub async fn within<T>(
    state: &AppState,
    future: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    tokio::time::timeout(state.request_timeout, future)
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                "the request took too long",
            ))
        })
}

/// Resolves once the front is shutting down.
pub async fn closed(mut closing: watch::Receiver<bool>) {
    // An error means the front is gone: closed as well.
    let _ = closing.wait_for(|closing| *closing).await;
}

/// One span per routed request, continuing the caller's `traceparent`; the
/// core's requests carry this span's context on (see [`core::Core::request`]).
/// The request header the front sets to the client's address (any value a
/// client sent is replaced), which the core records in `auth_failed`.
pub const REMOTE_HEADER: &str = "switchboard-remote";

async fn trace_request(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let remote = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .and_then(|info| HeaderValue::from_str(&info.0.to_string()).ok());
    match remote {
        Some(remote) => request.headers_mut().insert(REMOTE_HEADER, remote),
        None => request.headers_mut().remove(REMOTE_HEADER),
    };
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("", |path| path.as_str())
        .to_owned();
    let method = request.method().clone();
    let span = tracing::debug_span!(
        "http",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    let received = request
        .headers()
        .get("traceparent")
        .and_then(|value| value.to_str().ok());
    switchboard_actors::trace::continue_trace(&span, received);
    let response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}
