#!/usr/bin/env bash
# check-deploy.sh — checks every file of deploy/ with a tool that knows its
# format (deploy/README.md lists them). Run by .ci/run ("== deploy files");
# by hand: scripts/check-deploy.sh [path/to/idemgate] (default
# build/idemgate, built when missing). Needs, from Debian:
#   apt-get install --no-install-recommends python3-yaml python3-pytest systemd prometheus
# Nothing is installed outside a temporary directory; the idemgate
# processes it starts (the SIGHUP probe, the pytest) are stopped by pid.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-${IDEMGATE_BIN:-build/idemgate}}
PY=/usr/bin/python3 # Debian's, with python3-yaml and python3-pytest

missing=()
$PY -c 'import yaml' 2>/dev/null || missing+=(python3-yaml)
$PY -c 'import pytest' 2>/dev/null || missing+=(python3-pytest)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v promtool >/dev/null || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  echo "check-deploy: missing tools; install them with:" >&2
  echo "  apt-get install --no-install-recommends ${missing[*]}" >&2
  exit 2
fi
if [ ! -x "$BIN" ]; then
  echo "-- building $BIN"
  cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  cmake --build build -j "$(nproc)" --target idemgate >/dev/null
  BIN=build/idemgate
fi
BIN=$(readlink -f "$BIN")

tmp=$(mktemp -d)
cleanup() { rm -rf "$tmp"; }
trap cleanup EXIT
fail() {
  echo "check-deploy: FAILED: $*" >&2
  exit 1
}

# A planted fault must make a check fail: mutate FILE with the sed
# expression into a copy, run the check command on the copy (its path
# replaces @), expect a failure whose output contains WANT.
expect_caught() { # file sed-expr want cmd...
  local file=$1 expr=$2 want=$3
  shift 3
  local copy
  copy="$tmp/mutant.$(basename "$file")"
  sed "$expr" "$file" >"$copy"
  cmp -s "$file" "$copy" && fail "mutation '$expr' changes nothing in $file (stale self-test)"
  local args=() a out
  for a in "$@"; do args+=("${a//@/$copy}"); done
  if out=$("${args[@]}" 2>&1); then
    fail "planted fault '$expr' in $file was not caught"
  fi
  grep -qF -- "$want" <<<"$out" || fail "planted fault '$expr': expected '$want' in: $out"
  echo "  caught: $expr -> $want"
}

echo "-- kubernetes: manifests (scripts/check-k8s.py) and idemgate -t on each embedded config"
$PY scripts/check-k8s.py --idemgate "$BIN" deploy/kubernetes/*.yaml
k8s() { $PY scripts/check-k8s.py --idemgate "$BIN" "$@"; }
gw=deploy/kubernetes/gateway.yaml
expect_caught $gw 's/containerPort: 9091/containerPort: 90910/' "must be an integer 1..65535" k8s @
expect_caught $gw 's/livenessProbe:/livenesProbe:/' "unknown field 'livenesProbe'" k8s @
expect_caught $gw 's|^        app.kubernetes.io/name: idemgate$|        app.kubernetes.io/name: other|' \
  "does not match the template's labels" k8s @
expect_caught $gw '/^kind: PodDisruptionBudget/,$ s|name: idemgate$|name: idemgat|' \
  "selects no pod template" k8s @
expect_caught $gw 's/terminationGracePeriodSeconds: 30/terminationGracePeriodSeconds: 20/' \
  "< preStop 5 s + shutdown_grace_ms 20000" k8s @
expect_caught $gw 's/"shutdown_grace_ms": 20000/"shutdown_grace_ms": "20s"/' "idemgate -t:" k8s @
expect_caught $gw 's/"timeout_ms": 1000/"timeout_ms": 0/' "idemgate -t:" k8s @
expect_caught $gw 's/memory: 256Mi/memory: 256MB/' "is not a resource quantity" k8s @
expect_caught $gw 's/value: "2"/value: 2/' "value must be a string" k8s @
expect_caught $gw 's/name: IDEMGATE_WORKERS/name: IDEMGATE WORKERS/' "env name" k8s @
expect_caught $gw 's/"listen": "0.0.0.0:9091"/"listen": "127.0.0.1:9091"/' "is loopback" k8s @
expect_caught $gw 's|path: /readyz|path: /healthz|' "readinessProbe path" k8s @
expect_caught $gw 's/port: admin/port: admn/' "names no port of the container" k8s @
expect_caught $gw 's/^  name: idemgate$/  name: Idemgate/' "is not a DNS-1123 subdomain" k8s @
expect_caught $gw 's|^apiVersion: policy/v1$|apiVersion: policy/v1beta2|' "unknown apiVersion/kind" k8s @
expect_caught $gw 's|targetPort: http|targetPort: web|' "names no container port" k8s @
expect_caught $gw 's|command: \["/bin/sleep", "5"\]|command: []|' "exec.command must be" k8s @

lm=deploy/kubernetes/sidecar-lmdb.yaml
expect_caught $lm 's|mountPath: /var/lib/idemgate$|mountPath: /var/lib/idemgate-x|' \
  "lmdb.path /var/lib/idemgate is on no volume" k8s @
expect_caught $lm '/mountPath: \/var\/lib\/idemgate$/a\              readOnly: true' \
  "which is not writable" k8s @
expect_caught $lm 's/sizeLimit: 320Mi/sizeLimit: 320MB/' "is not a resource quantity" k8s @
expect_caught $lm 's/"sync": "os"/"sync": "always"/' "idemgate -t:" k8s @

echo "-- systemd: systemd-analyze verify and security --offline, in a temporary root"
unit=deploy/systemd/idemgate.service
root="$tmp/root"
mkdir -p "$root/usr/local/bin" "$root/usr/bin" "$root/etc/systemd/system" "$root/usr/lib/systemd"
install -m 0755 "$BIN" "$root/usr/local/bin/idemgate"
install -m 0755 /usr/bin/kill "$root/usr/bin/kill" # ExecReload=/bin/kill (merged /usr)
ln -s usr/bin "$root/bin"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/" # the targets the unit names
verify_unit() { # unit file: rc and any output (unknown keys are only warnings) fail
  cp "$1" "$root/etc/systemd/system/idemgate.service"
  local out
  out=$(systemd-analyze verify --root="$root" idemgate.service 2>&1) || {
    echo "$out"
    return 1
  }
  [ -z "$out" ] || {
    echo "$out"
    return 1
  }
}
verify_unit $unit || fail "systemd-analyze verify $unit"
echo "  systemd-analyze verify: clean"
expect_caught $unit 's/^ProtectSystem=strict/ProtectSytem=strict/' "Unknown key" verify_unit @
expect_caught $unit 's/AF_UNIX$/AF_UNIX AF_BOGUS/' "Failed to parse address family" verify_unit @
expect_caught $unit 's|^ExecStart=/usr/local/bin/idemgate|ExecStart=/usr/local/bin/idemgated|' \
  "is not executable" verify_unit @
# The LMDB drop-in, with the unit: verify, then -t with its environment
# (lmdb.path moved into $tmp: -t creates and writes the directory).
dropin=deploy/systemd/idemgate.service.d/lmdb.conf
verify_dropin() { # drop-in file
  mkdir -p "$root/etc/systemd/system/idemgate.service.d"
  cp "$1" "$root/etc/systemd/system/idemgate.service.d/lmdb.conf"
  local rc=0
  verify_unit $unit || rc=1
  rm -rf "$root/etc/systemd/system/idemgate.service.d"
  return $rc
}
verify_dropin $dropin || fail "systemd-analyze verify $unit + $dropin"
echo "  systemd-analyze verify with $dropin: clean"
expect_caught $dropin 's/^StateDirectory=idemgate/StateDirecotry=idemgate/' "Unknown key" \
  verify_dropin @
for d in 'StateDirectory=idemgate' 'Environment=IDEMGATE_STORE=lmdb' \
  'Environment=IDEMGATE_LMDB_PATH=/var/lib/idemgate'; do
  grep -qxF "$d" $dropin || fail "$dropin: no line $d"
done
store=$(sed -n 's/^Environment=IDEMGATE_STORE=//p' $dropin)
lpath=$(sed -n 's/^Environment=IDEMGATE_LMDB_PATH=//p' $dropin)
[ "$lpath" = "/var/lib/$(sed -n 's/^StateDirectory=//p' $dropin)" ] ||
  fail "$dropin: IDEMGATE_LMDB_PATH $lpath is not the StateDirectory"
out=$(IDEMGATE_STORE=$store IDEMGATE_LMDB_PATH="$tmp/state$lpath" "$BIN" -t -c config/idemgate.json 2>&1) ||
  fail "idemgate -t -c config/idemgate.json with $dropin's environment: $out"
echo "  idemgate -t with $dropin's environment: $out"
mkdir -p "$root/etc/systemd/system/idemgate.service.d"
cp $dropin "$root/etc/systemd/system/idemgate.service.d/lmdb.conf"
secl=$(systemd-analyze security --offline=yes --root="$root" --threshold=20 idemgate.service 2>&1) ||
  fail "exposure above 2.0 with $dropin: $(tail -n 1 <<<"$secl")"
echo "  systemd-analyze security with $dropin: $(grep -o 'Overall exposure level.*' <<<"$secl")"
rm -rf "$root/etc/systemd/system/idemgate.service.d"

cp $unit "$root/etc/systemd/system/idemgate.service"
sec=$(systemd-analyze security --offline=yes --root="$root" --threshold=20 idemgate.service 2>&1) ||
  fail "exposure above 2.0: $(tail -n 1 <<<"$sec")"
echo "  systemd-analyze security: $(grep -o 'Overall exposure level.*' <<<"$sec")"
for d in 'Restart=on-failure' 'DynamicUser=yes' 'ProtectSystem=strict' 'NoNewPrivileges=yes' \
  'CapabilityBoundingSet=' 'PrivateTmp=yes' 'ProtectHome=yes' \
  'RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX' 'SystemCallFilter=@system-service' \
  'LimitNOFILE=65536' 'KillSignal=SIGTERM'; do
  grep -qxF "$d" $unit || fail "$unit: no line $d"
done
# TimeoutStopSec must outlast the drain of the config the unit runs.
stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s\{0,1\}$/\1/p' $unit)
grace=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1])).get("limits",{}).get("shutdown_grace_ms",10000))' config/idemgate.json)
[ -n "$stop" ] && [ $((stop * 1000)) -gt "$grace" ] ||
  fail "$unit: TimeoutStopSec=${stop:-?} does not outlast shutdown_grace_ms $grace"
echo "  TimeoutStopSec=${stop}s > shutdown_grace_ms ${grace} of config/idemgate.json"
# ExecReload (SIGHUP) is active exactly when the binary survives SIGHUP.
hup=$($PY - "$BIN" <<'PYEOF'
import signal, socket, subprocess, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
p = subprocess.Popen([sys.argv[1], "--store", "memory", "--listen", "127.0.0.1:%d" % port,
                      "--admin", "off", "--upstream", "http://127.0.0.1:9"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for _ in range(50):
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        break
    except OSError:
        time.sleep(0.1)
try:
    p.send_signal(signal.SIGHUP)
    try:
        rc = p.wait(1.0)
        print("exits %s" % ("on signal %d" % -rc if rc < 0 else "with status %d" % rc))
    except subprocess.TimeoutExpired:
        print("survives")
finally:
    if p.poll() is None:
        p.terminate()
        p.wait(15)
PYEOF
)
case "$hup" in
  survives)
    grep -q '^ExecReload=/bin/kill -HUP \$MAINPID$' $unit ||
      fail "idemgate now survives SIGHUP (reload): enable ExecReload=/bin/kill -HUP \$MAINPID in $unit"
    echo "  SIGHUP: idemgate survives it (reload); ExecReload is enabled" ;;
  *)
    grep -q '^ExecReload=' $unit && fail "idemgate $hup on SIGHUP: ExecReload would stop the service"
    echo "  SIGHUP: this idemgate $hup, so ExecReload stays commented out" ;;
esac
# admin.token: wired from a Secret in the manifests once the binary takes it.
printf '{"admin": {"listen": "127.0.0.1:9091", "token": "x"}}' >"$tmp/token.json"
if "$BIN" -t -c "$tmp/token.json" >/dev/null 2>&1; then
  grep -q '^ *- name: IDEMGATE_ADMIN_TOKEN' deploy/kubernetes/*.yaml ||
    fail "idemgate now takes admin.token: wire IDEMGATE_ADMIN_TOKEN from a Secret in deploy/kubernetes"
  echo "  admin.token supported and wired"
else
  echo "  admin.token: not supported by this idemgate ($("$BIN" -t -c "$tmp/token.json" 2>&1 || true)); left out of the manifests"
fi

echo "-- prometheus: promtool check rules, promtool test rules"
promtool check rules deploy/prometheus/alerts.yml
(cd deploy/prometheus && promtool test rules alerts_test.yml)
$PY - <<'EOF'
import yaml
rules = yaml.safe_load(open("deploy/prometheus/alerts.yml"))
tests = yaml.safe_load(open("deploy/prometheus/alerts_test.yml"))
alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
fired = {c["alertname"] for t in tests["tests"] for c in t.get("alert_rule_test", [])
         if c.get("exp_alerts")}
quiet = {c["alertname"] for t in tests["tests"] for c in t.get("alert_rule_test", [])
         if not c.get("exp_alerts")}
missing = sorted(alerts - fired)
assert not missing, "alerts with no firing case in alerts_test.yml: %s" % missing
assert not sorted(alerts - quiet), "alerts with no quiet case: %s" % sorted(alerts - quiet)
print("  every alert (%d) fires in alerts_test.yml and has a quiet case" % len(alerts))
EOF
expect_caught deploy/prometheus/alerts.yml 's/outcome="lost"}\[10m\]/outcome="lost"}[10m/' \
  "FAILED" promtool check rules @

echo "-- grafana: JSON, PromQL syntax (promtool), every metric against a live /metrics (pytest)"
$PY - "$tmp/dashboard_rules.yml" <<'EOF'
import json, re, sys, yaml
d = json.load(open("deploy/grafana/idemgate.json"))
exprs = []
def walk(ps):
    for p in ps:
        walk(p.get("panels") or [])
        exprs.extend(t["expr"] for t in p.get("targets") or [] if t.get("expr"))
walk(d["panels"])
def concrete(e):  # Grafana's variables as Prometheus would get them
    e = e.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?\w+\}?", ".*", e)
rules = [{"record": "dashboard:expr_%d" % i, "expr": concrete(e)} for i, e in enumerate(exprs)]
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[1], "w"))
print("  %d panel expressions" % len(exprs))
EOF
promtool check rules "$tmp/dashboard_rules.yml" | sed 's/^/  /'
if out=$(cd tests/integration &&
  IDEMGATE_BIN="$BIN" $PY -m pytest -q -p no:cacheprovider -s test_deploy_metrics.py 2>&1); then
  grep -E 'all in /metrics|passed' <<<"$out" | sed 's/^[. ]*/  /'
else
  echo "$out"
  fail "tests/integration/test_deploy_metrics.py"
fi

echo "deploy files ok"
