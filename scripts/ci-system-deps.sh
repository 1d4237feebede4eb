#!/bin/sh
# System packages the test suite needs beyond Python: systemd-analyze (from Debian's systemd
# package) for tests/test_ops_service.py's `systemd-analyze verify` of the unit files.
# Installs only what is missing, only as root; otherwise it says what to do and exits 0 so CI
# continues (the tests then skip with a reason).
set -eu

if command -v systemd-analyze >/dev/null 2>&1; then
    echo "ci-system-deps: systemd-analyze present ($(systemd-analyze --version | head -n1))"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ci-system-deps: systemd-analyze missing and not root; install it with:" >&2
    echo "  sudo apt-get install -y --no-install-recommends systemd" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ci-system-deps: systemd-analyze missing and no apt-get; install systemd with your package manager" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends systemd
systemd-analyze --version | head -n1
