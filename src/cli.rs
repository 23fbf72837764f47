//! The command line (DESIGN §8).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "switchboard",
    version,
    about = "Event-sourced backbone for conversational assistants"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// The data dir (default ./data). Overrides SWITCHBOARD_DATA_DIR and the config file.
    #[arg(long, global = true, env = "SWITCHBOARD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The config file (default ./switchboard.toml when present).
    #[arg(long, global = true, env = "SWITCHBOARD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print JSON instead of human text.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: the actors and the NATS gateway, on NATS or the embedded bus.
    Serve(ServeArgs),
    /// Issue, list, update and revoke API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Print events from the log.
    Log(LogArgs),
    /// Rebuild projections from seq 1.
    Replay(ReplayArgs),
    /// Check the hash chain and compare every projection with its rebuild.
    Verify,
    /// The audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Spend and tokens, grouped.
    Costs(CostsArgs),
    /// Benchmarks, each beside a raw baseline measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Serve the HTTP API and console on this address (default 127.0.0.1:8080).
    #[arg(long, env = "SWITCHBOARD_HTTP")]
    pub http: Option<std::net::SocketAddr>,
    /// Run without the HTTP front (NATS clients only); wins over --http and
    /// SWITCHBOARD_HTTP (which images set), so a core node needs only this.
    #[arg(long)]
    pub no_http: bool,
    /// Serve on this NATS server (e.g. nats://127.0.0.1:4222) instead of the embedded bus.
    #[arg(long, env = "SWITCHBOARD_NATS_URL")]
    pub nats_url: Option<String>,
    /// The first token of every subject (default sb).
    #[arg(long, env = "SWITCHBOARD_NATS_PREFIX")]
    pub nats_prefix: Option<String>,
    /// Publish events matching this pattern (e.g. sb.evt.>) through JetStream,
    /// advancing only on the stream's acknowledgment; a stream must capture them.
    #[arg(long, env = "SWITCHBOARD_OUTBOX_JETSTREAM")]
    pub outbox_jetstream: Option<String>,
    /// At most this many conversation actors live at once (default 10000).
    #[arg(long, env = "SWITCHBOARD_MAX_LIVE")]
    pub max_live: Option<usize>,
    /// Passivate a conversation actor idle this long (default 300).
    #[arg(long, env = "SWITCHBOARD_IDLE_PASSIVATE_SECS")]
    pub idle_passivate_secs: Option<u64>,
    /// On shutdown, wait this long for running turns (default 30).
    #[arg(long, env = "SWITCHBOARD_DRAIN_TIMEOUT_SECS")]
    pub drain_timeout_secs: Option<u64>,
    /// Also serve GET /metrics on this address (for a node without the HTTP front).
    #[arg(long, env = "SWITCHBOARD_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Export spans over OTLP/HTTP to this collector (a base URL such as
    /// http://127.0.0.1:4318); default: OTEL_EXPORTER_OTLP_ENDPOINT, if set.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// Log lines as text (for people) or json (one object per line).
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT", default_value = "text")]
    pub log_format: switchboard::telemetry::LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Issue a key; prints it once. Only its SHA-256 is stored.
    Issue(IssueArgs),
    /// List keys (never the keys themselves).
    List,
    /// Revoke a key.
    Revoke(RevokeArgs),
    /// Change a key's limits or budget.
    Update(UpdateArgs),
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// A name to recognise the key by.
    #[arg(long)]
    pub name: String,
    /// The user or team that owns the key (budgets per user apply to it).
    #[arg(long)]
    pub owner: Option<String>,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Expire after this long: e.g. 30d, 12h, 90m, 2w.
    #[arg(long, value_parser = crate::parse::duration)]
    pub expires_in: Option<chrono::Duration>,
    /// Comma-separated scopes: chat, admin.
    #[arg(long, value_delimiter = ',', default_value = "chat")]
    pub scopes: Vec<switchboard_events::catalog::Scope>,
}

#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Requests per minute.
    #[arg(long)]
    pub rpm: Option<u32>,
    /// Tokens per minute.
    #[arg(long)]
    pub tpm: Option<u64>,
    /// Concurrent requests.
    #[arg(long)]
    pub max_parallel: Option<u32>,
    /// Budget in USD, e.g. 25 or 0.50 (kept as integer micro-USD).
    #[arg(long, value_parser = crate::parse::usd_to_micros)]
    pub budget_usd: Option<u64>,
    /// The budget's period, in UTC: day, month (the default for a new budget) or total.
    #[arg(long)]
    pub budget_period: Option<switchboard_events::catalog::BudgetPeriod>,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The key's id (from `keys list`).
    pub key_id: String,
    /// Why, for the audit trail.
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The key's id (from `keys list`).
    pub key_id: String,
    #[command(flatten)]
    pub limits: LimitArgs,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// The first seq to print.
    #[arg(long, default_value_t = 1)]
    pub from: u64,
    /// Only this stream, e.g. conv/c1 or key/key_ab12.
    #[arg(long)]
    pub stream: Option<String>,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Only this projection: history, audit, costs or keys.
    #[arg(long)]
    pub projection: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Write the audit trail as JSON lines, one envelope per line, oldest first.
    Export(AuditExportArgs),
}

#[derive(Debug, Args)]
pub struct AuditExportArgs {
    /// From this time on (RFC 3339 or YYYY-MM-DD, UTC).
    #[arg(long, value_parser = crate::parse::instant)]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Before this time (RFC 3339 or YYYY-MM-DD, UTC).
    #[arg(long, value_parser = crate::parse::instant)]
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// Only events about this key id.
    #[arg(long)]
    pub key: Option<String>,
    /// Only events of this type, e.g. key_revoked.
    #[arg(long = "type")]
    pub event_type: Option<String>,
}

#[derive(Debug, Args)]
pub struct CostsArgs {
    /// Group by key, user, model or day.
    #[arg(long, default_value = "key")]
    pub by: switchboard_projections::CostGroup,
    /// First UTC day (YYYY-MM-DD), inclusive.
    #[arg(long, value_parser = crate::parse::day)]
    pub since: Option<chrono::NaiveDate>,
    /// Last UTC day (YYYY-MM-DD), inclusive.
    #[arg(long, value_parser = crate::parse::day)]
    pub until: Option<chrono::NaiveDate>,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The event log: raw sled baseline, durable appends, replay, bytes per event.
    Log(crate::bench::log::LogBenchArgs),
    /// The service over a nats-server it starts: acks/s, ack latency and
    /// replies/s at 1, 16 and 64 clients beside plain NATS request/reply and
    /// sled flushes, and memory per live conversation actor.
    Nats(crate::bench::nats::NatsBenchArgs),
    /// The HTTP front over a nats-server it starts: keyed sends and streamed
    /// chat completions at 64 connections beside NATS sends, and the latency
    /// `/v1/chat/completions` adds in front of an OpenAI-compatible upstream.
    Http(crate::bench::http::HttpBenchArgs),
}
