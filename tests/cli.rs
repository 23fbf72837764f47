//! The `switchboard` binary's offline commands (DESIGN §8), run as child
//! processes against real data dirs: issuing and listing keys, the log, verify,
//! replay, audit export, costs, the refusals of a data dir that is missing,
//! locked, corrupt or not a directory, and where the data dir comes from.
//!
//! Every child runs in its own temporary working dir with the `SWITCHBOARD_*`
//! variables removed, so neither the developer's environment nor a
//! `switchboard.toml` in the repository can leak in.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{PoisonError, RwLock};

use chrono::NaiveDate;
use serde_json::{json, Value};
use switchboard_events::catalog::UsageRecorded;
use switchboard_events::{Event, EventLog, ExpectedVersion, NewEvent, OpenMode, StreamId};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// Every command that needs an existing data dir, with arguments that would be
/// valid on a healthy one.
const MUST_EXIST: &[&[&str]] = &[
    &["log"],
    &["log", "--from", "2", "--stream", "key/key_0000000000000000"],
    &["verify"],
    &["costs"],
    &["costs", "--by", "day"],
    &["keys", "list"],
    &["audit", "export"],
    &["replay"],
    &["replay", "--projection", "keys"],
    &["keys", "revoke", "key_0000000000000000"],
    &["keys", "update", "key_0000000000000000", "--rpm", "1"],
];

/// The one command that creates a missing data dir.
const ISSUE: &[&str] = &["keys", "issue", "--name", "someone"];

// ---------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------

struct Output {
    what: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exited with {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.what,
            self.status.code(),
            self.stdout,
            self.stderr
        )
    }
}

impl Output {
    fn success(self) -> Output {
        assert!(self.status.success(), "expected success: {self:?}");
        self
    }

    /// Asserts the refusal every command owes its caller: exit code 1, nothing
    /// on stdout, and exactly one line on stderr (no panic, no backtrace).
    /// Returns that line.
    fn refusal(&self) -> &str {
        assert_eq!(
            self.status.code(),
            Some(1),
            "expected exit code 1: {self:?}"
        );
        assert!(self.stdout.is_empty(), "expected no stdout: {self:?}");
        for noise in ["panicked", "stack backtrace", "RUST_BACKTRACE"] {
            assert!(
                !self.stderr.contains(noise),
                "stderr has {noise:?}: {self:?}"
            );
        }
        let text = self.stderr.trim_end_matches('\n');
        assert!(
            !text.is_empty() && !text.contains('\n'),
            "expected exactly one line on stderr: {self:?}"
        );
        assert!(text.starts_with("error: "), "expected `error: …`: {self:?}");
        text
    }

    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("line {line:?} is not JSON ({e}): {self:?}"))
            })
            .collect()
    }
}

/// Held (shared) while a child is spawned, and exclusively while this process
/// closes a data dir it opened. A child forked while the dir's lock file is open
/// here shares that flock until it execs; `spawn` returns only after the exec,
/// so closing under the exclusive guard leaves no child holding the lock.
static SPAWNING: RwLock<()> = RwLock::new(());

/// Closes a log opened in this process; see [`SPAWNING`].
fn close(log: EventLog) {
    let _closing = SPAWNING.write().unwrap_or_else(PoisonError::into_inner);
    drop(log);
}

/// Runs the binary in `cwd` with a clean `SWITCHBOARD_*` environment plus `env`.
fn run_in(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .env_remove("SWITCHBOARD_DATA_DIR")
        .env_remove("SWITCHBOARD_CONFIG")
        // A panic would then print a backtrace, which `refusal` looks for.
        .env("RUST_BACKTRACE", "1");
    for (name, value) in env {
        command.env(name, value);
    }
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = {
        let _spawning = SPAWNING.read().unwrap_or_else(PoisonError::into_inner);
        command.spawn().expect("the switchboard binary runs")
    };
    let output = child.wait_with_output().expect("the child's output");
    Output {
        what: format!("switchboard {}", args.join(" ")),
        status: output.status,
        stdout: String::from_utf8(output.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
    }
}

fn text(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

/// A temporary working dir with a data dir path inside it (not created).
struct Fixture {
    root: tempfile::TempDir,
    data: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let root = tempfile::tempdir().expect("a temporary dir");
        let data = root.path().join("data");
        Fixture { root, data }
    }

    fn cwd(&self) -> &Path {
        self.root.path()
    }

    /// Runs a command with `--data-dir` pointing at this fixture's data dir.
    fn sb(&self, args: &[&str]) -> Output {
        self.sb_at(&self.data, args)
    }

    fn sb_at(&self, data_dir: &Path, args: &[&str]) -> Output {
        let mut full = vec!["--data-dir", text(data_dir)];
        full.extend_from_slice(args);
        run_in(self.cwd(), &full, &[])
    }

    /// Issues a key; returns its id and the key.
    fn issue(&self, name: &str, extra: &[&str]) -> (String, String) {
        let mut args = vec!["keys", "issue", "--json", "--name", name];
        args.extend_from_slice(extra);
        let issued = self.sb(&args).success().json_lines();
        assert_eq!(issued.len(), 1, "one JSON line from keys issue");
        let field = |name: &str| {
            issued[0][name]
                .as_str()
                .unwrap_or_else(|| panic!("{name} missing in {}", issued[0]))
                .to_owned()
        };
        (field("key_id"), field("key"))
    }

    fn events(&self) -> Vec<Value> {
        self.sb(&["log", "--json"]).success().json_lines()
    }

    fn head(&self) -> u64 {
        self.events()
            .last()
            .map_or(0, |e| e["seq"].as_u64().expect("seq"))
    }

    fn keys(&self) -> Vec<Value> {
        self.sb(&["keys", "list", "--json"]).success().json_lines()
    }

    fn key(&self, key_id: &str) -> Value {
        self.keys()
            .into_iter()
            .find(|k| k["key_id"] == key_id)
            .unwrap_or_else(|| panic!("{key_id} is not in keys list"))
    }
}

// ---------------------------------------------------------------------------
// Looking at the data dir from the outside
// ---------------------------------------------------------------------------

/// What a path holds, for comparing a tree before and after a command.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir,
    File { len: u64, content_hash: u64 },
    Other,
}

/// Every path under `root` (and `root` itself), with sizes and content hashes;
/// empty when `root` does not exist.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    fn walk(path: &Path, into: &mut BTreeMap<PathBuf, Node>) {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return;
        };
        let node = if meta.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .expect("read dir")
                .map(|e| e.expect("dir entry").path())
                .collect();
            entries.sort();
            for entry in entries {
                walk(&entry, into);
            }
            Node::Dir
        } else if meta.is_file() {
            let bytes = std::fs::read(path).expect("read file");
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut hasher);
            Node::File {
                len: bytes.len() as u64,
                content_hash: hasher.finish(),
            }
        } else {
            Node::Other
        };
        into.insert(path.to_owned(), node);
    }
    let mut nodes = BTreeMap::new();
    walk(root, &mut nodes);
    nodes
}

/// The differences between two snapshots, one per changed path.
fn changes(before: &BTreeMap<PathBuf, Node>, after: &BTreeMap<PathBuf, Node>) -> Vec<String> {
    let mut out = Vec::new();
    for (path, node) in before {
        match after.get(path) {
            None => out.push(format!("{} was removed", path.display())),
            Some(now) if now != node => {
                out.push(format!("{} changed: {node:?} -> {now:?}", path.display()))
            }
            Some(_) => {}
        }
    }
    for path in after.keys().filter(|p| !before.contains_key(*p)) {
        out.push(format!("{} was created", path.display()));
    }
    out
}

fn all_file_bytes(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    snapshot(root)
        .into_iter()
        .filter(|(_, node)| matches!(node, Node::File { .. }))
        .map(|(path, _)| {
            let bytes = std::fs::read(&path).expect("read file");
            (path, bytes)
        })
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn base64url_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'-' => 62,
            b'_' => 63,
            other => panic!("{:?} is not base64url", other as char),
        }
    };
    let (mut bits, mut held, mut out) = (0u32, 0u32, Vec::new());
    for c in text.bytes() {
        bits = (bits << 6) | value(c);
        held += 6;
        if held >= 8 {
            held -= 8;
            out.push((bits >> held) as u8);
            bits &= (1 << held) - 1;
        }
    }
    out
}

/// Deterministic bytes that look like nothing sled wrote.
fn garbage(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Opens the data dir's log in this process, hands it to `change`, then flushes
/// and closes it, so the next child sees exactly what `change` did.
fn with_log<T>(data: &Path, change: impl FnOnce(&EventLog) -> T) -> T {
    let log = EventLog::open(data, OpenMode::MustExist).expect("open the log in the test");
    let out = change(&log);
    log.db().flush().expect("flush sled");
    close(log);
    out
}

/// Replaces `from` with `to` (same length) inside the value stored at `key` of `tree`.
fn rewrite_value(log: &EventLog, tree: &str, key: &[u8], from: &[u8], to: &[u8]) {
    assert_eq!(
        from.len(),
        to.len(),
        "a same-length change keeps the row decodable"
    );
    let tree = log.db().open_tree(tree).expect("open tree");
    let mut value = tree
        .get(key)
        .expect("read row")
        .expect("the row exists")
        .to_vec();
    let at = value
        .windows(from.len())
        .position(|w| w == from)
        .unwrap_or_else(|| panic!("{:?} is not in the row", String::from_utf8_lossy(from)));
    value[at..at + to.len()].copy_from_slice(to);
    tree.insert(key, value).expect("write row");
}

fn record_key(seq: u64) -> Vec<u8> {
    let mut key = vec![b'r'];
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

// ---------------------------------------------------------------------------
// 1. keys issue
// ---------------------------------------------------------------------------

fn assert_key_form(key: &str) {
    let random = key
        .strip_prefix("sb-")
        .unwrap_or_else(|| panic!("{key:?} does not start with sb-"));
    assert_eq!(random.len(), 43, "{key:?}: 43 base64url characters");
    assert!(
        random
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
        "{key:?} is not base64url"
    );
    assert_eq!(base64url_decode(random).len(), 32, "256 bits");
}

#[test]
fn issue_prints_a_new_key_and_its_id() {
    let fx = Fixture::new();
    let first = fx
        .sb(&["keys", "issue", "--name", "first", "--json"])
        .success();
    let lines = first.json_lines();
    assert_eq!(lines.len(), 1, "{first:?}");
    let object = lines[0].as_object().expect("a JSON object");
    let mut fields: Vec<&str> = object.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(fields, ["key", "key_id"], "{first:?}");
    let key = object["key"].as_str().expect("key is a string");
    let key_id = object["key_id"].as_str().expect("key_id is a string");
    assert_key_form(key);
    assert!(key_id.starts_with("key_"), "{key_id}");

    let (second_id, second_key) = fx.issue("second", &[]);
    assert_key_form(&second_key);
    assert_ne!(second_key, key, "two issues give two keys");
    assert_ne!(second_id, key_id, "two issues give two ids");

    let human = fx.sb(&["keys", "issue", "--name", "third"]).success();
    let shown = human
        .stdout
        .split_whitespace()
        .find(|word| word.starts_with("sb-"))
        .unwrap_or_else(|| panic!("no key in {human:?}"));
    assert_key_form(shown);
    assert_eq!(fx.keys().len(), 3);
}

#[test]
fn issued_key_is_stored_only_as_its_hash() {
    let fx = Fixture::new();
    let (key_id, key) = fx.issue("secret-keeper", &["--owner", "alice"]);
    let (other_id, other_key) = fx.issue("other", &[]);
    // Let every projection fold and every command write what it writes.
    fx.sb(&["keys", "list"]).success();
    fx.sb(&["replay"]).success();
    fx.sb(&["verify"]).success();
    fx.sb(&["audit", "export"]).success();
    fx.sb(&["keys", "revoke", &other_id]).success();

    for secret in [&key, &other_key] {
        let encoded = &secret["sb-".len()..];
        let raw = base64url_decode(encoded);
        for (path, bytes) in all_file_bytes(&fx.data) {
            for (what, needle) in [
                ("the key", secret.as_bytes()),
                ("its base64 part", encoded.as_bytes()),
                ("its raw 32 bytes", &raw[..]),
            ] {
                assert!(!contains(&bytes, needle), "{} holds {what}", path.display());
            }
        }
    }

    let hash = to_hex(&switchboard_events::apikey::hash_key(&key).0);
    let issued: Vec<Value> = fx
        .events()
        .into_iter()
        .filter(|e| e["type"] == "key_issued" && e["data"]["key_id"] == key_id.as_str())
        .collect();
    assert_eq!(issued.len(), 1);
    assert_eq!(issued[0]["data"]["key_hash"], hash.as_str());

    for listing in [
        fx.sb(&["keys", "list", "--json"]).success(),
        fx.sb(&["keys", "list"]).success(),
    ] {
        for leak in [&key, &other_key, &hash, &"key_hash".to_owned()] {
            assert!(
                !listing.stdout.contains(leak.as_str()),
                "{leak} in {listing:?}"
            );
        }
    }
}

#[test]
fn issue_options_round_trip_into_keys_list() {
    let fx = Fixture::new();
    let (key_id, _) = fx.issue(
        "limited",
        &[
            "--owner",
            "alice",
            "--rpm",
            "60",
            "--tpm",
            "100000",
            "--max-parallel",
            "3",
            "--budget-usd",
            "1.5",
            "--budget-period",
            "day",
            "--expires-in",
            "30d",
            "--scopes",
            "chat,admin",
        ],
    );
    let (plain_id, _) = fx.issue("plain", &[]);

    let key = fx.key(&key_id);
    assert_eq!(key["name"], "limited");
    assert_eq!(key["owner"], "alice");
    assert_eq!(
        key["limits"],
        json!({ "rpm": 60, "tpm": 100000, "max_parallel": 3 })
    );
    assert_eq!(
        key["budget"],
        json!({ "micros": 1_500_000, "period": "day" })
    );
    assert_eq!(key["scopes"], json!(["chat", "admin"]));
    assert_eq!(key["revoked"], Value::Null);
    let at = |field: &str| {
        chrono::DateTime::parse_from_rfc3339(key[field].as_str().expect(field))
            .unwrap_or_else(|e| panic!("{field}: {e}"))
    };
    let lifetime = at("expires_at") - at("issued_at");
    assert!(
        (lifetime - chrono::Duration::days(30)).num_hours().abs() < 24,
        "expires 30 days after issue, got {lifetime}"
    );

    let plain = fx.key(&plain_id);
    assert_eq!(plain["owner"], Value::Null);
    assert_eq!(
        plain["limits"],
        json!({ "rpm": null, "tpm": null, "max_parallel": null })
    );
    assert_eq!(plain["budget"], Value::Null);
    assert_eq!(plain["expires_at"], Value::Null);
    assert_eq!(plain["scopes"], json!(["chat"]));

    let total = fx.issue(
        "total-budget",
        &["--budget-usd", "25", "--budget-period", "total"],
    );
    assert_eq!(
        fx.key(&total.0)["budget"],
        json!({ "micros": 25_000_000, "period": "total" })
    );
}

#[test]
fn issue_refuses_bad_values_and_appends_nothing() {
    let fx = Fixture::new();
    fx.issue("existing", &[]);
    let head = fx.head();
    let before = snapshot(&fx.data);
    let bad: &[&[&str]] = &[
        &["--name", "x", "--budget-usd", "1.1234567"],
        &["--name", "x", "--budget-usd", "-1"],
        &["--name", "x", "--budget-usd", "1e3"],
        &["--name", "x", "--expires-in", "3y"],
        &["--name", "x", "--expires-in", "0d"],
        &["--name", "x", "--scopes", "root"],
        &["--name", "x", "--scopes", "chat,root"],
        &["--name", "x", "--budget-period", "year"],
        &["--name", "x", "--rpm", "-5"],
        &["--name", ""],
        &["--name", "   "],
        &[],
    ];
    for extra in bad {
        let mut args = vec!["keys", "issue", "--json"];
        args.extend_from_slice(extra);
        let refused = fx.sb(&args);
        assert!(!refused.status.success(), "expected a refusal: {refused:?}");
        assert!(refused.stdout.is_empty(), "no key printed: {refused:?}");
        assert!(!refused.stderr.is_empty(), "says why: {refused:?}");
        assert_eq!(changes(&before, &snapshot(&fx.data)), Vec::<String>::new());
    }
    assert_eq!(fx.head(), head, "nothing appended");
    assert_eq!(fx.keys().len(), 1);
}

#[test]
fn issue_creates_a_missing_data_dir() {
    let fx = Fixture::new();
    let nested = fx.cwd().join("a").join("b").join("data");
    let issued = fx
        .sb_at(&nested, &["keys", "issue", "--name", "n", "--json"])
        .success();
    assert_eq!(issued.json_lines().len(), 1);
    assert!(
        nested.join("db").is_dir(),
        "{} was created",
        nested.display()
    );
    let listed = fx.sb_at(&nested, &["keys", "list", "--json"]).success();
    assert_eq!(listed.json_lines().len(), 1);
}

#[test]
fn update_changes_limits_and_budget() {
    let fx = Fixture::new();
    let (key_id, _) = fx.issue("k", &["--rpm", "10", "--tpm", "500"]);
    let updated = fx
        .sb(&[
            "keys",
            "update",
            &key_id,
            "--rpm",
            "20",
            "--budget-usd",
            "0.25",
            "--budget-period",
            "day",
            "--json",
        ])
        .success();
    let shown = &updated.json_lines()[0];
    assert!(shown.get("key_hash").is_none(), "{updated:?}");
    let key = fx.key(&key_id);
    assert_eq!(key, *shown, "update prints the key as listed");
    assert_eq!(
        key["limits"],
        json!({ "rpm": 20, "tpm": 500, "max_parallel": null })
    );
    assert_eq!(key["budget"], json!({ "micros": 250_000, "period": "day" }));

    // Each half of the budget can change alone; the other half is kept.
    fx.sb(&["keys", "update", &key_id, "--budget-usd", "3"])
        .success();
    assert_eq!(
        fx.key(&key_id)["budget"],
        json!({ "micros": 3_000_000, "period": "day" })
    );
    fx.sb(&["keys", "update", &key_id, "--budget-period", "total"])
        .success();
    assert_eq!(
        fx.key(&key_id)["budget"],
        json!({ "micros": 3_000_000, "period": "total" })
    );
    assert_eq!(fx.key(&key_id)["limits"]["rpm"], 20, "limits untouched");

    let head = fx.head();
    let (no_budget, _) = fx.issue("no-budget", &[]);
    let head_after_issue = fx.head();
    assert_eq!(head_after_issue, head + 1);
    let head = head_after_issue;
    fx.sb(&["keys", "update", &no_budget, "--budget-period", "day"])
        .refusal();
    fx.sb(&["keys", "update", &key_id]).refusal();
    fx.sb(&["keys", "update", "key_ffffffffffffffff", "--rpm", "1"])
        .refusal();
    assert_eq!(fx.head(), head, "refused updates append nothing");

    // A revoked key cannot be changed, as over the admin API.
    fx.sb(&["keys", "revoke", &no_budget]).success();
    let head = fx.head();
    let refused = fx.sb(&["keys", "update", &no_budget, "--rpm", "1"]);
    refused.refusal();
    assert!(refused.stderr.contains("revoked"), "{refused:?}");
    assert_eq!(fx.head(), head);
}

// ---------------------------------------------------------------------------
// 2. keys revoke
// ---------------------------------------------------------------------------

#[test]
fn revoke_marks_the_key_revoked_exactly_once() {
    let fx = Fixture::new();
    let (key_id, _) = fx.issue("doomed", &[]);
    let (kept_id, _) = fx.issue("kept", &[]);
    let revoked = fx
        .sb(&["keys", "revoke", &key_id, "--reason", "leaked", "--json"])
        .success();
    let answer = &revoked.json_lines()[0];
    assert_eq!(answer["key_id"], key_id.as_str());
    assert_eq!(answer["revoked"], true);
    assert_eq!(answer["seq"], 3);

    let key = fx.key(&key_id);
    assert_eq!(key["revoked"]["by"], "cli");
    assert_eq!(key["revoked"]["reason"], "leaked");
    assert!(key["revoked"]["at"].is_string(), "{key}");
    assert_eq!(fx.key(&kept_id)["revoked"], Value::Null);
    let human = fx.sb(&["keys", "list"]).success();
    let line = human
        .stdout
        .lines()
        .find(|l| l.contains(&key_id))
        .unwrap_or_else(|| panic!("{key_id} not listed: {human:?}"));
    assert!(line.contains("revoked"), "{line}");

    let head = fx.head();
    let again = fx
        .sb(&["keys", "revoke", &key_id, "--json"])
        .success()
        .json_lines();
    assert_eq!(again[0]["already"], true, "{:?}", again);
    assert_eq!(again[0]["at"], key["revoked"]["at"]);
    fx.sb(&["keys", "revoke", &key_id]).success();
    assert_eq!(fx.head(), head, "a second revoke appends nothing");
    assert_eq!(fx.key(&key_id)["revoked"], key["revoked"]);
}

#[test]
fn revoke_of_an_unknown_key_is_a_one_line_error() {
    let fx = Fixture::new();
    fx.issue("someone", &[]);
    let head = fx.head();
    for args in [
        &["keys", "revoke", "key_ffffffffffffffff"][..],
        &["keys", "revoke", "key_ffffffffffffffff", "--json"],
    ] {
        let refused = fx.sb(args);
        let line = refused.refusal();
        assert!(line.contains("key_ffffffffffffffff"), "{refused:?}");
    }
    assert_eq!(fx.head(), head);
}

// ---------------------------------------------------------------------------
// 3. log
// ---------------------------------------------------------------------------

#[test]
fn log_json_lines_are_envelopes() {
    let fx = Fixture::new();
    let (a, _) = fx.issue("a", &[]);
    fx.issue("b", &[]);
    fx.sb(&["keys", "revoke", &a]).success();
    let events = fx.events();
    assert_eq!(events.len(), 3);
    for (i, event) in events.iter().enumerate() {
        for field in ["seq", "id", "stream", "version", "at", "type", "data"] {
            assert!(event.get(field).is_some(), "{field} missing in {event}");
        }
        assert_eq!(event["seq"], i as u64 + 1, "seqs are gapless from 1");
        assert!(
            chrono::DateTime::parse_from_rfc3339(event["at"].as_str().expect("at")).is_ok(),
            "{event}"
        );
        let envelope: switchboard_events::Envelope =
            serde_json::from_value(event.clone()).expect("an envelope");
        assert_eq!(envelope.seq, i as u64 + 1);
    }
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["key_issued", "key_issued", "key_revoked"]);
    assert_eq!(events[2]["stream"], format!("key/{a}"));
    assert_eq!(events[2]["version"], 2);

    let human = fx.sb(&["log"]).success();
    assert_eq!(human.stdout.lines().count(), 3, "{human:?}");
    assert!(human.stdout.contains("key_revoked"), "{human:?}");
}

#[test]
fn log_from_and_stream_select_events() {
    let fx = Fixture::new();
    let (a, _) = fx.issue("a", &[]);
    let (b, _) = fx.issue("b", &[]);
    fx.sb(&["keys", "revoke", &a]).success();
    fx.sb(&["keys", "update", &b, "--rpm", "5"]).success();

    let seqs = |args: &[&str]| -> Vec<u64> {
        let mut full = vec!["log", "--json"];
        full.extend_from_slice(args);
        fx.sb(&full)
            .success()
            .json_lines()
            .iter()
            .map(|e| e["seq"].as_u64().expect("seq"))
            .collect()
    };
    assert_eq!(seqs(&[]), [1, 2, 3, 4]);
    assert_eq!(seqs(&["--from", "3"]), [3, 4]);
    assert_eq!(seqs(&["--from", "4"]), [4]);
    assert_eq!(seqs(&["--from", "5"]), Vec::<u64>::new());
    let stream_a = format!("key/{a}");
    let stream_b = format!("key/{b}");
    assert_eq!(seqs(&["--stream", &stream_a]), [1, 3]);
    assert_eq!(seqs(&["--stream", &stream_b]), [2, 4]);
    assert_eq!(seqs(&["--stream", &stream_b, "--from", "3"]), [4]);
    assert_eq!(
        seqs(&["--stream", "key/key_ffffffffffffffff"]),
        Vec::<u64>::new()
    );
    for event in fx
        .sb(&["log", "--json", "--stream", &stream_a])
        .success()
        .json_lines()
    {
        assert_eq!(event["stream"], stream_a.as_str());
    }
}

#[test]
fn log_refuses_a_malformed_stream() {
    let fx = Fixture::new();
    fx.issue("a", &[]);
    for stream in ["bogus", "key/", "conv/has space", "nope/x"] {
        let refused = fx.sb(&["log", "--stream", stream]);
        let line = refused.refusal();
        assert!(line.contains("stream"), "{refused:?}");
    }
}

// ---------------------------------------------------------------------------
// 4. verify
// ---------------------------------------------------------------------------

/// Three keys (seq 1-3) and caught-up projections.
fn three_keys() -> (Fixture, Vec<String>) {
    let fx = Fixture::new();
    let ids = ["first-key", "second-key", "third-key"]
        .iter()
        .map(|name| fx.issue(name, &["--owner", "owner-x"]).0)
        .collect();
    fx.sb(&["keys", "list"]).success();
    (fx, ids)
}

fn assert_verify_fails_naming(fx: &Fixture, what: &str) {
    let failed = fx.sb(&["verify"]);
    assert!(!failed.status.success(), "verify should fail: {failed:?}");
    assert!(
        failed.stdout.contains(what),
        "should name {what}: {failed:?}"
    );
    let failed = fx.sb(&["verify", "--json"]);
    assert!(
        !failed.status.success(),
        "verify --json should fail: {failed:?}"
    );
    let report = &failed.json_lines()[0];
    assert_eq!(report["ok"], false, "{failed:?}");
    let problems = report["problems"].as_array().expect("problems");
    assert!(
        problems
            .iter()
            .any(|p| p.as_str().is_some_and(|p| p.contains(what))),
        "should name {what}: {failed:?}"
    );
}

#[test]
fn verify_passes_on_a_healthy_dir() {
    let (fx, ids) = three_keys();
    fx.sb(&["keys", "revoke", &ids[0]]).success();
    let ok = fx.sb(&["verify"]).success();
    assert!(ok.stdout.starts_with("ok"), "{ok:?}");
    let report = &fx.sb(&["verify", "--json"]).success().json_lines()[0];
    assert_eq!(report["ok"], true);
    assert_eq!(report["events"], 4);
    assert_eq!(report["problems"], json!([]));
    assert_eq!(report["head_hash"].as_str().map(str::len), Some(64));
}

#[test]
fn verify_names_a_tampered_record() {
    let (fx, _) = three_keys();
    with_log(&fx.data, |log| {
        rewrite_value(log, "log", &record_key(2), b"second-key", b"SECOND-KEY");
    });
    assert_verify_fails_naming(&fx, "record 2");
}

#[test]
fn verify_names_a_missing_record() {
    let (fx, _) = three_keys();
    with_log(&fx.data, |log| {
        let tree = log.db().open_tree("log").expect("log tree");
        tree.remove(record_key(2))
            .expect("remove")
            .expect("record 2 existed");
    });
    assert_verify_fails_naming(&fx, "record 2");
    // Nothing reads past the hole as if it were not there.
    let log = fx.sb(&["log"]);
    assert!(!log.status.success(), "log should fail: {log:?}");
    assert!(log.stderr.contains("record 2"), "{log:?}");
    let replay = fx.sb(&["replay"]);
    assert!(!replay.status.success(), "replay should fail: {replay:?}");
    assert!(replay.stderr.contains("record 2"), "{replay:?}");
}

#[test]
fn verify_names_a_tampered_projection_and_replay_repairs_it() {
    let (fx, ids) = three_keys();
    with_log(&fx.data, |log| {
        let mut key = vec![b'k'];
        key.extend_from_slice(ids[1].as_bytes());
        rewrite_value(log, "proj.keys", &key, b"second-key", b"SECOND-KEY");
    });
    assert_eq!(fx.key(&ids[1])["name"], "SECOND-KEY", "the tamper took");
    assert_verify_fails_naming(&fx, "keys");

    fx.sb(&["replay", "--projection", "keys"]).success();
    fx.sb(&["verify"]).success();
    assert_eq!(fx.key(&ids[1])["name"], "second-key");
}

// ---------------------------------------------------------------------------
// 5. replay
// ---------------------------------------------------------------------------

#[test]
fn replay_rebuilds_and_verify_still_passes() {
    let (fx, ids) = three_keys();
    fx.sb(&["keys", "revoke", &ids[2]]).success();
    let keys_before = fx.keys();
    let audit_before = fx.sb(&["audit", "export"]).success().stdout;

    let all = fx.sb(&["replay", "--json"]).success();
    assert_eq!(all.json_lines()[0]["events"], 4, "{all:?}");
    fx.sb(&["verify"]).success();
    for name in ["keys", "audit", "costs", "history"] {
        fx.sb(&["replay", "--projection", name]).success();
        fx.sb(&["verify"]).success();
    }
    fx.sb(&["replay"]).success();
    assert_eq!(fx.keys(), keys_before);
    assert_eq!(fx.sb(&["audit", "export"]).success().stdout, audit_before);
}

#[test]
fn replay_refuses_an_unknown_projection() {
    let fx = Fixture::new();
    fx.issue("a", &[]);
    let refused = fx.sb(&["replay", "--projection", "nope"]);
    let line = refused.refusal();
    for name in ["nope", "history", "audit", "costs", "keys"] {
        assert!(line.contains(name), "should name {name}: {refused:?}");
    }
    fx.sb(&["verify"]).success();
}

// ---------------------------------------------------------------------------
// 6. audit export
// ---------------------------------------------------------------------------

#[test]
fn audit_export_writes_the_audit_trail_with_filters() {
    let fx = Fixture::new();
    let (a, _) = fx.issue("a", &[]);
    let (b, _) = fx.issue("b", &[]);
    append_usage(&fx.data, &[usage("c1", &a, None, "m", 1, 2, 3)]);
    fx.sb(&["keys", "revoke", &a]).success();

    let export = |args: &[&str]| -> Vec<Value> {
        let mut full = vec!["audit", "export"];
        full.extend_from_slice(args);
        fx.sb(&full).success().json_lines()
    };
    let types = |events: &[Value]| -> Vec<String> {
        events
            .iter()
            .map(|e| e["type"].as_str().expect("type").to_owned())
            .collect()
    };
    let all = export(&[]);
    assert_eq!(types(&all), ["key_issued", "key_issued", "key_revoked"]);
    // The audit trail is the log's audit events, byte for byte in JSON.
    let log: Vec<Value> = fx
        .events()
        .into_iter()
        .filter(|e| e["type"] != "usage_recorded")
        .collect();
    assert_eq!(all, log);
    assert_eq!(export(&["--json"]), all, "--json changes nothing");

    let revoked = export(&["--type", "key_revoked"]);
    assert_eq!(types(&revoked), ["key_revoked"]);
    assert_eq!(revoked[0]["data"]["key_id"], a.as_str());
    assert_eq!(
        types(&export(&["--type", "key_updated"])),
        Vec::<String>::new()
    );

    let about_a = export(&["--key", &a]);
    assert_eq!(types(&about_a), ["key_issued", "key_revoked"]);
    assert!(about_a.iter().all(|e| e["data"]["key_id"] == a.as_str()));
    let about_b = export(&["--key", &b]);
    assert_eq!(types(&about_b), ["key_issued"]);
    assert_eq!(
        types(&export(&["--key", &a, "--type", "key_issued"])),
        ["key_issued"]
    );
    assert_eq!(
        export(&["--key", "key_ffffffffffffffff"]),
        Vec::<Value>::new()
    );

    assert_eq!(export(&["--since", "2999-01-01"]), Vec::<Value>::new());
    assert_eq!(export(&["--until", "2000-01-01"]), Vec::<Value>::new());
    assert_eq!(
        export(&["--since", "2000-01-01", "--until", "2999-01-01"]),
        all
    );
    // since is inclusive, until exclusive, at the events' own times.
    let revoked_at = revoked[0]["at"].as_str().expect("at");
    assert_eq!(export(&["--since", revoked_at]), revoked);
    assert_eq!(
        types(&export(&["--until", revoked_at])),
        ["key_issued", "key_issued"]
    );
}

#[test]
fn audit_export_refuses_bad_filters() {
    let fx = Fixture::new();
    fx.issue("a", &[]);
    let refused = fx.sb(&["audit", "export", "--type", "bogus"]);
    assert!(refused.refusal().contains("bogus"), "{refused:?}");
    for bad in [["--since", "yesterday"], ["--until", "2026-13-01"]] {
        let refused = fx.sb(&["audit", "export", bad[0], bad[1]]);
        assert!(!refused.status.success(), "{refused:?}");
        assert!(refused.stdout.is_empty(), "{refused:?}");
    }
}

// ---------------------------------------------------------------------------
// 7. costs
// ---------------------------------------------------------------------------

fn usage(
    conversation: &str,
    key_id: &str,
    user: Option<&str>,
    model: &str,
    tokens_in: u64,
    tokens_out: u64,
    cost_micros: u64,
) -> UsageRecorded {
    UsageRecorded {
        conversation_id: conversation.to_owned(),
        message_id: format!("m-{conversation}-{tokens_in}"),
        key_id: key_id.to_owned(),
        user: user.map(str::to_owned),
        agent: "echo".to_owned(),
        model: model.to_owned(),
        prompt_tokens: tokens_in,
        completion_tokens: tokens_out,
        estimated: tokens_in % 2 == 1,
        input_price: 0,
        output_price: 0,
        cost_micros,
    }
}

/// Appends each usage to its conversation's stream; returns their seqs.
fn append_usage(data: &Path, usages: &[UsageRecorded]) -> Vec<u64> {
    with_log(data, |log| {
        usages
            .iter()
            .map(|u| {
                log.append_blocking(
                    StreamId::conversation(&u.conversation_id).expect("stream"),
                    ExpectedVersion::Any,
                    vec![NewEvent::new(Event::UsageRecorded(u.clone()))],
                )
                .expect("append usage")
                .first()
                .seq
            })
            .collect()
    })
}

#[test]
fn costs_without_usage_prints_only_a_header() {
    let fx = Fixture::new();
    fx.issue("a", &[]);
    for by in ["key", "user", "model", "day"] {
        let human = fx.sb(&["costs", "--by", by]).success();
        assert_eq!(human.stdout.lines().count(), 1, "{human:?}");
        for column in [by, "tokens_in", "tokens_out"] {
            assert!(human.stdout.contains(column), "{human:?}");
        }
        let json = fx.sb(&["costs", "--by", by, "--json"]).success();
        assert_eq!(json.stdout, "", "no rows: {json:?}");
    }
}

#[test]
fn costs_sum_usage_exactly_by_every_grouping() {
    let fx = Fixture::new();
    let (a, _) = fx.issue("a", &[]);
    let (b, _) = fx.issue("b", &[]);
    // Above 2^53, so a float anywhere on the way would lose the last micro.
    let big = (1u64 << 53) + 1;
    let usages = vec![
        usage("c1", &a, Some("alice"), "m1", 10, 20, 300),
        usage("c1", &a, Some("alice"), "m2", 5, 7, 11),
        usage("c2", &b, None, "m1", 1000, 2000, big),
        usage("c3", &b, Some("bob"), "m2", 3, 4, 5),
        usage("c3", &a, Some("bob"), "m1", 1, 1, 1),
    ];
    let seqs = append_usage(&fx.data, &usages);
    let log = fx.events();
    let day_of = |seq: u64| -> String {
        let event = &log[(seq - 1) as usize];
        assert_eq!(event["type"], "usage_recorded");
        event["at"].as_str().expect("at")[..10].to_owned()
    };
    let days: Vec<String> = seqs.iter().map(|&s| day_of(s)).collect();

    let expected = |by: &str, keep: &dyn Fn(&str) -> bool| -> Vec<Value> {
        let mut groups: BTreeMap<String, [u64; 5]> = BTreeMap::new();
        for (u, day) in usages.iter().zip(&days) {
            if !keep(day) {
                continue;
            }
            let group = match by {
                "key" => u.key_id.clone(),
                "user" => u.user.clone().unwrap_or_default(),
                "model" => u.model.clone(),
                _ => day.clone(),
            };
            let totals = groups.entry(group).or_default();
            totals[0] += 1;
            totals[1] += u.prompt_tokens;
            totals[2] += u.completion_tokens;
            totals[3] += u.cost_micros;
            totals[4] += u64::from(u.estimated);
        }
        groups
            .into_iter()
            .map(|(group, t)| {
                json!({
                    by: group,
                    "requests": t[0],
                    "tokens_in": t[1],
                    "tokens_out": t[2],
                    "cost_micros": t[3],
                    "estimated_requests": t[4],
                })
            })
            .collect()
    };
    let costs = |args: &[&str]| -> Vec<Value> {
        let mut full = vec!["costs", "--json"];
        full.extend_from_slice(args);
        fx.sb(&full).success().json_lines()
    };

    for by in ["key", "user", "model", "day"] {
        assert_eq!(costs(&["--by", by]), expected(by, &|_| true), "--by {by}");
    }
    assert_eq!(costs(&[]), expected("key", &|_| true), "key is the default");
    let models = costs(&["--by", "model"]);
    assert_eq!(models[0]["model"], "m1");
    assert_eq!(models[0]["cost_micros"].as_u64(), Some(300 + big + 1));

    let first = NaiveDate::parse_from_str(days.iter().min().unwrap(), "%Y-%m-%d").unwrap();
    let last = NaiveDate::parse_from_str(days.iter().max().unwrap(), "%Y-%m-%d").unwrap();
    let day = |d: NaiveDate| d.format("%Y-%m-%d").to_string();
    let (first_s, last_s) = (day(first), day(last));
    let after = day(last.succ_opt().unwrap());
    let before = day(first.pred_opt().unwrap());
    for by in ["key", "day"] {
        assert_eq!(costs(&["--by", by, "--since", &after]), Vec::<Value>::new());
        assert_eq!(
            costs(&["--by", by, "--until", &before]),
            Vec::<Value>::new()
        );
        assert_eq!(
            costs(&["--by", by, "--since", &first_s, "--until", &last_s]),
            expected(by, &|_| true)
        );
        assert_eq!(
            costs(&["--by", by, "--since", &first_s, "--until", &first_s]),
            expected(by, &|d| d == first_s)
        );
        assert_eq!(
            costs(&["--by", by, "--since", &last_s]),
            expected(by, &|d| d == last_s)
        );
    }

    let human = fx.sb(&["costs", "--by", "model"]).success();
    let m2 = human
        .stdout
        .lines()
        .find(|l| l.starts_with("m2"))
        .unwrap_or_else(|| panic!("no m2 row: {human:?}"));
    assert!(m2.trim_end().ends_with("0.000016"), "{m2}");
    fx.sb(&["verify"]).success();
}

#[test]
fn costs_refuses_bad_arguments() {
    let fx = Fixture::new();
    fx.issue("a", &[]);
    for bad in [
        &["--by", "month"][..],
        &["--since", "2026-02-30"],
        &["--until", "tomorrow"],
    ] {
        let mut args = vec!["costs", "--json"];
        args.extend_from_slice(bad);
        let refused = fx.sb(&args);
        assert!(!refused.status.success(), "{refused:?}");
        assert!(refused.stdout.is_empty(), "{refused:?}");
    }
}

// ---------------------------------------------------------------------------
// 8. Data dirs that cannot be used
// ---------------------------------------------------------------------------

/// Runs each command (plain and `--json`) on `data_dir` and checks that it is
/// refused in one line containing `expected`; returns what each changed under
/// `watched`, so a test can report every offender at once.
fn refuse_all(
    fx: &Fixture,
    data_dir: &Path,
    commands: &[&[&str]],
    expected: &[&str],
    watched: &Path,
) -> Vec<String> {
    let mut changed = Vec::new();
    for command in commands {
        for json in [false, true] {
            let mut args = command.to_vec();
            if json {
                args.push("--json");
            }
            let before = snapshot(watched);
            let refused = fx.sb_at(data_dir, &args);
            let line = refused.refusal();
            for part in expected {
                assert!(line.contains(part), "should say {part:?}: {refused:?}");
            }
            for change in changes(&before, &snapshot(watched)) {
                changed.push(format!("`{}`: {change}", refused.what));
            }
        }
    }
    changed
}

#[test]
fn a_missing_data_dir_is_refused_and_not_created() {
    let fx = Fixture::new();
    let missing = fx.cwd().join("missing");
    let deep = fx.cwd().join("absent").join("deeper");
    for dir in [&missing, &deep] {
        let changed = refuse_all(&fx, dir, MUST_EXIST, &["does not exist"], fx.cwd());
        assert_eq!(changed, Vec::<String>::new());
    }
    assert!(!missing.exists() && !deep.exists() && !deep.parent().unwrap().exists());
}

#[test]
fn a_file_as_data_dir_is_refused_by_every_command() {
    let fx = Fixture::new();
    let file = fx.cwd().join("plain-file");
    std::fs::write(&file, "not a data dir\n").expect("write");
    let mut every: Vec<&[&str]> = MUST_EXIST.to_vec();
    every.push(ISSUE);
    let changed = refuse_all(&fx, &file, &every, &["not a directory"], fx.cwd());
    assert_eq!(changed, Vec::<String>::new());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a data dir\n");
}

#[test]
fn a_path_under_a_file_is_refused_by_every_command() {
    let fx = Fixture::new();
    let file = fx.cwd().join("plain-file");
    std::fs::write(&file, "x").expect("write");
    let under = file.join("data");
    let mut every: Vec<&[&str]> = MUST_EXIST.to_vec();
    every.push(ISSUE);
    for command in &every {
        let before = snapshot(fx.cwd());
        let refused = fx.sb_at(&under, command);
        let line = refused.refusal().to_lowercase();
        assert!(line.contains("not a directory"), "{refused:?}");
        assert_eq!(changes(&before, &snapshot(fx.cwd())), Vec::<String>::new());
    }
}

/// The cause of an I/O error is worth saying once; anyhow's `{:#}` already
/// prints the source chain, so an error that also formats its source into its
/// own message says it twice.
#[test]
fn an_io_error_names_its_cause_once() {
    let fx = Fixture::new();
    let file = fx.cwd().join("plain-file");
    std::fs::write(&file, "x").expect("write");
    let refused = fx.sb_at(&file.join("data"), ISSUE);
    let line = refused.refusal();
    assert_eq!(
        line.matches("(os error").count(),
        1,
        "the OS error is repeated: {refused:?}"
    );
}

#[test]
fn an_empty_dir_is_not_a_data_dir_for_read_only_commands() {
    let fx = Fixture::new();
    let empty = fx.cwd().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let changed = refuse_all(
        &fx,
        &empty,
        MUST_EXIST,
        &["no switchboard event log"],
        fx.cwd(),
    );
    assert_eq!(changed, Vec::<String>::new());
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0, "still empty");
}

#[test]
fn a_locked_data_dir_is_refused_by_every_command() {
    let fx = Fixture::new();
    let (key_id, _) = fx.issue("a", &[]);
    fx.sb(&["keys", "list"]).success();

    // flock locks belong to an open file description, so this process holding
    // the log locks out every child.
    let held = EventLog::open(&fx.data, OpenMode::MustExist).expect("hold the data dir");
    held.db().flush().expect("flush");
    let holder = format!("pid {} (", std::process::id());
    let mut every: Vec<&[&str]> = MUST_EXIST.to_vec();
    every.push(ISSUE);
    let changed = refuse_all(&fx, &fx.data, &every, &["in use", &holder], fx.cwd());
    close(held);
    assert_eq!(changed, Vec::<String>::new());

    // Released, the dir works again and lost nothing.
    assert_eq!(fx.keys().len(), 1);
    assert_eq!(fx.head(), 1);
    fx.sb(&["keys", "revoke", &key_id]).success();
    fx.sb(&["verify"]).success();
}

/// A data dir with `keys` keys and caught-up projections, then `corrupt`
/// applied to its `db` dir.
fn corrupted(keys: usize, corrupt: impl FnOnce(&Path)) -> Fixture {
    let fx = Fixture::new();
    for i in 0..keys {
        fx.issue(&format!("key-{i}"), &[]);
    }
    if keys > 1 {
        fx.sb(&["keys", "list"]).success();
    }
    corrupt(&fx.data.join("db"));
    fx
}

fn overwrite_with_garbage(path: &Path, seed: u64) {
    let len = std::fs::metadata(path).expect("stat").len() as usize;
    std::fs::write(path, garbage(len.max(64), seed)).expect("overwrite");
}

/// Which changes to a refused corrupt dir are acceptable.
#[derive(Clone, Copy)]
enum SledFiles {
    /// Nothing at all may change.
    Untouched,
    /// sled 0.34 has no read-only open: recovering a damaged `db` file, it
    /// rewrites its own files under `db/` before it can tell us the database is
    /// unreadable. Everything else — the lock file, the rest of the dir — must
    /// stay as it was, and the command must still refuse.
    MayBeRewrittenBySled,
}

fn refuse_corrupt(sled_files: SledFiles, make: impl Fn() -> Fixture) {
    let mut every: Vec<&[&str]> = MUST_EXIST.to_vec();
    every.push(ISSUE);
    let mut changed = Vec::new();
    for command in every {
        // A fresh copy each time: an accepted command could "repair" the dir.
        let fx = make();
        let db_dir = fx.data.join("db").display().to_string();
        changed.extend(
            refuse_all(&fx, &fx.data, &[command], &["corrupt"], fx.cwd())
                .into_iter()
                .filter(|change| match sled_files {
                    SledFiles::Untouched => true,
                    SledFiles::MayBeRewrittenBySled => !change.contains(&format!("{db_dir}/")),
                }),
        );
    }
    assert_eq!(
        changed,
        Vec::<String>::new(),
        "a refused dir must not change"
    );
}

#[test]
fn a_data_dir_with_garbage_conf_and_db_is_refused() {
    refuse_corrupt(SledFiles::Untouched, || {
        corrupted(2, |db| {
            overwrite_with_garbage(&db.join("conf"), 1);
            overwrite_with_garbage(&db.join("db"), 2);
        })
    });
}

/// Everything under `db` but `conf` overwritten: on a dir only one process
/// has opened yet, sled has written no snapshot, so the garbage is all there is.
#[test]
fn a_new_data_dir_with_a_garbage_db_file_is_refused() {
    refuse_corrupt(SledFiles::MayBeRewrittenBySled, || {
        corrupted(1, |db| {
            for (seed, entry) in std::fs::read_dir(db).expect("read db dir").enumerate() {
                let path = entry.expect("entry").path();
                if path.is_file() && path.file_name().is_some_and(|n| n != "conf") {
                    overwrite_with_garbage(&path, 10 + seed as u64);
                }
            }
        })
    });
}

// ---------------------------------------------------------------------------
// 9. Where the data dir comes from
// ---------------------------------------------------------------------------

fn is_data_dir(path: &Path) -> bool {
    path.join("db").join("conf").is_file()
}

#[test]
fn data_dir_defaults_to_data_in_the_working_dir() {
    let fx = Fixture::new();
    run_in(fx.cwd(), ISSUE, &[]).success();
    assert!(is_data_dir(&fx.cwd().join("data")));
    assert_eq!(
        run_in(fx.cwd(), &["keys", "list", "--json"], &[])
            .success()
            .json_lines()
            .len(),
        1
    );
}

#[test]
fn data_dir_comes_from_the_environment_and_the_flag_beats_it() {
    let fx = Fixture::new();
    let from_env = fx.cwd().join("from-env");
    let from_flag = fx.cwd().join("from-flag");
    let env = [("SWITCHBOARD_DATA_DIR", text(&from_env))];
    run_in(fx.cwd(), ISSUE, &env).success();
    assert!(is_data_dir(&from_env));
    assert!(!fx.cwd().join("data").exists(), "the default was not used");

    let mut args = vec!["--data-dir", text(&from_flag)];
    args.extend_from_slice(ISSUE);
    run_in(fx.cwd(), &args, &env).success();
    assert!(is_data_dir(&from_flag));
    let listed = |args: &[&str]| run_in(fx.cwd(), args, &env).success().json_lines().len();
    assert_eq!(
        listed(&["keys", "list", "--json"]),
        1,
        "env dir has one key"
    );
    assert_eq!(
        listed(&["keys", "list", "--json", "--data-dir", text(&from_flag)]),
        1
    );
    // A read-only command on a missing env dir is refused like a flag's.
    let missing = fx.cwd().join("missing");
    let refused = run_in(
        fx.cwd(),
        &["log"],
        &[("SWITCHBOARD_DATA_DIR", text(&missing))],
    );
    assert!(refused.refusal().contains("does not exist"), "{refused:?}");
    assert!(!missing.exists());
}

#[test]
fn config_file_in_the_working_dir_is_used_below_env_and_flag() {
    let fx = Fixture::new();
    let from_file = fx.cwd().join("from-file");
    std::fs::write(
        fx.cwd().join("switchboard.toml"),
        format!("data_dir = {:?}\n", text(&from_file)),
    )
    .expect("write config");
    run_in(fx.cwd(), ISSUE, &[]).success();
    assert!(is_data_dir(&from_file));
    assert!(!fx.cwd().join("data").exists());

    let from_env = fx.cwd().join("from-env");
    run_in(
        fx.cwd(),
        ISSUE,
        &[("SWITCHBOARD_DATA_DIR", text(&from_env))],
    )
    .success();
    assert!(is_data_dir(&from_env), "env beats the config file");

    let from_flag = fx.cwd().join("from-flag");
    let mut args = vec!["--data-dir", text(&from_flag)];
    args.extend_from_slice(ISSUE);
    run_in(fx.cwd(), &args, &[]).success();
    assert!(is_data_dir(&from_flag), "the flag beats the config file");

    let keys = |dir: &Path| {
        run_in(
            fx.cwd(),
            &["keys", "list", "--json", "--data-dir", text(dir)],
            &[],
        )
        .success()
        .json_lines()
        .len()
    };
    assert_eq!(
        (keys(&from_file), keys(&from_env), keys(&from_flag)),
        (1, 1, 1)
    );
}

#[test]
fn explicit_config_beats_the_default_file() {
    let fx = Fixture::new();
    let default_dir = fx.cwd().join("default-dir");
    let other_dir = fx.cwd().join("other-dir");
    let env_dir = fx.cwd().join("env-config-dir");
    std::fs::write(
        fx.cwd().join("switchboard.toml"),
        format!("data_dir = {:?}\n", text(&default_dir)),
    )
    .expect("write");
    let configs = fx.cwd().join("configs");
    std::fs::create_dir(&configs).expect("mkdir");
    let other = configs.join("other.toml");
    std::fs::write(&other, format!("data_dir = {:?}\n", text(&other_dir))).expect("write");
    let from_env = configs.join("env.toml");
    std::fs::write(&from_env, format!("data_dir = {:?}\n", text(&env_dir))).expect("write");

    let mut args = vec!["--config", text(&other)];
    args.extend_from_slice(ISSUE);
    run_in(fx.cwd(), &args, &[]).success();
    assert!(is_data_dir(&other_dir));
    assert!(!default_dir.exists(), "the default file was not read");

    run_in(fx.cwd(), ISSUE, &[("SWITCHBOARD_CONFIG", text(&from_env))]).success();
    assert!(is_data_dir(&env_dir));
    assert!(!default_dir.exists());
}

#[test]
fn the_design_example_config_is_accepted() {
    let fx = Fixture::new();
    std::fs::write(
        fx.cwd().join("switchboard.toml"),
        r#"data_dir = "./sb-data"
[http]
addr = "127.0.0.1:8080"
[nats]
url = "nats://127.0.0.1:4222"
prefix = "sb"
[router]
default_agent = "echo"
[[agents]]
name = "echo"
provider = "echo"
[[agents]]
name = "assistant"
provider = "openai"
base_url = "http://127.0.0.1:11434/v1"
model = "llama3.2"
api_key_env = "OPENAI_API_KEY"
[[routes]]
pattern = "(?i)\\b(contract|lawsuit)\\b"
agent = "assistant"
[prices.echo]
input = 0.0
output = 0.0
"#,
    )
    .expect("write");
    run_in(fx.cwd(), ISSUE, &[]).success();
    assert!(is_data_dir(&fx.cwd().join("sb-data")));
}

#[test]
fn a_bad_config_is_a_one_line_error() {
    let fx = Fixture::new();
    let cases = [
        ("unclosed.toml", "data_dir = [\n"),
        ("wrong-type.toml", "data_dir = 5\n"),
        ("garbage.toml", "\u{0}\u{1}not toml at all = = =\n[[\n"),
    ];
    for (name, content) in cases {
        let path = fx.cwd().join(name);
        std::fs::write(&path, content).expect("write");
        for command in [ISSUE, &["log"][..]] {
            let mut args = vec!["--config", text(&path)];
            args.extend_from_slice(command);
            let refused = run_in(fx.cwd(), &args, &[]);
            assert!(
                refused.refusal().contains(name),
                "names the file: {refused:?}"
            );
        }
    }
    // The default file is read the same way.
    std::fs::write(fx.cwd().join("switchboard.toml"), "data_dir = [\n").expect("write");
    let refused = run_in(fx.cwd(), ISSUE, &[]);
    assert!(
        refused.refusal().contains("switchboard.toml"),
        "{refused:?}"
    );
    let missing = run_in(fx.cwd(), &["--config", "nowhere.toml", "log"], &[]);
    assert!(missing.refusal().contains("nowhere.toml"), "{missing:?}");
    assert!(!fx.cwd().join("data").exists(), "nothing created");
}
