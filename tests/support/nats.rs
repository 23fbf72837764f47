//! A real `nats-server` for integration tests, one per test.
//!
//! [`NatsServer::start`] launches the binary on a random loopback port with
//! JetStream on and a temporary store dir, and returns once the server accepts
//! client connections. The server is killed when the value is dropped, so a
//! failing test leaves nothing behind.
//!
//! The API is synchronous on purpose: it works from plain `#[test]`s and from
//! `#[tokio::test]`s alike. Starting, stopping and restarting block the calling
//! thread for as long as the server takes (milliseconds, up to a few seconds on
//! a loaded machine). A test that keeps traffic flowing while the server goes
//! away runs on the multi-threaded runtime and wraps the call so the other
//! tasks keep running:
//!
//! ```ignore
//! #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
//! async fn survives_a_restart() {
//!     let mut server = NatsServer::start();
//!     // ... start load against server.url() ...
//!     tokio::task::block_in_place(|| server.restart());
//! }
//! ```
//!
//! The binary comes from `NATS_SERVER_BIN`, else `nats-server` on `PATH`, else
//! `.tools/bin/nats-server` in the repo, where `scripts/setup` installs it. A
//! missing server fails the test; it never skips it.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long a launch may take before the test fails. Generous: CI machines are
/// small and busy compiling other tests at the same time.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a graceful stop may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The server's log line that names the port it bound.
const LISTENING: &str = "Listening for client connections on ";

/// A running (or, after [`stop`](Self::stop) / [`kill`](Self::kill), stopped)
/// `nats-server` owned by one test.
pub struct NatsServer {
    bin: PathBuf,
    /// Kept across restarts so JetStream state survives them.
    store: tempfile::TempDir,
    /// Chosen by the server on first start; every restart binds it again so
    /// clients reconnect to the same URL.
    port: u16,
    running: Option<Running>,
    /// Everything the server wrote to stderr, over all launches.
    log: Arc<Mutex<String>>,
    launches: usize,
}

struct Running {
    child: Child,
    /// Drains the server's stderr into `log`; ends when the server exits.
    reader: JoinHandle<()>,
}

enum LaunchError {
    /// The fixed port is still held (by the previous server's socket or by
    /// someone else); worth trying again.
    AddrInUse,
    Failed(String),
}

impl NatsServer {
    /// Starts a server on a free loopback port with JetStream and a fresh
    /// temporary store, and blocks until it accepts client connections.
    ///
    /// Panics, with the server's log, when no binary is found or the server
    /// does not come up within 30 seconds.
    pub fn start() -> NatsServer {
        let bin = nats_server_bin();
        let store = tempfile::Builder::new()
            .prefix("nats-store-")
            .tempdir()
            .expect("the temp dir is writable");
        let mut server = NatsServer {
            bin,
            store,
            port: 0,
            running: None,
            log: Arc::new(Mutex::new(String::new())),
            launches: 0,
        };
        // The server picks the port (`-p -1`) and logs it: no window in which
        // another process could take a port we picked and released.
        match server.launch(None, Instant::now() + START_TIMEOUT) {
            Ok(()) => server,
            Err(LaunchError::AddrInUse) => server.fail("could not bind a random port"),
            Err(LaunchError::Failed(why)) => server.fail(&why),
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port; the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store dir; the same across restarts.
    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// Whether the harness has a server process up (it does not notice a
    /// server that crashed on its own).
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Everything the server has logged so far, over all its launches; handy
    /// in an assertion message.
    pub fn log(&self) -> String {
        lock(&self.log).clone()
    }

    /// Stops the server gracefully (SIGTERM: clients are disconnected and
    /// JetStream flushes its store), killing it if it takes longer than 10
    /// seconds. Does nothing when it is not running.
    pub fn stop(&mut self) {
        let Some(mut running) = self.running.take() else {
            return;
        };
        let terminated = Command::new("sh")
            .args(["-c", "kill -TERM \"$1\"", "sh"])
            .arg(running.child.id().to_string())
            .status()
            .is_ok_and(|status| status.success());
        if terminated {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = running.child.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        reap(running);
    }

    /// Kills the server with SIGKILL, as a crash or power loss would: no
    /// goodbye to clients, and JetStream writes not yet flushed are lost.
    /// Does nothing when it is not running.
    pub fn kill(&mut self) {
        if let Some(running) = self.running.take() {
            reap(running);
        }
    }

    /// Stops the server gracefully if it is running, then starts it again on
    /// the same port with the same store dir, and blocks until it accepts
    /// client connections. After [`kill`](Self::kill) or [`stop`](Self::stop)
    /// it only starts it.
    ///
    /// Panics, with the server's log, when the server does not come back
    /// within 30 seconds.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.launch(Some(self.port), deadline) {
                Ok(()) => return,
                // The port can stay busy for a moment after the old process
                // exits; keep trying until the deadline.
                Err(LaunchError::AddrInUse) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(100));
                }
                Err(LaunchError::AddrInUse) => {
                    let why = format!("could not bind port {} again on restart", self.port);
                    self.fail(&why)
                }
                Err(LaunchError::Failed(why)) => self.fail(&why),
            }
        }
    }

    fn args(&self, port: Option<u16>) -> Vec<OsString> {
        let port = port.map_or_else(|| "-1".to_string(), |port| port.to_string());
        let mut args: Vec<OsString> = ["-a", "127.0.0.1", "-p", &port, "-n", "switchboard-test"]
            .iter()
            .map(OsString::from)
            .collect();
        args.push("-js".into());
        args.push("-sd".into());
        args.push(self.store.path().into());
        args
    }

    /// Spawns the server and waits until it answers on its port. On success
    /// `self.running` and `self.port` are set.
    fn launch(&mut self, port: Option<u16>, deadline: Instant) -> Result<(), LaunchError> {
        self.launches += 1;
        let args = self.args(port);
        let log_start = {
            let mut log = lock(&self.log);
            log.push_str(&format!(
                "--- launch {}: {} {}\n",
                self.launches,
                self.bin.display(),
                args.iter()
                    .map(|arg| arg.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
            log.len()
        };

        let mut child = Command::new(&self.bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| {
                LaunchError::Failed(format!("could not run {}: {error}", self.bin.display()))
            })?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let (port_tx, port_rx) = mpsc::channel();
        let reader = spawn_log_reader(stderr, Arc::clone(&self.log), port_tx);
        let mut running = Running { child, reader };

        // Trust the port only once this process has logged it: while our
        // server was away, another test's server may have bound it.
        let mut bound = None;
        loop {
            if let Ok(Some(status)) = running.child.try_wait() {
                // Let the reader catch the last lines before we look at them.
                let _ = running.reader.join();
                let log = lock(&self.log);
                let this_launch = log.get(log_start..).unwrap_or_default();
                if this_launch.contains("address already in use") {
                    return Err(LaunchError::AddrInUse);
                }
                return Err(LaunchError::Failed(format!(
                    "exited ({status}) before accepting client connections"
                )));
            }
            if bound.is_none() {
                bound = port_rx.try_recv().ok();
            }
            if let (Some(bound), Some(wanted)) = (bound, port) {
                if bound != wanted {
                    reap(running);
                    return Err(LaunchError::Failed(format!(
                        "listens on port {bound}, not on {wanted} as asked"
                    )));
                }
            }
            if let Some(port) = bound {
                if answers_as_nats(port) {
                    self.port = port;
                    self.running = Some(running);
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                reap(running);
                return Err(LaunchError::Failed(format!(
                    "did not accept client connections within {START_TIMEOUT:?}"
                )));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn fail(&mut self, why: &str) -> ! {
        self.kill();
        panic!(
            "nats-server {why}\n  binary: {}\n  store: {}\n--- nats-server log ---\n{}",
            self.bin.display(),
            self.store.path().display(),
            self.log()
        );
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `nats-server` binary the tests run ([`locate_binary`] from this
/// process's environment and the repository); panics with how to get one
/// when there is none.
pub fn nats_server_bin() -> PathBuf {
    locate_binary(
        std::env::var_os("NATS_SERVER_BIN"),
        std::env::var_os("PATH"),
        Path::new(env!("CARGO_MANIFEST_DIR")),
    )
    .unwrap_or_else(|message| panic!("{message}"))
}

/// Finds the server binary: `NATS_SERVER_BIN`, else `nats-server` on `PATH`,
/// else `.tools/bin/nats-server` in the package dir or the workspace root above
/// it. The error names `scripts/setup`.
pub fn locate_binary(
    nats_server_bin: Option<OsString>,
    path: Option<OsString>,
    manifest_dir: &Path,
) -> Result<PathBuf, String> {
    if let Some(bin) = nats_server_bin.filter(|bin| !bin.is_empty()) {
        let bin = PathBuf::from(bin);
        return if is_executable(&bin) {
            Ok(bin)
        } else {
            Err(format!(
                "NATS_SERVER_BIN={} is not an executable file; point it at a nats-server \
                 binary, or unset it and run scripts/setup",
                bin.display()
            ))
        };
    }
    let on_path = path.and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("nats-server"))
            .find(|bin| is_executable(bin))
    });
    if let Some(bin) = on_path {
        return Ok(bin);
    }
    // Workspace members sit one level below the root, which holds `.tools`.
    let installed = manifest_dir
        .ancestors()
        .take(2)
        .map(|dir| dir.join(".tools/bin/nats-server"))
        .find(|bin| is_executable(bin));
    installed.ok_or_else(|| {
        format!(
            "no nats-server found (NATS_SERVER_BIN is unset, none is on PATH, none in \
             {}/.tools/bin): run scripts/setup to install it",
            manifest_dir.display()
        )
    })
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Copies the server's stderr into `log`, line by line, and sends the client
/// port once the server logs it. Reading never stops before the server exits,
/// so the server never blocks on a full pipe.
fn spawn_log_reader(
    stderr: impl Read + Send + 'static,
    log: Arc<Mutex<String>>,
    port_tx: mpsc::Sender<u16>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut lines = BufReader::new(stderr);
        let mut line = Vec::new();
        loop {
            line.clear();
            match lines.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&line);
            if let Some(port) = listening_port(&text) {
                let _ = port_tx.send(port);
            }
            let mut log = lock(&log);
            log.push_str(&text);
            if !text.ends_with('\n') {
                log.push('\n');
            }
        }
    })
}

/// The port in `... Listening for client connections on 127.0.0.1:4222`.
pub fn listening_port(line: &str) -> Option<u16> {
    let (_, addr) = line.split_once(LISTENING)?;
    let (_, port) = addr.trim().rsplit_once(':')?;
    port.parse().ok()
}

/// Whether a NATS server answers on the port: a client connection gets the
/// server's `INFO` line first thing.
fn answers_as_nats(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    if stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .is_err()
    {
        return false;
    }
    let mut greeting = [0u8; 4];
    stream.read_exact(&mut greeting).is_ok() && greeting == *b"INFO"
}

/// SIGKILLs the server if it still runs, and waits for it and its log reader.
fn reap(mut running: Running) {
    let _ = running.child.kill();
    let _ = running.child.wait();
    let _ = running.reader.join();
}

/// The log stays usable even if a thread panicked while holding it.
fn lock(log: &Mutex<String>) -> std::sync::MutexGuard<'_, String> {
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
