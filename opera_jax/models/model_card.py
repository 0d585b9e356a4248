"""The ``README.md`` model card of an exported model, as the Hugging Face hub and sentence-transformers write it.

YAML front matter (``library_name: sentence-transformers``, ``pipeline_tag``,
``tags``, ``base_model``, ``datasets``) that the hub reads for its widgets and
search, then what a reader needs: the model's shape and prompts, how it was
trained (method and key settings), the evaluation table from the run's
``metrics.jsonl``, and how to load it in sentence-transformers and in opera-jax.
The base model's own card is not copied; the card names it as ``base_model``
and links to it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import yaml

from opera_jax.models.encoder import EncoderSpec

METHODS = {
    "basic": "standard contrastive finetuning (InfoNCE with in-batch and hard negatives), every training pair used",
    "sp": "OPERA static pruning (SP): only the training pairs the base model scores as most informative are kept",
    "dp": "OPERA dynamic pruning (DP): queries and positives are resampled during training by their current "
    "similarity, so steps go to the pairs that still teach the model something",
    "infobatch": "InfoBatch: well-learned examples are randomly pruned and the rest's loss rescaled",
}
EVAL_COLUMNS = (("ndcg@10", "NDCG@10"), ("recall@20", "Recall@20"), ("mrr@10", "MRR@10"), ("recall@100", "Recall@100"))
_HUB_CACHE_DIR = re.compile(r"models--([^/]+)--([^/]+)/snapshots/[^/]+/?$")


@dataclasses.dataclass(frozen=True)
class CardInfo:
    """What a card says beyond the model files: where the model came from and how it was trained."""

    base_model: str | None = None  # hub id of the model finetuned
    source: str | None = None  # the model reference trained from, when it is not a hub id
    config: Any = None  # the run's Config
    metrics: tuple[dict, ...] = ()  # metrics.jsonl rows
    datasets: tuple[str, ...] = ()  # hub dataset ids
    data: str | None = None  # the training data, in words
    eval_data: str | None = None  # the evaluation data, in words
    train_queries: int | None = None
    train_pairs: int | None = None
    step: int | None = None  # the training step exported
    negatives: str | None = None  # where the hard negatives came from, in words


def hub_id(name: str | None, source: Path | None = None) -> str | None:
    """The hub id of a model reference: ``name`` when it is one (``org/model``, not a local path), else
    the id of a hub-cache snapshot ``source``, else the bundled MiniLM's id; None when unknown."""
    from opera_jax.models.hub import BUNDLED_MINILM, bundled_minilm_dir

    if name and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).expanduser().exists():
        return name
    if source is not None:
        m = _HUB_CACHE_DIR.search(str(source))
        if m:
            return f"{m.group(1)}/{m.group(2)}"
        if source == bundled_minilm_dir():
            return BUNDLED_MINILM[0]
    return None


def run_card(config, workdir: Path, setup=None, *, step: int | None = None) -> CardInfo:
    """The card of a training run: its config, ``metrics.jsonl`` (rows up to ``step``) and data sizes."""
    data_cfg = config.data
    rows = []
    metrics_file = Path(workdir) / "metrics.jsonl"
    if metrics_file.exists():
        rows = [json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if step is not None:
        rows = [r for r in rows if r["step"] <= step]
    given = getattr(setup, "given", None)
    if given is not None:
        data = f"`{given.train.name}` (loaded in memory)"
        eval_data = None if given.eval is None else f"`{given.eval.name}`, split `{given.eval.split}`"
    else:
        data = f"`{data_cfg.path}`, split `{data_cfg.train_split}`"
        eval_data = f"`{data_cfg.path}`, split `{data_cfg.eval_split}`"
    datasets = ()
    if data_cfg.path.startswith("beir/"):
        datasets = (f"BeIR/{data_cfg.path[5:]}", f"BeIR/{data_cfg.path[5:]}-qrels")
    ts = getattr(setup, "ts", None)
    m = config.mining
    negatives = (
        f"{data_cfg.group_size - 1} per query, drawn from the {m.mode} negatives mined at ranks "
        f"{m.rank_start}-{m.rank_end} by {m.model or 'the base model'}"
    )
    if given is not None and given.negatives is not None:
        negatives = f"{data_cfg.group_size - 1} per query, drawn from the data's own negatives"
    return CardInfo(
        base_model=hub_id(config.model.name),
        source=config.model.name,
        negatives=negatives,
        config=config,
        metrics=tuple(rows),
        datasets=datasets,
        data=data,
        eval_data=eval_data,
        train_queries=None if ts is None else ts.num_queries,
        train_pairs=None if ts is None else ts.num_pairs,
        step=step if step is not None else config.optim.max_steps,
    )


def card_title(out_dir: Path) -> str:
    """The card's heading: the export directory's name, or the run's for a run's ``model/``."""
    out_dir = Path(out_dir).resolve()
    return out_dir.parent.name if out_dir.name == "model" else out_dir.name


def front_matter(info: CardInfo) -> dict[str, Any]:
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "dense-retrieval", "opera-jax"]
    if info.config is not None:
        tags.append(f"method-{info.config.method.name}")
    meta: dict[str, Any] = {
        "library_name": "sentence-transformers",
        "pipeline_tag": "sentence-similarity",
        "tags": tags,
    }
    if info.base_model:
        meta["base_model"] = info.base_model
    if info.datasets:
        meta["datasets"] = list(info.datasets)
    return meta


def render(info: CardInfo, spec: EncoderSpec, *, dim: int, architecture: str, ref: str, title: str) -> str:
    """The card's text; ``ref`` is how the usage examples load the model (a path or a hub id)."""
    meta = yaml.safe_dump(front_matter(info), sort_keys=False, allow_unicode=True)
    base = (
        f"[{info.base_model}](https://huggingface.co/{info.base_model})"
        if info.base_model
        else f"the local model `{info.source}`"
        if info.source
        else "a local model"
    )
    trained = info.config is not None
    lines = [
        "---",
        meta.rstrip("\n"),
        "---",
        "",
        f"# {title}",
        "",
        f"A [sentence-transformers](https://www.sbert.net) dense retriever "
        f"{'finetuned from ' + base + ' with' if trained else 'exported by'} "
        f"[opera-jax](https://arxiv.org/abs/2603.17205). It maps queries and passages to {dim}-dimensional "
        f"vectors; relevance is their dot product{' (cosine: the vectors are normalised)' if spec.normalize else ''}.",
        "",
        "## Model details",
        "",
        f"- Base model: {base}" if trained else f"- Source: {base}",
        f"- Architecture: {architecture}, {spec.pooling} pooling{', L2-normalised' if spec.normalize else ''}",
        f"- Maximum sequence length: {spec.max_seq_length} tokens",
        f"- Output dimensionality: {dim}",
        "- Similarity function: dot product",
        f"- Query prompt: {json.dumps(spec.query_prefix)}; passage prompt: {json.dumps(spec.passage_prefix)}",
    ]
    if trained:
        lines += ["", *_training(info)]
    if info.metrics:
        lines += ["", *_evaluation(info)]
    lines += ["", *_usage(spec, ref)]
    return "\n".join(lines) + "\n"


def _training(info: CardInfo) -> list[str]:
    c = info.config
    data_cfg, optim = c.data, c.optim
    lines = ["## Training", "", f"- Method: `{c.method.name}`, {METHODS[c.method.name]}"]
    size = f" ({info.train_queries} queries, {info.train_pairs} positive pairs)" if info.train_queries else ""
    lines.append(f"- Data: {info.data}{size}")
    negatives = info.negatives if data_cfg.group_size > 1 and info.negatives else "none (in-batch negatives only)"
    settings = [
        ("steps", f"{info.step if info.step is not None else optim.max_steps} of {optim.max_steps}"),
        ("queries per step", optim.batch_size),
        ("hard negatives", negatives),
        ("learning rate", f"{optim.learning_rate:g}, {optim.schedule} schedule, warmup {optim.warmup_ratio:g}"),
        ("weight decay", f"{optim.weight_decay:g}"),
        ("temperature", f"{optim.temperature:g}"),
        ("max lengths", f"query {data_cfg.query_max_len}, passage {data_cfg.passage_max_len} tokens"),
        ("precision", f"compute {c.model.dtype}, parameters {c.model.param_dtype}"),
        ("seed", c.seed),
    ]
    method = getattr(c.method, c.method.name, None)
    if method is not None:
        settings.append(
            (f"{c.method.name} settings", ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(method).items()))
        )
    lines += ["", "| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in settings)]
    return lines


def _evaluation(info: CardInfo) -> list[str]:
    lines = [
        "## Evaluation",
        "",
        f"Exact inner-product search on {info.eval_data}; step 0 is the base model.",
        "",
        "| step | " + " | ".join(name for _, name in EVAL_COLUMNS) + " |",
        "|---:|" + "---:|" * len(EVAL_COLUMNS),
    ]
    for row in info.metrics:
        cells = [f"{row[k]:.4f}" if isinstance(row.get(k), (int, float)) else "" for k, _ in EVAL_COLUMNS]
        lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
    return lines


def _usage(spec: EncoderSpec, ref: str) -> list[str]:
    name = json.dumps(ref)
    return [
        "## Usage",
        "",
        "With sentence-transformers (the prompts above are applied by `encode_query` / `encode_document`):",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        f"model = SentenceTransformer({name})",
        'queries = model.encode_query(["what is dense retrieval?"])',
        'passages = model.encode_document(["Dense retrieval embeds queries and passages as vectors."])',
        "print(model.similarity(queries, passages))",
        "```",
        "",
        "With opera-jax (JAX, on CPU, GPU or TPU):",
        "",
        "```python",
        "import opera_jax",
        "",
        f"retriever = opera_jax.DenseRetriever({name})",
        'hits = retriever.search(["what is dense retrieval?"], ["Dense retrieval embeds queries and passages '
        'as vectors.", "Something else."], k=1)',
        "```",
    ]


def parse_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a card (between the leading ``---`` lines)."""
    if not text.startswith("---\n"):
        return {}
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end]) or {}
