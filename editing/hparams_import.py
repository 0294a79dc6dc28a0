"""Hyperparameter files of the reference implementations, read as they are.

A user arriving from EasyEdit (YAML), ROME/MEMIT, UME, AlphaEdit or ENCORE (JSON) has one file per method and
model. :func:`import_hparams` maps every key of such a file onto seqedit's edit settings (dotted overrides of
:class:`editing.config.EditConfig`) and refuses, by name, a key it does not know or a value it cannot express:
nothing is silently dropped. Keys that only say where the reference keeps things on disk or which GPU it uses
(``stats_dir``, ``device``, ``model_parallel``) or that restate what seqedit does anyway (``layer_selection:
all``, ``fact_token: subject_last``, the module templates of a supported family) are checked and then need no
setting.

The mapping (reference key → seqedit setting):

* ``layers`` → ``layers`` (and ``distribution``: ``single_layer`` for ROME, ``memit_spread`` for the batch methods);
* ``v_lr``, ``v_num_grad_steps``, ``v_weight_decay``, ``clamp_norm_factor``, ``kl_factor`` → ``values.lr``,
  ``values.steps``, ``values.weight_decay``, ``values.clamp_norm_factor``, ``values.kl_factor``;
* ``context_template_length_params: [[n, t]]`` → ``values.n_prefixes: n``, ``values.prefix_tokens: t``;
* ``mom2_update_weight`` → ``objective.mom2_update_weight``; ``mom2_n_samples`` → ``stats.n_samples``;
  ``mom2_dataset: wikipedia`` → ``stats.corpus: wikipedia-leads`` (seqedit's Wikipedia text);
* ``emmet_lambda`` → ``objective.emmet_lambda``; ``nullspace_threshold``, ``L2`` → ``objective.nullspace_threshold``,
  ``objective.alphaedit_ridge``; ``update_norm_lambda`` → ``objective.update_norm_lambda``;
  ``prob_cutoff: -c`` (ENCORE's most-probable early stopping) → ``values.mpes_extra_steps: c - 1`` with
  ``values.mpes_rule: encore``;
* ``v_loss_layer`` must be the model's last layer (checked by :func:`check_for_model`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from editing.models.adapter import ARCHITECTURES

ALGORITHM_NAMES = {"rome": "rome", "memit": "memit", "emmet": "emmet", "alphaedit": "alphaedit",
                   "encore": "encore", "r-rome": "rome"}
"""EasyEdit's ``alg_name`` (lower-cased) → seqedit's algorithm."""


class HparamsImportError(ValueError):
    """A key of a reference hparams file that seqedit cannot take as it is (named in the message)."""


@dataclass(frozen=True)
class ImportedHparams:
    """What a reference hparams file says, in seqedit's terms."""

    algorithm: str | None
    """From EasyEdit's ``alg_name`` (None: the file does not say; the command line's ``--algo`` decides)."""
    overrides: dict[str, Any]
    """Dotted edit overrides (``values.lr`` …), applied over seqedit's own hparams file for the model."""
    model_name: str | None = None
    loss_layer: int | None = None
    module_templates: dict[str, str] = field(default_factory=dict)


def _equal(expected: Any) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        if value != expected:
            raise HparamsImportError(f"{key}: {value!r} is not supported (seqedit does {expected!r})")
    return check


def _one_of(*allowed: Any) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        if value not in allowed:
            raise HparamsImportError(f"{key}: {value!r} is not supported (seqedit takes {', '.join(map(repr, allowed))})")
    return check


def _ignored(key: str, value: Any) -> None:
    """Where the reference keeps files or which GPU it uses: nothing to set."""


SETTINGS = {"v_lr": "values.lr", "v_num_grad_steps": "values.steps", "v_weight_decay": "values.weight_decay",
            "clamp_norm_factor": "values.clamp_norm_factor", "kl_factor": "values.kl_factor",
            "mom2_update_weight": "objective.mom2_update_weight", "mom2_n_samples": "stats.n_samples",
            "emmet_lambda": "objective.emmet_lambda", "nullspace_threshold": "objective.nullspace_threshold",
            "L2": "objective.alphaedit_ridge", "update_norm_lambda": "objective.update_norm_lambda"}
"""Keys that are one seqedit setting each, value unchanged."""

CHECKS: dict[str, Callable[[str, Any], None]] = {
    "layer_selection": _equal("all"), "fact_token": _equal("subject_last"),
    "mom2_dtype": _one_of("float32", "float64"), "mom2_dataset": _equal("wikipedia"),
    "calculate_objective_value": _one_of(False), "norm_control": _one_of(0, False),
    "stats_dir": _ignored, "device": _ignored, "model_parallel": _one_of(False), "model_name": _ignored,
    "alg_name": _ignored, "mom2_adjustment": _ignored, "add_prev_edits": _ignored, "v_loss_layer": _ignored,
    "context_template_length_params": _ignored, "prob_cutoff": _ignored, "batch_size": _ignored,
    **{name: _ignored for name in ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp",
                                   "ln_f_module", "lm_head_module")},
}


def read_file(path: str | Path) -> dict[str, Any]:
    """A reference hparams file (YAML or JSON) as a mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such hparams file")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise HparamsImportError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                                 f"({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise HparamsImportError(f"{path}: expected a mapping of hyperparameters")
    return data


def import_hparams(path: str | Path, algorithm: str | None = None) -> ImportedHparams:
    """Map reference hparams file ``path`` onto seqedit's settings (see the module docstring).

    ``algorithm`` is the method the file is for when the file does not say (the references' JSON files are
    named by folder, ``hparams/MEMIT/…``); a file that says (``alg_name``) must agree with it.
    """
    data = read_file(path)
    where = Path(path).name
    named = data.get("alg_name")
    if named is not None:
        if str(named).lower() not in ALGORITHM_NAMES:
            raise HparamsImportError(f"{where}: alg_name {named!r} is not a method seqedit runs "
                                     f"({', '.join(sorted(ALGORITHM_NAMES))})")
        named = ALGORITHM_NAMES[str(named).lower()]
        if algorithm is not None and algorithm != named and not algorithm.startswith(named):
            raise HparamsImportError(f"{where}: alg_name {data['alg_name']!r} but --algo {algorithm}")
    method = algorithm or named
    unknown = sorted(set(data) - set(SETTINGS) - set(CHECKS) - {"layers"})
    if unknown:
        raise HparamsImportError(f"{where}: unknown key(s) {', '.join(unknown)} (seqedit maps "
                                 f"{', '.join(sorted({*SETTINGS, *CHECKS, 'layers'}))})")
    overrides: dict[str, Any] = {}
    for key, value in data.items():
        try:
            if key in CHECKS:
                CHECKS[key](key, value)
            if key in SETTINGS:
                overrides[SETTINGS[key]] = _number(key, value)
        except HparamsImportError as error:
            raise HparamsImportError(f"{where}: {error}") from None
    if "layers" in data:
        layers = data["layers"]
        if not isinstance(layers, list) or not all(isinstance(layer, int) for layer in layers) or not layers:
            raise HparamsImportError(f"{where}: layers: expected a list of layer indices, got {layers!r}")
        overrides["layers"] = list(layers)
        overrides["distribution"] = "single_layer" if method == "rome" or len(layers) == 1 else "memit_spread"
    if "mom2_dataset" in data:
        overrides["stats.corpus"] = "wikipedia-leads"
    if "mom2_adjustment" in data and not data["mom2_adjustment"] and method not in ("rome", None):
        raise HparamsImportError(f"{where}: mom2_adjustment: false is ROME's only (the batch methods solve with C0)")
    if "context_template_length_params" in data:
        overrides.update(_prefixes(where, data["context_template_length_params"]))
    if "prob_cutoff" in data:
        overrides.update(_mpes(where, data["prob_cutoff"]))
    if data.get("add_prev_edits") is False and method == "encore":
        raise HparamsImportError(f"{where}: add_prev_edits: false is not ENCORE (it preserves the earlier edits)")
    templates = {key: str(data[key]) for key in ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp",
                                                  "attn_module_tmp") if key in data}
    _check_templates(where, templates)
    loss_layer = data.get("v_loss_layer")
    return ImportedHparams(method, overrides, data.get("model_name"),
                           None if loss_layer is None else int(loss_layer), templates)


def _number(key: str, value: Any) -> Any:
    """YAML 1.1 (PyYAML, EasyEdit's loader) reads ``5e-1`` as a string; the references meant a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise HparamsImportError(f"{key}: expected a number, got {value!r}") from None
    return value


def _prefixes(where: str, value: Any) -> dict[str, Any]:
    pairs = value if isinstance(value, list) else []
    if len(pairs) != 1 or not isinstance(pairs[0], list) or len(pairs[0]) != 2:
        raise HparamsImportError(f"{where}: context_template_length_params {value!r}: seqedit's prefixes have one "
                                 "length ([[count, tokens]]); prefixes of several lengths are not supported")
    tokens, count = pairs[0]  # the references' pairs are [length, count]
    return {"values.n_prefixes": int(count), "values.prefix_tokens": int(tokens)}


def _mpes(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, (int, float)) or value > -1:
        raise HparamsImportError(f"{where}: prob_cutoff {value!r}: expected -1 or below (ENCORE's early stopping)")
    return {"values.mpes_extra_steps": int(-value) - 1, "values.mpes_rule": "encore"}


def _check_templates(where: str, templates: Mapping[str, str]) -> None:
    """The module templates must be those of a family seqedit has an adapter for (it finds the modules itself)."""
    rewrite = templates.get("rewrite_module_tmp")
    if rewrite is None:
        return
    families = [spec for spec in ARCHITECTURES.values() if rewrite == f"{spec.layers}.{{}}.{spec.edited_module}"]
    if not families:
        raise HparamsImportError(f"{where}: rewrite_module_tmp {rewrite!r} is not the edited matrix of a supported "
                                 "family (seqedit edits each family's MLP output projection)")
    spec = families[0]
    expected = {"layer_module_tmp": f"{spec.layers}.{{}}", "mlp_module_tmp": f"{spec.layers}.{{}}.{spec.mlp}",
                "attn_module_tmp": f"{spec.layers}.{{}}.{spec.attention}"}
    for key, value in templates.items():
        if key in expected and value != expected[key]:
            raise HparamsImportError(f"{where}: {key} {value!r} does not match {rewrite!r}'s family "
                                     f"(expected {expected[key]!r})")


def check_for_model(imported: ImportedHparams, n_layers: int | None, where: str = "--hparams-from") -> None:
    """``v_loss_layer`` must be the model's last layer: seqedit reads v*'s loss at the output, as the references
    do with that setting."""
    if imported.loss_layer is not None and n_layers is not None and imported.loss_layer != n_layers - 1:
        raise HparamsImportError(f"{where}: v_loss_layer {imported.loss_layer} is not the model's last layer "
                                 f"({n_layers - 1}); the file is for another model")
