//! What the package installs is coherent: `systemd-analyze verify` accepts the unit without a
//! warning, the unit's own `ExecStartPre` check accepts the example config, and the example
//! lists every key of `Config` with its default value.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};
use switchboard::config::Config;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");
const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/switchboard.service");
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/switchboard.toml");
/// Where the package puts the binary and the config; the unit names these paths.
const INSTALLED_BIN: &str = "/usr/bin/switchboard";
const INSTALLED_CONFIG: &str = "/etc/switchboard/switchboard.toml";

/// The unit with the installed paths pointed at the built binary and the repository's example.
fn unit_for_this_build() -> String {
    std::fs::read_to_string(UNIT).unwrap().replace(INSTALLED_BIN, BIN).replace(INSTALLED_CONFIG, EXAMPLE)
}

fn show(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn exec_start_pre_accepts_the_example_config() {
    let unit = unit_for_this_build();
    let line =
        unit.lines().find_map(|l| l.strip_prefix("ExecStartPre=")).expect("the unit has ExecStartPre=");
    let argv: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(argv[..2], [BIN, "check-config"], "ExecStartPre runs `switchboard check-config`");
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]);
    // SWITCHBOARD_* variables in the test environment would change what is checked.
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SWITCHBOARD_")) {
        cmd.env_remove(k);
    }
    let out = cmd.output().expect("run check-config");
    assert!(out.status.success(), "check-config refused the example:\n{}", show(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains(r#"data_dir = "/var/lib/switchboard""#),
        "the example keeps the store in the unit's StateDirectory:\n{printed}"
    );
}

/// Keys the example writes commented out (`# key = …`), as dotted paths under their table.
fn commented_keys(text: &str) -> BTreeSet<String> {
    let mut table = String::new();
    let mut keys = BTreeSet::new();
    for line in text.lines().map(str::trim) {
        if let Some(h) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = h.trim_matches(['[', ']']).to_string();
        } else if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.trim_start();
            if let Some((key, _)) = rest.split_once('=') {
                let key = key.trim();
                if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    keys.insert(format!("{table}.{key}"));
                }
            }
        }
    }
    keys
}

/// Walks every key of the defaults (JSON keeps the `None` ones, as null) and checks the example;
/// returns how many keys it saw.
fn check_keys(
    path: &str,
    all: &serde_json::Value,
    defaults: Option<&toml::Value>,
    example: Option<&toml::Value>,
    commented: &BTreeSet<String>,
    problems: &mut Vec<String>,
) -> usize {
    match all {
        serde_json::Value::Object(fields) => {
            let mut seen = 0;
            for (k, v) in fields {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                let (d, e) = (defaults.and_then(|d| d.get(k)), example.and_then(|e| e.get(k)));
                seen += check_keys(&p, v, d, e, commented, problems);
            }
            return seen;
        }
        serde_json::Value::Null => {
            if example.is_none() && !commented.contains(path) {
                let key = path.rsplit('.').next().unwrap_or(path);
                problems
                    .push(format!("{path}: missing (it has no default: write `# {key} = …` in its table)"));
            }
        }
        _ => {
            // The one value the example changes: the store lives in the unit's StateDirectory.
            let state_dir = toml::Value::String("/var/lib/switchboard".into());
            let expected = if path == "server.data_dir" { Some(&state_dir) } else { defaults };
            match (expected, example) {
                (_, None) => problems.push(format!("{path}: missing")),
                (Some(want), Some(e)) if want != e => {
                    problems.push(format!("{path}: {e} but expected {want}"))
                }
                _ => {}
            }
        }
    }
    1
}

#[test]
fn the_example_lists_every_key_with_its_default() {
    let text = std::fs::read_to_string(EXAMPLE).unwrap();
    let example: toml::Value = toml::Value::Table(text.parse().expect("example parses as TOML"));
    let defaults: toml::Value = toml::Value::Table(
        toml::to_string(&Config::default()).unwrap().parse().expect("defaults round-trip"),
    );
    let all = serde_json::to_value(Config::default()).unwrap();
    let mut problems = Vec::new();
    let seen = check_keys("", &all, Some(&defaults), Some(&example), &commented_keys(&text), &mut problems);
    assert!(
        problems.is_empty(),
        "systemd/switchboard.toml is out of step with src/config.rs:\n  {}",
        problems.join("\n  ")
    );
    // The walk really saw the tree (a change in how Config serializes would make it vacuous).
    assert!(seen >= 30, "only {seen} keys walked");
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// `systemd-analyze`, installed with apt-get when missing and we may; otherwise a clear failure.
fn systemd_analyze() -> PathBuf {
    if let Some(p) = which("systemd-analyze") {
        return p;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let apt = which("apt-get");
    match (&apt, root) {
        (Some(apt), true) => {
            let install = || {
                Command::new(apt)
                    .args(["install", "-y", "--no-install-recommends", "systemd"])
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .status()
                    .is_ok_and(|s| s.success())
            };
            if !install() {
                // A fresh container has no package lists yet.
                let _ = Command::new(apt).args(["update"]).status();
                assert!(install(), "`apt-get install -y systemd` failed; install systemd-analyze and rerun");
            }
            which("systemd-analyze").expect("systemd-analyze after installing systemd")
        }
        _ => panic!(
            "systemd-analyze is not installed and this test cannot install it ({}): install the \
             `systemd` package (Debian/Ubuntu: `sudo apt-get install systemd`) and rerun",
            if apt.is_none() { "no apt-get" } else { "not running as root" }
        ),
    }
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let tool = systemd_analyze();
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("switchboard.service");
    std::fs::write(&unit, unit_for_this_build()).unwrap();
    let out =
        Command::new(&tool).args(["verify", "--man=no"]).arg(&unit).output().expect("run systemd-analyze");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Unrelated units of the host may be reported too; every line about ours is a finding.
    let ours: Vec<&str> = text.lines().filter(|l| l.contains("switchboard")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify {}:\n{}",
        unit.display(),
        show(&out)
    );
}

#[test]
fn the_sysusers_entry_creates_the_units_user() {
    let unit = std::fs::read_to_string(UNIT).unwrap();
    let directive = |name: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("{name}="))
    };
    let user = directive("User");
    assert_eq!(directive("StateDirectory"), "switchboard");
    let sysusers =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/switchboard.sysusers"))
            .unwrap();
    let entry =
        sysusers.lines().find(|l| l.starts_with("u ")).expect("a `u` line in systemd/switchboard.sysusers");
    let fields: Vec<&str> = entry.split_whitespace().collect();
    assert_eq!(fields[1], user, "sysusers creates the unit's User=");
    assert!(entry.contains(" /var/lib/switchboard "), "home is the StateDirectory: {entry}");
}
