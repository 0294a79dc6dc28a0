"""RLSEdit: the Woodbury recursion against the dense closed forms it must equal."""

from __future__ import annotations

import torch

from editing.config import ObjectiveParams
from editing.memory import EditMemory
from editing.objectives import solve
from editing.objectives.rlsedit import woodbury_gain, woodbury_update

PARAMS = ObjectiveParams(mom2_update_weight=3.0, update_norm_lambda=0.5)
D_IN, D_OUT = 24, 10


def _spd(generator: torch.Generator, d: int) -> torch.Tensor:
    a = torch.randn(d, 3 * d, generator=generator, dtype=torch.float64)
    return a @ a.T / a.shape[1] + 0.05 * torch.eye(d, dtype=torch.float64)


def test_the_woodbury_gain_and_update_equal_the_dense_inverse():
    generator = torch.Generator().manual_seed(1)
    base = _spd(generator, D_IN)
    keys = torch.randn(D_IN, 5, generator=generator, dtype=torch.float64)
    dense = torch.linalg.inv(base + keys @ keys.T)
    p = torch.linalg.inv(base)
    torch.testing.assert_close(woodbury_gain(p, keys), dense @ keys, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(woodbury_update(p, keys), dense, rtol=1e-9, atol=1e-11)


def test_batches_edited_in_sequence_reach_the_least_squares_minimiser_of_the_whole_history():
    """RLS's promise: after T batches W equals the minimiser of ‖W − W0‖²_{A0} + Σ_t ‖W K_t − V_t‖², computed
    densely here from all the batches at once, ``W* = (W0 A0 + Σ V_t K_tᵀ)(A0 + Σ K_t K_tᵀ)⁻¹`` — each batch
    solved on the weights the previous ones left, through the real objective and edit memory."""
    generator = torch.Generator().manual_seed(2)
    c0 = _spd(generator, D_IN)
    a0 = PARAMS.mom2_update_weight * c0 + PARAMS.update_norm_lambda * torch.eye(D_IN, dtype=torch.float64)
    w0 = torch.randn(D_OUT, D_IN, generator=generator, dtype=torch.float64)
    batches = [(torch.randn(D_IN, b, generator=generator, dtype=torch.float64),
                torch.randn(D_OUT, b, generator=generator, dtype=torch.float64)) for b in (3, 1, 4)]
    memory = EditMemory({0: a0})
    w = w0.clone()
    for keys, targets in batches:
        delta = solve("rlsedit", c0, keys, targets - w @ keys, PARAMS, running_inverse=memory.inverse_at(0),
                      edit_memory=memory.at(0))
        w = w + delta.dense()
        memory.add({0: keys})
    moment = a0 + sum(k @ k.T for k, _ in batches)
    expected = (w0 @ a0 + sum(v @ k.T for k, v in batches)) @ torch.linalg.inv(moment)
    torch.testing.assert_close(w, expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(memory.inverse_at(0), torch.linalg.inv(moment), rtol=1e-8, atol=1e-10)


def test_each_step_is_memit_preserving_the_earlier_edits():
    """The update of one batch equals ``R K_Eᵀ (λ C0 + μ I + S + K_E K_Eᵀ)⁻¹``, MEMIT with ``preserve_edits``."""
    generator = torch.Generator().manual_seed(3)
    c0 = _spd(generator, D_IN)
    a0 = PARAMS.mom2_update_weight * c0 + PARAMS.update_norm_lambda * torch.eye(D_IN, dtype=torch.float64)
    earlier = torch.randn(D_IN, 6, generator=generator, dtype=torch.float64)
    memory = EditMemory.from_batches([{0: earlier}], inverse_bases={0: a0})
    keys = torch.randn(D_IN, 2, generator=generator, dtype=torch.float64)
    residual = torch.randn(D_OUT, 2, generator=generator, dtype=torch.float64)
    rls = solve("rlsedit", c0, keys, residual, PARAMS, running_inverse=memory.inverse_at(0))
    memit = solve("memit", c0, keys, residual, ObjectiveParams(**{**PARAMS.__dict__, "preserve_edits": True}),
                  edit_memory=memory.at(0))
    torch.testing.assert_close(rls.dense(), memit.dense(), rtol=1e-8, atol=1e-10)
    dense = residual @ keys.T @ torch.linalg.inv(a0 + earlier @ earlier.T + keys @ keys.T)
    torch.testing.assert_close(rls.dense(), dense, rtol=1e-8, atol=1e-10)


def test_a_memory_rebuilt_from_its_batches_has_the_live_inverse_bit_for_bit():
    generator = torch.Generator().manual_seed(4)
    a0 = _spd(generator, D_IN)
    batches = [{0: torch.randn(D_IN, 3, generator=generator).float()} for _ in range(3)]
    live = EditMemory({0: a0})
    for keys in batches:
        live.add(keys)
    rebuilt = live.empty()
    rebuilt.load(EditMemory.from_batches(batches, inverse_bases={0: a0}))
    assert torch.equal(live.inverse_at(0), rebuilt.inverse_at(0)) and torch.equal(live.at(0), rebuilt.at(0))
    assert not torch.equal(live.empty().inverse_at(0), live.inverse_at(0))
