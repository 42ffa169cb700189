#!/usr/bin/env bash
# Write a flwr connection for submitting runs to a TLS SuperLink (into $FLWR_HOME/config.toml, default
# ~/.flwr) and register SuperNode public keys with it.
#   deploy/connect.sh NAME HOST:PORT CA_CERT [NODE_KEY.pub ...]
# Then submit and follow a run (exit status reflects the run's final status):
#   .venv/bin/dpfpl submit NAME -c dataset='"silo"' -c classnames='"cat,dog,cow"' -c num-clients=3
set -euo pipefail
export FLWR_TELEMETRY_ENABLED=0
VENV_BIN="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
NAME=$1; ADDR=$2; CA=$(realpath "$3"); shift 3
HOME_DIR=${FLWR_HOME:-$HOME/.flwr}
mkdir -p "$HOME_DIR"
"$VENV_BIN/python" - "$HOME_DIR/config.toml" "$NAME" "$ADDR" "$CA" <<'PY'
import sys, tomllib, tomli_w, pathlib
path, name, addr, ca = sys.argv[1:]
p = pathlib.Path(path)
cfg = tomllib.loads(p.read_text()) if p.exists() else {}
link = cfg.setdefault("superlink", {})
link[name] = {"address": addr, "root-certificates": ca}
link.setdefault("default", name)
p.write_text(tomli_w.dumps(cfg))
print(f"connection '{name}' -> {addr} written to {p}")
PY
for key in "$@"; do
  "$VENV_BIN/flwr" supernode register "$key" "$NAME"
done
