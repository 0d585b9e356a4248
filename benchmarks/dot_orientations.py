"""The train step's dense-layer dots one at a time: XLA:CPU against PyTorch, by orientation.

    taskset -c 0 python benchmarks/dot_orientations.py [--tokens 4096] [--repeats 9] [--threads 1] [--out F.json]

For MiniLM's layer widths (384, 1536) and ``tokens`` rows (4,096 = shape A's passages), f32,
``threads`` threads (PyTorch's ``set_num_threads``; XLA:CPU sizes its pool from the cores the
process may run on, so pin those with ``taskset``): each product timed as XLA:CPU runs it under
opera-jax's flags (``xla_cpu.py``) and as PyTorch (oneDNN) runs the same product, calls interleaved
in one process so both see the same stretch of a noisy machine (medians of ``repeats``). The rows:

- ``forward``: ``x W`` (``[T, din] @ [din, dout]``, contracting ``[1] x [0]``);
- ``input grad``: ``g W^T`` (``[1] x [1]``);
- ``weight grad``: ``x^T g`` as the step computes it, both operands contracted over their token
  dimension (``[0] x [0]``);
- ``weight grad, x^T given``: the same product from an ``x^T`` already laid out ``[din, T]``
  (``[1] x [0]``): what the step would run if the forward pass kept its inputs transposed;
- ``weight grad, transpose + dot``: ``x^T`` materialised first (an optimisation barrier keeps XLA
  from folding the transpose back into the dot), both timed.

Used in ``benchmarks/README.md`` to tell which of the step's dots fall behind PyTorch's kernels.
"""

from __future__ import annotations

import argparse
import os
import time

WIDTHS = ((384, 384), (384, 1536), (1536, 384))  # (din, dout): q/k/v/out, feed-forward up, down


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=1, help="PyTorch's threads (pin the process to as many cores)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    from opera_jax.cpu.xla_flags import use_xla_cpu_flags

    use_xla_cpu_flags()  # the dots as the train step runs them (before jax starts its CPU backend)
    import jax
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    dot = lambda dims: jax.jit(lambda a, b: jax.lax.dot_general(a, b, (dims, ((), ()))))
    plain, times_transposed, weight_grad = dot(((1,), (0,))), dot(((1,), (1,))), dot(((0,), (0,)))
    transposed_then_dot = jax.jit(
        lambda a, b: jax.lax.dot_general(jax.lax.optimization_barrier(a.T), b, (((1,), (0,)), ((), ())))
    )
    rng = np.random.default_rng(0)
    rows = []
    for din, dout in WIDTHS:
        x = rng.standard_normal((args.tokens, din), dtype=np.float32)
        w = rng.standard_normal((din, dout), dtype=np.float32)
        g = rng.standard_normal((args.tokens, dout), dtype=np.float32)
        xt = np.ascontiguousarray(x.T)
        jx, jw, jg, jxt = jax.device_put((x, w, g, xt))
        tx, tw, tg, txt = (torch.from_numpy(a) for a in (x, w, g, xt))

        cases = {  # name: (XLA call, PyTorch call)
            "forward": (lambda: plain(jx, jw), lambda: tx @ tw),
            "input grad": (lambda: times_transposed(jg, jw), lambda: tg @ tw.t()),
            "weight grad": (lambda: weight_grad(jx, jg), lambda: tx.t() @ tg),
            "weight grad, x^T given": (lambda: plain(jxt, jg), lambda: txt @ tg),
            "weight grad, transpose + dot": (lambda: transposed_then_dot(jx, jg), lambda: tx.t() @ tg),
        }
        flops = 2 * args.tokens * din * dout
        for name, (xla, eager) in cases.items():
            xla_call = lambda: jax.block_until_ready(xla())
            xla_call(), eager()  # compile, warm up
            times = {"xla": [], "torch": []}
            for _ in range(args.repeats):
                for side, call in (("xla", xla_call), ("torch", eager)):
                    t = time.perf_counter()
                    call()
                    times[side].append(time.perf_counter() - t)
            rate = {side: flops / float(np.median(ts)) / 1e9 for side, ts in times.items()}
            row = {
                "din": din,
                "dout": dout,
                "tokens": args.tokens,
                "dot": name,
                "xla_gflops": round(rate["xla"], 1),
                "torch_gflops": round(rate["torch"], 1),
                "ratio": round(rate["xla"] / rate["torch"], 3),
            }
            rows.append(row)
            print(
                f"[{args.tokens}, {din}] -> {dout:5d}  {name:30s} XLA {row['xla_gflops']:6.1f}  "
                f"PyTorch {row['torch_gflops']:6.1f} GFLOP/s  ratio {row['ratio']:.3f}",
                flush=True,
            )
    if args.out:
        from opera_jax.io_utils import write_json

        write_json(
            args.out,
            {
                "rows": rows,
                "threads": args.threads,
                "cpus": sorted(os.sched_getaffinity(0)),
                "jax": jax.__version__,
                "torch": torch.__version__,
            },
        )
    return rows


if __name__ == "__main__":
    main()
