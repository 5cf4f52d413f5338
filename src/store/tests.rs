//! Store tests against a real LMDB environment in a temporary directory.

use super::*;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn open(dir: &Path) -> Store {
    Store::open(dir, 32).expect("open store")
}

fn hmac(store: &Store, user: &str, name: &str) -> (AgentRecord, String) {
    let (rec, secret) = store.create_agent(user, name, NewCredential::Hmac, None).unwrap();
    (rec, secret.expect("HMAC agents get a secret"))
}

#[test]
fn open_creates_private_dir_and_reopens() {
    let t = tmp();
    let dir = t.path().join("a/b/data");
    assert!(!Store::exists(&dir));
    let store = open(&dir);
    assert!(Store::exists(&dir));
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    assert_eq!(store.change_generation().unwrap(), 0);
    // Opening again in this process hands back the same environment.
    let again = Store::open(&dir, 0).unwrap();
    assert!(Arc::ptr_eq(&store.inner, &again.inner));
    drop((store, again));
    // And after everything is dropped, a real reopen works (map size 0 = adopt).
    let store = Store::open(&dir, 0).unwrap();
    assert_eq!(store.list_agents(None).unwrap(), vec![]);
}

#[test]
fn create_get_list_by_user_revoke_generation() {
    let t = tmp();
    let store = open(t.path());
    let (a1, secret) = hmac(&store, "alice", "laptop");
    assert!(secret.starts_with("sbk_"));
    assert_eq!(a1.credential, Credential::Hmac { secret: secret.clone() });
    assert!(ids::is_valid_id(&a1.agent_id));
    assert_eq!(store.change_generation().unwrap(), 1);

    let key = [7u8; 32];
    let (a2, none) =
        store.create_agent("alice", "gateway", NewCredential::Ed25519(key), Some(unix_now() + 3600)).unwrap();
    assert!(none.is_none());
    let (b1, _) = hmac(&store, "bob", "daemon");
    // "alice" must not match a user that merely starts with it.
    let (ax, _) = hmac(&store, "alicex", "other");
    assert_eq!(store.change_generation().unwrap(), 4);

    let got = store.get_agent(&a2.agent_id).unwrap().unwrap();
    assert_eq!(got, a2);
    assert_eq!(got.credential, Credential::Ed25519 { public_key: key });
    assert!(got.expires.is_some());
    assert_eq!(store.get_agent("ag_nope").unwrap(), None);
    assert_eq!(store.get_agent("").unwrap(), None);
    assert_eq!(store.get_agent(&"x".repeat(600)).unwrap(), None);
    assert_eq!(store.get_agent("a b").unwrap(), None);

    let mut alice: Vec<String> =
        store.agents_of_user("alice").unwrap().into_iter().map(|r| r.agent_id).collect();
    alice.sort();
    let mut want = vec![a1.agent_id.clone(), a2.agent_id.clone()];
    want.sort();
    assert_eq!(alice, want);
    assert_eq!(store.agents_of_user("bob").unwrap(), vec![b1.clone()]);
    assert_eq!(store.agents_of_user("alicex").unwrap(), vec![ax.clone()]);
    assert_eq!(store.agents_of_user("carol").unwrap(), vec![]);
    assert_eq!(store.agents_of_user("").unwrap(), vec![]);
    assert_eq!(store.list_agents(Some("bob")).unwrap(), vec![b1.clone()]);

    let all = store.list_agents(None).unwrap();
    assert_eq!(all.len(), 4);
    let users: Vec<&str> = all.iter().map(|r| r.user.as_str()).collect();
    assert_eq!(users, ["alice", "alice", "alicex", "bob"]);

    assert_eq!(store.revoke_agent(&b1.agent_id).unwrap(), RevokeOutcome::Revoked);
    assert_eq!(store.change_generation().unwrap(), 5);
    assert_eq!(store.revoke_agent(&b1.agent_id).unwrap(), RevokeOutcome::AlreadyRevoked);
    assert_eq!(store.revoke_agent("ag_missing").unwrap(), RevokeOutcome::NotFound);
    assert_eq!(store.revoke_agent("-weird id").unwrap(), RevokeOutcome::NotFound);
    assert_eq!(store.change_generation().unwrap(), 5);
    let b = store.get_agent(&b1.agent_id).unwrap().unwrap();
    assert!(b.revoked);
    assert!(b.revoked_at.is_some());
    assert!(!b.is_usable(unix_now()));
    // Revoked agents are still listed (the CLI shows them).
    assert_eq!(store.agents_of_user("bob").unwrap().len(), 1);
}

#[test]
fn validation() {
    let t = tmp();
    let store = open(t.path());
    let bad = |user: &str, name: &str| store.create_agent(user, name, NewCredential::Hmac, None).unwrap_err();
    assert!(matches!(bad("", "n"), StoreError::Invalid { field: "user", .. }));
    assert!(matches!(bad(&"u".repeat(129), "n"), StoreError::Invalid { field: "user", .. }));
    assert!(matches!(bad("a\0b", "n"), StoreError::Invalid { field: "user", .. }));
    assert!(matches!(bad("u", ""), StoreError::Invalid { field: "name", .. }));
    assert!(matches!(bad("u", &"n".repeat(129)), StoreError::Invalid { field: "name", .. }));
    assert!(matches!(bad("u", "a\nb"), StoreError::Invalid { field: "name", .. }));
    // 128 bytes of multi-byte UTF-8 is fine; 129 bytes is not.
    store.create_agent(&"é".repeat(64), &"n".repeat(128), NewCredential::Hmac, None).unwrap();
    assert!(matches!(bad(&format!("x{}", "é".repeat(64)), "n"), StoreError::Invalid { .. }));
    let past = store.create_agent("u", "n", NewCredential::Hmac, Some(1)).unwrap_err();
    assert!(matches!(past, StoreError::Invalid { field: "expires", .. }));
    assert_eq!(store.change_generation().unwrap(), 1);
}

#[test]
fn usable_and_debug_redacts() {
    let rec = AgentRecord {
        agent_id: "ag_x".into(),
        user: "u".into(),
        name: "n".into(),
        credential: Credential::Hmac { secret: "sbk_topsecret".into() },
        created: 10,
        expires: Some(100),
        revoked: false,
        revoked_at: None,
        last_connected: None,
        last_seen: None,
        last_disconnected: None,
    };
    assert!(rec.is_usable(99));
    assert!(!rec.is_usable(100));
    assert!(AgentRecord { expires: None, ..rec.clone() }.is_usable(u64::MAX));
    assert!(!AgentRecord { revoked: true, ..rec.clone() }.is_usable(50));
    let dbg = format!("{rec:?} {:?}", rec.credential);
    assert!(!dbg.contains("topsecret"), "{dbg}");
    assert!(dbg.contains("Hmac(<redacted>)"), "{dbg}");
    assert_eq!(rec.credential.kind(), "hmac");
}

#[test]
fn corrupt_record_error_hides_content() {
    let t = tmp();
    let store = open(t.path());
    let mut wtxn = store.inner.env.write_txn().unwrap();
    let bad =
        br#"{"v":1,"user":"u","name":"n","cred":{"kind":"hmac","secret":"sbk_leak"},"created":"sbk_leak2"}"#;
    store.inner.agents.put(&mut wtxn, "ag_bad", bad).unwrap();
    wtxn.commit().unwrap();
    let err = store.get_agent("ag_bad").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Corrupt(_)));
    assert!(!msg.contains("leak"), "{msg}");
    // The writer skips it rather than failing the batch.
    let out = store.apply_batch(&[WriteOp::AgentSeen { agent_id: "ag_bad".into(), at: 5 }]).unwrap();
    assert_eq!(out, BatchOutcome { applied: 0, skipped: 1 });
}

#[test]
fn two_read_txns_on_one_thread() {
    let t = tmp();
    let store = open(t.path());
    let (a, _) = hmac(&store, "alice", "one");
    let t1 = store.read_txn().unwrap();
    let t2 = store.read_txn().unwrap();
    assert!(store.record_in(&t1, &a.agent_id).unwrap().is_some());
    assert!(store.record_in(&t2, &a.agent_id).unwrap().is_some());
    // A third one inside a call, while both are alive, and a write that they do not see.
    assert_eq!(store.get_agent(&a.agent_id).unwrap().unwrap(), a);
    store.revoke_agent(&a.agent_id).unwrap();
    assert!(!store.record_in(&t1, &a.agent_id).unwrap().unwrap().revoked);
    // Read transactions are Send without TLS: finish one on another thread.
    let s2 = store.clone();
    let id = a.agent_id.clone();
    std::thread::scope(|sc| {
        sc.spawn(move || assert!(!s2.record_in(&t2, &id).unwrap().unwrap().revoked));
    });
    drop(t1);
    assert!(store.get_agent(&a.agent_id).unwrap().unwrap().revoked);
}

#[test]
fn apply_batch_merges_ops() {
    let t = tmp();
    let store = open(t.path());
    let (a, _) = hmac(&store, "alice", "one");
    let id = a.agent_id.clone();
    let ops = [
        WriteOp::AgentConnected { agent_id: id.clone(), at: 100 },
        WriteOp::AgentSeen { agent_id: id.clone(), at: 150 },
        WriteOp::AgentSeen { agent_id: "ag_gone".into(), at: 150 },
        WriteOp::AgentSeen { agent_id: id.clone(), at: 120 },
        WriteOp::AgentDisconnected { agent_id: id.clone(), at: 140 },
    ];
    let out = store.apply_batch(&ops).unwrap();
    assert_eq!(out, BatchOutcome { applied: 4, skipped: 1 });
    let r = store.get_agent(&id).unwrap().unwrap();
    assert_eq!((r.last_connected, r.last_seen, r.last_disconnected), (Some(100), Some(150), Some(140)));
    // Statistics do not bump the generation (nothing for the watcher to do).
    assert_eq!(store.change_generation().unwrap(), 1);
}

#[test]
fn writer_group_commits_and_survives_reopen() {
    let t = tmp();
    let store = open(t.path());
    let (a, _) = hmac(&store, "alice", "one");
    let (b, _) = hmac(&store, "bob", "two");
    let writer = spawn_writer(store.clone());
    let other = writer.clone();
    for i in 0..2000u64 {
        assert!(writer.send(WriteOp::AgentSeen { agent_id: a.agent_id.clone(), at: 1000 + i }));
    }
    assert!(other.send(WriteOp::AgentConnected { agent_id: b.agent_id.clone(), at: 7 }));
    assert!(other.send(WriteOp::AgentSeen { agent_id: "ag_unknown".into(), at: 7 }));
    assert!(writer.flush());
    let stats = writer.writer_stats();
    assert_eq!(stats.ops, 2002);
    assert_eq!(stats.skipped, 1);
    assert!(stats.batches >= 2, "{stats:?}"); // at most 1025 ops per batch
    assert!(stats.batches < 2002, "{stats:?}"); // and grouped
    assert!(stats.last_batch_size > 0);
    assert_eq!(stats.commit_errors, 0);
    assert_eq!(store.get_agent(&a.agent_id).unwrap().unwrap().last_seen, Some(2999));

    // Shutdown commits what is still queued (no flush in between).
    assert!(other.send(WriteOp::AgentDisconnected { agent_id: b.agent_id.clone(), at: 9 }));
    writer.shutdown();
    assert!(!other.send(WriteOp::AgentSeen { agent_id: b.agent_id.clone(), at: 10 }));
    assert!(!other.flush());
    assert_eq!(other.writer_stats().dropped, 1);
    drop(other);
    drop(store);

    let store = Store::open(t.path(), 0).unwrap();
    let b = store.get_agent(&b.agent_id).unwrap().unwrap();
    assert_eq!((b.last_connected, b.last_seen, b.last_disconnected), (Some(7), Some(9), Some(9)));
}

#[test]
fn writer_never_undoes_a_revocation() {
    let t = tmp();
    let store = open(t.path());
    let (a, _) = hmac(&store, "alice", "one");
    let writer = spawn_writer(store.clone());
    writer.send(WriteOp::AgentConnected { agent_id: a.agent_id.clone(), at: 1 });
    assert!(writer.flush());
    store.revoke_agent(&a.agent_id).unwrap();
    writer.send(WriteOp::AgentDisconnected { agent_id: a.agent_id.clone(), at: 2 });
    writer.shutdown();
    let r = store.get_agent(&a.agent_id).unwrap().unwrap();
    assert!(r.revoked);
    assert_eq!(r.last_disconnected, Some(2));
}

#[test]
fn writer_exits_when_all_handles_drop() {
    let t = tmp();
    let store = open(t.path());
    let (a, _) = hmac(&store, "alice", "one");
    let writer = spawn_writer(store.clone());
    writer.send(WriteOp::AgentSeen { agent_id: a.agent_id.clone(), at: 42 });
    let join = writer.take_join_for_test().unwrap();
    drop(writer);
    join.join().unwrap();
    assert_eq!(store.get_agent(&a.agent_id).unwrap().unwrap().last_seen, Some(42));
}

#[test]
fn revocation_watcher_reports_new_revocations_once() {
    let t = tmp();
    let store = open(t.path());
    let (old, _) = hmac(&store, "alice", "old");
    let (a, _) = hmac(&store, "alice", "a");
    let (b, _) = hmac(&store, "bob", "b");
    store.revoke_agent(&old.agent_id).unwrap();

    let (tx, rx) = mpsc::channel::<String>();
    let stop = Arc::new(AtomicBool::new(false));
    let tx = Mutex::new(tx);
    let watcher = spawn_revocation_watcher(
        store.clone(),
        Duration::from_millis(20),
        move |rec| {
            assert!(rec.revoked);
            tx.lock().unwrap().send(rec.agent_id.clone()).unwrap();
        },
        stop.clone(),
    );
    std::thread::sleep(Duration::from_millis(60));
    let t0 = Instant::now();
    store.revoke_agent(&a.agent_id).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(2)).unwrap(), a.agent_id);
    assert!(t0.elapsed() < Duration::from_secs(2));
    // An unrelated change does not report anything again.
    hmac(&store, "carol", "c");
    store.revoke_agent(&b.agent_id).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(2)).unwrap(), b.agent_id);
    hmac(&store, "carol", "d");
    assert!(rx.recv_timeout(Duration::from_millis(150)).is_err(), "reported twice, or `old` reported");
    stop.store(true, Ordering::Release);
    watcher.join().unwrap();
}

#[test]
fn revocation_watcher_survives_a_panicking_callback() {
    let t = tmp();
    let store = open(t.path());
    let (a, _) = hmac(&store, "alice", "a");
    let (b, _) = hmac(&store, "alice", "b");
    let (tx, rx) = mpsc::channel::<String>();
    let tx = Mutex::new(tx);
    let stop = Arc::new(AtomicBool::new(false));
    let first = a.agent_id.clone();
    let watcher = spawn_revocation_watcher(
        store.clone(),
        Duration::from_millis(10),
        move |rec| {
            tx.lock().unwrap().send(rec.agent_id.clone()).unwrap();
            assert_ne!(rec.agent_id, first, "deliberate panic");
        },
        stop.clone(),
    );
    std::thread::sleep(Duration::from_millis(40));
    store.revoke_agent(&a.agent_id).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(2)).unwrap(), a.agent_id);
    store.revoke_agent(&b.agent_id).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(2)).unwrap(), b.agent_id);
    stop.store(true, Ordering::Release);
    watcher.join().unwrap();
}

#[test]
fn data_dir_lock_is_exclusive() {
    let t = tmp();
    let dir = t.path().join("data");
    let lock = DataDirLock::acquire(&dir).unwrap();
    assert_eq!(lock.path(), dir.join(LOCK_FILE));
    let err = DataDirLock::acquire(&dir).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }));
    assert!(err.to_string().contains("another switchboard serve is running on this data dir"));
    // The store itself still opens (the CLI never takes the lock).
    open(&dir);
    drop(lock);
    let again = DataDirLock::acquire(&dir).unwrap();
    let pid = std::fs::read_to_string(again.path()).unwrap();
    assert_eq!(pid.trim(), std::process::id().to_string());
}

#[test]
fn jwt_key_created_once_private() {
    let t = tmp();
    let dir = t.path().join("data");
    assert_eq!(read_jwt_key(&dir).unwrap(), None);
    let (key, path, created) = ensure_jwt_key(&dir).unwrap();
    assert!(created);
    assert_eq!(path, dir.join(JWT_KEY_FILE));
    assert_eq!(key.len(), 43);
    assert!(key.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_'));
    let raw = std::fs::read(&path).unwrap();
    assert_eq!(raw.last(), Some(&b'\n'));
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let (again, _, created) = ensure_jwt_key(&dir).unwrap();
    assert!(!created);
    assert_eq!(again, key);
    assert_eq!(read_jwt_key(&dir).unwrap(), Some(key));
    // No temporary files left behind.
    let names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names, vec![JWT_KEY_FILE.to_string()]);
}

#[test]
fn jwt_key_concurrent_creators_agree() {
    let t = tmp();
    let dir = t.path().to_path_buf();
    let keys: Vec<Vec<u8>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8).map(|_| s.spawn(|| ensure_jwt_key(&dir).unwrap().0)).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(keys.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn secret_files() {
    let t = tmp();
    let p = t.path().join("secret");
    std::fs::write(&p, b"  \n hunter2 with space \t\r\n").unwrap();
    assert_eq!(read_secret_file(&p).unwrap(), b"hunter2 with space");
    std::fs::write(&p, b" \n\t ").unwrap();
    let err = read_secret_file(&p).unwrap_err();
    assert!(matches!(err, StoreError::EmptySecret { .. }));
    let missing = read_secret_file(&t.path().join("nope")).unwrap_err();
    assert!(missing.to_string().contains("nope"));
    std::fs::write(t.path().join(JWT_KEY_FILE), b"\n").unwrap();
    assert!(matches!(read_jwt_key(t.path()), Err(StoreError::EmptySecret { .. })));
}

#[test]
fn newer_schema_is_refused() {
    let t = tmp();
    {
        let store = open(t.path());
        let mut wtxn = store.inner.env.write_txn().unwrap();
        store.inner.meta.put(&mut wtxn, META_SCHEMA, &99u64.to_be_bytes()).unwrap();
        wtxn.commit().unwrap();
    }
    let err = Store::open(t.path(), 0).unwrap_err();
    assert!(matches!(err, StoreError::NewerSchema { found: 99, .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Connection records.

fn conn(id: &str, user: &str, role: Role, agent: Option<&str>, opened: u64) -> ConnectionRecord {
    ConnectionRecord::new(id, user, role, agent.map(str::to_owned), "10.0.0.1:4242", opened)
}

fn opened(rec: &ConnectionRecord) -> WriteOp {
    WriteOp::ConnectionOpened(Box::new(rec.clone()))
}

fn closed(id: &str, opened: u64, at: u64, frames: u64, code: Option<u16>) -> WriteOp {
    WriteOp::ConnectionClosed {
        conn_id: id.into(),
        opened,
        last_seen: at - 1,
        closed: at,
        frames_in: frames,
        frames_out: frames * 2,
        bytes_in: frames * 100,
        bytes_out: frames * 200,
        close_code: code,
    }
}

fn ids_of(recs: &[ConnectionRecord]) -> Vec<&str> {
    recs.iter().map(|r| r.conn_id.as_str()).collect()
}

fn all(store: &Store) -> Vec<ConnectionRecord> {
    store.list_connections(&ConnectionFilter::default()).unwrap()
}

#[test]
fn connection_records_open_seen_close() {
    let t = tmp();
    let store = open(t.path());
    let (a, _) = hmac(&store, "alice", "one");
    let ag = a.agent_id.as_str();
    let c1 = conn("s_client1", "alice", Role::Client, Some(ag), 100);
    let c2 = conn("c_agent1", "alice", Role::Agent, Some(ag), 101);
    let long_remote = conn("c_x1", "alice", Role::Client, None, 1);
    let long_remote = ConnectionRecord { remote: "x".repeat(MAX_REMOTE_BYTES + 1), ..long_remote };
    let ops = [
        opened(&c1),
        WriteOp::AgentConnected { agent_id: ag.into(), at: 101 },
        opened(&c2),
        // Open and close in one batch: the close sees the row written just before.
        closed("s_client1", 100, 110, 3, Some(1000)),
        WriteOp::ConnectionSeen {
            conn_id: "c_agent1".into(),
            opened: 101,
            at: 150,
            frames_in: 5,
            frames_out: 6,
            bytes_in: 7,
            bytes_out: 8,
        },
        closed("c_nope", 100, 5, 1, None),
        // The right id with the wrong open time names no record.
        closed("c_agent1", 100, 5, 1, None),
        closed("bad id", 100, 5, 1, None),
        opened(&c1),
        opened(&conn("bad id", "alice", Role::Client, None, 1)),
        opened(&conn("c_ok", "", Role::Client, None, 1)),
        opened(&conn("c_ok", &"u".repeat(129), Role::Client, None, 1)),
        opened(&conn("c_ok", "alice", Role::Agent, Some("ag bad"), 1)),
        opened(&long_remote),
    ];
    let out = store.apply_batch(&ops).unwrap();
    assert_eq!(out, BatchOutcome { applied: 5, skipped: 9 });
    let got1 = store.get_connection("s_client1", 100).unwrap().unwrap();
    let want1 = ConnectionRecord {
        last_seen: 109,
        closed: Some(110),
        frames_in: 3,
        frames_out: 6,
        bytes_in: 300,
        bytes_out: 600,
        close_code: Some(1000),
        ..c1.clone()
    };
    assert_eq!(got1, want1);
    let want2 =
        ConnectionRecord { last_seen: 150, frames_in: 5, frames_out: 6, bytes_in: 7, bytes_out: 8, ..c2 };
    assert_eq!(store.get_connection("c_agent1", 101).unwrap().unwrap(), want2);
    assert_eq!(store.get_agent(ag).unwrap().unwrap().last_connected, Some(101));
    assert_eq!(store.get_connection("c_agent1", 100).unwrap(), None);
    assert_eq!(store.get_connection("c_nope", 100).unwrap(), None);
    assert_eq!(store.get_connection("not an id", 100).unwrap(), None);
    assert_eq!(store.connection_count().unwrap(), 2);

    // A late `ConnectionSeen` does not reopen a closed record; a close without a code stays None.
    let late = WriteOp::ConnectionSeen {
        conn_id: "s_client1".into(),
        opened: 100,
        at: 999,
        frames_in: 0,
        frames_out: 0,
        bytes_in: 0,
        bytes_out: 0,
    };
    let out = store.apply_batch(&[late, closed("c_agent1", 101, 200, 9, None)]).unwrap();
    assert_eq!(out, BatchOutcome { applied: 2, skipped: 0 });
    assert_eq!(store.get_connection("s_client1", 100).unwrap().unwrap(), want1);
    let r2 = store.get_connection("c_agent1", 101).unwrap().unwrap();
    assert_eq!((r2.closed, r2.close_code, r2.last_seen, r2.frames_in), (Some(200), None, 199, 9));
    // The same id opened again later (a resumed session) is a second record.
    store.apply_batch(&[opened(&conn("s_client1", "alice", Role::Client, Some(ag), 300))]).unwrap();
    assert_eq!(ids_of(&all(&store)), ["s_client1", "c_agent1", "s_client1"]);
    // Connection ops do not touch the agents' change generation.
    assert_eq!(store.change_generation().unwrap(), 1);
    // The ops know what they are about.
    assert_eq!(opened(&c1).conn_id(), Some("s_client1"));
    assert_eq!(opened(&c1).agent_id(), None);
    assert_eq!(WriteOp::AgentSeen { agent_id: "ag_1".into(), at: 1 }.conn_id(), None);
}

#[test]
fn connection_listing_newest_first_with_filters() {
    let t = tmp();
    let store = open(t.path());
    let batches: [&[ConnectionRecord]; 3] = [
        &[
            conn("c_a1", "alice", Role::Agent, Some("ag_1"), 100),
            conn("s_a2", "alice", Role::Client, Some("ag_1"), 100),
        ],
        &[
            conn("s_a3", "alice", Role::Client, None, 101),
            // Opened earlier than what is already stored: sorts by its open time.
            conn("c_b1", "bob", Role::Agent, Some("ag_2"), 99),
            conn("s_x1", "alicex", Role::Client, Some("ag_1"), 100),
        ],
        &[
            conn("s_a4", "alice", Role::Client, Some("ag_2"), 100),
            conn("s_z", "a\0b", Role::Client, None, 98),
        ],
    ];
    for batch in batches {
        let ops: Vec<WriteOp> = batch.iter().map(opened).collect();
        store.apply_batch(&ops).unwrap();
    }
    let list = |user: Option<&str>, agent: Option<&str>, limit: Option<usize>| {
        let f = ConnectionFilter { user: user.map(Into::into), agent: agent.map(Into::into), limit };
        let recs = store.list_connections(&f).unwrap();
        ids_of(&recs).into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    // Newest open time first; within one second, by conn_id (descending).
    assert_eq!(list(None, None, None), ["s_a3", "s_x1", "s_a4", "s_a2", "c_a1", "c_b1", "s_z"]);
    assert_eq!(list(None, None, Some(2)), ["s_a3", "s_x1"]);
    assert_eq!(list(None, None, Some(0)), Vec::<String>::new());
    assert_eq!(list(Some("alice"), None, None), ["s_a3", "s_a4", "s_a2", "c_a1"]);
    assert_eq!(list(Some("alice"), None, Some(3)), ["s_a3", "s_a4", "s_a2"]);
    assert_eq!(list(Some("alicex"), None, None), ["s_x1"]);
    assert_eq!(list(Some("a\0b"), None, None), ["s_z"]);
    assert_eq!(list(Some("a"), None, None), Vec::<String>::new());
    assert_eq!(list(Some(""), None, None), Vec::<String>::new());
    assert_eq!(list(Some("carol"), None, None), Vec::<String>::new());
    // An agent's own connections and the sessions bound to it.
    assert_eq!(list(None, Some("ag_1"), None), ["s_x1", "s_a2", "c_a1"]);
    assert_eq!(list(None, Some("ag_2"), None), ["s_a4", "c_b1"]);
    assert_eq!(list(Some("alice"), Some("ag_1"), None), ["s_a2", "c_a1"]);
    assert_eq!(list(Some("alice"), Some("ag_1"), Some(1)), ["s_a2"]);
    assert_eq!(list(Some("bob"), Some("ag_1"), None), Vec::<String>::new());
    assert_eq!(list(None, Some("ag_nope"), None), Vec::<String>::new());
    // A user whose JSON needs escapes is still matched by the quick pre-check.
    store.apply_batch(&[opened(&conn("s_q", "quo\"te\\é", Role::Client, None, 97))]).unwrap();
    assert_eq!(list(Some("quo\"te\\é"), None, None), ["s_q"]);
    // Listing while a read transaction is open elsewhere on this thread (the CLI never blocks).
    let _held = store.read_txn().unwrap();
    assert_eq!(all(&store).len(), 8);
}

#[test]
fn retention_by_count_deletes_oldest() {
    let t = tmp();
    let store = open(t.path());
    let recs: Vec<ConnectionRecord> = (0..50u64)
        .map(|i| conn(&format!("c_{i}"), &format!("user{}", i % 4), Role::Agent, Some("ag_1"), 1000 + i))
        .collect();
    store.apply_batch(&recs.iter().map(opened).collect::<Vec<_>>()).unwrap();

    let policy = RetentionPolicy { max_records: 20, ..RetentionPolicy::default() };
    let now = 2000;
    // Bounded work per pass: 7 at most, oldest first.
    let out = store.prune_connections(&policy, now, 7).unwrap();
    assert_eq!(out, PruneOutcome { deleted: 7, more: true });
    assert_eq!(store.connection_count().unwrap(), 43);
    assert_eq!(all(&store).last().unwrap().conn_id, "c_7");
    let mut passes = 1;
    while store.prune_connections(&policy, now, 7).unwrap().more {
        passes += 1;
    }
    assert_eq!(passes, 4); // 7 + 7 + 7 + 9 (the last pass is not "more")
    assert_eq!(store.prune_connections(&policy, now, 7).unwrap(), PruneOutcome::default());
    let left = all(&store);
    assert_eq!(ids_of(&left), (30..50).rev().map(|i| format!("c_{i}")).collect::<Vec<_>>());
    assert_eq!(store.get_connection("c_29", 1029).unwrap(), None);
    for user in ["user0", "user1", "user2", "user3"] {
        let f = ConnectionFilter { user: Some(user.into()), ..Default::default() };
        assert_eq!(store.list_connections(&f).unwrap().len(), 5, "{user}");
    }
    // A close for a pruned connection is skipped; for a kept one, applied.
    let out = store
        .apply_batch(&[closed("c_3", 1003, 3000, 1, None), closed("c_40", 1040, 3000, 1, None)])
        .unwrap();
    assert_eq!(out, BatchOutcome { applied: 1, skipped: 1 });
    store.apply_batch(&[opened(&conn("c_new", "user0", Role::Client, None, 1049))]).unwrap();
    assert_eq!(all(&store)[0].conn_id, "c_new");
}

#[test]
fn retention_by_age() {
    let t = tmp();
    let store = open(t.path());
    let now = 100 * 86_400;
    let day = 86_400;
    let recs = [
        conn("c_old40", "u", Role::Client, None, now - 40 * day),
        conn("c_old31", "u", Role::Agent, Some("ag_1"), now - 31 * day),
        conn("c_edge", "u", Role::Client, None, now - 30 * day),
        conn("c_new", "u", Role::Client, None, now - 3600),
    ];
    store.apply_batch(&recs.iter().map(opened).collect::<Vec<_>>()).unwrap();
    let policy = RetentionPolicy::new(1000, 30);
    assert_eq!(policy.max_age_secs, 30 * day);
    assert_eq!(store.prune_connections(&policy, now, 100).unwrap(), PruneOutcome { deleted: 2, more: false });
    assert_eq!(ids_of(&all(&store)), ["c_new", "c_edge"]);
    // A day later the edge one goes too; count and age apply together.
    assert_eq!(store.prune_connections(&policy, now + day, 100).unwrap().deleted, 1);
    let tight = RetentionPolicy::new(0, 30);
    assert_eq!(store.prune_connections(&tight, now, 100).unwrap().deleted, 1);
    assert_eq!(store.connection_count().unwrap(), 0);
}

#[test]
fn writer_enforces_retention_and_commits_connection_ops() {
    let t = tmp();
    let store = open(t.path());
    let policy = RetentionPolicy {
        max_records: 10,
        max_age_secs: u64::MAX,
        check_interval: Duration::from_millis(20),
        history_ttl_secs: 0,
        mailbox_ttl_secs: 0,
    };
    let writer = spawn_writer_with(store.clone(), policy);
    let now = unix_now();
    for i in 0..100u64 {
        assert!(writer.send(opened(&conn(&format!("c_{i}"), "u", Role::Client, None, now + i))));
    }
    assert!(writer.send(closed("c_99", now + 99, now + 200, 4, Some(1001))));
    assert!(writer.flush());
    let t0 = Instant::now();
    while store.connection_count().unwrap() > 10 {
        assert!(t0.elapsed() < Duration::from_secs(5), "retention did not run: {:?}", writer.writer_stats());
        std::thread::sleep(Duration::from_millis(10));
    }
    let stats = writer.writer_stats();
    assert_eq!((stats.ops, stats.skipped, stats.pruned, stats.prune_errors), (101, 0, 90, 0));
    let left = all(&store);
    assert_eq!(ids_of(&left), (90..100).rev().map(|i| format!("c_{i}")).collect::<Vec<_>>());
    assert_eq!(left[0].close_code, Some(1001));
    writer.shutdown();
}

#[test]
fn flush_reports_a_failed_commit() {
    let t = tmp();
    // A 1 MiB map, half filled: a second batch of big records cannot fit.
    let store = Store::open(t.path(), 1).unwrap();
    let user = "u".repeat(MAX_USER_BYTES);
    let big = |i: u64| ConnectionRecord {
        remote: "r".repeat(MAX_REMOTE_BYTES),
        ..conn(&format!("c_{i:0>60}"), &user, Role::Client, Some(&"a".repeat(64)), unix_now())
    };
    store.apply_batch(&(0..WRITER_BATCH_MAX as u64).map(|i| opened(&big(i))).collect::<Vec<_>>()).unwrap();
    let writer = spawn_writer(store.clone());
    for i in 0..WRITER_BATCH_MAX as u64 {
        assert!(writer.send(opened(&big(i + 10_000))));
    }
    assert!(!writer.flush());
    let stats = writer.writer_stats();
    assert!(stats.commit_errors >= 1 && stats.lost_ops >= 1, "{stats:?}");
    assert_eq!(stats.ops + stats.lost_ops, WRITER_BATCH_MAX as u64);
    // The writer keeps going: a small batch commits, and flush says so.
    let small = conn("c_small", "u", Role::Client, None, unix_now());
    assert!(writer.send(opened(&small)));
    assert!(writer.flush());
    assert!(store.get_connection("c_small", small.opened).unwrap().is_some());
    writer.shutdown();
}

/// Runs only when re-executed by `cli_in_another_process_while_daemon_runs`: plays the CLI.
#[test]
#[ignore = "helper for a multi-process test"]
fn child_process_helper() {
    let Ok(dir) = std::env::var("SB_TEST_CHILD_DIR") else { return };
    let store = Store::open(Path::new(&dir), 0).unwrap();
    println!("MAPSIZE={}", store.inner.env.info().map_size);
    let revoke = std::env::var("SB_TEST_CHILD_REVOKE").unwrap();
    assert_eq!(store.revoke_agent(&revoke).unwrap(), RevokeOutcome::Revoked);
    let (rec, _) = hmac(&store, "alice", "from-child");
    println!("CREATED={}", rec.agent_id);
}

#[test]
fn cli_in_another_process_while_daemon_runs() {
    let t = tmp();
    let store = Store::open(t.path(), 48).unwrap();
    let _lock = DataDirLock::acquire(t.path()).unwrap();
    let (a, _) = hmac(&store, "alice", "a");
    let writer = spawn_writer(store.clone());
    writer.send(WriteOp::AgentConnected { agent_id: a.agent_id.clone(), at: 1 });
    let (tx, rx) = mpsc::channel::<String>();
    let tx = Mutex::new(tx);
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = spawn_revocation_watcher(
        store.clone(),
        Duration::from_millis(50),
        move |rec| tx.lock().unwrap().send(rec.agent_id.clone()).unwrap(),
        stop.clone(),
    );
    std::thread::sleep(Duration::from_millis(100));

    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "store::tests::child_process_helper",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SB_TEST_CHILD_DIR", t.path())
        .env("SB_TEST_CHILD_REVOKE", &a.agent_id)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let returned = Instant::now();
    // The child adopted the daemon's map size.
    assert!(stdout.contains(&format!("MAPSIZE={}", 48 * 1024 * 1024)), "{stdout}");
    assert_eq!(rx.recv_timeout(Duration::from_secs(2)).unwrap(), a.agent_id);
    assert!(returned.elapsed() < Duration::from_secs(2));
    let created = stdout.lines().find_map(|l| l.strip_prefix("CREATED=")).expect("child printed the id");
    assert_eq!(store.get_agent(created).unwrap().unwrap().name, "from-child");
    // The daemon's statistics writer keeps working after the other process's commits.
    writer.send(WriteOp::AgentDisconnected { agent_id: a.agent_id.clone(), at: 2 });
    assert!(writer.flush());
    let r = store.get_agent(&a.agent_id).unwrap().unwrap();
    assert!(r.revoked);
    assert_eq!((r.last_connected, r.last_disconnected), (Some(1), Some(2)));
    stop.store(true, Ordering::Release);
    watcher.join().unwrap();
    writer.shutdown();
}

#[test]
fn handles_are_send_and_sync() {
    fn send_sync<T: Send + Sync + Clone + 'static>() {}
    send_sync::<Store>();
    send_sync::<WriterHandle>();
    send_sync::<AgentRecord>();
    send_sync::<ConnectionRecord>();
    send_sync::<WriteOp>();
    fn send<T: Send>() {}
    send::<DataDirLock>();
    send::<StoreError>();
}

#[test]
fn probe_fails_when_the_store_cannot_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1).unwrap();
    let writer = spawn_writer(store.clone());
    assert!(writer.probe(), "a fresh store commits");
    // Fill the 1 MiB map with agents until LMDB refuses more.
    let mut full = false;
    for i in 0..100_000 {
        if store
            .create_agent(&format!("user-{i:06}-{}", "x".repeat(100)), "n", NewCredential::Hmac, None)
            .is_err()
        {
            full = true;
            break;
        }
    }
    assert!(full, "the map never filled");
    // Records through the writer now fail to commit: the store is not ready.
    // Far more than the few pages the last refused agent may have left free.
    for i in 0..1024 {
        let rec = ConnectionRecord::new(
            format!("c_{i:016}"),
            "u".repeat(100),
            Role::Client,
            None,
            "127.0.0.1:1",
            1,
        );
        writer.send(WriteOp::ConnectionOpened(Box::new(rec)));
    }
    writer.flush();
    let failed = !writer.probe();
    assert!(failed, "a store that cannot commit must fail the probe");
    writer.shutdown();
}

// ---------------------------------------------------------------------------------------------
// Offline delivery: history, mailboxes, closed sessions, commit tickets.

fn skey(user: &str, agent: &str) -> Arc<StreamKey> {
    Arc::new(StreamKey::new(user, agent))
}

fn append(key: &Arc<StreamKey>, epoch: &str, seq: u64, at: u64, to: Option<&str>, frame: &[u8]) -> WriteOp {
    WriteOp::HistoryAppend {
        key: key.clone(),
        epoch: epoch.into(),
        seq,
        at,
        to: to.map(Into::into),
        frame: bytes::Bytes::copy_from_slice(frame),
        trim_below: 0,
    }
}

fn put(key: &Arc<StreamKey>, seq: u64, at: u64, from: &str, frame: &[u8]) -> WriteOp {
    WriteOp::MailboxPut {
        key: key.clone(),
        seq,
        at,
        from: from.into(),
        frame: bytes::Bytes::copy_from_slice(frame),
    }
}

fn mark(key: &Arc<StreamKey>, epoch: &str, clean: bool, through: u64) -> WriteOp {
    WriteOp::StreamMark { key: key.clone(), epoch: epoch.into(), clean, through }
}

fn closed_session(user: &str, session: &str, closed_at: u64) -> WriteOp {
    WriteOp::SessionClosed(Box::new(SessionClosed {
        user: user.into(),
        session: StoredSession {
            session: session.into(),
            closed_at,
            bound: Some("ag_1".into()),
            allow: None,
            marks: vec![StreamMark { agent: "ag_1".into(), epoch: "e_1".into(), seq: 3 }],
        },
    }))
}

fn seqs(stream: &StoredStream) -> Vec<u64> {
    stream.entries.iter().map(|e| e.seq).collect()
}

fn mail_seqs(mailbox: &StoredMailbox) -> Vec<u64> {
    mailbox.entries.iter().map(|e| e.seq).collect()
}

fn stream<'a>(user: &'a DurableUser, agent: &str) -> &'a StoredStream {
    user.streams.iter().find(|s| s.agent == agent).unwrap_or_else(|| panic!("no stream {agent}"))
}

#[test]
fn history_round_trips_byte_exact() {
    let t = tmp();
    let store = open(t.path());
    let k1 = skey("alice", "ag_1");
    let k2 = skey("alice", "ag_2");
    // Every byte value, an empty frame, and a big one (an LMDB overflow page).
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let ops = [
        append(&k1, "e_1", 1, 100, None, &all_bytes),
        append(&k2, "e_2", 1, 101, Some("s_abc"), b"\x81\x02hi"),
        append(&k1, "e_1", 2, 102, Some("s_xyz"), b""),
        append(&k1, "e_1", 3, 103, None, &big),
    ];
    assert_eq!(store.apply_batch(&ops).unwrap(), BatchOutcome { applied: 4, skipped: 0 });
    let got = store.load_user("alice").unwrap();
    assert_eq!(got.streams.iter().map(|s| s.agent.as_str()).collect::<Vec<_>>(), ["ag_1", "ag_2"]);
    let s1 = stream(&got, "ag_1");
    assert_eq!((s1.epoch.as_str(), s1.last_seq, s1.clean), ("e_1", 3, false));
    assert_eq!(seqs(s1), [1, 2, 3]);
    assert_eq!(&s1.entries[0].frame[..], &all_bytes[..]);
    assert_eq!((s1.entries[0].at, s1.entries[0].to.as_deref()), (100, None));
    assert_eq!(
        (s1.entries[1].at, s1.entries[1].to.as_deref(), &s1.entries[1].frame[..]),
        (102, Some("s_xyz"), &b""[..])
    );
    assert_eq!(&s1.entries[2].frame[..], &big[..]);
    let s2 = stream(&got, "ag_2");
    assert_eq!((s2.epoch.as_str(), s2.last_seq), ("e_2", 1));
    assert_eq!((s2.entries[0].to.as_deref(), &s2.entries[0].frame[..]), (Some("s_abc"), &b"\x81\x02hi"[..]));
    assert!(got.mailboxes.is_empty() && got.closed.is_empty());
    // Survives a reopen.
    drop(store);
    let store = Store::open(t.path(), 0).unwrap();
    let again = store.load_user("alice").unwrap();
    assert_eq!(seqs(stream(&again, "ag_1")), [1, 2, 3]);
    assert_eq!(&stream(&again, "ag_1").entries[2].frame[..], &big[..]);
    // Durable ops touch neither the agents' generation nor the connection records.
    assert_eq!(store.change_generation().unwrap(), 0);
    assert_eq!(store.connection_count().unwrap(), 0);
}

#[test]
fn epoch_change_wipes_and_trims() {
    let t = tmp();
    let store = open(t.path());
    let k = skey("alice", "ag_1");
    let mut ops: Vec<WriteOp> = (1..=5).map(|s| append(&k, "e_1", s, 100 + s, None, b"old")).collect();
    // In the same batch: a later append trims below 3.
    ops.push(WriteOp::HistoryAppend {
        key: k.clone(),
        epoch: "e_1".into(),
        seq: 6,
        at: 106,
        to: None,
        frame: bytes::Bytes::from_static(b"six"),
        trim_below: 3,
    });
    store.apply_batch(&ops).unwrap();
    let got = store.load_user("alice").unwrap();
    assert_eq!(seqs(stream(&got, "ag_1")), [3, 4, 5, 6]);
    assert_eq!(stream(&got, "ag_1").last_seq, 6);

    // HistoryTrim applies only with the current epoch.
    let trim = |epoch: &str, below| WriteOp::HistoryTrim { key: k.clone(), epoch: epoch.into(), below };
    assert_eq!(store.apply_batch(&[trim("e_other", 100)]).unwrap(), BatchOutcome { applied: 0, skipped: 1 });
    assert_eq!(store.apply_batch(&[trim("e_1", 5)]).unwrap(), BatchOutcome { applied: 1, skipped: 0 });
    assert_eq!(seqs(stream(&store.load_user("alice").unwrap(), "ag_1")), [5, 6]);

    // A new epoch deletes the old history and restarts the meta (dirty).
    store.apply_batch(&[mark(&k, "e_1", true, 6)]).unwrap();
    assert!(stream(&store.load_user("alice").unwrap(), "ag_1").clean);
    store.apply_batch(&[append(&k, "e_2", 1, 200, None, b"new")]).unwrap();
    let got = store.load_user("alice").unwrap();
    let s = stream(&got, "ag_1");
    assert_eq!((s.epoch.as_str(), s.last_seq, s.clean, seqs(s)), ("e_2", 1, false, vec![1]));
    assert_eq!(&s.entries[0].frame[..], b"new");
    // Old and new epoch within one batch: only the last epoch's entries survive.
    store
        .apply_batch(&[
            append(&k, "e_2", 2, 201, None, b"x"),
            append(&k, "e_3", 1, 202, None, b"y"),
            append(&k, "e_3", 2, 203, None, b"z"),
        ])
        .unwrap();
    let got = store.load_user("alice").unwrap();
    let s = stream(&got, "ag_1");
    assert_eq!((s.epoch.as_str(), s.last_seq, seqs(s)), ("e_3", 2, vec![1, 2]));
    // A trim is a meta-less no-op for a stream that does not exist.
    let nobody = WriteOp::HistoryTrim { key: skey("bob", "ag_1"), epoch: "e_1".into(), below: 5 };
    assert_eq!(store.apply_batch(&[nobody]).unwrap(), BatchOutcome { applied: 0, skipped: 1 });
}

#[test]
fn stream_marks() {
    let t = tmp();
    let store = open(t.path());
    let k = skey("alice", "ag_1");
    let clean = |store: &Store| stream(&store.load_user("alice").unwrap(), "ag_1").clean;
    // Nothing to mark yet.
    let out = store.apply_batch(&[mark(&k, "e_1", false, 0), mark(&k, "e_1", true, 0)]).unwrap();
    assert_eq!(out, BatchOutcome { applied: 0, skipped: 2 });
    assert!(store.load_user("alice").unwrap().streams.is_empty());

    store.apply_batch(&(1..=5).map(|s| append(&k, "e_1", s, s, None, b"m")).collect::<Vec<_>>()).unwrap();
    assert!(!clean(&store));
    // Clean only when the stream's last seq is the one given.
    assert_eq!(store.apply_batch(&[mark(&k, "e_1", true, 4)]).unwrap().applied, 1);
    assert!(!clean(&store));
    store.apply_batch(&[mark(&k, "e_1", true, 5)]).unwrap();
    assert!(clean(&store));
    // Another epoch: skipped, stays clean.
    assert_eq!(
        store.apply_batch(&[mark(&k, "e_9", true, 5)]).unwrap(),
        BatchOutcome { applied: 0, skipped: 1 }
    );
    assert!(clean(&store));
    // Dirty always (whatever the epoch), then clean again; the last op of a batch wins.
    store.apply_batch(&[mark(&k, "e_9", false, 0)]).unwrap();
    assert!(!clean(&store));
    store
        .apply_batch(&[mark(&k, "e_1", true, 5), mark(&k, "e_1", false, 0), mark(&k, "e_1", true, 5)])
        .unwrap();
    assert!(clean(&store));
    // An append keeps the flag (the lease protocol marks dirty first) and raises last_seq.
    store.apply_batch(&[append(&k, "e_1", 6, 6, None, b"m")]).unwrap();
    let got = store.load_user("alice").unwrap();
    assert_eq!((stream(&got, "ag_1").clean, stream(&got, "ag_1").last_seq), (true, 6));
}

#[test]
fn mailbox_put_drop_load() {
    let t = tmp();
    let store = open(t.path());
    let k = skey("alice", "ag_1");
    let other = skey("alice", "ag_2");
    // Nothing to drop yet.
    let drop_op = |key: &Arc<StreamKey>, through| WriteOp::MailboxDrop { key: key.clone(), through };
    assert_eq!(store.apply_batch(&[drop_op(&k, 3)]).unwrap(), BatchOutcome { applied: 0, skipped: 1 });
    let mut ops: Vec<WriteOp> = (1..=4).map(|s| put(&k, s, 1000 + s, "s_from", &[s as u8, 0, 255])).collect();
    ops.push(put(&other, 1, 5, "s_x", b"other"));
    ops.push(drop_op(&k, 2));
    assert_eq!(store.apply_batch(&ops).unwrap(), BatchOutcome { applied: 6, skipped: 0 });
    let got = store.load_user("alice").unwrap();
    assert_eq!(got.mailboxes.iter().map(|m| m.agent.as_str()).collect::<Vec<_>>(), ["ag_1", "ag_2"]);
    let m = &got.mailboxes[0];
    assert_eq!((m.last_seq, m.acked, mail_seqs(m)), (4, 2, vec![3, 4]));
    assert_eq!(
        (m.entries[0].at, m.entries[0].from.as_str(), &m.entries[0].frame[..]),
        (1003, "s_from", &[3, 0, 255][..])
    );
    assert_eq!(mail_seqs(&got.mailboxes[1]), [1]);
    assert!(got.streams.is_empty());

    // A confirmation beyond what is stored confirms what is stored, not future seqs.
    store.apply_batch(&[drop_op(&k, u64::MAX)]).unwrap();
    let got = store.load_user("alice").unwrap();
    assert_eq!(
        (got.mailboxes[0].last_seq, got.mailboxes[0].acked, mail_seqs(&got.mailboxes[0])),
        (4, 4, vec![])
    );
    // A confirmed seq is not stored again; the next one is, and loads.
    let out =
        store.apply_batch(&[put(&k, 3, 1, "s_from", b"stale"), put(&k, 5, 2000, "s_from", b"five")]).unwrap();
    assert_eq!(out, BatchOutcome { applied: 1, skipped: 1 });
    // An older confirmation does not lower acked.
    store.apply_batch(&[drop_op(&k, 1)]).unwrap();
    let got = store.load_user("alice").unwrap();
    let m = &got.mailboxes[0];
    assert_eq!((m.last_seq, m.acked, mail_seqs(m)), (5, 4, vec![5]));
    assert_eq!(&m.entries[0].frame[..], b"five");
    // Entries at or below acked are never returned, even if some were left on disk.
    let mut wtxn = store.inner.env.write_txn().unwrap();
    let mut key = b"alice\0ag_1\0".to_vec();
    key.extend_from_slice(&2u64.to_be_bytes());
    store.inner.mailbox.put(&mut wtxn, &key, b"\x01\0\0\0\0\0\0\0\x01\x03s_zleftover").unwrap();
    wtxn.commit().unwrap();
    assert_eq!(mail_seqs(&store.load_user("alice").unwrap().mailboxes[0]), [5]);
}

#[test]
fn closed_sessions_round_trip_and_forget() {
    let t = tmp();
    let store = open(t.path());
    let full = StoredSession {
        session: "s_one".into(),
        closed_at: 1234,
        bound: None,
        allow: Some(vec!["ag_1".into(), "ag_2".into()]),
        marks: vec![
            StreamMark { agent: "ag_1".into(), epoch: "e_a".into(), seq: 9 },
            StreamMark { agent: "ag_2".into(), epoch: "e_b".into(), seq: u64::MAX },
        ],
    };
    let ops = [
        WriteOp::SessionClosed(Box::new(SessionClosed { user: "alice".into(), session: full.clone() })),
        closed_session("alice", "s_two", 5),
        closed_session("alice", "s_two", 6), // overwrites
        closed_session("bob", "s_bob", 7),
    ];
    assert_eq!(store.apply_batch(&ops).unwrap(), BatchOutcome { applied: 4, skipped: 0 });
    let got = store.load_user("alice").unwrap();
    assert_eq!(got.closed.len(), 2);
    assert_eq!(got.closed[0], full);
    assert_eq!((got.closed[1].session.as_str(), got.closed[1].closed_at), ("s_two", 6));
    assert_eq!(got.closed[1].bound.as_deref(), Some("ag_1"));
    assert_eq!(got.closed[1].marks, [StreamMark { agent: "ag_1".into(), epoch: "e_1".into(), seq: 3 }]);

    let forget =
        |user: &str, session: &str| WriteOp::SessionForget { user: user.into(), session: session.into() };
    let out = store
        .apply_batch(&[forget("alice", "s_one"), forget("alice", "s_one"), forget("alice", "s_bob")])
        .unwrap();
    assert_eq!(out, BatchOutcome { applied: 1, skipped: 2 });
    let got = store.load_user("alice").unwrap();
    assert_eq!(got.closed.iter().map(|s| s.session.as_str()).collect::<Vec<_>>(), ["s_two"]);
    assert_eq!(store.load_user("bob").unwrap().closed.len(), 1);
}

#[test]
fn malformed_durable_ops_are_skipped() {
    let t = tmp();
    let store = open(t.path());
    let good = skey("alice", "ag_1");
    let long_user = "u".repeat(MAX_USER_BYTES + 1);
    let long_id = "a".repeat(ids::MAX_ID_LEN + 1);
    let bad_keys = [
        skey("", "ag_1"),
        skey(&long_user, "ag_1"),
        skey("a\0b", "ag_1"),
        skey("alice", ""),
        skey("alice", "bad id"),
        skey("alice", "ag/1"),
        skey("alice", &long_id),
    ];
    let mut ops = Vec::new();
    for k in &bad_keys {
        ops.push(append(k, "e_1", 1, 1, None, b"x"));
        ops.push(mark(k, "e_1", false, 0));
        ops.push(WriteOp::HistoryTrim { key: k.clone(), epoch: "e_1".into(), below: 1 });
        ops.push(put(k, 1, 1, "s_1", b"x"));
        ops.push(WriteOp::MailboxDrop { key: k.clone(), through: 1 });
    }
    for epoch in ["", "e 1", &long_id] {
        ops.push(append(&good, epoch, 1, 1, None, b"x"));
        ops.push(mark(&good, epoch, true, 1));
    }
    ops.push(append(&good, "e_1", 1, 1, Some("not a session"), b"x"));
    ops.push(append(&good, "e_1", 1, 1, Some(""), b"x"));
    ops.push(put(&good, 1, 1, "", b"x"));
    ops.push(put(&good, 1, 1, &long_id, b"x"));
    for (user, session) in
        [("", "s_1"), (long_user.as_str(), "s_1"), ("a\0b", "s_1"), ("alice", "s 1"), ("alice", "")]
    {
        ops.push(closed_session(user, session, 1));
        ops.push(WriteOp::SessionForget { user: user.into(), session: session.into() });
    }
    let n = ops.len();
    // Valid ops around them still apply: nothing errors.
    ops.insert(0, append(&good, "e_1", 1, 1, None, b"ok"));
    ops.push(put(&good, 1, 1, "s_1", b"ok"));
    assert_eq!(store.apply_batch(&ops).unwrap(), BatchOutcome { applied: 2, skipped: n });
    let got = store.load_user("alice").unwrap();
    assert_eq!((got.streams.len(), got.mailboxes.len(), got.closed.len()), (1, 1, 0));
    assert_eq!(seqs(&got.streams[0]), [1]);
    assert_eq!(&got.streams[0].entries[0].frame[..], b"ok");
    assert_eq!(mail_seqs(&got.mailboxes[0]), [1]);
    // Loads of invalid users are empty, not errors.
    for user in ["", long_user.as_str(), "a\0b"] {
        let u = store.load_user(user).unwrap();
        assert!(u.streams.is_empty() && u.mailboxes.is_empty() && u.closed.is_empty());
    }
    // Nothing was written for the bad keys.
    let txn = store.read_txn().unwrap();
    assert_eq!(store.inner.history.len(&txn).unwrap(), 1);
    assert_eq!(store.inner.mailbox.len(&txn).unwrap(), 1);
    assert_eq!(store.inner.streams.len(&txn).unwrap(), 1);
    assert_eq!(store.inner.mailboxes.len(&txn).unwrap(), 1);
    assert_eq!(store.inner.closed_sessions.len(&txn).unwrap(), 0);
    // The longest valid key parts fit LMDB's key limit.
    let longest = skey(&"é".repeat(MAX_USER_BYTES / 2), &"a".repeat(ids::MAX_ID_LEN));
    drop(txn);
    let out = store
        .apply_batch(&[
            append(&longest, &"e".repeat(64), u64::MAX, 1, Some(&"s".repeat(64)), b"x"),
            put(&longest, u64::MAX, 1, &"s".repeat(64), b"x"),
            closed_session(&longest.user, &"s".repeat(64), 1),
        ])
        .unwrap();
    assert_eq!(out, BatchOutcome { applied: 3, skipped: 0 });
    let got = store.load_user(&longest.user).unwrap();
    assert_eq!(
        (seqs(&got.streams[0]), mail_seqs(&got.mailboxes[0]), got.closed.len()),
        (vec![u64::MAX], vec![u64::MAX], 1)
    );
}

#[test]
fn users_and_agents_are_isolated() {
    let t = tmp();
    let store = open(t.path());
    let users = ["al", "alice", "al\u{1}", "al\u{1}ice", "b"];
    let mut ops = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let i = i as u64 + 1;
        // Agents that prefix each other, too.
        for agent in ["ag", "ag_x", "ag-"] {
            let k = skey(user, agent);
            ops.push(append(&k, "e_1", i, i, None, format!("{user}/{agent}").as_bytes()));
            ops.push(put(&k, i, i, "s_1", format!("{user}/{agent}").as_bytes()));
        }
        ops.push(closed_session(user, &format!("s_{i}"), i));
    }
    store.apply_batch(&ops).unwrap();
    for (i, user) in users.iter().enumerate() {
        let i = i as u64 + 1;
        let got = store.load_user(user).unwrap();
        let agents: Vec<&str> = got.streams.iter().map(|s| s.agent.as_str()).collect();
        assert_eq!(agents, ["ag", "ag-", "ag_x"], "{user:?}");
        for s in &got.streams {
            assert_eq!(seqs(s), [i], "{user:?}");
            assert_eq!(&s.entries[0].frame[..], format!("{user}/{}", s.agent).as_bytes());
        }
        for m in &got.mailboxes {
            assert_eq!(mail_seqs(m), [i], "{user:?}");
            assert_eq!(&m.entries[0].frame[..], format!("{user}/{}", m.agent).as_bytes());
        }
        assert_eq!(got.mailboxes.len(), 3);
        assert_eq!(got.closed.iter().map(|s| s.session.clone()).collect::<Vec<_>>(), [format!("s_{i}")]);
    }
    assert!(store.load_user("a").unwrap().streams.is_empty());
    assert!(store.load_user("alic").unwrap().closed.is_empty());
}

#[test]
fn unreadable_durable_records_are_skipped_on_load() {
    let t = tmp();
    let store = open(t.path());
    let k1 = skey("alice", "ag_1");
    let k2 = skey("alice", "ag_2");
    store
        .apply_batch(&[
            append(&k1, "e_1", 1, 1, None, b"one"),
            append(&k1, "e_1", 2, 2, None, b"two"),
            append(&k2, "e_2", 1, 1, None, b"x"),
            put(&k1, 1, 1, "s_1", b"m"),
            put(&k2, 1, 1, "s_1", b"m"),
            closed_session("alice", "s_good", 1),
            closed_session("alice", "s_bad", 1),
        ])
        .unwrap();
    let mut wtxn = store.inner.env.write_txn().unwrap();
    let mut entry = b"alice\0ag_1\0".to_vec();
    entry.extend_from_slice(&1u64.to_be_bytes());
    store.inner.history.put(&mut wtxn, &entry, b"\x07garbage").unwrap();
    store.inner.streams.put(&mut wtxn, b"alice\0ag_2", b"{\"v\":1,\"epoch\":").unwrap();
    store.inner.mailboxes.put(&mut wtxn, b"alice\0ag_2", b"nope").unwrap();
    store.inner.closed_sessions.put(&mut wtxn, b"alice\0s_bad", b"\x01short").unwrap();
    // An entry without a meta, and a key that is not ours.
    let mut orphan = b"alice\0ag_3\0".to_vec();
    orphan.extend_from_slice(&1u64.to_be_bytes());
    store.inner.history.put(&mut wtxn, &orphan, b"\x01\0\0\0\0\0\0\0\x01\0orphan").unwrap();
    store.inner.history.put(&mut wtxn, b"alice\0junk", b"x").unwrap();
    wtxn.commit().unwrap();
    let got = store.load_user("alice").unwrap();
    assert_eq!(got.streams.len(), 1);
    assert_eq!(seqs(stream(&got, "ag_1")), [2]);
    assert_eq!(got.mailboxes.iter().map(|m| m.agent.as_str()).collect::<Vec<_>>(), ["ag_1"]);
    assert_eq!(got.closed.iter().map(|s| s.session.as_str()).collect::<Vec<_>>(), ["s_good"]);
    // The writer replaces an unreadable meta rather than failing the batch.
    let out =
        store.apply_batch(&[append(&k2, "e_2", 2, 2, None, b"y"), put(&k2, 2, 2, "s_1", b"n")]).unwrap();
    assert_eq!(out, BatchOutcome { applied: 2, skipped: 0 });
    let got = store.load_user("alice").unwrap();
    assert_eq!(seqs(stream(&got, "ag_2")), [2]);
    assert_eq!(mail_seqs(&got.mailboxes[1]), [1, 2]);
}

#[test]
fn durable_retention_expires_old_entries_and_keeps_metas() {
    let t = tmp();
    let store = open(t.path());
    let now = 1_000_000;
    let k1 = skey("alice", "ag_1");
    let k2 = skey("alice", "ag_2");
    let kb = skey("bob", "ag_1");
    let mut ops = Vec::new();
    // ag_1: 3 old, then 2 young; ag_2: all old; bob: all young.
    for s in 1..=5 {
        ops.push(append(&k1, "e_1", s, if s <= 3 { now - 400 } else { now - 10 }, None, b"h"));
    }
    for s in 1..=4 {
        ops.push(append(&k2, "e_2", s, now - 1000 + s, None, b"h"));
        ops.push(append(&kb, "e_b", s, now - 5, None, b"h"));
    }
    // Mailboxes: ttl 3600.
    for s in 1..=3 {
        ops.push(put(&k1, s, if s == 1 { now - 4000 } else { now - 100 }, "s_1", b"m"));
        ops.push(put(&k2, s, now - 7200, "s_1", b"m"));
    }
    ops.push(closed_session("alice", "s_old", now - 301));
    ops.push(closed_session("alice", "s_edge", now - 300));
    ops.push(closed_session("bob", "s_new", now - 1));
    store.apply_batch(&ops).unwrap();
    // Keys not shaped like ours, with young stamps: left alone, no panic.
    let mut wtxn = store.inner.env.write_txn().unwrap();
    let young = [&[1u8][..], &(now - 1).to_be_bytes(), &[0]].concat();
    for key in [&b"zz\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"[..], b"\xff\xff", b"\0\0\0\0\0\0\0\0\0"] {
        store.inner.history.put(&mut wtxn, key, &young).unwrap();
        store.inner.mailbox.put(&mut wtxn, key, &young).unwrap();
    }
    wtxn.commit().unwrap();

    // TTLs of 0 keep everything (and `new` keeps them at 0).
    let keep = RetentionPolicy::new(1000, 30);
    assert_eq!((keep.history_ttl_secs, keep.mailbox_ttl_secs), (0, 0));
    assert_eq!(store.prune_durable(&keep, now, 100).unwrap(), DurablePruneOutcome::default());

    let policy = RetentionPolicy::new(1000, 30).with_durable(300, 3600);
    assert_eq!((policy.history_ttl_secs, policy.mailbox_ttl_secs, policy.max_records), (300, 3600, 1000));
    // Bounded: 5 per pass.
    let first = store.prune_durable(&policy, now, 5).unwrap();
    assert_eq!(first, DurablePruneOutcome { history: 5, mail: 0, sessions: 0, more: true });
    let second = store.prune_durable(&policy, now, 5).unwrap();
    assert_eq!(second, DurablePruneOutcome { history: 2, mail: 3, sessions: 0, more: true });
    let third = store.prune_durable(&policy, now, 5).unwrap();
    assert_eq!(third, DurablePruneOutcome { history: 0, mail: 1, sessions: 1, more: false });
    assert_eq!(store.prune_durable(&policy, now, 5).unwrap(), DurablePruneOutcome::default());

    let alice = store.load_user("alice").unwrap();
    assert_eq!(seqs(stream(&alice, "ag_1")), [4, 5]);
    // Metas stay: epoch and last seq survive an empty history.
    let s2 = stream(&alice, "ag_2");
    assert_eq!((s2.epoch.as_str(), s2.last_seq, seqs(s2)), ("e_2", 4, vec![]));
    assert_eq!(alice.mailboxes.len(), 2);
    assert_eq!((mail_seqs(&alice.mailboxes[0]), alice.mailboxes[0].acked), (vec![2, 3], 0));
    assert_eq!((mail_seqs(&alice.mailboxes[1]), alice.mailboxes[1].last_seq), (vec![], 3));
    assert_eq!(alice.closed.iter().map(|s| s.session.as_str()).collect::<Vec<_>>(), ["s_edge"]);
    let bob = store.load_user("bob").unwrap();
    assert_eq!((seqs(&bob.streams[0]), bob.closed.len()), (vec![1, 2, 3, 4], 1));
}

#[test]
fn writer_runs_durable_retention() {
    let t = tmp();
    let store = open(t.path());
    let now = unix_now();
    let k = skey("alice", "ag_1");
    store
        .apply_batch(&[
            append(&k, "e_1", 1, now - 1000, None, b"old"),
            append(&k, "e_1", 2, now, None, b"young"),
            put(&k, 1, now - 100_000, "s_1", b"old"),
            put(&k, 2, now, "s_1", b"young"),
            closed_session("alice", "s_old", now - 1000),
        ])
        .unwrap();
    let policy = RetentionPolicy { check_interval: Duration::from_millis(20), ..RetentionPolicy::default() }
        .with_durable(300, 86_400);
    let writer = spawn_writer_with(store.clone(), policy);
    let t0 = Instant::now();
    loop {
        let s = writer.writer_stats();
        if (s.expired_history, s.expired_mail, s.expired_sessions) == (1, 1, 1) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "retention did not run: {s:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let got = store.load_user("alice").unwrap();
    assert_eq!(
        (seqs(&got.streams[0]), mail_seqs(&got.mailboxes[0]), got.closed.len()),
        (vec![2], vec![2], 0)
    );
    assert_eq!(writer.writer_stats().prune_errors, 0);
    writer.shutdown();
}

/// A waker that counts its wakes.
struct CountingWaker(AtomicUsize);

impl std::task::Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn counting_waker() -> (Arc<atomic_waker::AtomicWaker>, Arc<CountingWaker>) {
    let count = Arc::new(CountingWaker(AtomicUsize::new(0)));
    let slot = Arc::new(atomic_waker::AtomicWaker::new());
    slot.register(&std::task::Waker::from(count.clone()));
    (slot, count)
}

#[test]
fn tickets_settle_and_wake_their_shard() {
    let t = tmp();
    let store = open(t.path());
    let writer = spawn_writer(store.clone());
    let (w0, c0) = counting_waker();
    let (w1, c1) = counting_waker();
    writer.set_wakers(vec![w0.clone(), w1.clone()]);
    assert_eq!((writer.settled(0), writer.settled(1), writer.settled(9)), (0, 0, 0));
    let k0 = skey("alice", "ag_1");
    let k1 = skey("bob", "ag_2");
    for n in 1..=300u64 {
        assert!(writer.send_durable(append(&k0, "e_1", n, n, None, b"m"), Ticket { shard: 0, n }));
        if n % 30 == 0 {
            assert!(writer.send_durable(put(&k1, n / 30, n, "s_1", b"m"), Ticket { shard: 1, n: n / 30 }));
        }
        // Plain ops mix in.
        assert!(writer.send(WriteOp::AgentSeen { agent_id: "ag_none".into(), at: n }));
    }
    // A shard without a waker is tracked all the same; one beyond the limit is refused.
    assert!(writer.send_durable(mark(&k0, "e_1", true, 300), Ticket { shard: 7, n: 42 }));
    assert!(!writer.send_durable(mark(&k0, "e_1", true, 300), Ticket { shard: MAX_TICKET_SHARDS, n: 1 }));
    assert!(writer.flush());
    // Settled by the time flush returns.
    assert_eq!((writer.settled(0), writer.settled(1), writer.settled(7)), (300, 10, 42));
    assert_eq!(writer.settled(MAX_TICKET_SHARDS), 0);
    assert_eq!(writer.settled(usize::MAX), 0);
    assert!(writer.take_failed(0).is_empty() && writer.take_failed(1).is_empty());
    assert!(writer.take_failed(usize::MAX).is_empty());
    assert!(c0.0.load(Ordering::SeqCst) >= 1 && c1.0.load(Ordering::SeqCst) >= 1);
    let stats = writer.writer_stats();
    assert_eq!((stats.ops, stats.dropped, stats.commit_errors), (300 + 10 + 300 + 1, 1, 0));
    assert_eq!(stats.skipped, 300); // the AgentSeen for an unknown agent
                                    // Every committed op is readable.
    let got = store.load_user("alice").unwrap();
    assert_eq!(seqs(&got.streams[0]).len(), 300);
    assert!(got.streams[0].clean);
    assert_eq!(mail_seqs(&store.load_user("bob").unwrap().mailboxes[0]), (1..=10).collect::<Vec<_>>());

    // A later commit wakes again (after the shard re-registers).
    let before = c1.0.load(Ordering::SeqCst);
    w1.register(&std::task::Waker::from(c1.clone()));
    assert!(writer.send_durable(put(&k1, 11, 1, "s_1", b"m"), Ticket { shard: 1, n: 11 }));
    assert!(writer.flush());
    assert_eq!(writer.settled(1), 11);
    assert_eq!(c1.0.load(Ordering::SeqCst), before + 1);
    writer.shutdown();
}

#[test]
fn failed_commits_report_their_tickets() {
    let t = tmp();
    // A 1 MiB map, filled until LMDB refuses more.
    let store = Store::open(t.path(), 1).unwrap();
    let filler = skey("filler", "ag_1");
    let frame = vec![7u8; 64 * 1024];
    let mut seq = 0;
    loop {
        seq += 1;
        if store.apply_batch(&[append(&filler, "e_1", seq, 1, None, &frame)]).is_err() {
            break;
        }
        assert!(seq < 100, "the map never filled");
    }
    let writer = spawn_writer(store.clone());
    let (w, c) = counting_waker();
    writer.set_wakers(vec![w]);
    let k = skey("alice", "ag_1");
    for n in 1..=20u64 {
        assert!(writer.send_durable(append(&k, "e_1", n, 1, None, &frame), Ticket { shard: 0, n }));
    }
    assert!(!writer.flush());
    assert_eq!(writer.settled(0), 20);
    assert!(c.0.load(Ordering::SeqCst) >= 1);
    let failed = writer.take_failed(0);
    assert!(!failed.is_empty());
    assert!(failed.windows(2).all(|w| w[0] < w[1]), "in send order: {failed:?}");
    // Each ticket either failed or is stored: never both, never neither.
    let stored: Vec<u64> = store.load_user("alice").unwrap().streams.first().map(seqs).unwrap_or_default();
    for n in 1..=20u64 {
        assert_ne!(
            failed.contains(&n),
            stored.contains(&n),
            "ticket {n}: failed {failed:?}, stored {stored:?}"
        );
    }
    // Taken once.
    assert!(writer.take_failed(0).is_empty());
    let stats = writer.writer_stats();
    assert!(stats.commit_errors >= 1 && stats.lost_ops as usize == failed.len(), "{stats:?}");
    // The writer keeps going: a small op commits and settles as committed.
    assert!(writer.send_durable(mark(&k, "e_1", false, 0), Ticket { shard: 0, n: 21 }));
    assert!(writer.flush());
    assert_eq!(writer.settled(0), 21);
    assert!(writer.take_failed(0).is_empty());
    writer.shutdown();
}

#[test]
fn shutdown_commits_and_settles_every_ticket() {
    let t = tmp();
    let store = open(t.path());
    let writer = spawn_writer(store.clone());
    let (w, c) = counting_waker();
    writer.set_wakers(vec![Arc::new(atomic_waker::AtomicWaker::new()), w]);
    let other = writer.clone();
    let k = skey("alice", "ag_1");
    let n_ops = 5000u64;
    for n in 1..=n_ops {
        assert!(writer.send_durable(append(&k, "e_1", n, n, None, b"m"), Ticket { shard: 1, n }));
    }
    // No flush: shutdown drains the queue, commits and settles.
    writer.shutdown();
    assert_eq!(other.settled(1), n_ops);
    assert!(other.take_failed(1).is_empty());
    assert!(c.0.load(Ordering::SeqCst) >= 1);
    assert!(!other.send_durable(mark(&k, "e_1", true, n_ops), Ticket { shard: 1, n: n_ops + 1 }));
    assert_eq!(other.settled(1), n_ops);
    let got = store.load_user("alice").unwrap();
    assert_eq!((got.streams[0].last_seq, got.streams[0].entries.len() as u64), (n_ops, n_ops));
}

#[test]
fn durable_ops_are_cheap_to_clone() {
    let k = skey("alice", "ag_1");
    let op = append(&k, "e_1", 1, 1, Some("s_1"), &[0u8; 4096]);
    let WriteOp::HistoryAppend { key, frame, .. } = op.clone() else { unreachable!() };
    assert!(Arc::ptr_eq(&key, &k));
    let WriteOp::HistoryAppend { frame: original, .. } = &op else { unreachable!() };
    assert_eq!(frame.as_ptr(), original.as_ptr());
    assert!(op.is_durable() && op.agent_id().is_none() && op.conn_id().is_none());
    assert!(!WriteOp::Probe { at: 1 }.is_durable());
}
