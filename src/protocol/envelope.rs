//! Inbound frames (protocol §4.2, §4.4, [resume] §8 acks): one WebSocket text message into a
//! borrowed [`Inbound`] envelope, or a [`FrameError`] answered with `error` code `bad_frame`.
//!
//! Owns the §4 frame rules: a JSON object whose string `type` is `send`, `ping`, `refresh` or
//! `ack`; unknown fields ignored; a duplicate known key, a wrong-typed known field, `send`
//! without `data`, `refresh` without `token`, `ack` without `seq` are errors.
//!
//! What must stay true:
//! - `data` is the exact bytes of the frame from the value's first character to its last
//!   (a `&RawValue` borrowed from the input): forwarded and signed as is, never re-serialized.
//! - `id` is kept raw (a JSON string, escapes and all) so the `ack`/`error` echoes it byte-exact.
//! - `ctr` keeps its decimal text, which is what the §3.2 signed message contains.
//! - Never panics; the error path allocates nothing of ours (`FrameError` is a `&'static str`
//!   and a borrowed id). The only serde_json errors raised are for input that is not JSON.
//!
//! Why serde_json (a hand-written `Visitor` over `Deserializer::from_slice`) and not simd-json:
//! on a realistic 261-byte agent `send`, benches/envelope.rs measured this parser at ~490 ns
//! against ~800 ns (to_borrowed_value) and ~900 ns (serde derive) for simd-json, which also
//! needs a mutable copy of every frame and cannot hand back `data` as the bytes received (it
//! would have to re-serialize for forwarding and for §3.2 signatures). Hand-written rather
//! than `#[derive(Deserialize)]` (same speed within noise) so that `"data": null` counts as
//! present, a wrong-typed field is reported by name without allocating a message, and parsing
//! goes on after a semantic error so a later `id` can still be echoed.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// What an inbound frame asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Send,
    Ping,
    Refresh,
    /// [resume] `{"type":"ack","seq":n}` from an agent confirming its mailbox.
    Ack,
}

/// The §3.2 message counter: its value and its decimal text exactly as in the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ctr<'a> {
    pub value: u64,
    pub decimal: &'a str,
}

/// One parsed inbound frame, borrowing from the received text.
#[derive(Clone)]
pub struct Inbound<'a> {
    pub kind: Kind,
    /// The recipient (a session id or agent id); unescaped, so borrowed unless it had escapes.
    pub to: Option<Cow<'a, str>>,
    /// Always a JSON string, raw (with its quotes and any escapes) for a byte-exact echo.
    pub id: Option<&'a RawValue>,
    /// Any JSON value (`null` included), exactly as received.
    pub data: Option<&'a RawValue>,
    pub ctr: Option<Ctr<'a>>,
    /// The §3.2 signature, base64url; a `sig` with JSON escapes is refused.
    pub sig: Option<&'a str>,
    /// A `refresh` JWT.
    pub token: Option<Cow<'a, str>>,
    /// [resume] the cumulative `ack` sequence number.
    pub seq: Option<u64>,
}

impl fmt::Debug for Inbound<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Tokens and signatures are credentials and `data` is user content: never printed.
        f.debug_struct("Inbound")
            .field("kind", &self.kind)
            .field("to", &self.to)
            .field("id", &self.id)
            .field("data_len", &self.data.map(|d| d.get().len()))
            .field("ctr", &self.ctr)
            .field("sig", &self.sig.map(|_| "<redacted>"))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("seq", &self.seq)
            .finish()
    }
}

/// A frame refused with `error` code `bad_frame`. Cheap: a static message for the human
/// `message` field and, when the frame had a well-formed `id`, that id raw for the echo.
#[derive(Clone, Copy, Debug)]
pub struct FrameError<'a> {
    pub message: &'static str,
    pub id: Option<&'a RawValue>,
}

impl FrameError<'_> {
    /// The §4.5 error code for every envelope error.
    pub const CODE: &'static str = "bad_frame";

    pub fn code(&self) -> &'static str {
        Self::CODE
    }
}

impl PartialEq for FrameError<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.message == other.message && self.id.map(RawValue::get) == other.id.map(RawValue::get)
    }
}

impl fmt::Display for FrameError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message)
    }
}

impl std::error::Error for FrameError<'_> {}

/// Human messages of [`FrameError`], one per rule.
pub mod msg {
    pub const NOT_JSON: &str = "frame is not valid JSON";
    pub const NOT_OBJECT: &str = "frame must be a JSON object";
    pub const MISSING_TYPE: &str = "missing field `type`";
    pub const TYPE_NOT_STRING: &str = "`type` must be a string";
    pub const UNKNOWN_TYPE: &str = "unknown `type` (expected send, ping, refresh or ack)";
    pub const TO_NOT_STRING: &str = "`to` must be a string";
    pub const ID_NOT_STRING: &str = "`id` must be a string";
    pub const BAD_CTR: &str = "`ctr` must be a plain decimal integer, 1 <= ctr < 2^53";
    pub const BAD_SIG: &str = "`sig` must be a string without escapes";
    pub const TOKEN_NOT_STRING: &str = "`token` must be a string";
    pub const BAD_SEQ: &str = "`seq` must be a non-negative integer";
    pub const SEND_WITHOUT_DATA: &str = "`send` requires `data`";
    pub const REFRESH_WITHOUT_TOKEN: &str = "`refresh` requires `token`";
    pub const ACK_WITHOUT_SEQ: &str = "`ack` requires `seq`";
    pub const DUP_TYPE: &str = "duplicate field `type`";
    pub const DUP_TO: &str = "duplicate field `to`";
    pub const DUP_ID: &str = "duplicate field `id`";
    pub const DUP_DATA: &str = "duplicate field `data`";
    pub const DUP_CTR: &str = "duplicate field `ctr`";
    pub const DUP_SIG: &str = "duplicate field `sig`";
    pub const DUP_TOKEN: &str = "duplicate field `token`";
    pub const DUP_SEQ: &str = "duplicate field `seq`";
}

/// Parses one inbound text frame. See the module header for the rules.
pub fn parse_inbound(text: &[u8]) -> Result<Inbound<'_>, FrameError<'_>> {
    // Anything but an object is refused before serde sees it (so that error costs nothing).
    match text.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
        Some(b'{') => {}
        Some(_) if serde_json::from_slice::<IgnoredAny>(text).is_ok() => {
            return Err(FrameError { message: msg::NOT_OBJECT, id: None })
        }
        _ => return Err(FrameError { message: msg::NOT_JSON, id: None }),
    }
    let mut id_seen = None;
    let mut de = serde_json::Deserializer::from_slice(text);
    let outcome = de.deserialize_map(EnvelopeVisitor { id: &mut id_seen });
    match outcome.and_then(|o| de.end().map(|()| o)) {
        Ok(Ok(inbound)) => Ok(inbound),
        Ok(Err(message)) => Err(FrameError { message, id: id_seen }),
        // Nested deeper than serde_json's recursion limit (128) also lands here.
        Err(_) => Err(FrameError { message: msg::NOT_JSON, id: id_seen }),
    }
}

#[derive(Clone, Copy)]
enum Field {
    Type,
    To,
    Id,
    Data,
    Ctr,
    Sig,
    Token,
    Seq,
    Other,
}

impl Field {
    fn bit(self) -> u8 {
        match self {
            Field::Type => 1,
            Field::To => 1 << 1,
            Field::Id => 1 << 2,
            Field::Data => 1 << 3,
            Field::Ctr => 1 << 4,
            Field::Sig => 1 << 5,
            Field::Token => 1 << 6,
            Field::Seq => 1 << 7,
            Field::Other => 0,
        }
    }

    fn duplicate(self) -> &'static str {
        match self {
            Field::Type => msg::DUP_TYPE,
            Field::To => msg::DUP_TO,
            Field::Id => msg::DUP_ID,
            Field::Data => msg::DUP_DATA,
            Field::Ctr => msg::DUP_CTR,
            Field::Sig => msg::DUP_SIG,
            Field::Token => msg::DUP_TOKEN,
            Field::Seq => msg::DUP_SEQ,
            Field::Other => "",
        }
    }
}

impl<'de> de::Deserialize<'de> for Field {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldVisitor;
        impl Visitor<'_> for FieldVisitor {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            // serde_json hands borrowed keys here too (visit_borrowed_str forwards to it),
            // and escaped keys after unescaping, so `"\u0074ype"` is `type`.
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Field, E> {
                Ok(match v {
                    "type" => Field::Type,
                    "to" => Field::To,
                    "id" => Field::Id,
                    "data" => Field::Data,
                    "ctr" => Field::Ctr,
                    "sig" => Field::Sig,
                    "token" => Field::Token,
                    "seq" => Field::Seq,
                    _ => Field::Other,
                })
            }
        }
        d.deserialize_identifier(FieldVisitor)
    }
}

/// Any JSON value, typed just enough to check a field: never fails on valid JSON, so a
/// wrong-typed field is our (allocation-free) error, not serde's, and parsing can go on.
enum Scalar<'a> {
    Str(Cow<'a, str>),
    U64(u64),
    Other,
}

impl<'de> de::Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::U64(v))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Other)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Other)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Other)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Other)
    }
    fn visit_none<E: de::Error>(self) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
}

/// `ctr` as §3.2 writes it: ASCII digits, no leading zero, 1 <= value < 2^53.
fn parse_ctr(raw: &str) -> Option<Ctr<'_>> {
    const LIMIT: u64 = 1 << 53;
    let b = raw.as_bytes();
    // 2^53 has 16 digits; anything longer is out of range (and would overflow below).
    if b.is_empty() || b.len() > 16 || b[0] == b'0' || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value = b.iter().fold(0u64, |v, d| v * 10 + u64::from(d - b'0'));
    (value < LIMIT).then_some(Ctr { value, decimal: raw })
}

/// The top-level object. Semantic errors are returned as `Ok(Err(msg))` after the whole
/// object was read (first error wins), so `id` is found wherever it stands; serde errors
/// (`Err`) only ever mean "not JSON".
struct EnvelopeVisitor<'v, 'de> {
    /// The first well-formed `id`, kept even if the frame then turns out bad.
    id: &'v mut Option<&'de RawValue>,
}

impl<'de> Visitor<'de> for EnvelopeVisitor<'_, 'de> {
    type Value = Result<Inbound<'de>, &'static str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut kind: Option<Kind> = None;
        let mut to = None;
        let mut data = None;
        let mut ctr = None;
        let mut sig = None;
        let mut token = None;
        let mut seq = None;
        let mut seen = 0u8;
        let mut problem: Option<&'static str> = None;
        let mut fail = |m: &'static str| {
            problem.get_or_insert(m);
        };

        while let Some(field) = map.next_key::<Field>()? {
            let bit = field.bit();
            if seen & bit != 0 {
                fail(field.duplicate());
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            seen |= bit;
            match field {
                Field::Type => match map.next_value::<Scalar<'de>>()? {
                    Scalar::Str(s) => match &*s {
                        "send" => kind = Some(Kind::Send),
                        "ping" => kind = Some(Kind::Ping),
                        "refresh" => kind = Some(Kind::Refresh),
                        "ack" => kind = Some(Kind::Ack),
                        _ => fail(msg::UNKNOWN_TYPE),
                    },
                    _ => fail(msg::TYPE_NOT_STRING),
                },
                Field::To => match map.next_value::<Scalar<'de>>()? {
                    Scalar::Str(s) => to = Some(s),
                    _ => fail(msg::TO_NOT_STRING),
                },
                Field::Id => {
                    let raw: &'de RawValue = map.next_value()?;
                    if raw.get().starts_with('"') {
                        *self.id = Some(raw);
                    } else {
                        fail(msg::ID_NOT_STRING);
                    }
                }
                Field::Data => data = Some(map.next_value::<&'de RawValue>()?),
                Field::Ctr => {
                    let raw: &'de RawValue = map.next_value()?;
                    match parse_ctr(raw.get()) {
                        Some(c) => ctr = Some(c),
                        None => fail(msg::BAD_CTR),
                    }
                }
                Field::Sig => match map.next_value::<Scalar<'de>>()? {
                    Scalar::Str(Cow::Borrowed(s)) => sig = Some(s),
                    _ => fail(msg::BAD_SIG),
                },
                Field::Token => match map.next_value::<Scalar<'de>>()? {
                    Scalar::Str(s) => token = Some(s),
                    _ => fail(msg::TOKEN_NOT_STRING),
                },
                Field::Seq => match map.next_value::<Scalar<'de>>()? {
                    Scalar::U64(n) => seq = Some(n),
                    _ => fail(msg::BAD_SEQ),
                },
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }

        if let Some(m) = problem {
            return Ok(Err(m));
        }
        let Some(kind) = kind else { return Ok(Err(msg::MISSING_TYPE)) };
        let missing = match kind {
            Kind::Send if data.is_none() => Some(msg::SEND_WITHOUT_DATA),
            Kind::Refresh if token.is_none() => Some(msg::REFRESH_WITHOUT_TOKEN),
            Kind::Ack if seq.is_none() => Some(msg::ACK_WITHOUT_SEQ),
            _ => None,
        };
        if let Some(m) = missing {
            return Ok(Err(m));
        }
        Ok(Ok(Inbound { kind, to, id: *self.id, data, ctr, sig, token, seq }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Inbound<'_> {
        match parse_inbound(s.as_bytes()) {
            Ok(i) => i,
            Err(e) => panic!("{s}: {e:?}"),
        }
    }

    fn err(s: &str) -> FrameError<'_> {
        match parse_inbound(s.as_bytes()) {
            Ok(i) => panic!("{s}: parsed as {i:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn agent_send_full() {
        let s = r#"{"type":"send","to":"s_1","data":{"a":[1,2,3]},"id":"m-1","ctr":17,"sig":"AbC_-9"}"#;
        let i = ok(s);
        assert_eq!(i.kind, Kind::Send);
        assert_eq!(i.to.as_deref(), Some("s_1"));
        assert!(matches!(i.to, Some(Cow::Borrowed(_))));
        assert_eq!(i.data.unwrap().get(), r#"{"a":[1,2,3]}"#);
        assert_eq!(i.id.unwrap().get(), r#""m-1""#);
        assert_eq!(i.ctr, Some(Ctr { value: 17, decimal: "17" }));
        assert_eq!(i.sig, Some("AbC_-9"));
        assert_eq!(i.token, None);
        assert_eq!(i.seq, None);
    }

    #[test]
    fn other_kinds() {
        assert_eq!(ok(r#"{"type":"ping"}"#).kind, Kind::Ping);
        let r = ok(r#"{"token":"a.b.c","type":"refresh"}"#);
        assert_eq!((r.kind, r.token.as_deref()), (Kind::Refresh, Some("a.b.c")));
        let a = ok(r#"{"type":"ack","seq":42}"#);
        assert_eq!((a.kind, a.seq), (Kind::Ack, Some(42)));
        assert_eq!(ok(r#"{"type":"ack","seq":18446744073709551615}"#).seq, Some(u64::MAX));
        // Escaped type and keys are the same JSON.
        assert_eq!(ok(r#"{"t\u0079pe":"s\u0065nd","data":1}"#).kind, Kind::Send);
    }

    #[test]
    fn data_is_exact_bytes() {
        for data in [
            "null",
            "0",
            "-0.0e+00",
            "123456789012345678901234567890123456789",
            "1.0000000000000000000000001",
            r#""caf\u00e9 \ud83d\ude00 \"q\" \\""#,
            "\"caf\u{e9} \u{1F600}\"",
            "{ \"a\" :\t[ 1 ,\n2 ] , \"b\":{} }",
            "[]",
            "true",
        ] {
            for (pre, post) in [("", ""), (" ", " "), ("\n\t ", "\r\n ")] {
                let s = format!(r#"{{"type":"send","data":{pre}{data}{post},"to":"x"}}"#);
                let i = ok(&s);
                let raw = i.data.unwrap().get();
                assert_eq!(raw, data, "in {s}");
                // It is a slice of the input, not a copy.
                let start = raw.as_ptr() as usize - s.as_ptr() as usize;
                assert_eq!(&s[start..start + raw.len()], data);
            }
        }
    }

    #[test]
    fn escaped_strings_are_unescaped_or_refused() {
        let i = ok(r#"{"type":"send","to":"s\u005f1","data":1,"id":"a\"b"}"#);
        assert_eq!(i.to.as_deref(), Some("s_1"));
        assert!(matches!(i.to, Some(Cow::Owned(_))));
        assert_eq!(i.id.unwrap().get(), r#""a\"b""#);
        let r = ok(r#"{"type":"refresh","token":"a\/b"}"#);
        assert_eq!(r.token.as_deref(), Some("a/b"));
        assert_eq!(err(r#"{"type":"send","data":1,"sig":"A\u0042"}"#).message, msg::BAD_SIG);
    }

    #[test]
    fn unknown_fields_ignored_even_duplicated() {
        let i = ok(r#"{"x":1,"type":"ping","x":{"deep":[1,{"y":null}]},"data":2}"#);
        assert_eq!(i.kind, Kind::Ping);
        assert_eq!(i.data.unwrap().get(), "2");
    }

    #[test]
    fn duplicate_known_fields() {
        for (s, m) in [
            (r#"{"type":"send","type":"send","data":1}"#, msg::DUP_TYPE),
            (r#"{"type":"send","data":1,"data":2}"#, msg::DUP_DATA),
            (r#"{"type":"send","data":1,"to":"a","to":"b"}"#, msg::DUP_TO),
            (r#"{"type":"send","data":1,"id":"a","id":"b"}"#, msg::DUP_ID),
            (r#"{"type":"send","data":1,"ctr":1,"ctr":2}"#, msg::DUP_CTR),
            (r#"{"type":"send","data":1,"sig":"a","sig":"a"}"#, msg::DUP_SIG),
            (r#"{"type":"refresh","token":"a","token":"b"}"#, msg::DUP_TOKEN),
            (r#"{"type":"ack","seq":1,"seq":2}"#, msg::DUP_SEQ),
            (r#"{"type":"send","data":1,"t\u0079pe":"ping"}"#, msg::DUP_TYPE),
        ] {
            assert_eq!(err(s).message, m, "{s}");
        }
        // For comparison: serde's derive says the same thing for the same input.
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Derived<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            #[serde(borrow)]
            data: Option<&'a RawValue>,
        }
        let e = serde_json::from_str::<Derived<'_>>(r#"{"type":"send","data":1,"data":2}"#)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("duplicate field `data`"), "{e}");
        // ...but derive turns `"data": null` into None, which the spec counts as present.
        let d = serde_json::from_str::<Derived<'_>>(r#"{"type":"send","data":null}"#).unwrap();
        assert!(d.data.is_none());
        assert_eq!(ok(r#"{"type":"send","data":null}"#).data.unwrap().get(), "null");
    }

    #[test]
    fn wrong_types_and_missing_fields() {
        for (s, m) in [
            ("", msg::NOT_JSON),
            ("   ", msg::NOT_JSON),
            ("nope", msg::NOT_JSON),
            ("{", msg::NOT_JSON),
            (r#"{"type":"ping""#, msg::NOT_JSON),
            (r#"{"type":"ping"} x"#, msg::NOT_JSON),
            (r#"{"type":"ping"}{}"#, msg::NOT_JSON),
            (r#"{"type":"ping",}"#, msg::NOT_JSON),
            (r#"{'type':'ping'}"#, msg::NOT_JSON),
            ("[]", msg::NOT_OBJECT),
            (r#" "ping" "#, msg::NOT_OBJECT),
            ("null", msg::NOT_OBJECT),
            ("42", msg::NOT_OBJECT),
            ("{}", msg::MISSING_TYPE),
            (r#"{"data":1}"#, msg::MISSING_TYPE),
            (r#"{"type":1}"#, msg::TYPE_NOT_STRING),
            (r#"{"type":null}"#, msg::TYPE_NOT_STRING),
            (r#"{"type":["send"]}"#, msg::TYPE_NOT_STRING),
            (r#"{"type":"SEND","data":1}"#, msg::UNKNOWN_TYPE),
            (r#"{"type":"message","data":1}"#, msg::UNKNOWN_TYPE),
            (r#"{"type":"send"}"#, msg::SEND_WITHOUT_DATA),
            (r#"{"type":"refresh"}"#, msg::REFRESH_WITHOUT_TOKEN),
            (r#"{"type":"ack"}"#, msg::ACK_WITHOUT_SEQ),
            (r#"{"type":"send","data":1,"to":5}"#, msg::TO_NOT_STRING),
            (r#"{"type":"send","data":1,"to":null}"#, msg::TO_NOT_STRING),
            (r#"{"type":"send","data":1,"id":5}"#, msg::ID_NOT_STRING),
            (r#"{"type":"send","data":1,"id":null}"#, msg::ID_NOT_STRING),
            (r#"{"type":"send","data":1,"sig":5}"#, msg::BAD_SIG),
            (r#"{"type":"refresh","token":{}}"#, msg::TOKEN_NOT_STRING),
            (r#"{"type":"ack","seq":-1}"#, msg::BAD_SEQ),
            (r#"{"type":"ack","seq":1.0}"#, msg::BAD_SEQ),
            (r#"{"type":"ack","seq":"1"}"#, msg::BAD_SEQ),
            (r#"{"type":"ack","seq":18446744073709551616}"#, msg::BAD_SEQ),
            // Wrong-typed known fields are errors whatever the type (here: ping).
            (r#"{"type":"ping","to":[]}"#, msg::TO_NOT_STRING),
        ] {
            assert_eq!(err(s).message, m, "{s}");
            assert_eq!(err(s).code(), "bad_frame");
        }
        let bad_utf8 = b"{\"type\":\"send\",\"data\":\"\xff\"}";
        assert_eq!(parse_inbound(bad_utf8).unwrap_err().message, msg::NOT_JSON);
        let bad_utf8_to = b"{\"type\":\"send\",\"data\":1,\"to\":\"\xc3\"}";
        assert_eq!(parse_inbound(bad_utf8_to).unwrap_err().message, msg::NOT_JSON);
    }

    #[test]
    fn ctr_rules() {
        let c = |v: &str| {
            parse_inbound(format!(r#"{{"type":"send","data":1,"ctr":{v}}}"#).as_bytes())
                .map(|i| i.ctr.map(|c| (c.value, c.decimal.to_owned())))
                .map_err(|e| e.message)
        };
        assert_eq!(c("1"), Ok(Some((1, "1".into()))));
        assert_eq!(c(" 42 "), Ok(Some((42, "42".into()))));
        assert_eq!(c("9007199254740991"), Ok(Some(((1 << 53) - 1, "9007199254740991".into()))));
        // A leading zero is not even JSON.
        assert_eq!(c("01"), Err(msg::NOT_JSON));
        for bad in [
            "0",
            "-1",
            "1.0",
            "1e3",
            "1E3",
            "-0",
            "9007199254740992",
            "99999999999999999999999",
            "\"1\"",
            "null",
            "true",
            "[1]",
        ] {
            assert_eq!(c(bad), Err(msg::BAD_CTR), "{bad}");
        }
        assert_eq!(parse_ctr(""), None);
        assert_eq!(parse_ctr("9999999999999999"), None);
    }

    #[test]
    fn error_carries_id_when_known() {
        // id before the problem
        let e = err(r#"{"id":"m\u00e9","type":"nope"}"#);
        assert_eq!((e.message, e.id.map(RawValue::get)), (msg::UNKNOWN_TYPE, Some(r#""m\u00e9""#)));
        // id after the problem
        let e = err(r#"{"type":"send","to":1,"data":2,"id":"late"}"#);
        assert_eq!(e.id.map(RawValue::get), Some(r#""late""#));
        // missing data, id present
        let e = err(r#"{"type":"send","id":"x"}"#);
        assert_eq!((e.message, e.id.map(RawValue::get)), (msg::SEND_WITHOUT_DATA, Some(r#""x""#)));
        // not-JSON after the id: still echoed; wrong-typed id: not echoed
        let e = err(r#"{"type":"send","id":"x","data":"#);
        assert_eq!((e.message, e.id.map(RawValue::get)), (msg::NOT_JSON, Some(r#""x""#)));
        assert!(err(r#"{"type":"send","id":7}"#).id.is_none());
        // a duplicate id: the first one
        assert_eq!(
            err(r#"{"type":"send","data":1,"id":"a","id":"b"}"#).id.map(RawValue::get),
            Some(r#""a""#)
        );
    }

    #[test]
    fn deep_nesting_is_no_stack_overflow() {
        // serde_json skips RawValue / ignored values iteratively (no recursion limit needed):
        // deep `data` is forwarded as is, a deep wrong-typed field is just wrong-typed.
        let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        let s = format!(r#"{{"type":"send","data":{deep},"x":{deep}}}"#);
        assert_eq!(ok(&s).data.unwrap().get(), deep);
        let s = format!(r#"{{"type":"send","data":1,"to":{deep}}}"#);
        assert_eq!(err(&s).message, msg::TO_NOT_STRING);
        let s = format!(r#"{{"type":"send","data":{}}}"#, "[".repeat(100_000));
        assert_eq!(err(&s).message, msg::NOT_JSON);
    }

    #[test]
    fn garbage_never_panics() {
        let seed = br#"{"type":"send","to":"s_1","data":{"a":[1,"x\u00e9",null,true]},"id":"m","ctr":9,"sig":"Zm9v","seq":3}"#;
        let mut x: u32 = 0x9e37_79b9;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for _ in 0..20_000 {
            let mut buf = seed.to_vec();
            for _ in 0..(rnd() % 4 + 1) {
                let at = rnd() as usize % buf.len();
                match rnd() % 3 {
                    0 => buf[at] = rnd() as u8,
                    1 => {
                        buf.remove(at);
                    }
                    _ => buf.insert(at, b"{}[]\",:\\0e-"[rnd() as usize % 11]),
                }
                if buf.is_empty() {
                    break;
                }
            }
            let _ = parse_inbound(&buf);
            for cut in [0, buf.len() / 2, buf.len().saturating_sub(1)] {
                let _ = parse_inbound(&buf[..cut]);
            }
        }
    }

    #[test]
    fn debug_redacts() {
        let i = ok(r#"{"type":"refresh","token":"SECRET_T","sig":"SECRET_S","data":"SECRET_D"}"#);
        let d = format!("{i:?}");
        assert!(!d.contains("SECRET"), "{d}");
    }
}
