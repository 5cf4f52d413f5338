//! The §9 command line drives a running daemon: `agent create` takes Ed25519 keys as
//! base64url (padded or not) or hex, values may start with `-`, `agent list --json` reports
//! revocation, and `token --agent` limits the token's agents.

mod common;

use common::*;
use serde_json::{json, Value};
use switchboard::client::{
    b64url_padded, generate_ed25519, AgentConn, AgentCredential, ClientConn, TokenPlace,
};

fn create_with_key(d: &Daemon, user: &str, name: &str, key_text: &str) -> String {
    let out = d.cli(&[
        "agent".into(),
        "create".into(),
        format!("--data-dir={}", d.data_dir.display()),
        format!("--user={user}"),
        format!("--name={name}"),
        format!("--ed25519-pubkey={key_text}"),
        "--json".into(),
    ]);
    let v: Value = out.lines().find_map(|l| serde_json::from_str(l).ok()).expect("json output");
    assert_eq!(v["user"], json!(user));
    assert!(v.get("secret").is_none());
    v["agent_id"].as_str().unwrap().to_string()
}

#[test]
fn ed25519_keys_are_accepted_as_hex_and_padded_base64url() {
    let d = Daemon::start_default();
    for form in ["hex", "padded"] {
        let kp = generate_ed25519();
        let pk = kp.public_key().as_ref().to_vec();
        let text = match form {
            "hex" => pk.iter().map(|b| format!("{b:02x}")).collect(),
            _ => b64url_padded(&pk),
        };
        let agent_id = create_with_key(&d, "u1", form, &text);
        let cred = AgentCredential::Ed25519 { agent_id, keypair: kp };
        AgentConn::connect(d.addr, &cred).unwrap_or_else(|e| panic!("{form} key: {e}"));
    }
}

#[test]
fn values_may_start_with_a_dash() {
    let d = Daemon::start_default();
    let cred = d.hmac_agent("-dash-user", "-dash-name");
    let t = d.token("-dash-user", &[cred.agent_id()], "1h");
    let c = ClientConn::connect(d.addr, &t, TokenPlace::Header, None).unwrap();
    assert_eq!(c.welcome.str("user"), "-dash-user");
    assert_eq!(
        c.welcome.value["agents"],
        json!([{"id": cred.agent_id(), "name": "-dash-name", "online": false}])
    );
    let a = d.agent(&cred);
    assert_eq!(a.welcome.str("user"), "-dash-user");
}

#[test]
fn agent_list_reports_users_names_and_revocation() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "one");
    let b = d.hmac_agent("u1", "two");
    let other = d.hmac_agent("u2", "three");
    d.revoke(b.agent_id());
    let list = |user: Option<&str>| -> Vec<Value> {
        let mut args = vec!["agent".into(), "list".into(), format!("--data-dir={}", d.data_dir.display())];
        if let Some(u) = user {
            args.push(format!("--user={u}"));
        }
        args.push("--json".into());
        let out = d.cli(&args);
        let v: Value =
            serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("agent list --json: {e}: {out}"));
        v.as_array().expect("a JSON array").clone()
    };
    let find = |l: &[Value], id: &str| l.iter().find(|v| v["agent_id"] == json!(id)).cloned();
    let all = list(None);
    assert_eq!(all.len(), 3, "{all:?}");
    let one = find(&all, a.agent_id()).expect("listed");
    assert_eq!((&one["user"], &one["name"], &one["revoked"]), (&json!("u1"), &json!("one"), &json!(false)));
    assert_eq!(find(&all, b.agent_id()).expect("revoked agents are still listed")["revoked"], json!(true));
    let u1 = list(Some("u1"));
    assert_eq!(u1.len(), 2, "{u1:?}");
    assert!(find(&u1, other.agent_id()).is_none());
}

#[test]
fn a_token_names_the_agents_it_may_reach() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "one");
    let b = d.hmac_agent("u1", "two");
    let t = d.token("u1", &[a.agent_id()], "10m");
    let c = ClientConn::connect(d.addr, &t, TokenPlace::Query, None).unwrap();
    assert_eq!(c.welcome.value["agents"], json!([{"id": a.agent_id(), "name": "one", "online": false}]));
    assert_refused(ClientConn::connect(d.addr, &t, TokenPlace::Query, Some(b.agent_id())), 403, "forbidden");
}
