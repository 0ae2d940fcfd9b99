#!/usr/bin/env bash
# anklume-isolation test lab: Incus bridges, instances and an "internet"
# namespace on this host, all under lab names.
#
#   lab/lab.sh up       install what is missing, start incusd, build the lab
#   lab/lab.sh down     remove every lab object (keeps incusd, packages, caches, venv)
#   lab/lab.sh status   print the lab objects and instance addresses
#   lab/lab.sh firewall create and start the firewall instance (vm mode)
#
# Safety: only objects with lab names are touched (project/pool anklume-lab,
# bridges lab-net-*, namespace anklume-lab-up, veth lab-up-host, nft table
# inet anklume_lab). No `nft flush ruleset`, no traffic outside the lab.
set -euo pipefail

# ---------------------------------------------------------------- lab data --
# One domain per line: <domain>:<third octet>. Bridge lab-net-<domain>,
# gateway 10.251.<n>.1/24 and fd42:251:<n>::1/64.
LAB_DOMAINS=(
  anklume:10
  pro:11
  perso:12
)
# One instance per line: <name>:<image alias>:<domain>:<host part of IPv4>.
LAB_INSTANCES=(
  anklume-instance:lab-debian:anklume:10
  anklume-probe:lab-busybox:anklume:11
  pro-dev:lab-busybox:pro:10
  pro-web:lab-busybox:pro:11
  perso-desk:lab-busybox:perso:10
)
# TCP ports served by busybox httpd and UDP echo ports inside every instance.
LAB_HTTP_PORTS=(80 8080 8081 9000 9010 9011)
LAB_UDP_PORTS=(5353 5354)

LAB_PROJECT=anklume-lab
LAB_POOL=anklume-lab
LAB_NET_PREFIX=lab-net-
LAB_NFT_TABLE=anklume_lab
LAB_NFT_DEST=/etc/nftables.d/anklume-lab-isolation.nft
ADMIN_INSTANCE=anklume-instance
# Firewall VM mode: a Debian container stands in for the firewall VM. Its
# NICs come from the multi-NIC profile (incus_firewall_vm_profile); the host
# steers inter-domain traffic to it (firewall_vm_routing: nft table, policy
# routing rules at priority 3253, tables 0x4100 and up).
FIREWALL_INSTANCE=anklume-firewall
FIREWALL_IMAGE=lab-debian
ROUTE_NFT_TABLE=anklume_lab_route
ROUTE_RULE_PREF=3253
ROUTE_TABLE_FIRST=16640   # 0x4100
ROUTE_TABLE_COUNT=64

UP_NS=anklume-lab-up
UP_VETH=lab-up-host
UP_HOST4=198.51.100.1/24
UP_HOST6=2001:db8:251::1/64
UP_NS4=198.51.100.2/24
UP_NS6=2001:db8:251::2/64
UP_GW4=198.51.100.1
UP_GW6=2001:db8:251::1

DEBIAN_MIRROR=http://deb.debian.org/debian
DEBIAN_SUITE=bookworm
DEBOOTSTRAP_INCLUDE=nftables,iproute2,busybox-static,ca-certificates,socat

CACHE_DIR=/var/cache/anklume-lab
RUN_DIR=/run/anklume-lab
VENV=${ANKLUME_VENV:-/opt/anklume-lab/venv}
INCUSD=/usr/libexec/incus/incusd
INCUSD_PIDFILE=$RUN_DIR/incusd.pid
UP_HTTPD_PIDFILE=$RUN_DIR/upstream-httpd.pid
UP_UDP_PIDFILE=$RUN_DIR/upstream-udp.pid
# Global forwarding switches the lab turns on (and Incus, for its bridges):
# `up` records the values it found, `down` puts them back.
FORWARDING_SYSCTLS=(/proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv6/conf/all/forwarding)
FORWARDING_SAVED=$RUN_DIR/forwarding.saved
LAB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
READY_TIMEOUT=${LAB_READY_TIMEOUT:-60}

APT_PACKAGES=(nftables conntrack debootstrap busybox-static iproute2 jq socat python3-venv
  python3-pip make dnsmasq-base ca-certificates shellcheck)
INCUS_PACKAGES=(incus incus-client)

SYS_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH="$SYS_PATH:$PATH"

# ----------------------------------------------------------------- helpers --
log() { printf 'lab: %s\n' "$*" >&2; }
die() { printf 'lab: ERROR: %s\n' "$*" >&2; exit 1; }

# Run a command, show its output only when it fails.
quiet() {
  local out rc=0
  out=$("$@" 2>&1) || rc=$?
  if ((rc != 0)); then
    printf 'lab: command failed (%d): %s\n%s\n' "$rc" "$*" "$out" >&2
    return "$rc"
  fi
}

iq() { incus query "$@"; }                       # REST call, JSON on stdout
iexists() { incus query "$1" >/dev/null 2>&1; }  # 0 when the object exists
pq() { printf '%s' "$1?project=$LAB_PROJECT"; }  # project-scoped URL

pid_alive() {  # pid_alive <pidfile> <substring of cmdline>
  local pid
  [[ -r $1 ]] || return 1
  pid=$(<"$1")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$2"
}

kill_pidfile() {  # kill_pidfile <pidfile> <cmdline substring>
  local pid
  if pid_alive "$1" "$2"; then
    pid=$(<"$1")
    kill "$pid" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      [[ -d /proc/$pid ]] || break
      sleep 0.2
    done
    if [[ -d /proc/$pid ]]; then kill -9 "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$1"
}

# Start a daemon in its own session with no inherited descriptors (the lock,
# a caller's pipes), record its PID. Without job control setsid, env and
# `ip netns exec` all exec in place, so $! is the daemon's own PID.
spawn_detached() {  # spawn_detached <pidfile> <command...>
  local pidfile=$1
  shift
  (
    for fd in /proc/"$BASHPID"/fd/*; do
      fd=${fd##*/}
      if [[ $fd =~ ^[0-9]+$ ]] && ((fd > 2)); then eval "exec $fd>&-"; fi
    done
    exec setsid "$@" </dev/null >/dev/null 2>&1
  ) &
  printf '%s\n' "$!" >"$pidfile"
}

dom_octet() {  # dom_octet <domain> -> third octet
  local e
  for e in "${LAB_DOMAINS[@]}"; do
    [[ ${e%%:*} == "$1" ]] && { printf '%s' "${e#*:}"; return 0; }
  done
  die "unknown lab domain '$1'"
}

systemd_pid1() { [[ -d /run/systemd/system ]]; }

# --------------------------------------------------------------- install --
apt_missing() {  # print the packages of "$@" that are not installed
  local p st
  for p in "$@"; do
    st=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
    [[ $st == ii* ]] || printf '%s\n' "$p"
  done
}

ensure_backports_source() {
  local f=/etc/apt/sources.list.d/bookworm-backports.sources
  if grep -rqs --include='*.list' --include='*.sources' -e 'bookworm-backports' \
      /etc/apt/sources.list /etc/apt/sources.list.d/; then
    return 0
  fi
  log "adding the bookworm-backports apt source ($f)"
  cat >"$f" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
}

step_install() {
  local -a miss_incus miss_other
  mapfile -t miss_incus < <(apt_missing "${INCUS_PACKAGES[@]}")
  mapfile -t miss_other < <(apt_missing "${APT_PACKAGES[@]}")
  if ((${#miss_incus[@]} + ${#miss_other[@]} > 0)); then
    log "installing packages: ${miss_incus[*]} ${miss_other[*]}"
    command -v apt-get >/dev/null || die "apt-get not found: this lab expects Debian 12"
    export DEBIAN_FRONTEND=noninteractive
    local -a apt=(apt-get -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    ((${#miss_incus[@]} == 0)) || ensure_backports_source
    quiet apt-get -q update
    if ((${#miss_other[@]} > 0)); then
      quiet "${apt[@]}" install --no-install-recommends "${miss_other[@]}"
    fi
    if ((${#miss_incus[@]} > 0)); then
      quiet "${apt[@]}" install -t bookworm-backports "${miss_incus[@]}"
    fi
  fi
  [[ -x $INCUSD ]] || die "$INCUSD missing after install"
  if ldd /bin/busybox >/dev/null 2>&1; then
    die "/bin/busybox is dynamically linked: install busybox-static"
  fi
  step_venv
  # Rust >= the crate's rust-version, with fmt and clippy (Debian's -web
  # packages when none is there).
  "$LAB_DIR/rust.sh" install
}

step_venv() {
  local req=$LAB_DIR/requirements.txt stamp=$VENV/.anklume-lab-requirements.sha256 want
  [[ -r $req ]] || die "missing $req"
  want=$(sha256sum <"$req" | cut -d' ' -f1)
  if [[ -x $VENV/bin/python && -r $stamp && $(<"$stamp") == "$want" ]]; then
    return 0
  fi
  log "python venv $VENV: installing $(grep -cv '^\s*\(#\|$\)' "$req") pinned packages"
  [[ -x $VENV/bin/python ]] || quiet /usr/bin/python3 -m venv "$VENV"
  quiet "$VENV/bin/pip" install -q --disable-pip-version-check -r "$req"
  quiet "$VENV/bin/pip" check --disable-pip-version-check
  printf '%s\n' "$want" >"$stamp"
}

# ---------------------------------------------------------------- daemon --
step_daemon() {
  if timeout 10 incus info >/dev/null 2>&1; then
    return 0
  fi
  if systemd_pid1; then
    log "starting incus (systemctl)"
    systemctl start incus.socket incus.service
  else
    mkdir -p /var/log/incus "$RUN_DIR"
    if pid_alive "$INCUSD_PIDFILE" incusd; then
      log "incusd (pid $(<"$INCUSD_PIDFILE")) not answering yet, waiting"
    else
      log "starting incusd"
      spawn_detached "$INCUSD_PIDFILE" env PATH="$SYS_PATH" "$INCUSD" --group incus-admin \
        --logfile /var/log/incus/incusd.log
    fi
  fi
  incus admin waitready --timeout=120 || die "incusd did not become ready (see /var/log/incus/incusd.log)"
}

# ------------------------------------------------------------ pool/project --
step_pool() {
  local drv
  if iexists "/1.0/storage-pools/$LAB_POOL"; then
    drv=$(iq "/1.0/storage-pools/$LAB_POOL" | jq -r .driver)
    [[ $drv == dir ]] || die "storage pool $LAB_POOL exists with driver $drv (want dir): run 'lab/lab.sh down'"
  else
    log "creating storage pool $LAB_POOL (dir)"
    quiet incus storage create "$LAB_POOL" dir
  fi
}

step_project() {
  local -A want=([features.images]=true [features.profiles]=true
    [features.storage.volumes]=true [features.networks]=false)
  local k cur json
  if ! iexists "/1.0/projects/$LAB_PROJECT"; then
    log "creating project $LAB_PROJECT"
    local -a args=()
    for k in "${!want[@]}"; do args+=(-c "$k=${want[$k]}"); done
    quiet incus project create "$LAB_PROJECT" "${args[@]}"
  fi
  json=$(iq "/1.0/projects/$LAB_PROJECT")
  for k in "${!want[@]}"; do
    cur=$(jq -r --arg k "$k" '.config[$k] // ""' <<<"$json")
    if [[ $cur != "${want[$k]}" ]]; then
      log "project $LAB_PROJECT: $k=${want[$k]}"
      quiet incus project set "$LAB_PROJECT" "$k=${want[$k]}"
    fi
  done
  # default profile: root disk on the lab pool, no NIC.
  json=$(iq "$(pq /1.0/profiles/default)")
  if [[ $(jq -r '.devices.root.pool // ""' <<<"$json") != "$LAB_POOL" ]]; then
    if jq -e '.devices.root' <<<"$json" >/dev/null; then
      quiet incus profile device remove --project "$LAB_PROJECT" default root
    fi
    quiet incus profile device add --project "$LAB_PROJECT" default root disk path=/ pool="$LAB_POOL"
  fi
  for k in $(jq -r '.devices | to_entries[] | select(.value.type=="nic") | .key' <<<"$json"); do
    log "profile default: removing NIC device $k"
    quiet incus profile device remove --project "$LAB_PROJECT" default "$k"
  done
}

# --------------------------------------------------------------- networks --
step_networks() {
  local e dom n name json k cur
  for e in "${LAB_DOMAINS[@]}"; do
    dom=${e%%:*} n=${e#*:} name=$LAB_NET_PREFIX$dom
    local -A want=([ipv4.address]="10.251.$n.1/24" [ipv6.address]="fd42:251:$n::1/64"
      [ipv4.nat]=true [ipv6.nat]=true)
    if ! iexists "/1.0/networks/$name"; then
      log "creating bridge $name"
      local -a args=()
      for k in "${!want[@]}"; do args+=("$k=${want[$k]}"); done
      quiet incus network create "$name" --type=bridge "${args[@]}"
    fi
    json=$(iq "/1.0/networks/$name")
    [[ $(jq -r '"\(.managed) \(.type)"' <<<"$json") == "true bridge" ]] ||
      die "$name exists but is not a managed bridge"
    for k in "${!want[@]}"; do
      cur=$(jq -r --arg k "$k" '.config[$k] // ""' <<<"$json")
      if [[ $cur != "${want[$k]}" ]]; then
        log "bridge $name: $k=${want[$k]}"
        quiet incus network set "$name" "$k=${want[$k]}"
      fi
    done
    unset want
  done
}

# ----------------------------------------------------------------- images --
# Everything below that ends up in an image is part of its "recipe": the
# recipe hash (over these function bodies and the package versions) names
# the cache entry and is stored as the image property lab_recipe, so editing
# the recipe rebuilds the image and recreates the lab instances made from it.

# Files shared by both images: busybox init + lab rc + udhcpc hook.
write_lab_overlay() {
  local root=$1 p
  mkdir -p "$root/etc/lab" "$root/srv/www" "$root/var/lib/incus" "$root/root" "$root/tmp" "$root/run"
  chmod 1777 "$root/tmp"
  {
    echo '# anklume lab: busybox init'
    echo '::sysinit:/etc/lab/rc'
    echo '::respawn:/etc/lab/svc dhcp'
    for p in "${LAB_HTTP_PORTS[@]}"; do
      echo "::respawn:/bin/busybox httpd -f -p $p -h /srv/www"
    done
    for p in "${LAB_UDP_PORTS[@]}"; do
      echo "::respawn:/etc/lab/svc udp $p"
    done
    echo '::shutdown:/bin/busybox sync'
  } >"$root/etc/inittab"

  cat >"$root/etc/lab/rc" <<'EOF'
#!/bin/sh
# anklume lab rc: run once at boot by busybox init (sysinit).
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mkdir -p /srv/www /run /tmp /var/lib/incus
host=$(cat /proc/sys/kernel/hostname)
echo "$host" >/srv/www/index.html
for f in /proc/sys/net/ipv6/conf/default /proc/sys/net/ipv6/conf/eth0; do
  [ -d "$f" ] || continue
  echo 0 >"$f/disable_ipv6" 2>/dev/null
  echo 2 >"$f/accept_ra" 2>/dev/null
  echo 1 >"$f/autoconf" 2>/dev/null
done
# Ignore ICMP redirects: with br_netfilter the host (kernel 6.18 seen) sends
# bogus IPv6 redirects ("<other bridge's address> is on-link") for routed
# cross-bridge replies; accepting them black-holes that peer for minutes.
for f in /proc/sys/net/ipv6/conf/all /proc/sys/net/ipv6/conf/default \
    /proc/sys/net/ipv6/conf/eth0 /proc/sys/net/ipv4/conf/all \
    /proc/sys/net/ipv4/conf/default /proc/sys/net/ipv4/conf/eth0; do
  [ -w "$f/accept_redirects" ] && echo 0 >"$f/accept_redirects"
done
ip link set lo up
ip link set eth0 up
exit 0
EOF

  cat >"$root/etc/lab/svc" <<'EOF'
#!/bin/sh
# anklume lab services, respawned by busybox init.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
case "$1" in
  dhcp)
    exec /bin/busybox udhcpc -f -i eth0 -T 1 -t 5 -A 3 \
      -x "hostname:$(cat /proc/sys/kernel/hostname)" -s /etc/lab/udhcpc.script >/dev/null 2>&1 ;;
  udp)
    # UDP echo (busybox nc has no -u): socat, dual stack.
    if command -v socat >/dev/null 2>&1; then
      exec socat "UDP6-RECVFROM:$2,fork,ipv6only=0" PIPE
    fi
    exec sleep 3600 ;;
esac
exec sleep 3600
EOF

  cat >"$root/etc/lab/udhcpc.script" <<'EOF'
#!/bin/sh
# udhcpc hook for the anklume lab: IPv4 address, default route, resolv.conf.
case "$1" in
  deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
  bound|renew)
    prefix=${mask:-}
    [ -n "$prefix" ] || prefix=$(/bin/busybox ipcalc -p "$ip" "$subnet" | sed 's/^PREFIX=//')
    if ! ip -4 addr show dev "$interface" | grep -q "inet $ip/$prefix "; then
      ip -4 addr flush dev "$interface"
      ip -4 addr add "$ip/$prefix" dev "$interface"
    fi
    if [ -n "$router" ]; then
      set -- $router
      ip -4 route replace default via "$1" dev "$interface"
    fi
    if [ -n "$dns" ]; then
      : >/etc/resolv.conf
      for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
    fi
    ;;
esac
exit 0
EOF
  chmod 0755 "$root/etc/lab/rc" "$root/etc/lab/svc" "$root/etc/lab/udhcpc.script"
}

# Copy a dynamically linked binary and its libraries into a rootfs.
copy_with_libs() {
  local root=$1 bin=$2 lib
  install -D -m 0755 "$bin" "$root$bin"
  for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
    [[ -e $root$lib ]] || install -D -m "$(stat -L -c %a "$lib")" "$lib" "$root$lib"
  done
}

build_busybox_rootfs() {
  local root=$1 applet
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,var/log,var/run}
  install -m 0755 /bin/busybox "$root/bin/busybox"
  while read -r applet; do
    [[ -z $applet || $applet == bin/busybox ]] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -sfn /bin/busybox "$root/$applet"
  done < <(/bin/busybox --list-full)
  copy_with_libs "$root" /usr/bin/socat
  printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
  printf 'root:x:0:\n' >"$root/etc/group"
  printf 'root:*:19000:0:99999:7:::\n' >"$root/etc/shadow"
  chmod 0600 "$root/etc/shadow"
  : >"$root/etc/resolv.conf"
  write_lab_overlay "$root"
}

debootstrap_tarball() {
  printf '%s/debootstrap-%s-minbase-%s.tar.gz' "$CACHE_DIR" "$DEBIAN_SUITE" \
    "$(printf '%s' "$DEBOOTSTRAP_INCLUDE" | sha256sum | cut -c1-8)"
}

ensure_debootstrap() {
  local tb dir
  tb=$(debootstrap_tarball)
  [[ -s $tb ]] && return 0
  log "debootstrap $DEBIAN_SUITE minbase (about a minute)"
  dir=$(mktemp -d "$CACHE_DIR/tmp/debootstrap.XXXXXX")
  quiet debootstrap --variant=minbase --include="$DEBOOTSTRAP_INCLUDE" \
    "$DEBIAN_SUITE" "$dir" "$DEBIAN_MIRROR"
  [[ -n $dir && $dir == "$CACHE_DIR"/tmp/* ]] || die "bad debootstrap dir '$dir'"
  rm -rf "${dir:?}"/var/cache/apt/archives/*.deb "${dir:?}"/var/lib/apt/lists/*_Packages "${dir:?}"/dev/*
  tar -C "$dir" --numeric-owner -cf - . | gzip -1 >"$tb.part"
  mv "$tb.part" "$tb"
  rm -rf "$dir"
}

build_debian_rootfs() {
  local root=$1
  tar -C "$root" --numeric-owner -xzf "$(debootstrap_tarball)"
  ln -sfn /bin/busybox "$root/sbin/init"
  write_lab_overlay "$root"
  mkdir -p "$root/opt/anklume"
}

image_recipe() {  # image_recipe <alias>
  {
    declare -f write_lab_overlay copy_with_libs
    echo "${LAB_HTTP_PORTS[*]} ${LAB_UDP_PORTS[*]}"
    case $1 in
      lab-busybox)
        declare -f build_busybox_rootfs
        dpkg-query -W busybox-static socat 2>/dev/null || true ;;
      lab-debian)
        declare -f build_debian_rootfs
        basename "$(debootstrap_tarball)" ;;
    esac
  } | sha256sum | cut -c1-16
}

# Build (if not cached) the split image for <alias>; print its cache dir.
ensure_image_cache() {
  local alias=$1 recipe=$2 dir tmp os release
  dir=$CACHE_DIR/images/$alias-$recipe
  if [[ -s $dir/meta.tar.gz && -s $dir/rootfs.tar.gz ]]; then
    printf '%s' "$dir"; return 0
  fi
  mkdir -p "$CACHE_DIR/tmp" "$CACHE_DIR/images"
  [[ $alias == lab-debian ]] && ensure_debootstrap
  log "building image $alias (recipe $recipe)"
  tmp=$(mktemp -d "$CACHE_DIR/tmp/$alias.XXXXXX")
  mkdir -p "$tmp/rootfs" "$tmp/meta"
  case $alias in
    lab-busybox) build_busybox_rootfs "$tmp/rootfs"; os=busybox
      release=$(dpkg-query -W -f='${Version}' busybox-static) ;;
    lab-debian) build_debian_rootfs "$tmp/rootfs"; os=debian; release=$DEBIAN_SUITE ;;
    *) die "unknown image $alias" ;;
  esac
  cat >"$tmp/meta/metadata.yaml" <<EOF
architecture: x86_64
creation_date: $(date +%s)
properties:
  description: "anklume lab $alias"
  os: $os
  release: "$release"
  architecture: x86_64
  lab_recipe: "$recipe"
EOF
  tar -C "$tmp/meta" --numeric-owner -czf "$tmp/meta.tar.gz" metadata.yaml
  tar -C "$tmp/rootfs" --numeric-owner -cf - . | gzip -1 >"$tmp/rootfs.tar.gz"
  rm -rf "$CACHE_DIR/images/$alias"-*   # older recipes of this image
  mkdir -p "$dir"
  mv "$tmp/meta.tar.gz" "$tmp/rootfs.tar.gz" "$dir/"
  rm -rf "$tmp"
  printf '%s' "$dir"
}

step_images() {
  local alias recipe dir fp cur
  rm -rf "$CACHE_DIR/tmp"   # leftovers of an interrupted build
  for alias in lab-busybox lab-debian; do
    recipe=$(image_recipe "$alias")
    cur=""
    if iexists "$(pq "/1.0/images/aliases/$alias")"; then
      fp=$(iq "$(pq "/1.0/images/aliases/$alias")" | jq -r .target)
      cur=$(iq "$(pq "/1.0/images/$fp")" | jq -r '.properties.lab_recipe // ""')
      [[ $cur == "$recipe" ]] && continue
      log "image $alias: recipe changed ($cur -> $recipe), replacing"
      quiet incus image delete --project "$LAB_PROJECT" "$fp"
    fi
    dir=$(ensure_image_cache "$alias" "$recipe")
    fp=$(cat "$dir/meta.tar.gz" "$dir/rootfs.tar.gz" | sha256sum | cut -d' ' -f1)
    if iexists "$(pq "/1.0/images/$fp")"; then
      quiet incus image alias create --project "$LAB_PROJECT" "$alias" "$fp"
    else
      log "importing image $alias"
      quiet incus image import --project "$LAB_PROJECT" "$dir/meta.tar.gz" "$dir/rootfs.tar.gz" --alias "$alias"
    fi
  done
}

# -------------------------------------------------------------- instances --
step_instances() {
  local e name image dom host ip net json fp base status mac kv nic_changed
  for e in "${LAB_INSTANCES[@]}"; do
    IFS=: read -r name image dom host <<<"$e"
    net=$LAB_NET_PREFIX$dom
    ip=10.251.$(dom_octet "$dom").$host
    fp=$(iq "$(pq "/1.0/images/aliases/$image")" | jq -r .target)
    if iexists "$(pq "/1.0/instances/$name")"; then
      json=$(iq "$(pq "/1.0/instances/$name")")
      base=$(jq -r '.config["volatile.base_image"] // ""' <<<"$json")
      if [[ $base != "$fp" ]]; then
        log "instance $name: image $image changed, recreating"
        quiet incus delete --force --project "$LAB_PROJECT" "$name"
      fi
    fi
    if ! iexists "$(pq "/1.0/instances/$name")"; then
      log "creating instance $name ($image, $net, $ip)"
      quiet incus init --project "$LAB_PROJECT" "$image" "$name"
    fi
    # Fixed MAC, so the SLAAC IPv6 address is stable across rebuilds.
    nic_changed=0
    mac=$(printf '10:66:6a:fb:%02x:%02x' "$(dom_octet "$dom")" "$host")
    json=$(iq "$(pq "/1.0/instances/$name")")
    if [[ $(jq -r '.devices.eth0.network // ""' <<<"$json") != "$net" ]]; then
      if jq -e '.devices.eth0' <<<"$json" >/dev/null; then
        quiet incus config device remove --project "$LAB_PROJECT" "$name" eth0
      fi
      quiet incus config device add --project "$LAB_PROJECT" "$name" eth0 nic \
        network="$net" name=eth0 ipv4.address="$ip" hwaddr="$mac"
      nic_changed=1
    else
      for kv in "ipv4.address=$ip" "hwaddr=$mac"; do
        if [[ $(jq -r --arg k "${kv%%=*}" '.devices.eth0[$k] // ""' <<<"$json") != "${kv#*=}" ]]; then
          log "instance $name: eth0 ${kv}"
          quiet incus config device set --project "$LAB_PROJECT" "$name" eth0 "$kv"
          nic_changed=1
        fi
      done
    fi
    status=$(jq -r .status <<<"$json")
    if [[ $status == Running ]] && ((nic_changed)); then
      # A hot-plugged NIC comes up unconfigured: reboot to rerun the lab rc.
      log "restarting $name (eth0 changed)"
      quiet incus restart --project "$LAB_PROJECT" --timeout 10 --force "$name"
    elif [[ $status != Running ]]; then
      log "starting $name"
      quiet incus start --project "$LAB_PROJECT" "$name"
    fi
  done
}

# Wait until every lab instance has its IPv4 and a global IPv6 on eth0.
step_wait_ready() {
  local deadline=$((SECONDS + READY_TIMEOUT)) json missing e name image dom host ip kicked=0
  while :; do
    json=$(iq "$(pq /1.0/instances)&recursion=2")
    missing=()
    for e in "${LAB_INSTANCES[@]}"; do
      IFS=: read -r name image dom host <<<"$e"
      ip=10.251.$(dom_octet "$dom").$host
      if ! jq -e --arg n "$name" --arg ip "$ip" '
          .[] | select(.name == $n) | .state.network.eth0.addresses // [] |
          (any(.family == "inet" and .address == $ip)) and
          (any(.family == "inet6" and .scope == "global"))' <<<"$json" >/dev/null; then
        missing+=("$name")
      fi
    done
    ((${#missing[@]} == 0)) && return 0
    if ((!kicked && SECONDS >= deadline - READY_TIMEOUT / 2)); then
      # Half the budget gone: reboot the laggards once (e.g. a NIC left down).
      kicked=1
      for name in "${missing[@]}"; do
        log "no address yet on $name: restarting it"
        quiet incus restart --project "$LAB_PROJECT" --timeout 10 --force "$name" || true
      done
    fi
    if ((SECONDS >= deadline)); then
      die "no IPv4/global IPv6 after ${READY_TIMEOUT}s for: ${missing[*]} (see 'lab/lab.sh status')"
    fi
    sleep 1
  done
}

# anklume-instance drives the host's Incus through its socket.
step_admin_instance() {
  local n=$ADMIN_INSTANCE json have want
  quiet incus exec --project "$LAB_PROJECT" "$n" -- mkdir -p /var/lib/incus /opt/anklume /usr/local/bin
  json=$(iq "$(pq "/1.0/instances/$n")")
  if ! jq -e '.devices["incus-socket"]' <<<"$json" >/dev/null; then
    log "$n: adding the incus-socket proxy device"
    quiet incus config device add --project "$LAB_PROJECT" "$n" incus-socket proxy \
      connect=unix:/var/lib/incus/unix.socket listen=unix:/var/lib/incus/unix.socket \
      bind=container uid=0 gid=0 mode=0660 security.uid=0 security.gid=0
  fi
  want=$(sha256sum /usr/bin/incus | cut -d' ' -f1)
  have=$(incus exec --project "$LAB_PROJECT" "$n" -- sh -c \
    'sha256sum /usr/local/bin/incus 2>/dev/null | cut -d" " -f1' || true)
  if [[ $have != "$want" ]]; then
    log "$n: pushing /usr/bin/incus to /usr/local/bin/incus"
    quiet incus file push --project "$LAB_PROJECT" --mode 0755 /usr/bin/incus "$n/usr/local/bin/incus"
  fi
  incus exec --project "$LAB_PROJECT" "$n" -- timeout 20 incus query /1.0/networks 2>/dev/null |
    jq -e 'type == "array"' >/dev/null ||
    die "$n cannot reach the host's Incus through /var/lib/incus/unix.socket"
}

# ------------------------------------------------------------- "internet" --
ns_exists() { ip netns list | awk '{print $1}' | grep -qx "$UP_NS"; }

# The lab's "internet" must not shadow anything real: refuse the upstream
# subnet when a route already covers it (other than the default route), or
# when the machine's resolvers or package registries resolve into it (on this
# workplace the registries' proxy sits in a documentation range).
check_upstream_subnet_is_free() {
  local net4=${UP_HOST4%.*}. addr
  if ip -4 route show to match "${UP_NS4%/*}" | grep -v '^default' | grep -q .; then
    die "a route already covers ${UP_NS4}: pick another UP_* subnet for the lab upstream"
  fi
  if ip -6 route show to match "${UP_NS6%/*}" | grep -v '^default' | grep -q .; then
    die "a route already covers ${UP_NS6}: pick another UP_* subnet for the lab upstream"
  fi
  for addr in $(awk '/^nameserver/ {print $2}' /etc/resolv.conf 2>/dev/null) \
              $(getent ahostsv4 deb.debian.org pypi.org index.crates.io 2>/dev/null | awk '{print $1}' | sort -u); do
    [[ $addr == "$net4"* ]] &&
      die "$addr (a resolver or package registry) is inside the lab upstream ${UP_HOST4}: pick another subnet"
  done
  return 0
}

step_upstream() {
  local www=$RUN_DIR/upstream-www
  mkdir -p "$RUN_DIR" "$www"
  [[ -r /proc/sys/net/ipv4/ip_forward && $(</proc/sys/net/ipv4/ip_forward) == 1 ]] ||
    { log "enabling net.ipv4.ip_forward"; echo 1 >/proc/sys/net/ipv4/ip_forward; }
  [[ $(</proc/sys/net/ipv6/conf/all/forwarding) == 1 ]] ||
    { log "enabling net.ipv6.conf.all.forwarding"; echo 1 >/proc/sys/net/ipv6/conf/all/forwarding; }

  if ! ip link show dev "$UP_VETH" >/dev/null 2>&1; then
    check_upstream_subnet_is_free
  fi
  if ! ns_exists; then
    log "creating namespace $UP_NS"
    ip netns add "$UP_NS"
  fi
  if ! ip link show dev "$UP_VETH" >/dev/null 2>&1; then
    ip netns exec "$UP_NS" ip link del eth0 2>/dev/null || true
    ip link add "$UP_VETH" type veth peer name eth0 netns "$UP_NS"
  fi
  ip addr replace "$UP_HOST4" dev "$UP_VETH"
  ip -6 addr replace "$UP_HOST6" dev "$UP_VETH" nodad
  ip link set "$UP_VETH" up
  ip netns exec "$UP_NS" sh -c "
    ip link set lo up &&
    ip addr replace $UP_NS4 dev eth0 &&
    ip -6 addr replace $UP_NS6 dev eth0 nodad &&
    ip link set eth0 up &&
    ip route replace default via $UP_GW4 dev eth0 &&
    ip -6 route replace default via $UP_GW6 dev eth0"

  echo upstream >"$www/index.html"
  if ! pid_alive "$UP_HTTPD_PIDFILE" httpd; then
    log "starting upstream httpd in $UP_NS"
    spawn_detached "$UP_HTTPD_PIDFILE" ip netns exec "$UP_NS" /bin/busybox httpd -f -p 80 -h "$www"
  fi
  if ! pid_alive "$UP_UDP_PIDFILE" socat; then
    log "starting upstream UDP echo in $UP_NS"
    spawn_detached "$UP_UDP_PIDFILE" ip netns exec "$UP_NS" socat UDP6-RECVFROM:5353,fork,ipv6only=0 PIPE
  fi
}

# Egress through Incus NAT: pro-dev -> upstream, v4 and v6 (bounded pings).
step_check_egress() {
  local a ok
  for a in "${UP_NS4%/*}" "${UP_NS6%/*}"; do
    ok=0
    for _ in 1 2 3; do
      if timeout 5 incus exec --project "$LAB_PROJECT" pro-dev -- ping -c 1 -W 1 "$a" \
          >/dev/null 2>&1; then ok=1; break; fi
    done
    ((ok)) || die "pro-dev cannot ping upstream $a (is an nft table dropping egress? try 'nft list tables')"
  done
}

# ------------------------------------------------------------- forwarding --
# Only the first `up` records: a second one would see the lab's own values.
save_forwarding() {
  local f
  [[ -e $FORWARDING_SAVED ]] && return 0
  for f in "${FORWARDING_SYSCTLS[@]}"; do
    if [[ -r $f ]]; then printf '%s %s\n' "$f" "$(<"$f")"; fi
  done >"$FORWARDING_SAVED"
}

# restore_forwarding [<reason to keep>]: put the recorded values back, unless
# something outside the lab still needs forwarding (then only say so).
restore_forwarding() {
  local f v
  [[ -r $FORWARDING_SAVED ]] || return 0
  if [[ -n ${1:-} ]]; then
    log "keeping forwarding on: $1"
  else
    while read -r f v; do
      [[ $f == /proc/sys/net/* && $v =~ ^[0-9]+$ && -w $f ]] || continue
      if [[ $(<"$f") != "$v" ]]; then
        log "restoring ${f#/proc/sys/} = $v"
        echo "$v" >"$f"
      fi
    done <"$FORWARDING_SAVED"
  fi
  rm -f "$FORWARDING_SAVED"
}

# --------------------------------------------------------------- firewall --
# The firewall instance, without NICs of its own (default profile), started.
# Log lines of nftables in a container's network namespace reach the kernel
# log only with nf_log_all_netns (a VM has its own kernel and log).
cmd_firewall() {
  step_daemon
  if ! iexists "$(pq "/1.0/instances/$FIREWALL_INSTANCE")"; then
    log "creating the firewall instance $FIREWALL_INSTANCE ($FIREWALL_IMAGE)"
    quiet incus init --project "$LAB_PROJECT" "$FIREWALL_IMAGE" "$FIREWALL_INSTANCE"
  fi
  if [[ $(iq "$(pq "/1.0/instances/$FIREWALL_INSTANCE")" | jq -r .status) != Running ]]; then
    quiet incus start --project "$LAB_PROJECT" "$FIREWALL_INSTANCE"
  fi
  if [[ $(sysctl -n net.netfilter.nf_log_all_netns 2>/dev/null || echo 1) != 1 ]]; then
    log "enabling net.netfilter.nf_log_all_netns (the firewall container's log lines)"
    sysctl -q -w net.netfilter.nf_log_all_netns=1
  fi
}

# The host's steering towards the firewall: its rules, routes, table, files.
down_firewall_routing() {
  local fam t fail=0
  for fam in -4 -6; do
    while ip "$fam" rule show pref "$ROUTE_RULE_PREF" | grep -q .; do
      ip "$fam" rule del pref "$ROUTE_RULE_PREF" || { fail=1; break; }
    done
    for ((t = ROUTE_TABLE_FIRST; t < ROUTE_TABLE_FIRST + ROUTE_TABLE_COUNT; t++)); do
      ip "$fam" route flush table "$t" 2>/dev/null || true
    done
  done
  if command -v nft >/dev/null && nft list table inet "$ROUTE_NFT_TABLE" >/dev/null 2>&1; then
    log "deleting nft table inet $ROUTE_NFT_TABLE"
    nft delete table inet "$ROUTE_NFT_TABLE" || fail=1
  fi
  return "$fail"
}

# --------------------------------------------------------------- commands --
cmd_up() {
  local t0=$SECONDS
  save_forwarding
  step_install
  step_daemon
  step_pool
  step_project
  step_networks
  step_images
  step_upstream
  step_instances
  step_wait_ready
  step_admin_instance
  step_check_egress
  log "up: ready in $((SECONDS - t0))s"
}

cmd_down() {
  local fail=0 name fp p vol keep_forwarding=
  if command -v incus >/dev/null && [[ -x $INCUSD ]]; then
    step_daemon
    if iexists "/1.0/projects/$LAB_PROJECT"; then
      for name in $(iq "$(pq /1.0/instances)&recursion=1" | jq -r '.[].name'); do
        log "deleting instance $name"
        quiet incus delete --force --project "$LAB_PROJECT" "$name" || fail=1
      done
      for fp in $(iq "$(pq /1.0/images)&recursion=1" | jq -r '.[].fingerprint'); do
        quiet incus image delete --project "$LAB_PROJECT" "$fp" || fail=1
      done
      if iexists "/1.0/storage-pools/$LAB_POOL"; then
        for vol in $(iq "$(pq "/1.0/storage-pools/$LAB_POOL/volumes/custom")&recursion=1" |
            jq -r '.[].name'); do
          quiet incus storage volume delete --project "$LAB_PROJECT" "$LAB_POOL" "$vol" || fail=1
        done
      fi
      for p in $(iq "$(pq /1.0/profiles)&recursion=1" | jq -r '.[].name'); do
        if [[ $p == default ]]; then
          quiet incus query -X PUT --wait -d '{"config":{},"description":"","devices":{}}' \
            "$(pq /1.0/profiles/default)" || fail=1
        else
          quiet incus profile delete --project "$LAB_PROJECT" "$p" || fail=1
        fi
      done
      log "deleting project $LAB_PROJECT"
      quiet incus project delete "$LAB_PROJECT" || fail=1
    fi
    for name in $(iq "/1.0/networks?recursion=1" |
        jq -r --arg p "$LAB_NET_PREFIX" '.[] | select(.managed and (.name | startswith($p))) | .name'); do
      log "deleting bridge $name"
      quiet incus network delete "$name" || fail=1
    done
    if iexists "/1.0/storage-pools/$LAB_POOL"; then
      log "deleting storage pool $LAB_POOL"
      quiet incus storage delete "$LAB_POOL" || fail=1
    fi
    # Incus's other bridges route through the host: they keep forwarding.
    keep_forwarding=$(iq "/1.0/networks?recursion=1" |
      jq -r '[.[] | select(.managed) | .name] | if length > 0 then "Incus networks " + join(", ") else "" end') ||
      keep_forwarding="the Incus networks could not be listed"
  fi

  kill_pidfile "$UP_HTTPD_PIDFILE" httpd
  kill_pidfile "$UP_UDP_PIDFILE" socat
  if ns_exists; then log "deleting namespace $UP_NS"; ip netns del "$UP_NS" || fail=1; fi
  # Deleting the namespace deletes the veth's peer, and with it the veth,
  # asynchronously: it may still be listed here and gone a moment later.
  if ip link show dev "$UP_VETH" >/dev/null 2>&1; then
    ip link del "$UP_VETH" 2>/dev/null || ! ip link show dev "$UP_VETH" >/dev/null 2>&1 || fail=1
  fi
  rm -rf "$RUN_DIR/upstream-www"
  restore_forwarding "$keep_forwarding"

  remove_isolation || fail=1
  down_firewall_routing || fail=1
  local -a files=(/etc/nftables.d/anklume-lab-isolation.nft*
    /etc/nftables.d/anklume-lab-route.nft*
    "/etc/systemd/system/sysinit.target.wants/anklume-isolation-$ROUTE_NFT_TABLE.service"
    "/etc/systemd/system/anklume-isolation-$ROUTE_NFT_TABLE.service"
    /etc/systemd/system/sysinit.target.wants/anklume-isolation-anklume_lab.service
    /etc/systemd/system/multi-user.target.wants/anklume-isolation-anklume_lab.service
    /etc/systemd/system/anklume-isolation-anklume_lab.service)
  local f removed_unit=0
  for f in "${files[@]}"; do
    if [[ -e $f || -L $f ]]; then
      log "removing $f"
      [[ $f == *.service ]] && removed_unit=1
      rm -f "$f"
    fi
  done
  if ((removed_unit)) && systemd_pid1; then systemctl daemon-reload || true; fi
  ((fail == 0)) || die "down: some lab objects could not be removed (see above)"
}

# The lab's isolation table, file, .previous and boot unit: through the
# product's own way out (firewall_router_apply state: absent, which removes
# only what it made), or by hand when the module is not built.
remove_isolation() {
  local module=$LAB_DIR/../library/firewall_router_apply args out
  if [[ -x $module ]]; then
    args=$(mktemp)
    printf '{"state": "absent", "table": "%s", "dest": "%s"}\n' \
      "$LAB_NFT_TABLE" "$LAB_NFT_DEST" >"$args"
    out=$("$module" "$args") || true
    rm -f "$args"
    if jq -e '.failed != true' <<<"$out" >/dev/null 2>&1; then
      jq -e '.changed == true' <<<"$out" >/dev/null &&
        log "firewall_router_apply state=absent removed tables inet and bridge $LAB_NFT_TABLE and their files"
      return 0
    fi
    log "firewall_router_apply state=absent failed ($(jq -r '.msg // "no JSON"' <<<"$out" 2>/dev/null)): removing by hand"
  fi
  local family
  for family in inet bridge; do
    if command -v nft >/dev/null && nft list table "$family" "$LAB_NFT_TABLE" >/dev/null 2>&1; then
      log "deleting nft table $family $LAB_NFT_TABLE"
      nft delete table "$family" "$LAB_NFT_TABLE" || return 1
    fi
  done
}

cmd_status() {
  if ! timeout 10 incus info >/dev/null 2>&1; then
    echo "incusd: not answering"
  else
    if pid_alive "$INCUSD_PIDFILE" incusd; then
      echo "incusd: running (started by lab.sh, pid $(<"$INCUSD_PIDFILE"))"
    else
      echo "incusd: running"
    fi
    if iexists "/1.0/storage-pools/$LAB_POOL"; then
      echo "pool $LAB_POOL: $(iq "/1.0/storage-pools/$LAB_POOL" | jq -r .driver)"
    else
      echo "pool $LAB_POOL: absent"
    fi
    echo "bridges:"
    iq "/1.0/networks?recursion=1" | jq -r --arg p "$LAB_NET_PREFIX" '
      .[] | select(.managed and (.name | startswith($p))) |
      "  \(.name)  \(.config["ipv4.address"] // "-")  \(.config["ipv6.address"] // "-")  \(.status)"'
    if iexists "/1.0/projects/$LAB_PROJECT"; then
      echo "project $LAB_PROJECT:"
      echo "  images:"
      iq "$(pq /1.0/images)&recursion=1" | jq -r '
        .[] | "    \(.aliases | map(.name) | join(",")) \(.fingerprint[0:12]) recipe=\(.properties.lab_recipe // "-")"'
      echo "  instances:"
      iq "$(pq /1.0/instances)&recursion=2" | jq -r '
        .[] | [ .name, .status, (.expanded_devices.eth0.network // "-"),
          ((.state.network.eth0.addresses // []) | map(select(.scope == "global") | .address) | join(" ")) ]
        | "    " + join("  ")'
    else
      echo "project $LAB_PROJECT: absent"
    fi
  fi
  if ns_exists; then
    echo "namespace $UP_NS: present ($(ip netns exec "$UP_NS" ip -br addr show dev eth0 2>/dev/null | awk '{$1=$2=""; print}' | xargs))"
  else
    echo "namespace $UP_NS: absent"
  fi
  local f
  for f in "$UP_HTTPD_PIDFILE:httpd" "$UP_UDP_PIDFILE:socat"; do
    if pid_alive "${f%%:*}" "${f#*:}"; then
      echo "$(basename "${f%%:*}" .pid): pid $(<"${f%%:*}")"
    else
      echo "$(basename "${f%%:*}" .pid): not running"
    fi
  done
  local family
  for family in inet bridge; do
    if command -v nft >/dev/null && nft list table "$family" "$LAB_NFT_TABLE" >/dev/null 2>&1; then
      echo "nft table $family $LAB_NFT_TABLE: present"
    else
      echo "nft table $family $LAB_NFT_TABLE: absent"
    fi
  done
}

main() {
  [[ $(id -u) == 0 ]] || die "run as root"
  # One lab.sh at a time: concurrent runs would fight over the same objects.
  # (spawn_detached closes fd 9 in daemons, so they never hold the lock.)
  mkdir -p "$RUN_DIR"
  exec 9>"$RUN_DIR/lab.lock"
  if ! flock -w 600 9; then die "another lab.sh still holds $RUN_DIR/lab.lock"; fi
  case ${1:-} in
    install) step_install ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    firewall) cmd_firewall ;;
    *) echo "usage: $0 install|up|down|status|firewall" >&2; exit 2 ;;
  esac
}

# Sourced (tests/lab_forwarding.sh): define the functions, run nothing.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then main "$@"; fi
