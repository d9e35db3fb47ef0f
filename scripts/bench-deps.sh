#!/usr/bin/env bash
# Installs what the benchmarks' yardsticks need from Debian/Ubuntu: Slurm (slurm-wlm: slurmctld, slurmd,
# sbatch, srun, squeue, scontrol) and munge, for `python -m bench.slurm`. Only run on request (the
# benches never install anything); a no-op when everything is there. The packages' own services are
# not wanted: bench.slurm starts a private munged/slurmctld/slurmd with its own key, ports and state,
# so right after installing this stops any system slurm/munge service the install started.
set -euo pipefail

missing=()
installed=0
for bin in slurmctld slurmd sbatch srun scontrol squeue; do
  command -v "$bin" >/dev/null || { missing+=(slurm-wlm); break; }
done
command -v munged >/dev/null || missing+=(munge)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "bench-deps: missing ${missing[*]}: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "bench-deps: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  installed=1
fi

# Where an init system runs them, the packages' postinst may have started the system services: they would hold
# Slurm's default ports. Only right after installing, and only those services: under systemd by their unit
# (its own cgroup); otherwise by the system pid files alone. Never `service ... stop`: the SysV scripts stop
# by executable (`start-stop-daemon --exec /usr/sbin/slurmd`), which would also kill every private Slurm that
# bench.slurm (this user's or another's) is running on the machine.
if [ "$installed" = 1 ]; then
  if command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1; then
    for unit in slurmctld slurmd munge; do
      systemctl disable --now "$unit" >/dev/null 2>&1 || true
    done
  else
    for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
      if [ -f "$pidfile" ] && pid=$(cat "$pidfile") && [ -d "/proc/$pid" ]; then
        echo "bench-deps: stopping the system's $(cat "/proc/$pid/comm") (pid $pid, from $pidfile)"
        kill "$pid" || true
      fi
    done
  fi
fi
