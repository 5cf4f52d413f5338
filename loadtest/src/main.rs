//! `switchboard-loadtest`: drives a Switchboard daemon (or any relay that speaks its wire
//! protocol v1) over real sockets with the real protocol — signed agent upgrades, signed
//! agent messages, client JWTs — and reports what the daemon cost and what happened to every
//! message. See loadtest/README.md.

mod auth;
mod engine;
mod plan;
mod report;
mod scenario;
mod svg;
mod sys;
mod target;
mod wsproto;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "switchboard-loadtest", version, about = "Load generator for the Switchboard relay")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Hold N authenticated idle connections: daemon memory per connection, CPU while idle.
    Idle(IdleArgs),
    /// Users with agents and clients exchanging signed messages: throughput per daemon
    /// CPU-second, end-to-end latency, and the accounting of every message.
    Relay(RelayArgs),
    /// Open N authenticated connections as fast as possible: handshakes/s (per wall second
    /// and per daemon CPU-second), handshake latency, failures by status.
    Connect(ConnectArgs),
    /// `relay` at a fixed rate for minutes, sampling the daemon's memory: start, peak, end
    /// and the slope.
    Soak(SoakArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AgentKeyKind {
    /// HMAC-SHA256 secrets (`sbk_…`).
    Hmac,
    /// Ed25519 key pairs generated here; the daemon gets the public keys.
    Ed25519,
}

/// Which daemon to drive.
#[derive(Args, Debug, Clone)]
pub struct TargetArgs {
    /// Start this `switchboard` binary (temp data dir, limits lifted, agents and tokens
    /// through its CLI) and stop it at the end.
    #[arg(long, value_name = "PATH", conflicts_with = "addr")]
    pub spawn: Option<PathBuf>,
    /// Spawned daemon: shards.
    #[arg(long, default_value_t = 2)]
    pub shards: usize,
    /// Spawned daemon: I/O driver (auto, uring, legacy).
    #[arg(long, default_value = "auto")]
    pub driver: String,
    /// Spawned daemon: TOML merged over the built-in load-test config.
    #[arg(long, value_name = "FILE")]
    pub daemon_config: Option<PathBuf>,
    /// Spawned daemon: log level (default warn, so logging is not measured).
    #[arg(long, value_name = "LEVEL")]
    pub daemon_log_level: Option<String>,
    /// Spawned daemon: keep its temp dir (data, config, log) and print where it is.
    #[arg(long)]
    pub keep_daemon_dir: bool,
    /// Spawned daemon: the agents' credentials (upgrade and message signatures).
    #[arg(long, value_enum, default_value_t = AgentKeyKind::Hmac)]
    pub agent_key: AgentKeyKind,
    /// Spawned daemon: CLI processes (`agent create`, `token`) run at once.
    #[arg(long, default_value_t = 4)]
    pub cli_parallel: usize,
    /// A running daemon's public address.
    #[arg(long, value_name = "ADDR", required_unless_present = "spawn")]
    pub addr: Option<SocketAddr>,
    /// A running daemon's pid, for its memory and CPU from /proc (figures are omitted without).
    #[arg(long)]
    pub pid: Option<u32>,
    /// A running daemon: agents to use, a JSON array of {"agent_id","user","secret"} (HMAC)
    /// or {"agent_id","user","ed25519_seed"} (Ed25519: the 32-byte seed, base64url or hex).
    #[arg(long, value_name = "FILE")]
    pub agents_file: Option<PathBuf>,
    /// A running daemon: the HS256 secret its clients' JWTs are signed with.
    #[arg(long, value_name = "FILE")]
    pub jwt_secret_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GenDriver {
    Legacy,
    Uring,
}

/// How the generator runs.
#[derive(Args, Debug, Clone)]
pub struct GenArgs {
    /// Generator threads (each a monoio runtime); default 1 for idle, 2 for relay, soak and connect.
    #[arg(long)]
    pub threads: Option<usize>,
    /// The generator's own I/O driver.
    #[arg(long, value_enum, default_value_t = GenDriver::Legacy)]
    pub gen_driver: GenDriver,
    /// Spread connections over 127.0.0.1 … 127.0.0.N (loopback targets only).
    #[arg(long, default_value_t = 4)]
    pub source_addrs: u8,
    /// Upgrades in progress at once, per thread.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Seconds one connection may take to get its welcome.
    #[arg(long, default_value_t = 15)]
    pub connect_timeout: u64,
    /// Write the JSON report here.
    #[arg(long, value_name = "FILE")]
    pub json_out: Option<PathBuf>,
    /// Write an SVG chart of the run here (throughput, latency percentiles and daemon memory
    /// over time).
    #[arg(long, value_name = "FILE")]
    pub svg_out: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone)]
pub struct IdleArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub gen: GenArgs,
    /// Total connections (users = conns / (agents + clients per user), rounded up).
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    #[arg(long, default_value_t = 1)]
    pub agents_per_user: usize,
    #[arg(long, default_value_t = 1)]
    pub clients_per_user: usize,
    /// Seconds to wait after the last connect before measuring memory.
    #[arg(long, default_value_t = 3.0)]
    pub settle: f64,
    /// Seconds to hold the connections idle (CPU is measured over this).
    #[arg(long, default_value_t = 30.0)]
    pub hold: f64,
}

#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub gen: GenArgs,
    /// Total connections (users = conns / (agents + clients per user), rounded up).
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    #[arg(long, default_value_t = 1)]
    pub agents_per_user: usize,
    #[arg(long, default_value_t = 1)]
    pub clients_per_user: usize,
    /// Seconds to keep the connections open after the last one connected (then they close).
    #[arg(long, default_value_t = 0.0)]
    pub hold: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Direction {
    /// Agents send to their user's clients.
    AgentToClient,
    /// Clients send to their user's agents.
    ClientToAgent,
    /// Both.
    Both,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WindowOn {
    /// A send leaves the window when the relay acks it and the generator has received it.
    Delivery,
    /// A send leaves the window when the relay acks it (or answers `error`).
    Ack,
}

#[derive(Args, Debug, Clone)]
pub struct RelayArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub gen: GenArgs,
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    #[arg(long, default_value_t = 1)]
    pub agents_per_user: usize,
    #[arg(long, default_value_t = 1)]
    pub clients_per_user: usize,
    #[arg(long, value_enum, default_value_t = Direction::AgentToClient)]
    pub direction: Direction,
    /// Agents broadcast (no `to`: every client of the user) instead of addressing clients.
    #[arg(long)]
    pub broadcast: bool,
    /// Bytes of each message's `data` (at least the ~50 the sequence fields need).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Sends per connection in flight (see --window-on).
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// What ends a send's time in the window: its delivery to every recipient (closed loop
    /// end to end) or only the relay's ack (the relay's outbound queues may then grow).
    #[arg(long, value_enum, default_value_t = WindowOn::Delivery)]
    pub window_on: WindowOn,
    /// Sends per second per sending connection; 0 = as fast as the window allows.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Seconds of traffic.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds to wait after connecting before the traffic starts.
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    /// Seconds to wait, after the traffic stops, for answers and deliveries.
    #[arg(long, default_value_t = 10.0)]
    pub drain_timeout: f64,
}

#[derive(Args, Debug, Clone)]
pub struct SoakArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub gen: GenArgs,
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    #[arg(long, default_value_t = 1)]
    pub agents_per_user: usize,
    #[arg(long, default_value_t = 1)]
    pub clients_per_user: usize,
    #[arg(long, value_enum, default_value_t = Direction::AgentToClient)]
    pub direction: Direction,
    /// Agents broadcast to every client of their user.
    #[arg(long)]
    pub broadcast: bool,
    /// Bytes of each message's `data`.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Sends per connection in flight.
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    #[arg(long, value_enum, default_value_t = WindowOn::Delivery)]
    pub window_on: WindowOn,
    /// Sends per second per sending connection (a soak runs at a fixed rate).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Minutes of traffic.
    #[arg(long, default_value_t = 10.0)]
    pub minutes: f64,
    /// Seconds between two samples of the daemon's memory and CPU.
    #[arg(long, default_value_t = 1.0)]
    pub sample_every: f64,
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    #[arg(long, default_value_t = 10.0)]
    pub drain_timeout: f64,
}

impl SoakArgs {
    pub fn to_relay(&self) -> RelayArgs {
        RelayArgs {
            target: self.target.clone(),
            gen: self.gen.clone(),
            users: self.users,
            agents_per_user: self.agents_per_user,
            clients_per_user: self.clients_per_user,
            direction: self.direction,
            broadcast: self.broadcast,
            size: self.size,
            window: self.window,
            window_on: self.window_on,
            rate: self.rate,
            duration: self.minutes * 60.0,
            settle: self.settle,
            drain_timeout: self.drain_timeout,
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.scenario {
        Scenario::Idle(a) => scenario::idle(a),
        Scenario::Relay(a) => scenario::relay(a),
        Scenario::Connect(a) => scenario::connect(a),
        Scenario::Soak(a) => scenario::soak(a),
    };
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("switchboard-loadtest: {e:#}");
            std::process::exit(2);
        }
    }
}
