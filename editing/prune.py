"""PRUNE (Ma et al., ICLR 2025; mjy1111/PRUNE ``easyeditor/editors/bi_editor_loadw.py``): the model a
sequential run delivers has the large singular values of its accumulated change restrained.

After ``n`` sequential edits a layer holds ``W = W0 + ΔW`` with ``ΔW`` the sum of every batch's update.
Its singular values grow with ``n``, and with them the matrix's condition number, which the paper
ties to the loss of general abilities. PRUNE leaves the edit history as it is and delivers, per edited
layer, with ``ΔW = U Σ Vᵀ`` and ``σ_max = ‖W0‖₂``,

``W' = W0 + U F(Σ) Vᵀ``,  ``F(σ) = ln σ − ln σ_max + σ_max`` for ``σ ≥ σ_max``, ``F(σ) = σ`` below,

so no singular value of the change exceeds ``σ_max`` by more than a logarithm. The authors apply it to
the model after the n-th edit, to evaluate it (``edit_load.py --reduce_type log``); the edits themselves
go on unrestrained. So here the ledger, rollback and resume keep the unrestrained weights, and
:func:`restrained_model` swaps the restrained ones in for as long as the model is evaluated or exported,
putting the edited weights back bit for bit afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from editing.models.adapter import ModelAdapter

def restrain(original: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """``W0 + U F(Σ) Vᵀ`` for ``edited − original = U Σ Vᵀ`` (float64 SVD; the result in ``edited``'s dtype)."""
    w0 = original.to(device=edited.device, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(edited.double() - w0, full_matrices=False)
    sigma_max = torch.linalg.matrix_norm(w0, ord=2)
    large = s >= sigma_max
    restrained = torch.where(large, torch.log(torch.where(large, s, sigma_max)) - torch.log(sigma_max) + sigma_max, s)
    return (w0 + (u * restrained) @ vh).to(edited.dtype)


@contextmanager
def delivered_model(adapter: ModelAdapter, restraint: str | None, originals: Mapping[int, torch.Tensor],
                    layers: Sequence[int]) -> Iterator[ModelAdapter]:
    """The model as the run delivers it (``EditConfig.restraint``) for the duration of the block."""
    if restraint is None:
        yield adapter
        return
    with restrained_model(adapter, originals, layers):
        yield adapter


@contextmanager
def restrained_model(adapter: ModelAdapter, originals: Mapping[int, torch.Tensor],
                     layers: Sequence[int]) -> Iterator[ModelAdapter]:
    """The model with each of ``layers`` restrained against its original for the duration of the block."""
    edited = adapter.snapshot(list(layers))
    try:
        adapter.restore({layer: restrain(originals[layer], edited[layer]) for layer in layers})
        yield adapter
    finally:
        adapter.restore(edited)
