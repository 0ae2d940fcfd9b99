#!/usr/bin/env bash
# The Rust toolchain choice (lab/rust.sh, lab/cargo) as a Debian 12 machine
# without Rust sees it: every check runs with a PATH that holds only the
# system directories, so a rustup install in ~/.cargo/bin is out of sight.
#
#   tests/toolchain.sh           choice checks, a few seconds (installs
#                                Debian's rustc-web/cargo-web when missing)
#   tests/toolchain.sh --build   also the static release build of the
#                                modules with Debian's toolchain alone, and
#                                one run of the built module (~2 min)
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
DEBIAN_DIR=/usr/bin
TARGET=x86_64-unknown-linux-gnu
BUILD_DIR=target/debian-toolchain

tmp=$(mktemp -d /tmp/ank-toolchain.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
passed=0 failed=0
ok() { printf 'ok       %s\n' "$*"; passed=$((passed + 1)); }
bad() { printf 'FAILED   %s\n' "$*"; failed=$((failed + 1)); }
check() {  # check <description> <command...>
  local what=$1
  shift
  if "$@"; then ok "$what"; else bad "$what"; fi
}
hidden() { env PATH="$SYSTEM_PATH" "$@"; }

# A fake toolchain: rustc and cargo answering --version with <version>;
# `cargo fmt` always works, `cargo clippy` only when <clippy> is yes.
fake_toolchain() {  # fake_toolchain <dir> <version> <clippy: yes|no>
  mkdir -p "$1"
  printf '#!/bin/sh\necho "rustc %s (fake)"\n' "$2" >"$1/rustc"
  cat >"$1/cargo" <<EOF
#!/bin/sh
case "\$1" in
  --version) echo "cargo $2 (fake)" ;;
  fmt) echo "rustfmt $2" ;;
  clippy) [ "$3" = yes ] && echo "clippy $2" || { echo "no such command: clippy" >&2; exit 101; } ;;
  *) echo "fake cargo $2: \$*"; exit 0 ;;
esac
EOF
  chmod 0755 "$1/rustc" "$1/cargo"
}
fake_toolchain "$tmp/old" 1.63.0 yes
fake_toolchain "$tmp/noclippy" 1.85.0 no
fake_toolchain "$tmp/good" 1.85.0 yes
mkdir -p "$tmp/empty"

# Nothing else on the system PATH may provide cargo (a Rust installed into
# /usr/local/bin, say), or this is not the "no Rust but Debian's" view the
# checks claim: leave such directories out.
path=
for d in ${SYSTEM_PATH//:/ }; do
  if [[ -x $d/cargo && ! $d -ef $DEBIAN_DIR ]]; then
    echo "toolchain: leaving $d out of PATH (it has a cargo)" >&2
    continue
  fi
  path=${path:+$path:}$d
done
SYSTEM_PATH=$path

# 1. The install step: with no toolchain in sight but Debian's (installed
#    here when missing), it settles on Debian's.
check "lab/rust.sh install (developer toolchain hidden)" hidden lab/rust.sh install
check "lab/rust.sh dir is $DEBIAN_DIR" test "$(hidden lab/rust.sh dir)" = "$DEBIAN_DIR"

# 2. cargo and its subcommands all come from Debian's packages, even with a
#    rustup cargo-clippy/cargo-fmt in ~/.cargo/bin (cargo looks there first
#    unless it is on PATH).
want=$(env PATH="$DEBIAN_DIR" "$DEBIAN_DIR/cargo" --version)
check "lab/cargo --version is Debian's ($want)" test "$(hidden lab/cargo --version)" = "$want"
want=$(env PATH="$DEBIAN_DIR" "$DEBIAN_DIR/cargo-clippy" --version)
check "lab/cargo clippy is Debian's ($want)" test "$(hidden lab/cargo clippy --version)" = "$want"
want=$(env PATH="$DEBIAN_DIR" "$DEBIAN_DIR/rustfmt" --version)
check "lab/cargo fmt is Debian's ($want)" test "$(hidden lab/cargo fmt --version)" = "$want"

# 3. A cargo on PATH that is too old or lacks clippy is passed over...
check "rustc 1.63 on PATH is passed over for Debian's" \
  test "$(env PATH="$tmp/old:$SYSTEM_PATH" lab/rust.sh dir 2>/dev/null)" = "$DEBIAN_DIR"
check "a toolchain without clippy is passed over" \
  test "$(env PATH="$tmp/noclippy:$SYSTEM_PATH" lab/rust.sh dir 2>/dev/null)" = "$DEBIAN_DIR"
# ...while a good one on PATH wins (so the two above failed for the reason
# they name, not because PATH is never looked at).
check "a good toolchain on PATH is used first" \
  test "$(env PATH="$tmp/good:$SYSTEM_PATH" lab/rust.sh dir)" = "$tmp/good"

# 4. With nothing usable, lab/cargo refuses and says what to run.
if out=$(env PATH="$tmp/old:$SYSTEM_PATH" ANKLUME_SYSTEM_RUST_DIR="$tmp/empty" lab/cargo build 2>&1); then
  bad "no usable toolchain: lab/cargo should fail (it printed: $out)"
elif [[ $out == *"make deps"* ]]; then
  ok "no usable toolchain: lab/cargo fails and says to run make deps"
else
  bad "no usable toolchain: lab/cargo failed without naming make deps: $out"
fi

# 5. Optional: build the static modules with Debian's toolchain alone, and
#    run one (an unknown option must come back as Ansible's failed JSON).
if [[ ${1:-} == --build ]]; then
  t0=$SECONDS
  if hidden env CARGO_TARGET_DIR="$BUILD_DIR" RUSTFLAGS='-C target-feature=+crt-static' \
      lab/cargo build --release --locked --target "$TARGET" --bins; then
    ok "static release build with Debian's toolchain ($((SECONDS - t0)) s)"
    bin=$BUILD_DIR/$TARGET/release/incus_nftables_render
    printf '{"no_such_option": 1}\n' >"$tmp/args.json"
    check "the built module is static" sh -c "ldd '$bin' 2>&1 | grep -q 'not a dynamic\|statically linked'"
    out=$("$bin" "$tmp/args.json" || true)
    check "the built module answers (unknown option refused)" \
      sh -c "printf '%s' '$out' | grep -q '\"failed\":true.*valid options'"
  else
    bad "static release build with Debian's toolchain"
  fi
fi

echo "toolchain: $passed passed, $failed failed"
((failed == 0))
