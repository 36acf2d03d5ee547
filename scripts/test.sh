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
# failover and raft_vs_etcd also run a coordinator and sspctl built without TLS (a
# feature only benchmarks build) to measure what mutual TLS costs in the same run:
# built first, into the release dir (same dependencies and features as the release
# build, so nothing but ssp's own crates is compiled twice), and kept in target/plain.
cargo build --release --workspace --bins --locked --features ssp-net/plaintext-bench
mkdir -p target/plain/release
rm -f target/plain/release/ssp-coordinator target/plain/release/sspctl
cp target/release/ssp-coordinator target/release/sspctl target/plain/release/
# The release build is what scripts/ssp-up.sh installs (tests/first_day.rs runs it)
# and what the benchmarks measure.
cargo build --release --workspace --bins --locked
cargo test --workspace --exclude ssp-integration --locked --no-fail-fast -- --test-threads=1
# Against real daemons: several test files at once, each with its own daemons.
bash scripts/integration-tests.sh

# Benchmarks print figures; they do not pass or fail on them.
cargo bench -p ssp-integration --bench user_add --locked
cargo bench -p ssp-integration --bench lab --locked
cargo bench -p ssp-integration --bench failover --locked
cargo bench -p ssp-integration --bench raft_vs_etcd --locked
cargo bench -p ssp-model --bench placement --locked
cargo bench -p ssp-integration --bench heal --locked
cargo bench -p ssp-integration --bench resync --locked
cargo bench -p ssp-integration --bench migrate --locked
