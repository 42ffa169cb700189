#!/usr/bin/env bash
# Generate a private CA, a SuperLink TLS certificate, and N SuperNode authentication key pairs.
# Usage: deploy/gen-certs.sh OUT_DIR NAMES N
#   NAMES: comma-separated host names and IPs the SuperLink is reached by, e.g. "link.example.org,10.0.0.5"
#   (localhost and 127.0.0.1 are always added).
# Register each node's public key with: flwr supernode register OUT_DIR/supernode-I.pub CONNECTION
set -euo pipefail
OUT=$1; HOST=$2; N=$3
mkdir -p "$OUT"; cd "$OUT"
openssl genrsa -out ca.key 4096 2>/dev/null
openssl req -new -x509 -key ca.key -sha256 -subj "/CN=dpfpl-ca" -days 365 -out ca.crt
openssl genrsa -out server.key 4096 2>/dev/null
openssl req -new -key server.key -subj "/CN=${HOST%%,*}" -out server.csr
SAN="DNS:localhost,IP:127.0.0.1"
IFS=',' read -ra NAMES <<< "$HOST"
for n in "${NAMES[@]}"; do
  if [[ "$n" =~ ^[0-9.]+$ || "$n" == *:* ]]; then SAN="$SAN,IP:$n"; else SAN="$SAN,DNS:$n"; fi
done
printf "subjectAltName=%s\n" "$SAN" > san.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.pem -days 365 -sha256 -extfile san.ext 2>/dev/null
for i in $(seq 0 $((N - 1))); do
  ssh-keygen -q -t ecdsa -b 384 -N "" -f "supernode-$i.key" -C "dpfpl-node-$i"
  mv "supernode-$i.key.pub" "supernode-$i.pub"
done
chmod 600 ./*.key
echo "wrote CA, server certificate and $N SuperNode key pairs to $OUT"
