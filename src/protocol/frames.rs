//! Outbound frames (protocol §4.1, §4.3, §4.5): every relay → peer JSON frame, built as a
//! complete, unmasked WebSocket server frame (FIN + opcode, 2/4/10-byte length header) in a
//! [`Bytes`], ready to be queued to any number of recipients and written as is.
//!
//! What must stay true:
//! - One buffer allocation per frame: room for the longest header is reserved up front, the
//!   JSON is written after it, the real header is filled in right before the payload and the
//!   front is skipped (`Buf::advance`, no copy). Recipients share the frame by refcount
//!   (`Bytes::clone`); nothing is copied per recipient. (`bytes` adds its small refcount
//!   header once per frame, when it is first shared.) `message` frames reserve their exact
//!   size, so no spare capacity is carried on the hot path. Measured (benches/frames.rs):
//!   ~80 ns for a 64 B message frame, ~150 ns for 1 KiB, ~15-19 ns per extra recipient.
//! - `data` is copied byte for byte from the sender's frame (see `envelope`): never parsed,
//!   never re-serialized. The caller passes only bytes that came out of `parse_inbound`.
//! - Every string that is not a relay id (`user`, agent `name`, error `message`) is
//!   JSON-escaped; relay ids take a fast path only after a check that they need no escaping,
//!   so no input can ever produce invalid JSON.
//! - All message construction goes through [`message`] (one place for [resume] `seq`/`epoch`).

use bytes::{Buf, Bytes};
use serde_json::value::RawValue;

use super::envelope::FrameError;

/// Longest server frame header: 2 bytes + 8-byte extended length (no mask).
const HEADER_ROOM: usize = 10;
/// FIN + text.
const FIN_TEXT: u8 = 0x81;
/// FIN + close.
const FIN_CLOSE: u8 = 0x88;
/// FIN + ping.
const FIN_PING: u8 = 0x89;

/// One frame being built: `HEADER_ROOM` placeholder bytes, then the JSON payload.
struct FrameBuf(Vec<u8>);

impl FrameBuf {
    fn with_payload_capacity(payload: usize) -> Self {
        let mut v = Vec::with_capacity(HEADER_ROOM + payload);
        v.extend_from_slice(&[0; HEADER_ROOM]);
        FrameBuf(v)
    }

    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }

    /// `s` as a JSON string.
    fn str(&mut self, s: &str) -> &mut Self {
        if needs_no_escape(s) {
            self.0.push(b'"');
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(b'"');
        } else {
            // Writing into a Vec cannot fail (short of aborting on OOM).
            let _ = serde_json::to_writer(&mut self.0, s);
        }
        self
    }

    fn u64(&mut self, mut n: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.raw(&digits[i..])
    }

    fn bool(&mut self, b: bool) -> &mut Self {
        self.raw(if b { b"true" } else { b"false" })
    }

    /// Fills in the header right before the payload and drops the unused front.
    fn finish(self, first_byte: u8) -> Bytes {
        let mut v = self.0;
        let len = v.len() - HEADER_ROOM;
        let start = if len < 126 {
            v[8] = first_byte;
            v[9] = len as u8;
            8
        } else if len <= 0xFFFF {
            v[6] = first_byte;
            v[7] = 126;
            v[8..10].copy_from_slice(&(len as u16).to_be_bytes());
            6
        } else {
            v[0] = first_byte;
            v[1] = 127;
            v[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            0
        };
        let mut frame = Bytes::from(v);
        frame.advance(start);
        frame
    }
}

/// True when `s` can stand between quotes as is: no `"`, `\` or control character
/// (what serde_json would escape). Relay ids (`[A-Za-z0-9_-]`) always pass.
fn needs_no_escape(s: &str) -> bool {
    s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\')
}

/// Payload bytes of `s` as a JSON string when it needs no escape (a capacity hint otherwise).
fn str_len(s: &str) -> usize {
    s.len() + 2
}

/// `{"type":"message","from":"<from>",["seq":N,]["epoch":"<epoch>",]"data":<data>}` — the one
/// builder of message frames. `seq` is the [resume] stream or mailbox position; client
/// streams also carry their epoch.
fn message(from: &str, data: &[u8], seq: Option<u64>, epoch: Option<&str>) -> Bytes {
    const HEAD: &[u8] = br#"{"type":"message","from":"#;
    const SEQ: &[u8] = br#","seq":"#;
    const EPOCH: &[u8] = br#","epoch":"#;
    const DATA: &[u8] = br#","data":"#;
    let mut cap = HEAD.len() + str_len(from) + DATA.len() + data.len() + 1;
    if seq.is_some() {
        cap += SEQ.len() + 20;
    }
    if let Some(epoch) = epoch {
        cap += EPOCH.len() + str_len(epoch);
    }
    let mut f = FrameBuf::with_payload_capacity(cap);
    f.raw(HEAD).str(from);
    if let Some(n) = seq {
        f.raw(SEQ).u64(n);
    }
    if let Some(epoch) = epoch {
        f.raw(EPOCH).str(epoch);
    }
    f.raw(DATA).raw(data).raw(b"}");
    f.finish(FIN_TEXT)
}

/// Relay → client, part of a stream (spec §8):
/// `{"type":"message","from":"<agent_id>","seq":N,"epoch":"<epoch>","data":<data>}`.
pub fn stream_message(from_agent: &str, seq: u64, epoch: &str, data: &[u8]) -> Bytes {
    message(from_agent, data, Some(seq), Some(epoch))
}

/// Relay → agent, from its mailbox (spec §8):
/// `{"type":"message","from":"<session>","seq":N,"data":<data>}`.
pub fn mailbox_message(from_session: &str, seq: u64, data: &[u8]) -> Bytes {
    message(from_session, data, Some(seq), None)
}

/// `{"type":"resumed","agent":"<agent_id>","recovered":true|false}` (spec §8).
pub fn resumed(agent: &str, recovered: bool) -> Bytes {
    let mut f = FrameBuf::with_payload_capacity(48 + str_len(agent));
    f.raw(br#"{"type":"resumed","agent":"#).str(agent).raw(br#","recovered":"#).bool(recovered).raw(b"}");
    f.finish(FIN_TEXT)
}

/// Relay → agent: `{"type":"message","from":"<session>","data":<data>}`.
/// `data` must be the exact bytes of a JSON value (an `Inbound::data` of the sender's frame).
pub fn message_to_agent(from_session: &str, data: &[u8]) -> Bytes {
    message(from_session, data, None, None)
}

/// Relay → client: `{"type":"message","from":"<agent_id>","data":<data>}`.
/// `data` must be the exact bytes of a JSON value (an `Inbound::data` of the sender's frame).
pub fn message_to_client(from_agent: &str, data: &[u8]) -> Bytes {
    message(from_agent, data, None, None)
}

/// Relay → agent, first frame:
/// `{"type":"welcome","conn":..,"agent":..,"user":..,"sessions":[..],"heartbeat_secs":N}`.
pub fn welcome_agent(
    conn: &str,
    agent_id: &str,
    user: &str,
    sessions: &[&str],
    heartbeat_secs: u64,
) -> Bytes {
    let cap = 96
        + str_len(conn)
        + str_len(agent_id)
        + str_len(user)
        + sessions.iter().map(|s| str_len(s) + 1).sum::<usize>();
    let mut f = FrameBuf::with_payload_capacity(cap);
    f.raw(br#"{"type":"welcome","conn":"#).str(conn);
    f.raw(br#","agent":"#).str(agent_id);
    f.raw(br#","user":"#).str(user);
    f.raw(br#","sessions":["#);
    for (i, s) in sessions.iter().enumerate() {
        if i > 0 {
            f.raw(b",");
        }
        f.str(s);
    }
    f.raw(br#"],"heartbeat_secs":"#).u64(heartbeat_secs).raw(b"}");
    f.finish(FIN_TEXT)
}

/// Relay → client, first frame: `{"type":"welcome","session":..,"user":..,
/// "agents":[{"id":..,"name":..,"online":bool},..],"heartbeat_secs":N}`.
/// `agents` are `(agent_id, name, online)`.
pub fn welcome_client(
    session: &str,
    user: &str,
    agents: &[(&str, &str, bool)],
    heartbeat_secs: u64,
) -> Bytes {
    let cap = 96
        + str_len(session)
        + str_len(user)
        + agents.iter().map(|(id, name, _)| 30 + str_len(id) + str_len(name)).sum::<usize>();
    let mut f = FrameBuf::with_payload_capacity(cap);
    f.raw(br#"{"type":"welcome","session":"#).str(session);
    f.raw(br#","user":"#).str(user);
    f.raw(br#","agents":["#);
    for (i, (id, name, online)) in agents.iter().enumerate() {
        if i > 0 {
            f.raw(b",");
        }
        f.raw(br#"{"id":"#).str(id);
        f.raw(br#","name":"#).str(name);
        f.raw(br#","online":"#).bool(*online).raw(b"}");
    }
    f.raw(br#"],"heartbeat_secs":"#).u64(heartbeat_secs).raw(b"}");
    f.finish(FIN_TEXT)
}

/// Relay → agent: `{"type":"session","session":"<session>","open":true|false}`.
pub fn session_event(session: &str, open: bool) -> Bytes {
    let mut f = FrameBuf::with_payload_capacity(44 + str_len(session));
    f.raw(br#"{"type":"session","session":"#).str(session);
    f.raw(br#","open":"#).bool(open).raw(b"}");
    f.finish(FIN_TEXT)
}

/// Relay → client: `{"type":"presence","agent":"<agent_id>","online":true|false}`.
pub fn presence(agent: &str, online: bool) -> Bytes {
    let mut f = FrameBuf::with_payload_capacity(44 + str_len(agent));
    f.raw(br#"{"type":"presence","agent":"#).str(agent);
    f.raw(br#","online":"#).bool(online).raw(b"}");
    f.finish(FIN_TEXT)
}

fn ack_frame(id_raw: &RawValue, queued: bool) -> Bytes {
    let id = id_raw.get().as_bytes();
    let mut f = FrameBuf::with_payload_capacity(36 + id.len());
    f.raw(br#"{"type":"ack","id":"#).raw(id);
    if queued {
        f.raw(br#","queued":true"#);
    }
    f.raw(b"}");
    f.finish(FIN_TEXT)
}

/// `{"type":"ack","id":<id>}`, the id echoed byte-exact (`Inbound::id`, a JSON string).
pub fn ack(id_raw: &RawValue) -> Bytes {
    ack_frame(id_raw, false)
}

/// [resume] `{"type":"ack","id":<id>,"queued":true}`: stored durably, not yet delivered.
pub fn ack_queued(id_raw: &RawValue) -> Bytes {
    ack_frame(id_raw, true)
}

/// `{"type":"error","code":"<code>","id":<id>,"message":"<message>"}`; `id` only when the
/// offending frame had one (echoed byte-exact), `message` escaped.
pub fn error(code: &str, id_raw: Option<&RawValue>, message: &str) -> Bytes {
    let id_len = id_raw.map_or(0, |id| id.get().len() + 6);
    let mut f = FrameBuf::with_payload_capacity(40 + str_len(code) + id_len + str_len(message));
    f.raw(br#"{"type":"error","code":"#).str(code);
    if let Some(id) = id_raw {
        f.raw(br#","id":"#).raw(id.get().as_bytes());
    }
    f.raw(br#","message":"#).str(message).raw(b"}");
    f.finish(FIN_TEXT)
}

/// The `bad_frame` answer to an envelope that did not parse.
pub fn bad_frame(err: &FrameError<'_>) -> Bytes {
    error(FrameError::CODE, err.id, err.message)
}

/// `{"type":"pong"}`, the answer to an application-level `ping`.
const PONG: &[u8] = b"\x81\x0f{\"type\":\"pong\"}";

/// `{"type":"pong"}` as a text frame (static, shared, no allocation).
/// A data frame carrying `payload` as is (the conformance echo endpoint only).
pub fn data_frame(binary: bool, payload: &[u8]) -> Bytes {
    let mut b = FrameBuf::with_payload_capacity(payload.len());
    b.raw(payload);
    b.finish(if binary { 0x82 } else { 0x81 })
}

pub fn pong() -> Bytes {
    Bytes::from_static(PONG)
}

/// A WebSocket ping control frame with an empty payload (static).
pub fn ping_frame() -> Bytes {
    Bytes::from_static(&[FIN_PING, 0])
}

/// A WebSocket close control frame: `code` then `reason`, the reason cut at a UTF-8 boundary
/// to fit the 125-byte control-frame limit. The caller picks a code valid on the wire (§7).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
    let mut v = Vec::with_capacity(4 + reason.len());
    v.push(FIN_CLOSE);
    v.push((2 + reason.len()) as u8);
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(reason);
    Bytes::from(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::envelope::parse_inbound;
    use serde_json::{json, Value};
    use std::io::Cursor;
    use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
    use tungstenite::protocol::frame::FrameHeader;

    /// Decodes one whole frame with tungstenite; checks FIN, no RSV, no mask, exact length.
    fn decode(frame: &[u8]) -> (OpCode, usize, &[u8]) {
        let mut c = Cursor::new(frame);
        let (h, len) = FrameHeader::parse(&mut c).unwrap().expect("complete header");
        assert!(h.is_final && !h.rsv1 && !h.rsv2 && !h.rsv3);
        assert_eq!(h.mask, None);
        let hl = c.position() as usize;
        assert_eq!(hl + len as usize, frame.len(), "length field must cover exactly the payload");
        (h.opcode, hl, &frame[hl..])
    }

    fn json_of(frame: &[u8]) -> Value {
        let (op, _, payload) = decode(frame);
        assert_eq!(op, OpCode::Data(Data::Text));
        serde_json::from_slice(payload).unwrap()
    }

    #[test]
    fn builders_match_spec_field_names() {
        let d = br#"{"k":[1,2]}"#;
        assert_eq!(
            json_of(&message_to_agent("s_1", d)),
            json!({"type":"message","from":"s_1","data":{"k":[1,2]}})
        );
        assert_eq!(
            json_of(&message_to_client("ag-9", b"null")),
            json!({"type":"message","from":"ag-9","data":null})
        );
        assert_eq!(
            json_of(&stream_message("ag", 18446744073709551615, "ep_1", b"7")),
            json!({"type":"message","from":"ag","seq":18446744073709551615u64,"epoch":"ep_1","data":7})
        );
        assert_eq!(
            json_of(&mailbox_message("s_1", 3, b"[1]")),
            json!({"type":"message","from":"s_1","seq":3,"data":[1]})
        );
        assert_eq!(
            json_of(&resumed("ag_1", true)),
            json!({"type":"resumed","agent":"ag_1","recovered":true})
        );
        assert_eq!(
            json_of(&resumed("ag_1", false)),
            json!({"type":"resumed","agent":"ag_1","recovered":false})
        );
        assert_eq!(
            json_of(&welcome_agent("c1", "ag_1", "alice", &["s1", "s2"], 30)),
            json!({"type":"welcome","conn":"c1","agent":"ag_1","user":"alice","sessions":["s1","s2"],"heartbeat_secs":30})
        );
        assert_eq!(
            json_of(&welcome_agent("c1", "ag_1", "alice", &[], 0)),
            json!({"type":"welcome","conn":"c1","agent":"ag_1","user":"alice","sessions":[],"heartbeat_secs":0})
        );
        assert_eq!(
            json_of(&welcome_client("s1", "bob", &[("a1", "Laptop", true), ("a2", "GW", false)], 15)),
            json!({"type":"welcome","session":"s1","user":"bob","agents":[
                {"id":"a1","name":"Laptop","online":true},{"id":"a2","name":"GW","online":false}],"heartbeat_secs":15})
        );
        assert_eq!(
            json_of(&welcome_client("s1", "bob", &[], 30)),
            json!({"type":"welcome","session":"s1","user":"bob","agents":[],"heartbeat_secs":30})
        );
        assert_eq!(json_of(&session_event("s1", true)), json!({"type":"session","session":"s1","open":true}));
        assert_eq!(
            json_of(&session_event("s1", false)),
            json!({"type":"session","session":"s1","open":false})
        );
        assert_eq!(json_of(&presence("a1", true)), json!({"type":"presence","agent":"a1","online":true}));
        assert_eq!(json_of(&presence("a1", false)), json!({"type":"presence","agent":"a1","online":false}));
        let id = RawValue::from_string(r#""m\u00e9-1""#.into()).unwrap();
        let a = ack(&id);
        assert_eq!(decode(&a).2, br#"{"type":"ack","id":"m\u00e9-1"}"#);
        assert_eq!(json_of(&ack_queued(&id)), json!({"type":"ack","id":"m\u{e9}-1","queued":true}));
        assert_eq!(
            json_of(&error("offline", Some(&id), "agent is not connected")),
            json!({"type":"error","code":"offline","id":"m\u{e9}-1","message":"agent is not connected"})
        );
        assert_eq!(
            json_of(&error("token_expiring", None, "token expires in 30 s")),
            json!({"type":"error","code":"token_expiring","message":"token expires in 30 s"})
        );
        assert_eq!(&pong()[..], &*{
            let mut f = FrameBuf::with_payload_capacity(0);
            f.raw(br#"{"type":"pong"}"#);
            f.finish(FIN_TEXT)
        });
        assert_eq!(json_of(&pong()), json!({"type":"pong"}));
    }

    #[test]
    fn error_echoes_id_raw_and_bad_frame() {
        let text = br#"{"type":"nope","id":"x\"y"}"#;
        let e = parse_inbound(text).unwrap_err();
        let f = bad_frame(&e);
        let (_, _, payload) = decode(&f);
        let echoed = br#""id":"x\"y""#;
        assert!(payload.windows(echoed.len()).any(|w| w == echoed));
        assert_eq!(json_of(&f), json!({"type":"error","code":"bad_frame","id":"x\"y","message":e.message}));
    }

    #[test]
    fn strings_are_escaped() {
        let nasty = "a\"b\\c\nd\u{1}\u{7f}é😀\u{2028}</script>";
        assert_eq!(json_of(&welcome_agent("c", "a", nasty, &[], 1))["user"], nasty);
        let w = json_of(&welcome_client("s", nasty, &[("a", nasty, true)], 1));
        assert_eq!((&w["user"], &w["agents"][0]["name"]), (&json!(nasty), &json!(nasty)));
        assert_eq!(json_of(&error("c", None, nasty))["message"], nasty);
        // Even ids that break the relay's own rules cannot break the JSON.
        assert_eq!(json_of(&message_to_agent("\"},\"x\":{\"", b"1"))["from"], "\"},\"x\":{\"");
        assert_eq!(json_of(&presence("a\\", true))["agent"], "a\\");
        assert_eq!(json_of(&session_event("\n", true))["session"], "\n");
        assert!(needs_no_escape("AZaz09_-"));
        assert!(!needs_no_escape("a\tb"));
    }

    fn message_with_payload_len(target: usize) -> Bytes {
        let overhead = message_to_client("a", b"").len() - 2;
        let d = format!("\"{}\"", "x".repeat(target - overhead - 2));
        message_to_client("a", d.as_bytes())
    }

    #[test]
    fn header_length_boundaries() {
        for (payload, header_len, second) in [
            (125usize, 2usize, 125u8),
            (126, 4, 126),
            (127, 4, 126),
            (65535, 4, 126),
            (65536, 10, 127),
            (65537, 10, 127),
            (1 << 20, 10, 127),
        ] {
            let f = message_with_payload_len(payload);
            let (op, hl, p) = decode(&f);
            assert_eq!(op, OpCode::Data(Data::Text));
            assert_eq!((hl, p.len()), (header_len, payload), "payload {payload}");
            assert_eq!(f[0], 0x81);
            assert_eq!(f[1], second, "minimal length encoding for {payload}");
            assert!(serde_json::from_slice::<Value>(p).is_ok());
        }
    }

    #[test]
    fn data_is_carried_byte_exact() {
        for data in [
            "{ \"a\" :\t[ 1 ,\n2 ] }",
            r#""caf\u00e9 \ud83d\ude00 \"q\" \\ \/""#,
            "\"caf\u{e9} \u{1F600}\"",
            "123456789012345678901234567890123456789",
            "1.0000000000000000000000001e-400",
            "-0.0",
            "null",
        ] {
            let text = format!("{{\"type\":\"send\",\"to\":\"s_1\",\"data\":  {data}  ,\"id\":\"1\"}}");
            let inbound = parse_inbound(text.as_bytes()).unwrap();
            let raw = inbound.data.unwrap().get().as_bytes();
            for f in [message_to_agent("s_1", raw), message_to_client("ag", raw)] {
                let (_, _, payload) = decode(&f);
                let prefix_len = payload.len() - data.len() - 1;
                assert_eq!(&payload[prefix_len..payload.len() - 1], data.as_bytes());
                assert!(payload[..prefix_len].ends_with(b"\"data\":"));
                assert_eq!(payload.last(), Some(&b'}'));
            }
        }
    }

    #[test]
    fn message_frames_are_exact_size_and_shared_by_refcount() {
        let f = message_to_agent("s_1", br#"{"x":1}"#);
        let payload_len = br#"{"type":"message","from":"s_1","data":{"x":1}}"#.len();
        assert_eq!(f.len(), 2 + payload_len);
        let clones: Vec<Bytes> = (0..100).map(|_| f.clone()).collect();
        assert!(clones.iter().all(|c| c.as_ptr() == f.as_ptr() && c[..] == f[..]));
    }

    #[test]
    fn control_frames() {
        let p = ping_frame();
        let (op, _, payload) = decode(&p);
        assert_eq!((op, payload.len()), (OpCode::Control(Control::Ping), 0));

        let c = close_frame(4009, "replaced");
        let (op, _, payload) = decode(&c);
        assert_eq!(op, OpCode::Control(Control::Close));
        assert_eq!(&payload[..2], &4009u16.to_be_bytes());
        assert_eq!(&payload[2..], b"replaced");

        // Long reasons are cut to 123 bytes at a char boundary (é is 2 bytes).
        let long = "é".repeat(100);
        let c = close_frame(1001, &long);
        let (_, hl, payload) = decode(&c);
        assert_eq!(hl, 2);
        assert!(payload.len() <= 125);
        assert_eq!(std::str::from_utf8(&payload[2..]).unwrap(), "é".repeat(61));
        let c = close_frame(1000, "");
        assert_eq!(&c[..], &[0x88, 2, 0x03, 0xE8]);
    }

    #[test]
    fn a_tungstenite_client_reads_our_frames() {
        // The strictest check: tungstenite as a client (rejects masked server frames, bad
        // UTF-8 in text, oversized control frames) reading everything in one stream.
        use tungstenite::protocol::{Role, WebSocket};
        use tungstenite::Message;
        let big = message_with_payload_len(70_000);
        let frames = [message_with_payload_len(100), big.clone(), pong(), close_frame(4009, "replaced")];
        let wire: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        let mut ws = WebSocket::from_raw_socket(Cursor::new(wire), Role::Client, None);
        for f in &frames[..3] {
            match ws.read().unwrap() {
                Message::Text(t) => assert_eq!(t.as_bytes(), decode(f).2),
                other => panic!("expected text, got {other:?}"),
            }
        }
        match ws.read().unwrap() {
            Message::Close(Some(c)) => {
                assert_eq!((u16::from(c.code), c.reason.as_str()), (4009, "replaced"))
            }
            other => panic!("expected close, got {other:?}"),
        }
    }
}
