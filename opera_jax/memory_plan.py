"""``plan_memory(config, devices, fsdp)``: per-device memory and FLOPs of a config's train step, without weights.

The model is built abstractly (``nnx.eval_shape``: shapes and dtypes, nothing
allocated, no weights read), and the real train step (``make_train_step``) is
lowered and compiled for abstract state and batch placed on a ``(data, fsdp)``
mesh of ``devices`` devices, with the trainer's partition rules. XLA's
compiled ``memory_analysis`` gives the per-device bytes of the arguments
(parameters, optimizer state, batch), outputs and temporaries (activations,
gradients, scratch); ``cost_analysis`` the per-device FLOPs of one step.

Run on the CPU (``opera-jax plan`` simulates ``devices`` CPU devices), with XLA's
attention rather than the CPU kernel (whose scratch and FLOPs XLA does not see), the
figures are XLA:CPU's buffer assignment: an estimate of a GPU's or TPU's, not
a measurement (their compilers fuse and schedule differently, XLA:CPU computes
bf16 elementwise work in f32, and its buffer assignment does not realise
remat's savings: temporaries with remat are an upper bound there). Parameter
and optimizer bytes are counted from shapes and shardings, which holds on any
backend; GradCache's and FSDP's effects on temporaries do show on the CPU.

A model is read from its ``config.json`` only. A hub id that cannot be
resolved offline falls back to the architecture presets shipped in
``models/presets/<hub id>/config.json`` (bge-large-en-v1.5, Qwen3-Embedding
0.6B/4B/8B), and the plan says so.

The method's own device state (DP's pair scores: a few bytes per pair) is left
out: the step is planned as basic finetuning.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from opera_jax.config import Config
from opera_jax.errors import InputError

PRESETS = Path(__file__).resolve().parent / "models" / "presets"
GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    model: str
    source: str  # the model directory, or "preset ..." when the hub id could not be resolved
    architecture: str
    num_params: int
    devices: int
    data: int
    fsdp: int
    batch_size: int  # global queries per step
    group_size: int
    query_len: int
    passage_len: int
    dtype: str
    param_dtype: str
    remat: str
    grad_cache_chunk: int | None
    # per device, bytes
    param_bytes: int  # counted from shapes and shardings
    optimizer_bytes: int  # counted from shapes and shardings
    argument_bytes: int  # compiled: parameters + optimizer state + batch
    output_bytes: int
    alias_bytes: int  # outputs that reuse donated arguments
    temp_bytes: int  # compiled: activations, gradients, scratch
    peak_bytes: int  # argument + output - alias + temp
    flops: float  # compiled cost analysis, per device per step (GradCache: XLA counts its loops' bodies once)
    analytic_flops: float  # 6 N tokens + attention, per device (8 N with full remat)
    backend: str

    def summary(self) -> str:
        g = _size
        mesh = f"{self.devices} devices (data {self.data} x fsdp {self.fsdp})"
        chunk = f", grad-cache chunk {self.grad_cache_chunk}" if self.grad_cache_chunk else ""
        lines = [
            f"model      {self.model} ({self.architecture}, {self.num_params / 1e6:.1f}M parameters; {self.source})",
            f"step       {self.batch_size} queries x {self.group_size} passages, lengths {self.query_len}/"
            f"{self.passage_len}; compute {self.dtype}, parameters {self.param_dtype}, remat {self.remat}{chunk}",
            f"mesh       {mesh}",
            "per device:",
            f"  parameters        {g(self.param_bytes)}",
            f"  optimizer state   {g(self.optimizer_bytes)}  (Adam moments, f32)",
            f"  activations/temp  {g(self.temp_bytes)}  (activations, gradients, scratch)",
            f"  arguments         {g(self.argument_bytes)}, outputs {g(self.output_bytes)} "
            f"({g(self.alias_bytes)} donated in place)",
            f"  peak              {g(self.peak_bytes)}",
            f"  FLOPs per step    {self.flops:.3e} (compiled; analytic 6N*tokens + attention: "
            f"{self.analytic_flops:.3e})",
            f"note: compiled by XLA:{self.backend.upper()} for {self.devices} simulated devices; an estimate "
            "of a GPU's or TPU's memory, not a measurement.",
        ]
        if self.backend == "cpu" and self.remat != "none":
            lines.append(
                "note: XLA:CPU's buffer assignment does not realise remat's savings (a 16-layer toy chain: "
                "392 MiB temp without jax.checkpoint, 512 MiB with), so temp with remat is an upper bound."
            )
        if self.grad_cache_chunk:
            lines.append(
                "note: XLA's cost analysis counts a loop body once, so GradCache's compiled FLOPs "
                "cover one chunk of each loop (the analytic figure is the whole step)."
            )
        if self.source.startswith("architecture preset"):
            lines.append(
                f"note: {self.model} could not be resolved offline; its shipped architecture preset "
                "was planned (shapes only, no weights)."
            )
        return "\n".join(lines)


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 4 else f"{n / 2**20:.2f} MiB"


def model_config(name: str) -> tuple[dict, str]:
    """A model's parsed ``config.json`` and where it came from (directory, cache or preset)."""
    from opera_jax.models.hub import resolve_model_dir

    try:
        directory = resolve_model_dir(name)
    except InputError as error:
        preset = PRESETS / name / "config.json"
        if not preset.is_file() or ".." in Path(name).parts:
            raise InputError(
                f"{error} (no architecture preset for {name!r} either: presets are {', '.join(presets())})"
            ) from None
        return json.loads(preset.read_text()), "architecture preset: the hub id could not be resolved offline"
    return json.loads((directory / "config.json").read_text()), str(directory)


def presets() -> list[str]:
    return sorted(str(p.parent.relative_to(PRESETS)) for p in PRESETS.glob("*/*/config.json"))


def _bytes_per_device(tree) -> int:
    """Bytes of one device's shards of a tree of ``ShapeDtypeStruct`` with shardings."""
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def analytic_flops(
    arch_config, architecture: str, tokens: int, lengths: list[tuple[int, int]], extra_forwards: int = 0
) -> float:
    """Matmul FLOPs of one step: ``6 N`` per token (forward 2, backward 4) for the
    non-embedding weights, plus attention's two ``L x L`` products per sequence;
    ``8 N`` when a second forward pass is made (full remat, or GradCache's re-encoding),
    ``10 N`` with both."""
    c = arch_config
    if architecture == "bert":
        width = c.hidden_size
        per_layer = 4 * c.hidden_size**2 + 2 * c.hidden_size * c.intermediate_size
    else:
        width = c.num_attention_heads * c.head_dim
        kv = c.num_key_value_heads * c.head_dim
        per_layer = 2 * c.hidden_size * width + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    weights = per_layer * c.num_hidden_layers
    passes = 6 + 2 * extra_forwards
    attention = sum(rows * 2 * 2 * length**2 * width * c.num_hidden_layers for rows, length in lengths)
    return passes * weights * tokens + passes / 2 * attention


def plan_memory(config: Config, devices: int, fsdp: int = 1) -> MemoryPlan:
    """Compile ``config``'s train step for ``devices`` devices (``fsdp`` of them splitting parameters)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from opera_jax.models.bert import Precision
    from opera_jax.models.encoder import ARCHITECTURES, Retriever
    from opera_jax.models.remat import policy_name
    from opera_jax.sharding import FSDP_RULES, REPLICATED_RULES, batch_sharding, make_mesh, tree_shardings
    from opera_jax.train.optim import optimizer_for
    from opera_jax.train.step import init_state, make_train_step

    if devices < 1 or fsdp < 1 or devices % fsdp:
        raise InputError(f"--fsdp {fsdp} must divide --devices {devices}")
    if devices > jax.device_count():
        raise InputError(
            f"{devices} devices asked for, {jax.device_count()} available (the CLI simulates them "
            "on the CPU; in Python set XLA_FLAGS=--xla_force_host_platform_device_count before "
            "importing jax)"
        )
    m, d, o = config.model, config.data, config.optim
    if o.batch_size % devices:
        raise InputError(f"optim.batch_size {o.batch_size} must be a multiple of the {devices} devices")
    if o.grad_cache_chunk and o.grad_cache_chunk % devices:
        raise InputError(f"optim.grad_cache_chunk {o.grad_cache_chunk} must be a multiple of the {devices} devices")

    hf, source = model_config(m.name)
    architecture = hf.get("model_type")
    if architecture not in ARCHITECTURES:
        raise InputError(f"{m.name}: model_type {architecture!r} is not supported ({', '.join(sorted(ARCHITECTURES))})")
    arch = ARCHITECTURES[architecture]
    arch_config = arch.config_cls.from_hf(hf, source=f"{m.name} config.json")
    precision = Precision.named(m.dtype, m.param_dtype, backend="gpu")  # "auto": as on a GPU / TPU
    pooling = m.pooling or ("last" if architecture == "qwen3" else "cls")

    def build():
        backbone = arch.model_cls(
            arch_config,
            precision=precision,
            remat=m.remat,
            attention="xla",
            rngs=nnx.Rngs(params=0, dropout=config.seed),
        )
        return Retriever(backbone, pooling, m.normalize if m.normalize is not None else True)

    model = nnx.eval_shape(build)  # shapes only: nothing allocated
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optimizer_for(config.optim)
    state = jax.eval_shape(lambda p: init_state(p, optimizer, config.seed), params)

    mesh = make_mesh(fsdp=fsdp, devices=jax.devices()[:devices])
    shardings = tree_shardings(state, mesh, FSDP_RULES if fsdp > 1 else REPLICATED_RULES)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    b, g = o.batch_size, d.group_size
    rows = batch_sharding(mesh)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows)
    batch = {
        "query_input_ids": i32(b, d.query_max_len),
        "query_attention_mask": i32(b, d.query_max_len),
        "passage_input_ids": i32(b * g, d.passage_max_len),
        "passage_attention_mask": i32(b * g, d.passage_max_len),
        "pair": i32(b),
        "query": i32(b),
        "weight": jax.ShapeDtypeStruct((b,), jnp.float32, sharding=rows),
    }
    step = make_train_step(graphdef, rest, optimizer, o.temperature, grad_cache_chunk=o.grad_cache_chunk)
    with _xla_ops_only():  # XLA's own ops: their temporaries and FLOPs are counted, as on a GPU / TPU
        compiled = step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    tokens = b * d.query_max_len + b * g * d.passage_max_len
    remat = policy_name(m.remat)
    return MemoryPlan(
        model=m.name,
        source=source,
        architecture=architecture,
        num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
        devices=devices,
        data=devices // fsdp,
        fsdp=fsdp,
        batch_size=b,
        group_size=g,
        query_len=d.query_max_len,
        passage_len=d.passage_max_len,
        dtype=precision.dtype.name,
        param_dtype=m.param_dtype,
        remat=remat,
        grad_cache_chunk=o.grad_cache_chunk,
        param_bytes=_bytes_per_device(state.params),
        optimizer_bytes=_bytes_per_device(state.opt_state),
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        peak_bytes=int(
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes
        ),
        flops=float(cost.get("flops", 0.0)),
        analytic_flops=analytic_flops(
            arch_config,
            architecture,
            tokens,
            [(b, d.query_max_len), (b * g, d.passage_max_len)],
            (remat == "full") + bool(o.grad_cache_chunk),
        )
        / devices,
        backend=jax.default_backend(),
    )


def _xla_ops_only():
    """On CPU, the C++ kernels turned off for the compilation (``cpu/kernels.py``); elsewhere nothing."""
    import contextlib

    import jax

    if jax.default_backend() != "cpu":
        return contextlib.nullcontext()
    from opera_jax.cpu import kernels

    return kernels.disabled()


def write_json(result: MemoryPlan, path: str | Path) -> None:
    from opera_jax import io_utils

    io_utils.write_json(path, dataclasses.asdict(result))


def fits(result: MemoryPlan, budget_bytes: float) -> bool:
    return result.peak_bytes <= budget_bytes


def as_row(result: MemoryPlan) -> dict[str, Any]:
    """The figures of one plan, in GiB, for tables."""
    return {
        "params_gib": result.param_bytes / GiB,
        "optimizer_gib": result.optimizer_bytes / GiB,
        "temp_gib": result.temp_bytes / GiB,
        "peak_gib": result.peak_bytes / GiB,
        "flops": result.flops,
    }
