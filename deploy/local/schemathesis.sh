#!/usr/bin/env bash
# Runs schemathesis against a running `cmdproc gateway`, with the checks the gateway suite
# asserts (no server error, every answer as docs/openapi.json describes it).
#
#   deploy/local/schemathesis.sh [http://127.0.0.1:8080] [extra schemathesis flags...]
#
# schemathesis comes from the virtualenv deploy/local/python.sh makes (CMDPROC_VENV,
# default /var/cache/cmdproc/venv), outside the clone.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${CMDPROC_VENV:-/var/cache/cmdproc/venv}"
BASE="${1:-http://127.0.0.1:8080}"
shift || true

if [[ -x "$HERE/python.sh" ]]; then
  "$HERE/python.sh"
fi
if [[ ! -x "$VENV/bin/schemathesis" ]]; then
  echo "[schemathesis] $VENV/bin/schemathesis is missing: run deploy/local/python.sh" >&2
  exit 1
fi
# schemathesis keeps state in its working directory: run it elsewhere than the clone.
cd "$(mktemp -d)"
exec "$VENV/bin/schemathesis" run "$BASE/openapi.json" \
  --checks not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance,response_headers_conformance \
  --max-examples "${MAX_EXAMPLES:-50}" --generation-database none --no-color "$@"
