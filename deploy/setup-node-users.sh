#!/usr/bin/env bash
# One organization's node, privileges separated (as root, once): two system users, and the modes that keep the
# SuperNode's user (and so every app submitted to the SuperLink) away from the images and the node's state.
#   deploy/setup-node-users.sh NODE_USER WORKER_USER DATA_DIR STATE_DIR [NODE_KEY]
# NODE_USER runs flower-supernode and its ClientApps; WORKER_USER runs `dpfpl worker`, the only process that
# reads DATA_DIR and STATE_DIR. NODE_KEY (the SuperNode's private key) is given to NODE_USER, mode 0600.
# Idempotent: existing users are kept; ownership and modes are set again.
set -euo pipefail
NODE=$1; WORKER=$2; DATA=$3; STATE=$4; KEY=${5:-}
[ "$(id -u)" = "0" ] || { echo "run as root" >&2; exit 1; }
for user in "$NODE" "$WORKER"; do
  if ! id -u "$user" >/dev/null 2>&1; then
    useradd --system --create-home --home-dir "/var/lib/$user" --shell /usr/sbin/nologin "$user"
    echo "created user $user (home /var/lib/$user)"
  fi
done
mkdir -p "$DATA" "$STATE"
chown -R "$WORKER:$WORKER" "$DATA" "$STATE"
chmod -R u+rwX,go-rwx "$DATA"
chmod 700 "$STATE"
if [ -n "$KEY" ]; then
  chown "$NODE" "$KEY"
  chmod 600 "$KEY"
fi
echo "$DATA and $STATE: owned by $WORKER, closed to everyone else; start the node with" \
     "DPFPL_NODE_USER=$NODE DPFPL_WORKER_USER=$WORKER deploy/start-supernode.sh ..."
