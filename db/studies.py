"""The ledger's side of studies: studies and arms, independent arms' batches and scores, the v* cache.

An independent arm's batch is recorded with its facts' scores in one transaction
(:func:`record_arm_batch`), so an interrupted arm has every batch it reports and
resumes at the first one it lacks. A study's arms are matched by name when the
study is run again: an arm that is already in the ledger keeps its row (and its
results) — the spec is only read for arms it does not have yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import pandas as pd
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError

from db.engine import transaction
from db.models import (ArmBatchRecord, ArmFactScore, FactRecord, FactStatus, StudyArmRecord, StudyRecord,
                       StudyStatus, VStarEntry, utcnow)
from editing.facts import Fact

SCORE_NAMES = ("es", "ps", "ns", "em", "pm", "nm", "ge", "rewrite_acc", "rephrase_acc", "locality_acc",
               "wild_rewrite", "wild_rephrase")
"""The per-fact scores an independent arm keeps (:class:`db.models.ArmFactScore`)."""


@dataclass(frozen=True)
class ArmInfo:
    id: int
    study_id: int
    name: str
    position: int
    mode: str
    settings: dict[str, Any]
    status: str
    run_id: int | None
    v_star_key: str | None
    seconds: float | None
    error: str | None
    worker: str | None = None


def _arm_info(row: StudyArmRecord) -> ArmInfo:
    return ArmInfo(id=row.id, study_id=row.study_id, name=row.name, position=row.position, mode=row.mode,
                   settings=dict(row.settings), status=str(row.status), run_id=row.run_id,
                   v_star_key=row.v_star_key, seconds=row.seconds, error=row.error, worker=row.worker)


def open_study(engine: Engine, name: str, spec: Mapping[str, Any], fact_source: str,
               arms: Iterable[tuple[str, str, Mapping[str, Any]]]) -> tuple[int, list[ArmInfo]]:
    """The study ``name`` (created if new) with every arm of ``arms`` (name, mode, settings); arms it has
    already keep their row — and must have the same settings, or nothing is written and ValueError says
    which differ (a study's results describe one spec). Returns the study's id and its arms in position order."""
    with transaction(engine, write=True) as session:
        study = session.scalars(select(StudyRecord).where(StudyRecord.name == name)).one_or_none()
        if study is None:
            study = StudyRecord(name=name, spec=dict(spec), fact_source=fact_source)
            session.add(study)
            session.flush()
        existing = {row.name: row for row in
                    session.scalars(select(StudyArmRecord).where(StudyArmRecord.study_id == study.id))}
        arms = list(arms)
        changed = [arm_name for arm_name, mode, settings in arms if arm_name in existing and
                   (existing[arm_name].mode, _normal(existing[arm_name].settings)) != (mode, _normal(settings))]
        if changed:
            raise ValueError(f"study {name!r} has arm(s) {', '.join(changed)} with other settings than this spec's; "
                             f"give the changed study another name (--name), or run it as it was")
        have = set(existing)
        position = len(have)
        for arm_name, mode, settings in arms:
            if arm_name not in have:
                session.add(StudyArmRecord(study_id=study.id, name=arm_name, position=position, mode=mode,
                                           settings=dict(settings), status=StudyStatus.PENDING))
                have.add(arm_name)
                position += 1
        study_id = study.id
    return study_id, study_arms(engine, study_id)


def _normal(settings: Mapping[str, Any]) -> Any:
    """Settings as the ledger's JSON column gives them back (tuples become lists)."""
    return json.loads(json.dumps(settings, sort_keys=True))


def find_study(engine: Engine, name: str) -> tuple[int, dict[str, Any], str]:
    """(id, spec, fact source) of the study ``name``; LookupError naming the studies there are."""
    with engine.connect() as connection:
        row = connection.execute(select(StudyRecord.id, StudyRecord.spec, StudyRecord.fact_source)
                                 .where(StudyRecord.name == name)).one_or_none()
        if row is None:
            names = connection.execute(select(StudyRecord.name).order_by(StudyRecord.id)).scalars().all()
            raise LookupError(f"no study {name!r} in this ledger (studies: {', '.join(names) or 'none'})")
    return row.id, dict(row.spec), row.fact_source


def study_arms(engine: Engine, study_id: int) -> list[ArmInfo]:
    with transaction(engine) as session:
        rows = session.scalars(select(StudyArmRecord).where(StudyArmRecord.study_id == study_id)
                               .order_by(StudyArmRecord.position)).all()
        return [_arm_info(row) for row in rows]


def get_arm(engine: Engine, arm_id: int) -> ArmInfo:
    with transaction(engine) as session:
        row = session.get(StudyArmRecord, arm_id)
        if row is None:
            raise LookupError(f"no study arm {arm_id}")
        return _arm_info(row)


def update_arm(engine: Engine, arm_id: int, **values: Any) -> None:
    """Set columns of arm ``arm_id`` (``status``, ``run_id``, ``v_star_key``, ``flow_run_id``, ``worker``, ``error``)."""
    with transaction(engine, write=True) as session:
        row = session.get(StudyArmRecord, arm_id)
        for name, value in values.items():
            setattr(row, name, value)
        row.updated_at = utcnow()


def add_arm_seconds(engine: Engine, arm_id: int, seconds: float) -> None:
    with transaction(engine, write=True) as session:
        row = session.get(StudyArmRecord, arm_id)
        row.seconds = (row.seconds or 0.0) + seconds


def source_facts(engine: Engine, source: str, start: int = 0, stop: int | None = None) -> list[tuple[int, Fact]]:
    """The valid facts of ``source`` whose record index is in ``[start, stop)``, in record order, as
    (fact id, fact). A record that duplicates a fact ingested before (under any source) stands for that
    fact, so a study reads the same facts whatever else the ledger holds."""
    with transaction(engine) as session:
        query = (select(FactRecord).where(FactRecord.source == source, FactRecord.source_index >= start,
                                          FactRecord.status != FactStatus.REJECTED)
                 .order_by(FactRecord.source_index))
        if stop is not None:
            query = query.where(FactRecord.source_index < stop)
        rows = session.scalars(query).all()
        canonical = {row.id: row for row in session.scalars(select(FactRecord).where(
            FactRecord.id.in_([row.duplicate_of for row in rows if row.duplicate_of is not None])))}
        chosen = [canonical[row.duplicate_of] if row.duplicate_of is not None else row for row in rows]
        return list({row.id: (row.id, row.to_fact()) for row in chosen}.values())


def done_batches(engine: Engine, arm_id: int) -> set[int]:
    with engine.connect() as connection:
        return set(connection.execute(select(ArmBatchRecord.seq).where(ArmBatchRecord.arm_id == arm_id)).scalars())


def record_arm_batch(engine: Engine, arm_id: int, seq: int, scores: Mapping[int, Mapping[str, float | None]],
                     timings: Mapping[str, float], diagnostics: Mapping[str, Any]) -> None:
    """Batch ``seq`` of arm ``arm_id`` with each fact's scores (fact id → name → value), in one transaction."""
    with transaction(engine, write=True) as session:
        batch = ArmBatchRecord(arm_id=arm_id, seq=seq, n_facts=len(scores), timings=dict(timings),
                               diagnostics=dict(diagnostics))
        session.add(batch)
        session.flush()
        session.add_all(ArmFactScore(arm_batch_id=batch.id, fact_id=fact_id,
                                     **{name: values.get(name) for name in SCORE_NAMES})
                        for fact_id, values in scores.items())


def arm_scores_frame(engine: Engine, arm_id: int) -> pd.DataFrame:
    """One row per scored fact of an independent arm: ``seq``, ``fact_id`` and the scores."""
    query = (select(ArmBatchRecord.seq, ArmFactScore.fact_id,
                    *(getattr(ArmFactScore, name) for name in SCORE_NAMES))
             .join(ArmBatchRecord, ArmFactScore.arm_batch_id == ArmBatchRecord.id)
             .where(ArmBatchRecord.arm_id == arm_id).order_by(ArmBatchRecord.seq, ArmFactScore.fact_id))
    with engine.connect() as connection:
        return pd.DataFrame(connection.execute(query).mappings().all(), columns=["seq", "fact_id", *SCORE_NAMES])


def arm_batches_frame(engine: Engine, arm_id: int) -> pd.DataFrame:
    query = (select(ArmBatchRecord.seq, ArmBatchRecord.n_facts, ArmBatchRecord.timings, ArmBatchRecord.diagnostics)
             .where(ArmBatchRecord.arm_id == arm_id).order_by(ArmBatchRecord.seq))
    with engine.connect() as connection:
        return pd.DataFrame(connection.execute(query).mappings().all(),
                            columns=["seq", "n_facts", "timings", "diagnostics"])


def arm_v_star_frame(engine: Engine, arm_id: int, v_star_key: str) -> pd.DataFrame:
    """One row per scored fact of an independent arm whose v* the cache holds under the arm's key: ``fact_id``,
    ``steps``, ``final_nll``, ``stop_reason`` — how the optimisation went for the facts the arm's scores describe,
    whichever arm computed them."""
    scored = (select(ArmFactScore.fact_id).join(ArmBatchRecord, ArmFactScore.arm_batch_id == ArmBatchRecord.id)
              .where(ArmBatchRecord.arm_id == arm_id))
    query = (select(VStarEntry.fact_id, VStarEntry.steps, VStarEntry.final_nll, VStarEntry.stop_reason)
             .where(VStarEntry.ingredients_key == v_star_key, VStarEntry.fact_id.in_(scored))
             .order_by(VStarEntry.fact_id))
    with engine.connect() as connection:
        return pd.DataFrame(connection.execute(query).mappings().all(),
                            columns=["fact_id", "steps", "final_nll", "stop_reason"])


# -- the v* cache ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CachedVStar:
    key: str
    z: bytes
    initial_nll: float
    final_nll: float
    steps: int
    stop_reason: str


def cached_v_stars(engine: Engine, keys: Iterable[str]) -> dict[str, CachedVStar]:
    wanted = list(keys)
    with engine.connect() as connection:
        rows = connection.execute(select(VStarEntry.key, VStarEntry.z, VStarEntry.initial_nll, VStarEntry.final_nll,
                                         VStarEntry.steps, VStarEntry.stop_reason)
                                  .where(VStarEntry.key.in_(wanted))).all()
    return {row.key: CachedVStar(row.key, bytes(row.z), row.initial_nll, row.final_nll, row.steps, row.stop_reason)
            for row in rows}


def store_v_stars(engine: Engine, ingredients_key: str, ingredients: Mapping[str, Any],
                  entries: Iterable[tuple[int, CachedVStar]]) -> None:
    """Keep computed v* (fact id, entry). A key stored meanwhile by another arm is left as it is (same
    ingredients, same value); on PostgreSQL two arms may insert the same key at once, and the one whose
    commit collides tries again, skipping what the other stored."""
    entries = list(entries)
    for attempt in range(3):
        try:
            with transaction(engine, write=True) as session:
                for fact_id, entry in entries:
                    if session.get(VStarEntry, entry.key) is None:
                        session.add(VStarEntry(key=entry.key, ingredients_key=ingredients_key, fact_id=fact_id,
                                               ingredients=dict(ingredients), z=entry.z,
                                               initial_nll=entry.initial_nll, final_nll=entry.final_nll,
                                               steps=entry.steps, stop_reason=entry.stop_reason))
            return
        except IntegrityError:
            if attempt == 2:
                raise


def v_star_counts(engine: Engine, arm_ids: Iterable[int]) -> dict[str, int]:
    """v* optimisations computed and reused by the independent batches of ``arm_ids``, summed."""
    ids = list(arm_ids)
    with engine.connect() as connection:
        rows = connection.execute(select(ArmBatchRecord.diagnostics).where(ArmBatchRecord.arm_id.in_(ids))).scalars()
        counts = {"computed": 0, "reused": 0}
        for diagnostics in rows:
            for name in counts:
                counts[name] += int(diagnostics.get(f"v_star_{name}", 0))
    return counts


def cache_size(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(VStarEntry)).scalar_one())
