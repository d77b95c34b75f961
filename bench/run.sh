#!/usr/bin/env bash
# Kept for old habits: the harness is bench/run (see bench/README.md).
exec "$(dirname "${BASH_SOURCE[0]}")/run" "$@"
