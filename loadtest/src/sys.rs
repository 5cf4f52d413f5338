//! What the load generator reads from the kernel: the file-descriptor limit, a process's
//! resident memory and CPU time from /proc, per-thread CPU time, and the machine's busy time.
//!
//! All CPU figures are in seconds (converted from clock ticks with `sysconf(_SC_CLK_TCK)`),
//! memory in KiB, exactly as /proc reports it.

use std::time::Instant;

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) after the change.
/// Children inherit the raised limit, so a daemon spawned afterwards gets it too.
pub fn raise_nofile() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a stack struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// The soft RLIMIT_NOFILE of another process (from /proc/<pid>/limits).
pub fn nofile_of(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// A `VmXxx:` field of /proc/<pid>/status, in KiB.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

/// Resident memory (VmRSS) in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// Peak resident memory (VmHWM) in KiB.
pub fn hwm_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// user+sys CPU seconds from a /proc `stat` file.
fn stat_cpu(path: &str) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clk_tck())
}

/// A process's user+sys CPU seconds (all its threads).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    stat_cpu(&format!("/proc/{pid}/stat"))
}

/// One thread of this process: user+sys CPU seconds.
pub fn thread_cpu_secs(tid: i32) -> Option<f64> {
    stat_cpu(&format!("/proc/self/task/{tid}/stat"))
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Machine-wide (busy, total) CPU seconds from the first line of /proc/stat.
pub fn machine_cpu() -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    let t = clk_tck();
    Some(((total - idle) as f64 / t, total as f64 / t))
}

/// Microseconds during which some runnable task waited for a CPU (/proc/pressure/cpu, PSI
/// "some" total); None where the kernel has no PSI.
pub fn cpu_pressure_us() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/pressure/cpu").ok()?;
    let line = text.lines().find(|l| l.starts_with("some"))?;
    line.split_whitespace().find_map(|f| f.strip_prefix("total="))?.parse().ok()
}

/// CPU counters of the daemon, the generator's threads and the machine at one instant;
/// two of them give utilisation over an interval.
#[derive(Debug, Clone)]
pub struct CpuSnap {
    pub at: Instant,
    pub daemon: Option<f64>,
    pub threads: Vec<Option<f64>>,
    pub generator: Option<f64>,
    pub machine: Option<(f64, f64)>,
    pub pressure_us: Option<u64>,
}

impl CpuSnap {
    pub fn take(daemon_pid: Option<u32>, tids: &[i32]) -> CpuSnap {
        CpuSnap {
            at: Instant::now(),
            daemon: daemon_pid.and_then(cpu_secs),
            threads: tids.iter().map(|&t| thread_cpu_secs(t)).collect(),
            generator: cpu_secs(std::process::id()),
            machine: machine_cpu(),
            pressure_us: cpu_pressure_us(),
        }
    }
}

/// Utilisation between two snapshots.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CpuUse {
    pub wall_secs: f64,
    /// Daemon user+sys seconds over the interval.
    pub daemon_cpu_secs: Option<f64>,
    /// Daemon CPU as a fraction of one core.
    pub daemon_cores: Option<f64>,
    /// Each generator worker thread's CPU as a fraction of one core.
    pub generator_thread_util: Vec<Option<f64>>,
    /// The whole generator process (workers, coordinator) in cores.
    pub generator_cores: Option<f64>,
    /// Fraction of all the machine's cores that were busy (every process, not just ours).
    pub machine_busy: Option<f64>,
    /// Fraction of the time some runnable task waited for a CPU (PSI): near 1 means the
    /// machine was oversubscribed and latency includes run-queue waits.
    pub cpu_pressure: Option<f64>,
}

pub fn cpu_use(a: &CpuSnap, b: &CpuSnap) -> CpuUse {
    let wall = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
    let daemon = match (a.daemon, b.daemon) {
        (Some(x), Some(y)) => Some(y - x),
        _ => None,
    };
    let threads = a
        .threads
        .iter()
        .zip(&b.threads)
        .map(|(x, y)| match (x, y) {
            (Some(x), Some(y)) => Some((y - x) / wall),
            _ => None,
        })
        .collect();
    let generator = match (a.generator, b.generator) {
        (Some(x), Some(y)) => Some((y - x) / wall),
        _ => None,
    };
    let machine = match (a.machine, b.machine) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => Some((b1 - b0) / (t1 - t0)),
        _ => None,
    };
    let pressure = match (a.pressure_us, b.pressure_us) {
        (Some(x), Some(y)) => Some((y.saturating_sub(x)) as f64 / 1e6 / wall),
        _ => None,
    };
    CpuUse {
        cpu_pressure: pressure,
        wall_secs: wall,
        daemon_cpu_secs: daemon,
        daemon_cores: daemon.map(|d| d / wall),
        generator_thread_util: threads,
        generator_cores: generator,
        machine_busy: machine,
    }
}
