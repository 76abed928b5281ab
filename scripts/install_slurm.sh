#!/usr/bin/env bash
# Install what tests/test_slurm.py's one-node SLURM cluster needs (Debian packages: slurm-wlm, slurmdbd,
# munge, mariadb-server), as root and only when something is missing. Safe to run any number of times.
# The packages' own services are not started: tests/slurm_cluster.py starts daemons of its own.
set -euo pipefail
need=()
for prog in munged slurmctld slurmd slurmdbd sbatch mariadbd; do
  command -v "$prog" >/dev/null 2>&1 || [ -x "/usr/sbin/$prog" ] || need+=("$prog")
done
if [ "${#need[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm: missing ${need[*]}; installing needs root and apt-get (Debian): skipped" >&2
  exit 0
fi
echo "install_slurm: installing slurm-wlm slurmdbd munge mariadb-server (missing: ${need[*]})" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm slurmdbd munge mariadb-server >/dev/null
