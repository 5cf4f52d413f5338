//! The protocol's cryptography, written from the spec (§3.1, §3.2, §3.3) and independent of
//! the relay's own code: agent upgrade signatures, per-message HMAC signatures, HS256 client
//! JWTs, and the WebSocket key/accept pair.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use std::time::{SystemTime, UNIX_EPOCH};

/// base64url without padding (§2).
pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    SystemRandom::new().fill(&mut b).expect("system random");
    b
}

/// A fresh nonce: 32 characters of `[A-Za-z0-9_-]` (§3.1 allows 16 to 64).
pub fn nonce() -> String {
    b64url(&random_bytes::<24>())
}

/// The four §3.1 headers of a signed agent upgrade for an HMAC agent.
pub fn agent_upgrade_headers(agent_id: &str, secret: &str) -> [(&'static str, String); 4] {
    let ts = unix_now().to_string();
    let nonce = nonce();
    let signed = format!("switchboard-agent-v1\n{agent_id}\n{ts}\n{nonce}");
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let sig = b64url(hmac::sign(&key, signed.as_bytes()).as_ref());
    [
        ("X-Switchboard-Agent", agent_id.to_string()),
        ("X-Switchboard-Timestamp", ts),
        ("X-Switchboard-Nonce", nonce),
        ("X-Switchboard-Signature", sig),
    ]
}

/// Signs `send` frames of one agent connection (§3.2).
pub struct MsgSigner {
    key: hmac::Key,
}

impl MsgSigner {
    pub fn new(secret: &str) -> MsgSigner {
        MsgSigner { key: hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()) }
    }

    /// Appends the base64url `sig` over
    /// `switchboard-msg-v1\n<conn>\n<ctr>\n<to or empty>\n<data>` to `out`.
    pub fn push_sig(&self, out: &mut Vec<u8>, conn: &str, ctr: &[u8], to: &str, data: &[u8]) {
        let mut c = hmac::Context::with_key(&self.key);
        c.update(b"switchboard-msg-v1\n");
        c.update(conn.as_bytes());
        c.update(b"\n");
        c.update(ctr);
        c.update(b"\n");
        c.update(to.as_bytes());
        c.update(b"\n");
        c.update(data);
        let tag = c.sign();
        let mut enc = [0u8; 44];
        let n = URL_SAFE_NO_PAD.encode_slice(tag.as_ref(), &mut enc).expect("43 bytes fit");
        out.extend_from_slice(&enc[..n]);
    }
}

/// An HS256 JWT for `user` (claim `sub`), valid for `ttl_secs` (§3.3).
pub fn mint_hs256(secret: &[u8], user: &str, ttl_secs: u64) -> String {
    let now = unix_now();
    let header = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = serde_json::json!({ "sub": user, "iat": now, "exp": now + ttl_secs });
    let claims = b64url(claims.to_string().as_bytes());
    let signing_input = format!("{header}.{claims}");
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let sig = b64url(hmac::sign(&key, signing_input.as_bytes()).as_ref());
    format!("{signing_input}.{sig}")
}

/// A `Sec-WebSocket-Key`: 16 random bytes, standard base64.
pub fn ws_key() -> String {
    STANDARD.encode(random_bytes::<16>())
}

/// The `Sec-WebSocket-Accept` the server must answer for `key` (RFC 6455 §4.2.2).
pub fn ws_accept(key: &str) -> String {
    let mut c = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    c.update(key.as_bytes());
    c.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    STANDARD.encode(c.finish().as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_accept_matches_rfc_6455_example() {
        assert_eq!(ws_accept("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn message_signature_is_hmac_of_the_spec_string() {
        let s = MsgSigner::new("sbk_test");
        let mut out = Vec::new();
        s.push_sig(&mut out, "c1", b"7", "sess", br#"{"a":1}"#);
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"sbk_test");
        let want = hmac::sign(&key, b"switchboard-msg-v1\nc1\n7\nsess\n{\"a\":1}");
        assert_eq!(out, b64url(want.as_ref()).into_bytes());
    }

    #[test]
    fn jwt_has_three_parts_and_verifies() {
        let t = mint_hs256(b"k", "alice", 60);
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 3);
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"k");
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        hmac::verify(&key, format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["sub"], "alice");
    }
}
