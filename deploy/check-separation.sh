#!/usr/bin/env bash
# Sourced by start-supernode.sh: checks that a node's privileges are really separated before anything starts,
# and names what is missing (deploy/setup-node-users.sh sets all of it up).
#   check_separation NODE_USER WORKER_USER DATA_DIR STATE_DIR CERT_DIR KEY_NAME VENV_BIN
check_separation() {
  local node=$1 worker=$2 data=$3 state=$4 certs=$5 key=$6 venv=$7 missing=()
  [ "$(id -u)" = "0" ] || fail "separated privileges: run as root (it starts the SuperNode as $node and the worker as $worker)"
  [ -n "$node" ] && [ -n "$worker" ] || fail "set both DPFPL_NODE_USER (the SuperNode's) and DPFPL_WORKER_USER (the worker's)"
  [ "$node" != "$worker" ] || fail "DPFPL_NODE_USER and DPFPL_WORKER_USER must be two different users"
  for user in "$node" "$worker"; do
    id -u "$user" >/dev/null 2>&1 || missing+=("user $user does not exist (deploy/setup-node-users.sh $node $worker DATA STATE creates it)")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    [ -d "$data" ] || missing+=("DATA_DIR $data does not exist")
    runuser -u "$worker" -- test -r "$data" -a -x "$data" || missing+=("$worker cannot read DATA_DIR $data (chown -R $worker $data)")
    if runuser -u "$node" -- test -r "$data" -o -x "$data"; then
      missing+=("$node can open DATA_DIR $data: a submitted app could read the images (chown -R $worker $data && chmod -R go-rwx $data)")
    fi
    [ -d "$state" ] || missing+=("STATE_DIR $state does not exist (deploy/setup-node-users.sh creates it)")
    [ -d "$state" ] && [ "$(stat -c %U "$state")" != "$worker" ] && missing+=("STATE_DIR $state is owned by $(stat -c %U "$state"), not $worker (chown -R $worker $state)")
    if runuser -u "$node" -- test -r "$state" -o -x "$state"; then
      missing+=("$node can open STATE_DIR $state: a submitted app could read the local prompt and the ledger (chmod 700 $state)")
    fi
    runuser -u "$node" -- "$venv/python" -c "" 2>/dev/null || missing+=("$node cannot run $venv/python: install dpfpl where both users can read it (every parent directory of the virtual environment and of its Python must be enterable by others)")
    runuser -u "$worker" -- "$venv/python" -c "" 2>/dev/null || missing+=("$worker cannot run $venv/python")
    if [ "${DPFPL_INSECURE:-0}" != "1" ]; then
      runuser -u "$node" -- test -r "$certs/$key.key" || missing+=("$node cannot read its node key $certs/$key.key (chown $node $certs/$key.key)")
      runuser -u "$node" -- test -r "$certs/ca.crt" || missing+=("$node cannot read $certs/ca.crt")
      runuser -u "$worker" -- test -r "$certs/$key.key" 2>/dev/null && missing+=("$worker can read the node key $certs/$key.key: only the SuperNode's user needs it (chmod 600, owned by $node)")
    fi
  fi
  if [ "${#missing[@]}" -gt 0 ]; then
    printf 'deploy/start-supernode.sh: privileges are not separated as asked:\n' >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 78
  fi
}
