#!/usr/bin/env bash
# The embedded default: a local 3-node cluster of real coalesced processes on loopback with a
# demo producer; prints inputs/s, outputs/s, coalesce ratio and leaders per node. Ctrl-C stops
# it cleanly (SIGTERM to every node: leadership hand-off, then exit). No external services.
# Options after the script name go to `coalescectl demo` (see --help), e.g. --rate 50000.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --build
source scripts/env.sh
cargo build -q -p coalesce-server -p coalesce-cli --bins
exec "$CARGO_TARGET_DIR/debug/coalescectl" demo "$@"
