//! The agent mailbox (spec §8, docs/protocol.md §10.3): a client `send` to its user's offline
//! agent is stored and acked `queued:true`; the agent gets the queued messages right after its
//! `welcome`, in order, with a contiguous `seq`, and confirms them with a cumulative
//! `{"type":"ack","seq":n}`; unconfirmed ones come again on its next connection, confirmed ones
//! never; a full mailbox answers `mailbox_full` and stores nothing; and only the user's own
//! sessions that can reach the agent can queue to it.

mod common;

use common::resume::*;
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchboard::client::{AgentConn, Event};

const HIGH_RATE: &str = "[limits]\nmessages_per_sec_per_user = 100000\nmessages_burst_per_user = 100000\n";

/// The next agent frame must be a live message (no `seq`) from `from` with `data`.
#[track_caller]
fn expect_live(ag: &mut AgentConn, from: &str, data: &Value) {
    let f = agent_next(ag);
    assert_eq!(f.ty(), "message", "{}", f.text);
    assert!(f.value.get("seq").is_none(), "a live message carries no seq: {}", f.text);
    assert_eq!((f.str("from"), &f.value["data"]), (from, data), "{}", f.text);
}

/// Confirms `seq` and proves (with a pong) that the relay has read the confirmation.
#[track_caller]
fn confirm(ag: &mut AgentConn, seq: u64) {
    agent_ack(ag, seq);
    assert_quiet(ag, AGENT_NOISE);
}

/// Closes the agent, reading up to the relay's close echo (nothing may arrive before it),
/// and drops its socket.
#[track_caller]
fn leave(mut ag: AgentConn) {
    for f in close_and_drain(&mut ag) {
        assert_eq!(f.ty(), "session", "nothing but session events before the close echo: {}", f.text);
    }
}

#[test]
fn a_send_to_an_offline_agent_is_acked_queued_and_delivered_after_its_welcome_in_order() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let t = d.token("u1", &[], "1h");
    let mut c1 = d.client(&t, Some(a.agent_id()));
    let mut c2 = d.client(&t, None);
    queue(&mut c1, None, &json!({"n": 1}), "q1");
    queue(&mut c2, Some(a.agent_id()), &json!("two"), "q2");
    // Without an id there is no ack, and the message is queued all the same.
    c1.send(None, &json!([3]), None).unwrap();
    queue(&mut c1, None, &json!(null), "q4");
    let (s1, s2) = (c1.session.clone(), c2.session.clone());
    // The sender being gone changes nothing.
    c1.ws.close();
    drop(c1);

    let mut ag = d.agent(&a);
    expect_mail(&mut ag, &s1, 1, &json!({"n": 1}));
    expect_mail(&mut ag, &s2, 2, &json!("two"));
    expect_mail(&mut ag, &s1, 3, &json!([3]));
    expect_mail(&mut ag, &s1, 4, &json!(null));
    assert_quiet(&mut ag, AGENT_NOISE);
    assert_quiet(&mut c2, CLIENT_NOISE);
}

#[test]
fn cumulative_acks_confirm_and_only_unconfirmed_messages_are_delivered_again() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let mut c = d.client(&d.token("u1", &[], "1h"), Some(a.agent_id()));
    for n in 1..=5 {
        queue(&mut c, None, &json!(n), &format!("q{n}"));
    }
    let s = c.session.clone();

    let mut ag = d.agent(&a);
    for n in 1..=5 {
        expect_mail(&mut ag, &s, n, &json!(n));
    }
    confirm(&mut ag, 2);
    leave(ag);
    // Unconfirmed ones again, same seq, same content, in order.
    let mut ag = d.agent(&a);
    for n in 3..=5 {
        expect_mail(&mut ag, &s, n, &json!(n));
    }
    assert_quiet(&mut ag, AGENT_NOISE);
    confirm(&mut ag, 4);
    leave(ag);
    let mut ag = d.agent(&a);
    expect_mail(&mut ag, &s, 5, &json!(5));
    assert_quiet(&mut ag, AGENT_NOISE);
    // An ack beyond the last queued seq confirms everything.
    confirm(&mut ag, 1000);
    leave(ag);
    let mut ag = d.agent(&a);
    assert_quiet(&mut ag, AGENT_NOISE);
}

#[test]
fn once_everything_is_confirmed_messages_are_live_again_and_carry_no_seq() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let mut c = d.client(&d.token("u1", &[], "1h"), Some(a.agent_id()));
    queue(&mut c, None, &json!("q1"), "q1");
    queue(&mut c, None, &json!("q2"), "q2");
    let mut ag = d.agent(&a);
    expect_mail(&mut ag, &c.session, 1, &json!("q1"));
    expect_mail(&mut ag, &c.session, 2, &json!("q2"));
    confirm(&mut ag, 2);
    c.send(None, &json!("live"), Some("l1")).unwrap();
    expect_ack_live(&mut c, CLIENT_NOISE, "l1");
    expect_live(&mut ag, &c.session, &json!("live"));
    assert_quiet(&mut ag, AGENT_NOISE);
}

#[test]
fn while_messages_are_unconfirmed_new_sends_queue_behind_them() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let mut c = d.client(&d.token("u1", &[], "1h"), Some(a.agent_id()));
    queue(&mut c, None, &json!(1), "q1");
    queue(&mut c, None, &json!(2), "q2");
    let mut ag = d.agent(&a);
    expect_mail(&mut ag, &c.session, 1, &json!(1));
    expect_mail(&mut ag, &c.session, 2, &json!(2));
    // The agent is online but has not confirmed: the next send queues behind.
    queue(&mut c, None, &json!(3), "q3");
    expect_mail(&mut ag, &c.session, 3, &json!(3));
    // A partial confirmation still leaves one unconfirmed.
    confirm(&mut ag, 2);
    queue(&mut c, None, &json!(4), "q4");
    expect_mail(&mut ag, &c.session, 4, &json!(4));
    confirm(&mut ag, 4);
    c.send(None, &json!(5), Some("l5")).unwrap();
    expect_ack_live(&mut c, CLIENT_NOISE, "l5");
    expect_live(&mut ag, &c.session, &json!(5));
    assert_quiet(&mut ag, AGENT_NOISE);
}

#[test]
fn a_mailbox_at_max_messages_answers_mailbox_full_and_stores_nothing() {
    let d = Daemon::with_config("[mailbox]\nmax_messages = 3\n[presence]\noffline_grace_ms = 0\n");
    let a = d.hmac_agent("u1", "a");
    let mut c = d.client(&d.token("u1", &[], "1h"), Some(a.agent_id()));
    for n in 1..=3 {
        queue(&mut c, None, &json!(n), &format!("q{n}"));
    }
    for id in ["full-1", "full-2"] {
        c.send(None, &json!(id), Some(id)).unwrap();
        expect_error(&mut c, CLIENT_NOISE, "mailbox_full", id);
    }
    let mut ag = d.agent(&a);
    for n in 1..=3 {
        expect_mail(&mut ag, &c.session, n, &json!(n));
    }
    assert_quiet(&mut ag, AGENT_NOISE);
    // Confirmed messages leave the mailbox: there is room again, and seq goes on.
    confirm(&mut ag, 3);
    leave(ag);
    // With no grace, `presence online:false` says the relay no longer counts the agent online.
    await_presence(&mut c, a.agent_id(), true);
    await_presence(&mut c, a.agent_id(), false);
    queue(&mut c, None, &json!(4), "q4");
    let mut ag = d.agent(&a);
    expect_mail(&mut ag, &c.session, 4, &json!(4));
    assert_quiet(&mut ag, AGENT_NOISE);
}

#[test]
fn a_mailbox_at_max_bytes_answers_mailbox_full_and_stores_nothing() {
    // The mailbox may not be smaller than one frame: both are 4096 bytes here.
    let d = Daemon::with_config("[limits]\nmax_frame_bytes = 4096\n[mailbox]\nmax_bytes = 4096\n");
    let a = d.hmac_agent("u1", "a");
    let mut c = d.client(&d.token("u1", &[], "1h"), Some(a.agent_id()));
    // 1500-byte messages: two fit in 4096 bytes, a third does not.
    let big = |n: u64| json!({"n": n, "pad": "p".repeat(1500)});
    queue(&mut c, None, &big(1), "b1");
    queue(&mut c, None, &big(2), "b2");
    c.send(None, &big(3), Some("b3")).unwrap();
    expect_error(&mut c, CLIENT_NOISE, "mailbox_full", "b3");
    // A small one still fits.
    queue(&mut c, None, &json!("small"), "s");
    let mut ag = d.agent(&a);
    expect_mail(&mut ag, &c.session, 1, &big(1));
    expect_mail(&mut ag, &c.session, 2, &big(2));
    expect_mail(&mut ag, &c.session, 3, &json!("small"));
    assert_quiet(&mut ag, AGENT_NOISE);
}

#[test]
fn with_the_mailbox_off_a_send_to_an_offline_agent_is_offline() {
    let d = Daemon::with_config("[mailbox]\nmax_messages = 0\n");
    let a = d.hmac_agent("u1", "a");
    let mut c = d.client(&d.token("u1", &[], "1h"), Some(a.agent_id()));
    c.send(None, &json!(1), Some("x")).unwrap();
    expect_error(&mut c, CLIENT_NOISE, "offline", "x");
    let mut ag = d.agent(&a);
    assert_quiet(&mut ag, AGENT_NOISE);
}

#[test]
fn only_the_users_own_sessions_that_reach_the_agent_can_queue_to_it() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let b = d.hmac_agent("u1", "b");
    let mut other_user = d.client(&d.token("u2", &[], "1h"), None);
    other_user.send(Some(a.agent_id()), &json!("intrusion"), Some("x")).unwrap();
    expect_error(&mut other_user, CLIENT_NOISE, "not_allowed", "x");
    assert_refused(try_client_q(&d, &d.token("u2", &[], "1h"), Some(a.agent_id()), ""), 403, "forbidden");
    // The user's own session outside the token's allowlist, or bound to another agent.
    let mut allow_b = d.client(&d.token("u1", &[b.agent_id()], "1h"), None);
    allow_b.send(Some(a.agent_id()), &json!("not in the allowlist"), Some("y")).unwrap();
    expect_error(&mut allow_b, CLIENT_NOISE, "not_allowed", "y");
    let mut bound_b = d.client(&d.token("u1", &[], "1h"), Some(b.agent_id()));
    bound_b.send(Some(a.agent_id()), &json!("bound elsewhere"), Some("z")).unwrap();
    expect_error(&mut bound_b, CLIENT_NOISE, "not_allowed", "z");
    // The one session that may.
    let mut own = d.client(&d.token("u1", &[], "1h"), Some(a.agent_id()));
    queue(&mut own, None, &json!("mine"), "m");

    let mut ag = d.agent(&a);
    expect_mail(&mut ag, &own.session, 1, &json!("mine"));
    assert_quiet(&mut ag, AGENT_NOISE);
    // b's mailbox got nothing either.
    let mut bg = d.agent(&b);
    assert_quiet(&mut bg, AGENT_NOISE);
}

/// The agent-side checker: deduplicates by `seq` and requires every message exactly once, in
/// the order sent, across connections.
struct MailChecker {
    from: String,
    /// Highest seq this agent confirmed (and the relay read).
    confirmed: u64,
    /// `confirmed` when the current connection opened: messages already on their way when a
    /// confirmation is read may still arrive on the same connection, never on a later one.
    floor: u64,
    /// Highest seq seen.
    max_seq: u64,
    by_seq: BTreeMap<u64, Value>,
    /// Message numbers in first-delivery order.
    delivered: Vec<u64>,
    redelivered: usize,
    live: usize,
    /// No seq'd message seen yet on the current connection.
    fresh_conn: bool,
    /// What the agent saw and did, for failure messages.
    log: Vec<String>,
}

impl MailChecker {
    fn note(&mut self, what: String) {
        self.log.push(what);
    }

    #[track_caller]
    fn check(&self, ok: bool, what: String) {
        if !ok {
            let tail = &self.log[self.log.len().saturating_sub(40)..];
            panic!("{what}\nlast events seen by the agent:\n{}", tail.join("\n"));
        }
    }

    #[track_caller]
    fn take(&mut self, f: &switchboard::client::Frame) {
        self.note(format!("  <- {}", f.text));
        self.check(
            f.ty() == "message" && f.str("from") == self.from,
            format!("not a message from the client: {}", f.text),
        );
        let data = f.value["data"].clone();
        match f.value.get("seq") {
            Some(_) => {
                let (_, seq, _) = mailbox_msg(f);
                self.check(
                    seq > self.floor,
                    format!("seq {seq} was confirmed (up to {}) before this connection", self.floor),
                );
                if self.fresh_conn && self.max_seq > self.floor {
                    self.check(
                        seq == self.floor + 1,
                        format!(
                            "redelivery starts at the first unconfirmed: confirmed {}, seen up to {}, got seq {seq}",
                            self.floor, self.max_seq
                        ),
                    );
                }
                self.fresh_conn = false;
                if seq <= self.max_seq {
                    self.check(
                        self.by_seq.get(&seq) == Some(&data),
                        format!("a redelivered seq {seq} changed"),
                    );
                    self.redelivered += 1;
                    return;
                }
                self.check(
                    seq == self.max_seq + 1,
                    format!("seq is contiguous: after {} got {seq}", self.max_seq),
                );
                self.max_seq = seq;
                self.by_seq.insert(seq, data.clone());
            }
            None => self.live += 1,
        }
        let n = data["n"].as_u64().unwrap_or(0);
        self.check(
            n == self.delivered.len() as u64 + 1,
            format!("in order, nothing lost: after {:?} got n = {n}", self.delivered.last()),
        );
        self.delivered.push(n);
    }
}

#[derive(Default)]
struct Sends {
    stop: bool,
    /// Client sends acked queued:true so far.
    queued: usize,
}

#[test]
fn under_agent_disconnect_cycles_every_acked_message_arrives_at_least_once_in_order() {
    const CYCLES: usize = 12;
    let d = Daemon::with_config(HIGH_RATE);
    let a = d.hmac_agent("u1", "a");
    let mut c = d.client(&d.token("u1", &[], "1h"), Some(a.agent_id()));
    let from = c.session.clone();
    let shared = Arc::new(Mutex::new(Sends::default()));
    // The client: one send at a time, each waited for its ack (queued or live).
    let sender = {
        let shared = shared.clone();
        std::thread::spawn(move || {
            let mut sent: Vec<(u64, bool)> = Vec::new();
            for n in 1.. {
                if shared.lock().unwrap().stop {
                    break;
                }
                let id = format!("n{n}");
                c.send(None, &json!({"n": n}), Some(&id)).unwrap();
                let f = client_next(&mut c);
                assert!(
                    f.ty() == "ack" && f.str("id") == id,
                    "client: expected the ack of {id}, got {}",
                    f.text
                );
                let queued = f.value.get("queued") == Some(&json!(true));
                if queued {
                    shared.lock().unwrap().queued += 1;
                }
                sent.push((n, queued));
                std::thread::sleep(Duration::from_millis(2));
            }
            sent
        })
    };

    let mut rng = Rng::new(0x6d61_696c);
    let mut ck = MailChecker {
        from,
        confirmed: 0,
        floor: 0,
        max_seq: 0,
        by_seq: BTreeMap::new(),
        delivered: Vec::new(),
        redelivered: 0,
        live: 0,
        fresh_conn: true,
        log: Vec::new(),
    };
    for cycle in 0..CYCLES {
        // Stay away until something was queued for this absence.
        let before = shared.lock().unwrap().queued;
        eventually(WAIT, || (shared.lock().unwrap().queued > before).then_some(()))
            .unwrap_or_else(|| panic!("cycle {cycle}: nothing was queued while the agent was away"));
        let mut ag = d.agent(&a);
        ck.note(format!("connect (cycle {cycle}, confirmed {})", ck.confirmed));
        ck.fresh_conn = true;
        ck.floor = ck.confirmed;
        let want = 1 + rng.below(10);
        for _ in 0..want {
            ck.take(&agent_next(&mut ag));
        }
        // Sometimes confirm nothing, sometimes part, sometimes everything seen.
        match cycle % 3 {
            0 => {}
            1 if ck.max_seq > ck.confirmed => {
                let upto = ck.confirmed + 1 + rng.below((ck.max_seq - ck.confirmed) as usize) as u64;
                agent_ack(&mut ag, upto);
                ck.note(format!("  -> ack {upto}"));
                ck.confirmed = upto;
            }
            _ => {
                agent_ack(&mut ag, ck.max_seq);
                ck.note(format!("  -> ack {}", ck.max_seq));
                ck.confirmed = ck.confirmed.max(ck.max_seq);
            }
        }
        ck.note("  -> close".into());
        for f in close_and_drain(&mut ag) {
            if f.ty() != "session" {
                ck.take(&f);
            }
        }
        drop(ag);
    }

    shared.lock().unwrap().stop = true;
    let sent = sender.join().expect("the client thread");
    let mut ag = d.agent(&a);
    ck.note(format!("connect (final, confirmed {})", ck.confirmed));
    ck.fresh_conn = true;
    ck.floor = ck.confirmed;
    while ck.delivered.len() < sent.len() {
        match ag.recv(WAIT) {
            Event::Frame(f) if f.ty() == "session" => {}
            Event::Frame(f) => ck.take(&f),
            other => panic!("{} of {} delivered, then {other:?}", ck.delivered.len(), sent.len()),
        }
    }
    // Everything arrived; redeliveries of what an earlier connection saw may still be on the
    // way: confirm all, and read up to the pong that follows the confirmation.
    agent_ack(&mut ag, ck.max_seq);
    ck.note(format!("  -> ack {}", ck.max_seq));
    ag.ws.ping().unwrap();
    loop {
        let f = agent_next(&mut ag);
        if f.ty() == "pong" {
            break;
        }
        let before = ck.delivered.len();
        ck.take(&f);
        ck.check(ck.delivered.len() == before, format!("only redeliveries are left: {}", f.text));
    }
    assert_quiet(&mut ag, AGENT_NOISE);
    let queued = sent.iter().filter(|(_, q)| *q).count();
    assert!(queued >= CYCLES, "every absence queued something ({queued})");
    assert!(ck.redelivered > 0, "unconfirmed messages were delivered again");
    eprintln!(
        "{} messages: {queued} queued, {} live, {} redelivered (deduplicated by seq)",
        sent.len(),
        ck.live,
        ck.redelivered
    );
}

#[test]
fn a_send_to_an_agent_whose_connection_is_closing_is_not_acked_and_lost() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let mut c = d.client(&d.token("u1", &[], "1h"), Some(a.agent_id()));
    let mut ag = d.agent(&a);
    // The agent closes and reads the relay's close echo but keeps its socket open: the relay
    // has processed the close and waits (up to 2 s) for the TCP end.
    ag.ws.close();
    match ag.recv(WAIT) {
        Event::Close { .. } => {}
        other => panic!("expected the close echo, got {other:?}"),
    }
    c.send(None, &json!("into the closing window"), Some("w")).unwrap();
    let answer = client_next(&mut c);
    drop(ag);
    let mut ag = d.agent(&a);
    let mut got = Vec::new();
    ag.ws.ping().unwrap();
    loop {
        let f = agent_next(&mut ag);
        if f.ty() == "pong" {
            break;
        }
        got.push(f.value);
    }
    // Acked `queued:true` → delivered now; `offline` → never delivered. A plain ack would
    // promise a delivery that cannot happen any more.
    let delivered = got.iter().any(|m| m["data"] == json!("into the closing window"));
    match (answer.ty(), answer.value.get("queued"), delivered) {
        ("ack", Some(Value::Bool(true)), true) | ("error", _, false) => {}
        _ => panic!("the client was answered {} and the agent then got {got:?}", answer.text),
    }
}

#[test]
fn mailbox_messages_older_than_the_ttl_expire() {
    let d = Daemon::with_config("[mailbox]\nttl_secs = 1\n");
    let a = d.hmac_agent("u1", "a");
    let mut c = d.client(&d.token("u1", &[], "1h"), Some(a.agent_id()));
    queue(&mut c, None, &json!("stale"), "q1");
    // Time has to pass for a message to grow old; 3 s is well beyond 1 s at second granularity.
    std::thread::sleep(Duration::from_secs(3));
    queue(&mut c, None, &json!("fresh"), "q2");
    let mut ag = d.agent(&a);
    let f = agent_next(&mut ag);
    let (from, seq, data) = mailbox_msg(&f);
    assert_eq!((from.as_str(), data), (c.session.as_str(), json!("fresh")), "only the fresh one: {}", f.text);
    assert!(seq >= 1);
    assert_quiet(&mut ag, AGENT_NOISE);
}
