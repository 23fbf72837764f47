//! A `nats-server` of the benchmark's own: started on a free loopback port,
//! logging into the scratch dir, killed when dropped.
//!
//! The test harness (`tests/support/nats.rs`) cannot be linked into the
//! binary, so this is its small sibling: no JetStream, no restarts. The server
//! is given a name unique to this process, and is trusted only once a client
//! connection on the port is greeted with that name: another process may
//! take the port between choosing it and the server binding it.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// How long the server may take to accept connections, on a busy machine.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Launches tried when the chosen port turns out to be taken.
const LAUNCH_ATTEMPTS: usize = 3;

/// A running `nats-server`; killed on drop.
pub struct NatsServerProcess {
    child: Child,
    port: u16,
    pub bin: PathBuf,
}

impl NatsServerProcess {
    /// Finds the binary (see [`locate_binary`]) and starts it on a free
    /// loopback port, logging to `log`; returns once it accepts clients.
    pub fn start(log: &Path) -> anyhow::Result<NatsServerProcess> {
        let bin = locate_binary()?;
        let name = format!("switchboard-bench-{}", std::process::id());
        let mut last_error = None;
        for _ in 0..LAUNCH_ATTEMPTS {
            match launch(&bin, &name, log) {
                Ok(server) => return Ok(server),
                Err(error) => last_error = Some(error),
            }
        }
        let error = last_error.expect("at least one launch was tried");
        Err(error.context(format!(
            "nats-server ({}) did not start; its log: {}",
            bin.display(),
            log.display()
        )))
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn launch(bin: &Path, name: &str, log: &Path) -> anyhow::Result<NatsServerProcess> {
    let port = free_port()?;
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot write {}", log.display()))?;
    let child = Command::new(bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-n", name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    let mut server = NatsServerProcess {
        child,
        port,
        bin: bin.to_owned(),
    };
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = server.child.try_wait()? {
            anyhow::bail!("exited ({status}) before accepting connections on port {port}");
        }
        if greets_as(port, name) {
            return Ok(server);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "did not accept connections on port {port} within {START_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port nobody listened on a moment ago.
fn free_port() -> anyhow::Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot find a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// Whether the server on `port` is ours: its `INFO` greeting names `name`.
fn greets_as(port: u16, name: &str) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    if stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .is_err()
    {
        return false;
    }
    let mut info = String::new();
    BufReader::new(stream).read_line(&mut info).is_ok()
        && info.starts_with("INFO")
        && info.contains(&format!("\"server_name\":\"{name}\""))
}

/// `NATS_SERVER_BIN`, else `nats-server` on `PATH`, else `.tools/bin/nats-server`
/// in the working directory or in the repo this binary was built from, where
/// `scripts/setup` installs it.
pub fn locate_binary() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN").filter(|bin| !bin.is_empty()) {
        let bin = PathBuf::from(bin);
        anyhow::ensure!(
            is_executable(&bin),
            "NATS_SERVER_BIN={} is not an executable file; point it at a nats-server binary, \
             or unset it and run scripts/setup",
            bin.display()
        );
        return Ok(bin);
    }
    let on_path = std::env::var_os("PATH").and_then(|path: OsString| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("nats-server"))
            .find(|bin| is_executable(bin))
    });
    if let Some(bin) = on_path {
        return Ok(bin);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let installed = [Path::new("."), repo]
        .iter()
        .map(|dir| dir.join(".tools/bin/nats-server"))
        .find(|bin| is_executable(bin))
        .map(|bin| std::fs::canonicalize(&bin).unwrap_or(bin));
    installed.ok_or_else(|| {
        anyhow::anyhow!(
            "the benchmark needs a nats-server and found none (NATS_SERVER_BIN is unset, none is \
             on PATH, none in ./.tools/bin or {}/.tools/bin): run scripts/setup to install it",
            repo.display()
        )
    })
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}
