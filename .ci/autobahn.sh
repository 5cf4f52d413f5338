#!/usr/bin/env bash
# CI: WebSocket conformance. Runs the Autobahn|Testsuite fuzzing client (`wstest -m
# fuzzingclient`, every case except 12.* and 13.*: we do not negotiate permessage-deflate)
# against the daemon's test-only echo endpoint (`server.echo_endpoint = true`, `/v1/echo`),
# prints a summary by behavior and the ids of the cases that did not pass, and fails when any
# case FAILED (OK, NON-STRICT and INFORMATIONAL pass; UNIMPLEMENTED is reported).
#
# Environment:
#   SWITCHBOARD_SHARED          where `tools/install-autobahn.sh` lives when ../shared does not
#   AUTOBAHN_PREFIX             install prefix of wstest (default $HOME/.cache/autobahn)
#   AUTOBAHN_PROFILE            debug (default: reuses the test build) or release
#   AUTOBAHN_BIN                a prebuilt switchboard binary to test instead of building one
#   AUTOBAHN_CASES              JSON list of case patterns (default ["*"])
#   AUTOBAHN_REPORT_DIR         where the report goes (default: a temp dir, removed on success)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
t0=$(date +%s)
echo "== Autobahn|Testsuite: WebSocket conformance against the echo endpoint"

# --- wstest -------------------------------------------------------------------------------
installer=""
for cand in "$root/../shared/tools/install-autobahn.sh" "${SWITCHBOARD_SHARED:+$SWITCHBOARD_SHARED/tools/install-autobahn.sh}"; do
  if [ -n "$cand" ] && [ -f "$cand" ]; then installer=$cand; break; fi
done
prefix=${AUTOBAHN_PREFIX:-$HOME/.cache/autobahn}
if [ -x "$prefix/bin/wstest" ]; then
  wstest="$prefix/bin/wstest"
elif [ -n "$installer" ]; then
  echo "== installing Autobahn|Testsuite into $prefix ($installer)"
  wstest=$(bash "$installer" "$prefix" | tail -n1)
else
  echo "autobahn: no wstest in $prefix and no install-autobahn.sh (../shared/tools or \$SWITCHBOARD_SHARED/tools)" >&2
  exit 1
fi
echo "== wstest: $wstest"

# --- the daemon -----------------------------------------------------------------------------
profile=${AUTOBAHN_PROFILE:-debug}
if [ -n "${AUTOBAHN_BIN:-}" ]; then
  bin=$AUTOBAHN_BIN
  profile="prebuilt $bin"
else
  case "$profile" in
    release) cargo build --release --bin switchboard; bin="$root/target/release/switchboard" ;;
    debug) cargo build --bin switchboard; bin="$root/target/debug/switchboard" ;;
    *) echo "autobahn: AUTOBAHN_PROFILE must be debug or release" >&2; exit 1 ;;
  esac
fi

work=$(mktemp -d)
report_dir=${AUTOBAHN_REPORT_DIR:-$work/reports}
mkdir -p "$work/data" "$report_dir"
daemon_pid=""
cleanup() {
  if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
    kill -TERM "$daemon_pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$daemon_pid" 2>/dev/null || true
  fi
  if [ -z "${AUTOBAHN_REPORT_DIR:-}" ] && [ "${keep_work:-0}" = 0 ]; then rm -rf "$work"; fi
}
trap cleanup EXIT

# 16 MiB + 64 KiB: case 9.1.6/9.2.6 send 16 MiB messages; the echo queues one whole message.
cat >"$work/switchboard.toml" <<'EOF'
[server]
echo_endpoint = true
handshake_timeout_ms = 60000
max_connections = 10000
shutdown_timeout_secs = 2

[limits]
max_frame_bytes = 16842752
send_buffer_bytes = 33685504
handshakes_per_sec_per_ip = 100000
handshakes_burst_per_ip = 100000
heartbeat_secs = 3600
idle_timeout_secs = 3600

[log]
level = "warn"
EOF

"$bin" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --data-dir "$work/data" \
  --config "$work/switchboard.toml" --shards 1 >"$work/daemon.out" 2>"$work/daemon.err" &
daemon_pid=$!
addr=""
for _ in $(seq 1 150); do
  addr=$(sed -n 's/.*"listening":"\([^"]*\)".*/\1/p' "$work/daemon.out" | head -n1)
  [ -n "$addr" ] && break
  kill -0 "$daemon_pid" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$addr" ]; then
  echo "autobahn: the daemon did not start" >&2
  cat "$work/daemon.out" "$work/daemon.err" >&2
  exit 1
fi
echo "== daemon ($profile) listening on $addr, pid $daemon_pid"

# --- the suite ------------------------------------------------------------------------------
cases=${AUTOBAHN_CASES:-'["*"]'}
cat >"$work/spec.json" <<EOF
{
  "outdir": "$report_dir",
  "servers": [{"agent": "switchboard", "url": "ws://$addr/v1/echo"}],
  "cases": $cases,
  "exclude-cases": ["12.*", "13.*"],
  "exclude-agent-cases": {}
}
EOF
echo "== wstest -m fuzzingclient (all cases but 12.*, 13.*)"
t1=$(date +%s)
(cd "$work" && "$wstest" -m fuzzingclient -s "$work/spec.json") >"$work/wstest.log" 2>&1 || {
  echo "autobahn: wstest exited with $?" >&2
  tail -n 40 "$work/wstest.log" >&2
  keep_work=1
  exit 1
}
t2=$(date +%s)

if ! kill -0 "$daemon_pid" 2>/dev/null; then
  echo "autobahn: the daemon died during the run" >&2
  cat "$work/daemon.err" >&2
  keep_work=1
  exit 1
fi

# --- the report -----------------------------------------------------------------------------
status=0
python3 - "$report_dir/index.json" <<'EOF' || status=$?
import json, sys, re
with open(sys.argv[1]) as f:
    index = json.load(f)
cases = next(iter(index.values()))
def key(c):
    return [int(x) for x in re.findall(r"\d+", c)]
order = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
counts = {b: 0 for b in order}
by = {b: [] for b in order}
for cid in sorted(cases, key=key):
    r = cases[cid]
    b = r.get("behavior", "?")
    counts[b] = counts.get(b, 0) + 1
    by.setdefault(b, []).append(cid)
    bc = r.get("behaviorClose", "?")
    if bc == "FAILED" and b != "FAILED":
        by.setdefault("CLOSE-FAILED", []).append(cid)
print("Autobahn|Testsuite summary (%d cases)" % len(cases))
print("  %-14s %5s" % ("behavior", "cases"))
for b in list(order) + [b for b in counts if b not in order]:
    print("  %-14s %5d" % (b, counts[b]))
for b in ["NON-STRICT", "UNIMPLEMENTED", "FAILED"]:
    if by.get(b):
        print("%s: %s" % (b, " ".join(by[b])))
import os
for cid in by.get("FAILED", []):
    try:
        with open(os.path.join(os.path.dirname(sys.argv[1]), cases[cid]["reportfile"])) as f:
            d = json.load(f)
    except (OSError, ValueError, KeyError):
        continue
    print("--- %s: %s" % (cid, " ".join(d.get("description", "").split())[:300]))
    print("    expected: %s" % json.dumps(d.get("expected"))[:400])
    print("    received: %s" % json.dumps(d.get("received"))[:400])
if by.get("CLOSE-FAILED"):
    print("closing behavior FAILED (case behavior otherwise passed): %s" % " ".join(by["CLOSE-FAILED"]))
sys.exit(1 if counts.get("FAILED", 0) else 0)
EOF
t3=$(date +%s)
echo "== autobahn wall time: $((t3 - t0)) s (suite $((t2 - t1)) s)"
if [ "$status" -ne 0 ]; then
  echo "autobahn: cases FAILED; per-case details in $report_dir (switchboard_case_*.json)" >&2
  keep_work=1
fi
exit "$status"
