#!/usr/bin/env bash
# One node, all of its GPUs, one process: JAX drives every local GPU from a single process,
# the batch is split over them by the (data, fsdp) mesh. No torchrun, no jax.distributed.
set -euo pipefail

usage() {
  cat <<'EOF_USAGE'
usage: launch/gpu_single_node.sh [-g GPUS] [-m MEM_FRACTION] [--dry-run] -- opera-jax train CONFIG [key=value ...] [--out DIR]

Runs the command with every visible GPU (or the first GPUS of them) in one process.
Install first: pip install -e ".[cuda12]"

  -g GPUS          use the first GPUS GPUs (sets CUDA_VISIBLE_DEVICES; default: all visible)
  -m MEM_FRACTION  share of each GPU's memory JAX may take (default 0.90)
  --dry-run        print the commands, one per line with the environment each gets, and run nothing
  -h, --help       this help

Environment it sets (each can be overridden by exporting it first):
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.90   JAX preallocates this share of GPU memory once, instead of
                                        growing (fragmentation) -- leave room for NCCL buffers
  XLA_FLAGS+=--xla_gpu_enable_latency_hiding_scheduler=true
                                        overlap the gradient all-reduce (and FSDP all-gathers) with compute
  NCCL_DEBUG=WARN                       NCCL prints only problems
and it unsets OPERA_COORDINATOR and OPERA_DISTRIBUTED: this is one process, never a distributed job.
Useful config keys for big models: model.dtype=bfloat16 model.remat=true mesh.fsdp=<GPUS>
optim.grad_cache_chunk=<queries per encoder call>; `opera-jax plan CONFIG --devices <GPUS>` first.
Resume: run the same command with the same --out; the run continues from its latest checkpoint.
EOF_USAGE
}

fail() { echo "gpu_single_node.sh: $*" >&2; exit 2; }

# shellcheck source=launch/common.sh
. "$(dirname "$0")/common.sh"  # show

gpus="" mem="0.90" dry_run=0
while getopts ":g:m:h-:" opt; do
  case "$opt" in
    g) gpus=$OPTARG ;;
    m) mem=$OPTARG ;;
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
if [[ $# -eq 0 ]]; then fail "no command given (see --help)"; fi
if [[ -n "$gpus" && ! "$gpus" =~ ^[1-9][0-9]*$ ]]; then fail "-g wants a number of GPUs, got '$gpus'"; fi
if [[ ! "$mem" =~ ^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$ ]]; then fail "-m wants a fraction in (0, 1], got '$mem'"; fi

environment=(-u OPERA_COORDINATOR -u OPERA_DISTRIBUTED)
if [[ -n "$gpus" ]]; then environment+=("CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((gpus - 1)))"); fi
environment+=(
  "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-$mem}"
  "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true"
  "NCCL_DEBUG=${NCCL_DEBUG:-WARN}"
)
check=(env "${environment[@]}" python -c 'import jax; print(f"{jax.device_count()} devices: {jax.devices()[0].device_kind}")')
job=(env "${environment[@]}" "$@")
if ((dry_run)); then
  show "${check[@]}"
  show "${job[@]}"
  exit 0
fi
"${check[@]}"
exec "${job[@]}"
