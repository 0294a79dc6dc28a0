"""Models placed by accelerate's ``device_map``: dispatched copies edit, measure and score exactly like
the model on one device, and an offloaded edited layer is refused before anything changes.

There is no GPU here, so the placements are those accelerate supports on a CPU: modules on ``cpu``
and modules offloaded to ``disk`` (weights on the ``meta`` device, loaded from disk by accelerate's
hooks for each forward pass). That exercises every hook, the input device (the embeddings are
offloaded too), the replayed upper stack with offloaded blocks below and above the edited ones, and
the refusal of an offloaded edited layer. The dispatched model is loaded from a saved folder with
:func:`editing.models.load_model`'s ``device_map``, as a run does; the plain one from the same folder.
"""

from __future__ import annotations

import json

import pytest
import torch

from editing.config import EditConfig, ObjectiveParams, StatsParams, ValueParams
from editing.editor import Editor
from editing.evaluation import counterfact_metrics
from editing.evaluation.scoring import score_continuations
from editing.facts import fact_from_record
from editing.models import ModelAdapter, load_model
from editing.runtime import Runtime
from editing.stats import second_moments
from fixtures.data import counterfact_records
from fixtures.plain import random_second_moments
from fixtures.models import build_tiny_model

N_LAYERS = 5
EDITED = (2, 3)
OFFLOADED = 4
PREFIXES = ("", "The weather was cold. ")
DEVICE_MAP = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "disk",
              "model.layers.1": "cpu", "model.layers.2": "cpu", "model.layers.3": "cpu",
              f"model.layers.{OFFLOADED}": "disk", "model.norm": "cpu", "lm_head": "disk"}
"""The edited layers resident; the embeddings, a block below them, one above and the LM head on disk."""


@pytest.fixture(scope="module")
def model_folder(tokenizer, tmp_path_factory):
    """A tiny random Llama saved in Hugging Face layout (safetensors), with SmolLM2's tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    adapter = build_tiny_model("llama", tokenizer, n_layers=N_LAYERS)
    adapter.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def plain(model_folder) -> ModelAdapter:
    return load_model(str(model_folder), device="cpu")


@pytest.fixture
def dispatched(model_folder) -> ModelAdapter:
    adapter = load_model(str(model_folder), device_map=DEVICE_MAP)
    assert adapter.model.hf_device_map == DEVICE_MAP
    return adapter


@pytest.fixture(scope="module")
def facts():
    return [fact_from_record(record, index) for index, record in enumerate(counterfact_records(0, 3))]


def _resident_state(adapter: ModelAdapter) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in adapter.model.state_dict().items()
            if tensor.device.type != "meta"}


def test_the_placement_is_what_the_device_map_says(plain, dispatched):
    assert dispatched.device == plain.device == torch.device("cpu")  # the embeddings' execution device
    assert dispatched.model.get_input_embeddings().weight.device.type == "meta"
    assert [dispatched.layer_device(layer).type for layer in range(N_LAYERS)] == ["meta", "cpu", "cpu", "cpu", "meta"]
    assert dispatched.execution_device(OFFLOADED) == torch.device("cpu")
    assert dispatched.offloaded_layers(range(N_LAYERS)) == [0, OFFLOADED]
    assert dispatched.fingerprint == plain.fingerprint  # offloaded weights are hashed from where they are stored
    ids = torch.tensor([[5, 17, 300, 42, 8]])
    with torch.no_grad():
        torch.testing.assert_close(dispatched.model(ids).logits, plain.model(ids).logits, rtol=1e-6, atol=1e-6)


def test_second_moments_are_those_of_the_plain_model(plain, dispatched, tmp_path, monkeypatch):
    """C0 of resident layers and of an offloaded one (reading keys needs no resident weights)."""
    params = StatsParams(corpus="wikitext-2-valid", n_samples=12, max_tokens=24, batch_size=4)
    layers = [EDITED[0], OFFLOADED]
    monkeypatch.setenv("SEQEDIT_CACHE", str(tmp_path / "plain"))
    expected = second_moments(plain, layers, params, progress=False)
    monkeypatch.setenv("SEQEDIT_CACHE", str(tmp_path / "dispatched"))  # computed again, not read back
    moments = second_moments(dispatched, layers, params, progress=False)
    assert list((tmp_path / "dispatched" / "stats").rglob("*.safetensors"))
    for layer in layers:
        torch.testing.assert_close(moments[layer], expected[layer], rtol=1e-6, atol=1e-7)


def _moments(adapter: ModelAdapter) -> dict[int, torch.Tensor]:
    return random_second_moments(adapter.key_dim, EDITED)


def _null_spaces(moments: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """The eigenvectors of the smaller half of each C0's spectrum (AlphaEdit's projector's basis)."""
    bases = {}
    for layer, c0 in moments.items():
        _, vectors = torch.linalg.eigh(c0.double())
        bases[layer] = vectors[:, :c0.shape[0] // 2].float().contiguous()
    return bases


def _editor(adapter: ModelAdapter, algorithm: str, layers: tuple[int, ...] = EDITED) -> Editor:
    config = EditConfig(algorithm=algorithm, layers=layers, distribution="memit_spread",
                        objective=ObjectiveParams(mom2_update_weight=1.0, emmet_lambda=0.0, alphaedit_ridge=1.0),
                        values=ValueParams(steps=4, n_prefixes=len(PREFIXES) - 1))
    moments = _moments(adapter)
    null_spaces = _null_spaces(moments) if algorithm == "alphaedit" else None
    return Editor(adapter, config, moments, PREFIXES, Runtime(device="cpu"), null_spaces=null_spaces)


@pytest.mark.parametrize("algorithm", ["emmet", "alphaedit"])
def test_edits_are_those_of_the_plain_model(plain, dispatched, facts, algorithm):
    """Two sequential batches (AlphaEdit's second one preserves the first's keys): the same v* targets,
    the same updates, the same edited weights, the same model outputs."""
    edits = {}
    for name, adapter in (("plain", plain), ("dispatched", dispatched)):
        editor = _editor(adapter, algorithm)
        first = editor.apply(facts[:2])
        editor.remember(first)
        second = editor.apply(facts[2:])
        edits[name] = (first, second, {layer: adapter.weight(layer).detach().clone() for layer in EDITED})
    for expected, edit in zip(edits["plain"][:2], edits["dispatched"][:2]):
        torch.testing.assert_close(edit.v_star.z, expected.v_star.z, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(edit.v_star.final_nll, expected.v_star.final_nll, rtol=1e-6, atol=1e-6)
        assert torch.equal(edit.v_star.steps, expected.v_star.steps)
        for update, reference in zip(edit.updates, expected.updates):
            torch.testing.assert_close(update.keys, reference.keys, rtol=1e-6, atol=1e-6)
            assert update.memorization == pytest.approx(reference.memorization, abs=1e-6)
    for layer in EDITED:
        assert not torch.equal(edits["plain"][2][layer], plain.original_weights([layer])[layer])
        torch.testing.assert_close(edits["dispatched"][2][layer], edits["plain"][2][layer], rtol=1e-5, atol=1e-7)
    ids = torch.tensor([[5, 17, 300, 42, 8, 901]])
    with torch.no_grad():
        torch.testing.assert_close(dispatched.model(ids).logits, plain.model(ids).logits, rtol=1e-5, atol=1e-6)


def test_restoring_writes_onto_each_layers_own_device(dispatched, facts):
    before = dispatched.snapshot(list(EDITED))
    _editor(dispatched, "emmet").apply(facts[:1])
    with dispatched.original_state():
        for layer in EDITED:
            assert torch.equal(dispatched.weight(layer), dispatched.original_weights([layer])[layer])
    assert not torch.equal(dispatched.weight(EDITED[0]), before[EDITED[0]])
    dispatched.restore(before)
    for layer in EDITED:
        assert torch.equal(dispatched.weight(layer), before[layer])


def test_an_offloaded_edited_layer_is_refused_and_nothing_changes(dispatched, facts, tmp_path, monkeypatch):
    monkeypatch.setenv("SEQEDIT_CACHE", str(tmp_path / "cache"))
    resident = _resident_state(dispatched)
    ids = torch.tensor([[5, 17, 300, 42, 8]])
    with torch.no_grad():
        logits = dispatched.model(ids).logits
    message = rf"layer\(s\) \[{OFFLOADED}\].*offloaded.*place model\.layers\.{OFFLOADED} on a device"
    config = EditConfig(algorithm="emmet", layers=(EDITED[-1], OFFLOADED), distribution="memit_spread",
                        values=ValueParams(steps=2, n_prefixes=0),
                        stats=StatsParams(corpus="wikitext-2-valid", n_samples=4, max_tokens=16))
    with pytest.raises(ValueError, match=message):
        Editor(dispatched, config, {EDITED[-1]: torch.eye(dispatched.key_dim),
                                    OFFLOADED: torch.eye(dispatched.key_dim)}, ("",))
    with pytest.raises(ValueError, match=message):
        Editor.prepare(dispatched, config, prefixes=("",))  # refused before the statistics are computed
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ValueError, match=message):  # and no weight view of it is handed out to write into
        dispatched.weight(OFFLOADED)
    after = _resident_state(dispatched)
    assert after.keys() == resident.keys() and all(torch.equal(after[name], resident[name]) for name in resident)
    with torch.no_grad():
        assert torch.equal(dispatched.model(ids).logits, logits)
    assert dispatched.touched_layers() == []


def test_counterfact_scores_are_those_of_the_plain_model(plain, dispatched, facts):
    expected = counterfact_metrics(plain, facts[:2], batch_size=4)
    scores = counterfact_metrics(dispatched, facts[:2], batch_size=4)
    for name in ("es", "ps", "ns", "em", "pm", "nm", "s"):
        assert getattr(scores, name) == pytest.approx(getattr(expected, name), rel=1e-5, abs=1e-6), name
    for result, reference in zip(scores.facts, expected.facts):
        for kind in ("rewrite", "paraphrase", "neighborhood"):
            for side in ("nll_new", "nll_true"):
                got, want = getattr(getattr(result, kind), side), getattr(getattr(reference, kind), side)
                assert len(got) == len(want) > 0 and got == pytest.approx(want, rel=1e-5, abs=1e-6)
    # Rows sharing a long prefix run it once and reuse its keys/values from the (per-layer) cache.
    shared = list(range(100, 120))
    sequences = [shared + [7, 8, 9], shared + [11, 12], shared + [13, 14, 15, 16]]
    starts = [len(shared) + 1] * 3
    for score, reference in zip(score_continuations(dispatched, sequences, starts),
                                score_continuations(plain, sequences, starts)):
        torch.testing.assert_close(score.nll, reference.nll, rtol=1e-5, atol=1e-6)
        assert torch.equal(score.argmax, reference.argmax)


@pytest.mark.parametrize("device_map, message", [
    ({"model.layers.0": -1}, "GPU index"), ({"model.layers.0": "meta"}, "device name"), ({}, "non-empty"),
    ("everywhere", "strategy"), ("disk", "offload every layer")])
def test_bad_device_maps_are_named(device_map, message):
    with pytest.raises(ValueError, match=message):
        Runtime(device_map=device_map)


def test_the_runtime_carries_a_device_map():
    runtime = Runtime(device_map=DEVICE_MAP)
    assert runtime.torch_device == torch.device("cpu") and runtime.model_dtype == torch.float32
    assert Runtime(device_map={"model": 1, "lm_head": "cpu"}).torch_device == torch.device("cuda", 1)
    assert hash(runtime) == hash(Runtime(device_map=dict(DEVICE_MAP)))
    from flows.settings import RunSettings

    stored = json.loads(json.dumps(RunSettings(runtime=runtime).to_dict()))  # as the ledger keeps a run's settings
    assert RunSettings.from_dict(stored).runtime == runtime
    with pytest.raises(ValueError, match="exclusive"):
        Runtime(device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="not both"):
        load_model("unused", device="cpu", device_map="auto")


def test_a_session_loads_its_model_with_the_runtimes_device_map(model_folder):
    from flows.model_session import ModelSession

    name, runtime = str(model_folder), Runtime(device_map=DEVICE_MAP)
    try:
        session = ModelSession.get(name, runtime)
        assert session.adapter.model.hf_device_map == DEVICE_MAP
        assert ModelSession.get(name, Runtime(device_map=dict(DEVICE_MAP))) is session
        assert ModelSession.loaded(name, Runtime(device="cpu")) is None  # another placement, another session
        assert ModelSession.loaded(name, Runtime(device_map={**DEVICE_MAP, "model.layers.4": "cpu"})) is None
    finally:
        ModelSession._loaded.pop(ModelSession._key(name, runtime), None)
