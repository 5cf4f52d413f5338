//! The protocol's cryptography, written from the spec (§3.1, §3.2, §3.3) and independent of
//! the relay's own code: agent upgrade signatures, per-message HMAC signatures, HS256 client
//! JWTs, and the WebSocket key/accept pair. Agents sign with an HMAC secret or an Ed25519
//! key (§3.1: the upgrade; §3.2: every message, over the same string either way).

use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use std::cell::RefCell;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// An agent's signing key.
#[derive(Debug, Clone)]
pub enum AgentKey {
    /// The secret exactly as `agent create` printed it (`sbk_…`); its UTF-8 bytes are the key.
    Hmac(String),
    /// An Ed25519 key pair (the daemon holds the public key).
    Ed25519(Arc<Ed25519KeyPair>),
}

impl AgentKey {
    /// A fresh Ed25519 key and its 32-byte seed.
    pub fn ed25519_generate() -> (AgentKey, [u8; 32]) {
        let seed = random_bytes::<32>();
        let kp = Ed25519KeyPair::from_seed_unchecked(&seed).expect("any 32 bytes are a seed");
        (AgentKey::Ed25519(Arc::new(kp)), seed)
    }

    /// An Ed25519 key from its 32-byte seed written as base64url (padded or not) or 64 hex
    /// characters.
    pub fn ed25519_from_text(s: &str) -> Result<AgentKey, String> {
        let s = s.trim();
        let bytes = if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..32).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex")).collect()
        } else {
            URL_SAFE_NO_PAD
                .decode(s)
                .or_else(|_| URL_SAFE.decode(s))
                .map_err(|_| "expected 32 bytes as base64url or hex".to_string())?
        };
        let seed: [u8; 32] = bytes.try_into().map_err(|_| "expected a 32-byte seed".to_string())?;
        let kp = Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|e| e.to_string())?;
        Ok(AgentKey::Ed25519(Arc::new(kp)))
    }

    /// The public key (Ed25519 only), base64url without padding, as `agent create
    /// --ed25519-pubkey` takes it.
    pub fn public_key_b64(&self) -> Option<String> {
        match self {
            AgentKey::Hmac(_) => None,
            AgentKey::Ed25519(kp) => Some(b64url(kp.public_key().as_ref())),
        }
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        match self {
            AgentKey::Hmac(secret) => {
                let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
                hmac::sign(&key, msg).as_ref().to_vec()
            }
            AgentKey::Ed25519(kp) => kp.sign(msg).as_ref().to_vec(),
        }
    }
}

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

/// The four §3.1 headers of a signed agent upgrade.
pub fn agent_upgrade_headers(agent_id: &str, key: &AgentKey) -> [(&'static str, String); 4] {
    let ts = unix_now().to_string();
    let nonce = nonce();
    let signed = format!("switchboard-agent-v1\n{agent_id}\n{ts}\n{nonce}");
    let sig = b64url(&key.sign(signed.as_bytes()));
    [
        ("X-Switchboard-Agent", agent_id.to_string()),
        ("X-Switchboard-Timestamp", ts),
        ("X-Switchboard-Nonce", nonce),
        ("X-Switchboard-Signature", sig),
    ]
}

/// Signs `send` frames of one agent connection (§3.2).
pub enum MsgSigner {
    Hmac(hmac::Key),
    /// Ed25519 signs the whole message at once: it is assembled in the scratch buffer.
    Ed25519(Arc<Ed25519KeyPair>, RefCell<Vec<u8>>),
}

impl MsgSigner {
    pub fn new(key: &AgentKey) -> MsgSigner {
        match key {
            AgentKey::Hmac(secret) => MsgSigner::Hmac(hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes())),
            AgentKey::Ed25519(kp) => MsgSigner::Ed25519(kp.clone(), RefCell::new(Vec::new())),
        }
    }

    /// Appends the base64url `sig` over
    /// `switchboard-msg-v1\n<conn>\n<ctr>\n<to or empty>\n<data>` to `out`.
    pub fn push_sig(&self, out: &mut Vec<u8>, conn: &str, ctr: &[u8], to: &str, data: &[u8]) {
        let parts: [&[u8]; 8] =
            [b"switchboard-msg-v1\n", conn.as_bytes(), b"\n", ctr, b"\n", to.as_bytes(), b"\n", data];
        let mut enc = [0u8; 88];
        let n = match self {
            MsgSigner::Hmac(key) => {
                let mut c = hmac::Context::with_key(key);
                for p in parts {
                    c.update(p);
                }
                URL_SAFE_NO_PAD.encode_slice(c.sign().as_ref(), &mut enc).expect("43 bytes fit")
            }
            MsgSigner::Ed25519(kp, scratch) => {
                let mut m = scratch.borrow_mut();
                m.clear();
                for p in parts {
                    m.extend_from_slice(p);
                }
                URL_SAFE_NO_PAD.encode_slice(kp.sign(&m).as_ref(), &mut enc).expect("86 bytes fit")
            }
        };
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
    fn ed25519_signatures_verify_with_the_public_key() {
        use ring::signature::{UnparsedPublicKey, ED25519};
        let (key, seed) = AgentKey::ed25519_generate();
        let pk = URL_SAFE_NO_PAD.decode(key.public_key_b64().unwrap()).unwrap();
        let verifier = UnparsedPublicKey::new(&ED25519, pk);
        // The seed round-trips through both of its text forms.
        let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
        for text in [b64url(&seed), hex] {
            let again = AgentKey::ed25519_from_text(&text).unwrap();
            assert_eq!(again.public_key_b64(), key.public_key_b64());
        }
        let s = MsgSigner::new(&key);
        let mut out = Vec::new();
        s.push_sig(&mut out, "c1", b"7", "", br#"{"a":1}"#);
        let sig = URL_SAFE_NO_PAD.decode(&out).unwrap();
        verifier.verify(b"switchboard-msg-v1\nc1\n7\n\n{\"a\":1}", &sig).unwrap();
        let h = agent_upgrade_headers("ag1", &key);
        let signed = format!("switchboard-agent-v1\nag1\n{}\n{}", h[1].1, h[2].1);
        verifier.verify(signed.as_bytes(), &URL_SAFE_NO_PAD.decode(&h[3].1).unwrap()).unwrap();
        assert!(AgentKey::ed25519_from_text("short").is_err());
    }

    #[test]
    fn message_signature_is_hmac_of_the_spec_string() {
        let s = MsgSigner::new(&AgentKey::Hmac("sbk_test".into()));
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
