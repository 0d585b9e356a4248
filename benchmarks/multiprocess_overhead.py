"""Time per train step of P processes x D CPU devices against 1 process x P*D devices, same config.

    python benchmarks/multiprocess_overhead.py [--processes 2] [--devices 2] [--steps 40] [--out OUT]

Both runs train the tiny test BERT (``tests/golden/tiny_bert``) with DP on MED, global batch 8,
through ``opera-jax train``; the multi-process one through ``launch/local_multiprocess.sh``
(jax.distributed on 127.0.0.1, Gloo collectives between processes). Seconds per step are read
from each run's ``train_log.jsonl`` (``log_every=1``; compilation excluded); the first steps
(warm-up) are dropped and the median is reported. The ratio multi/single is the price of
crossing process boundaries for the step's collectives on one machine; on a real cluster it is
the interconnect's instead. To say whether that price is what it should be, the script also reads
the collectives of the compiled step and the number of arrays (operands) each one carries, and times,
under the same launcher (``--probe``), a bare cross-process all-reduce of one array and one of as many
arrays as the step's largest (the gradients' tuple all-reduce). XLA:CPU's Gloo collectives move each
operand of a tuple collective as its own exchange, so the expected overhead is
sum over collectives of (t_1 + (operands - 1) * per-operand cost), less what the same collectives
cost inside one process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _train_args(out: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "opera_jax.cli",
        "train",
        str(ROOT / "configs" / "quickstart.yaml"),
        f"model.name={ROOT / 'tests' / 'golden' / 'tiny_bert'}",
        "model.pooling=mean",
        "model.normalize=true",
        "data.path=med",
        "data.query_max_len=16",
        "data.passage_max_len=32",
        "data.eval_batch_size=64",
        "optim.batch_size=8",
        f"optim.max_steps={steps}",
        "train.eval_every=0",
        f"train.checkpoint_every={steps}",
        "train.log_every=1",
        "mining.rank_start=0",
        "mining.rank_end=20",
        "mining.num_negatives=8",
        "method.name=dp",
        "--out",
        str(out),
    ]


def _seconds_per_step(run: Path, skip: int) -> list[float]:
    rows = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    return [r["steps"] * 8 / r["examples_per_s"] for r in rows[skip:]]


def probe(operands: int, calls: int = 30) -> None:
    """Under the launcher: median seconds of one jitted cross-process all-reduce of 1 and of ``operands`` arrays."""
    import jax
    import numpy as np

    from opera_jax.distributed import initialize
    from opera_jax.sharding import batch_sharding, make_mesh, put_global

    initialize()
    mesh = make_mesh()
    result = {}
    for k in (1, operands):
        xs = [put_global(np.ones((jax.device_count(), 64), np.float32), batch_sharding(mesh)) for _ in range(k)]
        total = jax.jit(lambda arrays: [a.sum(0) for a in arrays])  # XLA combines these into one tuple all-reduce
        jax.block_until_ready(total(xs))
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            jax.block_until_ready(total(xs))
            times.append(time.perf_counter() - t)
        result[str(k)] = statistics.median(times)
    if jax.process_index() == 0:
        print(json.dumps(result))


def collectives_per_step(devices: int) -> list[dict]:
    """The collectives of the compiled train step of the same tiny model (op and operand count), in a child."""
    code = rf"""
import re, json, sys, jax, numpy as np
from flax import nnx
sys.path.insert(0, {str(ROOT / "tests")!r})
from test_train_step import _batch
from opera_jax.models.encoder import load_encoder
from opera_jax.sharding import batch_sharding, replicated, make_mesh
from opera_jax.train.optim import make_optimizer
from opera_jax.train.step import init_state, make_train_step
mesh = make_mesh()
model = load_encoder({str(ROOT / "tests" / "golden" / "tiny_bert")!r}, overrides={{"normalize": True}}).model
model.train()
g, params, rest = nnx.split(model, nnx.Param, ...)
opt = make_optimizer(1e-3, 10, warmup_ratio=0.0)
state = jax.device_put(init_state(params, opt, seed=0), replicated(mesh))
hlo = make_train_step(g, rest, opt, 0.05).lower(state, jax.device_put(_batch(), batch_sharding(mesh))).compile().as_text()
pattern = re.compile(r"= (.*?) (all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(?:-start)?\(")
found = []
for line in hlo.splitlines():
    m = pattern.search(line)
    if m:
        found.append({{"op": m.group(2), "operands": len(re.findall(r"[a-z]+[0-9]*\[[0-9,]*\]", m.group(1)))}})
print(json.dumps(found))
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices", type=int, default=2, help="CPU devices per process")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--probe", type=int, default=None, help=argparse.SUPPRESS)  # the child mode, see probe()
    args = p.parse_args(argv)
    if args.probe is not None:
        probe(args.probe)
        return {}
    total = args.processes * args.devices
    launcher = [
        "bash",
        str(ROOT / "launch" / "local_multiprocess.sh"),
        "-n",
        str(args.processes),
        "-d",
        str(args.devices),
        "--",
    ]
    collectives = collectives_per_step(total)
    widest = max(c["operands"] for c in collectives)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "OPERA_CACHE_DIR": str(tmp / "cache")}
        single = {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={total}"}
        subprocess.run(
            _train_args(tmp / "single", args.steps), env=single, check=True, cwd=ROOT, stdout=subprocess.DEVNULL
        )
        subprocess.run(
            [*launcher, *_train_args(tmp / "multi", args.steps)],
            env=env,
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        one = _seconds_per_step(tmp / "single", args.skip)
        many = _seconds_per_step(tmp / "multi", args.skip)
        probe_args = [sys.executable, __file__, "--probe", str(widest)]
        out = subprocess.run([*launcher, *probe_args], env=env, check=True, cwd=ROOT, capture_output=True, text=True)
        cross = json.loads(out.stdout.strip().splitlines()[-1].split("] ", 1)[1])
        out = subprocess.run(probe_args, env=single, check=True, cwd=ROOT, capture_output=True, text=True)
        local = json.loads(out.stdout.strip().splitlines()[-1])

    def cost(times: dict) -> float:
        """Seconds the step's collectives take at these latencies: t_1 each, plus the per-operand cost."""
        t1, tw = times["1"], times[str(widest)]
        per_operand = (tw - t1) / (widest - 1) if widest > 1 else 0.0
        return sum(t1 + (c["operands"] - 1) * per_operand for c in collectives)

    result = {
        "setup": {
            "processes": args.processes,
            "devices_per_process": args.devices,
            "steps": args.steps,
            "skipped": args.skip,
            "cpus": os.cpu_count(),
        },
        "single_process_s_per_step": round(statistics.median(one), 4),
        "multi_process_s_per_step": round(statistics.median(many), 4),
    }
    result["ratio_multi_over_single"] = round(
        result["multi_process_s_per_step"] / result["single_process_s_per_step"], 3
    )
    result["collectives_per_step"] = collectives
    result["all_reduce_s"] = {
        "cross_process": {k: round(v, 5) for k, v in cross.items()},
        "one_process": {k: round(v, 5) for k, v in local.items()},
    }
    result["expected_overhead_s"] = round(cost(cross) - cost(local), 4)
    result["measured_overhead_s"] = round(result["multi_process_s_per_step"] - result["single_process_s_per_step"], 4)
    print(json.dumps(result, indent=2))
    if args.out:
        from opera_jax.io_utils import write_json

        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
