//! PLACEHOLDER from the wt-store branch: only the minting function the `token` CLI needs.
//! The real auth module provides the same signature and replaces this file at merge.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::hmac;

/// An HS256 JWT for `user`: claims `sub`, `iat`, `exp = now + ttl_secs`, and `agents` only
/// when non-empty.
pub fn mint_hs256(secret: &[u8], user: &str, agents: &[String], ttl_secs: u64, now: u64) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let mut claims = serde_json::json!({ "sub": user, "iat": now, "exp": now.saturating_add(ttl_secs) });
    if !agents.is_empty() {
        claims["agents"] = serde_json::json!(agents);
    }
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{claims}");
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}
