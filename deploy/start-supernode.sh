#!/usr/bin/env bash
# Start one organization's SuperNode (TLS + node authentication by default).
#   deploy/start-supernode.sh SUPERLINK_HOST:PORT DATA_DIR STATE_DIR CERT_DIR KEY_NAME [LOCAL_PORT] [DEVICE]
# DATA_DIR: the organization's images (class folders or manifest.csv); STATE_DIR: where its local prompt
# lives (it never leaves this machine); CERT_DIR holds ca.crt and KEY_NAME.key/.pub; LOCAL_PORT: the
# SuperNode's own API port (default 9094; give every SuperNode on one host its own); DEVICE: cpu, cuda,
# cuda:1, or auto (default: a GPU when present).
# Insecure (no TLS, no authentication), only for a trusted test network:
#   DPFPL_INSECURE=1 deploy/start-supernode.sh SUPERLINK_HOST:PORT DATA_DIR STATE_DIR - - [LOCAL_PORT]
set -euo pipefail
export FLWR_TELEMETRY_ENABLED=0
VENV_BIN="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
export PATH="$VENV_BIN:$PATH"   # the SuperNode starts flower-superexec from PATH
LINK=$1; DATA=$2; STATE=$3; C=$4; KEY=$5; LOCAL_PORT=${6:-9094}; DEVICE=${7:-auto}
mkdir -p "$STATE"
ARGS=(--superlink "$LINK" --port "$LOCAL_PORT"
      --node-config "data-dir=\"$DATA\" state-dir=\"$STATE\" cache-dir=\"$STATE/cache\" device=\"$DEVICE\"")
if [ "${DPFPL_INSECURE:-0}" = "1" ]; then
  echo "WARNING: DPFPL_INSECURE=1: no TLS and no node authentication; use only on a trusted network" >&2
  ARGS+=(--insecure)
else
  ARGS+=(--root-certificates "$C/ca.crt" --auth-supernode-private-key "$C/$KEY.key"
         --auth-supernode-public-key "$C/$KEY.pub")
fi
exec flower-supernode "${ARGS[@]}"
