#!/usr/bin/env bash
# Stop the local dev stack that infra/local/up.sh started: its Ray head and moto's S3 server,
# by the pids up.sh recorded (never `ray stop`, which would stop every Ray cluster on the machine).
# Objects in moto's S3 live in memory and are gone afterwards. Same FORGE_DEV_DIR as up.sh.
set -euo pipefail

STATE="${FORGE_DEV_DIR:-/tmp/forge-dev-$(id -u)}"
say() { echo "forge-dev: $*" >&2; }

# stop NAME PIDFILE PATTERN: TERM the recorded pid if it is still the process we started (its
# command line matches PATTERN), wait up to 30 s, then KILL its process group.
stop() {
  local name="$1" pidfile="$2" pattern="$3" pid
  [[ -f "$pidfile" ]] || return 0
  pid="$(cat "$pidfile")"
  if ! kill -0 "$pid" 2>/dev/null || ! ps -o args= -p "$pid" | grep -q -- "$pattern"; then
    say "$name (pid $pid) is not running"
    rm -f "$pidfile"
    return 0
  fi
  say "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  # up.sh started it as the leader of its own process group (setsid; `ray start --block` also
  # makes itself one): KILL whatever is left of that group, then the pid itself.
  kill -KILL -- "-$pid" 2>/dev/null || true
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

if [[ ! -f "$STATE/ray.pid" && ! -f "$STATE/moto.pid" ]]; then
  say "nothing to stop in $STATE"
  exit 0
fi
stop "Ray head" "$STATE/ray.pid" "ray start"
stop "S3 (moto)" "$STATE/moto.pid" "moto.server"
rm -rf "$STATE/env.sh" "$STATE/ray"
say "down (logs kept in $STATE)"
