# Shared by the benchmark scripts: a victim and an attacker network namespace joined by a
# veth pair, on addresses this script creates. Traffic goes only between the two.
# shellcheck shell=bash

LAB_VICTIM=${LAB_VICTIM:-psbench-victim}
LAB_ATTACKER=${LAB_ATTACKER:-psbench-attacker}
# veth pair names (psb-v, psb-a): override with LAB_VETH to run two labs side by side.
LAB_VETH=${LAB_VETH:-psb}
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
  ip link add "$LAB_VETH-v" type veth peer name "$LAB_VETH-a"
  ip link set "$LAB_VETH-v" netns "$LAB_VICTIM"
  ip link set "$LAB_VETH-a" netns "$LAB_ATTACKER"
  ip -n "$LAB_VICTIM" addr add "$LAB_VICTIM_IP/24" dev "$LAB_VETH-v"
  ip -n "$LAB_ATTACKER" addr add "$LAB_ATTACKER_IP/24" dev "$LAB_VETH-a"
  ip -n "$LAB_VICTIM" addr add "$LAB_VICTIM_IP6/64" dev "$LAB_VETH-v" nodad
  ip -n "$LAB_ATTACKER" addr add "$LAB_ATTACKER_IP6/64" dev "$LAB_VETH-a" nodad
  for ns in "$LAB_VICTIM" "$LAB_ATTACKER"; do
    ip -n "$ns" link set lo up
  done
  ip -n "$LAB_VICTIM" link set "$LAB_VETH-v" up
  ip -n "$LAB_ATTACKER" link set "$LAB_VETH-a" up
}

in_victim() { ip netns exec "$LAB_VICTIM" "$@"; }
in_attacker() { ip netns exec "$LAB_ATTACKER" "$@"; }

# Resident memory (KiB) of a process.
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# Pid of the process running the program $1 in the victim namespace (0 if none). `in_victim
# prog &` leaves in $! the shell that runs `ip netns exec`, not the program: measure this one.
victim_pid_of() {
  local exe p
  exe=$(readlink -f "$1")
  for _ in $(seq 50); do
    for p in $(ip netns pids "$LAB_VICTIM"); do
      if [ "$(readlink "/proc/$p/exe" 2>/dev/null)" = "$exe" ]; then echo "$p"; return 0; fi
    done
    sleep 0.05
  done
  echo 0
}

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

# Ports nmap's normal output (-oN -) reports as answered (open or closed): listed ports
# plus the closed ones it folds into "Not shown: ... N closed tcp ports" (grepable output
# drops those counts when two states are both folded).
count_answered() {
  awk '
    /^[0-9]+\/tcp +(open|closed) / { n++ }
    /Not shown:/ {
      line = $0
      while (match(line, /[0-9]+ (open|closed) tcp ports/)) {
        part = substr(line, RSTART, RLENGTH); split(part, w, " "); n += w[1]
        line = substr(line, RSTART + RLENGTH)
      }
    }
    END { print n + 0 }'
}
