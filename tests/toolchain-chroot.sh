#!/usr/bin/env bash
# A clean Debian 12 without Rust (debootstrap minbase, in a chroot): the
# toolchain step of `make deps` (lab/rust.sh install) installs Debian's
# rustc-web/cargo-web, then `make build` and the Rust half of `make lint`
# run with it. Slow (debootstrap, apt, a release build: ~5 min) and needs
# Debian's mirror and crates.io, so it is not part of `make test`:
#
#   tests/toolchain-chroot.sh        (or: make test-toolchain-chroot)
#
# Root. Everything lives under one mktemp directory, unmounted and removed
# on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

MIRROR=http://deb.debian.org/debian
SECURITY=http://deb.debian.org/debian-security
[[ $(id -u) == 0 ]] || { echo "tests/toolchain-chroot.sh: run as root (chroot)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "debootstrap missing: make deps" >&2; exit 1; }

work=$(mktemp -d /tmp/ank-toolchain-chroot.XXXXXX)
root=$work/root
cleanup() {
  local m
  for m in dev/pts dev proc; do
    if mountpoint -q "$root/$m"; then umount -l "$root/$m"; fi
  done
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
step() { printf '\n== %s (%s s)\n' "$*" "$SECONDS"; }

step "debootstrap bookworm minbase"
debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 ||
  { tail -20 "$work/debootstrap.log"; exit 1; }
# A stock Debian 12 install has the security suite (where the current
# rustc-web is) in its sources; debootstrap only writes the main one.
cat >"$root/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY bookworm-security main
EOF
cp /etc/resolv.conf "$root/etc/resolv.conf"
# The host's own certificate authorities (an HTTPS proxy's, say): the chroot
# shares the host's network, so it needs the host's trust to reach crates.io.
# ca-certificates (installed with the toolchain) folds them into its bundle.
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"

step "copy the repository (tracked files)"
mkdir -p "$root/src/anklume-isolation"
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$root/src/anklume-isolation"
in_root() {
  chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    /bin/bash -euo pipefail -c "cd /src/anklume-isolation && $1"
}

step "no Rust in the chroot"
in_root '! command -v cargo && ! command -v rustc && ! test -e /root/.cargo'

step "apt-get update, make"
in_root 'apt-get -q update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get -y -q install --no-install-recommends make >/dev/null'

step "lab/rust.sh install (the toolchain step of make deps)"
in_root 'lab/rust.sh install && lab/rust.sh dir && cargo --version && rustc --version'

step "make build (static modules with Debian's toolchain)"
in_root 'make build'
in_root 'ldd library/incus_nftables_render 2>&1 | grep -q "not a dynamic\|statically linked"'
# A module exits 1 with its failed JSON: an unknown option names the valid ones.
in_root 'printf "{\"x\":1}\n" >/tmp/args; { library/incus_nftables_render /tmp/args || true; } | grep "valid options"'

step "fmt and clippy (the Rust half of make lint)"
in_root 'lab/cargo fmt --all -- --check && lab/cargo clippy --locked --all-targets -- -D warnings'

step "done"
echo "toolchain-chroot: 1 passed, 0 failed"
