"""Is the model just loaded for a run the model that run edited?

A run records the fingerprint of the model it edited and the sha256 of every edited layer as loaded.
Every flow that loads a run's model again by the name in its settings (to resume, evaluate or export
the run) must check both before putting the ledger's weights into it: the ledger's deltas on another
model, or on the same model in another dtype, would silently be some other model than the run's. One
check, shared by those flows, so that they cannot drift apart.
"""

from __future__ import annotations

from db.runs import RunInfo
from editing.delta import weight_sha256
from editing.models import ModelAdapter


def check_run_model(run: RunInfo, adapter: ModelAdapter, error: type[Exception], *,
                    dtype: str | None = None) -> None:
    """Raise ``error`` (the caller's own exception type) unless ``adapter`` is the model ``run`` edited.

    Checked: the run's recorded model fingerprint (when it has one), then the sha256 of each edited layer
    *as loaded* (:meth:`ModelAdapter.original_weights`), not as it is now: a model the process already
    holds may be in another run's state, and is neither changed nor trusted here. ``dtype``, when given,
    is named in the message as a likely cause of differing layers (the dtype the caller loaded the model in).
    """
    cause = f" (another model, or another dtype than {dtype}?)" if dtype is not None else ""
    if run.spec.model_fingerprint and adapter.fingerprint != run.spec.model_fingerprint:
        raise error(f"run {run.id} edited a model with fingerprint {run.spec.model_fingerprint[:16]}…, "
                    f"but {adapter.name} loads as {adapter.fingerprint[:16]}…{cause}")
    original = {layer: weight_sha256(weight) for layer, weight in adapter.original_weights(run.layers).items()}
    wrong = [layer for layer in run.layers if original[layer] != run.original_sha256[layer]]
    if wrong:
        raise error(f"run {run.id}: the loaded model's layers {wrong} differ from the run's originals{cause}")
