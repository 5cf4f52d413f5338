//! SIGHUP reloads JWT keys and limits without dropping a connection; a configuration that
//! does not validate is refused and the old one stays in force.

mod common;

use common::*;
use serde_json::json;
use switchboard::client::{unix_now, ClientConn, TokenPlace};

fn hup(d: &Daemon) {
    // SAFETY: plain kill(2) on the daemon's pid.
    assert_eq!(unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) }, 0);
}

fn wait_log(d: &Daemon, needle: &str, count: usize) {
    let seen = eventually(WAIT, || (d.logs().matches(needle).count() >= count).then_some(()));
    assert!(seen.is_some(), "no {needle:?} in the daemon's log:\n{}", d.logs());
}

fn edit_config(d: &Daemon, f: impl FnOnce(&mut toml::Table)) {
    let mut t: toml::Table = std::fs::read_to_string(&d.config_path).unwrap().parse().unwrap();
    f(&mut t);
    std::fs::write(&d.config_path, toml::to_string(&t).unwrap()).unwrap();
}

#[test]
fn rotating_the_hs256_secret_keeps_sessions_and_requires_the_new_key() {
    let keys = tempfile::tempdir().unwrap();
    let secret_file = keys.path().join("hs256.key");
    std::fs::write(&secret_file, "old-secret-0123456789\n").unwrap();
    let d =
        Daemon::with_config(&format!("[jwt]\nhs256_secret_file = {:?}\n", secret_file.display().to_string()));
    let a = d.hmac_agent("u1", "a");
    let mut ag = d.agent(&a);
    let old_token = mint(b"old-secret-0123456789", &json!({"sub": "u1", "exp": unix_now() + 3600}));
    let mut c = d.client(&old_token, None);
    expect_type(&mut ag, "session");

    std::fs::write(&secret_file, "new-secret-9876543210\n").unwrap();
    hup(&d);
    wait_log(&d, "configuration reloaded", 1);

    // New connections need the new key.
    let r = ClientConn::connect(d.addr, &old_token, TokenPlace::Header, None);
    assert_refused(r, 401, "unauthorized");
    let new_token = mint(b"new-secret-9876543210", &json!({"sub": "u1", "exp": unix_now() + 3600}));
    let mut c2 = d.client(&new_token, None);
    expect_type(&mut ag, "session");

    // Existing sessions stayed up and still relay both ways.
    c.send(Some(a.agent_id()), &json!({"n": 1}), Some("m1")).unwrap();
    let f = expect_type(&mut ag, "message");
    assert_eq!(f.value["data"], json!({"n": 1}));
    assert_eq!(next_skipping(&mut c, &[], WAIT).str("type"), "ack");
    ag.send(None, &json!("to all"), None).unwrap();
    assert_eq!(expect_type(&mut c, "message").value["data"], json!("to all"));
    assert_eq!(expect_type(&mut c2, "message").value["data"], json!("to all"));
}

#[test]
fn reloaded_limits_apply_and_a_bad_config_is_refused() {
    let d = Daemon::start_default();
    let t = d.token("u1", &[], "1h");
    let _c1 = d.client(&t, None);
    let _c2 = d.client(&t, None);

    edit_config(&d, |t| {
        let l = t.entry("limits").or_insert(toml::Value::Table(Default::default()));
        l.as_table_mut().unwrap().insert("max_connections_per_user".into(), 2.into());
    });
    hup(&d);
    wait_log(&d, "configuration reloaded", 1);
    assert_refused(ClientConn::connect(d.addr, &t, TokenPlace::Header, None), 429, "too_many_requests");

    // A value that does not validate: refused, the daemon keeps serving with the old limits.
    edit_config(&d, |t| {
        let l = t.get_mut("limits").unwrap().as_table_mut().unwrap();
        l.insert("max_frame_bytes".into(), 1.into());
    });
    hup(&d);
    wait_log(&d, "configuration refused", 1);
    assert!(d.logs().contains("limits.max_frame_bytes"), "the refusal names the key:\n{}", d.logs());
    assert_refused(ClientConn::connect(d.addr, &t, TokenPlace::Header, None), 429, "too_many_requests");

    // An unknown key is refused too.
    edit_config(&d, |t| {
        let l = t.get_mut("limits").unwrap().as_table_mut().unwrap();
        l.remove("max_frame_bytes");
        l.insert("no_such_key".into(), 1.into());
    });
    hup(&d);
    wait_log(&d, "configuration refused", 2);
    let mut d = d;
    d.assert_alive();
}
