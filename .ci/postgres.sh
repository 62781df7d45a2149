#!/usr/bin/env bash
# A PostgreSQL primary and a synchronous standby on loopback, for the failover
# tests: docs/operations.md's supported HA setup, on one machine.
#
#   .ci/postgres.sh start DIR     initdb a primary under DIR/primary, a standby under
#                                 DIR/standby (pg_basebackup -R), both running, the
#                                 standby streaming and synchronous; prints the two
#                                 host:port, primary first
#   .ci/postgres.sh kill DIR      SIGKILL the primary's postmaster and every process of it
#                                 at once: the machine lost, nothing flushed or said
#   .ci/postgres.sh promote DIR   promote the standby (pg_ctl promote, waits until it
#                                 takes writes)
#   .ci/postgres.sh stop DIR      stop both (immediate) and leave DIR for the caller
#
# PG_PORT_BASE (default 25432): the primary listens on it, the standby on it + 1.
# Runs the newest /usr/lib/postgresql/*/bin (or PG_BIN) as user postgres when
# started as root; DIR is created and given to that user. Authentication is
# trust on 127.0.0.1: a throwaway pair for tests, never a deployment.
set -euo pipefail
base="${PG_PORT_BASE:-25432}"
bin="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}"
[ -x "$bin/postgres" ] || { echo "no PostgreSQL server binaries (set PG_BIN)" >&2; exit 1; }

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# conf PORT DIR SYNC: a server's settings. The primary waits for the standby's
# flush before it answers a COMMIT (synchronous_commit=on, SYNC='*': any one
# standby); the standby has none of its own to wait for (SYNC=''), so once
# promoted it commits alone, as a failover manager would reconfigure it.
# A standby whose primary just died can sit out a whole
# wal_retrieve_retry_interval (5s by default) before it acts on a promote
# ("received promote request", then "waiting for WAL to become available");
# 200ms keeps a promotion inside the failover tests' windows.
conf() {
  cat <<EOF
listen_addresses = '127.0.0.1'
port = $1
unix_socket_directories = '$2'
wal_level = replica
max_wal_senders = 5
hot_standby = on
synchronous_standby_names = '$3'
synchronous_commit = on
wal_sender_timeout = 5s
wal_receiver_status_interval = 1s
wal_retrieve_retry_interval = 200ms
log_min_messages = warning
EOF
}

psql_at() { as_pg "$bin/psql" -qtAX -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "$2"; }

cmd=${1:-}
dir=${2:?"$cmd DIR"}
case "$cmd" in
start)
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres: "$dir"
  as_pg "$bin/initdb" -D "$dir/primary" -U postgres --auth=trust >"$dir/initdb.log"
  conf "$base" "$dir" '*' | as_pg tee -a "$dir/primary/postgresql.conf" >/dev/null
  as_pg "$bin/pg_ctl" -D "$dir/primary" -l "$dir/primary.log" -w start >/dev/null
  as_pg "$bin/pg_basebackup" -h 127.0.0.1 -p "$base" -U postgres -D "$dir/standby" -R -X stream
  conf "$((base + 1))" "$dir" '' | as_pg tee -a "$dir/standby/postgresql.conf" >/dev/null
  echo "primary_conninfo = 'host=127.0.0.1 port=$base user=postgres application_name=standby'" |
    as_pg tee -a "$dir/standby/postgresql.auto.conf" >/dev/null
  as_pg "$bin/pg_ctl" -D "$dir/standby" -l "$dir/standby.log" -w start >/dev/null
  for _ in $(seq 1 100); do
    [ "$(psql_at "$base" "SELECT sync_state FROM pg_stat_replication" || true)" = sync ] && break
    sleep 0.1
  done
  [ "$(psql_at "$base" "SELECT sync_state FROM pg_stat_replication")" = sync ] ||
    { echo "the standby is not synchronous" >&2; exit 1; }
  echo "127.0.0.1:$base,127.0.0.1:$((base + 1))"
  ;;
kill)
  pid=$(head -1 "$dir/primary/postmaster.pid")
  # Children first in the list, all in one kill: none outlives the others.
  kill -9 $(pgrep -P "$pid") "$pid"
  ;;
promote)
  as_pg "$bin/pg_ctl" -D "$dir/standby" -w promote >/dev/null
  ;;
stop)
  for node in standby primary; do
    [ -f "$dir/$node/postmaster.pid" ] || continue
    as_pg "$bin/pg_ctl" -D "$dir/$node" -m immediate stop >/dev/null 2>&1 || true
  done
  ;;
*)
  echo "usage: $0 start|kill|promote|stop DIR" >&2
  exit 2
  ;;
esac
