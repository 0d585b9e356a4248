"""The knobs of the release's regime: passage text, a budget in passes, a validation split from train."""

import dataclasses
from pathlib import Path

import pytest
from conftest import tiny_run

from opera_jax.config import load_config, steps_for_passes, with_budget
from opera_jax.data.beir import BeirSplit, Corpus, Queries
from opera_jax.data.validation import carve, held_out
from opera_jax.errors import InputError


def test_passage_text_title_text_or_body_only():
    c = Corpus(("d1", "d2"), ("Title", ""), ("Body one.", "Body two."))
    assert c.passages() == ["Title Body one.", "Body two."]  # the default is unchanged
    assert c.passages("text") == ["Body one.", "Body two."]
    assert load_config(None).data.passage_text == "title_text"
    assert load_config(None, ["data.passage_text=text"]).data.passage_text == "text"
    with pytest.raises(InputError, match="passage_text"):
        load_config(None, ["data.passage_text=body"])


@pytest.mark.parametrize("n, batch, passes", [(150, 16, 40), (809, 32, 47), (20, 16, 1), (7, 32, 0.5)])
def test_budget_in_passes(n, batch, passes):
    steps = steps_for_passes(passes, n, batch)
    assert steps * batch >= passes * n > (steps - 1) * batch or steps == 1
    config = with_budget(load_config(None, [f"optim.max_epochs={passes}", f"optim.batch_size={batch}"]), n)
    assert config.optim.max_steps == steps
    assert with_budget(load_config(None, ["optim.max_steps=77"]), n).optim.max_steps == 77  # unset: untouched
    assert steps_for_passes(40, 150, 16) == 375  # Cranfield at the quickstart's batch: the figure
    with pytest.raises(InputError, match="max_epochs"):
        load_config(None, ["optim.max_epochs=0"])


def _split(n):
    ids = tuple(f"q{i}" for i in range(n))
    corpus = Corpus(("d0",), ("",), ("x",))
    return BeirSplit("c", "train", corpus, Queries(ids, ids), {q: {"d0": 1} for q in ids})


def test_validation_split_is_fixed_disjoint_and_complete():
    split = _split(150)
    train, valid = carve(split, 0.2)
    assert len(valid.queries) == 30 and len(train.queries) == 120
    assert set(train.queries.ids).isdisjoint(valid.queries.ids)
    assert set(train.queries.ids) | set(valid.queries.ids) == set(split.queries.ids)
    assert set(valid.qrels) == set(valid.queries.ids) and set(train.qrels) == set(train.queries.ids)
    assert held_out(split.queries.ids, 0.2) == held_out(split.queries.ids, 0.2)  # not the run's seed
    assert [q for q in split.queries.ids if q in set(train.queries.ids)] == list(train.queries.ids)  # file order
    assert len(carve(_split(3), 0.01)[1].queries) == 1 and len(carve(_split(3), 0.99)[0].queries) == 1
    with pytest.raises(InputError, match="valid_fraction"):
        load_config(None, ["data.valid_fraction=1"])


REGIME = Path(__file__).resolve().parents[1] / "configs" / "regime"


def test_a_config_file_over_its_base(tmp_path):
    (tmp_path / "base.yaml").write_text("optim: {learning_rate: 1.0e-5, batch_size: 16}\nmethod: {dp: {delta: 0.5}}\n")
    (tmp_path / "mid.yaml").write_text("base: base.yaml\noptim: {batch_size: 8}\n")
    (tmp_path / "top.yaml").write_text("base: mid.yaml\nmethod: {name: dp}\n")
    c = load_config(tmp_path / "top.yaml", ["optim.batch_size=4"])
    assert (c.optim.learning_rate, c.method.name, c.method.dp.delta) == (1e-5, "dp", 0.5)
    assert c.optim.batch_size == 4 and load_config(tmp_path / "top.yaml").optim.batch_size == 8
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(InputError, match="itself"):
        load_config(tmp_path / "loop.yaml")


def test_the_regime_files_share_one_base():
    base = load_config(REGIME / "base.yaml")
    assert base.optim.learning_rate <= 1e-5 and base.optim.max_epochs >= 40 and base.data.passage_text == "text"
    assert (base.optim.temperature, base.data.group_size, base.method.sp.kept_pct) == (0.02, 2, 0.5)
    for method in ("basic", "sp", "dp", "infobatch"):
        c = load_config(REGIME / f"{method}.yaml")
        assert c.method.name == method
        assert dataclasses.replace(c, method=base.method) == base  # nothing but the method differs
    flat = load_config(REGIME / "dp-flat.yaml").method.dp
    assert (flat.strength_start, flat.strength_end, flat.pos_strength) == (1.1, 1.1, 1.0)
    lower = load_config(REGIME / "dp-lower.yaml").method.dp
    assert not lower.keep_higher_query and not lower.keep_higher_pos
    for f in REGIME.glob("*.yaml"):
        assert "optim:" not in f.read_text() or f.name == "base.yaml"  # no copied blocks


@pytest.mark.slow
def test_a_run_in_passes_on_a_validation_split_with_body_only_passages(tiny_bert_dir, tmp_path):
    """MED: 20 training queries; 5 held out, 15 trained on for 1.2 passes of 8 = 3 steps; DP on the
    loss criterion (unseen pairs as NaN through the jitted step and the refreshes)."""
    from opera_jax.data.beir import load_split, resolve_data_dir
    from opera_jax.eval.metrics import read_trec_run
    from opera_jax.train.trainer import train_and_evaluate

    cfg = load_config(
        None,
        tiny_run(
            tiny_bert_dir,
            "data.passage_text=text",
            "data.valid_fraction=0.25",
            "optim.max_epochs=1.2",
            "train.eval_every=0",
            "method.name=dp",
            "method.dp.criterion=loss",
            "method.dp.refresh_every=1",
        ),
    )
    last = train_and_evaluate(cfg, tmp_path, progress=False)
    assert last["step"] == 3 and 0 <= last["ndcg@10"] <= 1
    train = load_split(resolve_data_dir("med"), "train")
    valid = held_out(train.queries.ids, 0.25)
    assert set(read_trec_run(tmp_path / "run.trec")) == valid and len(valid) == 5
