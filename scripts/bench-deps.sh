#!/usr/bin/env bash
# Installs what the benchmarks' yardsticks need from Debian/Ubuntu: Slurm (slurm-wlm: slurmctld, slurmd,
# sbatch, srun, squeue, scontrol) and munge, for `python -m bench.slurm`. Only run on request (the
# benches never install anything); a no-op when everything is there. The packages' own services are
# not wanted: bench.slurm starts a private munged/slurmctld/slurmd with its own key, ports and state,
# so this stops and disables any system slurm/munge service the install may have started.
set -euo pipefail

missing=()
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
fi

# A system service started by the packages (where an init system runs them) would hold Slurm's default
# ports and a munge socket the bench does not use: stop it and keep it from starting at boot.
for svc in slurmctld slurmd munge; do
  if command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1; then
    systemctl disable --now "$svc" >/dev/null 2>&1 || true
  elif command -v service >/dev/null && [ -x "/etc/init.d/$svc" ]; then
    service "$svc" stop >/dev/null 2>&1 || true
  fi
done
