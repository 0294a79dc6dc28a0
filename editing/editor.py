"""The editor: one batch of facts in, low-rank updates applied to the model out.

Per batch (docs/math.md): target residuals ``z`` by the v* optimisation at the last
edit layer, then the edit distribution computes keys layer by layer and the
objective solves each layer's update. Everything is computed on the *current*
model, so sequential batches see earlier edits. If anything fails midway, the
edited layers are restored to their exact previous values: a batch is applied
completely or not at all.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from editing.config import EditConfig
from editing.distribution import LayerSolver, LayerUpdate, distribute, get_distribution
from editing.facts import Fact
from editing.rows import build_rewrite_rows
from editing.v_star import VStar, compute_v_star
from editing.models.adapter import ModelAdapter
from editing.objectives import get_objective
from editing.prefixes import generate_prefixes
from editing.runtime import Runtime
from editing.lyapunov import LyapunovQueue
from editing.memory import EditMemory
from editing.norm_anchor import anchor_norm
from editing.stats import null_space_bases, second_moments

log = logging.getLogger(__name__)


@dataclass
class BatchEdit:
    """What one applied batch changed, for the ledger and the reports."""

    updates: list[LayerUpdate]
    weights_sha256: dict[int, str]
    """Hash of each edited layer after the update."""
    v_star: VStar
    """The batch's targets ``z`` and how their optimisation went."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Three disjoint parts: ``v_star`` (the optimisation, which batching is meant to amortise), ``keys``
    (reading k* and the current outputs at every layer) and ``solve`` (the layers' solves and updates)."""

    @property
    def keys(self) -> dict[int, torch.Tensor]:
        """Layer → ``K_E`` as solved for (d_in × B, float32): what the edit memory and the ledger keep."""
        return {update.layer: update.keys for update in self.updates}

    @property
    def memorization(self) -> dict[int, float]:
        """Layer → share of its assigned residual the update wrote (see :class:`LayerUpdate`)."""
        return {update.layer: update.memorization for update in self.updates}

    def diagnostics(self) -> dict[str, object]:
        """What the ledger keeps with the batch to audit the edit's quality (JSON-serialisable)."""
        return {"memorization": {str(layer): value for layer, value in self.memorization.items()},
                "v_star_final_nll": float(self.v_star.final_nll.mean()),
                "v_star_steps_max": int(self.v_star.steps.max()),
                **({} if self.v_star.dropped is None else {"nas_dropped": int(self.v_star.dropped.sum())})}


class Editor:
    """Applies batches of facts to a loaded model under one :class:`EditConfig`.

    The prefixes and second moments are fixed for the editor's lifetime; a run
    records the prefixes so that resuming reproduces the same edits.
    """

    def __init__(self, adapter: ModelAdapter, config: EditConfig, second_moments: dict[int, torch.Tensor],
                 prefixes: tuple[str, ...], runtime: Runtime | None = None, memory: EditMemory | None = None,
                 null_spaces: dict[int, torch.Tensor] | None = None) -> None:
        self.adapter = adapter
        self.config = config
        self.runtime = runtime or Runtime()
        self.distribution = get_distribution(config.distribution)
        self.objective = get_objective(config.algorithm)
        self.layers = self.distribution.edit_layers(config.layers)
        adapter.check_resident(self.layers)  # an offloaded layer (device_map) has no weights to write into
        if self.objective.needs_null_space and null_spaces is None:
            raise ValueError(f"{config.algorithm} needs the null spaces of C0 (Editor.prepare computes them)")
        # Each layer is solved on its own device — the one its matrix is on, which differs between layers
        # of a model dispatched over several (device_map): a 1536² (SmolLM2) or 11008² (Llama-2-7b) system
        # in float64.
        moments = {layer: c0.to(adapter.weight(layer).device) for layer, c0 in second_moments.items()}
        if memory is None and self.objective.uses_edit_memory(config.objective):
            memory = EditMemory(self._inverse_bases(moments))
        if null_spaces is not None:
            null_spaces = {layer: basis.to(adapter.weight(layer).device) for layer, basis in null_spaces.items()}
        lyapunov = None
        if self.objective.needs_lyapunov:
            originals = {layer: w.to(adapter.weight(layer).device)
                         for layer, w in adapter.original_weights(self.layers).items()}
            lyapunov = LyapunovQueue(config.objective.lyaplock_alpha, originals,
                                     {layer: moments[layer] for layer in self.layers})
        self.solver = LayerSolver(config.algorithm, config.objective, moments, self.runtime.solve_torch_dtype,
                                  memory, null_spaces, lyapunov)
        self.prefixes = prefixes
        self.norm_anchor = (anchor_norm(adapter, self.layers[-1], config.values)
                            if config.values.norm_anchor_scaling else None)
        """NAS's anchor norm ``A`` at the last edit layer (None without ``values.norm_anchor_scaling``): a
        property of the unedited model, computed once and cached (:mod:`editing.norm_anchor`)."""
        self.prepare_seconds: dict[str, float] = {}
        """Time :meth:`prepare` spent on the statistics (``stats``) and on generating prefixes (``prefixes``)."""
        for layer in self.layers:
            adapter.block(layer)  # validates the layer index

    def _inverse_bases(self, moments: dict[int, torch.Tensor]) -> dict[int, torch.Tensor] | None:
        """``A0 = λ C0 + μ I`` per layer (float64) for an objective that keeps the running inverse, else None."""
        if not self.objective.needs_running_inverse:
            return None
        params = self.config.objective
        return {layer: params.mom2_update_weight * c0.double()
                + params.update_norm_lambda * torch.eye(c0.shape[0], dtype=torch.float64, device=c0.device)
                for layer, c0 in moments.items() if layer in self.layers}

    @classmethod
    def prepare(cls, adapter: ModelAdapter, config: EditConfig, prefixes: tuple[str, ...] | None = None,
                runtime: Runtime | None = None) -> "Editor":
        """Load (or compute once and cache) ``C0`` for the edit layers and fix the prefixes."""
        layers = get_distribution(config.distribution).edit_layers(config.layers)
        adapter.check_resident(layers)  # before the statistics, the expensive part
        started = time.perf_counter()
        moments = second_moments(adapter, list(layers), config.stats)
        null_spaces = null_spaces_for(adapter, config)
        stats_done = time.perf_counter()
        if prefixes is None:
            prefixes = generate_prefixes(adapter, config.values.n_prefixes, config.values.prefix_tokens)
        editor = cls(adapter, config, moments, prefixes, runtime, null_spaces=null_spaces)
        editor.prepare_seconds = {"stats": stats_done - started, "prefixes": time.perf_counter() - stats_done}
        return editor

    @property
    def memory(self) -> EditMemory | None:
        """The edit memory the objective reads (None when it reads none)."""
        return self.solver.memory

    @property
    def lyapunov(self) -> LyapunovQueue | None:
        """LyapLock's virtual queue (None for the other objectives)."""
        return self.solver.lyapunov

    def memory_devices(self) -> dict[int, torch.device]:
        """Where each layer's edit memory lives: with the layer's weight, where it is solved."""
        return self.adapter.layer_devices(self.layers)

    def remember(self, edit: BatchEdit) -> None:
        """Add an applied (and, in a run, committed) batch's keys to the edit memory, if there is one, and the
        batch to LyapLock's queue.

        Separate from :meth:`apply` so that a batch whose ledger commit fails leaves the
        memory as untouched as the weights.
        """
        if self.solver.memory is not None:
            self.solver.memory.add(edit.keys, self.memory_devices())
        if self.solver.lyapunov is not None:
            self.solver.lyapunov.add({layer: self.adapter.weight(layer) for layer in self.layers}, edit.keys)

    def check_batch(self, facts: list[Fact]) -> None:
        """Reject a batch the objective cannot take before anything is computed."""
        if not facts:
            raise ValueError("an edit batch needs at least one fact")
        self.objective.check_batch_size(len(facts))

    def apply(self, facts: list[Fact], on_layer: Callable[[LayerUpdate], None] | None = None,
              v_star: Callable[[list[Fact]], VStar] | None = None) -> BatchEdit:
        """Edit the model with ``facts``; on any error the model is left exactly as it was.

        ``on_layer`` is called after each layer's update is written (progress, crash tests). ``v_star``
        supplies the batch's targets instead of optimising them here — a study reuses a fact's ``z``
        across arms (:mod:`flows.studies.v_star_reuse`); it must give what :meth:`compute_v_star` would.
        """
        self.check_batch(facts)
        before = self.adapter.snapshot(list(self.layers))
        try:
            return self._apply(facts, on_layer, v_star or self.compute_v_star)
        except BaseException:
            self.adapter.restore(before)
            raise

    def compute_v_star(self, facts: list[Fact]) -> VStar:
        """The batch's v* at the last edit layer, on the model as it is now."""
        return compute_v_star(self.adapter, facts, self.layers[-1], self.prefixes, self.config.values,
                              autocast=self.runtime.autocast_dtype, anchor=self.norm_anchor)

    def _apply(self, facts: list[Fact], on_layer: Callable[[LayerUpdate], None] | None,
               targets: Callable[[list[Fact]], VStar]) -> BatchEdit:
        started = time.perf_counter()
        v_star = targets(facts)
        v_star_seconds = time.perf_counter() - started
        rows = build_rewrite_rows(self.adapter, facts, self.prefixes, with_targets=False)
        solve_seconds: list[float] = []

        def layer_done(update: LayerUpdate, seconds: float) -> None:
            solve_seconds.append(seconds)
            if on_layer is not None:
                on_layer(update)

        updates = distribute(self.adapter, rows, v_star.z, self.layers, self.distribution, self.solver,
                             on_layer=layer_done)
        total = time.perf_counter() - started
        seconds = {"v_star": v_star_seconds, "keys": total - v_star_seconds - sum(solve_seconds),
                   "solve": sum(solve_seconds)}
        log.info("edited %d facts in %.1fs (%s)", len(facts), total,
                 ", ".join(f"{part} {value:.1f}s" for part, value in seconds.items()))
        return BatchEdit(updates, self.adapter.weights_sha256(list(self.layers)), v_star, seconds)


def null_spaces_for(adapter: ModelAdapter, config: EditConfig) -> dict[int, torch.Tensor] | None:
    """``C0``'s null-space bases for the edit layers when the objective projects onto them, else None."""
    if not get_objective(config.algorithm).needs_null_space:
        return None
    layers = get_distribution(config.distribution).edit_layers(config.layers)
    return null_space_bases(adapter, list(layers), config.stats, config.objective.nullspace_threshold)
