#!/usr/bin/env bash
# Installs Python and happysad into ~/venv on one cluster node; cluster.yaml runs it on every node:
#   bash ~/happysad/deploy/setup-node.sh gpu   # GPU workers: the project and its [gpu] extra (CUDA wheels)
#   bash ~/happysad/deploy/setup-node.sh cpu   # head and CPU workers: the project alone
#
# Every node gets the same CPython build (uv-managed, whatever Python the AMI ships) and the
# versions in deploy/constraints.txt: Ray refuses a node whose Ray or Python version (to the patch
# level) differs from the head's. It never calls apt: on first boot unattended-upgrades holds the
# dpkg lock for minutes, and nothing here needs a system package. Downloads are retried; a node
# whose setup still fails is reported by `ray up` (head) or in monitor.err (workers).
# Safe to rerun: `ray up` runs it again on the head each time.
set -euo pipefail

PYTHON_VERSION=3.11.7   # the interpreter the project is tested with; the same on every node
UV_VERSION=0.13.9
UV_WHEEL_URL=https://files.pythonhosted.org/packages/3d/aa/26d64642d808de4a652579ef950d7cd2d37f080a8babf9c67c6b75fc4c3f/uv-0.13.9-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
UV_WHEEL_SHA256=d7f459fe4fd247d830351c75686d3996ace3c6f3f728eb0e85a30b7ada0cef19
VENV=$HOME/venv

case "${1:-}" in
  gpu) extra="[gpu]" ;;
  cpu) extra="" ;;
  *) echo "usage: setup-node.sh cpu|gpu" >&2; exit 2 ;;
esac
repo=$(cd "$(dirname "$0")/.." && pwd)
constraints=$repo/deploy/constraints.txt

retry() {  # retry CMD...: five tries, 20 s apart (mirrors and DNS are flaky while a node boots)
  local try
  for try in 1 2 3 4; do
    "$@" && return 0
    echo "setup-node: try $try of 5 failed: $*" >&2
    sleep 20
  done
  "$@"
}

install_uv() {  # uv from its PyPI wheel, checked against a pinned sha256; python3 is on every Ubuntu AMI
  local tmp
  tmp=$(mktemp -d)
  curl -fsSL -o "$tmp/uv.whl" "$UV_WHEEL_URL"
  echo "$UV_WHEEL_SHA256  $tmp/uv.whl" | sha256sum --check --quiet -
  python3 -m zipfile -e "$tmp/uv.whl" "$tmp/wheel"
  install -D -m 755 "$tmp/wheel/uv-$UV_VERSION.data/scripts/uv" "$HOME/.local/bin/uv"
  rm -rf "$tmp"
}

retry install_uv
uv=$HOME/.local/bin/uv
retry "$uv" python install "$PYTHON_VERSION"
"$uv" venv --allow-existing --managed-python --python "$PYTHON_VERSION" "$VENV"
retry "$uv" pip install --python "$VENV/bin/python" \
  --constraints "$constraints" --build-constraints "$constraints" --editable "$repo$extra"

# `ray exec cluster.yaml 'ray status'` and ssh sessions find the venv and talk to the token-protected cluster.
grep -q 'happysad venv' ~/.bashrc || echo 'export PATH=$HOME/venv/bin:$PATH RAY_AUTH_MODE=token  # happysad venv' >> ~/.bashrc
