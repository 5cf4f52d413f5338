//! Offline delivery across daemon restarts (docs/protocol.md §10.4): after SIGTERM every
//! stream keeps its epoch and history and every mailbox its messages; after SIGKILL a stream
//! with no connected session still resumes with `recovered:true`, everything acked
//! `queued:true` is delivered, and a stream that had a connected session starts a new epoch
//! (its clients get `recovered:false`).

mod common;

use common::resume::*;
use common::*;
use serde_json::json;
use std::time::Duration;
use switchboard::client::{AgentConn, ClientConn};

/// Long enough for the writer thread to commit what is written behind (one group commit is
/// ~5 ms); it only makes the state at the kill well defined, nothing is timed.
const WRITE_BEHIND: Duration = Duration::from_secs(2);

/// Closes a client and waits until the relay closed its session (the agent is told).
#[track_caller]
fn disconnect(mut c: ClientConn, ag: &mut AgentConn) -> String {
    let s = c.session.clone();
    c.ws.close();
    drop(c);
    await_session_event(ag, &s, false);
    s
}

#[test]
fn after_sigterm_clients_resume_with_recovered_true_and_agents_get_their_queued_messages() {
    let mut d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let b = d.hmac_agent("u1", "b");
    let t = d.token("u1", &[], "1h");
    let mut ag = d.agent(&a);
    let mut live = d.client(&t, Some(a.agent_id()));
    let away = d.client(&t, Some(a.agent_id()));
    let mut to_b = d.client(&t, Some(b.agent_id()));
    agent_send(&mut ag, None, &json!("m1"), "1", Ack::Live);
    let epoch = expect_stream(&mut live, a.agent_id(), 1, &json!("m1"));
    let away = disconnect(away, &mut ag);
    agent_send(&mut ag, Some(&away), &json!("for away"), "2", Ack::Queued);
    agent_send(&mut ag, None, &json!("m3"), "3", Ack::Live);
    agent_send(&mut ag, Some(&live.session), &json!("for live"), "4", Ack::Live);
    queue(&mut to_b, None, &json!("mail-1"), "q1");
    queue(&mut to_b, None, &json!("mail-2"), "q2");

    // `live` has read seq 1 only; what arrives before the 1001 counts as lost with it.
    d.signal(libc::SIGTERM);
    expect_1001(&mut ag);
    expect_1001(&mut live);
    expect_1001(&mut to_b);
    let status = d.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "SIGTERM exits cleanly: {status}");
    d.restart(2);

    let mut live2 =
        client_q(&d, &t, Some(a.agent_id()), &resume_query(Some(1), Some(&epoch), Some(&live.session)));
    assert_eq!(expect_stream(&mut live2, a.agent_id(), 3, &json!("m3")), epoch, "same epoch after SIGTERM");
    expect_stream(&mut live2, a.agent_id(), 4, &json!("for live"));
    expect_resumed(&mut live2, a.agent_id(), true);
    let mut away2 = client_q(&d, &t, Some(a.agent_id()), &resume_query(None, None, Some(&away)));
    assert_eq!(expect_stream(&mut away2, a.agent_id(), 2, &json!("for away")), epoch);
    expect_resumed(&mut away2, a.agent_id(), true);
    // The stream goes on where it was.
    let mut ag = d.agent(&a);
    agent_send(&mut ag, None, &json!("m5"), "5", Ack::Live);
    assert_eq!(expect_stream(&mut live2, a.agent_id(), 5, &json!("m5")), epoch);
    assert_eq!(expect_stream(&mut away2, a.agent_id(), 5, &json!("m5")), epoch);
    // The mailbox too.
    let mut bg = d.agent(&b);
    expect_mail(&mut bg, &to_b.session, 1, &json!("mail-1"));
    expect_mail(&mut bg, &to_b.session, 2, &json!("mail-2"));
    assert_quiet(&mut bg, AGENT_NOISE);
    assert_quiet(&mut live2, CLIENT_NOISE);
    assert_quiet(&mut away2, CLIENT_NOISE);
}

#[test]
fn after_sigkill_a_stream_with_no_connected_session_resumes_with_recovered_true() {
    let mut d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let t = d.token("u1", &[], "1h");
    let mut ag = d.agent(&a);
    let mut c = d.client(&t, Some(a.agent_id()));
    agent_send(&mut ag, None, &json!("m1"), "1", Ack::Live);
    let epoch = expect_stream(&mut c, a.agent_id(), 1, &json!("m1"));
    let old = disconnect(c, &mut ag);
    // The phone in the tunnel: messages kept for it, and a broadcast nobody received.
    agent_send(&mut ag, Some(&old), &json!("k2"), "2", Ack::Queued);
    agent_send(&mut ag, None, &json!("k3"), "3", Ack::Any);
    agent_send(&mut ag, Some(&old), &json!("k4"), "4", Ack::Queued);
    std::thread::sleep(WRITE_BEHIND);
    d.kill9();
    d.restart(2);

    let mut c2 = client_q(&d, &t, Some(a.agent_id()), &resume_query(Some(1), Some(&epoch), Some(&old)));
    for (seq, data) in [(2, "k2"), (3, "k3"), (4, "k4")] {
        assert_eq!(
            expect_stream(&mut c2, a.agent_id(), seq, &json!(data)),
            epoch,
            "same epoch after the kill"
        );
    }
    expect_resumed(&mut c2, a.agent_id(), true);
    let mut ag = d.agent(&a);
    agent_send(&mut ag, None, &json!("m5"), "5", Ack::Live);
    assert_eq!(expect_stream(&mut c2, a.agent_id(), 5, &json!("m5")), epoch);
    assert_quiet(&mut c2, CLIENT_NOISE);
}

#[test]
fn after_sigkill_a_closed_session_is_still_resumable_by_its_id_alone() {
    let mut d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let t = d.token("u1", &[], "1h");
    let mut ag = d.agent(&a);
    let mut c = d.client(&t, Some(a.agent_id()));
    agent_send(&mut ag, None, &json!("m1"), "1", Ack::Live);
    let epoch = expect_stream(&mut c, a.agent_id(), 1, &json!("m1"));
    let old = disconnect(c, &mut ag);
    agent_send(&mut ag, Some(&old), &json!("k2"), "2", Ack::Queued);
    agent_send(&mut ag, Some(&old), &json!("k3"), "3", Ack::Queued);
    // No wait: `queued:true` promised the commit.
    d.kill9();
    d.restart(2);

    let mut c2 = client_q(&d, &t, Some(a.agent_id()), &resume_query(None, None, Some(&old)));
    assert_eq!(expect_stream(&mut c2, a.agent_id(), 2, &json!("k2")), epoch);
    assert_eq!(expect_stream(&mut c2, a.agent_id(), 3, &json!("k3")), epoch);
    expect_resumed(&mut c2, a.agent_id(), true);
    assert_quiet(&mut c2, CLIENT_NOISE);
}

#[test]
fn mailbox_messages_acked_queued_survive_sigkill_and_confirmed_ones_stay_confirmed() {
    let mut d = Daemon::start_default();
    let b = d.hmac_agent("u1", "b");
    let mut c = d.client(&d.token("u1", &[], "1h"), Some(b.agent_id()));
    for n in 1..=3 {
        queue(&mut c, None, &json!(n), &format!("q{n}"));
    }
    let s = c.session.clone();
    // No wait: the ack promised the commit.
    d.kill9();
    d.restart(2);

    let mut bg = d.agent(&b);
    for n in 1..=3 {
        expect_mail(&mut bg, &s, n, &json!(n));
    }
    assert_quiet(&mut bg, AGENT_NOISE);
    agent_ack(&mut bg, 2);
    assert_quiet(&mut bg, AGENT_NOISE);
    std::thread::sleep(WRITE_BEHIND);
    d.kill9();
    d.restart(2);

    let mut bg = d.agent(&b);
    expect_mail(&mut bg, &s, 3, &json!(3));
    assert_quiet(&mut bg, AGENT_NOISE);
}

#[test]
fn after_sigkill_a_stream_that_had_a_connected_session_starts_a_new_epoch() {
    let mut d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let t = d.token("u1", &[], "1h");
    let mut ag = d.agent(&a);
    let mut c = d.client(&t, Some(a.agent_id()));
    for n in 1..=3 {
        agent_send(&mut ag, None, &json!(n), &n.to_string(), Ack::Live);
    }
    let epoch = expect_stream(&mut c, a.agent_id(), 1, &json!(1));
    for n in 2..=3 {
        expect_stream(&mut c, a.agent_id(), n, &json!(n));
    }
    // Killed under live traffic.
    for n in 4..=6 {
        ag.send(None, &json!(n), None).unwrap();
    }
    d.kill9();
    d.restart(2);

    for q in
        [resume_query(Some(3), Some(&epoch), Some(&c.session)), resume_query(Some(0), Some(&epoch), None)]
    {
        let mut r = client_q(&d, &t, Some(a.agent_id()), &q);
        expect_resumed(&mut r, a.agent_id(), false);
        assert_quiet(&mut r, CLIENT_NOISE);
    }
    let mut c2 = d.client(&t, Some(a.agent_id()));
    let mut ag = d.agent(&a);
    agent_send(&mut ag, None, &json!("after"), "7", Ack::Live);
    let new_epoch = expect_stream(&mut c2, a.agent_id(), 1, &json!("after"));
    assert_ne!(new_epoch, epoch, "a new epoch after a crash with a connected session");
    assert_quiet(&mut c2, CLIENT_NOISE);
}
