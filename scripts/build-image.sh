#!/usr/bin/env bash
# Build chatd's OCI image from this checkout (deploy/container/Containerfile).
#
#   scripts/build-image.sh [--tag NAME:TAG] [--wheels DIR] [--base IMAGE] [--engine "CMD"]
#
# Stages a small build context (pyproject.toml, README.md, LICENSE, chatd/, the shipped
# etc/chatd/chatd.toml and a wheelhouse) in a temporary directory, then runs
# `ENGINE build --network=none`: the build downloads nothing, so it is the same wherever it
# runs. The image's labels get chatd's version (pyproject.toml), the git revision and the
# source (the `origin` remote, or $CHATD_SOURCE).
#
# Options:
#   --tag NAME:TAG   the image's name (default chatd:VERSION)
#   --wheels DIR     a wheelhouse made by scripts/wheelhouse.sh for the base image's Python
#                    (3.11); without it one is made now (needs a package index)
#   --base IMAGE     the Python base (default: the Containerfile's, python:3.11-slim-bookworm)
#   --engine "CMD"   the builder and its global options (default podman; docker works too)
set -euo pipefail

die() { echo "build-image.sh: $*" >&2; exit 1; }
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TAG="" WHEELS="" BASE="" ENGINE=podman
while (($#)); do
  case $1 in
    --tag) [[ $# -ge 2 ]] || die "--tag needs a name"; TAG=$2; shift ;;
    --wheels) [[ $# -ge 2 ]] || die "--wheels needs a directory"; WHEELS=$2; shift ;;
    --base) [[ $# -ge 2 ]] || die "--base needs an image"; BASE=$2; shift ;;
    --engine) [[ $# -ge 2 ]] || die "--engine needs a command"; ENGINE=$2; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
read -r -a engine <<<"$ENGINE"
command -v "${engine[0]}" >/dev/null || die "${engine[0]} not found (apt-get install podman)"

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$SRC/pyproject.toml" | head -n 1)
[[ -n $version ]] || die "no version in $SRC/pyproject.toml"
revision=$(git -C "$SRC" rev-parse HEAD 2>/dev/null || echo unknown)
if [[ $revision != unknown && -n $(git -C "$SRC" status --porcelain -- chatd pyproject.toml etc deploy 2>/dev/null) ]]; then
  revision="$revision-dirty"
fi
source=${CHATD_SOURCE:-$(git -C "$SRC" remote get-url origin 2>/dev/null || echo unknown)}
TAG=${TAG:-chatd:$version}

ctx=$(mktemp -d "${TMPDIR:-/tmp}/chatd-image.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
cp "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/LICENSE" "$SRC/etc/chatd/chatd.toml" "$ctx/"
(cd "$SRC" && tar --exclude=__pycache__ --exclude='*.pyc' -cf - chatd) | tar -xf - -C "$ctx"
if [[ -n $WHEELS ]]; then
  compgen -G "$WHEELS/*.whl" >/dev/null || die "--wheels $WHEELS holds no wheel"
  mkdir "$ctx/wheels" && cp "$WHEELS"/*.whl "$ctx/wheels/"
else
  "$SRC/scripts/wheelhouse.sh" "$ctx/wheels"
fi
rm -f "$ctx"/wheels/chatd-*.whl  # chatd itself is built from chatd/ in the image

args=(--network=none -f "$SRC/deploy/container/Containerfile" -t "$TAG"
  --build-arg "VERSION=$version" --build-arg "REVISION=$revision" --build-arg "SOURCE=$source")
if [[ -n $BASE ]]; then args+=(--build-arg "BASE=$BASE"); fi
"${engine[@]}" build "${args[@]}" "$ctx"
echo "build-image.sh: built $TAG (chatd $version, revision $revision)"
