#!/usr/bin/env bash
# forge's local dev stack: moto's S3 server on loopback and a Ray head with token auth, on free
# ports. S3, the dashboard and the Jobs API listen on 127.0.0.1 only; Ray's internal ports (GCS,
# raylet, dashboard agent, metrics) listen on every interface, as Ray always does, and those that
# take commands refuse clients without the token.
#
#   eval "$(infra/local/up.sh)"      # start it and take its exports into this shell
#   forge train configs/examples/ticket-router.yaml --set storage=s3://forge/runs
#   infra/local/down.sh              # stop it
#
# stdout carries only the `export` lines (so `eval` works); everything else goes to stderr. The
# exports are also written to $FORGE_DEV_DIR/env.sh for other shells (`source` it).
# Token auth stays on: the head uses ~/.ray/auth_token (created here if missing) and clients
# send it because RAY_AUTH_MODE=token is exported.
#
# Settings (environment): FORGE_DEV_DIR (state, logs; default /tmp/forge-dev-$UID: keep it
# short, Ray's socket paths live under it), FORGE_DEV_BUCKET (default forge), FORGE_DEV_CPUS
# (logical CPUs of the head; default max(nproc, 4)), FORGE_DEV_S3_PORT and FORGE_DEV_RAY_PORT
# (default: free ports), FORGE_PYTHON (default .venv/bin/python of this checkout).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${FORGE_PYTHON:-$REPO/.venv/bin/python}"
RAY="$(dirname "$PY")/ray"
STATE="${FORGE_DEV_DIR:-/tmp/forge-dev-$(id -u)}"
BUCKET="${FORGE_DEV_BUCKET:-forge}"

say() { echo "forge-dev: $*" >&2; }
die() { say "error: $*"; exit 1; }
# alive PIDFILE PATTERN: the recorded process still runs and is the one we started.
alive() { [[ -f "$1" ]] && ps -o args= -p "$(cat "$1")" 2>/dev/null | grep -q -- "$2"; }
# Detach from this terminal: setsid where it exists (macOS has only nohup). Both exec the command,
# so $! is its pid (a shell function here would put a subshell's pid in $! instead).
if command -v setsid >/dev/null; then DETACH=(setsid); else DETACH=(nohup); fi

[[ -x "$PY" ]] || die "no Python at $PY: run 'make install' first, or set FORGE_PYTHON"
[[ -x "$RAY" ]] || die "no ray CLI next to $PY ($RAY): install forge into that environment"
mkdir -p "$STATE"

if alive "$STATE/ray.pid" "ray start" || alive "$STATE/moto.pid" moto.server; then
  [[ -f "$STATE/env.sh" ]] || die "a stack is running from $STATE but env.sh is missing; run infra/local/down.sh"
  say "already up (state in $STATE); its exports:"
  grep '^export ' "$STATE/env.sh"
  exit 0
fi

# Free ports for the listeners whose Ray defaults are fixed (6379, 8265, 10001; 52365 becomes 0,
# any free port), so this stack never collides with another Ray cluster on the machine. Ray picks
# its other ports itself.
read -r -a PORTS < <("$PY" - <<'PYEOF'
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
PYEOF
)
S3_PORT="${FORGE_DEV_S3_PORT:-${PORTS[0]}}"
GCS_PORT="${FORGE_DEV_RAY_PORT:-${PORTS[1]}}"
DASH_PORT="${PORTS[2]}"
CPUS="${FORGE_DEV_CPUS:-$(n=$(nproc 2>/dev/null || sysctl -n hw.ncpu); echo $(( n > 4 ? n : 4 )))}"

# Everything Ray starts (and so every training worker and Serve replica) inherits these.
export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT"
export AWS_ACCESS_KEY_ID=forge-dev AWS_SECRET_ACCESS_KEY=forge-dev-secret  # moto accepts any key
export AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
export RAY_AUTH_MODE=token TOKENIZERS_PARALLELISM=false
unset RAY_ADDRESS RAY_API_SERVER_ADDRESS

# From here on, any failure stops whatever this run started.
stop_on_failure() {
  say "start failed; stopping what was started (logs in $STATE)"
  FORGE_DEV_DIR="$STATE" "$REPO/infra/local/down.sh" >/dev/null 2>&1 || true
}
trap stop_on_failure EXIT

say "S3 (moto) on 127.0.0.1:$S3_PORT"
"${DETACH[@]}" "$PY" -m moto.server -H 127.0.0.1 -p "$S3_PORT" >"$STATE/moto.log" 2>&1 &
echo $! >"$STATE/moto.pid"
"$PY" - "$BUCKET" "$(cat "$STATE/moto.pid")" <<'PYEOF' >&2
import os, sys, time
import boto3
from botocore import exceptions as bex
from botocore.config import Config
deadline = time.time() + 30
quick = Config(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1})
while True:
    try:
        s3 = boto3.client("s3", config=quick)
        if sys.argv[1] not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
            s3.create_bucket(Bucket=sys.argv[1])
        break
    except (bex.EndpointConnectionError, bex.ConnectionClosedError, bex.ReadTimeoutError,
            bex.ConnectTimeoutError):
        try:
            os.kill(int(sys.argv[2]), 0)
        except OSError:
            sys.exit("forge-dev: moto's S3 server exited (is the port taken?); see moto.log")
        if time.time() > deadline:
            sys.exit("forge-dev: moto's S3 server did not answer within 30 s")
        time.sleep(0.2)
print(f"forge-dev: bucket s3://{sys.argv[1]} ready")
PYEOF

# A head started by `ray start` enables token auth only when a token exists: make sure one does
# (Ray reads RAY_AUTH_TOKEN, then the file RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token).
if [[ -z "${RAY_AUTH_TOKEN:-}" && ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]; then
  "$RAY" get-auth-token --generate >/dev/null 2>"$STATE/token.log"
fi

say "Ray head on 127.0.0.1:$GCS_PORT ($CPUS CPUs), dashboard and Jobs API on 127.0.0.1:$DASH_PORT"
# --block keeps `ray start` in the foreground of its own process group, so down.sh stops exactly
# this cluster (by this pid) and never other Ray clusters on the machine (as `ray stop` would).
"${DETACH[@]}" "$RAY" start --head --block --disable-usage-stats \
  --port "$GCS_PORT" \
  --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" \
  --ray-client-server-port "${PORTS[3]}" --dashboard-agent-listen-port 0 \
  --num-cpus "$CPUS" --temp-dir "$STATE/ray" >"$STATE/ray.log" 2>&1 &
echo $! >"$STATE/ray.pid"

# Ready when `ray start` reports the node up (in its log) and the Jobs API answers HTTP.
"$PY" - "$DASH_PORT" "$(cat "$STATE/ray.pid")" "$STATE/ray.log" <<'PYEOF' >&2
import os, sys, time, urllib.error, urllib.request
dash, pid, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deadline = time.time() + 90
def up() -> bool:
    with open(log, errors="replace") as f:
        if "Ray runtime started" not in f.read():
            return False
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
    except urllib.error.HTTPError:
        pass  # 401 without a token: the server is up
    except OSError:
        return False
    return True
def fail(why: str) -> None:
    with open(log, errors="replace") as f:
        tail = "".join(f.readlines()[-15:])
    sys.exit(f"forge-dev: {why}; the end of {log}:\n{tail}")
while not up():
    try:
        os.kill(pid, 0)
    except OSError:
        fail("the Ray head exited while starting")
    if time.time() > deadline:
        fail("the Ray head did not come up within 90 s")
    time.sleep(0.5)
PYEOF
trap - EXIT

cat >"$STATE/env.sh" <<ENVEOF
# forge local dev stack ($STATE), from infra/local/up.sh; stop it with infra/local/down.sh
export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL
export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID
export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
export AWS_REGION=$AWS_REGION
export AWS_DEFAULT_REGION=$AWS_DEFAULT_REGION
export RAY_ADDRESS=127.0.0.1:$GCS_PORT
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASH_PORT
export RAY_AUTH_MODE=token
ENVEOF
cat "$STATE/env.sh"

cat >&2 <<MSG
forge-dev: up. S3 bucket s3://$BUCKET at $AWS_ENDPOINT_URL; Ray head 127.0.0.1:$GCS_PORT;
  dashboard and Jobs API http://127.0.0.1:$DASH_PORT (token auth on).
  The token is in ~/.ray/auth_token (print it with: $RAY get-auth-token); Ray's clients send it
  when RAY_AUTH_MODE=token is set, raw HTTP needs the header 'Authorization: Bearer <token>'.
  Other shells: source $STATE/env.sh
  Try: forge train configs/examples/ticket-router.yaml --set storage=s3://$BUCKET/runs
       forge checkpoints s3://$BUCKET/runs/jobs/ticket-router
  Stop: infra/local/down.sh   (logs: $STATE/*.log)
MSG
