#!/usr/bin/env bash
# Start the SuperLink with TLS and SuperNode authentication (one port serves SuperNodes, CLI and apps).
#   deploy/start-superlink.sh CERT_DIR [HOST] [PORT] [DATABASE]
# Insecure mode (no TLS, any node may join) only with DPFPL_INSECURE=1 and a warning.
set -euo pipefail
export FLWR_TELEMETRY_ENABLED=0
VENV_BIN="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
export PATH="$VENV_BIN:$PATH"   # the SuperLink starts flower-superexec from PATH
C=${1:?CERT_DIR from deploy/gen-certs.sh}; HOST=${2:-0.0.0.0}; PORT=${3:-8000}; DB=${4:-superlink.db}
ARGS=(--host "$HOST" --port "$PORT" --disable-runtime-dependency-installation --database "$DB")
if [ "${DPFPL_INSECURE:-0}" = "1" ]; then
  echo "WARNING: DPFPL_INSECURE=1: no TLS, no node authentication; use only on a trusted network" >&2
  ARGS+=(--insecure)
else
  ARGS+=(--ssl-ca-certfile "$C/ca.crt" --ssl-certfile "$C/server.pem" --ssl-keyfile "$C/server.key"
         --enable-supernode-auth)
fi
exec flower-superlink "${ARGS[@]}"
