"""``opera-jax export``: the model of a run's checkpoint, in Hugging Face / sentence-transformers format."""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from opera_jax.config import load_config
from opera_jax.errors import InputError
from opera_jax.models.export import export_encoder
from opera_jax.models.model_card import run_card
from opera_jax.preflight import check_output_dir
from opera_jax.train import run_dir
from opera_jax.train.checkpoint import Checkpointer
from opera_jax.train.setup import load_model


def export_run(workdir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Export the model of a run's checkpoint (default: the latest) in Hugging Face format."""
    workdir = Path(workdir)
    if not (workdir / run_dir.CONFIG_FILE).is_file():
        raise InputError(f"{workdir}: not a run directory (no {run_dir.CONFIG_FILE})")
    check_output_dir(out, "export directory")
    config = load_config(workdir / run_dir.CONFIG_FILE)
    encoder = load_model(config)
    checkpointer = Checkpointer(workdir / "checkpoints")
    step = checkpointer.latest_step() if step is None else step
    if step is None or step not in checkpointer.manager.all_steps():
        raise InputError(f"{workdir / 'checkpoints'}: no checkpoint {'at all' if step is None else f'for step {step}'}")
    nnx.update(encoder.model, checkpointer.restore_params(step, nnx.state(encoder.model, nnx.Param)))
    checkpointer.close()
    return export_encoder(encoder, out, card=run_card(config, workdir, None, step=step))
