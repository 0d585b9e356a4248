#!/usr/bin/env bash
# N processes on 127.0.0.1, each with its own simulated CPU devices, joined by jax.distributed.
# The multi-host path we can run on one machine (and the one the tests use).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/local_multiprocess.sh [-n PROCESSES] [-d DEVICES] [-p PORT] -- COMMAND [ARGS ...]

Runs COMMAND (e.g. `opera-jax train configs/quickstart.yaml --out runs/mp`) as PROCESSES
processes on this machine, each seeing DEVICES simulated CPU devices, joined into one
jax.distributed job with a coordinator on 127.0.0.1:PORT. Process i's output lines are
prefixed with "[i]".

  -n PROCESSES   number of processes (default 2)
  -d DEVICES     simulated CPU devices per process (default 2)
  -p PORT        coordinator port (default: a free one)
  -h, --help     this help

Environment each process gets (what opera_jax.distributed.initialize reads):
  OPERA_COORDINATOR=127.0.0.1:PORT  OPERA_NUM_PROCESSES=N  OPERA_PROCESS_ID=i
  JAX_PLATFORMS=cpu  XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES
  OPERA_HEARTBEAT_S (passed through if set): seconds before the others give up on a dead process

OPERA_STOP_GRACE_S (default 5): when one process fails, the others get SIGTERM and, this many
seconds later, SIGKILL (jax.distributed's preemption service catches SIGTERM, so without it a
survivor would wait out the heartbeat timeout).

If any process exits with an error, the others are stopped and this script exits with
that process's status: a failure on one process never leaves the rest hanging.
EOF
}

fail() { echo "local_multiprocess.sh: $*" >&2; exit 2; }

procs=2 devices=2 port=""
while getopts ":n:d:p:h-:" opt; do
  case "$opt" in
    n) procs=$OPTARG ;;
    d) devices=$OPTARG ;;
    p) port=$OPTARG ;;
    h) usage; exit 0 ;;
    -) if [[ "$OPTARG" == help ]]; then usage; exit 0; fi
       fail "unknown option --$OPTARG (see --help)" ;;
    :) fail "option -$OPTARG needs a value (see --help)" ;;
    *) fail "unknown option -$OPTARG (see --help)" ;;
  esac
done
shift $((OPTIND - 1))
if [[ $# -eq 0 ]]; then fail "no command given; usage: launch/local_multiprocess.sh [-n PROCESSES] [-d DEVICES] [-p PORT] -- COMMAND (see --help)"; fi
for v in "$procs" "$devices"; do
  if [[ ! "$v" =~ ^[1-9][0-9]*$ ]]; then fail "-n and -d want positive numbers, got '$v'"; fi
done
if [[ -z "$port" ]]; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

pids=()
grace=${OPERA_STOP_GRACE_S:-5}
if [[ ! "$grace" =~ ^[0-9]+$ ]]; then fail "OPERA_STOP_GRACE_S wants a whole number of seconds, got '$grace'"; fi
# SIGTERM, then SIGKILL for whoever is still there after $grace seconds: jax.distributed's
# preemption service takes SIGTERM as a notice and keeps going.
stop_all() {
  local pid alive t
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for ((t = 0; t < grace * 10; t++)); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < procs; i++)); do
  (
    export OPERA_COORDINATOR="127.0.0.1:$port" OPERA_NUM_PROCESSES="$procs" OPERA_PROCESS_ID="$i"
    export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"
    exec "$@" > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2)
  ) &
  pids+=($!)
done

status=0
for ((left = procs; left > 0; left--)); do
  code=0
  wait -n || code=$?
  if ((code == 0)); then continue; fi
  status=$code
  echo "local_multiprocess: a process exited with status $status; stopping the others" >&2
  stop_all
  break
done
wait || true
exit "$status"
