//! The public listeners: one `SO_REUSEPORT` socket per shard on the same address, and each
//! shard's accept loop.
//!
//! Invariants:
//! - Binding refuses an address another process already listens on (monoio would otherwise
//!   share the port silently through `SO_REUSEPORT`).
//! - Every accepted socket holds a [`ConnSlot`] until it is closed, so the global cap counts
//!   handshaking and upgraded connections alike.

use crate::shard::local::ShardCtx;
use crate::shard::Global;
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Binds `n` listeners sharing `addr` (port 0 picks one ephemeral port for all).
pub fn bind(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    // Probe without SO_REUSEPORT: fails if anything already listens there.
    let probe = new_socket(addr, false)?;
    probe.bind(&addr.into()).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot bind {addr}: {e} (is another daemon running?)"))
    })?;
    let actual = probe.local_addr()?.as_socket().expect("inet address");
    drop(probe);
    (0..n)
        .map(|_| {
            let s = new_socket(actual, true)?;
            s.bind(&actual.into())?;
            s.listen(4096)?;
            s.set_nonblocking(true)?;
            Ok(s.into())
        })
        .collect()
}

fn new_socket(addr: SocketAddr, reuse_port: bool) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    Ok(s)
}

/// One open public connection, counted against `server.max_connections`.
pub struct ConnSlot(Arc<Global>);

impl ConnSlot {
    pub fn new(global: &Arc<Global>) -> ConnSlot {
        global.open_conns.fetch_add(1, Ordering::Relaxed);
        ConnSlot(global.clone())
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.open_conns.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts connections on this shard's listener until the process ends.
pub async fn accept_loop(shard: Rc<ShardCtx>, listener: monoio::net::TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let slot = ConnSlot::new(&shard.global);
                crate::metrics::accepted(shard.idx);
                monoio::spawn(crate::handshake::run(shard.clone(), stream, peer, slot));
            }
            Err(e) => {
                // EMFILE/ENFILE and friends: back off briefly instead of spinning.
                tracing::warn!(shard = shard.idx, error = %e, "accept failed");
                monoio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
