#!/usr/bin/env bash
# Generate this organization's SuperNode authentication key pair, on the organization's own machine.
#   deploy/gen-node-key.sh OUT_DIR NAME
# Writes OUT_DIR/NAME.key (the private key, mode 0600) and OUT_DIR/NAME.pub (ECDSA P-384, OpenSSH format).
# Send only NAME.pub to the operator, who registers it with the SuperLink (deploy/connect.sh); NAME.key never
# leaves this machine. Start the SuperNode with CERT_DIR=OUT_DIR and KEY_NAME=NAME (OUT_DIR also needs the
# federation's ca.crt, from the operator). An existing key is never overwritten: to rotate a key, generate one
# under a new NAME (docs/control-api.md, "Keys and renewal").
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 OUT_DIR NAME   (writes OUT_DIR/NAME.key and OUT_DIR/NAME.pub)" >&2
  exit 2
fi
OUT=$1; NAME=$2
if [[ ! "$NAME" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
  echo "$0: NAME must be letters, digits, '.', '_' or '-' (got '$NAME')" >&2
  exit 2
fi
KEY="$OUT/$NAME.key"; PUB="$OUT/$NAME.pub"
for f in "$KEY" "$PUB"; do
  if [ -e "$f" ] || [ -L "$f" ]; then
    echo "$0: $f already exists: refusing to overwrite a node key (the SuperLink knows this node by its" \
         "public key). To rotate it, generate a key under a new NAME and register it (docs/control-api.md)." >&2
    exit 1
  fi
done
umask 077
mkdir -p "$OUT"
TMP=$(mktemp -d "$OUT/.gen-node-key.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
ssh-keygen -q -t ecdsa -b 384 -N "" -f "$TMP/key" -C "dpfpl-$NAME"
chmod 600 "$TMP/key"
chmod 644 "$TMP/key.pub"
mv "$TMP/key" "$KEY"
mv "$TMP/key.pub" "$PUB"
echo "wrote $KEY (private, mode 0600) and $PUB"
echo "send only $NAME.pub to the operator; $NAME.key never leaves this machine"
