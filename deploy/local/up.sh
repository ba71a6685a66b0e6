#!/usr/bin/env bash
# Start local Postgres and Kafka for cmdproc (idempotent; a rerun only checks),
# then print a short health report. Stop them with down.sh.
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
start=$SECONDS

echo "[up] starting postgres, then kafka"
"$DIR/postgres.sh" start
"$DIR/kafka.sh" start

echo "[up] health ($((SECONDS - start))s):"
rc=0
"$DIR/postgres.sh" status || rc=1
"$DIR/kafka.sh" status || rc=1
echo "[up] postgres url:   postgres://cmdproc:cmdproc@127.0.0.1:5432/cmdproc"
echo "[up] kafka brokers:  127.0.0.1:9092"
exit "$rc"
