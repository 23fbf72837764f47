use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct LogBenchArgs {}

pub fn run(_settings: &crate::config::Settings, _args: LogBenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("bench log is being written")
}
