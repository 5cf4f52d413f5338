//! The public listener's request-head parser on arbitrary bytes: `parse_request` (at the
//! default 8 KiB limit and at the smallest configurable one, 1 KiB), then `check_upgrade`,
//! `client_token` and the redacting `Debug`.
//!
//! Besides "never panics", it checks what the handshake relies on:
//! - a complete head lies within the buffer and the limit;
//! - parsing exactly the head gives the same request (nothing past CRLFCRLF is looked at);
//! - the 1 KiB and 8 KiB limits agree whenever the head fits in 1 KiB;
//! - `Debug` never prints a credential (it is the same whatever the credentials' values).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::http::{check_upgrade, parse_request, Refusal};

fuzz_target!(|data: &[u8]| {
    let big = parse_request(data, 8192);
    let small = parse_request(data, 1024);
    if let Ok(Some(req)) = &big {
        assert!(req.head_len <= data.len() && req.head_len <= 8192);
        assert_eq!(parse_request(&data[..req.head_len], 8192), Ok(Some(req.clone())));
        if req.head_len <= 1024 {
            assert_eq!(&small, &Ok(Some(req.clone())));
        } else {
            assert_eq!(small, Err(Refusal::HeadersTooLarge));
        }
        let _ = check_upgrade(req);
        let token = req.client_token();
        // `Debug` shows whether a credential is present, never its value: replacing every
        // credential by another value must not change the text at all.
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
        assert_eq!(format!("{req:?}"), format!("{other:?}"), "a credential reached Debug output");
        if let Some(t) = token {
            assert!(!t.is_empty());
        }
    }
    if let Ok(Some(req)) = &small {
        assert!(req.head_len <= 1024);
        assert_eq!(&big, &Ok(Some(req.clone())));
    }
});
