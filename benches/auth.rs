//! Benchmarks of `switchboard::auth`: the per-message signature check (the hot path) and the
//! per-connection checks (agent upgrade, client JWT).
//!
//! Run: `cargo bench --bench auth -- --warm-up-time 1 --measurement-time 3`.
//! What must stay true: inputs are realistic (a ~260-byte envelope `data`, spec-sized ids) and
//! every measured call succeeds (asserted once before measuring), so a bench never times a
//! fast failure.

use base64::Engine as _;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use ring::rand::SystemRandom;
use ring::signature::{self as sig, KeyPair as _};
use switchboard::auth::{
    check_upgrade_syntax, mint_hs256, sign_message_ed25519, sign_message_hmac, sign_upgrade_ed25519,
    sign_upgrade_hmac, verify_message, verify_upgrade, AgentKey, JwtSettings, JwtVerifier, NonceWindow,
    UpgradeHeaders,
};

const NOW: u64 = 1_900_000_000;
const SECRET: &[u8] = b"sbk_0123456789abcdefghijklmnopqrstuvwxyzABCDEFG";
const CONN: &str = "c_8Jx2kQ9vLm3nPq7r";
const SESSION: &str = "s_Yt5wEr2uIo8pAs1d";

/// A ~260-byte `data` value, as it would stand in a frame.
fn data_260() -> Vec<u8> {
    let d = br#"{"role":"assistant","id":"msg_01HZX3K9W2","content":[{"type":"text","text":"The build finished: 412 tests passed, 0 failed. Coverage is 87.3% (+0.4). Next: deploy to staging?"}],"usage":{"in":1834,"out":96},"ts":1900000000123}"#;
    let mut v = d.to_vec();
    v.resize(260, b' ');
    v[259] = b'}';
    v[258] = b' ';
    v
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn es256_token_and_pem() -> (String, Vec<u8>) {
    let rng = SystemRandom::new();
    let alg = &sig::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pk8 = sig::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let kp = sig::EcdsaKeyPair::from_pkcs8(alg, pk8.as_ref(), &rng).unwrap();
    // SPKI for a P-256 key: fixed prefix + the uncompressed point.
    let mut der = vec![
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
        0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    der.extend_from_slice(kp.public_key().as_ref());
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let pem =
        format!("-----BEGIN PUBLIC KEY-----\n{}\n{}\n-----END PUBLIC KEY-----\n", &body[..64], &body[64..]);
    let claims = format!(r#"{{"sub":"user-42","iat":{NOW},"exp":{},"agents":["ag_1","ag_2"]}}"#, NOW + 3600);
    let input = format!("{}.{}", b64(br#"{"alg":"ES256","typ":"JWT"}"#), b64(claims.as_bytes()));
    let s = kp.sign(&rng, input.as_bytes()).unwrap();
    (format!("{input}.{}", b64(s.as_ref())), pem.into_bytes())
}

fn agent(c: &mut Criterion) {
    let data = data_260();
    let mut scratch = Vec::with_capacity(1024);

    let hmac = AgentKey::hmac(SECRET);
    let sig_h = sign_message_hmac(SECRET, CONN, 1234567, SESSION, &data);
    assert!(verify_message(&hmac, CONN, "1234567", SESSION, &data, &sig_h, &mut scratch));
    c.bench_function("agent/verify_message/hmac/260B", |b| {
        b.iter(|| {
            verify_message(
                black_box(&hmac),
                black_box(CONN),
                black_box("1234567"),
                black_box(SESSION),
                black_box(&data),
                black_box(&sig_h),
                &mut scratch,
            )
        })
    });

    // The floor: ring's one-shot HMAC verify over the same signed string, already contiguous.
    let mut contiguous = format!("switchboard-msg-v1\n{CONN}\n1234567\n{SESSION}\n").into_bytes();
    contiguous.extend_from_slice(&data);
    let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&sig_h).unwrap();
    let ring_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET);
    assert!(ring::hmac::verify(&ring_key, &contiguous, &tag).is_ok());
    c.bench_function("baseline/ring_hmac_verify/same_message", |b| {
        b.iter(|| ring::hmac::verify(black_box(&ring_key), black_box(&contiguous), black_box(&tag)))
    });

    let pk8 = sig::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    let kp = sig::Ed25519KeyPair::from_pkcs8(pk8.as_ref()).unwrap();
    let ed = AgentKey::ed25519(kp.public_key().as_ref().try_into().unwrap());
    let sig_e = sign_message_ed25519(&kp, CONN, 1234567, SESSION, &data);
    assert!(verify_message(&ed, CONN, "1234567", SESSION, &data, &sig_e, &mut scratch));
    c.bench_function("agent/verify_message/ed25519/260B", |b| {
        b.iter(|| {
            verify_message(
                black_box(&ed),
                black_box(CONN),
                black_box("1234567"),
                black_box(SESSION),
                black_box(&data),
                black_box(&sig_e),
                &mut scratch,
            )
        })
    });

    let ts = NOW.to_string();
    let nonce = "n0nce_Zx8c7V6b5N4m3Q2w";
    let up_e = sign_upgrade_ed25519(&kp, "ag_7Hq2Lk9Xp", NOW, nonce);
    let h_e = UpgradeHeaders { agent_id: "ag_7Hq2Lk9Xp", timestamp: &ts, nonce, signature: &up_e };
    assert!(check_upgrade_syntax(&h_e, NOW, 300).is_ok() && verify_upgrade(&ed, &h_e));
    c.bench_function("agent/check_upgrade_syntax", |b| {
        b.iter(|| check_upgrade_syntax(black_box(&h_e), black_box(NOW), 300))
    });
    c.bench_function("agent/verify_upgrade/ed25519", |b| {
        b.iter(|| verify_upgrade(black_box(&ed), black_box(&h_e)))
    });
    let up_h = sign_upgrade_hmac(SECRET, "ag_7Hq2Lk9Xp", NOW, nonce);
    let h_h = UpgradeHeaders { signature: &up_h, ..h_e };
    assert!(verify_upgrade(&hmac, &h_h));
    c.bench_function("agent/verify_upgrade/hmac", |b| {
        b.iter(|| verify_upgrade(black_box(&hmac), black_box(&h_h)))
    });

    let nonces: Vec<String> = (0..1000).map(|i| format!("nonce_{i:012}")).collect();
    c.bench_function("agent/nonce_window/insert_1000", |b| {
        b.iter(|| {
            let mut w = NonceWindow::new(300);
            for n in &nonces {
                assert!(w.check_and_insert(n, NOW));
            }
            w
        })
    });
}

fn jwt(c: &mut Criterion) {
    let (es_token, es_pem) = es256_token_and_pem();
    let v = JwtVerifier::new(&JwtSettings {
        hs256_secret: Some(b"jwt-bench-secret-0123456789abcdef".to_vec()),
        public_keys: vec![("ES256".into(), es_pem)],
        ..JwtSettings::default()
    })
    .unwrap();
    let agents = vec!["ag_1".to_string(), "ag_2".to_string()];
    let hs_token = mint_hs256(b"jwt-bench-secret-0123456789abcdef", "user-42", &agents, 3600, NOW);
    assert_eq!(v.verify_at(&hs_token, NOW).unwrap().user, "user-42");
    assert_eq!(v.verify_at(&es_token, NOW).unwrap().user, "user-42");
    c.bench_function("jwt/verify/hs256", |b| b.iter(|| v.verify_at(black_box(&hs_token), NOW)));
    c.bench_function("jwt/verify/es256", |b| b.iter(|| v.verify_at(black_box(&es_token), NOW)));

    // RS256 with the test key pair checked in beside the unit tests.
    let kp =
        sig::RsaKeyPair::from_pkcs8(include_bytes!("../src/auth/testdata/rsa2048_test_key.pk8.der")).unwrap();
    let rs = JwtVerifier::new(&JwtSettings {
        public_keys: vec![(
            "RS256".into(),
            include_bytes!("../src/auth/testdata/rsa2048_test_pub.pem").to_vec(),
        )],
        ..JwtSettings::default()
    })
    .unwrap();
    let claims = format!(r#"{{"sub":"user-42","exp":{}}}"#, NOW + 3600);
    let input = format!("{}.{}", b64(br#"{"alg":"RS256"}"#), b64(claims.as_bytes()));
    let mut s = vec![0; kp.public().modulus_len()];
    kp.sign(&sig::RSA_PKCS1_SHA256, &SystemRandom::new(), input.as_bytes(), &mut s).unwrap();
    let rs_token = format!("{input}.{}", b64(&s));
    assert!(rs.verify_at(&rs_token, NOW).is_ok());
    c.bench_function("jwt/verify/rs256", |b| b.iter(|| rs.verify_at(black_box(&rs_token), NOW)));
}

criterion_group!(benches, agent, jwt);
criterion_main!(benches);
