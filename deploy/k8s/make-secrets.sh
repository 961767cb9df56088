#!/usr/bin/env bash
# Prints the two Secrets the StatefulSet mounts, made with `coalescectl certs` (docs/security.md):
#
#   deploy/k8s/make-secrets.sh --namespace coalesce --replicas 3 --out ~/coalesce-ca | kubectl apply -f -
#
#   coalesce-tls     ca.pem and <pod>.pem/<pod>.key for each pod: the certificate of node
#                    coalesce-N names coalesce-N, coalesce-N.coalesce-peers[.<ns>.svc[.cluster.local]]
#                    and the client Service (coalesce[.<ns>.svc...]); serves both gRPC ports.
#   coalesce-tokens  producer.token, consumer.token, admin.token (bearer tokens, one role each).
#
# --out keeps the CA (ca.key) and the tokens: run again with the same --out to add nodes or
# renew certificates from the same CA (tokens are then regenerated too unless --keep-tokens).
# The node re-reads its certificate files every tls.reload_interval, so `kubectl apply` of a
# renewed coalesce-tls takes effect without a restart (a Secret volume updates within a minute).
# Every pod mounts every node's key: for a key that never leaves its pod, use cert-manager's
# csi-driver instead (docs/kubernetes.md, "Certificates").
set -euo pipefail

NS=coalesce
REPLICAS=3
OUT=""
KEEP_TOKENS=0
COALESCECTL="${COALESCECTL:-coalescectl}"
while (($#)); do
  case "$1" in
    --namespace) NS="$2"; shift 2 ;;
    --replicas) REPLICAS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --keep-tokens) KEEP_TOKENS=1; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "make-secrets.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [[ -z "$OUT" ]]; then
  echo "make-secrets.sh: --out DIR is required (it keeps the CA key and the tokens)" >&2
  exit 2
fi
nodes=()
for ((i = 0; i < REPLICAS; i++)); do nodes+=("coalesce-$i"); done
domains="coalesce-peers,coalesce-peers.$NS.svc,coalesce-peers.$NS.svc.cluster.local"
extra="coalesce,coalesce.$NS.svc,coalesce.$NS.svc.cluster.local"
tokens=()
if ! ((KEEP_TOKENS)) || [[ ! -d "$OUT/tokens" ]]; then
  tokens=(--token "producer:producer,consumer:consumer,admin:admin")
fi
"$COALESCECTL" certs --out "$OUT" --nodes "$(IFS=,; echo "${nodes[*]}")" --domain "$domains" \
  --extra-name "$extra" "${tokens[@]}" >&2

secret() { # name, then files
  local name="$1"; shift
  printf 'apiVersion: v1\nkind: Secret\nmetadata:\n  name: %s\n  namespace: %s\n  labels:\n    app.kubernetes.io/name: coalesce\ntype: Opaque\ndata:\n' "$name" "$NS"
  local f
  for f in "$@"; do
    printf '  %s: %s\n' "$(basename "$f")" "$(base64 -w0 <"$f")"
  done
}
files=("$OUT/ca.pem")
for n in "${nodes[@]}"; do files+=("$OUT/nodes/$n.pem" "$OUT/nodes/$n.key"); done
secret coalesce-tls "${files[@]}"
echo "---"
secret coalesce-tokens "$OUT/tokens/producer.token" "$OUT/tokens/consumer.token" "$OUT/tokens/admin.token"
