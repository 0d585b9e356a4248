"""Train-step examples/s and peak memory: opera-jax's jitted step against PyTorch eager.

    python benchmarks/step_throughput.py [--shape A|B] [--threads N] [--variant default] [--out results.json]
    taskset -c 0 python benchmarks/step_throughput.py --threads 1 --shape A   # the figure we report

One example = one query with its group (positive + hard negatives). Both sides
train all-MiniLM-L6-v2 (real weights) on the same batch of SciFact token ids
(queries truncated/padded to the query length, passages to the passage length,
real attention masks), with mean pooling, L2 normalisation, InfoNCE over every
passage of the batch at temperature 0.05, global-norm clipping at 1.0 and AdamW
(lr 2e-5 constant, weight decay 0.01 on kernels and embedding tables only,
betas 0.9/0.999, eps 1e-8). Dropout is off on both sides unless ``--dropout``
(then both are in train mode, p = 0.1). float32 on both sides (``--variant bf16``
is our bf16-compute variant, reported as an extra line, not a like-for-like figure).

- opera-jax: ``opera_jax.train.step.make_train_step`` (jitted, state donated),
  as the trainer uses it.
- PyTorch: transformers ``BertModel`` (``attn_implementation="sdpa"``, no pooler),
  ``torch.optim.AdamW``, ``clip_grad_norm_``, ``torch.set_num_threads(threads)``.

Each side runs in its own child process, so its peak RSS (``VmHWM``) is its own.
A child is restricted to ``--threads`` cores (``sched_setaffinity``) and told
to use that many threads (``torch.set_num_threads``; XLA sizes its pools from
the affinity mask). Warm-up steps are untimed (JAX's first one includes
compilation, reported apart as ``compile_s``); then the median of ``--steps``
timed steps (``block_until_ready`` on the JAX state). Reported per side:
examples/s, median step time (wall clock, and process CPU time: on a shared
core the CPU-time ratio is the steadier one), peak RSS, RSS after warm-up (steady state),
RSS before the first step (weights + batch + runtime), and for JAX the compile time.

``--rounds R`` runs the two children R times, alternately (JAX, PyTorch, JAX, ...): on a machine
whose speed drifts over minutes, one pair of children can land in different phases. The ratios
are then the medians over the rounds, and ``rounds`` lists each round's step times and ratios.

``--compile-cache DIR`` runs the JAX child twice with JAX's persistent
compilation cache in DIR: the first child compiles and fills it, the second
loads the executable, so its peak RSS is the step's without XLA compilation.
Both are reported (``jax`` = the first, ``jax_cached`` = the second); a
first run of the trainer pays the compile peak.

The JAX child runs as ``opera-jax`` does: malloc backed by transparent huge
pages (``opera_jax/cpu/host_memory.py``; ``--variant 4k-pages`` turns that off), the
dense layers' products through MKL where the ``mkl`` extra is installed
(``opera_jax/cpu/blas.py``; ``--variant xla-dots`` keeps XLA's dots; the JSON's
``dense_products`` says which ran), other dots through XLA's Eigen path
(``opera_jax/cpu/xla_flags.py``; ``--variant ynn-dots`` keeps jaxlib's YNNPACK default), and
torch hidden from transformers (which would import it, ~200 MB, when installed). The
PyTorch child runs with the allocator as it comes, or with the same huge pages
under ``--torch-hugepages``.

Results, the per-change table and the profile findings: ``benchmarks/README.md``.

Ratios: ``throughput`` = JAX examples/s over PyTorch examples/s (above 1: JAX faster);
``memory`` = JAX peak RSS over PyTorch peak RSS (below 1: JAX leaner).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # queries, query length, group size, passage length
    "A": (16, 64, 2, 128),
    "B": (32, 32, 2, 256),
}
TEMPERATURE = 0.05
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 2e-5, 0.01, 1.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    p.add_argument("--data", default="scifact")
    p.add_argument("--shape", default="A", help="A (16x64 + 32x128), B (32x32 + 64x256), or Q,LQ,G,LP")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--dropout", action="store_true", help="train mode with dropout on both sides")
    p.add_argument("--variant", default="default", help="which opera-jax step: " + ", ".join(VARIANTS))
    p.add_argument("--sides", default="jax,torch", help="comma list of jax, torch")
    p.add_argument(
        "--torch-hugepages",
        action="store_true",
        help="give the PyTorch child malloc on huge pages too (opera_jax/cpu/host_memory.py)",
    )
    p.add_argument("--compile-cache", default=None, help="also run a JAX child that loads the compiled step")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the two children this many times, alternately; ratios: medians over the rounds",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# Variants of our step: keyword arguments for load_encoder / make_train_step.
VARIANTS = {
    "default": {},
    "plain": {"plain": True},  # the formulations before the changes in the table above
    "4k-pages": {"env": {"OPERA_JAX_HUGEPAGES": "0"}},  # malloc without huge pages (opera_jax/cpu/host_memory.py)
    "ynn-dots": {"env": {"OPERA_JAX_XLA_CPU_FLAGS": "0"}},  # jaxlib's default dots (opera_jax/cpu/xla_flags.py)
    "xla-attention": {"env": {"OPERA_JAX_CPU_ATTENTION": "0"}},  # attention as XLA ops (cpu/attention.py)
    "xla-dots": {"env": {"OPERA_JAX_CPU_BLAS": "0"}},  # dense products as XLA dots, not MKL (cpu/blas.py)
    "remat": {"remat": True},
    "bf16": {"bf16": True},
}


def shape_of(name: str) -> tuple[int, int, int, int]:
    if name in SHAPES:
        return SHAPES[name]
    q, lq, g, lp = (int(x) for x in name.split(","))
    return q, lq, g, lp


# ---------------------------------------------------------------- the batch


def make_batch(args) -> dict:
    """SciFact queries and passages, tokenised and cut to the shape. Query i's group: passages i*G.. ."""
    import numpy as np

    from opera_jax.data.beir import load_corpus, load_queries, resolve_data_dir
    from opera_jax.data.tokens import load_tokenizer, tokenize
    from opera_jax.models.hub import resolve_model_dir

    nq, lq, g, lp = shape_of(args.shape)
    folder = resolve_data_dir(args.data)
    tok = load_tokenizer(resolve_model_dir(args.model))
    queries = load_queries(folder).texts[:nq]
    passages = load_corpus(folder).passages()[: nq * g]
    qt = tokenize(tok, list(queries), lq, use_cache=False)
    pt = tokenize(tok, passages, lp, use_cache=False)
    q_ids, q_mask = qt.batch(np.arange(nq), lq)
    p_ids, p_mask = pt.batch(np.arange(nq * g), lp)
    return {
        "query_input_ids": q_ids,
        "query_attention_mask": q_mask,
        "passage_input_ids": p_ids,
        "passage_attention_mask": p_mask,
        "pair": np.arange(nq, dtype=np.int32),
        "query": np.arange(nq, dtype=np.int32),
        "weight": np.ones(nq, np.float32),
    }


# ---------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _mb(kb: int) -> float:
    return round(kb / 1024, 1)


def _kernel_per_step(r0, steps: int) -> dict:
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "minor_faults_per_step": (r1.ru_minflt - r0.ru_minflt) // steps,
        "sys_s_per_step": round((r1.ru_stime - r0.ru_stime) / steps, 3),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }


def _pin(threads: int) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if threads < len(cpus):
        os.sched_setaffinity(0, cpus[:threads])


# ---------------------------------------------------------------- the two children


def _measure(run, args) -> dict:
    """Warm-up steps, then timed ones: wall and CPU seconds, losses, steady RSS, kernel time and faults."""
    warm = [run() for _ in range(args.warmup)]
    rss_steady = _status_kb("VmRSS")
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    timed = [run() for _ in range(args.steps)]
    return {
        "warmup_s": [round(w, 3) for w, _, _ in warm],
        "times_s": [round(x, 4) for x, _, _ in timed],
        "cpu_times_s": [round(x, 4) for _, x, _ in timed],
        "losses": [round(loss, 5) for _, _, loss in warm + timed],
        "rss_steady_mb": _mb(rss_steady),
        **_kernel_per_step(r0, args.steps),
    }


def jax_step(args, batch):
    """Our side: the model, state and jitted step as the trainer builds them, in ``args.variant``.
    Returns ``(step, state, batch on the device)``; ``step(state, batch)`` donates the state."""
    import jax
    from flax import nnx

    from opera_jax.models import bert, ops
    from opera_jax.models.encoder import load_encoder
    from opera_jax.train.optim import make_optimizer
    from opera_jax.train.step import init_state, make_train_step

    opts = dict(VARIANTS[args.variant])
    ops.PLAIN = opts.pop("plain", False)
    opts.pop("env", None)
    precision = bert.Precision(dtype=jax.numpy.bfloat16) if opts.pop("bf16", False) else bert.Precision()
    model = load_encoder(args.model, precision=precision, remat=opts.pop("remat", False)).model
    model.train() if args.dropout else model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = make_optimizer(
        LR, 1000, warmup_ratio=0.0, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM, schedule="constant"
    )
    state = init_state(params, opt, seed=0)
    return make_train_step(graphdef, rest, opt, TEMPERATURE, **opts), state, jax.device_put(batch)


def child_jax(args, batch) -> dict:
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    step, state, batch = jax_step(args, batch)
    rss_before = _status_kb("VmRSS")

    t = time.perf_counter()
    step.compile(state, batch)
    compile_s = time.perf_counter() - t
    rss_after_compile = _status_kb("VmRSS")
    hwm_compile = _status_kb("VmHWM")

    def run():
        nonlocal state
        t, c = time.perf_counter(), time.process_time()
        state, out = step(state, batch)
        jax.block_until_ready((state, out))
        return time.perf_counter() - t, time.process_time() - c, float(out["loss"])

    measured = _measure(run, args)
    return {
        "compile_s": round(compile_s, 3),
        **measured,
        "rss_before_step_mb": _mb(rss_before),
        "rss_after_compile_mb": _mb(rss_after_compile),
        "peak_rss_at_compile_mb": _mb(hwm_compile),
        "jax": jax.__version__,
        "dense_products": _dense_products(),
    }


def _dense_products() -> str:
    """What ran the dense layers' products: MKL (with its version) or XLA's dots (cpu/blas.py)."""
    import jax.numpy as jnp

    from opera_jax.cpu import blas as cpu_blas

    if cpu_blas.applies(jnp.zeros((), jnp.float32)):
        return f"mkl {cpu_blas.mkl_libraries()[1]}"
    return "xla dots"


def torch_step(args, batch):
    """PyTorch's side: transformers' BertModel (fused SDPA attention), the same loss and AdamW.
    Returns ``step()``: one training step on ``batch``, giving the loss."""
    import torch
    from transformers import BertModel

    from opera_jax.models.hub import resolve_model_dir

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = BertModel.from_pretrained(
        str(resolve_model_dir(args.model)), attn_implementation="sdpa", add_pooling_layer=False
    )
    model.train() if args.dropout else model.eval()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and "LayerNorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (n.endswith("weight") and "LayerNorm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    tb = {k: torch.from_numpy(v) for k, v in batch.items()}
    q_ids, q_mask = tb["query_input_ids"].long(), tb["query_attention_mask"].long()
    p_ids, p_mask = tb["passage_input_ids"].long(), tb["passage_attention_mask"].long()
    b, group = q_ids.shape[0], p_ids.shape[0] // q_ids.shape[0]
    targets = torch.arange(b) * group

    def encode(ids, mask):
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)

    def step():
        opt.zero_grad(set_to_none=True)
        q, p = encode(q_ids, q_mask), encode(p_ids, p_mask)
        logits = q @ p.T / TEMPERATURE
        per_example = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        loss = (tb["weight"] * per_example).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        return loss.detach()

    return step


def child_torch(args, batch) -> dict:
    import torch

    step = torch_step(args, batch)
    rss_before = _status_kb("VmRSS")

    def run():
        t, c = time.perf_counter(), time.process_time()
        loss = step()
        return time.perf_counter() - t, time.process_time() - c, float(loss)

    measured = _measure(run, args)
    return {
        **measured,
        "rss_before_step_mb": _mb(rss_before),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def run_child(args) -> None:
    import numpy as np

    _pin(args.threads)
    with np.load(args.batch_file) as z:
        batch = {k: z[k] for k in z.files}
    result = (child_jax if args.child == "jax" else child_torch)(args, batch)
    nq = batch["query_input_ids"].shape[0]
    med = statistics.median(result["times_s"])
    cpu = statistics.median(result["cpu_times_s"])
    result.update(
        {
            "median_step_s": round(med, 4),
            "examples_per_s": round(nq / med, 3),
            "median_step_cpu_s": round(cpu, 4),
            "examples_per_cpu_s": round(nq / cpu, 3),
            "peak_rss_mb": _mb(_status_kb("VmHWM")),
            "cpus": sorted(os.sched_getaffinity(0)),
        }
    )
    Path(args.result_file).write_text(json.dumps(result))


# ---------------------------------------------------------------- the parent


def spawn(args, side: str, batch_file: str, tmp: str, compile_cache: str | None = None) -> dict:
    result_file = os.path.join(tmp, f"{side}.json")
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        side,
        "--batch-file",
        batch_file,
        "--result-file",
        result_file,
        "--model",
        args.model,
        "--shape",
        args.shape,
        "--threads",
        str(args.threads),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--variant",
        args.variant,
    ]
    if args.dropout:
        cmd.append("--dropout")
    if compile_cache:
        cmd += ["--compile-cache", compile_cache]
    env = dict(os.environ)
    for variant in VARIANTS.values():  # every switch a variant sets starts unset
        for key in variant.get("env", {}):
            env.pop(key, None)
    env.pop("GLIBC_TUNABLES", None)
    if side == "jax":
        env.update(VARIANTS[args.variant].get("env", {}))
    elif args.torch_hugepages:
        from opera_jax.cpu.host_memory import with_hugetlb

        env["GLIBC_TUNABLES"] = with_hugetlb(None)
    subprocess.run(cmd, check=True, env=env)
    return json.loads(Path(result_file).read_text())


def _ratios(one: dict) -> dict:
    """JAX over PyTorch: examples/s (wall clock and process CPU time) and peak / steady RSS."""
    j, t = one["jax"], one["torch"]
    return {
        "throughput": round(j["examples_per_s"] / t["examples_per_s"], 3),
        "throughput_cpu_time": round(j["examples_per_cpu_s"] / t["examples_per_cpu_s"], 3),
        "memory": round(j["peak_rss_mb"] / t["peak_rss_mb"], 3),
        "memory_steady": round(j["rss_steady_mb"] / t["rss_steady_mb"], 3),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        if args.child == "jax":
            from opera_jax.cli import prepare_process

            prepare_process()  # as the opera-jax command runs (re-executes this child once)
        run_child(args)
        return {"child": args.child}
    if args.variant not in VARIANTS:
        raise SystemExit(f"unknown --variant {args.variant!r} ({', '.join(VARIANTS)})")
    import numpy as np

    batch = make_batch(args)
    sides = args.sides.split(",")
    results: dict = {}
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = os.path.join(tmp, "batch.npz")
        np.savez(batch_file, **batch)
        for r in range(max(args.rounds, 1)):
            one: dict = {}
            if "jax" in sides:
                one["jax"] = spawn(args, "jax", batch_file, tmp, args.compile_cache)
                if args.compile_cache and r == 0:
                    one["jax_cached"] = spawn(args, "jax", batch_file, tmp, args.compile_cache)
            if "torch" in sides:
                one["torch"] = spawn(args, "torch", batch_file, tmp)
            rounds.append(one)
    results.update(rounds[0])  # the first round in full
    if "jax" in results and "torch" in results:
        ratios = [_ratios(one) for one in rounds]
        results["ratio"] = {k: round(statistics.median(r[k] for r in ratios), 3) for k in ratios[0]}
        if len(rounds) > 1:  # each round's figures, in the order they ran
            results["rounds"] = [
                {
                    "jax_step_s": one["jax"]["median_step_s"],
                    "torch_step_s": one["torch"]["median_step_s"],
                    "jax_peak_rss_mb": one["jax"]["peak_rss_mb"],
                    "torch_peak_rss_mb": one["torch"]["peak_rss_mb"],
                    **r,
                }
                for one, r in zip(rounds, ratios)
            ]
        if "jax_cached" in results:
            c, t = results["jax_cached"], results["torch"]
            results["ratio"]["throughput_cached"] = round(c["examples_per_s"] / t["examples_per_s"], 3)
            results["ratio"]["memory_cached"] = round(c["peak_rss_mb"] / t["peak_rss_mb"], 3)
    nq, lq, g, lp = shape_of(args.shape)
    results["setup"] = {
        "model": args.model,
        "shape": args.shape,
        "queries": nq,
        "query_len": lq,
        "group": g,
        "passage_len": lp,
        "threads": args.threads,
        "dropout": args.dropout,
        "variant": args.variant,
        "warmup": args.warmup,
        "steps": args.steps,
        "rounds": args.rounds,
        "torch_hugepages": args.torch_hugepages,
        "query_tokens": int(batch["query_attention_mask"].sum()),
        "passage_tokens": int(batch["passage_attention_mask"].sum()),
    }
    print(json.dumps(results, indent=2))
    if args.out:
        from opera_jax.io_utils import write_json

        write_json(args.out, results)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
