#!/usr/bin/env bash
# Writes tests/fixtures/upgrade/<name>/ (data.tar.gz, expected.json) with this checkout's build:
# the data directories tests/upgrade.rs must keep reading after the next format change.
#
#   scripts/make-upgrade-fixture.sh format-1-protocol-1
#
# Name it after the storage format and peer protocol it holds (FORMAT_VERSION in
# crates/storage/src/format.rs, PROTOCOL in crates/raft/src/protocol.rs), and commit it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
name="${1:?usage: scripts/make-upgrade-fixture.sh <name>}"
out="$PWD/tests/fixtures/upgrade/$name"
[[ -e "$out" ]] && { echo "make-upgrade-fixture: $out exists" >&2; exit 1; }
cargo build --workspace --bins
COALESCE_FIXTURE_OUT="$out" cargo test --workspace --test upgrade write_fixture -- --ignored --nocapture
dirty=""
[[ -n "$(git status --porcelain -- crates proto)" ]] && dirty=" with uncommitted changes to crates/ or proto/"
printf 'written by %s%s (%s) on %s\n' "$(git rev-parse --short HEAD)" "$dirty" "$(git log -1 --format=%s | cut -c1-60)" \
  "$(date -u +%F)" >"$out/SOURCE"
du -sh "$out"
