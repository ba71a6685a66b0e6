#!/usr/bin/env bash
# Stop local Kafka and Postgres (idempotent), in reverse order of up.sh.
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

echo "[down] stopping kafka, then postgres"
rc=0
"$DIR/kafka.sh" stop || rc=1
"$DIR/postgres.sh" stop || rc=1
exit "$rc"
