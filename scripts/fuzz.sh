#!/usr/bin/env bash
# Fuzzes the strict decoders and the edge's HTTP request path (fuzz/, cargo-fuzz with
# libFuzzer) for a bounded time per target, starting from the seed corpus kept in
# fuzz/corpus/. scripts/test.sh runs it with the default 60 s per target.
#
# Installs cargo-fuzz once per machine into ~/.cache/tally-tools/cargo-fuzz (about
# 2-5 minutes; later runs reuse it). Only the stable toolchain exists on this kind of
# machine: RUSTC_BOOTSTRAP=1 lets stable rustc accept the nightly-only flags that
# cargo-fuzz passes (-Zsanitizer=address and friends), so the targets run under
# AddressSanitizer as on nightly.
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#   TALLY_FUZZ_SECONDS   seconds per target when no argument is given (default 60)
#   CARGO_FUZZ_ROOT      where cargo-fuzz is installed (default ~/.cache/tally-tools/cargo-fuzz)
#   TALLY_FUZZ_TARGET_DIR  build directory of the targets, kept across runs and clones
#                        (default ~/.cache/tally-tools/fuzz-target): a cold build takes
#                        ~7 min of CPU (librdkafka and the edge's dependencies,
#                        instrumented), a warm one only recompiles the project's crates
# New inputs found during a run go to a temporary directory, not into the repository;
# a crash is written to fuzz/artifacts/TARGET/ and reproduced with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-…
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
seconds="${1:-${TALLY_FUZZ_SECONDS:-60}}"
shift || true
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  targets=(decoders http_request)
fi

# libfuzzer-sys compiles libFuzzer (C++).
if ! command -v c++ >/dev/null 2>&1; then
  echo "installing g++ (libfuzzer-sys builds libFuzzer from C++)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends g++
fi

root="${CARGO_FUZZ_ROOT:-$HOME/.cache/tally-tools/cargo-fuzz}"
if ! "$root/bin/cargo-fuzz" --version 2>/dev/null | grep -qx "cargo-fuzz $CARGO_FUZZ_VERSION"; then
  echo "installing cargo-fuzz $CARGO_FUZZ_VERSION into $root (one-time)"
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" --root "$root"
fi
export PATH="$root/bin:$PATH"
export RUSTC_BOOTSTRAP=1

target_dir="${TALLY_FUZZ_TARGET_DIR:-$HOME/.cache/tally-tools/fuzz-target}"
mkdir -p "$target_dir"

started=$(date +%s)
cargo fuzz build --target-dir "$target_dir"
echo "fuzz targets built in $(($(date +%s) - started)) s"

for target in "${targets[@]}"; do
  found=$(mktemp -d)
  echo "== cargo fuzz run $target (${seconds} s)"
  # The first directory receives new inputs; the seed corpus is only read.
  cargo fuzz run --target-dir "$target_dir" "$target" "$found" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -max_len=8192 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
  rm -rf "$found"
done
echo "fuzzing done in $(($(date +%s) - started)) s"
