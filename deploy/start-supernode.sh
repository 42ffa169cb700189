#!/usr/bin/env bash
# Start one organization's SuperNode. Its state (the local prompt, which never leaves this machine) lives
# in STATE_DIR; give every SuperNode on one host its own LOCAL_PORT.
# Usage: deploy/start-supernode.sh SUPERLINK_HOST:PORT PARTITION_ID STATE_DIR [LOCAL_PORT] [CERT_DIR]
set -euo pipefail
export FLWR_TELEMETRY_ENABLED=0
VENV_BIN="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
export PATH="$VENV_BIN:$PATH"
LINK=$1; PART=$2; STATE=$3; LOCAL_PORT=${4:-9094}; C=${5:-}
mkdir -p "$STATE"
ARGS=(--superlink "$LINK" --clientappio-api-address "127.0.0.1:$LOCAL_PORT"
      --node-config "partition-id=$PART state-dir=\"$STATE\"")
if [ -n "$C" ]; then
  ARGS+=(--root-certificates "$C/ca.crt" --auth-supernode-private-key "$C/supernode-$PART.key")
else
  ARGS+=(--insecure)
fi
exec flower-supernode "${ARGS[@]}"
