//! The pre-101 flow: read the request head (bounded in size and time), run every check of
//! spec §2 cheapest first, authenticate (§3), then hand the socket to the user's home shard,
//! which finishes the upgrade.
//!
//! Invariants:
//! - Nothing is answered with 101 before every check has passed; a refusal is one HTTP
//!   response with a JSON body, and costs no crypto when it comes from the per-IP limit.
//! - Stateful checks (the agent's nonce window, the user's connection cap) run on the home
//!   shard, which owns that state; stateless ones (signatures, JWT, store reads) run on the
//!   accepting shard.
//! - No credential is ever logged: only the refusal's reason.

use crate::auth::agent::{self as agent_auth, AgentKey, UpgradeHeaders};
use crate::auth::jwt::ClientClaims;
use crate::connection;
use crate::http::{self, Endpoint, Refusal, Request};
use crate::listener::ConnSlot;
use crate::shard::local::{unix_now, ShardCtx};
use crate::shard::ShardMsg;
use crate::store::{AgentRecord, Credential};
use bytes::BytesMut;
use monoio::net::TcpStream;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// An authenticated upgrade on its way to the home shard.
pub struct Handoff {
    pub fd: OwnedFd,
    pub peer: SocketAddr,
    pub slot: ConnSlot,
    /// Bytes the client sent after the request head (early WebSocket frames).
    pub leftover: Vec<u8>,
    pub ws_key: String,
    pub subprotocol: bool,
    pub who: Authenticated,
    pub started: Instant,
}

pub enum Authenticated {
    Agent {
        record: Box<AgentRecord>,
        key: AgentKey,
        nonce: String,
    },
    Client {
        claims: ClientClaims,
        bound: Option<String>,
    },
    /// The test-only echo endpoint: no identity, no routing.
    Echo,
}

/// The pseudo-user that owns echo connections: longer than any valid user id (128 bytes),
/// so it can never be a real user's state.
pub const ECHO_USER: &str = concat!(
    "echo-endpoint-echo-endpoint-echo-endpoint-echo-endpoint-echo-endpoint-echo-endpoint-",
    "echo-endpoint-echo-endpoint-echo-endpoint-echo-endpoint-echo-endpoint-echo-endpoint"
);

impl Authenticated {
    pub fn user(&self) -> &str {
        match self {
            Authenticated::Agent { record, .. } => &record.user,
            Authenticated::Client { claims, .. } => &claims.user,
            Authenticated::Echo => ECHO_USER,
        }
    }
}

/// Handles one accepted socket up to the handoff.
pub async fn run(shard: Rc<ShardCtx>, stream: TcpStream, mut peer: SocketAddr, slot: ConnSlot) {
    let started = Instant::now();
    let (timeout_ms, max_head, mut want_proxy) = {
        let cfg = shard.cfg();
        let proxy = cfg.server.proxy_protocol == crate::config::ProxyProtocol::Required;
        (cfg.server.handshake_timeout_ms, cfg.server.max_head_bytes, proxy)
    };
    if want_proxy && !shard.is_trusted_proxy(peer.ip()) {
        return refuse(stream, peer, Refusal::BadRequest, "untrusted_proxy").await;
    }
    let deadline = started + Duration::from_millis(timeout_ms);
    let fd = stream.as_raw_fd();
    let mut buf = BytesMut::with_capacity(1024);
    let req = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match monoio::time::timeout(left, stream.readable(false)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                crate::metrics::handshake_timeout();
                tracing::info!(peer = %peer, reason = "handshake_timeout", "request head not received in time; dropped");
                return;
            }
        }
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(1024.min(max_head + 1024 - buf.len()).max(512));
        }
        match crate::ws::recv(fd, &mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
        if want_proxy {
            match crate::proxy::parse_v2(&buf) {
                Ok(None) => continue,
                Ok(Some(h)) => {
                    if let Some(source) = h.source {
                        peer = source;
                    }
                    bytes::Buf::advance(&mut buf, h.len);
                    want_proxy = false;
                    if buf.is_empty() {
                        continue;
                    }
                }
                Err(_) => return refuse(stream, peer, Refusal::BadRequest, "bad_proxy_header").await,
            }
        }
        match http::parse_request(&buf, max_head) {
            Ok(None) => continue,
            Ok(Some(r)) => break r,
            Err(refusal) => return refuse(stream, peer, refusal, "malformed_head").await,
        }
    };
    match check(&shard, &req, peer) {
        Ok(Some(who)) => {
            let leftover = buf[req.head_len..].to_vec();
            let home = match &who {
                Authenticated::Echo => shard.idx,
                who => shard.global.home_shard(who.user()),
            };
            // A dup'd descriptor moves; the monoio stream (and any op it had) stays here.
            let Some(fd) = dup(fd) else { return };
            drop(stream);
            let h = Box::new(Handoff {
                fd,
                peer,
                slot,
                leftover,
                ws_key: req.ws_key.clone().unwrap_or_default(),
                subprotocol: req.offers_switchboard_v1,
                who,
                started,
            });
            if home == shard.idx {
                finish(&shard, h);
            } else {
                crate::metrics::handoff(shard.idx);
                if let Err(ShardMsg::Handoff(h)) = shard.global.inboxes[home].send(ShardMsg::Handoff(h)) {
                    // The home shard's inbox is full: refuse rather than queue without bound.
                    let fd = h.fd.as_raw_fd();
                    crate::ws::send_now(fd, Refusal::Unavailable.response());
                    crate::metrics::refused(Refusal::Unavailable, "handoff_queue_full");
                }
            }
        }
        Ok(None) => {
            // /healthz, answered in full.
            crate::ws::send_now(fd, http::healthz_response(shard.global.draining.load(Ordering::Relaxed)));
            linger(stream).await;
        }
        Err((refusal, reason)) => refuse(stream, peer, refusal, reason).await,
    }
}

/// Every stateless check of spec §2 and §3, in the spec's order. `Ok(None)` is `/healthz`.
fn check(
    shard: &ShardCtx,
    req: &Request,
    peer: SocketAddr,
) -> Result<Option<Authenticated>, (Refusal, &'static str)> {
    let g = &shard.global;
    let cfg = shard.cfg();
    if req.endpoint == Endpoint::Healthz && req.method_is_get {
        // Health answers while draining (503 {"status":"draining"}) and at the cap: that is
        // its job. It still counts toward the per-IP rate, like every request.
        if !g.allow_handshake(peer.ip(), Instant::now(), &cfg.limits) {
            return Err((Refusal::TooManyRequests, "ip_handshake_rate"));
        }
        return Ok(None);
    }
    if g.draining.load(Ordering::Relaxed) {
        return Err((Refusal::Unavailable, "draining"));
    }
    if g.open_conns.load(Ordering::Relaxed) > cfg.server.max_connections {
        return Err((Refusal::Unavailable, "global_connection_cap"));
    }
    if !g.allow_handshake(peer.ip(), Instant::now(), &cfg.limits) {
        return Err((Refusal::TooManyRequests, "ip_handshake_rate"));
    }
    if req.endpoint == Endpoint::Echo && !cfg.server.echo_endpoint {
        let r = if req.method_is_get { Refusal::NotFound } else { Refusal::MethodNotAllowed };
        return Err((r, r.reason()));
    }
    http::check_upgrade(req).map_err(|r| (r, r.reason()))?;
    let now = unix_now();
    let unauthorized = |reason| (Refusal::Unauthorized, reason);
    match req.endpoint {
        Endpoint::Agent => {
            let (Some(agent_id), Some(timestamp), Some(nonce), Some(signature)) =
                (&req.x_agent, &req.x_timestamp, &req.x_nonce, &req.x_signature)
            else {
                return Err(unauthorized("missing_credentials"));
            };
            let h = UpgradeHeaders { agent_id, timestamp, nonce, signature };
            agent_auth::check_upgrade_syntax(&h, now, cfg.auth.max_skew_secs)
                .map_err(|e| unauthorized(e.reason()))?;
            let record = match g.store.get_agent(agent_id) {
                Ok(Some(r)) => r,
                Ok(None) => return Err(unauthorized("unknown_agent")),
                Err(e) => {
                    tracing::error!(error = %e, "store read failed during agent handshake");
                    return Err((Refusal::Unavailable, "store_error"));
                }
            };
            if !record.is_usable(now) {
                return Err(unauthorized(if record.revoked { "revoked" } else { "expired" }));
            }
            let key = agent_key(&record.credential);
            if !agent_auth::verify_upgrade(&key, &h) {
                return Err(unauthorized("bad_signature"));
            }
            Ok(Some(Authenticated::Agent { record: Box::new(record), key, nonce: nonce.to_string() }))
        }
        Endpoint::Client => {
            let token = req.client_token().ok_or(unauthorized("missing_credentials"))?;
            let claims = g.jwt().verify(token).map_err(|e| unauthorized(e.reason()))?;
            let bound = match &req.agent {
                None => None,
                Some(agent_id) => {
                    let allowed = claims.agents.as_ref().is_none_or(|a| a.iter().any(|x| x == agent_id));
                    let ok = allowed
                        && matches!(g.store.get_agent(agent_id), Ok(Some(r)) if r.user == claims.user && r.is_usable(now));
                    if !ok {
                        return Err((Refusal::Forbidden, "agent_not_reachable"));
                    }
                    Some(agent_id.to_string())
                }
            };
            Ok(Some(Authenticated::Client { claims, bound }))
        }
        Endpoint::Echo => Ok(Some(Authenticated::Echo)),
        Endpoint::Healthz | Endpoint::Other => Err((Refusal::NotFound, "not_found")),
    }
}

pub fn agent_key(c: &Credential) -> AgentKey {
    match c {
        Credential::Hmac { secret } => AgentKey::hmac(secret.as_bytes()),
        Credential::Ed25519 { public_key } => AgentKey::ed25519(*public_key),
    }
}

/// Finishes an upgrade on the user's home shard: the stateful checks, then 101 + welcome.
pub fn finish(shard: &Rc<ShardCtx>, h: Box<Handoff>) {
    let Handoff { fd, peer, slot, leftover, ws_key, subprotocol, who, started } = *h;
    // SAFETY: fd is an open, owned TCP socket descriptor.
    let std_stream = unsafe { std::net::TcpStream::from_raw_fd(fd.into_raw_fd()) };
    let Ok(stream) = TcpStream::from_std(std_stream) else { return };
    let _ = stream.set_nodelay(true);
    let user = who.user();
    if let Authenticated::Agent { record, nonce, .. } = &who {
        if !shard.check_nonce(&record.agent_id, nonce, unix_now()) {
            monoio::spawn(refuse(stream, peer, Refusal::Unauthorized, "replayed_nonce"));
            return;
        }
    }
    if shard.user_conn_count(user) >= shard.cfg().limits.max_connections_per_user {
        monoio::spawn(refuse(stream, peer, Refusal::TooManyRequests, "user_connection_cap"));
        return;
    }
    let response = http::switching_protocols(&ws_key, subprotocol);
    let conn = connection::register(shard, &stream, peer, slot, who, response, leftover);
    crate::metrics::handshake_done(started.elapsed());
    monoio::spawn(connection::run(shard.clone(), stream, conn));
}

/// Answers with `refusal`, then lets the peer read it before the socket closes.
async fn refuse(stream: TcpStream, peer: SocketAddr, refusal: Refusal, reason: &'static str) {
    crate::metrics::refused(refusal, reason);
    tracing::info!(peer = %peer, status = refusal.status(), reason, "upgrade refused");
    crate::ws::send_now(stream.as_raw_fd(), refusal.response());
    linger(stream).await;
}

/// Half-closes and drains what the peer still sends (briefly), so the response is not lost
/// to a reset caused by unread input.
async fn linger(stream: TcpStream) {
    let fd = stream.as_raw_fd();
    // SAFETY: shutdown on a descriptor we own.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut sink = BytesMut::with_capacity(1024);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match monoio::time::timeout(left, stream.readable(false)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
        sink.clear();
        match crate::ws::recv(fd, &mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

fn dup(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we then own.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    (new >= 0).then(|| unsafe { OwnedFd::from_raw_fd(new) })
}
