//! Every limit of §6 is enforced with the answer or close code of §2/§7: 1009 for a frame
//! over `max_frame_bytes`, 4008 for a peer that lets its outbound budget overflow (with the
//! daemon's memory bounded), 4000 when idle, 1011 when pongs stop, 429 at the per-user and
//! per-IP caps, `rate_limited` then 4029 for message-rate abuse, 503 at the global cap.
//! (Binary frames closing with 1003 are covered in routing_round_trip.rs.)

mod common;

use common::*;
use serde_json::json;
use std::time::{Duration, Instant};
use switchboard::client::{AgentConn, ClientConn, Event, TokenPlace};

#[test]
fn a_frame_over_max_frame_bytes_closes_with_1009() {
    let d = Daemon::with_config("[limits]\nmax_frame_bytes = 1024\n");
    let a = d.hmac_agent("u1", "a");
    let mut ag = d.agent(&a);
    let mut c = d.client(&d.token("u1", &[], "1h"), None);
    expect_type(&mut ag, "session");
    // Just under the limit is fine.
    let fits = "x".repeat(900);
    c.send(Some(a.agent_id()), &json!(fits), Some("fits")).unwrap();
    assert_eq!(expect_type(&mut c, "ack").str("id"), "fits");
    assert_eq!(expect_type(&mut ag, "message").value["data"], json!(fits));
    let big = "x".repeat(2000);
    c.send(Some(a.agent_id()), &json!(big), Some("big")).unwrap();
    assert_eq!(expect_close(&mut c, WAIT).0, 1009);
    ag.send(None, &json!(big), None).unwrap();
    assert_eq!(expect_close(&mut ag, WAIT).0, 1009);
    // Fragments each under the limit that add up to more are one message over it.
    let mut c2 = d.client(&d.token("u1", &[], "1h"), None);
    let frame = format!(r#"{{"type":"send","to":"{}","data":"{big}"}}"#, a.agent_id());
    c2.ws.send_fragmented_text(&frame, 4).unwrap();
    assert_eq!(expect_close(&mut c2, WAIT).0, 1009);
}

#[test]
fn a_slow_consumer_is_closed_with_4008_and_memory_stays_bounded() {
    let d = Daemon::with_config(
        "[limits]\nmax_frame_bytes = 32768\nsend_buffer_bytes = 65536\n\
         messages_per_sec_per_user = 100000\nmessages_burst_per_user = 100000\n",
    );
    let a = d.hmac_agent("u1", "flood");
    let mut ag = d.agent(&a);
    let mut c = d.client(&d.token("u1", &[], "1h"), None);
    expect_type(&mut ag, "session");
    let payload = json!("y".repeat(16 * 1024));
    let rss_before = d.rss_kib();
    let mut rss_peak = rss_before;
    let mut closed_seen = false;
    let mut sent = 0usize;
    // Up to ~96 MiB: far more than the kernel's socket buffers hold, so an unbounded queue
    // would show in the RSS. The client never reads meanwhile.
    'flood: for i in 0..6000 {
        ag.send(Some(&c.session), &payload, Some(&format!("f{i}"))).unwrap();
        sent += 1;
        if i % 25 == 0 {
            rss_peak = rss_peak.max(d.rss_kib());
            while let Event::Frame(f) = ag.recv(Duration::from_millis(1)) {
                // The send that overflows closes the session (4008); it is kept in the
                // stream for a resume (spec §8: `ack … queued:true`), or `offline` when the
                // store could not take it. The agent also hears the session close.
                let queued = f.ty() == "ack" && f.value.get("queued").is_some();
                let offline = f.ty() == "error" && f.str("code") == "offline";
                let gone = f.ty() == "session" && f.value["open"] == json!(false);
                if queued || offline || gone {
                    closed_seen = true;
                    break 'flood;
                }
                assert_eq!(f.ty(), "ack", "unexpected frame to the flooding agent: {}", f.text);
            }
        }
    }
    rss_peak = rss_peak.max(d.rss_kib());
    assert!(closed_seen, "sent {sent} x 16 KiB to a reader that never reads and its session is still open");
    let grown_mib = rss_peak.saturating_sub(rss_before) / 1024;
    eprintln!(
        "slow consumer: closed after {sent} x 16 KiB; daemon RSS {rss_before} KiB -> peak {rss_peak} KiB"
    );
    assert!(
        grown_mib < 48,
        "daemon RSS grew by {grown_mib} MiB for one slow consumer (sent {sent} x 16 KiB)"
    );
    // Now read: buffered messages, then the 4008 close.
    let (code, frames) = expect_close(&mut c, Duration::from_secs(20));
    assert_eq!(code, 4008, "after {} frames", frames.len());
    assert!(frames.iter().all(|f| f.ty() == "message"));
    // The flooding agent is still fine (acks of the last sends may still be queued).
    ag.ws.ping().unwrap();
    let f = next_skipping(&mut ag, &["ack", "error", "session"], WAIT);
    assert_eq!(f.ty(), "pong", "{}", f.text);
}

#[test]
fn an_idle_connection_is_closed_with_4000() {
    let d = Daemon::with_config("[limits]\nidle_timeout_secs = 2\nheartbeat_secs = 30\n");
    let a = d.hmac_agent("u1", "a");
    let start = Instant::now();
    let mut ag = d.agent(&a);
    let mut c = d.client(&d.token("u1", &[], "1h"), Some(a.agent_id()));
    let (code, _) = expect_close(&mut c, Duration::from_secs(8));
    assert_eq!(code, 4000);
    assert!(start.elapsed() >= Duration::from_millis(1900), "closed as idle after {:?}", start.elapsed());
    // The agent only received frames (session open/close); it sent nothing, so it is idle too.
    let (code, _) = expect_close(&mut ag, Duration::from_secs(8));
    assert_eq!(code, 4000);
}

#[test]
fn a_connection_that_keeps_sending_is_not_idle() {
    let d = Daemon::with_config("[limits]\nidle_timeout_secs = 2\nheartbeat_secs = 30\n");
    let mut c = d.client(&d.token("u1", &[], "1h"), None);
    let until = Instant::now() + Duration::from_millis(3500);
    while Instant::now() < until {
        assert_pong(&mut c);
        std::thread::sleep(Duration::from_millis(400));
    }
    assert_pong(&mut c);
}

#[test]
fn a_peer_that_never_pongs_is_closed_with_1011() {
    let d = Daemon::with_config("[limits]\nheartbeat_secs = 1\nidle_timeout_secs = 300\n");
    let a = d.hmac_agent("u1", "a");
    let start = Instant::now();
    let mut mute = d.client(&d.token("u1", &[], "1h"), None);
    let mut mute_agent = d.agent(&a);
    match mute.ws.wait_close_without_answering(Duration::from_secs(8)) {
        Event::Close { code, .. } => assert_eq!(code, 1011),
        other => panic!("expected close 1011, got {other:?}"),
    }
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "closed after {:?}, before two intervals",
        start.elapsed()
    );
    match mute_agent.ws.wait_close_without_answering(Duration::from_secs(8)) {
        Event::Close { code, .. } => assert_eq!(code, 1011),
        other => panic!("expected close 1011 for the agent, got {other:?}"),
    }
}

#[test]
fn a_peer_that_answers_pings_survives_heartbeats() {
    let d = Daemon::with_config("[limits]\nheartbeat_secs = 1\nidle_timeout_secs = 300\n");
    let mut c = d.client(&d.token("u1", &[], "1h"), None);
    // recv answers the relay's pings; nothing else should arrive for 3.5 intervals.
    match c.recv(Duration::from_millis(3500)) {
        Event::Timeout => {}
        other => panic!("expected nothing but pings, got {other:?}"),
    }
    assert_pong(&mut c);
}

#[test]
fn the_per_user_connection_cap_is_429() {
    let d = Daemon::with_config("[limits]\nmax_connections_per_user = 3\n");
    let a = d.hmac_agent("u1", "a");
    let b = d.hmac_agent("u1", "b");
    let t = d.token("u1", &[], "1h");
    let _ag = d.agent(&a);
    let c1 = d.client(&t, None);
    let _c2 = d.client(&t, None);
    assert_refused(ClientConn::connect(d.addr, &t, TokenPlace::Header, None), 429, "too_many_requests");
    assert_refused(AgentConn::connect(d.addr, &b), 429, "too_many_requests");
    // Other users are not affected.
    d.client(&d.token("u2", &[], "1h"), None);
    // A closed connection frees its place.
    drop(c1);
    let again =
        eventually(Duration::from_secs(3), || ClientConn::connect(d.addr, &t, TokenPlace::Header, None).ok());
    assert!(again.is_some(), "the cap did not free up after a session closed");
}

#[test]
fn the_per_user_message_rate_drops_with_rate_limited() {
    let d = Daemon::with_config("[limits]\nmessages_per_sec_per_user = 1\nmessages_burst_per_user = 10\n");
    let a = d.hmac_agent("u1", "a");
    let mut ag = d.agent(&a);
    let t = d.token("u1", &[], "1h");
    let mut clients: Vec<ClientConn> = (0..3).map(|_| d.client(&t, None)).collect();
    for _ in 0..3 {
        expect_type(&mut ag, "session");
    }
    let start = Instant::now();
    // Ten broadcasts to three sessions count ten sends, not thirty.
    for i in 0..10 {
        ag.send(None, &json!(i), Some(&format!("b{i}"))).unwrap();
    }
    for i in 0..10 {
        let f = expect_type(&mut ag, "ack");
        assert_eq!(f.str("id"), format!("b{i}"), "{}", f.text);
    }
    for c in clients.iter_mut() {
        for i in 0..10 {
            assert_eq!(expect_type(c, "message").value["data"], json!(i));
        }
    }
    // The next twenty sends, from a client, exceed the burst.
    let c = &mut clients[0];
    for i in 0..20 {
        c.send(Some(a.agent_id()), &json!({"c": i}), Some(&format!("c{i}"))).unwrap();
    }
    let mut acked = Vec::new();
    let mut limited = 0;
    for i in 0..20 {
        let f = next_frame(c, WAIT);
        let id = format!("c{i}");
        match f.ty() {
            "message" => panic!("unexpected message {}", f.text),
            "ack" => acked.push(f.str("id").to_string()),
            "error" => {
                assert_eq!((f.str("code"), f.str("id")), ("rate_limited", id.as_str()), "{}", f.text);
                limited += 1;
            }
            _ => panic!("unexpected {}", f.text),
        }
    }
    let elapsed = start.elapsed().as_secs() as usize;
    assert!(
        acked.len() <= elapsed + 1,
        "{} client sends passed after a spent burst in {elapsed}s",
        acked.len()
    );
    assert!(limited >= 1);
    // The agent received exactly the acked client messages (after the relay's own frames).
    for id in &acked {
        let f = expect_type(&mut ag, "message");
        assert_eq!(format!("c{}", f.value["data"]["c"]), *id, "{}", f.text);
    }
    assert_pong(&mut ag);
}

#[test]
fn bad_signature_frames_do_not_count_toward_the_rate() {
    let d = Daemon::with_config("[limits]\nmessages_per_sec_per_user = 1\nmessages_burst_per_user = 10\n");
    let a = d.hmac_agent("u1", "a");
    let mut ag = d.agent(&a);
    for i in 0..30 {
        ag.send_crafted(&switchboard::client::CraftedSend {
            to: None,
            data: "0",
            id: Some(&format!("bad{i}")),
            ctr: Some(1),
            sig: switchboard::client::Sig::Wrong,
        })
        .unwrap();
    }
    for _ in 0..30 {
        assert_eq!(expect_type(&mut ag, "error").str("code"), "bad_signature");
    }
    for i in 0..10 {
        ag.send(None, &json!(i), Some(&format!("g{i}"))).unwrap();
    }
    for i in 0..10 {
        let f = expect_type(&mut ag, "ack");
        assert_eq!(f.str("id"), format!("g{i}"), "a good send was limited after bad ones: {}", f.text);
    }
}

#[test]
fn sustained_rate_abuse_closes_the_offending_connection_with_4029() {
    let d = Daemon::with_config(
        "[limits]\nmessages_per_sec_per_user = 5\nmessages_burst_per_user = 10\nrate_abuse_close_secs = 2\n",
    );
    let a = d.hmac_agent("u1", "a");
    let mut ag = d.agent(&a);
    let t = d.token("u1", &[], "1h");
    let mut abuser = d.client(&t, Some(a.agent_id()));
    let mut quiet = d.client(&t, Some(a.agent_id()));
    let start = Instant::now();
    let mut limited = 0;
    let code = 'outer: loop {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "still open after 15 s of abuse ({limited} rate_limited)"
        );
        if abuser.send(None, &json!("spam"), None).is_err() {
            // The relay closed; read the close frame.
            break expect_close(&mut abuser, WAIT).0;
        }
        loop {
            match abuser.recv(Duration::from_millis(20)) {
                Event::Frame(f) => {
                    assert_eq!((f.ty(), f.str("code")), ("error", "rate_limited"), "{}", f.text);
                    limited += 1;
                }
                Event::Close { code, .. } => break 'outer code,
                Event::Timeout => break,
                other => panic!("{other:?}"),
            }
        }
    };
    assert_eq!(code, 4029);
    assert!(limited > 0);
    assert!(start.elapsed() >= Duration::from_millis(1900), "closed after {:?}", start.elapsed());
    // Only the offending connection goes.
    assert_pong(&mut quiet);
    ag.ws.ping().unwrap();
    let f = next_skipping(&mut ag, &["message", "session"], WAIT);
    assert_eq!(f.ty(), "pong", "{}", f.text);
}

#[test]
fn the_global_connection_cap_is_503() {
    let d = Daemon::with_config("[server]\nmax_connections = 3\n");
    let a = d.hmac_agent("u1", "a");
    let b = d.hmac_agent("u2", "b");
    let t = d.token("u1", &[], "1h");
    let _ag = d.agent(&a);
    let c1 = d.client(&t, None);
    let _c2 = d.client(&d.token("u2", &[], "1h"), None);
    assert_refused(ClientConn::connect(d.addr, &t, TokenPlace::Header, None), 503, "unavailable");
    assert_refused(AgentConn::connect(d.addr, &b), 503, "unavailable");
    drop(c1);
    let again =
        eventually(Duration::from_secs(3), || ClientConn::connect(d.addr, &t, TokenPlace::Header, None).ok());
    assert!(again.is_some(), "a closed connection did not free its place under the global cap");
}

#[test]
fn the_per_ip_handshake_rate_is_429() {
    let d = Daemon::with_config("[limits]\nhandshakes_per_sec_per_ip = 2\nhandshakes_burst_per_ip = 5\n");
    let t = d.token("u1", &[], "1h");
    let start = Instant::now();
    let mut ok = 0u64;
    let mut refused = None;
    for _ in 0..20 {
        match ClientConn::connect(d.addr, &t, TokenPlace::Header, None) {
            Ok(_) => ok += 1,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let elapsed = start.elapsed().as_secs();
    assert!(ok >= 5, "the burst of 5 was not honoured: {ok}");
    assert!(ok <= 5 + 2 * elapsed + 1, "{ok} handshakes in {elapsed}s");
    assert_refused::<()>(Err(refused.expect("a refusal")), 429, "too_many_requests");
    // The bucket refills.
    std::thread::sleep(Duration::from_millis(1100));
    ClientConn::connect(d.addr, &t, TokenPlace::Header, None)
        .expect("after a second the rate allows a handshake");
}
