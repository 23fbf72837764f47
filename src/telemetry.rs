//! Logs and traces of `serve`: logs on stderr, human-readable or JSON lines,
//! filtered by `RUST_LOG`; spans exported over OTLP/HTTP when an endpoint is
//! given (`--otlp-endpoint`, or the standard `OTEL_EXPORTER_OTLP_ENDPOINT` /
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`).
//!
//! The standard variables honoured: `OTEL_EXPORTER_OTLP_ENDPOINT` (a base URL:
//! `/v1/traces` is appended), `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as
//! it is), `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, the default, or
//! `http/json`; `grpc` is not built in), `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_SERVICE_NAME` (default `switchboard`),
//! `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_TRACES_SAMPLER[_ARG]` (read by the
//! OpenTelemetry SDK).
//!
//! Spans at each hop carry the domain ids (conversation, message, key id —
//! never a key — agent, seq) and continue the W3C `traceparent` they
//! received: the HTTP front's request span, the gateway's span per NATS
//! request, the conversation actor's append, and the model call with the
//! GenAI semantic conventions' attributes (`gen_ai.request.model`,
//! `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`, …).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// For people: `2026-11-22T09:00:00Z  INFO switchboard: …`.
    #[default]
    Text,
    /// One JSON object per line, with the span's fields.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format {other:?} (expected text or json)"
            )),
        }
    }
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTEL_EXPORTER_OTLP_PROTOCOL {0:?} is not supported: use http/protobuf or http/json (port 4318 on a collector)")]
    Protocol(String),
    #[error("the OTLP exporter: {0}")]
    Exporter(String),
}

/// The running exporter; [`Telemetry::shutdown`] sends what is buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(error) = provider.shutdown() {
                eprintln!("warning: the OTLP exporter did not shut down cleanly: {error}");
            }
        }
    }
}

/// Installs the process's subscriber: logs in `format`, and spans to
/// `otlp_endpoint` (else the standard variables), if any. Call it once, from
/// a thread outside any async runtime or inside one: the exporter has its
/// own thread.
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let provider = match traces_endpoint(otlp_endpoint) {
        Some(endpoint) => Some(provider(&endpoint)?),
        None => None,
    };
    let spans = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("switchboard"))
            .with_filter(filter_fn(exported))
    });
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init();
    Ok(Telemetry { provider })
}

/// What the exporter gets: our spans, which are at debug level so that
/// without an exporter they cost nothing (no layer enables them at the usual
/// `RUST_LOG=info`), and our info-or-worse events, as span events. Not the
/// exporter's own HTTP client.
fn exported(meta: &tracing::Metadata<'_>) -> bool {
    let ours = meta.target().starts_with("switchboard");
    let level = if meta.is_span() {
        tracing::Level::DEBUG
    } else {
        tracing::Level::INFO
    };
    ours && *meta.level() <= level
}

/// The URL spans go to: the flag (a base URL), else the standard variables.
fn traces_endpoint(flag: Option<&str>) -> Option<String> {
    let base = |url: &str| format!("{}/v1/traces", url.trim_end_matches('/'));
    if let Some(url) = flag.filter(|url| !url.is_empty()) {
        return Some(base(url));
    }
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT").map(|url| base(&url)))
}

fn provider(endpoint: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let protocol = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").ok().as_deref() {
        None | Some("") | Some("http/protobuf") => Protocol::HttpBinary,
        Some("http/json") => Protocol::HttpJson,
        Some(other) => return Err(TelemetryError::Protocol(other.to_owned())),
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "switchboard".to_owned());
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_is_a_base_url() {
        assert_eq!(
            traces_endpoint(Some("http://collector:4318/")).as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert!("xml".parse::<LogFormat>().is_err());
    }
}
