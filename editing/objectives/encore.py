"""ENCORE (Gupta et al., 2025): MEMIT that always preserves the run's earlier edits, with a norm penalty.

``ΔW = R K_Eᵀ (λ C0 + S + K_E K_Eᵀ + λ_n I)⁻¹`` — MEMIT's update with the edit memory
``S = Σ K_p K_pᵀ`` always on and μ = λ_n (``update_norm_lambda``). Its other half,
most-probable early stopping of v*, is ``values.mpes_extra_steps``.
"""

from __future__ import annotations

from editing.config import ObjectiveParams
from editing.objectives.memit import Memit


class Encore(Memit):
    name = "encore"

    def uses_edit_memory(self, params: ObjectiveParams) -> bool:
        return True
