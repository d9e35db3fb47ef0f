#!/usr/bin/env bash
# Installs what the Docker and GPU-placement tests need from Debian: the Docker engine (the tests
# start their own dockerd, see tests/dockerd.py), busybox-static and debootstrap (their images are
# built locally: no registry is needed), and chromium for the dashboard's browser tests (Playwright
# drives it through executable_path: no browser download). Called by .ci/run; a no-op when
# everything is there.
set -euo pipefail

# The host runtime's job user (deploy/install.sh makes it on a real agent): with it, the tests that run jobs
# as another user than the agent's (setpriv, the job's folders, the agent's credential out of reach) run
# instead of being skipped.
if [ "$(id -u)" = 0 ] && ! getent passwd dstack-job >/dev/null && command -v useradd >/dev/null; then
  useradd --system --no-create-home --shell /usr/sbin/nologin dstack-job
fi

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v busybox >/dev/null || missing+=(busybox-static)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v chromium >/dev/null || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "test-deps: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
  msg="test-deps: missing ${missing[*]} (sudo apt-get install ${missing[*]}); the Docker and browser tests will be skipped"
  if [ "${CI:-}" = true ]; then
    echo "${msg/will be skipped/fail under CI}" >&2
    exit 1
  fi
  echo "$msg" >&2
fi
