"""The paths only a GPU takes: ``dtype: auto`` resolving to bfloat16 with autocast, the float32 master on the
device, and an exact edit landing there. Marked ``cuda``; skipped where no CUDA device is present (CI)."""

from __future__ import annotations

import pytest
import torch

from editing.config import EditConfig, ObjectiveParams, StatsParams, ValueParams
from editing.delta import LowRankDelta
from editing.editor import Editor
from editing.facts import fact_from_record
from editing.runtime import Runtime
from editing.stats import second_moments
from fixtures.data import counterfact_records
from fixtures.models import build_tiny_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _on_cuda_bf16(tokenizer):
    adapter = build_tiny_model("llama", tokenizer, hidden=64)
    adapter.model.to("cuda", torch.bfloat16)
    return adapter


def test_auto_runtime_on_cuda_is_bfloat16_with_autocast():
    runtime = Runtime()
    assert runtime.torch_device.type == "cuda" and runtime.model_dtype == torch.bfloat16
    assert runtime.autocast_dtype == torch.bfloat16


def test_the_master_lives_on_the_layers_device_and_rounds_into_the_parameter(tokenizer):
    adapter = _on_cuda_bf16(tokenizer)
    master = adapter.weight(1)
    assert master.device.type == "cuda" and master.dtype == torch.float32
    generator = torch.Generator(device="cuda").manual_seed(0)
    delta = LowRankDelta(torch.randn(64, 2, device="cuda", generator=generator, dtype=torch.float64) * 1e-3,
                         torch.randn(128, 2, device="cuda", generator=generator, dtype=torch.float64))
    exact = master.double() + delta.u @ delta.v.T
    adapter.add_delta(1, delta)
    torch.testing.assert_close(adapter.weight(1).double(), exact, rtol=0, atol=1e-6)
    assert torch.equal(adapter.stored_weight(1), adapter.weight(1).to(torch.bfloat16))


def test_an_exact_edit_lands_on_a_bf16_model_on_cuda(tokenizer):
    adapter = _on_cuda_bf16(tokenizer)
    layers = (1, 2)
    facts = [fact_from_record(record, index) for index, record in enumerate(counterfact_records(10, 13))]
    moments = second_moments(adapter, list(layers), StatsParams(corpus="wikitext-2-valid", n_samples=48,
                                                                max_tokens=64), progress=False)
    config = EditConfig(algorithm="emmet", layers=layers, distribution="memit_spread",
                        objective=ObjectiveParams(mom2_update_weight=1.0, emmet_lambda=0.0),
                        values=ValueParams(lr=0.5, steps=6, loss_threshold=0.0, n_prefixes=0))
    edit = Editor(adapter, config, moments, ("",), runtime=Runtime(device="cuda", dtype="bfloat16")).apply(facts)
    assert torch.all(edit.v_star.final_nll < edit.v_star.initial_nll)
    assert all(update.memorization > 0.99 for update in edit.updates)  # computed on the float32 master
