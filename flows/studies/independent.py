"""An independent arm: the paper's protocol (Gupta et al. 2024, §5; ROME/MEMIT's CounterFact evaluation).

The arm's N facts, in batches of B, are each edited into the *unedited* model,
scored on their own facts (ES/PS/NS/EM/PM/NM, GE on their generation prompts), and
undone exactly (the adapter's snapshot, then the layers' sha256 checked against
the originals), so the metrics describe batch size B alone and no batch sees
another's edit. Each batch's scores are committed with the batch in one ledger
transaction: an arm that was interrupted resumes at its first missing batch, and
the batches it had are never redone. The targets ``z`` come from
:class:`~flows.studies.v_star_reuse.VStarReuse`: computed once per fact and key,
shared by every arm with the same v* ingredients.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from sqlalchemy import Engine

from db.studies import ArmInfo, done_batches, record_arm_batch, update_arm
from editing.editor import Editor
from editing.evaluation.counterfact import counterfact_metrics
from editing.evaluation.generation import generation_entropy
from editing.evaluation.wild import wild_accuracy
from editing.facts import Fact
from editing.prune import delivered_model
from flows.model_session import ModelSession
from flows.settings import RunSettings
from flows.studies.v_star_reuse import VStarReuse

log = logging.getLogger(__name__)


class UndoError(RuntimeError):
    """An edit was not undone exactly: the arm's later batches would not start from the unedited model."""


def batches_of(facts: Sequence[tuple[int, Fact]], size: int) -> list[list[tuple[int, Fact]]]:
    return [list(facts[start:start + size]) for start in range(0, len(facts), size)]


@dataclass(frozen=True)
class ArmEditor:
    """What an independent arm edits with: its settings, the process's model put back in its unedited state,
    the prepared :class:`Editor` and the arm's :class:`VStarReuse`."""

    settings: RunSettings
    session: ModelSession
    editor: Editor
    reuse: VStarReuse

    @classmethod
    def prepare(cls, engine: Engine, arm: ArmInfo) -> "ArmEditor":
        settings = RunSettings.from_dict({k: v for k, v in arm.settings.items() if k not in ("n_facts", "seed")})
        settings.runtime.apply_threads()
        session = ModelSession.get(settings.model, settings.runtime)
        session.load_state({})  # the unedited model, whatever ran before in this process
        config = settings.edit_config(session.adapter.name)
        editor = Editor.prepare(session.adapter, config, runtime=settings.runtime)
        reuse = VStarReuse(engine, session.adapter, editor.layers[-1], config.values, editor.prefixes,
                           settings.runtime.autocast_dtype, editor.norm_anchor)
        return cls(settings, session, editor, reuse)


def run_independent_arm(engine: Engine, arm: ArmInfo, facts: Sequence[tuple[int, Fact]],
                        on_batch: Callable[[int], None] | None = None) -> dict[str, int]:
    """Edit, score and undo each missing batch of ``facts`` (the arm's, in order); returns the v* counts.

    ``on_batch`` is called after each batch is committed (progress, the kill test).
    """
    prepared = ArmEditor.prepare(engine, arm)
    settings, session, editor, reuse = prepared.settings, prepared.session, prepared.editor, prepared.reuse
    adapter, config = session.adapter, editor.config
    layers = list(editor.layers)
    original = adapter.weights_sha256(layers)
    pristine = session.pristine(layers)
    update_arm(engine, arm.id, v_star_key=reuse.key)
    evaluation = settings.evaluation_config()
    done = done_batches(engine, arm.id)
    totals = {"computed": 0, "reused": 0}
    for seq, batch in enumerate(batches_of(facts, settings.batch_size), start=1):
        if seq in done:
            continue
        ids, batch_facts = [fact_id for fact_id, _ in batch], [fact for _, fact in batch]
        counts: dict[str, int] = {}

        def targets(edit_facts: list[Fact]):
            v_star, used = reuse.for_batch(edit_facts, ids)
            counts.update(used)
            return v_star

        started = time.perf_counter()
        before = adapter.snapshot(layers)
        try:
            edit = editor.apply(batch_facts, v_star=targets)
            scored = time.perf_counter()
            with delivered_model(adapter, config.restraint, pristine, layers):
                scores = _scores(adapter, ids, batch_facts, evaluation)
        finally:
            adapter.restore(before)
        if adapter.weights_sha256(layers) != original:
            raise UndoError(f"arm {arm.name}: batch {seq} was not undone exactly")
        timings = {**edit.seconds, "evaluate": time.perf_counter() - scored, "batch": time.perf_counter() - started}
        record_arm_batch(engine, arm.id, seq, scores, timings,
                         {**edit.diagnostics(), "v_star_computed": counts["computed"],
                          "v_star_reused": counts["reused"]})
        for name in totals:
            totals[name] += counts[name]
        log.info("arm %s batch %d: %d facts, v* computed %d reused %d, %.1fs", arm.name, seq, len(batch),
                 counts["computed"], counts["reused"], timings["batch"])
        if on_batch is not None:
            on_batch(seq)
    return totals


def _scores(adapter, ids: list[int], facts: list[Fact], evaluation) -> dict[int, dict[str, float | None]]:
    """Each fact's CounterFact scores and token accuracies, its WILD answers and, for the first
    ``generation_facts`` facts of the batch, its GE."""
    results = counterfact_metrics(adapter, facts, evaluation.batch_size).facts
    scores = {fact_id: {"es": r.es, "ps": r.ps, "ns": r.ns, "em": r.em, "pm": r.pm, "nm": r.nm, "ge": None,
                        "rewrite_acc": r.rewrite_acc, "rephrase_acc": r.rephrase_acc, "locality_acc": r.locality_acc,
                        "wild_rewrite": None, "wild_rephrase": None}
              for fact_id, r in zip(ids, results)}
    if evaluation.wild:
        answered = wild_accuracy(adapter, facts, evaluation.wild_max_new_tokens, evaluation.generation_batch_size)
        for fact_id, (rewrite, rephrase) in zip(ids, answered.per_fact):
            scores[fact_id].update(wild_rewrite=rewrite, wild_rephrase=rephrase)
    if evaluation.generation:
        owners = [(fact_id, prompt) for fact_id, fact in list(zip(ids, facts))[:evaluation.generation_facts]
                  for prompt in fact.generation_prompts]
        if owners:
            entropies = generation_entropy(adapter, [prompt for _, prompt in owners], evaluation.max_new_tokens,
                                           evaluation.generation_batch_size).entropies
            for fact_id in dict.fromkeys(fact_id for fact_id, _ in owners):
                mine = [e for (owner, _), e in zip(owners, entropies) if owner == fact_id]
                scores[fact_id]["ge"] = sum(mine) / len(mine)
    return scores
