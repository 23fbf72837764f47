//! W3C trace context across hops: a span continues the trace of a
//! `traceparent` it received (over NATS, HTTP, or stored in a command), and
//! hands its own on. Without an OpenTelemetry layer installed (no
//! `--otlp-endpoint`), spans have no trace context: [`continue_trace`] does
//! nothing and [`traceparent_of`] answers `None`, so callers pass the
//! `traceparent` they received along unchanged.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Makes `span` a child of the remote span `traceparent` names, if any.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    // A span no layer records (the usual case without an exporter) costs
    // nothing more here: no parsing, no map.
    let Some(traceparent) = traceparent.filter(|_| !span.is_disabled()) else {
        return;
    };
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// The `traceparent` naming `span`, for the next hop; `None` when spans are
/// not exported.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// [`traceparent_of`] `span`, or else `received`: what the next hop should carry.
pub fn next_traceparent(span: &tracing::Span, received: Option<&str>) -> Option<String> {
    traceparent_of(span).or_else(|| received.map(str::to_owned))
}
