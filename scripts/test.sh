#!/usr/bin/env bash
# Runs every test: unit, property, integration (real processes on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo test --workspace --doc
cargo nextest run --workspace --profile "${NEXTEST_PROFILE:-default}" "$@"
