#!/usr/bin/env bash
# A throwaway systemd for tests: systemd as PID 1 of fresh pid + mount + cgroup namespaces, on
# an overlayfs over the host's / whose writes all go to a tmpfs. The host is left untouched
# (no unit, user, file or process of it survives `down`); only the network is shared.
#
#   sdharness.sh check                      exit 0 when this host can do it, else 77 + why
#   sdharness.sh boot STATE [--bind PATH]... boot; prints the host PID of that systemd once
#                                           `systemctl is-system-running --wait` has answered
#   sdharness.sh run STATE CMD [ARG]...      run CMD inside (nsenter), with its exit code
#   sdharness.sh down STATE                 power off (SIGKILL of PID 1 after 10 s), remove
#                                           the cgroup and STATE
#
# STATE is a new empty directory (keep its path short). --bind PATH makes a host directory
# visible at the same path inside, read-only; needed for paths that are not on the host's root
# filesystem (the overlay's lower layer is / alone, not the mounts under it) or that are under
# /tmp or /run (fresh tmpfs inside).
# Needs real root (CAP_SYS_ADMIN), cgroup2 mounted, overlayfs, util-linux unshare/nsenter and
# systemd installed on the host. Derived from a recipe checked on Debian 12 (systemd 252).
set -euo pipefail

SYSTEMD=/lib/systemd/systemd
TARGET=chatd-test.target
# Host units that are pointless or slow in a throwaway container: masked inside.
MASK=(timers.target systemd-timesyncd.service systemd-modules-load.service
  systemd-pstore.service getty@tty1.service systemd-networkd-wait-online.service
  NetworkManager-wait-online.service ifupdown-wait-online.service)

die() { echo "sdharness: $*" >&2; exit 1; }

cgroup2_root() {
  local c
  for c in /sys/fs/cgroup /sys/fs/cgroup/unified; do
    if [[ $(stat -fc %T "$c" 2>/dev/null) == cgroup2fs ]]; then echo "$c"; return 0; fi
  done
  return 1
}

cmd_check() {
  local why=""
  if [[ $(id -u) != 0 ]]; then why="needs root (CAP_SYS_ADMIN for namespaces and mounts)"
  elif [[ ! -x $SYSTEMD ]]; then why="no $SYSTEMD (apt-get install systemd)"
  elif ! command -v unshare >/dev/null || ! command -v nsenter >/dev/null; then
    why="no unshare/nsenter (apt-get install util-linux)"
  elif ! cgroup2_root >/dev/null; then why="no cgroup2 hierarchy mounted"
  elif ! grep -qw overlay /proc/filesystems && ! modprobe overlay 2>/dev/null; then
    why="no overlayfs in this kernel"
  elif ! unshare --mount --pid --cgroup --fork true 2>/dev/null; then
    why="cannot create mount/pid/cgroup namespaces here (an unprivileged container?)"
  fi
  if [[ -n $why ]]; then echo "sdharness: $why" >&2; exit 77; fi
}

# ---- inside the new namespaces, as their PID 1: build the root, exec systemd -------------------
cmd_inner() {
  local T=$1; shift
  local R=$T/root p u
  mount --make-rprivate /
  mkdir -p "$T/ovl" "$R"
  mount -t tmpfs -o mode=755 tmpfs "$T/ovl"
  mkdir "$T/ovl/up" "$T/ovl/wk"
  mount -t overlay overlay -o "lowerdir=/,upperdir=$T/ovl/up,workdir=$T/ovl/wk" "$R"
  mount -t proc proc "$R/proc"
  mount --bind "$R/proc/sys" "$R/proc/sys"
  mount -o remount,bind,ro "$R/proc/sys"                  # no host sysctl can be changed
  mount -t sysfs -o ro sysfs "$R/sys"                     # read-only /sys: no udevd
  mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup"             # the cgroup namespace's root
  for p in run tmp; do mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$R/$p"; done
  chmod 1777 "$R/tmp"
  mount -t tmpfs -o mode=755,nosuid tmpfs "$R/dev"
  for p in null zero full random urandom tty; do
    touch "$R/dev/$p"
    mount --bind "/dev/$p" "$R/dev/$p"
  done
  mkdir "$R/dev/pts" "$R/dev/shm"
  mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/dev/shm"
  mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$R/dev/pts"
  ln -s pts/ptmx "$R/dev/ptmx"
  ln -s /proc/self/fd "$R/dev/fd"
  touch "$R/dev/console"
  mount --bind "$T/boot.log" "$R/dev/console"
  # Host directories given with --bind (after /tmp and /run are replaced, so that a checkout
  # under /tmp shows too), read-only.
  for p in "$@"; do
    mkdir -p "$R$p"
    mount --bind "$p" "$R$p"
    mount -o remount,bind,ro "$R$p"
  done
  printf '[Unit]\nDescription=chatd test harness\nRequires=basic.target\nAfter=basic.target\n' \
    >"$R/etc/systemd/system/$TARGET"
  for u in "${MASK[@]}"; do ln -sf /dev/null "$R/etc/systemd/system/$u"; done
  cd "$R"
  mkdir .oldroot
  pivot_root . .oldroot
  exec /usr/sbin/chroot . /bin/sh -c \
    "umount -l /.oldroot; rmdir /.oldroot; exec $SYSTEMD --unit=$TARGET --show-status=no"
}

# ---- host side ---------------------------------------------------------------------------------
state_pid() { cat "$1/systemd.pid" 2>/dev/null || true; }

cmd_boot() {
  local T=$1; shift
  local binds=() cgroot cg upid sd p state self
  while (($#)); do
    case $1 in
      --bind) [[ $# -ge 2 ]] || die "--bind needs a path"; binds+=("$(readlink -f "$2")"); shift ;;
      *) die "unknown argument $1" ;;
    esac
    shift
  done
  cmd_check
  [[ -d $T && -z $(ls -A "$T") ]] || die "$T must be an empty directory"
  T=$(cd "$T" && pwd)
  : >"$T/boot.log"
  cgroot=$(cgroup2_root)
  cg=$cgroot/sdharness.$$.${T##*/}
  mkdir "$cg"
  echo "$cg" >"$T/cgroup"
  # In its own cgroup (so that its systemd finds an empty, delegated subtree), with a clean
  # environment; every fd to the log so that no caller's pipe stays open behind it.
  # Resolved here, not in the subshell: a command substitution there is a child of $upid
  # too, and the loop below must find only unshare's child (systemd), never that one.
  self=$(readlink -f "${BASH_SOURCE[0]}")
  (
    echo "$BASHPID" >"$cg/cgroup.procs"
    exec env -i container=sdharness PATH=/usr/sbin:/usr/bin:/sbin:/bin \
      unshare --cgroup --pid --fork --mount --propagation private \
      "$self" __inner "$T" "${binds[@]}"
  ) </dev/null >>"$T/boot.log" 2>&1 &
  upid=$!
  echo "$upid" >"$T/unshare.pid"
  sd=""
  for _ in $(seq 100); do
    # Only once $upid is unshare itself (not yet the subshell or env, whose children are
    # not systemd): its one child is the namespace's PID 1.
    if [[ $(cat "/proc/$upid/comm" 2>/dev/null) == unshare ]]; then
      sd=$(cut -d' ' -f1 "/proc/$upid/task/$upid/children" 2>/dev/null || true)
      [[ -n $sd ]] && break
    fi
    sleep 0.05
  done
  [[ -n $sd ]] || { cat "$T/boot.log" >&2; die "systemd did not start"; }
  echo "$sd" >"$T/systemd.pid"
  for _ in $(seq 300); do  # until PID 1 has exec'd systemd and its private socket exists
    if [[ $(cat "/proc/$sd/comm" 2>/dev/null) == systemd ]] &&
      timeout 2 nsenter -t "$sd" -a test -S /run/systemd/private 2>/dev/null; then
      break
    fi
    kill -0 "$sd" 2>/dev/null || { cat "$T/boot.log" >&2; die "systemd exited during boot"; }
    sleep 0.05
  done
  state=$(cmd_run "$T" timeout 60 systemctl is-system-running --wait 2>/dev/null || true)
  if [[ $state != running ]]; then
    echo "sdharness: the system is '$state'; failed units:" >&2
    cmd_run "$T" systemctl --failed --no-pager --no-legend >&2 || true
  fi
  echo "$sd"
}

cmd_run() {
  local T=$1; shift
  local sd; sd=$(state_pid "$T")
  [[ -n $sd ]] || die "$T: not booted"
  local exec_env=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 SYSTEMD_PAGER= SYSTEMD_COLORS=0 TERM=dumb)
  nsenter -t "$sd" -a "${exec_env[@]}" "$@"
}

cmd_down() {
  local T=$1 sd upid cg
  [[ -d $T ]] || return 0
  sd=$(state_pid "$T")
  upid=$(cat "$T/unshare.pid" 2>/dev/null || true)
  # Our systemd only: the PID recorded at boot, and only while it still is PID 1 of our pid
  # namespace (its parent is our unshare), so a recycled PID is never signalled.
  if [[ -n $sd && -n $upid ]] && [[ $(awk '/^PPid:/ {print $2}' "/proc/$sd/status" 2>/dev/null) == "$upid" ]]; then
    kill -s RTMIN+4 "$sd" 2>/dev/null || true         # = systemctl poweroff
    for _ in $(seq 100); do kill -0 "$sd" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$sd" 2>/dev/null || true                   # PID 1 dies: the whole pid ns dies
  fi
  if [[ -n $upid ]]; then
    for _ in $(seq 50); do kill -0 "$upid" 2>/dev/null || break; sleep 0.1; done
  fi
  cg=$(cat "$T/cgroup" 2>/dev/null || true)
  if [[ -n $cg && -d $cg ]]; then
    for _ in $(seq 50); do
      find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
      [[ -d $cg ]] || break
      sleep 0.1
    done
  fi
  [[ -n ${SDHARNESS_KEEP:-} ]] || rm -rf "$T"
}

case ${1:-} in
  check) cmd_check ;;
  __inner) shift; cmd_inner "$@" ;;
  boot) [[ $# -ge 2 ]] || die "usage: sdharness.sh boot STATE [--bind PATH]..."; shift; cmd_boot "$@" ;;
  run) [[ $# -ge 3 ]] || die "usage: sdharness.sh run STATE CMD [ARG]..."; shift; cmd_run "$@" ;;
  down) [[ $# -ge 2 ]] || die "usage: sdharness.sh down STATE"; cmd_down "$2" ;;
  *) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
