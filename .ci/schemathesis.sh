#!/usr/bin/env bash
# Property-based conformance of the running service to its own openapi.yaml,
# by schemathesis (a tool no one here wrote; pinned in .ci/requirements.txt).
#
#   .ci/schemathesis.sh [extra schemathesis run options]
#
# Builds the service and starts it on a fresh database (created here, dropped
# after) with the in-process broker and the demo Payment Service, so event
# streams end. Runs every check and every phase (examples, coverage, fuzzing,
# stateful: POST /orders → its links to GET /orders/{id} and /events) against
# the served /openapi.yaml, with X-User-Id supplied. Prints the cases per
# operation; exits non-zero on any failure, error or warning.
# SCHEMATHESIS_MAX_EXAMPLES (default 300) is the cases per operation and phase.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
cd "$repo"

venv="${XDG_CACHE_HOME:-$HOME/.cache}/order-service/venv"
if [ ! -x "$venv/bin/schemathesis" ] || [ "$here/requirements.txt" -nt "$venv/bin/schemathesis" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt"
  touch "$venv/bin/schemathesis"
fi

work=$(mktemp -d)
db="order_service_schemathesis_$$"
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  dropdb --if-exists "$db" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
createdb "$db"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
addr="127.0.0.1:$(free_port)"
go build -o "$work/order-service" .
DATABASE_URL="postgres:///$db" HTTP_ADDR="$addr" EMBEDDED_KAFKA_ADDR="127.0.0.1:$(free_port)" \
  EMBEDDED_KAFKA_DIR="$work/kafka" "$work/order-service" >"$work/service.log" 2>&1 &
pid=$!
python3 - "$addr" <<'PY'
import sys, time, urllib.request
for _ in range(150):
    try:
        urllib.request.urlopen(f"http://{sys.argv[1]}/readyz", timeout=1)
        sys.exit(0)
    except Exception:
        time.sleep(0.2)
sys.exit("the service did not become ready")
PY

status=0
cd "$work" # schemathesis keeps a crash cache in the working directory
"$venv/bin/schemathesis" run "http://$addr/openapi.yaml" --no-color \
  --checks all --phases examples,coverage,fuzzing,stateful \
  --header "X-User-Id: schemathesis" \
  --max-examples "${SCHEMATHESIS_MAX_EXAMPLES:-300}" \
  --report ndjson,json --report-dir "$work/report" "$@" || status=$?
python3 "$here/schemathesis_summary.py" "$work/report" || status=1
if [ "$status" != 0 ]; then
  echo "--- service log (last 50 lines)"
  tail -50 "$work/service.log"
fi
exit "$status"
