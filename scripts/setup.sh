#!/usr/bin/env bash
# Installs what a fresh machine lacks to build and test Coalesce. Idempotent and quiet when
# everything is present. Needs root (or sudo) for apt.
#
#   scripts/setup.sh           everything the tests and benchmarks need
#   scripts/setup.sh --build   only what building needs (scripts/demo.sh)
set -euo pipefail
BUILD_ONLY=false
[ "${1:-}" = "--build" ] && BUILD_ONLY=true

# System packages: libclang for RocksDB's bindgen and protoc for the etcd client's bindings
# (both to build); a PostgreSQL server for the Postgres sink's tests (they run their own
# throw-away instance, tests/harness/postgres.rs); Prometheus and promtool for the
# observability test (tests/observability.rs); etcd itself, for `coalescectl bench
# ingest-vs-etcd`.
APT_PACKAGES=(libclang-dev protobuf-compiler)
$BUILD_ONLY || APT_PACKAGES+=(postgresql prometheus etcd-server)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

$BUILD_ONLY && exit 0

# Rust components used by CI.
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest
# cargo-fuzz for fuzz/run.sh (the targets build on stable Rust with `-s none`); ~50 s to install.
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz

# Python with grpcio-tools, for the test that drives the cluster from a client generated from
# proto/ (tests/python/). A venv outside the clone, reused across runs.
VENV="${COALESCE_VENV:-$HOME/.cache/coalesce-venv}"
if ! "$VENV/bin/python" -c "import grpc_tools, grpc" >/dev/null 2>&1; then
  echo "setup: creating $VENV with grpcio-tools"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "grpcio==1.85.*" "grpcio-tools==1.85.*"
fi

# kubernetes-validate (with PyYAML) in the same venv, for deploy/check.py: the Kubernetes
# manifests are validated offline against the API schemas (scripts/test.sh runs it).
if ! "$VENV/bin/python" -c "import kubernetes_validate, yaml" >/dev/null 2>&1; then
  echo "setup: installing kubernetes-validate into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==1.37.*"
fi
