"""Edits on a bfloat16 model do not drift: each edited matrix keeps a float32 master ``W0 + ΣΔ`` and the
model's weight is its rounding, so the stored weight stays within one bfloat16 rounding of the exact sum
however many batches are added. The exact sum is computed densely in float64 here, from the same deltas."""

from __future__ import annotations

import torch

from editing.delta import LowRankDelta, weight_sha256
from fixtures.models import build_tiny_model

LAYER = 1


def _bf16_adapter(tokenizer, *, master: bool):
    adapter = build_tiny_model("llama", tokenizer, hidden=64)
    adapter.model.to(torch.bfloat16)
    adapter.float32_master = master
    return adapter


def _deltas(weight: torch.Tensor, count: int, rank: int = 4, relative: float = 0.003) -> list[LowRankDelta]:
    """``count`` random rank-``rank`` updates, each of Frobenius norm ``relative`` × ‖W0‖: small single
    updates, the regime in which rounding each one to bfloat16 loses most."""
    generator = torch.Generator().manual_seed(0)
    scale = relative * float(torch.linalg.matrix_norm(weight.detach().double()))
    deltas = []
    for _ in range(count):
        u = torch.randn(weight.shape[0], rank, generator=generator, dtype=torch.float64)
        v = torch.randn(weight.shape[1], rank, generator=generator, dtype=torch.float64)
        factor = (scale / float(torch.linalg.matrix_norm(u @ v.T))) ** 0.5
        deltas.append(LowRankDelta(u * factor, v * factor))
    return deltas


def _drift_after(adapter, deltas) -> tuple[float, torch.Tensor]:
    """‖stored − exact‖ / ‖exact − W0‖ after adding every delta, and the exact float64 sum."""
    w0 = adapter.stored_weight(LAYER).detach().double().clone()
    exact = w0 + sum(delta.u @ delta.v.T for delta in deltas)
    for delta in deltas:
        adapter.add_delta(LAYER, delta)
    stored = adapter.stored_weight(LAYER).detach().double()
    return float(torch.linalg.matrix_norm(stored - exact) / torch.linalg.matrix_norm(exact - w0)), exact


def test_the_master_keeps_a_bf16_weight_one_rounding_from_the_exact_sum(tokenizer):
    adapter = _bf16_adapter(tokenizer, master=True)
    assert adapter.has_master(LAYER) and adapter.weight(LAYER).dtype == torch.float32
    deltas = _deltas(adapter.stored_weight(LAYER), 300)
    drift, exact = _drift_after(adapter, deltas)
    stored = adapter.stored_weight(LAYER)
    assert stored.dtype == torch.bfloat16
    # the stored weight is the exact sum rounded once (an element may sit one ulp off, where the float32
    # master's own accumulated rounding moved it across a bfloat16 rounding boundary)
    rounded_once = exact.to(torch.bfloat16)
    assert (stored != rounded_once).double().mean() < 0.01
    assert drift <= 1.5 * float(torch.linalg.matrix_norm(rounded_once.double() - exact)
                                / torch.linalg.matrix_norm(exact - adapter.original_weights([LAYER])[LAYER].double()))
    # and the ledger's matrix is the float32 master, the parameter its rounding
    assert torch.equal(adapter.weight(LAYER).to(torch.bfloat16), stored)
    assert weight_sha256(adapter.weight(LAYER)) == adapter.weights_sha256([LAYER])[LAYER]
    assert adapter.stored_sha256([LAYER])[LAYER] == weight_sha256(stored)


def test_without_the_master_bf16_rounding_compounds(tokenizer):
    """The failure the master prevents, measured on the same deltas: each ΔW rounded to bfloat16 and added
    to bfloat16 weights drifts several times further from the exact sum than one rounding does."""
    with_master, _ = _drift_after(_bf16_adapter(tokenizer, master=True), _deltas(
        _bf16_adapter(tokenizer, master=True).stored_weight(LAYER), 300))
    plain = _bf16_adapter(tokenizer, master=False)
    assert not plain.has_master(LAYER) and plain.weight(LAYER).dtype == torch.bfloat16
    without_master, _ = _drift_after(plain, _deltas(plain.stored_weight(LAYER), 300))
    assert without_master > 3 * with_master, (without_master, with_master)


def test_restore_and_the_original_state_give_back_master_and_parameter_exactly(tokenizer):
    adapter = _bf16_adapter(tokenizer, master=True)
    loaded = adapter.stored_weight(LAYER).detach().clone()
    before = adapter.snapshot([LAYER])
    for delta in _deltas(loaded, 5):
        adapter.add_delta(LAYER, delta)
    edited = adapter.snapshot([LAYER])
    with adapter.original_state():
        assert torch.equal(adapter.stored_weight(LAYER), loaded)
    assert torch.equal(adapter.weight(LAYER), edited[LAYER])
    adapter.restore(before)
    assert torch.equal(adapter.stored_weight(LAYER), loaded) and torch.equal(adapter.weight(LAYER), before[LAYER])


def test_a_float32_model_has_no_master(tokenizer):
    adapter = build_tiny_model("llama", tokenizer, hidden=64)
    assert not adapter.has_master(LAYER)
    assert adapter.weight(LAYER).data_ptr() == adapter.stored_weight(LAYER).data_ptr()
