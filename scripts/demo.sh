#!/usr/bin/env bash
# The embedded default: no external services. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec cargo run -q -p coalesce-core --example demo -- "$@"
