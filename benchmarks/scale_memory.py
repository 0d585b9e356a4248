"""Per-device memory of the train step on simulated CPU devices, from XLA's compiled memory analysis.

    python benchmarks/scale_memory.py gradcache --out benchmarks/results/scale_gradcache.jsonl
    python benchmarks/scale_memory.py table --out benchmarks/results/scale_table.jsonl [--only NAME ...]
    python benchmarks/scale_memory.py report benchmarks/results/scale_gradcache.jsonl benchmarks/results/scale_table.jsonl

``gradcache``: all-MiniLM-L6-v2 (the bundled weights' config) at 64/256 tokens on
8 devices: per-device memory with and without FSDP, and the peak of the plain step
against the cached-gradient step (GradCache) as the global batch grows, against a
2 GiB per-device budget.

``table``: the planner (``opera_jax.memory_plan``) on bge-large-en-v1.5 and
Qwen3-Embedding 0.6B/4B/8B at the release configs' settings (``configs/``) with
memory options, for 8 devices (an 8-GPU node, or a TPU v5e-8) and 16 (v5e-16).
The 4B/8B compiles take minutes each on a 2-core CPU.

Every figure is XLA:CPU's buffer assignment for simulated devices: an estimate of
a GPU's or TPU's memory, not a measurement. Rows are appended to the JSONL file
as they finish; ``report`` prints the markdown tables.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=16")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3
BUDGET_GIB = 2.0  # the gradcache sweep's per-device budget
GPU_GIB, V5E_GIB = 80, 16

MINILM = [
    "model.name=sentence-transformers/all-MiniLM-L6-v2",
    "data.query_max_len=64",
    "data.passage_max_len=256",
    "data.group_size=2",
    "model.dtype=float32",
    "model.remat=false",
]

QWEN = str(ROOT / "configs" / "qwen3-0.6b-basic.yaml")
BGE = str(ROOT / "configs" / "bge-large-basic.yaml")
# name -> (config, overrides, devices, fsdp); the release settings: 128 queries x 2 passages,
# bge 128/512 tokens, Qwen3 512/512, bf16 compute; Qwen3's release config also remats every layer.
TABLE = {
    "bge-large bf16": (BGE, [], 8, 1),
    "bge-large bf16 remat fsdp8": (BGE, ["model.remat=full"], 8, 8),
    "qwen3-0.6b bf16 remat": (QWEN, [], 8, 1),
    "qwen3-0.6b bf16 remat fsdp8": (QWEN, [], 8, 8),
    "bge-large bf16 fsdp8 gc16": (BGE, ["optim.grad_cache_chunk=16"], 8, 8),
    "qwen3-0.6b bf16 remat fsdp8 gc16": (QWEN, ["optim.grad_cache_chunk=16"], 8, 8),
    "qwen3-4b bf16 remat fsdp8": (QWEN, ["model.name=Qwen/Qwen3-Embedding-4B"], 8, 8),
    "qwen3-8b bf16 remat fsdp8": (QWEN, ["model.name=Qwen/Qwen3-Embedding-8B"], 8, 8),
    "qwen3-8b bf16 remat fsdp8 gc16": (QWEN, ["model.name=Qwen/Qwen3-Embedding-8B", "optim.grad_cache_chunk=16"], 8, 8),
    "qwen3-8b bf16-params remat fsdp16 gc16": (
        QWEN,
        ["model.name=Qwen/Qwen3-Embedding-8B", "model.param_dtype=bfloat16", "optim.grad_cache_chunk=16"],
        16,
        16,
    ),
}


def _plan_row(label: str, config_path: str | None, overrides: list[str], devices: int, fsdp: int, **extra) -> dict:
    from opera_jax.config import load_config
    from opera_jax.memory_plan import plan_memory

    start = time.perf_counter()
    result = plan_memory(load_config(config_path, overrides), devices, fsdp)
    row = {
        "label": label,
        "overrides": overrides,
        "config": config_path and Path(config_path).name,
        **dataclasses.asdict(result),
        "compile_s": round(time.perf_counter() - start, 1),
        **extra,
    }
    print(
        f"{label}: peak {result.peak_bytes / GiB:.3f} GiB/device "
        f"(params {result.param_bytes / GiB:.3f}, optimizer {result.optimizer_bytes / GiB:.3f}, "
        f"temp {result.temp_bytes / GiB:.3f}); {row['compile_s']} s",
        flush=True,
    )
    return row


def _append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def gradcache(out: Path, batches: list[int], chunk: int) -> None:
    for fsdp in (1, 8):
        _append(
            out, _plan_row(f"minilm b128 fsdp{fsdp}", None, MINILM + ["optim.batch_size=128"], 8, fsdp, part="fsdp")
        )
    for b in batches:
        for gc in (None, min(chunk, b)):
            ov = MINILM + [f"optim.batch_size={b}"] + ([f"optim.grad_cache_chunk={gc}"] if gc else [])
            _append(
                out,
                _plan_row(
                    f"minilm b{b} {'gc' + str(gc) if gc else 'plain'}", None, ov, 8, 1, part="gradcache", batch=b
                ),
            )


def table(out: Path, only: list[str]) -> None:
    done = set()
    if out.exists():
        done = {json.loads(line)["label"] for line in out.read_text().splitlines() if line.strip()}
    for label, (config, overrides, devices, fsdp) in TABLE.items():
        if (only and label not in only) or label in done:
            continue
        _append(out, _plan_row(label, config, overrides, devices, fsdp, part="table"))


def _rows(paths: list[Path]) -> list[dict]:
    return [json.loads(line) for p in paths if p.exists() for line in p.read_text().splitlines() if line.strip()]


def report(paths: list[Path]) -> str:
    rows = _rows(paths)
    g = lambda b: f"{b / GiB:.3f}"
    out = []
    fsdp = [r for r in rows if r.get("part") == "fsdp"]
    if fsdp:
        out += [
            "| all-MiniLM-L6-v2, batch 128, 8 devices | params | optimizer | temp | arguments | peak |",
            "|---|---|---|---|---|---|",
        ]
        out += [
            f"| fsdp {r['fsdp']} | {r['param_bytes'] / 2**20:.1f} MiB | {r['optimizer_bytes'] / 2**20:.1f} MiB | "
            f"{r['temp_bytes'] / 2**20:.1f} MiB | {r['argument_bytes'] / 2**20:.1f} MiB | "
            f"{r['peak_bytes'] / 2**20:.1f} MiB |"
            for r in fsdp
        ]
        out.append("")
    gc = [r for r in rows if r.get("part") == "gradcache"]
    if gc:
        by_batch: dict[int, dict] = {}
        for r in gc:
            by_batch.setdefault(r["batch"], {})["gc" if r["grad_cache_chunk"] else "plain"] = r
        out += [
            f"| global batch | plain peak GiB/device | GradCache peak GiB/device (chunk) | "
            f"fits {BUDGET_GIB:g} GiB: plain / GradCache |",
            "|---|---|---|---|",
        ]
        for b in sorted(by_batch):
            p, c = by_batch[b].get("plain"), by_batch[b].get("gc")
            fit = lambda r: "-" if r is None else ("yes" if r["peak_bytes"] <= BUDGET_GIB * GiB else "no")
            out.append(
                f"| {b} | {g(p['peak_bytes']) if p else '-'} | "
                f"{(g(c['peak_bytes']) + ' (' + str(c['grad_cache_chunk']) + ')') if c else '-'} | "
                f"{fit(p)} / {fit(c)} |"
            )
        out.append("")
    tab = [r for r in rows if r.get("part") == "table"]
    if tab:
        out += [
            "| model, options | devices (fsdp) | params | optimizer | temp | peak GiB/device | "
            f"fits 8x{GPU_GIB} GB GPU | fits TPU v5e ({V5E_GIB} GB) | TFLOP/device/step | compile s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in tab:
            peak = r["peak_bytes"] / 1e9
            out.append(
                f"| {r['label']} | {r['devices']} ({r['fsdp']}) | {g(r['param_bytes'])} | {g(r['optimizer_bytes'])} | "
                f"{g(r['temp_bytes'])} | {g(r['peak_bytes'])} | "
                f"{('yes' if peak <= GPU_GIB else 'no') if r['devices'] == 8 else '-'} | "
                f"{'yes' if peak <= V5E_GIB else 'no'} (v5e-{r['devices']}) | {r['flops'] / 1e12:.1f} | "
                f"{r['compile_s']} |"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    a = sub.add_parser("gradcache")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512])
    a.add_argument("--chunk", type=int, default=32)
    b = sub.add_parser("table")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--only", nargs="*", default=[])
    c = sub.add_parser("report")
    c.add_argument("paths", type=Path, nargs="+")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.part == "gradcache":
        gradcache(args.out, args.batches, args.chunk)
    elif args.part == "table":
        table(args.out, args.only)
    else:
        print(report(args.paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
