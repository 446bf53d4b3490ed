#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for the dashboard browser test, once.
#
# Idempotent: does nothing when /usr/bin/chromium already exists. Needs root (CI and the
# developer machines run as root) and a reachable Debian package mirror. Only Debian's own
# package is used: no browser build is downloaded from anywhere else.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [[ -x "$CHROMIUM" ]]; then
  echo "chromium already installed: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
  exit 0
fi

if [[ "$(id -u)" != "0" ]]; then
  echo "install_chromium.sh: $CHROMIUM is missing and installing it needs root (apt-get)" >&2
  exit 1
fi

echo "installing Debian's chromium with apt-get (first run only; a few minutes)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
echo "chromium installed: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
