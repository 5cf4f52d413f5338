//! Agents get in only with a fresh, correctly signed upgrade (§3.1), and with message
//! signatures required every `send` must carry a correct signature over a strictly increasing
//! counter; anything else is answered `bad_signature` and never forwarded (§3.2).

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use switchboard::client::{
    b64url_padded, message_signed_string, unix_now, upgrade_signed_string, AgentConn, AgentCredential,
    ClientConn, CraftedSend, Frame, Sig, UpgradeOverrides,
};

#[track_caller]
fn refused_401(d: &Daemon, cred: &AgentCredential, o: UpgradeOverrides, what: &str) {
    match AgentConn::connect_with(d.addr, cred, &o) {
        Ok(_) => panic!("{what}: the upgrade succeeded"),
        Err(e) => {
            assert_eq!(e.status(), Some(401), "{what}: {e}");
            assert_eq!(e.body_json(), Some(json!({"error": "unauthorized"})), "{what}: {e}");
        }
    }
}

#[test]
fn hmac_and_ed25519_agents_connect_and_are_welcomed() {
    let d = Daemon::with_config("[limits]\nheartbeat_secs = 7\n");
    let hmac = d.hmac_agent("u1", "laptop");
    let ed = d.ed25519_agent("u1", "gateway");
    for cred in [&hmac, &ed] {
        let a = d.agent(cred);
        let w = &a.welcome.value;
        assert_relay_id(&a.conn);
        assert_eq!(w["agent"], json!(cred.agent_id()), "{}", a.welcome.text);
        assert_eq!(w["user"], json!("u1"));
        assert_eq!(w["sessions"], json!([]), "no sessions yet: {}", a.welcome.text);
        assert_eq!(w["heartbeat_secs"], json!(7));
        assert_relay_id(cred.agent_id());
    }
    // Two connections get distinct conn ids.
    let a1 = d.agent(&hmac);
    let a2 = d.agent(&ed);
    assert_ne!(a1.conn, a2.conn);
}

#[test]
fn padded_signature_and_timestamp_within_skew_are_accepted() {
    let d = Daemon::with_config("[auth]\nmax_skew_secs = 60\n");
    let cred = d.hmac_agent("u1", "a");
    let ts = (unix_now() - 30).to_string();
    let nonce = "padded-nonce-0123456789".to_string();
    let sig = b64url_padded(&cred.sign_bytes(upgrade_signed_string(cred.agent_id(), &ts, &nonce).as_bytes()));
    assert!(sig.ends_with('='));
    let o = UpgradeOverrides {
        timestamp: Some(ts),
        nonce: Some(nonce),
        signature: Some(sig),
        ..Default::default()
    };
    AgentConn::connect_with(d.addr, &cred, &o).expect("padded base64url is accepted (§2)");
    let o = UpgradeOverrides { timestamp: Some((unix_now() + 30).to_string()), ..Default::default() };
    AgentConn::connect_with(d.addr, &cred, &o).expect("30 s ahead is within a 60 s skew");
    // Nonces of exactly 16 and 64 characters are valid.
    for n in ["a".repeat(16), "Z_-9".repeat(16)] {
        let o = UpgradeOverrides { nonce: Some(n.clone()), ..Default::default() };
        AgentConn::connect_with(d.addr, &cred, &o)
            .unwrap_or_else(|e| panic!("nonce of {} chars: {e}", n.len()));
    }
}

#[test]
fn bad_upgrades_are_401() {
    let d = Daemon::with_config("[auth]\nmax_skew_secs = 60\n");
    let cred = d.hmac_agent("u1", "a");
    let ed = d.ed25519_agent("u1", "e");
    let now = unix_now();
    let other_key = AgentCredential::Hmac { agent_id: cred.agent_id().into(), secret: "sbk_wrong".into() };
    let wrong_sig =
        other_key.sign(&upgrade_signed_string(cred.agent_id(), &now.to_string(), "nonce-nonce-nonce-1"));
    let o = |f: &dyn Fn(&mut UpgradeOverrides)| {
        let mut o = UpgradeOverrides::default();
        f(&mut o);
        o
    };
    refused_401(
        &d,
        &cred,
        o(&|o| {
            o.timestamp = Some(now.to_string());
            o.nonce = Some("nonce-nonce-nonce-1".into());
            o.signature = Some(wrong_sig.clone());
        }),
        "signature by another key",
    );
    refused_401(&d, &cred, o(&|o| o.signature = Some("!!!not-base64!!!".into())), "garbage signature");
    refused_401(&d, &cred, o(&|o| o.signature = Some(String::new())), "empty signature");
    // A signature over another nonce than the one sent.
    let sig_other_nonce =
        cred.sign(&upgrade_signed_string(cred.agent_id(), &now.to_string(), "aaaaaaaaaaaaaaaaaaaa"));
    refused_401(
        &d,
        &cred,
        o(&|o| {
            o.timestamp = Some(now.to_string());
            o.nonce = Some("bbbbbbbbbbbbbbbbbbbb".into());
            o.signature = Some(sig_other_nonce.clone());
        }),
        "signature over another nonce",
    );
    for ts in [now - 120, now + 120] {
        refused_401(
            &d,
            &cred,
            o(&|o| o.timestamp = Some(ts.to_string())),
            &format!("timestamp {ts} (now {now})"),
        );
    }
    for ts in ["", "abc", "-5", "1.7e9", " 17", "0x10", &format!("{now}.0"), "99999999999999999999999"] {
        refused_401(
            &d,
            &cred,
            o(&|o| o.timestamp = Some(ts.to_string())),
            &format!("malformed timestamp {ts:?}"),
        );
    }
    for n in [
        "short",
        &"a".repeat(15),
        &"a".repeat(65),
        "bad!chars-0123456789",
        "has space 0123456789",
        "ünïcödé-0123456789",
    ] {
        refused_401(&d, &cred, o(&|o| o.nonce = Some(n.to_string())), &format!("malformed nonce {n:?}"));
    }
    for h in
        ["X-Switchboard-Agent", "X-Switchboard-Timestamp", "X-Switchboard-Nonce", "X-Switchboard-Signature"]
    {
        refused_401(&d, &cred, o(&|o| o.omit_headers = vec![h.to_string()]), &format!("missing {h}"));
    }
    let unknown =
        AgentCredential::Hmac { agent_id: "no_such_agent_0123".into(), secret: "sbk_whatever".into() };
    refused_401(&d, &unknown, UpgradeOverrides::default(), "unknown agent");
    // An Ed25519 agent signing with another key, and an HMAC agent's id with an Ed25519 key.
    let wrong_ed = AgentCredential::Ed25519 {
        agent_id: ed.agent_id().into(),
        keypair: switchboard::client::generate_ed25519(),
    };
    refused_401(&d, &wrong_ed, UpgradeOverrides::default(), "ed25519 agent, other key");
    let (_, ed_secretless) = match &ed {
        AgentCredential::Ed25519 { agent_id, keypair } => (agent_id.clone(), keypair.clone()),
        _ => unreachable!(),
    };
    let hmac_with_ed_key =
        AgentCredential::Ed25519 { agent_id: cred.agent_id().into(), keypair: ed_secretless };
    refused_401(&d, &hmac_with_ed_key, UpgradeOverrides::default(), "hmac agent signed with ed25519");
    // The correct credentials still work afterwards.
    d.agent(&cred);
    d.agent(&ed);
}

#[test]
fn reused_nonce_is_refused() {
    let d = Daemon::start_default();
    let cred = d.hmac_agent("u1", "a");
    let first = d.agent(&cred);
    let nonce = first.nonce.clone();
    // While the first connection is open, and after it closed, with a fresh timestamp.
    refused_401(
        &d,
        &cred,
        UpgradeOverrides { nonce: Some(nonce.clone()), ..Default::default() },
        "reused nonce",
    );
    drop(first);
    std::thread::sleep(Duration::from_millis(1100));
    refused_401(
        &d,
        &cred,
        UpgradeOverrides { nonce: Some(nonce.clone()), ..Default::default() },
        "reused nonce later",
    );
    // The nonce is remembered per agent: another agent may use the same string.
    let other = d.hmac_agent("u1", "b");
    AgentConn::connect_with(d.addr, &other, &UpgradeOverrides { nonce: Some(nonce), ..Default::default() })
        .expect("nonces are per agent");
}

#[test]
fn revoked_and_expired_agents_are_refused() {
    let d = Daemon::start_default();
    let cred = d.hmac_agent("u1", "a");
    let out = d.cli(&[
        "agent".into(),
        "create".into(),
        format!("--data-dir={}", d.data_dir.display()),
        "--user=u1".into(),
        "--name=short-lived".into(),
        "--expires-in=1s".into(),
        "--json".into(),
    ]);
    let v: Value = out.lines().find_map(|l| serde_json::from_str(l).ok()).expect("json");
    let short = AgentCredential::Hmac {
        agent_id: v["agent_id"].as_str().unwrap().into(),
        secret: v["secret"].as_str().unwrap().into(),
    };
    let created = Instant::now();
    d.agent(&cred);
    d.revoke(cred.agent_id());
    refused_401(&d, &cred, UpgradeOverrides::default(), "revoked agent");
    std::thread::sleep(Duration::from_millis(2100).saturating_sub(created.elapsed()));
    refused_401(&d, &short, UpgradeOverrides::default(), "expired agent");
}

/// An agent and a client of one user, the agent having seen the session open.
fn pair(d: &Daemon, cred: &AgentCredential) -> (AgentConn, ClientConn) {
    let mut a = d.agent(cred);
    let t = d.token("u1", &[], "1h");
    let c = d.client(&t, None);
    let f = expect_type(&mut a, "session");
    assert_eq!(f.str("session"), c.session);
    (a, c)
}

#[track_caller]
fn expect_error(a: &mut AgentConn, codes: &[&str], id: &str) -> Frame {
    let f = expect_type(a, "error");
    assert!(codes.contains(&f.str("code")), "expected {codes:?}, got {}", f.text);
    assert_eq!(f.str("id"), id, "error carries the frame's id: {}", f.text);
    assert!(!f.str("message").is_empty(), "every error has a message: {}", f.text);
    f
}

#[track_caller]
fn expect_message(c: &mut ClientConn, from: &str, data: &Value) {
    let f = expect_type(c, "message");
    assert_eq!(f.str("from"), from, "{}", f.text);
    assert_eq!(&f.value["data"], data, "{}", f.text);
}

#[test]
fn message_signatures_are_checked_and_bad_frames_change_nothing() {
    let d = Daemon::start_default();
    let cred = d.hmac_agent("u1", "a");
    let (mut a, mut c) = pair(&d, &cred);
    let s = c.session.clone();
    let to = Some(s.as_str());
    let send = |a: &mut AgentConn, ctr: Option<u64>, sig: Sig, id: &str| {
        a.send_crafted(&CraftedSend { to, data: r#"{"n":0}"#, id: Some(id), ctr, sig }).unwrap();
    };
    send(&mut a, Some(1), Sig::Omit, "no-sig");
    expect_error(&mut a, &["bad_signature"], "no-sig");
    send(&mut a, None, Sig::Omit, "no-ctr-no-sig");
    expect_error(&mut a, &["bad_signature"], "no-ctr-no-sig");
    send(&mut a, Some(1), Sig::Wrong, "wrong-key");
    expect_error(&mut a, &["bad_signature"], "wrong-key");
    send(&mut a, Some(1), Sig::Literal("AAAA".into()), "junk-sig");
    expect_error(&mut a, &["bad_signature"], "junk-sig");
    // Signed over other data, another `to`, another conn or another ctr.
    let over_other_data = a.signature(1, to, r#"{"n":1}"#);
    send(&mut a, Some(1), Sig::Literal(over_other_data), "other-data");
    expect_error(&mut a, &["bad_signature"], "other-data");
    let over_broadcast = a.signature(1, None, r#"{"n":0}"#);
    send(&mut a, Some(1), Sig::Literal(over_broadcast), "other-to");
    expect_error(&mut a, &["bad_signature"], "other-to");
    let other_conn = a.cred.sign(&message_signed_string("another-conn", 1, to, r#"{"n":0}"#));
    send(&mut a, Some(1), Sig::Literal(other_conn), "other-conn");
    expect_error(&mut a, &["bad_signature"], "other-conn");
    let over_ctr_2 = a.signature(2, to, r#"{"n":0}"#);
    send(&mut a, Some(1), Sig::Literal(over_ctr_2), "other-ctr");
    expect_error(&mut a, &["bad_signature"], "other-ctr");

    // None of those advanced the counter: ctr 1 is still good.
    a.send_crafted(&CraftedSend {
        to,
        data: r#"{"n":1}"#,
        id: Some("good-1"),
        ctr: Some(1),
        sig: Sig::Correct,
    })
    .unwrap();
    let ack = expect_type(&mut a, "ack");
    assert_eq!(ack.str("id"), "good-1");
    expect_message(&mut c, cred.agent_id(), &json!({"n": 1}));

    // Replayed and stale counters.
    a.send_crafted(&CraftedSend {
        to,
        data: r#"{"n":1}"#,
        id: Some("replay"),
        ctr: Some(1),
        sig: Sig::Correct,
    })
    .unwrap();
    expect_error(&mut a, &["bad_signature"], "replay");
    a.send_crafted(&CraftedSend {
        to,
        data: r#"{"n":10}"#,
        id: Some("jump"),
        ctr: Some(10),
        sig: Sig::Correct,
    })
    .unwrap();
    assert_eq!(expect_type(&mut a, "ack").str("id"), "jump", "counters need not be contiguous");
    for (ctr, id) in [(5, "stale-5"), (10, "stale-10")] {
        a.send_crafted(&CraftedSend {
            to,
            data: r#"{"n":5}"#,
            id: Some(id),
            ctr: Some(ctr),
            sig: Sig::Correct,
        })
        .unwrap();
        expect_error(&mut a, &["bad_signature"], id);
    }
    // Out-of-range or non-decimal counters are refused (bad_signature or bad_frame: the spec
    // only says such a frame is not a valid signed send) and never forwarded.
    for (ctr_text, id) in [
        ("0", "zero"),
        ("9007199254740992", "2pow53"),
        ("-11", "negative"),
        ("11.0", "fraction"),
        ("1.1e1", "exponent"),
        ("\"11\"", "string"),
    ] {
        let ctr_in_sig = ctr_text.trim_matches('"');
        let sig = a.cred.sign(&format!("switchboard-msg-v1\n{}\n{ctr_in_sig}\n{s}\n1", a.conn));
        let frame =
            format!(r#"{{"type":"send","to":"{s}","data":1,"id":"{id}","ctr":{ctr_text},"sig":"{sig}"}}"#);
        a.send_raw_text(&frame).unwrap();
        expect_error(&mut a, &["bad_signature", "bad_frame"], id);
    }
    // A broadcast signs an empty `to`.
    a.set_last_ctr(10);
    a.send(None, &json!({"n": 11}), Some("bcast")).unwrap();
    assert_eq!(expect_type(&mut a, "ack").str("id"), "bcast");
    // The client got exactly the two good frames, nothing from the bad ones.
    expect_message(&mut c, cred.agent_id(), &json!({"n": 10}));
    expect_message(&mut c, cred.agent_id(), &json!({"n": 11}));
    assert_pong(&mut c);
}

#[test]
fn a_correctly_signed_undeliverable_frame_uses_up_its_counter() {
    let d = Daemon::start_default();
    let cred = d.hmac_agent("u1", "a");
    let (mut a, mut c) = pair(&d, &cred);
    let s = c.session.clone();
    a.send_crafted(&CraftedSend {
        to: Some("no-such-session"),
        data: "1",
        id: Some("lost"),
        ctr: Some(3),
        sig: Sig::Correct,
    })
    .unwrap();
    expect_error(&mut a, &["offline"], "lost");
    a.send_crafted(&CraftedSend {
        to: Some(&s),
        data: "2",
        id: Some("again"),
        ctr: Some(3),
        sig: Sig::Correct,
    })
    .unwrap();
    expect_error(&mut a, &["bad_signature"], "again");
    a.send_crafted(&CraftedSend {
        to: Some(&s),
        data: "3",
        id: Some("next"),
        ctr: Some(4),
        sig: Sig::Correct,
    })
    .unwrap();
    assert_eq!(expect_type(&mut a, "ack").str("id"), "next");
    expect_message(&mut c, cred.agent_id(), &json!(3));
}

#[test]
fn signatures_cover_the_exact_data_bytes() {
    let d = Daemon::start_default();
    let cred = d.hmac_agent("u1", "a");
    let (mut a, mut c) = pair(&d, &cred);
    let s = c.session.clone();
    let data = "{ \"k\" : [1,  2.50, \"\\u00e9\"] ,\"z\":null }";
    a.send_raw_data(Some(&s), data, Some("spaced")).unwrap();
    assert_eq!(expect_type(&mut a, "ack").str("id"), "spaced");
    let f = expect_type(&mut c, "message");
    assert_eq!(f.raw_data().as_deref(), Some(data), "data is forwarded byte for byte: {}", f.text);
    // The same value re-serialized is a different byte string: its signature does not fit.
    let compact = r#"{"k":[1,2.50,"\u00e9"],"z":null}"#;
    let sig = a.signature(a.last_ctr() + 1, Some(&s), data);
    a.send_crafted(&CraftedSend {
        to: Some(&s),
        data: compact,
        id: Some("reserialized"),
        ctr: Some(a.last_ctr() + 1),
        sig: Sig::Literal(sig),
    })
    .unwrap();
    expect_error(&mut a, &["bad_signature"], "reserialized");
}

#[test]
fn ed25519_agents_sign_their_messages() {
    let d = Daemon::start_default();
    let cred = d.ed25519_agent("u1", "e");
    let (mut a, mut c) = pair(&d, &cred);
    let s = c.session.clone();
    a.send(Some(&s), &json!({"ed": true}), Some("ok")).unwrap();
    assert_eq!(expect_type(&mut a, "ack").str("id"), "ok");
    expect_message(&mut c, cred.agent_id(), &json!({"ed": true}));
    let next = a.last_ctr() + 1;
    a.send_crafted(&CraftedSend {
        to: Some(&s),
        data: "1",
        id: Some("hmac-sig"),
        ctr: Some(next),
        sig: Sig::Wrong,
    })
    .unwrap();
    expect_error(&mut a, &["bad_signature"], "hmac-sig");
    a.send(None, &json!("b"), Some("bcast")).unwrap();
    assert_eq!(expect_type(&mut a, "ack").str("id"), "bcast");
    expect_message(&mut c, cred.agent_id(), &json!("b"));
}

#[test]
fn signatures_off_lets_unsigned_sends_through() {
    let d = Daemon::with_config("[auth]\nagent_message_signatures = \"off\"\n");
    let cred = d.hmac_agent("u1", "a");
    let (mut a, mut c) = pair(&d, &cred);
    let s = c.session.clone();
    a.send_raw_text(&format!(r#"{{"type":"send","to":"{s}","data":{{"u":1}},"id":"plain"}}"#)).unwrap();
    assert_eq!(expect_type(&mut a, "ack").str("id"), "plain");
    expect_message(&mut c, cred.agent_id(), &json!({"u": 1}));
}
