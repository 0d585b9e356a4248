"""Where one train step's time goes: opera-jax's jitted step by XLA:CPU thunk, PyTorch eager by aten op.

    taskset -c 0 python benchmarks/profile_step.py --shape A [--sides jax,torch] [--threads 1] [--out prof.json]

The step, model and batch are ``step_throughput.py``'s (all-MiniLM-L6-v2, SciFact token ids,
InfoNCE, AdamW, f32, dropout off). Each side runs in its own child process, takes ``--warmup``
untimed steps, then profiles one:

- opera-jax: ``jax.profiler.trace`` with XLA:CPU's per-thunk trace events
  (``--xla_cpu_enable_xprof_traceme=true``). Each event is named after an instruction of the
  compiled step's optimised HLO, which gives its category and, for a dot, its FLOPs.
- PyTorch: ``torch.profiler``, self CPU time per aten op.

Printed per side: milliseconds per category, largest first; for opera-jax also the dot shapes
that took longest, with their GFLOP/s. The categories match where they can: PyTorch's fused
attention is one op (``scaled_dot_product``), and so is ours on CPU (the C++ kernel's two custom
calls, ``cpu/attention.py``; with ``OPERA_JAX_CPU_ATTENTION=0``: attention dots plus elementwise
passes over the ``[b, h, n, n]`` scores and the reductions among the rest). Findings: ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_throughput as st  # noqa: E402  (the step, model and batch being profiled)

TRACEME = "--xla_cpu_enable_xprof_traceme=true"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    p.add_argument("--data", default="scifact")
    p.add_argument("--shape", default="A", help="A (16x64 + 32x128), B (32x32 + 64x256), or Q,LQ,G,LP")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sides", default="jax,torch")
    p.add_argument("--top", type=int, default=12, help="dot shapes to list")
    p.add_argument("--out", default=None, help="write the tables as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variant, args.dropout = "default", False  # what step_throughput's builders read
    return args


# ---------------------------------------------------------------- reading the optimised HLO


def _dims(shape: str) -> list[int]:
    m = re.match(r"\w+\[([\d,]*)\]", shape)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


class Hlo:
    """The instructions of an optimised HLO module: shape and text by name, fusion bodies by name."""

    def __init__(self, text: str):
        self.line, self.shape = {}, {}
        for line in text.splitlines():
            m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[^}]*\})? [\w\-]+\(", line)
            if m:
                self.line[m.group(1)], self.shape[m.group(1)] = line, m.group(2)
            elif m := re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \(.*\) custom-call\(", line):  # tuple-shaped results
                self.line[m.group(1)], self.shape[m.group(1)] = line, ""
        self.body = dict(re.findall(r"^%?([\w.\-]+) \(.*?\) -> .*? \{\n(.*?)\n\}", text, re.S | re.M))

    def dot_of(self, name: str) -> str | None:
        """The dot instruction ``name`` is (or MKL's product, ``cpu/blas.py``), or the one in
        the fusion it calls."""
        line = self.line[name]
        if " dot(" in line or "opera_gemm" in line:
            return line
        called = re.search(r"calls=%?([\w.\-]+)", line)
        body = self.body.get(called.group(1), "") if called else ""
        return next((x for x in body.splitlines() if " dot(" in x), None)

    def flops(self, dot: str) -> tuple[int, str]:
        """``2 * output elements * contracted size`` of a dot line, and a label of its shapes."""
        if "opera_gemm" in dot:  # c = op(a) op(b), op a transpose where ta / tb = 1
            m = re.match(
                r"\s*(?:ROOT )?%?[\w.\-]+ = (\S+?)(?:\{[^}]*\})? custom-call\(%?([\w.\-]+), %?([\w.\-]+)\)", dot
            )
            out, lhs, rhs = _dims(m.group(1)), _dims(self.shape[m.group(2)]), _dims(self.shape[m.group(3)])
            ta, tb = (re.search(rf"\b{t} = (\d)", dot).group(1) == "1" for t in ("ta", "tb"))
            label = f"{lhs}{'^T' if ta else ''} x {rhs}{'^T' if tb else ''} -> {out} (MKL)"
            return 2 * math.prod(out) * (lhs[0] if ta else lhs[1]), label
        m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (\S+?)(?:\{[^}]*\})? dot\(%?([\w.\-]+), %?([\w.\-]+)\)", dot)
        out, lhs, rhs = _dims(m.group(1)), _dims(self.shape[m.group(2)]), _dims(self.shape[m.group(3)])
        lc, rc = (
            [int(i) for i in re.search(side + r"_contracting_dims=\{([\d,]*)\}", dot).group(1).split(",")]
            for side in ("lhs", "rhs")
        )
        return 2 * math.prod(out) * math.prod(lhs[i] for i in lc), f"{lhs} x {rhs} -> {out}, contracting {lc} x {rc}"

    def category(self, name: str) -> str:
        line, dims = self.line[name], _dims(self.shape[name])
        if "opera_attention" in line:
            return "attention (C++ kernel)"
        if "opera_gemm" in line:
            return "dense dots"
        scores = len(dims) == 4 and dims[-1] == dims[-2]  # [b, h, n, n]
        dot = self.dot_of(name)
        if dot is not None and " dot(" in line:
            return "attention dots" if len(dims) == 4 else "dense dots"
        if dot is not None:
            kind = "YNNPACK fusions" if "__ynn_fusion" in line else "fusions"
            return f"{kind} with a dot" + (" (attention)" if len(dims) == 4 else "")
        called = re.search(r"calls=%?([\w.\-]+)", line)
        body = self.body.get(called.group(1), "") if called else line
        if " reduce(" in body or "reduce-window(" in body:
            return "reductions" + (" over attention scores" if scores else "")
        return "elementwise" + (" over attention scores" if scores else "")


# ---------------------------------------------------------------- the two children


def child_jax(args) -> dict:
    import jax

    step, state, batch = st.jax_step(args, st.make_batch(args))
    hlo = Hlo(step.lower(state, batch).compile().as_text())
    for _ in range(args.warmup):
        state, out = step(state, batch)
        jax.block_until_ready((state, out))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            state, out = step(state, batch)
            jax.block_until_ready((state, out))
        (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
        profile = jax.profiler.ProfileData.from_file(path)
    ms, n = collections.Counter(), collections.Counter()
    dots = collections.defaultdict(lambda: [0.0, 0, 0])  # label -> ms, flops, count
    unnamed = 0.0
    thunks = {}  # instruction name -> (category, (FLOPs, shape label) of its dot or None)
    for plane in profile.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for ev in line.events:
                if ev.name not in hlo.line:
                    unnamed += ev.duration_ns / 1e6 if "ThunkExecutor" not in ev.name else 0.0
                    continue
                if ev.name not in thunks:  # each instruction classified once, however often it runs
                    dot = hlo.dot_of(ev.name)
                    thunks[ev.name] = (hlo.category(ev.name), hlo.flops(dot) if dot is not None else None)
                cat, dot_flops = thunks[ev.name]
                ms[cat] += ev.duration_ns / 1e6
                n[cat] += 1
                if dot_flops is not None:
                    flops, label = dot_flops
                    d = dots[label]
                    d[0] += ev.duration_ns / 1e6
                    d[1] += flops
                    d[2] += 1
    return {
        "categories_ms": {k: round(v, 1) for k, v in ms.most_common()},
        "thunks": dict(n),
        "unnamed_ms": round(unnamed, 1),
        "dots": [
            {"shape": k, "ms": round(v[0], 1), "count": v[2], "gflop_s": round(v[1] / v[0] / 1e6, 1)}
            for k, v in sorted(dots.items(), key=lambda kv: -kv[1][0])
        ],
    }


TORCH_CATEGORIES = [  # (part of the aten op's name, category), first match wins
    ("scaled_dot_product", "attention (fused SDPA)"),
    ("aten::mm", "dense dots"),
    ("aten::addmm", "dense dots"),
    ("aten::bmm", "dense dots"),
    ("gelu", "GELU"),
    ("layer_norm", "LayerNorm"),
]


def child_torch(args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    step = st.torch_step(args, st.make_batch(args))
    for _ in range(args.warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ms, ops = collections.Counter(), collections.Counter()
    for ev in prof.key_averages():
        cat = next((c for key, c in TORCH_CATEGORIES if key in ev.key), "other")
        ms[cat] += ev.self_cpu_time_total / 1e3
        if cat == "other":
            ops[ev.key] += ev.self_cpu_time_total / 1e3
    return {
        "categories_ms": {k: round(v, 1) for k, v in ms.most_common()},
        "other_ops_ms": {k: round(v, 1) for k, v in ops.most_common(15)},
    }


def run_child(args) -> None:
    if args.child == "jax":
        from opera_jax.cli import prepare_process

        os.environ["JAX_PLATFORMS"] = "cpu"  # the thunk events and their names are XLA:CPU's

        flags = os.environ.get("XLA_FLAGS", "")
        if TRACEME not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {TRACEME}".strip()
        prepare_process()  # as the opera-jax command runs (may re-execute this child once)
    st._pin(args.threads)
    result = child_jax(args) if args.child == "jax" else child_torch(args)
    Path(args.result_file).write_text(json.dumps(result))


# ---------------------------------------------------------------- the parent


def report(side: str, r: dict, top: int) -> None:
    total = sum(r["categories_ms"].values())
    print(f"\n{side}: {total:.0f} ms in profiled ops")
    for cat, ms in r["categories_ms"].items():
        print(f"  {ms:9.1f} ms  {cat}")
    for d in r.get("dots", [])[:top]:
        print(f"  dot {d['ms']:8.1f} ms {d['count']:3d}x {d['gflop_s']:6.1f} GFLOP/s  {d['shape']}")
    for op, ms in list(r.get("other_ops_ms", {}).items())[:8]:
        print(f"  other {ms:8.1f} ms  {op}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sides.split(","):
            out = os.path.join(tmp, f"{side}.json")
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--child",
                side,
                "--result-file",
                out,
                "--model",
                args.model,
                "--data",
                args.data,
                "--shape",
                args.shape,
                "--threads",
                str(args.threads),
                "--warmup",
                str(args.warmup),
            ]
            subprocess.run(cmd, check=True)
            results[side] = json.loads(Path(out).read_text())
            report(side, results[side], args.top)
    if args.out:
        Path(args.out).write_text(json.dumps({"shape": args.shape, "threads": args.threads, **results}, indent=1))


if __name__ == "__main__":
    main()
