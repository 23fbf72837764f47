//! The router: named agent, rules in order, default, unknown agents, bad regexes.

use switchboard_actors::router::{RouteError, Routed, Router, RouterConfigError};

const LEGAL: &str = r"(?i)\b(contract|lawsuit)\b";
const MONEY: &str = r"(?i)\b(invoice|refund|contract)\b";

fn router() -> Router {
    Router::new(
        vec![
            (LEGAL.to_owned(), "lawyer".to_owned()),
            (MONEY.to_owned(), "billing".to_owned()),
        ],
        "echo",
    )
    .expect("valid rules")
}

fn known(agent: &str) -> bool {
    matches!(agent, "echo" | "lawyer" | "billing" | "assistant")
}

fn routed(agent: &str, rule: Option<&str>) -> Routed {
    Routed {
        agent: agent.to_owned(),
        rule: rule.map(str::to_owned),
    }
}

#[test]
fn the_first_matching_rule_wins() {
    let router = router();
    // Both rules match "contract"; the first configured wins.
    assert_eq!(
        router.route("Please review this CONTRACT", None, known),
        Ok(routed("lawyer", Some(LEGAL)))
    );
    assert_eq!(
        router.route("where is my refund?", None, known),
        Ok(routed("billing", Some(MONEY)))
    );
}

#[test]
fn unmatched_messages_go_to_the_default_agent() {
    assert_eq!(
        router().route("contracts are plural, no word match", None, known),
        Ok(routed("echo", None))
    );
    assert_eq!(router().default_agent(), "echo");
}

#[test]
fn a_named_agent_wins_over_rules() {
    assert_eq!(
        router().route("about the lawsuit", Some("assistant"), known),
        Ok(routed("assistant", None))
    );
}

#[test]
fn an_unknown_named_agent_is_refused() {
    assert_eq!(
        router().route("hello", Some("ghost"), known),
        Err(RouteError::UnknownAgent("ghost".to_owned()))
    );
}

#[test]
fn rules_and_defaults_pointing_nowhere_are_found() {
    let router = Router::new(vec![("x".to_owned(), "ghost".to_owned())], "echo").expect("valid");
    assert_eq!(
        router.check(known),
        Err(RouteError::UnknownAgent("ghost".to_owned()))
    );
    assert_eq!(
        router.route("x marks it", None, known),
        Err(RouteError::UnknownAgent("ghost".to_owned()))
    );
    let no_default = Router::new(Vec::new(), "nobody").expect("valid");
    assert_eq!(
        no_default.check(known),
        Err(RouteError::UnknownAgent("nobody".to_owned()))
    );
    assert_eq!(self::router().check(known), Ok(()));
}

#[test]
fn an_invalid_regex_is_an_error_naming_it() {
    let error = Router::new(
        vec![
            ("fine".to_owned(), "echo".to_owned()),
            ("(unclosed".to_owned(), "lawyer".to_owned()),
        ],
        "echo",
    )
    .expect_err("bad regex");

    let RouterConfigError::InvalidPattern { pattern, .. } = &error;
    assert_eq!(pattern, "(unclosed");
    assert!(error.to_string().contains("(unclosed"), "{error}");
}
