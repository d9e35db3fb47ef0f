#!/usr/bin/env bash
# Installs dstack from this checkout into /opt/dstack/venv and enables its systemd unit.
#
#   deploy/install.sh coordinator [HOST [PORT]] [SERVER OPTIONS...]
#   deploy/install.sh agent COORDINATOR:PORT [--join-token-file FILE] [--ca-fingerprint SHA256:...] [AGENT OPTIONS...]
#
# SERVER OPTIONS are `dstack server`'s (e.g. --storage s3://BUCKET/PREFIX --retention-days 30);
# AGENT OPTIONS are `dstack agent`'s (e.g. --name gpu-7 --runtime docker --docker-image-cuda IMAGE).
# They are kept in /etc/dstack/{coordinator,agent}.env; values may not contain spaces or quotes.
#
# The agent's join token never goes on the command line (`ps` and shell history show it): it comes
# from DSTACK_JOIN_TOKEN, from --join-token-file FILE, or from a prompt, and is kept in
# /etc/dstack/agent.env (0600).
#
# TLS: the coordinator makes its own CA on first start and this script prints its fingerprint; give
# it to each agent with --ca-fingerprint SHA256:... (or DSTACK_CA_FINGERPRINT), or give the CA file
# with --ca-file FILE (copied to /etc/dstack/coordinator-ca.pem). --insecure (both sides) is plaintext.
#
# Environment: DSTACK_PYTHON, the interpreter (default python3; 3.11 or newer);
# DSTACK_INSTALL_DRY_RUN=1: run the checks and print what would be done; change nothing, no root needed.
set -euo pipefail

VENV=/opt/dstack/venv
ETC=/etc/dstack
TOOLKIT_GUIDE=https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/install-guide.html
CUDA_IMAGE=nvidia/cuda:12.4.1-base-ubuntu22.04 # the agent's default --docker-image-cuda

say() { printf 'install.sh: %s\n' "$*" >&2; }
die() {
  say "$@"
  exit 1
}
usage() {
  sed -n '4,5p' "$0" | sed 's/^# *//' >&2
  exit 2
}

dry=${DSTACK_INSTALL_DRY_RUN:-0}
# Every change goes through run or set_env: a dry run prints it instead.
run() {
  if [ "$dry" = 1 ]; then
    printf 'would run: %s\n' "$*"
  else
    "$@"
  fi
}

# set_env FILE SECRET_KEY KEY=VALUE...: sets these keys in FILE (0600), keeping its other lines (e.g.
# AWS_* added by hand). A dry run names the keys but never prints SECRET_KEY's value.
set_env() {
  local file=$1 secret=$2 kv keys=() key
  shift 2
  for kv in "$@"; do keys+=("${kv%%=*}"); done
  if [ "$dry" = 1 ]; then
    for kv in "$@"; do
      key=${kv%%=*}
      if [ "$key" = "$secret" ]; then printf 'would set in %s: %s=***\n' "$file" "$key"; else printf 'would set in %s: %s\n' "$file" "$kv"; fi
    done
    return
  fi
  local tmp
  tmp=$(umask 077 && mktemp "$file.XXXXXX")
  if [ -f "$file" ]; then
    local pattern
    pattern="^($(
      IFS='|'
      echo "${keys[*]}"
    ))="
    grep -Ev "$pattern" "$file" >"$tmp" || true
  fi
  for kv in "$@"; do printf '%s\n' "$kv" >>"$tmp"; done
  chmod 0600 "$tmp"
  mv "$tmp" "$file"
}

# Options go into one systemd variable, split on spaces when the unit starts.
join_options() {
  local o
  for o in "$@"; do
    case $o in
      *[[:space:]\"\'\\\$]*) die "option '$o': values with spaces, quotes, \\ or \$ cannot be kept in the unit's environment file" ;;
    esac
  done
  printf '%s' "$*"
}

check_python() {
  py=${DSTACK_PYTHON:-python3}
  command -v "$py" >/dev/null 2>&1 ||
    die "no $py found: dstack needs Python 3.11 or newer (Debian 12 and Ubuntu 24.04 ship it: apt-get install python3)"
  py_version=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || py_version=""
  [[ $py_version =~ ^([0-9]+)\.([0-9]+)$ ]] || die "cannot tell the version of $py"
  local major=${BASH_REMATCH[1]} minor=${BASH_REMATCH[2]}
  if ((major < 3 || (major == 3 && minor < 11))); then
    die "dstack needs Python 3.11 or newer, and $py is $py_version. Debian 12 and Ubuntu 24.04 ship 3.11+;" \
      "elsewhere install a newer Python and run with DSTACK_PYTHON=python3.11 (or newer)."
  fi
  say "Python: $py ($py_version)"
}

check_venv_module() {
  if "$py" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    return
  fi
  command -v apt-get >/dev/null 2>&1 || die "$py has no venv/ensurepip module: install it with your package manager"
  need_venv_package="python$py_version-venv"
}

docker_installed() { command -v docker >/dev/null 2>&1 || command -v dockerd >/dev/null 2>&1; }

# GPUs, and what jobs need to use them in the runtime the agent will pick.
check_gpus() {
  local runtime=$1 gpus count
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    say "no NVIDIA driver here (no nvidia-smi): the agent will report no GPUs"
    return
  fi
  if ! gpus=$(nvidia-smi -L 2>&1); then
    say "nvidia-smi failed ($gpus): the agent will report no GPUs until the driver works"
    return
  fi
  count=$(grep -c '^GPU ' <<<"$gpus" || true)
  if [ "$count" = 0 ]; then
    say "nvidia-smi lists no GPUs: the agent will report none"
    return
  fi
  say "$count NVIDIA GPU(s) found"
  case $runtime in
    host | null) return ;;
    auto) docker_installed || return ;; # `auto` picks Docker when its engine answers at start
  esac
  if ! command -v nvidia-ctk >/dev/null 2>&1 && ! command -v nvidia-container-runtime >/dev/null 2>&1; then
    die "this host has GPUs and jobs will run in Docker (--runtime $runtime), but the NVIDIA container" \
      "toolkit is missing (no nvidia-ctk or nvidia-container-runtime), so GPU jobs could not start. Install it" \
      "($TOOLKIT_GUIDE): add NVIDIA's apt repository, then" \
      "'apt-get update && apt-get install -y nvidia-container-toolkit && nvidia-ctk runtime configure --runtime=docker" \
      "&& systemctl restart docker'; check with 'docker run --rm --gpus all $CUDA_IMAGE nvidia-smi'." \
      "Or run jobs as host processes: add --runtime host."
  fi
  say "NVIDIA container toolkit: $(command -v nvidia-ctk || command -v nvidia-container-runtime)"
}

explain_runtime() {
  local runtime=$1
  case $runtime in
    host) say "runtime: host (jobs run as host processes, with cgroup v1 limits where writable)" ;;
    null) say "runtime: null (jobs do not run; for tests)" ;;
    auto | docker)
      if [ "$runtime" = auto ] && ! docker_installed; then
        say "runtime: auto, and Docker is not installed: jobs run as host processes (install Docker and" \
          "restart dstack-agent to run them in containers; docker-provider jobs need it)"
        return
      fi
      say "runtime: $runtime (jobs run in Docker containers). Jobs that name no image run in" \
        "debian:bookworm-slim, python:{version}-slim (python provider) or $CUDA_IMAGE (GPU jobs); change" \
        "them with --docker-image-bash, --docker-image-python, --docker-image-cuda. Images are pulled on first" \
        "use (the job shows 'pulling'); 'docker pull' them now to save that wait, and 'docker login' as root" \
        "for private registries."
      ;;
  esac
}

install_venv() {
  if [ -n "${need_venv_package:-}" ]; then
    run apt-get update -q
    run apt-get install -y -q "$need_venv_package"
  fi
  run "$py" -m venv "$VENV"
  run "$VENV/bin/pip" install -q "$src"
  run install -d -m 0755 "$ETC"
}

enable_unit() {
  command -v systemctl >/dev/null 2>&1 || [ "$dry" = 1 ] || die "no systemctl: start $VENV/bin/dstack by other means"
  run install -m 0644 "$src/deploy/systemd/$1.service" /etc/systemd/system/
  run systemctl daemon-reload
  run systemctl enable --now "$1"
}

install_coordinator() {
  local host=0.0.0.0 port=3000
  if [ $# -gt 0 ] && [[ $1 != -* ]]; then
    host=$1
    shift
  fi
  if [ $# -gt 0 ] && [[ $1 != -* ]]; then
    port=$1
    shift
  fi
  [[ $port =~ ^[0-9]+$ ]] || die "PORT must be a number, not '$port'"
  local options
  options=$(join_options "$@")
  check_python
  check_venv_module
  install_venv
  if ! id dstack >/dev/null 2>&1; then
    run useradd --system --home /var/lib/dstack --shell /usr/sbin/nologin dstack
  fi
  set_env "$ETC/coordinator.env" "" "DSTACK_HOST=$host" "DSTACK_PORT=$port" "DSTACK_SERVER_ARGS=\"$options\""
  enable_unit dstack-coordinator
  say "tokens: /var/lib/dstack/server/admin-token and /var/lib/dstack/server/join-token"
  say "one join token per GPU host, used once and expiring: dstack join-tokens create --ttl 24h --uses 1" \
    "(admin token); revoke the server's own with: dstack join-tokens revoke default"
  say "to approve each new agent before it gets jobs, add --approve-agents to DSTACK_SERVER_ARGS in $ETC/coordinator.env"
  case " $options " in
    *" --insecure "*)
      say "WARNING: --insecure: the coordinator serves PLAINTEXT; tokens and secrets cross the network readable" \
        "by anyone on the path. Agents and CLIs need --insecure too."
      ;;
    *" --tls-cert "*) say "TLS: the coordinator serves your --tls-cert; agents and CLIs verify it with --ca-file CA.pem" ;;
    *) print_fingerprint "$port" ;;
  esac
  say "S3 storage: --storage s3://BUCKET/PREFIX, with AWS_* credentials added to $ETC/coordinator.env (see docs/storage.md)"
}

# The fingerprint of the CA the coordinator makes on its first start: what agents and CLIs pin.
print_fingerprint() {
  local port=$1 ca=/var/lib/dstack/server/tls/ca.pem fp="" tries=0
  if [ "$dry" = 1 ]; then
    say "would print the fingerprint of $ca (the CA the coordinator makes on its first start)"
    return
  fi
  while [ ! -s "$ca" ] && [ "$tries" -lt 100 ]; do
    sleep 0.2
    tries=$((tries + 1))
  done
  fp=$("$VENV/bin/python" -m dstack.coordinator.tls fingerprint "$ca" 2>/dev/null) ||
    die "the coordinator made no CA in $ca yet: see 'journalctl -u dstack-coordinator'"
  say "TLS CA fingerprint: $fp"
  say "agents: DSTACK_JOIN_TOKEN=... deploy/install.sh agent $(hostname):$port --ca-fingerprint $fp"
  say "users:  dstack config --coordinator $(hostname):$port --ca-fingerprint $fp"
}

install_agent() {
  if [ $# -lt 1 ] || [[ $1 == -* ]]; then usage; fi
  local coordinator=$1 token_file="" runtime=auto options=() token="" ca_file="" tls=""
  shift
  while [ $# -gt 0 ]; do
    case $1 in
      --ca-file)
        [ $# -ge 2 ] || die "--ca-file needs a FILE"
        ca_file=$2
        shift 2
        ;;
      --ca-file=*) ca_file=${1#*=}; shift ;;
      --ca-fingerprint)
        [ $# -ge 2 ] || die "--ca-fingerprint needs a value: SHA256:... as the coordinator's install printed it"
        tls=pinned
        options+=("$1" "$2")
        shift 2
        ;;
      --ca-fingerprint=*) tls=pinned; options+=("$1"); shift ;;
      --insecure) tls=insecure; options+=("$1"); shift ;;
      --join-token-file)
        [ $# -ge 2 ] || die "--join-token-file needs a FILE"
        token_file=$2
        shift 2
        ;;
      --join-token-file=*) token_file=${1#*=}; shift ;;
      --join-token | --join-token=* | --token | --token=*)
        die "do not pass the join token on the command line (ps and shell history show it): export" \
          "DSTACK_JOIN_TOKEN, or use --join-token-file FILE, or give no token and type it when asked" ;;
      --runtime)
        [ $# -ge 2 ] || die "--runtime needs a value: auto, docker or host"
        runtime=$2
        options+=("$1" "$2")
        shift 2
        ;;
      --runtime=*) runtime=${1#*=}; options+=("$1"); shift ;;
      --*=*)
        options+=("$1")
        shift
        ;;
      -*) # every `dstack agent` option takes a value
        if [ $# -ge 2 ] && [[ $2 != -* ]]; then
          options+=("$1" "$2")
          shift 2
        else
          options+=("$1")
          shift
        fi
        ;;
      *)
        die "unexpected argument '$1': the join token is not an argument any more (ps and shell history" \
          "show arguments); export DSTACK_JOIN_TOKEN or use --join-token-file FILE" ;;
    esac
  done
  case $runtime in
    auto | host | null) ;;
    docker) docker_installed || die "--runtime docker, but Docker is not installed (e.g. apt-get install docker.io)" ;;
    *) die "--runtime must be auto, docker or host, not '$runtime'" ;;
  esac
  if [ -n "$ca_file" ]; then
    [ -r "$ca_file" ] || die "cannot read the CA file $ca_file"
    tls=pinned
    options+=(--ca-file "$ETC/coordinator-ca.pem")
  fi
  local ca_env=()
  if [ -z "$tls" ] && [ -n "${DSTACK_CA_FINGERPRINT:-}" ]; then
    tls=pinned
    ca_env=("DSTACK_CA_FINGERPRINT=$DSTACK_CA_FINGERPRINT")
  fi
  case $tls in
    insecure) say "WARNING: --insecure: the agent's credential, its jobs and their secrets cross the network in PLAINTEXT" ;;
    pinned) ;;
    *) say "no --ca-fingerprint or --ca-file: the agent checks the coordinator's certificate against this host's CA" \
      "certificates, which only knows a --tls-cert from a public CA; for the coordinator's own CA pass" \
      "--ca-fingerprint SHA256:... (printed when the coordinator was installed, and by 'dstack server')" ;;
  esac
  local joined
  joined=$(join_options "${options[@]+"${options[@]}"}")
  if [ -n "$token_file" ]; then
    [ -r "$token_file" ] || die "cannot read the join token file $token_file"
    token=$(<"$token_file")
  elif [ -n "${DSTACK_JOIN_TOKEN:-}" ]; then
    token=$DSTACK_JOIN_TOKEN
  elif [ -t 0 ]; then
    read -rsp "join token (printed by dstack server; in STATE_DIR/join-token): " token
    echo >&2
  fi
  token=${token//[[:space:]]/}
  [ -n "$token" ] || die "no join token: export DSTACK_JOIN_TOKEN, or use --join-token-file FILE"
  check_python
  check_venv_module
  check_gpus "$runtime"
  explain_runtime "$runtime"
  install_venv
  if [ -n "$ca_file" ]; then
    run install -m 0644 "$ca_file" "$ETC/coordinator-ca.pem"
  fi
  # The agent runs as root (GPUs, cgroups, Docker); host-process jobs run as dstack-job, an
  # unprivileged user that cannot read the agent's credential (`dstack agent --job-user`).
  if ! id dstack-job >/dev/null 2>&1; then
    run useradd --system --no-create-home --shell /usr/sbin/nologin dstack-job
  fi
  set_env "$ETC/agent.env" DSTACK_JOIN_TOKEN "DSTACK_COORDINATOR=$coordinator" "DSTACK_JOIN_TOKEN=$token" \
    "DSTACK_AGENT_ARGS=\"$joined\"" "${ca_env[@]+"${ca_env[@]}"}"
  enable_unit dstack-agent
  say "the agent registers once with the join token, then keeps its own credential in /var/lib/dstack/agent/agent.json"
  say "an admin lists it with dstack agents, and removes it with dstack agents remove NAME (its credential is revoked)"
}

main() {
  local role=${1:-}
  [ -n "$role" ] || usage
  shift
  src=$(cd "$(dirname "$0")/.." && pwd)
  if [ "$dry" != 1 ] && [ "$(id -u)" != 0 ]; then
    die "run as root (or DSTACK_INSTALL_DRY_RUN=1 to check only)"
  fi
  case "$role" in
    coordinator) install_coordinator "$@" ;;
    agent) install_agent "$@" ;;
    -h | --help) usage ;;
    *) die "unknown role $role (coordinator or agent)" ;;
  esac
}

# Sourced (by the tests), it only defines the functions.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  main "$@"
fi
