//! The `switchboard` binary: parses the command line, then hands off to the library.

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use switchboard::config::{Config, Driver};

#[derive(Parser)]
#[command(
    name = "switchboard",
    version,
    about = "A thread-per-core WebSocket relay between AI agents and their users' clients"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay daemon.
    Serve(ServeArgs),
    /// Create, list and revoke agents.
    #[command(subcommand)]
    Agent(switchboard::cli::AgentCmd),
    /// Mint a client JWT with the configured HS256 secret (for development and tests).
    Token(switchboard::cli::TokenArgs),
    /// Validate the configuration and print it (secrets redacted).
    CheckConfig(ConfigArgs),
    /// List connection records, newest first (works while the daemon runs).
    Connections(switchboard::cli::ConnectionsArgs),
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// TOML configuration file (default: /etc/switchboard/switchboard.toml when it exists).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Public listener for agents and clients [default: 127.0.0.1:7600].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Admin listener for /metrics, /healthz, /readyz [default: 127.0.0.1:7601].
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// State directory (LMDB store, generated JWT key) [default: ./switchboard-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// File holding the HS256 secret for client JWTs.
    #[arg(long)]
    jwt_hs256_secret_file: Option<PathBuf>,
    /// Number of shards (threads) [default: one per allowed CPU].
    #[arg(long)]
    shards: Option<usize>,
    /// I/O driver: auto (io_uring, falling back to epoll), uring or legacy [default: auto].
    #[arg(long)]
    driver: Option<Driver>,
    /// Time allowed for a request head to arrive: `10s`, `500ms`, `1m` (a bare number is
    /// seconds) [default: 10s].
    #[arg(long, value_parser = parse_timeout_ms)]
    handshake_timeout: Option<u64>,
}

/// Parses `500ms`, `10s`, `1m` or a bare number of seconds into milliseconds.
fn parse_timeout_ms(s: &str) -> Result<u64, String> {
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else {
        (s, 1000)
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 10s or 500ms"))?;
    match n.checked_mul(mult) {
        Some(ms) if ms > 0 => Ok(ms),
        _ => Err(format!("{s:?} must be a positive duration")),
    }
}

fn load(args: &ConfigArgs) -> anyhow::Result<Config> {
    Ok(Config::load(args.config.as_deref())?)
}

/// The configuration for `serve`: file and environment, then the flags on top.
fn serve_config(a: &ServeArgs) -> anyhow::Result<Config> {
    let mut c = load(&a.config)?;
    if let Some(v) = a.listen {
        c.server.listen = v;
    }
    if let Some(v) = a.admin_listen {
        c.server.admin_listen = v;
    }
    if let Some(v) = &a.data_dir {
        c.server.data_dir = v.clone();
    }
    if let Some(v) = &a.jwt_hs256_secret_file {
        c.jwt.hs256_secret_file = Some(v.clone());
    }
    if let Some(v) = a.shards {
        c.server.shards = v;
    }
    if let Some(v) = a.driver {
        c.server.driver = v;
    }
    if let Some(v) = a.handshake_timeout {
        c.server.handshake_timeout_ms = v;
    }
    c.validate()?;
    Ok(c)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(a) => {
            let c = serve_config(&a)?;
            switchboard::logging::init(&c.log.level);
            switchboard::server::serve(c, move || serve_config(&a))
        }
        Command::Agent(cmd) => switchboard::cli::run_agent(cmd),
        Command::Token(args) => switchboard::cli::run_token(args),
        Command::Connections(args) => switchboard::cli::run_connections(args),
        Command::CheckConfig(a) => {
            let c = load(&a)?;
            c.validate()?;
            println!("{}", toml::to_string_pretty(&c)?);
            Ok(())
        }
    }
}
