"""The health check after every batch: a few numbers that show a disabling edit at once.

A full evaluation point costs minutes; between two of them a run may apply many
batches, and a single bad batch can break the model (Gupta et al., 2024:
"disabling edits"). What it breaks shows immediately, and cheaply, in:

* the edited matrices — this batch's ``‖ΔW‖_F``, ``‖W‖_F``, ``‖W − W0‖_F`` and
  ``‖W − W0‖_F / ‖W0‖_F`` per layer (``norm.batch_dw.<l>``, ``norm.w.<l>``,
  ``norm.dw.<l>``, ``norm.rel_dw.<l>``);
* the v* optimisation — the mean ‖δ‖, steps and final target NLL of the batch
  (``vstar.delta_norm``, ``vstar.steps``, ``vstar.final_nll``);
* a small fixed perplexity probe — a few hundred tokens of WikiText-2
  validation text (``ppl.probe``), the same texts at every batch and at the
  baseline, so the default ``ppl.*`` collapse rule covers it.

The names match the full evaluation's, so the same collapse rules read both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from editing.corpus import load_texts
from editing.evaluation.norms import layer_norms
from editing.evaluation.perplexity import perplexity
from editing.models.adapter import ModelAdapter

PROBE_CORPUS = "wikitext-2-valid"


@dataclass(frozen=True)
class HealthProbe:
    """The fixed texts of the perplexity probe: ``n_texts`` paragraphs cut at ``max_tokens`` tokens each."""

    n_texts: int = 3
    max_tokens: int = 128
    seed: int = 0
    data_dir: str | None = None

    def texts(self) -> list[str]:
        return load_texts(PROBE_CORPUS, self.n_texts, self.seed, self.data_dir)


@torch.no_grad()
def health_metrics(adapter: ModelAdapter, original_weights: Mapping[int, torch.Tensor], probe: HealthProbe,
                   batch_deltas: Mapping[int, object] | None = None, v_star: object | None = None) -> dict[str, float]:
    """The health numbers of the model as it is now; ``batch_deltas`` (layer → LowRankDelta) and ``v_star``
    (:class:`editing.v_star.VStar`) describe the batch just applied (None at the baseline, before any batch)."""
    metrics: dict[str, float] = {"ppl.probe": perplexity(adapter, probe.texts(), probe.max_tokens)}
    for layer, norms in layer_norms(adapter, original_weights).items():
        original = float(torch.linalg.matrix_norm(original_weights[layer].double()))
        metrics[f"norm.w.{layer}"] = norms.weight
        metrics[f"norm.dw.{layer}"] = norms.delta
        metrics[f"norm.rel_dw.{layer}"] = norms.delta / original
        delta = (batch_deltas or {}).get(layer)
        metrics[f"norm.batch_dw.{layer}"] = 0.0 if delta is None else delta.norm()
    if v_star is not None:
        metrics["vstar.delta_norm"] = float(v_star.delta.norm(dim=1).mean())
        metrics["vstar.steps"] = float(v_star.steps.float().mean())
        metrics["vstar.final_nll"] = float(v_star.final_nll.mean())
    return metrics

