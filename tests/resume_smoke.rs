//! The shortest paths through spec §8, end to end: a client resumes a stream after missing
//! messages, and an agent picks up its mailbox (the thorough suites are
//! `resume_client_streams`, `agent_mailbox` and `resume_survives_restart`).

mod common;

use common::*;
use serde_json::json;
use switchboard::client::{ClientConn, ClientOpts, TokenPlace};

fn resume_client(d: &Daemon, token: &str, agent: &str, query: &str) -> ClientConn {
    let opts = ClientOpts {
        agent: Some(agent.to_string()),
        extra_query: Some(query.to_string()),
        ..Default::default()
    };
    ClientConn::connect_with(d.addr, Some((TokenPlace::Header, token)), &opts)
        .unwrap_or_else(|e| panic!("resume connect: {e}"))
}

#[test]
fn a_client_that_reconnects_gets_what_it_missed_then_resumed() {
    let d = Daemon::start_default();
    let cred = d.hmac_agent("alice", "bot");
    let id = cred.agent_id().to_string();
    let mut agent = d.agent(&cred);
    let token = d.token("alice", &[], "1h");
    let mut c1 = d.client(&token, Some(&id));
    expect_type(&mut agent, "session");
    agent.send(None, &json!("m1"), None).unwrap();
    let m1 = expect_type(&mut c1, "message");
    assert_eq!(m1.value["seq"], 1);
    let epoch = m1.str("epoch").to_string();
    assert!(!epoch.is_empty());
    let old = c1.session.clone();
    c1.ws.close();
    expect_type(&mut agent, "session");
    agent.send(None, &json!("m2"), None).unwrap();
    agent.send(Some(&old), &json!("m3"), Some("q3")).unwrap();
    let ack = expect_type(&mut agent, "ack");
    assert_eq!(ack.value, json!({"type":"ack","id":"q3","queued":true}));
    let mut c2 = resume_client(&d, &token, &id, &format!("since=1&epoch={epoch}&resume={old}"));
    let m2 = expect_type(&mut c2, "message");
    assert_eq!((m2.value["seq"].clone(), m2.value["data"].clone()), (json!(2), json!("m2")));
    let m3 = expect_type(&mut c2, "message");
    assert_eq!((m3.value["seq"].clone(), m3.value["data"].clone()), (json!(3), json!("m3")));
    let r = expect_type(&mut c2, "resumed");
    assert_eq!(r.value, json!({"type":"resumed","agent":id,"recovered":true}));
    // A wrong epoch: no replay at all.
    let mut c3 = resume_client(&d, &token, &id, "since=0&epoch=e_wrong");
    let r = expect_type(&mut c3, "resumed");
    assert_eq!(r.value["recovered"], false);
}

#[test]
fn a_message_to_an_offline_agent_waits_in_its_mailbox() {
    let d = Daemon::start_default();
    let cred = d.hmac_agent("bob", "bot");
    let id = cred.agent_id().to_string();
    let token = d.token("bob", &[], "1h");
    let mut c = d.client(&token, Some(&id));
    c.send(None, &json!({"n":1}), Some("a1")).unwrap();
    let ack = expect_type(&mut c, "ack");
    assert_eq!(ack.value, json!({"type":"ack","id":"a1","queued":true}));
    c.send(None, &json!({"n":2}), None).unwrap();
    let mut agent = d.agent(&cred);
    let m = next_skipping(&mut agent, &["session"], WAIT);
    assert_eq!(m.value, json!({"type":"message","from":c.session,"seq":1,"data":{"n":1}}));
    let m = next_skipping(&mut agent, &["session"], WAIT);
    assert_eq!(m.value["seq"], 2);
    agent.send_raw_text(r#"{"type":"ack","seq":1}"#).unwrap();
    drop(agent);
    let mut agent = d.agent(&cred);
    let m = next_skipping(&mut agent, &["session"], WAIT);
    assert_eq!((m.value["seq"].clone(), m.value["data"].clone()), (json!(2), json!({"n":2})));
    agent.send_raw_text(r#"{"type":"ack","seq":2}"#).unwrap();
    // Everything confirmed: live again, without seq.
    assert_pong(&mut agent);
    c.send(None, &json!({"n":3}), Some("a3")).unwrap();
    let m = next_skipping(&mut agent, &["session"], WAIT);
    assert_eq!(m.value, json!({"type":"message","from":c.session,"data":{"n":3}}));
    let ack = next_skipping(&mut c, &["presence"], WAIT);
    assert_eq!(ack.value, json!({"type":"ack","id":"a3"}));
}

#[test]
fn resuming_a_session_that_still_looks_open_takes_it_over() {
    // A phone whose connection died without a close: the relay has not noticed yet when the
    // phone is back with `resume=`.
    let d = Daemon::start_default();
    let cred = d.hmac_agent("carol", "bot");
    let id = cred.agent_id().to_string();
    let mut agent = d.agent(&cred);
    let token = d.token("carol", &[], "1h");
    let mut c1 = d.client(&token, Some(&id));
    expect_type(&mut agent, "session");
    agent.send(Some(&c1.session), &json!("m1"), None).unwrap();
    let m1 = expect_type(&mut c1, "message");
    let epoch = m1.str("epoch").to_string();
    let old = c1.session.clone();
    let mut c2 = resume_client(&d, &token, &id, &format!("since=1&epoch={epoch}&resume={old}"));
    let r = expect_type(&mut c2, "resumed");
    assert_eq!(r.value["recovered"], true);
    // The old connection is closed as replaced; sends to the old session reach the new one.
    assert_eq!(expect_close(&mut c1, WAIT).0, 4009);
    agent.send(Some(&old), &json!("m2"), Some("k2")).unwrap();
    let m2 = next_skipping(&mut c2, &["presence"], WAIT);
    assert_eq!((m2.value["seq"].clone(), m2.value["data"].clone()), (json!(2), json!("m2")));
    let ack = next_skipping(&mut agent, &["session"], WAIT);
    assert_eq!(ack.value, json!({"type":"ack","id":"k2"}));
}
