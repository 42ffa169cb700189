#!/usr/bin/env bash
# Start the SuperLink for a real deployment (one port, default 8000, serves SuperNodes, CLI and apps).
# Usage: deploy/start-superlink.sh [CERT_DIR]   (with CERT_DIR from deploy/gen-certs.sh: TLS + node auth)
set -euo pipefail
export FLWR_TELEMETRY_ENABLED=0
VENV_BIN="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
export PATH="$VENV_BIN:$PATH"   # daemons start flower-superexec from PATH
PORT=${DPFPL_SUPERLINK_PORT:-8000}
ARGS=(--host 0.0.0.0 --port "$PORT" --disable-runtime-dependency-installation
      --database "${DPFPL_SUPERLINK_DB:-superlink.db}")
if [ $# -ge 1 ]; then
  C="$1"
  ARGS+=(--ssl-ca-certfile "$C/ca.crt" --ssl-certfile "$C/server.pem" --ssl-keyfile "$C/server.key"
         --enable-supernode-auth)
else
  echo "WARNING: no CERT_DIR given: starting without TLS (--insecure); use only on a trusted network" >&2
  ARGS+=(--insecure)
fi
exec flower-superlink "${ARGS[@]}"
