#!/usr/bin/env bash
# run-demo.sh — what `make run` does after building: starts the demo
# upstream (scripts/demo_upstream.py on 127.0.0.1:9000) unless UPSTREAM is
# given, a local redis-server on 6379 when STORE=redis and none answers
# there, then idemgate in front of them, prints three curl commands to
# paste, and stays in the foreground with idemgate's log. Ctrl-C stops
# everything this script started (and nothing else).
#
# The banner prints the addresses idemgate really uses: the proxy's is
# LISTEN unless the extra flags hold --listen; the admin listener's is the
# last --admin of the extra flags, else IDEMGATE_ADMIN_LISTEN, else
# admin.listen of a -c/--config file among them, else 127.0.0.1:9091 (the
# same precedence as idemgate's: flags > environment > file > default).
#
# Usage: run-demo.sh path/to/idemgate [extra idemgate flags...]
# Environment: UPSTREAM=http://host:port  STORE=memory|redis
#              LISTEN=127.0.0.1:8080  (REDIS_PORT=6379)
set -euo pipefail

BIN=${1:?usage: run-demo.sh path/to/idemgate [idemgate flags...]}
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STORE=${STORE:-memory}
UPSTREAM=${UPSTREAM:-}
LISTEN=${LISTEN:-127.0.0.1:8080}
REDIS_PORT=${REDIS_PORT:-6379}
DEMO_PORT=9000

PIDS=()
cleanup() {
  trap - EXIT INT TERM
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'echo; echo "run-demo: stopping" >&2; exit 0' INT TERM

say() { echo "run-demo: $*" >&2; }
die() {
  say "$*"
  exit 1
}

# True when something accepts TCP connections on $2 of host $1 (default
# 127.0.0.1; a wildcard address is reached on loopback).
port_open() {
  local host=${2:+$1} port=${2:-$1}
  case "$host" in "" | 0.0.0.0) host=127.0.0.1 ;; "::") host=::1 ;; esac
  (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

# Waits up to 10 s for port $1 (or host $1 port $2); the last argument is
# the pid that must stay alive.
wait_port() {
  local pid=${*: -1} _
  for _ in $(seq 1 100); do
    port_open "${@:1:$#-1}" && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# The addresses idemgate will use, from the extra flags (see the top).
ADMIN=127.0.0.1:9091
admin_flag="" conf=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  a=${args[i]} next=${args[i + 1]:-}
  case "$a" in
    --listen) LISTEN=$next ;;
    --listen=*) LISTEN=${a#--listen=} ;;
    --admin) admin_flag=$next ;;
    --admin=*) admin_flag=${a#--admin=} ;;
    -c | --config) conf=$next ;;
    --config=*) conf=${a#--config=} ;;
    -c?*) conf=${a#-c} ;;
  esac
done
if [ -n "$conf" ] && [ -r "$conf" ]; then
  from_file=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("admin", {}).get("listen", ""))' "$conf" 2>/dev/null || true)
  [ -n "$from_file" ] && ADMIN=$from_file
fi
[ -n "${IDEMGATE_ADMIN_LISTEN:-}" ] && ADMIN=$IDEMGATE_ADMIN_LISTEN
[ -n "$admin_flag" ] && ADMIN=$admin_flag
PORT=${LISTEN##*:}
LISTEN_HOST=${LISTEN%:*}
LISTEN_HOST=${LISTEN_HOST#[}
LISTEN_HOST=${LISTEN_HOST%]}
case "$LISTEN_HOST" in *:*) URL_HOST="[$LISTEN_HOST]" ;; *) URL_HOST=$LISTEN_HOST ;; esac
if [ "$ADMIN" = off ]; then
  ADMIN_LINE="admin: off"
else
  ADMIN_LINE="admin: http://$ADMIN/metrics"
fi

[ -x "$BIN" ] || die "$BIN not found: run 'make build' first"
case "$STORE" in memory | redis) ;; *) die "STORE must be memory or redis, not '$STORE'" ;; esac
port_open "$LISTEN_HOST" "$PORT" && die "something already listens on $LISTEN (set LISTEN=127.0.0.1:PORT)"

DEMO=0
if [ -z "$UPSTREAM" ]; then
  DEMO=1
  port_open "$DEMO_PORT" && die "port $DEMO_PORT is taken: stop what runs there, or set UPSTREAM=http://host:port"
  python3 "$ROOT/scripts/demo_upstream.py" --port "$DEMO_PORT" &
  PIDS+=($!)
  wait_port "$DEMO_PORT" "$!" || die "the demo upstream did not start"
  UPSTREAM=http://127.0.0.1:$DEMO_PORT
fi

STORE_ARGS=(--store memory)
if [ "$STORE" = redis ]; then
  if [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" != PONG ]; then
    command -v redis-server >/dev/null || die "redis-server is not installed (make deps)"
    say "starting redis-server on 127.0.0.1:$REDIS_PORT"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
      --loglevel warning &
    PIDS+=($!)
    wait_port "$REDIS_PORT" "$!" || die "redis-server did not start"
  fi
  STORE_ARGS=(--store redis --redis "redis://127.0.0.1:$REDIS_PORT/0")
fi

"$BIN" --listen "$LISTEN" --upstream "$UPSTREAM" "${STORE_ARGS[@]}" "$@" &
GATE=$!
PIDS+=("$GATE")
wait_port "$LISTEN_HOST" "$PORT" "$GATE" || die "idemgate did not start (its log is above)"

KEY=$(cat /proc/sys/kernel/random/uuid 2>/dev/null || echo "demo-$RANDOM$RANDOM")
URL="http://$URL_HOST:$PORT/v1/charges"
H="-H 'Content-Type: application/json' -H 'Authorization: Bearer sk_test_demo' -H 'Idempotency-Key: $KEY'"
cat <<EOF

  idemgate listens on http://$URL_HOST:$PORT  ->  $UPSTREAM  (store: $STORE)
  $ADMIN_LINE    Ctrl-C stops everything started here.

  Paste these in another terminal:

  # 1. first execution: the upstream creates a charge (201)
  curl -si $URL $H -d '{"amount": 4200, "currency": "eur"}'

  # 2. the same request again: the same charge, replayed (Idempotent-Replayed: true)
  curl -si $URL $H -d '{"amount": 4200, "currency": "eur"}'

  # 3. the same key with another body: 409 idempotency_key_reuse
  curl -si $URL $H -d '{"amount": 9900, "currency": "eur"}'

EOF
[ "$DEMO" = 1 ] || say "(the paths above are the demo API's; adapt them to $UPSTREAM)"

wait "$GATE" || true
