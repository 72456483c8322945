# syntax=docker/dockerfile:1
#
# The `tally` binary (ingest, aggregator, dev and the operations commands) in a small
# Debian image. Build: `docker build -t tally:local .` (docker compose does it for you).
#
# Checked by tally/tests/compose_config.rs (every path referenced here exists and every
# workspace member's manifest is copied); not built on the development machine, which
# has no Docker engine.

# ---- builder ------------------------------------------------------------------------
FROM rust:1-bookworm AS builder

# rdkafka-sys builds librdkafka from its bundled source with ./configure + make (no
# cmake: the cmake-build feature is off), links the system zlib found via pkg-config;
# rusqlite's `bundled` feature compiles SQLite with cc. The rust image has most of this
# already; installing it explicitly keeps the build independent of that.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential perl pkg-config zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src

# 1. Dependency layer: only the manifests and the lock file, with stub sources, so the
#    (slow) dependency build is cached until a manifest or Cargo.lock changes. Targets
#    declared explicitly ([[bench]], [[example]], [[test]], [[bin]]) must exist for
#    cargo to load the workspace, so each gets a stub too.
COPY Cargo.toml Cargo.lock ./
COPY schemas/Cargo.toml schemas/Cargo.toml
COPY ingest/Cargo.toml ingest/Cargo.toml
COPY aggregator/Cargo.toml aggregator/Cargo.toml
COPY sink/Cargo.toml sink/Cargo.toml
COPY tally/Cargo.toml tally/Cargo.toml
RUN set -eu; \
    for dir in schemas ingest aggregator sink; do \
      mkdir -p "$dir/src" && : > "$dir/src/lib.rs"; \
    done; \
    mkdir -p tally/src && echo 'fn main() {}' > tally/src/main.rs; \
    for manifest in */Cargo.toml; do \
      awk -v dir="${manifest%/Cargo.toml}" ' \
        function flush() { \
          if (kind != "") { if (path == "") path = defaults[kind] "/" name ".rs"; print dir "/" path; } \
          kind = ""; name = ""; path = ""; \
        } \
        BEGIN { defaults["bench"] = "benches"; defaults["example"] = "examples"; \
                defaults["test"] = "tests"; defaults["bin"] = "src/bin"; } \
        /^\[\[(bench|example|test|bin)\]\]/ { flush(); kind = $0; gsub(/\[|\]| /, "", kind); next; } \
        /^\[/ { flush(); next; } \
        kind != "" && /^name *=/ { value = $0; sub(/^name *= */, "", value); gsub(/"/, "", value); name = value; } \
        kind != "" && /^path *=/ { value = $0; sub(/^path *= */, "", value); gsub(/"/, "", value); path = value; } \
        END { flush(); }' "$manifest" \
      | while read -r stub; do \
          mkdir -p "$(dirname "$stub")" && echo 'fn main() {}' > "$stub"; \
        done; \
    done
RUN cargo build --release --locked -p tally

# 2. The real sources. Touch them so cargo does not take the stubs' fingerprints for
#    the sources' (COPY keeps the files' original mtimes).
COPY schemas schemas
COPY ingest ingest
COPY aggregator aggregator
COPY sink sink
COPY tally tally
RUN find schemas ingest aggregator sink tally -name '*.rs' -exec touch {} + \
 && cargo build --release --locked -p tally \
 && cp target/release/tally /usr/local/bin/tally

# ---- runtime ------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# ca-certificates for TLS to brokers/ScyllaDB when configured; zlib1g is librdkafka's
# one shared-library dependency; curl serves the compose healthchecks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tally \
 && useradd --system --uid 10001 --gid tally --home-dir /var/lib/tally --create-home tally

COPY --from=builder /usr/local/bin/tally /usr/local/bin/tally

USER tally:tally
WORKDIR /var/lib/tally
# 8080: ingest (HTTP API, /healthz, /readyz, /metrics); 9091: aggregator metrics.
EXPOSE 8080 9091
ENTRYPOINT ["tally"]
CMD ["--help"]
