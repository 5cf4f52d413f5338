//! Messages go from a user's agents to that user's sessions and back exactly as §4–5 route
//! them: welcome frames describe both sides, addressed and broadcast sends reach exactly the
//! right connections with their `data` bytes untouched, acks and `offline`/`not_allowed`
//! errors follow §5, and malformed frames are answered `bad_frame` (binary: close 1003).

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use switchboard::client::{ClientConn, ClientOpts, TokenPlace};

#[track_caller]
fn expect_msg(c: &mut impl Conn, from: &str, data: &Value) {
    let f = expect_type(c, "message");
    assert_eq!(f.str("from"), from, "{}", f.text);
    assert_eq!(&f.value["data"], data, "{}", f.text);
}

#[track_caller]
fn expect_ack(c: &mut impl Conn, id: &str) {
    let f = expect_type(c, "ack");
    assert_eq!(f.str("id"), id, "{}", f.text);
}

#[track_caller]
fn expect_err(c: &mut impl Conn, code: &str, id: Option<&str>) {
    let f = expect_type(c, "error");
    assert_eq!(f.str("code"), code, "{}", f.text);
    if let Some(id) = id {
        assert_eq!(f.str("id"), id, "the error carries the frame's id: {}", f.text);
    }
    assert!(!f.str("message").is_empty(), "every error has a message: {}", f.text);
}

#[test]
fn welcome_frames_describe_both_sides() {
    let d = Daemon::with_config("[limits]\nheartbeat_secs = 9\n");
    let a1 = d.hmac_agent("u1", "one");
    let a2 = d.hmac_agent("u1", "two");
    let a3 = d.hmac_agent("u1", "revoked");
    d.revoke(a3.agent_id());
    d.hmac_agent("u2", "someone else's");
    let _ag2 = d.agent(&a2);
    let mut c1 = d.client(&d.token("u1", &[], "1h"), None);
    let mut c2 = d.client(&d.token("u1", &[], "1h"), Some(a2.agent_id()));
    let mut c3 = d.client(&d.token("u1", &[a1.agent_id()], "1h"), None);

    let w = &c1.welcome.value;
    assert_eq!(w["type"], json!("welcome"));
    assert_eq!(w["user"], json!("u1"));
    assert_eq!(w["heartbeat_secs"], json!(9));
    assert_relay_id(&c1.session);
    let mut agents = w["agents"].as_array().expect("agents array").clone();
    agents.sort_by_key(|a| a["name"].as_str().unwrap_or("").to_string());
    assert_eq!(
        agents,
        vec![
            json!({"id": a1.agent_id(), "name": "one", "online": false}),
            json!({"id": a2.agent_id(), "name": "two", "online": true}),
        ],
        "every reachable agent, online or not; never revoked ones or another user's"
    );
    assert_eq!(c2.welcome.value["agents"], json!([{"id": a2.agent_id(), "name": "two", "online": true}]));
    assert_eq!(c3.welcome.value["agents"], json!([{"id": a1.agent_id(), "name": "one", "online": false}]));
    let ids: BTreeSet<&str> = [&c1, &c2, &c3].iter().map(|c| c.session.as_str()).collect();
    assert_eq!(ids.len(), 3, "session ids are distinct");

    let ag1 = d.agent(&a1);
    let w = &ag1.welcome.value;
    assert_eq!(w["type"], json!("welcome"));
    assert_eq!(w["agent"], json!(a1.agent_id()));
    assert_eq!(w["user"], json!("u1"));
    assert_eq!(w["heartbeat_secs"], json!(9));
    assert_relay_id(&ag1.conn);
    let sessions: BTreeSet<String> =
        w["sessions"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
    let want: BTreeSet<String> = [c1.session.clone(), c3.session.clone()].into();
    assert_eq!(sessions, want, "the sessions that can reach a1 (not the one bound to a2)");
    for c in [&mut c1, &mut c3] {
        let f = expect_type(c, "presence");
        assert_eq!(f.value, json!({"type": "presence", "agent": a1.agent_id(), "online": true}));
    }
    assert_pong(&mut c2);
}

#[test]
fn agent_messages_reach_the_addressed_session_or_every_reachable_one() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let b = d.hmac_agent("u1", "b");
    let mut ag = d.agent(&a);
    let _bg = d.agent(&b);
    let t = d.token("u1", &[], "1h");
    let mut c1 = d.client(&t, None);
    let mut c2 = d.client(&t, None);
    let mut bound_b = d.client(&t, Some(b.agent_id()));
    let mut other_user = d.client(&d.token("u2", &[], "1h"), None);
    for s in [&c1.session, &c2.session] {
        assert_eq!(&expect_type(&mut ag, "session").str("session"), s);
    }

    ag.send(Some(&c1.session), &json!({"to": "c1"}), Some("m1")).unwrap();
    expect_ack(&mut ag, "m1");
    expect_msg(&mut c1, a.agent_id(), &json!({"to": "c1"}));

    ag.send(None, &json!(["all"]), Some("m2")).unwrap();
    expect_ack(&mut ag, "m2");
    expect_msg(&mut c1, a.agent_id(), &json!(["all"]));
    expect_msg(&mut c2, a.agent_id(), &json!(["all"]));
    // c2 got nothing addressed to c1; the session bound to b and the other user got nothing.
    assert_pong(&mut c2);
    assert_pong(&mut bound_b);
    assert_pong(&mut other_user);

    // Without an id there is no ack, and the message still arrives.
    ag.send(Some(&c2.session), &json!(null), None).unwrap();
    expect_msg(&mut c2, a.agent_id(), &json!(null));
    assert_pong(&mut ag);
}

#[test]
fn client_messages_reach_the_named_or_bound_agent() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let b = d.hmac_agent("u1", "b");
    let mut ag = d.agent(&a);
    let mut bg = d.agent(&b);
    let t = d.token("u1", &[], "1h");
    let mut c = d.client(&t, None);
    let mut bound = d.client(&t, Some(a.agent_id()));
    expect_type(&mut ag, "session");
    expect_type(&mut ag, "session");
    expect_type(&mut bg, "session");

    c.send(Some(a.agent_id()), &json!({"q": 1}), Some("c1")).unwrap();
    expect_ack(&mut c, "c1");
    expect_msg(&mut ag, &c.session, &json!({"q": 1}));
    c.send(Some(b.agent_id()), &json!({"q": 2}), None).unwrap();
    expect_msg(&mut bg, &c.session, &json!({"q": 2}));

    // A bound session may leave out "to"; an unbound one may not.
    bound.send(None, &json!("implicit"), Some("b1")).unwrap();
    expect_ack(&mut bound, "b1");
    expect_msg(&mut ag, &bound.session, &json!("implicit"));
    c.send(None, &json!("nowhere"), Some("u1")).unwrap();
    expect_err(&mut c, "bad_frame", Some("u1"));
    // A session bound to an agent gets that agent's broadcasts.
    ag.send(None, &json!("to all of a's"), None).unwrap();
    expect_msg(&mut c, a.agent_id(), &json!("to all of a's"));
    expect_msg(&mut bound, a.agent_id(), &json!("to all of a's"));
    assert_pong(&mut ag);
    assert_pong(&mut bg);
}

#[test]
fn data_bytes_are_forwarded_exactly_both_ways() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let mut ag = d.agent(&a);
    let mut c = d.client(&d.token("u1", &[], "1h"), None);
    expect_type(&mut ag, "session");
    let odd =
        "{ \"big\" : 123456789012345678901234567890, \"f\":1.0e+2 ,\"s\":\"\\ud83d\\ude00\\/\",\n\"n\":[ ] }";
    c.send_raw_data(Some(a.agent_id()), odd, Some("x")).unwrap();
    expect_ack(&mut c, "x");
    let f = expect_type(&mut ag, "message");
    assert_eq!(f.raw_data().as_deref(), Some(odd), "client->agent data re-serialized: {}", f.text);
    ag.send_raw_data(Some(&c.session), odd, None).unwrap();
    let f = expect_type(&mut c, "message");
    assert_eq!(f.raw_data().as_deref(), Some(odd), "agent->client data re-serialized: {}", f.text);
    for scalar in ["0", "-1.5", "true", "\"str\"", "null"] {
        c.send_raw_data(Some(a.agent_id()), scalar, None).unwrap();
        let f = expect_type(&mut ag, "message");
        assert_eq!(f.raw_data().as_deref(), Some(scalar));
    }
}

#[test]
fn undeliverable_sends_get_offline_or_not_allowed_per_section_5() {
    let d = Daemon::start_default();
    let a1 = d.hmac_agent("u1", "one");
    let a2 = d.hmac_agent("u1", "two"); // never connects
    let a3 = d.hmac_agent("u1", "revoked");
    let b1 = d.hmac_agent("u2", "theirs");
    d.revoke(a3.agent_id());
    let mut ag1 = d.agent(&a1);
    let mut bg1 = d.agent(&b1);
    let open = d.token("u1", &[], "1h");
    let mut c = d.client(&open, None);
    let mut bound_a2 = d.client(&open, Some(a2.agent_id()));
    let mut only_a1 = d.client(&d.token("u1", &[a1.agent_id()], "1h"), None);
    let closed = d.client(&open, None).session.clone();
    let mut theirs = d.client(&d.token("u2", &[], "1h"), None);
    // a1 sees c and only_a1 open, and the short-lived session open and close.
    let mut opened = 0;
    let mut closed_seen = false;
    while opened < 3 || !closed_seen {
        let f = expect_type(&mut ag1, "session");
        if f.value["open"] == json!(true) {
            opened += 1;
        } else {
            assert_eq!(f.str("session"), closed);
            closed_seen = true;
        }
    }
    expect_type(&mut bg1, "session");

    // Client sends (§5, third rule).
    // The user's own agent, offline: queued in its mailbox (§8), acked `queued:true`.
    c.send(Some(a2.agent_id()), &json!(1), Some("own-offline")).unwrap();
    let f = next_skipping(&mut c, &["presence"], WAIT);
    assert_eq!(f.value, json!({"type":"ack","id":"own-offline","queued":true}));
    for (target, id) in
        [(b1.agent_id(), "other-user"), ("no_such_agent_123", "absent"), (a3.agent_id(), "revoked")]
    {
        c.send(Some(target), &json!(1), Some(id)).unwrap();
        expect_err(&mut c, "not_allowed", Some(id));
    }
    only_a1.send(Some(a2.agent_id()), &json!(1), Some("allowlist")).unwrap();
    expect_err(&mut only_a1, "not_allowed", Some("allowlist"));
    bound_a2.send(Some(a1.agent_id()), &json!(1), Some("bound-elsewhere")).unwrap();
    expect_err(&mut bound_a2, "not_allowed", Some("bound-elsewhere"));

    // Agent sends (§5, first rule).
    ag1.send(Some(&bound_a2.session), &json!(1), Some("same-user-unreachable")).unwrap();
    expect_err(&mut ag1, "not_allowed", Some("same-user-unreachable"));
    // A closed session of this user stays resumable (§8): kept, acked `queued:true`.
    ag1.send(Some(&closed), &json!(1), Some("closed")).unwrap();
    let f = next_skipping(&mut ag1, &["session"], WAIT);
    assert_eq!(f.value, json!({"type":"ack","id":"closed","queued":true}));
    for (to, id) in [("never-existed", "never"), (theirs.session.as_str(), "their-session")] {
        ag1.send(Some(to), &json!(1), Some(id)).unwrap();
        expect_err(&mut ag1, "offline", Some(id));
    }
    // Nothing leaked anywhere.
    for conn in [&mut c, &mut bound_a2, &mut only_a1, &mut theirs] {
        assert_pong(conn);
    }
    assert_pong(&mut bg1);
    assert_pong(&mut ag1);
}

#[test]
fn a_broadcast_that_reaches_no_session_is_acked() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "alone");
    let mut ag = d.agent(&a);
    ag.send(None, &json!("anyone?"), Some("b")).unwrap();
    expect_ack(&mut ag, "b");
}

#[test]
fn malformed_frames_are_bad_frame_and_nothing_is_forwarded() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let mut ag = d.agent(&a);
    let mut c = d.client(&d.token("u1", &[], "1h"), None);
    expect_type(&mut ag, "session");
    let to = a.agent_id();
    let cases: Vec<(String, Option<&str>)> = vec![
        ("hello".into(), None),
        ("[1,2]".into(), None),
        ("42".into(), None),
        ("{\"type\":\"send\"".into(), None),
        (r#"{"type":"dance","id":"unk"}"#.into(), Some("unk")),
        (r#"{"data":1,"to":"x"}"#.into(), None),
        (r#"{"type":5}"#.into(), None),
        (format!(r#"{{"type":"send","to":"{to}","id":"nodata"}}"#), Some("nodata")),
        (r#"{"type":"send","to":5,"data":1,"id":"to-num"}"#.into(), Some("to-num")),
        (format!(r#"{{"type":"send","to":"{to}","data":1,"id":5}}"#), None),
        (format!(r#"{{"type":"send","to":"{to}","data":1,"data":2,"id":"dup-data"}}"#), None),
        (format!(r#"{{"type":"send","type":"send","to":"{to}","data":1}}"#), None),
        (format!(r#"{{"type":"send","to":"{to}","to":"{to}","data":1}}"#), None),
        (r#"{"type":"refresh","token":7}"#.into(), None),
    ];
    for (text, id) in &cases {
        c.send_raw_text(text).unwrap();
        let f = expect_type(&mut c, "error");
        assert_eq!(f.str("code"), "bad_frame", "for {text}: {}", f.text);
        if let Some(id) = id {
            assert_eq!(f.str("id"), *id, "for {text}: {}", f.text);
        }
        assert!(!f.str("message").is_empty());
    }
    // Unknown fields are ignored.
    c.send_raw_text(&format!(r#"{{"type":"send","to":"{to}","data":"ok","id":"extra","future":{{"x":1}}}}"#))
        .unwrap();
    expect_ack(&mut c, "extra");
    // The agent got only the good message.
    expect_msg(&mut ag, &c.session, &json!("ok"));

    for text in
        ["nope", r#"{"type":"dance"}"#, r#"{"type":"ping","type":"ping"}"#, r#"{"type":"send","to":"x"}"#]
    {
        ag.send_raw_text(text).unwrap();
        let f = expect_type(&mut ag, "error");
        assert_eq!(f.str("code"), "bad_frame", "agent frame {text}: {}", f.text);
    }
    assert_pong(&mut c);
    assert_pong(&mut ag);
}

#[test]
fn binary_frames_close_with_1003() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let mut ag = d.agent(&a);
    ag.ws.send_binary(b"\x00\x01").unwrap();
    assert_eq!(expect_close(&mut ag, WAIT).0, 1003);
    let mut c = d.client(&d.token("u1", &[], "1h"), None);
    c.ws.send_binary(br#"{"type":"ping"}"#).unwrap();
    assert_eq!(expect_close(&mut c, WAIT).0, 1003);
}

#[test]
fn protocol_pings_are_answered_on_both_sides() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let mut ag = d.agent(&a);
    let mut c = ClientConn::connect_with(
        d.addr,
        Some((TokenPlace::Query, &d.token("u1", &[], "1h"))),
        &ClientOpts::default(),
    )
    .unwrap();
    expect_type(&mut ag, "session");
    for _ in 0..3 {
        assert_pong(&mut ag);
        assert_pong(&mut c);
    }
}

#[test]
fn a_fragmented_message_is_reassembled() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let mut ag = d.agent(&a);
    let mut c = d.client(&d.token("u1", &[], "1h"), None);
    expect_type(&mut ag, "session");
    let frame = format!(
        r#"{{"type":"send","to":"{}","data":{{"parts":"in five frames"}},"id":"frag"}}"#,
        a.agent_id()
    );
    c.ws.send_fragmented_text(&frame, 5).unwrap();
    expect_ack(&mut c, "frag");
    expect_msg(&mut ag, &c.session, &json!({"parts": "in five frames"}));
}

#[test]
fn a_close_from_the_peer_is_answered_with_a_close() {
    // RFC 6455 §5.5.1: the relay echoes the close; the spec's 1000 is "normal".
    let d = Daemon::start_default();
    let mut c = d.client(&d.token("u1", &[], "1h"), None);
    c.ws.close();
    match c.recv(WAIT) {
        switchboard::client::Event::Close { code, .. } => assert_eq!(code, 1000),
        other => panic!("expected the relay's close answer, got {other:?}"),
    }
}

#[test]
fn frames_sent_right_behind_the_upgrade_request_are_not_lost() {
    use std::io::{Read, Write};
    let d = Daemon::start_default();
    let t = d.token("u1", &[], "1h");
    // A masked text frame {"type":"ping"} in the same write as the request head.
    let payload = br#"{"type":"ping"}"#;
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let mut bytes = upgrade_head("/v1/client", &[&format!("Authorization: Bearer {t}")]).into_bytes();
    bytes.extend_from_slice(&[0x81, 0x80 | payload.len() as u8]);
    bytes.extend_from_slice(&mask);
    bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    let mut s = std::net::TcpStream::connect(d.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(&bytes).unwrap();
    let mut got = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).expect("the relay answers");
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
        if let Some(p) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    assert!(got.starts_with(b"HTTP/1.1 101"), "{:?}", String::from_utf8_lossy(&got));
    let mut ws = tungstenite::protocol::WebSocket::from_partially_read(
        s,
        got[head_end..].to_vec(),
        tungstenite::protocol::Role::Client,
        None,
    );
    let mut types = Vec::new();
    while types.len() < 2 {
        match ws.read().expect("frames") {
            tungstenite::Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                types.push(v["type"].as_str().unwrap_or("").to_string());
            }
            tungstenite::Message::Close(c) => panic!("closed: {c:?} after {types:?}"),
            _ => {}
        }
    }
    assert_eq!(types, ["welcome", "pong"]);
}
