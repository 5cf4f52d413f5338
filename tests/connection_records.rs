//! Crash safety of the store under traffic (issue 3, item 5): a child process creates agents the
//! way the CLI does (`create_agent`, its own durable transaction) while it streams connection
//! records and agent statistics through the daemon's writer thread (`spawn_writer_with`, group
//! commit). It prints each agent once `create_agent` has returned and each record once the
//! writer reports it committed. The parent SIGKILLs it at a random moment, reopens the store
//! ("restarts"), and checks that every reported agent and record is there and intact, that every
//! row decodes and the filtered listings agree with the full one, and that the store still takes
//! writes. Five rounds, on the same
//! data dir, so each round also starts from a store a killed process left behind.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchboard::store::{
    spawn_writer_with, ConnectionFilter, ConnectionRecord, Credential, NewCredential, RetentionPolicy, Role,
    Store, WriteOp,
};

const DIR_ENV: &str = "SB_CONNREC_CHILD_DIR";
const ROUND_ENV: &str = "SB_CONNREC_CHILD_ROUND";
const ROUNDS: u64 = 5;
/// Every line the child prints for the parent starts with this (libtest may print before it).
const MARK: &str = "@@ ";
/// Users of connection records; agents get the first three (`create_agent` refuses control
/// characters, a JWT `sub` may hold any).
const USERS: [&str; 4] = ["alice", "bob", "ünïcödé", "nul\0user"];
const MAP_MB: usize = 256;

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// The close the child sends for `rec`: derived from the record, so the parent knows it too.
fn close_op(rec: &ConnectionRecord) -> WriteOp {
    let h = fnv(&rec.conn_id);
    WriteOp::ConnectionClosed {
        conn_id: rec.conn_id.clone(),
        opened: rec.opened,
        last_seen: rec.opened + 5,
        closed: rec.opened + 6,
        frames_in: h % 1000,
        frames_out: (h >> 10) % 1000,
        bytes_in: (h >> 20) % 1_000_000,
        bytes_out: h >> 40,
        close_code: Some(1000 + (h % 16) as u16),
    }
}

/// `rec` after [`close_op`].
fn closed_record(rec: &ConnectionRecord) -> ConnectionRecord {
    let WriteOp::ConnectionClosed {
        last_seen,
        closed,
        frames_in,
        frames_out,
        bytes_in,
        bytes_out,
        close_code,
        ..
    } = close_op(rec)
    else {
        unreachable!()
    };
    ConnectionRecord {
        last_seen,
        closed: Some(closed),
        frames_in,
        frames_out,
        bytes_in,
        bytes_out,
        close_code,
        ..rec.clone()
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{MARK}{line}").unwrap();
    out.flush().unwrap();
}

/// What the child queued, in queue order, with what to print once it is committed.
struct Queued {
    lines: VecDeque<Option<String>>,
    /// Ops reported so far (the writer's committed count when we last looked).
    reported: u64,
}

impl Queued {
    /// Prints the lines of every op the writer has committed. With one sending thread, ops
    /// commit in queue order, so `ops` committed means the first `ops` we queued.
    fn report(&mut self, writer: &switchboard::store::WriterHandle) {
        let stats = writer.writer_stats();
        assert_eq!((stats.commit_errors, stats.lost_ops), (0, 0), "{stats:?}");
        while self.reported < stats.ops {
            if let Some(line) = self.lines.pop_front().expect("committed more than queued") {
                say(&line);
            }
            self.reported += 1;
        }
    }

    fn send(&mut self, writer: &switchboard::store::WriterHandle, op: WriteOp, line: Option<String>) {
        // A full queue refuses the op (nothing queued): report, wait, try again.
        while !writer.send(op.clone()) {
            self.report(writer);
            std::thread::sleep(Duration::from_micros(200));
        }
        self.lines.push_back(line);
    }
}

/// The child: runs only when re-executed by the parent test below.
#[test]
#[ignore = "child process of sigkill_under_traffic_keeps_everything_committed"]
fn child_writer() {
    let Ok(dir) = std::env::var(DIR_ENV) else { return };
    let round: u64 = std::env::var(ROUND_ENV).unwrap().parse().unwrap();
    let store = Store::open(Path::new(&dir), MAP_MB).unwrap();
    // Retention must not delete what the parent will look for.
    let writer = spawn_writer_with(store.clone(), RetentionPolicy::new(u64::MAX, 36_500));
    let agents: Arc<Mutex<Vec<String>>> = Arc::default();
    let creator = {
        let (store, agents) = (store.clone(), agents.clone());
        std::thread::spawn(move || {
            for k in 0.. {
                let user = USERS[k % 3];
                let name = format!("round{round}-agent{k}");
                let (rec, _) = store.create_agent(user, &name, NewCredential::Hmac, None).unwrap();
                say(&format!("AGENT {}", serde_json::json!([rec.agent_id, user, name])));
                agents.lock().unwrap().push(rec.agent_id);
                std::thread::sleep(Duration::from_millis(3));
            }
        })
    };
    say("READY");
    let base = switchboard::store::unix_now();
    let mut q = Queued { lines: VecDeque::new(), reported: 0 };
    let mut recent: VecDeque<ConnectionRecord> = VecDeque::new();
    let started = Instant::now();
    for i in 0u64.. {
        let agent = {
            let agents = agents.lock().unwrap();
            (!agents.is_empty() && i % 3 != 0)
                .then(|| agents[fnv(&i.to_string()) as usize % agents.len()].clone())
        };
        let role = if i % 2 == 0 && agent.is_some() { Role::Agent } else { Role::Client };
        let prefix = if role == Role::Agent { "c" } else { "s" };
        let rec = ConnectionRecord::new(
            format!("{prefix}_r{round}_{i}"),
            USERS[(i % 4) as usize],
            role,
            agent.clone(),
            format!("10.{round}.{}.{}:{}", (i >> 8) % 256, i % 256, 1024 + i % 60_000),
            base + i / 64,
        );
        let line = format!("OPEN {}", serde_json::to_string(&rec).unwrap());
        q.send(&writer, WriteOp::ConnectionOpened(Box::new(rec.clone())), Some(line));
        if let (Role::Agent, Some(agent_id)) = (role, agent) {
            q.send(&writer, WriteOp::AgentConnected { agent_id, at: rec.opened }, None);
        }
        recent.push_back(rec);
        // Close every other connection a few opens later.
        if recent.len() > 3 {
            let old = recent.pop_front().unwrap();
            if fnv(&old.conn_id) % 2 == 0 {
                let line = format!("CLOSE {}", old.conn_id);
                q.send(&writer, close_op(&old), Some(line));
            }
        }
        q.report(&writer);
        // Steady traffic rather than a flat-out flood (keeps the data dir small).
        if i % 32 == 31 {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!creator.is_finished(), "the agent creator died");
        assert!(started.elapsed() < Duration::from_secs(60), "the parent never killed us");
    }
}

#[derive(Default)]
struct Reported {
    /// agent id → (user, name)
    agents: HashMap<String, (String, String)>,
    /// conn id → the record as opened
    opened: HashMap<String, ConnectionRecord>,
    closed: HashSet<String>,
}

impl Reported {
    fn take(&mut self, line: &str) {
        let Some(pos) = line.find(MARK) else { return };
        let line = line[pos + MARK.len()..].trim_end_matches('\n');
        if let Some(json) = line.strip_prefix("AGENT ") {
            let (id, user, name): (String, String, String) = serde_json::from_str(json).unwrap();
            self.agents.insert(id, (user, name));
        } else if let Some(json) = line.strip_prefix("OPEN ") {
            let rec: ConnectionRecord = serde_json::from_str(json).unwrap();
            assert!(self.opened.insert(rec.conn_id.clone(), rec).is_none());
        } else if let Some(id) = line.strip_prefix("CLOSE ") {
            assert!(self.opened.contains_key(id), "close of {id} reported before its open");
            self.closed.insert(id.to_owned());
        }
    }
}

/// Runs one child until a random moment, SIGKILLs it, and returns what it reported.
fn run_and_kill(dir: &Path, round: u64, reported: &mut Reported) -> (usize, usize, Duration) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_writer", "--ignored", "--nocapture", "--test-threads=1"])
        .env(DIR_ENV, dir)
        .env(ROUND_ENV, round.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match stdout.read_until(b'\n', &mut buf) {
                // Only whole lines: the kill may cut the last one.
                Ok(n) if n > 0 && buf.ends_with(b"\n") => {
                    let _ = tx.send(String::from_utf8(buf.clone()).unwrap());
                }
                _ => return,
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    // Wait until traffic flows (an agent and a record reported), then kill at a random moment.
    let (agents0, opened0) = (reported.agents.len(), reported.opened.len());
    let deadline = Instant::now() + Duration::from_secs(30);
    while reported.agents.len() == agents0 || reported.opened.len() == opened0 {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        let Ok(line) = line else {
            let _ = child.kill();
            panic!("child produced no traffic: {}", err_reader.join().unwrap());
        };
        reported.take(&line);
    }
    let random = u64::from_le_bytes(switchboard::ids::random_bytes::<8>());
    let delay = Duration::from_millis(50 + random % 750);
    let until = Instant::now() + delay;
    while let Ok(line) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
        reported.take(&line);
        if Instant::now() >= until {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    reader.join().unwrap();
    for line in rx.try_iter() {
        reported.take(&line);
    }
    let stderr = err_reader.join().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the child did not die by SIGKILL: {status}\n{stderr}");
    (reported.agents.len() - agents0, reported.opened.len() - opened0, delay)
}

/// Everything reported is there and intact; rows and indexes agree.
fn verify(store: &Store, reported: &Reported) {
    for (id, (user, name)) in &reported.agents {
        let rec = store.get_agent(id).unwrap().unwrap_or_else(|| panic!("agent {id} lost"));
        assert_eq!((&rec.user, &rec.name), (user, name), "agent {id}");
        assert!(matches!(rec.credential, Credential::Hmac { ref secret } if secret.starts_with("sbk_")));
        assert!(!rec.revoked);
    }
    for (id, opened) in &reported.opened {
        let got =
            store.get_connection(id, opened.opened).unwrap().unwrap_or_else(|| panic!("record {id} lost"));
        let closed = closed_record(opened);
        if reported.closed.contains(id) {
            assert_eq!(got, closed, "record {id}: its close was committed");
        } else {
            assert!(
                got == *opened || got == closed,
                "record {id} is neither as opened nor as closed: {got:?}"
            );
        }
    }
    // Every row decodes, newest first, ids unique, and the filters select exactly the rows.
    let all = store.list_connections(&ConnectionFilter::default()).unwrap();
    assert_eq!(all.len() as u64, store.connection_count().unwrap());
    assert!(all.windows(2).all(|w| w[0].opened >= w[1].opened), "not newest first");
    let ids: HashSet<&str> = all.iter().map(|r| r.conn_id.as_str()).collect();
    assert_eq!(ids.len(), all.len(), "a conn_id stored twice");
    let mut by_user: HashMap<&str, usize> = HashMap::new();
    let mut by_agent: HashMap<&str, usize> = HashMap::new();
    for r in &all {
        *by_user.entry(&r.user).or_default() += 1;
        if let Some(a) = &r.agent_id {
            *by_agent.entry(a).or_default() += 1;
        }
    }
    for (user, n) in by_user {
        let f = ConnectionFilter { user: Some(user.into()), ..Default::default() };
        assert_eq!(store.list_connections(&f).unwrap().len(), n, "user filter {user:?}");
    }
    // Each filter is a scan: check a handful of agents.
    for (agent, n) in by_agent.into_iter().take(8) {
        let f = ConnectionFilter { agent: Some(agent.into()), ..Default::default() };
        assert_eq!(store.list_connections(&f).unwrap().len(), n, "agent filter {agent}");
    }
}

#[test]
fn sigkill_under_traffic_keeps_everything_committed() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = tmp.path();
    let mut reported = Reported::default();
    for round in 0..ROUNDS {
        let (agents, records, delay) = run_and_kill(dir, round, &mut reported);
        eprintln!("round {round}: killed after {delay:?}; {agents} agents and {records} records reported");
        // "Restart": reopen the data dir the killed process left behind.
        let store = Store::open(dir, 0).unwrap();
        verify(&store, &reported);
    }
    assert!(!reported.closed.is_empty());

    // The store still takes writes through a new writer after the last kill.
    let store = Store::open(dir, 0).unwrap();
    let writer = spawn_writer_with(store.clone(), RetentionPolicy::default());
    let now = switchboard::store::unix_now();
    let rec = ConnectionRecord::new("c_after", "alice", Role::Client, None, "127.0.0.1:1", now);
    assert!(writer.send(WriteOp::ConnectionOpened(Box::new(rec.clone()))));
    assert!(writer.send(close_op(&rec)));
    let agent = reported.agents.keys().next().unwrap().clone();
    assert!(writer.send(WriteOp::AgentDisconnected { agent_id: agent.clone(), at: 7 }));
    assert!(writer.flush());
    assert_eq!(store.get_connection("c_after", now).unwrap(), Some(closed_record(&rec)));
    assert_eq!(store.get_agent(&agent).unwrap().unwrap().last_disconnected, Some(7));
    writer.shutdown();
}
