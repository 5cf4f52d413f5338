//! `/v1/echo` (for the Autobahn conformance run) exists only when `server.echo_endpoint` is
//! on; then it echoes text and binary messages through the same WebSocket layer.

mod common;

use common::*;
use std::time::Duration;
use tungstenite::Message;

#[test]
fn echo_is_404_unless_enabled() {
    let d = Daemon::start_default();
    let r = switchboard::client::raw_http(d.addr, upgrade_head("/v1/echo", &[]).as_bytes()).unwrap();
    assert_eq!((r.status, r.body.as_str()), (404, r#"{"error":"not_found"}"#));
}

#[test]
fn echo_returns_text_and_binary() {
    let d = Daemon::with_config("[server]\necho_endpoint = true\n");
    let stream = std::net::TcpStream::connect(d.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (mut ws, _) = tungstenite::client::client(format!("ws://{}/v1/echo", d.addr), stream).unwrap();
    ws.send(Message::text("héllo")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("héllo"));
    let big: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
    ws.send(Message::binary(big.clone())).unwrap();
    // 70,000 bytes is over the default max_frame_bytes (65,536): closed with 1009.
    match ws.read() {
        Ok(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 1009),
        other => panic!("expected close 1009, got {other:?}"),
    }
    let stream = std::net::TcpStream::connect(d.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (mut ws, _) = tungstenite::client::client(format!("ws://{}/v1/echo", d.addr), stream).unwrap();
    ws.send(Message::binary(big[..60_000].to_vec())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(big[..60_000].to_vec()));
    ws.close(None).unwrap();
}
