//! Switchboard: a thread-per-core WebSocket relay between agents and their users' clients.
//!
//! Map of the crate, one line per module and what it owns:
//! - [`config`]     the serde tree of settings with defaults and `validate()`.
//! - [`shard`]      spawning, pinning and running one monoio runtime per core; cross-shard channels.
//! - [`listener`]   the per-shard `SO_REUSEPORT` accept loop and the pre-upgrade caps.
//! - [`http`]       parsing of the HTTP upgrade request and every refusal response (pure).
//! - [`handshake`]  the pre-101 flow: read the head, check, authenticate, hand off to the home shard.
//! - [`ws`]         the one seam where tungstenite meets the socket (readiness + per-shard buffer).
//! - [`connection`] one WebSocket session on its home shard: read loop, outbound queue, close.
//! - [`router`]     per-user state on the home shard: agents, sessions, presence, rate limits.
//! - [`resume`]     client streams (seq, epoch, history), closed sessions, agent mailboxes (spec §8).
//! - [`proxy`]      PROXY protocol v2 headers and the trusted upstream networks.
//! - [`protocol`]   the in-place envelope parser and every outbound frame builder.
//! - [`auth`]       agent upgrade/message signatures, the nonce window, JWT verification.
//! - [`systemd`]    every sd_notify call: READY, STATUS, WATCHDOG, STOPPING, RELOADING.
//! - [`tls`]        native TLS (rustls, ring) driven by readiness like plain sockets.
//! - [`store`]      LMDB (heed): typed tables, the writer thread, the data-dir lock.
//! - [`cli`]        `agent` and `token` subcommands.
//! - [`admin`]      the admin listener: `/metrics`, `/healthz`, `/readyz`.
//! - [`metrics`]    metric names and the exporter.
//! - [`ids`]        relay-assigned ids (conn, session, agent).
//! - [`server`]     `serve`: assembles the daemon and runs it until a signal.
//! - [`logging`]    JSON-lines logs on stdout.
//! - [`systemd`]    every sd_notify message (READY, STATUS, WATCHDOG, STOPPING) and the watchdog thread.

pub mod admin;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod connection;
pub mod handshake;
pub mod http;
pub mod ids;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod proxy;
pub mod resume;
pub mod router;
pub mod server;
pub mod shard;
pub mod store;
pub mod systemd;
pub mod tls;
pub mod ws;
