#!/usr/bin/env bash
# Forwarding between two domains of the lab through the firewall instance
# (vm mode) against host-mode routing, side by side, on the same lab: new TCP
# connections per second and 64-byte UDP packets per second (one direction,
# every packet conntrack-new on the way), pro-dev -> perso-desk, both allowed
# by the same port policies in both modes. Rounds alternate the modes
# (each switch is a converge), medians are printed.
#
# Run under the lab lock: flock /tmp/anklume-lab.lock bench/firewall-vm.sh
# Leaves the lab in host mode (the firewall instance and the host's steering
# removed).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/opt/anklume-lab/venv/bin:${HOME:-/root}/.cargo/bin:$PATH
export ANSIBLE_CONFIG=$PWD/ansible.cfg
SECS=${SECS:-3}
ROUNDS=${ROUNDS:-2}
PROJECT=anklume-lab
SRC=pro-dev
DST=perso-desk
DST_ADDR=10.251.12.10
TARGET=x86_64-unknown-linux-gnu
VARS=$(mktemp --suffix=.yml)
trap 'rm -f "$VARS"' EXIT
cat >"$VARS" <<'EOF'
network_policies:
  - {description: "bench tcp", from: pro, to: perso, ports: [5201], protocol: tcp}
  - {description: "bench udp", from: pro, to: perso, ports: [5202], protocol: udp}
EOF

RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --quiet --locked \
  --target "$TARGET" --example netload
make -s build >/dev/null
NETLOAD=target/$TARGET/release/examples/netload
lab/lab.sh up >/dev/null
lab/lab.sh firewall >/dev/null
for i in "$SRC" "$DST"; do
  incus file push --quiet --project "$PROJECT" --create-dirs --mode 0755 "$NETLOAD" "$i/usr/local/bin/netload"
done

x() { incus exec --project "$PROJECT" "$1" -- "${@:2}"; }

converge() {  # converge host|vm
  if [[ $1 == host ]]; then
    printf '{"state":"absent","table":"anklume_lab_route","dest":"/etc/nftables.d/anklume-lab-route.nft"}' >"$VARS.args"
    library/firewall_vm_routing "$VARS.args" >/dev/null
    rm -f "$VARS.args"
  fi
  ansible-playbook playbooks/site.yml -e "@$VARS" -e "firewall_mode=$1" >/dev/null
}

measure() {  # "conn_per_s udp_rx_pps"
  local conn recv pid
  x "$DST" netload tcp-serve 5201 $((SECS + 2)) & pid=$!
  sleep 0.5
  conn=$(x "$SRC" netload tcp-connect "$DST_ADDR:5201" "$SECS" | cut -d' ' -f1)
  wait "$pid" || true
  recv=$(mktemp)
  x "$DST" netload udp-count 5202 $((SECS + 1)) >"$recv" & pid=$!
  sleep 0.5
  x "$SRC" netload udp-send "$DST_ADDR:5202" "$SECS" 64 >/dev/null
  wait "$pid" || true
  echo "$conn $(($(<"$recv") / SECS))"
  rm -f "$recv"
}

declare -A results
for round in $(seq 1 "$ROUNDS"); do
  for mode in vm host; do
    converge "$mode"
    line=$(measure)
    echo "round $round $mode: conn/s udp_rx_pps = $line" >&2
    results[$mode]+="$line"$'\n'
  done
done
incus delete --force --project "$PROJECT" anklume-firewall >/dev/null
incus profile delete --project "$PROJECT" lab-firewall-multi-nic >/dev/null 2>&1 || true

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2)}'; }
printf '%-28s %12s %14s\n' "route" "conn/s" "64B UDP pps"
for mode in host vm; do
  c=$(printf '%s' "${results[$mode]}" | awk '{print $1}' | median)
  u=$(printf '%s' "${results[$mode]}" | awk '{print $2}' | median)
  printf '%-28s %12s %14s\n' "$mode" "$c" "$u"
  declare "c_$mode=$c" "u_$mode=$u"
done
# shellcheck disable=SC2154 # set by declare above
awk -v c="$c_vm" -v ch="$c_host" -v u="$u_vm" -v uh="$u_host" \
  'BEGIN {printf "vm / host: %.2fx new connections, %.2fx small packets\n", c / ch, u / uh}'
