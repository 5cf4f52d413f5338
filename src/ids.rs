//! Relay-assigned identifiers and random secrets.
//!
//! Owns: the shape of every id the relay makes up (`agent_id`, `session`, `conn`) and of the HMAC
//! agent secrets, and the one source of randomness for them (ring's `SystemRandom`, the OS CSPRNG).
//!
//! Must stay true (spec §1, §3.1):
//! - ids are opaque, 1 to 64 characters of `[A-Za-z0-9_-]` (prefix + base64url without padding);
//!   [`is_valid_id`] is the check any code must apply before using a peer-supplied id as a key;
//! - ids and secrets carry at least 96 bits of CSPRNG output, so they are unguessable and collide
//!   with negligible probability (the store still refuses to overwrite an existing agent id);
//! - HMAC secrets start with `sbk_`; they are keys, never logged (callers' duty).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};

/// Longest id the relay ever assigns or accepts (spec §1).
pub const MAX_ID_LEN: usize = 64;

/// `N` bytes from the OS CSPRNG.
///
/// # Panics
/// If the operating system's random source fails, which ring reports only when `getrandom`
/// itself is unusable; nothing sensible can continue without randomness.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    SystemRandom::new().fill(&mut buf).expect("the OS random number generator failed");
    buf
}

fn prefixed<const N: usize>(prefix: &str) -> String {
    let bytes = random_bytes::<N>();
    let mut s = String::with_capacity(prefix.len() + (N * 4).div_ceil(3));
    s.push_str(prefix);
    URL_SAFE_NO_PAD.encode_string(bytes, &mut s);
    s
}

/// A new agent id: `ag_` + 16 random bytes base64url (25 characters).
pub fn agent_id() -> String {
    prefixed::<16>("ag_")
}

/// A new client session id: `s_` + 12 random bytes base64url (18 characters).
pub fn session_id() -> String {
    prefixed::<12>("s_")
}

/// A new connection id: `c_` + 12 random bytes base64url (18 characters).
pub fn conn_id() -> String {
    prefixed::<12>("c_")
}

/// A new stream epoch (spec §8): `e_` + 9 random bytes base64url (14 characters).
pub fn epoch_id() -> String {
    prefixed::<9>("e_")
}

/// A new HMAC agent secret: `sbk_` + 32 random bytes base64url (47 characters).
/// The HMAC key is the UTF-8 bytes of this string exactly (spec §3.1).
pub fn hmac_secret() -> String {
    prefixed::<32>("sbk_")
}

/// Whether `s` has the shape of a relay id: 1 to [`MAX_ID_LEN`] characters of `[A-Za-z0-9_-]`.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn check(id: &str, prefix: &str, len: usize) {
        assert!(id.starts_with(prefix), "{id} lacks {prefix}");
        assert_eq!(id.len(), len, "{id}");
        assert!(is_valid_id(id), "{id}");
    }

    #[test]
    fn shapes() {
        for _ in 0..200 {
            check(&agent_id(), "ag_", 25);
            check(&session_id(), "s_", 18);
            check(&conn_id(), "c_", 18);
            check(&hmac_secret(), "sbk_", 47);
        }
    }

    #[test]
    fn unique() {
        let mut seen = HashSet::new();
        for _ in 0..10_000 {
            assert!(seen.insert(agent_id()));
            assert!(seen.insert(session_id()));
            assert!(seen.insert(conn_id()));
        }
        let a = random_bytes::<32>();
        let b = random_bytes::<32>();
        assert_ne!(a, b);
        assert_eq!(random_bytes::<0>(), [0u8; 0]);
    }

    #[test]
    fn validity() {
        assert!(is_valid_id("a"));
        assert!(is_valid_id("-abc_DEF-09"));
        assert!(is_valid_id(&"x".repeat(64)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id(&"x".repeat(65)));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("a=b"));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id("é"));
        assert!(!is_valid_id("a\0"));
    }
}
