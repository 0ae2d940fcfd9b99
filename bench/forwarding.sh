#!/usr/bin/env bash
# Forwarding benchmark (DESIGN.md section 6), side by side in one run:
# new-connection rate and small-packet rate through a router namespace that
# holds N domain bridges, with
#   bare    no table at all (no conntrack either),
#   none    only a stand-in for Incus's own NAT table (the masquerade every
#           Incus bridge has, so conntrack runs): "the same host with no
#           isolation ruleset", the baseline of the ratios,
#   sets    our rendered ruleset (N domains, N policies),
#   bridge  one drop rule per bridge plus one accept rule per policy,
#   pair    one drop rule per ordered bridge pair (PAIR_N bridges: at N=1000
#           it would be a million rules) plus the same accept rules.
# The measured flow is a domain's egress to the "internet" (an uplink that is
# not a domain bridge): the traffic that walks past every isolation rule.
#
# Everything lives in three namespaces created here (ankb-a, ankb-b, ankb-r)
# and is removed on exit; traffic stays between them. Root is needed.
#
#   bench/forwarding.sh            (or: make bench-forwarding)
#   N=1000 PAIR_N=300 SECS=3 ROUNDS=3 bench/forwarding.sh
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-1000}
PAIR_N=${PAIR_N:-300}
SECS=${SECS:-3}
ROUNDS=${ROUNDS:-3}
NS_A=ankb-a NS_B=ankb-b NS_R=ankb-r
TABLE=anklume_bench
TMP=$(mktemp -d)
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for ns in "$NS_A" "$NS_B" "$NS_R"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT

[[ $(id -u) == 0 ]] || { echo "bench/forwarding.sh: run as root (network namespaces)" >&2; exit 1; }
"$(dirname "$0")/../lab/cargo" build --release --quiet --example netload --bin incus_nftables_render
NETLOAD=$PWD/target/release/examples/netload
RENDER=$PWD/target/release/incus_nftables_render

# --- topology ---------------------------------------------------------------
for ns in "$NS_A" "$NS_B" "$NS_R"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
r() { ip netns exec "$NS_R" "$@"; }
echo "creating $N bridges in $NS_R" >&2
seq 0 $((N - 1)) | sed 's/.*/link add net-d& type bridge/' | r ip -batch -
r ip link set net-d0 up
r ip addr add 10.200.0.1/24 dev net-d0
ip link add va netns "$NS_R" type veth peer name eth0 netns "$NS_A"
r ip link set va master net-d0 up
ip -n "$NS_A" addr add 10.200.0.2/24 dev eth0
ip -n "$NS_A" link set eth0 up
ip -n "$NS_A" route add default via 10.200.0.1
ip link add upl netns "$NS_R" type veth peer name eth0 netns "$NS_B"
r ip addr add 10.201.0.1/24 dev upl
r ip link set upl up
ip -n "$NS_B" addr add 10.201.0.2/24 dev eth0
ip -n "$NS_B" link set eth0 up
ip -n "$NS_B" route add default via 10.201.0.1
r sysctl -qw net.ipv4.ip_forward=1

# --- rulesets -----------------------------------------------------------------
python3 - "$N" "$PAIR_N" "$TMP" "$TABLE" <<'PY'
import json, sys
n, pair_n, tmp, table = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
policies = [{"from": f"d{i}", "to": f"d{(i * 7 + 1) % n}",
             "ports": [1000 + i % 500, f"{20000 + i}-{20010 + i}"]} for i in range(n)]
json.dump({"bridges": [f"net-d{i}" for i in range(n)], "policies": policies,
           "table": table, "output_path": f"{tmp}/sets.nft", "validate": "never"},
          open(f"{tmp}/args.json", "w"))
def linear(bridges, drops):
    out = [f"table inet {table} {{}}", f"delete table inet {table}", f"table inet {table} {{",
           "\tchain isolation {", "\t\ttype filter hook forward priority -1; policy accept;",
           "\t\tct state established,related accept", "\t\tct state invalid drop"]
    for p in policies:
        a, b = p["from"][1:], p["to"][1:]
        if int(a) < bridges and int(b) < bridges:
            out.append(f'\t\tiifname "net-d{a}" oifname "net-d{b}" tcp dport {{ {p["ports"][0]}, {p["ports"][1]} }} accept')
    out += drops
    out += ["\t}", "}"]
    return "\n".join(out) + "\n"
per_bridge = [f'\t\tiifname "net-d{i}" oifname != "net-d{i}" oifname "net-d*" drop' for i in range(n)]
open(f"{tmp}/bridge.nft", "w").write(linear(n, per_bridge))
per_pair = [f'\t\tiifname "net-d{a}" oifname "net-d{b}" drop'
            for a in range(pair_n) for b in range(pair_n) if a != b]
open(f"{tmp}/pair.nft", "w").write(linear(pair_n, per_pair))
PY
"$RENDER" "$TMP/args.json" | grep -q '"failed":false' || { echo "render failed" >&2; exit 1; }

# What Incus puts on every managed bridge with ipv4.nat: a masquerade in
# postrouting, hence conntrack for all forwarded traffic.
cat >"$TMP/incus-nat.nft" <<NFT
table inet incus_stand_in {}
delete table inet incus_stand_in
table inet incus_stand_in {
	chain pstrt.net-d0 {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr 10.200.0.0/24 ip daddr != 10.200.0.0/24 masquerade
	}
}
NFT

drop_table() {
  if r nft list table inet "$1" >/dev/null 2>&1; then r nft delete table inet "$1"; fi
}

load() {  # load <variant>: prints the time to load (or remove) our table, in ms
  local t0 t1
  if [[ $1 == bare ]]; then drop_table incus_stand_in; else r nft -f "$TMP/incus-nat.nft"; fi
  t0=$(date +%s%N)
  case $1 in
    bare | none) drop_table "$TABLE" ;;
    *) r nft -f "$TMP/$1.nft" ;;
  esac
  t1=$(date +%s%N)
  echo $(((t1 - t0) / 1000000))
}

measure() {  # measure <variant>: "load_ms conn_per_s udp_pps"
  local load_ms conn sent recv
  load_ms=$(load "$1")
  ip netns exec "$NS_B" "$NETLOAD" tcp-serve 5201 $((SECS + 2)) & PIDS+=($!)
  sleep 0.3
  conn=$(ip netns exec "$NS_A" "$NETLOAD" tcp-connect 10.201.0.2:5201 "$SECS" | cut -d' ' -f1)
  wait "${PIDS[-1]}" || true
  ip netns exec "$NS_B" "$NETLOAD" udp-count 5202 $((SECS + 1)) >"$TMP/recv" & PIDS+=($!)
  sleep 0.3
  sent=$(ip netns exec "$NS_A" "$NETLOAD" udp-send 10.201.0.2:5202 "$SECS" 64)
  wait "${PIDS[-1]}" || true
  recv=$(<"$TMP/recv")
  echo "$load_ms $conn $((recv / SECS)) $((sent / SECS))"
}

variants=(bare none sets bridge pair)
declare -A results
for round in $(seq 1 "$ROUNDS"); do
  for v in "${variants[@]}"; do
    line=$(measure "$v")
    echo "round $round $v: load_ms conn/s udp_rx_pps udp_tx_pps = $line" >&2
    results[$v]+="$line"$'\n'
  done
done
load bare >/dev/null

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }
printf '\n%-8s %10s %12s %14s %10s %10s\n' design load_ms conn_per_s udp64_rx_pps conn_ratio pps_ratio
base_conn=$(printf '%s' "${results[none]}" | awk '{print $2}' | median)
base_pps=$(printf '%s' "${results[none]}" | awk '{print $3}' | median)
for v in "${variants[@]}"; do
  l=$(printf '%s' "${results[$v]}" | awk '{print $1}' | median)
  c=$(printf '%s' "${results[$v]}" | awk '{print $2}' | median)
  p=$(printf '%s' "${results[$v]}" | awk '{print $3}' | median)
  printf '%-8s %10s %12s %14s %10s %10s\n' "$v" "$l" "$c" "$p" \
    "$(awk -v a="$c" -v b="$base_conn" 'BEGIN {printf "%.2f", a / b}')" \
    "$(awk -v a="$p" -v b="$base_pps" 'BEGIN {printf "%.2f", a / b}')"
done
echo "(medians of $ROUNDS rounds of ${SECS}s; ratios against 'none' (Incus NAT only); $N bridges and $N policies, pair design at $PAIR_N bridges)"
