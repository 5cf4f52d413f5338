//! Client streams and resume (spec §8, docs/protocol.md §10.1–10.2): every message from an
//! agent to its user's sessions carries a per-(user, agent) `seq` and the stream's `epoch`; a
//! client that reconnects with `agent=&since=&epoch=` (and `resume=`) gets exactly what it
//! missed, in order, then `resumed`, then live traffic; `recovered:false` comes with no replay
//! at all; malformed resume parameters are refused with 400 before the credentials; and a
//! resume never crosses users.

mod common;

use common::resume::*;
use common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchboard::client::{AgentConn, AgentCredential, ClientConn, ClientOpts, Frame};

const HIGH_RATE: &str = "[limits]\nmessages_per_sec_per_user = 100000\nmessages_burst_per_user = 100000\n";

/// Closes a client bound to the agent `ag` is, and waits until the relay has closed the
/// session (the agent's `session open:false`), so it is resumable.
#[track_caller]
fn disconnect(c: ClientConn, ag: &mut AgentConn) -> String {
    let mut c = c;
    let s = c.session.clone();
    c.ws.close();
    drop(c);
    await_session_event(ag, &s, false);
    s
}

/// Closes a client (reading what arrives up to the relay's close echo when `drain`) and drops
/// its socket at once; returns its session and the frames read.
fn leave(mut c: ClientConn, drain: bool) -> (String, Vec<Frame>) {
    let frames = if drain {
        close_and_drain(&mut c)
    } else {
        c.ws.close();
        Vec::new()
    };
    (c.session.clone(), frames)
}

/// User `u1` with its agent `a` connected, and a token for `u1`.
fn one_agent(d: &Daemon) -> (AgentCredential, AgentConn, String) {
    let a = d.hmac_agent("u1", "a");
    let ag = d.agent(&a);
    let t = d.token("u1", &[], "1h");
    (a, ag, t)
}

#[test]
fn every_message_to_a_client_carries_seq_and_epoch_per_agent_stream_and_user() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let b = d.hmac_agent("u1", "b");
    let c = d.hmac_agent("u2", "c");
    let (mut ag_a, mut ag_b, mut ag_c) = (d.agent(&a), d.agent(&b), d.agent(&c));
    let t1 = d.token("u1", &[], "1h");
    let mut unbound = d.client(&t1, None);
    let mut bound_a = d.client(&t1, Some(a.agent_id()));
    let mut other_user = d.client(&d.token("u2", &[], "1h"), None);

    agent_send(&mut ag_a, None, &json!("a1"), "1", Ack::Live);
    let e_a = expect_stream(&mut unbound, a.agent_id(), 1, &json!("a1"));
    assert_eq!(expect_stream(&mut bound_a, a.agent_id(), 1, &json!("a1")), e_a, "one epoch per stream");
    // An addressed message takes the next seq of the stream too.
    agent_send(&mut ag_a, Some(&unbound.session), &json!({"to": "unbound"}), "2", Ack::Live);
    assert_eq!(expect_stream(&mut unbound, a.agent_id(), 2, &json!({"to": "unbound"})), e_a);
    agent_send(&mut ag_a, None, &json!("a3"), "3", Ack::Live);
    assert_eq!(expect_stream(&mut unbound, a.agent_id(), 3, &json!("a3")), e_a);
    // The other session of the user sees the gap left by the message that was not its.
    assert_eq!(expect_stream(&mut bound_a, a.agent_id(), 3, &json!("a3")), e_a);
    agent_send(&mut ag_a, Some(&bound_a.session), &json!("a4"), "4", Ack::Live);
    assert_eq!(expect_stream(&mut bound_a, a.agent_id(), 4, &json!("a4")), e_a);

    // Another agent of the same user: its own stream, from seq 1.
    agent_send(&mut ag_b, None, &json!("b1"), "5", Ack::Live);
    expect_stream(&mut unbound, b.agent_id(), 1, &json!("b1"));
    agent_send(&mut ag_b, Some(&unbound.session), &json!("b2"), "6", Ack::Live);
    expect_stream(&mut unbound, b.agent_id(), 2, &json!("b2"));
    // Another user: its own stream, from seq 1, whatever u1's streams did.
    agent_send(&mut ag_c, None, &json!("c1"), "7", Ack::Live);
    expect_stream(&mut other_user, c.agent_id(), 1, &json!("c1"));
    agent_send(&mut ag_a, None, &json!("a5"), "8", Ack::Live);
    assert_eq!(expect_stream(&mut unbound, a.agent_id(), 5, &json!("a5")), e_a);
    assert_eq!(expect_stream(&mut bound_a, a.agent_id(), 5, &json!("a5")), e_a);

    for cl in [&mut unbound, &mut bound_a, &mut other_user] {
        assert_quiet(cl, CLIENT_NOISE);
    }
}

#[test]
fn a_resumed_client_gets_exactly_the_missed_messages_in_order_then_resumed_then_live_traffic() {
    let d = Daemon::start_default();
    let (a, mut ag, t) = one_agent(&d);
    let mut c = d.client(&t, Some(a.agent_id()));
    let mut other = d.client(&t, Some(a.agent_id()));
    agent_send(&mut ag, None, &json!("m1"), "1", Ack::Live);
    agent_send(&mut ag, None, &json!("m2"), "2", Ack::Live);
    let epoch = expect_stream(&mut c, a.agent_id(), 1, &json!("m1"));
    expect_stream(&mut c, a.agent_id(), 2, &json!("m2"));
    for s in [1, 2] {
        expect_stream(&mut other, a.agent_id(), s, &json!(format!("m{s}")));
    }
    let old = disconnect(c, &mut ag);

    // While it is away: broadcasts are delivered to the others; messages addressed to the
    // closed session are kept and acked queued:true.
    agent_send(&mut ag, None, &json!("m3"), "3", Ack::Live);
    agent_send(&mut ag, Some(&old), &json!({"n": 4, "to": "old"}), "4", Ack::Queued);
    agent_send(&mut ag, None, &json!("m5"), "5", Ack::Live);
    agent_send(&mut ag, Some(&old), &json!({"n": 6, "to": "old"}), "6", Ack::Queued);
    expect_stream(&mut other, a.agent_id(), 3, &json!("m3"));
    expect_stream(&mut other, a.agent_id(), 5, &json!("m5"));
    assert_quiet(&mut other, CLIENT_NOISE);

    let mut c2 = client_q(&d, &t, Some(a.agent_id()), &resume_query(Some(2), Some(&epoch), Some(&old)));
    assert_ne!(c2.session, old, "a resumed connection is a new session");
    for (seq, data) in [
        (3, json!("m3")),
        (4, json!({"n": 4, "to": "old"})),
        (5, json!("m5")),
        (6, json!({"n": 6, "to": "old"})),
    ] {
        assert_eq!(expect_stream(&mut c2, a.agent_id(), seq, &data), epoch, "the replay keeps the epoch");
    }
    expect_resumed(&mut c2, a.agent_id(), true);
    // Live traffic follows, in the same stream.
    agent_send(&mut ag, None, &json!("m7"), "7", Ack::Live);
    assert_eq!(expect_stream(&mut c2, a.agent_id(), 7, &json!("m7")), epoch);
    // The new session took the old one over: a send to the old id reaches it while connected.
    agent_send(&mut ag, Some(&old), &json!("m8"), "8", Ack::Live);
    expect_stream(&mut c2, a.agent_id(), 8, &json!("m8"));
    agent_send(&mut ag, Some(&c2.session), &json!("m9"), "9", Ack::Live);
    expect_stream(&mut c2, a.agent_id(), 9, &json!("m9"));
    assert_quiet(&mut c2, CLIENT_NOISE);
    expect_stream(&mut other, a.agent_id(), 7, &json!("m7"));
    assert_quiet(&mut other, CLIENT_NOISE);
}

/// Shared between the traffic thread (the agent) and the reconnecting client.
#[derive(Default)]
struct Cycle {
    /// The client's current incarnation and its session id.
    gen: usize,
    session: String,
    stop: bool,
    /// Highest incarnation that an addressed send was acked for (live or queued).
    acked_gen: Option<usize>,
    /// Highest incarnation that an addressed send was acked `queued:true` for.
    queued_gen: Option<usize>,
    /// Sessions the agent was told are closed.
    closed: HashSet<String>,
    /// The client is about to close its session (the agent keeps addressing it: a send into
    /// the closing window is kept for the resume and acked `queued:true`).
    closing: bool,
    /// The agent has seen `closing` (no addressed send is in flight any more).
    saw_closing: bool,
}

/// The client-side checker: every stream message exactly once, in order.
struct Checker {
    agent: String,
    last: u64,
    epoch: Option<String>,
    got: Vec<Value>,
}

impl Checker {
    #[track_caller]
    fn take(&mut self, f: &Frame) -> Value {
        let m = stream_msg(f);
        assert_eq!(m.from, self.agent, "{}", f.text);
        assert_eq!(
            m.seq,
            self.last + 1,
            "exactly once and in order: after seq {} got {} ({} messages so far)",
            self.last,
            f.text,
            self.got.len()
        );
        match &self.epoch {
            None => self.epoch = Some(m.epoch.clone()),
            Some(e) => assert_eq!(&m.epoch, e, "the epoch never changes without a crash: {}", f.text),
        }
        self.last = m.seq;
        self.got.push(m.data.clone());
        m.data
    }
}

#[test]
fn reconnect_cycles_under_continuous_agent_traffic_deliver_every_message_exactly_once_in_order() {
    const CYCLES: usize = 16;
    let d = Daemon::with_config(HIGH_RATE);
    let a = d.hmac_agent("u1", "a");
    let t = d.token("u1", &[], "1h");
    let mut ag = d.agent(&a);
    let mut rng = Rng::new(0x5eed_0006);
    let mut c = d.client(&t, Some(a.agent_id()));
    await_session_event(&mut ag, &c.session, true);
    let shared = Arc::new(Mutex::new(Cycle { session: c.session.clone(), ..Cycle::default() }));

    // The agent: one send at a time, a broadcast or a message to the client's current
    // session, each waited for its ack, until told to stop.
    let traffic = {
        let shared = shared.clone();
        let mut rng = Rng::new(0x5eed_0007);
        std::thread::spawn(move || {
            let mut sent: Vec<(Value, bool)> = Vec::new();
            for i in 1.. {
                let (gen, session) = {
                    let mut s = shared.lock().unwrap();
                    if s.stop {
                        break;
                    }
                    s.saw_closing = s.closing;
                    (s.gen, s.session.clone())
                };
                let addressed = rng.below(2) == 0;
                let data = json!({"i": i, "to": if addressed { json!(gen) } else { Value::Null }});
                let id = format!("i{i}");
                ag.send(addressed.then_some(session.as_str()), &data, Some(&id)).unwrap();
                let queued = loop {
                    let f = next_frame(&mut ag, WAIT);
                    match f.ty() {
                        "session" => {
                            if f.value["open"] == json!(false) {
                                shared.lock().unwrap().closed.insert(f.str("session").to_string());
                            }
                        }
                        "ack" if f.str("id") == id => break f.value.get("queued") == Some(&json!(true)),
                        _ => panic!("agent: expected the ack of {id} (sent to {session:?}), got {}", f.text),
                    }
                };
                if addressed {
                    let mut s = shared.lock().unwrap();
                    s.acked_gen = s.acked_gen.max(Some(gen));
                    if queued {
                        s.queued_gen = s.queued_gen.max(Some(gen));
                    }
                }
                sent.push((data, queued));
                std::thread::sleep(Duration::from_millis(2));
            }
            sent
        })
    };

    let mut ck = Checker { agent: a.agent_id().to_string(), last: 0, epoch: None, got: Vec::new() };
    let mut resumes = 0;
    for gen in 0..CYCLES {
        // Read until the replay is over (`resumed`), a message addressed to this incarnation
        // arrived (so everything addressed to the previous one was read) and the agent has an
        // ack for a send to it; then a few more.
        let mut resumed = gen == 0;
        let mut own = false;
        let extra = rng.below(12);
        let mut after = 0;
        loop {
            let f = client_next(&mut c);
            match f.ty() {
                "message" => {
                    if ck.take(&f)["to"] == json!(gen) {
                        own = true;
                    }
                }
                "resumed" => {
                    assert!(!resumed, "one resumed frame per resume: {}", f.text);
                    assert_eq!(f.value, json!({"type": "resumed", "agent": a.agent_id(), "recovered": true}));
                    resumed = true;
                    resumes += 1;
                }
                _ => panic!("incarnation {gen}: unexpected {}", f.text),
            }
            if resumed && own && shared.lock().unwrap().acked_gen >= Some(gen) {
                after += 1;
                if after > extra {
                    break;
                }
            }
        }
        // Leave, sometimes reading what was already on the way, sometimes not (then it must
        // come again in the replay).
        shared.lock().unwrap().closing = true;
        eventually(WAIT, || shared.lock().unwrap().saw_closing.then_some(()))
            .unwrap_or_else(|| panic!("incarnation {gen}: the agent never paused"));
        let (s, frames) = leave(c, rng.below(2) == 0);
        for f in frames {
            if f.ty() == "message" {
                ck.take(&f);
            } else {
                assert_eq!(f.ty(), "presence", "incarnation {gen}: unexpected {}", f.text);
            }
        }
        eventually(WAIT, || shared.lock().unwrap().closed.contains(&s).then_some(()))
            .unwrap_or_else(|| panic!("the agent never saw session {s} close"));
        {
            let mut sh = shared.lock().unwrap();
            sh.closing = false;
            sh.saw_closing = false;
        }
        // Stay away until a message addressed to the closed session was kept for it.
        eventually(WAIT, || (shared.lock().unwrap().queued_gen >= Some(gen)).then_some(()))
            .unwrap_or_else(|| panic!("no send to closed session {s} was acked queued:true"));
        let q = resume_query(Some(ck.last), ck.epoch.as_deref(), Some(&s));
        c = client_q(&d, &t, Some(a.agent_id()), &q);
        let mut sh = shared.lock().unwrap();
        sh.gen = gen + 1;
        sh.session = c.session.clone();
    }

    shared.lock().unwrap().stop = true;
    let sent = traffic.join().expect("the agent thread");
    let mut resumed = false;
    while ck.got.len() < sent.len() || !resumed {
        let f = client_next(&mut c);
        match f.ty() {
            "message" => {
                ck.take(&f);
            }
            "resumed" if !resumed => {
                assert_eq!(f.value, json!({"type": "resumed", "agent": a.agent_id(), "recovered": true}));
                resumed = true;
                resumes += 1;
            }
            _ => panic!("final incarnation: unexpected {}", f.text),
        }
    }
    assert_quiet(&mut c, CLIENT_NOISE);
    let want: Vec<Value> = sent.iter().map(|(v, _)| v.clone()).collect();
    assert_eq!(ck.got, want, "every message acked to the agent reached the client exactly once, in order");
    let queued = sent.iter().filter(|(_, q)| *q).count();
    assert_eq!(resumes, CYCLES);
    assert!(queued >= CYCLES, "each absence had a message kept for the closed session ({queued})");
    eprintln!("{} messages over {} incarnations, {queued} acked queued:true", sent.len(), CYCLES + 1);
}

#[test]
fn a_wrong_epoch_gives_recovered_false_and_no_replay_at_all() {
    let d = Daemon::start_default();
    let (a, mut ag, t) = one_agent(&d);
    let mut c = d.client(&t, Some(a.agent_id()));
    agent_send(&mut ag, None, &json!("m1"), "1", Ack::Live);
    let epoch = expect_stream(&mut c, a.agent_id(), 1, &json!("m1"));
    let old = disconnect(c, &mut ag);
    agent_send(&mut ag, None, &json!("m2"), "2", Ack::Any);
    agent_send(&mut ag, Some(&old), &json!("m3"), "3", Ack::Queued);

    let wrong = if epoch == "e_not_the_epoch" { "e_not_the_epoch_either" } else { "e_not_the_epoch" };
    let mut c2 = client_q(&d, &t, Some(a.agent_id()), &resume_query(Some(1), Some(wrong), Some(&old)));
    // Not even the messages addressed to the old session: no partial replay.
    expect_resumed(&mut c2, a.agent_id(), false);
    assert_quiet(&mut c2, CLIENT_NOISE);
    // Live traffic goes on in the stream's real epoch.
    agent_send(&mut ag, None, &json!("m4"), "4", Ack::Live);
    assert_eq!(expect_stream(&mut c2, a.agent_id(), 4, &json!("m4")), epoch);
    assert_quiet(&mut c2, CLIENT_NOISE);
}

#[test]
fn since_beyond_the_last_seq_gives_recovered_false_and_since_at_it_recovers_nothing_missed() {
    let d = Daemon::start_default();
    let (a, mut ag, t) = one_agent(&d);
    let mut c = d.client(&t, Some(a.agent_id()));
    agent_send(&mut ag, None, &json!("m1"), "1", Ack::Live);
    agent_send(&mut ag, None, &json!("m2"), "2", Ack::Live);
    let epoch = expect_stream(&mut c, a.agent_id(), 1, &json!("m1"));
    expect_stream(&mut c, a.agent_id(), 2, &json!("m2"));
    disconnect(c, &mut ag);

    for since in [3, 1000, u64::MAX] {
        let mut r = client_q(&d, &t, Some(a.agent_id()), &resume_query(Some(since), Some(&epoch), None));
        expect_resumed(&mut r, a.agent_id(), false);
        assert_quiet(&mut r, CLIENT_NOISE);
        disconnect(r, &mut ag);
    }
    // At the last seq: nothing was missed, nothing is replayed, and that is a full recovery.
    let mut r = client_q(&d, &t, Some(a.agent_id()), &resume_query(Some(2), Some(&epoch), None));
    expect_resumed(&mut r, a.agent_id(), true);
    assert_quiet(&mut r, CLIENT_NOISE);
    agent_send(&mut ag, None, &json!("m3"), "3", Ack::Live);
    expect_stream(&mut r, a.agent_id(), 3, &json!("m3"));
}

#[test]
fn a_resume_from_before_the_trimmed_history_gives_recovered_false() {
    let d = Daemon::with_config("[history]\nmax_messages = 5\n");
    let (a, mut ag, t) = one_agent(&d);
    let mut c = d.client(&t, Some(a.agent_id()));
    agent_send(&mut ag, None, &json!(1), "1", Ack::Live);
    let epoch = expect_stream(&mut c, a.agent_id(), 1, &json!(1));
    disconnect(c, &mut ag);
    for n in 2..=11 {
        agent_send(&mut ag, None, &json!(n), &n.to_string(), Ack::Any);
    }
    // The history keeps the last 5 (7..=11): from 1 or 5 the replay would be incomplete.
    for since in [1, 5] {
        let mut r = client_q(&d, &t, Some(a.agent_id()), &resume_query(Some(since), Some(&epoch), None));
        expect_resumed(&mut r, a.agent_id(), false);
        assert_quiet(&mut r, CLIENT_NOISE);
        disconnect(r, &mut ag);
    }
    let mut r = client_q(&d, &t, Some(a.agent_id()), &resume_query(Some(6), Some(&epoch), None));
    for n in 7..=11 {
        assert_eq!(expect_stream(&mut r, a.agent_id(), n, &json!(n)), epoch);
    }
    expect_resumed(&mut r, a.agent_id(), true);
    assert_quiet(&mut r, CLIENT_NOISE);
}

#[test]
fn with_history_off_a_resume_recovers_only_when_nothing_was_missed() {
    let d = Daemon::with_config("[history]\nmax_messages = 0\n");
    let (a, mut ag, t) = one_agent(&d);
    let mut c = d.client(&t, Some(a.agent_id()));
    agent_send(&mut ag, None, &json!(1), "1", Ack::Live);
    let epoch = expect_stream(&mut c, a.agent_id(), 1, &json!(1));
    disconnect(c, &mut ag);

    let mut r = client_q(&d, &t, Some(a.agent_id()), &resume_query(Some(1), Some(&epoch), None));
    expect_resumed(&mut r, a.agent_id(), true);
    assert_quiet(&mut r, CLIENT_NOISE);
    disconnect(r, &mut ag);
    agent_send(&mut ag, None, &json!(2), "2", Ack::Any);
    let mut r = client_q(&d, &t, Some(a.agent_id()), &resume_query(Some(1), Some(&epoch), None));
    expect_resumed(&mut r, a.agent_id(), false);
    assert_quiet(&mut r, CLIENT_NOISE);
    // Messages still carry seq and epoch.
    agent_send(&mut ag, None, &json!(3), "3", Ack::Live);
    assert_eq!(expect_stream(&mut r, a.agent_id(), 3, &json!(3)), epoch);
}

#[test]
fn resume_alone_delivers_what_was_addressed_to_the_old_session_after_it_closed() {
    let d = Daemon::start_default();
    let (a, mut ag, t) = one_agent(&d);
    let mut c = d.client(&t, Some(a.agent_id()));
    agent_send(&mut ag, Some(&c.session), &json!("seen"), "0", Ack::Live);
    let epoch = expect_stream(&mut c, a.agent_id(), 1, &json!("seen"));
    let old = disconnect(c, &mut ag);
    agent_send(&mut ag, Some(&old), &json!("kept-1"), "1", Ack::Queued);
    agent_send(&mut ag, None, &json!("a broadcast"), "2", Ack::Any);
    agent_send(&mut ag, Some(&old), &json!("kept-2"), "3", Ack::Queued);

    // Only what was addressed to the old session after it closed; not the broadcast, not
    // what it had already received.
    let mut c2 = client_q(&d, &t, Some(a.agent_id()), &resume_query(None, None, Some(&old)));
    assert_eq!(expect_stream(&mut c2, a.agent_id(), 2, &json!("kept-1")), epoch);
    assert_eq!(expect_stream(&mut c2, a.agent_id(), 4, &json!("kept-2")), epoch);
    expect_resumed(&mut c2, a.agent_id(), true);
    assert_quiet(&mut c2, CLIENT_NOISE);
    // It took the old session over.
    agent_send(&mut ag, Some(&old), &json!("via the old id"), "4", Ack::Live);
    expect_stream(&mut c2, a.agent_id(), 5, &json!("via the old id"));
    disconnect(c2, &mut ag);

    // The old session is no longer resumable: a second resume of it gets nothing.
    let mut c3 = client_q(&d, &t, Some(a.agent_id()), &resume_query(None, None, Some(&old)));
    expect_resumed(&mut c3, a.agent_id(), false);
    assert_quiet(&mut c3, CLIENT_NOISE);
}

#[test]
fn an_agent_send_to_a_session_that_never_existed_is_offline_and_not_kept() {
    let d = Daemon::start_default();
    let (a, mut ag, t) = one_agent(&d);
    agent_send(&mut ag, None, &json!("m1"), "1", Ack::Any);
    let never = "s_neverExisted0000";
    ag.send(Some(never), &json!("lost"), Some("x")).unwrap();
    expect_error(&mut ag, AGENT_NOISE, "offline", "x");
    // Nothing was kept for it: a resume of that id recovers nothing.
    let mut c = client_q(&d, &t, Some(a.agent_id()), &resume_query(None, None, Some(never)));
    expect_resumed(&mut c, a.agent_id(), false);
    assert_quiet(&mut c, CLIENT_NOISE);
}

#[test]
fn malformed_resume_parameters_are_refused_with_400_before_the_credentials() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let t = d.token("u1", &[], "1h");
    // The stream exists (a resume of a stream that never had a message is not the question).
    agent_send(&mut d.agent(&a), None, &json!("m1"), "1", Ack::Any);
    let ag = a.agent_id();
    let long = "e".repeat(65);
    let bad: Vec<String> = vec![
        // Dependencies between the parameters.
        "since=0&epoch=e_x".into(),
        format!("agent={ag}&since=0"),
        format!("agent={ag}&epoch=e_x"),
        "epoch=e_x".into(),
        "since=0".into(),
        // `since`: a decimal u64.
        format!("agent={ag}&since=x&epoch=e_x"),
        format!("agent={ag}&since=-1&epoch=e_x"),
        format!("agent={ag}&since=%2B1&epoch=e_x"),
        format!("agent={ag}&since=1.0&epoch=e_x"),
        format!("agent={ag}&since=1e3&epoch=e_x"),
        format!("agent={ag}&since=0x10&epoch=e_x"),
        format!("agent={ag}&since=18446744073709551616&epoch=e_x"),
        // `epoch`: 1–64 of [A-Za-z0-9_-].
        format!("agent={ag}&since=0&epoch="),
        format!("agent={ag}&since=0&epoch=e.x"),
        format!("agent={ag}&since=0&epoch=e%20x"),
        format!("agent={ag}&since=0&epoch=e%2Fx"),
        format!("agent={ag}&since=0&epoch={long}"),
        // `resume`: 1–64 of [A-Za-z0-9_-].
        format!("agent={ag}&resume="),
        format!("agent={ag}&resume=s.x"),
        "resume=s%21x".into(),
        format!("resume={long}"),
    ];
    for q in &bad {
        // Without a token too: the query is checked before the credentials.
        let no_token = ClientOpts { extra_query: Some(q.clone()), ..ClientOpts::default() };
        let r = switchboard::client::ClientConn::connect_with(d.addr, None, &no_token);
        let e = r.err().unwrap_or_else(|| panic!("?{q} without a token was accepted"));
        assert_eq!(
            (e.status(), e.body_json()),
            (Some(400), Some(json!({"error": "bad_request"}))),
            "?{q}: {e}"
        );
        let e = try_client_q(&d, &t, None, q).err().unwrap_or_else(|| panic!("?{q} was accepted"));
        assert_eq!(
            (e.status(), e.body_json()),
            (Some(400), Some(json!({"error": "bad_request"}))),
            "?{q}: {e}"
        );
    }
    // The bounds themselves are fine.
    let max_id = "E".repeat(64);
    for q in [
        resume_query(Some(0), Some(&max_id), None),
        resume_query(Some(u64::MAX), Some("e"), Some(&max_id)),
        resume_query(None, None, Some("s")),
    ] {
        let mut c = client_q(&d, &t, Some(ag), &q);
        expect_resumed(&mut c, ag, false);
        assert_quiet(&mut c, CLIENT_NOISE);
    }
}

#[test]
fn replayed_and_kept_messages_never_cross_users() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let b = d.hmac_agent("u2", "b");
    let (mut ag_a, mut ag_b) = (d.agent(&a), d.agent(&b));
    let (t1, t2) = (d.token("u1", &[], "1h"), d.token("u2", &[], "1h"));
    let mut ca = d.client(&t1, Some(a.agent_id()));
    let mut cb = d.client(&t2, Some(b.agent_id()));
    agent_send(&mut ag_a, None, &json!("a-1"), "1", Ack::Live);
    let epoch_a = expect_stream(&mut ca, a.agent_id(), 1, &json!("a-1"));
    let old = disconnect(ca, &mut ag_a);
    agent_send(&mut ag_a, Some(&old), &json!("a-secret"), "2", Ack::Queued);
    agent_send(&mut ag_a, None, &json!("a-3"), "3", Ack::Any);
    // Another user's agent cannot reach u1's closed session: offline, and nothing is kept.
    ag_b.send(Some(&old), &json!("b-intrusion"), Some("x")).unwrap();
    expect_error(&mut ag_b, AGENT_NOISE, "offline", "x");
    agent_send(&mut ag_b, None, &json!("b-1"), "4", Ack::Live);
    expect_stream(&mut cb, b.agent_id(), 1, &json!("b-1"));

    // u2 presents u1's old session and u1's epoch: nothing of u1's comes back.
    let attempts = [
        (Some(b.agent_id()), resume_query(Some(0), Some(&epoch_a), Some(&old))),
        (Some(b.agent_id()), resume_query(None, None, Some(&old))),
        (None, resume_query(None, None, Some(&old))),
    ];
    for (bind, q) in &attempts {
        let mut x = client_q(&d, &t2, *bind, q);
        // One resumed per stream u2 can reach (only b's), never recovered, nothing replayed.
        expect_resumed(&mut x, b.agent_id(), false);
        assert_quiet(&mut x, CLIENT_NOISE);
    }
    // u2 cannot even bind to u1's agent.
    assert_refused(
        try_client_q(&d, &t2, Some(a.agent_id()), &resume_query(Some(0), Some(&epoch_a), Some(&old))),
        403,
        "forbidden",
    );

    // u1's old session is still resumable and holds exactly u1's messages.
    let mut ca2 = client_q(&d, &t1, Some(a.agent_id()), &resume_query(Some(1), Some(&epoch_a), Some(&old)));
    expect_stream(&mut ca2, a.agent_id(), 2, &json!("a-secret"));
    expect_stream(&mut ca2, a.agent_id(), 3, &json!("a-3"));
    expect_resumed(&mut ca2, a.agent_id(), true);
    // u2's traffic never shows up in u1's streams, live or replayed.
    agent_send(&mut ag_b, None, &json!("b-2"), "5", Ack::Live);
    expect_stream(&mut cb, b.agent_id(), 2, &json!("b-2"));
    assert_quiet(&mut ca2, CLIENT_NOISE);
    let mut unbound = client_q(&d, &t1, None, &resume_query(None, None, Some(&ca2.session)));
    agent_send(&mut ag_b, None, &json!("b-3"), "6", Ack::Live);
    expect_stream(&mut cb, b.agent_id(), 3, &json!("b-3"));
    // ca2 is live, so not resumable: recovered:false for u1's only stream, nothing of u2's.
    expect_resumed(&mut unbound, a.agent_id(), false);
    assert_quiet(&mut unbound, CLIENT_NOISE);
    assert_quiet(&mut cb, CLIENT_NOISE);
}

#[test]
fn a_send_to_a_closing_session_is_answered_the_way_its_replay_behaves() {
    let d = Daemon::start_default();
    let (a, mut ag, t) = one_agent(&d);
    let mut c = d.client(&t, Some(a.agent_id()));
    agent_send(&mut ag, None, &json!("m1"), "1", Ack::Live);
    let epoch = expect_stream(&mut c, a.agent_id(), 1, &json!("m1"));
    // The client closes and reads the relay's close echo but keeps its socket open: the relay
    // has processed the close and waits (up to 2 s) for the TCP end.
    c.ws.close();
    match c.recv(WAIT) {
        switchboard::client::Event::Close { .. } => {}
        other => panic!("expected the close echo, got {other:?}"),
    }
    ag.send(Some(&c.session), &json!("m2"), Some("2")).unwrap();
    let answer = agent_next(&mut ag);
    let old = c.session.clone();
    drop(c);
    await_session_event(&mut ag, &old, false);
    let mut r = client_q(&d, &t, Some(a.agent_id()), &resume_query(Some(1), Some(&epoch), Some(&old)));
    let mut replay = Vec::new();
    let recovered = loop {
        let f = client_next(&mut r);
        match f.ty() {
            "message" => replay.push(f.value.clone()),
            "resumed" => break f.value["recovered"].clone(),
            _ => panic!("unexpected {}", f.text),
        }
    };
    let replayed = replay.iter().any(|m| m["data"] == json!("m2"));
    // `offline` means not kept (spec §4.5: "not connected (and not queued)"); kept means
    // acked `queued:true`. Either is consistent; an `offline` message that is replayed is not.
    match (answer.value["type"].as_str(), answer.value.get("queued"), replayed) {
        (Some("ack"), Some(Value::Bool(true)), true) | (Some("error"), _, false) => {}
        _ => panic!(
            "the agent was answered {} but the replay (recovered {recovered}) was {replay:?}",
            answer.text
        ),
    }
    assert_eq!(recovered, json!(true));
}

#[test]
fn since_zero_replays_the_broadcasts_and_only_this_sessions_addressed_messages() {
    let d = Daemon::start_default();
    let (a, mut ag, t) = one_agent(&d);
    let mut mine = d.client(&t, Some(a.agent_id()));
    let mut theirs = d.client(&t, Some(a.agent_id()));
    agent_send(&mut ag, None, &json!("b1"), "1", Ack::Live);
    agent_send(&mut ag, Some(&theirs.session), &json!("for theirs"), "2", Ack::Live);
    agent_send(&mut ag, Some(&mine.session), &json!("for mine"), "3", Ack::Live);
    agent_send(&mut ag, None, &json!("b4"), "4", Ack::Live);
    let epoch = expect_stream(&mut mine, a.agent_id(), 1, &json!("b1"));
    expect_stream(&mut theirs, a.agent_id(), 1, &json!("b1"));
    expect_stream(&mut theirs, a.agent_id(), 2, &json!("for theirs"));
    let old = disconnect(mine, &mut ag);

    // From the start of the stream: every broadcast and what was addressed to the resumed
    // session, never what went to another session of the same user.
    let mut r = client_q(&d, &t, Some(a.agent_id()), &resume_query(Some(0), Some(&epoch), Some(&old)));
    expect_stream(&mut r, a.agent_id(), 1, &json!("b1"));
    expect_stream(&mut r, a.agent_id(), 3, &json!("for mine"));
    expect_stream(&mut r, a.agent_id(), 4, &json!("b4"));
    expect_resumed(&mut r, a.agent_id(), true);
    assert_quiet(&mut r, CLIENT_NOISE);
    // Without `resume=`, only the broadcasts.
    let mut r = client_q(&d, &t, Some(a.agent_id()), &resume_query(Some(0), Some(&epoch), None));
    expect_stream(&mut r, a.agent_id(), 1, &json!("b1"));
    expect_stream(&mut r, a.agent_id(), 4, &json!("b4"));
    expect_resumed(&mut r, a.agent_id(), true);
    assert_quiet(&mut r, CLIENT_NOISE);
}

#[test]
fn resume_alone_on_an_unbound_session_resumes_every_stream_it_can_reach() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let b = d.hmac_agent("u1", "b");
    let (mut ag_a, mut ag_b) = (d.agent(&a), d.agent(&b));
    let t = d.token("u1", &[], "1h");
    let c = d.client(&t, None);
    let s = c.session.clone();
    await_session_event(&mut ag_a, &s, true);
    await_session_event(&mut ag_b, &s, true);
    drop(c);
    await_session_event(&mut ag_a, &s, false);
    await_session_event(&mut ag_b, &s, false);
    agent_send(&mut ag_a, Some(&s), &json!("a1"), "1", Ack::Queued);
    agent_send(&mut ag_b, Some(&s), &json!("b1"), "2", Ack::Queued);
    agent_send(&mut ag_a, Some(&s), &json!("a2"), "3", Ack::Queued);

    let mut r = client_q(&d, &t, None, &resume_query(None, None, Some(&s)));
    let mut by_agent: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
    let mut resumed = std::collections::BTreeSet::new();
    while resumed.len() < 2 {
        let f = client_next(&mut r);
        match f.ty() {
            "message" => {
                let m = stream_msg(&f);
                assert!(!resumed.contains(&m.from), "a stream's replay comes before its resumed: {}", f.text);
                by_agent.entry(m.from).or_default().push(m.data);
            }
            "resumed" => {
                assert_eq!(f.value["recovered"], json!(true), "{}", f.text);
                assert!(resumed.insert(f.str("agent").to_string()), "one resumed per stream: {}", f.text);
            }
            _ => panic!("unexpected {}", f.text),
        }
    }
    assert_quiet(&mut r, CLIENT_NOISE);
    let want: std::collections::BTreeMap<String, Vec<Value>> = [
        (a.agent_id().to_string(), vec![json!("a1"), json!("a2")]),
        (b.agent_id().to_string(), vec![json!("b1")]),
    ]
    .into();
    assert_eq!(by_agent, want);
    assert_eq!(resumed, [a.agent_id().to_string(), b.agent_id().to_string()].into());
}

#[test]
fn after_history_ttl_a_closed_session_is_offline_and_no_longer_resumable() {
    let d = Daemon::with_config("[history]\nttl_secs = 1\n");
    let (a, mut ag, t) = one_agent(&d);
    let c = d.client(&t, Some(a.agent_id()));
    let old = disconnect(c, &mut ag);
    agent_send(&mut ag, Some(&old), &json!("kept"), "k", Ack::Queued);
    // Once the ttl has passed (the relay's clock has second granularity), sends are offline.
    let mut n = 0;
    eventually(Duration::from_secs(10), || {
        n += 1;
        let id = format!("late{n}");
        ag.send(Some(&old), &json!("late"), Some(&id)).unwrap();
        let f = agent_next(&mut ag);
        assert_eq!(f.str("id"), id, "{}", f.text);
        (f.ty() == "error").then(|| assert_eq!(f.str("code"), "offline", "{}", f.text))
    })
    .expect("a closed session stays resumable only for history.ttl_secs");
    let mut r = client_q(&d, &t, Some(a.agent_id()), &resume_query(None, None, Some(&old)));
    expect_resumed(&mut r, a.agent_id(), false);
    assert_quiet(&mut r, CLIENT_NOISE);
}

/// What became of a flood of addressed sends to a client that never reads until the relay
/// closes it with 4008: each send's answer, what the client read before the close, and what
/// a resume (`since` = the last read) replays.
struct SlowConsumer {
    answers: std::collections::BTreeMap<u64, Frame>,
    got: Vec<u64>,
    replayed: Vec<u64>,
}

fn slow_consumer_then_resume() -> SlowConsumer {
    let d = Daemon::with_config(
        "[limits]\nmax_frame_bytes = 32768\nsend_buffer_bytes = 65536\n\
         messages_per_sec_per_user = 100000\nmessages_burst_per_user = 100000\n",
    );
    let (a, mut ag, t) = one_agent(&d);
    let mut c = d.client(&t, Some(a.agent_id()));
    await_session_event(&mut ag, &c.session, true);
    // One message read first: the client knows the stream's epoch even if the relay drops
    // every queued frame when it gives up on it (4008) before the client reads anything.
    agent_send(&mut ag, None, &json!({"i": "warm-up"}), "warm", Ack::Live);
    let first = stream_msg(&client_next(&mut c));
    let old = c.session.clone();
    let pad = "y".repeat(16 * 1024);
    // The client never reads while the agent floods it, until the relay gives up on it.
    let mut answers: std::collections::BTreeMap<u64, Frame> = Default::default();
    let read_answers =
        |ag: &mut AgentConn, answers: &mut std::collections::BTreeMap<u64, Frame>, t: Duration| {
            while let switchboard::client::Event::Frame(f) = ag.recv(t) {
                match f.ty() {
                    "ack" | "error" => {
                        let i = f.str("id").trim_start_matches('f').parse().expect("an id we sent");
                        answers.insert(i, f);
                    }
                    "session" => {}
                    _ => panic!("unexpected {}", f.text),
                }
            }
        };
    let mut sent = 0u64;
    // The relay gives up on the reader (4008) at the first send that would overflow its
    // budget: that send is kept for a resume (acked `queued:true`) — or, when the store could
    // not take it, answered `offline`.
    while !answers.values().any(|f| f.ty() == "error" || f.value.get("queued").is_some()) {
        assert!(sent < 6000, "sent {sent} x 16 KiB to a reader that never reads and it is still open");
        ag.send(Some(&old), &json!({"i": sent, "pad": pad}), Some(&format!("f{sent}"))).unwrap();
        sent += 1;
        if sent % 25 == 0 {
            read_answers(&mut ag, &mut answers, Duration::from_millis(1));
        }
    }
    ag.ws.ping().unwrap();
    loop {
        let f = agent_next(&mut ag);
        if f.ty() == "pong" {
            break;
        }
        let i = f.str("id").trim_start_matches('f').parse().expect("an id we sent");
        answers.insert(i, f);
    }
    assert_eq!(answers.len() as u64, sent, "every send was answered");

    // What the client got before the 4008, then what a resume adds.
    let (code, frames) = expect_close(&mut c, Duration::from_secs(20));
    assert_eq!(code, 4008);
    drop(c);
    let mut got: Vec<u64> = Vec::new();
    let mut last = first.seq;
    let mut epoch = first.epoch;
    for f in &frames {
        let m = stream_msg(f);
        assert_eq!(m.seq, last + 1, "in order before the close");
        last = m.seq;
        epoch = m.epoch;
        got.push(m.data["i"].as_u64().unwrap());
    }
    let mut r = client_q(&d, &t, Some(a.agent_id()), &resume_query(Some(last), Some(&epoch), Some(&old)));
    let mut replayed: Vec<u64> = Vec::new();
    loop {
        let f = client_next(&mut r);
        if f.ty() == "resumed" {
            assert_eq!(f.value["recovered"], json!(true), "{}", f.text);
            break;
        }
        let m = stream_msg(&f);
        assert_eq!(m.seq, last + 1, "in order in the replay");
        last = m.seq;
        replayed.push(m.data["i"].as_u64().unwrap());
    }
    SlowConsumer { answers, got, replayed }
}

#[test]
fn a_slow_consumer_closed_with_4008_gets_every_acked_message_on_resume() {
    let SlowConsumer { answers, got, replayed } = slow_consumer_then_resume();
    let acked: Vec<u64> = answers.iter().filter(|(_, f)| f.ty() == "ack").map(|(i, _)| *i).collect();
    let all: Vec<u64> = got.iter().chain(&replayed).copied().collect();
    for i in &acked {
        assert_eq!(
            all.iter().filter(|x| *x == i).count(),
            1,
            "message {i} was acked: it arrives exactly once"
        );
    }
}

#[test]
fn a_send_answered_offline_because_the_session_was_too_slow_is_not_replayed() {
    let SlowConsumer { answers, got, replayed } = slow_consumer_then_resume();
    let all: Vec<u64> = got.iter().chain(&replayed).copied().collect();
    let offline: Vec<u64> = answers.iter().filter(|(_, f)| f.ty() == "error").map(|(i, _)| *i).collect();
    let replayed_offline: Vec<&u64> = offline.iter().filter(|i| all.contains(i)).collect();
    assert!(
        replayed_offline.is_empty(),
        "sends answered offline ({:?}) were replayed: {replayed_offline:?} (offline means not kept, spec §4.5)",
        offline.iter().map(|i| answers[i].text.clone()).collect::<Vec<_>>()
    );
}
