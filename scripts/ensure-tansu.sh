#!/usr/bin/env bash
# Installs tansu (a Kafka-compatible broker, used by scripts/bench-aggregator.sh)
# once per machine into ~/.cache/tally-tools/tansu, and prints the binary's path.
# Does nothing but print the path when it is already there. Building it takes
# ~20 minutes on a 2-core machine.
#
# Usage: scripts/ensure-tansu.sh        (TANSU_ROOT overrides the install root)
set -euo pipefail

ROOT="${TANSU_ROOT:-$HOME/.cache/tally-tools/tansu}"
BIN="$ROOT/bin/tansu"

if [[ ! -x "$BIN" ]]; then
  command -v cargo >/dev/null || { echo "cargo is needed to build tansu" >&2; exit 1; }
  echo "installing tansu into $ROOT (one-time, ~20 min)..." >&2
  mkdir -p "$ROOT"
  cargo install tansu --locked --features dynostore --root "$ROOT" >&2
fi

[[ -x "$BIN" ]] || { echo "tansu was not installed at $BIN" >&2; exit 1; }
echo "$BIN"
