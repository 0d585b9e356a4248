"""Documents per second encoding a SciFact slice: opera-jax against transformers' PyTorch BertModel.

    pip install torch==2.13.0
    python benchmarks/encode_throughput.py [--docs 512] [--batch-size 64] [--max-len 256] [--threads 2]

Both sides: the same model (all-MiniLM-L6-v2 unless --model), the same texts
(the first --docs SciFact passages, title + text), batch size, max length,
mean pooling and L2 normalisation, the same number of CPU threads, and the
same batching order (texts sorted by length, longest first). PyTorch pads each
batch to its longest text; opera-jax pads to a bucket length (powers of two),
which is what keeps its jitted encoder to a few compiled shapes. Timings: one
untimed warm-up pass (it includes XLA compilation, reported apart), then the
median of --repeats timed passes. The ratio is opera-jax docs/s over PyTorch docs/s.
XLA:CPU runs with the flag the opera-jax command sets (``opera_jax/cpu/xla_flags.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    p.add_argument("--data", default="scifact")
    p.add_argument("--docs", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="PyTorch threads; XLA's CPU client uses every core, so keep the default for a fair run",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu, or cuda for a GPU run of both sides")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    from opera_jax.cpu.xla_flags import use_xla_cpu_flags

    use_xla_cpu_flags()  # XLA:CPU as the opera-jax command runs it (OPERA_JAX_XLA_CPU_FLAGS=0: jaxlib's default)
    import jax
    import numpy as np
    import torch
    from transformers import BertModel

    from opera_jax.data.beir import load_corpus, resolve_data_dir
    from opera_jax.data.tokens import tokenize
    from opera_jax.eval.retrieval import encode
    from opera_jax.models.encoder import load_encoder

    torch.set_num_threads(args.threads)
    corpus = load_corpus(resolve_data_dir(args.data))
    texts = corpus.passages()[: args.docs]
    enc = load_encoder(args.model)
    tokens = tokenize(enc.tokenizer, texts, args.max_len, use_cache=False)
    lengths = np.minimum(tokens.lengths, args.max_len)
    order = np.argsort(-lengths, kind="stable")

    def run_jax():
        jax.block_until_ready(encode(enc.model, tokens, max_len=args.max_len, batch_size=args.batch_size))

    device = torch.device(args.device)
    tmodel = BertModel.from_pretrained(str(enc.source), attn_implementation="sdpa").eval().to(device)
    batches = []
    for start in range(0, len(order), args.batch_size):
        rows = order[start : start + args.batch_size]
        ids, mask = tokens.batch(rows, int(lengths[rows].max()))
        batches.append((torch.from_numpy(ids.astype(np.int64)).to(device), torch.from_numpy(mask).to(device)))

    def run_torch():
        with torch.inference_mode():
            for ids, mask in batches:
                h = tmodel(input_ids=ids, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).to(h.dtype)
                e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
                e.cpu() if device.type == "cuda" else None
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    results = {}
    for name, fn in (("opera_jax", run_jax), ("pytorch", run_torch)):
        warm = timed(fn)
        times = [timed(fn) for _ in range(args.repeats)]
        med = statistics.median(times)
        results[name] = {
            "warmup_s": round(warm, 3),
            "median_s": round(med, 3),
            "docs_per_s": round(len(texts) / med, 2),
            "times_s": [round(t, 3) for t in times],
        }
    results["ratio_jax_over_torch"] = round(results["opera_jax"]["docs_per_s"] / results["pytorch"]["docs_per_s"], 3)
    results["setup"] = {
        "model": args.model,
        "docs": len(texts),
        "batch_size": args.batch_size,
        "max_len": args.max_len,
        "threads": args.threads,
        "device": args.device,
        "jax": jax.__version__,
        "torch": torch.__version__,
        "jax_devices": [str(d) for d in jax.devices()],
        "mean_tokens": float(lengths.mean()),
    }
    print(json.dumps(results, indent=2))
    if args.out:
        from opera_jax.io_utils import write_json

        write_json(args.out, results)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
