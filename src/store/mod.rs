//! Persistence: the LMDB environment (through heed) in the data dir, and the files next to it.
//!
//! Owns: the only code that knows heed/LMDB — the `agents`, `agents_by_user` and `meta`
//! databases, the connection records (`connections`, see `connections.rs`) and their on-disk
//! encoding; the durable offline-delivery records (`streams`, `history`, `mailboxes`, `mailbox`,
//! `closed_sessions`, see `durable.rs`) and [`Store::load_user`]; the daemon's writer thread
//! ([`spawn_writer_with`]), its commit notifications ([`WriterHandle::send_durable`]) and its
//! retention of connection and durable records; the revocation watch ([`spawn_revocation_watcher`]); the data-dir lock ([`DataDirLock`]); the
//! generated JWT key file ([`ensure_jwt_key`]) and secret files ([`read_secret_file`]).
//!
//! Must stay true:
//! - One [`Store`] per data dir per process: [`Store::open`] on a dir this process already has
//!   open returns a clone of the open one (LMDB forbids opening one environment twice in a
//!   process). A `Store` is an `Arc`: clone it freely, share it across shards.
//! - Reads (any thread, any time) use their own short read transaction; the environment is opened
//!   with `read_txn_without_tls`, so several read transactions may live on one thread.
//! - Shards never commit. The running daemon's statistics and connection records go through
//!   [`WriterHandle::send`] (bounded, never blocks) and are group-committed by one writer thread. Agent creation and
//!   revocation (the CLI, possibly another process while the daemon runs — LMDB serialises the
//!   writers) commit synchronously and durably, and bump `meta.change_generation` in the same
//!   transaction, which is how the daemon notices a revocation.
//! - The writer re-reads every record inside its own write transaction, so it never undoes a
//!   revocation committed by the CLI in between.
//! - Offline delivery (stream history, mailboxes, closed sessions) is written only by the writer
//!   thread, through [`WriterHandle::send_durable`] when the shard must know the op is committed
//!   (it learns through [`WriterHandle::settled`] / [`WriterHandle::take_failed`], never through
//!   a message that could be lost), and read by a shard only with [`Store::load_user`] (one read
//!   transaction). Every key of those records starts with `user \0`: one user's records never
//!   show up in another user's load (not even a user whose id extends this one's).
//! - Frames stored for offline delivery come back byte-exact; they are never decoded here.
//! - Secrets (HMAC agent secrets, the JWT key) never appear in `Debug` output or in
//!   [`StoreError`] messages. Decoding errors are reported without the decoded text.
//! - On-disk records are versioned: JSON with `"v":1`, or (history and mailbox entries, closed
//!   sessions) a leading version byte `1`; `meta.schema_version` refuses a data dir written by a
//!   newer schema.

mod connections;
mod durable;
mod files;
mod watch;
mod writer;

pub use connections::{
    ConnectionFilter, ConnectionRecord, PruneOutcome, RetentionPolicy, Role, DEFAULT_MAX_AGE_DAYS,
    DEFAULT_MAX_RECORDS, MAX_REMOTE_BYTES, RETENTION_CHECK_INTERVAL, RETENTION_MAX_DELETES,
};
pub use durable::{
    DurablePruneOutcome, DurableUser, SessionClosed, StoredEntry, StoredMail, StoredMailbox, StoredSession,
    StoredStream, StreamKey, StreamMark, Ticket,
};
pub use files::{ensure_jwt_key, read_jwt_key, read_secret_file, DataDirLock, JWT_KEY_FILE, LOCK_FILE};
pub use watch::spawn_revocation_watcher;
pub use writer::{
    spawn_writer, spawn_writer_with, WriteOp, WriterHandle, WriterStats, MAX_TICKET_SHARDS, WRITER_BATCH_MAX,
    WRITER_BATCH_WINDOW, WRITER_QUEUE_CAPACITY,
};

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use heed::types::{Bytes, Str, Unit};
use heed::{CommitOrAbort, Database, Env, EnvOpenOptions, RoTxn, WithoutTls};
use serde::{Deserialize, Serialize};

use crate::ids;

/// Map size used when the caller passes 0 and the environment does not exist yet.
pub const DEFAULT_MAP_SIZE_MB: usize = 1024;
/// Longest user id (spec §1) and agent name, in bytes of UTF-8.
pub const MAX_USER_BYTES: usize = 128;
pub const MAX_NAME_BYTES: usize = 128;

/// Version of the on-disk layout this build writes and understands.
const SCHEMA_VERSION: u64 = 1;
const MAX_DBS: u32 = 16;
const MAX_READERS: u32 = 1024;
const META_SCHEMA: &str = "schema_version";
/// Written by the writer's readiness probe.
const META_PROBE: &str = "readyz_probe";
const META_GENERATION: &str = "change_generation";
/// LMDB's data file inside the environment directory.
const DATA_FILE: &str = "data.mdb";

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Everything that can go wrong in this module. Messages name files and ids, never secrets.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("LMDB: {0}")]
    Lmdb(#[from] heed::Error),
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("corrupt record in the store: {0}")]
    Corrupt(String),
    #[error(
        "another switchboard serve is running on this data dir ({}); stop it first",
        path.display()
    )]
    Locked { path: PathBuf },
    #[error(
        "the data dir {} was written by a newer switchboard (schema {found}, this build knows {known})",
        path.display()
    )]
    NewerSchema { path: PathBuf, found: u64, known: u64 },
    #[error("{} is empty (expected a secret)", path.display())]
    EmptySecret { path: PathBuf },
}

impl StoreError {
    fn io(what: &'static str, path: &Path, source: io::Error) -> StoreError {
        StoreError::Io { what, path: path.to_path_buf(), source }
    }
    fn invalid(field: &'static str, reason: impl Into<String>) -> StoreError {
        StoreError::Invalid { field, reason: reason.into() }
    }
}

/// Seconds since the Unix epoch (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// An agent's credential. `Debug` never shows the HMAC secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// The key is the UTF-8 bytes of `secret` exactly as the CLI printed it (`sbk_…`).
    Hmac {
        secret: String,
    },
    Ed25519 {
        public_key: [u8; 32],
    },
}

impl Credential {
    /// `"hmac"` or `"ed25519"`, as the CLI prints it.
    pub fn kind(&self) -> &'static str {
        match self {
            Credential::Hmac { .. } => "hmac",
            Credential::Ed25519 { .. } => "ed25519",
        }
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Hmac { .. } => f.write_str("Hmac(<redacted>)"),
            Credential::Ed25519 { public_key } => {
                write!(f, "Ed25519({})", URL_SAFE_NO_PAD.encode(public_key))
            }
        }
    }
}

/// What [`Store::create_agent`] is given: an HMAC agent gets a freshly generated secret.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NewCredential {
    Hmac,
    Ed25519([u8; 32]),
}

impl fmt::Debug for NewCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NewCredential::Hmac => f.write_str("Hmac"),
            NewCredential::Ed25519(k) => write!(f, "Ed25519({})", URL_SAFE_NO_PAD.encode(k)),
        }
    }
}

/// One agent as stored. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    pub agent_id: String,
    pub user: String,
    pub name: String,
    pub credential: Credential,
    pub created: u64,
    pub expires: Option<u64>,
    pub revoked: bool,
    pub revoked_at: Option<u64>,
    pub last_connected: Option<u64>,
    pub last_seen: Option<u64>,
    pub last_disconnected: Option<u64>,
}

impl AgentRecord {
    /// Whether the agent has expired at `now` (an agent expires at the second `expires`).
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires.is_some_and(|e| now >= e)
    }

    /// Not revoked and not expired: may connect, and is listed to clients.
    pub fn is_usable(&self, now: u64) -> bool {
        !self.revoked && !self.is_expired(now)
    }
}

/// The result of [`Store::revoke_agent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeOutcome {
    Revoked,
    AlreadyRevoked,
    NotFound,
}

/// What one [`Store::apply_batch`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Ops applied (to an existing agent, or a connection record stored or updated).
    pub applied: usize,
    /// Ops for agents or connections that do not exist (any more) or whose record is
    /// unreadable, malformed or duplicate connection records, offline-delivery ops with a
    /// malformed key part or nothing to act on (see [`WriteOp`]).
    pub skipped: usize,
}

// ---------------------------------------------------------------------------------------------
// On-disk encoding.

#[derive(Serialize, Deserialize)]
struct DiskRecord {
    v: u32,
    user: String,
    name: String,
    cred: DiskCred,
    created: u64,
    #[serde(default)]
    expires: Option<u64>,
    #[serde(default)]
    revoked: bool,
    #[serde(default)]
    revoked_at: Option<u64>,
    #[serde(default)]
    last_connected: Option<u64>,
    #[serde(default)]
    last_seen: Option<u64>,
    #[serde(default)]
    last_disconnected: Option<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum DiskCred {
    Hmac { secret: String },
    Ed25519 { public_key: String },
}

fn encode_record(r: &AgentRecord) -> Vec<u8> {
    let cred = match &r.credential {
        Credential::Hmac { secret } => DiskCred::Hmac { secret: secret.clone() },
        Credential::Ed25519 { public_key } => {
            DiskCred::Ed25519 { public_key: URL_SAFE_NO_PAD.encode(public_key) }
        }
    };
    let disk = DiskRecord {
        v: 1,
        user: r.user.clone(),
        name: r.name.clone(),
        cred,
        created: r.created,
        expires: r.expires,
        revoked: r.revoked,
        revoked_at: r.revoked_at,
        last_connected: r.last_connected,
        last_seen: r.last_seen,
        last_disconnected: r.last_disconnected,
    };
    serde_json::to_vec(&disk).expect("serializing a plain struct to JSON cannot fail")
}

fn decode_record(agent_id: &str, bytes: &[u8]) -> Result<AgentRecord> {
    // serde_json's messages can quote the offending value (a secret): report only its position.
    let disk: DiskRecord = serde_json::from_slice(bytes).map_err(|e| {
        StoreError::Corrupt(format!(
            "agent {agent_id}: {:?} error at line {} column {}",
            e.classify(),
            e.line(),
            e.column()
        ))
    })?;
    let credential = match disk.cred {
        DiskCred::Hmac { secret } => Credential::Hmac { secret },
        DiskCred::Ed25519 { public_key } => {
            let bytes = URL_SAFE_NO_PAD
                .decode(public_key.as_bytes())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| StoreError::Corrupt(format!("agent {agent_id}: bad Ed25519 public key")))?;
            Credential::Ed25519 { public_key: bytes }
        }
    };
    Ok(AgentRecord {
        agent_id: agent_id.to_owned(),
        user: disk.user,
        name: disk.name,
        credential,
        created: disk.created,
        expires: disk.expires,
        revoked: disk.revoked,
        revoked_at: disk.revoked_at,
        last_connected: disk.last_connected,
        last_seen: disk.last_seen,
        last_disconnected: disk.last_disconnected,
    })
}

fn index_key(user: &str, agent_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(user.len() + 1 + agent_id.len());
    k.extend_from_slice(user.as_bytes());
    k.push(0);
    k.extend_from_slice(agent_id.as_bytes());
    k
}

fn index_prefix(user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(user.len() + 1);
    k.extend_from_slice(user.as_bytes());
    k.push(0);
    k
}

/// Validate a user id for storage: 1 to 128 bytes, no control characters (NUL separates the
/// index key; the others would garble the CLI's tables).
pub fn validate_user(user: &str) -> Result<()> {
    validate_text("user", user, MAX_USER_BYTES)
}

/// Validate an agent display name: 1 to 128 bytes, no control characters.
pub fn validate_name(name: &str) -> Result<()> {
    validate_text("name", name, MAX_NAME_BYTES)
}

fn validate_text(field: &'static str, s: &str, max: usize) -> Result<()> {
    if s.is_empty() {
        return Err(StoreError::invalid(field, "must not be empty"));
    }
    if s.len() > max {
        return Err(StoreError::invalid(field, format!("{} bytes, at most {max} allowed", s.len())));
    }
    if s.chars().any(char::is_control) {
        return Err(StoreError::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

fn generation_value(bytes: Option<&[u8]>) -> u64 {
    bytes.and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_be_bytes).unwrap_or(0)
}

/// Create `dir` (and parents) with mode 0700 if it does not exist.
pub(crate) fn create_private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| StoreError::io("creating data dir", dir, e))
}

// ---------------------------------------------------------------------------------------------
// The store.

type AgentsDb = Database<'static, Str, Bytes>;
type IndexDb = Database<'static, Bytes, Unit>;
type MetaDb = Database<'static, Str, Bytes>;
type ConnsDb = Database<'static, Bytes, Bytes>;
/// The durable offline-delivery tables (see `durable.rs`): raw keys, raw values.
type RawDb = Database<'static, Bytes, Bytes>;

struct Inner {
    env: Env<WithoutTls>,
    agents: AgentsDb,
    by_user: IndexDb,
    meta: MetaDb,
    conns: ConnsDb,
    streams: RawDb,
    history: RawDb,
    mailboxes: RawDb,
    mailbox: RawDb,
    closed_sessions: RawDb,
    dir: PathBuf,
}

/// The LMDB environment of one data dir. Cheap to clone (an `Arc`); `Send + Sync`.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("dir", &self.inner.dir).finish_non_exhaustive()
    }
}

/// Stores open in this process, by canonical dir (see the module header).
static OPEN: LazyLock<Mutex<HashMap<PathBuf, Weak<Inner>>>> = LazyLock::new(Default::default);

impl Store {
    /// Open (creating if needed) the environment in `dir`.
    ///
    /// `dir` is created with mode 0700 when missing. `map_size_mb` is the most the store can ever
    /// hold; 0 means "whatever the environment was last given" (what the CLI wants, so it never
    /// shrinks or grows the daemon's map), or [`DEFAULT_MAP_SIZE_MB`] for a new environment. If
    /// this process already has `dir` open, that store is returned and `map_size_mb` is ignored.
    pub fn open(dir: &Path, map_size_mb: usize) -> Result<Store> {
        create_private_dir(dir)?;
        let canonical = dir.canonicalize().map_err(|e| StoreError::io("resolving data dir", dir, e))?;
        let mut open = OPEN.lock().unwrap_or_else(PoisonError::into_inner);
        open.retain(|_, weak| weak.strong_count() > 0);
        if let Some(inner) = open.get(&canonical).and_then(Weak::upgrade) {
            return Ok(Store { inner });
        }
        let env = open_env(&canonical, map_size_mb)?;
        if let Err(e) = env.clear_stale_readers() {
            tracing::warn!(error = %e, "store: clearing stale LMDB readers failed");
        }
        let wtxn = env.write_txn()?;
        let created = env.create_databases_and_commit(wtxn, |dbo, wtxn| -> Result<_> {
            let agents: Database<Str, Bytes> = dbo.create_database(wtxn, Some("agents"))?;
            let by_user: Database<Bytes, Unit> = dbo.create_database(wtxn, Some("agents_by_user"))?;
            let meta: Database<Str, Bytes> = dbo.create_database(wtxn, Some("meta"))?;
            let conns: Database<Bytes, Bytes> = dbo.create_database(wtxn, Some("connections"))?;
            let durable: [Database<Bytes, Bytes>; 5] = [
                dbo.create_database(wtxn, Some("streams"))?,
                dbo.create_database(wtxn, Some("history"))?,
                dbo.create_database(wtxn, Some("mailboxes"))?,
                dbo.create_database(wtxn, Some("mailbox"))?,
                dbo.create_database(wtxn, Some("closed_sessions"))?,
            ];
            match meta.get(wtxn, META_SCHEMA)? {
                None => meta.put(wtxn, META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?,
                Some(v) => {
                    let found = generation_value(Some(v));
                    if found > SCHEMA_VERSION {
                        return Ok(CommitOrAbort::Abort(found));
                    }
                }
            }
            Ok(CommitOrAbort::Commit((agents, by_user, meta, conns, durable)))
        })?;
        let (agents, by_user, meta, conns, durable) = match created {
            CommitOrAbort::Commit(dbs) => dbs,
            CommitOrAbort::Abort(found) => {
                return Err(StoreError::NewerSchema { path: canonical, found, known: SCHEMA_VERSION })
            }
        };
        let [streams, history, mailboxes, mailbox, closed_sessions] = durable;
        let inner = Arc::new(Inner {
            env,
            agents,
            by_user,
            meta,
            conns,
            streams,
            history,
            mailboxes,
            mailbox,
            closed_sessions,
            dir: canonical.clone(),
        });
        open.insert(canonical, Arc::downgrade(&inner));
        Ok(Store { inner })
    }

    /// Whether `dir` holds an environment already (lets read-only commands avoid creating one).
    pub fn exists(dir: &Path) -> bool {
        dir.join(DATA_FILE).is_file()
    }

    /// The canonical data dir.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn read_txn(&self) -> Result<RoTxn<'_, WithoutTls>> {
        Ok(self.inner.env.read_txn()?)
    }

    fn record_in(&self, txn: &RoTxn, id: &str) -> Result<Option<AgentRecord>> {
        if !ids::is_valid_id(id) {
            // Not a relay id: cannot be stored, and LMDB refuses empty or oversized keys.
            return Ok(None);
        }
        match self.inner.agents.get(txn, id)? {
            None => Ok(None),
            Some(bytes) => decode_record(id, bytes).map(Some),
        }
    }

    fn generation_in(&self, txn: &RoTxn) -> Result<u64> {
        Ok(generation_value(self.inner.meta.get(txn, META_GENERATION)?))
    }

    fn bump_generation(&self, wtxn: &mut heed::RwTxn) -> Result<u64> {
        let next = self.generation_in(wtxn)?.wrapping_add(1);
        self.inner.meta.put(wtxn, META_GENERATION, &next.to_be_bytes())?;
        Ok(next)
    }

    /// One agent by id; `None` for an unknown id or one that is not shaped like a relay id.
    pub fn get_agent(&self, id: &str) -> Result<Option<AgentRecord>> {
        let txn = self.read_txn()?;
        self.record_in(&txn, id)
    }

    /// Every agent of `user` (revoked and expired ones included), oldest first.
    pub fn agents_of_user(&self, user: &str) -> Result<Vec<AgentRecord>> {
        let txn = self.read_txn()?;
        self.agents_of_user_in(&txn, user)
    }

    fn agents_of_user_in(&self, txn: &RoTxn, user: &str) -> Result<Vec<AgentRecord>> {
        let mut out = Vec::new();
        if user.is_empty() || user.len() > MAX_USER_BYTES || user.contains('\0') {
            return Ok(out);
        }
        let prefix = index_prefix(user);
        for entry in self.inner.by_user.prefix_iter(txn, &prefix)? {
            let (key, ()) = entry?;
            let Ok(id) = std::str::from_utf8(&key[prefix.len()..]) else { continue };
            match self.record_in(txn, id)? {
                Some(rec) if rec.user == user => out.push(rec),
                _ => {}
            }
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.agent_id.cmp(&b.agent_id)));
        Ok(out)
    }

    /// All agents (or `user`'s), sorted by user, then creation time.
    pub fn list_agents(&self, user: Option<&str>) -> Result<Vec<AgentRecord>> {
        let txn = self.read_txn()?;
        if let Some(user) = user {
            return self.agents_of_user_in(&txn, user);
        }
        let mut out = Vec::new();
        for entry in self.inner.agents.iter(&txn)? {
            let (id, bytes) = entry?;
            out.push(decode_record(id, bytes)?);
        }
        out.sort_by(|a, b| {
            (a.user.as_str(), a.created, a.agent_id.as_str()).cmp(&(
                b.user.as_str(),
                b.created,
                b.agent_id.as_str(),
            ))
        });
        Ok(out)
    }

    /// The change generation and every revoked agent, from one snapshot.
    pub(crate) fn revoked_snapshot(&self) -> Result<(u64, Vec<AgentRecord>)> {
        let txn = self.read_txn()?;
        let generation = self.generation_in(&txn)?;
        let mut out = Vec::new();
        for entry in self.inner.agents.iter(&txn)? {
            let (id, bytes) = entry?;
            match decode_record(id, bytes) {
                Ok(rec) if rec.revoked => out.push(rec),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "store: skipping unreadable agent record"),
            }
        }
        Ok((generation, out))
    }

    /// Counter bumped by every agent creation and revocation (in the same transaction).
    pub fn change_generation(&self) -> Result<u64> {
        let txn = self.read_txn()?;
        self.generation_in(&txn)
    }

    /// Create an agent and commit durably. Returns the record and, for HMAC agents, the secret
    /// (the only time it is handed out for display). `expires` is a Unix time in the future.
    pub fn create_agent(
        &self,
        user: &str,
        name: &str,
        cred: NewCredential,
        expires: Option<u64>,
    ) -> Result<(AgentRecord, Option<String>)> {
        validate_user(user)?;
        validate_name(name)?;
        let now = unix_now();
        if let Some(e) = expires {
            if e <= now {
                return Err(StoreError::invalid("expires", "must be in the future"));
            }
        }
        let (credential, secret) = match cred {
            NewCredential::Hmac => {
                let secret = ids::hmac_secret();
                (Credential::Hmac { secret: secret.clone() }, Some(secret))
            }
            NewCredential::Ed25519(public_key) => (Credential::Ed25519 { public_key }, None),
        };
        let mut wtxn = self.inner.env.write_txn()?;
        let agent_id = loop {
            let id = ids::agent_id();
            if self.inner.agents.get(&wtxn, &id)?.is_none() {
                break id;
            }
        };
        let record = AgentRecord {
            agent_id,
            user: user.to_owned(),
            name: name.to_owned(),
            credential,
            created: now,
            expires,
            revoked: false,
            revoked_at: None,
            last_connected: None,
            last_seen: None,
            last_disconnected: None,
        };
        self.inner.agents.put(&mut wtxn, &record.agent_id, &encode_record(&record))?;
        self.inner.by_user.put(&mut wtxn, &index_key(user, &record.agent_id), &())?;
        self.bump_generation(&mut wtxn)?;
        wtxn.commit()?;
        Ok((record, secret))
    }

    /// Revoke an agent and commit durably. The running daemon closes its connection (4003)
    /// through [`spawn_revocation_watcher`], and refuses its upgrades from now on.
    pub fn revoke_agent(&self, id: &str) -> Result<RevokeOutcome> {
        let mut wtxn = self.inner.env.write_txn()?;
        let Some(mut record) = self.record_in(&wtxn, id)? else {
            return Ok(RevokeOutcome::NotFound);
        };
        if record.revoked {
            return Ok(RevokeOutcome::AlreadyRevoked);
        }
        record.revoked = true;
        record.revoked_at = Some(unix_now());
        self.inner.agents.put(&mut wtxn, id, &encode_record(&record))?;
        self.bump_generation(&mut wtxn)?;
        wtxn.commit()?;
        Ok(RevokeOutcome::Revoked)
    }

    /// Apply a batch of ops in one write transaction and commit.
    ///
    /// This is the writer thread's commit, public for benches and tests: a shard must never call
    /// it (it blocks on LMDB's writer lock and an fsync); shards use [`WriterHandle::send`].
    /// Ops for unknown agents or connections, and malformed records, are skipped. Ops apply in
    /// order; each touched agent record, stream meta and mailbox meta is read and written once.
    pub fn apply_batch(&self, ops: &[WriteOp]) -> Result<BatchOutcome> {
        let mut wtxn = self.inner.env.write_txn()?;
        let mut touched: HashMap<&str, Option<AgentRecord>> = HashMap::new();
        let mut durable = durable::DurableBatch::default();
        let mut outcome = BatchOutcome::default();
        for op in ops {
            if let WriteOp::Probe { at } = op {
                self.inner.meta.put(&mut wtxn, META_PROBE, &at.to_be_bytes())?;
                outcome.applied += 1;
                continue;
            }
            let applied = match op.agent_id() {
                None if op.is_durable() => durable.apply(self, &mut wtxn, op)?,
                None => connections::apply_in(self, &mut wtxn, op)?,
                Some(id) => {
                    let slot = match touched.entry(id) {
                        Entry::Occupied(e) => e.into_mut(),
                        Entry::Vacant(e) => {
                            let rec = match self.record_in(&wtxn, id) {
                                Ok(rec) => rec,
                                Err(StoreError::Corrupt(why)) => {
                                    tracing::warn!(error = %why, "store writer: skipping unreadable agent");
                                    None
                                }
                                Err(e) => return Err(e),
                            };
                            e.insert(rec)
                        }
                    };
                    match slot {
                        Some(rec) => {
                            op.apply_to(rec);
                            true
                        }
                        None => false,
                    }
                }
            };
            if applied {
                outcome.applied += 1;
            } else {
                outcome.skipped += 1;
            }
        }
        for (id, rec) in &touched {
            if let Some(rec) = rec {
                self.inner.agents.put(&mut wtxn, id, &encode_record(rec))?;
            }
        }
        durable.finish(self, &mut wtxn)?;
        wtxn.commit()?;
        Ok(outcome)
    }
}

/// Open the heed environment, waiting briefly if a just-dropped `Store` for the same dir has not
/// finished closing (heed refuses to open an environment twice in one process).
fn open_env(dir: &Path, map_size_mb: usize) -> Result<Env<WithoutTls>> {
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.max_dbs(MAX_DBS).max_readers(MAX_READERS);
    let map_size_mb = if map_size_mb == 0 && !Store::exists(dir) { DEFAULT_MAP_SIZE_MB } else { map_size_mb };
    if map_size_mb > 0 {
        let bytes = map_size_mb
            .checked_mul(1024 * 1024)
            .ok_or_else(|| StoreError::invalid("map size", format!("{map_size_mb} MiB is too large")))?;
        options.map_size(bytes);
    }
    let mut tries = 0;
    loop {
        // SAFETY: LMDB's own lock file coordinates every process that opens this directory, we
        // never open it twice in this process (the `OPEN` registry), we use none of the unsafe
        // flags, and nothing else writes these files.
        match unsafe { options.open(dir) } {
            Err(heed::Error::EnvAlreadyOpened) if tries < 500 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            other => return Ok(other?),
        }
    }
}

#[cfg(test)]
mod tests;
