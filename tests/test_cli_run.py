"""The ``opera-jax`` command on a user's mistakes and on run directories, run for real (``main``,
and the installed entry points in a subprocess) on the tiny model and a tiny made-up collection.

Each mistake must give exit 2, one ``error:`` line naming the problem, and write or change nothing;
a run directory is bound to its config: the same command resumes or, when finished, does nothing.
"""

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import GOLDEN

from opera_jax.cli import main

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out: README "Tests"

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "river flood bank water stone bridge cell blood heart lung brain nerve star orbit light wave "
    "metal alloy steel heat rain cloud storm wind seed leaf root soil"
).split()


def make_collection(folder: Path, *, train_queries: int = 16, test_queries: int = 8, docs: int = 40) -> Path:
    """A small BEIR collection of made-up text: query ``i`` is judged relevant to document ``i``."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    texts = [" ".join(rng.choice(WORDS, 12)) for _ in range(docs)]
    with open(folder / "corpus.jsonl", "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")
    n = train_queries + test_queries
    with open(folder / "queries.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"_id": f"q{i}", "text": " ".join(texts[i].split()[:4])}) + "\n")
    (folder / "qrels").mkdir()
    header = "query-id\tcorpus-id\tscore\n"
    (folder / "qrels" / "train.tsv").write_text(header + "".join(f"q{i}\td{i}\t1\n" for i in range(train_queries)))
    (folder / "qrels" / "test.tsv").write_text(header + "".join(f"q{i}\td{i}\t1\n" for i in range(train_queries, n)))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A collection and a config that trains 2 steps on it (no hard negatives: no mining)."""
    base = tmp_path_factory.mktemp("cli")
    data = make_collection(base / "tiny")
    config = base / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name": str(GOLDEN / "tiny_bert"), "pooling": "mean", "normalize": True},
                "data": {
                    "path": str(data),
                    "query_max_len": 16,
                    "passage_max_len": 32,
                    "eval_batch_size": 64,
                    "group_size": 1,
                },
                "optim": {"batch_size": 8, "max_steps": 2, "learning_rate": 1e-3},
                "train": {"eval_every": 0, "checkpoint_every": 1, "log_every": 1},
                "mining": {"rank_start": 0, "rank_end": 10, "num_negatives": 4},
            }
        )
    )
    return base, data, config


@pytest.fixture(scope="module")
def finished(world):
    """One finished run of the world's config, made by the CLI (under the usual umask)."""
    base, _, config = world
    out = base / "finished"
    old = os.umask(0o022)
    try:
        assert main(["train", str(config), "--out", str(out)]) == 0
    finally:
        os.umask(old)
    return out


def snapshot(path: Path) -> dict:
    """Every file and folder under ``path``: content hash, mtime and mode (what "nothing changed" means)."""
    if not path.exists():
        return {}
    out = {}
    for p in sorted(path.rglob("*")):
        st = p.stat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(path))] = (digest, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    return out


def refused(capsys, argv, *parts) -> str:
    """Run the CLI: exit 2, exactly one ``error:`` line containing ``parts``, no traceback."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for part in parts:
        assert part in errors[0], errors[0]
    assert "Traceback" not in err
    return errors[0]


@pytest.fixture()
def negatives_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("OPERA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "negatives"


# ----------------------------------------------------------------------------- run directories


def test_a_finished_run_is_left_alone_and_says_so(world, finished, capsys):
    _, _, config = world
    before = snapshot(finished)
    assert {
        "config.yaml",
        "checkpoints",
        "tb",
        "metrics.jsonl",
        "train_log.jsonl",
        "run.trec",
        "model/model.safetensors",
    } <= set(before)
    capsys.readouterr()
    assert main(["train", str(config), "--out", str(finished)]) == 0
    out = capsys.readouterr().out
    assert "already finished (step 2: ndcg@10" in out
    assert snapshot(finished) == before  # not even config.yaml rewritten


def test_written_files_are_readable_by_others(finished):
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "run.trec",
        "model/model.safetensors",
        "model/config.json",
        "model/tokenizer.json",
        "model/modules.json",
    ):
        assert stat.S_IMODE((finished / name).stat().st_mode) == 0o644, name


def read_events(folder: Path) -> list:
    """Every event of a TensorBoard log folder (TFRecord framing: length, crc, data, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    events = []
    for file in sorted(folder.rglob("events.out.tfevents.*")):
        data, at = file.read_bytes(), 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at : at + 8])
            events.append(event_pb2.Event.FromString(data[at + 12 : at + 12 + n]))
            at += 12 + n + 4
    return events


def test_tensorboard_gets_the_learning_rate_and_the_config(finished):
    from opera_jax.train.optim import learning_rate_schedule

    values = [
        (v.tag, e.step, v.simple_value, v.metadata.plugin_data.content)
        for e in read_events(finished / "tb")
        for v in e.summary.value
    ]
    lr = learning_rate_schedule(1e-3, 2, 0.05)
    assert [(step, value) for tag, step, value, _ in values if tag == "train/learning_rate"] == [
        (1, pytest.approx(float(lr(0)))),
        (2, pytest.approx(float(lr(1)))),
    ]
    session = [content for tag, _, _, content in values if tag == "_hparams_/session_start_info"]
    assert len(session) == 1 and b"optim.learning_rate" in session[0] and b"method.dp.strength_end" in session[0]
    assert {tag for tag, *_ in values} >= {"train/loss", "eval/ndcg_10", "_hparams_/experiment"}
    experiment = next(content for tag, _, _, content in values if tag == "_hparams_/experiment")
    assert b"eval/ndcg_10" in experiment  # the hparams view's metric is the scalar's own tag


@pytest.mark.parametrize(
    ("extra", "parts"),
    [
        (["optim.learning_rate=5e-5"], ["optim.learning_rate: 0.001 -> 5e-05", "--new-run"]),
        (["--max-steps", "6"], ["optim.max_steps: 2 -> 6"]),
        (["--eval-every", "1", "seed=3"], ["seed: 0 -> 3", "train.eval_every: 0 -> 1"]),
    ],
)
def test_a_different_config_is_refused_with_the_differing_keys(world, finished, capsys, extra, parts):
    _, _, config = world
    before = snapshot(finished)
    refused(capsys, ["train", str(config), "--out", str(finished), *extra], str(finished), *parts)
    assert snapshot(finished) == before


def test_new_run_discards_the_old_run_and_starts_over(world, finished, tmp_path, capsys):
    import shutil

    _, _, config = world
    out = tmp_path / "again"
    shutil.copytree(finished, out)
    (out / "notes.txt").write_text("mine")  # not a run file: kept
    assert main(["train", str(config), "--out", str(out), "--max-steps", "3", "--new-run"]) == 0
    assert "final: ndcg@10" in capsys.readouterr().out
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["max_steps"] == 3
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 3]
    assert (out / "notes.txt").read_text() == "mine"


def test_the_same_command_resumes_an_interrupted_run_exactly(world, finished, tmp_path, capsys):
    from opera_jax.config import load_config
    from opera_jax.train.trainer import train_and_evaluate

    _, _, config = world
    out = tmp_path / "cut"
    train_and_evaluate(load_config(config), out, progress=False, stop_after=1)  # as a kill after step 1 would
    config_before = snapshot(out)["config.yaml"]
    assert main(["train", str(config), "--out", str(out)]) == 0
    assert "final: ndcg@10" in capsys.readouterr().out
    assert snapshot(out)["config.yaml"] == config_before  # written once, when the run started
    a = (finished / "model" / "model.safetensors").read_bytes()
    assert (out / "model" / "model.safetensors").read_bytes() == a
    assert (out / "run.trec").read_bytes() == (finished / "run.trec").read_bytes()


def test_a_directory_that_is_not_a_run_is_refused(world, tmp_path, capsys):
    _, _, config = world
    (tmp_path / "mine.txt").write_text("x")
    before = snapshot(tmp_path)
    refused(capsys, ["train", str(config), "--out", str(tmp_path)], "not a run directory (no config.yaml)")
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- checked before work starts


@pytest.fixture()
def readonly_dir(tmp_path):
    """A directory nobody can write in: chmod 555, or, for root (who ignores modes), /sys."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").write_text("x")
    except OSError:
        yield folder
    else:
        (folder / "probe").unlink()
        if os.access("/sys", os.F_OK) and not _writable("/sys"):
            yield Path("/sys")
        else:
            pytest.skip("no read-only directory here (root, and /sys is writable)")
    folder.chmod(0o755)


def _writable(folder: str) -> bool:
    try:
        with open(Path(folder) / ".opera-jax-test", "w"):
            pass
    except OSError:
        return False
    os.unlink(Path(folder) / ".opera-jax-test")
    return True


def test_train_out_is_a_file_or_read_only(world, tmp_path, readonly_dir, capsys):
    _, _, config = world
    file = tmp_path / "a-file"
    file.write_text("keep me")
    refused(capsys, ["train", str(config), "--out", str(file)], str(file), "not a directory")
    assert file.read_text() == "keep me"
    refused(capsys, ["train", str(config), "--out", str(file / "run")], "is a file")
    refused(capsys, ["train", str(config), "--out", str(readonly_dir / "run")], "cannot write in")
    assert not (readonly_dir / "run").exists()


def test_eval_out_is_checked_before_the_evaluation(world, tmp_path, readonly_dir, capsys, monkeypatch):
    from opera_jax.eval import evaluate

    _, data, _ = world
    monkeypatch.setattr(evaluate.Evaluator, "__call__", lambda *a, **k: pytest.fail("evaluated first"))
    file = tmp_path / "a-file"
    file.write_text("keep me")
    common = ["eval", "--model", str(GOLDEN / "tiny_bert"), "--data", str(data)]
    refused(capsys, [*common, "--out", str(file)], "not a directory")
    refused(capsys, [*common, "--out", str(readonly_dir / "results")], "cannot write in")
    assert file.read_text() == "keep me"


def test_mine_prune_and_export_outputs_are_checked_first(world, finished, tmp_path, capsys):
    _, _, config = world
    folder = tmp_path / "a-dir"
    folder.mkdir()
    refused(capsys, ["mine", str(config), "--out", str(folder)], "is a directory")
    refused(capsys, ["prune", str(config), "--out", str(folder)], "is a directory")
    file = tmp_path / "a-file"
    file.write_text("keep me")
    refused(capsys, ["export", str(finished), "--out", str(file)], "not a directory")
    refused(capsys, ["export", str(folder), "--out", str(tmp_path / "x")], "not a run directory")
    assert file.read_text() == "keep me" and not (tmp_path / "x").exists() and not any(folder.iterdir())
    kept = tmp_path / "kept.tsv"
    refused(capsys, ["prune", str(config), "--out", str(kept), "method.sp.kept_pct=0.05"], "keeps no pair of the 16")
    assert not kept.exists()


@pytest.mark.parametrize(
    ("overrides", "parts"),
    [
        (["optim.batch_size=512"], ["optim.batch_size 512 is larger than the 16 queries", "split 'train'"]),
        (
            ["method.name=infobatch", "optim.batch_size=24"],
            ["batch_size 24 is larger than the 16 queries", "'infobatch'"],
        ),
        (["method.name=sp", "method.sp.kept_pct=0.05"], ["method.sp.kept_pct 0.05 keeps no pair of the 16"]),
        (["method.name=sp", "method.sp.kept_pct=0.25"], ["optim.batch_size 8 is larger than the 4 queries", "'sp'"]),
        (["data.eval_split=dev", "data.group_size=2"], ["dev.tsv: not found (splits here: test, train)"]),
        (["data.train_split=dev"], ["dev.tsv: not found"]),
    ],
)
def test_config_mistakes_are_caught_before_anything_is_written(
    world, tmp_path, negatives_cache, capsys, overrides, parts
):
    _, _, config = world
    out = tmp_path / "run"
    refused(capsys, ["train", str(config), "--out", str(out), *overrides], *parts)
    assert not out.exists()
    assert not negatives_cache.exists()  # refused before hard-negative mining


def test_broken_eval_split_is_caught_before_mining(world, tmp_path, negatives_cache, capsys):
    import shutil

    _, data, config = world
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    with open(broken / "qrels" / "test.tsv", "a") as f:
        f.write("q17\td999\t1\n")
    out = tmp_path / "run"
    refused(
        capsys,
        ["train", str(config), "--out", str(out), f"data.path={broken}", "data.group_size=2"],
        "test.tsv, line 10",
        "unknown document id 'd999'",
    )
    assert not out.exists() and not negatives_cache.exists()


def test_unsupported_model_module_is_refused_before_anything_is_written(world, tmp_path, capsys):
    import shutil

    _, _, config = world
    model = tmp_path / "dense-model"
    shutil.copytree(GOLDEN / "tiny_bert", model)
    modules = json.loads((model / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (model / "modules.json").write_text(json.dumps(modules))
    out = tmp_path / "run"
    refused(
        capsys,
        ["train", str(config), "--out", str(out), f"model.name={model}"],
        "sentence_transformers.models.Dense",
        "supported: Transformer, Pooling, Normalize",
    )
    assert not out.exists()


def test_headerless_qrels_with_a_decimal_score_is_an_error(world, tmp_path, capsys):
    import shutil

    _, data, _ = world
    folder = tmp_path / "decimal"
    shutil.copytree(data, folder)
    (folder / "qrels" / "test.tsv").write_text("q16\td16\t2.0\nq17\td17\t1\n")
    refused(
        capsys,
        ["eval", "--model", str(GOLDEN / "tiny_bert"), "--data", str(folder)],
        "test.tsv, line 1",
        "field 'score' must be an integer, got '2.0'",
    )


# ----------------------------------------------------------------------------- the installed command


def _command(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's opera_jax, whatever is installed
    return subprocess.run(
        [sys.executable, "-m", "opera_jax", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def test_version_and_python_dash_m(tmp_path):
    import opera_jax

    done = _command("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"opera-jax {opera_jax.__version__}"


def test_a_mistake_in_a_fresh_process_is_one_line_without_traceback(world, tmp_path):
    _, _, config = world
    file = tmp_path / "a-file"
    file.write_text("keep me")
    done = _command("train", str(config), "--out", str(file), "optim.batch_size=512", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"error: {file}: exists and is not a directory (the run directory)"
    assert file.read_text() == "keep me" and not (tmp_path / "runs").exists()
