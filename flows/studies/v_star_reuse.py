"""v* once per fact, not once per arm.

On the unedited model a fact's target ``z`` depends on the model, the last edit
layer, the v* settings, the context prefixes, the dtype it is computed in and the
fact's subject, prompt and new target — not on the objective, the batch size or
the other facts of the batch (each fact has its own δ and its own Adam state,
:mod:`editing.v_star`). An independent arm therefore asks :class:`VStarReuse` for
its batch's ``z``: what the ledger's cache holds under the same key is reused, the
rest is optimised in one batched call and kept. The keys are content hashes, so
two arms (or two processes) that share the ingredients share the entries, and an
entry can never be read for anything it was not computed for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Sequence

import torch
from sqlalchemy import Engine

from db.studies import CachedVStar, cached_v_stars, store_v_stars
from db.tensors import tensors_from_bytes, tensors_to_bytes
from editing.config import ValueParams
from editing.facts import Fact
from editing.models.adapter import ModelAdapter
from editing.v_star import VStar, compute_v_star


def _sha256(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


ADDED_VALUE_FIELDS = {"optimizer": "adam", "nll_threshold": None, "norm_anchor_scaling": False, "nas_anchor_facts": 200,
                      "mpes_rule": "first_token"}
"""v* settings added after caches were first written, with the defaults that reproduce the computation those
caches hold: a field at this value is left out of the key, so a ledger's earlier Adam entries keep their keys
(and stay valid — the Adam path is unchanged, tests/editing/test_v_star_reference.py)."""


def v_star_ingredients(adapter: ModelAdapter, layer: int, params: ValueParams, prefixes: Sequence[str],
                       autocast: torch.dtype | None) -> dict[str, Any]:
    """Everything but the fact that a v* on the unedited model depends on."""
    values = {name: value for name, value in dataclasses.asdict(params).items()
              if not (name in ADDED_VALUE_FIELDS and value == ADDED_VALUE_FIELDS[name])}
    return {"model": adapter.fingerprint, "dtype": str(adapter.model.dtype), "autocast": str(autocast),
            "layer": layer, "values": values, "prefixes": list(prefixes)}


def fact_key(ingredients_key: str, fact: Fact) -> str:
    """The cache key of ``fact`` under ``ingredients_key``: the exact texts v* reads (tokenisation is
    case-sensitive, so not :meth:`Fact.identity_key`'s normalised form)."""
    return _sha256([ingredients_key, fact.subject, fact.prompt, fact.target_new])


STORE_EVERY = 32
"""Facts optimised per call and kept at once: an arm interrupted inside a large batch's v* (B = 256 is ~25
minutes of Adam on two cores) loses at most this many optimisations, not the whole batch's."""


class VStarReuse:
    """The v* of an arm's batches, computed once per key and kept in the ledger (``v_star_cache``)."""

    def __init__(self, engine: Engine, adapter: ModelAdapter, layer: int, params: ValueParams,
                 prefixes: Sequence[str], autocast: torch.dtype | None = None, anchor: float | None = None) -> None:
        self.engine = engine
        self.adapter = adapter
        self.layer = layer
        self.params = params
        self.prefixes = tuple(prefixes)
        self.autocast = autocast
        self.anchor = anchor
        self.ingredients = v_star_ingredients(adapter, layer, params, prefixes, autocast)
        if anchor is not None:
            self.ingredients["nas_anchor"] = anchor
        self.key = _sha256(self.ingredients)
        """The arm's v* key: arms with the same one share every fact's ``z``."""

    def for_batch(self, facts: Sequence[Fact], fact_ids: Sequence[int]) -> tuple[VStar, dict[str, int]]:
        """The batch's v* in fact order, and how many were ``computed`` now and ``reused`` from the cache."""
        keys = [fact_key(self.key, fact) for fact in facts]
        found = cached_v_stars(self.engine, keys)
        missing = [i for i, key in enumerate(keys) if key not in found]
        for start in range(0, len(missing), STORE_EVERY):
            chunk = missing[start:start + STORE_EVERY]
            computed = compute_v_star(self.adapter, [facts[i] for i in chunk], self.layer, self.prefixes,
                                      self.params, autocast=self.autocast, anchor=self.anchor)
            fresh = {keys[i]: CachedVStar(keys[i], tensors_to_bytes({"z": computed.z[k], "delta": computed.delta[k]}),
                                          float(computed.initial_nll[k]), float(computed.final_nll[k]),
                                          int(computed.steps[k]), computed.stop_reasons[k])
                     for k, i in enumerate(chunk)}
            store_v_stars(self.engine, self.key, self.ingredients, [(fact_ids[i], fresh[keys[i]]) for i in chunk])
            found.update(fresh)
        entries = [found[key] for key in keys]
        tensors = [tensors_from_bytes(entry.z) for entry in entries]
        v_star = VStar(z=torch.stack([t["z"] for t in tensors]), delta=torch.stack([t["delta"] for t in tensors]),
                       initial_nll=torch.tensor([e.initial_nll for e in entries]),
                       final_nll=torch.tensor([e.final_nll for e in entries]),
                       steps=torch.tensor([e.steps for e in entries], dtype=torch.long),
                       stop_reasons=tuple(e.stop_reason for e in entries))
        return v_star, {"computed": len(missing), "reused": len(keys) - len(missing)}
