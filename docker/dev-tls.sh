#!/usr/bin/env bash
# Throwaway TLS files and a bearer token for docker/compose.tls.yaml, written to docker/tls/ (git ignores them):
#
#   bash docker/dev-tls.sh [DIR]
#   docker compose -f docker/compose.yaml -f docker/compose.tls.yaml up --build --exit-code-from client
#
# ca.crt: a CA made here (its key stays in DIR/private, mode 0600). server.crt/server.key: signed by it, naming
# initserve (the replicas, as Envoy checks them), envoy (Envoy's listener, as the client checks it), localhost and
# 127.0.0.1. tokens: one random token, in the server's format (one a line). The containers run as other users
# (the server as UID 10001, Envoy as 101) and read these through bind mounts, so the key and the token are left
# readable (0644): fine for a demo on your machine, not for anything real. Real deployments mount their own CA's
# certificates, readable by the container's user only (Kubernetes: docker/k8s/components, docs/deploy.md).
set -euo pipefail
dir=${1:-"$(dirname "$0")/tls"}
mkdir -p "$dir/private"
chmod 0700 "$dir/private"
cd "$dir"
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${ec[@]}" -keyout private/ca.key -out ca.crt -days 30 -subj "/CN=initserve dev CA" 2>/dev/null
openssl req "${ec[@]}" -keyout server.key -out private/server.csr -subj "/CN=initserve" 2>/dev/null
printf '%s\n' "subjectAltName=DNS:initserve,DNS:envoy,DNS:localhost,IP:127.0.0.1" "extendedKeyUsage=serverAuth" \
    >private/server.ext
openssl x509 -req -in private/server.csr -CA ca.crt -CAkey private/ca.key -CAcreateserial \
    -CAserial private/ca.srl -out server.crt -days 30 -extfile private/server.ext 2>/dev/null
printf '# bearer tokens accepted by the servers, one a line\n%s\n' "$(openssl rand -hex 32)" >tokens
chmod 0600 private/*
chmod 0644 ca.crt server.crt server.key tokens
echo "TLS files and a token in $dir: ca.crt server.crt server.key tokens"
