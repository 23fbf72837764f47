//! The `bench` commands, run as child processes for a fraction of a second
//! each: they finish, measure every side they report (nothing failed, every
//! rate and latency a real figure) and print the JSON the issue notes quote.
//! Nothing here judges speed: these runs are far too short, and speed is
//! measured only by the benches themselves (README, Benchmarks).

mod support;

use std::process::Command;

use serde_json::Value;
use support::nats::nats_server_bin;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// Runs `switchboard bench <args> --json` in a temporary working dir and
/// returns its report.
fn bench(args: &[&str]) -> Value {
    let dir = tempfile::tempdir().expect("a temp dir");
    let output = Command::new(BIN)
        .arg("bench")
        .args(args)
        .arg("--json")
        .current_dir(dir.path())
        .env("NATS_SERVER_BIN", nats_server_bin())
        .env_remove("SWITCHBOARD_DATA_DIR")
        .env_remove("SWITCHBOARD_CONFIG")
        .output()
        .expect("run switchboard bench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "bench {args:?} failed ({}): {stderr}",
        output.status
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "bench {args:?} printed no JSON report ({error}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// A measured rate or latency: a positive, finite number.
fn measured(report: &Value, pointer: &str) -> f64 {
    let value = report
        .pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no number at {pointer} in {report}"));
    assert!(
        value.is_finite() && value > 0.0,
        "{pointer} is {value}, not a measurement"
    );
    value
}

fn none_failed(report: &Value, pointers: &[&str]) {
    for pointer in pointers {
        assert_eq!(
            report.pointer(pointer).and_then(Value::as_u64),
            Some(0),
            "{pointer} in {report}"
        );
    }
}

#[test]
fn bench_nats_measures_the_service_beside_raw_and_durable_raw_request_reply() {
    let report = bench(&[
        "nats",
        "--clients",
        "1,2",
        "--duration-secs",
        "0.3",
        "--rounds",
        "1",
        "--conversations",
        "20",
        "--actors",
        "50",
        "--connections",
        "2",
    ]);
    let runs = report["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "one run per client count: {report}");
    for (at, clients) in [1u64, 2].into_iter().enumerate() {
        let run = format!("/runs/{at}");
        assert_eq!(
            report.pointer(&format!("{run}/clients")),
            Some(&Value::from(clients))
        );
        none_failed(
            &report,
            &[
                &format!("{run}/failed"),
                &format!("{run}/raw_failed"),
                &format!("{run}/durable_raw_failed"),
            ],
        );
        for figure in [
            "raw_requests_per_sec",
            "raw_latency/p50_ms",
            "durable_raw_requests_per_sec",
            "durable_raw_latency/p50_ms",
            "acks_per_sec",
            "ack_latency/p50_ms",
            "ratio",
            "ratio_to_durable_raw",
        ] {
            measured(&report, &format!("{run}/{figure}"));
        }
    }
    measured(&report, "/raw_flush/latency/p50_ms");
    measured(&report, "/memory/bytes_per_actor");
    assert_eq!(
        report["throughput_target"],
        Value::Null,
        "64 clients were not measured"
    );
    let target = &report["latency_target"];
    assert_eq!(target["clients"], 1);
    assert_eq!(target["target_ratio"], 1.5);
    let floor = measured(target, "/floor_p50_ms");
    let parts = measured(target, "/raw_p50_ms") + measured(target, "/raw_flush_p50_ms");
    assert!(
        (floor - parts).abs() < 1e-9,
        "the floor is raw + flush: {target}"
    );
    measured(target, "/durable_raw_p50_ms");
    measured(target, "/ratio_to_durable_raw");
}

#[test]
fn bench_http_measures_sends_history_reads_streams_and_the_proxy_beside_their_baselines() {
    let report = bench(&[
        "http",
        "--connections",
        "2",
        "--nats-connections",
        "1",
        "--duration-secs",
        "0.3",
        "--conversations",
        "10",
        "--proxy-rate",
        "40",
        "--proxy-low-rate",
        "20",
        "--proxy-rounds",
        "1",
    ]);
    for side in [
        "nats_send",
        "http_send",
        "history_reads/nats",
        "history_reads/http",
        "chat_stream/streams",
    ] {
        none_failed(&report, &[&format!("/{side}/failed")]);
        measured(&report, &format!("/{side}/per_sec"));
        measured(&report, &format!("/{side}/latency/p50_ms"));
    }
    measured(&report, "/chat_stream/first_chunk/p50_ms");
    measured(&report, "/send_target/ratio");
    measured(&report, "/history_reads/ratio");
    assert_eq!(report["history_reads"]["limit"], 20);
    let runs = report["proxy_runs"].as_array().expect("proxy runs");
    assert!(!runs.is_empty(), "{report}");
    for at in 0..runs.len() {
        for side in ["direct", "proxied"] {
            let side = format!("/proxy_runs/{at}/{side}");
            none_failed(&report, &[&format!("{side}/failed")]);
            measured(&report, &format!("{side}/done_per_sec"));
            measured(&report, &format!("{side}/latency/p50_ms"));
        }
    }
    assert_eq!(report["proxy_target"]["offered_per_sec"], 40);
}

#[test]
fn bench_log_measures_appends_beside_plain_sled_and_replays_and_sizes_the_fill() {
    let report = bench(&[
        "log",
        "--events",
        "2000",
        "--seconds",
        "0.3",
        "--rounds",
        "1",
    ]);
    let appends = report["appends"].as_array().expect("appends");
    assert!(!appends.is_empty(), "{report}");
    for at in 0..appends.len() {
        for figure in ["raw_records_per_sec", "log_appends_per_sec", "ratio"] {
            measured(&report, &format!("/appends/{at}/{figure}"));
        }
    }
    assert_eq!(report["fill"]["events"], 2000);
    measured(&report, "/fill/events_per_sec");
    assert_eq!(
        report["replay"]["events"], 2000,
        "the replay reads every event filled"
    );
    measured(&report, "/replay/events_per_sec");
    measured(&report, "/size/log_bytes_per_event");
}
