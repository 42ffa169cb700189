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
# DPFPL_WORKER_HUNG_AFTER (default 15 s): how old the worker's heartbeat may get before its supervisor restarts
# it (raise it on a host so loaded that a worker's start-up takes longer); DPFPL_WORKER_MESSAGE_DEADLINE (default
# 3600 s): a handler running longer is hung (a deadlock, a loop), and the worker stops its heartbeat to be restarted.
# Insecure (no TLS, no authentication), only for a trusted test network:
#   DPFPL_INSECURE=1 deploy/start-supernode.sh SUPERLINK_HOST:PORT DATA_DIR STATE_DIR - - [LOCAL_PORT]
#
# Privileges separated (what an organization that does not trust every other party runs; as root):
#   DPFPL_NODE_USER=dpfpl-node DPFPL_WORKER_USER=dpfpl-data DPFPL_SAMPLE_RATE=0.02 DPFPL_LIFETIME_EPSILON=8 \
#   deploy/start-supernode.sh SUPERLINK_HOST:PORT DATA_DIR STATE_DIR CERT_DIR KEY_NAME [LOCAL_PORT] [DEVICE]
# The SuperNode, and every ClientApp it starts (any submitted app's), run as DPFPL_NODE_USER, which can read
# neither DATA_DIR nor STATE_DIR; the worker runs as DPFPL_WORKER_USER, the only user that can, and answers
# DPFPL_NODE_USER on a socket in DPFPL_SOCKET_DIR (default /run/dpfpl/<state-dir name>). The worker uses its own
# node config and its operator's policy (docs/deployment.md): DPFPL_LIFETIME_EPSILON is required,
# DPFPL_EVALUATIONS_PER_DAY (default 100) bounds the evaluation replies, DPFPL_WEIGHTS_DIR names the approved
# weights files, DPFPL_ALLOW_SECFPP=1 lets the node take part in SecFPP (whose clustering phase releases an
# un-noised vector to whoever submits a run: docs/threat-model.md), DPFPL_WORKER_HUNG_AFTER (default 15 s) how
# old the worker's heartbeat may get before its supervisor restarts it. deploy/setup-node-users.sh creates the users and sets the modes this script checks.
# Without the two users the script runs in single-user TRIAL mode, which does not contain a rogue app.
set -euo pipefail
export FLWR_TELEMETRY_ENABLED=0
VENV_BIN="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
export PATH="$VENV_BIN:$PATH"   # the SuperNode starts flower-superexec from PATH
# how often the SuperNode's SuperExec looks for a message to start a ClientApp for (Flower's default: 1 s).
# The only SuperNode-side interval Flower 1.41 reads from the environment: its 3 s sleep after a pull that
# found no message and its 0.5 s poll for the ClientApp's reply are fixed in its code (docs/performance.md).
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL=${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.2}
LINK=$1; DATA=$2; STATE=$3; C=$4; KEY=$5; LOCAL_PORT=${6:-9094}; DEVICE=${7:-auto}
NODE_USER=${DPFPL_NODE_USER:-}; WORKER_USER=${DPFPL_WORKER_USER:-}
SEPARATED=0
if [ -n "$NODE_USER$WORKER_USER" ]; then SEPARATED=1; fi
fail() { echo "deploy/start-supernode.sh: $*" >&2; exit 78; }
if [ "$SEPARATED" = "1" ]; then
  STATE=$(realpath -m "$STATE"); DATA=$(realpath -m "$DATA")
  # shellcheck source=deploy/check-separation.sh
  . "$(dirname "$0")/check-separation.sh"
  check_separation "$NODE_USER" "$WORKER_USER" "$DATA" "$STATE" "$C" "$KEY" "$VENV_BIN"
else
  mkdir -p "$STATE"
  chmod 700 "$STATE"
  STATE=$(cd "$STATE" && pwd)   # absolute: the ClientApp finds the worker's socket through it
  echo "TRIAL MODE: the SuperNode and the node worker run as one user, so an app submitted to the SuperLink can" \
       "read this node's data and state. Separate privileges (DPFPL_NODE_USER, DPFPL_WORKER_USER;" \
       "docs/deployment.md) unless every party that can reach the SuperLink is trusted." >&2
fi
NODE_CONFIG="data-dir=\"$DATA\" state-dir=\"$STATE\" cache-dir=\"$STATE/cache\" device=\"$DEVICE\""
# The organization's own privacy declarations (docs/privacy.md): its public Poisson sample rate, chosen without
# reading the records (batch-size / a public, approximate silo size), and its lifetime budget over every run.
if [ -n "${DPFPL_SAMPLE_RATE:-}" ]; then NODE_CONFIG+=" sample-rate=$DPFPL_SAMPLE_RATE"; fi
if [ -n "${DPFPL_LIFETIME_EPSILON:-}" ]; then NODE_CONFIG+=" lifetime-epsilon=$DPFPL_LIFETIME_EPSILON"; fi
if [ "$SEPARATED" = "1" ]; then
  [ -n "${DPFPL_LIFETIME_EPSILON:-}" ] || fail "DPFPL_LIFETIME_EPSILON is required with separated privileges: a submitted app can start any run, and only the node's lifetime budget bounds them all"
  NODE_CONFIG+=" global-noise=\"node\" evaluations-per-day=${DPFPL_EVALUATIONS_PER_DAY:-100}"
  if [ -n "${DPFPL_WEIGHTS_DIR:-}" ]; then NODE_CONFIG+=" weights-dir=\"$DPFPL_WEIGHTS_DIR\""; fi
  if [ "${DPFPL_ALLOW_SECFPP:-0}" = "1" ]; then NODE_CONFIG+=" allow-secfpp=true"; fi
  SOCKET_DIR=${DPFPL_SOCKET_DIR:-/run/dpfpl/$(basename "$STATE")}
  mkdir -p "$SOCKET_DIR"
  chown "$WORKER_USER:$(id -gn "$NODE_USER")" "$SOCKET_DIR"
  chmod 0710 "$SOCKET_DIR"   # the worker's; the SuperNode's group may reach the socket in it, not list it
  SOCKET="$SOCKET_DIR/worker.sock"
  WORKER_CONFIG=$NODE_CONFIG
  NODE_CONFIG="worker-socket=\"$SOCKET\""   # all the SuperNode's ClientApps learn: where to ask
  NODE_HOME=${DPFPL_NODE_HOME:-$(getent passwd "$NODE_USER" | cut -d: -f6)}
  [ -n "$NODE_HOME" ] && runuser -u "$NODE_USER" -- test -w "$NODE_HOME" \
    || fail "$NODE_USER needs a writable home for Flower's app cache (set DPFPL_NODE_HOME)"
  as_user() { local user=$1; shift; setpriv --reuid="$user" --regid="$(id -g "$user")" --init-groups \
      env HOME="$(getent passwd "$user" | cut -d: -f6)" "$@"; }
fi
ARGS=(--superlink "$LINK" --port "$LOCAL_PORT" --node-config "$NODE_CONFIG")
if [ "${DPFPL_INSECURE:-0}" = "1" ]; then
  echo "WARNING: DPFPL_INSECURE=1: no TLS and no node authentication; use only on a trusted network" >&2
  ARGS+=(--insecure)
else
  ARGS+=(--root-certificates "$C/ca.crt" --auth-supernode-private-key "$C/$KEY.key"
         --auth-supernode-public-key "$C/$KEY.pub")
fi

WORKER=""
if [ "$SEPARATED" = "1" ]; then
  if [ "${DPFPL_NODE_WORKER:-1}" = "1" ]; then
    echo "node worker for $STATE as $WORKER_USER, answering $NODE_USER on $SOCKET: logging to $STATE/worker.log" >&2
    as_user "$WORKER_USER" "$VENV_BIN/dpfpl" worker --supervise --state-dir "$STATE" --socket "$SOCKET" \
      --peer-user "$NODE_USER" --node-config "$WORKER_CONFIG" --hung-after "${DPFPL_WORKER_HUNG_AFTER:-15}" \
      --message-deadline "${DPFPL_WORKER_MESSAGE_DEADLINE:-3600}" \
      >>"$STATE/worker.log" 2>&1 &
    WORKER=$!
  fi
  as_user "$NODE_USER" FLWR_HOME="${DPFPL_NODE_HOME:-$NODE_HOME}/.flwr" PATH="$PATH" \
    flower-supernode "${ARGS[@]}" &
  NODE=$!
else
  if [ "${DPFPL_NODE_WORKER:-1}" = "1" ]; then
    echo "node worker for $STATE: logging to $STATE/worker.log" >&2
    dpfpl worker --supervise --state-dir "$STATE" --hung-after "${DPFPL_WORKER_HUNG_AFTER:-15}" \
      --message-deadline "${DPFPL_WORKER_MESSAGE_DEADLINE:-3600}" \
      >>"$STATE/worker.log" 2>&1 &
    WORKER=$!
  fi
  flower-supernode "${ARGS[@]}" &
  NODE=$!
fi
# SIGTERM/SIGINT go to the SuperNode; when it exits (for any reason), so does the worker's supervisor
trap 'kill -TERM "$NODE" 2>/dev/null || true' TERM INT
trap '[ -n "$WORKER" ] && kill -TERM "$WORKER" 2>/dev/null; true' EXIT
set +e
wait "$NODE"; rc=$?
while kill -0 "$NODE" 2>/dev/null; do wait "$NODE"; rc=$?; done
exit "$rc"
