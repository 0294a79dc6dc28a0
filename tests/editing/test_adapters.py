"""Model adapters: the edited matrix, its orientation, and loading."""

from __future__ import annotations

import pytest
import torch

from editing.delta import LowRankDelta, apply_delta, weight_sha256
from editing.models import ModelAdapter, load_model
from editing.tokens import pad_right
from editing.tracing import read_states


@pytest.mark.parametrize("family", ["gpt2", "gptj", "llama"])
def test_canonical_weight_maps_key_to_module_output(tiny_model, family):
    adapter = tiny_model(family)
    layer = 1
    weight = adapter.weight(layer)
    assert weight.shape == (adapter.hidden_dim, adapter.key_dim)
    captured = {}
    module = adapter.edited_module(layer)
    handle = module.register_forward_hook(lambda m, args, out: captured.update(key=args[0], value=out))
    with torch.no_grad():
        adapter.model(torch.tensor([[5, 17, 300, 42]]))
    handle.remove()
    bias = getattr(module, "bias", None)
    expected = captured["key"] @ weight.T + (bias if bias is not None else 0)
    torch.testing.assert_close(captured["value"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "gptj", "llama"])
def test_delta_applied_through_the_view_changes_the_parameter(tiny_model, family):
    adapter = tiny_model(family)
    before = adapter.weight(2).detach().clone()
    generator = torch.Generator().manual_seed(1)
    delta = LowRankDelta(torch.randn(adapter.hidden_dim, 3, generator=generator),
                         torch.randn(adapter.key_dim, 3, generator=generator))
    apply_delta(adapter.weight(2), delta)
    torch.testing.assert_close(adapter.weight(2) - before, (delta.u @ delta.v.T).float(), rtol=1e-5, atol=1e-5)
    assert weight_sha256(adapter.weight(2)) != weight_sha256(before)
    # other layers untouched
    assert adapter.weights_sha256([1]) == {1: weight_sha256(adapter.weight(1))}


def test_snapshot_restore_is_exact(tiny_model):
    adapter = tiny_model("gpt2")
    saved = adapter.snapshot([0, 3])
    hashes = adapter.weights_sha256([0, 3])
    with torch.no_grad():
        adapter.weight(0).mul_(1.5)
        adapter.weight(3).add_(0.25)
    adapter.restore(saved)
    assert adapter.weights_sha256([0, 3]) == hashes


def test_layer_out_of_range_is_a_clear_error(tiny_model):
    adapter = tiny_model("llama", n_layers=3)
    with pytest.raises(ValueError, match="layer 3 out of range.*3 layers"):
        adapter.weight(3)


def test_read_states_matches_full_forward(tiny_model):
    adapter = tiny_model("llama")
    batch = pad_right([[5, 6, 7, 8, 9], [11, 12, 13]], adapter.tokenizer.pad_token_id)
    positions = torch.tensor([3, 1])
    keys, residuals, _ = read_states(adapter, batch, positions, key_layers=[1], residual_layers=[2])
    with torch.no_grad():
        output = adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               output_hidden_states=True)
    # hidden_states[l + 1] is block l's output
    expected = output.hidden_states[3][torch.arange(2), positions]
    torch.testing.assert_close(residuals[2], expected, rtol=1e-5, atol=1e-5)
    assert keys[1].shape == (2, adapter.key_dim)


def test_smollm2_default_model_layout(smollm2_session: ModelAdapter):
    adapter = smollm2_session
    assert adapter.spec.family == "llama"
    assert adapter.n_layers == 30
    assert adapter.weight(4).shape == (576, 1536)
    assert len(adapter.fingerprint) == 64
    assert adapter.tokenizer("Paris")["input_ids"][0] != adapter.tokenizer.bos_token_id


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "absent.gguf"))
    with pytest.raises(FileNotFoundError, match="cannot load model"):
        load_model("no-such-org/no-such-model")


def test_unsupported_architecture_is_rejected(tokenizer):
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, vocab_size=100, is_decoder=True))
    with pytest.raises(ValueError, match="model type 'bert' is not supported"):
        ModelAdapter(model, tokenizer, name="bert")
