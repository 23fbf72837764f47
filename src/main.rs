//! The `switchboard` binary: parses the command line and hands over to the
//! command's module. Everything long-lived lives in the library crates.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod bench;
mod cli;
mod cmd;
mod config;
mod datadir;
mod parse;

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    match cmd::run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", one_line(&error));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, joined by ": ", leaving out a cause
/// whose text the message already holds (many errors print their source).
fn one_line(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message.replace('\n', " ")
}
