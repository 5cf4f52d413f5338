//! The scenarios: setting up the daemon and the plan, moving the engine through its phases,
//! sampling /proc, and reporting (human summary on stdout, JSON with `--json-out`).
//!
//! Exit codes: 0 clean; 1 the run completed but the accounting failed (see
//! [`crate::report::Accounting::failures`]) or connections failed or were cut; 2 the run
//! could not be set up.

use crate::engine::{Engine, EngineCfg, Traffic, PH_READY, PH_RUN, PH_STOP};
use crate::plan::{AgentCred, Plan};
use crate::report::{self, fmt_map, thousands};
use crate::svg;
use crate::sys::{self, CpuSnap};
use crate::target::{self, SpawnOpts, Spawned};
use crate::{
    AgentKeyKind, ConnectArgs, Direction, GenArgs, GenDriver, IdleArgs, RelayArgs, SoakArgs, TargetArgs,
    WindowOn,
};
use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The daemon and who connects to it.
struct Setup {
    spawned: Option<Spawned>,
    addr: SocketAddr,
    pid: Option<u32>,
    plan: Arc<Plan>,
    info: Value,
}

fn progress(quiet: bool, msg: impl AsRef<str>) {
    if !quiet {
        eprintln!("[loadtest] {}", msg.as_ref());
    }
}

fn setup(t: &TargetArgs, quiet: bool, users: usize, apu: usize, cpu: usize) -> anyhow::Result<Setup> {
    let started = Instant::now();
    if let Some(bin) = &t.spawn {
        let opts = SpawnOpts {
            bin: bin.clone(),
            shards: t.shards,
            driver: t.driver.clone(),
            extra_config: t.daemon_config.clone(),
            log_level: t.daemon_log_level.clone(),
        };
        let mut d = Spawned::start(&opts)?;
        progress(quiet, format!("spawned {} (pid {}) on {}", bin.display(), d.pid(), d.addr));
        let names: Vec<String> = (0..users).map(|u| format!("lt-u{u}")).collect();
        let agents = if apu > 0 {
            progress(
                quiet,
                format!(
                    "creating {} {} agents with `agent create --json`",
                    users * apu,
                    format!("{:?}", t.agent_key).to_lowercase()
                ),
            );
            d.create_agents(&names, apu, t.cli_parallel, t.agent_key == AgentKeyKind::Ed25519)?
        } else {
            vec![Vec::new(); users]
        };
        let tokens: Vec<Option<String>> = if cpu > 0 {
            progress(quiet, format!("minting {users} tokens with `token --json`"));
            d.mint_tokens(&names, t.cli_parallel)?.into_iter().map(Some).collect()
        } else {
            vec![None; users]
        };
        let plan = Arc::new(Plan::build(&names, &agents, &tokens, cpu)?);
        let config = std::fs::read_to_string(&d.config_path).unwrap_or_default();
        let pid = d.pid();
        let kept = if t.keep_daemon_dir { d.keep_dir() } else { None };
        if let Some(p) = &kept {
            progress(quiet, format!("keeping the daemon's dir {}", p.display()));
        }
        let info = json!({
            "mode": "spawn",
            "bin": bin.display().to_string(),
            "addr": d.addr.to_string(),
            "admin": d.admin,
            "pid": pid,
            "shards": t.shards,
            "driver": t.driver,
            "agent_key": format!("{:?}", t.agent_key).to_lowercase(),
            "config": config,
            "daemon_nofile": sys::nofile_of(pid),
            "log": kept.as_ref().map(|_| d.log_path.display().to_string()),
            "setup_secs": started.elapsed().as_secs_f64(),
        });
        return Ok(Setup { addr: d.addr, pid: Some(pid), spawned: Some(d), plan, info });
    }
    let addr = t.addr.context("--addr or --spawn is required")?;
    let agents: Vec<Vec<AgentCred>>;
    let names: Vec<String>;
    if apu > 0 {
        let file = t
            .agents_file
            .as_ref()
            .context("--agents-file is required to drive agents of a running daemon")?;
        let all = target::read_agents_file(file)?;
        let mut by_user: BTreeMap<String, Vec<AgentCred>> = BTreeMap::new();
        let mut order = Vec::new();
        for a in all {
            if !by_user.contains_key(&a.user) {
                order.push(a.user.clone());
            }
            by_user.entry(a.user.clone()).or_default().push(a);
        }
        let eligible: Vec<String> =
            order.into_iter().filter(|u| by_user[u].len() >= apu).take(users).collect();
        if eligible.len() < users {
            bail!(
                "{} has only {} users with at least {apu} agents; {users} are needed",
                file.display(),
                eligible.len()
            );
        }
        agents = eligible.iter().map(|u| by_user[u][..apu].to_vec()).collect();
        names = eligible;
    } else {
        names = (0..users).map(|u| format!("lt-u{u}")).collect();
        agents = vec![Vec::new(); users];
    }
    let tokens: Vec<Option<String>> = if cpu > 0 {
        let f = t
            .jwt_secret_file
            .as_ref()
            .context("--jwt-secret-file is required to connect clients to a running daemon")?;
        let secret = target::read_secret_file(f)?;
        names.iter().map(|u| Some(crate::auth::mint_hs256(&secret, u, 3600))).collect()
    } else {
        vec![None; users]
    };
    let plan = Arc::new(Plan::build(&names, &agents, &tokens, cpu)?);
    let info = json!({
        "mode": "attach",
        "addr": addr.to_string(),
        "pid": t.pid,
        "daemon_nofile": t.pid.and_then(sys::nofile_of),
        "setup_secs": started.elapsed().as_secs_f64(),
    });
    Ok(Setup { spawned: None, addr, pid: t.pid, plan, info })
}

fn sources(addr: &SocketAddr, n: u8) -> Vec<Ipv4Addr> {
    if addr.ip().is_loopback() && n > 0 {
        (1..=n.min(254)).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect()
    } else {
        vec![Ipv4Addr::UNSPECIFIED]
    }
}

fn engine_cfg(
    g: &GenArgs,
    addr: SocketAddr,
    default_threads: usize,
    traffic: Option<Traffic>,
    read_buf: usize,
) -> EngineCfg {
    EngineCfg {
        addr,
        threads: g.threads.unwrap_or(default_threads).max(1),
        uring: g.gen_driver == GenDriver::Uring,
        sources: sources(&addr, g.source_addrs),
        connect_concurrency: g.connect_concurrency,
        connect_timeout: Duration::from_secs(g.connect_timeout.max(1)),
        traffic,
        read_buf,
    }
}

/// Checks that the connections fit under this process's fd limit.
fn check_fds(conns: usize, quiet: bool) -> anyhow::Result<(u64, u64)> {
    let (soft, hard) = sys::raise_nofile().context("raising RLIMIT_NOFILE")?;
    progress(quiet, format!("RLIMIT_NOFILE soft {soft} hard {hard}"));
    if conns as u64 + 64 > soft {
        bail!("{conns} connections do not fit under the fd limit {soft} (the generator needs one per connection, plus a few)");
    }
    Ok((soft, hard))
}

/// Samples the daemon's resident memory and CPU time every `every`, on the coordinator's
/// thread (whenever its waiting loops call [`Sampler::tick`]).
struct Sampler {
    pid: Option<u32>,
    t0: Instant,
    every: Duration,
    next: Instant,
    samples: Vec<MemSample>,
}

#[derive(Debug, Clone, serde::Serialize)]
struct MemSample {
    /// Seconds since the sampler's zero (the traffic start, or the connect start).
    t: f64,
    rss_kib: Option<u64>,
    /// Cumulative daemon user+sys seconds.
    daemon_cpu_secs: Option<f64>,
}

impl Sampler {
    fn new(pid: Option<u32>, every: f64) -> Sampler {
        let now = Instant::now();
        Sampler {
            pid,
            t0: now,
            every: Duration::from_secs_f64(every.max(0.05)),
            next: now,
            samples: Vec::new(),
        }
    }

    fn sample(&mut self) {
        self.samples.push(MemSample {
            t: self.t0.elapsed().as_secs_f64(),
            rss_kib: self.pid.and_then(sys::rss_kib),
            daemon_cpu_secs: self.pid.and_then(sys::cpu_secs),
        });
    }

    fn tick(&mut self) {
        let now = Instant::now();
        if now >= self.next {
            self.sample();
            while self.next <= now {
                self.next += self.every;
            }
        }
    }

    /// (t, MiB) points.
    fn rss_points(&self) -> Vec<(f64, f64)> {
        self.samples.iter().filter_map(|s| s.rss_kib.map(|k| (s.t, k as f64 / 1024.0))).collect()
    }

    /// (t, cores) points: the daemon's CPU between consecutive samples.
    fn cpu_points(&self) -> Vec<(f64, f64)> {
        self.samples
            .windows(2)
            .filter_map(|w| match (w[0].daemon_cpu_secs, w[1].daemon_cpu_secs) {
                (Some(a), Some(b)) if w[1].t > w[0].t => {
                    Some(((w[0].t + w[1].t) / 2.0, (b - a) / (w[1].t - w[0].t)))
                }
                _ => None,
            })
            .collect()
    }
}

/// Waits until every thread has tried all its connections; prints progress every second.
fn wait_connected(
    engine: &Engine,
    total: usize,
    quiet: bool,
    spawned: &mut Option<Spawned>,
    sampler: &mut Sampler,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let threads = engine.shared.counters.len();
    let mut last = Instant::now();
    loop {
        sampler.tick();
        let t = engine.totals();
        if t.threads_connected == threads {
            return Ok(started.elapsed().as_secs_f64());
        }
        if engine.any_thread_finished() {
            bail!("a generator thread ended while connecting");
        }
        if let Some(d) = spawned.as_mut() {
            if !d.is_running() {
                bail!("the daemon exited while connecting: {}", d.stop());
            }
        }
        if last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            progress(quiet, format!("connecting: {}/{total} connected, {} failed", t.connected, t.failed));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn write_json(path: &Option<std::path::PathBuf>, v: &Value) -> anyhow::Result<()> {
    if let Some(p) = path {
        std::fs::write(p, serde_json::to_string_pretty(v)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn write_svg(
    path: &Option<std::path::PathBuf>,
    title: &str,
    subtitle: &[String],
    x_label: &str,
    panels: &[svg::Panel],
) -> anyhow::Result<()> {
    if let Some(p) = path {
        std::fs::write(p, svg::render(title, subtitle, x_label, panels))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn series(name: &str, color: usize, points: Vec<(f64, f64)>) -> svg::Series {
    svg::Series { name: name.to_string(), color: svg::COLORS[color % svg::COLORS.len()], points }
}

fn memory_panels(sampler: &Sampler) -> Vec<svg::Panel> {
    vec![
        svg::Panel {
            title: "Daemon resident memory".into(),
            unit: "MiB".into(),
            log_y: false,
            series: vec![series("VmRSS", 0, sampler.rss_points())],
        },
        svg::Panel {
            title: "Daemon CPU".into(),
            unit: "cores".into(),
            log_y: false,
            series: vec![series("user+sys", 1, sampler.cpu_points())],
        },
    ]
}

/// "machine busy 97 %, CPU pressure 88 %, load 5.1" for the report lines and chart subtitles.
fn machine_line(c: &sys::CpuUse) -> String {
    let pct = |v: Option<f64>| v.map(|m| format!("{:.0} %", m * 100.0)).unwrap_or_else(|| "n/a".into());
    format!(
        "machine busy {}, CPU pressure {}, loadavg {}",
        pct(c.machine_busy),
        pct(c.cpu_pressure),
        loadavg()
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "n/a".into())
}

fn kib(v: Option<u64>) -> String {
    v.map(|k| format!("{} KiB ({:.1} MiB)", thousands(k as f64), k as f64 / 1024.0))
        .unwrap_or_else(|| "n/a".into())
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "n/a (no --pid)".into())
}

fn stop_daemon(spawned: &mut Option<Spawned>) -> Option<String> {
    spawned.as_mut().map(|d| d.stop())
}

fn target_line(info: &Value) -> String {
    match info.get("mode").and_then(Value::as_str) {
        Some("spawn") => format!(
            "daemon: --shards {} --driver {}, {} agents",
            info["shards"],
            info["driver"].as_str().unwrap_or("?"),
            info["agent_key"].as_str().unwrap_or("?")
        ),
        _ => format!("daemon at {}", info["addr"].as_str().unwrap_or("?")),
    }
}

fn gen_util(c: &sys::CpuUse) -> (String, bool) {
    let saturated = c.generator_thread_util.iter().any(|u| u.is_some_and(|u| u >= 0.9));
    let utils: Vec<String> = c
        .generator_thread_util
        .iter()
        .map(|u| u.map(|u| format!("{:.0} %", u * 100.0)).unwrap_or_else(|| "n/a".into()))
        .collect();
    (utils.join(", "), saturated)
}

pub fn idle(a: IdleArgs) -> anyhow::Result<i32> {
    let q = a.gen.quiet;
    let per_user = a.agents_per_user + a.clients_per_user;
    if per_user == 0 {
        bail!("a user needs at least one agent or client");
    }
    let users = a.conns.div_ceil(per_user);
    let conns = users * per_user;
    let (soft, hard) = check_fds(conns, q)?;
    let mut s = setup(&a.target, q, users, a.agents_per_user, a.clients_per_user)?;
    let cfg = engine_cfg(&a.gen, s.addr, 1, None, 2048);
    let threads = cfg.threads;
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = s.pid.and_then(sys::rss_kib);
    progress(q, format!("daemon RSS before connecting: {}", kib(rss_before)));

    let mut sampler = Sampler::new(s.pid, 0.5);
    let engine = Engine::start(cfg, s.plan.clone())?;
    let connect_secs = wait_connected(&engine, conns, q, &mut s.spawned, &mut sampler)?;
    let t = engine.totals();
    progress(q, format!("connected {} in {connect_secs:.1} s ({} failed)", t.connected, t.failed));
    engine.set_phase(PH_READY);
    let settle_end = Instant::now() + Duration::from_secs_f64(a.settle);
    while Instant::now() < settle_end {
        sampler.tick();
        std::thread::sleep(
            Duration::from_millis(20).min(settle_end.saturating_duration_since(Instant::now())),
        );
    }
    let rss_after = s.pid.and_then(sys::rss_kib);
    let tids = engine.tids();
    let hold_start = sampler.t0.elapsed().as_secs_f64();
    let snap0 = CpuSnap::take(s.pid, &tids);
    progress(q, format!("daemon RSS after connecting: {}; holding {} s", kib(rss_after), a.hold));
    let hold_end = Instant::now() + Duration::from_secs_f64(a.hold);
    let mut last = Instant::now();
    while Instant::now() < hold_end {
        sampler.tick();
        std::thread::sleep(Duration::from_millis(50).min(hold_end.saturating_duration_since(Instant::now())));
        if last.elapsed() >= Duration::from_secs(5) {
            last = Instant::now();
            let t = engine.totals();
            progress(q, format!("holding: {} live, {} closed by the relay", t.live, t.dead));
        }
    }
    let snap1 = CpuSnap::take(s.pid, &tids);
    sampler.sample();
    let rss_end = s.pid.and_then(sys::rss_kib);
    let hwm = s.pid.and_then(sys::hwm_kib);
    let results = engine.finish()?;
    let cpu = sys::cpu_use(&snap0, &snap1);
    let acc = report::account(&s.plan, &results);
    let connected: usize = results.iter().map(|r| r.connected.len()).sum();
    let connect_failures = report::merge_maps(results.iter().map(|r| &r.connect_failures));
    let failed = conns - connected;
    let exit = stop_daemon(&mut s.spawned);

    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) if connected > 0 => Some((a as f64 - b as f64) * 1024.0 / connected as f64),
        _ => None,
    };
    let mut failures = Vec::new();
    if failed > 0 {
        failures.push(format!("{failed} connections failed: {}", fmt_map(&connect_failures)));
    }
    if !acc.closes.is_empty() {
        failures.push(format!("connections closed during the hold: {}", fmt_map(&acc.closes)));
    }

    println!(
        "== idle: {connected} connections ({} agents, {} clients, {users} users); {} ==",
        s.plan.agents(),
        s.plan.clients(),
        target_line(&s.info)
    );
    println!(
        "connect:  {connect_secs:.2} s, {} handshakes/s, {failed} failed",
        thousands(connected as f64 / connect_secs.max(1e-9))
    );
    println!("daemon RSS before:        {}", kib(rss_before));
    println!("daemon RSS connected:     {}  (after {} s settle)", kib(rss_after), a.settle);
    println!("daemon RSS end of hold:   {}", kib(rss_end));
    println!("daemon RSS peak (VmHWM):  {}", kib(hwm));
    println!(
        "daemon RSS per connection: {}",
        opt(per_conn, |b| format!("{:.0} B ({:.2} KiB)", b, b / 1024.0))
    );
    println!(
        "daemon CPU while idle:    {} over {:.1} s",
        opt(cpu.daemon_cores, |c| format!(
            "{:.3} % of a core ({:.3} CPU-s)",
            c * 100.0,
            cpu.daemon_cpu_secs.unwrap_or(0.0)
        )),
        cpu.wall_secs
    );
    println!("machine while idle:       {}", machine_line(&cpu));
    println!("closed by the relay:      {}", fmt_map(&acc.closes));
    println!("frames while idle:        {}", fmt_map(&acc.other_frames));
    if let Some(e) = &exit {
        println!("daemon stopped:           {e}");
    }
    for f in &failures {
        println!("FAIL: {f}");
    }
    let report = json!({
        "scenario": "idle",
        "command": std::env::args().collect::<Vec<_>>(),
        "unix_time": crate::auth::unix_now(),
        "loadavg": loadavg(),
        "target": s.info,
        "generator": { "threads": threads, "driver": format!("{:?}", a.gen.gen_driver).to_lowercase(),
                       "source_addrs": a.gen.source_addrs, "nofile_soft": soft, "nofile_hard": hard },
        "plan": { "users": users, "agents_per_user": a.agents_per_user, "clients_per_user": a.clients_per_user,
                  "connections": conns },
        "connect": { "connected": connected, "failed": failed, "failures": connect_failures, "secs": connect_secs,
                     "handshakes_per_sec": connected as f64 / connect_secs.max(1e-9) },
        "daemon": { "rss_kib_before": rss_before, "rss_kib_connected": rss_after, "rss_kib_end": rss_end,
                    "rss_kib_peak": hwm, "rss_bytes_per_connection": per_conn, "settle_secs": a.settle },
        "idle_cpu": cpu,
        "memory": { "zero": "connect start", "hold_start_secs": hold_start, "samples": sampler.samples },
        "closes": acc.closes,
        "closed_cleanly_at_end": results.iter().map(|r| r.closed_cleanly).sum::<u64>(),
        "connect_secs_per_thread": results.iter().map(|r| r.connect_secs).collect::<Vec<_>>(),
        "frames": acc.other_frames,
        "daemon_exit": exit,
        "ok": failures.is_empty(),
        "failures": failures,
    });
    write_json(&a.gen.json_out, &report)?;
    write_svg(
        &a.gen.svg_out,
        &format!("switchboard-loadtest idle: {connected} connections"),
        &[
            target_line(&s.info),
            format!(
                "{} per connection; idle CPU {} of a core; hold from {hold_start:.0} s; {}",
                opt(per_conn, |b| format!("{b:.0} B")),
                opt(cpu.daemon_cores, |c| format!("{:.2} %", c * 100.0)),
                machine_line(&cpu)
            ),
        ],
        "seconds since the first connect",
        &memory_panels(&sampler),
    )?;
    Ok(if failures.is_empty() { 0 } else { 1 })
}

pub fn connect(a: ConnectArgs) -> anyhow::Result<i32> {
    let q = a.gen.quiet;
    let per_user = a.agents_per_user + a.clients_per_user;
    if per_user == 0 {
        bail!("a user needs at least one agent or client");
    }
    let users = a.conns.div_ceil(per_user);
    let conns = users * per_user;
    let (soft, hard) = check_fds(conns, q)?;
    let mut s = setup(&a.target, q, users, a.agents_per_user, a.clients_per_user)?;
    let cfg = engine_cfg(&a.gen, s.addr, 2, None, 2048);
    let threads = cfg.threads;
    std::thread::sleep(Duration::from_millis(300));
    let rss_before = s.pid.and_then(sys::rss_kib);
    let mut sampler = Sampler::new(s.pid, 0.1);
    let engine = Engine::start(cfg, s.plan.clone())?;
    let tids = engine.tids();
    let snap0 = CpuSnap::take(s.pid, &tids);
    wait_connected(&engine, conns, q, &mut s.spawned, &mut sampler)?;
    let snap1 = CpuSnap::take(s.pid, &tids);
    sampler.sample();
    let rss_connected = s.pid.and_then(sys::rss_kib);
    engine.set_phase(PH_READY);
    let hold_end = Instant::now() + Duration::from_secs_f64(a.hold);
    while Instant::now() < hold_end {
        sampler.tick();
        std::thread::sleep(Duration::from_millis(20).min(hold_end.saturating_duration_since(Instant::now())));
    }
    let hwm = s.pid.and_then(sys::hwm_kib);
    let results = engine.finish()?;
    let exit = stop_daemon(&mut s.spawned);
    let cpu = sys::cpu_use(&snap0, &snap1);
    let acc = report::account(&s.plan, &results);
    let connected: usize = results.iter().map(|r| r.connected.len()).sum();
    let failures_by = report::merge_maps(results.iter().map(|r| &r.connect_failures));
    let failed = conns - connected;
    // The connect phase ends when the last thread's last connection was tried.
    let secs = results.iter().map(|r| r.connect_secs).fold(0.0, f64::max).max(1e-9);
    let rate = connected as f64 / secs;
    let per_cpu = cpu.daemon_cpu_secs.map(|c| connected as f64 / c.max(1e-9));
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("bounds");
    for r in &results {
        hist.add(&r.connect_hist).expect("same bounds");
    }
    let (utils, saturated) = gen_util(&cpu);
    let timeline = report::sum_series(results.iter().map(|r| &r.connect_timeline));
    let mut failures = Vec::new();
    if failed > 0 {
        failures.push(format!("{failed} of {conns} connections failed: {}", fmt_map(&failures_by)));
    }
    if !acc.closes.is_empty() {
        failures.push(format!("connections closed by the relay: {}", fmt_map(&acc.closes)));
    }
    let pct = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;

    println!(
        "== connect: {conns} connections ({} agents, {} clients, {users} users), {} per thread in flight; {} ==",
        s.plan.agents(),
        s.plan.clients(),
        a.gen.connect_concurrency,
        target_line(&s.info)
    );
    println!("connected:           {connected} in {secs:.2} s, {failed} failed ({})", fmt_map(&failures_by));
    println!("handshakes/s:        {}", thousands(rate));
    println!(
        "daemon CPU:          {} ({})",
        opt(cpu.daemon_cpu_secs, |c| format!("{c:.2} CPU-s")),
        opt(cpu.daemon_cores, |c| format!("{c:.2} cores"))
    );
    println!("handshakes per daemon CPU-second: {}", opt(per_cpu, thousands));
    println!(
        "handshake latency (ms, TCP connect → welcome): p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        hist.max() as f64 / 1000.0
    );
    println!(
        "generator threads:   {utils} of a core each{}; {}",
        if saturated { " — SATURATED: the generator may be the bottleneck" } else { "" },
        machine_line(&cpu)
    );
    println!(
        "daemon RSS:          before {}, connected {}, peak {}",
        kib(rss_before),
        kib(rss_connected),
        kib(hwm)
    );
    if let Some(e) = &exit {
        println!("daemon stopped:      {e}");
    }
    for f in &failures {
        println!("FAIL: {f}");
    }
    let report = json!({
        "scenario": "connect",
        "command": std::env::args().collect::<Vec<_>>(),
        "unix_time": crate::auth::unix_now(),
        "loadavg": loadavg(),
        "target": s.info,
        "generator": { "threads": threads, "driver": format!("{:?}", a.gen.gen_driver).to_lowercase(),
                       "source_addrs": a.gen.source_addrs, "connect_concurrency": a.gen.connect_concurrency,
                       "nofile_soft": soft, "nofile_hard": hard, "thread_util": cpu.generator_thread_util,
                       "saturated": saturated },
        "plan": { "users": users, "agents_per_user": a.agents_per_user, "clients_per_user": a.clients_per_user,
                  "connections": conns },
        "results": {
            "connected": connected, "failed": failed, "failures": failures_by, "secs": secs,
            "handshakes_per_sec": rate, "handshakes_per_daemon_cpu_sec": per_cpu,
            "latency_ms": { "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "p99_9": pct(0.999),
                            "max": hist.max() as f64 / 1000.0, "count": hist.len() },
        },
        "cpu": cpu,
        "daemon": { "rss_kib_before": rss_before, "rss_kib_connected": rss_connected, "rss_kib_peak": hwm },
        "timeline": { "welcomes_per_100ms": timeline },
        "memory": { "zero": "connect start", "samples": sampler.samples },
        "closes": acc.closes,
        "daemon_exit": exit,
        "ok": failures.is_empty(),
        "failures": failures,
    });
    write_json(&a.gen.json_out, &report)?;
    let mut panels = vec![svg::Panel {
        title: "Handshakes completed".into(),
        unit: "per second, 100 ms bins".into(),
        log_y: false,
        series: vec![series(
            "welcomes/s",
            0,
            timeline.iter().enumerate().map(|(i, n)| (i as f64 / 10.0 + 0.05, *n as f64 * 10.0)).collect(),
        )],
    }];
    panels.extend(memory_panels(&sampler));
    write_svg(
        &a.gen.svg_out,
        &format!("switchboard-loadtest connect: {connected} connections"),
        &[
            target_line(&s.info),
            format!(
                "{} handshakes/s, {} per daemon CPU-s, p99 {:.1} ms; {}",
                thousands(rate),
                opt(per_cpu, thousands),
                pct(0.99),
                machine_line(&cpu)
            ),
        ],
        "seconds since the first connect",
        &panels,
    )?;
    Ok(if failures.is_empty() { 0 } else { 1 })
}

pub fn relay(a: RelayArgs) -> anyhow::Result<i32> {
    run_relay(&a, None)
}

pub fn soak(a: SoakArgs) -> anyhow::Result<i32> {
    if a.rate <= 0.0 {
        bail!("a soak runs at a fixed --rate (sends per second per sending connection)");
    }
    run_relay(&a.to_relay(), Some(a.sample_every))
}

/// Memory over a soak: start, peak, end and the growth rate.
#[derive(Debug, Clone, serde::Serialize)]
struct SoakMemory {
    rss_kib_start: Option<u64>,
    rss_kib_peak_sampled: Option<u64>,
    rss_kib_end: Option<u64>,
    /// Least-squares slope over the whole traffic window, KiB per minute.
    slope_kib_per_min: Option<f64>,
    /// The same over the second half (after the allocator's warm-up).
    slope_kib_per_min_second_half: Option<f64>,
    /// The second half's slope ÷ the inbound frames per second: bytes kept per relayed frame.
    bytes_per_inbound_frame_second_half: Option<f64>,
}

fn soak_memory(samples: &[MemSample], traffic_secs: f64, acked_per_sec: f64) -> SoakMemory {
    let pts: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.t <= traffic_secs + 0.01)
        .filter_map(|s| s.rss_kib.map(|k| (s.t, k as f64)))
        .collect();
    let half: Vec<(f64, f64)> = pts.iter().copied().filter(|p| p.0 >= traffic_secs / 2.0).collect();
    let s_all = report::slope(&pts);
    let s_half = report::slope(&half);
    SoakMemory {
        rss_kib_start: pts.first().map(|p| p.1 as u64),
        rss_kib_peak_sampled: pts.iter().map(|p| p.1 as u64).max(),
        rss_kib_end: pts.last().map(|p| p.1 as u64),
        slope_kib_per_min: s_all.map(|s| s * 60.0),
        slope_kib_per_min_second_half: s_half.map(|s| s * 60.0),
        bytes_per_inbound_frame_second_half: s_half
            .filter(|_| acked_per_sec > 0.0)
            .map(|s| s * 1024.0 / acked_per_sec),
    }
}

fn run_relay(a: &RelayArgs, soak: Option<f64>) -> anyhow::Result<i32> {
    let q = a.gen.quiet;
    let name = if soak.is_some() { "soak" } else { "relay" };
    let conns = a.users * (a.agents_per_user + a.clients_per_user);
    if conns == 0 {
        bail!("nothing to connect");
    }
    let (agents_send, clients_send) = match a.direction {
        Direction::AgentToClient => (true, false),
        Direction::ClientToAgent => (false, true),
        Direction::Both => (true, true),
    };
    if a.broadcast && !agents_send {
        bail!("--broadcast is for agents' sends (direction agent-to-client or both)");
    }
    if a.window == 0 {
        bail!("--window must be at least 1");
    }
    let (soft, hard) = check_fds(conns, q)?;
    let mut s = setup(&a.target, q, a.users, a.agents_per_user, a.clients_per_user)?;
    let traffic = Traffic {
        agents_send,
        clients_send,
        broadcast: a.broadcast,
        size: a.size,
        window: a.window,
        window_on_delivery: a.window_on == WindowOn::Delivery,
        rate: a.rate,
    };
    let cfg = engine_cfg(&a.gen, s.addr, 2, Some(traffic), 16 << 10);
    let threads = cfg.threads;
    let rss_before = s.pid.and_then(sys::rss_kib);
    let mut connect_sampler = Sampler::new(s.pid, 1.0);
    let engine = Engine::start(cfg, s.plan.clone())?;
    let connect_secs = wait_connected(&engine, conns, q, &mut s.spawned, &mut connect_sampler)?;
    let t = engine.totals();
    progress(q, format!("connected {} in {connect_secs:.1} s ({} failed)", t.connected, t.failed));
    if t.failed > 0 {
        let results = engine.finish()?;
        let f = report::merge_maps(results.iter().map(|r| &r.connect_failures));
        stop_daemon(&mut s.spawned);
        bail!(
            "{} of {conns} connections failed ({}); the {name} scenario needs all of them",
            t.failed,
            fmt_map(&f)
        );
    }
    engine.set_phase(PH_READY);
    std::thread::sleep(Duration::from_secs_f64(a.settle));
    let rss_connected = s.pid.and_then(sys::rss_kib);
    let tids = engine.tids();

    let snap0 = CpuSnap::take(s.pid, &tids);
    engine.set_phase(PH_RUN);
    let mut sampler = Sampler::new(s.pid, soak.unwrap_or(1.0));
    let run_end = Instant::now() + Duration::from_secs_f64(a.duration);
    let progress_every = Duration::from_secs(if soak.is_some() { 10 } else { 1 });
    let mut last = engine.totals();
    let mut last_at = Instant::now();
    let mut daemon_died = None;
    while Instant::now() < run_end {
        sampler.tick();
        std::thread::sleep(Duration::from_millis(20).min(run_end.saturating_duration_since(Instant::now())));
        if last_at.elapsed() >= progress_every {
            let t = engine.totals();
            let dt = last_at.elapsed().as_secs_f64();
            let rss = sampler.samples.last().and_then(|s| s.rss_kib);
            progress(
                q,
                format!(
                    "{name} {:.0} s: {} sent/s, {} delivered/s, {} in flight, {} errors, {} conns closed, daemon RSS {}",
                    sampler.t0.elapsed().as_secs_f64(),
                    thousands((t.sent - last.sent) as f64 / dt),
                    thousands((t.received - last.received) as f64 / dt),
                    t.inflight,
                    t.errors,
                    t.dead,
                    kib(rss)
                ),
            );
            last = t;
            last_at = Instant::now();
            if let Some(d) = s.spawned.as_mut() {
                if !d.is_running() {
                    daemon_died = Some(d.stop());
                    break;
                }
            }
        }
    }
    let snap1 = CpuSnap::take(s.pid, &tids);
    sampler.sample();
    engine.set_phase(PH_STOP);
    let drain_end = Instant::now() + Duration::from_secs_f64(a.drain_timeout);
    let mut drained = false;
    while Instant::now() < drain_end && daemon_died.is_none() {
        let t = engine.totals();
        if t.inflight == 0 && t.received >= t.expected {
            drained = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if !drained {
        // Whatever is still missing after the timeout is accounted as lost below.
        progress(q, "drain timed out; accounting what arrived");
    }
    let snap2 = CpuSnap::take(s.pid, &tids);
    sampler.sample();
    let rss_end = s.pid.and_then(sys::rss_kib);
    let hwm = s.pid.and_then(sys::hwm_kib);
    let results = engine.finish()?;
    let exit = stop_daemon(&mut s.spawned);

    let acc = report::account(&s.plan, &results);
    let hist = report::merged_hist(&results);
    let lat = report::latency(&hist);
    let send_cpu = sys::cpu_use(&snap0, &snap1);
    let all_cpu = sys::cpu_use(&snap0, &snap2);
    let window_secs = send_cpu.wall_secs;
    let delivered_per_sec = acc.delivered as f64 / window_secs;
    let sent_per_sec = acc.sent as f64 / window_secs;
    let acked_per_sec = acc.acked as f64 / window_secs;
    let frames_per_cpu = all_cpu.daemon_cpu_secs.map(|c| acc.acked as f64 / c.max(1e-9));
    let deliveries_per_cpu = all_cpu.daemon_cpu_secs.map(|c| acc.delivered as f64 / c.max(1e-9));
    let (utils, saturated) = gen_util(&send_cpu);
    let timeline_received = report::sum_series(results.iter().map(|r| &r.timeline_received));
    let timeline_sent = report::sum_series(results.iter().map(|r| &r.timeline_sent));
    let timeline_acked = report::sum_series(results.iter().map(|r| &r.timeline_acked));
    let lat_series = report::latency_series(&results);
    let soak_mem = soak.map(|_| soak_memory(&sampler.samples, window_secs, acked_per_sec));
    let mut failures = acc.failures();
    if let Some(d) = &daemon_died {
        failures.push(format!("the daemon exited during the run: {d}"));
    }
    if !drained && failures.is_empty() {
        failures.push("the drain timed out".into());
    }
    if soak.is_some() && !acc.closes.is_empty() {
        // A soak measures a steady state: connections the relay closed end it early.
        failures.push(format!("the relay closed connections during the soak: {}", fmt_map(&acc.closes)));
    }

    let dir = match (a.direction, a.broadcast) {
        (Direction::AgentToClient, true) => format!("agent broadcast → {} clients", a.clients_per_user),
        (Direction::AgentToClient, false) => "agent → client unicast".into(),
        (Direction::ClientToAgent, _) => "client → agent".into(),
        (Direction::Both, true) => "agent broadcast + client → agent".into(),
        (Direction::Both, false) => "both ways unicast".into(),
    };
    let rate_text = if a.rate > 0.0 { format!("{} msg/s per sender", a.rate) } else { "max rate".into() };
    println!(
        "== {name}: {} users × ({} agents + {} clients) = {conns} connections, {dir}, {} B data, window {} (until {}), {rate_text}; {} ==",
        a.users,
        a.agents_per_user,
        a.clients_per_user,
        a.size,
        a.window,
        if a.window_on == WindowOn::Delivery { "delivered" } else { "acked" },
        target_line(&s.info)
    );
    println!("traffic window:      {window_secs:.2} s (then {:.2} s drain)", all_cpu.wall_secs - window_secs);
    println!("sent:                {} ({}/s)", thousands(acc.sent as f64), thousands(sent_per_sec));
    println!("inbound frames (acked): {} ({}/s)", thousands(acc.acked as f64), thousands(acked_per_sec));
    println!("deliveries:          {} ({}/s)", thousands(acc.delivered as f64), thousands(delivered_per_sec));
    println!(
        "daemon CPU:          {} over send+drain ({})",
        opt(all_cpu.daemon_cpu_secs, |c| format!("{c:.2} CPU-s")),
        opt(all_cpu.daemon_cores, |c| format!("{c:.2} cores"))
    );
    println!("inbound frames relayed per daemon CPU-second: {}", opt(frames_per_cpu, thousands));
    println!("deliveries per daemon CPU-second:             {}", opt(deliveries_per_cpu, thousands));
    println!(
        "latency (µs):        p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}  (n = {})",
        lat.p50_us, lat.p90_us, lat.p99_us, lat.p99_9_us, lat.max_us, lat.count
    );
    println!(
        "generator threads:   {utils} of a core each{}; {}",
        if saturated { " — SATURATED: the generator may be the bottleneck" } else { "" },
        machine_line(&send_cpu)
    );
    println!(
        "daemon RSS:          before {}, connected {}, end {}, peak {}",
        kib(rss_before),
        kib(rss_connected),
        kib(rss_end),
        kib(hwm)
    );
    if let Some(m) = &soak_mem {
        println!(
            "soak memory:         start {}, peak (sampled) {}, end of traffic {}",
            kib(m.rss_kib_start),
            kib(m.rss_kib_peak_sampled),
            kib(m.rss_kib_end)
        );
        let f =
            |v: Option<f64>, unit: &str| v.map(|v| format!("{v:+.1} {unit}")).unwrap_or_else(|| "n/a".into());
        println!(
            "soak memory slope:   {} over the run, {} over the second half ({} per inbound frame)",
            f(m.slope_kib_per_min, "KiB/min"),
            f(m.slope_kib_per_min_second_half, "KiB/min"),
            m.bytes_per_inbound_frame_second_half
                .map(|v| format!("{v:+.3} B"))
                .unwrap_or_else(|| "n/a".into())
        );
    }
    println!("accounting:");
    println!(
        "  sent {}  acked {}  answered with error {}  unanswered {} (+{} on closed connections)",
        acc.sent,
        acc.acked,
        acc.answered_error.values().sum::<u64>(),
        acc.unanswered_live,
        acc.unanswered_closed
    );
    println!(
        "  expected deliveries {}  delivered {}  dropped (reported) {}  lost on closed connections {}  LOST UNREPORTED {}",
        acc.expected_deliveries, acc.delivered, acc.dropped_reported, acc.lost_on_closed_connection, acc.lost_unreported
    );
    println!(
        "  duplicates {}  out of order {}  wrong user {}  wrong connection {}  wrong from {}  phantom {}  unparseable {}",
        acc.duplicates, acc.out_of_order, acc.wrong_user, acc.misdirected, acc.from_mismatch, acc.phantom, acc.unparseable
    );
    println!("  errors by code: {}", fmt_map(&acc.error_frames));
    println!("  closed by the relay: {}", fmt_map(&acc.closes));
    if let Some(e) = &exit {
        println!("daemon stopped: {e}");
    }
    if failures.is_empty() {
        println!("OK: every message is accounted for");
    }
    for f in &failures {
        println!("FAIL: {f}");
    }

    let report = json!({
        "scenario": name,
        "command": std::env::args().collect::<Vec<_>>(),
        "unix_time": crate::auth::unix_now(),
        "loadavg": loadavg(),
        "target": s.info,
        "generator": { "threads": threads, "driver": format!("{:?}", a.gen.gen_driver).to_lowercase(),
                       "source_addrs": a.gen.source_addrs, "nofile_soft": soft, "nofile_hard": hard,
                       "thread_util": send_cpu.generator_thread_util, "saturated": saturated },
        "plan": { "users": a.users, "agents_per_user": a.agents_per_user, "clients_per_user": a.clients_per_user,
                  "connections": conns, "direction": format!("{:?}", a.direction), "broadcast": a.broadcast,
                  "data_bytes": a.size, "window": a.window, "window_on": format!("{:?}", a.window_on).to_lowercase(), "rate_per_sender": a.rate, "duration_secs": a.duration },
        "connect": { "secs": connect_secs, "handshakes_per_sec": conns as f64 / connect_secs.max(1e-9) },
        "results": {
            "traffic_secs": window_secs,
            "drain_secs": all_cpu.wall_secs - window_secs,
            "drained": drained,
            "sent_per_sec": sent_per_sec,
            "inbound_frames_per_sec": acked_per_sec,
            "delivered_per_sec": delivered_per_sec,
            "inbound_frames_per_daemon_cpu_sec": frames_per_cpu,
            "deliveries_per_daemon_cpu_sec": deliveries_per_cpu,
            "latency": lat,
        },
        "cpu_traffic": send_cpu,
        "cpu_traffic_and_drain": all_cpu,
        "daemon": { "rss_kib_before": rss_before, "rss_kib_connected": rss_connected, "rss_kib_end": rss_end,
                    "rss_kib_peak": hwm },
        "soak": soak_mem,
        "accounting": acc,
        "closed_cleanly_at_end": results.iter().map(|r| r.closed_cleanly).sum::<u64>(),
        "timeline": { "sent_per_sec": timeline_sent, "inbound_frames_per_sec": timeline_acked,
                      "delivered_per_sec": timeline_received, "latency_per_sec": lat_series },
        "memory": { "zero": "traffic start", "samples": sampler.samples },
        "daemon_exit": exit,
        "ok": failures.is_empty(),
        "failures": failures,
    });
    write_json(&a.gen.json_out, &report)?;
    if a.gen.svg_out.is_some() {
        // Whole seconds of traffic only: a partial last second would read as a dip.
        let full = (window_secs.floor() as usize).max(1);
        let per_sec =
            |v: &[u64]| svg::per_second(&v.iter().take(full).map(|x| *x as f64).collect::<Vec<_>>());
        let lat_pts = |f: fn(&report::SecLatency) -> f64| -> Vec<(f64, f64)> {
            lat_series
                .iter()
                .take(full)
                .enumerate()
                .map(|(i, l)| (i as f64 + 0.5, l.as_ref().map(|l| f(l) / 1000.0).unwrap_or(f64::NAN)))
                .collect()
        };
        let mut panels = vec![
            svg::Panel {
                title: "Throughput".into(),
                unit: "per second".into(),
                log_y: false,
                series: vec![
                    series("sends", 0, per_sec(&timeline_sent)),
                    series("inbound frames (acked)", 1, per_sec(&timeline_acked)),
                    series("deliveries", 2, per_sec(&timeline_received)),
                ],
            },
            svg::Panel {
                title: "End-to-end latency per second".into(),
                unit: "ms, log scale".into(),
                log_y: true,
                series: vec![
                    series("p50", 0, lat_pts(|l| l.p50_us)),
                    series("p90", 2, lat_pts(|l| l.p90_us)),
                    series("p99", 1, lat_pts(|l| l.p99_us)),
                    series("p99.9", 3, lat_pts(|l| l.p99_9_us)),
                    series("max", 6, lat_pts(|l| l.max_us)),
                ],
            },
        ];
        panels.extend(memory_panels(&sampler));
        write_svg(
            &a.gen.svg_out,
            &format!("switchboard-loadtest {name}: {conns} connections, {dir}, {rate_text}"),
            &{
                let mut lines = vec![
                    target_line(&s.info),
                    format!(
                        "{} inbound frames and {} deliveries per daemon CPU-s; p50 {:.2} ms, p99 {:.2} ms",
                        opt(frames_per_cpu, thousands),
                        opt(deliveries_per_cpu, thousands),
                        lat.p50_us / 1000.0,
                        lat.p99_us / 1000.0
                    ),
                    format!(
                        "generator threads {utils}{}; {}{}",
                        if saturated { " (SATURATED)" } else { "" },
                        machine_line(&send_cpu),
                        if failures.is_empty() {
                            String::new()
                        } else {
                            format!("; FAILED: {}", failures.join("; "))
                        }
                    ),
                ];
                if let Some(m) = &soak_mem {
                    lines.push(format!(
                        "daemon RSS {} → {} KiB; slope {} KiB/min over the second half ({} B per inbound frame)",
                        m.rss_kib_start.map(|v| v.to_string()).unwrap_or_else(|| "n/a".into()),
                        m.rss_kib_end.map(|v| v.to_string()).unwrap_or_else(|| "n/a".into()),
                        m.slope_kib_per_min_second_half.map(|v| format!("{v:+.1}")).unwrap_or_else(|| "n/a".into()),
                        m.bytes_per_inbound_frame_second_half.map(|v| format!("{v:+.3}")).unwrap_or_else(|| "n/a".into())
                    ));
                }
                lines
            },
            "seconds since the traffic started",
            &panels,
        )?;
    }
    Ok(if failures.is_empty() { 0 } else { 1 })
}
