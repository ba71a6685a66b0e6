#!/usr/bin/env bash
# The demonstration: start Kafka and Postgres, build cmdproc, and run `cmdproc demo`
# (two real workers, a few thousand commands with duplicates and bad input, a summary,
# and the invariants checked). Extra arguments go to `cmdproc demo` (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

"$ROOT/deploy/local/up.sh"
echo "[demo] building cmdproc"
cargo build --locked --quiet -p processor --bin cmdproc
exec cargo run --locked --quiet -p processor --bin cmdproc -- demo "$@"
