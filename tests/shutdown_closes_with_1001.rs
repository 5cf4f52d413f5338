//! On SIGTERM the relay stops taking upgrades and closes every live connection with 1001
//! "shutting down" (§7), then exits cleanly.

mod common;

use common::*;
use std::time::Duration;
use switchboard::client::Event;

#[test]
fn sigterm_closes_every_connection_with_1001_and_exits() {
    let mut d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let mut ag = d.agent(&a);
    let mut c = d.client(&d.token("u1", &[], "1h"), None);
    expect_type(&mut ag, "session");
    let status = d.terminate(Duration::from_secs(15));
    for (who, ev) in [("agent", ag.recv(WAIT)), ("client", c.recv(WAIT))] {
        match ev {
            Event::Close { code, reason } => {
                assert_eq!(code, 1001, "{who}");
                assert_eq!(reason, "shutting down", "{who}");
            }
            other => panic!("{who}: expected close 1001, got {other:?}"),
        }
    }
    let status = status.unwrap_or_else(|| panic!("still running 15 s after SIGTERM:\n{}", d.logs()));
    assert!(status.success(), "exit status {status}:\n{}", d.logs());
}
