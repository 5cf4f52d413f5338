//! With `proxy_protocol = "required"`, the client address in a PROXY v2 header from a trusted
//! upstream drives the per-IP limits (and logs); a missing header, a malformed one, or one
//! from an untrusted peer is refused before any HTTP is read.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn proxy_header(src: [u8; 4], port: u16) -> Vec<u8> {
    let mut h =
        vec![0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x11, 0, 12];
    h.extend_from_slice(&src);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&7600u16.to_be_bytes());
    h
}

/// Sends `prefix` then a client upgrade with `token`; returns the status line's code.
fn upgrade_status(d: &Daemon, prefix: &[u8], token: &str) -> u16 {
    let mut s = TcpStream::connect(d.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let auth = format!("Authorization: Bearer {token}");
    let mut req = prefix.to_vec();
    req.extend_from_slice(upgrade_head("/v1/client", &[&auth]).as_bytes());
    s.write_all(&req).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

fn daemon(trusted: &str) -> Daemon {
    Daemon::with_config(&format!(
        "[server]\nproxy_protocol = \"required\"\ntrusted_proxies = [\"{trusted}\"]\n\
         [limits]\nhandshakes_per_sec_per_ip = 1\nhandshakes_burst_per_ip = 2\n"
    ))
}

#[test]
fn the_header_address_drives_per_ip_limits() {
    let d = daemon("127.0.0.0/8");
    let t = d.token("u1", &[], "1h");
    let a = proxy_header([203, 0, 113, 7], 40000);
    let b = proxy_header([198, 51, 100, 9], 40001);
    assert_eq!(upgrade_status(&d, &a, &t), 101);
    assert_eq!(upgrade_status(&d, &a, &t), 101);
    // The third from the same original client is over its burst of 2 …
    assert_eq!(upgrade_status(&d, &a, &t), 429);
    // … while another client behind the same proxy is not.
    assert_eq!(upgrade_status(&d, &b, &t), 101);
    assert!(d.logs().contains("203.0.113.7:40000"), "logs name the original client:\n{}", d.logs());
}

#[test]
fn missing_malformed_or_untrusted_headers_are_refused() {
    let d = daemon("127.0.0.0/8");
    let t = d.token("u1", &[], "1h");
    assert_eq!(upgrade_status(&d, b"", &t), 400, "missing header");
    let mut bad = proxy_header([203, 0, 113, 7], 1);
    bad[12] = 0x31; // version 3
    assert_eq!(upgrade_status(&d, &bad, &t), 400, "malformed header");

    let d = daemon("10.0.0.0/8");
    let t = d.token("u1", &[], "1h");
    assert_eq!(upgrade_status(&d, &proxy_header([203, 0, 113, 7], 1), &t), 400, "untrusted peer");
}

#[test]
fn off_by_default_a_proxy_header_is_just_bad_http() {
    let d = Daemon::start_default();
    let t = d.token("u1", &[], "1h");
    assert_eq!(upgrade_status(&d, &proxy_header([203, 0, 113, 7], 1), &t), 400);
    assert_eq!(upgrade_status(&d, b"", &t), 101);
}
