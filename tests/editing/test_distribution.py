"""Edit distribution is independent of the objective: one layer spread == single layer, for every objective."""

from __future__ import annotations

import json

import pytest
import torch

from editing.config import EditConfig, ValueParams
from editing.distribution import MemitSpread, get_distribution
from editing.editor import Editor
from editing.facts import fact_from_record
from fixtures.models import COUNTERFACT_1000

PREFIXES = ("", "The weather was cold. ")


@pytest.fixture(scope="module")
def facts():
    records = json.loads(COUNTERFACT_1000.read_text())
    return [fact_from_record(record) for record in records[:4]]


def _second_moments(adapter, layers) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    moments = {}
    for layer in layers:
        keys = torch.randn(adapter.weight(layer).shape[1], 400, generator=generator)
        moments[layer] = keys @ keys.T / 400
    return moments


def _edited(tiny_model, facts, algorithm: str, distribution: str, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
    adapter = tiny_model("llama", n_layers=4)
    config = EditConfig(algorithm=algorithm, layers=layers, distribution=distribution,
                        values=ValueParams(steps=4, n_prefixes=len(PREFIXES)))
    editor = Editor(adapter, config, _second_moments(adapter, layers), PREFIXES)
    editor.apply(facts[:1] if algorithm == "rome" else facts)
    return {layer: adapter.weight(layer).detach().clone() for layer in range(4)}


@pytest.mark.parametrize("algorithm", ["rome", "memit", "emmet"])
def test_spreading_over_one_layer_is_editing_that_layer(tiny_model, facts, algorithm):
    single = _edited(tiny_model, facts, algorithm, "single_layer", (2,))
    spread = _edited(tiny_model, facts, algorithm, "memit_spread", (2,))
    pristine = tiny_model("llama", n_layers=4)
    for layer in range(4):
        assert torch.equal(single[layer], spread[layer])
        assert torch.equal(single[layer], pristine.weight(layer)) == (layer != 2)


def test_memit_spread_divides_the_remaining_residual():
    spread = MemitSpread()
    shares = [spread.residual_share(step, 4) for step in range(4)]
    assert shares == [1 / 4, 1 / 3, 1 / 2, 1.0]
    remaining, assigned = 1.0, []
    for share in shares:  # with exact keys, each layer takes an equal part of the original residual
        assigned.append(remaining * share)
        remaining -= assigned[-1]
    assert assigned == pytest.approx([0.25] * 4) and remaining == pytest.approx(0.0)


def test_unknown_distributions_and_layer_counts_are_rejected():
    with pytest.raises(ValueError, match="known"):
        get_distribution("everywhere")
    with pytest.raises(ValueError, match="exactly one layer"):
        get_distribution("single_layer").edit_layers((3, 4))
