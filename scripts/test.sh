#!/usr/bin/env bash
# The test command (README "Two commands"): installs what the tests need on a fresh
# machine of this kind, then runs every test. `.ci/run` calls it after fmt and clippy.
#
# Each section installs only what is missing, so a second run starts at once.
# Environment:
#   TALLY_PROPTEST_CASES   more cases for the property tests (default: each test's own)
#   TALLY_FUZZ_SECONDS     seconds per fuzz target (default 60; scripts/fuzz.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "${TALLY_APT_UPDATED:-}" ]; then
    apt-get update -qq
    TALLY_APT_UPDATED=1
  fi
  apt-get install -y -qq --no-install-recommends "$@"
}

# Build packages: a C toolchain and make build librdkafka and SQLite from source
# (rdkafka-sys and rusqlite's bundled feature); zlib for librdkafka's compression.
missing=()
for tool in cc make perl pkg-config; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ! -e /usr/include/zlib.h ]; then missing+=(zlib); fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing build packages (missing: ${missing[*]})"
  apt_install build-essential perl pkg-config zlib1g-dev
fi

# docker-compose.yml, validated by a real compose implementation: Debian's
# docker-compose (1.29) checks the file against the compose schema with `config -q`,
# which needs no Docker daemon. tally/tests/compose_config.rs then checks what only
# this project can (flags, env vars, scrape targets, mounted files).
if ! command -v docker-compose >/dev/null 2>&1; then
  echo "installing docker-compose"
  apt_install docker-compose
fi
echo "== docker-compose config -q"
docker-compose --project-directory . -f docker-compose.yml config -q

# The live page is tested in a real browser: tally/tests/ui_browser.rs drives
# Debian's headless Chromium (and fails, never skips, without it).
if ! command -v chromium >/dev/null 2>&1; then
  echo "installing chromium"
  apt_install chromium
fi

echo "== cargo test --workspace --locked"
log=$(mktemp)
set +e
cargo test --workspace --locked 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary, the last of
# which is often a doc-test binary with nothing in it).
passed=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($(i+1) ~ /^passed;?$/) s += $i } END { print s + 0 }' "$log")
failed=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($(i+1) ~ /^failed;?$/) s += $i } END { print s + 0 }' "$log")
rm -f "$log"

# Fuzzing (issue 11.8b): the cargo-fuzz targets of fuzz/ (strict decoders, the edge's
# HTTP request path), bounded to TALLY_FUZZ_SECONDS (60) each from the seed corpus.
# scripts/fuzz.sh installs cargo-fuzz once (cached in ~/.cache/tally-tools/) and runs
# it on stable Rust with RUSTC_BOOTSTRAP=1. A crash fails the run.
if [ "$status" -eq 0 ]; then
  echo "== scripts/fuzz.sh (${TALLY_FUZZ_SECONDS:-60} s per target)"
  # A crash counts as one failed test in the closing line.
  if ! scripts/fuzz.sh "${TALLY_FUZZ_SECONDS:-60}"; then
    failed=$((failed + 1))
    status=1
  fi
fi

echo "tests: ${passed} passed, ${failed} failed"
exit "$status"
