"""The matmul kernels alone: XLA:CPU against PyTorch on the encoder's feed-forward dots.

    taskset -c 0 python benchmarks/matmul_chain.py [--tokens 16384] [--layers 6] [--repeats 7]

A chain of ``layers`` x (``[tokens, 384] @ [384, 1536]``, then ``@ [1536, 384]``), MiniLM's
feed-forward shapes, f32, 1 thread: jitted as one function on the JAX side (so the dots run as
they do inside the train step), eager on the PyTorch side. Each side runs in its own child process,
one after the other within the same minute; reported: GFLOP/s (best and median of ``repeats``)
and the ratio JAX over PyTorch. Used in ``benchmarks/README.md`` to tell the matmul kernels' share of
the train step's gap from the rest of the step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HIDDEN, INTERMEDIATE = 384, 1536


def _child(side: str, tokens: int, layers: int, repeats: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens, HIDDEN), dtype=np.float32)
    up = [rng.standard_normal((HIDDEN, INTERMEDIATE), dtype=np.float32) * 0.05 for _ in range(layers)]
    down = [rng.standard_normal((INTERMEDIATE, HIDDEN), dtype=np.float32) * 0.05 for _ in range(layers)]

    def chain(y, up, down):
        for a, b in zip(up, down):
            y = (y @ a) @ b
        return y

    if side == "jax":
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax

        f = jax.jit(chain)
        args = jax.device_put((x, up, down))
        run = lambda: f(*args).block_until_ready()
    else:
        import torch

        torch.set_num_threads(1)
        args = (torch.from_numpy(x), [torch.from_numpy(a) for a in up], [torch.from_numpy(b) for b in down])
        run = lambda: chain(*args)
    run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    flops = layers * 2 * (2 * tokens * HIDDEN * INTERMEDIATE)
    times.sort()
    return {
        "best_gflops": round(flops / times[0] / 1e9, 1),
        "median_gflops": round(flops / times[len(times) // 2] / 1e9, 1),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        if args.child == "jax":
            from opera_jax.cli import prepare_process

            prepare_process()  # as the opera-jax command runs (re-executes this child once)
        print(json.dumps(_child(args.child, args.tokens, args.layers, args.repeats)))
        return {}
    cpus = sorted(os.sched_getaffinity(0))[:1]  # one thread, one core, both sides
    results = {}
    for side in ("jax", "torch"):
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            side,
            "--tokens",
            str(args.tokens),
            "--layers",
            str(args.layers),
            "--repeats",
            str(args.repeats),
        ]
        out = subprocess.run(
            cmd, check=True, capture_output=True, text=True, preexec_fn=lambda: os.sched_setaffinity(0, cpus)
        )
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    results["ratio_median"] = round(results["jax"]["median_gflops"] / results["torch"]["median_gflops"], 3)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
