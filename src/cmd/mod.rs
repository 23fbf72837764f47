//! One module per command.

mod audit;
mod costs;
mod keys;
mod log;
mod replay;
mod verify;

use std::process::ExitCode;

use crate::cli::{AuditCommand, BenchCommand, Cli, Command, KeysCommand};
use crate::config;

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = config::resolve(&cli.global)?;
    match cli.command {
        Command::Keys(KeysCommand::Issue(args)) => keys::issue(&settings, args),
        Command::Keys(KeysCommand::List) => keys::list(&settings),
        Command::Keys(KeysCommand::Revoke(args)) => keys::revoke(&settings, args),
        Command::Keys(KeysCommand::Update(args)) => keys::update(&settings, args),
        Command::Log(args) => log::run(&settings, args),
        Command::Replay(args) => replay::run(&settings, args),
        Command::Verify => verify::run(&settings),
        Command::Audit(AuditCommand::Export(args)) => audit::export(&settings, args),
        Command::Costs(args) => costs::run(&settings, args),
        Command::Bench(BenchCommand::Log(args)) => crate::bench::log::run(&settings, args),
    }
}

/// A progress bar on stderr for a walk over the log up to `total` events;
/// hidden when stderr is not a terminal or `--json` is set.
pub fn progress_bar(total: u64, what: &str, json: bool) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if json || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} events ({per_sec}, eta {eta})",
        )
        .expect("the template is valid")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}
