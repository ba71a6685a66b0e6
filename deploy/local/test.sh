#!/usr/bin/env bash
# Run every check and test of cmdproc against a real local Kafka and Postgres:
# formatting, clippy, unit tests, and the integration suites in tests/.
# Starts Kafka and Postgres first (idempotent, see up.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

"$ROOT/deploy/local/up.sh"

echo "[test] cargo fmt --check"
cargo fmt --all -- --check
echo "[test] cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "[test] cargo test"
cargo test --workspace --locked --no-fail-fast
