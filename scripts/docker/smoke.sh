#!/usr/bin/env bash
# The images run for real (`make docker-smoke`): build them, then with docker/compose.yaml on the
# host's network, bound to loopback ports:
#   1. API + service worker (local runner) on PostgreSQL: wait for /readyz, submit the bundled
#      digits recipe with the CLI client (run from the API image), download and verify the
#      artifacts;
#   2. remove and recreate the containers: the job and its artifacts are still there (volume and
#      database), byte for byte;
#   3. Ray head + Ray worker + API with the Ray runner: the same recipe runs as a Ray task;
#   4. tear everything down (containers, volumes, the database).
# Needs a Docker engine, docker-compose, debootstrap (for the base image) and a PostgreSQL server
# that accepts `postgres` from 127.0.0.1 without a password (PG_ADMIN_URL to use another).
# Ports (loopback): API 18000, worker 18001, Ray GCS 26380 (outside Ray's worker ports, 10002-19999); SMOKE_* variables change them;
# SMOKE_BUILD=0 skips the build.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
API_PORT=${SMOKE_API_PORT:-18000}
WORKER_PORT=${SMOKE_WORKER_PORT:-18001}
RAY_PORT=${SMOKE_RAY_PORT:-26380}
PG_ADMIN_URL=${PG_ADMIN_URL:-postgresql://postgres@127.0.0.1:5432/postgres}
DB=compress_smoke_$$
WORK=$ROOT/out/docker/smoke
PROJECT=compress-smoke
START=$SECONDS

say() { printf '[%4d s] %s\n' "$((SECONDS - START))" "$*"; }
fail() { say "FAILED: $*"; exit 1; }

docker info >/dev/null 2>&1 || fail "no Docker engine answers (start dockerd: docs/deployment.md)"
command -v docker-compose >/dev/null || fail "needs docker-compose (Debian: apt-get install docker-compose)"
command -v psql >/dev/null || fail "needs psql (Debian: postgresql-client)"
psql "$PG_ADMIN_URL" -qtAc 'select 1' >/dev/null || fail "no PostgreSQL at $PG_ADMIN_URL"

# --- build ------------------------------------------------------------------------------------
if [[ ${SMOKE_BUILD:-1} == 1 ]]; then   # SMOKE_BUILD=0: run the images already built
    say "building the images (scripts/docker/build.sh)"
    scripts/docker/build.sh api worker worker-cuda
    say "images built"
fi
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E '^compress-(base|api|worker)' | grep -v ':0\.' || true

# --- secrets and database: generated here, never in an image ------------------------------------
rm -rf "$WORK" && mkdir -p "$WORK/secrets" "$WORK/client"
TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
printf '%s:smoke\n' "$TOKEN" > "$WORK/secrets/tokens"
python3 -c 'import secrets; print(secrets.token_hex(32))' > "$WORK/secrets/ray-token"
chmod 0644 "$WORK"/secrets/*        # the containers' user (uid 1000) reads them
chmod 0777 "$WORK/client"           # the client container writes the downloads here
psql "$PG_ADMIN_URL" -qc "create database $DB"
export COMPRESS_DATABASE_URL="postgresql+psycopg://${PG_ADMIN_URL#postgresql://}"
COMPRESS_DATABASE_URL="${COMPRESS_DATABASE_URL%/*}/$DB"
export COMPRESS_TOKENS_FILE=$WORK/secrets/tokens RAY_TOKEN_FILE=$WORK/secrets/ray-token
export COMPRESS_API_PORT=$API_PORT COMPRESS_WORKER_PORT=$WORKER_PORT RAY_PORT
compose() { docker-compose -p "$PROJECT" -f docker/compose.yaml "$@"; }

teardown() {
    say "teardown: containers, volumes, database"
    compose --profile local --profile gpu down --volumes --remove-orphans >/dev/null 2>&1 || true
    psql "$PG_ADMIN_URL" -qc "drop database if exists $DB" >/dev/null 2>&1 || true
}
trap teardown EXIT

client() {  # the CLI client, from the API image, on the host's network
    docker run --rm --network host --no-healthcheck --user "$(id -u):$(id -g)" \
        -v "$WORK/client:/out" -w /out \
        -e COMPRESS_URL="http://127.0.0.1:$API_PORT" -e COMPRESS_TOKEN="$TOKEN" \
        compress-api compress "$@"
}

wait_ready() {  # wait_ready PORT SECONDS
    local deadline=$((SECONDS + $2))
    until python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$1/readyz', timeout=3)" 2>/dev/null; do
        ((SECONDS < deadline)) || { compose --profile local logs --tail 40; fail "127.0.0.1:$1/readyz not ready after $2 s"; }
        sleep 1
    done
    say "127.0.0.1:$1/readyz: $(python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:$1/readyz').read().decode())")"
}

run_digits() {  # run_digits DIR: submit, wait, download into $WORK/client/DIR, verify; prints the job id
    local t0=$SECONDS
    client submit digits_vit_w8a8 --wait --json --no-progress --download "/out/$1" > "$WORK/$1.json" \
        || { cat "$WORK/$1.json"; fail "the digits job did not pass"; }
    (cd "$WORK/client/$1" && sha256sum --check --quiet SHA256SUMS) || fail "artifact checksums differ"
    python3 - "$WORK/$1.json" "$WORK/client/$1" "$((SECONDS - t0))" <<'EOF' >&2
import json, sys
from pathlib import Path
job, folder, secs = json.load(open(sys.argv[1])), Path(sys.argv[2]), sys.argv[3]
assert job["state"] == "succeeded" and job["gate_passed"] is True, job
files = sorted(p.name for p in folder.iterdir())
report = json.loads((folder / "report.json").read_text()) if (folder / "report.json").exists() else {}
print(f"job {job['id']}: {job['state']}, gate passed, {secs} s from submit to downloaded; "
      f"{len(files)} files: {', '.join(files)}")
EOF
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["id"])' "$WORK/$1.json"
}

# --- 1. API + service worker (local runner) ----------------------------------------------------
say "1. API (--workers 0) + worker (local runner) on PostgreSQL"
COMPRESS_RUNNER=local COMPRESS_API_JOBS=0 compose --profile local up -d --no-deps api worker
wait_ready "$API_PORT" 120
wait_ready "$WORKER_PORT" 120
say "ports the containers listen on (all loopback):"
ss -ltnpH | awk '{print "    " $4}' | grep -E ":($API_PORT|$WORKER_PORT)$" | sort -u
JOB=$(run_digits first)
say "job $JOB done; artifacts verified (SHA256SUMS)"

# --- 2. the job survives the containers ----------------------------------------------------------
say "2. remove and recreate the containers (volume and database kept)"
compose --profile local down          # containers gone; named volumes stay
COMPRESS_RUNNER=local COMPRESS_API_JOBS=0 compose --profile local up -d --no-deps api worker
wait_ready "$API_PORT" 120
client status "$JOB" --json > "$WORK/after-restart.json"
python3 -c 'import json, sys; j = json.load(open(sys.argv[1])); assert j["state"] == "succeeded", j; print("    after restart:", j["id"], j["state"])' "$WORK/after-restart.json"
client download "$JOB" --out /out/again --no-progress >/dev/null
diff <(cd "$WORK/client/first" && sort SHA256SUMS) <(cd "$WORK/client/again" && sort SHA256SUMS) \
    || fail "the artifacts changed across the restart"
say "job $JOB and its $(wc -l < "$WORK/client/again/SHA256SUMS") artifacts are the same after the restart"
compose --profile local down

# --- 3. Ray: head + worker + API with the Ray runner ---------------------------------------------
say "3. Ray head + Ray worker + API (--runner ray)"
COMPRESS_RUNNER=ray COMPRESS_API_JOBS=1 compose up -d ray-head
sleep 5
COMPRESS_RUNNER=ray COMPRESS_API_JOBS=1 compose up -d ray-worker api
wait_ready "$API_PORT" 180
compose exec -T ray-head ray status --address "127.0.0.1:$RAY_PORT" 2>&1 | sed -n '/Resources/,/^$/p' | sed 's/^/    /'
# Ray's token authentication: a client without the token is refused
if docker run --rm --network host compress-worker ray status --address "127.0.0.1:$RAY_PORT" \
        > "$WORK/no-token.txt" 2>&1; then
    fail "Ray answered a client without the token"
fi
grep -q "AuthenticationError" "$WORK/no-token.txt" || { cat "$WORK/no-token.txt"; fail "not refused for its token"; }
echo "    without the token: $(grep -o -m 1 'AuthenticationError: [^.]*' "$WORK/no-token.txt")"
say "ports Ray listens on (GCS $RAY_PORT and the nodes' own):"
ss -ltnpH | grep -E '"(gcs_server|raylet|ray::[A-Za-z]+)"' | awk '{print "    " $4, $6}' | sort -u
RAYJOB=$(run_digits ray)
client logs "$RAYJOB" > "$WORK/ray-job.log"
grep -i -E "submitted to ray|ran on" "$WORK/ray-job.log" | sed 's/^/    job log: /' || fail "the job's log does not mention Ray"
say "Ray job $RAYJOB done; artifacts verified"

say "smoke test passed in $((SECONDS - START)) s"
