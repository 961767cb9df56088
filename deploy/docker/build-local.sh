#!/usr/bin/env bash
# Packs binaries already built by cargo into a runnable image, without pulling anything: the
# two programs, every shared library `ldd` lists for them and the dynamic loader, on top of
# `FROM scratch`. For machines whose Docker engine has no base images and no registry (CI, this
# project's workplace); deploy/docker/Dockerfile is the production build.
#
#   deploy/docker/build-local.sh                  # $CARGO_TARGET_DIR/release, else .../debug
#   deploy/docker/build-local.sh path/to/bin-dir  # a directory holding coalesced + coalescectl
#   deploy/docker/build-local.sh --tag coalesce:dev --no-strip
#
# The image matches the production one where it matters: /usr/local/bin/{coalesced,coalescectl},
# uid/gid 10001, /var/lib/coalesce (owned by 10001) as a volume, COALESCE_CONFIG =
# /etc/coalesce/node.toml, CMD ["coalesced"]. It has no shell: run programs in exec form.
set -euo pipefail

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  echo "Options: --tag NAME (default coalesce:local), --no-strip (keep debug info), -h/--help."
}

TAG="coalesce:local"
STRIP=1
BIN_DIR=""
while (($#)); do
  case "$1" in
    --tag) TAG="${2:?--tag needs a value}"; shift 2 ;;
    --no-strip) STRIP=0; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "build-local: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) BIN_DIR="$1"; shift ;;
  esac
done

if [ -z "$BIN_DIR" ]; then
  TARGET="${CARGO_TARGET_DIR:-$HOME/.cache/coalesce-target}"
  for profile in release debug; do
    if [ -x "$TARGET/$profile/coalesced" ] && [ -x "$TARGET/$profile/coalescectl" ]; then
      BIN_DIR="$TARGET/$profile"
      break
    fi
  done
  if [ -z "$BIN_DIR" ]; then
    echo "build-local: no coalesced + coalescectl under $TARGET/{release,debug};" \
      "build them first: cargo build --release -p coalesce-server -p coalesce-cli --bins" >&2
    exit 1
  fi
fi
for b in coalesced coalescectl; do
  [ -x "$BIN_DIR/$b" ] || { echo "build-local: $BIN_DIR/$b is missing or not executable" >&2; exit 1; }
done
command -v docker >/dev/null || { echo "build-local: docker is not installed" >&2; exit 1; }

CTX="$(mktemp -d "${TMPDIR:-/tmp}/coalesce-image.XXXXXX")"
trap 'rm -rf "$CTX"' EXIT
ROOT="$CTX/rootfs"
mkdir -p "$ROOT/usr/local/bin" "$ROOT/etc/coalesce" "$ROOT/tmp" "$CTX/data"
chmod 1777 "$ROOT/tmp"

# The binaries (debug info stripped by default: a debug build is mostly DWARF; symbols stay, so
# backtraces still name functions).
for b in coalesced coalescectl; do
  cp "$BIN_DIR/$b" "$ROOT/usr/local/bin/$b"
  if ((STRIP)) && command -v strip >/dev/null; then
    strip --strip-debug "$ROOT/usr/local/bin/$b"
  fi
done

# Every library the binaries load, and the loader, at the paths ldd resolved them to (the
# loader's default search path covers them, so no ld.so.cache is needed).
libs="$(
  for b in coalesced coalescectl; do
    ldd "$BIN_DIR/$b" | awk '
      $2 == "=>" && $3 ~ /^\// { print $3; next }   # libfoo.so => /lib/.../libfoo.so (0x...)
      $1 ~ /^\// { print $1 }                        # /lib64/ld-linux-x86-64.so.2 (0x...)
      $2 == "=>" && $3 == "not" { print "MISSING " $1 }'
  done | sort -u
)"
if grep -q '^MISSING' <<<"$libs"; then
  echo "build-local: libraries not found by ldd:" $(grep '^MISSING' <<<"$libs" | cut -d' ' -f2) >&2
  exit 1
fi
while read -r lib; do
  [ -n "$lib" ] || continue
  mkdir -p "$ROOT$(dirname "$lib")"
  cp -L "$lib" "$ROOT$lib"      # -L: the file, not the versioned symlink
done <<<"$libs"

# A passwd/group naming uid 10001, so tools that look the user up find one.
printf 'root:x:0:0:root:/root:/sbin/nologin\ncoalesce:x:10001:10001:coalesce:/var/lib/coalesce:/sbin/nologin\n' \
  >"$ROOT/etc/passwd"
printf 'root:x:0:\ncoalesce:x:10001:\n' >"$ROOT/etc/group"

VERSION="$("$BIN_DIR/coalesced" --version 2>/dev/null | awk '{print $2}')" || VERSION=unknown
cat >"$CTX/Dockerfile" <<EOF
FROM scratch
COPY rootfs/ /
COPY --chown=10001:10001 data/ /var/lib/coalesce/
LABEL org.opencontainers.image.title="coalesce" \\
      org.opencontainers.image.version="${VERSION:-unknown}" \\
      org.opencontainers.image.description="Coalesce (local build from $(basename "$BIN_DIR") binaries)"
ENV PATH=/usr/local/bin \\
    COALESCE_DATA_DIR=/var/lib/coalesce \\
    COALESCE_CONFIG=/etc/coalesce/node.toml
USER 10001:10001
WORKDIR /var/lib/coalesce
VOLUME ["/var/lib/coalesce"]
EXPOSE 7400 7401 7402
CMD ["coalesced"]
EOF

echo "build-local: $BIN_DIR -> $TAG ($(wc -l <<<"$libs") libraries: $(tr '\n' ' ' <<<"$libs"))"
# The classic builder needs nothing but the context (BuildKit would look for a frontend image
# when a Dockerfile names a syntax; this one does not, but stay on the path that works offline).
DOCKER_BUILDKIT=0 docker build --quiet --tag "$TAG" "$CTX" >/dev/null
# Smoke test: the loader, the libraries and the binaries all resolve inside the image.
docker run --rm "$TAG" coalesced --version
docker run --rm "$TAG" coalescectl --version
echo "build-local: built $TAG ($(docker image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
