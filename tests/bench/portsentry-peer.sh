# Runs PortSentry 1.2 (Debian) in the victim namespace with a given config, reading it from
# /etc/portsentry through a private mount namespace so the host's own config is untouched.
# shellcheck shell=bash

# Writes a PortSentry 1.2 config to $1/portsentry.conf whose KILL_ROUTE adds the source to
# the nftables drop set of the victim namespace (the same enforcement our sensor uses).
peer_config() {
  local dir=$1 tcp_ports=$2 udp_ports=$3
  mkdir -p "$dir"
  : > "$dir/portsentry.ignore"
  cat > "$dir/portsentry.conf" <<CONF
TCP_PORTS="$tcp_ports"
UDP_PORTS="$udp_ports"
ADVANCED_PORTS_TCP="2000"
ADVANCED_PORTS_UDP="2000"
ADVANCED_EXCLUDE_TCP="113,139"
ADVANCED_EXCLUDE_UDP="520,138,137,67"
IGNORE_FILE="$dir/portsentry.ignore"
HISTORY_FILE="$dir/portsentry.history"
BLOCKED_FILE="$dir/portsentry.blocked"
RESOLVE_HOST="0"
BLOCK_UDP="1"
BLOCK_TCP="1"
KILL_ROUTE="/usr/sbin/nft add element inet psbench banned { \$TARGET\$ }"
SCAN_TRIGGER="0"
CONF
}

# The drop set PortSentry's KILL_ROUTE fills, in the victim namespace.
peer_firewall() {
  in_victim nft -f - <<'NFT'
table inet psbench {
  set banned { type ipv4_addr; flags timeout; }
  chain input { type filter hook input priority -10; policy accept; ip saddr @banned drop; }
}
NFT
}

# Starts `portsentry MODE` with the config folder $1 bound over /etc/portsentry; prints its pid.
peer_start() {
  local dir=$1 mode=$2 before after pid
  before=$(ip netns pids "$LAB_VICTIM" | sort)
  in_victim unshare -m sh -c "mount --bind '$dir' /etc/portsentry && exec /usr/sbin/portsentry $mode" >/dev/null 2>&1
  for _ in $(seq 100); do
    after=$(ip netns pids "$LAB_VICTIM" | sort)
    for pid in $(comm -13 <(echo "$before") <(echo "$after")); do
      if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = portsentry ]; then echo "$pid"; return 0; fi
    done
    sleep 0.05
  done
  echo "portsentry $mode did not start" >&2
  return 1
}
