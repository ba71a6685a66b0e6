#!/usr/bin/env bash
# The Python tools the tests use, in a virtualenv outside the clone (idempotent; a rerun
# with the same pins prints nothing): confluent-kafka for examples/python/reply.py and
# schemathesis for the gateway's OpenAPI test. Override the place with CMDPROC_VENV.
set -euo pipefail

VENV="${CMDPROC_VENV:-/var/cache/cmdproc/venv}"
# Pinned so that CI and every developer run the same clients; raise them deliberately.
PINS=(
  "confluent-kafka==2.16.1"
  "schemathesis==4.32.5"
)
STAMP="$VENV/.cmdproc-pins"

wanted="$(printf '%s\n' "${PINS[@]}")"
ready() { [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$wanted" ]]; }
ready && exit 0

PYTHON="${PYTHON:-$(command -v python3 || true)}"
if [[ -z "$PYTHON" ]]; then
  echo "[python] python3 not found: install Python 3.9 or later" >&2
  exit 1
fi
mkdir -p "$(dirname "$VENV")"
# Two test runs starting together must not install into the same virtualenv at once.
exec 9>"$VENV.lock"
flock 9
ready && exit 0
echo "[python] $VENV: ${PINS[*]} (with $("$PYTHON" --version 2>&1))"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}"
"$VENV/bin/python" -c 'import confluent_kafka' >/dev/null
"$VENV/bin/schemathesis" --version >/dev/null
printf '%s\n' "$wanted" >"$STAMP"
echo "[python] ready: $VENV/bin/python, $VENV/bin/schemathesis"
