"""The edited model out of the pipeline: a Hugging Face folder (and optionally a GGUF file) of a run's
model at any applied batch, rebuilt from the ledger and hash-verified, with its provenance.

Why rebuilt from the ledger rather than saved from memory: the ledger is the record of what a run
did. Any applied point of any run can be exported later, on another machine, by a process that
never edited anything — exactly as ``seqedit eval --seq N`` restores a point. The edited layers come
from :func:`db.replay.weights_at` (nearest checkpoint + low-rank deltas, each layer checked against
the sha256 the ledger recorded); everything else is the run's original model, loaded by the name
stored in the run's settings and checked against the run's fingerprint and original layer hashes.

Why hashed again after writing: ``weights_at`` proves what is in memory; the exported artifact is
what people use. After the files are written, the edited matrices are read back *from the files*
(safetensors, and the GGUF when asked for) and their :func:`editing.delta.weight_sha256` — of the
canonical d_out × d_in matrix, so for GPT-2's ``Conv1D`` the transposed parameter — must be the
ledger's. A folder is only put in place once that holds (it is written to a staging folder beside
``out`` first), so a failed export leaves nothing half-written behind.

What is written (``out/``):

* ``config.json``, ``generation_config.json``, ``model.safetensors`` (or shards), the tokenizer
  files: a folder that plain ``transformers.AutoModelForCausalLM.from_pretrained(out)`` and
  ``AutoTokenizer.from_pretrained(out)`` load, with no seqedit code;
* ``seqedit.json``: the provenance — run, batch, algorithm, model identity, edited layers and their
  parameter names, the ledger's sha256 of every edited layer at that batch, and the facts applied up
  to it (see :func:`build_provenance`);
* with ``fmt="gguf"``, also ``model-f32.gguf`` (Llama-architecture models only; written and read back
  by :mod:`editing.models.gguf_export`, which knows nothing of runs): float32 tensors
  under llama.cpp's names, q/k projections permuted the way llama.cpp's converter does it (and
  transformers' GGUF loader undoes), llama.cpp's hyperparameter keys and tokenizer metadata. Float32
  because it is exact: the edited matrices read back from the GGUF have the ledger's hashes too
  (for a float32 model; a bfloat16 model's values survive the round trip through float32 exactly).

For a model that is already in memory in the state of some batch (the pipeline's ``--save-model`` at
the end of a run), :func:`write_model_folder` with :func:`build_provenance` for that batch is the same
path with the same checks, without loading anything.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from sqlalchemy import Engine

from db.engine import transaction
from db.errors import BatchStateError
from db.history import applied_facts
from db.replay import expected_hashes, last_applied_seq, weights_at
from db.runs import RunInfo, get_run
from editing.delta import weight_sha256
from editing.models import DEFAULT_MODEL, ModelAdapter
from editing.models.gguf_export import GgufExportError, GgufPlan, plan_gguf
from editing.prune import delivered_model
from flows.model_session import ModelSession
from flows.run_model import check_run_model
from flows.settings import RunSettings

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "gguf")
"""``safetensors``: the Hugging Face folder; ``gguf``: the folder and a float32 GGUF file in it."""
PROVENANCE_FILE = "seqedit.json"
PROVENANCE_FORMAT = "seqedit.model-export/1"
GGUF_FILE = "model-f32.gguf"
HASH_CONVENTION = ("editing.delta.weight_sha256: sha256 of the text '<torch dtype>|<shape tuple>|' (e.g. "
                   "'torch.float32|(576, 1536)|') followed by the raw bytes, in C order, of the edited matrix in "
                   "canonical d_out x d_in orientation (GPT-2 Conv1D: the transposed parameter)")
"""How ``layer_sha256`` is computed, written into every provenance file so that it can be checked without seqedit."""

_EXPORT_FILE_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.gguf", "*.bin", "*.bin.index.json",
                         "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                         "added_tokens.json", "vocab.json", "merges.txt", "chat_template.*", PROVENANCE_FILE)
"""Files a model export writes, or that would make a loader pick up stale weights: with ``force`` these
(and only these) are removed from ``out`` before the new export is moved in."""


class ExportError(ValueError):
    """The export cannot be done as asked (occupied folder, unsupported format, wrong model...).

    The one error an export raises for what it refuses: a :class:`GgufExportError` of the GGUF writer
    is re-raised as one (with the same message, and the original as its cause)."""


# -- the whole export ------------------------------------------------------------------------------------------

def export_model(engine: Engine, run_id: int, seq: int | None, out: str | os.PathLike[str],
                 fmt: str = "safetensors", force: bool = False) -> Path:
    """Write run ``run_id``'s model after applied batch ``seq`` (None: its last) into folder ``out``.

    Cheap checks come first (folder, format, run, batch: :class:`db.errors.RunNotFoundError`,
    :class:`db.errors.BatchStateError` for a rolled-back or nonexistent batch), then the ledger's
    weights are replayed and verified, and only then is the model loaded. Returns the folder.
    """
    out = Path(out)
    check_format(fmt)
    check_out_folder(out, force)
    run = get_run(engine, run_id)
    seq = last_applied_seq(engine, run_id) if seq is None else seq
    weights = weights_at(engine, run_id, seq)
    provenance = build_provenance(engine, run_id, seq)
    restraint = run.spec.hyperparameters.get("edit", {}).get("restraint")
    with run_model(run, weights) as adapter:
        layers = sorted(weights)
        with delivered_model(adapter, restraint, adapter.original_weights(layers), layers):
            folder = write_model_folder(adapter, out, delivered_provenance(adapter, provenance, restraint),
                                        fmt=fmt, force=force)
    log.info("exported run %d at batch %d to %s", run_id, seq, folder)
    return folder


def run_settings(run: RunInfo) -> RunSettings:
    """The settings the run was created with (where its model's name is)."""
    stored = run.spec.hyperparameters.get("settings")
    if not isinstance(stored, Mapping):
        raise ExportError(f"run {run.id} records no run settings, so the model it edited cannot be loaded by name")
    return RunSettings.recorded(stored)


@contextmanager
def run_model(run: RunInfo, weights: Mapping[int, torch.Tensor]) -> Iterator[ModelAdapter]:
    """The run's model with its edited layers set to ``weights`` (from :func:`db.replay.weights_at`).

    Loaded as :func:`flows.run_state.open_run_context` does (the process's :class:`ModelSession`
    for the run's model, checked against the run's fingerprint and original layer hashes), without an
    editor: an export needs no statistics. A model this process already holds for the run's runtime is
    reused and put back as it was afterwards; otherwise it is loaded on the CPU in the run's dtype (the
    dtype the ledger's hashes are of).
    """
    settings = run_settings(run)
    runtime = settings.runtime
    if runtime.dtype == "auto":  # runs recorded before the resolved dtype was stored: the ledger's dtype
        ledger_dtype = next(iter(weights.values())).dtype if weights else torch.float32
        runtime = dataclasses.replace(runtime, dtype=str(ledger_dtype).removeprefix("torch."))
    session = (ModelSession.loaded(settings.model, runtime)
               or ModelSession.get(settings.model, dataclasses.replace(runtime, device="cpu", device_map=None)))
    adapter = session.adapter
    check_run_model(run, adapter, ExportError, dtype=runtime.dtype)
    before = adapter.snapshot(adapter.touched_layers())
    session.load_state(dict(weights))
    try:
        yield adapter
    finally:
        session.load_state({})
        adapter.restore(before)


# -- provenance --------------------------------------------------------------------------------------------------

def build_provenance(engine: Engine, run_id: int, seq: int) -> dict[str, Any]:
    """What the exported model is, from the ledger alone: run, batch, algorithm, model identity, the edited
    layers with the sha256 the ledger recorded for each at batch ``seq``, and the facts of batches
    ``1..seq`` in edit order. JSON-serialisable; :func:`write_model_folder` adds the files and parameter
    names and writes it as ``seqedit.json``."""
    run = get_run(engine, run_id)
    head = last_applied_seq(engine, run_id)
    if not 0 <= seq <= head:
        raise BatchStateError(f"run {run_id} has no applied batch {seq}: its applied history is batches 1..{head} "
                              "(rolled-back and failed batches cannot be exported)")
    settings = run_settings(run)
    with transaction(engine) as session:
        hashes = expected_hashes(session, run_id, seq)
    facts = [{"fact_id": fact_id, "case_id": fact.case_id, "subject": fact.subject, "prompt": fact.prompt,
              "relation_id": fact.relation_id, "target_new": fact.target_new, "target_true": fact.target_true}
             for fact_id, fact in applied_facts(engine, run_id, before_seq=seq + 1)]
    spec = run.spec
    return {
        "format": PROVENANCE_FORMAT,
        "run_id": run.id,
        "run_name": spec.name,
        "run_status": getattr(run.status, "value", str(run.status)),
        "seq": seq,
        "last_applied_seq": head,
        "algorithm": spec.algorithm,
        "distribution": spec.distribution,
        "model": {"name": spec.model_name, "source": settings.model or DEFAULT_MODEL,
                  "fingerprint": spec.model_fingerprint, "revision": spec.model_revision,
                  "dtype": settings.runtime.dtype},
        "edited_layers": sorted(run.original_sha256),
        "hash": HASH_CONVENTION,
        "layer_sha256": {str(layer): hashes[layer] for layer in sorted(hashes)},
        "original_sha256": {str(layer): sha for layer, sha in sorted(run.original_sha256.items())},
        "n_facts": len(facts),
        "facts": facts,
    }


# -- writing a model that is in memory ---------------------------------------------------------------------------

def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")


def check_out_folder(out: Path, force: bool) -> None:
    """Refuse an ``out`` that is a file, or a non-empty folder unless ``force``."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} is not empty; choose an empty or new folder, or pass --force to replace "
                          "the model files in it")


def delivered_provenance(adapter: ModelAdapter, provenance: Mapping[str, Any], restraint: str | None) -> dict[str, Any]:
    """``provenance`` for the model as delivered, whose files the export checks against ``delivered_sha256``
    when the matrices written differ from those the ledger's ``layer_sha256`` describe (which stay): for
    a restrained run (PRUNE) the restrained matrices, for a low-precision model the float32 masters
    rounded to its dtype (``stored_dtype``); otherwise the ledger's hashes are the files' own."""
    layers = sorted(int(layer) for layer in provenance["layer_sha256"])
    masters = [layer for layer in layers if adapter.has_master(layer)]
    if restraint is None and not masters:
        return dict(provenance)
    delivered: dict[str, Any] = {
        **provenance, "delivered_sha256": {str(layer): sha for layer, sha in adapter.stored_sha256(layers).items()}}
    if restraint is not None:
        delivered["restraint"] = restraint
    if masters:
        delivered["stored_dtype"] = str(adapter.stored_weight(masters[0]).dtype).removeprefix("torch.")
    return delivered


def write_model_folder(adapter: ModelAdapter, out: str | os.PathLike[str], provenance: Mapping[str, Any], *,
                       fmt: str = "safetensors", force: bool = False) -> Path:
    """Write ``adapter``'s model *as it is now* into ``out`` with ``provenance`` (:func:`build_provenance`).

    The model must be in the state the provenance describes: its edited matrices are hashed before
    anything is written and read back from the written files afterwards, and both must give the
    ledger's ``layer_sha256``. Written to a staging folder beside ``out`` and moved in at the end;
    with ``force``, earlier model files in ``out`` are replaced (other files are left alone).
    """
    out = Path(out)
    check_format(fmt)
    check_out_folder(out, force)
    expected = {int(layer): sha for layer, sha in
                provenance.get("delivered_sha256", provenance["layer_sha256"]).items()}
    in_memory = adapter.stored_sha256(sorted(expected))
    wrong = [layer for layer in sorted(expected) if in_memory[layer] != expected[layer]]
    if wrong:
        raise ExportError(f"the model in memory is not run {provenance['run_id']}'s state at batch "
                          f"{provenance['seq']}: layers {wrong} differ from the ledger's hashes")
    gguf_plan = _plan_gguf(adapter, provenance) if fmt == "gguf" else None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:12]}"
    staging.mkdir()  # not mkdtemp: its 0700 mode would become the exported folder's
    try:
        adapter.model.save_pretrained(staging)
        adapter.tokenizer.save_pretrained(staging)
        _verify_safetensors(staging, adapter, expected)
        files: dict[str, Any] = {"weights": sorted(path.name for path in staging.glob("*.safetensors"))}
        if gguf_plan is not None:
            with _gguf_errors():
                gguf_plan.write(staging / GGUF_FILE, staging)
                gguf_plan.verify(staging / GGUF_FILE, expected)
            files["gguf"] = GGUF_FILE
        record = {**provenance,
                  "parameters": {str(layer): _parameter_name(adapter, layer) for layer in sorted(expected)},
                  "files": files,
                  "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (staging / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        _give_ordinary_modes(staging)
        _install(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _parameter_name(adapter: ModelAdapter, layer: int) -> str:
    """The state-dict name of layer ``layer``'s edited matrix (the parameter, stored as the model stores it)."""
    return f"{adapter.spec.layers}.{layer}.{adapter.spec.edited_module}.weight"


def _verify_safetensors(folder: Path, adapter: ModelAdapter, expected: Mapping[int, str]) -> None:
    """Read the edited matrices back from the written safetensors and compare their hashes with the ledger's."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        single = folder / "model.safetensors"
        if not single.exists():
            raise ExportError(f"save_pretrained wrote no safetensors weights into {folder}")
        with safe_open(single, framework="pt") as handle:
            weight_map = {key: single.name for key in handle.keys()}
    for layer, sha in expected.items():
        name = _parameter_name(adapter, layer)
        if name not in weight_map:
            raise ExportError(f"the written weights have no {name}")
        with safe_open(folder / weight_map[name], framework="pt") as handle:
            tensor = handle.get_tensor(name)
        canonical = tensor.T if adapter.spec.transposed else tensor
        if weight_sha256(canonical) != sha:
            raise ExportError(f"layer {layer} as written to {weight_map[name]} has sha256 {weight_sha256(canonical)}, "
                              f"the ledger recorded {sha}")


def _give_ordinary_modes(folder: Path) -> None:
    """Every file the mode a new file gets under this process's umask (0644 usually): ``save_pretrained``
    writes the weights through a private temporary file (0600), which would leave the exported
    ``model.safetensors`` unreadable to the other users of a deployment."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def _install(staging: Path, out: Path) -> None:
    """Move the staged export into ``out`` (replacing earlier export files there, see :data:`_EXPORT_FILE_PATTERNS`)."""
    if not out.exists():
        staging.rename(out)
        return
    for pattern in _EXPORT_FILE_PATTERNS:
        for stale in out.glob(pattern):
            if stale.is_file() or stale.is_symlink():
                stale.unlink()
    for item in staging.iterdir():
        target = out / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()


# -- GGUF (written by editing.models.gguf_export) ----------------------------------------------------------------

def _plan_gguf(adapter: ModelAdapter, provenance: Mapping[str, Any]) -> GgufPlan:
    """The GGUF of ``adapter``'s model, planned (or refused) before anything is written: tokenizer metadata
    from the GGUF the run's model came from, if it came from one, and the provenance embedded in the file."""
    model = provenance["model"]
    name = f"{Path(str(model['name'])).name} seqedit run {provenance['run_id']} batch {provenance['seq']}"
    with _gguf_errors():
        return plan_gguf(adapter, source=model["source"], name=name, provenance=provenance)


@contextmanager
def _gguf_errors() -> Iterator[None]:
    """A :class:`GgufExportError` as an :class:`ExportError` with the same message (see there)."""
    try:
        yield
    except GgufExportError as error:
        raise ExportError(*error.args) from error
