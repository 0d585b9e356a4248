"""The knobs of the release's regime: passage text, a budget in passes, a validation split from train."""

import math

import pytest

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
