//! The inbound frame parser (`parse_inbound`) on arbitrary bytes.
//!
//! Besides "never panics": an accepted frame is valid JSON; `data`, `id` and `ctr` are views
//! into the input (forwarded and signed byte-exact, never re-serialized); a `send` always has
//! `data`; `ctr` is in 1..2^53 and its decimal text is canonical; the error path's `id` (when
//! present) is a JSON string from the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::IgnoredAny;
use switchboard::protocol::{parse_inbound, Kind};

fn within(outer: &[u8], inner: &str) -> bool {
    let o = outer.as_ptr_range();
    let i = inner.as_bytes().as_ptr_range();
    o.start <= i.start && i.end <= o.end
}

fuzz_target!(|text: &[u8]| {
    match parse_inbound(text) {
        Ok(inb) => {
            assert!(serde_json::from_slice::<IgnoredAny>(text).is_ok(), "accepted a frame that is not JSON");
            if inb.kind == Kind::Send {
                assert!(inb.data.is_some());
            }
            if let Some(d) = inb.data {
                assert!(within(text, d.get()));
                assert!(serde_json::from_str::<IgnoredAny>(d.get()).is_ok());
            }
            if let Some(id) = inb.id {
                assert!(within(text, id.get()) && id.get().starts_with('"'));
            }
            if let Some(c) = inb.ctr {
                assert!(within(text, c.decimal));
                assert!((1..1u64 << 53).contains(&c.value));
                assert_eq!(c.decimal, c.value.to_string());
            }
            if let Some(s) = inb.sig {
                assert!(within(text, s));
            }
            let _ = format!("{inb:?}");
        }
        Err(e) => {
            assert_eq!(e.code(), "bad_frame");
            if let Some(id) = e.id {
                assert!(within(text, id.get()) && id.get().starts_with('"'));
            }
        }
    }
});
