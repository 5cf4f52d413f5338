//! Small bounded runs of the load generator against a real daemon: they assert the
//! accounting (nothing lost, misdelivered or duplicated; reported drops counted as such), not
//! the speed.
//!
//! The daemon binary is `$SWITCHBOARD_BIN`, or else the workspace's `target/debug/switchboard`
//! (`$CARGO_TARGET_DIR/debug/switchboard` when that is set): build it first, e.g. with
//! `cargo build -p switchboard` (a plain `cargo test --workspace` builds it too).

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn daemon_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SWITCHBOARD_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let p = target.join("debug/switchboard");
    assert!(
        p.exists(),
        "no daemon binary at {}: build it with `cargo build -p switchboard`, or set SWITCHBOARD_BIN",
        p.display()
    );
    p
}

/// Runs the generator with `args` against a spawned daemon; returns (exit code, JSON report).
fn run(args: &[&str]) -> (i32, Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let svg = dir.path().join("report.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard-loadtest"))
        .args(args)
        .arg("--spawn")
        .arg(daemon_bin())
        .arg("--json-out")
        .arg(&json)
        .arg("--svg-out")
        .arg(&svg)
        .args(["--quiet", "--cli-parallel", "2"])
        .output()
        .expect("run switchboard-loadtest");
    let text = format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report = std::fs::read_to_string(&json)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| panic!("no JSON report; {text}"));
    let chart = std::fs::read_to_string(&svg).unwrap_or_else(|_| panic!("no SVG chart; {text}"));
    assert!(chart.starts_with("<svg") && chart.ends_with("</svg>\n"), "{chart}");
    assert!(chart.contains("<polyline"), "a chart without lines: {chart}");
    (out.status.code().unwrap_or(-1), report, text)
}

fn n(v: &Value, path: &str) -> u64 {
    v.pointer(path).and_then(Value::as_u64).unwrap_or_else(|| panic!("{path} missing in {v:#}"))
}

fn assert_clean(acc: &Value, text: &str) {
    for k in [
        "lost_unreported",
        "duplicates",
        "out_of_order",
        "wrong_user",
        "misdirected",
        "from_mismatch",
        "phantom",
        "unparseable",
        "unanswered_live",
        "unexpected_answers",
        "lost_on_closed_connection",
    ] {
        assert_eq!(n(acc, &format!("/{k}")), 0, "{k} in {acc:#}\n{text}");
    }
    assert!(acc["closes"].as_object().unwrap().is_empty(), "connections closed: {acc:#}\n{text}");
}

#[test]
fn unicast_both_ways_accounts_for_every_message() {
    // 50 users × (1 agent + 3 clients) = 200 connections; agents address each client in
    // turn, clients send to their agent.
    let (code, r, text) = run(&[
        "relay",
        "--users",
        "50",
        "--agents-per-user",
        "1",
        "--clients-per-user",
        "3",
        "--direction",
        "both",
        "--duration",
        "3",
        "--window",
        "8",
    ]);
    assert_eq!(code, 0, "{text}");
    let acc = &r["accounting"];
    assert_clean(acc, &text);
    let sent = n(acc, "/sent");
    assert!(sent > 0, "nothing was sent: {text}");
    assert_eq!(n(acc, "/acked"), sent, "{text}");
    assert_eq!(n(acc, "/delivered"), sent, "{text}");
    assert_eq!(n(acc, "/expected_deliveries"), sent, "{text}");
    assert!(r["ok"].as_bool().unwrap());
    assert_eq!(n(&r, "/results/latency/count"), sent);
}

#[test]
fn broadcast_reaches_every_client_of_the_user_only() {
    // 20 users × (2 agents + 3 clients) = 100 connections; every broadcast is one frame and
    // three deliveries.
    let (code, r, text) = run(&[
        "relay",
        "--users",
        "20",
        "--agents-per-user",
        "2",
        "--clients-per-user",
        "3",
        "--broadcast",
        "--duration",
        "2",
        "--window",
        "4",
        "--size",
        "200",
    ]);
    assert_eq!(code, 0, "{text}");
    let acc = &r["accounting"];
    assert_clean(acc, &text);
    let sent = n(acc, "/sent");
    assert!(sent > 0, "{text}");
    assert_eq!(n(acc, "/delivered"), 3 * sent, "{text}");
}

#[test]
fn rate_limited_sends_are_reported_drops_not_losses() {
    // The daemon's per-user rate is set low: many sends are answered `rate_limited`, which
    // the relay reports, so the run passes, and every unacked send is an error, not a loss.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("extra.toml");
    std::fs::write(&cfg, "[limits]\nmessages_per_sec_per_user = 50\nmessages_burst_per_user = 50\n").unwrap();
    let (code, r, text) = run(&[
        "relay",
        "--users",
        "4",
        "--duration",
        "2",
        "--window",
        "4",
        "--daemon-config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    let acc = &r["accounting"];
    assert_clean(acc, &text);
    let limited = acc["answered_error"]["rate_limited"].as_u64().unwrap_or(0);
    assert!(limited > 0, "expected rate_limited answers: {acc:#}");
    assert_eq!(n(acc, "/dropped_reported"), limited);
    assert_eq!(n(acc, "/acked") + limited, n(acc, "/sent"));
    assert_eq!(n(acc, "/delivered"), n(acc, "/acked"));
}

#[test]
fn idle_reports_daemon_memory_and_cpu() {
    let (code, r, text) = run(&["idle", "--conns", "200", "--settle", "0.5", "--hold", "1"]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(n(&r, "/connect/connected"), 200, "{text}");
    assert!(n(&r, "/daemon/rss_kib_connected") > 0);
    assert!(r["daemon"]["rss_bytes_per_connection"].is_number(), "{r:#}");
    assert!(r["idle_cpu"]["daemon_cpu_secs"].is_number(), "{r:#}");
    assert!(r["ok"].as_bool().unwrap());
}

#[test]
fn connect_opens_every_connection_and_times_the_handshakes() {
    let (code, r, text) = run(&["connect", "--conns", "200", "--clients-per-user", "3"]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(n(&r, "/results/connected"), 200, "{text}");
    assert_eq!(n(&r, "/results/failed"), 0, "{text}");
    assert_eq!(n(&r, "/results/latency_ms/count"), 200, "{text}");
    assert!(r["results"]["handshakes_per_sec"].as_f64().unwrap() > 0.0);
    assert!(r["results"]["handshakes_per_daemon_cpu_sec"].is_number(), "{r:#}");
    let welcomes: u64 =
        r["timeline"]["welcomes_per_100ms"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(welcomes, 200);
}

#[test]
fn soak_with_ed25519_agents_samples_memory_and_accounts_for_every_message() {
    // Ed25519 agents sign their upgrades and every message with Ed25519 (the relay checks
    // both); the soak samples the daemon's memory four times a second for 2.4 s.
    let (code, r, text) = run(&[
        "soak",
        "--users",
        "10",
        "--clients-per-user",
        "2",
        "--rate",
        "50",
        "--minutes",
        "0.04",
        "--sample-every",
        "0.25",
        "--agent-key",
        "ed25519",
    ]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(r["target"]["agent_key"], "ed25519");
    let acc = &r["accounting"];
    assert_clean(acc, &text);
    let sent = n(acc, "/sent");
    assert!(sent > 0, "{text}");
    assert_eq!(n(acc, "/delivered"), sent, "{text}");
    assert!(r["memory"]["samples"].as_array().unwrap().len() >= 5, "{r:#}");
    for k in ["rss_kib_start", "rss_kib_peak_sampled", "rss_kib_end"] {
        assert!(n(&r["soak"], &format!("/{k}")) > 0, "{k}: {r:#}");
    }
    assert!(r["soak"]["slope_kib_per_min"].is_number(), "{r:#}");
    let lat = r["timeline"]["latency_per_sec"].as_array().unwrap();
    assert!(lat.iter().any(|l| l["p99_us"].is_number()), "{r:#}");
}
