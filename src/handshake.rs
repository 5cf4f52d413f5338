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
use crate::tls::TlsIo;
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
    /// The TLS session, when the listener speaks TLS: it moves with the socket.
    pub tls: Option<Box<TlsIo>>,
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
        /// `since`/`epoch`/`resume` (spec §8), already checked for shape.
        resume: Option<ResumeReq>,
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

/// What a reconnecting client asks to resume (spec §8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeReq {
    /// `since` and `epoch`: the last `seq` the client has of the bound agent's stream.
    pub since: Option<(u64, String)>,
    /// `resume`: the client's previous session.
    pub old_session: Option<String>,
}

/// Checks the shape of `since`, `epoch` and `resume` (docs/protocol.md §10.2).
fn resume_params(req: &Request) -> Result<Option<ResumeReq>, &'static str> {
    let since = match (&req.since, &req.epoch) {
        (None, None) => None,
        (Some(s), Some(e)) => {
            if req.agent.is_none() {
                return Err("since_without_agent");
            }
            let digits = !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
            let n = digits.then(|| s.parse::<u64>().ok()).flatten().ok_or("bad_since")?;
            if !crate::ids::is_valid_id(e) {
                return Err("bad_epoch");
            }
            Some((n, e.clone()))
        }
        _ => return Err("since_and_epoch_go_together"),
    };
    let old_session = match &req.resume {
        None => None,
        Some(r) if crate::ids::is_valid_id(r) => Some(r.clone()),
        Some(_) => return Err("bad_resume"),
    };
    Ok((since.is_some() || old_session.is_some()).then_some(ResumeReq { since, old_session }))
}

impl Authenticated {
    pub fn user(&self) -> &str {
        match self {
            Authenticated::Agent { record, .. } => &record.user,
            Authenticated::Client { claims, .. } => &claims.user,
            Authenticated::Echo => ECHO_USER,
        }
    }
}

/// Sends a short response on a fresh socket (encrypted when the connection is TLS).
fn respond(fd: RawFd, tls: Option<&mut TlsIo>, bytes: &[u8]) {
    match tls {
        Some(t) => {
            if t.encrypt(bytes).is_ok() {
                let _ = t.write_to(fd);
            }
        }
        None => crate::ws::send_now(fd, bytes),
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
        return refuse(stream, None, peer, Refusal::BadRequest, "untrusted_proxy").await;
    }
    let mut tls = match shard.global.tls() {
        Some(cfg) => match TlsIo::new(cfg) {
            Ok(t) => Some(Box::new(t)),
            Err(_) => return,
        },
        None => None,
    };
    let deadline = started + Duration::from_millis(timeout_ms);
    let fd = stream.as_raw_fd();
    // `raw` holds bytes as received (PROXY header, ciphertext); `buf` the plaintext head.
    let mut raw = BytesMut::with_capacity(1024);
    let mut buf = BytesMut::with_capacity(if tls.is_some() || want_proxy { 1024 } else { 0 });
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
        if raw.capacity() - raw.len() < 512 {
            raw.reserve(1024.min(max_head + 1024 - raw.len()).max(512));
        }
        match crate::ws::recv(fd, &mut raw) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
        if want_proxy {
            match crate::proxy::parse_v2(&raw) {
                Ok(None) => continue,
                Ok(Some(h)) => {
                    if let Some(source) = h.source {
                        peer = source;
                    }
                    bytes::Buf::advance(&mut raw, h.len);
                    want_proxy = false;
                }
                Err(_) => return refuse(stream, None, peer, Refusal::BadRequest, "bad_proxy_header").await,
            }
        }
        let head: &BytesMut = match tls.as_deref_mut() {
            Some(t) => {
                if t.decrypt(&raw, &mut buf).is_err() {
                    let _ = t.write_to(fd);
                    tracing::info!(peer = %peer, reason = "tls_error", "TLS handshake failed");
                    crate::metrics::refused(Refusal::BadRequest, "tls_error");
                    return;
                }
                raw.clear();
                if !flush_tls(&stream, t, deadline).await {
                    return;
                }
                &buf
            }
            None if buf.capacity() > 0 => {
                buf.extend_from_slice(&raw);
                raw.clear();
                &buf
            }
            None => &raw,
        };
        if head.is_empty() {
            continue;
        }
        match http::parse_request(head, max_head) {
            Ok(None) => continue,
            Ok(Some(r)) => break r,
            Err(refusal) => return refuse(stream, tls, peer, refusal, refusal.code()).await,
        }
    };
    let head = if tls.is_some() || buf.capacity() > 0 { &buf } else { &raw };
    match check(&shard, &req, peer) {
        Ok(Some(who)) => {
            let leftover = head[req.head_len..].to_vec();
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
                tls,
            });
            if home == shard.idx {
                finish(&shard, h);
            } else {
                crate::metrics::handoff(shard.idx);
                if let Err(ShardMsg::Handoff(mut h)) = shard.global.inboxes[home].send(ShardMsg::Handoff(h)) {
                    // The home shard's inbox is full: refuse rather than queue without bound.
                    respond(h.fd.as_raw_fd(), h.tls.as_deref_mut(), Refusal::Unavailable.response());
                    crate::metrics::refused(Refusal::Unavailable, "handoff_queue_full");
                }
            }
        }
        Ok(None) => {
            // /healthz, answered in full.
            let body = http::healthz_response(shard.global.draining.load(Ordering::Relaxed));
            respond(fd, tls.as_deref_mut(), body);
            linger(stream).await;
        }
        Err((refusal, reason)) => refuse(stream, tls, peer, refusal, reason).await,
    }
}

/// Sends the TLS records rustls has queued (handshake messages), waiting for the socket to
/// take them until `deadline`. False: give up on the connection.
async fn flush_tls(stream: &TcpStream, t: &mut TlsIo, deadline: Instant) -> bool {
    loop {
        match t.write_to(stream.as_raw_fd()) {
            Ok(true) => return true,
            Ok(false) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if !matches!(monoio::time::timeout(left, stream.writable(false)).await, Ok(Ok(()))) {
                    return false;
                }
            }
            Err(_) => return false,
        }
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
        return Err((r, r.code()));
    }
    http::check_upgrade(req).map_err(|r| (r, r.code()))?;
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
            let resume = resume_params(req).map_err(|reason| (Refusal::BadRequest, reason))?;
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
            Ok(Some(Authenticated::Client { claims, bound, resume }))
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
    let Handoff { fd, peer, slot, leftover, ws_key, subprotocol, who, started, tls } = *h;
    // SAFETY: fd is an open, owned TCP socket descriptor.
    let std_stream = unsafe { std::net::TcpStream::from_raw_fd(fd.into_raw_fd()) };
    let Ok(stream) = TcpStream::from_std(std_stream) else { return };
    let _ = stream.set_nodelay(true);
    let user = who.user();
    if let Authenticated::Agent { record, nonce, .. } = &who {
        if !shard.check_nonce(&record.agent_id, nonce, unix_now()) {
            monoio::spawn(refuse(stream, tls, peer, Refusal::Unauthorized, "replayed_nonce"));
            return;
        }
    }
    if shard.user_conn_count(user) >= shard.cfg().limits.max_connections_per_user {
        monoio::spawn(refuse(stream, tls, peer, Refusal::TooManyRequests, "user_connection_cap"));
        return;
    }
    let response = http::switching_protocols(&ws_key, subprotocol);
    let accepted = connection::Accepted { peer, slot, who, response, leftover, tls };
    let conn = connection::register(shard, &stream, accepted);
    crate::metrics::handshake_done(started.elapsed());
    monoio::spawn(connection::run(shard.clone(), stream, conn));
}

/// Answers with `refusal`, then lets the peer read it before the socket closes.
async fn refuse(
    stream: TcpStream,
    mut tls: Option<Box<TlsIo>>,
    peer: SocketAddr,
    refusal: Refusal,
    reason: &'static str,
) {
    crate::metrics::refused(refusal, reason);
    tracing::info!(peer = %peer, status = refusal.status(), reason, "upgrade refused");
    respond(stream.as_raw_fd(), tls.as_deref_mut(), refusal.response());
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
