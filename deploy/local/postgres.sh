#!/usr/bin/env bash
# Local PostgreSQL (Debian packages) for cmdproc dev/tests.
#
#   postgres.sh start|stop|status|logs
#
# start: installs postgresql if missing, creates cluster <ver>/main if there is
# none, applies the settings below, starts it on 127.0.0.1:5432 and makes sure
# role cmdproc (password cmdproc, LOGIN CREATEDB) and database cmdproc exist.
# App URL: postgres://cmdproc:cmdproc@127.0.0.1:5432/cmdproc
#
# Environment: PG_VERSION (default: newest installed major with a 'main' cluster).
set -euo pipefail

HOST=127.0.0.1
PORT=5432
CLUSTER=main
APP_USER=cmdproc
APP_PASSWORD=cmdproc
APP_DB=cmdproc
START_TIMEOUT=30
DATABASE_URL="postgres://$APP_USER:$APP_PASSWORD@$HOST:$PORT/$APP_DB"

say() { echo "[postgres] $*"; }
die() { echo "[postgres] ERROR: $*" >&2; exit 1; }

installed() { command -v pg_lsclusters >/dev/null 2>&1 && command -v pg_ctlcluster >/dev/null 2>&1; }

ensure_installed() {
  installed && return 0
  if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    die "PostgreSQL not found (pg_lsclusters missing): install package postgresql (as root: apt-get install -y postgresql)"
  fi
  say "PostgreSQL not installed: apt-get install postgresql"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } >/dev/null ||
    die "apt-get install postgresql failed: install package postgresql"
  installed || die "postgresql installed but pg_lsclusters still missing: install postgresql-common"
}

# Sets VER to the major version of the cluster we manage ('main').
pick_cluster() {
  VER="${PG_VERSION:-}"
  if [[ -z "$VER" ]]; then
    VER="$(pg_lsclusters --no-header 2>/dev/null | awk -v c="$CLUSTER" '$2 == c {print $1}' | sort -V | tail -n 1)"
  fi
  if [[ -z "$VER" ]]; then
    # No cluster yet (e.g. it was dropped): use the newest installed server.
    VER="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)"
    [[ -n "$VER" ]] || die "no PostgreSQL server binaries in /usr/lib/postgresql: install postgresql"
  fi
}

cluster_exists() { [[ -f "/etc/postgresql/$VER/$CLUSTER/postgresql.conf" ]]; }
conf_dir() { echo "/etc/postgresql/$VER/$CLUSTER"; }
is_running() { pg_ctlcluster "$VER" "$CLUSTER" status >/dev/null 2>&1; }
data_dir() { pg_lsclusters --no-header "$VER" "$CLUSTER" | awk '{print $6}'; }
log_file() { pg_lsclusters --no-header "$VER" "$CLUSTER" | awk '{print $7}'; }
cluster_pid() { head -n 1 "$(data_dir)/postmaster.pid" 2>/dev/null || echo "?"; }

# psql as the postgres superuser over the unix socket (peer auth).
su_psql() {
  runuser -u postgres -- psql -X -q -At -v ON_ERROR_STOP=1 -p "$PORT" -d postgres "$@"
}
app_login_ok() { # app_login_ok DB
  PGPASSWORD="$APP_PASSWORD" PGCONNECT_TIMEOUT=5 \
    psql -X -q -At -h "$HOST" -p "$PORT" -U "$APP_USER" -d "$1" -c 'select 1' >/dev/null 2>&1
}

# Settings for a dev/test box. Durability settings stay at their defaults.
# Written to conf.d (included by Debian's postgresql.conf) so postgresql.conf
# itself stays pristine. Returns 0 if the file changed.
write_config() {
  local dir file content
  dir="$(conf_dir)"
  file="$dir/conf.d/cmdproc.conf"
  content="# Managed by deploy/local/postgres.sh - overwritten on start.
listen_addresses = '$HOST'
port = $PORT
max_connections = 300
shared_buffers = 512MB"
  mkdir -p "$dir/conf.d"
  # Debian's postgresql.conf includes conf.d; add the include if someone removed it.
  if ! grep -Eq "^[[:space:]]*include_dir[[:space:]]*=[[:space:]]*'conf\.d'" "$dir/postgresql.conf"; then
    say "adding include_dir = 'conf.d' to $dir/postgresql.conf"
    echo "include_dir = 'conf.d'" >>"$dir/postgresql.conf"
  fi
  local changed=1 # 1 = unchanged (shell "false")
  # pg_lsclusters/pg_ctlcluster read the port from postgresql.conf itself, so keep
  # it right there too (the cluster may have been created on another port).
  if [[ "$(pg_conftool -s "$VER" "$CLUSTER" postgresql.conf show port 2>/dev/null || true)" != "$PORT" ]]; then
    say "setting port = $PORT in $dir/postgresql.conf"
    pg_conftool "$VER" "$CLUSTER" postgresql.conf set port "$PORT"
    changed=0
  fi
  if [[ ! -f "$file" ]] || [[ "$(cat "$file")" != "$content" ]]; then
    say "writing $file"
    printf '%s\n' "$content" >"$file"
    chown postgres:postgres "$file"
    changed=0
  fi
  return "$changed"
}

wait_ready() {
  local deadline=$((SECONDS + START_TIMEOUT))
  until pg_isready -q -h "$HOST" -p "$PORT"; do
    if ((SECONDS >= deadline)); then
      tail -n 30 "$(log_file)" >&2 || true
      die "server not accepting connections on $HOST:$PORT after ${START_TIMEOUT}s (log: $(log_file))"
    fi
    sleep 0.5
  done
}

ensure_role_and_db() {
  local flags
  flags="$(su_psql -c "select rolcanlogin::int::text || rolcreatedb::int::text from pg_roles where rolname = '$APP_USER'")"
  if [[ -z "$flags" ]]; then
    say "creating role $APP_USER (LOGIN CREATEDB)"
    su_psql -c "create role $APP_USER login createdb password '$APP_PASSWORD'"
  elif [[ "$flags" != "11" ]]; then
    say "granting LOGIN CREATEDB to role $APP_USER"
    su_psql -c "alter role $APP_USER login createdb"
  fi
  if [[ -z "$(su_psql -c "select 1 from pg_database where datname = '$APP_DB'")" ]]; then
    say "creating database $APP_DB owned by $APP_USER"
    su_psql -c "create database $APP_DB owner $APP_USER"
  fi
  # Only touch the password if a login with it fails (keeps reruns change-free).
  if ! app_login_ok "$APP_DB"; then
    say "setting password of role $APP_USER"
    su_psql -c "alter role $APP_USER password '$APP_PASSWORD'"
    app_login_ok "$APP_DB" ||
      die "cannot log in as $APP_USER over TCP ($DATABASE_URL): check 'host ... 127.0.0.1/32 scram-sha-256' in $(conf_dir)/pg_hba.conf"
  fi
}

cmd_start() {
  ensure_installed
  pick_cluster
  if ! cluster_exists; then
    say "creating cluster $VER/$CLUSTER"
    pg_createcluster --port "$PORT" "$VER" "$CLUSTER" >/dev/null
  fi
  local changed=0
  write_config && changed=1
  if is_running; then
    if ((changed)); then
      # Reload, then restart only if a reloaded setting needs one
      # (listen_addresses, port, max_connections, shared_buffers all do).
      local pending="port"
      if su_psql -c "select pg_reload_conf()" >/dev/null 2>&1; then
        sleep 0.5 # the postmaster applies SIGHUP asynchronously
        pending="$(su_psql -c "select string_agg(name, ',') from pg_settings where pending_restart")"
      fi # else: still running on an old port -> restart
      if [[ -n "$pending" ]]; then
        say "restarting $VER/$CLUSTER to apply $pending"
        pg_ctlcluster "$VER" "$CLUSTER" restart
      fi
    else
      say "cluster $VER/$CLUSTER already running (pid $(cluster_pid))"
    fi
  else
    say "starting cluster $VER/$CLUSTER"
    pg_ctlcluster "$VER" "$CLUSTER" start ||
      { tail -n 30 "$(log_file)" >&2 || true; die "pg_ctlcluster $VER $CLUSTER start failed (log: $(log_file))"; }
  fi
  wait_ready
  ensure_role_and_db
  say "running (pid $(cluster_pid)), $DATABASE_URL"
}

cmd_stop() {
  if ! installed; then say "not installed; nothing to stop"; return 0; fi
  pick_cluster
  if ! cluster_exists || ! is_running; then
    say "not running"
    return 0
  fi
  say "stopping cluster $VER/$CLUSTER"
  pg_ctlcluster "$VER" "$CLUSTER" stop # fast mode: disconnects clients, then clean shutdown
  say "stopped"
}

cmd_status() {
  if ! installed; then echo "[postgres] not installed"; return 3; fi
  pick_cluster
  if cluster_exists && is_running; then
    echo "[postgres] running (pid $(cluster_pid)) on $HOST:$PORT, cluster $VER/$CLUSTER"
    return 0
  fi
  echo "[postgres] stopped"
  return 3
}

cmd_logs() {
  installed || die "not installed"
  pick_cluster
  tail -n 50 "$(log_file)"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  logs) cmd_logs ;;
  *)
    echo "usage: $(basename "$0") start|stop|status|logs" >&2
    exit 2
    ;;
esac
