#!/usr/bin/env bash
# Start the SuperLink with TLS and SuperNode authentication (one port serves SuperNodes, CLI and apps).
#   deploy/start-superlink.sh CERT_DIR [HOST] [PORT] [DATABASE]
# CERT_DIR holds ca.crt, server.pem and server.key (from deploy/gen-certs.sh; the SuperLink needs nothing
# else: keep ca.key and every node's private key off this machine). CERT_DIR "-" (or none, under systemd)
# means $CREDENTIALS_DIRECTORY, where systemd's LoadCredential= puts them (deploy/systemd/dpfpl-superlink.service).
# The port also serves Flower's Control API (run submission, node registration) to whoever reaches it with
# ca.crt: restrict who can reach it (docs/control-api.md). HOST 127.0.0.1 keeps it to this machine (behind
# a reverse proxy, or with the operator on an SSH tunnel).
# Insecure mode (no TLS, any node may join) only with DPFPL_INSECURE=1 and a warning.
set -euo pipefail
export FLWR_TELEMETRY_ENABLED=0
VENV_BIN="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
export PATH="$VENV_BIN:$PATH"   # the SuperLink starts flower-superexec from PATH
C=${1:--}; HOST=${2:-0.0.0.0}; PORT=${3:-8000}; DB=${4:-superlink.db}
if [ "$C" = "-" ]; then
  if [ -z "${CREDENTIALS_DIRECTORY:-}" ] && [ "${DPFPL_INSECURE:-0}" != "1" ]; then
    echo "usage: $0 CERT_DIR [HOST] [PORT] [DATABASE]  (CERT_DIR '-' needs \$CREDENTIALS_DIRECTORY)" >&2
    exit 2
  fi
  C=${CREDENTIALS_DIRECTORY:-}
fi
ARGS=(--host "$HOST" --port "$PORT" --disable-runtime-dependency-installation --database "$DB")
if [ "${DPFPL_INSECURE:-0}" = "1" ]; then
  echo "WARNING: DPFPL_INSECURE=1: no TLS, no node authentication; use only on a trusted network" >&2
  ARGS+=(--insecure)
else
  for f in ca.crt server.pem server.key; do
    [ -r "$C/$f" ] || { echo "$0: cannot read $C/$f (deploy/gen-certs.sh writes it)" >&2; exit 1; }
  done
  for f in "$C"/*.key; do
    if [ -e "$f" ] && [ "$(basename "$f")" != server.key ]; then
      echo "WARNING: $f is readable here; the SuperLink needs only ca.crt, server.pem, server.key:" \
           "keep the CA key and node private keys off the aggregator" >&2
    fi
  done
  ARGS+=(--ssl-ca-certfile "$C/ca.crt" --ssl-certfile "$C/server.pem" --ssl-keyfile "$C/server.key"
         --enable-supernode-auth)
fi
# Flower 1.41 serves the Control API on --host/--port, always, beside the SuperNodes' Fleet API (its
# --control-api-address is deprecated): no flag keeps it local, so say so whenever others can reach the port.
case "$HOST" in
  127.*|localhost|::1|"[::1]") ;;
  *) echo "NOTE: port $PORT on $HOST also accepts run submissions and node registrations from anyone who" \
          "reaches it; restrict it (firewall or proxy): docs/control-api.md" >&2 ;;
esac
exec flower-superlink "${ARGS[@]}"
