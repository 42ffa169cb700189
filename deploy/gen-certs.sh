#!/usr/bin/env bash
# Operator: the federation's private CA and the SuperLink's TLS certificate. No SuperNode key is made here:
# each organization generates its own on its own machine (deploy/gen-node-key.sh) and sends only NAME.pub.
#   deploy/gen-certs.sh OUT_DIR NAMES                  a new CA + SuperLink certificate (refuses an existing CA)
#   deploy/gen-certs.sh --renew-server OUT_DIR NAMES   a new SuperLink certificate and key from OUT_DIR's CA;
#                                                      the CA, ca.crt at every organization and the node keys
#                                                      stay valid (restart the SuperLink to load it)
# NAMES: comma-separated host names and IPs the SuperLink is reached by, e.g. "link.example.org,10.0.0.5"
# (localhost and 127.0.0.1 are always added). Validity: DPFPL_CA_DAYS (default 3650) for the CA,
# DPFPL_CERT_DAYS (default 365) for the SuperLink certificate.
# The aggregator needs only ca.crt, server.pem and server.key; ca.key stays with the operator (offline if you can).
set -euo pipefail
usage() {
  echo "usage: $0 OUT_DIR NAMES | $0 --renew-server OUT_DIR NAMES" >&2
  exit 2
}
RENEW=0
if [ "${1:-}" = "--renew-server" ]; then RENEW=1; shift; fi
if [ $# -eq 3 ] && [[ "$3" =~ ^[0-9]+$ ]]; then
  echo "$0: no longer generates SuperNode keys (a node's private key must not exist on the operator's" \
       "machine): drop the third argument; each organization runs deploy/gen-node-key.sh DIR NAME on its" \
       "own machine and sends you NAME.pub" >&2
  exit 2
fi
[ $# -eq 2 ] || usage
OUT=$1; HOST=$2
CA_DAYS=${DPFPL_CA_DAYS:-3650}; DAYS=${DPFPL_CERT_DAYS:-365}

if [ "$RENEW" = "1" ]; then
  for f in ca.key ca.crt; do
    if [ ! -f "$OUT/$f" ]; then
      echo "$0: --renew-server needs the existing CA, and $OUT/$f is missing" >&2
      exit 1
    fi
  done
else
  for f in ca.key ca.crt; do
    if [ -e "$OUT/$f" ]; then
      echo "$0: $OUT/$f exists: refusing to replace the CA (every organization trusts its ca.crt)." \
           "To renew the SuperLink certificate from this CA: $0 --renew-server $OUT NAMES." \
           "For a new CA on purpose, move $OUT away first (then send the new ca.crt to every organization)." >&2
      exit 1
    fi
  done
fi

umask 077
mkdir -p "$OUT"
cd "$OUT"
TMP=$(mktemp -d .gen-certs.XXXXXX)
trap 'rm -rf "$TMP"' EXIT

if [ "$RENEW" = "0" ]; then
  openssl genrsa -out "$TMP/ca.key" 4096 2>/dev/null
  openssl req -new -x509 -key "$TMP/ca.key" -sha256 -subj "/CN=dpfpl-ca" -days "$CA_DAYS" -out "$TMP/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
  chmod 644 "$TMP/ca.crt"
  mv "$TMP/ca.key" ca.key
  mv "$TMP/ca.crt" ca.crt
elif ! openssl x509 -in ca.crt -noout -checkend $((DAYS * 86400)) >/dev/null; then
  echo "WARNING: the CA expires before the new certificate ($(openssl x509 -in ca.crt -noout -enddate)):" \
       "SuperNodes stop trusting the SuperLink then; plan a new CA (docs/control-api.md, Keys and renewal)" >&2
fi

SAN="DNS:localhost,IP:127.0.0.1"
IFS=',' read -ra NAMES <<< "$HOST"
for n in "${NAMES[@]}"; do
  if [[ "$n" =~ ^[0-9.]+$ || "$n" == *:* ]]; then SAN="$SAN,IP:$n"; else SAN="$SAN,DNS:$n"; fi
done
printf "subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n" "$SAN" > "$TMP/san.ext"
openssl genrsa -out "$TMP/server.key" 4096 2>/dev/null
openssl req -new -key "$TMP/server.key" -subj "/CN=${HOST%%,*}" -out "$TMP/server.csr"
openssl x509 -req -in "$TMP/server.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -CAserial ca.srl \
  -out "$TMP/server.pem" -days "$DAYS" -sha256 -extfile "$TMP/san.ext" 2>/dev/null
openssl verify -CAfile ca.crt "$TMP/server.pem" >/dev/null
chmod 644 "$TMP/server.pem"
mv "$TMP/server.key" server.key
mv "$TMP/server.pem" server.pem

if [ "$RENEW" = "1" ]; then
  echo "renewed server.pem and server.key in $OUT from the existing CA (valid $DAYS days, for $SAN);" \
       "copy them to the aggregator and restart the SuperLink; ca.crt and the node keys are unchanged"
else
  echo "wrote the CA (ca.key, ca.crt) and the SuperLink certificate (server.pem, server.key) to $OUT"
  echo "aggregator: copy ca.crt, server.pem, server.key (not ca.key); organizations: send them ca.crt"
  echo "node keys: each organization runs deploy/gen-node-key.sh DIR NAME on its own machine and sends you" \
       "NAME.pub; register them with deploy/connect.sh"
fi
