"""Edit distribution is independent of the objective: one layer spread == single layer, for every objective."""

from __future__ import annotations


import pytest
import torch

from editing.config import EditConfig, ValueParams
from editing.distribution import MemitSpread, get_distribution
from editing.editor import Editor
from editing.facts import fact_from_record
from fixtures.data import counterfact_records
from fixtures.plain import random_second_moments

PREFIXES = ("", "The weather was cold. ")


@pytest.fixture(scope="module")
def facts():
    return [fact_from_record(record) for record in counterfact_records(0, 4)]


def _second_moments(adapter, layers) -> dict[int, torch.Tensor]:
    return random_second_moments(adapter.key_dim, layers)


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


# -- docs/math.md's edit distribution, checked against the model itself and a loop written here ------------------
from editing.config import ObjectiveParams  # noqa: E402
from editing.distribution import LayerSolver, distribute  # noqa: E402
from editing.rows import build_rewrite_rows  # noqa: E402

SPREAD_LAYERS = (1, 2, 3)
EXACT_EMMET = ObjectiveParams(mom2_update_weight=1.0, update_norm_lambda=0.0, emmet_lambda=0.0)


def _bare_states(adapter, facts, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys into layer's down-projection, residual after block ``last``) at each fact's last subject
    token of its bare prompt, read with plain hooks on the Hugging Face modules, one prompt at a time."""
    keys, residuals = [], []
    for fact in facts:
        text = fact.rewrite_prompt
        encoding = adapter.tokenizer(text, return_offsets_mapping=True)
        end = fact.subject_span[1]
        position = next(i for i, (a, b) in enumerate(encoding["offset_mapping"]) if a < end <= b)
        seen = {}
        block = adapter.model.model.layers[layer]
        handles = [block.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.update(k=a[0])),
                   block.register_forward_hook(lambda m, a, o: seen.update(h=o[0] if isinstance(o, tuple) else o))]
        with torch.no_grad():
            adapter.model(torch.tensor([encoding["input_ids"]]))
        for handle in handles:
            handle.remove()
        keys.append(seen["k"][0, position].double())
        residuals.append(seen["h"][0, position].double())
    return torch.stack(keys, dim=1), torch.stack(residuals, dim=1)


def _spread_setup(tiny_model, facts):
    adapter = tiny_model("llama", n_layers=4)
    moments = _second_moments(adapter, SPREAD_LAYERS)
    _, start = _bare_states(adapter, facts, SPREAD_LAYERS[-1])
    targets = (start + 0.5 * torch.randn(start.shape, generator=torch.Generator().manual_seed(11),
                                         dtype=torch.float64)).T.float()
    return adapter, moments, targets


def test_spread_emmet_on_bare_prompts_reaches_the_targets_at_the_last_layer(tiny_model, facts):
    """With the bare prompt only, k* is that prompt's key, so exact EMMET makes every layer write its share
    and the last layer the rest: the residual at l_T on each bare prompt becomes its target z."""
    adapter, moments, targets = _spread_setup(tiny_model, facts)
    rows = build_rewrite_rows(adapter, facts, ("",), with_targets=False)
    updates = distribute(adapter, rows, targets, SPREAD_LAYERS, MemitSpread(),
                         LayerSolver("emmet", EXACT_EMMET, moments))
    _, reached = _bare_states(adapter, facts, SPREAD_LAYERS[-1])
    error = torch.linalg.norm(reached.T - targets.double(), dim=1) / torch.linalg.norm(targets.double(), dim=1)
    assert error.max() < 1e-4, error
    assert all(update.memorization == pytest.approx(1.0, abs=1e-6) for update in updates)


def test_the_shares_apply_to_residuals_re_read_after_each_layer(tiny_model, facts):
    """docs/math.md's loop, written here with dense EMMET: keys and current outputs are read again after every
    layer's update. The same loop with everything read once up front gives other weights, so this test
    tells the two apart."""
    adapter, moments, targets = _spread_setup(tiny_model, facts)
    pristine = {layer: adapter.weight(layer).detach().double().clone() for layer in SPREAD_LAYERS}

    def dense_emmet(layer: int, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        c_inv = torch.linalg.inv(moments[layer].double())
        return residual @ torch.linalg.inv(keys.T @ c_inv @ keys) @ keys.T @ c_inv

    def loop(re_read: bool) -> dict[int, torch.Tensor]:
        adapter.restore({layer: weight.float() for layer, weight in pristine.items()})
        keys_once = {layer: _bare_states(adapter, facts, layer)[0] for layer in SPREAD_LAYERS}
        current_once = _bare_states(adapter, facts, SPREAD_LAYERS[-1])[1]
        for step, layer in enumerate(SPREAD_LAYERS):
            keys = _bare_states(adapter, facts, layer)[0] if re_read else keys_once[layer]
            current = _bare_states(adapter, facts, SPREAD_LAYERS[-1])[1] if re_read else current_once
            residual = (targets.T.double() - current) / (len(SPREAD_LAYERS) - step)
            with torch.no_grad():
                adapter.weight(layer).add_(dense_emmet(layer, keys, residual).float())
        return {layer: adapter.weight(layer).detach().clone() for layer in SPREAD_LAYERS}

    expected, read_once = loop(re_read=True), loop(re_read=False)
    adapter.restore({layer: weight.float() for layer, weight in pristine.items()})
    rows = build_rewrite_rows(adapter, facts, ("",), with_targets=False)
    distribute(adapter, rows, targets, SPREAD_LAYERS, MemitSpread(), LayerSolver("emmet", EXACT_EMMET, moments))
    for layer in SPREAD_LAYERS:
        scale = float((expected[layer] - pristine[layer].float()).norm())
        assert float((adapter.weight(layer).detach() - expected[layer]).norm()) < 1e-3 * scale
    assert float((read_once[SPREAD_LAYERS[-1]] - expected[SPREAD_LAYERS[-1]]).norm()) > 0.05 * scale
