//! Client JWTs: `JwtVerifier::verify` (and `verify_at` at a fixed time) on arbitrary strings,
//! with an HS256 secret and with an ES256 public key configured.
//!
//! Input: a mode byte, then
//! - mode 0: the token, as is, to both verifiers;
//! - mode 1/2: a JOSE header and a claims set (raw bytes, split at the first NUL), encoded
//!   and correctly signed with the HS256 secret (1) or the ES256 key (2), so the fuzzer
//!   reaches the header rules and every claim rule behind the signature check;
//! - mode 3: DER bytes wrapped as a `PUBLIC KEY` or `RSA PUBLIC KEY` PEM, loaded as an RS256,
//!   ES256 and EdDSA key (`JwtVerifier::new`: operator input, but a bad key file on SIGHUP
//!   must be refused, never crash the daemon).
//!
//! Checked: never a panic; an accepted token's user id is 1..=128 bytes and it is not
//! expired at the time it was checked (leeway aside); a token never verifies under the other
//! key's verifier; an unsigned or arbitrarily signed token is never accepted.
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use std::sync::OnceLock;
use switchboard::auth::{JwtSettings, JwtVerifier};

const HS_SECRET: &[u8] = b"fuzz-jwt-hs256-secret";
const NOW: u64 = 1_900_000_000;
const LEEWAY: u64 = 30;
/// A fixed P-256 key (PKCS#8), generated once with openssl for these tests only.
const ES_PK8_B64: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgdYpdX25w/vNxw3+LEcPfUPUfZxm7fLmq0x+mSKvSm+ihRANCAASuNqw4etN3JswMes40bhZF8VZM2cWHzIEbFspHW0tgv8hkAbE/9zXSbIquApGk0fch8VJiS4wL66+TwHDsUQxh";
const ES_PUB_PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAErjasOHrTdybMDHrONG4WRfFWTNnF
h8yBGxbKR1tLYL/IZAGxP/c10myKrgKRpNH3IfFSYkuMC+uvk8Bw7FEMYQ==
-----END PUBLIC KEY-----
";

struct Fixture {
    hs: JwtVerifier,
    es: JwtVerifier,
    es_key: EcdsaKeyPair,
    rng: SystemRandom,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let hs = JwtVerifier::new(&JwtSettings {
            hs256_secret: Some(HS_SECRET.to_vec()),
            ..JwtSettings::default()
        })
        .unwrap();
        let es = JwtVerifier::new(&JwtSettings {
            public_keys: vec![("ES256".into(), ES_PUB_PEM.as_bytes().to_vec())],
            ..JwtSettings::default()
        })
        .unwrap();
        let rng = SystemRandom::new();
        let pk8 = base64::engine::general_purpose::STANDARD.decode(ES_PK8_B64).unwrap();
        let es_key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pk8, &rng).unwrap();
        Fixture { hs, es, es_key, rng }
    })
}

fn check_accepted(token: &str, v: &JwtVerifier) {
    if let Ok(c) = v.verify_at(token, NOW) {
        assert!(!c.user.is_empty() && c.user.len() <= 128);
        assert!(NOW < c.exp.saturating_add(LEEWAY));
    }
    if let Ok(c) = v.verify(token) {
        assert!(!c.user.is_empty() && c.user.len() <= 128);
    }
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        3 => {
            let Some((&label, der)) = rest.split_first() else { return };
            let label = if label & 1 == 0 { "PUBLIC KEY" } else { "RSA PUBLIC KEY" };
            let b64 = base64::engine::general_purpose::STANDARD.encode(der);
            let pem = format!("-----BEGIN {label}-----\n{b64}\n-----END {label}-----\n");
            for alg in ["RS256", "ES256", "EdDSA"] {
                let settings = JwtSettings {
                    public_keys: vec![(alg.into(), pem.clone().into_bytes())],
                    ..JwtSettings::default()
                };
                if let Ok(v) = JwtVerifier::new(&settings) {
                    let _ = v.verify_at("eyJhbGciOiJSUzI1NiJ9.e30.AAAA", NOW);
                }
            }
        }
        0 => {
            let Ok(token) = std::str::from_utf8(rest) else { return };
            // Nobody forges an HMAC or ECDSA signature by fuzzing.
            assert!(f.hs.verify_at(token, NOW).is_err());
            assert!(f.es.verify_at(token, NOW).is_err());
            let _ = f.hs.verify(token);
            let _ = f.es.verify(token);
        }
        m => {
            let (header, claims) = match rest.iter().position(|&b| b == 0) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &b""[..]),
            };
            let signing_input =
                format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
            let sig = if m == 1 {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, HS_SECRET);
                ring::hmac::sign(&key, signing_input.as_bytes()).as_ref().to_vec()
            } else {
                f.es_key.sign(&f.rng, signing_input.as_bytes()).unwrap().as_ref().to_vec()
            };
            let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig));
            let (right, wrong) = if m == 1 { (&f.hs, &f.es) } else { (&f.es, &f.hs) };
            check_accepted(&token, right);
            assert!(wrong.verify_at(&token, NOW).is_err());
        }
    }
});
