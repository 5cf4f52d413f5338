//! Durable offline delivery (spec §8, docs/protocol.md §10): client stream history, agent
//! mailboxes and closed (resumable) sessions, written only by the writer thread (group commit,
//! `WriteOp::History*` / `StreamMark` / `Mailbox*` / `Session*`), read by a shard with
//! [`Store::load_user`] on a user's first connection.
//!
//! Layout: five databases, every key starting with `user \0` so one prefix scan per user finds
//! everything (a user never contains NUL, agent and session ids are relay ids):
//!
//! | database          | key                              | value                                     |
//! |-------------------|----------------------------------|-------------------------------------------|
//! | `streams`         | `user \0 agent`                  | JSON `{"v":1,"epoch":…,"last_seq":…,"clean":…}` |
//! | `history`         | `user \0 agent \0 seq` (u64 BE)  | `1` ‖ `at` (u64 BE) ‖ `to` len (u8, 0 = broadcast) ‖ `to` ‖ frame |
//! | `mailboxes`       | `user \0 agent`                  | JSON `{"v":1,"last_seq":…,"acked":…}`     |
//! | `mailbox`         | `user \0 agent \0 seq` (u64 BE)  | `1` ‖ `at` (u64 BE) ‖ `from` len (u8) ‖ `from` ‖ frame |
//! | `closed_sessions` | `user \0 session`                | `1` ‖ `closed_at` (u64 BE) ‖ JSON `{"bound":…,"allow":…,"marks":[[agent,epoch,seq],…]}` |
//!
//! Keys are at most 128 + 1 + 64 + 1 + 8 = 202 bytes (LMDB allows 511). Big-endian `seq` makes a
//! stream's (or mailbox's) entries contiguous and in `seq` order; the `\0` after the agent keeps
//! agent `ab` from matching the entries of agent `abc`. Frames are stored byte-exact after a
//! 10-byte header plus the session id; retention reads `at` without decoding the rest.
//!
//! Must stay true:
//! - Ops with a malformed key part (user empty, over 128 bytes or containing NUL; agent,
//!   session, epoch, `to` or `from` not a relay id) are skipped (counted), never an error that
//!   would lose the rest of the batch.
//! - A stream's entries all belong to the epoch in its meta: an append with another epoch (or
//!   no meta) deletes the stream's entries before it stores its own.
//! - A mailbox holds entries only for `seq > acked`, and `acked <= last_seq`: a drop beyond the
//!   last stored `seq` confirms what is stored, never a `seq` not yet given out.
//! - Metas (the epoch, the last `seq`, `acked`) are never deleted: not by retention, not by
//!   trims, so a stream or mailbox never reuses a `seq` it handed out.
//! - Reads never fail on one bad record: [`Store::load_user`] skips an unreadable meta (the
//!   stream or mailbox is then absent) or entry with a warning, without echoing content.
//! - Retention deletes at most `max_deletes` rows per transaction, collected from a read
//!   transaction first (only the writer thread writes these databases, so nothing changes in
//!   between), and takes the writer lock only when something is due.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ops::Bound;

use bytes::Bytes;
use heed::{RoTxn, RwTxn};
use serde::{Deserialize, Serialize};

use super::{ids, Result, RetentionPolicy, Store, StoreError, WriteOp, MAX_USER_BYTES};

/// One client stream (spec §8): the messages of `agent` to the sessions of `user`; also names an
/// agent's mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamKey {
    pub user: Box<str>,
    pub agent: Box<str>,
}

impl StreamKey {
    pub fn new(user: impl Into<Box<str>>, agent: impl Into<Box<str>>) -> StreamKey {
        StreamKey { user: user.into(), agent: agent.into() }
    }

    /// Whether the writer would store records under this key.
    pub fn is_valid(&self) -> bool {
        valid_user(&self.user) && ids::is_valid_id(&self.agent)
    }
}

/// A shard's claim on being told when an op is committed: `n` strictly increases per shard in
/// send order. See [`WriterHandle::send_durable`](super::WriterHandle::send_durable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub shard: usize,
    pub n: u64,
}

/// What [`Store::load_user`] returns: everything durable about one user.
#[derive(Debug, Default)]
pub struct DurableUser {
    /// By agent id (byte order).
    pub streams: Vec<StoredStream>,
    /// By agent id (byte order).
    pub mailboxes: Vec<StoredMailbox>,
    /// By session id (byte order).
    pub closed: Vec<StoredSession>,
}

/// One client stream as stored.
#[derive(Debug)]
pub struct StoredStream {
    pub agent: String,
    pub epoch: String,
    pub last_seq: u64,
    pub clean: bool,
    /// Ascending `seq`.
    pub entries: Vec<StoredEntry>,
}

/// One message of a stream's history.
#[derive(Debug)]
pub struct StoredEntry {
    pub seq: u64,
    pub at: u64,
    /// The session it was addressed to; `None` for a broadcast.
    pub to: Option<String>,
    /// The WebSocket frame as the relay sent it, byte-exact.
    pub frame: Bytes,
}

/// One agent's mailbox as stored.
#[derive(Debug)]
pub struct StoredMailbox {
    pub agent: String,
    pub last_seq: u64,
    pub acked: u64,
    /// Ascending `seq`, only `seq > acked`.
    pub entries: Vec<StoredMail>,
}

/// One queued client message to an agent.
#[derive(Debug)]
pub struct StoredMail {
    pub seq: u64,
    pub at: u64,
    /// The sending session.
    pub from: String,
    /// The WebSocket frame as the relay will send it, byte-exact.
    pub frame: Bytes,
}

/// A closed client session that may be resumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    pub session: String,
    pub closed_at: u64,
    pub bound: Option<String>,
    pub allow: Option<Vec<String>>,
    pub marks: Vec<StreamMark>,
}

/// Where stream `agent` (epoch `epoch`) stood when the session closed: its last seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamMark {
    pub agent: String,
    pub epoch: String,
    pub seq: u64,
}

/// The payload of [`WriteOp::SessionClosed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionClosed {
    pub user: Box<str>,
    pub session: StoredSession,
}

/// What one [`Store::prune_durable`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DurablePruneOutcome {
    /// History entries deleted.
    pub history: usize,
    /// Mailbox entries deleted.
    pub mail: usize,
    /// Closed sessions deleted.
    pub sessions: usize,
    /// More rows are due than `max_deletes` allowed: run another pass soon.
    pub more: bool,
}

// ---------------------------------------------------------------------------------------------
// Keys.

/// Entry value header: version, `at`, length of the session id that follows.
const ENTRY_HEADER: usize = 1 + 8 + 1;
const ENTRY_VERSION: u8 = 1;
const SESSION_VERSION: u8 = 1;

pub(super) fn valid_user(user: &str) -> bool {
    !user.is_empty() && user.len() <= MAX_USER_BYTES && !user.contains('\0')
}

fn user_prefix(user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(user.len() + 1);
    k.extend_from_slice(user.as_bytes());
    k.push(0);
    k
}

/// `user \0 name`: a stream's or mailbox's meta, or a closed session.
fn pair_key(user: &str, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(user.len() + 1 + name.len());
    k.extend_from_slice(user.as_bytes());
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}

/// `user \0 agent \0 seq`: a history or mailbox entry.
fn entry_key(key: &StreamKey, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.user.len() + key.agent.len() + 10);
    k.extend_from_slice(key.user.as_bytes());
    k.push(0);
    k.extend_from_slice(key.agent.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The agent and seq of an entry key under `prefix` (`user \0`).
fn split_entry_key<'k>(key: &'k [u8], prefix: &[u8]) -> Option<(&'k str, u64)> {
    let rest = key.strip_prefix(prefix)?;
    let (agent, tail) = rest.split_at_checked(rest.len().checked_sub(9)?)?;
    let (nul, seq) = tail.split_first()?;
    if *nul != 0 {
        return None;
    }
    let agent = std::str::from_utf8(agent).ok()?;
    Some((agent, u64::from_be_bytes(seq.try_into().ok()?)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn corrupt(table: &str, key: &[u8], why: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{table} record {}: {why}", hex(key)))
}

fn json_error(e: &serde_json::Error) -> String {
    // serde_json's messages can quote content: report only the position.
    format!("{:?} error at line {} column {}", e.classify(), e.line(), e.column())
}

// ---------------------------------------------------------------------------------------------
// Values.

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StreamMeta {
    v: u32,
    epoch: String,
    last_seq: u64,
    clean: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct MailboxMeta {
    v: u32,
    last_seq: u64,
    acked: u64,
}

fn encode_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("serializing a plain struct to JSON cannot fail")
}

fn decode_stream_meta(key: &[u8], bytes: &[u8]) -> Result<StreamMeta> {
    let meta: StreamMeta =
        serde_json::from_slice(bytes).map_err(|e| corrupt("stream", key, json_error(&e)))?;
    if meta.v != 1 {
        return Err(corrupt("stream", key, format_args!("unknown version {}", meta.v)));
    }
    Ok(meta)
}

fn decode_mailbox_meta(key: &[u8], bytes: &[u8]) -> Result<MailboxMeta> {
    let meta: MailboxMeta =
        serde_json::from_slice(bytes).map_err(|e| corrupt("mailbox", key, json_error(&e)))?;
    if meta.v != 1 {
        return Err(corrupt("mailbox", key, format_args!("unknown version {}", meta.v)));
    }
    Ok(meta)
}

/// A history or mailbox entry: header, the session id (`to` or `from`, may be empty), the frame.
fn encode_entry(out: &mut Vec<u8>, at: u64, session: &str, frame: &[u8]) {
    out.clear();
    out.reserve(ENTRY_HEADER + session.len() + frame.len());
    out.push(ENTRY_VERSION);
    out.extend_from_slice(&at.to_be_bytes());
    out.push(u8::try_from(session.len()).expect("session ids are at most 64 bytes"));
    out.extend_from_slice(session.as_bytes());
    out.extend_from_slice(frame);
}

/// `(at, session, frame)` of an entry.
fn decode_entry<'v>(table: &str, key: &[u8], bytes: &'v [u8]) -> Result<(u64, &'v str, &'v [u8])> {
    let bad = |why: &str| corrupt(table, key, why);
    let Some((&[version], rest)) = bytes.split_first_chunk::<1>() else { return Err(bad("empty")) };
    if version != ENTRY_VERSION {
        return Err(corrupt(table, key, format_args!("unknown version {version}")));
    }
    let (at, rest) = rest.split_first_chunk::<8>().ok_or_else(|| bad("truncated"))?;
    let (&len, rest) = rest.split_first().ok_or_else(|| bad("truncated"))?;
    let (session, frame) = rest.split_at_checked(usize::from(len)).ok_or_else(|| bad("truncated"))?;
    let session = std::str::from_utf8(session).map_err(|_| bad("session id is not UTF-8"))?;
    Ok((u64::from_be_bytes(*at), session, frame))
}

/// The `at` (or `closed_at`) of an entry or closed session: what retention looks at. `None` when
/// unreadable.
fn stamp_of(bytes: &[u8]) -> Option<u64> {
    let (version, rest) = bytes.split_first()?;
    (*version == ENTRY_VERSION).then_some(())?;
    rest.first_chunk::<8>().map(|b| u64::from_be_bytes(*b))
}

#[derive(Serialize)]
struct SessionOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    bound: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allow: Option<&'a [String]>,
    marks: Vec<(&'a str, &'a str, u64)>,
}

#[derive(Deserialize)]
struct SessionIn {
    #[serde(default)]
    bound: Option<String>,
    #[serde(default)]
    allow: Option<Vec<String>>,
    #[serde(default)]
    marks: Vec<(String, String, u64)>,
}

fn encode_session(s: &StoredSession) -> Vec<u8> {
    let out = SessionOut {
        bound: s.bound.as_deref(),
        allow: s.allow.as_deref(),
        marks: s.marks.iter().map(|m| (&*m.agent, &*m.epoch, m.seq)).collect(),
    };
    let mut v = Vec::with_capacity(64);
    v.push(SESSION_VERSION);
    v.extend_from_slice(&s.closed_at.to_be_bytes());
    serde_json::to_writer(&mut v, &out).expect("serializing a plain struct to JSON cannot fail");
    v
}

fn decode_session(key: &[u8], session: &str, bytes: &[u8]) -> Result<StoredSession> {
    let bad = |why: &str| corrupt("closed session", key, why);
    let (&version, rest) = bytes.split_first().ok_or_else(|| bad("empty"))?;
    if version != SESSION_VERSION {
        return Err(corrupt("closed session", key, format_args!("unknown version {version}")));
    }
    let (closed_at, json) = rest.split_first_chunk::<8>().ok_or_else(|| bad("truncated"))?;
    let disk: SessionIn =
        serde_json::from_slice(json).map_err(|e| corrupt("closed session", key, json_error(&e)))?;
    Ok(StoredSession {
        session: session.to_owned(),
        closed_at: u64::from_be_bytes(*closed_at),
        bound: disk.bound,
        allow: disk.allow,
        marks: disk.marks.into_iter().map(|(agent, epoch, seq)| StreamMark { agent, epoch, seq }).collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// Writer side (inside the batch's write transaction).

/// A meta read once per batch, written back at the end if changed.
struct Slot<M> {
    meta: Option<M>,
    dirty: bool,
}

/// The durable part of one batch: metas touched by its ops, and scratch buffers.
#[derive(Default)]
pub(super) struct DurableBatch<'o> {
    streams: HashMap<&'o StreamKey, Slot<StreamMeta>>,
    mailboxes: HashMap<&'o StreamKey, Slot<MailboxMeta>>,
    value: Vec<u8>,
}

/// All of a stream's (or mailbox's) entries with `lo <= seq < hi` (`hi = None`: no upper bound).
fn entry_range(key: &StreamKey, lo: u64, hi: Option<u64>) -> (Vec<u8>, Vec<u8>, bool) {
    match hi {
        Some(hi) => (entry_key(key, lo), entry_key(key, hi), false),
        None => (entry_key(key, lo), entry_key(key, u64::MAX), true),
    }
}

fn delete_entries(
    db: &heed::Database<heed::types::Bytes, heed::types::Bytes>,
    wtxn: &mut RwTxn,
    key: &StreamKey,
    lo: u64,
    hi: Option<u64>,
) -> Result<usize> {
    let (lo, hi, inclusive) = entry_range(key, lo, hi);
    let upper = if inclusive { Bound::Included(hi.as_slice()) } else { Bound::Excluded(hi.as_slice()) };
    Ok(db.delete_range(wtxn, &(Bound::Included(lo.as_slice()), upper))?)
}

impl<'o> DurableBatch<'o> {
    fn stream(&mut self, store: &Store, txn: &RoTxn, key: &'o StreamKey) -> Result<&mut Slot<StreamMeta>> {
        Ok(match self.streams.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let k = pair_key(&key.user, &key.agent);
                let meta = match store.inner.streams.get(txn, &k)? {
                    None => None,
                    Some(bytes) => match decode_stream_meta(&k, bytes) {
                        Ok(meta) => Some(meta),
                        Err(e) => {
                            tracing::warn!(error = %e, "store writer: replacing an unreadable stream meta");
                            None
                        }
                    },
                };
                e.insert(Slot { meta, dirty: false })
            }
        })
    }

    fn mailbox(&mut self, store: &Store, txn: &RoTxn, key: &'o StreamKey) -> Result<&mut Slot<MailboxMeta>> {
        Ok(match self.mailboxes.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let k = pair_key(&key.user, &key.agent);
                let meta = match store.inner.mailboxes.get(txn, &k)? {
                    None => None,
                    Some(bytes) => match decode_mailbox_meta(&k, bytes) {
                        Ok(meta) => Some(meta),
                        Err(e) => {
                            tracing::warn!(error = %e, "store writer: replacing an unreadable mailbox meta");
                            None
                        }
                    },
                };
                e.insert(Slot { meta, dirty: false })
            }
        })
    }

    /// Applies one durable op; `Ok(false)` when skipped. Ops apply in order; metas are written
    /// by [`finish`](Self::finish).
    pub(super) fn apply(&mut self, store: &Store, wtxn: &mut RwTxn, op: &'o WriteOp) -> Result<bool> {
        let db = &store.inner;
        match op {
            WriteOp::HistoryAppend { key, epoch, seq, at, to, frame, trim_below } => {
                if !key.is_valid()
                    || !ids::is_valid_id(epoch)
                    || to.as_deref().is_some_and(|t| !ids::is_valid_id(t))
                {
                    return Ok(false);
                }
                let slot = self.stream(store, wtxn, key)?;
                match &mut slot.meta {
                    Some(meta) if *meta.epoch == **epoch => meta.last_seq = meta.last_seq.max(*seq),
                    meta => {
                        delete_entries(&db.history, wtxn, key, 0, None)?;
                        *meta =
                            Some(StreamMeta { v: 1, epoch: epoch.to_string(), last_seq: *seq, clean: false });
                    }
                }
                slot.dirty = true;
                encode_entry(&mut self.value, *at, to.as_deref().unwrap_or(""), frame);
                db.history.put(wtxn, &entry_key(key, *seq), &self.value)?;
                if *trim_below > 0 {
                    delete_entries(&db.history, wtxn, key, 0, Some(*trim_below))?;
                }
                Ok(true)
            }
            WriteOp::StreamMark { key, epoch, clean, through } => {
                if !key.is_valid() || !ids::is_valid_id(epoch) {
                    return Ok(false);
                }
                let slot = self.stream(store, wtxn, key)?;
                let Some(meta) = &mut slot.meta else { return Ok(false) };
                let now_clean = match clean {
                    false => false,
                    true if *meta.epoch == **epoch => meta.last_seq == *through,
                    true => return Ok(false),
                };
                if meta.clean != now_clean {
                    meta.clean = now_clean;
                    slot.dirty = true;
                }
                Ok(true)
            }
            WriteOp::HistoryTrim { key, epoch, below } => {
                if !key.is_valid() || !ids::is_valid_id(epoch) {
                    return Ok(false);
                }
                let slot = self.stream(store, wtxn, key)?;
                match &slot.meta {
                    Some(meta) if *meta.epoch == **epoch => {
                        delete_entries(&db.history, wtxn, key, 0, Some(*below))?;
                        Ok(true)
                    }
                    _ => Ok(false),
                }
            }
            WriteOp::MailboxPut { key, seq, at, from, frame } => {
                if !key.is_valid() || !ids::is_valid_id(from) {
                    return Ok(false);
                }
                let slot = self.mailbox(store, wtxn, key)?;
                match &mut slot.meta {
                    // Already confirmed: storing it would break "entries only above acked".
                    Some(meta) if *seq <= meta.acked => return Ok(false),
                    Some(meta) => meta.last_seq = meta.last_seq.max(*seq),
                    meta @ None => *meta = Some(MailboxMeta { v: 1, last_seq: *seq, acked: 0 }),
                }
                slot.dirty = true;
                encode_entry(&mut self.value, *at, from, frame);
                db.mailbox.put(wtxn, &entry_key(key, *seq), &self.value)?;
                Ok(true)
            }
            WriteOp::MailboxDrop { key, through } => {
                if !key.is_valid() {
                    return Ok(false);
                }
                let slot = self.mailbox(store, wtxn, key)?;
                let Some(meta) = &mut slot.meta else { return Ok(false) };
                let through = (*through).min(meta.last_seq);
                if through > meta.acked {
                    meta.acked = through;
                    slot.dirty = true;
                }
                if through > 0 {
                    delete_entries(&db.mailbox, wtxn, key, 0, through.checked_add(1))?;
                }
                Ok(true)
            }
            WriteOp::SessionClosed(closed) => {
                let SessionClosed { user, session } = &**closed;
                if !valid_user(user) || !ids::is_valid_id(&session.session) {
                    return Ok(false);
                }
                db.closed_sessions.put(wtxn, &pair_key(user, &session.session), &encode_session(session))?;
                Ok(true)
            }
            WriteOp::SessionForget { user, session } => {
                if !valid_user(user) || !ids::is_valid_id(session) {
                    return Ok(false);
                }
                Ok(db.closed_sessions.delete(wtxn, &pair_key(user, session))?)
            }
            _ => Ok(false),
        }
    }

    /// Writes back the metas changed by the batch.
    pub(super) fn finish(self, store: &Store, wtxn: &mut RwTxn) -> Result<()> {
        let db = &store.inner;
        for (key, slot) in &self.streams {
            if let (true, Some(meta)) = (slot.dirty, &slot.meta) {
                db.streams.put(wtxn, &pair_key(&key.user, &key.agent), &encode_json(meta))?;
            }
        }
        for (key, slot) in &self.mailboxes {
            if let (true, Some(meta)) = (slot.dirty, &slot.meta) {
                db.mailboxes.put(wtxn, &pair_key(&key.user, &key.agent), &encode_json(meta))?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Reads and retention.

impl Store {
    /// Everything durable about `user`, from one read transaction: every stream (meta and
    /// entries, ascending `seq`), every mailbox (meta and the entries above `acked`), every
    /// closed session. An invalid user yields an empty result. Unreadable records are skipped
    /// with a warning; entries without a meta are ignored.
    ///
    /// Runs on a shard (a user's first connection): a few prefix scans, no writer lock.
    pub fn load_user(&self, user: &str) -> Result<DurableUser> {
        let mut out = DurableUser::default();
        if !valid_user(user) {
            return Ok(out);
        }
        let db = &self.inner;
        let txn = self.read_txn()?;
        let prefix = user_prefix(user);

        for item in db.streams.prefix_iter(&txn, &prefix)? {
            let (key, bytes) = item?;
            let Some(agent) = std::str::from_utf8(&key[prefix.len()..]).ok().filter(|a| ids::is_valid_id(a))
            else {
                continue;
            };
            match decode_stream_meta(key, bytes) {
                Ok(m) => out.streams.push(StoredStream {
                    agent: agent.to_owned(),
                    epoch: m.epoch,
                    last_seq: m.last_seq,
                    clean: m.clean,
                    entries: Vec::new(),
                }),
                Err(e) => tracing::warn!(error = %e, "store: skipping an unreadable stream"),
            }
        }
        // Metas and entries sort by agent alike (a NUL follows the agent in entry keys, and
        // sorts below every id character): merge them in one pass.
        let mut i = 0;
        for item in db.history.prefix_iter(&txn, &prefix)? {
            let (key, bytes) = item?;
            let Some((agent, seq)) = split_entry_key(key, &prefix) else { continue };
            while out.streams.get(i).is_some_and(|s| *s.agent < *agent) {
                i += 1;
            }
            let Some(stream) = out.streams.get_mut(i).filter(|s| *s.agent == *agent) else { continue };
            match decode_entry("history", key, bytes) {
                Ok((at, to, frame)) => stream.entries.push(StoredEntry {
                    seq,
                    at,
                    to: (!to.is_empty()).then(|| to.to_owned()),
                    frame: Bytes::copy_from_slice(frame),
                }),
                Err(e) => tracing::warn!(error = %e, "store: skipping an unreadable history entry"),
            }
        }

        for item in db.mailboxes.prefix_iter(&txn, &prefix)? {
            let (key, bytes) = item?;
            let Some(agent) = std::str::from_utf8(&key[prefix.len()..]).ok().filter(|a| ids::is_valid_id(a))
            else {
                continue;
            };
            match decode_mailbox_meta(key, bytes) {
                Ok(m) => out.mailboxes.push(StoredMailbox {
                    agent: agent.to_owned(),
                    last_seq: m.last_seq,
                    acked: m.acked,
                    entries: Vec::new(),
                }),
                Err(e) => tracing::warn!(error = %e, "store: skipping an unreadable mailbox"),
            }
        }
        let mut i = 0;
        for item in db.mailbox.prefix_iter(&txn, &prefix)? {
            let (key, bytes) = item?;
            let Some((agent, seq)) = split_entry_key(key, &prefix) else { continue };
            while out.mailboxes.get(i).is_some_and(|m| *m.agent < *agent) {
                i += 1;
            }
            let Some(mailbox) = out.mailboxes.get_mut(i).filter(|m| *m.agent == *agent && seq > m.acked)
            else {
                continue;
            };
            match decode_entry("mailbox", key, bytes) {
                Ok((at, from, frame)) => mailbox.entries.push(StoredMail {
                    seq,
                    at,
                    from: from.to_owned(),
                    frame: Bytes::copy_from_slice(frame),
                }),
                Err(e) => tracing::warn!(error = %e, "store: skipping an unreadable mailbox entry"),
            }
        }

        for item in db.closed_sessions.prefix_iter(&txn, &prefix)? {
            let (key, bytes) = item?;
            let Some(session) =
                std::str::from_utf8(&key[prefix.len()..]).ok().filter(|s| ids::is_valid_id(s))
            else {
                continue;
            };
            match decode_session(key, session, bytes) {
                Ok(s) => out.closed.push(s),
                Err(e) => tracing::warn!(error = %e, "store: skipping an unreadable closed session"),
            }
        }
        Ok(out)
    }

    /// One retention pass over the durable records: delete history entries older than
    /// `policy.history_ttl_secs`, mailbox entries older than `policy.mailbox_ttl_secs` and
    /// closed sessions closed more than `policy.history_ttl_secs` ago (a TTL of 0 keeps them
    /// forever), and unreadable ones, at most `max_deletes` rows in one transaction. Metas are
    /// kept (the epoch and last `seq` outlive the entries).
    ///
    /// The writer thread's job, public for tests and benches. Victims are found from a read
    /// transaction (per stream, from its oldest entry to its first young one); nothing due costs
    /// no writer lock.
    pub fn prune_durable(
        &self,
        policy: &RetentionPolicy,
        now: u64,
        max_deletes: usize,
    ) -> Result<DurablePruneOutcome> {
        let db = &self.inner;
        let mut outcome = DurablePruneOutcome::default();
        let mut history = Vec::new();
        let mut mail = Vec::new();
        let mut sessions = Vec::new();
        {
            let txn = self.read_txn()?;
            let mut budget = max_deletes;
            if policy.history_ttl_secs > 0 {
                let cutoff = now.saturating_sub(policy.history_ttl_secs);
                outcome.more |= expired_entries(&db.history, &txn, cutoff, &mut budget, &mut history)?;
            }
            if policy.mailbox_ttl_secs > 0 && !outcome.more {
                let cutoff = now.saturating_sub(policy.mailbox_ttl_secs);
                outcome.more |= expired_entries(&db.mailbox, &txn, cutoff, &mut budget, &mut mail)?;
            }
            if policy.history_ttl_secs > 0 && !outcome.more {
                let cutoff = now.saturating_sub(policy.history_ttl_secs);
                for item in db.closed_sessions.iter(&txn)? {
                    let (key, bytes) = item?;
                    if stamp_of(bytes).is_some_and(|closed_at| closed_at >= cutoff) {
                        continue;
                    }
                    if budget == 0 {
                        outcome.more = true;
                        break;
                    }
                    budget -= 1;
                    sessions.push(key.to_vec());
                }
            }
        }
        if history.is_empty() && mail.is_empty() && sessions.is_empty() {
            return Ok(outcome);
        }
        let mut wtxn = db.env.write_txn()?;
        for key in &history {
            db.history.delete(&mut wtxn, key)?;
        }
        for key in &mail {
            db.mailbox.delete(&mut wtxn, key)?;
        }
        for key in &sessions {
            db.closed_sessions.delete(&mut wtxn, key)?;
        }
        wtxn.commit()?;
        (outcome.history, outcome.mail, outcome.sessions) = (history.len(), mail.len(), sessions.len());
        Ok(outcome)
    }
}

/// Collects the keys of entries stamped before `cutoff` (and unreadable ones), each stream from
/// its oldest entry up to its first young one, while `budget` lasts; `true` when it ran out.
/// Costs one seek per stream that still has young entries.
fn expired_entries(
    db: &heed::Database<heed::types::Bytes, heed::types::Bytes>,
    txn: &RoTxn,
    cutoff: u64,
    budget: &mut usize,
    victims: &mut Vec<Vec<u8>>,
) -> Result<bool> {
    let mut from: Option<Vec<u8>> = None;
    loop {
        let start = from.as_deref().map_or(Bound::Unbounded, Bound::Included);
        let iter = db.range(txn, &(start, Bound::Unbounded))?;
        let mut skip_to = None;
        for item in iter {
            let (key, bytes) = item?;
            if stamp_of(bytes).is_some_and(|at| at >= cutoff) {
                // Skip the rest of this stream: the smallest key above `user \0 agent \0 …`
                // (a key not shaped like ours is just left alone).
                let Some(stream) = key.len().checked_sub(8).map(|end| &key[..end]) else { continue };
                if stream.len() < 2 || stream.last() != Some(&0) {
                    continue;
                }
                let mut next = stream.to_vec();
                *next.last_mut().expect("checked above") = 1;
                skip_to = Some(next);
                break;
            }
            if *budget == 0 {
                return Ok(true);
            }
            *budget -= 1;
            victims.push(key.to_vec());
        }
        match skip_to {
            Some(next) => from = Some(next),
            None => return Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_keys_sort_by_agent_then_seq_and_split() {
        let k = |u: &str, a: &str, s| entry_key(&StreamKey::new(u, a), s);
        assert!(k("u", "ab", u64::MAX) < k("u", "abc", 0));
        assert!(k("u", "ab", 1) < k("u", "ab", 256));
        assert!(pair_key("u", "ab") < pair_key("u", "abc"));
        let key = k("alice", "ag_1", 7);
        assert_eq!(split_entry_key(&key, b"alice\0"), Some(("ag_1", 7)));
        assert_eq!(split_entry_key(&key, b"al\0"), None);
        assert_eq!(split_entry_key(b"alice\0x", b"alice\0"), None);
        // The longest key fits LMDB's 511 bytes.
        assert!(k(&"u".repeat(MAX_USER_BYTES), &"a".repeat(ids::MAX_ID_LEN), 1).len() <= 511);
    }

    #[test]
    fn values_round_trip_and_are_versioned() {
        let mut v = Vec::new();
        encode_entry(&mut v, 42, "s_1", b"\x81\x03abc");
        assert_eq!(decode_entry("t", b"k", &v).unwrap(), (42, "s_1", &b"\x81\x03abc"[..]));
        assert_eq!(stamp_of(&v), Some(42));
        encode_entry(&mut v, 1, "", b"");
        assert_eq!(decode_entry("t", b"k", &v).unwrap(), (1, "", &b""[..]));
        v[0] = 2;
        assert!(matches!(decode_entry("t", b"k", &v), Err(StoreError::Corrupt(_))));
        assert_eq!(stamp_of(&v), None);
        assert!(matches!(decode_entry("t", b"k", &[1, 0, 0]), Err(StoreError::Corrupt(_))));
        assert!(decode_entry("t", b"k", &[1, 0, 0, 0, 0, 0, 0, 0, 0, 9, b'a']).is_err());

        let s = StoredSession {
            session: "s_x".into(),
            closed_at: 99,
            bound: Some("ag_1".into()),
            allow: Some(vec!["ag_1".into(), "ag_2".into()]),
            marks: vec![StreamMark { agent: "ag_1".into(), epoch: "e_1".into(), seq: 5 }],
        };
        let bytes = encode_session(&s);
        assert_eq!(stamp_of(&bytes), Some(99));
        assert_eq!(decode_session(b"k", "s_x", &bytes).unwrap(), s);
        let plain = StoredSession { bound: None, allow: None, marks: vec![], ..s };
        assert_eq!(decode_session(b"k", "s_x", &encode_session(&plain)).unwrap(), plain);

        let secret = br#"{"v":1,"epoch":"sekrit","last_seq":"sekrit2","clean":true}"#;
        let err = decode_stream_meta(b"k", secret).unwrap_err().to_string();
        assert!(!err.contains("sekrit"), "{err}");
        let v2 = br#"{"v":2,"epoch":"e","last_seq":1,"clean":true}"#;
        assert!(matches!(decode_stream_meta(b"k", v2), Err(StoreError::Corrupt(_))));
        let meta = MailboxMeta { v: 1, last_seq: 3, acked: 2 };
        assert_eq!(decode_mailbox_meta(b"k", &encode_json(&meta)).unwrap(), meta);
    }
}
