#!/usr/bin/env bash
# Builds every fuzz target and runs each for a bounded time from the committed corpus; fails if
# any target crashes (panics, times out or runs out of memory), printing the crashing input's
# path and how to reproduce it. See fuzz/README.md.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 s each, every target)
#
# Environment:
#   FUZZ_TARGET_DIR      build directory (default $HOME/.cache/coalesce-fuzz-target, or
#                        ...-address for ASan; apart from the workspace's CARGO_TARGET_DIR, so
#                        the instrumented build never invalidates it)
#   FUZZ_SANITIZER       none (default: works on stable Rust) or address (needs nightly flags:
#                        set RUSTC_BOOTSTRAP=1 on a stable toolchain; see the README)
#   FUZZ_WORK            where new corpus entries go (default $FUZZ_TARGET_DIR/fuzz-work);
#                        the committed corpus (fuzz/corpus/<target>) is read, never written
#   FUZZ_JOBS            libFuzzer -fork workers per target (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
shift || true
targets=("$@")
((${#targets[@]})) || targets=(apply decode streams_config merge snapshot peer request)

sanitizer="${FUZZ_SANITIZER:-none}"
# A sanitizer build gets its own directory: the binaries' paths would collide.
default_dir="$HOME/.cache/coalesce-fuzz-target"
[ "$sanitizer" = none ] || default_dir="$default_dir-$sanitizer"
# Not CARGO_TARGET_DIR: CI exports that for the workspace (scripts/env.sh).
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$default_dir}"
work="${FUZZ_WORK:-$CARGO_TARGET_DIR/fuzz-work}"
jobs="${FUZZ_JOBS:-1}"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz: cargo-fuzz is not installed: cargo install cargo-fuzz --locked" >&2
  exit 2
fi

# -a: debug assertions and overflow checks in every crate, as the workspace's dev profile has
# them in ours; -s none: libFuzzer's coverage instrumentation only (stable Rust).
flags=(-s "$sanitizer" -a)
mkdir -p "$work"
echo "fuzz: building ${targets[*]} (sanitizer $sanitizer, target dir $CARGO_TARGET_DIR)"
started=$(date +%s)
nice -n 15 cargo fuzz build "${flags[@]}" >"$work.build.log" 2>&1 || {
  tail -40 "$work.build.log" >&2
  echo "fuzz: build failed" >&2
  exit 1
}
echo "fuzz: built in $(($(date +%s) - started)) s"

failed=()
for t in "${targets[@]}"; do
  mkdir -p "$work/corpus/$t" fuzz/artifacts/"$t"
  log="$work/$t.log"
  args=(-max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
  [ -f "fuzz/dict/$t.dict" ] && args+=(-dict="fuzz/dict/$t.dict")
  ((jobs > 1)) && args+=(-fork="$jobs" -ignore_crashes=0)
  # The working corpus comes first: libFuzzer writes new inputs to the first directory only.
  if nice -n 15 cargo fuzz run "${flags[@]}" "$t" "$work/corpus/$t" "fuzz/corpus/$t" -- "${args[@]}" >"$log" 2>&1; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo '?')
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo '?')
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo '?')
    echo "fuzz: $t: ok, $runs runs in ${secs} s ($rate exec/s), coverage $cov"
  else
    failed+=("$t")
    echo "fuzz: $t: FAILED" >&2
    grep -m1 -A6 -E 'panicked at|ERROR: libFuzzer|deadly signal' "$log" | cut -c1-2000 >&2 || tail -30 "$log" >&2
    crash=$(grep -o 'Test unit written to [^ ]*' "$log" | tail -1 | sed 's/Test unit written to //')
    if [ -n "$crash" ]; then
      echo "fuzz: $t: crashing input: $crash" >&2
      echo "fuzz: reproduce: cargo fuzz run ${flags[*]} $t $crash" >&2
    fi
    echo "fuzz: $t: full log: $log" >&2
  fi
done

if ((${#failed[@]})); then
  echo "fuzz: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} passed, 0 failed"
