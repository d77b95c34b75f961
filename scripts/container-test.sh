#!/usr/bin/env bash
# Builds the Dockerfile and runs the image, with no Docker engine and no
# image registry (issue 16 item 5). Debian 12, as root:
#   1. apt-get: buildah and mmdebstrap (when missing);
#   2. mmdebstrap makes the debian:12 base from this machine's Debian mirror
#      (/etc/apt/sources.list, sources.list.d/*.list or deb822 *.sources),
#      imported as docker.io/library/debian:12 and :12-slim;
#   3. buildah bud --isolation chroot --format docker (OCI drops HEALTHCHECK);
#   4. checks on the image: its config (HEALTHCHECK, non-root USER, ports),
#      `idemgate --version`, `-t` and `-T` on the image's config, ldd of the
#      binary against the runtime stage's packages (both ways), and an
#      instance started inside it answering --healthcheck, /readyz (the
#      memory store) and /keys (404 on loopback, 403 from another address).
# Everything (base tarball, image storage, containers.conf) lives in one
# temporary directory, removed at exit with the containers. The script runs
# in a mount namespace of its own, where /var/lib/containers (buildah's
# blob-info cache, whatever --root says) is a directory of that temporary
# one: /etc/containers and /var/lib/containers are left as they were, and
# no mount outlives the script, even killed.
# chroot isolation shares the host's network: the instance listens on two
# free ports (IDEMGATE_LISTEN, IDEMGATE_ADMIN_LISTEN) rather than 8080/9091,
# which other processes on a CI machine may hold.
# Environment: IDEMGATE_STORAGE_DRIVER (overlay; vfs where overlay cannot
# mount), TMPDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
t0=$(date +%s)

say() { echo "container-test: $*"; }
die() {
  echo "container-test: FAIL: $*" >&2
  exit 1
}
since() { echo "$(($(date +%s) - $1)) s"; }

[ "$(id -u)" -eq 0 ] || die "needs root (mmdebstrap and buildah --isolation chroot)"
[ -f Dockerfile ] || die "no Dockerfile in $repo"
if [ "${IDEMGATE_CT_UNSHARED:-}" != 1 ]; then
  command -v unshare >/dev/null || die "unshare (util-linux) is missing"
  IDEMGATE_CT_UNSHARED=1 exec unshare --mount --propagation private bash "$0" "$@"
fi

# ---- 1. packages ----
need=()
command -v buildah >/dev/null || need+=(buildah)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
if [ ${#need[@]} -gt 0 ]; then
  t=$(date +%s)
  export DEBIAN_FRONTEND=noninteractive
  log=$(mktemp)
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    rm -f "$log"
    die "apt-get install ${need[*]} failed"
  fi
  rm -f "$log"
  say "installed ${need[*]} in $(since "$t")"
fi

# ---- temporary directory, storage and cleanup ----
tmp=$(mktemp -d "${TMPDIR:-/tmp}/idemgate-container.XXXXXX")
driver=${IDEMGATE_STORAGE_DRIVER:-overlay}
# containers.conf: buildah's default ulimits make setrlimit fail here.
printf '[containers]\ndefault_ulimits = []\n' >"$tmp/containers.conf"
export CONTAINERS_CONF="$tmp/containers.conf"
made_lib=""
B() { buildah --root "$tmp/storage" --runroot "$tmp/run" --storage-driver "$driver" "$@"; }
containers=()
cleanup() {
  local rc=$? c
  set +e
  for c in "${containers[@]}"; do B rm "$c" >/dev/null 2>&1 || echo "container-test: could not remove container $c" >&2; done
  B rmi --all --force >/dev/null 2>&1
  # the storage driver's own mounts (overlay mounts its directory privately)
  awk -v t="$tmp" 'index($2, t) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
  umount -l /var/lib/containers 2>/dev/null
  [ -z "$made_lib" ] || rmdir /var/lib/containers
  rm -rf "$tmp"
  [ $rc -eq 0 ] || echo "container-test: failed after $(since "$t0")" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# buildah commit writes its blob-info cache to /var/lib/containers/cache as
# root, whatever --root says: that directory is the temporary one here.
[ -d /var/lib/containers ] || { mkdir /var/lib/containers && made_lib=1; }
mkdir "$tmp/lib-containers"
mount --bind "$tmp/lib-containers" /var/lib/containers || die "cannot bind $tmp/lib-containers on /var/lib/containers"

# ---- 2. the base image from this machine's Debian mirror ----
# "URI SUITE" of every enabled deb entry of the apt sources.
apt_entries() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1 == "deb" {
      i = 2
      if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
      if (i + 1 <= NF) print $i, $(i + 1)
    }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk 'function flush(   n, m, a, b, u, s) {
        if (types ~ /(^|[ \t])deb([ \t]|$)/ && tolower(enabled) != "no") {
          n = split(uris, u, /[ \t]+/); m = split(suites, s, /[ \t]+/)
          for (a = 1; a <= n; a++) for (b = 1; b <= m; b++) if (u[a] != "" && s[b] != "") print u[a], s[b]
        }
        types = uris = suites = field = ""; enabled = "yes"
      }
      BEGIN { enabled = "yes" }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      /^[ \t]/ { if (field == "uris") uris = uris " " $0; else if (field == "suites") suites = suites " " $0; next }
      {
        key = tolower($0); sub(/:.*/, "", key); val = $0; sub(/^[^:]*:[ \t]*/, "", val); field = key
        if (key == "types") types = val
        else if (key == "uris") uris = val
        else if (key == "suites") suites = val
        else if (key == "enabled") enabled = val
      }
      END { flush() }' "$f"
  done
}
mapfile -t mirrors < <(apt_entries | awk '$2 ~ /^bookworm(-updates|-security|\/updates)?$/ && !seen[$0]++ {print "deb " $1 " " $2 " main"}')
printf '%s\n' "${mirrors[@]}" | grep -qE '^deb [^ ]+ bookworm main$' ||
  die "no Debian bookworm entry in /etc/apt/sources.list or /etc/apt/sources.list.d/ (*.list, *.sources): mmdebstrap needs this machine's Debian mirror"
say "Debian sources for the base image:"
printf '  %s\n' "${mirrors[@]}"
t=$(date +%s)
mmdebstrap -q --variant=apt --include=ca-certificates bookworm "$tmp/base.tar" "${mirrors[@]}" \
  >"$tmp/mmdebstrap.log" 2>&1 || {
  tail -n 30 "$tmp/mmdebstrap.log" >&2
  die "mmdebstrap could not make the bookworm base from ${mirrors[0]}"
}
c=$(B from scratch) || die "buildah from scratch failed (storage driver $driver; try IDEMGATE_STORAGE_DRIVER=vfs)"
containers+=("$c")
B add --quiet "$c" "$tmp/base.tar" / >/dev/null || die "buildah add of the base tarball failed"
B config --cmd bash "$c"
B commit --quiet "$c" docker.io/library/debian:12 >/dev/null || die "buildah commit of debian:12 failed"
B tag docker.io/library/debian:12 docker.io/library/debian:12-slim
B rm "$c" >/dev/null && containers=()
rm -f "$tmp/base.tar"
say "base image debian:12 (and :12-slim) in $(since "$t")"

# ---- 3. the image ----
# The context is the repository without .git and build directories (a
# build/ with a CMakeCache would only cost time: the Dockerfile builds in /build).
printf '%s\n' .git build 'build-*' '**/__pycache__' bench/results bench-results.json >"$tmp/ignore"
t=$(date +%s)
if ! B bud --isolation chroot --pull=never --format docker --ignorefile "$tmp/ignore" \
  -t idemgate:ci "$repo" >"$tmp/bud.log" 2>&1; then
  tail -n 40 "$tmp/bud.log" >&2
  die "buildah bud of the Dockerfile failed"
fi
grep -i 'warn' "$tmp/bud.log" >&2 || true
say "built idemgate:ci in $(since "$t") ($(B images --format '{{.Size}}' localhost/idemgate:ci))"

# ---- 4. checks ----
fails=0
check() { # check NAME CONDITION-RESULT(0/1) DETAIL
  if [ "$2" -eq 0 ]; then
    say "ok   $1"
  else
    echo "container-test: FAIL $1: $3" >&2
    fails=$((fails + 1))
  fi
}

hc=$(B inspect --type image --format '{{.Docker.Config.Healthcheck}}' idemgate:ci)
user=$(B inspect --type image --format '{{.Docker.Config.User}}' idemgate:ci)
ports=$(B inspect --type image --format '{{.Docker.Config.ExposedPorts}}' idemgate:ci)
[[ "$hc" == *"idemgate"*"--healthcheck"* ]] && r=0 || r=1
check "HEALTHCHECK runs idemgate --healthcheck" "$r" "image healthcheck: ${hc:-none}"
[[ -n "$user" && "$user" != root && "$user" != 0 && "$user" != 0:* && "$user" != root:* ]] && r=0 || r=1
check "USER is not root ($user)" "$r" "image user: '${user}'"
[[ "$ports" == *8080/tcp* && "$ports" == *9091/tcp* ]] && r=0 || r=1
check "EXPOSE 8080 9091" "$r" "exposed: $ports"

c=$(B from --pull=never idemgate:ci) || die "buildah from idemgate:ci failed"
containers+=("$c")
R() { B run --isolation chroot "$@"; }

out=$(R "$c" -- id -u 2>&1) || true
[ "$out" != 0 ] && r=0 || r=1
check "runs as uid $out" "$r" "runs as root"

out=$(R "$c" -- /usr/local/bin/idemgate --version 2>&1) || true
[[ "$out" == idemgate\ * ]] && r=0 || r=1
check "--version: $out" "$r" "$out"

out=$(R "$c" -- /usr/local/bin/idemgate -c /etc/idemgate/idemgate.json -t 2>&1) && r=0 || r=1
check "-t on the image's config: $out" "$r" "$out"

out=$(R "$c" -- /usr/local/bin/idemgate -c /etc/idemgate/idemgate.json -T 2>&1) || true
echo "$out" | grep -q '"store": "memory"' && r=0 || r=1
check "the image's store is memory" "$r" "$(echo "$out" | grep '"store"')"
echo "$out" | grep -A1 '"admin"' | grep -q '"listen": "0.0.0.0:9091"' && r=0 || r=1
check "the image's admin.listen is 0.0.0.0:9091" "$r" "$(echo "$out" | grep -A1 '"admin"' | tr -d '\n')"

# ldd inside the image: every needed .so found; each one's package named by
# the runtime stage (or one that every Debian image has: libc6 and
# libgcc-s1, which the Essential packages depend on; this base, with
# ca-certificates, has more than debian:12-slim, so "found" alone is not
# enough); each library package the runtime stage names needed by the binary.
ldd_out=$(R "$c" -- sh -c '
  ldd /usr/local/bin/idemgate
  for f in $(ldd /usr/local/bin/idemgate | awk "/=> \\//{print \$3}"); do
    p=$(dpkg -S "$(readlink -f "$f")" 2>/dev/null || dpkg -S "$f" 2>/dev/null) || p="?: $f"
    pkg=${p%%:*}
    echo "pkg $pkg $f"
  done' 2>&1) || true
missing=$(echo "$ldd_out" | grep 'not found' || true)
[ -z "$missing" ] && r=0 || r=1
check "ldd: every needed library is in the image" "$r" "$missing"
runtime_pkgs=$(awk '/^FROM[ \t]/ {s = ""} {s = s " " $0} END {print s}' Dockerfile | tr '\\' ' ' |
  grep -o 'apt-get install[^&]*' | tr ' ' '\n' | grep -v -e '^-' -e '^$' -e '^apt-get$' -e '^install$' | sort -u)
needed_pkgs=$(echo "$ldd_out" | awk '$1 == "pkg" {print $2}' | sort -u)
unnamed=$(echo "$ldd_out" | awk '$1 == "pkg" && $2 != "libc6" && $2 != "libgcc-s1" {print $2}' | sort -u |
  comm -23 - <(echo "$runtime_pkgs"))
[ -z "$unnamed" ] && r=0 || r=1
check "ldd: every library package is named in the runtime stage ($(echo $needed_pkgs))" "$r" \
  "the binary needs $(echo $unnamed), not installed by the Dockerfile's runtime stage (only there by chance)"
unneeded=$(echo "$runtime_pkgs" | grep '^lib' | comm -23 - <(echo "$needed_pkgs") || true)
[ -z "$unneeded" ] && r=0 || r=1
check "ldd: every library the runtime stage installs is needed" "$r" \
  "the runtime stage installs $(echo $unneeded), which the binary does not link"

# An instance inside the image: the image's config and user, the memory
# store, two free ports (chroot isolation shares the host's network).
port_free() {
  local hex
  hex=$(printf ':%04X' "$1")
  ! awk -v p="$hex" '$4 == "0A" && substr($2, length($2) - 4) == p {f = 1} END {exit !f}' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}
pick_port() {
  local p _
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 40000))
    [ "$p" != "${1:-}" ] && port_free "$p" && { echo "$p"; return 0; }
  done
  return 1
}
other_ip=$(hostname -I 2>/dev/null | tr ' ' '\n' | grep -E '^[0-9]+\.' | grep -v '^127\.' | head -n 1 || true)
run_instance() {
  R --env IDEMGATE_LISTEN="0.0.0.0:$1" --env IDEMGATE_ADMIN_LISTEN="0.0.0.0:$2" --env OTHER_IP="$other_ip" \
    "$c" -- bash -c '
  cfg=/etc/idemgate/idemgate.json
  /usr/local/bin/idemgate -c $cfg >/tmp/idemgate.log 2>&1 &
  pid=$!
  get() { # get HOST PORT PATH: the status line
    exec 3<>"/dev/tcp/$1/$2" || return 1
    printf "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" "$3" "$1" >&3
    head -n 1 <&3 | tr -d "\r"
    exec 3<&-
  }
  i=0 hc=1
  while [ $i -lt 100 ]; do
    if /usr/local/bin/idemgate -c $cfg --healthcheck 2>/tmp/hc.err; then hc=0; break; fi
    kill -0 $pid 2>/dev/null || break
    sleep 0.1
    i=$((i + 1))
  done
  echo "healthcheck $hc after $i polls$(sed "s/^/: /" /tmp/hc.err)"
  if [ $hc -eq 0 ]; then
    echo "readyz $(get 127.0.0.1 ${IDEMGATE_ADMIN_LISTEN##*:} /readyz)"
    echo "keys-loopback $(get 127.0.0.1 ${IDEMGATE_ADMIN_LISTEN##*:} /keys/k1)"
    [ -n "$OTHER_IP" ] && echo "keys-other $(get $OTHER_IP ${IDEMGATE_ADMIN_LISTEN##*:} /keys/k1)"
  fi
  kill -TERM $pid 2>/dev/null
  wait $pid
  echo "exit $?"
  /usr/local/bin/idemgate -c $cfg --healthcheck 2>/dev/null
  echo "healthcheck-after-exit $?"
  sed "s/^/log: /" /tmp/idemgate.log
  '
}
inst=""
for attempt in 1 2 3; do
  p1=$(pick_port) && p2=$(pick_port "$p1") || die "no free TCP port found"
  inst=$(run_instance "$p1" "$p2" 2>&1) || true
  # a port taken between the check and the bind: try other ports
  echo "$inst" | grep -qi 'address already in use' || break
  say "ports $p1/$p2 taken meanwhile (attempt $attempt); other ports"
done
line() { echo "$inst" | awk -v k="$1" '$1 == k {sub(/^[^ ]* /, ""); print; exit}'; }
[[ "$(line healthcheck)" == 0\ * ]] && r=0 || r=1
check "--healthcheck against an instance inside the image (listen :$p1, admin 0.0.0.0:$p2): $(line healthcheck)" "$r" "$inst"
[[ "$(line readyz)" == *" 200 "* ]] && r=0 || r=1
check "/readyz 200 with the image's store: $(line readyz)" "$r" "$(line readyz)"
[[ "$(line keys-loopback)" == *" 404 "* ]] && r=0 || r=1
check "/keys from loopback without a token: $(line keys-loopback)" "$r" "$(line keys-loopback)"
if [ -n "$other_ip" ]; then
  [[ "$(line keys-other)" == *" 403 "* ]] && r=0 || r=1
  check "/keys from $other_ip without a token: $(line keys-other)" "$r" "$(line keys-other)"
else
  say "skip /keys from a non-loopback address: this machine has none"
fi
[ "$(line exit)" = 0 ] && r=0 || r=1
check "SIGTERM: exit $(line exit)" "$r" "$inst"
[ "$(line healthcheck-after-exit)" = 1 ] && r=0 || r=1
check "--healthcheck with no instance: exit $(line healthcheck-after-exit)" "$r" "$(line healthcheck-after-exit)"

[ $fails -eq 0 ] || {
  echo "$inst" | grep '^log: ' | tail -n 20 >&2
  die "$fails check(s) failed"
}
say "ok, in $(since "$t0")"
