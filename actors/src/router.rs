//! The router: which agent answers a message (DESIGN §5).
//!
//! A message that names its agent goes there; otherwise the first rule whose
//! regex matches the message's content decides; otherwise the default agent
//! answers. Rules are tried in the order they are configured (`[[routes]]`), so
//! an operator puts the specific ones first. The matched pattern is returned so
//! `agent_routed.rule` can say why a message went where it went.

use regex::Regex;

/// Ordered routing rules and the default agent, compiled once at start.
///
/// ```
/// use switchboard_actors::router::{Routed, Router};
///
/// let router = Router::new(
///     vec![(r"(?i)\b(contract|lawsuit)\b".to_owned(), "assistant".to_owned())],
///     "echo",
/// )
/// .unwrap();
/// let known = |agent: &str| matches!(agent, "echo" | "assistant");
/// assert_eq!(
///     router.route("About the Contract", None, known).unwrap(),
///     Routed { agent: "assistant".into(), rule: Some(r"(?i)\b(contract|lawsuit)\b".into()) },
/// );
/// assert_eq!(router.route("hello", None, known).unwrap().agent, "echo");
/// ```
#[derive(Debug, Clone)]
pub struct Router {
    rules: Vec<Rule>,
    default_agent: String,
}

#[derive(Debug, Clone)]
struct Rule {
    pattern: String,
    regex: Regex,
    agent: String,
}

/// Where a message goes, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// The agent that answers.
    pub agent: String,
    /// The pattern of the rule that matched; `None` when the message named its
    /// agent or the default agent took it.
    pub rule: Option<String>,
}

/// The routing configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum RouterConfigError {
    /// A rule's pattern is not a valid regex.
    #[error("route pattern {pattern:?} is not a valid regex: {source}")]
    InvalidPattern {
        /// The pattern as configured.
        pattern: String,
        /// What the regex compiler said.
        #[source]
        source: regex::Error,
    },
}

/// A message cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The agent the message (or the matching rule, or the default) names is not
    /// configured.
    #[error("unknown agent {0:?}")]
    UnknownAgent(String),
}

impl Router {
    /// Compile `rules` — `(pattern, agent)` pairs, tried in this order — with
    /// `default_agent` for messages no rule matches.
    pub fn new(
        rules: Vec<(String, String)>,
        default_agent: impl Into<String>,
    ) -> Result<Self, RouterConfigError> {
        let rules = rules
            .into_iter()
            .map(|(pattern, agent)| match Regex::new(&pattern) {
                Ok(regex) => Ok(Rule {
                    pattern,
                    regex,
                    agent,
                }),
                Err(source) => Err(RouterConfigError::InvalidPattern { pattern, source }),
            })
            .collect::<Result<_, _>>()?;
        Ok(Router {
            rules,
            default_agent: default_agent.into(),
        })
    }

    /// The agent messages go to when nothing else decides.
    pub fn default_agent(&self) -> &str {
        &self.default_agent
    }

    /// Choose the agent for a message with `content`, which may name
    /// `requested_agent`. `known_agents` says whether an agent is configured.
    ///
    /// A named agent wins if it exists and is `UnknownAgent` if not — a caller
    /// who asked for a specific agent must not silently get another. A rule or
    /// default pointing at an agent that does not exist is also `UnknownAgent`;
    /// [`Router::check`] finds those at start.
    pub fn route(
        &self,
        content: &str,
        requested_agent: Option<&str>,
        known_agents: impl Fn(&str) -> bool,
    ) -> Result<Routed, RouteError> {
        let routed = match requested_agent {
            Some(agent) => Routed {
                agent: agent.to_owned(),
                rule: None,
            },
            None => match self.rules.iter().find(|rule| rule.regex.is_match(content)) {
                Some(rule) => Routed {
                    agent: rule.agent.clone(),
                    rule: Some(rule.pattern.clone()),
                },
                None => Routed {
                    agent: self.default_agent.clone(),
                    rule: None,
                },
            },
        };
        if known_agents(&routed.agent) {
            Ok(routed)
        } else {
            Err(RouteError::UnknownAgent(routed.agent))
        }
    }

    /// Check that the default agent and every rule's agent are configured, so
    /// a typo in the config fails at start rather than on the first message.
    pub fn check(&self, known_agents: impl Fn(&str) -> bool) -> Result<(), RouteError> {
        std::iter::once(&self.default_agent)
            .chain(self.rules.iter().map(|rule| &rule.agent))
            .find(|agent| !known_agents(agent))
            .map_or(Ok(()), |agent| Err(RouteError::UnknownAgent(agent.clone())))
    }
}
