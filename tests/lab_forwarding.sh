#!/usr/bin/env bash
# lab.sh records the global forwarding switches at `up` and puts them back at
# `down`. Checked on the real sysctls of a throwaway network namespace
# (`unshare --net`: /proc/sys/net is per namespace), never the host's.
#
#   tests/lab_forwarding.sh      (root; part of make test)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) == 0 ]] || { echo "tests/lab_forwarding.sh: run as root" >&2; exit 1; }

if [[ ${1:-} != --inside ]]; then
  exec unshare --net -- "$0" --inside
fi

# From here on, in a fresh network namespace (refuse to go on otherwise:
# the checks below write the forwarding sysctls).
if [[ $(readlink /proc/self/ns/net) == "$(readlink /proc/1/ns/net)" ]]; then
  echo "tests/lab_forwarding.sh: still in the host's network namespace" >&2
  exit 1
fi
# shellcheck source=lab/lab.sh
source lab/lab.sh
tmp=$(mktemp -d /tmp/ank-forwarding.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
FORWARDING_SAVED=$tmp/forwarding.saved
v4=/proc/sys/net/ipv4/ip_forward v6=/proc/sys/net/ipv6/conf/all/forwarding
passed=0 failed=0
expect() {  # expect <description> <want v4> <want v6>
  local got
  got="$(<"$v4") $(<"$v6")"
  if [[ $got == "$2 $3" ]]; then
    printf 'ok       %s (%s)\n' "$1" "$got"; passed=$((passed + 1))
  else
    printf 'FAILED   %s: forwarding is %s, want %s %s\n' "$1" "$got" "$2" "$3"; failed=$((failed + 1))
  fi
}
set_both() { echo "$1" >"$v4"; echo "$1" >"$v6"; }

set_both 0
save_forwarding
set_both 1                     # what up (and Incus) do
save_forwarding                # a second up must not record the lab's own values
expect "the lab turned forwarding on" 1 1
restore_forwarding ""
expect "down restores what the first up found" 0 0
if [[ ! -e $FORWARDING_SAVED ]]; then
  echo "ok       the record is gone"; passed=$((passed + 1))
else
  echo "FAILED   the record is still there"; failed=$((failed + 1))
fi

set_both 1                     # no record: down leaves forwarding alone
restore_forwarding ""
expect "without a record, down changes nothing" 1 1

set_both 0
save_forwarding
set_both 1
restore_forwarding "Incus networks incusbr0" 2>"$tmp/log"
expect "other Incus networks remain: forwarding stays on" 1 1
if grep -q 'keeping forwarding on: Incus networks incusbr0' "$tmp/log"; then
  echo "ok       down says why it keeps forwarding"; passed=$((passed + 1))
else
  echo "FAILED   down did not say why: $(<"$tmp/log")"; failed=$((failed + 1))
fi

echo "forwarding: $passed passed, $failed failed"
((failed == 0))
