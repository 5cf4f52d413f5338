//! An agent has at most one live connection: a second one replaces the first, which is closed
//! with 4009 (§5), and `agent revoke` closes a live agent with 4003 within 2 s of returning.

mod common;

use common::*;
use serde_json::json;
use std::time::{Duration, Instant};
use switchboard::client::{AgentConn, ClientConn, TokenPlace};

#[test]
fn a_second_connection_replaces_the_first_with_4009() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let mut first = d.agent(&a);
    let mut c = d.client(&d.token("u1", &[], "1h"), None);
    expect_type(&mut first, "session");
    let mut second = d.agent(&a);
    assert_ne!(first.conn, second.conn);
    let (code, frames) = expect_close(&mut first, WAIT);
    assert_eq!(
        code,
        4009,
        "frames before the close: {:?}",
        frames.iter().map(|f| &f.text).collect::<Vec<_>>()
    );
    assert_eq!(second.welcome.value["sessions"], json!([c.session]), "the replacement sees the live session");
    // Traffic goes to the replacement, and it starts its own counter at 1.
    c.send(Some(a.agent_id()), &json!("hi"), Some("m")).unwrap();
    let f = next_skipping(&mut c, &["presence"], WAIT);
    assert_eq!((f.ty(), f.str("id")), ("ack", "m"), "{}", f.text);
    let f = expect_type(&mut second, "message");
    assert_eq!(f.value["data"], json!("hi"));
    second.send(Some(&c.session), &json!("back"), Some("r")).unwrap();
    assert_eq!(expect_type(&mut second, "ack").str("id"), "r");
    let f = next_skipping(&mut c, &["presence"], WAIT);
    assert_eq!(f.value["data"], json!("back"), "{}", f.text);
    // A third one replaces the second the same way.
    let _third = d.agent(&a);
    assert_eq!(expect_close(&mut second, WAIT).0, 4009);
}

#[test]
fn revoking_a_live_agent_closes_it_with_4003_within_2_seconds() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let keep = d.hmac_agent("u1", "keep");
    let mut ag = d.agent(&a);
    let mut kept = d.agent(&keep);
    let t = d.token("u1", &[], "1h");
    let mut c = d.client(&t, None);
    expect_type(&mut ag, "session");
    expect_type(&mut kept, "session");
    d.revoke(a.agent_id());
    let returned = Instant::now();
    let (code, _) = expect_close(&mut ag, Duration::from_secs(2));
    assert_eq!(code, 4003);
    assert!(returned.elapsed() <= Duration::from_secs(2));
    // Gone for good: no upgrade, not reachable, not listed; the other agent is untouched.
    assert_refused(AgentConn::connect(d.addr, &a), 401, "unauthorized");
    c.send(Some(a.agent_id()), &json!(1), Some("x")).unwrap();
    let f = next_skipping(&mut c, &["presence"], WAIT);
    assert_eq!((f.ty(), f.str("code"), f.str("id")), ("error", "not_allowed", "x"), "{}", f.text);
    let c2 = ClientConn::connect(d.addr, &t, TokenPlace::Header, None).unwrap();
    assert_eq!(c2.welcome.value["agents"], json!([{"id": keep.agent_id(), "name": "keep", "online": true}]));
    assert_eq!(expect_type(&mut kept, "session").str("session"), c2.session);
    assert_pong(&mut kept);
}
