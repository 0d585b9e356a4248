"""``train_and_evaluate(config, workdir)``: one finetuning run, from base model to exported model.

Sections, in the order a run goes through them: set-up (model, data, negatives,
method, state), resume, the loop (plan -> batches -> jitted step; evaluation,
logging and checkpoints every N steps), export.

Everything that can be checked is checked before work starts and before
anything is written: the run directory and its config, the model files, both
splits, one batch against the training set (``opera_jax/preflight.py``).

The hot loop never waits on the device except every ``log_every`` steps (to
show the loss), at evaluations and at checkpoints. Workdir layout:

    config.yaml      the exact config of the run, written once when it starts: the same config
                     resumes, a finished run is left alone, a different one is refused
                     (``run_dir.py``; ``new_run`` starts over)
    train_log.jsonl  the mean training loss and examples/s every ``train.log_every`` steps
    metrics.jsonl    one JSON object per evaluation, step 0 (the base model) included;
                     train_seconds is training time without evaluations and without
                     XLA compilation (each new batch shape is compiled ahead, timed
                     apart as compile_seconds)
    tb/              TensorBoard event files
    checkpoints/     Orbax checkpoints (the last ``train.keep_checkpoints``)
    run.trec         the final model's top 100 per evaluation query
    model/           the final model, Hugging Face / sentence-transformers format
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

from opera_jax.config import Config, with_budget
from opera_jax.data.beir import BeirSplit, load_split, resolve_data_dir
from opera_jax.data.mining import load_or_mine
from opera_jax.data.pairs_jsonl import is_pairs_file, load_pairs_jsonl
from opera_jax.data.pipeline import BatchSpec, iterate, make_dataset
from opera_jax.data.tables import TrainData, given_negatives, hold_out
from opera_jax.data.tokens import TokenArrays, cache_dir, tokenize
from opera_jax.data.training import TrainingSet, build_training_set
from opera_jax.data.validation import carve
from opera_jax.errors import InputError, TrainingDiverged
from opera_jax.eval.evaluate import Evaluator
from opera_jax.eval.metrics import write_trec_run
from opera_jax.io_utils import atomic_path
from opera_jax.methods import Method
from opera_jax.methods.basic import Basic
from opera_jax.methods.dynamic import Dynamic
from opera_jax.methods.infobatch import InfoBatch
from opera_jax.methods.pair_scores import pair_similarities
from opera_jax.methods.static import Static
from opera_jax.models.bert import Precision
from opera_jax.models.encoder import Encoder, load_encoder
from opera_jax.models.export import export_encoder
from opera_jax.models.model_card import run_card
from opera_jax.preflight import check_batch_fits, check_batch_within, check_output_dir
from opera_jax.sharding import FSDP_RULES, REPLICATED_RULES, batch_sharding, make_mesh, put_global, tree_shardings
from opera_jax.train import run_dir
from opera_jax.train.checkpoint import Checkpointer
from opera_jax.train.optim import learning_rate_schedule, make_optimizer
from opera_jax.train.step import init_state, make_train_step

log = logging.getLogger(__name__)

SPEC_FIELDS = ("pooling", "normalize", "query_prefix", "passage_prefix", "padding_side")


# ----------------------------------------------------------------------------- set-up


def load_model(config: Config) -> Encoder:
    m = config.model
    overrides = {k: getattr(m, k) for k in SPEC_FIELDS if getattr(m, k) is not None}
    return load_encoder(
        m.name,
        precision=Precision.named(m.dtype, m.param_dtype),
        remat=m.remat,
        attention=m.attention,
        seed=config.seed,
        overrides=overrides,
    )


@dataclasses.dataclass
class Setup:
    """What every command that trains, mines or prunes starts from."""

    encoder: Encoder
    data_dir: Path | None  # None: the data came loaded (``given``)
    train_split: BeirSplit
    ts: TrainingSet
    query_tokens: TokenArrays  # the training queries, with the query prefix
    doc_tokens: TokenArrays  # the whole corpus, with the passage prefix
    eval_split: BeirSplit | None = None  # loaded when preparing a training run
    given: TrainData | None = None


def prepare(
    config: Config, mesh, *, progress: bool = False, training: bool = False, data: TrainData | None = None
) -> Setup:
    """Model, training split and training set, tokenised. ``training``: also load the eval split and
    check that one batch fits the training set, before tokenising anything. ``data``: already-loaded
    splits (``opera_jax.finetune``), used instead of ``data.path``; a ``data.path`` naming a
    ``{query, pos, neg}`` JSONL file is read as one, with 10% of its queries held out for evaluation
    (``tables.hold_out``, seeded by ``seed``)."""
    d = config.data
    encoder = load_model(config)
    spec = encoder.spec
    if data is None and is_pairs_file(d.path):
        pairs = load_pairs_jsonl(d.path)
        data = TrainData(*hold_out(pairs.train, 0.1, config.seed), negatives=pairs.negatives)
    data_dir = None if data is not None else resolve_data_dir(d.path)
    train_split = data.train if data is not None else load_split(data_dir, d.train_split, empty=d.empty)
    if d.valid_fraction and data is None:
        train_split = carve(train_split, d.valid_fraction)[0]
    ts = build_training_set(train_split, d.pos_threshold)
    eval_split = None
    if training:
        if data is None:
            eval_split = evaluation_split(config, data_dir)
        check_batch_fits(config, ts.num_queries, ts.num_pairs, d.train_split)
    query_tokens = tokenize(encoder.tokenizer, ts.query_texts, d.query_max_len, spec.query_prefix)
    doc_tokens = tokenize(
        encoder.tokenizer, train_split.corpus.passages(d.passage_text), d.passage_max_len, spec.passage_prefix
    )
    return Setup(encoder, data_dir, train_split, ts, query_tokens, doc_tokens, eval_split, data)


def mine(config: Config, setup: Setup, mesh, *, progress: bool = False, path: Path | None = None):
    """The run's hard negatives: reused from the cache when mined with the same settings."""
    d = config.data
    own = config.mining.model in (None, config.model.name)
    miner = setup.encoder if own else load_encoder(config.mining.model)
    return load_or_mine(
        path or _mining_cache(config),
        miner,
        setup.ts,
        setup.train_split.corpus.passages(d.passage_text),
        model_name=config.mining.model or config.model.name,
        mode=config.mining.mode,
        rank_start=config.mining.rank_start,
        rank_end=config.mining.rank_end,
        num_negatives=config.mining.num_negatives,
        seed=config.seed,
        query_max_len=d.query_max_len,
        passage_max_len=d.passage_max_len,
        batch_size=d.eval_batch_size,
        mesh=mesh,
        query_tokens=setup.query_tokens if own else None,
        doc_tokens=setup.doc_tokens if own else None,
        progress=progress,
    )


def evaluation_split(config: Config, data_dir: Path | None = None) -> BeirSplit:
    """What a run evaluates on: ``data.eval_split``, or the validation queries carved from the training
    split when ``data.valid_fraction`` is set (then test is never looked at)."""
    d = config.data
    data_dir = data_dir or resolve_data_dir(d.path)
    if d.valid_fraction:
        return carve(load_split(data_dir, d.train_split, empty=d.empty), d.valid_fraction)[1]
    return load_split(data_dir, d.eval_split, empty=d.empty)


def make_method(config: Config, ts: TrainingSet, encoder: Encoder, query_tokens, doc_tokens, mesh) -> Method:
    """The configured method; SP and DP start from the base model's pair similarities."""
    method, seed, o = config.method, config.seed, config.optim
    if method.name == "basic":
        return Basic(ts, seed)
    if method.name == "infobatch":
        return InfoBatch(
            ts, method.infobatch.ratio, method.infobatch.delta, seed=seed, max_steps=o.max_steps, min_kept=o.batch_size
        )
    s0 = pair_similarities(
        encoder.model,
        ts,
        query_tokens,
        doc_tokens,
        query_max_len=config.data.query_max_len,
        passage_max_len=config.data.passage_max_len,
        batch_size=config.data.eval_batch_size,
        padding_side=encoder.spec.padding_side,
        mesh=mesh,
    )
    if method.name == "sp":
        return Static(ts, s0, method.sp.kept_pct, method.sp.mode, seed)
    return Dynamic(ts, s0, method.dp, seed=seed, max_steps=o.max_steps, batch_size=o.batch_size)


def _mining_cache(config: Config) -> Path:
    """Where a run's negatives are cached: shared by runs that would mine the same ones.

    ``load_or_mine`` still checks the saved metadata (model, range, M, seed, texts)
    before reusing a file, so a collision can only cost a re-mine.
    """
    m, d = config.mining, config.data
    key = json.dumps(
        [
            m.model or config.model.name,
            m.mode,
            m.rank_start,
            m.rank_end,
            m.num_negatives,
            config.seed,
            d.path,
            d.train_split,
            d.query_max_len,
            d.passage_max_len,
        ]
        + ([d.passage_text] if d.passage_text != "title_text" else [])
        + ([d.valid_fraction] if d.valid_fraction else [])
    )
    return cache_dir().parent / "negatives" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"


def _segment_seed(seed: int, segment: int) -> int:
    return (seed * 1_000_003 + segment) % (2**31 - 1)


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


# ----------------------------------------------------------------------------- the run


def train_and_evaluate(
    config: Config,
    workdir: str | Path,
    *,
    progress: bool = True,
    stop_after: int | None = None,
    new_run: bool = False,
    data: TrainData | None = None,
) -> dict:
    """Train, evaluate every ``train.eval_every`` steps, checkpoint, export. Returns the last evaluation.

    A workdir of the same config resumes from its latest checkpoint; a finished one is returned
    as it is (its last evaluation); one of a different config is refused unless ``new_run``,
    which discards it. ``stop_after`` ends the run early after that many steps (checkpointed,
    not exported), as a preemption would; run again to continue. ``data``: already-loaded splits
    instead of ``data.path`` (see ``prepare``); given negatives replace mining, and with no eval
    split the run is not evaluated (returns ``{}``).
    """
    workdir = Path(workdir)
    main_process = jax.process_index() == 0
    status = run_dir.inspect(workdir, config, new_run=new_run)
    if status == run_dir.FINISHED:
        return run_dir.last_metrics(workdir)
    d, o, t = config.data, config.optim, config.train
    mesh = make_mesh(fsdp=config.mesh.fsdp)
    if o.batch_size % mesh.size:
        raise InputError(f"optim.batch_size {o.batch_size} must be a multiple of the {mesh.size} devices")
    if o.grad_cache_chunk and o.grad_cache_chunk % mesh.size:
        raise InputError(f"optim.grad_cache_chunk {o.grad_cache_chunk} must be a multiple of the {mesh.size} devices")

    setup = prepare(config, mesh, progress=progress, training=True, data=data)
    config = with_budget(config, setup.ts.num_queries)  # optim.max_epochs -> max_steps, on this collection
    o = config.optim
    encoder, spec, ts = setup.encoder, setup.encoder.spec, setup.ts
    query_tokens, doc_tokens = setup.query_tokens, setup.doc_tokens
    given = setup.given
    if d.group_size > 1:
        if given is not None and given.negatives is not None:  # e.g. a {query, pos, neg} file's own
            ts = ts.with_negatives(*given_negatives(ts, setup.train_split.corpus, given.negatives))
        else:
            mined = mine(config, setup, mesh, progress=progress)
            ts = ts.with_negatives(mined.negatives, mined.counts)
    eval_split = setup.eval_split if given is None else given.eval
    evaluator = (
        None
        if eval_split is None
        else Evaluator(
            eval_split,
            encoder.tokenizer,
            spec,
            max_query_len=d.query_max_len,
            max_passage_len=d.passage_max_len,
            batch_size=d.eval_batch_size,
            mesh=mesh,
            passage_text=d.passage_text,
        )
    )
    batch_spec = BatchSpec(o.batch_size, d.group_size, d.query_max_len, d.passage_max_len, spec.padding_side)
    setup_start = time.perf_counter()
    method = make_method(config, ts, encoder, query_tokens, doc_tokens, mesh)
    method_setup_s = time.perf_counter() - setup_start  # SP/DP: the base model's pair scores
    if method.ts is not ts:  # static pruning trains on a subset: renumbered queries, so their tokens too
        check_batch_within(
            o.batch_size,
            method.ts.num_queries,
            method.name,
            f"{method.ts.num_queries} of {ts.num_queries} training queries keep a pair",
        )
        query_tokens = query_tokens.take(method.ts.rows_in(ts))
        ts = method.ts
    if main_process:  # every check passed: the run starts (config.yaml, written once)
        run_dir.start(workdir, config, status)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("opera-jax run directory ready")

    model = encoder.model
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    learning_rate = learning_rate_schedule(o.learning_rate, o.max_steps, o.warmup_ratio, o.schedule)
    optimizer = make_optimizer(
        o.learning_rate,
        o.max_steps,
        warmup_ratio=o.warmup_ratio,
        weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm,
        schedule=o.schedule,
    )
    state = init_state(params, optimizer, config.seed, method.init_state())
    rules = FSDP_RULES if config.mesh.fsdp > 1 else REPLICATED_RULES
    state = put_global(state, tree_shardings(state, mesh, rules))
    train_step = make_train_step(
        graphdef, rest, optimizer, o.temperature, method.update, grad_cache_chunk=o.grad_cache_chunk
    )
    shard_batch = _batch_putter(mesh)

    def current_model():
        m = nnx.merge(graphdef, state.params, rest)
        m.eval()
        return m

    # --------------------------------------------------------------------------- resume
    checkpointer = Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints)
    segment, iterator_state, plan, train_seconds, compile_seconds = 0, None, None, 0.0, 0.0
    latest = checkpointer.latest_step()
    if latest is not None:
        state, plan, data = checkpointer.restore(latest, state)
        segment, iterator_state, train_seconds = data["segment"], data["iterator"], data["train_seconds"]
        compile_seconds = data.get("compile_seconds", 0.0)
        log.info("resumed from step %d", latest)
        if progress and main_process:
            tqdm.write(f"resuming from the step-{latest} checkpoint in {workdir / 'checkpoints'}")
    start = int(state.step)
    metrics_log = MetricsLog(workdir / "metrics.jsonl", keep_until=start, enabled=main_process)
    train_log = MetricsLog(workdir / "train_log.jsonl", keep_until=start, enabled=main_process)
    writer = _tensorboard(workdir / "tb", config) if main_process else None

    def new_segment(seg: int, step: int, saved_plan=None, saved_iter=None):
        p = saved_plan if saved_plan is not None else method.plan(state.method, seg, step)
        ds = make_dataset(
            p,
            ts,
            query_tokens,
            doc_tokens,
            batch_spec,
            seed=_segment_seed(config.seed, seg),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        if len(ds) == 0:  # checked before the run started (preflight.py): a bug if it happens
            raise ValueError(f"a plan of {len(p)} draws is shorter than one batch of {o.batch_size}")
        return p, iterate(ds, saved_iter)

    plan, batches = new_segment(segment, start, plan, iterator_state)

    # --------------------------------------------------------------------------- the loop
    run_start = time.perf_counter()
    last = {}

    def evaluate(step: int) -> dict:
        nonlocal last
        if evaluator is None:  # loaded data without an eval split
            return {}
        result = evaluator(current_model(), progress=progress and main_process)  # transient encoding bars
        row = {
            "step": step,
            "wall_time_s": round(time.perf_counter() - run_start, 3),
            "train_seconds": round(train_seconds, 3),
            "compile_seconds": round(compile_seconds, 3),
            "method_setup_s": round(method_setup_s, 3),
            "examples_seen": step * o.batch_size,
            **{k: round(v, 6) for k, v in result.metrics.items()},
            "eval_seconds": round(result.seconds, 3),
        }
        metrics_log.append(row)
        if main_process and step == o.max_steps:
            write_trec_run(workdir / "run.trec", result.run)  # the final model's ranking, for per-query tests
        if writer is not None:
            for k in EVAL_SCALARS:
                writer.add_scalar(_eval_tag(k), row[k], step)
            writer.flush()
        if progress and main_process:  # one line per evaluation, above the training bar
            tqdm.write(
                f"step {step}{' (base model)' if step == 0 else ''}: ndcg@10 {row['ndcg@10']:.4f} "
                f"recall@20 {row['recall@20']:.4f} mrr@10 {row['mrr@10']:.4f} ({result.seconds:.1f} s)"
            )
        last = row
        return row

    if start == 0:
        evaluate(0)
    bar = tqdm(total=o.max_steps, initial=start, desc="train", unit="step", disable=not (progress and main_process))
    interval_start, interval_steps = time.perf_counter(), 0
    loss_sum, finite = jnp.zeros(()), jnp.array(True)
    last_saved = latest
    compiled_shapes = set()
    for step in range(start, o.max_steps):
        try:
            batch = next(batches)
        except StopIteration:
            segment += 1
            plan, batches = new_segment(segment, step)
            batch = next(batches)
        batch = shard_batch(batch)
        shapes = tuple((k, v.shape) for k, v in sorted(batch.items()))
        if shapes not in compiled_shapes:  # compile a new bucket shape outside the timed training
            compile_start = time.perf_counter()
            train_step.compile(state, batch)
            compiled_shapes.add(shapes)
            compile_seconds += time.perf_counter() - compile_start
            interval_start += time.perf_counter() - compile_start
            _discount(bar, time.perf_counter() - compile_start)  # a compile is no step: keep it out of the ETA
        state, out = train_step(state, batch)
        loss_sum, finite = loss_sum + out["loss"], finite & out["finite"]
        interval_steps += 1
        done = step + 1
        is_eval = (t.eval_every and done % t.eval_every == 0) or done == o.max_steps
        stopping = done == stop_after
        is_ckpt = (t.checkpoint_every and done % t.checkpoint_every == 0) or done == o.max_steps or stopping
        if done % t.log_every == 0 or is_eval or is_ckpt:
            mean_loss = float(loss_sum) / interval_steps  # the one host sync of an interval
            elapsed = time.perf_counter() - interval_start
            train_seconds += elapsed
            if not bool(finite):
                raise TrainingDiverged(
                    f"loss became NaN or Inf between steps {done - interval_steps} and {done}; "
                    f"last good checkpoint: {'step ' + str(last_saved) if last_saved is not None else 'none'} "
                    f"in {workdir / 'checkpoints'}"
                )
            bar.update(interval_steps)
            bar.set_postfix(loss=f"{mean_loss:.4f}", ex_s=f"{interval_steps * o.batch_size / elapsed:.1f}")
            train_log.append(
                {
                    "step": done,
                    "loss": mean_loss,
                    "steps": interval_steps,
                    "examples_per_s": round(interval_steps * o.batch_size / elapsed, 3),
                }
            )
            if writer is not None:
                writer.add_scalar("train/loss", mean_loss, done)
                writer.add_scalar("train/learning_rate", float(learning_rate(done - 1)), done)  # step done's
                writer.add_scalar("train/examples_per_s", interval_steps * o.batch_size / elapsed, done)
            if is_ckpt:
                checkpointer.save(
                    done,
                    state,
                    plan,
                    {
                        "segment": segment,
                        "iterator": batches.get_state(),
                        "train_seconds": train_seconds,
                        "compile_seconds": compile_seconds,
                    },
                )
                last_saved = done
            if is_eval:
                bar.set_description("train (evaluating)")  # the bar says why it waits
                evaluate(done)
                bar.set_description("train")
            loss_sum, finite, interval_steps = jnp.zeros(()), jnp.array(True), 0
            interval_start = time.perf_counter()
        if stopping:
            break
    bar.close()
    checkpointer.close()
    if stop_after is not None and int(state.step) < o.max_steps:
        return last
    if not last and main_process:  # resumed from the final checkpoint (stopped during the export)
        last = run_dir.last_metrics(workdir)
    if main_process:
        export_encoder(encoder, workdir / "model", model=current_model(), card=run_card(config, workdir, setup))
        if writer is not None:
            writer.close()
    return last


def export_run(workdir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Export the model of a run's checkpoint (default: the latest) in Hugging Face format."""
    from opera_jax.config import load_config

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


def _discount(bar, seconds: float) -> None:
    """Leave ``seconds`` out of a tqdm bar's rate and ETA (as if they had not passed)."""
    if not bar.disable:
        bar.start_t += seconds
        bar.last_print_t += seconds


def _batch_putter(mesh):
    sharding = batch_sharding(mesh)

    def put(local: dict) -> dict:
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}

    return put


EVAL_SCALARS = ("ndcg@10", "recall@20", "mrr@10", "recall@100")


def _eval_tag(metric: str) -> str:
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


def _tensorboard(path: Path, config: Config):
    """The run's writer, with its config recorded as hyperparameters (against the eval scalars)."""
    from tensorboardX import SummaryWriter
    from tensorboardX.summary import hparams

    writer = SummaryWriter(str(path))
    for summary in hparams(hparams_of(config), {_eval_tag(k): 0.0 for k in EVAL_SCALARS}):
        writer.file_writer.add_summary(summary)
    return writer
