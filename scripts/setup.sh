#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian machine for p2pnode: system packages and the project
# itself (editable, with test extras). Safe to run again; does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need_apt+=(nginx-light)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v aria2c >/dev/null 2>&1 || need_apt+=(aria2)
[[ -x /usr/bin/time ]] || need_apt+=(time)
# PostgreSQL server binaries for the tests' throwaway clusters (/usr/lib/postgresql/*/bin)
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || need_apt+=(postgresql)
if [[ "${P2PNODE_SKIP_BROWSER:-0}" != 1 ]]; then
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
fi
if [[ $(id -u) -eq 0 ]]; then SUDO=""; else SUDO="sudo"; fi
if ((${#need_apt[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # Debian starts these daemons on install; our tests run their own on loopback ports.
  $SUDO systemctl disable --now nginx redis-server >/dev/null 2>&1 || true
  $SUDO service nginx stop >/dev/null 2>&1 || true
  $SUDO service redis-server stop >/dev/null 2>&1 || true
  if [[ " ${need_apt[*]} " == *" postgresql "* ]]; then  # and the cluster Debian created
    $SUDO systemctl disable --now postgresql >/dev/null 2>&1 || true
    $SUDO service postgresql stop >/dev/null 2>&1 || true
  fi
fi

# promtool checks docs/alerts.yml (tests/tracker/test_alerts.py). Debian ships it only inside
# the `prometheus` server package (19 MB; installed, 96 MB with a daemon that starts and web
# assets), so the one binary is taken out of that package, which is downloaded and not installed.
if ! command -v promtool >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  chmod 755 "$tmp"  # apt's download user writes here
  if ! (cd "$tmp" && $SUDO apt-get download -qq prometheus >/dev/null 2>&1); then
    $SUDO apt-get update -qq
    (cd "$tmp" && $SUDO apt-get download -qq prometheus >/dev/null 2>&1)
  fi
  dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -xO ./usr/bin/promtool >"$tmp/promtool"
  $SUDO install -m 755 "$tmp/promtool" /usr/local/bin/promtool
  rm -rf "$tmp"
fi

# Python packages at the versions of the last green run (requirements.lock; refresh it with
# scripts/lock-deps), then the project itself without resolving anything again.
if ! python3 -c "import p2pnode, pytest_trio, hypothesis, ruff" >/dev/null 2>&1 \
   || ! command -v hadolint >/dev/null 2>&1 \
   || [[ pyproject.toml -nt .setup-stamp ]] || [[ requirements.lock -nt .setup-stamp ]]; then
  python3 -m pip install -q --disable-pip-version-check -r requirements.lock
  python3 -m pip install -q --disable-pip-version-check --no-deps -e .
  touch .setup-stamp
fi
