#!/usr/bin/env bash
# Runs every test of the workspace: unit, integration (against real nats-server
# processes the tests start themselves) and doc tests.
#
#   ./test.sh                 # everything
#   ./test.sh -- --nocapture  # extra arguments go to both cargo test runs
#
# Installs what is missing first (tests/setup/ensure-tools.sh): a nats-server
# >= 2.10, PostgreSQL.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
# The store and relay tests run on PostgreSQL too: stop early when none answers.
export HOOKBUS_REQUIRE_POSTGRES="${HOOKBUS_REQUIRE_POSTGRES:-1}"
# shellcheck source=tests/setup/ensure-tools.sh
source tests/setup/ensure-tools.sh

# The crash tests run the real binaries (hookbus, the example plugins) as child
# processes, so build them first.
echo "test.sh: cargo build --workspace --bins" >&2
cargo build --workspace --bins
echo "test.sh: cargo test --workspace --all-targets $*" >&2
cargo test --workspace --all-targets "$@"
echo "test.sh: cargo test --workspace --doc $*" >&2
cargo test --workspace --doc "$@"
