#!/usr/bin/env bash
# The Rust toolchain that builds anklume-isolation.
#
#   lab/rust.sh install      make sure a usable toolchain exists: when none
#                            is, install Debian 12's current one (rustc-web,
#                            cargo-web, rustfmt-web, rust-web-clippy from
#                            bookworm-security) and a C linker
#   lab/rust.sh dir          print the directory of the toolchain in use
#                            (exit 1 when there is none)
#   lab/rust.sh cargo ARGS   run that toolchain's cargo (lab/cargo is this)
#
# Usable: cargo and rustc in one directory, rustc at least the crate's
# rust-version (Cargo.toml), and `cargo fmt` / `cargo clippy` working (make
# lint runs both). Candidates, first usable wins: the `cargo` on PATH (a
# rustup install in ~/.cargo/bin, say), then Debian's in /usr/bin. Debian 12's
# own `rustc` (1.63) is too old; its `-web` packages carry a current one.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Where Debian's packages put the toolchain (a test points it elsewhere).
SYSTEM_DIR=${ANKLUME_SYSTEM_RUST_DIR:-/usr/bin}
# cargo fetches crates over HTTPS: without ca-certificates (not pulled in by
# cargo-web with --no-install-recommends) every download fails.
DEBIAN_RUST_PACKAGES=(rustc-web cargo-web rustfmt-web rust-web-clippy gcc libc6-dev ca-certificates)

log() { printf 'rust: %s\n' "$*" >&2; }
die() { printf 'rust: ERROR: %s\n' "$*" >&2; exit 1; }

# The crate's rust-version, e.g. "1.80".
required_version() {
  local v
  v=$(sed -n 's/^rust-version *= *"\([0-9][0-9.]*\)".*/\1/p' "$ROOT/Cargo.toml")
  [[ -n $v ]] || die "no rust-version in $ROOT/Cargo.toml"
  printf '%s' "$v"
}

# version_at_least <have> <want>: compares major.minor (patch ignored).
version_at_least() {
  local have_major have_minor want_major want_minor rest
  IFS=. read -r have_major have_minor rest <<<"$1"
  IFS=. read -r want_major want_minor rest <<<"$2"
  ((have_major > want_major || (have_major == want_major && have_minor >= ${want_minor:-0})))
}

# cargo runs subcommands (cargo-fmt, cargo-clippy) from $CARGO_HOME/bin before
# anything on PATH unless that directory is on PATH itself, so a rustup
# install there would shadow the chosen toolchain's fmt and clippy. Put it on
# PATH, last: then the chosen directory wins.
path_for() {  # path_for <dir>: PATH that runs <dir>'s toolchain
  local home=${HOME:-}
  [[ -n $home ]] || home=$(getent passwd "$(id -u)" | cut -d: -f6)
  printf '%s:%s:%s/bin' "$1" "$PATH" "${CARGO_HOME:-$home/.cargo}"
}

# usable <dir>: 0 when <dir> holds a toolchain that can build, format and lint
# the crate. Its rustc, rustfmt and clippy must come from the same place as
# cargo, so <dir> goes first on PATH while it is asked.
usable() {
  local dir=$1 out have
  [[ -x $dir/cargo && -x $dir/rustc ]] || return 1
  out=$(PATH=$(path_for "$dir") "$dir/rustc" --version 2>/dev/null) || return 1
  [[ $out =~ ^rustc\ ([0-9]+\.[0-9]+) ]] || return 1
  have=${BASH_REMATCH[1]}
  if ! version_at_least "$have" "$(required_version)"; then
    log "$dir/rustc is $have, the crate needs $(required_version): not using it"
    return 1
  fi
  PATH=$(path_for "$dir") "$dir/cargo" fmt --version >/dev/null 2>&1 || {
    log "$dir: no cargo fmt: not using it"
    return 1
  }
  PATH=$(path_for "$dir") "$dir/cargo" clippy --version >/dev/null 2>&1 || {
    log "$dir: no cargo clippy: not using it"
    return 1
  }
}

candidates() {
  local c
  if c=$(command -v cargo 2>/dev/null); then dirname "$c"; fi
  printf '%s\n' "$SYSTEM_DIR"
}

toolchain_dir() {
  local d
  while read -r d; do
    if usable "$d"; then
      printf '%s\n' "$d"
      return 0
    fi
  done < <(candidates | awk '!seen[$0]++')
  return 1
}

install_debian_toolchain() {
  command -v apt-get >/dev/null || die "no usable Rust toolchain and no apt-get: install Rust >= $(required_version) with cargo fmt and clippy"
  [[ $(id -u) == 0 ]] || die "no usable Rust toolchain: run as root to install Debian's (${DEBIAN_RUST_PACKAGES[*]})"
  log "installing Debian's current Rust toolchain: ${DEBIAN_RUST_PACKAGES[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # The -web packages' current version is in bookworm-security: refresh the
  # lists so the candidate is that one (bookworm's own is older).
  apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null
  apt-get -y -q -o DPkg::Lock::Timeout=600 install --no-install-recommends \
    "${DEBIAN_RUST_PACKAGES[@]}" >/dev/null
}

cmd_install() {
  local d
  if d=$(toolchain_dir); then
    log "using $d ($("$d/rustc" --version))"
    return 0
  fi
  install_debian_toolchain
  d=$(toolchain_dir) ||
    die "installed ${DEBIAN_RUST_PACKAGES[*]} but $SYSTEM_DIR still has no usable toolchain (rust-version $(required_version))"
  log "using $d ($("$d/rustc" --version))"
}

cmd_cargo() {
  local d
  d=$(toolchain_dir) ||
    die "no Rust toolchain >= $(required_version) with cargo fmt and clippy: run 'make deps' (or lab/rust.sh install)"
  PATH=$(path_for "$d") exec "$d/cargo" "$@"
}

case ${1:-} in
  install) cmd_install ;;
  dir) toolchain_dir ;;
  cargo) shift; cmd_cargo "$@" ;;
  *) echo "usage: $0 install|dir|cargo ARGS..." >&2; exit 2 ;;
esac
