"""``opera-jax eval``: load a model and a collection, evaluate, print a table, write the results."""

from __future__ import annotations

from pathlib import Path

from opera_jax.data.beir import load_split, resolve_data_dir
from opera_jax.eval.evaluate import Evaluator
from opera_jax.eval.metrics import CUTOFFS, write_trec_run
from opera_jax.io_utils import write_json
from opera_jax.models.encoder import load_encoder
from opera_jax.preflight import check_output_dir

TABLE_ROWS = (("ndcg", "NDCG"), ("recall", "Recall"), ("mrr", "MRR"), ("ndcg_release", "NDCG (release)"))


def format_table(metrics: dict[str, float], cutoffs=CUTOFFS) -> str:
    """Metrics as a text table: one row per measure, one column per cutoff."""
    rows = [(label, key) for key, label in TABLE_ROWS if f"{key}@{cutoffs[0]}" in metrics]
    width = max(len(label) for label, _ in rows)
    lines = [" " * width + "".join(f"{'@' + str(k):>9}" for k in cutoffs)]
    for label, key in rows:
        lines.append(f"{label:<{width}}" + "".join(f"{metrics[f'{key}@{k}']:>9.4f}" for k in cutoffs))
    return "\n".join(lines)


def run_eval(
    *,
    model: str,
    data: str,
    split: str = "test",
    out: Path | None = None,
    batch_size: int = 128,
    max_query_len: int | None = None,
    max_passage_len: int | None = None,
    empty: str = "error",
) -> dict:
    if out is not None:  # before the evaluation, not after it
        check_output_dir(out, "--out directory")
    data_dir = resolve_data_dir(data)
    beir = load_split(data_dir, split, empty=empty)
    encoder = load_encoder(model)
    evaluator = Evaluator(
        beir,
        encoder.tokenizer,
        encoder.spec,
        max_query_len=max_query_len,
        max_passage_len=max_passage_len,
        batch_size=batch_size,
    )
    result = evaluator(encoder.model, progress=True)
    metrics = {
        **{k: round(v, 6) for k, v in result.metrics.items()},
        "num_queries": len(beir.queries),
        "num_docs": len(beir.corpus),
        "model": model,
        "data": str(data_dir),
        "split": split,
        "max_query_len": evaluator.max_query_len,
        "max_passage_len": evaluator.max_passage_len,
        "seconds": round(result.seconds, 3),
    }
    print(f"{beir.name}/{split}: {len(beir.queries)} queries, {len(beir.corpus)} documents, {result.seconds:.1f} s")
    print(format_table(result.metrics))
    if out is not None:
        write_json(Path(out) / "metrics.json", metrics)
        write_trec_run(Path(out) / "run.trec", result.run)
        print(f"wrote {Path(out) / 'metrics.json'} and {Path(out) / 'run.trec'}")
    return metrics
