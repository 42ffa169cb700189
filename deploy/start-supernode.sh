#!/usr/bin/env bash
# Start one organization's SuperNode (TLS + node authentication by default) and, beside it, the node's
# resident worker (`dpfpl worker`): one long-lived process that keeps the model and the node's features warm
# across messages, while the SuperNode starts a fresh ClientApp process per message. The ClientApp forwards
# each message to the worker over STATE_DIR/worker.sock (a Unix socket, no network port).
#   deploy/start-supernode.sh SUPERLINK_HOST:PORT DATA_DIR STATE_DIR CERT_DIR KEY_NAME [LOCAL_PORT] [DEVICE]
# DATA_DIR: the organization's images (class folders or manifest.csv); STATE_DIR: where its local prompt
# lives (it never leaves this machine); CERT_DIR holds ca.crt and KEY_NAME.key/.pub; LOCAL_PORT: the
# SuperNode's own API port (default 9094; give every SuperNode on one host its own, and its own STATE_DIR:
# each gets its own worker); DEVICE: cpu, cuda, cuda:1, or auto (default: a GPU when present).
# The worker is supervised (restarted if it dies; it logs to STATE_DIR/worker.log) and stops with the
# SuperNode. DPFPL_SAMPLE_RATE=0.05 declares the node's public sample rate, DPFPL_LIFETIME_EPSILON=8 its budget
# over every run (both go into the node config). DPFPL_NODE_WORKER=0 starts the SuperNode alone (each ClientApp then does its own work).
# Insecure (no TLS, no authentication), only for a trusted test network:
#   DPFPL_INSECURE=1 deploy/start-supernode.sh SUPERLINK_HOST:PORT DATA_DIR STATE_DIR - - [LOCAL_PORT]
set -euo pipefail
export FLWR_TELEMETRY_ENABLED=0
VENV_BIN="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
export PATH="$VENV_BIN:$PATH"   # the SuperNode starts flower-superexec from PATH
# how often the SuperNode's SuperExec looks for a message to start a ClientApp for (Flower's default: 1 s)
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL=${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.2}
LINK=$1; DATA=$2; STATE=$3; C=$4; KEY=$5; LOCAL_PORT=${6:-9094}; DEVICE=${7:-auto}
mkdir -p "$STATE"
chmod 700 "$STATE"
STATE=$(cd "$STATE" && pwd)   # absolute: the ClientApp finds the worker's socket through it
NODE_CONFIG="data-dir=\"$DATA\" state-dir=\"$STATE\" cache-dir=\"$STATE/cache\" device=\"$DEVICE\""
# The organization's own privacy declarations (docs/privacy.md): its public Poisson sample rate, chosen without
# reading the records (batch-size / a public, approximate silo size), and its lifetime budget over every run.
if [ -n "${DPFPL_SAMPLE_RATE:-}" ]; then NODE_CONFIG+=" sample-rate=$DPFPL_SAMPLE_RATE"; fi
if [ -n "${DPFPL_LIFETIME_EPSILON:-}" ]; then NODE_CONFIG+=" lifetime-epsilon=$DPFPL_LIFETIME_EPSILON"; fi
ARGS=(--superlink "$LINK" --port "$LOCAL_PORT" --node-config "$NODE_CONFIG")
if [ "${DPFPL_INSECURE:-0}" = "1" ]; then
  echo "WARNING: DPFPL_INSECURE=1: no TLS and no node authentication; use only on a trusted network" >&2
  ARGS+=(--insecure)
else
  ARGS+=(--root-certificates "$C/ca.crt" --auth-supernode-private-key "$C/$KEY.key"
         --auth-supernode-public-key "$C/$KEY.pub")
fi

WORKER=""
if [ "${DPFPL_NODE_WORKER:-1}" = "1" ]; then
  echo "node worker for $STATE: logging to $STATE/worker.log" >&2
  dpfpl worker --supervise --state-dir "$STATE" >>"$STATE/worker.log" 2>&1 &
  WORKER=$!
fi
flower-supernode "${ARGS[@]}" &
NODE=$!
# SIGTERM/SIGINT go to the SuperNode; when it exits (for any reason), so does the worker's supervisor
trap 'kill -TERM "$NODE" 2>/dev/null || true' TERM INT
trap '[ -n "$WORKER" ] && kill -TERM "$WORKER" 2>/dev/null; true' EXIT
set +e
wait "$NODE"; rc=$?
while kill -0 "$NODE" 2>/dev/null; do wait "$NODE"; rc=$?; done
exit "$rc"
