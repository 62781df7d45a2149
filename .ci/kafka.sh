#!/usr/bin/env bash
# Apache Kafka from Maven Central, in KRaft mode on loopback, for the tests.
# The version is pinned in .ci/kafka/pom.xml, the same as compose.yaml's image.
#
#   .ci/kafka.sh start N DIR     N (1 or 3) combined broker/controller nodes, data and logs
#                                under DIR; prints the bootstrap servers. One node gets
#                                compose.yaml's Kafka settings (listeners moved to loopback);
#                                three get replication factor 3 and min.insync.replicas=2.
#   .ci/kafka.sh stop DIR        stops every node under DIR (SIGTERM, then SIGKILL)
#   .ci/kafka.sh kill I DIR      SIGKILL node I
#   .ci/kafka.sh restart I DIR   starts node I again on its kept log
#   .ci/kafka.sh classpath       the broker's classpath (Kafka's console tools live there too)
#   .ci/kafka.sh version         the Apache Kafka version it runs
#
# KAFKA_VERSION=3.9 runs the 3.9 line (kafka/pom-3.9.xml) instead of the current one (kafka/pom.xml).
# KAFKA_PORT_BASE (default 19080): node I listens on BASE+10*I+2 (clients, INTERNAL),
# +3 (controller) and +4 (EXTERNAL), so one node answers on 127.0.0.1:19092.
# Jars come through Maven into ~/.m2; a second start needs no network and takes seconds.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
base="${KAFKA_PORT_BASE:-19080}"
pom="$here/kafka/pom.xml"
[ "${KAFKA_VERSION:-}" = 3.9 ] && pom="$here/kafka/pom-3.9.xml"
version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")"
# Kafka 4 logs through Log4j 2; 3.x through log4j 1 (reload4j).
case "$version" in
3.*) logging="-Dlog4j.configuration=file:$here/kafka/log4j.properties" ;;
*) logging="-Dlog4j2.configurationFile=$here/kafka/log4j2.properties" ;;
esac

classpath() {
  local cache="$HOME/.m2/order-service-kafka-$version.classpath"
  if [ ! -s "$cache" ] || [ "$pom" -nt "$cache" ]; then
    mvn -q -B -f "$pom" dependency:build-classpath -DincludeScope=runtime \
      -Dmdep.outputFile="$cache" >&2
  fi
  cat "$cache"
}

port() { echo $((base + 10 * $1 + $2)); }

# props N I: the server.properties of node I of an N-node cluster.
props() {
  local n=$1 i=$2 dir=$3 voters="" j
  for j in $(seq 1 "$n"); do voters="${voters:+$voters,}$j@127.0.0.1:$(port "$j" 3)"; done
  # compose.yaml's KAFKA_* variables, named as the apache/kafka image names them:
  # drop the prefix, lower-case, '___' -> '-', '__' -> '_', '_' -> '.'.
  python3 - "$repo/compose.yaml" "$(port "$i" 2)" "$(port "$i" 3)" "$(port "$i" 4)" <<'PY'
import re, sys
compose, p2, p3, p4 = sys.argv[1:]
text = open(compose).read()
block = re.search(r"\n  kafka:\n(.*?)(?=\n  \S)", text, re.S).group(1)
env = re.search(r"\n    environment:\n((?:      .*\n?)+)", block).group(1)
for line in env.splitlines():
    m = re.match(r"\s+(KAFKA_[A-Z0-9_]+):\s*(.*?)\s*(#.*)?$", line)
    if not m:
        continue
    key = m.group(1)[len("KAFKA_"):].lower().replace("___", "-").replace("__", "\0").replace("_", ".").replace("\0", "_")
    if key in ("node.id", "controller.quorum.voters"):
        continue  # per node, below
    value = m.group(2).strip('"')
    # The container's host names and ports, moved to this node's loopback ports.
    value = re.sub(r"(kafka|localhost)?:9092", "127.0.0.1:" + p2, value)
    value = re.sub(r"(kafka|localhost)?:9093", "127.0.0.1:" + p3, value)
    value = re.sub(r"(kafka|localhost)?:9094", "127.0.0.1:" + p4, value)
    print(f"{key}={value}")
PY
  echo "node.id=$i"
  echo "controller.quorum.voters=$voters"
  echo "log.dirs=$dir/node-$i/data"
  if [ "$n" -gt 1 ]; then
    echo "default.replication.factor=$n"
    echo "min.insync.replicas=2"
    echo "offsets.topic.replication.factor=$n"
    echo "transaction.state.log.replication.factor=$n"
    echo "transaction.state.log.min.isr=2"
  fi
}

cluster_id() { sed -n 's/^ *CLUSTER_ID: *\([^ #]*\).*/\1/p' "$repo/compose.yaml"; }

start_node() {
  local i=$1 dir=$2 cp
  cp="$(classpath)"
  java -Xms256m -Xmx768m "$logging" -cp "$cp" \
    kafka.Kafka "$dir/node-$i/server.properties" >>"$dir/node-$i/out.log" 2>&1 &
  echo $! >"$dir/node-$i/pid"
}

wait_node() {
  local i=$1 dir=$2 p
  p=$(port "$i" 2)
  for _ in $(seq 1 120); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then return 0; fi
    if ! kill -0 "$(cat "$dir/node-$i/pid")" 2>/dev/null; then
      echo "kafka node $i exited; its log:" >&2
      tail -50 "$dir/node-$i/out.log" >&2
      return 1
    fi
    sleep 0.5
  done
  echo "kafka node $i did not listen on $p within 60s" >&2
  return 1
}

cmd=${1:-}
case "$cmd" in
start)
  n=${2:?start N DIR}; dir=${3:?start N DIR}
  mkdir -p "$dir"
  cp="$(classpath)"
  id="$(cluster_id)"
  servers=""
  for i in $(seq 1 "$n"); do
    mkdir -p "$dir/node-$i"
    props "$n" "$i" "$dir" >"$dir/node-$i/server.properties"
    if [ ! -f "$dir/node-$i/data/meta.properties" ]; then
      java "$logging" -cp "$cp" kafka.tools.StorageTool format \
        -t "$id" -c "$dir/node-$i/server.properties" >>"$dir/node-$i/out.log" 2>&1
    fi
    start_node "$i" "$dir"
    servers="${servers:+$servers,}127.0.0.1:$(port "$i" 2)"
  done
  for i in $(seq 1 "$n"); do wait_node "$i" "$dir"; done
  echo "$servers"
  ;;
stop)
  dir=${2:?stop DIR}
  for pidfile in "$dir"/node-*/pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
  done
  for pidfile in "$dir"/node-*/pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
  ;;
kill)
  i=${2:?kill I DIR}; dir=${3:?kill I DIR}
  kill -9 "$(cat "$dir/node-$i/pid")"
  ;;
restart)
  i=${2:?restart I DIR}; dir=${3:?restart I DIR}
  start_node "$i" "$dir"
  wait_node "$i" "$dir"
  ;;
classpath)
  classpath
  ;;
version)
  echo "$version"
  ;;
*)
  sed -n '2,19p' "$0" >&2
  exit 2
  ;;
esac
