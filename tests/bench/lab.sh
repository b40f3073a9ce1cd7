# Shared by the benchmark scripts: a victim and an attacker network namespace joined by a
# veth pair, on addresses this script creates. Traffic goes only between the two.
# shellcheck shell=bash

LAB_VICTIM=${LAB_VICTIM:-psbench-victim}
LAB_ATTACKER=${LAB_ATTACKER:-psbench-attacker}
LAB_VICTIM_IP=10.251.0.1
LAB_ATTACKER_IP=10.251.0.2
LAB_VICTIM_IP6=fd00:251::1
LAB_ATTACKER_IP6=fd00:251::2

lab_down() {
  for ns in "$LAB_VICTIM" "$LAB_ATTACKER"; do
    if ip netns list | grep -qw "$ns"; then
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    fi
  done
}

lab_up() {
  lab_down
  ip netns add "$LAB_VICTIM"
  ip netns add "$LAB_ATTACKER"
  ip link add psb-v type veth peer name psb-a
  ip link set psb-v netns "$LAB_VICTIM"
  ip link set psb-a netns "$LAB_ATTACKER"
  ip -n "$LAB_VICTIM" addr add "$LAB_VICTIM_IP/24" dev psb-v
  ip -n "$LAB_ATTACKER" addr add "$LAB_ATTACKER_IP/24" dev psb-a
  ip -n "$LAB_VICTIM" addr add "$LAB_VICTIM_IP6/64" dev psb-v nodad
  ip -n "$LAB_ATTACKER" addr add "$LAB_ATTACKER_IP6/64" dev psb-a nodad
  for ns in "$LAB_VICTIM" "$LAB_ATTACKER"; do
    ip -n "$ns" link set lo up
  done
  ip -n "$LAB_VICTIM" link set psb-v up
  ip -n "$LAB_ATTACKER" link set psb-a up
}

in_victim() { ip netns exec "$LAB_VICTIM" "$@"; }
in_attacker() { ip netns exec "$LAB_ATTACKER" "$@"; }

# Resident memory (KiB) of a process.
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# Waits until a TCP port in the victim accepts connections from the attacker.
wait_tcp() {
  local port=$1 tries=100
  while [ $tries -gt 0 ]; do
    if in_attacker python3 -c "import socket,sys; s=socket.create_connection(('$LAB_VICTIM_IP',$port),0.2); s.close()" 2>/dev/null; then return 0; fi
    sleep 0.05; tries=$((tries-1))
  done
  return 1
}

# Waits until something in the victim listens on a TCP port, looking from inside the victim
# (a connect from the attacker would itself trip a decoy).
wait_listen() {
  local port=$1 tries=100
  while [ $tries -gt 0 ]; do
    [ -n "$(in_victim ss -Hltn "sport = :$port")" ] && return 0
    sleep 0.05; tries=$((tries-1))
  done
  return 1
}
