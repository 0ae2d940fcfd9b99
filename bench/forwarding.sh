#!/usr/bin/env bash
# Forwarding benchmark (DESIGN.md section 6), side by side in one run:
# new-connection rate and small-packet rate through a router namespace that
# holds N domain bridges, with
#   bare    no table at all (no conntrack either),
#   none    only a stand-in for Incus's own NAT table (the masquerade every
#           Incus bridge has, so conntrack runs): "the same host with no
#           isolation ruleset", the baseline of the ratios,
#   sets    our rendered ruleset (N domains, P policies),
#   edges   the same plus every domain with egress settings (one in ten
#           `internet: false`, the others one of EGRESS_LISTS port lists;
#           net-d0's list allows the measured egress flow) and PROTECTED
#           protected networks (default 100, IPv4 and IPv6): issue 9's
#           "per-packet cost stays flat" row,
#   domains the same egress settings without protected networks (which
#           part of the edges costs what),
#   bridge  one drop rule per bridge plus one accept rule per policy,
#   pair    one drop rule per ordered bridge pair (PAIR_N bridges: at N=1000
#           it would be a million rules) plus the same accept rules.
# Two flows are measured, each as new-connection rate (TCP) and small-packet
# rate (64-byte UDP in one direction, so every packet is conntrack-new and
# walks the chain):
#   egress  a domain (net-d0) to the "internet" (an uplink that is not a
#           domain bridge): the traffic that must walk past the isolation;
#   policy  a domain (net-d0) to another domain (net-d1) on ports a port
#           policy opens (tcp 5201, udp 5202): the cross-domain flow that is
#           allowed.
# P policies (default 10 per domain) are spread over distinct domain pairs;
# net-d0 -> net-d1 gets the benchmark's policy on top of a generated one.
#
# Everything lives in four namespaces created here (ankb-a, ankb-b, ankb-c,
# ankb-r; NS_PREFIX changes "ankb") and is removed on exit; traffic stays
# between them. Root is needed.
#
#   bench/forwarding.sh            (or: make bench-forwarding)
#   N=1000 P=10000 PAIR_N=300 SECS=3 ROUNDS=3 bench/forwarding.sh
#   VARIANTS="none sets" SECS=1 ROUNDS=1 bench/forwarding.sh    (a quick look)
#   VARIANTS="none sets edges" bench/forwarding.sh             (issue 9's row)
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-1000}
P=${P:-$((N * 10))}
PAIR_N=${PAIR_N:-300}
PROTECTED=${PROTECTED:-100}
EGRESS_LISTS=${EGRESS_LISTS:-10}
SECS=${SECS:-3}
ROUNDS=${ROUNDS:-3}
read -r -a variants <<<"${VARIANTS:-bare none sets edges bridge pair}"
NS=${NS_PREFIX:-ankb}
NS_A=$NS-a NS_B=$NS-b NS_C=$NS-c NS_R=$NS-r
TABLE=anklume_bench
TMP=$(mktemp -d)
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for ns in "$NS_A" "$NS_B" "$NS_C" "$NS_R"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT

[[ $(id -u) == 0 ]] || { echo "bench/forwarding.sh: run as root (network namespaces)" >&2; exit 1; }
"$(dirname "$0")/../lab/cargo" build --release --quiet --example netload --bin incus_nftables_render
NETLOAD=$PWD/target/release/examples/netload
RENDER=$PWD/target/release/incus_nftables_render

# --- topology ---------------------------------------------------------------
for ns in "$NS_A" "$NS_B" "$NS_C" "$NS_R"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
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
r ip link set net-d1 up
r ip addr add 10.200.1.1/24 dev net-d1
ip link add vc netns "$NS_R" type veth peer name eth0 netns "$NS_C"
r ip link set vc master net-d1 up
ip -n "$NS_C" addr add 10.200.1.2/24 dev eth0
ip -n "$NS_C" link set eth0 up
ip -n "$NS_C" route add default via 10.200.1.1
ip link add upl netns "$NS_R" type veth peer name eth0 netns "$NS_B"
r ip addr add 10.201.0.1/24 dev upl
r ip link set upl up
ip -n "$NS_B" addr add 10.201.0.2/24 dev eth0
ip -n "$NS_B" link set eth0 up
ip -n "$NS_B" route add default via 10.201.0.1
r sysctl -qw net.ipv4.ip_forward=1

# --- rulesets -----------------------------------------------------------------
python3 - "$N" "$P" "$PAIR_N" "$TMP" "$TABLE" "$PROTECTED" "$EGRESS_LISTS" <<'PY'
import json, sys
n, p, pair_n, tmp, table = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
protected, lists = int(sys.argv[6]), int(sys.argv[7])
# Policy i goes from d(i % n) to another domain chosen so that pairs differ;
# two ports each, half TCP half UDP, plus the benchmark's own d0 -> d1 policy.
policies = []
for i in range(p):
    a = i % n
    b = (a + 1 + (i // n) * 7 + i * 13) % n
    if b == a:
        b = (a + 1) % n
    policies.append({"from": f"d{a}", "to": f"d{b}", "protocol": ["tcp", "udp"][i % 2],
                     "ports": [1000 + i % 500, f"{20000 + i % 30000}-{20010 + i % 30000}"]})
policies.append({"description": "the measured flow", "from": "d0", "to": "d1",
                 "protocol": "tcp", "ports": [5201]})
policies.append({"description": "the measured flow", "from": "d0", "to": "d1",
                 "protocol": "udp", "ports": [5202]})
args = {"bridges": [f"net-d{i}" for i in range(n)], "policies": policies,
        "table": table, "output_path": f"{tmp}/sets.nft", "validate": "never"}
json.dump(args, open(f"{tmp}/args.json", "w"))
# Egress settings for every domain: one in ten has no internet, the others
# one of `lists` port lists (DNS, HTTPS and one port of their own list);
# net-d0's list holds the measured flow's ports. Protected networks: private
# ranges that no flow here uses (the uplink is 10.201.0.0/24), IPv4 and IPv6.
def egress(i):
    if i == 0:
        return {"egress": [{"protocol": "udp", "port": 53}, {"protocol": "tcp", "port": 443},
                           {"protocol": "tcp", "port": 5201}, {"protocol": "udp", "port": 5202}]}
    if i % 10 == 0:
        return {"internet": False}
    return {"egress": [{"protocol": "udp", "port": 53}, {"protocol": "tcp", "port": 443},
                       {"protocol": "tcp", "port": 8000 + i % lists}]}
nets = [f"172.{16 + k // 2 // 200}.{k // 2 % 200}.0/24" if k % 2 == 0 else f"fd99:{k:x}::/64"
        for k in range(protected)]
edges = dict(args, output_path=f"{tmp}/edges.nft", protected_networks=nets,
             domains={f"d{i}": egress(i) for i in range(n)})
json.dump(edges, open(f"{tmp}/edges-args.json", "w"))
json.dump(dict(edges, output_path=f"{tmp}/domains.nft", protected_networks=[]),
          open(f"{tmp}/domains-args.json", "w"))
def linear(bridges, drops):
    out = [f"table inet {table} {{}}", f"delete table inet {table}", f"table inet {table} {{",
           "\tchain isolation {", "\t\ttype filter hook forward priority -1; policy accept;",
           "\t\tct state established,related accept", "\t\tct state invalid drop"]
    for p in policies:
        a, b = p["from"][1:], p["to"][1:]
        if int(a) < bridges and int(b) < bridges:
            ports = ", ".join(str(x) for x in p["ports"])
            out.append(f'\t\tiifname "net-d{a}" oifname "net-d{b}" meta l4proto {p["protocol"]} th dport {{ {ports} }} accept')
    out += drops
    out += ["\t}", "}"]
    return "\n".join(out) + "\n"
per_bridge = [f'\t\tiifname "net-d{i}" oifname != "net-d{i}" oifname "net-d*" drop' for i in range(n)]
open(f"{tmp}/bridge.nft", "w").write(linear(n, per_bridge))
per_pair = [f'\t\tiifname "net-d{a}" oifname "net-d{b}" drop'
            for a in range(pair_n) for b in range(pair_n) if a != b]
open(f"{tmp}/pair.nft", "w").write(linear(pair_n, per_pair))
PY
for args in args edges-args domains-args; do
  "$RENDER" "$TMP/$args.json" | grep -q '"failed":false' || { echo "render of $args failed" >&2; exit 1; }
done

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

flow() {  # flow <server ns> <server addr>: "conn_per_s udp_rx_pps"
  local conn recv
  ip netns exec "$1" "$NETLOAD" tcp-serve 5201 $((SECS + 2)) & PIDS+=($!)
  sleep 0.3
  conn=$(ip netns exec "$NS_A" "$NETLOAD" tcp-connect "$2:5201" "$SECS" | cut -d' ' -f1)
  wait "${PIDS[-1]}" || true
  ip netns exec "$1" "$NETLOAD" udp-count 5202 $((SECS + 1)) >"$TMP/recv" & PIDS+=($!)
  sleep 0.3
  ip netns exec "$NS_A" "$NETLOAD" udp-send "$2:5202" "$SECS" 64 >/dev/null
  wait "${PIDS[-1]}" || true
  recv=$(<"$TMP/recv")
  echo "$conn $((recv / SECS))"
}

measure() {  # measure <variant>: "load_ms egress_conn egress_pps policy_conn policy_pps"
  local load_ms
  load_ms=$(load "$1")
  echo "$load_ms $(flow "$NS_B" 10.201.0.2) $(flow "$NS_C" 10.200.1.2)"
}

declare -A results
for round in $(seq 1 "$ROUNDS"); do
  for v in "${variants[@]}"; do
    line=$(measure "$v")
    echo "round $round $v: load_ms egress_conn/s egress_udp_pps policy_conn/s policy_udp_pps = $line" >&2
    results[$v]+="$line"$'\n'
  done
done
load bare >/dev/null

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }
col() { printf '%s' "${results[$1]}" | awk -v c="$2" '{print $c}' | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "-"}'; }
printf '\n%-8s %8s | %-28s | %-28s\n' "" "" "egress (domain -> uplink)" "policy (domain -> domain, allowed)"
printf '%-8s %8s | %7s %8s %5s %5s | %7s %8s %5s %5s\n' design load_ms conn/s udp_pps xconn xpps conn/s udp_pps xconn xpps
for v in "${variants[@]}"; do
  l=$(col "$v" 1)
  out=""
  for c in 2 4; do
    conn=$(col "$v" "$c") pps=$(col "$v" $((c + 1)))
    base_conn=$(col none "$c") base_pps=$(col none $((c + 1)))
    out+=$(printf ' | %7s %8s %5s %5s' "$conn" "$pps" "$(ratio "$conn" "$base_conn")" "$(ratio "$pps" "$base_pps")")
  done
  printf '%-8s %8s%s\n' "$v" "$l" "$out"
done
# The machine's load drifts between rounds: each round's ratio against the
# `none` of the same round (measured seconds apart) says more than the
# ratio of medians above.
raw() { printf '%s' "${results[$1]}" | awk -v c="$2" '{print $c}'; }
paired() { paste <(raw "$1" "$2") <(raw none "$2") | awk '{printf "%.2f\n", ($2 > 0 ? $1 / $2 : 0)}'; }
printf '\nper-round ratios against the same round'"'"'s none (median in brackets)\n'
printf '%-8s | %-22s | %-22s | %-22s | %-22s\n' design "egress conn" "egress pps" "policy conn" "policy pps"
for v in "${variants[@]}"; do
  [[ $v == none ]] && continue
  out=""
  for c in 2 3 4 5; do
    out+=$(printf ' | %-22s' "$(paired "$v" "$c" | paste -sd' ') [$(paired "$v" "$c" | median)]")
  done
  printf '%-8s%s\n' "$v" "$out"
done
echo "(medians of $ROUNDS rounds of ${SECS}s; x = ratio against 'none' (Incus NAT only); $N bridges and $P policies, pair design at $PAIR_N bridges; edges: $PROTECTED protected networks, every domain with egress settings)"
