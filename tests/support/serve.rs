//! `switchboard serve` as a child process on a real NATS server, and a client
//! speaking the NATS contract (DESIGN §6) to it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchboard::bus::{Bus, BusError, Headers, NatsBus};

/// The admin key every test server is started with.
pub const ADMIN_KEY: &str = "sb-test-admin-key-0123456789abcdef";
/// How long a request may take on a busy 2-core CI machine.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `switchboard serve`.
pub struct ServeProcess {
    child: Option<Child>,
    stderr_path: PathBuf,
    /// The `--json` ready line.
    pub ready: Value,
}

impl ServeProcess {
    /// Starts `serve --json --nats-url <nats_url>` on `data_dir` with `args`
    /// and waits for its ready line. Its stderr goes to `<data_dir>.stderr`.
    pub fn start(data_dir: &Path, nats_url: &str, args: &[&str]) -> ServeProcess {
        ServeProcess::start_with_env(data_dir, nats_url, args, &[])
    }

    /// [`ServeProcess::start`] with these environment variables set too.
    pub fn start_with_env(
        data_dir: &Path,
        nats_url: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> ServeProcess {
        let stderr_path = data_dir.with_extension("stderr");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_path)
            .expect("the stderr file can be created");
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .arg("serve")
            .arg("--json")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--nats-url")
            .arg(nats_url)
            .args(["--http", "127.0.0.1:0"])
            .args(args)
            .env("SWITCHBOARD_ADMIN_KEY", ADMIN_KEY)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .env_remove("SWITCHBOARD_CONFIG")
            .current_dir(data_dir.parent().expect("the data dir has a parent"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("the switchboard binary starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (lines, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = lines.send(line);
            }
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut process = ServeProcess {
            child: Some(child),
            stderr_path,
            ready: Value::Null,
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match ready.recv_timeout(left) {
                Ok(line) => {
                    if let Ok(value) = serde_json::from_str::<Value>(&line) {
                        if value["ready"] == json!(true) {
                            process.ready = value;
                            return process;
                        }
                    }
                }
                Err(_) => panic!(
                    "switchboard serve did not get ready; its stderr:\n{}",
                    process.stderr()
                ),
            }
        }
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits (up to a minute) for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the process is running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("waiting works") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "serve did not exit after SIGTERM; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl ServeProcess {
    /// [`ServeProcess::terminate`], asserting a clean exit; the assertion
    /// carries what the process wrote to stderr.
    pub fn terminate_cleanly(&mut self) {
        let status = self.terminate();
        assert!(
            status.success(),
            "serve exited with {status} after SIGTERM; stderr:\n{}",
            self.stderr()
        );
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A client of the NATS contract on its own connection.
#[derive(Clone)]
pub struct Client {
    pub bus: Bus,
    pub prefix: String,
}

impl Client {
    pub async fn connect(nats_url: &str) -> Client {
        let bus = Bus::from(NatsBus::connect(nats_url).await.expect("the URL parses"));
        Client {
            bus,
            prefix: "sb".to_owned(),
        }
    }

    /// A request with `Authorization: Bearer <key>`; the reply as JSON.
    pub async fn request(&self, subject: &str, key: &str, body: Value) -> Result<Value, BusError> {
        let headers = Headers::new().with("Authorization", format!("Bearer {key}"));
        let payload = serde_json::to_vec(&body).expect("JSON serializes");
        let reply = self
            .bus
            .request(subject, headers, payload, REQUEST_TIMEOUT)
            .await?;
        Ok(serde_json::from_slice(&reply.payload).expect("replies are JSON"))
    }

    /// Issues a chat key through the admin subject; returns `(key_id, key)`.
    pub async fn issue_key(&self, body: Value) -> (String, String) {
        let subject = format!("{}.admin.keys.issue", self.prefix);
        let reply = self
            .request(&subject, ADMIN_KEY, body)
            .await
            .expect("the admin request is answered");
        assert_eq!(reply["ok"], json!(true), "{reply}");
        (
            reply["key_id"].as_str().expect("key_id").to_owned(),
            reply["key"].as_str().expect("key").to_owned(),
        )
    }

    pub async fn send(
        &self,
        key: &str,
        conversation: &str,
        content: &str,
        message_id: &str,
    ) -> Result<Value, BusError> {
        let subject = format!("{}.conv.{conversation}.send", self.prefix);
        self.request(
            &subject,
            key,
            json!({ "content": content, "message_id": message_id }),
        )
        .await
    }

    pub async fn history(&self, key: &str, conversation: &str) -> Value {
        let subject = format!("{}.conv.{conversation}.history", self.prefix);
        let reply = self
            .request(&subject, key, json!({}))
            .await
            .expect("history is answered");
        assert_eq!(reply["ok"], json!(true), "{reply}");
        reply
    }
}
