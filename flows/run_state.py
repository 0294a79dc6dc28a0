"""Opening a run: create it, or resume it with the model restored, exactly, from the ledger.

A run is fully described by its ledger row: the settings, the resolved edit
configuration and the context prefixes are stored with it, so resuming,
re-evaluating or serving a run needs only its id. Before any edit, the loaded
model is checked against the run's recorded fingerprint and original layer
hashes, and the weights after the last committed batch are rebuilt from the
ledger (checkpoint + deltas, sha256-verified) — never trusted from memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
from sqlalchemy import Engine

from db.history import applied_facts
from db.replay import edit_memory_at, last_applied_seq, lyapunov_at, weights_at
from db.runs import RunInfo, RunSpec, create_run, get_run
from editing.config import EditConfig, hparams_key_for, load_edit_config
from editing.editor import BatchEdit, Editor, null_spaces_for
from editing.evaluation.health import HealthProbe, health_metrics
from editing.facts import Fact
from editing.models.adapter import ModelAdapter
from editing.prune import delivered_model
from editing.stats import second_moments
from flows.model_session import ModelSession
from flows.run_model import check_run_model
from flows.settings import RunSettings

log = logging.getLogger(__name__)


class RunStateError(ValueError):
    """The loaded model is not the model this run edits."""


@dataclass
class RunContext:
    """A run with its model loaded and in the run's current state."""

    engine: Engine
    run: RunInfo
    settings: RunSettings
    config: EditConfig
    session: ModelSession
    editor: Editor
    seq: int
    """The batch the model's weights correspond to (0: before any edit)."""

    @property
    def adapter(self):
        return self.session.adapter

    @property
    def original(self) -> dict[int, torch.Tensor]:
        return self.session.pristine(self.run.layers)

    def restore(self, seq: int, weights: dict[int, torch.Tensor]) -> None:
        """Put the model and the edit memory in their state after batch ``seq`` (``weights`` from the ledger)."""
        self.session.load_state(weights)
        if self.editor.memory is not None:
            self.editor.memory.load(edit_memory_at(self.engine, self.run.id, seq, self.editor.memory_devices(),
                                                   self.editor.memory.empty()))
        if self.editor.lyapunov is not None:
            self.editor.lyapunov.load(lyapunov_at(self.engine, self.run.id, seq, self.editor.lyapunov.empty()))
        self.seq = seq

    def delivered(self) -> ContextManager[ModelAdapter]:
        """The model as the run delivers it — restrained by PRUNE where the configuration says so — for the
        duration of the block: what evaluations and health checks measure. The edited weights come back
        bit for bit afterwards."""
        return delivered_model(self.adapter, self.config.restraint, self.original, list(self.run.layers))

    def health(self, edit: BatchEdit | None = None) -> dict[str, float]:
        """The health check of the model as it is now (after ``edit``; None: the baseline)."""
        probe = HealthProbe(data_dir=self.settings.evaluation_config().data_dir)
        deltas = {update.layer: update.delta for update in edit.updates} if edit is not None else None
        with self.delivered() as adapter:
            return health_metrics(adapter, self.original, probe, deltas, edit.v_star if edit is not None else None)

    def retention_facts(self, seq: int) -> list[Fact]:
        """The earlier edits retention checks at point ``seq``: facts of the batches *before* ``seq``
        (the batch just edited is scored by ES/PS/NS; counting it as retained would inflate retention
        and blunt its collapse rule), none at batch 1. A fixed, seeded sample of them: a fact's
        membership never changes as the run grows, so retention curves follow the same facts from
        evaluation to evaluation."""
        facts = applied_facts(self.engine, self.run.id, before_seq=seq)
        size = self.settings.retention_sample
        if size is None or len(facts) <= size:
            return [fact for _, fact in facts]
        seed = self.settings.evaluation_config().seed

        def rank(item: tuple[int, Fact]) -> str:
            return hashlib.sha256(f"{seed}:{item[0]}".encode()).hexdigest()

        chosen = {fact_id for fact_id, _ in sorted(facts, key=rank)[:size]}
        return [fact for fact_id, fact in facts if fact_id in chosen]


def _resolved_config(settings: RunSettings, model_name: str) -> EditConfig:
    return load_edit_config(settings.hparams or hparams_key_for(model_name), settings.algorithm,
                            settings.edit_overrides)


def create_run_context(engine: Engine, settings: RunSettings) -> RunContext:
    """Record a new run (settings, edit configuration, prefixes, original weights) and open it."""
    settings = dataclasses.replace(settings, runtime=dataclasses.replace(
        settings.runtime, dtype=str(settings.runtime.model_dtype).removeprefix("torch.")))
    session = ModelSession.get(settings.model, settings.runtime)
    adapter = session.adapter
    config = _resolved_config(settings, adapter.name)
    session.load_state({})  # whatever an earlier run in this process did, start from the original
    editor = Editor.prepare(adapter, config, runtime=settings.runtime)
    hyperparameters: dict[str, Any] = {"edit": config.to_dict(), "prefixes": list(editor.prefixes),
                                       "settings": settings.to_dict()}
    spec = RunSpec(model_name=adapter.name, algorithm=config.algorithm, distribution=config.distribution,
                   batch_size=settings.batch_size, hyperparameters=hyperparameters, eval_every=settings.eval_every,
                   checkpoint_every=settings.checkpoint_every, collapse_policy=settings.collapse.to_dict(),
                   model_revision=getattr(adapter.model.config, "_commit_hash", None),
                   model_fingerprint=adapter.fingerprint, name=settings.name, fact_pool=settings.fact_pool,
                   fact_source=settings.fact_source)
    run = create_run(engine, spec, session.pristine(editor.layers))
    log.info("created run %d (%s on %s, layers %s)", run.id, config.algorithm, adapter.name, list(editor.layers))
    return RunContext(engine, run, settings, config, session, editor, seq=0)


def open_run_context(engine: Engine, run_id: int, at_seq: int | None = None) -> RunContext:
    """Open an existing run with the model in its state after batch ``at_seq`` (default: the last applied)."""
    run = get_run(engine, run_id)
    stored = run.spec.hyperparameters
    settings = RunSettings.recorded(stored["settings"])
    config = EditConfig.from_dict(stored["edit"])
    session = ModelSession.get(settings.model, settings.runtime)
    adapter = session.adapter
    check_run_model(run, adapter, RunStateError)
    seq = last_applied_seq(engine, run_id) if at_seq is None else at_seq
    session.load_state(weights_at(engine, run_id, seq))
    editor = Editor(adapter, config, second_moments(adapter, list(run.layers), config.stats),
                    tuple(stored["prefixes"]), settings.runtime, null_spaces=null_spaces_for(adapter, config))
    if editor.memory is not None:
        editor.memory.load(edit_memory_at(engine, run_id, seq, editor.memory_devices(), editor.memory.empty()))
    if editor.lyapunov is not None:
        editor.lyapunov.load(lyapunov_at(engine, run_id, seq, editor.lyapunov.empty()))
    log.info("opened run %d at batch %d", run_id, seq)
    return RunContext(engine, run, settings, config, session, editor, seq=seq)
