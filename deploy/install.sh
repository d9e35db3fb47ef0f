#!/usr/bin/env bash
# Installs dstack from this checkout into /opt/dstack/venv and enables its systemd unit.
#   deploy/install.sh coordinator [HOST] [PORT]
#   deploy/install.sh agent COORDINATOR:PORT JOIN_TOKEN
set -euo pipefail
role=${1:?usage: install.sh coordinator|agent ...}
src=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
python3 -c 'import ensurepip, venv' 2>/dev/null || apt-get install -y python3-venv
python3 -m venv /opt/dstack/venv
/opt/dstack/venv/bin/pip install -q "$src"
install -d -m 0755 /etc/dstack
case "$role" in
  coordinator)
    id dstack >/dev/null 2>&1 || useradd --system --home /var/lib/dstack --shell /usr/sbin/nologin dstack
    printf 'DSTACK_HOST=%s\nDSTACK_PORT=%s\n' "${2:-0.0.0.0}" "${3:-3000}" >/etc/dstack/coordinator.env
    install -m 0644 "$src/deploy/systemd/dstack-coordinator.service" /etc/systemd/system/
    systemctl daemon-reload && systemctl enable --now dstack-coordinator
    echo "tokens: /var/lib/dstack/server/admin-token and /var/lib/dstack/server/join-token"
    ;;
  agent)
    coordinator=${2:?coordinator address}; token=${3:?join token}
    # The agent runs jobs as root by default, as the host-process runtime needs the GPUs and
    # cgroups; run it as a dedicated user if jobs need no more than that user may do.
    umask 077
    printf 'DSTACK_COORDINATOR=%s\nDSTACK_JOIN_TOKEN=%s\n' "$coordinator" "$token" >/etc/dstack/agent.env
    install -m 0644 "$src/deploy/systemd/dstack-agent.service" /etc/systemd/system/
    systemctl daemon-reload && systemctl enable --now dstack-agent
    ;;
  *) echo "install.sh: unknown role $role" >&2; exit 1 ;;
esac
