#!/usr/bin/env bash
# Installs the Debian 12 packages idemgate needs to build, run and test
# (clang-format too, for make fmt and make fmt-check; nodejs and npm for the
# webhook test's signers, tests/node; lmdb-utils: mdb_stat and mdb_dump, with
# which tests/faults/test_lmdb_kill.py reads the LMDB environment).
# Skips what is already installed; needs root (or sudo) only when something is missing.
set -euo pipefail
PKGS=(build-essential cmake pkg-config libevent-dev libssl-dev libhiredis-dev libcjson-dev
      libxxhash-dev libnghttp2-dev liblmdb-dev lmdb-utils libcmocka-dev redis-server python3
      python3-pytest python3-h2 curl clang-format nodejs npm)
# --bench: the load harness (bench/run); nghttp2-client (h2load) and h2o for
# its HTTP/2 rows.
if [ "${1:-}" = "--bench" ]; then PKGS+=(wrk nginx haproxy nghttp2-client h2o); fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" && continue
  # A nodejs from elsewhere (NodeSource) brings its own npm and conflicts
  # with Debian's npm package: an npm on the PATH is enough.
  [ "$p" = npm ] && command -v npm >/dev/null 2>&1 && continue
  missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "deps.sh: installing ${missing[*]}" >&2
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
