#!/usr/bin/env bash
# One node, all of its GPUs, one process: JAX drives every local GPU from a single process,
# the batch is split over them by the (data, fsdp) mesh. No torchrun, no jax.distributed.
set -euo pipefail

usage() {
  cat <<'EOF_USAGE'
usage: launch/gpu_single_node.sh [-g GPUS] [-m MEM_FRACTION] -- opera-jax train CONFIG [key=value ...] [--out DIR]

Runs the command with every visible GPU (or the first GPUS of them) in one process.
Install first: pip install -e ".[cuda12]"

  -g GPUS          use the first GPUS GPUs (sets CUDA_VISIBLE_DEVICES; default: all visible)
  -m MEM_FRACTION  share of each GPU's memory JAX may take (default 0.90)
  -h               this help

Environment it sets (each can be overridden by exporting it first):
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.90   JAX preallocates this share of GPU memory once, instead of
                                        growing (fragmentation) -- leave room for NCCL buffers
  XLA_FLAGS+=--xla_gpu_enable_latency_hiding_scheduler=true
                                        overlap the gradient all-reduce (and FSDP all-gathers) with compute
  NCCL_DEBUG=WARN                       NCCL prints only problems
Useful config keys for big models: model.dtype=bfloat16 model.remat=true mesh.fsdp=<GPUS>
optim.grad_cache_chunk=<queries per encoder call>; `opera-jax plan CONFIG --devices <GPUS>` first.
Resume: run the same command with the same --out; the run continues from its latest checkpoint.
EOF_USAGE
}

gpus="" mem="0.90"
while getopts "g:m:h" opt; do
  case "$opt" in
    g) gpus=$OPTARG ;;
    m) mem=$OPTARG ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
if [[ $# -eq 0 ]]; then usage >&2; exit 2; fi

if [[ -n "$gpus" ]]; then
  export CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((gpus - 1)))
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-$mem}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
unset OPERA_COORDINATOR OPERA_DISTRIBUTED
python -c 'import jax; print(f"{jax.device_count()} devices: {jax.devices()[0].device_kind}")'
exec "$@"
