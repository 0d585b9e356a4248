# shellcheck shell=bash
# Shared by the launch scripts that run in place (gpu_single_node.sh, tpu_vm.sh); sourced, not run.
# slurm_multinode.sbatch keeps its own copy: sbatch runs a copy of the script from a spool directory.

# A command as one shell line: words that need quoting are single-quoted.
show() {
  local word line=""
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_.,:/=@%+-]+$ ]]; then line+=" $word"; else line+=" ${word@Q}"; fi
  done
  echo "${line# }"
}
