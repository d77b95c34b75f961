#!/usr/bin/env bash
# bench/run.sh: the load harness. Starts its own upstream (nginx `return 200`),
# a private redis-server, idemgate, HAProxy and an nginx proxy_pass on free
# 127.0.0.1 ports in a temp dir; drives each with wrk and the scenario scripts
# in this directory, interleaving targets over ROUNDS rounds; prints medians
# and ratios to the baselines and writes them as JSON. Never asserts on
# numbers; fails only when something does not start or does not answer.
#
# usage: bench/run.sh [path/to/idemgate]
# env:   DURATION (4s) CONNS (50) ROUNDS (2) WARMUP (1s, 0 = none)
#        SCENARIOS ("passthrough first-execution replay contention")
#        TARGETS ("idemgate haproxy nginx direct") REPLAY_KEYS (100)
#        OUT (./bench-results.json) KEEP_TMP (0; 1 keeps the temp dir)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
IDEMGATE=${1:-$HERE/../build/idemgate}
DURATION=${DURATION:-4s}
CONNS=${CONNS:-50}
ROUNDS=${ROUNDS:-2}
WARMUP=${WARMUP:-1s}
SCENARIOS=${SCENARIOS:-passthrough first-execution replay contention}
TARGETS=${TARGETS:-idemgate haproxy nginx direct}
REPLAY_KEYS=${REPLAY_KEYS:-100}
OUT=${OUT:-$PWD/bench-results.json}
KEEP_TMP=${KEEP_TMP:-0}
PY=python3
HELPER="$HERE/helper.py"
UPSTREAM_BODY='{"ok":true,"id":"ord_000123","status":"accepted"}'

TMP=""
declare -A PID=()
FAILED=0

log() { echo "bench: $*" >&2; }

# Prints the tail of every process log, so a failure says why.
show_logs() {
  [ -n "$TMP" ] || return 0
  local f
  for f in "$TMP"/*.log; do
    [ -s "$f" ] || continue
    echo "---- ${f##*/} (last 15 lines) ----" >&2
    tail -n 15 "$f" >&2
  done
}

die() {
  FAILED=1
  log "FAILED: $*"
  show_logs
  exit 1
}

cleanup() {
  local name pid i
  for name in "${!PID[@]}"; do
    pid=${PID[$name]}
    kill -TERM "$pid" 2>/dev/null || true
  done
  for name in "${!PID[@]}"; do
    pid=${PID[$name]}
    for i in $(seq 1 30); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ -n "$TMP" ] && [ -d "$TMP" ]; then
    if [ "$KEEP_TMP" = 1 ] || [ "$FAILED" = 1 ]; then
      log "temp dir kept: $TMP"
    else
      rm -rf "$TMP"
    fi
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# "4s" / "1m" / "2h" / "10" -> seconds, for the wrk watchdog.
to_seconds() {
  local d=$1
  case "$d" in
    *ms) echo 1 ;;
    *s) echo "${d%s}" ;;
    *m) echo $((${d%m} * 60)) ;;
    *h) echo $((${d%h} * 3600)) ;;
    *) echo "$d" ;;
  esac
}

check_inputs() {
  local tool sc t
  for tool in wrk nginx haproxy redis-server "$PY" timeout; do
    command -v "$tool" >/dev/null 2>&1 ||
      die "'$tool' not found (scripts/deps.sh --bench installs the bench packages)"
  done
  [ -x "$IDEMGATE" ] || die "idemgate binary not found or not executable: $IDEMGATE"
  for sc in $SCENARIOS; do
    case "$sc" in
      passthrough | first-execution | replay | contention) ;;
      *) die "unknown scenario '$sc' (passthrough first-execution replay contention)" ;;
    esac
  done
  for t in $TARGETS; do
    case "$t" in
      idemgate | haproxy | nginx | direct) ;;
      *) die "unknown target '$t' (idemgate haproxy nginx direct)" ;;
    esac
  done
  [[ "$CONNS" =~ ^[1-9][0-9]*$ ]] || die "CONNS must be a positive integer"
  [[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
  [[ "$(to_seconds "$DURATION")" =~ ^[0-9]+$ ]] || die "DURATION must look like 4s, 1m or 10"
}

has_target() { [[ " $TARGETS " == *" $1 "* ]]; }

start_bg() {
  local name=$1
  shift
  "$@" >"$TMP/$name.log" 2>&1 &
  PID[$name]=$!
}

alive_or_die() {
  local name=$1
  kill -0 "${PID[$name]}" 2>/dev/null || die "$name exited (see $name.log)"
}

# nginx's defaults point at root-owned paths: keep everything under $dir.
nginx_common() {
  local dir=$1
  if [ "$(id -u)" = 0 ]; then echo "user $(id -un) $(id -gn);"; fi
  cat <<EOF
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
EOF
}

nginx_http_common() {
  local dir=$1
  cat <<EOF
  access_log off;
  keepalive_requests 100000;
  keepalive_timeout 60s;
  client_body_temp_path $dir/client_body;
  proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi;
  uwsgi_temp_path $dir/uwsgi;
  scgi_temp_path $dir/scgi;
EOF
}

start_upstream() {
  local dir="$TMP/upstream"
  mkdir -p "$dir"
  {
    nginx_common "$dir"
    echo "http {"
    nginx_http_common "$dir"
    cat <<EOF
  server {
    listen 127.0.0.1:$P_UP reuseport;
    location / {
      default_type application/json;
      return 200 '$UPSTREAM_BODY';
    }
  }
}
EOF
  } >"$dir/nginx.conf"
  start_bg upstream nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" -g 'daemon off;'
}

start_nginx_proxy() {
  local dir="$TMP/nginx-proxy"
  mkdir -p "$dir"
  {
    nginx_common "$dir"
    echo "http {"
    nginx_http_common "$dir"
    cat <<EOF
  upstream bench_upstream {
    server 127.0.0.1:$P_UP;
    keepalive 128;
    keepalive_requests 100000;
  }
  server {
    listen 127.0.0.1:$P_NGX;
    location / {
      proxy_pass http://bench_upstream;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
  } >"$dir/nginx.conf"
  start_bg nginx nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" -g 'daemon off;'
}

start_haproxy() {
  cat >"$TMP/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 4096

defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
  http-reuse always

frontend bench_fe
  bind 127.0.0.1:$P_HAP
  default_backend bench_be

backend bench_be
  server up 127.0.0.1:$P_UP
EOF
  haproxy -c -q -f "$TMP/haproxy.cfg" >"$TMP/haproxy-check.log" 2>&1 ||
    die "haproxy rejected its config: $(cat "$TMP/haproxy-check.log")"
  start_bg haproxy haproxy -db -f "$TMP/haproxy.cfg"
}

start_redis() {
  start_bg redis redis-server --port "$P_REDIS" --bind 127.0.0.1 --save '' \
    --appendonly no --dir "$TMP" --protected-mode no --daemonize no
  $PY "$HELPER" wait-redis "$P_REDIS" 10 || die "redis-server did not start"
}

start_idemgate() {
  cat >"$TMP/idemgate.json" <<EOF
{
  "listen": "127.0.0.1:$P_IDEM",
  "workers": 1,
  "upstream": "http://127.0.0.1:$P_UP",
  "store": "redis",
  "redis": { "url": "redis://127.0.0.1:$P_REDIS/0" },
  "admin": { "listen": "127.0.0.1:$P_ADMIN" },
  "log": { "level": "warn", "access": false }
}
EOF
  "$IDEMGATE" -c "$TMP/idemgate.json" -t >"$TMP/idemgate-check.log" 2>&1 ||
    die "idemgate rejected its config: $(cat "$TMP/idemgate-check.log")"
  start_bg idemgate "$IDEMGATE" -c "$TMP/idemgate.json"
}

url_of() {
  case "$1" in
    idemgate) echo "http://127.0.0.1:$P_IDEM/v1/orders" ;;
    haproxy) echo "http://127.0.0.1:$P_HAP/v1/orders" ;;
    nginx) echo "http://127.0.0.1:$P_NGX/v1/orders" ;;
    direct) echo "http://127.0.0.1:$P_UP/v1/orders" ;;
  esac
}

# The process behind a target, to notice when it dies under load.
proc_of() {
  case "$1" in
    direct) echo upstream ;;
    *) echo "$1" ;;
  esac
}

probe_targets() {
  local t
  $PY "$HELPER" probe "$(url_of direct)" 10 || die "upstream nginx does not answer 200"
  for t in $TARGETS; do
    alive_or_die "$(proc_of "$t")"
    $PY "$HELPER" probe "$(url_of "$t")" 10 || die "$t does not answer 200"
  done
  if has_target idemgate; then
    # One keyed request and its replay: proves the Redis store path works.
    $PY "$HELPER" probe "$(url_of idemgate)" 5 "probe-$RUNID" ||
      die "idemgate does not answer 200 to a request with an Idempotency-Key"
    $PY "$HELPER" expect-replay "$(url_of idemgate)" "probe-$RUNID" ||
      die "idemgate does not replay a completed key"
  fi
}

# run_wrk SCENARIO TARGET ROUND DURATION [record]: one wrk run; with
# "record", appends its numbers as one JSON line to runs.jsonl.
run_wrk() {
  local sc=$1 t=$2 round=$3 dur=$4 record=${5:-}
  local script=$sc prefix="r$round-$RUNID" out line secs
  [ "$t" = idemgate ] || script=passthrough
  [ "$sc" = replay ] && prefix=$RUNID
  out="$TMP/wrk-$sc-$t-$round.txt"
  secs=$(to_seconds "$dur")
  [ "$t" = idemgate ] && [ "$record" = record ] && snapshot "$TMP/before.json"
  if ! timeout -k 5 $((secs + 30)) wrk -t1 -c"$CONNS" -d"$dur" --latency \
    -s "$HERE/$script.lua" "$(url_of "$t")" -- "$prefix" "$REPLAY_KEYS" >"$out" 2>&1; then
    cat "$out" >&2
    die "wrk failed against $t ($sc)"
  fi
  alive_or_die "$(proc_of "$t")"
  line=$(grep '^BENCHJSON ' "$out" | tail -n 1) || true
  [ -n "$line" ] || {
    cat "$out" >&2
    die "wrk printed no result against $t ($sc)"
  }
  [ "$record" = record ] || return 0
  line=${line#BENCHJSON \{}
  if [ "$t" = idemgate ]; then
    snapshot "$TMP/after.json"
    line="$($PY "$HELPER" delta "$TMP/before.json" "$TMP/after.json"),$line"
  fi
  printf '{"scenario":"%s","target":"%s","script":"%s","round":%d,%s\n' \
    "$sc" "$t" "$script" "$round" "$line" >>"$TMP/runs.jsonl"
  log "round $round  $(printf '%-16s %-9s' "$sc" "$t") $(echo "$line" |
    sed -E 's/.*"rps":([0-9]+)\.[0-9]+.*"p50_us":([0-9]+).*"p99_us":([0-9]+).*"status_errors":([0-9]+).*/\1 req\/s  p50 \2us  p99 \3us  non-2xx \4/')"
}

# Store size and outcome counters around each idemgate run: shows that
# first-execution really executes and replay really replays.
snapshot() {
  $PY "$HELPER" snapshot "$1" "$P_REDIS" "http://127.0.0.1:$P_ADMIN/metrics"
}

# The (scenario, target) pairs of one round. Baselines only run passthrough,
# whatever SCENARIOS says: they are the reference for every scenario.
build_jobs() {
  local sc t
  JOBS=()
  for t in $TARGETS; do
    [ "$t" = idemgate ] && [[ " $SCENARIOS " != *" passthrough "* ]] && continue
    JOBS+=("passthrough:$t")
  done
  if has_target idemgate; then
    for sc in $SCENARIOS; do
      [ "$sc" = passthrough ] || JOBS+=("$sc:idemgate")
    done
  fi
}

peak_rss_kb() {
  local pid=${PID[idemgate]:-}
  if [ -z "$pid" ] || [ ! -r "/proc/$pid/status" ]; then
    echo ""
    return
  fi
  awk '/^VmHWM:/ {print $2}' "/proc/$pid/status"
}

main() {
  check_inputs
  TMP=$(mktemp -d "${TMPDIR:-/tmp}/idemgate-bench.XXXXXX")
  RUNID="b$(date +%s)$$"
  read -r P_UP P_REDIS P_IDEM P_HAP P_NGX P_ADMIN < <($PY "$HELPER" ports 6)
  log "temp dir $TMP; ports upstream=$P_UP redis=$P_REDIS idemgate=$P_IDEM (admin $P_ADMIN) haproxy=$P_HAP nginx=$P_NGX"

  start_upstream
  has_target haproxy && start_haproxy
  has_target nginx && start_nginx_proxy
  if has_target idemgate; then
    start_redis
    start_idemgate
  fi
  probe_targets
  log "all targets answer 200"

  build_jobs
  local job t n=${#JOBS[@]} i round
  if [ "$WARMUP" != 0 ]; then
    log "warm-up: $WARMUP per target (passthrough, not recorded)"
    for t in $TARGETS; do run_wrk passthrough "$t" 0 "$WARMUP"; done
  fi
  if has_target idemgate && [[ " $SCENARIOS " == *" replay "* ]]; then
    log "warm-up: completing $REPLAY_KEYS replay keys"
    $PY "$HELPER" warm "$(url_of idemgate)" "$RUNID" "$REPLAY_KEYS" ||
      die "replay warm-up failed"
  fi

  : >"$TMP/runs.jsonl"
  for round in $(seq 1 "$ROUNDS"); do
    # Even rounds run the list backwards, so no target always goes first.
    for ((i = 0; i < n; i++)); do
      if ((round % 2 == 1)); then job=${JOBS[$i]}; else job=${JOBS[$((n - 1 - i))]}; fi
      run_wrk "${job%%:*}" "${job#*:}" "$round" "$DURATION" record
    done
  done

  local rss
  rss=$(peak_rss_kb)
  $PY "$HELPER" meta "$TMP/meta.json" \
    "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)" "duration=$DURATION" "conns=$CONNS" \
    "rounds=$ROUNDS" "scenarios_list=$SCENARIOS" "targets_list=$TARGETS" \
    "replay_keys=$REPLAY_KEYS" "cpus=$(nproc)" \
    "cpu_model=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" \
    "idemgate=$("$IDEMGATE" --version 2>&1 | head -n 1)" \
    "wrk=$(wrk -v 2>&1 | head -n 1 | cut -d' ' -f1-2)" \
    "nginx=$(nginx -v 2>&1 | head -n 1)" \
    "haproxy=$(haproxy -v 2>&1 | head -n 1 | cut -d' ' -f1-3)" \
    "redis=$(redis-server --version | head -n 1)" \
    ${rss:+"idemgate_peak_rss_kb=$rss"}
  $PY "$HELPER" report "$TMP/runs.jsonl" "$OUT" "$TMP/meta.json"
}

main "$@"
