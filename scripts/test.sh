#!/usr/bin/env bash
# The whole test suite: prepares the host (packages, images, subuid, lxcfs), checks
# formatting and lints, builds, then runs unit tests and the integration tests against
# real Incus and LXD daemons in network namespaces. Run as root. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

bash scripts/ensure-rust.sh
bash scripts/prepare-host.sh --test

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --bins --locked
# The release build is what scripts/ssp-up.sh installs (tests/first_day.rs runs it)
# and what the benchmarks measure.
cargo build --release --workspace --bins --locked
# Integration tests share /dev nodes and the daemons' port ranges: one test at a time.
cargo test --workspace --locked --no-fail-fast -- --test-threads=1

# Benchmarks print figures; they do not pass or fail on them. failover and
# raft_vs_etcd also run coordinators built without TLS (a feature only benchmarks
# build, into target/plain) to measure what mutual TLS costs in the same run.
cargo build --release --locked -p ssp-coordinator -p sspctl --features ssp-net/plaintext-bench --target-dir target/plain
cargo bench -p ssp-integration --bench user_add --locked
cargo bench -p ssp-integration --bench failover --locked
cargo bench -p ssp-integration --bench raft_vs_etcd --locked
cargo bench -p ssp-model --bench placement --locked
cargo bench -p ssp-integration --bench heal --locked
cargo bench -p ssp-integration --bench resync --locked
cargo bench -p ssp-integration --bench migrate --locked
