//! Agent credentials on arbitrary header strings: `check_upgrade_syntax` + `verify_upgrade`
//! (spec §3.1), and `verify_message` (spec §3.2) on arbitrary fields, with fixed HMAC and
//! Ed25519 keys.
//!
//! Input: a mode byte, then fields separated by `\n` (upgrade: agent id, timestamp, nonce,
//! signature; message: conn, ctr, to, signature, and the rest is `data`, newlines and all).
//! In the "signed" modes the signature field is replaced by the correct signature for the
//! other fields (when the timestamp/ctr is a u64), so the accepting path is explored too and
//! checked against the spec: a correct signature over syntactically valid fields verifies,
//! for both key types; a wrong one never does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ring::signature::Ed25519KeyPair;
use switchboard::auth::agent::UPGRADE_CONTEXT;
use switchboard::auth::{
    check_upgrade_syntax, sign_message_ed25519, sign_message_hmac, sign_upgrade_ed25519, sign_upgrade_hmac,
    verify_message, verify_upgrade, AgentKey, UpgradeHeaders,
};

const SECRET: &[u8] = b"sbk_fuzz_fixed_secret_0123456789";
const NOW: u64 = 1_700_000_000;
const SKEW: u64 = 300;

fn ed_pair() -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&[7u8; 32]).unwrap()
}

fn ed_key(kp: &Ed25519KeyPair) -> AgentKey {
    use ring::signature::KeyPair as _;
    AgentKey::ed25519(kp.public_key().as_ref().try_into().unwrap())
}

fn is_id(s: &str, min: usize, max: usize) -> bool {
    (min..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let hmac = AgentKey::hmac(SECRET);
    let kp = ed_pair();
    let ed = ed_key(&kp);
    let mut scratch = Vec::new();
    match mode % 4 {
        // Upgrade headers as given.
        0 => {
            let mut f = text.splitn(4, '\n');
            let (agent_id, timestamp, nonce, signature) = (
                f.next().unwrap_or(""),
                f.next().unwrap_or(""),
                f.next().unwrap_or(""),
                f.next().unwrap_or(""),
            );
            let h = UpgradeHeaders { agent_id, timestamp, nonce, signature };
            let syntax = check_upgrade_syntax(&h, NOW, SKEW);
            let _ = format!("{h:?}");
            // Nobody forges a signature by fuzzing.
            assert!(!verify_upgrade(&hmac, &h));
            assert!(!verify_upgrade(&ed, &h));
            if let Ok(ts) = syntax {
                assert!(ts >= 0 && (ts as u64).abs_diff(NOW) <= SKEW);
            }
        }
        // Upgrade headers, correctly signed.
        1 => {
            let mut f = text.splitn(3, '\n');
            let (agent_id, timestamp, nonce) =
                (f.next().unwrap_or(""), f.next().unwrap_or(""), f.next().unwrap_or(""));
            let Ok(ts) = timestamp.parse::<u64>() else { return };
            let canonical = timestamp == ts.to_string();
            let valid = is_id(agent_id, 1, 64) && is_id(nonce, 16, 64) && timestamp.len() <= 20;
            for (key, sig) in [
                (&hmac, sign_upgrade_hmac(SECRET, agent_id, ts, nonce)),
                (&ed, sign_upgrade_ed25519(&kp, agent_id, ts, nonce)),
            ] {
                let h = UpgradeHeaders { agent_id, timestamp, nonce, signature: &sig };
                let ok = verify_upgrade(key, &h);
                if valid && canonical {
                    assert!(ok, "a correct signature over valid headers did not verify");
                }
                if !canonical {
                    assert!(!ok, "verified over a different timestamp text");
                }
                if ok {
                    // Only when the signed string fits the stack buffer (171 bytes: every
                    // field at its maximum). A field over its own limit can still verify when
                    // the others are short; the handshake never gets there, because
                    // `check_upgrade_syntax` runs first.
                    assert!(
                        UPGRADE_CONTEXT.len() + 3 + agent_id.len() + timestamp.len() + nonce.len() <= 171
                    );
                }
                if valid && timestamp.bytes().all(|b| b.is_ascii_digit()) && ts.abs_diff(NOW) <= SKEW {
                    assert!(check_upgrade_syntax(&h, NOW, SKEW).is_ok());
                }
            }
        }
        // Message fields as given.
        2 => {
            let mut f = text.splitn(5, '\n');
            let (conn, ctr, to, sig, body) = (
                f.next().unwrap_or(""),
                f.next().unwrap_or(""),
                f.next().unwrap_or(""),
                f.next().unwrap_or(""),
                f.next().unwrap_or(""),
            );
            assert!(!verify_message(&hmac, conn, ctr, to, body.as_bytes(), sig, &mut scratch));
            assert!(!verify_message(&ed, conn, ctr, to, body.as_bytes(), sig, &mut scratch));
        }
        // Message fields, correctly signed (any lengths: long ids take the streaming path).
        _ => {
            let mut f = text.splitn(4, '\n');
            let (conn, ctr, to, body) = (
                f.next().unwrap_or(""),
                f.next().unwrap_or(""),
                f.next().unwrap_or(""),
                f.next().unwrap_or(""),
            );
            let Ok(n) = ctr.parse::<u64>() else { return };
            let expect = ctr == n.to_string() && (1..1u64 << 53).contains(&n);
            let body = body.as_bytes();
            let hs = sign_message_hmac(SECRET, conn, n, to, body);
            assert_eq!(verify_message(&hmac, conn, ctr, to, body, &hs, &mut scratch), expect);
            let es = sign_message_ed25519(&kp, conn, n, to, body);
            assert_eq!(verify_message(&ed, conn, ctr, to, body, &es, &mut scratch), expect);
            // Each key refuses the other's signature.
            assert!(!verify_message(&hmac, conn, ctr, to, body, &es, &mut scratch));
            assert!(!verify_message(&ed, conn, ctr, to, body, &hs, &mut scratch));
        }
    }
});
