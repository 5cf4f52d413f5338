//! Authentication: agents' signed upgrades and messages (spec §3.1, §3.2), the per-agent nonce
//! window, and clients' JWTs (spec §3.3).
//!
//! Owns: every cryptographic check the relay makes and the one error type they fail with.
//! Everything here is pure and synchronous: no I/O, no clocks except `JwtVerifier::verify`
//! (which reads the system clock; `verify_at` takes `now`), no global state except the
//! process-wide jsonwebtoken `CryptoProvider` that [`jwt`] installs once. The caller owns where
//! state lives (keys come from the store, a [`NonceWindow`] sits beside its agent's record).
//!
//! What must stay true:
//! - Every failure is a 401 on the wire and the body never says which check failed; the
//!   [`AuthError`] variant is only for logs and metrics, and neither its `Display` nor its
//!   `Debug` ever holds credential material (tokens, secrets, signatures). Keep variants
//!   field-less so that stays true by construction.
//! - Signatures are compared in constant time (ring's verifiers, or [`agent`]'s `ct_eq`).
//! - The per-message path ([`verify_message`]) allocates nothing in steady state.

pub mod agent;
pub mod jwt;

pub use agent::{
    check_upgrade_syntax, sign_message_ed25519, sign_message_hmac, sign_upgrade_ed25519, sign_upgrade_hmac,
    verify_message, verify_upgrade, AgentKey, NonceWindow, UpgradeHeaders, DEFAULT_NONCE_CAP,
};
pub use jwt::{
    install_crypto_provider, mint_hs256, mint_hs256_with_claim, ClientClaims, JwtSettings, JwtSetupError,
    JwtVerifier, RING_PROVIDER,
};

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

/// base64url as the spec wants it: printed without padding, accepted with or without
/// (canonical padding only; non-zero trailing bits are refused).
pub(crate) const B64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why authentication failed. Every variant means HTTP 401 `unauthorized` (or, for a
/// `refresh`, the `unauthorized` error frame); the variant is for logs and metrics only.
///
/// Variants carry no data on purpose: nothing a client sent can end up in a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum AuthError {
    // --- both kinds of credential ---
    /// No credential at all (headers or token absent). Raised by the caller.
    #[error("no credential presented")]
    MissingCredentials,
    /// The signature does not verify against the key(s).
    #[error("signature does not verify")]
    BadSignature,

    // --- agents: syntax (checked before the store lookup) ---
    #[error("malformed agent id")]
    MalformedAgentId,
    #[error("malformed timestamp")]
    MalformedTimestamp,
    #[error("timestamp outside the allowed clock skew")]
    StaleTimestamp,
    #[error("malformed nonce")]
    MalformedNonce,
    #[error("malformed signature encoding")]
    MalformedSignature,

    // --- agents: state (the caller maps store lookups onto these) ---
    #[error("unknown agent")]
    UnknownAgent,
    #[error("agent revoked")]
    Revoked,
    #[error("agent expired")]
    AgentExpired,
    /// This agent already used this nonce within the window.
    #[error("nonce already used")]
    ReplayedNonce,
    /// The agent's nonce window is at its cap; new nonces are refused until old ones expire.
    #[error("too many recent nonces for this agent")]
    NonceWindowFull,

    // --- clients: JWT ---
    /// Not three base64url parts of JSON, an oversized token, an unsupported JOSE header
    /// (`crit`), or a wrong-typed `exp`/`nbf`.
    #[error("malformed token")]
    MalformedToken,
    /// `alg` is not one the relay has a key for.
    #[error("token algorithm not accepted")]
    BadAlgorithm,
    #[error("token has no exp claim")]
    MissingExp,
    #[error("token expired")]
    TokenExpired,
    #[error("token not yet valid (nbf)")]
    TokenNotYetValid,
    #[error("token issuer not accepted")]
    BadIssuer,
    #[error("token audience not accepted")]
    BadAudience,
    /// The user claim is missing, not a string, empty or over 128 bytes.
    #[error("token user claim missing or invalid")]
    BadUserClaim,
    /// `agents` is present but not an array of strings.
    #[error("token agents claim invalid")]
    BadAgentsClaim,
}

impl AuthError {
    /// A stable snake_case label for logs and metrics (a bounded set: safe as a metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::MissingCredentials => "missing_credentials",
            AuthError::BadSignature => "bad_signature",
            AuthError::MalformedAgentId => "malformed_agent_id",
            AuthError::MalformedTimestamp => "malformed_timestamp",
            AuthError::StaleTimestamp => "stale_timestamp",
            AuthError::MalformedNonce => "malformed_nonce",
            AuthError::MalformedSignature => "malformed_signature",
            AuthError::UnknownAgent => "unknown_agent",
            AuthError::Revoked => "revoked",
            AuthError::AgentExpired => "agent_expired",
            AuthError::ReplayedNonce => "replayed_nonce",
            AuthError::NonceWindowFull => "nonce_window_full",
            AuthError::MalformedToken => "malformed",
            AuthError::BadAlgorithm => "bad_algorithm",
            AuthError::MissingExp => "missing_exp",
            AuthError::TokenExpired => "expired",
            AuthError::TokenNotYetValid => "not_yet_valid",
            AuthError::BadIssuer => "bad_issuer",
            AuthError::BadAudience => "bad_audience",
            AuthError::BadUserClaim => "bad_user_claim",
            AuthError::BadAgentsClaim => "bad_agents_claim",
        }
    }

    /// Every reason label, for pre-registering metric series.
    pub const ALL: [AuthError; 21] = [
        AuthError::MissingCredentials,
        AuthError::BadSignature,
        AuthError::MalformedAgentId,
        AuthError::MalformedTimestamp,
        AuthError::StaleTimestamp,
        AuthError::MalformedNonce,
        AuthError::MalformedSignature,
        AuthError::UnknownAgent,
        AuthError::Revoked,
        AuthError::AgentExpired,
        AuthError::ReplayedNonce,
        AuthError::NonceWindowFull,
        AuthError::MalformedToken,
        AuthError::BadAlgorithm,
        AuthError::MissingExp,
        AuthError::TokenExpired,
        AuthError::TokenNotYetValid,
        AuthError::BadIssuer,
        AuthError::BadAudience,
        AuthError::BadUserClaim,
        AuthError::BadAgentsClaim,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn reasons_are_unique_snake_case() {
        let mut seen = HashSet::new();
        for e in AuthError::ALL {
            let r = e.reason();
            assert!(seen.insert(r), "duplicate reason {r}");
            assert!(r.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{r}");
            // Display is a fixed text per variant: nothing from the request can reach it.
            assert!(!e.to_string().is_empty());
        }
    }
}
