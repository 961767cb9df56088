# Sourced by the scripts: one place for the build environment.
# A warm target directory outside the clone keeps repeat builds fast (RocksDB's C++ takes 15+
# minutes to compile on 2 cores); a fresh machine builds it once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/coalesce-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# The Python used by tests/python (set up by scripts/setup.sh).
export COALESCE_PYTHON="${COALESCE_PYTHON:-${COALESCE_VENV:-$HOME/.cache/coalesce-venv}/bin/python}"
