#!/usr/bin/env bash
# Run every check and test of cmdproc against a real local Kafka and Postgres:
# formatting, clippy, unit tests, and the integration suites in tests/.
# Starts Kafka and Postgres first (idempotent, see up.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

"$ROOT/deploy/local/up.sh"
"$ROOT/deploy/local/python.sh"

# promtool (from Debian's prometheus package) checks the alert rules operators deploy.
if ! command -v promtool >/dev/null 2>&1; then
  if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "[test] promtool not found: install package prometheus (as root: apt-get install -y prometheus)" >&2
    exit 1
  fi
  echo "[test] promtool not found: apt-get install prometheus"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus; } >/dev/null
fi
echo "[test] promtool check rules deploy/prometheus/alerts.yml"
promtool check rules deploy/prometheus/alerts.yml

echo "[test] cargo fmt --check"
cargo fmt --all -- --check
echo "[test] cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked --features processor/failpoints -- -D warnings
echo "[test] cargo doc --no-deps (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --features processor/failpoints
echo "[test] cargo test"
cargo test --workspace --locked --no-fail-fast --features processor/failpoints
