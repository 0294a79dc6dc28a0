"""ROME (Meng et al., 2022): EMMET with one fact — the equality-constrained update of a single key.

With B = 1, ``D = k_eᵀ C⁻¹ k_e`` is a scalar and EMMET's update becomes ROME's rank-one
``ΔW = r (C⁻¹ k_e)ᵀ / (k_eᵀ C⁻¹ k_e)``; the same code path, limited to one fact per batch.
"""

from __future__ import annotations

from editing.objectives.emmet import Emmet


class Rome(Emmet):
    name = "rome"
    max_batch_size = 1
