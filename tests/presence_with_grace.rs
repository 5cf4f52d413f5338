//! Sessions learn when a reachable agent comes online at once, and that it went offline only
//! after it stayed away for `presence.offline_grace_ms`, so an agent that reconnects within
//! the grace never appears offline; agents learn of each session that opens or closes (§4).

mod common;

use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

const GRACE_MS: u64 = 1500;

fn daemon() -> Daemon {
    Daemon::with_config(&format!("[presence]\noffline_grace_ms = {GRACE_MS}\n"))
}

#[test]
fn presence_goes_online_at_once_and_offline_only_after_the_grace() {
    let d = daemon();
    let a = d.hmac_agent("u1", "a");
    let t = d.token("u1", &[], "1h");
    let mut c = d.client(&t, None);
    assert_eq!(c.welcome.value["agents"], json!([{"id": a.agent_id(), "name": "a", "online": false}]));
    let mut ag = d.agent(&a);
    let f = expect_type(&mut c, "presence");
    assert_eq!(f.value, json!({"type": "presence", "agent": a.agent_id(), "online": true}));
    assert_eq!(ag.welcome.value["sessions"], json!([c.session]));

    let gone = Instant::now();
    ag.ws.close();
    drop(ag);
    // Within the grace the agent still counts as online for a new session.
    let c2 = d.client(&t, None);
    let within = gone.elapsed();
    if within < Duration::from_millis(GRACE_MS - 300) {
        assert_eq!(c2.welcome.value["agents"], json!([{"id": a.agent_id(), "name": "a", "online": true}]));
    }
    let f = next_frame(&mut c, Duration::from_millis(GRACE_MS) + WAIT);
    let waited = gone.elapsed();
    assert_eq!(f.value, json!({"type": "presence", "agent": a.agent_id(), "online": false}), "{}", f.text);
    assert!(waited >= Duration::from_millis(GRACE_MS - 50), "offline after {waited:?}, before the grace");
    let c3 = d.client(&t, None);
    assert_eq!(c3.welcome.value["agents"], json!([{"id": a.agent_id(), "name": "a", "online": false}]));
}

#[test]
fn an_agent_back_within_the_grace_never_appears_offline() {
    let d = daemon();
    let a = d.hmac_agent("u1", "a");
    let mut ag = d.agent(&a);
    let mut c = d.client(&d.token("u1", &[], "1h"), None);
    expect_type(&mut ag, "session");
    // Dropped and back at once, then replaced by a second connection while the first is open.
    ag.ws.close();
    drop(ag);
    let first = d.agent(&a);
    let mut second = d.agent(&a);
    drop(first);
    std::thread::sleep(Duration::from_millis(GRACE_MS + 1000));
    second.send(Some(&c.session), &json!("marker"), None).unwrap();
    loop {
        let f = next_frame(&mut c, WAIT);
        match f.ty() {
            // A repeated "online" is harmless; the spec only forbids the offline.
            "presence" => assert_eq!(f.value["online"], json!(true), "appeared offline: {}", f.text),
            "message" => {
                assert_eq!(f.value["data"], json!("marker"));
                break;
            }
            _ => panic!("unexpected frame {}", f.text),
        }
    }
}

#[test]
fn presence_goes_only_to_sessions_that_can_reach_the_agent() {
    let d = daemon();
    let a = d.hmac_agent("u1", "a");
    let b = d.hmac_agent("u1", "b");
    let mut bound_b = d.client(&d.token("u1", &[], "1h"), Some(b.agent_id()));
    let mut only_b = d.client(&d.token("u1", &[b.agent_id()], "1h"), None);
    let mut other_user = d.client(&d.token("u2", &[], "1h"), None);
    let mut all = d.client(&d.token("u1", &[], "1h"), None);
    let _ag = d.agent(&a);
    assert_eq!(expect_type(&mut all, "presence").str("agent"), a.agent_id());
    for c in [&mut bound_b, &mut only_b, &mut other_user] {
        assert_pong(c);
    }
}

#[test]
fn agents_see_each_reachable_session_open_and_close() {
    let d = daemon();
    let a = d.hmac_agent("u1", "a");
    let b = d.hmac_agent("u1", "b");
    let mut ag = d.agent(&a);
    let t = d.token("u1", &[], "1h");
    let c = d.client(&t, None);
    let s = c.session.clone();
    let f = expect_type(&mut ag, "session");
    assert_eq!(f.value, json!({"type": "session", "session": s, "open": true}));
    // Sessions that cannot reach this agent are not reported.
    let _bound_b = d.client(&t, Some(b.agent_id()));
    let _only_b = d.client(&d.token("u1", &[b.agent_id()], "1h"), None);
    let _other_user = d.client(&d.token("u2", &[], "1h"), None);
    let mut c = c;
    c.ws.close();
    drop(c);
    let f = expect_type(&mut ag, "session");
    assert_eq!(f.value, json!({"type": "session", "session": s, "open": false}));
    // A session that vanishes without a close handshake is reported closed too.
    let c2 = d.client(&t, Some(a.agent_id()));
    let s2 = c2.session.clone();
    assert_eq!(
        expect_type(&mut ag, "session").value,
        json!({"type": "session", "session": s2, "open": true})
    );
    drop(c2);
    assert_eq!(
        expect_type(&mut ag, "session").value,
        json!({"type": "session", "session": s2, "open": false})
    );
    assert_pong(&mut ag);
}
