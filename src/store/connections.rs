//! Connection records: one row per WebSocket connection, written only by the writer thread (group
//! commit, [`WriteOp::ConnectionOpened`] / [`WriteOp::ConnectionSeen`] /
//! [`WriteOp::ConnectionClosed`]), read by `switchboard connections` from any process at any time.
//!
//! Layout: one database, `connections`, keyed `opened` (u64 big-endian, Unix seconds) ‖
//! `conn_id` → versioned JSON. Key order is open order, so "newest first" is a reverse scan and
//! retention deletes from the front; a close finds its row from `(opened, conn_id)`, which the
//! shard already knows (it sent both in the record), so no index is needed.
//!
//! Why no index by id, user or agent: appends to the key above touch one page per ~10 records,
//! while an index keyed by a random id or by user dirties about one page per record each.
//! Measured (1024 opens per commit into 100k rows, 1000 users, random ids): with those three
//! indexes every commit wrote ~11 MiB; without them 481 KiB. `switchboard connections --user/--agent`
//! instead scans newest first, checking `user` and `agent_id` before decoding the rest; the scan
//! is bounded by `records.max_records` (100k rows: ~130 ms in release when nothing matches).
//! 100k rows take ~52 MiB of the map.
//!
//! Must stay true:
//! - Retention deletes oldest first, at most `max_deletes` rows per transaction, and decides
//!   whether anything is due from a read transaction (no writer lock when nothing is).
//! - Ops with a malformed id, a duplicate `(opened, conn_id)`, or for a row that does not exist
//!   (any more) are skipped (counted), never an error that would lose the rest of the batch.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use heed::RwTxn;
use serde::{Deserialize, Serialize};

use super::{ids, Result, Store, StoreError, WriteOp, MAX_USER_BYTES};

/// Default of `records.max_records`.
pub const DEFAULT_MAX_RECORDS: u64 = 100_000;
/// Default of `records.max_age_days`.
pub const DEFAULT_MAX_AGE_DAYS: u64 = 30;
/// How often the writer checks the retention bounds (one read transaction when nothing is due).
pub const RETENTION_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Most rows one retention pass deletes (one write transaction); a backlog is worked off in
/// further passes between batches.
pub const RETENTION_MAX_DELETES: usize = 4096;
/// Longest `remote` accepted (an IPv6 address with scope and port fits easily).
pub const MAX_REMOTE_BYTES: usize = 128;

/// Which side of the relay a connection was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Agent,
    Client,
}

impl Role {
    /// `"agent"` or `"client"`, as stored and printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Client => "client",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One connection as recorded. Times are Unix seconds. The serde field names are the
/// `switchboard connections --json` contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionRecord {
    /// The relay's id: `c_…` for an agent connection, the session id `s_…` for a client.
    pub conn_id: String,
    pub user: String,
    pub role: Role,
    /// The agent (agent connections), or the agent a client session is bound to, if any.
    #[serde(default)]
    pub agent_id: Option<String>,
    /// The peer's `ip:port`.
    pub remote: String,
    pub opened: u64,
    pub last_seen: u64,
    /// `None` while open — or if the daemon died before the close was recorded.
    #[serde(default)]
    pub closed: Option<u64>,
    #[serde(default)]
    pub frames_in: u64,
    #[serde(default)]
    pub frames_out: u64,
    #[serde(default)]
    pub bytes_in: u64,
    #[serde(default)]
    pub bytes_out: u64,
    /// The close code sent or received (1006 when the socket just went away), once closed.
    #[serde(default)]
    pub close_code: Option<u16>,
}

impl ConnectionRecord {
    /// The record of a connection opened at `opened`: no traffic yet, `last_seen = opened`.
    /// Keep `opened` with the connection: [`WriteOp::ConnectionClosed`] names the record by
    /// `(conn_id, opened)`.
    pub fn new(
        conn_id: impl Into<String>,
        user: impl Into<String>,
        role: Role,
        agent_id: Option<String>,
        remote: impl fmt::Display,
        opened: u64,
    ) -> ConnectionRecord {
        ConnectionRecord {
            conn_id: conn_id.into(),
            user: user.into(),
            role,
            agent_id,
            remote: remote.to_string(),
            opened,
            last_seen: opened,
            closed: None,
            frames_in: 0,
            frames_out: 0,
            bytes_in: 0,
            bytes_out: 0,
            close_code: None,
        }
    }

    /// Why the writer would refuse to store this record, if it would.
    fn problem(&self) -> Option<&'static str> {
        if !ids::is_valid_id(&self.conn_id) {
            Some("conn_id is not a relay id")
        } else if self.user.is_empty() || self.user.len() > MAX_USER_BYTES {
            Some("user must be 1 to 128 bytes")
        } else if self.agent_id.as_deref().is_some_and(|a| !ids::is_valid_id(a)) {
            Some("agent_id is not a relay id")
        } else if self.remote.len() > MAX_REMOTE_BYTES {
            Some("remote is too long")
        } else {
            None
        }
    }
}

/// What [`Store::list_connections`] returns. `Default` lists everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionFilter {
    /// Only this user's connections.
    pub user: Option<String>,
    /// Only connections of this agent, and client sessions bound to it.
    pub agent: Option<String>,
    /// At most this many (the newest); `None` for all.
    pub limit: Option<usize>,
}

/// How many connection records the writer keeps: it deletes the oldest beyond `max_records`
/// and those opened more than `max_age_secs` ago, checking every `check_interval`.
///
/// And how long the offline-delivery records live (see [`Store::prune_durable`]): history
/// entries and closed sessions `history_ttl_secs`, mailbox entries `mailbox_ttl_secs`; 0 keeps
/// them forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub max_records: u64,
    pub max_age_secs: u64,
    pub check_interval: Duration,
    pub history_ttl_secs: u64,
    pub mailbox_ttl_secs: u64,
}

impl RetentionPolicy {
    /// The bounds from the `[records]` config section, checked every
    /// [`RETENTION_CHECK_INTERVAL`].
    /// Offline-delivery records are kept forever: see [`with_durable`](Self::with_durable).
    pub fn new(max_records: u64, max_age_days: u64) -> RetentionPolicy {
        RetentionPolicy {
            max_records,
            max_age_secs: max_age_days.saturating_mul(86_400),
            check_interval: RETENTION_CHECK_INTERVAL,
            history_ttl_secs: 0,
            mailbox_ttl_secs: 0,
        }
    }

    /// The same policy, expiring history entries and closed sessions after `history_ttl_secs`
    /// (`history.ttl_secs`) and mailbox entries after `mailbox_ttl_secs` (`mailbox.ttl_secs`);
    /// 0 = never.
    pub fn with_durable(self, history_ttl_secs: u64, mailbox_ttl_secs: u64) -> RetentionPolicy {
        RetentionPolicy { history_ttl_secs, mailbox_ttl_secs, ..self }
    }
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy::new(DEFAULT_MAX_RECORDS, DEFAULT_MAX_AGE_DAYS)
    }
}

/// What one [`Store::prune_connections`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneOutcome {
    /// Rows deleted.
    pub deleted: usize,
    /// More rows are due than `max_deletes` allowed: run another pass soon.
    pub more: bool,
}

// ---------------------------------------------------------------------------------------------
// Encoding.

#[derive(Serialize)]
struct DiskOut<'a> {
    v: u32,
    #[serde(flatten)]
    rec: &'a ConnectionRecord,
}

#[derive(Deserialize)]
struct DiskIn {
    v: u32,
    #[serde(flatten)]
    rec: ConnectionRecord,
}

fn encode_connection(rec: &ConnectionRecord) -> Vec<u8> {
    serde_json::to_vec(&DiskOut { v: 1, rec }).expect("serializing a plain struct to JSON cannot fail")
}

fn corrupt(key: &[u8], why: String) -> StoreError {
    StoreError::Corrupt(format!("connection record {}: {why}", hex(key)))
}

fn decode_connection(key: &[u8], bytes: &[u8]) -> Result<ConnectionRecord> {
    let disk: DiskIn = serde_json::from_slice(bytes).map_err(|e| {
        corrupt(key, format!("{:?} error at line {} column {}", e.classify(), e.line(), e.column()))
    })?;
    if disk.v != 1 {
        return Err(corrupt(key, format!("unknown version {}", disk.v)));
    }
    Ok(disk.rec)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Just the fields a filter looks at, borrowed (no allocation unless escaped).
#[derive(Deserialize)]
struct Who<'a> {
    #[serde(borrow)]
    user: Cow<'a, str>,
    #[serde(borrow, default)]
    agent_id: Option<Cow<'a, str>>,
}

fn connection_key(opened: u64, conn_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + conn_id.len());
    k.extend_from_slice(&opened.to_be_bytes());
    k.extend_from_slice(conn_id.as_bytes());
    k
}

/// The open time a key sorts by (0 for a key that is not ours, so retention drops it).
fn key_opened(key: &[u8]) -> u64 {
    match key.first_chunk::<8>() {
        Some(b) if key.len() > 8 => u64::from_be_bytes(*b),
        _ => 0,
    }
}

// ---------------------------------------------------------------------------------------------
// Writer side (inside the batch's write transaction).

impl WriteOp {
    /// Applies a `ConnectionSeen` or `ConnectionClosed` to the stored record.
    fn update_connection(&self, rec: &mut ConnectionRecord) {
        match *self {
            WriteOp::ConnectionSeen { at, frames_in, frames_out, bytes_in, bytes_out, .. } => {
                if rec.closed.is_some() {
                    return;
                }
                rec.last_seen = rec.last_seen.max(at);
                (rec.frames_in, rec.frames_out, rec.bytes_in, rec.bytes_out) =
                    (frames_in, frames_out, bytes_in, bytes_out);
            }
            WriteOp::ConnectionClosed {
                last_seen,
                closed,
                frames_in,
                frames_out,
                bytes_in,
                bytes_out,
                close_code,
                ..
            } => {
                rec.last_seen = rec.last_seen.max(last_seen);
                rec.closed = Some(closed);
                (rec.frames_in, rec.frames_out, rec.bytes_in, rec.bytes_out) =
                    (frames_in, frames_out, bytes_in, bytes_out);
                rec.close_code = close_code;
            }
            _ => {}
        }
    }
}

/// Applies one connection op inside the batch's transaction; `Ok(false)` when skipped.
pub(super) fn apply_in(store: &Store, wtxn: &mut RwTxn, op: &WriteOp) -> Result<bool> {
    let db = &store.inner;
    match op {
        WriteOp::ConnectionOpened(rec) => {
            if let Some(problem) = rec.problem() {
                tracing::warn!(problem, "store writer: skipping a malformed connection record");
                return Ok(false);
            }
            let key = connection_key(rec.opened, &rec.conn_id);
            if db.conns.get(wtxn, &key)?.is_some() {
                tracing::warn!(conn = %rec.conn_id, "store writer: skipping a second record for one connection");
                return Ok(false);
            }
            db.conns.put(wtxn, &key, &encode_connection(rec))?;
            Ok(true)
        }
        WriteOp::ConnectionSeen { conn_id, opened, .. }
        | WriteOp::ConnectionClosed { conn_id, opened, .. } => {
            if !ids::is_valid_id(conn_id) {
                return Ok(false);
            }
            let key = connection_key(*opened, conn_id);
            let Some(bytes) = db.conns.get(wtxn, &key)? else { return Ok(false) };
            let mut rec = match decode_connection(&key, bytes) {
                Ok(rec) => rec,
                Err(e) => {
                    tracing::warn!(error = %e, "store writer: skipping an unreadable connection record");
                    return Ok(false);
                }
            };
            op.update_connection(&mut rec);
            db.conns.put(wtxn, &key, &encode_connection(&rec))?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

// ---------------------------------------------------------------------------------------------
// Reads and retention.

impl Store {
    /// Connection records, newest first (by open second, then conn_id), filtered by user
    /// and/or agent. Works from any process while the daemon runs (one read transaction).
    /// An unknown user or agent yields an empty list; a record that cannot be decoded is an error.
    pub fn list_connections(&self, filter: &ConnectionFilter) -> Result<Vec<ConnectionRecord>> {
        let txn = self.read_txn()?;
        let limit = filter.limit.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let (user, agent) = (filter.user.as_deref(), filter.agent.as_deref());
        let filtered = user.is_some() || agent.is_some();
        for entry in self.inner.conns.rev_iter(&txn)? {
            if out.len() >= limit {
                break;
            }
            let (key, bytes) = entry?;
            if filtered {
                // Look at the two filtered fields before decoding the rest.
                let who: Who =
                    serde_json::from_slice(bytes).map_err(|_| corrupt(key, "unreadable".into()))?;
                if user.is_some_and(|u| who.user != u)
                    || agent.is_some_and(|a| who.agent_id.as_deref() != Some(a))
                {
                    continue;
                }
            }
            out.push(decode_connection(key, bytes)?);
        }
        Ok(out)
    }

    /// One connection record by the `(conn_id, opened)` it was stored with.
    pub fn get_connection(&self, conn_id: &str, opened: u64) -> Result<Option<ConnectionRecord>> {
        if !ids::is_valid_id(conn_id) {
            return Ok(None);
        }
        let key = connection_key(opened, conn_id);
        let txn = self.read_txn()?;
        match self.inner.conns.get(&txn, &key)? {
            None => Ok(None),
            Some(bytes) => decode_connection(&key, bytes).map(Some),
        }
    }

    /// How many connection records are stored (O(1)).
    pub fn connection_count(&self) -> Result<u64> {
        let txn = self.read_txn()?;
        Ok(self.inner.conns.len(&txn)?)
    }

    /// One retention pass: delete the oldest records beyond `policy.max_records` and those opened
    /// before `now - policy.max_age_secs`, at most `max_deletes` of them, in one transaction.
    ///
    /// The writer thread's job, public for tests and benches (it takes LMDB's writer lock when
    /// something is due). Nothing due costs one read transaction.
    pub fn prune_connections(
        &self,
        policy: &RetentionPolicy,
        now: u64,
        max_deletes: usize,
    ) -> Result<PruneOutcome> {
        let db = &self.inner;
        let cutoff = now.saturating_sub(policy.max_age_secs);
        let due = {
            let txn = self.read_txn()?;
            db.conns.len(&txn)? > policy.max_records
                || db.conns.first(&txn)?.is_some_and(|(key, _)| key_opened(key) < cutoff)
        };
        if !due {
            return Ok(PruneOutcome::default());
        }
        let mut wtxn = db.env.write_txn()?;
        let mut excess = db.conns.len(&wtxn)?.saturating_sub(policy.max_records);
        let mut victims: Vec<Vec<u8>> = Vec::new();
        let mut more = false;
        for entry in db.conns.iter(&wtxn)? {
            let (key, _) = entry?;
            if excess == 0 && key_opened(key) >= cutoff {
                break;
            }
            if victims.len() >= max_deletes {
                more = true;
                break;
            }
            victims.push(key.to_vec());
            excess = excess.saturating_sub(1);
        }
        for key in &victims {
            db.conns.delete(&mut wtxn, key)?;
        }
        wtxn.commit()?;
        Ok(PruneOutcome { deleted: victims.len(), more })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_open_time() {
        let a = connection_key(100, "c_zzz");
        let b = connection_key(101, "c_aaa");
        assert!(a < b);
        assert_eq!(key_opened(&b), 101);
        assert_eq!(key_opened(b"short"), 0);
        assert_eq!(key_opened(&101u64.to_be_bytes()), 0);
    }

    #[test]
    fn encoding_round_trips_and_is_versioned() {
        let mut rec = ConnectionRecord::new("c_x", "u", Role::Client, Some("ag_1".into()), "[::1]:5", 9);
        rec.closed = Some(12);
        rec.close_code = Some(1001);
        rec.bytes_out = u64::MAX;
        let bytes = encode_connection(&rec);
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["v"], 1);
        assert_eq!(json["role"], "client");
        assert_eq!(decode_connection(b"k", &bytes).unwrap(), rec);
        let v2 = String::from_utf8(bytes).unwrap().replace("\"v\":1", "\"v\":2");
        assert!(matches!(decode_connection(b"k", v2.as_bytes()), Err(StoreError::Corrupt(_))));
        assert!(matches!(decode_connection(b"k", b"{"), Err(StoreError::Corrupt(_))));
        let encoded = encode_connection(&rec);
        let who: Who = serde_json::from_slice(&encoded).unwrap();
        assert_eq!((&*who.user, who.agent_id.as_deref()), ("u", Some("ag_1")));
    }
}
