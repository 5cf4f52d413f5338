//! The daemon under test: either spawned here (`--spawn BIN`: temp data dir, a config that
//! lifts the limits a load test would hit, agents through `switchboard agent create --json`,
//! tokens through `switchboard token --json`), or already running (`--addr`, optionally
//! `--pid`, `--agents-file`, `--jwt-secret-file`).
//!
//! A spawned daemon is stopped (SIGTERM, then SIGKILL after 5 s) when its [`Spawned`] drops.

use crate::plan::AgentCred;
use anyhow::{bail, Context as _};
use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The settings a spawned daemon starts with: everything that would throttle or cut a load
/// test is lifted; the rest stays at the spec's defaults (heartbeat 30 s, frame 64 KiB).
pub const SPAWN_CONFIG: &str = r#"
[server]
max_connections = 1000000

[limits]
max_connections_per_user = 1000000
messages_per_sec_per_user = 1000000000
messages_burst_per_user = 1000000000
handshakes_per_sec_per_ip = 1000000
handshakes_burst_per_ip = 1000000
send_buffer_bytes = 67108864
# A receiving client never sends a data frame: the default (300 s) closes it with 4000
# five minutes into a soak or a long idle hold.
idle_timeout_secs = 86400

[log]
level = "warn"
"#;

#[derive(Debug, Clone)]
pub struct SpawnOpts {
    pub bin: PathBuf,
    pub shards: usize,
    pub driver: String,
    /// TOML merged over [`SPAWN_CONFIG`] (tables key by key).
    pub extra_config: Option<PathBuf>,
    pub log_level: Option<String>,
}

/// A daemon this process started.
pub struct Spawned {
    child: Child,
    pub bin: PathBuf,
    pub data_dir: PathBuf,
    pub secret_file: PathBuf,
    pub log_path: PathBuf,
    pub config_path: PathBuf,
    pub addr: SocketAddr,
    pub admin: String,
    dir: Option<tempfile::TempDir>,
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

impl Spawned {
    pub fn start(o: &SpawnOpts) -> anyhow::Result<Spawned> {
        let dir = tempfile::Builder::new().prefix("switchboard-loadtest-").tempdir()?;
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir)?;
        let mut table: toml::Table = SPAWN_CONFIG.parse().expect("built-in TOML parses");
        if let Some(level) = &o.log_level {
            let mut log = toml::Table::new();
            log.insert("level".into(), toml::Value::String(level.clone()));
            let mut t = toml::Table::new();
            t.insert("log".into(), toml::Value::Table(log));
            merge(&mut table, t);
        }
        if let Some(p) = &o.extra_config {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let extra: toml::Table = text.parse().with_context(|| format!("parsing {}", p.display()))?;
            merge(&mut table, extra);
        }
        let config_path = dir.path().join("switchboard.toml");
        std::fs::write(&config_path, toml::to_string(&table)?)?;
        let jwt_secret = crate::auth::b64url(&crate::auth::random_bytes::<32>()).into_bytes();
        let secret_file = dir.path().join("jwt.secret");
        std::fs::write(&secret_file, &jwt_secret)?;
        let log_path = dir.path().join("daemon.log");
        let log = std::fs::File::create(&log_path)?;
        let mut child = Command::new(&o.bin)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--shards", &o.shards.to_string(), "--driver", &o.driver])
            .arg("--config")
            .arg(&config_path)
            .arg(format!("--jwt-hs256-secret-file={}", secret_file.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.try_clone()?)
            .spawn()
            .with_context(|| format!("spawning {}", o.bin.display()))?;
        // Copy stdout to the log file (so the pipe never fills) and report the listening line.
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut log = log;
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log, "{line}");
                if !sent {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        if let Some(l) = v.get("listening").and_then(|x| x.as_str()) {
                            let admin = v.get("admin").and_then(|x| x.as_str()).unwrap_or("").to_string();
                            let _ = tx.send((l.to_string(), admin));
                            sent = true;
                        }
                    }
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let (listen, admin) = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(v) => break v,
                Err(_) => {
                    if let Some(status) = child.try_wait()? {
                        std::thread::sleep(Duration::from_millis(100));
                        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                        bail!("the daemon exited early ({status}):\n{log}");
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        bail!("the daemon did not print its listening line within 20 s");
                    }
                }
            }
        };
        let addr = listen.parse().with_context(|| format!("bad listening address {listen:?}"))?;
        Ok(Spawned {
            child,
            bin: o.bin.clone(),
            data_dir,
            secret_file,
            log_path,
            config_path,
            addr,
            admin,
            dir: Some(dir),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Creates `per_user` agents for every user with `agent create --json`, running
    /// `parallel` CLI processes at a time: HMAC agents, or Ed25519 agents whose key pairs are
    /// generated here (the daemon gets the public key with `--ed25519-pubkey`).
    pub fn create_agents(
        &self,
        users: &[String],
        per_user: usize,
        parallel: usize,
        ed25519: bool,
    ) -> anyhow::Result<Vec<Vec<AgentCred>>> {
        type Job = (usize, usize, Option<(crate::auth::AgentKey, [u8; 32])>);
        let jobs: Vec<Job> = (0..users.len())
            .flat_map(|u| (0..per_user).map(move |a| (u, a)))
            .map(|(u, a)| (u, a, ed25519.then(crate::auth::AgentKey::ed25519_generate)))
            .collect();
        let outs = run_parallel(&jobs, parallel, |(u, a, ed)| {
            let mut c = Command::new(&self.bin);
            c.args(["agent", "create"])
                .arg(format!("--data-dir={}", self.data_dir.display()))
                .arg(format!("--user={}", users[*u]))
                .arg(format!("--name=loadtest-{u}-{a}"))
                .arg("--json");
            if let Some((key, _)) = ed {
                c.arg(format!("--ed25519-pubkey={}", key.public_key_b64().expect("ed25519")));
            }
            c
        })?;
        let mut agents = vec![Vec::with_capacity(per_user); users.len()];
        for ((u, _, ed), out) in jobs.iter().zip(outs) {
            let mut cred: AgentCred =
                serde_json::from_str(out.trim()).with_context(|| format!("agent create printed {out:?}"))?;
            if let Some((_, seed)) = ed {
                cred.secret = None;
                cred.ed25519_seed = Some(crate::auth::b64url(seed));
            }
            agents[*u].push(cred);
        }
        Ok(agents)
    }

    /// One client JWT per user with `token --json` (1 hour).
    pub fn mint_tokens(&self, users: &[String], parallel: usize) -> anyhow::Result<Vec<String>> {
        let idx: Vec<usize> = (0..users.len()).collect();
        let outs = run_parallel(&idx, parallel, |&u| {
            let mut c = Command::new(&self.bin);
            c.arg("token")
                .arg(format!("--data-dir={}", self.data_dir.display()))
                .arg(format!("--jwt-hs256-secret-file={}", self.secret_file.display()))
                .arg(format!("--user={}", users[u]))
                .args(["--ttl", "1h", "--json"]);
            c
        })?;
        outs.iter()
            .map(|o| {
                let v: serde_json::Value =
                    serde_json::from_str(o.trim()).with_context(|| format!("token printed {o:?}"))?;
                v.get("token").and_then(|t| t.as_str()).map(str::to_string).context("no token in the output")
            })
            .collect()
    }

    /// Stops the daemon: SIGTERM, then SIGKILL after 5 s. Returns its exit status text.
    pub fn stop(&mut self) -> String {
        if let Ok(Some(s)) = self.child.try_wait() {
            return format!("had already exited: {s}");
        }
        // SAFETY: signalling our own child by its pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.to_string();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().map(|s| format!("killed after 5 s: {s}")).unwrap_or_default();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Keeps the temp dir (data, config, log) after exit.
    pub fn keep_dir(&mut self) -> Option<PathBuf> {
        self.dir.take().map(|d| d.keep())
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs one command per job, `parallel` at a time; returns each one's stdout, in job order.
fn run_parallel<J: Sync>(
    jobs: &[J],
    parallel: usize,
    make: impl Fn(&J) -> Command + Sync,
) -> anyhow::Result<Vec<String>> {
    let parallel = parallel.max(1);
    let mut results: Vec<Option<anyhow::Result<String>>> = (0..jobs.len()).map(|_| None).collect();
    std::thread::scope(|s| {
        let chunks: Vec<_> = (0..parallel)
            .map(|t| {
                let make = &make;
                s.spawn(move || {
                    (t..jobs.len())
                        .step_by(parallel)
                        .map(|i| {
                            let out = make(&jobs[i]).stderr(Stdio::piped()).output();
                            let r = match out {
                                Ok(o) if o.status.success() => {
                                    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
                                }
                                Ok(o) => Err(anyhow::anyhow!(
                                    "{}: {}",
                                    o.status,
                                    String::from_utf8_lossy(&o.stderr).trim()
                                )),
                                Err(e) => Err(e.into()),
                            };
                            (i, r)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for c in chunks {
            for (i, r) in c.join().expect("CLI runner thread") {
                results[i] = Some(r);
            }
        }
    });
    results.into_iter().map(|r| r.expect("every job ran")).collect()
}

/// Reads an agents file: a JSON array of `{"agent_id","user","secret"}` (HMAC agents) or
/// `{"agent_id","user","ed25519_seed"}` (Ed25519 agents).
pub fn read_agents_file(p: &Path) -> anyhow::Result<Vec<AgentCred>> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!("{} is not a JSON array of {{agent_id,user,secret|ed25519_seed}}", p.display())
    })
}

/// Reads an HS256 secret file: its content with surrounding whitespace removed (spec §9).
pub fn read_secret_file(p: &Path) -> anyhow::Result<Vec<u8>> {
    let text = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
    let s = text.trim_ascii();
    if s.is_empty() {
        bail!("{} is empty", p.display());
    }
    Ok(s.to_vec())
}
