//! Configuration: flags > `SWITCHBOARD_*` environment > config file > defaults
//! (DESIGN §8). clap applies flags over the environment; this module adds the
//! config file and the defaults.

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;
use switchboard::http::HttpConfig;
use switchboard::server::{AgentSpec, ProviderSpec, ServerConfig};
use switchboard_actors::agent::{AgentConfig, Price};
use switchboard_events::catalog::{Budget, BudgetPeriod};

use crate::cli::{GlobalArgs, ServeArgs};

/// The config file read when `--config` is not given, if it exists.
const DEFAULT_CONFIG: &str = "switchboard.toml";
const DEFAULT_DATA_DIR: &str = "./data";
const DEFAULT_HTTP: &str = "127.0.0.1:8080";

/// `switchboard.toml` (DESIGN §8). Unknown keys are refused, so a typo is an
/// error rather than a setting silently not applied.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    data_dir: Option<PathBuf>,
    #[serde(default)]
    http: HttpSection,
    #[serde(default)]
    nats: NatsSection,
    #[serde(default)]
    router: RouterSection,
    #[serde(default)]
    agents: Vec<AgentSection>,
    #[serde(default)]
    routes: Vec<RouteSection>,
    /// USD per million tokens, by model (an `echo` agent's model is its name).
    #[serde(default)]
    prices: BTreeMap<String, PriceSection>,
    #[serde(default)]
    conversations: ConversationsSection,
    #[serde(default)]
    budgets: BudgetsSection,
    #[serde(default)]
    alerts: AlertsSection,
}

/// `[alerts]`: where alerts are pushed. Webhook URLs are secrets: never printed.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertsSection {
    #[serde(default)]
    webhooks: Vec<String>,
}

impl std::fmt::Debug for AlertsSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AlertsSection {{ webhooks: {} URLs }}",
            self.webhooks.len()
        )
    }
}

/// Alert thresholds, and budgets per user (a keys' owner); a key's own
/// budget is set with the key (`keys issue|update --budget-usd`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetsSection {
    /// Percentages of a budget whose crossing is alerted (default 50, 80, 100).
    thresholds: Option<Vec<u32>>,
    #[serde(default)]
    users: BTreeMap<String, UserBudgetSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserBudgetSection {
    usd: f64,
    period: BudgetPeriod,
}

/// The HTTP front's address; read and checked now, served by the HTTP front.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpSection {
    addr: Option<std::net::SocketAddr>,
    /// Browser origins allowed to call the API (CORS); none: CORS off.
    #[serde(default)]
    cors_origins: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NatsSection {
    url: Option<String>,
    prefix: Option<String>,
    outbox_jetstream: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouterSection {
    default_agent: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentSection {
    name: String,
    provider: String,
    base_url: Option<String>,
    model: Option<String>,
    /// The environment variable holding the provider's API key (the key
    /// itself never goes in the file).
    api_key_env: Option<String>,
    max_concurrency: Option<usize>,
    timeout_secs: Option<u64>,
    max_retries: Option<u32>,
    circuit_failure_threshold: Option<u32>,
    circuit_open_secs: Option<u64>,
    /// Earlier messages sent with each turn, at most (0: the message alone).
    context_messages: Option<usize>,
    /// Tokens of earlier messages sent with each turn, at most (0: the
    /// message alone; unset: no cap but `context_messages`).
    context_tokens: Option<u64>,
    /// Echo only: milliseconds between its words, to stream like a model.
    word_delay_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSection {
    pattern: String,
    agent: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceSection {
    input: f64,
    output: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConversationsSection {
    max_live: Option<usize>,
    idle_passivate_secs: Option<u64>,
}

/// Settings every command shares.
#[derive(Debug)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub json: bool,
}

pub fn resolve(global: &GlobalArgs) -> anyhow::Result<Settings> {
    let file = config_file(global)?;
    Ok(Settings {
        data_dir: global
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
        json: global.json,
    })
}

fn config_file(global: &GlobalArgs) -> anyhow::Result<ConfigFile> {
    Ok(match &global.config {
        Some(path) => read(path)?,
        None if Path::new(DEFAULT_CONFIG).is_file() => read(Path::new(DEFAULT_CONFIG))?,
        None => ConfigFile::default(),
    })
}

/// The whole configuration of `serve`: flags (and their `SWITCHBOARD_*`
/// variables, which clap reads) over the config file over the defaults.
pub fn resolve_serve(global: &GlobalArgs, args: &ServeArgs) -> anyhow::Result<ServerConfig> {
    let file = config_file(global)?;
    let settings = resolve(global)?;
    let mut config = ServerConfig::new(settings.data_dir);
    config.nats_url = args.nats_url.clone().or(file.nats.url);
    config.prefix = args
        .nats_prefix
        .clone()
        .or(file.nats.prefix)
        .unwrap_or(config.prefix);
    validate_token("the NATS prefix", &config.prefix)?;
    config.outbox_jetstream = args.outbox_jetstream.clone().or(file.nats.outbox_jetstream);
    if config.outbox_jetstream.is_some() && config.nats_url.is_none() {
        bail!("--outbox-jetstream needs NATS (--nats-url): the embedded bus has no JetStream");
    }
    config.admin_key = std::env::var("SWITCHBOARD_ADMIN_KEY")
        .ok()
        .filter(|key| !key.is_empty());
    if !file.agents.is_empty() {
        config.agents = file
            .agents
            .into_iter()
            .map(|section| agent(section, &file.prices))
            .collect::<anyhow::Result<_>>()?;
    } else if let Some(price) = file.prices.get("echo") {
        config.agents[0].config.prices = micros(price)?;
    }
    let mut names = std::collections::HashSet::new();
    for spec in &config.agents {
        if !names.insert(spec.config.name.as_str()) {
            bail!("agent {:?} is configured twice", spec.config.name);
        }
    }
    config.default_agent = file
        .router
        .default_agent
        .unwrap_or_else(|| config.agents[0].config.name.clone());
    config.routes = file
        .routes
        .into_iter()
        .map(|route| (route.pattern, route.agent))
        .collect();
    if let Some(max_live) = args.max_live.or(file.conversations.max_live) {
        config.conversations.max_live = positive(max_live, "max_live")?;
    }
    if let Some(secs) = args
        .idle_passivate_secs
        .or(file.conversations.idle_passivate_secs)
    {
        config.conversations.idle_passivate =
            Duration::from_secs(positive(secs, "idle_passivate_secs")?);
    }
    if !args.no_http {
        let addr = args
            .http
            .or(file.http.addr)
            .unwrap_or_else(|| DEFAULT_HTTP.parse().expect("the default address parses"));
        let mut http = HttpConfig::new(addr);
        http.cors_origins = file.http.cors_origins;
        config.http = Some(http);
    }
    if let Some(secs) = args.drain_timeout_secs {
        config.drain_timeout = Duration::from_secs(secs);
    }
    if let Some(thresholds) = file.budgets.thresholds {
        config.budgets.thresholds = thresholds;
    }
    for (user, budget) in file.budgets.users {
        let micros =
            usd_to_micros(budget.usd).with_context(|| format!("the budget of user {user:?}"))?;
        config.budgets.users.insert(
            user,
            Budget {
                micros,
                period: budget.period,
            },
        );
    }
    // Checked now, before anything starts; a URL is a secret, so only its
    // position is named.
    for (i, url) in file.alerts.webhooks.iter().enumerate() {
        let scheme = url
            .split_once("://")
            .map(|(scheme, _)| scheme.to_ascii_lowercase());
        if !matches!(scheme.as_deref(), Some("http" | "https")) {
            bail!("[alerts] webhooks[{i}] must be an http:// or https:// URL");
        }
    }
    config.webhooks.urls = file.alerts.webhooks;
    config.budgets = config
        .budgets
        .validated()
        .map_err(|e| anyhow::anyhow!("[budgets]: {e}"))?;
    Ok(config)
}

fn agent(
    section: AgentSection,
    prices: &BTreeMap<String, PriceSection>,
) -> anyhow::Result<AgentSpec> {
    validate_token("an agent name", &section.name)?;
    let mut config = AgentConfig::new(section.name.clone());
    let (provider, model) = match section.provider.as_str() {
        "echo" => (
            ProviderSpec::Echo {
                word_delay: Duration::from_millis(section.word_delay_ms.unwrap_or(0)),
            },
            section.name.clone(),
        ),
        "openai" => {
            let name = &section.name;
            if section.word_delay_ms.is_some() {
                bail!("agent {name:?}: word_delay_ms is for echo agents only");
            }
            let base_url = section
                .base_url
                .with_context(|| format!("agent {name:?}: provider openai needs base_url"))?;
            let model = section
                .model
                .with_context(|| format!("agent {name:?}: provider openai needs model"))?;
            let api_key = match &section.api_key_env {
                Some(var) => Some(std::env::var(var).with_context(|| {
                    format!(
                        "agent {name:?}: the environment variable {var} (api_key_env) is not set"
                    )
                })?),
                None => None,
            };
            (
                ProviderSpec::OpenAi {
                    base_url,
                    model: model.clone(),
                    api_key,
                },
                model,
            )
        }
        other => bail!(
            "agent {:?}: unknown provider {other:?} (expected echo or openai)",
            section.name
        ),
    };
    if let Some(price) = prices.get(&model) {
        config.prices = micros(price)?;
    } else if let Some(price) = Price::builtin(&model) {
        config.prices = price;
    }
    if let Some(n) = section.max_concurrency {
        config.max_concurrency =
            positive(n, &format!("agent {:?}: max_concurrency", section.name))?;
    }
    if let Some(secs) = section.timeout_secs {
        config.timeout = Duration::from_secs(positive(
            secs,
            &format!("agent {:?}: timeout_secs", section.name),
        )?);
    }
    if let Some(n) = section.max_retries {
        config.max_retries = n;
    }
    if let Some(n) = section.context_messages {
        config.context_messages = n;
    }
    if let Some(n) = section.context_tokens {
        config.context_tokens = Some(n);
    }
    if let Some(n) = section.circuit_failure_threshold {
        config.circuit_failure_threshold = positive(
            n,
            &format!("agent {:?}: circuit_failure_threshold", section.name),
        )?;
    }
    if let Some(secs) = section.circuit_open_secs {
        config.circuit_open_for = Duration::from_secs(positive(
            secs,
            &format!("agent {:?}: circuit_open_secs", section.name),
        )?);
    }
    Ok(AgentSpec { config, provider })
}

/// `value`, refused when it is 0: a count or a number of seconds that must
/// be at least 1 (zero would stop the service from doing anything).
fn positive<T: PartialEq + Default + std::fmt::Display>(value: T, what: &str) -> anyhow::Result<T> {
    if value == T::default() {
        bail!("{what} must be at least 1, not 0");
    }
    Ok(value)
}

/// USD per million tokens as integer micro-USD per million tokens, rounded to
/// the nearest micro-USD (prices are given to at most six decimals).
fn micros(price: &PriceSection) -> anyhow::Result<Price> {
    let convert = |usd: f64| {
        usd_to_micros(usd).map_err(|_| {
            anyhow::anyhow!("a price must be between 0 and 1e9 USD per million tokens, not {usd}")
        })
    };
    Ok(Price::new(convert(price.input)?, convert(price.output)?))
}

/// USD from a config file as integer micro-USD, rounded to the nearest.
fn usd_to_micros(usd: f64) -> anyhow::Result<u64> {
    if !usd.is_finite() || !(0.0..=1e9).contains(&usd) {
        bail!("{usd} is not an amount of USD from 0 to 1e9");
    }
    Ok((usd * 1_000_000.0).round() as u64)
}

/// Names that become a subject token and a stream id: `[A-Za-z0-9_-]{1,64}`.
fn validate_token(what: &str, value: &str) -> anyhow::Result<()> {
    let ok = (1..=64).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok {
        bail!("{what} {value:?} must be 1-64 characters from [A-Za-z0-9_-]");
    }
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<ConfigFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        let detail = e.message().to_owned();
        anyhow::anyhow!("config file {} is invalid: {detail}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    /// `serve --config <a file holding toml>`, resolved.
    fn serve_config(toml: &str) -> anyhow::Result<ServerConfig> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("switchboard.toml");
        std::fs::write(&path, toml).expect("writes");
        let path = path.to_str().expect("UTF-8 path");
        let cli = Cli::try_parse_from(["switchboard", "--config", path, "serve"]).expect("parses");
        let Command::Serve(args) = &cli.command else {
            panic!("not serve: {:?}", cli.command);
        };
        resolve_serve(&cli.global, args)
    }

    #[test]
    fn an_agents_context_defaults_to_100_messages_and_may_be_none() {
        let config = serve_config(
            "[[agents]]\nname = \"a\"\nprovider = \"echo\"\n\
             [[agents]]\nname = \"b\"\nprovider = \"echo\"\ncontext_messages = 0\n",
        )
        .expect("valid");
        let context: Vec<usize> = config
            .agents
            .iter()
            .map(|agent| agent.config.context_messages)
            .collect();
        assert_eq!(context, [100, 0]);
    }

    #[test]
    fn an_agents_context_has_no_token_cap_unless_given() {
        let config = serve_config(
            "[[agents]]\nname = \"a\"\nprovider = \"echo\"\n\
             [[agents]]\nname = \"b\"\nprovider = \"echo\"\ncontext_tokens = 4000\n\
             [[agents]]\nname = \"c\"\nprovider = \"echo\"\ncontext_tokens = 0\n",
        )
        .expect("valid");
        let tokens: Vec<Option<u64>> = config
            .agents
            .iter()
            .map(|agent| agent.config.context_tokens)
            .collect();
        assert_eq!(tokens, [None, Some(4000), Some(0)]);
        let refused =
            serve_config("[[agents]]\nname = \"a\"\nprovider = \"echo\"\ncontext_tokens = -1\n")
                .expect_err("a negative cap");
        assert!(
            refused.to_string().contains("integer `-1`, expected u64"),
            "{refused:#}"
        );
    }
}
