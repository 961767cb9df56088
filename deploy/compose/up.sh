#!/usr/bin/env bash
# Starts the local 3-node cluster of deploy/compose/compose.yaml and waits until it is ready:
#
#   deploy/compose/up.sh              # build coalesce:local if missing, up -d, wait, status
#   deploy/compose/up.sh --rebuild    # rebuild the image from the latest cargo build first
#
# The image comes from deploy/docker/build-local.sh (binaries already built by cargo; nothing
# is pulled). Readiness: every node's GET /readyz answers 200 (its shards have leaders); for a
# node without the HTTP port, every shard in its `coalescectl status` has a leader. Stop with
#   docker compose -p coalesce -f deploy/compose/compose.yaml down      # keeps the volumes
#   docker compose -p coalesce -f deploy/compose/compose.yaml down -v   # and deletes the data
# (docker-compose instead of `docker compose` where only the former is installed).
set -euo pipefail
cd "$(dirname "$0")"

IMAGE="${COALESCE_IMAGE:-coalesce:local}"
TIMEOUT="${COALESCE_UP_TIMEOUT:-120}"   # seconds
NODES=(coalesce-0 coalesce-1 coalesce-2)
HTTP_PORTS=(17402 17412 17422)          # published on 127.0.0.1 (compose.yaml)
REBUILD=0
for a in "$@"; do
  case "$a" in
    --rebuild) REBUILD=1 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "up.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done

if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
  COMPOSE=(docker-compose)
else
  echo "up.sh: neither 'docker compose' nor docker-compose is installed" >&2
  exit 1
fi
compose() { COALESCE_IMAGE="$IMAGE" "${COMPOSE[@]}" -p coalesce -f compose.yaml "$@"; }

if ((REBUILD)) || ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
  ../docker/build-local.sh --tag "$IMAGE"
fi

compose up -d

# Ready when every node says so. /readyz first; a 404 (a build without the HTTP endpoints) or
# no HTTP port at all falls back to the client port: every shard in `status` has a leader.
ready_http() { # port -> 0 ready, 1 not yet, 2 no /readyz
  local code
  code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$1/readyz" || true)"
  case "$code" in
    200) return 0 ;;
    404) return 2 ;;
    *) return 1 ;;
  esac
}
ready_status() { # node -> 0 when it answers and every shard it reports has a leader
  local out
  out="$(compose exec -T "$1" coalescectl --addr "$1:7400" status 2>/dev/null)" || return 1
  awk 'NR > 2 { rows++; if ($2 == "-") missing++ } END { exit !(rows > 0 && missing == 0) }' <<<"$out"
}

deadline=$((SECONDS + TIMEOUT))
fallback=()
while :; do
  not_ready=()
  for i in "${!NODES[@]}"; do
    node="${NODES[$i]}"
    rc=0
    if [[ " ${fallback[*]-} " == *" $node "* ]]; then
      ready_status "$node" || rc=1
    else
      ready_http "${HTTP_PORTS[$i]}" || rc=$?
      if ((rc == 2)); then
        echo "up.sh: $node has no /readyz (404): judging readiness by coalescectl status instead"
        fallback+=("$node")
        rc=0
        ready_status "$node" || rc=1
      fi
    fi
    ((rc == 0)) || not_ready+=("$node")
  done
  if ((${#not_ready[@]} == 0)); then
    echo "up.sh: all ${#NODES[@]} nodes ready after ${SECONDS}s"
    break
  fi
  if ((SECONDS >= deadline)); then
    echo "up.sh: not ready after ${TIMEOUT}s: ${not_ready[*]}; recent logs:" >&2
    compose logs --tail 20 "${not_ready[@]}" >&2 || true
    exit 1
  fi
  sleep 1
done

compose ps
compose exec -T coalesce-0 coalescectl --addr coalesce-0:7400 status
echo
echo "Client ports on this host: 127.0.0.1:17400, :17410, :17420 (HTTP: :17402, :17412, :17422)."
echo "Producer output: ${COMPOSE[*]} -p coalesce -f $(pwd)/compose.yaml logs -f producer"
