//! Clients' JWTs (spec §3.3): verification, the ring-backed jsonwebtoken `CryptoProvider`, and
//! minting for the CLI.
//!
//! Owns: the accepted algorithms (HS256, RS256, ES256, EdDSA), key loading from settings, and
//! every claim rule (exp required, nbf, iss/aud when configured, leeway, the user claim, the
//! `agents` allowlist).
//!
//! How: jsonwebtoken 11 ships no ring backend and panics at first use without a provider, so
//! [`RING_PROVIDER`] implements its `CryptoProvider` on ring through public APIs (HS256 sign
//! and verify; RS256, ES256, EdDSA verify; anything else is an error, never a panic), and
//! [`JwtVerifier::new`] installs it once. [`JwtVerifier::verify`] itself does not go through
//! jsonwebtoken's `decode`: it keeps the parsed ring keys (the same [`RingVerifier`] type the
//! provider hands out), verifies the signature before it parses the payload, parses the
//! payload once, and can tell metrics which rule failed. jsonwebtoken is used for PEM parsing,
//! `encode` (minting) and by anyone else in the process who calls `decode`.
//!
//! What must stay true:
//! - Every failure is one opaque 401 ([`AuthError`], no data); nothing logs a token or secret.
//! - The signature is checked before any claim is parsed; `alg` must be one we hold a key for
//!   (HS256 only with a secret), so there is no alg confusion and no `none`.
//! - `JwtVerifier` is `Send + Sync` and immutable: built at start and on reload, shared.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::crypto::{
    CryptoProvider, JwtSigner as JwtSignerTrait, JwtVerifier as JwtVerifierTrait, KeyUtils,
};
use jsonwebtoken::errors::{Error as JwtError, ErrorKind};
use jsonwebtoken::jwk::{EllipticCurve, ThumbprintHash};
use jsonwebtoken::signature;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey, Header};
use ring::signature::{self as sig, RsaPublicKeyComponents, UnparsedPublicKey};
use ring::{digest, hmac};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{AuthError, B64URL};

/// Longest token accepted: the whole request head is capped at 8 KiB anyway.
pub const MAX_TOKEN_LEN: usize = 8192;
/// Longest user id (spec §1).
pub const MAX_USER_LEN: usize = 128;
/// RSA moduli accepted, in bits (ring's RSA_PKCS1_2048_8192_SHA256).
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 8192;
/// Room for the largest signature: RSA-8192 is 1024 bytes (decode_slice wants the estimate).
const JWT_SIG_BUF_LEN: usize = RSA_MAX_BITS / 8 + 3;

// =============================================================================================
// The ring-backed CryptoProvider

enum RingKey {
    Hs256(hmac::Key),
    Rs256(RsaPublicKeyComponents<Vec<u8>>),
    /// The uncompressed P-256 point (65 bytes).
    Es256(UnparsedPublicKey<Vec<u8>>),
    /// The raw Ed25519 key (32 bytes).
    EdDsa(UnparsedPublicKey<Vec<u8>>),
}

/// One parsed verification key; jsonwebtoken's `JwtVerifier` for our provider, and the unit
/// [`JwtVerifier`] keeps per configured key.
pub struct RingVerifier {
    alg: Algorithm,
    key: RingKey,
}

impl RingVerifier {
    /// Parse `key` for `alg`; errors (never panics) for other algorithms or a key of the wrong
    /// family or shape.
    pub fn new(alg: &Algorithm, key: &DecodingKey) -> Result<Self, JwtError> {
        let want = match alg {
            Algorithm::HS256 => AlgorithmFamily::Hmac,
            Algorithm::RS256 => AlgorithmFamily::Rsa,
            Algorithm::ES256 => AlgorithmFamily::Ec,
            Algorithm::EdDSA => AlgorithmFamily::Ed,
            _ => return Err(ErrorKind::UnsupportedAlgorithm.into()),
        };
        if key.family() != want {
            return Err(ErrorKind::InvalidKeyFormat.into());
        }
        let key = match (alg, key.kind()) {
            (Algorithm::HS256, DecodingKeyKind::SecretOrDer(secret)) => {
                RingKey::Hs256(hmac::Key::new(hmac::HMAC_SHA256, secret))
            }
            (Algorithm::RS256, DecodingKeyKind::SecretOrDer(der)) => {
                let (n, e) = parse_rsa_public_key(der).ok_or_else(|| rsa_err("not an RSAPublicKey"))?;
                RingKey::Rs256(rsa_components(n, e)?)
            }
            (Algorithm::RS256, DecodingKeyKind::RsaModulusExponent { n, e }) => {
                RingKey::Rs256(rsa_components(n, e)?)
            }
            (Algorithm::ES256, DecodingKeyKind::SecretOrDer(point)) if point.len() == 65 && point[0] == 4 => {
                RingKey::Es256(UnparsedPublicKey::new(&sig::ECDSA_P256_SHA256_FIXED, point.clone()))
            }
            (Algorithm::ES256, _) => return Err(ErrorKind::InvalidEcdsaKey.into()),
            (Algorithm::EdDSA, DecodingKeyKind::SecretOrDer(raw)) if raw.len() == 32 => {
                RingKey::EdDsa(UnparsedPublicKey::new(&sig::ED25519, raw.clone()))
            }
            (Algorithm::EdDSA, _) => return Err(ErrorKind::InvalidEddsaKey.into()),
            _ => return Err(ErrorKind::InvalidKeyFormat.into()),
        };
        Ok(RingVerifier { alg: *alg, key })
    }

    /// Constant-time (ring) check of `sig` over `msg`.
    pub fn verify_sig(&self, msg: &[u8], signature: &[u8]) -> bool {
        match &self.key {
            RingKey::Hs256(k) => hmac::verify(k, msg, signature).is_ok(),
            RingKey::Rs256(k) => k.verify(&sig::RSA_PKCS1_2048_8192_SHA256, msg, signature).is_ok(),
            RingKey::Es256(k) | RingKey::EdDsa(k) => k.verify(msg, signature).is_ok(),
        }
    }
}

fn rsa_err(what: &str) -> JwtError {
    ErrorKind::InvalidRsaKey(what.to_string()).into()
}

fn rsa_components(n: &[u8], e: &[u8]) -> Result<RsaPublicKeyComponents<Vec<u8>>, JwtError> {
    let n = strip_leading_zeros(n);
    let e = strip_leading_zeros(e);
    let bits = (n.len() * 8).saturating_sub(n.first().map_or(8, |b| b.leading_zeros() as usize));
    if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
        return Err(rsa_err("modulus must be 2048 to 8192 bits"));
    }
    // ring wants an odd exponent >= 3 of at most 33 bits.
    if e.is_empty() || e.len() > 5 || e[e.len() - 1] & 1 == 0 || (e.len() == 1 && e[0] < 3) {
        return Err(rsa_err("unsupported public exponent"));
    }
    Ok(RsaPublicKeyComponents { n: n.to_vec(), e: e.to_vec() })
}

fn strip_leading_zeros(mut b: &[u8]) -> &[u8] {
    while let [0, rest @ ..] = b {
        b = rest;
    }
    b
}

/// One DER TLV with the expected tag: (contents, rest). Definite lengths up to 2^24.
fn der_tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = input.split_first()?;
    let (&l0, rest) = rest.split_first()?;
    if t != tag {
        return None;
    }
    let (len, rest) = if l0 < 0x80 {
        (usize::from(l0), rest)
    } else {
        let k = usize::from(l0 & 0x7f);
        if !(1..=3).contains(&k) {
            return None;
        }
        let (lb, rest) = rest.split_at_checked(k)?;
        (lb.iter().fold(0usize, |a, &b| (a << 8) | usize::from(b)), rest)
    };
    rest.split_at_checked(len)
}

/// PKCS#1 `RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }` → (n, e).
fn parse_rsa_public_key(der: &[u8]) -> Option<(&[u8], &[u8])> {
    let (seq, rest) = der_tlv(der, 0x30)?;
    let (n, seq) = der_tlv(seq, 0x02)?;
    let (e, seq) = der_tlv(seq, 0x02)?;
    (rest.is_empty() && seq.is_empty()).then_some((n, e))
}

impl signature::Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        if self.verify_sig(msg, signature) {
            Ok(())
        } else {
            Err(signature::Error::new())
        }
    }
}

impl JwtVerifierTrait for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

struct RingHs256Signer(hmac::Key);

impl signature::Signer<Vec<u8>> for RingHs256Signer {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        Ok(hmac::sign(&self.0, msg).as_ref().to_vec())
    }
}

impl JwtSignerTrait for RingHs256Signer {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

fn new_signer(alg: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSignerTrait>, JwtError> {
    match alg {
        Algorithm::HS256 if key.family() == AlgorithmFamily::Hmac => {
            Ok(Box::new(RingHs256Signer(hmac::Key::new(hmac::HMAC_SHA256, key.as_bytes()))))
        }
        Algorithm::HS256 => Err(ErrorKind::InvalidKeyFormat.into()),
        _ => Err(ErrorKind::UnsupportedAlgorithm.into()),
    }
}

fn new_verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifierTrait>, JwtError> {
    Ok(Box::new(RingVerifier::new(alg, key)?))
}

// JWK helpers: implemented where ring makes it easy, errors (not panics) elsewhere.
fn rsa_pub_from_private(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), JwtError> {
    let kp = sig::RsaKeyPair::from_der(der).map_err(|_| rsa_err("bad RSA private key"))?;
    let c = RsaPublicKeyComponents::<Vec<u8>>::from(kp.public());
    Ok((c.n, c.e))
}

fn rsa_pub_from_public(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), JwtError> {
    let (n, e) = parse_rsa_public_key(der).ok_or_else(|| rsa_err("not an RSAPublicKey"))?;
    Ok((strip_leading_zeros(n).to_vec(), strip_leading_zeros(e).to_vec()))
}

fn ec_pub_from_private(der: &[u8], alg: Algorithm) -> Result<(EllipticCurve, Vec<u8>, Vec<u8>), JwtError> {
    use ring::signature::KeyPair as _;
    if alg != Algorithm::ES256 {
        return Err(ErrorKind::UnsupportedAlgorithm.into());
    }
    let rng = ring::rand::SystemRandom::new();
    let kp = sig::EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
        .map_err(|_| JwtError::from(ErrorKind::InvalidEcdsaKey))?;
    let (x, y) = kp.public_key().as_ref()[1..].split_at(32);
    Ok((EllipticCurve::P256, x.to_vec(), y.to_vec()))
}

fn ed_pub_from_private(der: &[u8], curve: &EllipticCurve) -> Result<Vec<u8>, JwtError> {
    use ring::signature::KeyPair as _;
    if *curve != EllipticCurve::Ed25519 {
        return Err(ErrorKind::UnsupportedAlgorithm.into());
    }
    let kp = sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
        .map_err(|_| JwtError::from(ErrorKind::InvalidEddsaKey))?;
    Ok(kp.public_key().as_ref().to_vec())
}

fn compute_digest(data: &[u8], hash: ThumbprintHash) -> Result<Vec<u8>, JwtError> {
    let alg = match hash {
        ThumbprintHash::SHA256 => &digest::SHA256,
        ThumbprintHash::SHA384 => &digest::SHA384,
        ThumbprintHash::SHA512 => &digest::SHA512,
        _ => return Err(ErrorKind::UnsupportedAlgorithm.into()),
    };
    Ok(digest::digest(alg, data).as_ref().to_vec())
}

/// jsonwebtoken's crypto on ring: HS256 sign and verify; RS256, ES256 and EdDSA verify.
pub static RING_PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    key_utils: KeyUtils {
        rsa_pub_components_from_private_key: rsa_pub_from_private,
        rsa_pub_components_from_public_key: rsa_pub_from_public,
        ec_pub_components_from_private_key: ec_pub_from_private,
        ed_pub_components_from_private_key: ed_pub_from_private,
        compute_digest,
    },
};

/// Install [`RING_PROVIDER`] as jsonwebtoken's process default. Idempotent: if a provider is
/// already installed (ours, or one someone chose deliberately), that one stays.
pub fn install_crypto_provider() {
    let _ = RING_PROVIDER.install_default();
}

// =============================================================================================
// Settings and the verifier

/// JWT settings, resolved (the caller reads the files).
#[derive(Clone)]
pub struct JwtSettings {
    /// HS256 secret (the trimmed content of the secret file, as bytes).
    pub hs256_secret: Option<Vec<u8>>,
    /// (alg, PEM): alg is `RS256`, `ES256` or `EdDSA`; the PEM holds the public key
    /// (SPKI `PUBLIC KEY`, or PKCS#1 `RSA PUBLIC KEY`).
    pub public_keys: Vec<(String, Vec<u8>)>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_secs: u64,
    /// The claim holding the user id (default `sub`).
    pub user_claim: String,
}

impl Default for JwtSettings {
    fn default() -> Self {
        JwtSettings {
            hs256_secret: None,
            public_keys: Vec::new(),
            issuer: None,
            audience: None,
            leeway_secs: 30,
            user_claim: "sub".into(),
        }
    }
}

impl fmt::Debug for JwtSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let algs: Vec<&str> = self.public_keys.iter().map(|(a, _)| a.as_str()).collect();
        f.debug_struct("JwtSettings")
            .field("hs256_secret", &self.hs256_secret.as_ref().map(|_| "<redacted>"))
            .field("public_keys", &algs)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_secs", &self.leeway_secs)
            .field("user_claim", &self.user_claim)
            .finish()
    }
}

/// Why [`JwtVerifier::new`] refused the settings. Names the key by index, never its content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtSetupError {
    #[error("jwt: no key configured (neither an HS256 secret nor a public key)")]
    NoKeys,
    #[error("jwt: the HS256 secret is empty")]
    EmptySecret,
    #[error("jwt.public_keys[{index}]: algorithm must be RS256, ES256 or EdDSA")]
    UnsupportedAlgorithm { index: usize },
    #[error("jwt.public_keys[{index}]: not a usable {alg} public key in PEM")]
    BadKey { index: usize, alg: &'static str },
    #[error("jwt.user_claim must not be empty")]
    EmptyUserClaim,
}

/// An authenticated client, from its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientClaims {
    /// The user id (the configured user claim): 1..=128 bytes.
    pub user: String,
    /// `exp`, unix seconds (the session is closed with 4001 then).
    pub exp: u64,
    /// The `agents` allowlist, when the token has one (possibly empty: reaches no agent).
    pub agents: Option<Vec<String>>,
}

/// Verifies clients' JWTs against the configured keys. Immutable, `Send + Sync`: build one at
/// start and on reload and share it.
pub struct JwtVerifier {
    keys: Vec<RingVerifier>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_secs: u64,
    user_claim: String,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let algs: Vec<Algorithm> = self.keys.iter().map(|k| k.alg).collect();
        f.debug_struct("JwtVerifier")
            .field("keys", &algs)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_secs", &self.leeway_secs)
            .field("user_claim", &self.user_claim)
            .finish()
    }
}

/// The JOSE header fields we look at.
#[derive(Deserialize)]
struct JoseHeader {
    alg: String,
    /// Critical extensions: we implement none, so any `crit` is refused (RFC 7515 §4.1.11).
    #[serde(default)]
    crit: Option<serde::de::IgnoredAny>,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A NumericDate: a non-negative JSON number (fractions allowed by RFC 7519, truncated).
fn numeric_date(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => {
            n.as_u64().or_else(|| n.as_f64().filter(|f| *f >= 0.0 && f.is_finite()).map(|f| f as u64))
        }
        _ => None,
    }
}

impl JwtVerifier {
    /// Load the keys (each PEM parsed and checked now, so a bad key fails the start or the
    /// reload, not a client) and install [`RING_PROVIDER`] for jsonwebtoken.
    pub fn new(s: &JwtSettings) -> Result<Self, JwtSetupError> {
        install_crypto_provider();
        if s.user_claim.is_empty() {
            return Err(JwtSetupError::EmptyUserClaim);
        }
        let mut keys = Vec::with_capacity(s.public_keys.len() + 1);
        if let Some(secret) = &s.hs256_secret {
            if secret.is_empty() {
                return Err(JwtSetupError::EmptySecret);
            }
            let dk = DecodingKey::from_secret(secret);
            keys.push(RingVerifier::new(&Algorithm::HS256, &dk).map_err(|_| JwtSetupError::EmptySecret)?);
        }
        for (index, (alg, pem)) in s.public_keys.iter().enumerate() {
            let (alg, name, parsed) = match alg.as_str() {
                "RS256" => (Algorithm::RS256, "RS256", DecodingKey::from_rsa_pem(pem)),
                "ES256" => (Algorithm::ES256, "ES256", DecodingKey::from_ec_pem(pem)),
                "EdDSA" => (Algorithm::EdDSA, "EdDSA", DecodingKey::from_ed_pem(pem)),
                _ => return Err(JwtSetupError::UnsupportedAlgorithm { index }),
            };
            let bad = JwtSetupError::BadKey { index, alg: name };
            let dk = parsed.map_err(|_| bad.clone())?;
            keys.push(RingVerifier::new(&alg, &dk).map_err(|_| bad)?);
        }
        if keys.is_empty() {
            return Err(JwtSetupError::NoKeys);
        }
        Ok(JwtVerifier {
            keys,
            issuer: s.issuer.clone(),
            audience: s.audience.clone(),
            leeway_secs: s.leeway_secs,
            user_claim: s.user_claim.clone(),
        })
    }

    /// Verify `token` at the system clock's time.
    pub fn verify(&self, token: &str) -> Result<ClientClaims, AuthError> {
        self.verify_at(token, unix_now())
    }

    /// Verify `token` as of `now` (unix seconds).
    pub fn verify_at(&self, token: &str, now: u64) -> Result<ClientClaims, AuthError> {
        use AuthError::*;
        if token.len() > MAX_TOKEN_LEN {
            return Err(MalformedToken);
        }
        let (signing_input, sig_b64) = token.rsplit_once('.').ok_or(MalformedToken)?;
        let (header_b64, payload_b64) = signing_input.split_once('.').ok_or(MalformedToken)?;
        if payload_b64.contains('.') {
            return Err(MalformedToken);
        }

        // Header: which algorithm; no critical extensions.
        let header_json = B64URL.decode(header_b64).map_err(|_| MalformedToken)?;
        let header: JoseHeader = serde_json::from_slice(&header_json).map_err(|_| MalformedToken)?;
        if header.crit.is_some() {
            return Err(MalformedToken);
        }
        let alg = match header.alg.as_str() {
            "HS256" => Algorithm::HS256,
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            "EdDSA" => Algorithm::EdDSA,
            _ => return Err(BadAlgorithm),
        };

        // Signature, against every key of that algorithm, before the payload is parsed.
        let mut candidates = self.keys.iter().filter(|k| k.alg == alg).peekable();
        if candidates.peek().is_none() {
            return Err(BadAlgorithm);
        }
        if sig_b64.len() > JWT_SIG_BUF_LEN / 3 * 4 {
            return Err(BadSignature);
        }
        let mut sig_buf = [0u8; JWT_SIG_BUF_LEN];
        let n = B64URL.decode_slice(sig_b64, &mut sig_buf).map_err(|_| MalformedToken)?;
        let signature = &sig_buf[..n];
        if !candidates.any(|k| k.verify_sig(signing_input.as_bytes(), signature)) {
            return Err(BadSignature);
        }

        // Claims.
        let payload = B64URL.decode(payload_b64).map_err(|_| MalformedToken)?;
        let claims: Map<String, Value> = serde_json::from_slice(&payload).map_err(|_| MalformedToken)?;
        self.check_claims(claims, now)
    }

    fn check_claims(&self, mut claims: Map<String, Value>, now: u64) -> Result<ClientClaims, AuthError> {
        use AuthError::*;
        let exp = numeric_date(claims.get("exp").ok_or(MissingExp)?).ok_or(MalformedToken)?;
        if now >= exp.saturating_add(self.leeway_secs) {
            return Err(TokenExpired);
        }
        if let Some(nbf) = claims.get("nbf") {
            if numeric_date(nbf).ok_or(MalformedToken)? > now.saturating_add(self.leeway_secs) {
                return Err(TokenNotYetValid);
            }
        }
        if let Some(want) = &self.issuer {
            if claims.get("iss").and_then(Value::as_str) != Some(want.as_str()) {
                return Err(BadIssuer);
            }
        }
        if let Some(want) = &self.audience {
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => a == want,
                Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(want.as_str())),
                _ => false,
            };
            if !ok {
                return Err(BadAudience);
            }
        }
        let user = match claims.remove(&self.user_claim) {
            Some(Value::String(u)) if !u.is_empty() && u.len() <= MAX_USER_LEN => u,
            _ => return Err(BadUserClaim),
        };
        let agents = match claims.remove("agents") {
            None => None,
            Some(Value::Array(list)) => Some(
                list.into_iter()
                    .map(|a| match a {
                        Value::String(s) => Ok(s),
                        _ => Err(BadAgentsClaim),
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Some(_) => return Err(BadAgentsClaim),
        };
        Ok(ClientClaims { user, exp, agents })
    }
}

// =============================================================================================
// Minting (the CLI's `token` command, tests, the load generator)

#[derive(serde::Serialize)]
struct MintClaims<'a> {
    #[serde(flatten)]
    user: Map<String, Value>,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    agents: &'a [String],
}

/// An HS256 token for `user` (claim `sub`), valid `ttl_secs` from `now`; `agents` is written
/// only when non-empty.
pub fn mint_hs256(secret: &[u8], user: &str, agents: &[String], ttl_secs: u64, now: u64) -> String {
    mint_hs256_with_claim(secret, "sub", user, agents, ttl_secs, now)
}

/// [`mint_hs256`] with the user id under `user_claim` (for a relay configured with another
/// `jwt.user_claim`).
pub fn mint_hs256_with_claim(
    secret: &[u8],
    user_claim: &str,
    user: &str,
    agents: &[String],
    ttl_secs: u64,
    now: u64,
) -> String {
    install_crypto_provider();
    let mut user_map = Map::new();
    user_map.insert(user_claim.to_string(), Value::String(user.to_string()));
    let claims = MintClaims { user: user_map, iat: now, exp: now.saturating_add(ttl_secs), agents };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret))
        .expect("HS256 with an in-memory key and plain claims cannot fail")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::KeyPair as _;
    use serde_json::json;

    const SECRET: &[u8] = b"jwt_secret_for_tests";
    const NOW: u64 = 1_900_000_000;

    pub(crate) const RSA_PK8: &[u8] = include_bytes!("testdata/rsa2048_test_key.pk8.der");
    pub(crate) const RSA_PUB_PEM: &[u8] = include_bytes!("testdata/rsa2048_test_pub.pem");
    const P256_SPKI_PREFIX: &str = "3059301306072a8648ce3d020106082a8648ce3d030107034200";
    const ED25519_SPKI_PREFIX: &str = "302a300506032b6570032100";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// SPKI DER (fixed prefix + raw public key) as a `PUBLIC KEY` PEM.
    pub(crate) fn spki_pem(prefix_hex: &str, public_key: &[u8]) -> Vec<u8> {
        let mut der = unhex(prefix_hex);
        der.extend_from_slice(public_key);
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap());
            pem.push('\n');
        }
        pem.push_str("-----END PUBLIC KEY-----\n");
        pem.into_bytes()
    }

    pub(crate) enum Signer {
        Hs(Vec<u8>),
        Rs(sig::RsaKeyPair),
        Es(sig::EcdsaKeyPair),
        Ed(sig::Ed25519KeyPair),
    }

    impl Signer {
        pub(crate) fn rsa() -> Self {
            Signer::Rs(sig::RsaKeyPair::from_pkcs8(RSA_PK8).unwrap())
        }
        pub(crate) fn es256() -> Self {
            let rng = SystemRandom::new();
            let alg = &sig::ECDSA_P256_SHA256_FIXED_SIGNING;
            let pk8 = sig::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
            Signer::Es(sig::EcdsaKeyPair::from_pkcs8(alg, pk8.as_ref(), &rng).unwrap())
        }
        pub(crate) fn ed25519() -> Self {
            let pk8 = sig::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
            Signer::Ed(sig::Ed25519KeyPair::from_pkcs8(pk8.as_ref()).unwrap())
        }
        fn alg(&self) -> &'static str {
            match self {
                Signer::Hs(_) => "HS256",
                Signer::Rs(_) => "RS256",
                Signer::Es(_) => "ES256",
                Signer::Ed(_) => "EdDSA",
            }
        }
        /// The (alg, PEM) settings entry for a public-key signer.
        pub(crate) fn public_key(&self) -> (String, Vec<u8>) {
            let pem = match self {
                Signer::Hs(_) => unreachable!(),
                Signer::Rs(_) => RSA_PUB_PEM.to_vec(),
                Signer::Es(kp) => spki_pem(P256_SPKI_PREFIX, kp.public_key().as_ref()),
                Signer::Ed(kp) => spki_pem(ED25519_SPKI_PREFIX, kp.public_key().as_ref()),
            };
            (self.alg().to_string(), pem)
        }
        fn sign(&self, msg: &[u8]) -> Vec<u8> {
            let rng = SystemRandom::new();
            match self {
                Signer::Hs(k) => hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, k), msg).as_ref().to_vec(),
                Signer::Rs(kp) => {
                    let mut out = vec![0; kp.public().modulus_len()];
                    kp.sign(&sig::RSA_PKCS1_SHA256, &rng, msg, &mut out).unwrap();
                    out
                }
                Signer::Es(kp) => kp.sign(&rng, msg).unwrap().as_ref().to_vec(),
                Signer::Ed(kp) => kp.sign(msg).as_ref().to_vec(),
            }
        }
        /// A compact JWS built by hand (independent of jsonwebtoken's encoder).
        pub(crate) fn token_with_header(&self, header: &Value, claims: &Value) -> String {
            let h = B64URL.encode(serde_json::to_vec(header).unwrap());
            let c = B64URL.encode(serde_json::to_vec(claims).unwrap());
            let input = format!("{h}.{c}");
            let s = B64URL.encode(self.sign(input.as_bytes()));
            format!("{input}.{s}")
        }
        pub(crate) fn token(&self, claims: &Value) -> String {
            self.token_with_header(&json!({"alg": self.alg(), "typ": "JWT"}), claims)
        }
    }

    fn hs() -> Signer {
        Signer::Hs(SECRET.to_vec())
    }

    fn settings() -> JwtSettings {
        JwtSettings { hs256_secret: Some(SECRET.to_vec()), ..JwtSettings::default() }
    }

    fn verifier(s: &JwtSettings) -> JwtVerifier {
        JwtVerifier::new(s).unwrap()
    }

    fn claims() -> Value {
        json!({"sub": "u1", "exp": NOW + 3600})
    }

    fn with(mut base: Value, k: &str, v: Value) -> Value {
        base[k] = v;
        base
    }

    fn without(mut base: Value, k: &str) -> Value {
        base.as_object_mut().unwrap().remove(k);
        base
    }

    #[test]
    fn hs256_known_answer() {
        // Built outside Rust (Python hmac/base64) from RFC 7519's rules.
        let token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ1MSIsImV4cCI6MjAwMDAwMDAwMCwiYWdlbnRzIjpbImExIl19._f496xqZPORknKmWZ1PLrMMZE6ka3TFPnuo6fWsQZGI";
        let v = verifier(&settings());
        let c = v.verify_at(token, NOW).unwrap();
        assert_eq!(
            c,
            ClientClaims { user: "u1".into(), exp: 2_000_000_000, agents: Some(vec!["a1".into()]) }
        );
        // Padded parts are accepted too (spec §2).
        let padded: Vec<String> =
            token.split('.').map(|p| format!("{p}{}", "=".repeat((4 - p.len() % 4) % 4))).collect();
        assert!(v.verify_at(&padded.join("."), NOW).is_ok());
        assert_eq!(v.verify_at(token, 2_000_000_000 + 30), Err(AuthError::TokenExpired));
    }

    #[test]
    fn mint_round_trip() {
        let v = verifier(&settings());
        let t = mint_hs256(SECRET, "user-1", &[], 3600, NOW);
        let c = v.verify_at(&t, NOW).unwrap();
        assert_eq!(c, ClientClaims { user: "user-1".into(), exp: NOW + 3600, agents: None });
        let payload: Value =
            serde_json::from_slice(&B64URL.decode(t.split('.').nth(1).unwrap()).unwrap()).unwrap();
        assert_eq!(payload, json!({"sub": "user-1", "iat": NOW, "exp": NOW + 3600}));

        let agents = vec!["ag_1".to_string(), "ag_2".to_string()];
        let t = mint_hs256(SECRET, "user-1", &agents, 60, NOW);
        assert_eq!(v.verify_at(&t, NOW).unwrap().agents, Some(agents.clone()));
        assert_eq!(v.verify_at(&mint_hs256(b"other", "u", &[], 60, NOW), NOW), Err(AuthError::BadSignature));

        let uid = verifier(&JwtSettings { user_claim: "uid".into(), ..settings() });
        let t = mint_hs256_with_claim(SECRET, "uid", "user-2", &agents, 60, NOW);
        assert_eq!(uid.verify_at(&t, NOW).unwrap().user, "user-2");
        assert_eq!(
            uid.verify_at(&mint_hs256(SECRET, "user-2", &[], 60, NOW), NOW),
            Err(AuthError::BadUserClaim)
        );
    }

    /// With no provider, jsonwebtoken panics at the first decode; ours is installed by `new`.
    #[test]
    fn jsonwebtoken_decode_does_not_panic() {
        use jsonwebtoken::{decode, Validation};
        let es = Signer::es256();
        let ed = Signer::ed25519();
        let rs = Signer::rsa();
        let s = JwtSettings {
            public_keys: vec![es.public_key(), ed.public_key(), rs.public_key()],
            ..settings()
        };
        let v = verifier(&s);
        let now = unix_now();
        let c = json!({"sub": "u1", "exp": now + 600});

        let t = mint_hs256(SECRET, "u1", &[], 600, now);
        let d = decode::<Value>(&t, &DecodingKey::from_secret(SECRET), &Validation::new(Algorithm::HS256));
        assert_eq!(d.unwrap().claims["sub"], "u1");
        assert!(v.verify(&t).is_ok());
        let d = decode::<Value>(&t, &DecodingKey::from_secret(b"wrong"), &Validation::new(Algorithm::HS256));
        assert_eq!(d.unwrap_err().kind(), &ErrorKind::InvalidSignature);

        for (signer, key, alg) in [
            (&es, DecodingKey::from_ec_pem(&es.public_key().1).unwrap(), Algorithm::ES256),
            (&ed, DecodingKey::from_ed_pem(&ed.public_key().1).unwrap(), Algorithm::EdDSA),
            (&rs, DecodingKey::from_rsa_pem(RSA_PUB_PEM).unwrap(), Algorithm::RS256),
        ] {
            let t = signer.token(&c);
            assert_eq!(decode::<Value>(&t, &key, &Validation::new(alg)).unwrap().claims["sub"], "u1");
            assert!(v.verify(&t).is_ok());
        }
        // Unsupported algorithms are errors, not panics.
        let hs384 = Validation::new(Algorithm::HS384);
        assert!(decode::<Value>(&t_hs384(), &DecodingKey::from_secret(SECRET), &hs384).is_err());
        assert!((RING_PROVIDER.signer_factory)(&Algorithm::RS256, &EncodingKey::from_secret(SECRET)).is_err());
        assert!(jsonwebtoken::encode(&Header::new(Algorithm::HS512), &c, &EncodingKey::from_secret(SECRET))
            .is_err());
        // JWK helpers answer instead of panicking.
        let jwk =
            jsonwebtoken::jwk::Jwk::from_encoding_key(&EncodingKey::from_secret(SECRET), Algorithm::HS256);
        assert!(jwk.is_ok());
        assert!((RING_PROVIDER.key_utils.rsa_pub_components_from_private_key)(b"junk").is_err());
        let (n, e) =
            (RING_PROVIDER.key_utils.rsa_pub_components_from_private_key)(&pk8_to_pkcs1(RSA_PK8)).unwrap();
        let (n2, e2) = (RING_PROVIDER.key_utils.rsa_pub_components_from_public_key)(
            DecodingKey::from_rsa_pem(RSA_PUB_PEM).unwrap().try_get_as_bytes().unwrap(),
        )
        .unwrap();
        assert_eq!((n.len(), &e), (256, &vec![1, 0, 1]));
        assert_eq!((n, e), (n2, e2));
    }

    /// The PKCS#1 RSAPrivateKey inside a PKCS#8 DER (ring's `from_der` wants PKCS#1).
    fn pk8_to_pkcs1(pk8: &[u8]) -> Vec<u8> {
        let (seq, _) = der_tlv(pk8, 0x30).unwrap();
        let (_, rest) = der_tlv(seq, 0x02).unwrap(); // version
        let (_, rest) = der_tlv(rest, 0x30).unwrap(); // algorithm
        der_tlv(rest, 0x04).unwrap().0.to_vec()
    }

    fn t_hs384() -> String {
        let h = B64URL.encode(br#"{"alg":"HS384"}"#);
        let c = B64URL.encode(br#"{"sub":"u","exp":9999999999}"#);
        format!("{h}.{c}.{}", B64URL.encode([0u8; 48]))
    }

    #[test]
    fn time_claims() {
        use AuthError::*;
        let v = verifier(&settings()); // leeway 30
        let t = |c: Value| v.verify_at(&hs().token(&c), NOW);
        assert!(t(with(claims(), "exp", json!(NOW - 29))).is_ok());
        assert_eq!(t(with(claims(), "exp", json!(NOW - 30))), Err(TokenExpired));
        assert_eq!(t(with(claims(), "exp", json!(NOW - 3600))), Err(TokenExpired));
        assert_eq!(t(without(claims(), "exp")), Err(MissingExp));
        assert_eq!(t(with(claims(), "exp", json!("2000000000"))), Err(MalformedToken));
        assert_eq!(t(with(claims(), "exp", json!(-5))), Err(MalformedToken));
        assert_eq!(t(with(claims(), "exp", json!(null))), Err(MalformedToken));
        assert_eq!(t(with(claims(), "exp", json!((NOW + 10) as f64 + 0.5))).unwrap().exp, NOW + 10);
        assert!(t(with(claims(), "nbf", json!(NOW + 30))).is_ok());
        assert_eq!(t(with(claims(), "nbf", json!(NOW + 31))), Err(TokenNotYetValid));
        assert!(t(with(claims(), "nbf", json!(NOW - 100))).is_ok());
        assert_eq!(t(with(claims(), "nbf", json!("soon"))), Err(MalformedToken));

        let strict = verifier(&JwtSettings { leeway_secs: 0, ..settings() });
        let t0 = |c: Value| strict.verify_at(&hs().token(&c), NOW);
        assert!(t0(with(claims(), "exp", json!(NOW + 1))).is_ok());
        assert_eq!(t0(with(claims(), "exp", json!(NOW))), Err(TokenExpired));
        assert_eq!(t0(with(claims(), "nbf", json!(NOW + 1))), Err(TokenNotYetValid));
    }

    #[test]
    fn issuer_and_audience() {
        use AuthError::*;
        let v = verifier(&JwtSettings {
            issuer: Some("https://issuer".into()),
            audience: Some("switchboard".into()),
            ..settings()
        });
        let t = |c: Value| v.verify_at(&hs().token(&c), NOW);
        let good = with(with(claims(), "iss", json!("https://issuer")), "aud", json!("switchboard"));
        assert!(t(good.clone()).is_ok());
        assert!(t(with(good.clone(), "aud", json!(["other", "switchboard"]))).is_ok());
        assert_eq!(t(with(good.clone(), "aud", json!(["other"]))), Err(BadAudience));
        assert_eq!(t(with(good.clone(), "aud", json!("Switchboard"))), Err(BadAudience));
        assert_eq!(t(without(good.clone(), "aud")), Err(BadAudience));
        assert_eq!(t(with(good.clone(), "iss", json!("https://evil"))), Err(BadIssuer));
        assert_eq!(t(with(good.clone(), "iss", json!(["https://issuer"]))), Err(BadIssuer));
        assert_eq!(t(without(good, "iss")), Err(BadIssuer));
        // Unconfigured: not checked at all.
        let plain = verifier(&settings());
        assert!(plain.verify_at(&hs().token(&with(claims(), "aud", json!(["x"]))), NOW).is_ok());
        assert!(plain.verify_at(&hs().token(&with(claims(), "iss", json!(5))), NOW).is_ok());
    }

    #[test]
    fn user_and_agents_claims() {
        use AuthError::*;
        let v = verifier(&settings());
        let t = |c: Value| v.verify_at(&hs().token(&c), NOW);
        assert_eq!(t(with(claims(), "sub", json!("é".repeat(64)))).unwrap().user.len(), 128);
        assert_eq!(t(with(claims(), "sub", json!("x".repeat(129)))), Err(BadUserClaim));
        assert_eq!(t(with(claims(), "sub", json!(""))), Err(BadUserClaim));
        assert_eq!(t(with(claims(), "sub", json!(42))), Err(BadUserClaim));
        assert_eq!(t(with(claims(), "sub", json!(["u1"]))), Err(BadUserClaim));
        assert_eq!(t(without(claims(), "sub")), Err(BadUserClaim));

        assert_eq!(t(with(claims(), "agents", json!([]))).unwrap().agents, Some(vec![]));
        assert_eq!(t(with(claims(), "agents", json!(["a", "b"]))).unwrap().agents.unwrap(), ["a", "b"]);
        assert_eq!(t(with(claims(), "agents", json!("a"))), Err(BadAgentsClaim));
        assert_eq!(t(with(claims(), "agents", json!(["a", 1]))), Err(BadAgentsClaim));
        assert_eq!(t(with(claims(), "agents", json!({"a": true}))), Err(BadAgentsClaim));
        assert_eq!(t(with(claims(), "agents", json!(null))), Err(BadAgentsClaim));
    }

    #[test]
    fn signatures_and_algorithms() {
        use AuthError::*;
        let es = Signer::es256();
        let es2 = Signer::es256();
        let ed = Signer::ed25519();
        let rs = Signer::rsa();
        // Two ES256 keys: either one may have signed.
        let s = JwtSettings {
            public_keys: vec![es2.public_key(), es.public_key(), ed.public_key(), rs.public_key()],
            ..settings()
        };
        let v = verifier(&s);
        for signer in [&hs(), &es, &es2, &ed, &rs] {
            let t = signer.token(&claims());
            assert_eq!(v.verify_at(&t, NOW).unwrap().user, "u1", "{}", signer.alg());
            // Tampered payload, same signature.
            let mut parts: Vec<&str> = t.split('.').collect();
            let forged = B64URL.encode(serde_json::to_vec(&with(claims(), "sub", json!("admin"))).unwrap());
            parts[1] = &forged;
            assert_eq!(v.verify_at(&parts.join("."), NOW), Err(BadSignature), "{}", signer.alg());
        }
        // Signed by a key we do not hold.
        assert_eq!(v.verify_at(&Signer::es256().token(&claims()), NOW), Err(BadSignature));
        assert_eq!(v.verify_at(&Signer::ed25519().token(&claims()), NOW), Err(BadSignature));
        assert_eq!(v.verify_at(&Signer::Hs(b"other".to_vec()).token(&claims()), NOW), Err(BadSignature));

        // Only configured algorithms; HS256 only with a secret (no alg confusion, no `none`).
        let only_es = verifier(&JwtSettings { public_keys: vec![es.public_key()], ..JwtSettings::default() });
        assert!(only_es.verify_at(&es.token(&claims()), NOW).is_ok());
        assert_eq!(only_es.verify_at(&hs().token(&claims()), NOW), Err(BadAlgorithm));
        assert_eq!(only_es.verify_at(&rs.token(&claims()), NOW), Err(BadAlgorithm));
        let pem_as_secret = Signer::Hs(es.public_key().1);
        assert_eq!(only_es.verify_at(&pem_as_secret.token(&claims()), NOW), Err(BadAlgorithm));
        let none = format!(
            "{}.{}.",
            B64URL.encode(br#"{"alg":"none"}"#),
            B64URL.encode(serde_json::to_vec(&claims()).unwrap())
        );
        assert_eq!(v.verify_at(&none, NOW), Err(BadAlgorithm));
        assert_eq!(v.verify_at(&t_hs384(), NOW), Err(BadAlgorithm));
        // ES256 header on an EdDSA signature.
        let mixed = ed.token_with_header(&json!({"alg": "ES256"}), &claims());
        assert_eq!(v.verify_at(&mixed, NOW), Err(BadSignature));
        // Critical header extensions are refused even when signed.
        let crit = hs().token_with_header(&json!({"alg": "HS256", "crit": ["b64"], "b64": false}), &claims());
        assert_eq!(v.verify_at(&crit, NOW), Err(MalformedToken));
        // `kid` and `typ` do not matter.
        let kid = es.token_with_header(&json!({"alg": "ES256", "kid": "k1", "typ": "at+jwt"}), &claims());
        assert!(v.verify_at(&kid, NOW).is_ok());
    }

    #[test]
    fn malformed_tokens() {
        use AuthError::*;
        let v = verifier(&settings());
        let good = hs().token(&claims());
        let (input, _) = good.rsplit_once('.').unwrap();
        for bad in [
            String::new(),
            ".".into(),
            "..".into(),
            "a.b".into(),
            format!("{good}.x"),
            format!("{input}.!!!"),
            format!("{input}.{}", "A".repeat(2000)),
            format!("x{good}"),
            format!("{}.e30.{}", B64URL.encode(b"not json"), B64URL.encode([0u8; 32])),
            "A".repeat(MAX_TOKEN_LEN + 1),
        ] {
            let err = v.verify_at(&bad, NOW).unwrap_err();
            assert!(matches!(err, MalformedToken | BadSignature), "{bad:.40}: {err:?}");
        }
        // A correctly signed payload that is not a JSON object.
        let arr = hs().token(&json!([1, 2]));
        assert_eq!(v.verify_at(&arr, NOW), Err(MalformedToken));
        // Trailing whitespace or a stray byte is not tolerated.
        assert!(v.verify_at(&format!("{good} "), NOW).is_err());
    }

    #[test]
    fn setup_errors() {
        let es = Signer::es256();
        let ed = Signer::ed25519();
        let with_keys =
            |keys: Vec<(String, Vec<u8>)>| JwtVerifier::new(&JwtSettings { public_keys: keys, ..settings() });
        let garbage = b"-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkq\n-----END PUBLIC KEY-----\n".to_vec();
        let err = with_keys(vec![es.public_key(), ("RS256".into(), garbage.clone())]).unwrap_err();
        assert_eq!(err, JwtSetupError::BadKey { index: 1, alg: "RS256" });
        assert!(!err.to_string().contains("MIIB"), "{err}");
        // A key of another kind than its alg says.
        assert_eq!(
            with_keys(vec![("RS256".into(), es.public_key().1)]).unwrap_err(),
            JwtSetupError::BadKey { index: 0, alg: "RS256" }
        );
        assert_eq!(
            with_keys(vec![("ES256".into(), ed.public_key().1)]).unwrap_err(),
            JwtSetupError::BadKey { index: 0, alg: "ES256" }
        );
        assert_eq!(
            with_keys(vec![("EdDSA".into(), RSA_PUB_PEM.to_vec())]).unwrap_err(),
            JwtSetupError::BadKey { index: 0, alg: "EdDSA" }
        );
        assert_eq!(
            with_keys(vec![("ES256".into(), b"not pem".to_vec())]).unwrap_err(),
            JwtSetupError::BadKey { index: 0, alg: "ES256" }
        );
        // A P-384 key offered as ES256.
        let p384 =
            sig::EcdsaKeyPair::generate_pkcs8(&sig::ECDSA_P384_SHA384_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        let p384 = sig::EcdsaKeyPair::from_pkcs8(
            &sig::ECDSA_P384_SHA384_FIXED_SIGNING,
            p384.as_ref(),
            &SystemRandom::new(),
        )
        .unwrap();
        let p384_pem = spki_pem("3076301006072a8648ce3d020106052b81040022036200", p384.public_key().as_ref());
        assert!(DecodingKey::from_ec_pem(&p384_pem).is_ok());
        assert_eq!(
            with_keys(vec![("ES256".into(), p384_pem)]).unwrap_err(),
            JwtSetupError::BadKey { index: 0, alg: "ES256" }
        );
        assert_eq!(
            with_keys(vec![("HS512".into(), garbage)]).unwrap_err(),
            JwtSetupError::UnsupportedAlgorithm { index: 0 }
        );
        assert_eq!(JwtVerifier::new(&JwtSettings::default()).unwrap_err(), JwtSetupError::NoKeys);
        assert_eq!(
            JwtVerifier::new(&JwtSettings { hs256_secret: Some(vec![]), ..settings() }).unwrap_err(),
            JwtSetupError::EmptySecret
        );
        assert_eq!(
            JwtVerifier::new(&JwtSettings { user_claim: String::new(), ..settings() }).unwrap_err(),
            JwtSetupError::EmptyUserClaim
        );
    }

    #[test]
    fn rsa_der_parsing() {
        assert!(parse_rsa_public_key(&[]).is_none());
        assert!(parse_rsa_public_key(&[0x30, 0x03, 0x02, 0x01, 0x01]).is_none()); // no exponent
        assert!(parse_rsa_public_key(&[0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01]).is_none()); // truncated
        assert!(parse_rsa_public_key(&[0x30, 0x84, 0, 0, 0, 0]).is_none()); // 4-byte length
        let (n, e) = parse_rsa_public_key(&[0x30, 0x06, 0x02, 0x01, 0x05, 0x02, 0x01, 0x03]).unwrap();
        assert_eq!((n, e), (&[5u8][..], &[3u8][..]));
        // Too small a modulus, even exponent.
        assert!(rsa_components(&[1; 128], &[1, 0, 1]).is_err());
        assert!(rsa_components(&[0xff; 256], &[1, 0, 0]).is_err());
        assert!(rsa_components(&[0xff; 256], &[1]).is_err());
        assert!(rsa_components(&[0xff; 256], &[1, 0, 1]).is_ok());
        assert!(rsa_components(&[0xff; 1025], &[1, 0, 1]).is_err());
    }

    #[test]
    fn debug_and_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<JwtVerifier>();
        let s = settings();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("jwt_secret_for_tests") && dbg.contains("redacted"), "{dbg}");
        let v = format!("{:?}", verifier(&s));
        assert!(!v.contains("jwt_secret"), "{v}");
    }
}
