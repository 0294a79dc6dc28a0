"""Edits on the real SmolLM2-135M with CounterFact: does a fact actually change, and only it?

The v* optimisation is shortened (fewer steps and prefixes than the tuned
hyperparameters) to keep the suite fast; the full settings are measured in the
issue notes and ``bench/``. C0 is the tuned one (cached).

The facts are CounterFact records 300–499 of ``counterfact-1000.json``: the
hyperparameters were tuned on ``counterfact-easyedit-train.json`` (see the
YAML), so no fact asserted on here was used to choose them.
"""

from __future__ import annotations

import json

import pytest
import torch

from editing.config import hparams_key_for, load_edit_config
from editing.delta import LowRankDelta
from editing.editor import Editor
from editing.evaluation import counterfact_metrics
from editing.stats import second_moments
from flows.cli import main
from fixtures.data import counterfact_facts_between

SHORT_VALUES = {"values.steps": 15, "values.n_prefixes": 2}


HELD_OUT = slice(300, 500)
"""Records never used for tuning (see the module docstring)."""


@pytest.fixture(scope="module")
def counterfact() -> list:
    return counterfact_facts_between(HELD_OUT.start, HELD_OUT.stop)


@pytest.fixture(scope="module", autouse=True)
def tuned_statistics(smollm2_session) -> None:
    """C0 of every layer the three algorithms edit, in one pass over the corpus.

    The statistics are cached per layer and a pass stops at its deepest layer, so
    computing ROME's layer on its own first would cost a second pass on a clean checkout.
    """
    key = hparams_key_for(smollm2_session.name)
    configs = [load_edit_config(key, algorithm) for algorithm in ("rome", "memit", "emmet")]
    assert len({config.stats for config in configs}) == 1
    layers = sorted({layer for config in configs for layer in config.layers})
    second_moments(smollm2_session, layers, configs[0].stats)


def _editor(adapter, algorithm: str, **overrides) -> Editor:
    config = load_edit_config(hparams_key_for(adapter.name), algorithm, {**SHORT_VALUES, **overrides})
    return Editor.prepare(adapter, config)


def _assert_weight_moved_by(weight: torch.Tensor, before: torch.Tensor, delta: LowRankDelta) -> None:
    """The weight changed by exactly the recorded low-rank ΔW, up to one float32 rounding per element.

    (The rank of ``weight − before`` itself is full: rounding ``W0 + U Vᵀ`` to
    float32 adds noise of size eps·|W| everywhere, so the rank is checked on the
    recorded factors and the weight is checked against them.)
    """
    weight, before = weight.detach(), before.detach()
    changed = (weight - before).double()
    expected = delta.dense()
    assert expected.abs().max() > 0
    tolerance = 2 * torch.finfo(weight.dtype).eps * float(before.abs().max() + expected.abs().max())
    assert (changed - expected).abs().max().item() <= tolerance


def test_one_rome_edit_flips_a_fact_the_model_knows(smollm2, counterfact):
    known = [fact for fact in counterfact[:40]
             if counterfact_metrics(smollm2, [fact]).metrics()["es"] == 0.0]  # P(true) > P(new) before
    fact = known[0]
    editor = _editor(smollm2, "rome")
    layer = editor.layers[0]
    before = smollm2.weight(layer).clone()
    edit = editor.apply([fact])
    after = counterfact_metrics(smollm2, [fact]).metrics()
    assert after["es"] == 1.0, f"{fact.subject}: {fact.target_true} was not replaced by {fact.target_new}"
    assert after["em"] > 0.0  # P(new) − P(true) > 0 on the rewrite prompt
    (update,) = edit.updates
    assert update.layer == layer and update.delta.rank == 1  # ROME is a rank-one update
    _assert_weight_moved_by(smollm2.weight(layer), before, update.delta)
    assert edit.weights_sha256[layer] == smollm2.weights_sha256([layer])[layer]


@pytest.mark.parametrize("algorithm", ["emmet", "memit"])
def test_a_batch_of_32_edits_takes_and_spares_the_neighbourhood(smollm2, counterfact, algorithm):
    facts = counterfact[:32]
    pre = counterfact_metrics(smollm2, facts).metrics()
    editor = _editor(smollm2, algorithm)
    originals = {layer: smollm2.weight(layer).clone() for layer in editor.layers}
    edit = editor.apply(facts)
    post = counterfact_metrics(smollm2, facts).metrics()
    assert post["es"] >= 0.9, post
    assert abs(post["ns"] - pre["ns"]) <= 0.1, (pre, post)
    assert post["ps"] > pre["ps"]
    assert [update.layer for update in edit.updates] == list(editor.layers)
    for update in edit.updates:
        assert 0 < update.delta.rank <= 32
        _assert_weight_moved_by(smollm2.weight(update.layer), originals[update.layer], update.delta)


# -- bad input to ``seqedit edit``: a clear error naming the record, nothing applied ------------------
def _full_record(case_id: int, **rewrite) -> dict:
    return {"case_id": case_id,
            "requested_rewrite": {"prompt": "{} is located in", "subject": "The Eiffel Tower",
                                  "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"},
                                  "relation_id": "P131", **rewrite},
            "paraphrase_prompts": ["The Eiffel Tower can be found in"],
            "neighborhood_prompts": ["The Louvre is located in"]}


REDUCED_SUBJECT_NOT_IN_PROMPT = {"case_id": 77, "subject": "Big Ben", "prompt": "The Eiffel Tower is located in",
                                 "target_new": "Rome", "ground_truth": "Paris"}


@pytest.mark.parametrize("bad, field, reason", [
    (REDUCED_SUBJECT_NOT_IN_PROMPT, "subject", "does not occur"),
    (_full_record(77, target_new={"str": "  "}), "target_new", "empty"),
    (_full_record(77, target_new={"str": "Paris"}), "target_new", "target_true"),
    (_full_record(77, prompt="The Eiffel Tower is located in"), "prompt", "{}"),
])
def test_bad_records_stop_the_edit_before_anything_is_applied(tmp_path, capsys, bad, field, reason):
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([_full_record(1), bad]))
    saved = tmp_path / "edited"
    code = main(["edit", "--facts", str(path), "--algo", "emmet", "--batch-size", "2", "--save", str(saved)])
    error = capsys.readouterr().err
    assert code == 2
    assert "77" in error and field in error and reason in error
    assert not saved.exists()


def test_rome_refuses_batches(tmp_path, capsys):
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([_full_record(1)]))
    assert main(["edit", "--facts", str(path), "--algo", "rome", "--batch-size", "4"]) == 2
    assert "rome edits at most 1 fact(s) at a time" in capsys.readouterr().err
