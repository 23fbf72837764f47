//! One module per command.

/// `println!` for command output: a closed pipe (`switchboard keys list | head`)
/// ends the process quietly instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cmd::write_stdout(format_args!($($arg)*))
    };
}

mod audit;
mod costs;
mod keys;
mod log;
mod replay;
mod serve;
mod verify;

use std::process::ExitCode;

use crate::cli::{AuditCommand, BenchCommand, Cli, Command, KeysCommand};
use crate::config;

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = config::resolve(&cli.global)?;
    match cli.command {
        Command::Serve(args) => serve::run(&cli.global, args),
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
        Command::Bench(BenchCommand::Nats(args)) => crate::bench::nats::run(&settings, args),
        Command::Bench(BenchCommand::Http(args)) => crate::bench::http::run(&settings, args),
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

/// Writes one line to stdout; see [`out!`].
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(args)
        .and_then(|()| stdout.write_all(b"\n"));
    exit_on_broken_pipe(written);
}

/// Exits quietly when the reader of stdout has gone; reports other write errors.
pub fn exit_on_broken_pipe(result: std::io::Result<()>) {
    match result {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("error: cannot write to stdout: {e}");
            std::process::exit(1);
        }
    }
}
