#!/usr/bin/env bash
# Idle cost: CPU used by an idle local 3-node cluster with N shards (default 64), measured from
# /proc over a 20 s window after a 15 s settle. Usage: scripts/bench-idle.sh [SHARDS] [--release]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
shards="${1:-64}"
profile=debug; flag=()
if [ "${2:-}" = "--release" ]; then profile=release; flag=(--release); fi
cargo build -q "${flag[@]}" -p coalesce-server -p coalesce-cli --bins
dir=$(mktemp -d)
"$CARGO_TARGET_DIR/$profile/coalescectl" demo --dir "$dir/demo" --shards "$shards" --rate 0 --seconds 50 >"$dir/demo.out" 2>&1 &
demo=$!
sleep 15
pids=$(pgrep -f "coalesced --config $dir/demo" || true)
[ -n "$pids" ] || { cat "$dir/demo.out"; echo "cluster did not start" >&2; exit 1; }
ticks() { for p in $pids; do awk '{print $14+$15}' "/proc/$p/stat"; done | paste -sd+ | bc; }
hz=$(getconf CLK_TCK)
t0=$(ticks); sleep 20; t1=$(ticks)
echo "idle cluster: 3 nodes, $shards shards, $profile build: $(echo "scale=1; ($t1-$t0)*100/$hz/20" | bc)% of one core in total ($(nproc) cores)"
wait "$demo" || true
rm -rf "$dir"
