//! The settings tree. Every field has a default (the spec's), every section denies unknown
//! keys, and [`Config::validate`] names the key that is wrong.
//!
//! Precedence is flags > environment (`SWITCHBOARD_…`) > file > defaults; the file and the
//! environment are merged here, the flags by `main`.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Where the config file is looked for when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/switchboard/switchboard.toml";

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: Server,
    pub limits: Limits,
    pub auth: Auth,
    pub jwt: Jwt,
    pub presence: Presence,
    pub log: Log,
    pub records: Records,
    pub history: History,
    pub mailbox: Mailbox,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// io_uring, falling back to epoll when the kernel or a seccomp profile refuses it.
    Auto,
    Uring,
    Legacy,
}

impl std::str::FromStr for Driver {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Driver::Auto),
            "uring" => Ok(Driver::Uring),
            "legacy" => Ok(Driver::Legacy),
            _ => Err(format!("unknown driver {s:?} (expected auto, uring or legacy)")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    Off,
    Required,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Server {
    /// Public listener (agents and clients). Port 0 binds one ephemeral port for all shards.
    pub listen: SocketAddr,
    /// Admin listener (`/metrics`, `/healthz`, `/readyz`); keep it on loopback.
    pub admin_listen: SocketAddr,
    /// LMDB environment, the generated JWT key and the lock file live here.
    pub data_dir: PathBuf,
    /// Number of shards (threads); 0 = one per CPU in the process's allowed set.
    pub shards: usize,
    pub driver: Driver,
    /// A request head must arrive completely within this time, or the socket is dropped.
    pub handshake_timeout_ms: u64,
    /// Largest accepted request head; larger gets 431.
    pub max_head_bytes: usize,
    /// Global cap on open public connections (handshaking or upgraded); over it, 503.
    pub max_connections: usize,
    /// LMDB map size: the most the store can ever hold.
    pub store_map_size_mb: usize,
    /// Per-connection tungstenite read buffer; small keeps idle connections cheap.
    pub ws_read_buffer_bytes: usize,
    /// Serve `wss://` with this certificate chain (PEM); needs `tls_key_file`. Reloaded on
    /// SIGHUP (new connections get the new certificate; existing ones keep their session).
    pub tls_cert_file: Option<PathBuf>,
    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub tls_key_file: Option<PathBuf>,
    /// PROXY protocol v2 on the public listener: `off`, or `required` (every connection must
    /// come from `trusted_proxies` and start with a v2 header, whose client address then
    /// drives per-IP limits and logs).
    pub proxy_protocol: ProxyProtocol,
    /// Networks (CIDR, or single addresses) allowed to send a PROXY header.
    pub trusted_proxies: Vec<String>,
    /// TEST ONLY: serve `/v1/echo`, an unauthenticated WebSocket echo used to run the
    /// Autobahn conformance suite against our WebSocket layer. Never enable in production.
    pub echo_endpoint: bool,
    /// On SIGTERM, connections get this long to finish their close handshake before exit.
    pub shutdown_timeout_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Ping every interval; no frame from the peer for two intervals closes with 1011.
    pub heartbeat_secs: u64,
    /// No frame from the peer for this long closes with 4000.
    pub idle_timeout_secs: u64,
    /// A frame (or reassembled message) over this many bytes closes with 1009.
    pub max_frame_bytes: usize,
    /// Bytes of frames waiting to be written per connection; overflow closes with 4008.
    pub send_buffer_bytes: usize,
    /// Live connections per user; the next upgrade gets 429.
    pub max_connections_per_user: usize,
    /// Sustained `send` rate per user (all its connections together).
    pub messages_per_sec_per_user: u32,
    /// Burst allowance on top of the sustained rate.
    pub messages_burst_per_user: u32,
    /// A user over its rate for this long has the offending connection closed with 4029.
    pub rate_abuse_close_secs: u64,
    /// Sustained HTTP requests per client IP on the public listener.
    pub handshakes_per_sec_per_ip: u32,
    pub handshakes_burst_per_ip: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageSignatures {
    Required,
    Off,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    /// Agent upgrade timestamps further than this from the relay's clock are refused.
    pub max_skew_secs: u64,
    /// Whether every agent `send` must carry `ctr` and `sig` (spec §3.2).
    pub agent_message_signatures: MessageSignatures,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtKey {
    /// RS256, ES256 or EdDSA.
    pub alg: String,
    /// PEM file holding the public key.
    pub file: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Jwt {
    /// File whose content (trimmed) is the HS256 secret. When no key at all is configured,
    /// `serve` generates one in the data dir.
    pub hs256_secret_file: Option<PathBuf>,
    /// Public keys for RS256/ES256/EdDSA tokens.
    pub public_keys: Vec<JwtKey>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_secs: u64,
    /// The claim that holds the user id.
    pub user_claim: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Presence {
    /// An agent that reconnects within this time never appears offline.
    pub offline_grace_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    /// tracing filter directive: error, warn, info, debug, trace.
    pub level: String,
}

/// Connection records (`switchboard connections`): the writer deletes the oldest beyond either
/// bound, checking every few seconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Records {
    /// Most connection records kept. Each takes about 0.5 KiB of the LMDB map;
    /// `server.store_map_size_mb` must allow 1 KiB for each.
    pub max_records: u64,
    /// Records of connections opened longer ago than this many days are deleted.
    pub max_age_days: u64,
}

/// Client streams (spec §8): what each (user, agent) stream keeps for clients that resume.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct History {
    /// Most messages kept per stream; 0 turns history off (messages still carry `seq`/`epoch`).
    pub max_messages: usize,
    /// Most bytes of frames kept per stream (the oldest are trimmed first; a message larger
    /// than this is delivered live but cannot be replayed).
    pub max_bytes: usize,
    /// Messages older than this are trimmed; closed sessions stay resumable this long.
    pub ttl_secs: u64,
}

impl Default for History {
    fn default() -> Self {
        History { max_messages: 1000, max_bytes: 1 << 20, ttl_secs: 300 }
    }
}

/// Agent mailboxes (spec §8): client messages kept for an agent that is offline.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mailbox {
    /// Most messages queued per agent; one more is `mailbox_full`. 0 turns mailboxes off.
    pub max_messages: usize,
    /// Most bytes of frames queued per agent (a larger message is `mailbox_full`).
    pub max_bytes: usize,
    /// Queued messages older than this expire undelivered (counted).
    pub ttl_secs: u64,
}

impl Default for Mailbox {
    fn default() -> Self {
        Mailbox { max_messages: 10_000, max_bytes: 4 << 20, ttl_secs: 86_400 }
    }
}

impl Default for Records {
    fn default() -> Self {
        Records {
            max_records: crate::store::DEFAULT_MAX_RECORDS,
            max_age_days: crate::store::DEFAULT_MAX_AGE_DAYS,
        }
    }
}

/// Map space budgeted per connection record by [`Config::validate`] (measured: 100k records in a
/// 52 MiB file; the rest is headroom for free pages and the agents).
const RECORD_BUDGET_BYTES: u64 = 1024;

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: "127.0.0.1:7600".parse().unwrap(),
            admin_listen: "127.0.0.1:7601".parse().unwrap(),
            data_dir: PathBuf::from("./switchboard-data"),
            shards: 0,
            driver: Driver::Auto,
            handshake_timeout_ms: 10_000,
            max_head_bytes: 8192,
            max_connections: 100_000,
            store_map_size_mb: 1024,
            ws_read_buffer_bytes: 512,
            tls_cert_file: None,
            tls_key_file: None,
            proxy_protocol: ProxyProtocol::Off,
            trusted_proxies: Vec::new(),
            echo_endpoint: false,
            shutdown_timeout_secs: 10,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            heartbeat_secs: 30,
            idle_timeout_secs: 300,
            max_frame_bytes: 65536,
            send_buffer_bytes: 1 << 20,
            max_connections_per_user: 100,
            messages_per_sec_per_user: 200,
            messages_burst_per_user: 400,
            rate_abuse_close_secs: 10,
            handshakes_per_sec_per_ip: 20,
            handshakes_burst_per_ip: 50,
        }
    }
}

impl Default for Auth {
    fn default() -> Self {
        Auth { max_skew_secs: 300, agent_message_signatures: MessageSignatures::Required }
    }
}

impl Default for Jwt {
    fn default() -> Self {
        Jwt {
            hs256_secret_file: None,
            public_keys: Vec::new(),
            issuer: None,
            audience: None,
            leeway_secs: 30,
            user_claim: "sub".into(),
        }
    }
}

impl Default for Presence {
    fn default() -> Self {
        Presence { offline_grace_ms: 5000 }
    }
}

impl Default for Log {
    fn default() -> Self {
        Log { level: "info".into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

impl Config {
    /// Loads `path` (or the default path when it exists, or the defaults), then applies
    /// `SWITCHBOARD_<SECTION>_<KEY>` environment variables.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let default = Path::new(DEFAULT_CONFIG_PATH);
        let path = match path {
            Some(p) => Some(p),
            None if default.exists() => Some(default),
            None => None,
        };
        let mut value = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|source| ConfigError::Read { path: p.into(), source })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse { path: p.into(), message: e.to_string() })?
            }
            None => toml::Table::new(),
        };
        apply_env(&mut value, std::env::vars())?;
        let cfg: Config =
            toml::Value::Table(value).try_into().map_err(|e: toml::de::Error| ConfigError::Parse {
                path: path.map(Into::into).unwrap_or_else(|| "<environment>".into()),
                message: e.to_string(),
            })?;
        Ok(cfg)
    }

    /// Checks ranges; the error names the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.handshake_timeout_ms == 0 {
            return Err(invalid("server.handshake_timeout_ms", "must be > 0"));
        }
        if !(1024..=1 << 20).contains(&s.max_head_bytes) {
            return Err(invalid("server.max_head_bytes", "must be between 1024 and 1048576"));
        }
        if s.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be > 0"));
        }
        if s.shards > 1024 {
            return Err(invalid("server.shards", "must be at most 1024"));
        }
        if s.tls_cert_file.is_some() != s.tls_key_file.is_some() {
            return Err(invalid("server.tls_cert_file", "tls_cert_file and tls_key_file go together"));
        }
        crate::proxy::TrustedNets::parse(&s.trusted_proxies)
            .map_err(|m| invalid("server.trusted_proxies", m))?;
        if s.proxy_protocol == ProxyProtocol::Required && s.trusted_proxies.is_empty() {
            return Err(invalid(
                "server.trusted_proxies",
                "proxy_protocol = \"required\" needs at least one trusted network",
            ));
        }
        if !(1..=3600).contains(&s.shutdown_timeout_secs) {
            return Err(invalid("server.shutdown_timeout_secs", "must be between 1 and 3600"));
        }
        if s.store_map_size_mb < 16 {
            return Err(invalid("server.store_map_size_mb", "must be at least 16"));
        }
        if !(64..=1 << 20).contains(&s.ws_read_buffer_bytes) {
            return Err(invalid("server.ws_read_buffer_bytes", "must be between 64 and 1048576"));
        }
        let l = &self.limits;
        if l.heartbeat_secs == 0 {
            return Err(invalid("limits.heartbeat_secs", "must be > 0"));
        }
        if l.idle_timeout_secs == 0 {
            return Err(invalid("limits.idle_timeout_secs", "must be > 0"));
        }
        if !(256..=64 << 20).contains(&l.max_frame_bytes) {
            return Err(invalid("limits.max_frame_bytes", "must be between 256 and 67108864"));
        }
        if l.send_buffer_bytes < l.max_frame_bytes {
            return Err(invalid("limits.send_buffer_bytes", "must be at least limits.max_frame_bytes"));
        }
        if l.max_connections_per_user == 0 {
            return Err(invalid("limits.max_connections_per_user", "must be > 0"));
        }
        if l.messages_per_sec_per_user == 0 {
            return Err(invalid("limits.messages_per_sec_per_user", "must be > 0"));
        }
        if l.messages_burst_per_user < l.messages_per_sec_per_user {
            return Err(invalid("limits.messages_burst_per_user", "must be >= messages_per_sec_per_user"));
        }
        if l.handshakes_per_sec_per_ip == 0 {
            return Err(invalid("limits.handshakes_per_sec_per_ip", "must be > 0"));
        }
        if l.handshakes_burst_per_ip < l.handshakes_per_sec_per_ip {
            return Err(invalid("limits.handshakes_burst_per_ip", "must be >= handshakes_per_sec_per_ip"));
        }
        if self.auth.max_skew_secs == 0 {
            return Err(invalid("auth.max_skew_secs", "must be > 0"));
        }
        for k in &self.jwt.public_keys {
            if !matches!(k.alg.as_str(), "RS256" | "ES256" | "EdDSA") {
                return Err(invalid(
                    "jwt.public_keys.alg",
                    format!("{:?} is not RS256, ES256 or EdDSA", k.alg),
                ));
            }
        }
        if self.jwt.user_claim.is_empty() {
            return Err(invalid("jwt.user_claim", "must not be empty"));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid("log.level", format!("{:?} is not a log filter", self.log.level)));
        }
        let r = &self.records;
        if !(1..=100_000_000).contains(&r.max_records) {
            return Err(invalid("records.max_records", "must be between 1 and 100000000"));
        }
        if !(1..=36_500).contains(&r.max_age_days) {
            return Err(invalid("records.max_age_days", "must be between 1 and 36500"));
        }
        let h = &self.history;
        if h.max_messages > 1_000_000 {
            return Err(invalid("history.max_messages", "must be at most 1000000"));
        }
        if h.max_bytes < 1024 {
            return Err(invalid("history.max_bytes", "must be at least 1024"));
        }
        if h.ttl_secs == 0 || h.ttl_secs > 30 * 86_400 {
            return Err(invalid("history.ttl_secs", "must be between 1 and 2592000"));
        }
        let m = &self.mailbox;
        if m.max_messages > 10_000_000 {
            return Err(invalid("mailbox.max_messages", "must be at most 10000000"));
        }
        if m.max_bytes < 1024 {
            return Err(invalid("mailbox.max_bytes", "must be at least 1024"));
        }
        if m.ttl_secs == 0 || m.ttl_secs > 365 * 86_400 {
            return Err(invalid("mailbox.ttl_secs", "must be between 1 and 31536000"));
        }
        let budget_mb = r.max_records.saturating_mul(RECORD_BUDGET_BYTES).div_ceil(1 << 20);
        if budget_mb > s.store_map_size_mb as u64 {
            return Err(invalid(
                "records.max_records",
                format!(
                    "{} records need about {budget_mb} MiB of the store; raise server.store_map_size_mb \
                     (now {}) or lower records.max_records",
                    r.max_records, s.store_map_size_mb
                ),
            ));
        }
        Ok(())
    }

    /// The number of shards to run: the configured number, or the CPUs this process may use.
    pub fn shard_count(&self) -> usize {
        if self.server.shards > 0 {
            self.server.shards
        } else {
            crate::shard::allowed_cpus().len().max(1)
        }
    }
}

/// Applies `SWITCHBOARD_SECTION_KEY=value` variables onto the TOML tree. The value is parsed
/// as TOML when it can be (numbers, booleans, arrays) and taken as a string otherwise.
fn apply_env(
    table: &mut toml::Table,
    vars: impl Iterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    const SECTIONS: [&str; 9] =
        ["server", "limits", "auth", "jwt", "presence", "log", "records", "history", "mailbox"];
    for (var, raw) in vars {
        let Some(rest) = var.strip_prefix("SWITCHBOARD_") else { continue };
        let rest = rest.to_ascii_lowercase();
        let Some((section, key)) = SECTIONS
            .iter()
            .find_map(|s| rest.strip_prefix(s).and_then(|k| k.strip_prefix('_')).map(|k| (*s, k)))
        else {
            // Variables the test harness or tooling use (SWITCHBOARD_TEST_…) are not config.
            if rest.starts_with("test_") {
                continue;
            }
            return Err(ConfigError::Env { var, message: "names no config key".into() });
        };
        let value = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(raw));
        let entry = table.entry(section).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry {
            toml::Value::Table(t) => {
                t.insert(key.to_string(), value);
            }
            _ => return Err(ConfigError::Env { var, message: format!("[{section}] is not a table") }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_spec() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.limits.heartbeat_secs, 30);
        assert_eq!(c.limits.max_frame_bytes, 65536);
        assert_eq!(c.presence.offline_grace_ms, 5000);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let t: toml::Table = "[limits]\nheartbeat = 3".parse().unwrap();
        let r: Result<Config, _> = toml::Value::Table(t).try_into();
        assert!(r.unwrap_err().to_string().contains("heartbeat"));
    }

    #[test]
    fn env_overrides_file_values() {
        let mut t: toml::Table = "[limits]\nheartbeat_secs = 3".parse().unwrap();
        let vars = vec![
            ("SWITCHBOARD_LIMITS_HEARTBEAT_SECS".to_string(), "7".to_string()),
            ("SWITCHBOARD_JWT_ISSUER".to_string(), "https://issuer".to_string()),
        ];
        apply_env(&mut t, vars.into_iter()).unwrap();
        let c: Config = toml::Value::Table(t).try_into().unwrap();
        assert_eq!(c.limits.heartbeat_secs, 7);
        assert_eq!(c.jwt.issuer.as_deref(), Some("https://issuer"));
    }

    #[test]
    fn records_section_defaults_env_and_validation() {
        let c = Config::default();
        assert_eq!((c.records.max_records, c.records.max_age_days), (100_000, 30));
        let mut t: toml::Table = "[records]\nmax_age_days = 7".parse().unwrap();
        let vars = vec![("SWITCHBOARD_RECORDS_MAX_RECORDS".to_string(), "5000".to_string())];
        apply_env(&mut t, vars.into_iter()).unwrap();
        let c: Config = toml::Value::Table(t).try_into().unwrap();
        assert_eq!((c.records.max_records, c.records.max_age_days), (5000, 7));
        c.validate().unwrap();
        let bad = |f: fn(&mut Config)| {
            let mut c = Config::default();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(bad(|c| c.records.max_records = 0).contains("records.max_records"));
        assert!(bad(|c| c.records.max_age_days = 0).contains("records.max_age_days"));
        let small_map = bad(|c| c.server.store_map_size_mb = 16);
        assert!(small_map.contains("records.max_records") && small_map.contains("store_map_size_mb"));
        let t: toml::Table = "[records]\nmax_rows = 3".parse().unwrap();
        let r: Result<Config, _> = toml::Value::Table(t).try_into();
        assert!(r.unwrap_err().to_string().contains("max_rows"));
    }

    #[test]
    fn history_and_mailbox_defaults_env_and_validation() {
        let c = Config::default();
        assert_eq!((c.history.max_messages, c.history.ttl_secs), (1000, 300));
        assert_eq!((c.mailbox.max_messages, c.mailbox.ttl_secs), (10_000, 86_400));
        let mut t = toml::Table::new();
        let vars = vec![
            ("SWITCHBOARD_HISTORY_MAX_MESSAGES".to_string(), "5".to_string()),
            ("SWITCHBOARD_MAILBOX_MAX_BYTES".to_string(), "70000".to_string()),
        ];
        apply_env(&mut t, vars.into_iter()).unwrap();
        let c: Config = toml::Value::Table(t).try_into().unwrap();
        assert_eq!((c.history.max_messages, c.mailbox.max_bytes), (5, 70_000));
        c.validate().unwrap();
        let mut c = Config::default();
        c.mailbox.max_bytes = 10;
        assert!(c.validate().unwrap_err().to_string().contains("mailbox.max_bytes"));
        let mut c = Config::default();
        c.history.ttl_secs = 0;
        assert!(c.validate().unwrap_err().to_string().contains("history.ttl_secs"));
    }

    #[test]
    fn validate_names_the_key() {
        let mut c = Config::default();
        c.limits.max_frame_bytes = 1;
        assert!(c.validate().unwrap_err().to_string().contains("limits.max_frame_bytes"));
    }
}
