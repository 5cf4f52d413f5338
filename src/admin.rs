//! The admin listener: `GET /metrics` (Prometheus text), `/healthz`, `/readyz`. A plain
//! blocking thread: it serves operators and scrapers, never the message path, and needs no
//! second async runtime.

use crate::shard::Global;
use metrics_exporter_prometheus::PrometheusHandle;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub fn spawn(
    listener: TcpListener,
    global: Arc<Global>,
    handle: PrometheusHandle,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("switchboard-admin".into())
        .spawn(move || {
            // Histograms keep raw samples until upkeep folds them in: without it they would
            // grow with every relayed message when nobody scrapes.
            let h = handle.clone();
            std::thread::Builder::new()
                .name("switchboard-metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_secs(1));
                    h.run_upkeep();
                })
                .expect("spawn metrics upkeep thread");
            for stream in listener.incoming().flatten() {
                let _ = serve(stream, &global, &handle);
            }
        })
        .expect("spawn admin thread")
}

fn serve(mut s: TcpStream, global: &Global, handle: &PrometheusHandle) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while n < buf.len() {
        let r = s.read(&mut buf[n..])?;
        if r == 0 {
            break;
        }
        n += r;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let line = buf[..n].split(|&b| b == b'\r').next().unwrap_or_default();
    let line = std::str::from_utf8(line).unwrap_or("");
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let draining = global.draining.load(Ordering::Relaxed);
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => {
            crate::metrics::record_scrape(&global.writer.writer_stats());
            ("200 OK", "text/plain; version=0.0.4", handle.render())
        }
        ("GET", "/healthz") if draining => {
            ("503 Service Unavailable", "application/json", r#"{"status":"draining"}"#.into())
        }
        ("GET", "/healthz") => ("200 OK", "application/json", r#"{"status":"ok"}"#.into()),
        ("GET", "/readyz") => {
            // Every shard accepting, and the store able to commit (a real write through the
            // writer thread).
            let ready = !draining
                && global.shards_accepting.load(Ordering::SeqCst) == global.shard_count()
                && global.writer.probe();
            if ready {
                ("200 OK", "application/json", r#"{"status":"ready"}"#.into())
            } else {
                ("503 Service Unavailable", "application/json", r#"{"status":"not_ready"}"#.into())
            }
        }
        ("GET", _) => ("404 Not Found", "application/json", r#"{"error":"not_found"}"#.into()),
        _ => ("405 Method Not Allowed", "application/json", r#"{"error":"method_not_allowed"}"#.into()),
    };
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()
}
