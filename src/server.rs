//! `switchboard serve`: assembles the daemon — store, keys, listeners, shards, admin
//! listener, revocation watcher — and runs it until a signal says stop.
//!
//! Invariants:
//! - Signals are blocked in every thread and taken synchronously by the main thread
//!   (`sigwait`), then fanned out to the shards as messages: shutdown is an input.
//! - The `{"listening":…}` line is printed only once every shard accepts.

use crate::auth::jwt::{JwtSettings, JwtVerifier};
use crate::config::Config;
use crate::shard::{self, Global, ShardMsg};
use crate::store::{self, DataDirLock, Store};
use anyhow::{bail, Context};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Builds the JWT verifier from the configuration (generating a key in the data dir when no
/// key is configured at all).
pub fn jwt_settings(config: &Config) -> anyhow::Result<JwtSettings> {
    let j = &config.jwt;
    let hs256_secret = match &j.hs256_secret_file {
        Some(f) => Some(
            store::read_secret_file(f).with_context(|| format!("jwt.hs256_secret_file {}", f.display()))?,
        ),
        None if j.public_keys.is_empty() => {
            let (key, path, created) = store::ensure_jwt_key(&config.server.data_dir)?;
            if created {
                tracing::info!(path = %path.display(), "generated an HS256 JWT key (mint client tokens with `switchboard token`)");
            } else {
                tracing::info!(path = %path.display(), "using the HS256 JWT key in the data dir");
            }
            Some(key)
        }
        None => None,
    };
    let mut public_keys = Vec::new();
    for k in &j.public_keys {
        let pem =
            std::fs::read(&k.file).with_context(|| format!("jwt.public_keys file {}", k.file.display()))?;
        public_keys.push((k.alg.clone(), pem));
    }
    Ok(JwtSettings {
        hs256_secret,
        public_keys,
        issuer: j.issuer.clone(),
        audience: j.audience.clone(),
        leeway_secs: j.leeway_secs,
        user_claim: j.user_claim.clone(),
    })
}

/// The TLS server configuration, when `server.tls_cert_file` is set.
fn tls_config(config: &Config) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    match (&config.server.tls_cert_file, &config.server.tls_key_file) {
        (Some(cert), Some(key)) => Ok(Some(crate::tls::load(cert, key)?)),
        _ => Ok(None),
    }
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-mask calls on a zeroed set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: set is a valid, blocked signal set.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

/// Applies a new configuration (SIGHUP): JWT keys, limits, auth and presence settings and
/// the log level take effect at once; listeners, data dir, shard count and driver need a
/// restart and keep their running values. A configuration that does not load or validate,
/// or whose keys do not load, is refused and the old one stays.
fn reload(global: &Global, load: &dyn Fn() -> anyhow::Result<Config>) -> anyhow::Result<()> {
    let mut new = load()?;
    new.validate()?;
    let old = global.config();
    let fixed = |a: &crate::config::Server, b: &crate::config::Server| {
        a.listen == b.listen
            && a.admin_listen == b.admin_listen
            && a.data_dir == b.data_dir
            && a.shards == b.shards
            && a.driver == b.driver
            && a.store_map_size_mb == b.store_map_size_mb
    };
    if !fixed(&old.server, &new.server) {
        tracing::warn!("listen, admin_listen, data_dir, shards, driver and store_map_size_mb need a restart; keeping the running values");
        new.server.listen = old.server.listen;
        new.server.admin_listen = old.server.admin_listen;
        new.server.data_dir = old.server.data_dir.clone();
        new.server.shards = old.server.shards;
        new.server.driver = old.server.driver;
        new.server.store_map_size_mb = old.server.store_map_size_mb;
    }
    let jwt = JwtVerifier::new(&jwt_settings(&new)?)?;
    let tls = tls_config(&new)?;
    crate::logging::set_level(&new.log.level).map_err(|e| anyhow::anyhow!("log.level: {e}"))?;
    let new = Arc::new(new);
    *global.config.write().unwrap_or_else(|e| e.into_inner()) = new.clone();
    *global.jwt.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(jwt);
    *global.tls.write().unwrap_or_else(|e| e.into_inner()) = tls;
    for inbox in &global.inboxes {
        let mut msg = ShardMsg::Reload(new.clone());
        let deadline = Instant::now() + Duration::from_secs(1);
        while let Err(m) = inbox.send(msg) {
            if Instant::now() > deadline {
                bail!("a shard's inbox stayed full; that shard keeps the old limits");
            }
            msg = m;
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(())
}

/// Runs the daemon until SIGTERM/SIGINT. `load` re-reads the configuration (file,
/// environment, flags) on SIGHUP.
pub fn serve(config: Config, load: impl Fn() -> anyhow::Result<Config>) -> anyhow::Result<()> {
    config.validate()?;
    let sigset = block_signals();
    let data_dir = &config.server.data_dir;
    std::fs::create_dir_all(data_dir).with_context(|| format!("create data dir {}", data_dir.display()))?;
    let _lock = DataDirLock::acquire(data_dir)?;
    let store = Store::open(data_dir, config.server.store_map_size_mb)?;
    let jwt = JwtVerifier::new(&jwt_settings(&config)?)?;
    let tls = tls_config(&config)?;
    let n = config.shard_count();
    let listeners = crate::listener::bind(config.server.listen, n)?;
    let public = listeners[0].local_addr()?;
    let admin = std::net::TcpListener::bind(config.server.admin_listen)
        .with_context(|| format!("bind admin listener {}", config.server.admin_listen))?;
    let admin_addr = admin.local_addr()?;
    let prom = crate::metrics::install();
    let retention = store::RetentionPolicy::new(config.records.max_records, config.records.max_age_days)
        .with_durable(config.history.ttl_secs, config.mailbox.ttl_secs);
    let writer = store::spawn_writer_with(store.clone(), retention);
    let (inboxes, receivers) = shard::channels(n);
    // The writer rings a shard's doorbell when that shard's durable ops are committed.
    writer.set_wakers(receivers.iter().map(|(_, bell)| bell.clone()).collect());
    let global = Arc::new(Global {
        config: RwLock::new(Arc::new(config.clone())),
        store: store.clone(),
        writer: writer.clone(),
        jwt: RwLock::new(Arc::new(jwt)),
        tls: RwLock::new(tls.clone()),
        inboxes,
        open_conns: AtomicUsize::new(0),
        draining: AtomicBool::new(false),
        ip_buckets: Default::default(),
        shards_accepting: AtomicUsize::new(0),
        uring_shards: AtomicUsize::new(0),
    });
    let cpus = shard::allowed_cpus();
    let mut threads = Vec::new();
    let shards_alive = crate::systemd::ShardLiveness::default(); // systemd watchdog
    for (idx, (listener, inbox)) in listeners.into_iter().zip(receivers).enumerate() {
        let g = global.clone();
        let cpu = cpus[idx % cpus.len().max(1)];
        let alive = shards_alive.guard(); // systemd watchdog
        let t = std::thread::Builder::new().name(format!("switchboard-shard-{idx}")).spawn(move || {
            let _alive = alive; // systemd watchdog
            shard::pin_to(cpu);
            if let Err(e) = shard::run(idx, g, listener, inbox) {
                tracing::error!(shard = idx, error = %e, "shard failed");
                std::process::exit(1);
            }
        })?;
        threads.push(t);
    }
    let started = Instant::now();
    while global.shards_accepting.load(Ordering::SeqCst) < n {
        if started.elapsed() > Duration::from_secs(10) {
            bail!("shards did not start within 10 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    crate::admin::spawn(admin, global.clone(), prom);
    let stop = Arc::new(AtomicBool::new(false));
    let g = global.clone();
    let watcher = store::spawn_revocation_watcher(
        store.clone(),
        Duration::from_millis(500),
        move |rec| {
            let home = g.home_shard(&rec.user);
            let _ = g.inboxes[home]
                .send(ShardMsg::RevokeAgent { user: rec.user.clone(), agent_id: rec.agent_id.clone() });
        },
        stop.clone(),
    );
    let uring = global.uring_shards.load(Ordering::Relaxed);
    crate::metrics::build_info(if uring == n {
        "io_uring"
    } else if uring == 0 {
        "legacy"
    } else {
        "mixed"
    });
    tracing::info!(
        listen = %public, admin = %admin_addr, shards = n, tls = tls.is_some(),
        driver = if uring == n { "io_uring" } else if uring == 0 { "legacy" } else { "mixed" },
        "switchboard serving"
    );
    println!("{}", serde_json::json!({ "listening": public.to_string(), "admin": admin_addr.to_string() }));
    crate::systemd::serving(public, admin_addr, n, uring);
    crate::systemd::spawn_watchdog(move || shards_alive.count() == n);
    loop {
        let sig = wait_signal(&sigset);
        if sig == libc::SIGHUP {
            crate::systemd::reloading();
            let outcome = reload(&global, &load);
            crate::systemd::reloaded(if outcome.is_ok() {
                "configuration reloaded"
            } else {
                "configuration refused; the old one stays"
            });
            match outcome {
                Ok(()) => tracing::info!("SIGHUP: configuration reloaded"),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "SIGHUP: configuration refused; the old one stays")
                }
            }
            continue;
        }
        break;
    }
    tracing::info!("shutting down: closing connections with 1001");
    crate::systemd::draining();
    global.draining.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(global.config().server.shutdown_timeout_secs);
    for inbox in &global.inboxes {
        let _ = inbox.send(ShardMsg::Shutdown { deadline });
    }
    // A second signal exits at once.
    std::thread::spawn(move || {
        wait_signal(&sigset);
        std::process::exit(1);
    });
    for t in threads {
        let _ = t.join();
    }
    stop.store(true, Ordering::SeqCst);
    let _ = watcher.join();
    writer.shutdown();
    tracing::info!("stopped");
    Ok(())
}
