"""A run's logs: ``metrics.jsonl`` and ``train_log.jsonl`` (cut back on resume) and TensorBoard."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from opera_jax.config import Config
from opera_jax.io_utils import atomic_path

EVAL_SCALARS = ("ndcg@10", "recall@20", "mrr@10", "recall@100")


class MetricsLog:
    """A JSONL log (process 0 only): cut back to the rows of steps <= ``keep_until`` on resume; a run
    starting at step 0 (``keep_until`` 0: no checkpoint, even if an earlier attempt logged rows) starts it anew."""

    def __init__(self, path: Path, keep_until: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            with atomic_path(path) as tmp:
                tmp.write_text(
                    "".join(json.dumps(r) + "\n" for r in rows if 0 < keep_until and r["step"] <= keep_until)
                )

    def append(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


def eval_tag(metric: str) -> str:
    """The TensorBoard tag of an evaluation metric: ``eval/ndcg_10`` (a tag cannot hold ``@``)."""
    return "eval/" + metric.replace("@", "_")


def hparams_of(config: Config) -> dict[str, bool | int | float | str]:
    """The config as TensorBoard hyperparameters: dotted keys, None as "null"."""

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: "null" if v is None else v})
        return out

    return flat(dataclasses.asdict(config))


def tensorboard(path: Path, config: Config):
    """The run's writer, with its config recorded as hyperparameters (against the eval scalars)."""
    from tensorboardX import SummaryWriter
    from tensorboardX.summary import hparams

    writer = SummaryWriter(str(path))
    for summary in hparams(hparams_of(config), {eval_tag(k): 0.0 for k in EVAL_SCALARS}):
        writer.file_writer.add_summary(summary)
    return writer
