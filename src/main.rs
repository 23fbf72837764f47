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

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    match cmd::run(cli) {
        Ok(code) => code,
        Err(error) => {
            // One line, whatever the error: the chain of causes joined by ": ".
            let message = format!("{error:#}").replace('\n', " ");
            eprintln!("error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}
