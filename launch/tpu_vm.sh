#!/usr/bin/env bash
# Cloud TPU VM: create (or reuse) a TPU VM slice, install opera-jax on every worker, stage the data,
# run the same command on all workers, collect the outputs, and tear down.
set -euo pipefail

usage() {
  cat <<'EOF_USAGE'
usage: launch/tpu_vm.sh -n NAME -z ZONE [-t TYPE] [-v VERSION] [-p PROJECT] [-d DATA_DIR] [-o OUT_DIR] [-k] [-s]
                        [--dry-run] -- opera-jax train CONFIG [key=value ...] --out REMOTE_RUN_DIR

  -n NAME      TPU VM name (reused if it exists)
  -z ZONE      zone, e.g. us-west4-a (v5e) or us-central2-b (v4)
  -t TYPE      accelerator type when creating (default v5litepod-8; v5litepod-16 = 4 hosts x 4 chips)
  -v VERSION   runtime when creating (default v2-alpha-tpuv5-lite, the v5e runtime)
  -p PROJECT   gcloud project (default: gcloud's configured one)
  -d DATA_DIR  local BEIR-layout collections to copy to every worker (default ../shared/data);
               a gs:// URL is copied with `gcloud storage cp` on the workers instead
  -o OUT_DIR   where the run directory from worker 0 is copied back (default runs/tpu)
  -k           keep a VM this call created (default: delete it when the run ends, even on failure;
               a VM that existed before is never deleted)
  -s           skip installation (workers already set up by an earlier call)
  --dry-run    print every command it would run (gcloud, git, ...), one per line, for a VM that does
               not exist yet, and run nothing; the environment of the run is in the last ssh's --command
  -h, --help   this help

What happens:
  1. gcloud compute tpus tpu-vm create NAME (unless it exists);
  2. this checkout's committed HEAD (git archive) is copied to ~/opera-jax on all workers (--worker=all) and installed with
     pip install -e ".[tpu]" into ~/opera-jax/.venv;
  3. the data is staged to ~/opera-data on every worker (OPERA_DATA_DIR points there);
  4. the command runs on all workers at once with OPERA_DISTRIBUTED=auto and
     OPERA_DATA_DIR=$HOME/opera-data: jax.distributed finds
     the coordinator and the process ids from the TPU metadata, each host reads its slice of every
     batch, process 0 writes metrics, checkpoints are coordinated by Orbax;
  5. worker 0's run directory is copied back to OUT_DIR; 6. a VM created here is deleted (unless -k).
Use a gs:// --out (Orbax writes there from every host) for runs you want to resume after the VM
is gone; resume = the same command with the same --out.
Requires: gcloud, authenticated, with the TPU API enabled.
EOF_USAGE
}

fail() { echo "tpu_vm.sh: $*" >&2; exit 2; }

# shellcheck source=launch/common.sh
. "$(dirname "$0")/common.sh"  # show

name="" zone="" type="v5litepod-8" version="v2-alpha-tpuv5-lite" project="" data="../shared/data" out="runs/tpu"
keep=0 skip_install=0 dry_run=0
while getopts ":n:z:t:v:p:d:o:ksh-:" opt; do
  case "$opt" in
    n) name=$OPTARG ;; z) zone=$OPTARG ;; t) type=$OPTARG ;; v) version=$OPTARG ;; p) project=$OPTARG ;;
    d) data=$OPTARG ;; o) out=$OPTARG ;; k) keep=1 ;; s) skip_install=1 ;;
    h) usage; exit 0 ;;
    -) case "$OPTARG" in
         help) usage; exit 0 ;;
         dry-run) dry_run=1 ;;
         *) fail "unknown option --$OPTARG (see --help)" ;;
       esac ;;
    :) fail "option -$OPTARG needs a value (see --help)" ;;
    *) fail "unknown option -$OPTARG (see --help)" ;;
  esac
done
shift $((OPTIND - 1))
if [[ -z "$name" ]]; then fail "-n NAME is required (see --help)"; fi
if [[ -z "$zone" ]]; then fail "-z ZONE is required (see --help)"; fi
if [[ $# -eq 0 ]]; then fail "no command given (see --help)"; fi
if ((dry_run == 0)); then
  command -v gcloud >/dev/null || fail "gcloud not found: install the Google Cloud SDK (or look first with --dry-run)"
  [[ "$data" == gs://* || -d "$data" ]] || fail "-d $data: no such directory (nor a gs:// URL)"
fi

gc=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
if [[ -n "$project" ]]; then where+=(--project "$project"); fi
run() { if ((dry_run)); then show "$@"; else "$@"; fi; }
on_all() { run "${gc[@]}" ssh "$name" "${where[@]}" --worker=all --command "$1"; }

delete=()
if ((dry_run)); then
  show "${gc[@]}" describe "$name" "${where[@]}"
  echo "# when that finds no VM:"
  exists=0
elif "${gc[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  exists=1
else
  exists=0
fi
if ((exists == 0)); then
  ((dry_run)) || echo "creating $name ($type, $version) in $zone"
  run "${gc[@]}" create "$name" "${where[@]}" --accelerator-type "$type" --version "$version"
  if ((keep == 0)); then  # only a VM this call created is deleted
    delete=("${gc[@]}" delete "$name" "${where[@]}" --quiet)
    ((dry_run)) || trap '"${delete[@]}" || true' EXIT
  fi
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
if ((skip_install == 0)); then
  if ((dry_run)); then tarball=/tmp/tmp.XXXXXXXXXX.tar.gz; else tarball=$(mktemp --suffix .tar.gz); fi
  run git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
  run "${gc[@]}" scp "$tarball" "$name:~/opera-jax.tar.gz" "${where[@]}" --worker=all
  on_all "rm -rf ~/opera-jax && mkdir -p ~/opera-jax && tar -xzf ~/opera-jax.tar.gz -C ~/opera-jax && python3 -m venv ~/opera-jax/.venv && . ~/opera-jax/.venv/bin/activate && pip install -q --upgrade pip && pip install -q -e \"\$HOME/opera-jax[tpu]\""
  run rm -f "$tarball"
fi

if [[ "$data" == gs://* ]]; then
  on_all "mkdir -p ~/opera-data && gcloud storage cp -r '$data/*' ~/opera-data/"
else
  run "${gc[@]}" scp --recurse "$data" "$name:~/opera-data" "${where[@]}" --worker=all
fi

on_all "cd ~/opera-jax && . .venv/bin/activate && env OPERA_DATA_DIR=\$HOME/opera-data OPERA_DISTRIBUTED=auto $(show "$@")"

remote_out=""
prev=""
for arg in "$@"; do
  [[ "$prev" == "--out" ]] && remote_out=$arg
  prev=$arg
done
if [[ -n "$remote_out" && "$remote_out" != gs://* ]]; then
  # shellcheck disable=SC2088  # a path on the worker: its ~, expanded there
  [[ "$remote_out" == /* ]] || remote_out="~/opera-jax/$remote_out"
  run mkdir -p "$out"
  run "${gc[@]}" scp --recurse "$name:$remote_out" "$out" "${where[@]}" --worker=0
  ((dry_run)) || echo "outputs in $out"
fi
if ((dry_run && ${#delete[@]})); then
  echo "# at exit, also after a failure (this call created the VM; -k keeps it):"
  show "${delete[@]}"
fi
