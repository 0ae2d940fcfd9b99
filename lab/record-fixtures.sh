#!/usr/bin/env bash
# Records the Incus JSON the tests parse, from the real daemon of the lab
# (run `lab/lab.sh up` first; hold the lab lock: flock /tmp/anklume-lab.lock).
#
#   lab/record-fixtures.sh        (or: make record-fixtures)
#
# Writes tests/fixtures/incus/:
#   networks.json     incus query /1.0/networks?recursion=1, the lab bridges
#                     and the unmanaged loopback (what discovery must skip)
#   instances.json    incus query /1.0/instances?recursion=2&project=anklume-lab
#   instances-pro-web-also-reports-10.251.10.77.edited.json
#                     instances.json edited by the jq below and nothing else:
#                     pro-web (on lab-net-pro) also lists 10.251.10.77, an
#                     address of lab-net-anklume, as a root inside it can do.
# Keys are sorted (jq -S) so a re-recording diffs cleanly. Read-only on Incus.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=tests/fixtures/incus
PROJECT=anklume-lab
FOREIGN=10.251.10.77
mkdir -p "$OUT"

incus query "/1.0/networks?recursion=1" |
  jq -S '[.[] | select((.name | startswith("lab-net-")) or .name == "lo")] | sort_by(.name)' \
    >"$OUT/networks.json"
incus query "/1.0/instances?recursion=2&project=$PROJECT" |
  jq -S 'sort_by(.name)' >"$OUT/instances.json"
jq -S --arg a "$FOREIGN" '
  map(if .name == "pro-web" then
        .state.network.eth0.addresses += [{"family": "inet", "address": $a,
                                           "netmask": "32", "scope": "global"}]
      else . end)' "$OUT/instances.json" \
  >"$OUT/instances-pro-web-also-reports-$FOREIGN.edited.json"
echo "recorded $(jq length "$OUT/networks.json") networks and $(jq length "$OUT/instances.json") instances in $OUT"
