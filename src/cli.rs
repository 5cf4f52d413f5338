//! The operator's commands that do not run the daemon: `agent create|list|revoke`, `token` and
//! `connections`.
//!
//! Owns: their argument surface (spec §9) as clap types that `main` embeds, their output (JSON
//! with `--json`, otherwise human-readable), and duration / public-key parsing.
//!
//! Must stay true:
//! - These commands open the store themselves and work while a daemon runs on the same data
//!   dir: they never take the [`DataDirLock`](crate::store::DataDirLock), and they open LMDB
//!   with map size 0 (adopt the daemon's).
//! - Every option value may start with `-` (`--flag=value` always works, `--flag -v` too); a
//!   positional id that starts with `-` works after `--`.
//! - An HMAC secret is printed once, by `agent create`, and nowhere else (`list` never shows it).
//! - `--json` output field names are part of the contract (tests in other languages read them).
//! - Failures return `Err` (so `main` exits non-zero) with a message naming what is wrong.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use serde::Serialize;

use crate::ids;
use crate::store::{
    self, AgentRecord, ConnectionFilter, ConnectionRecord, NewCredential, RevokeOutcome, Store,
};

/// Where the data dir is when `--data-dir` is not given.
pub const DEFAULT_DATA_DIR: &str = "./switchboard-data";

/// `switchboard agent …`
#[derive(Debug, clap::Subcommand)]
pub enum AgentCmd {
    /// Create an agent and print its id (and, for an HMAC agent, its secret — shown only once).
    Create(CreateArgs),
    /// List agents (never their secrets).
    List(ListArgs),
    /// Revoke an agent: its upgrades are refused and the running daemon disconnects it (4003).
    Revoke(RevokeArgs),
}

/// The data dir option shared by every command.
#[derive(Debug, Clone, clap::Args)]
pub struct DataDirArg {
    /// Data directory (LMDB environment, generated JWT key).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR, allow_hyphen_values = true)]
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, clap::Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub data_dir: DataDirArg,
    /// The user (tenant) the agent acts for: 1 to 128 bytes of UTF-8.
    #[arg(long, value_name = "U", allow_hyphen_values = true)]
    pub user: String,
    /// Display name shown to the user's clients: 1 to 128 bytes.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub name: String,
    /// Make an Ed25519 agent with this public key (32 bytes as base64url, padded or not, or 64
    /// hex characters) instead of an HMAC agent with a generated secret.
    #[arg(long, value_name = "KEY", allow_hyphen_values = true, value_parser = parse_ed25519_pubkey)]
    pub ed25519_pubkey: Option<[u8; 32]>,
    /// The agent stops working after this long (e.g. 30d, 12h).
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true, value_parser = parse_duration)]
    pub expires_in: Option<Duration>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub data_dir: DataDirArg,
    /// Only this user's agents.
    #[arg(long, value_name = "U", allow_hyphen_values = true)]
    pub user: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RevokeArgs {
    #[command(flatten)]
    pub data_dir: DataDirArg,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// The agent to revoke (an id that starts with '-' goes after `--`).
    #[arg(value_name = "AGENT_ID", allow_hyphen_values = true)]
    pub agent_id: String,
}

/// `switchboard token …`: mint an HS256 client JWT for a user.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub data_dir: DataDirArg,
    /// Sign with this file's content (whitespace trimmed) instead of the data dir's generated key.
    #[arg(long, value_name = "FILE", allow_hyphen_values = true)]
    pub jwt_hs256_secret_file: Option<PathBuf>,
    /// The user id (JWT `sub`).
    #[arg(long, value_name = "U", allow_hyphen_values = true)]
    pub user: String,
    /// Limit the token to this agent (repeatable; the `agents` claim).
    #[arg(long = "agent", value_name = "A", allow_hyphen_values = true)]
    pub agents: Vec<String>,
    /// Lifetime of the token (e.g. 1h, 90s, 7d).
    #[arg(long, value_name = "DURATION", default_value = "1h", allow_hyphen_values = true, value_parser = parse_duration)]
    pub ttl: Duration,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `switchboard connections …`: list connection records, newest first.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionsArgs {
    #[command(flatten)]
    pub data_dir: DataDirArg,
    /// Only this user's connections.
    #[arg(long, value_name = "U", allow_hyphen_values = true)]
    pub user: Option<String>,
    /// Only this agent's connections and the client sessions bound to it.
    #[arg(long, value_name = "A", allow_hyphen_values = true)]
    pub agent: Option<String>,
    /// Show at most this many (the newest); 0 shows all.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub limit: usize,
    /// Print a JSON array (every field of every record).
    #[arg(long)]
    pub json: bool,
}

/// Run an `agent` subcommand, printing to stdout.
pub fn run_agent(cmd: AgentCmd) -> anyhow::Result<()> {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    run_agent_to(cmd, &mut out)?;
    out.flush()?;
    Ok(())
}

/// Run `token`, printing to stdout.
pub fn run_token(args: TokenArgs) -> anyhow::Result<()> {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    run_token_to(args, &mut out, store::unix_now())?;
    out.flush()?;
    Ok(())
}

/// Run `connections`, printing to stdout.
pub fn run_connections(args: ConnectionsArgs) -> anyhow::Result<()> {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    connections(args, &mut out)?;
    out.flush()?;
    Ok(())
}

fn run_agent_to(cmd: AgentCmd, out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        AgentCmd::Create(a) => create(a, out),
        AgentCmd::List(a) => list(a, out),
        AgentCmd::Revoke(a) => revoke(a, out),
    }
}

fn open_store(dir: &Path) -> anyhow::Result<Store> {
    // Map size 0: adopt the size the daemon (or an earlier run) gave the environment.
    Store::open(dir, 0).with_context(|| format!("opening the store in {}", dir.display()))
}

#[derive(Serialize)]
struct CreatedJson<'a> {
    agent_id: &'a str,
    user: &'a str,
    name: &'a str,
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<&'a str>,
    created: u64,
    expires_at: Option<u64>,
}

fn create(a: CreateArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    store::validate_user(&a.user).context("--user")?;
    store::validate_name(&a.name).context("--name")?;
    let expires = match a.expires_in {
        None => None,
        Some(d) => Some(
            store::unix_now().checked_add(d.as_secs()).context("--expires-in is too far in the future")?,
        ),
    };
    let cred = match a.ed25519_pubkey {
        Some(key) => NewCredential::Ed25519(key),
        None => NewCredential::Hmac,
    };
    let dir = &a.data_dir.data_dir;
    let store = open_store(dir)?;
    let (rec, secret) = store.create_agent(&a.user, &a.name, cred, expires).context("creating the agent")?;
    if a.json {
        let j = CreatedJson {
            agent_id: &rec.agent_id,
            user: &rec.user,
            name: &rec.name,
            kind: rec.credential.kind(),
            secret: secret.as_deref(),
            created: rec.created,
            expires_at: rec.expires,
        };
        serde_json::to_writer(&mut *out, &j)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "Created agent {}", rec.agent_id)?;
    writeln!(out, "  user:    {}", printable(&rec.user))?;
    writeln!(out, "  name:    {}", printable(&rec.name))?;
    writeln!(out, "  kind:    {}", rec.credential.kind())?;
    writeln!(out, "  expires: {}", rec.expires.map_or_else(|| "never".to_owned(), fmt_time))?;
    match secret {
        Some(secret) => {
            writeln!(out, "  secret:  {secret}")?;
            writeln!(out)?;
            writeln!(out, "The secret is shown only this once: store it with the agent now.")?;
            writeln!(out, "It cannot be recovered; if it is lost, revoke the agent and create another.")?;
        }
        None => {
            writeln!(out)?;
            writeln!(out, "The agent signs its upgrades with the matching Ed25519 private key.")?;
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct ListedJson<'a> {
    agent_id: &'a str,
    user: &'a str,
    name: &'a str,
    kind: &'static str,
    revoked: bool,
    revoked_at: Option<u64>,
    expired: bool,
    created: u64,
    expires_at: Option<u64>,
    last_connected: Option<u64>,
    last_seen: Option<u64>,
    last_disconnected: Option<u64>,
}

impl<'a> ListedJson<'a> {
    fn new(r: &'a AgentRecord, now: u64) -> Self {
        ListedJson {
            agent_id: &r.agent_id,
            user: &r.user,
            name: &r.name,
            kind: r.credential.kind(),
            revoked: r.revoked,
            revoked_at: r.revoked_at,
            expired: r.is_expired(now),
            created: r.created,
            expires_at: r.expires,
            last_connected: r.last_connected,
            last_seen: r.last_seen,
            last_disconnected: r.last_disconnected,
        }
    }
}

fn list(a: ListArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let dir = &a.data_dir.data_dir;
    // Listing never creates a data dir: none means no agents.
    let agents = if Store::exists(dir) {
        open_store(dir)?.list_agents(a.user.as_deref()).context("listing agents")?
    } else {
        Vec::new()
    };
    let now = store::unix_now();
    if a.json {
        let rows: Vec<ListedJson> = agents.iter().map(|r| ListedJson::new(r, now)).collect();
        serde_json::to_writer(&mut *out, &rows)?;
        writeln!(out)?;
        return Ok(());
    }
    if agents.is_empty() {
        writeln!(out, "no agents")?;
        return Ok(());
    }
    let header = ["AGENT_ID", "USER", "NAME", "KIND", "STATUS", "CREATED", "EXPIRES", "LAST_SEEN"];
    let rows: Vec<[String; 8]> = agents
        .iter()
        .map(|r| {
            let status = if r.revoked {
                "revoked"
            } else if r.is_expired(now) {
                "expired"
            } else {
                "active"
            };
            [
                r.agent_id.clone(),
                printable(&r.user),
                printable(&r.name),
                r.credential.kind().to_owned(),
                status.to_owned(),
                fmt_time(r.created),
                r.expires.map_or_else(|| "never".to_owned(), fmt_time),
                r.last_seen.map_or_else(|| "-".to_owned(), fmt_time),
            ]
        })
        .collect();
    Ok(write_table(out, &header, &rows)?)
}

/// Aligned columns separated by two spaces, header first; no trailing spaces.
fn write_table<const N: usize>(
    out: &mut dyn Write,
    header: &[&str; N],
    rows: &[[String; N]],
) -> io::Result<()> {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: &mut dyn Iterator<Item = &str>| -> io::Result<()> {
        let mut s = String::new();
        for (i, (cell, w)) in cells.zip(widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(cell);
            if i + 1 < widths.len() {
                s.extend(std::iter::repeat_n(' ', w.saturating_sub(cell.chars().count())));
            }
        }
        writeln!(out, "{}", s.trim_end())
    };
    line(&mut header.iter().copied())?;
    for row in rows {
        line(&mut row.iter().map(String::as_str))?;
    }
    Ok(())
}

fn connections(a: ConnectionsArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let dir = &a.data_dir.data_dir;
    let filter = ConnectionFilter { user: a.user, agent: a.agent, limit: (a.limit > 0).then_some(a.limit) };
    // Listing never creates a data dir: none means no records.
    let records = if Store::exists(dir) {
        open_store(dir)?.list_connections(&filter).context("listing connection records")?
    } else {
        Vec::new()
    };
    if a.json {
        serde_json::to_writer(&mut *out, &records)?;
        writeln!(out)?;
        return Ok(());
    }
    if records.is_empty() {
        writeln!(out, "no connection records")?;
        return Ok(());
    }
    let header = [
        "OPENED",
        "CONN_ID",
        "ROLE",
        "USER",
        "AGENT",
        "REMOTE",
        "LAST_SEEN",
        "CLOSED",
        "CODE",
        "FRAMES_IN",
        "FRAMES_OUT",
        "BYTES_IN",
        "BYTES_OUT",
    ];
    let dash = || "-".to_owned();
    let rows: Vec<[String; 13]> = records
        .iter()
        .map(|r: &ConnectionRecord| {
            [
                fmt_time(r.opened),
                printable(&r.conn_id),
                r.role.to_string(),
                printable(&r.user),
                r.agent_id.as_deref().map_or_else(dash, printable),
                printable(&r.remote),
                fmt_time(r.last_seen),
                r.closed.map_or_else(dash, fmt_time),
                r.close_code.map_or_else(dash, |c| c.to_string()),
                r.frames_in.to_string(),
                r.frames_out.to_string(),
                r.bytes_in.to_string(),
                r.bytes_out.to_string(),
            ]
        })
        .collect();
    write_table(out, &header, &rows)?;
    Ok(())
}

fn revoke(a: RevokeArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let dir = &a.data_dir.data_dir;
    let id = &a.agent_id;
    let outcome = if Store::exists(dir) {
        open_store(dir)?.revoke_agent(id).context("revoking the agent")?
    } else {
        RevokeOutcome::NotFound
    };
    if outcome == RevokeOutcome::NotFound {
        bail!("no agent {} in {}", printable(id), dir.display());
    }
    let already = outcome == RevokeOutcome::AlreadyRevoked;
    if a.json {
        let j = serde_json::json!({ "agent_id": id, "revoked": true, "already_revoked": already });
        writeln!(out, "{j}")?;
    } else if already {
        writeln!(out, "agent {id} was already revoked")?;
    } else {
        writeln!(out, "revoked agent {id}; a running daemon disconnects it within 2 s")?;
    }
    Ok(())
}

fn run_token_to(a: TokenArgs, out: &mut dyn Write, now: u64) -> anyhow::Result<()> {
    if a.user.is_empty() || a.user.len() > store::MAX_USER_BYTES {
        bail!("--user must be 1 to {} bytes", store::MAX_USER_BYTES);
    }
    for agent in &a.agents {
        if !ids::is_valid_id(agent) {
            bail!("--agent {} is not an agent id (1 to 64 of [A-Za-z0-9_-])", printable(agent));
        }
    }
    let dir = &a.data_dir.data_dir;
    let key = match &a.jwt_hs256_secret_file {
        Some(path) => store::read_secret_file(path)?,
        None => store::read_jwt_key(dir)?.with_context(|| {
            format!(
                "no JWT key in {} ({}): start `switchboard serve` once on this data dir to \
                 generate it, or pass --jwt-hs256-secret-file FILE",
                dir.display(),
                store::JWT_KEY_FILE
            )
        })?,
    };
    let ttl = a.ttl.as_secs();
    let expires_at = now.checked_add(ttl).context("--ttl is too long")?;
    let token = crate::auth::jwt::mint_hs256(&key, &a.user, &a.agents, ttl, now);
    if a.json {
        writeln!(out, "{}", serde_json::json!({ "token": token, "expires_at": expires_at }))?;
    } else {
        writeln!(out, "{token}")?;
    }
    Ok(())
}

/// Parse a duration: a whole number followed by one unit, `s`, `m`, `h` or `d` (e.g. `90s`,
/// `30d`). Zero is refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad =
        || format!("invalid duration {s:?}: expected a number with a unit s, m, h or d (e.g. 90s, 1h, 30d)");
    let unit_at = s.len().checked_sub(1).filter(|&i| i > 0 && s.is_char_boundary(i)).ok_or_else(bad)?;
    let (digits, unit) = s.split_at(unit_at);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let mul = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(bad()),
    };
    if n == 0 {
        return Err(format!("invalid duration {s:?}: must be more than zero"));
    }
    n.checked_mul(mul).map(Duration::from_secs).ok_or_else(|| format!("duration {s:?} is too long"))
}

/// Parse an Ed25519 public key: 32 bytes as base64url (padded or not) or as 64 hex characters.
pub fn parse_ed25519_pubkey(s: &str) -> Result<[u8; 32], String> {
    let bad = || {
        "invalid Ed25519 public key: expected 32 bytes as base64url (43 characters, or 44 with '=' \
         padding) or as 64 hex characters"
            .to_owned()
    };
    let bytes = if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| bad())?
    } else {
        const B64URL_ANY_PAD: GeneralPurpose = GeneralPurpose::new(
            &URL_SAFE,
            GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
        );
        B64URL_ANY_PAD.decode(s).map_err(|_| bad())?
    };
    <[u8; 32]>::try_from(bytes).map_err(|_| bad())
}

/// Control characters replaced, so a table or message cannot be garbled by stored text.
fn printable(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// A Unix time as `YYYY-MM-DD HH:MM:SSZ` (UTC).
fn fmt_time(t: u64) -> String {
    let days = t / 86400;
    let secs = t % 86400;
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (non-negative here).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    #[command(name = "switchboard")]
    struct Cli {
        #[command(subcommand)]
        cmd: Top,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Top {
        #[command(subcommand)]
        Agent(AgentCmd),
        Token(TokenArgs),
        Connections(ConnectionsArgs),
    }

    fn parse(args: &[&str]) -> Result<Top, clap::Error> {
        Cli::try_parse_from(std::iter::once("switchboard").chain(args.iter().copied())).map(|c| c.cmd)
    }

    fn agent(args: &[&str]) -> AgentCmd {
        match parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}")) {
            Top::Agent(a) => a,
            _ => panic!("not an agent command"),
        }
    }

    fn token(args: &[&str]) -> TokenArgs {
        match parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}")) {
            Top::Token(t) => t,
            _ => panic!("not token"),
        }
    }

    fn conns(args: &[&str]) -> ConnectionsArgs {
        match parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}")) {
            Top::Connections(c) => c,
            _ => panic!("not connections"),
        }
    }

    const KEY_B64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8";

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert_eq!(parse_duration("007s"), Ok(Duration::from_secs(7)));
        for bad in
            ["", "s", "1", "10", "1.5h", "-1h", "+1h", "1 h", " 1h", "1H", "1w", "h1", "1hh", "0s", "1é"]
        {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert!(parse_duration("99999999999999999999d").is_err());
        assert!(parse_duration(&format!("{}d", u64::MAX / 86400 + 1)).is_err());
    }

    #[test]
    fn pubkeys() {
        let want: [u8; 32] = std::array::from_fn(|i| i as u8);
        assert_eq!(parse_ed25519_pubkey(KEY_B64), Ok(want));
        assert_eq!(parse_ed25519_pubkey(&format!("{KEY_B64}=")), Ok(want));
        let hex: String = want.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(parse_ed25519_pubkey(&hex), Ok(want));
        assert_eq!(parse_ed25519_pubkey(&hex.to_uppercase()), Ok(want));
        let dash = [0xfbu8; 32]; // base64url starts with '-'
        let enc = URL_SAFE_NO_PAD.encode(dash);
        assert!(enc.starts_with('-'));
        assert_eq!(parse_ed25519_pubkey(&enc), Ok(dash));
        for bad in
            ["", "abc", &hex[..62], &format!("{hex}00"), &KEY_B64[..42], "+/+/", &format!("{KEY_B64}AAAA")]
        {
            assert!(parse_ed25519_pubkey(bad).is_err(), "{bad:?}");
        }
        // Standard-alphabet base64 is not base64url.
        let std_b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(dash);
        assert!(parse_ed25519_pubkey(&std_b64).is_err());
    }

    #[test]
    fn parse_create() {
        let AgentCmd::Create(c) = agent(&["agent", "create", "--user", "alice", "--name", "n", "--json"])
        else {
            panic!()
        };
        assert_eq!(c.data_dir.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!((c.user.as_str(), c.name.as_str(), c.json), ("alice", "n", true));
        assert_eq!((c.ed25519_pubkey, c.expires_in), (None, None));

        let dash_key = URL_SAFE_NO_PAD.encode([0xfbu8; 32]);
        let key_arg = format!("--ed25519-pubkey={dash_key}");
        let AgentCmd::Create(c) = agent(&[
            "agent",
            "create",
            "--data-dir=-d",
            "--user=-alice",
            "--name",
            "-laptop",
            &key_arg,
            "--expires-in",
            "30d",
        ]) else {
            panic!()
        };
        assert_eq!(c.data_dir.data_dir, PathBuf::from("-d"));
        assert_eq!((c.user.as_str(), c.name.as_str(), c.json), ("-alice", "-laptop", false));
        assert_eq!(c.ed25519_pubkey, Some([0xfb; 32]));
        assert_eq!(c.expires_in, Some(Duration::from_secs(30 * 86400)));
        let AgentCmd::Create(c) =
            agent(&["agent", "create", "--user", "u", "--name", "n", "--ed25519-pubkey", &dash_key])
        else {
            panic!()
        };
        assert_eq!(c.ed25519_pubkey, Some([0xfb; 32]));

        assert!(parse(&["agent", "create", "--user", "u"]).is_err());
        assert!(parse(&["agent", "create", "--user", "u", "--name", "n", "--expires-in", "30"]).is_err());
        assert!(parse(&["agent", "create", "--user", "u", "--name", "n", "--ed25519-pubkey", "xyz"]).is_err());
    }

    #[test]
    fn parse_list_revoke() {
        let AgentCmd::List(l) = agent(&["agent", "list", "--data-dir", "/x", "--user=-bob", "--json"]) else {
            panic!()
        };
        assert_eq!(
            (l.data_dir.data_dir.to_str(), l.user.as_deref(), l.json),
            (Some("/x"), Some("-bob"), true)
        );
        let AgentCmd::List(l) = agent(&["agent", "list"]) else { panic!() };
        assert_eq!((l.user, l.json), (None, false));

        for args in [
            &["agent", "revoke", "--", "-abc"][..],
            &["agent", "revoke", "--json", "--", "-abc"],
            &["agent", "revoke", "--data-dir", "d", "--", "-abc"],
            &["agent", "revoke", "-abc"],
        ] {
            let AgentCmd::Revoke(r) = agent(args) else { panic!() };
            assert_eq!(r.agent_id, "-abc", "{args:?}");
        }
        let AgentCmd::Revoke(r) = agent(&["agent", "revoke", "--json", "ag_x"]) else { panic!() };
        assert_eq!((r.agent_id.as_str(), r.json), ("ag_x", true));
        assert!(parse(&["agent", "revoke"]).is_err());
        assert!(parse(&["agent", "revoke", "a", "b"]).is_err());
    }

    #[test]
    fn parse_token() {
        let t =
            token(&["token", "--user", "alice", "--agent", "ag_1", "--agent=-ag2", "--ttl", "90s", "--json"]);
        assert_eq!(t.user, "alice");
        assert_eq!(t.agents, ["ag_1", "-ag2"]);
        assert_eq!(t.ttl, Duration::from_secs(90));
        assert!(t.json);
        assert_eq!(t.jwt_hs256_secret_file, None);
        let t = token(&["token", "--user=-u", "--jwt-hs256-secret-file", "-f"]);
        assert_eq!(t.user, "-u");
        assert_eq!(t.ttl, Duration::from_secs(3600));
        assert_eq!(t.jwt_hs256_secret_file, Some(PathBuf::from("-f")));
        assert!(t.agents.is_empty());
        assert!(parse(&["token"]).is_err());
        assert!(parse(&["token", "--user", "u", "--ttl", "1x"]).is_err());
    }

    fn run_agent_json(args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut out = Vec::new();
        run_agent_to(agent(args), &mut out)?;
        Ok(serde_json::from_slice(&out).expect("JSON output"))
    }

    fn run_agent_text(args: &[&str]) -> anyhow::Result<String> {
        let mut out = Vec::new();
        run_agent_to(agent(args), &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn agent_commands_end_to_end() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("data");
        let d = format!("--data-dir={}", dir.display());

        // Nothing there yet: list is empty and creates nothing; revoke fails.
        assert_eq!(run_agent_json(&["agent", "list", &d, "--json"]).unwrap(), serde_json::json!([]));
        assert_eq!(run_agent_text(&["agent", "list", &d]).unwrap(), "no agents\n");
        assert!(!dir.exists());
        assert!(run_agent_text(&["agent", "revoke", &d, "ag_x"]).is_err());

        let h = run_agent_json(&["agent", "create", &d, "--user", "alice", "--name", "laptop", "--json"])
            .unwrap();
        let id = h["agent_id"].as_str().unwrap().to_owned();
        let secret = h["secret"].as_str().unwrap().to_owned();
        assert!(secret.starts_with("sbk_"));
        assert_eq!(
            (h["user"].as_str(), h["name"].as_str(), h["kind"].as_str()),
            (Some("alice"), Some("laptop"), Some("hmac"))
        );
        assert!(h["expires_at"].is_null());

        let e = run_agent_json(&[
            "agent",
            "create",
            &d,
            "--user",
            "alice",
            "--name",
            "gw",
            "--ed25519-pubkey",
            KEY_B64,
            "--expires-in",
            "1h",
            "--json",
        ])
        .unwrap();
        assert!(e.get("secret").is_none());
        assert_eq!(e["kind"], "ed25519");
        let exp = e["expires_at"].as_u64().unwrap();
        assert!(exp.abs_diff(store::unix_now() + 3600) <= 5);

        let text = run_agent_text(&["agent", "create", &d, "--user", "bob", "--name", "b"]).unwrap();
        assert!(text.contains("shown only this once"), "{text}");
        assert!(text.contains("sbk_"), "{text}");

        let all = run_agent_json(&["agent", "list", &d, "--json"]).unwrap();
        let all = all.as_array().unwrap();
        assert_eq!(all.len(), 3);
        let listed = serde_json::to_string(all).unwrap();
        assert!(!listed.contains(&secret) && !listed.contains("sbk_"), "list leaked a secret");
        for key in [
            "agent_id",
            "user",
            "name",
            "kind",
            "revoked",
            "created",
            "expires_at",
            "last_connected",
            "last_seen",
            "last_disconnected",
        ] {
            assert!(all[0].get(key).is_some(), "missing {key}");
        }
        let alice = run_agent_json(&["agent", "list", &d, "--user", "alice", "--json"]).unwrap();
        assert_eq!(alice.as_array().unwrap().len(), 2);
        let table = run_agent_text(&["agent", "list", &d]).unwrap();
        assert!(table.starts_with("AGENT_ID"), "{table}");
        assert_eq!(table.lines().count(), 4, "{table}");
        assert!(!table.contains("sbk_"));

        let r = run_agent_json(&["agent", "revoke", &d, "--json", &id]).unwrap();
        assert_eq!(r, serde_json::json!({"agent_id": id, "revoked": true, "already_revoked": false}));
        let again = run_agent_text(&["agent", "revoke", &d, &id]).unwrap();
        assert!(again.contains("already revoked"));
        let err = run_agent_text(&["agent", "revoke", &d, "--", "-nope"]).unwrap_err();
        assert!(format!("{err:#}").contains("no agent"), "{err:#}");
        let alice = run_agent_json(&["agent", "list", &d, "--user", "alice", "--json"]).unwrap();
        let revoked: Vec<bool> =
            alice.as_array().unwrap().iter().map(|a| a["revoked"].as_bool().unwrap()).collect();
        assert_eq!(revoked.iter().filter(|r| **r).count(), 1);

        // Validation errors are errors.
        assert!(run_agent_text(&["agent", "create", &d, "--user", "", "--name", "n"]).is_err());
        let long = "x".repeat(129);
        assert!(run_agent_text(&["agent", "create", &d, "--user", "u", "--name", &long]).is_err());
    }

    #[test]
    fn parse_connections() {
        let c = conns(&["connections"]);
        assert_eq!(c.data_dir.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!((c.user, c.agent, c.limit, c.json), (None, None, 100, false));
        let c =
            conns(&["connections", "--data-dir=/d", "--user=-u", "--agent", "-ag", "--limit", "5", "--json"]);
        assert_eq!(c.data_dir.data_dir, PathBuf::from("/d"));
        assert_eq!(
            (c.user.as_deref(), c.agent.as_deref(), c.limit, c.json),
            (Some("-u"), Some("-ag"), 5, true)
        );
        assert!(parse(&["connections", "--limit", "-1"]).is_err());
        assert!(parse(&["connections", "--limit", "x"]).is_err());
        assert!(parse(&["connections", "extra"]).is_err());
    }

    fn run_conns_text(args: &[&str]) -> String {
        let mut out = Vec::new();
        connections(conns(args), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn connections_command() {
        use crate::store::{ConnectionRecord, Role, WriteOp};
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("data");
        let d = format!("--data-dir={}", dir.display());
        // No data dir: nothing listed, nothing created.
        assert_eq!(run_conns_text(&["connections", &d]), "no connection records\n");
        assert_eq!(run_conns_text(&["connections", &d, "--json"]), "[]\n");
        assert!(!dir.exists());

        let store = Store::open(&dir, 32).unwrap();
        let mut ops = Vec::new();
        for i in 0..5u64 {
            let (role, agent) =
                if i % 2 == 0 { (Role::Agent, Some("ag_1".to_owned())) } else { (Role::Client, None) };
            let user = if i < 3 { "alice" } else { "bob\x1b" };
            let rec =
                ConnectionRecord::new(format!("c_{i}"), user, role, agent, "127.0.0.1:9", 1_700_000_000 + i);
            ops.push(WriteOp::ConnectionOpened(Box::new(rec)));
        }
        ops.push(WriteOp::ConnectionClosed {
            conn_id: "c_0".into(),
            opened: 1_700_000_000,
            last_seen: 1_700_000_050,
            closed: 1_700_000_060,
            frames_in: 1,
            frames_out: 2,
            bytes_in: 3,
            bytes_out: 4,
            close_code: Some(4003),
        });
        store.apply_batch(&ops).unwrap();

        let mut out = Vec::new();
        connections(conns(&["connections", &d, "--json", "--limit=0"]), &mut out).unwrap();
        let all: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let all = all.as_array().unwrap();
        let ids: Vec<&str> = all.iter().map(|r| r["conn_id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["c_4", "c_3", "c_2", "c_1", "c_0"]);
        assert_eq!(
            all[4],
            serde_json::json!({
                "conn_id": "c_0", "user": "alice", "role": "agent", "agent_id": "ag_1",
                "remote": "127.0.0.1:9", "opened": 1_700_000_000u64, "last_seen": 1_700_000_050u64,
                "closed": 1_700_000_060u64, "frames_in": 1, "frames_out": 2, "bytes_in": 3,
                "bytes_out": 4, "close_code": 4003
            })
        );
        assert!(all[0]["closed"].is_null() && all[0]["close_code"].is_null() && all[1]["agent_id"].is_null());

        let text = run_conns_text(&["connections", &d, "--user", "alice", "--agent", "ag_1"]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("OPENED") && lines[0].ends_with("BYTES_OUT"), "{text}");
        assert!(lines[1].contains("c_2") && lines[2].contains("c_0"), "{text}");
        assert!(lines[2].contains("4003") && lines[2].contains("2023-11-14 22:14:20Z"), "{text}");
        // Stored text cannot garble the table.
        let text = run_conns_text(&["connections", &d, "--limit", "1"]);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains("bob?") && !text.contains('\x1b'), "{text}");
        assert_eq!(run_conns_text(&["connections", &d, "--user", "carol"]), "no connection records\n");
    }

    fn decode_claims(jwt: &str, key: &[u8]) -> serde_json::Value {
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "HS256");
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        let signing_input = format!("{}.{}", parts[0], parts[1]);
        ring::hmac::verify(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
            signing_input.as_bytes(),
            &sig,
        )
        .expect("signature verifies with the expected key");
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap()
    }

    #[test]
    fn token_command() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("data");
        let d = format!("--data-dir={}", dir.display());
        let mut out = Vec::new();

        // No key yet: a helpful error.
        let err = run_token_to(token(&["token", &d, "--user", "alice"]), &mut out, 1000).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("serve") && msg.contains("--jwt-hs256-secret-file"), "{msg}");

        let (key, _, _) = store::ensure_jwt_key(&dir).unwrap();
        run_token_to(token(&["token", &d, "--user", "alice", "--ttl", "90s", "--json"]), &mut out, 1000)
            .unwrap();
        let j: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(j["expires_at"], 1090);
        let claims = decode_claims(j["token"].as_str().unwrap(), &key);
        assert_eq!(
            (claims["sub"].as_str(), claims["iat"].as_u64(), claims["exp"].as_u64()),
            (Some("alice"), Some(1000), Some(1090))
        );
        assert!(claims.get("agents").is_none());

        // A secret file wins over the data dir's key; its whitespace is trimmed.
        let f = t.path().join("hs.key");
        std::fs::write(&f, "  s3cret \n").unwrap();
        let fa = format!("--jwt-hs256-secret-file={}", f.display());
        out.clear();
        run_token_to(
            token(&["token", &d, &fa, "--user", "bob", "--agent", "ag_1", "--agent", "-ag_2"]),
            &mut out,
            5,
        )
        .unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        let claims = decode_claims(text.trim_end(), b"s3cret");
        assert_eq!(claims["agents"], serde_json::json!(["ag_1", "-ag_2"]));
        assert_eq!(claims["exp"], 3605);

        out.clear();
        assert!(run_token_to(token(&["token", &d, "--user", ""]), &mut out, 5).is_err());
        assert!(run_token_to(token(&["token", &d, "--user", "u", "--agent", "a b"]), &mut out, 5).is_err());
        std::fs::write(&f, " \n").unwrap();
        assert!(run_token_to(token(&["token", &d, &fa, "--user", "u"]), &mut out, 5).is_err());
    }

    #[test]
    fn times() {
        assert_eq!(fmt_time(0), "1970-01-01 00:00:00Z");
        assert_eq!(fmt_time(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(fmt_time(1_700_000_000), "2023-11-14 22:13:20Z");
        assert_eq!(printable("a\nb\x1b"), "a?b?");
    }
}
