"""``identify``: which run and batch of this ledger a model folder is, from its weights alone.

The ledger records the sha256 (:func:`editing.delta.weight_sha256`, canonical d_out × d_in orientation) of
every edited layer before a run (its origin checkpoint) and after each batch (``weight_deltas.sha256_after``).
A Hugging Face folder's edited matrices — named by its ``config.json``'s model family, read from its
safetensors, never from a ``seqedit.json`` it may carry — are hashed the same way and looked up: a folder is
batch ``k`` of run ``N`` when every layer run ``N`` edits hashes to what the ledger says the layer was after
batch ``k``, and the unedited model of run ``N`` when every layer hashes to the origin.

A folder saved in a narrower dtype than the run's edit matrices (a bfloat16 export of a run kept in float32
masters) cannot match those hashes; for it the run's history is replayed from the origin and each point's
weights rounded to the folder's dtype before hashing — exactly what ``save_pretrained`` of that point writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sqlalchemy import Engine, select

from db.engine import transaction
from db.models import BatchRecord, BatchStatus, Checkpoint, RunRecord, WeightDelta
from db.tensors import delta_from_bytes, weight_from_bytes
from editing.delta import apply_delta, weight_sha256
from editing.models.adapter import ARCHITECTURES


@dataclass(frozen=True)
class Match:
    """One point of a run the folder's weights are: ``seq`` 0 is the unedited model."""

    run_id: int
    seq: int
    status: str
    """The batch's status (``applied``, ``rolled_back``) or ``origin``."""
    via: str
    """``sha256``: the layers' hashes are the ledger's; ``rounded``: they are the ledger's weights rounded to the
    folder's dtype."""

    def describe(self) -> str:
        if self.seq == 0:
            return f"the unedited model of run {self.run_id}"
        rolled = " (a batch since rolled back)" if self.status == BatchStatus.ROLLED_BACK else ""
        rounded = ", rounded to the folder's dtype" if self.via == "rounded" else ""
        return f"run {self.run_id} batch {self.seq}{rolled}{rounded}"


@dataclass
class Identification:
    folder: str
    family: str
    matches: list[Match] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)
    """Runs some (not all) of whose layers the folder matches, said in words: a model edited further elsewhere."""

    @property
    def identified(self) -> bool:
        return bool(self.matches)

    def describe(self) -> str:
        if not self.matches:
            extra = f" ({'; '.join(self.partial)})" if self.partial else ""
            return f"{self.folder}: not from this ledger{extra}"
        return f"{self.folder}: " + "; ".join(match.describe() for match in self.matches)

    def to_dict(self) -> dict:
        return {"folder": self.folder, "family": self.family, "identified": self.identified,
                "matches": [match.__dict__ for match in self.matches], "partial": self.partial,
                "answer": self.describe()}


class FolderWeights:
    """The edited matrices of a model folder, read lazily from its safetensors by parameter name."""

    def __init__(self, folder: Path) -> None:
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{folder} is not a Hugging Face model folder: it has no config.json")
        model_type = json.loads(config_file.read_text()).get("model_type")
        if model_type not in ARCHITECTURES:
            raise ValueError(f"{folder}/config.json: model_type {model_type!r} is not a family seqedit edits "
                             f"({', '.join(sorted(ARCHITECTURES))})")
        self.folder, self.family, self.spec = folder, model_type, ARCHITECTURES[model_type]
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.weight_map = {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(folder / "model.safetensors", framework="pt") as handle:
                self.weight_map = {name: folder / "model.safetensors" for name in handle.keys()}
        else:
            raise FileNotFoundError(f"{folder} has no safetensors weights (model.safetensors or its index); "
                                    "save the model with save_pretrained(safe_serialization=True)")
        self._cache: dict[int, torch.Tensor | None] = {}

    def matrix(self, layer: int) -> torch.Tensor | None:
        """Layer ``layer``'s edited matrix in canonical orientation, or None when the folder has no such layer."""
        if layer not in self._cache:
            from safetensors import safe_open

            name = f"{self.spec.layers}.{layer}.{self.spec.edited_module}.weight"
            if name not in self.weight_map:
                self._cache[layer] = None
            else:
                with safe_open(self.weight_map[name], framework="pt") as handle:
                    tensor = handle.get_tensor(name)
                self._cache[layer] = tensor.T if self.spec.transposed else tensor
        return self._cache[layer]


def identify_folder(engine: Engine, folder: str | Path) -> Identification:
    """Every point of every run of the ledger that the folder's edited layers are (see the module docstring)."""
    weights = FolderWeights(Path(folder))
    result = Identification(str(folder), weights.family)
    with transaction(engine) as session:
        runs = session.scalars(select(RunRecord.id).order_by(RunRecord.id)).all()
        for run_id in runs:
            origin = {layer: (sha, blob) for layer, sha, blob in session.execute(
                select(Checkpoint.layer, Checkpoint.sha256, Checkpoint.weights)
                .where(Checkpoint.run_id == run_id, Checkpoint.batch_id.is_(None)))}
            matrices = {layer: weights.matrix(layer) for layer in origin}
            if any(matrix is None for matrix in matrices.values()):
                continue
            if any(tuple(matrices[layer].shape) != tuple(weight_from_bytes(blob).shape)
                   for layer, (_, blob) in origin.items()):
                continue
            found = _points_by_hash(session, run_id, origin, matrices)
            if not found:
                found = _points_by_rounding(session, run_id, origin, matrices)
            if found:
                result.matches.extend(found)
            else:
                agreeing = _layers_matching_any_point(session, run_id, origin, matrices)
                if agreeing:
                    result.partial.append(f"layers {agreeing} match points of run {run_id}, the others match none")
    return result


def _history(session, run_id: int):
    """(seq, status, layer, sha256_after, factors) of the run's committed batches, in order."""
    return session.execute(
        select(BatchRecord.seq, BatchRecord.status, BatchRecord.id, WeightDelta.layer, WeightDelta.sha256_after)
        .join(WeightDelta, WeightDelta.batch_id == BatchRecord.id)
        .where(BatchRecord.run_id == run_id,
               BatchRecord.status.in_((BatchStatus.APPLIED, BatchStatus.ROLLED_BACK)),
               BatchRecord.finished_at.is_not(None))
        .order_by(BatchRecord.seq, BatchRecord.id, WeightDelta.layer)).all()


def _points(session, run_id: int, origin) -> list[tuple[int, str, dict[int, str]]]:
    """(seq, status, {layer: sha256}) of the origin and of every committed batch: the applied history in order,
    and each rolled-back batch on top of the applied history before it."""
    rows = _history(session, run_id)
    by_batch: dict[int, tuple[int, str, dict[int, str]]] = {}
    for seq, status, batch_id, layer, sha in rows:
        by_batch.setdefault(batch_id, (seq, str(status), {}))[2][layer] = sha
    applied = {seq: hashes for seq, status, hashes in by_batch.values() if status == BatchStatus.APPLIED}
    state = {layer: sha for layer, (sha, _) in origin.items()}
    states = {0: dict(state)}
    for seq in sorted(applied):
        state.update(applied[seq])
        states[seq] = dict(state)
    points = [(0, "origin", states[0])]
    for seq, status, hashes in by_batch.values():
        base = states.get(seq - 1)
        if base is not None:
            points.append((seq, status, {**base, **hashes}))
    return points


def _points_by_hash(session, run_id: int, origin, matrices) -> list[Match]:
    actual = {layer: weight_sha256(matrix) for layer, matrix in matrices.items()}
    return [Match(run_id, seq, status, "sha256") for seq, status, hashes in _points(session, run_id, origin)
            if hashes == actual]


def _points_by_rounding(session, run_id: int, origin, matrices) -> list[Match]:
    """Replay the applied history, rounding each point's weights to the folder's dtype (see the docstring)."""
    dtypes = {matrix.dtype for matrix in matrices.values()}
    stored = {weight_from_bytes(blob).dtype for _, blob in origin.values()}
    if len(dtypes) != 1 or dtypes == stored:
        return []
    dtype = dtypes.pop()
    actual = {layer: weight_sha256(matrix) for layer, matrix in matrices.items()}
    weights = {layer: weight_from_bytes(blob) for layer, (_, blob) in origin.items()}

    def rounded() -> dict[int, str]:
        return {layer: weight_sha256(weight.to(dtype)) for layer, weight in weights.items()}

    found = [Match(run_id, 0, "origin", "rounded")] if rounded() == actual else []
    rows = session.execute(
        select(BatchRecord.seq, WeightDelta.layer, WeightDelta.factors)
        .join(WeightDelta, WeightDelta.batch_id == BatchRecord.id)
        .where(BatchRecord.run_id == run_id, BatchRecord.status == BatchStatus.APPLIED)
        .order_by(BatchRecord.seq, WeightDelta.layer).execution_options(yield_per=8)).tuples()
    last = None
    for seq, layer, factors in rows:
        if last is not None and seq != last and rounded() == actual:
            found.append(Match(run_id, last, str(BatchStatus.APPLIED), "rounded"))
        apply_delta(weights[layer], delta_from_bytes(factors))
        last = seq
    if last is not None and rounded() == actual:
        found.append(Match(run_id, last, str(BatchStatus.APPLIED), "rounded"))
    return found


def _layers_matching_any_point(session, run_id: int, origin, matrices) -> list[int]:
    actual = {layer: weight_sha256(matrix) for layer, matrix in matrices.items()}
    seen: dict[int, set[str]] = {}
    for _, _, hashes in _points(session, run_id, origin):
        for layer, sha in hashes.items():
            seen.setdefault(layer, set()).add(sha)
    return sorted(layer for layer, sha in actual.items() if sha in seen.get(layer, set()))
