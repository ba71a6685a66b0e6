#!/usr/bin/env bash
# Single-node Apache Kafka (KRaft, combined broker+controller) for local dev/tests.
#
#   kafka.sh start|stop|status|logs
#   kafka.sh tool CLASS|ALIAS [ARGS...]   run a Kafka CLI tool against the same jars
#       aliases: topics, console-producer, console-consumer, consumer-groups,
#                api-versions, metadata-quorum, configs
#
# Kafka is assembled from Maven Central artifacts (deploy/local/kafka/pom.xml),
# no tarball needed. Listens on 127.0.0.1:9092 (PLAINTEXT), controller on 127.0.0.1:9093.
#
# Environment:
#   CMDPROC_CACHE  download cache        (default /var/cache/cmdproc) -> $CMDPROC_CACHE/kafka-<ver>/libs
#   CMDPROC_STATE  config, data and logs (default /var/lib/cmdproc)   -> $CMDPROC_STATE/kafka/
#   KAFKA_VERSION  Kafka version         (default 4.1.1)
#   KAFKA_HEAP_OPTS JVM heap flags       (default -Xms256m -Xmx1g)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KAFKA_VERSION="${KAFKA_VERSION:-4.1.1}"
LOG4J_VERSION="2.24.3" # the log4j2 version Kafka 4.1 ships with
CACHE_DIR="${CMDPROC_CACHE:-/var/cache/cmdproc}/kafka-${KAFKA_VERSION}"
LIBS="$CACHE_DIR/libs"
MARKER="$CACHE_DIR/.complete"
STATE_DIR="${CMDPROC_STATE:-/var/lib/cmdproc}/kafka"
DATA_DIR="$STATE_DIR/data"
LOG_DIR="$STATE_DIR/logs"
PID_FILE="$STATE_DIR/kafka.pid"
OUT_FILE="$LOG_DIR/kafka.out"       # JVM stdout/stderr (crashes, GC warnings)
SERVER_LOG="$LOG_DIR/server.log"    # log4j2 broker log
PROPS="$STATE_DIR/server.properties"
LOG4J_CONF="$STATE_DIR/log4j2.properties"
TOOLS_LOG4J_CONF="$STATE_DIR/tools-log4j2.properties"
CLUSTER_ID_FILE="$STATE_DIR/cluster.id"
HOST=127.0.0.1
PORT=9092
CONTROLLER_PORT=9093
BOOTSTRAP="$HOST:$PORT"
START_TIMEOUT=60
STOP_TIMEOUT=30

say() { echo "[kafka] $*"; }
die() { echo "[kafka] ERROR: $*" >&2; exit 1; }

# ---------------------------------------------------------------- prerequisites

# Install a Debian package when a command is missing (we are root on Debian);
# otherwise name the package that is missing.
need_cmd() { # need_cmd CMD PACKAGE
  command -v "$1" >/dev/null 2>&1 && return 0
  if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    say "$1 not found: installing $2 (apt-get)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2"; } >/dev/null ||
      die "$1 not found and 'apt-get install $2' failed: install $2"
    command -v "$1" >/dev/null 2>&1 && return 0
  fi
  die "$1 not found: install $2"
}

check_java() {
  need_cmd java openjdk-17-jre-headless
  local v major
  v="$(java -version 2>&1 | awk -F'"' '/version/ {print $2; exit}')"
  major="${v%%.*}"
  [[ "$major" =~ ^[0-9]+$ && "$major" -ge 17 ]] ||
    die "java on PATH is version '${v:-unknown}'; Kafka 4 needs Java 17+: install openjdk-17-jre-headless"
}

# Download Kafka + all runtime deps into $LIBS once. The marker holds a hash of
# the pom and versions, so editing the pom (or KAFKA_VERSION) triggers a refresh,
# and an interrupted download is never mistaken for a complete one.
ensure_libs() {
  local want
  want="$(cat "$SCRIPT_DIR/kafka/pom.xml" <(echo "$KAFKA_VERSION $LOG4J_VERSION") | sha256sum | cut -d' ' -f1)"
  if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$want" && -d "$LIBS" ]]; then
    return 0
  fi
  need_cmd mvn maven
  say "downloading Kafka $KAFKA_VERSION and dependencies from Maven Central into $LIBS"
  mkdir -p "$CACHE_DIR"
  rm -rf "$LIBS.tmp"
  # Runtime scope = what the broker and tools need at run time. Maven's output
  # goes to a file (even -q prints colour codes) and is shown only on failure.
  local mvn_log="$CACHE_DIR/mvn.log"
  if ! mvn -B -ntp -Dstyle.color=never -f "$SCRIPT_DIR/kafka/pom.xml" \
      -Dkafka.version="$KAFKA_VERSION" -Dlog4j.version="$LOG4J_VERSION" \
      dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$LIBS.tmp" >"$mvn_log" 2>&1; then
    grep -E "ERROR|FAIL" "$mvn_log" | tail -n 20 >&2 || true
    rm -rf "$LIBS.tmp"
    die "Maven could not fetch org.apache.kafka:kafka_2.13:$KAFKA_VERSION (full output: $mvn_log); is Maven Central reachable?"
  fi
  [[ -f "$LIBS.tmp/kafka_2.13-$KAFKA_VERSION.jar" ]] || die "download incomplete: kafka_2.13-$KAFKA_VERSION.jar missing"
  rm -rf "$LIBS"
  mv "$LIBS.tmp" "$LIBS"
  echo "$want" >"$MARKER"
  say "downloaded $(find "$LIBS" -name '*.jar' | wc -l) jars"
}

# ------------------------------------------------------------------ helpers

kjava() { # run a short-lived JVM (tools) on the Kafka classpath
  [[ -f "$TOOLS_LOG4J_CONF" ]] || write_tools_log4j
  java -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$TOOLS_LOG4J_CONF" -cp "$LIBS/*" "$@"
}

port_open() { # port_open PORT
  (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

# Prints the broker pid if our pid file points at a live kafka.Kafka process.
running_pid() {
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid="$(cat "$PID_FILE" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # Guard against a recycled pid: it must really be our broker.
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "kafka.Kafka $PROPS" || return 1
  echo "$pid"
}

# Real client round trip: list topics through the admin API.
client_ok() {
  kjava org.apache.kafka.tools.TopicCommand --bootstrap-server "$BOOTSTRAP" --list \
    --command-config <(echo "request.timeout.ms=5000"; echo "default.api.timeout.ms=5000") >/dev/null 2>&1
}

# Byte offsets of the log files when this start began, so that on failure we
# show what this start logged rather than an older run's lines.
declare -A LOG_MARK=()
mark_logs() {
  local f
  for f in "$SERVER_LOG" "$OUT_FILE"; do
    LOG_MARK[$f]="$(stat -c %s "$f" 2>/dev/null || echo 0)"
  done
}

show_log_tail() {
  local f new
  for f in "$SERVER_LOG" "$OUT_FILE"; do
    [[ -s "$f" ]] || continue
    new="$(tail -c +"$((${LOG_MARK[$f]:-0} + 1))" "$f" | tail -n 30)"
    [[ -n "$new" ]] || continue
    echo "----- $f (last 30 lines of this start) -----" >&2
    echo "$new" >&2
  done
}

# Write $2 to file $1 only if the content differs; return 0 if it changed.
write_if_changed() {
  local file="$1" content="$2"
  if [[ -f "$file" ]] && [[ "$(cat "$file")" == "$content" ]]; then
    return 1
  fi
  printf '%s\n' "$content" >"$file"
  return 0
}

# ------------------------------------------------------------------ config

write_configs() {
  mkdir -p "$STATE_DIR" "$DATA_DIR" "$LOG_DIR"
  local changed=0
  # Kafka 4.x: dynamic KRaft quorum (controller.quorum.bootstrap.servers), which
  # is what `StorageTool format --standalone` sets up. controller.quorum.voters
  # (static quorum) would make --standalone fail.
  write_if_changed "$PROPS" "# Generated by deploy/local/kafka.sh - edits are overwritten on start.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$HOST:$CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA_DIR

# Single node: every internal topic has exactly one replica.
num.partitions=1
default.replication.factor=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false

# Consumer session timeouts down to 6 s must be accepted. Classic protocol:
# 6000 is the default already. KIP-848 'consumer' protocol: the default minimum
# is 45000, so lower it (the session timeout itself stays 45 s unless a group
# config consumer.session.timeout.ms sets it).
group.min.session.timeout.ms=6000
group.consumer.min.session.timeout.ms=6000

# Abort the open transaction of a relay that died as soon as its transaction timeout
# has passed: look for expired transactions every second rather than every 10 s.
transaction.abort.timed.out.transaction.cleanup.interval.ms=1000

log.retention.hours=168
log.segment.bytes=1073741824
log.retention.check.interval.ms=300000" && changed=1

  write_if_changed "$LOG4J_CONF" "# Generated by deploy/local/kafka.sh
status = warn
name = kafka
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = $SERVER_LOG
appender.file.filePattern = $SERVER_LOG.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 100MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 5
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
# Very chatty at INFO/DEBUG; warnings are enough.
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = WARN" && changed=1

  return $((1 - changed)) # 0 = broker config changed
}

# CLI tools: warnings only, to stderr (like Kafka's tools-log4j2.yaml).
write_tools_log4j() {
  mkdir -p "$STATE_DIR"
  write_if_changed "$TOOLS_LOG4J_CONF" "status = warn
name = tools
appender.err.type = Console
appender.err.name = STDERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.err.ref = STDERR" || true
}

format_storage() {
  if [[ -f "$DATA_DIR/meta.properties" ]]; then
    return 0
  fi
  if [[ ! -s "$CLUSTER_ID_FILE" ]]; then
    kjava kafka.tools.StorageTool random-uuid | tail -n 1 >"$CLUSTER_ID_FILE"
  fi
  local cid
  cid="$(cat "$CLUSTER_ID_FILE")"
  say "formatting storage in $DATA_DIR (cluster id $cid)"
  # --standalone: this node alone forms the initial (dynamic) controller quorum.
  kjava kafka.tools.StorageTool format -t "$cid" -c "$PROPS" --standalone >/dev/null ||
    die "StorageTool format failed (see output above)"
}

# ------------------------------------------------------------------ commands

cmd_start() {
  local pid
  if pid="$(running_pid)" && port_open "$PORT"; then
    if write_configs; then
      say "note: config changed; run 'kafka.sh stop && kafka.sh start' to apply it"
    fi
    say "already running (pid $pid) on $BOOTSTRAP"
    return 0
  fi
  if [[ -n "${pid:-}" ]]; then
    # Process alive but port not answering yet (e.g. start in progress).
    say "process $pid is up but $BOOTSTRAP is not answering yet; waiting"
  else
    check_java
    ensure_libs
    if port_open "$PORT" || port_open "$CONTROLLER_PORT"; then
      die "port $PORT or $CONTROLLER_PORT is already in use by another process (not ours: no live pid in $PID_FILE)"
    fi
    write_configs || true
    format_storage
    say "starting broker (logs: $SERVER_LOG)"
    rm -f "$PID_FILE"
    mark_logs
    # setsid: own session, so the broker survives the calling shell/terminal.
    # GC flags follow Kafka's kafka-run-class.sh defaults.
    # shellcheck disable=SC2086
    setsid nohup java ${KAFKA_HEAP_OPTS:--Xms256m -Xmx1g} \
      -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
      -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$LOG4J_CONF" -Dkafka.logs.dir="$LOG_DIR" \
      -cp "$LIBS/*" kafka.Kafka "$PROPS" >>"$OUT_FILE" 2>&1 </dev/null &
    echo $! >"$PID_FILE"
    pid="$(cat "$PID_FILE")"
  fi

  local deadline=$((SECONDS + START_TIMEOUT))
  while ((SECONDS < deadline)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      show_log_tail
      die "broker process $pid exited during startup"
    fi
    if port_open "$PORT" && client_ok; then
      say "running (pid $pid), metadata reachable at $BOOTSTRAP"
      return 0
    fi
    sleep 1
  done
  show_log_tail
  die "broker did not answer metadata requests on $BOOTSTRAP within ${START_TIMEOUT}s (pid $pid still alive; 'kafka.sh stop' to kill it)"
}

cmd_stop() {
  local pid
  if ! pid="$(running_pid)"; then
    rm -f "$PID_FILE"
    say "not running"
    return 0
  fi
  say "stopping broker (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "still alive after ${STOP_TIMEOUT}s: sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
  fi
  rm -f "$PID_FILE"
  say "stopped"
}

cmd_status() {
  local pid
  if pid="$(running_pid)"; then
    if port_open "$PORT"; then
      echo "[kafka] running (pid $pid) on $BOOTSTRAP"
      return 0
    fi
    echo "[kafka] starting (pid $pid), $BOOTSTRAP not answering yet"
    return 1
  fi
  echo "[kafka] stopped"
  return 3 # LSB: program is not running
}

cmd_logs() {
  if [[ -s "$SERVER_LOG" ]]; then
    tail -n 50 "$SERVER_LOG"
  elif [[ -s "$OUT_FILE" ]]; then
    tail -n 50 "$OUT_FILE"
  else
    say "no log yet ($SERVER_LOG)"
  fi
}

cmd_tool() {
  [[ $# -ge 1 ]] || die "usage: kafka.sh tool CLASS|ALIAS [ARGS...]"
  local cls="$1"
  shift
  case "$cls" in
    topics) cls=org.apache.kafka.tools.TopicCommand ;;
    console-producer) cls=org.apache.kafka.tools.ConsoleProducer ;;
    console-consumer) cls=org.apache.kafka.tools.consumer.ConsoleConsumer ;;
    consumer-groups) cls=org.apache.kafka.tools.consumer.group.ConsumerGroupCommand ;;
    api-versions) cls=org.apache.kafka.tools.BrokerApiVersionsCommand ;;
    metadata-quorum) cls=org.apache.kafka.tools.MetadataQuorumCommand ;;
    configs) cls=kafka.admin.ConfigCommand ;;
  esac
  check_java
  ensure_libs
  write_tools_log4j
  exec java -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$TOOLS_LOG4J_CONF" -cp "$LIBS/*" "$cls" "$@"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  logs) cmd_logs ;;
  tool) shift; cmd_tool "$@" ;;
  *)
    echo "usage: $(basename "$0") start|stop|status|logs|tool CLASS [ARGS...]" >&2
    exit 2
    ;;
esac
