//! Clients get in only with a valid JWT for their user, taken from the first of the three
//! places that holds one; the allowlist and `agent=` binding are enforced with the same 403
//! for absent and foreign agents; an expiring token is warned about, closes the session with
//! 4001 at `exp`, and a valid `refresh` replaces it (§3.3).

mod common;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use switchboard::client::{unix_now, ClientConn, ClientOpts, ConnectError, Event, TokenPlace, SUBPROTOCOL};

fn jwt_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("jwt payload");
    let bytes =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn connect(d: &Daemon, token: &str, place: TokenPlace) -> Result<ClientConn, ConnectError> {
    ClientConn::connect(d.addr, token, place, None)
}

#[test]
fn a_token_in_each_place_connects_and_the_subprotocol_answer_is_exact() {
    let d = Daemon::start_default();
    let t = d.token("u1", &[], "1h");
    for place in [TokenPlace::Header, TokenPlace::Subprotocol, TokenPlace::Query] {
        let c = connect(&d, &t, place).unwrap_or_else(|e| panic!("{place:?}: {e}"));
        assert_eq!(c.welcome.str("user"), "u1", "{place:?}");
        assert_relay_id(&c.session);
        let protocol = c.ws.subprotocol().map(str::to_string);
        if place == TokenPlace::Subprotocol {
            assert_eq!(
                protocol.as_deref(),
                Some(SUBPROTOCOL),
                "answered exactly switchboard.v1, never bearer.*"
            );
        } else {
            assert_eq!(protocol, None, "{place:?}: no subprotocol offered, none answered");
        }
        for (k, v) in &c.ws.response_headers {
            assert!(!v.contains(&t) && !v.contains("bearer"), "101 header {k}: {v} echoes the token");
        }
        // Offering switchboard.v1 with the token elsewhere is answered with switchboard.v1.
        let opts = ClientOpts { offer_subprotocol: true, ..Default::default() };
        let c = ClientConn::connect_with(d.addr, Some((place, &t)), &opts).unwrap();
        assert_eq!(c.ws.subprotocol(), Some(SUBPROTOCOL), "{place:?} with switchboard.v1 offered");
    }
}

#[test]
fn the_first_place_holding_a_token_wins() {
    let d = Daemon::start_default();
    let u1 = d.token("u1", &[], "1h");
    let u2 = d.token("u2", &[], "1h");
    let bad = "bad.token.here".to_string();
    let with = |first: (TokenPlace, &str), also: Vec<(TokenPlace, String)>| {
        ClientConn::connect_with(d.addr, Some(first), &ClientOpts { also, ..Default::default() })
    };
    let c = with(
        (TokenPlace::Header, &u1),
        vec![(TokenPlace::Subprotocol, u2.clone()), (TokenPlace::Query, u2.clone())],
    )
    .unwrap();
    assert_eq!(c.welcome.str("user"), "u1", "the Authorization header comes first");
    let c = with((TokenPlace::Subprotocol, &u1), vec![(TokenPlace::Query, u2.clone())]).unwrap();
    assert_eq!(c.welcome.str("user"), "u1", "the subprotocol comes before the query");
    let c = with((TokenPlace::Header, &u1), vec![(TokenPlace::Query, bad.clone())]).unwrap();
    assert_eq!(c.welcome.str("user"), "u1");
    // A bad token in an earlier place is not rescued by a good one later.
    assert_refused(
        with((TokenPlace::Header, &bad), vec![(TokenPlace::Query, u1.clone())]),
        401,
        "unauthorized",
    );
    assert_refused(
        with((TokenPlace::Subprotocol, &bad), vec![(TokenPlace::Query, u1.clone())]),
        401,
        "unauthorized",
    );
    assert_refused(
        with((TokenPlace::Header, &bad), vec![(TokenPlace::Subprotocol, u1.clone())]),
        401,
        "unauthorized",
    );
}

#[test]
fn expiry_and_not_before_are_checked_with_leeway() {
    let d = Daemon::start_default(); // leeway_secs = 30 by default
    let now = unix_now() as i64;
    let ok = |claims: Value| {
        let t = d.mint(&claims);
        connect(&d, &t, TokenPlace::Header).unwrap_or_else(|e| panic!("{claims}: {e}"))
    };
    let refused = |claims: Value| {
        let t = d.mint(&claims);
        assert_refused(connect(&d, &t, TokenPlace::Query), 401, "unauthorized");
    };
    refused(json!({"sub": "u1", "exp": now - 100}));
    refused(json!({"sub": "u1"})); // exp is required
    refused(json!({"sub": "u1", "exp": "soon"}));
    refused(json!({"sub": "u1", "exp": now + 3600, "nbf": now + 100}));
    refused(json!({"exp": now + 3600})); // no user
                                         // The spec does not say it outright; a demanding reading: an empty or non-string user id
                                         // names no user and is malformed.
    refused(json!({"sub": "", "exp": now + 3600}));
    refused(json!({"sub": 42, "exp": now + 3600}));
    ok(json!({"sub": "u1", "exp": now - 10})); // within the leeway
    ok(json!({"sub": "u1", "exp": now + 3600, "nbf": now + 10}));
    ok(json!({"sub": "u1", "exp": now + 3600, "iat": now, "extra": {"x": 1}}));
}

#[test]
fn forged_and_malformed_tokens_are_401() {
    let d = Daemon::start_default();
    let now = unix_now() as i64;
    let claims = json!({"sub": "u1", "exp": now + 3600});
    let good = d.mint(&claims);
    connect(&d, &good, TokenPlace::Header).expect("hand-made token with the daemon's key");
    let other_key = mint(b"another-key-entirely", &claims);
    // Payload swapped for another user's, signature kept.
    let parts: Vec<&str> = good.split('.').collect();
    let other_payload = d.mint(&json!({"sub": "u2", "exp": now + 3600}));
    let tampered = format!("{}.{}.{}", parts[0], other_payload.split('.').nth(1).unwrap(), parts[2]);
    let none = format!(
        "{}.{}.",
        switchboard::client::b64url(br#"{"alg":"none","typ":"JWT"}"#),
        switchboard::client::b64url(claims.to_string().as_bytes())
    );
    let hs512_label = mint_with_header(&d.jwt_secret(), &json!({"alg": "HS512", "typ": "JWT"}), &claims);
    let rs256_label = mint_with_header(&d.jwt_secret(), &json!({"alg": "RS256", "typ": "JWT"}), &claims);
    for (what, t) in [
        ("other key", other_key),
        ("tampered payload", tampered),
        ("alg none", none),
        ("HS512 label", hs512_label),
        ("RS256 label on an HMAC", rs256_label),
        ("two parts", format!("{}.{}", parts[0], parts[1])),
        ("junk", "x".repeat(40)),
    ] {
        for place in [TokenPlace::Header, TokenPlace::Subprotocol, TokenPlace::Query] {
            let r = connect(&d, &t, place);
            assert!(r.is_err(), "{what} in {place:?} was accepted");
            assert_refused(r, 401, "unauthorized");
        }
    }
}

#[test]
fn issuer_and_audience_are_checked_when_configured() {
    let d = Daemon::with_config("[jwt]\nissuer = \"https://issuer.test\"\naudience = \"switchboard-test\"\n");
    let exp = unix_now() + 3600;
    let base = json!({"sub": "u1", "exp": exp, "iss": "https://issuer.test", "aud": "switchboard-test"});
    connect(&d, &d.mint(&base), TokenPlace::Header).expect("right iss and aud");
    let mut aud_list = base.clone();
    aud_list["aud"] = json!(["other", "switchboard-test"]);
    connect(&d, &d.mint(&aud_list), TokenPlace::Header).expect("aud may be a list holding ours (RFC 7519)");
    let mut cases = Vec::new();
    for (k, v) in [("iss", json!("https://evil.test")), ("aud", json!("other")), ("aud", json!(["a", "b"]))] {
        let mut c = base.clone();
        c[k] = v;
        cases.push(c);
    }
    // A demanding reading: when an issuer or audience is configured, a token without the
    // claim does not pass the check.
    for k in ["iss", "aud"] {
        let mut c = base.clone();
        c.as_object_mut().unwrap().remove(k);
        cases.push(c);
    }
    for c in cases {
        assert!(connect(&d, &d.mint(&c), TokenPlace::Header).is_err(), "{c} was accepted");
        assert_refused(connect(&d, &d.mint(&c), TokenPlace::Header), 401, "unauthorized");
    }
}

#[test]
fn user_claim_and_user_id_length_are_honoured() {
    let d = Daemon::with_config("[jwt]\nuser_claim = \"uid\"\n");
    let exp = unix_now() + 3600;
    let c =
        connect(&d, &d.mint(&json!({"uid": "alice", "sub": "bob", "exp": exp})), TokenPlace::Header).unwrap();
    assert_eq!(c.welcome.str("user"), "alice");
    assert_refused(
        connect(&d, &d.mint(&json!({"sub": "bob", "exp": exp})), TokenPlace::Header),
        401,
        "unauthorized",
    );
    let max = "é".repeat(64); // 128 bytes of UTF-8
    let c =
        connect(&d, &d.mint(&json!({"uid": max, "exp": exp})), TokenPlace::Header).expect("128-byte user");
    assert_eq!(c.welcome.str("user"), max);
    let over = format!("{max}x");
    assert_refused(
        connect(&d, &d.mint(&json!({"uid": over, "exp": exp})), TokenPlace::Header),
        401,
        "unauthorized",
    );
}

#[test]
fn a_configured_hs256_secret_file_is_trimmed_and_used() {
    let d = Daemon::start(DaemonOpts {
        hs256_secret: Some("  test-hs256-secret-0123456789\t".into()),
        ..Default::default()
    });
    assert_eq!(d.jwt_secret(), b"test-hs256-secret-0123456789");
    let t = d.token("u1", &[], "1h");
    connect(&d, &t, TokenPlace::Header).expect("CLI token with --jwt-hs256-secret-file");
    let t = mint(b"test-hs256-secret-0123456789", &json!({"sub": "u1", "exp": unix_now() + 60}));
    connect(&d, &t, TokenPlace::Header).expect("token signed with the trimmed secret");
    let t = mint(b"  test-hs256-secret-0123456789\t", &json!({"sub": "u1", "exp": unix_now() + 60}));
    assert_refused(connect(&d, &t, TokenPlace::Header), 401, "unauthorized");
}

#[test]
fn allowlist_and_binding_give_the_same_403_for_foreign_and_absent_agents() {
    let d = Daemon::start_default();
    let a1 = d.hmac_agent("u1", "one");
    let a2 = d.hmac_agent("u1", "two");
    let b1 = d.hmac_agent("u2", "theirs");
    let limited = d.token("u1", &[a1.agent_id()], "1h");
    let open = d.token("u1", &[], "1h");
    let _online = d.agent(&a2);

    let bind = |t: &str, agent: &str| ClientConn::connect(d.addr, t, TokenPlace::Header, Some(agent));
    let refusals: Vec<ConnectError> = vec![
        assert_refused(bind(&limited, a2.agent_id()), 403, "forbidden"),
        assert_refused(bind(&limited, b1.agent_id()), 403, "forbidden"),
        assert_refused(bind(&limited, "no_such_agent_xyz"), 403, "forbidden"),
        assert_refused(bind(&open, b1.agent_id()), 403, "forbidden"),
        assert_refused(bind(&open, "no_such_agent_xyz"), 403, "forbidden"),
    ];
    // The same answer whether or not the agent exists: status and body are byte-identical.
    let bodies: Vec<String> = refusals
        .iter()
        .map(|e| match e {
            ConnectError::Refused { body, .. } => body.clone(),
            _ => unreachable!(),
        })
        .collect();
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "{bodies:?}");

    let c = bind(&limited, a1.agent_id()).unwrap();
    assert_eq!(c.welcome.value["agents"], json!([{"id": a1.agent_id(), "name": "one", "online": false}]));
    let c = connect(&d, &limited, TokenPlace::Header).unwrap();
    assert_eq!(c.welcome.value["agents"], json!([{"id": a1.agent_id(), "name": "one", "online": false}]));
    let c = bind(&open, a2.agent_id()).unwrap();
    assert_eq!(c.welcome.value["agents"], json!([{"id": a2.agent_id(), "name": "two", "online": true}]));
    let c = connect(&d, &open, TokenPlace::Header).unwrap();
    let mut agents: Vec<Value> = c.welcome.value["agents"].as_array().unwrap().clone();
    agents.sort_by_key(|a| a["name"].as_str().unwrap().to_string());
    assert_eq!(
        agents,
        vec![
            json!({"id": a1.agent_id(), "name": "one", "online": false}),
            json!({"id": a2.agent_id(), "name": "two", "online": true}),
        ],
        "every agent of the user and none of another's"
    );
}

/// Waits for the session to be closed; returns the code and when it happened.
fn wait_close(c: &mut ClientConn, timeout: Duration) -> (u16, Instant, Vec<String>) {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        match c.recv(deadline.saturating_duration_since(Instant::now())) {
            Event::Frame(f) => seen.push(f.text),
            Event::Close { code, .. } => return (code, Instant::now(), seen),
            other => panic!("expected a close, got {other:?} after {seen:?}"),
        }
    }
}

#[test]
fn an_expiring_token_is_warned_about_then_closed_with_4001_at_exp() {
    let d = Daemon::start_default();
    let t = d.token("u1", &[], "3s");
    let exp = jwt_claims(&t)["exp"].as_u64().unwrap();
    let mut c = connect(&d, &t, TokenPlace::Header).unwrap();
    let f = expect_type(&mut c, "error");
    assert_eq!(f.str("code"), "token_expiring", "right after welcome when < 30 s are left: {}", f.text);
    assert!(!f.str("message").is_empty());
    // The spec closes at exp (not exp + leeway).
    let (code, _, seen) = wait_close(&mut c, Duration::from_secs(exp.saturating_sub(unix_now()) + 4));
    assert_eq!(code, 4001, "frames before the close: {seen:?}");
    assert!(unix_now() + 1 >= exp, "closed before exp ({} < {exp})", unix_now());
}

#[test]
fn the_expiry_warning_comes_30_seconds_before_exp() {
    let d = Daemon::start_default();
    let t = d.token("u1", &[], "33s");
    let exp = jwt_claims(&t)["exp"].as_u64().unwrap();
    let mut c = connect(&d, &t, TokenPlace::Header).unwrap();
    let due = exp - 30;
    let f = next_frame(&mut c, Duration::from_secs(due.saturating_sub(unix_now()) + 3));
    assert_eq!(f.str("code"), "token_expiring", "{}", f.text);
    // Whole seconds on both clocks: allow one second of rounding, never a warning earlier.
    assert!(unix_now() + 1 >= due, "warned at {} for exp {exp} (due {due})", unix_now());
    assert_pong(&mut c);
}

#[test]
fn refresh_extends_the_session_and_a_short_new_token_is_warned_about() {
    let d = Daemon::start_default();
    let cred = d.hmac_agent("u1", "a");
    let t = d.token("u1", &[], "3s");
    let exp = jwt_claims(&t)["exp"].as_u64().unwrap();
    let mut c = connect(&d, &t, TokenPlace::Header).unwrap();
    assert_eq!(expect_type(&mut c, "error").str("code"), "token_expiring");
    c.refresh(&d.token("u1", &[], "8s")).unwrap();
    let f = expect_type(&mut c, "error");
    assert_eq!(f.str("code"), "token_expiring", "a new token with < 30 s left is warned about: {}", f.text);
    c.refresh(&d.token("u1", &[], "1h")).unwrap();
    // A refresh has no answer; the ping's pong comes next.
    assert_pong(&mut c);
    // Past the first and second tokens' exp the session lives on.
    std::thread::sleep(Duration::from_secs((exp + 1).saturating_sub(unix_now())));
    let mut a = d.agent(&cred);
    a.send(Some(&c.session), &json!("still here"), Some("m")).unwrap();
    assert_eq!(next_skipping(&mut a, &["session"], WAIT).ty(), "ack");
    let f = next_skipping(&mut c, &["presence"], WAIT);
    assert_eq!(f.ty(), "message", "{}", f.text);
    assert_eq!(f.value["data"], json!("still here"));
    // Past the 8 s token's exp too: the 1 h token is the one in force.
    std::thread::sleep(Duration::from_secs((exp + 7).saturating_sub(unix_now())));
    assert_pong(&mut c);
}

#[test]
fn a_failed_refresh_is_unauthorized_and_changes_nothing() {
    let d = Daemon::start_default();
    let a1 = d.hmac_agent("u1", "one");
    let a2 = d.hmac_agent("u1", "two");
    let t = d.token("u1", &[], "4s");
    let exp = jwt_claims(&t)["exp"].as_u64().unwrap();
    let mut c = ClientConn::connect(d.addr, &t, TokenPlace::Header, Some(a1.agent_id())).unwrap();
    assert_eq!(expect_type(&mut c, "error").str("code"), "token_expiring");
    let now = unix_now() as i64;
    for (what, bad) in [
        ("junk", "not-a-jwt".to_string()),
        ("other key", mint(b"other-key", &json!({"sub": "u1", "exp": now + 3600}))),
        ("expired", d.mint(&json!({"sub": "u1", "exp": now - 3600}))),
        ("other user", d.token("u2", &[], "1h")),
        ("allowlist without the bound agent", d.token("u1", &[a2.agent_id()], "1h")),
    ] {
        c.refresh(&bad).unwrap();
        let f = expect_type(&mut c, "error");
        assert_eq!(f.str("code"), "unauthorized", "{what}: {}", f.text);
        assert!(!f.str("message").is_empty());
    }
    assert_eq!(c.welcome.str("user"), "u1");
    // Still bound to a1 and still expiring at the first token's exp.
    c.send(Some(a2.agent_id()), &json!(1), Some("x")).unwrap();
    let f = expect_type(&mut c, "error");
    assert_eq!((f.str("code"), f.str("id")), ("not_allowed", "x"), "{}", f.text);
    let (code, _, seen) = wait_close(&mut c, Duration::from_secs(exp.saturating_sub(unix_now()) + 4));
    assert_eq!(code, 4001, "{seen:?}");
}

#[test]
fn a_refreshed_allowlist_applies_from_then_on() {
    let d = Daemon::start_default();
    let a1 = d.hmac_agent("u1", "one");
    let a2 = d.hmac_agent("u1", "two");
    let mut ag1 = d.agent(&a1);
    let mut ag2 = d.agent(&a2);
    let mut c = d.client(&d.token("u1", &[a1.agent_id(), a2.agent_id()], "1h"), None);
    let s = c.session.clone();
    for ag in [&mut ag1, &mut ag2] {
        assert_eq!(expect_type(ag, "session").str("session"), s);
    }
    c.refresh(&d.token("u1", &[a1.agent_id()], "1h")).unwrap();
    c.send(Some(a2.agent_id()), &json!("to two"), Some("t2")).unwrap();
    let f = expect_type(&mut c, "error");
    assert_eq!((f.str("code"), f.str("id")), ("not_allowed", "t2"), "{}", f.text);
    c.send(Some(a1.agent_id()), &json!("to one"), Some("t1")).unwrap();
    assert_eq!(expect_type(&mut c, "ack").str("id"), "t1");
    assert_eq!(expect_type(&mut ag1, "message").value["data"], json!("to one"));
    // a2 can no longer reach the session: addressed is not_allowed, a broadcast skips it, and
    // no session frame announced the change.
    ag2.send(Some(&s), &json!("from two"), Some("f2")).unwrap();
    let f = expect_type(&mut ag2, "error");
    assert_eq!((f.str("code"), f.str("id")), ("not_allowed", "f2"), "{}", f.text);
    ag2.send(None, &json!("bcast two"), Some("b2")).unwrap();
    assert_eq!(expect_type(&mut ag2, "ack").str("id"), "b2", "a broadcast reaching no session is acked");
    ag1.send(None, &json!("bcast one"), None).unwrap();
    let f = expect_type(&mut c, "message");
    assert_eq!(f.value["data"], json!("bcast one"), "only a1's broadcast arrives: {}", f.text);
    assert_pong(&mut c);
    assert_pong(&mut ag2);
}
