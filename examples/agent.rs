//! An echo agent: connects as an HMAC agent, prints every frame it gets and sends every
//! message's `data` back to the session that sent it.
//!
//! ```text
//! cargo run --example agent -- --addr 127.0.0.1:7600 --agent-id ID --secret sbk_...
//! ```
//! Each flag may instead come from the environment: `SB_ADDR`, `SB_AGENT_ID`, `SB_SECRET`.

use std::time::Duration;
use switchboard::client::{AgentConn, AgentCredential, Event};

fn arg(args: &[String], flag: &str, env: &str) -> Option<String> {
    let prefix = format!("{flag}=");
    for (i, a) in args.iter().enumerate() {
        if a == flag {
            return args.get(i + 1).cloned();
        }
        if let Some(v) = a.strip_prefix(&prefix) {
            return Some(v.to_string());
        }
    }
    std::env::var(env).ok()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(addr), Some(agent_id), Some(secret)) = (
        arg(&args, "--addr", "SB_ADDR"),
        arg(&args, "--agent-id", "SB_AGENT_ID"),
        arg(&args, "--secret", "SB_SECRET"),
    ) else {
        eprintln!("usage: agent --addr HOST:PORT --agent-id ID --secret SECRET");
        std::process::exit(2);
    };
    let addr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bad --addr {addr:?}: {e}");
            std::process::exit(2);
        }
    };
    let cred = AgentCredential::Hmac { agent_id, secret };
    let mut conn = match AgentConn::connect(addr, &cred) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("connect failed: {e}");
            std::process::exit(1);
        }
    };
    println!("{}", conn.welcome.text);
    loop {
        match conn.recv(Duration::from_secs(3600)) {
            Event::Frame(f) => {
                println!("{}", f.text);
                if f.ty() == "message" {
                    let from = f.str("from").to_string();
                    let data = f.raw_data().unwrap_or_else(|| "null".into());
                    if let Err(e) = conn.send_raw_data(Some(&from), &data, None) {
                        eprintln!("send failed: {e}");
                        std::process::exit(1);
                    }
                }
            }
            Event::Timeout => continue,
            Event::Close { code, reason } => {
                eprintln!("closed by the relay: {code} {reason}");
                std::process::exit(if code == 1000 { 0 } else { 1 });
            }
            other => {
                eprintln!("connection ended: {other:?}");
                std::process::exit(1);
            }
        }
    }
}
