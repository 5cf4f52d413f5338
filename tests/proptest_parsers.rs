//! Property tests for every parser that faces unauthenticated or untrusted input: the HTTP
//! request head (`http::parse_request`, `check_upgrade`, `Request::client_token`), the inbound
//! envelope (`protocol::parse_inbound`), the agent credentials (`auth::check_upgrade_syntax`,
//! `verify_upgrade`, `verify_message`) and client JWTs (`auth::JwtVerifier`).
//!
//! The same parsers are fuzzed with cargo-fuzz (`fuzz/`, nightly features); these run on the
//! stable toolchain in the ordinary suite, with case counts kept small enough for a few
//! seconds in a debug build. Properties:
//! - nothing panics on arbitrary input (bytes, and mutations of valid input);
//! - a valid upgrade built from random valid parts parses, passes `check_upgrade`, and gives
//!   back every part (ids, timestamp, nonce, signature, query parameters percent-decoded,
//!   tokens in the §3.3 precedence);
//! - a valid head split at any byte is `Ok(None)` until its last byte and then the same
//!   request, whatever follows it;
//! - `parse_inbound` returns `data` byte-identical to what was written, whatever the JSON,
//!   key order, whitespace and unknown fields; any known key twice is `bad_frame`;
//! - `verify_message`/`verify_upgrade` accept exactly the signature over the spec's string
//!   and refuse any single-byte change of any field or of the signature;
//! - a JWT minted for a user verifies with that user and allowlist; any single-byte change
//!   is refused.

mod common;

use std::io::{Read, Write};
use std::sync::LazyLock;
use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::Config as PtConfig;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use switchboard::auth::{
    check_upgrade_syntax, mint_hs256, sign_message_ed25519, sign_message_hmac, sign_upgrade_ed25519,
    sign_upgrade_hmac, verify_message, verify_upgrade, AgentKey, JwtSettings, JwtVerifier, UpgradeHeaders,
};
use switchboard::http::{check_upgrade, parse_request, Endpoint, Refusal, MAX_HEADERS};
use switchboard::protocol::envelope::msg;
use switchboard::protocol::{parse_inbound, Kind};

fn cfg(cases: u32) -> PtConfig {
    PtConfig { cases, failure_persistence: None, ..PtConfig::default() }
}

// =============================================================================================
// Strategies

/// `[A-Za-z0-9_-]{min,max}`: relay ids, nonces.
fn id(min: usize, max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[A-Za-z0-9_-]{{{min},{max}}}")).unwrap()
}

/// Random ASCII-case spelling of a header name.
fn cased(name: &'static str) -> impl Strategy<Value = String> {
    vec(any::<bool>(), name.len()).prop_map(move |up| {
        name.chars()
            .zip(up)
            .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() })
            .collect()
    })
}

/// Optional whitespace (spaces and tabs) around a header value.
fn ows() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[ \t]{0,3}").unwrap()
}

/// A query value (any Unicode) and a valid form-urlencoding of it, with random choices of
/// which bytes are escaped, hex case, and `+` or `%20` for spaces.
fn query_value() -> impl Strategy<Value = (String, String)> {
    ("[a-zA-Z0-9._~ +/=&%?#é✓-]{0,24}", any::<u64>()).prop_map(|(value, mut bits)| {
        let mut enc = String::new();
        for &b in value.as_bytes() {
            let mut coin = || {
                bits = bits.rotate_left(1) ^ 0x9E37_79B9_7F4A_7C15;
                bits & 1 == 1
            };
            let plain = b.is_ascii_alphanumeric() || b"._~-/".contains(&b);
            if b == b' ' && coin() {
                enc.push('+');
            } else if plain && coin() {
                enc.push(b as char);
            } else if coin() {
                enc.push_str(&format!("%{b:02X}"));
            } else {
                enc.push_str(&format!("%{b:02x}"));
            }
        }
        (value, enc)
    })
}

/// A base64url JWT-looking token (the parser does not verify it).
fn token_text() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[A-Za-z0-9_-]{1,40}\\.[A-Za-z0-9_-]{1,40}\\.[A-Za-z0-9_-]{0,40}").unwrap()
}

#[derive(Debug, Clone)]
struct UpgradeParts {
    endpoint: Endpoint,
    ws_key: String,
    agent: Option<(String, String, String, String)>,
    query: Vec<(&'static str, String, String)>,
    authorization: Option<(String, String)>,
    protocol_bearer: Option<String>,
    offer_protocol: bool,
    names: Vec<String>,
    ows: Vec<String>,
    extra_headers: Vec<(String, String)>,
    shuffle: u64,
}

fn upgrade_parts() -> impl Strategy<Value = UpgradeParts> {
    let endpoint = prop_oneof![Just(Endpoint::Agent), Just(Endpoint::Client), Just(Endpoint::Echo)];
    let ws_key = vec(any::<u8>(), 16)
        .prop_map(|k| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, k));
    let agent = proptest::option::of((
        id(1, 64),
        "[0-9]{1,20}",
        id(16, 64),
        prop_oneof![vec(any::<u8>(), 32), vec(any::<u8>(), 64)]
            .prop_map(|s| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, s)),
    ));
    let query =
        proptest::sample::subsequence(vec!["access_token", "agent", "since", "epoch", "resume"], 0..=5)
            .prop_flat_map(|keys| {
                let n = keys.len();
                (Just(keys), vec(query_value(), n))
            })
            .prop_map(|(keys, vals)| {
                keys.into_iter().zip(vals).map(|(k, (v, e))| (k, v, e)).collect::<Vec<_>>()
            });
    let authorization = proptest::option::of((cased("bearer"), token_text()));
    let names = (
        cased("upgrade"),
        cased("connection"),
        cased("sec-websocket-key"),
        cased("sec-websocket-version"),
        cased("sec-websocket-protocol"),
        cased("authorization"),
        cased("x-switchboard-agent"),
        cased("x-switchboard-timestamp"),
        cased("x-switchboard-nonce"),
        cased("x-switchboard-signature"),
    )
        .prop_map(|t| vec![t.0, t.1, t.2, t.3, t.4, t.5, t.6, t.7, t.8, t.9]);
    let extra = vec(("X-[A-Za-z0-9-]{1,12}", "[ -~]{0,30}"), 0..4).prop_map(|v| {
        v.into_iter()
            .map(|(n, val): (String, String)| (n, val.trim_matches([' ', '\t']).to_string()))
            .collect()
    });
    (
        endpoint,
        ws_key,
        agent,
        query,
        authorization,
        proptest::option::of(token_text()),
        any::<bool>(),
        names,
        vec(ows(), 20),
        extra,
        any::<u64>(),
    )
        .prop_map(
            |(
                endpoint,
                ws_key,
                agent,
                query,
                authorization,
                protocol_bearer,
                offer,
                names,
                ows,
                extra,
                shuffle,
            )| {
                UpgradeParts {
                    endpoint,
                    ws_key,
                    agent,
                    query,
                    authorization,
                    offer_protocol: offer || protocol_bearer.is_some(),
                    protocol_bearer,
                    names,
                    ows,
                    extra_headers: extra,
                    shuffle,
                }
            },
        )
}

impl UpgradeParts {
    fn path(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Agent => "/v1/agent",
            Endpoint::Client => "/v1/client",
            _ => "/v1/echo",
        }
    }

    fn to_head(&self) -> String {
        let mut target = self.path().to_string();
        if !self.query.is_empty() {
            target.push('?');
            let q: Vec<String> = self.query.iter().map(|(k, _, e)| format!("{k}={e}")).collect();
            target.push_str(&q.join("&"));
        }
        let n = &self.names;
        let o = |i: usize| self.ows[i].as_str();
        let mut headers = vec![
            format!("{}:{}websocket{}", n[0], o(0), o(1)),
            format!("{}:{}Upgrade{}", n[1], o(2), o(3)),
            format!("{}:{}{}{}", n[2], o(4), self.ws_key, o(5)),
            format!("{}:{}13{}", n[3], o(6), o(7)),
        ];
        if self.offer_protocol {
            let mut list = vec!["switchboard.v1".to_string()];
            if let Some(b) = &self.protocol_bearer {
                list.insert((self.shuffle % 2) as usize, format!("bearer.{b}"));
            }
            headers.push(format!("{}:{}{}{}", n[4], o(8), list.join(", "), o(9)));
        }
        if let Some((scheme, tok)) = &self.authorization {
            headers.push(format!("{}:{}{} {}{}", n[5], o(10), scheme, tok, o(11)));
        }
        if let Some((a, t, nn, s)) = &self.agent {
            headers.push(format!("{}:{}{}{}", n[6], o(12), a, o(13)));
            headers.push(format!("{}:{}{}{}", n[7], o(14), t, o(15)));
            headers.push(format!("{}:{}{}{}", n[8], o(16), nn, o(17)));
            headers.push(format!("{}:{}{}{}", n[9], o(18), s, o(19)));
        }
        for (k, v) in &self.extra_headers {
            headers.push(format!("{k}: {v}"));
        }
        // A deterministic shuffle driven by the generated seed.
        let mut seed = self.shuffle;
        for i in (1..headers.len()).rev() {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            headers.swap(i, (seed >> 33) as usize % (i + 1));
        }
        let mut s = format!("GET {target} HTTP/1.1\r\nHost: relay.example\r\n");
        for h in headers {
            s.push_str(&h);
            s.push_str("\r\n");
        }
        s.push_str("\r\n");
        s
    }
}

/// An arbitrary JSON value, written compactly or pretty.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        "[\"\\\\/\u{0}-\u{1f}\u{7f}é😀]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            vec((any::<String>(), inner), 0..6)
                .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A JSON text for `data`: serde_json's compact or pretty form, or hand-written numbers and
/// escapes that serde_json itself would never produce (the relay must keep them as is).
fn data_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (json_value(), any::<bool>()).prop_map(|(v, pretty)| if pretty {
            serde_json::to_string_pretty(&v).unwrap()
        } else {
            serde_json::to_string(&v).unwrap()
        }),
        1 => prop_oneof![
            Just("-0.0e+00".to_string()),
            Just("1E400".to_string()),
            Just("123456789012345678901234567890".to_string()),
            Just(r#""\u0041\/\ud83d\ude00\"""#.to_string()),
            Just("[ 1 ,\t2 ,\n{ \"a\" : { } } ]".to_string()),
        ],
    ]
}

// =============================================================================================
// HTTP request head

proptest! {
    #![proptest_config(cfg(512))]

    #[test]
    fn http_parse_never_panics_on_bytes(buf in vec(any::<u8>(), 0..400), limit in 0usize..2048) {
        if let Ok(Some(r)) = parse_request(&buf, limit) {
            prop_assert!(r.head_len <= buf.len() && r.head_len <= limit);
            let _ = check_upgrade(&r);
            let _ = r.client_token();
            let _ = format!("{r:?}");
        }
    }
}

proptest! {
    #![proptest_config(cfg(256))]

    /// Random byte edits of a valid upgrade (where the interesting branches are).
    #[test]
    fn http_parse_never_panics_on_mutated_requests(
        parts in upgrade_parts(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut buf = parts.to_head().into_bytes();
        for (at, b) in edits {
            let i = at.index(buf.len());
            buf[i] = b;
        }
        for limit in [1024, 8192] {
            if let Ok(Some(r)) = parse_request(&buf, limit) {
                let _ = check_upgrade(&r);
                let _ = r.client_token();
                let _ = format!("{r:?}");
            }
        }
    }

    #[test]
    fn http_valid_upgrade_round_trips(parts in upgrade_parts()) {
        let head = parts.to_head();
        let req = parse_request(head.as_bytes(), 8192).unwrap().expect("complete head");
        prop_assert_eq!(req.head_len, head.len());
        prop_assert!(req.method_is_get && req.version_1_1 && req.upgrade_websocket && req.connection_upgrade);
        prop_assert_eq!(req.endpoint, parts.endpoint);
        prop_assert_eq!(req.ws_key.as_deref(), Some(parts.ws_key.as_str()));
        prop_assert_eq!(req.ws_version.as_deref(), Some("13"));
        prop_assert_eq!(check_upgrade(&req), Ok(()));
        prop_assert_eq!(req.offers_switchboard_v1, parts.offer_protocol);
        prop_assert_eq!(req.protocols_offered, parts.offer_protocol);
        prop_assert_eq!(req.bearer_from_protocol.as_deref(), parts.protocol_bearer.as_deref());
        let auth = parts.authorization.as_ref().map(|(_, t)| t.as_str());
        prop_assert_eq!(req.bearer_from_authorization.as_deref(), auth);
        let q = |k: &str| parts.query.iter().find(|(n, _, _)| *n == k).map(|(_, v, _)| v.clone());
        let access = q("access_token").filter(|v| !v.is_empty());
        prop_assert_eq!(&req.access_token, &access);
        prop_assert_eq!(&req.agent, &q("agent"));
        prop_assert_eq!(&req.since, &q("since"));
        prop_assert_eq!(&req.epoch, &q("epoch"));
        prop_assert_eq!(&req.resume, &q("resume"));
        let want_token = auth.or(parts.protocol_bearer.as_deref()).or(access.as_deref());
        prop_assert_eq!(req.client_token(), want_token);
        match &parts.agent {
            Some((a, t, n, s)) => {
                prop_assert_eq!(req.x_agent.as_deref(), Some(a.as_str()));
                prop_assert_eq!(req.x_timestamp.as_deref(), Some(t.as_str()));
                prop_assert_eq!(req.x_nonce.as_deref(), Some(n.as_str()));
                prop_assert_eq!(req.x_signature.as_deref(), Some(s.as_str()));
                // Syntactically these are valid agent headers: only the clock can refuse them.
                let h = UpgradeHeaders { agent_id: a, timestamp: t, nonce: n, signature: s };
                if let Some(now) = t.parse::<u64>().ok().filter(|&v| i64::try_from(v).is_ok()) {
                    prop_assert!(check_upgrade_syntax(&h, now, 300).is_ok());
                }
            }
            None => prop_assert!(req.x_agent.is_none() && req.x_signature.is_none()),
        }
        // Credentials never reach Debug output: it is the same whatever their values.
        let mut other = req.clone();
        let credentials = [
            &mut other.bearer_from_authorization,
            &mut other.bearer_from_protocol,
            &mut other.access_token,
            &mut other.x_signature,
        ];
        for v in credentials.into_iter().flatten() {
            *v = format!("{v}-other");
        }
        prop_assert_eq!(format!("{req:?}"), format!("{other:?}"));
    }
}

proptest! {
    #![proptest_config(cfg(96))]

    /// Incremental arrival: every strict prefix needs more bytes; the whole head is the same
    /// request whatever follows it (WebSocket frames, garbage).
    #[test]
    fn http_split_at_any_byte(parts in upgrade_parts(), tail in vec(any::<u8>(), 0..64)) {
        let head = parts.to_head().into_bytes();
        let whole = parse_request(&head, 8192).unwrap().expect("complete head");
        for i in 0..head.len() {
            prop_assert_eq!(parse_request(&head[..i], 8192), Ok(None), "prefix of {} bytes", i);
        }
        let mut with_tail = head.clone();
        with_tail.extend_from_slice(&tail);
        prop_assert_eq!(parse_request(&with_tail, 8192), Ok(Some(whole.clone())));
        // A limit below the head's size is 431 whether or not it is complete.
        let small = head.len() - 1;
        prop_assert_eq!(parse_request(&with_tail, small), Err(Refusal::HeadersTooLarge));
    }
}

#[test]
fn http_header_count_limit() {
    // MAX_HEADERS lines parse, one more is 431, complete or not.
    let mut s = String::from("GET /v1/agent HTTP/1.1\r\n");
    for i in 0..MAX_HEADERS {
        s.push_str(&format!("X-H{i}: v\r\n"));
    }
    assert!(parse_request(format!("{s}\r\n").as_bytes(), 1 << 20).unwrap().is_some());
    s.push_str("X-Over: v\r\n\r\n");
    assert_eq!(parse_request(s.as_bytes(), 1 << 20), Err(Refusal::HeadersTooLarge));
}

// =============================================================================================
// Envelope

const KNOWN_KEYS: [&str; 8] = ["type", "to", "id", "data", "ctr", "sig", "token", "seq"];

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// Known fields of a `send`, plus unknown ones, in random order with random whitespace.
fn frame_text(fields: &[(String, String)], ws: &[String], order: u64) -> String {
    let mut f: Vec<&(String, String)> = fields.iter().collect();
    let mut seed = order;
    for i in (1..f.len()).rev() {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        f.swap(i, (seed >> 33) as usize % (i + 1));
    }
    let w = |i: usize| ws[i % ws.len()].as_str();
    let body: Vec<String> = f
        .iter()
        .enumerate()
        .map(|(i, (k, v))| format!("{}{}{}:{}{}{}", w(i), k, w(i + 1), w(i + 2), v, w(i + 3)))
        .collect();
    format!("{}{{{}}}{}", w(7), body.join(","), w(8))
}

fn json_ws() -> impl Strategy<Value = Vec<String>> {
    vec(proptest::string::string_regex("[ \t\r\n]{0,2}").unwrap(), 9)
}

proptest! {
    #![proptest_config(cfg(512))]

    #[test]
    fn envelope_never_panics_on_bytes(buf in vec(any::<u8>(), 0..300)) {
        match parse_inbound(&buf) {
            Ok(i) => { let _ = format!("{i:?}"); }
            Err(e) => prop_assert_eq!(e.code(), "bad_frame"),
        }
    }
}

proptest! {
    #![proptest_config(cfg(256))]

    #[test]
    fn envelope_never_panics_on_mutated_frames(
        data in data_text(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let frame = format!(r#"{{"type":"send","to":"s_1","data":{data},"id":"m\"1","ctr":17,"sig":"AbC_-9"}}"#);
        let mut buf = frame.into_bytes();
        for (at, b) in edits {
            let i = at.index(buf.len());
            buf[i] = b;
        }
        let _ = parse_inbound(&buf);
        let _ = parse_inbound(&buf[..cut.index(buf.len() + 1)]);
    }

    /// `data` comes back as the exact bytes written, whatever it holds and wherever it stands.
    #[test]
    fn envelope_data_is_byte_exact(
        data in data_text(),
        to in proptest::option::of(any::<String>()),
        msg_id in proptest::option::of(any::<String>()),
        ctr in proptest::option::of(1u64..(1 << 53)),
        unknown in vec(("[a-z_]{1,6}", data_text()), 0..3),
        ws in json_ws(),
        order in any::<u64>(),
    ) {
        let mut fields = vec![(json_str("type"), json_str("send")), (json_str("data"), data.clone())];
        if let Some(t) = &to { fields.push((json_str("to"), json_str(t))); }
        if let Some(i) = &msg_id { fields.push((json_str("id"), json_str(i))); }
        if let Some(c) = ctr { fields.push((json_str("ctr"), c.to_string())); }
        for (k, v) in &unknown {
            if !KNOWN_KEYS.contains(&k.as_str()) { fields.push((json_str(k), v.clone())); }
        }
        let text = frame_text(&fields, &ws, order);
        let inb = match parse_inbound(text.as_bytes()) {
            Ok(i) => i,
            Err(e) => return Err(TestCaseError::fail(format!("{text}: {e}"))),
        };
        prop_assert_eq!(inb.kind, Kind::Send);
        prop_assert_eq!(inb.data.map(|d| d.get()), Some(data.as_str()));
        prop_assert_eq!(inb.to.as_deref(), to.as_deref());
        let raw_id = msg_id.as_deref().map(json_str);
        prop_assert_eq!(inb.id.map(|i| i.get()), raw_id.as_deref());
        prop_assert_eq!(inb.ctr.map(|c| c.value), ctr);
        let ctr_text = ctr.map(|c| c.to_string());
        prop_assert_eq!(inb.ctr.map(|c| c.decimal), ctr_text.as_deref());
    }

    /// Any known key given twice (either spelling, any values, anywhere) is `bad_frame`, and
    /// the error still carries the frame's `id` when the first one was a string.
    #[test]
    fn envelope_duplicate_known_keys_are_refused(
        key in proptest::sample::select(KNOWN_KEYS.to_vec()),
        escape_second in any::<bool>(),
        ws in json_ws(),
        order in any::<u64>(),
    ) {
        let value = |k: &str| -> String {
            match k {
                "type" => json_str("send"),
                "ctr" | "seq" => "5".into(),
                "data" => "{\"x\":[1]}".into(),
                _ => json_str("v_1"),
            }
        };
        let mut fields: Vec<(String, String)> = vec![
            (json_str("type"), json_str("send")),
            (json_str("data"), "1".into()),
        ];
        fields.retain(|(k, _)| k != &json_str(key));
        fields.push((json_str(key), value(key)));
        // The second spelling: as is, or with its first letter as a \u escape.
        let second = if escape_second {
            let mut c = key.chars();
            let first = c.next().unwrap();
            format!("\"\\u{:04x}{}\"", first as u32, c.as_str())
        } else {
            json_str(key)
        };
        fields.push((second, value(key)));
        let text = frame_text(&fields, &ws, order);
        match parse_inbound(text.as_bytes()) {
            Ok(_) => return Err(TestCaseError::fail(format!("accepted duplicate `{key}`: {text}"))),
            Err(e) => {
                prop_assert_eq!(e.code(), "bad_frame");
                prop_assert!(e.message.starts_with("duplicate field"), "{}: {}", text, e.message);
            }
        }
    }
}

#[test]
fn envelope_wrong_types_and_missing_fields() {
    for (frame, m) in [
        (r#"{"type":"send"}"#, msg::SEND_WITHOUT_DATA),
        (r#"{"type":"refresh"}"#, msg::REFRESH_WITHOUT_TOKEN),
        (r#"{"type":"ack"}"#, msg::ACK_WITHOUT_SEQ),
        (r#"{"type":1}"#, msg::TYPE_NOT_STRING),
        (r#"{"type":"send","data":1,"ctr":9007199254740992}"#, msg::BAD_CTR),
        (r#"{"type":"send","data":1,"ctr":"1"}"#, msg::BAD_CTR),
        (r#"{"type":"send","data":1,"sig":"a\/b"}"#, msg::BAD_SIG),
    ] {
        assert_eq!(parse_inbound(frame.as_bytes()).unwrap_err().message, m, "{frame}");
    }
}

// =============================================================================================
// Agent credentials

const SECRET: &[u8] = b"sbk_proptest_secret_0123456789";

fn ed_pair() -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&[42u8; 32]).unwrap()
}

fn ed_key(kp: &Ed25519KeyPair) -> AgentKey {
    AgentKey::ed25519(kp.public_key().as_ref().try_into().unwrap())
}

/// `s` with the byte at `at` replaced by a different byte from `alphabet` (so the string
/// stays ASCII and the same length).
fn change_byte(s: &str, at: prop::sample::Index, pick: u8, alphabet: &[u8]) -> String {
    let mut b = s.as_bytes().to_vec();
    let i = at.index(b.len());
    let mut c = alphabet[pick as usize % alphabet.len()];
    if c == b[i] {
        c = alphabet[(pick as usize + 1) % alphabet.len()];
    }
    b[i] = c;
    String::from_utf8(b).unwrap()
}

const ANY_ASCII: &[u8] =
    b" !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~\n";
const B64URL_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

proptest! {
    #![proptest_config(cfg(512))]

    #[test]
    fn agent_checks_never_panic(
        a in ".{0,80}", t in ".{0,30}", n in ".{0,80}", s in ".{0,100}", now in any::<u64>(), skew in any::<u64>(),
        data in vec(any::<u8>(), 0..100),
    ) {
        let h = UpgradeHeaders { agent_id: &a, timestamp: &t, nonce: &n, signature: &s };
        let _ = check_upgrade_syntax(&h, now, skew);
        let kp = ed_pair();
        let mut scratch = Vec::new();
        for key in [AgentKey::hmac(SECRET), ed_key(&kp)] {
            prop_assert!(!verify_upgrade(&key, &h));
            prop_assert!(!verify_message(&key, &a, &t, &n, &data, &s, &mut scratch));
        }
    }
}

proptest! {
    #![proptest_config(cfg(128))]

    /// §3.2: the signature over `switchboard-msg-v1\n<conn>\n<ctr>\n<to>\n<data>` verifies;
    /// one changed byte anywhere (conn, ctr, to, data, sig) does not.
    #[test]
    fn verify_message_accepts_exactly_the_spec_signature(
        conn in id(1, 64),
        ctr in 1u64..(1 << 53),
        to in prop_oneof![Just(String::new()), id(1, 64)],
        data in data_text(),
        which in 0usize..5,
        at in any::<prop::sample::Index>(),
        pick in any::<u8>(),
        ed in any::<bool>(),
    ) {
        let kp = ed_pair();
        let (key, sig) = if ed {
            (ed_key(&kp), sign_message_ed25519(&kp, &conn, ctr, &to, data.as_bytes()))
        } else {
            (AgentKey::hmac(SECRET), sign_message_hmac(SECRET, &conn, ctr, &to, data.as_bytes()))
        };
        // The signed string, computed here from the spec's text, not from the crate.
        let spec_string = format!("switchboard-msg-v1\n{conn}\n{ctr}\n{to}\n{data}");
        if !ed {
            let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET);
            let want = base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                ring::hmac::sign(&k, spec_string.as_bytes()),
            );
            prop_assert_eq!(&sig, &want);
        }
        let ctr_s = ctr.to_string();
        let mut scratch = Vec::new();
        prop_assert!(verify_message(&key, &conn, &ctr_s, &to, data.as_bytes(), &sig, &mut scratch));

        let (mut c, mut n, mut t, mut d, mut s) = (conn.clone(), ctr_s.clone(), to.clone(), data.clone().into_bytes(), sig.clone());
        match which {
            0 => c = change_byte(&conn, at, pick, ANY_ASCII),
            1 => n = change_byte(&ctr_s, at, pick, ANY_ASCII),
            2 if !to.is_empty() => t = change_byte(&to, at, pick, ANY_ASCII),
            // "" → one byte: a broadcast's signature does not cover an addressed send.
            2 => t = (ANY_ASCII[pick as usize % ANY_ASCII.len()] as char).to_string(),
            3 => {
                let i = at.index(d.len());
                d[i] = d[i].wrapping_add(pick.max(1));
            }
            _ => s = change_byte(&sig, at, pick, B64URL_CHARS),
        }
        prop_assert!(!verify_message(&key, &c, &n, &t, &d, &s, &mut scratch), "field {} changed", which);
    }

    /// §3.1, the same for the upgrade's signed string.
    #[test]
    fn verify_upgrade_accepts_exactly_the_spec_signature(
        agent in id(1, 64),
        ts in 0u64..10_000_000_000,
        nonce in id(16, 64),
        which in 0usize..4,
        at in any::<prop::sample::Index>(),
        pick in any::<u8>(),
        ed in any::<bool>(),
    ) {
        let kp = ed_pair();
        let (key, sig) = if ed {
            (ed_key(&kp), sign_upgrade_ed25519(&kp, &agent, ts, &nonce))
        } else {
            (AgentKey::hmac(SECRET), sign_upgrade_hmac(SECRET, &agent, ts, &nonce))
        };
        let ts_s = ts.to_string();
        let h = UpgradeHeaders { agent_id: &agent, timestamp: &ts_s, nonce: &nonce, signature: &sig };
        prop_assert_eq!(check_upgrade_syntax(&h, ts, 300), Ok(ts as i64));
        prop_assert!(verify_upgrade(&key, &h));
        let (mut a, mut t, mut n, mut s) = (agent.clone(), ts_s.clone(), nonce.clone(), sig.clone());
        match which {
            0 => a = change_byte(&agent, at, pick, ANY_ASCII),
            1 => t = change_byte(&ts_s, at, pick, ANY_ASCII),
            2 => n = change_byte(&nonce, at, pick, ANY_ASCII),
            _ => s = change_byte(&sig, at, pick, B64URL_CHARS),
        }
        let h = UpgradeHeaders { agent_id: &a, timestamp: &t, nonce: &n, signature: &s };
        prop_assert!(!verify_upgrade(&key, &h), "field {} changed", which);
    }
}

// =============================================================================================
// JWT

const JWT_SECRET: &[u8] = b"proptest-jwt-secret";
const NOW: u64 = 1_900_000_000;
/// A fixed P-256 public key (its private half is in fuzz/fuzz_targets/jwt.rs).
const ES_PUB_PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAErjasOHrTdybMDHrONG4WRfFWTNnF
h8yBGxbKR1tLYL/IZAGxP/c10myKrgKRpNH3IfFSYkuMC+uvk8Bw7FEMYQ==
-----END PUBLIC KEY-----
";

fn hs_verifier() -> &'static JwtVerifier {
    static V: LazyLock<JwtVerifier> = LazyLock::new(|| {
        JwtVerifier::new(&JwtSettings { hs256_secret: Some(JWT_SECRET.to_vec()), ..JwtSettings::default() })
            .unwrap()
    });
    &V
}

fn es_verifier() -> &'static JwtVerifier {
    static V: LazyLock<JwtVerifier> = LazyLock::new(|| {
        JwtVerifier::new(&JwtSettings {
            public_keys: vec![("ES256".into(), ES_PUB_PEM.as_bytes().to_vec())],
            ..JwtSettings::default()
        })
        .unwrap()
    });
    &V
}

proptest! {
    #![proptest_config(cfg(512))]

    #[test]
    fn jwt_never_panics_on_strings(
        token in prop_oneof![
            ".{0,200}",
            "[A-Za-z0-9_=-]{0,60}\\.[A-Za-z0-9_=-]{0,60}\\.[A-Za-z0-9_=-]{0,90}",
        ],
    ) {
        prop_assert!(hs_verifier().verify_at(&token, NOW).is_err());
        prop_assert!(es_verifier().verify_at(&token, NOW).is_err());
        let _ = hs_verifier().verify(&token);
    }

    /// Tokens whose parts are base64url of arbitrary JSON-ish bytes, correctly signed: the
    /// claim rules behind the signature never panic either.
    #[test]
    fn jwt_signed_arbitrary_claims_never_panic(
        header in prop_oneof![Just(br#"{"alg":"HS256"}"#.to_vec()), vec(any::<u8>(), 0..40)],
        claims in prop_oneof![
            data_text().prop_map(String::into_bytes),
            (".{0,20}", any::<f64>(), proptest::option::of(any::<i64>())).prop_map(|(u, exp, nbf)| {
                let mut m = serde_json::Map::new();
                m.insert("sub".into(), u.into());
                m.insert("exp".into(), serde_json::Number::from_f64(exp).map_or(serde_json::Value::Null, Into::into));
                if let Some(n) = nbf { m.insert("nbf".into(), n.into()); }
                serde_json::to_vec(&m).unwrap()
            }),
        ],
    ) {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B;
        let si = format!("{}.{}", base64::Engine::encode(&B, &header), base64::Engine::encode(&B, &claims));
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, JWT_SECRET);
        let token = format!("{si}.{}", base64::Engine::encode(&B, ring::hmac::sign(&k, si.as_bytes())));
        if let Ok(c) = hs_verifier().verify_at(&token, NOW) {
            prop_assert!(!c.user.is_empty() && c.user.len() <= 128);
            prop_assert!(NOW < c.exp.saturating_add(30));
        }
        prop_assert!(es_verifier().verify_at(&token, NOW).is_err());
    }
}

proptest! {
    #![proptest_config(cfg(128))]

    #[test]
    fn jwt_minted_verifies_and_any_byte_change_is_refused(
        user in "[^\u{0}]{1,30}",
        agents in vec(id(1, 64), 0..4),
        ttl in 60u64..100_000,
        at in any::<prop::sample::Index>(),
        pick in any::<u8>(),
    ) {
        let v = hs_verifier();
        let token = mint_hs256(JWT_SECRET, &user, &agents, ttl, NOW);
        let c = v.verify_at(&token, NOW).unwrap();
        prop_assert_eq!(&c.user, &user);
        prop_assert_eq!(c.exp, NOW + ttl);
        prop_assert_eq!(c.agents, (!agents.is_empty()).then_some(agents));
        let changed = change_byte(&token, at, pick, B64URL_CHARS);
        prop_assert!(v.verify_at(&changed, NOW).is_err(), "a changed token verified");
        prop_assert!(es_verifier().verify_at(&token, NOW).is_err());
    }
}

/// REGRESSION (fixed in src/auth/jwt.rs `rsa_components`, found reviewing the key loader for
/// the `jwt` fuzz target): an RS256 public key whose modulus is zero or empty made it compute
/// `0 * 8 - 8`, an overflow panic in debug builds (a wrap, then a refusal, in release), when
/// the configuration is loaded or reloaded. A bad key file must be a refused configuration.
#[test]
fn rs256_key_with_a_zero_or_empty_modulus_is_refused_not_a_panic() {
    for der_b64 in ["MAYCAQACAQM=", "MAQCAAIA"] {
        let pem = format!("-----BEGIN RSA PUBLIC KEY-----\n{der_b64}\n-----END RSA PUBLIC KEY-----\n");
        let settings =
            JwtSettings { public_keys: vec![("RS256".into(), pem.into_bytes())], ..JwtSettings::default() };
        assert!(JwtVerifier::new(&settings).is_err(), "{der_b64}");
    }
}

// =============================================================================================
// Reproducers of bugs found by the conformance run (Autobahn cases 5.6, 5.8, 5.19, 5.20)

/// A masked client frame.
fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut f = vec![(u8::from(fin) << 7) | opcode, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// A ping that arrives between the fragments of a message, in the same read as the final
/// fragment, is answered before the message's echo (RFC 6455 §5.5.2: "as soon as is
/// practical"; Autobahn 5.6, 5.19, 5.20 and 5.8 check the order). Regression test: pongs used to
/// reach the outbound queue only at the end of the read batch.
#[test]
fn pong_is_sent_before_the_echo_of_a_message_it_interrupted() {
    let d = common::Daemon::with_config("[server]\necho_endpoint = true\n");
    let mut s = std::net::TcpStream::connect(d.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(common::upgrade_head("/v1/echo", &[]).as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed during the handshake");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    assert!(buf.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&buf));
    buf.drain(..head_end);
    // One write: text fragment, ping, final continuation fragment.
    let mut frames = client_frame(false, 0x1, b"fragment1");
    frames.extend(client_frame(true, 0x9, b"ping payload"));
    frames.extend(client_frame(true, 0x0, b"fragment2"));
    s.write_all(&frames).unwrap();
    while buf.len() < 2 {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed before answering");
        buf.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(buf[0], 0x8A, "the first frame back is not the pong (opcode byte {:#04x})", buf[0]);
}
