"""``train_and_evaluate(config, workdir)``: one finetuning run, from base model to exported model.

Sections, in the order a run goes through them: set-up (model, data and negatives from
``setup.py``, the method from ``methods/registry.py``, the sharded state), resume, the loop
(plan -> batches -> jitted step; evaluation, logging and checkpoints every N steps), export.

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

import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

from opera_jax.config import Config, with_budget
from opera_jax.data.pipeline import BatchSpec, iterate, make_dataset
from opera_jax.data.tables import TrainData, given_negatives
from opera_jax.errors import InputError, TrainingDiverged
from opera_jax.eval.evaluate import Evaluator
from opera_jax.eval.metrics import write_trec_run
from opera_jax.methods.registry import build_method
from opera_jax.models.export import export_encoder
from opera_jax.models.model_card import run_card
from opera_jax.preflight import check_batch_within
from opera_jax.sharding import FSDP_RULES, REPLICATED_RULES, batch_sharding, make_mesh, put_global, tree_shardings
from opera_jax.train import run_dir
from opera_jax.train.checkpoint import Checkpointer
from opera_jax.train.optim import learning_rate_schedule, optimizer_for
from opera_jax.train.run_logs import EVAL_SCALARS, MetricsLog, eval_tag, tensorboard
from opera_jax.train.setup import base_scores, mine, prepare
from opera_jax.train.step import init_state, make_train_step

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- helpers


def _segment_seed(seed: int, segment: int) -> int:
    return (seed * 1_000_003 + segment) % (2**31 - 1)


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
    mesh = make_mesh(fsdp=config.mesh.fsdp)
    batch_size, chunk = config.optim.batch_size, config.optim.grad_cache_chunk
    if batch_size % mesh.size:
        raise InputError(f"optim.batch_size {batch_size} must be a multiple of the {mesh.size} devices")
    if chunk and chunk % mesh.size:
        raise InputError(f"optim.grad_cache_chunk {chunk} must be a multiple of the {mesh.size} devices")

    setup = prepare(config, training=True, data=data)
    config = with_budget(config, setup.ts.num_queries)  # optim.max_epochs -> max_steps, on this collection
    data_cfg, optim, train_cfg = config.data, config.optim, config.train
    encoder, spec, ts = setup.encoder, setup.encoder.spec, setup.ts
    query_tokens, doc_tokens = setup.query_tokens, setup.doc_tokens
    given = setup.given
    if data_cfg.group_size > 1:
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
            max_query_len=data_cfg.query_max_len,
            max_passage_len=data_cfg.passage_max_len,
            batch_size=data_cfg.eval_batch_size,
            mesh=mesh,
            passage_text=data_cfg.passage_text,
        )
    )
    batch_spec = BatchSpec(
        optim.batch_size, data_cfg.group_size, data_cfg.query_max_len, data_cfg.passage_max_len, spec.padding_side
    )
    setup_start = time.perf_counter()
    method = build_method(config, ts, lambda: base_scores(config, encoder, ts, query_tokens, doc_tokens, mesh))
    method_setup_s = time.perf_counter() - setup_start  # SP/DP: the base model's pair scores
    if method.ts is not ts:  # a method training on a subset (SP): renumbered queries, so their tokens too
        check_batch_within(
            optim.batch_size,
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
    learning_rate = learning_rate_schedule(optim.learning_rate, optim.max_steps, optim.warmup_ratio, optim.schedule)
    optimizer = optimizer_for(optim)
    state = init_state(params, optimizer, config.seed, method.init_state())
    rules = FSDP_RULES if config.mesh.fsdp > 1 else REPLICATED_RULES
    state = put_global(state, tree_shardings(state, mesh, rules))
    train_step = make_train_step(
        graphdef, rest, optimizer, optim.temperature, method.update, grad_cache_chunk=optim.grad_cache_chunk
    )
    shard_batch = _batch_putter(mesh)

    def current_model():
        m = nnx.merge(graphdef, state.params, rest)
        m.eval()
        return m

    # --------------------------------------------------------------------------- resume
    checkpointer = Checkpointer(workdir / "checkpoints", keep=train_cfg.keep_checkpoints)
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
    writer = tensorboard(workdir / "tb", config) if main_process else None

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
            raise ValueError(f"a plan of {len(p)} draws is shorter than one batch of {optim.batch_size}")
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
            "examples_seen": step * optim.batch_size,
            **{k: round(v, 6) for k, v in result.metrics.items()},
            "eval_seconds": round(result.seconds, 3),
        }
        metrics_log.append(row)
        if main_process and step == optim.max_steps:
            write_trec_run(workdir / "run.trec", result.run)  # the final model's ranking, for per-query tests
        if writer is not None:
            for k in EVAL_SCALARS:
                writer.add_scalar(eval_tag(k), row[k], step)
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
    bar = tqdm(total=optim.max_steps, initial=start, desc="train", unit="step", disable=not (progress and main_process))
    interval_start, interval_steps = time.perf_counter(), 0
    loss_sum, finite = jnp.zeros(()), jnp.array(True)
    last_saved = latest
    compiled_shapes = set()
    for step in range(start, optim.max_steps):
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
        is_eval = (train_cfg.eval_every and done % train_cfg.eval_every == 0) or done == optim.max_steps
        stopping = done == stop_after
        is_ckpt = (
            (train_cfg.checkpoint_every and done % train_cfg.checkpoint_every == 0)
            or done == optim.max_steps
            or stopping
        )
        if done % train_cfg.log_every == 0 or is_eval or is_ckpt:
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
            bar.set_postfix(loss=f"{mean_loss:.4f}", ex_s=f"{interval_steps * optim.batch_size / elapsed:.1f}")
            train_log.append(
                {
                    "step": done,
                    "loss": mean_loss,
                    "steps": interval_steps,
                    "examples_per_s": round(interval_steps * optim.batch_size / elapsed, 3),
                }
            )
            if writer is not None:
                writer.add_scalar("train/loss", mean_loss, done)
                writer.add_scalar("train/learning_rate", float(learning_rate(done - 1)), done)  # step done's
                writer.add_scalar("train/examples_per_s", interval_steps * optim.batch_size / elapsed, done)
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
    if stop_after is not None and int(state.step) < optim.max_steps:
        return last
    if not last and main_process:  # resumed from the final checkpoint (stopped during the export)
        last = run_dir.last_metrics(workdir)
    if main_process:
        export_encoder(encoder, workdir / "model", model=current_model(), card=run_card(config, workdir, setup))
        if writer is not None:
            writer.close()
    return last


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
