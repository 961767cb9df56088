#!/usr/bin/env bash
# Runs every test: unit, property, integration (real processes on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
# The deployment manifests, offline: kustomize rendering, API schemas, cross-checks.
"$COALESCE_PYTHON" deploy/check.py --quiet
cargo test --workspace --doc
cargo nextest run --workspace --profile "${NEXTEST_PROFILE:-default}" "$@"
