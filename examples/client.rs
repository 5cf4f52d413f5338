//! A one-shot client: connects with a JWT, sends a message to an agent and prints every frame
//! that comes back until the agent answers (or 5 s pass).
//!
//! ```text
//! cargo run --example client -- --addr 127.0.0.1:7600 --token JWT --agent ID hello world
//! echo '{"any":"json"}' | cargo run --example client -- --addr … --token … --agent …
//! ```
//! The message is the remaining arguments joined by spaces, or each line of stdin. A message
//! that parses as JSON is sent as that value, anything else as a JSON string. Flags may come
//! from `SB_ADDR`, `SB_TOKEN`, `SB_AGENT`.

use serde_json::Value;
use std::io::BufRead;
use std::time::{Duration, Instant};
use switchboard::client::{ClientConn, Event, TokenPlace};

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut addr, mut token, mut agent) =
        (std::env::var("SB_ADDR").ok(), std::env::var("SB_TOKEN").ok(), std::env::var("SB_AGENT").ok());
    let mut words = Vec::new();
    while let Some(a) = args.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let slot = match flag.as_str() {
            "--addr" => &mut addr,
            "--token" => &mut token,
            "--agent" => &mut agent,
            _ => {
                words.push(a);
                continue;
            }
        };
        *slot = inline.or_else(|| args.next());
    }
    let (Some(addr), Some(token)) = (addr, token) else {
        eprintln!("usage: client --addr HOST:PORT --token JWT [--agent ID] [message...]");
        std::process::exit(2);
    };
    let addr = addr.parse().unwrap_or_else(|e| {
        eprintln!("bad --addr: {e}");
        std::process::exit(2)
    });
    let mut conn =
        ClientConn::connect(addr, &token, TokenPlace::Header, agent.as_deref()).unwrap_or_else(|e| {
            eprintln!("connect failed: {e}");
            std::process::exit(1)
        });
    println!("{}", conn.welcome.text);
    let lines: Vec<String> = if words.is_empty() {
        std::io::stdin().lock().lines().map_while(Result::ok).filter(|l| !l.trim().is_empty()).collect()
    } else {
        vec![words.join(" ")]
    };
    for (n, line) in lines.iter().enumerate() {
        let data: Value = serde_json::from_str(line).unwrap_or_else(|_| Value::String(line.clone()));
        let id = format!("m{}", n + 1);
        if let Err(e) = conn.send(agent.as_deref(), &data, Some(&id)) {
            eprintln!("send failed: {e}");
            std::process::exit(1);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match conn.recv(deadline.saturating_duration_since(Instant::now())) {
                Event::Frame(f) => {
                    println!("{}", f.text);
                    if f.ty() == "message" || (f.ty() == "error" && f.str("id") == id) {
                        break;
                    }
                }
                Event::Timeout => {
                    eprintln!("no answer within 5 s");
                    break;
                }
                other => {
                    eprintln!("connection ended: {other:?}");
                    std::process::exit(1);
                }
            }
        }
    }
    conn.ws.close();
}
