//! Configuration: flags > `SWITCHBOARD_*` environment > config file > defaults
//! (DESIGN §8). clap applies flags over the environment; this module adds the
//! config file and the defaults.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

use crate::cli::GlobalArgs;

/// The config file read when `--config` is not given, if it exists.
const DEFAULT_CONFIG: &str = "switchboard.toml";
const DEFAULT_DATA_DIR: &str = "./data";

/// The parts of `switchboard.toml` this build reads; other sections are for
/// `serve` and are ignored by the offline commands.
#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    data_dir: Option<PathBuf>,
}

/// Settings every command shares.
#[derive(Debug)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub json: bool,
}

pub fn resolve(global: &GlobalArgs) -> anyhow::Result<Settings> {
    let file = match &global.config {
        Some(path) => read(path)?,
        None if Path::new(DEFAULT_CONFIG).is_file() => read(Path::new(DEFAULT_CONFIG))?,
        None => ConfigFile::default(),
    };
    Ok(Settings {
        data_dir: global
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
        json: global.json,
    })
}

fn read(path: &Path) -> anyhow::Result<ConfigFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        let detail = e.message().to_owned();
        anyhow::anyhow!("config file {} is invalid: {detail}", path.display())
    })
}
