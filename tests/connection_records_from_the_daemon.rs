//! The running daemon keeps a record of every connection (id, user, role, agent, remote
//! address, opened/closed, frames and bytes each way, close code), which
//! `switchboard connections` lists while it runs; agent rows get last connected/seen.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn connections(d: &Daemon, extra: &[&str]) -> Vec<Value> {
    let mut args =
        vec!["connections".to_string(), format!("--data-dir={}", d.data_dir.display()), "--json".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    serde_json::from_str(&d.cli(&args)).expect("connections --json")
}

#[test]
fn every_connection_is_recorded_with_its_totals() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let t = d.token("u1", &[], "1h");
    let mut ag = d.agent(&a);
    let agent_conn = ag.welcome.value["conn"].as_str().unwrap().to_string();
    let mut c = d.client(&t, Some(a.agent_id()));
    let session = c.welcome.value["session"].as_str().unwrap().to_string();
    expect_type(&mut ag, "session");
    c.send(None, &json!({"hello": 1}), Some("m1")).unwrap();
    expect_type(&mut ag, "message");
    c.ws.close();
    drop(c);
    let other = d.token("u2", &[], "1h");
    let _c2 = d.client(&other, None);

    let rows = eventually(Duration::from_secs(5), || {
        let rows = connections(&d, &["--user", "u1"]);
        rows.iter().any(|r| r["conn_id"] == session.as_str() && !r["closed"].is_null()).then_some(rows)
    })
    .expect("the closed session's record");
    assert!(rows.iter().all(|r| r["user"] == "u1"), "the --user filter holds: {rows:?}");
    let s = rows.iter().find(|r| r["conn_id"] == session.as_str()).unwrap();
    assert_eq!(s["role"], "client");
    assert_eq!(s["agent_id"], a.agent_id(), "a bound session records its agent");
    assert_eq!(s["close_code"], 1000);
    assert!(s["frames_in"].as_u64().unwrap() >= 1 && s["bytes_out"].as_u64().unwrap() > 0, "{s}");
    assert!(s["remote"].as_str().unwrap().starts_with("127.0.0.1:"));
    let ag_row = rows.iter().find(|r| r["conn_id"] == agent_conn.as_str()).expect("the agent's record");
    assert_eq!((ag_row["role"].as_str(), ag_row["closed"].is_null()), (Some("agent"), true), "still open");
    let by_agent = connections(&d, &["--agent", a.agent_id()]);
    assert_eq!(by_agent.len(), 2, "{by_agent:?}");
    let list: Vec<Value> = serde_json::from_str(&d.cli(&[
        "agent".into(),
        "list".into(),
        format!("--data-dir={}", d.data_dir.display()),
        "--json".into(),
    ]))
    .unwrap();
    assert!(list[0]["last_connected"].as_u64().is_some(), "agent rows get last_connected: {list:?}");
    let all = connections(&d, &[]);
    assert_eq!(all.len(), 3, "{all:?}");
}
