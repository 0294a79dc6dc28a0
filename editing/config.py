"""Hyperparameters as data: dataclasses filled from per-model YAML files.

``editing/hparams/<model>.yaml`` holds, for one model, a ``defaults`` section
and one section per algorithm (``rome``, ``memit``, ``emmet`` …). An edit setting
can be given in four places, and **a later one wins**:

1. the hparams file's ``defaults``;
2. its section for the algorithm;
3. the run file's ``edit_overrides`` (``seqedit run --config run.yaml``);
4. ``--set KEY=VALUE`` on the command line (and ``--layers``/``--distribution``).

Places 3 and 4 are flattened to dotted keys (:func:`flatten`) and merged by one
dict update into a run's ``edit_overrides``; :func:`load_edit_config` applies them
on top of 1–2. That is the only merge, so a run is fully described by one
JSON-serialisable :class:`EditConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from editing.typecheck import checked_fields

HPARAMS_DIR = Path(__file__).parent / "hparams"


@dataclass(frozen=True)
class ObjectiveParams:
    """Weights of the preservation–memorization objective (docs/math.md).

    ``mom2_update_weight`` is λ, the weight of the preserved keys' second moment
    ``C0``; ``update_norm_lambda`` is μ, a ridge ``μ I`` added to ``λ C0`` (ENCORE's
    norm penalty λ_n); ``emmet_lambda`` is λ_E, the ridge on EMMET's B × B system
    (used when B > 1).
    """

    mom2_update_weight: float = 15000.0
    update_norm_lambda: float = 0.0
    emmet_lambda: float = 0.1
    preserve_edits: bool = False
    """Also preserve the keys of the run's earlier edits (``C += S``, the edit memory) — what ENCORE does
    always; MEMIT and EMMET do it when this is set."""
    nullspace_threshold: float = 2e-2
    """AlphaEdit: eigenvalues of ``C0`` below this span the null space its updates are projected onto."""
    alphaedit_ridge: float = 10.0
    """AlphaEdit: ρ, the ridge of its projected system (``L2`` in the authors' configurations)."""
    lyaplock_alpha: float = 60.0
    """LyapLock: the preservation-loss budget as a multiple of the loss after the first batch (the authors'
    ``--alpha``, default 60, ``experiments/evaluate.py``)."""
    rect_keep_fraction: float | None = None
    """RECT (:mod:`editing.update_steps`): write only this fraction of each update's entries, those with the
    largest relative change ``|ΔW| / |W|``; None: write the whole update. Composable with every objective."""

    def __post_init__(self) -> None:
        if self.rect_keep_fraction is not None and not 0 < self.rect_keep_fraction <= 1:
            raise ValueError(f"objective.rect_keep_fraction must be None or in (0, 1], got {self.rect_keep_fraction}")


NORM_ANCHORS = ("residual", "mlp_output")
OPTIMIZERS = ("adam", "lbfgs")
MPES_RULES = ("first_token", "encore")
RESTRAINTS = ("prune",)
"""Values of ``EditConfig.restraint`` besides None (deliver the weights as edited)."""


@dataclass(frozen=True)
class ValueParams:
    """The v* optimisation: one residual delta per fact, minimising one loss (editing.v_star)."""

    optimizer: str = "adam"
    """How δ moves between evaluations (:mod:`editing.delta_search`): ``adam`` (the references') or
    ``lbfgs`` (quasi-Newton with a line search). Both minimise the same loss under the same clamp."""
    lr: float = 0.5
    """Adam's step; for ``lbfgs`` the first trial's per-coordinate length (its first step is as long as Adam's)."""
    steps: int = 25
    """Evaluations of the loss (forward/backward passes) a fact may take part in."""
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    weight_decay: float = 1e-3
    loss_threshold: float = 0.05
    """A fact stops optimising once its loss (NLL + KL + decay terms) falls below this (the references' rule)."""
    nll_threshold: float | None = None
    """A fact also stops once its mean target NLL alone falls below this (None: off). The KL and decay terms
    keep the whole loss above ``loss_threshold`` for most facts, so the references' rule rarely stops a
    fact before the step budget; the NLL is what decides whether the edit is written."""
    mpes_extra_steps: int | None = None
    """Most-probable early stopping (ENCORE's MPES): a fact also stops once its target's first token has
    been the argmax on all its prompts at ``1 + mpes_extra_steps`` evaluations (cumulative, as in the
    authors' ``prob_cutoff = −(k + 1)``); None turns it off."""
    mpes_rule: str = "first_token"
    """What MPES counts as "most probable": ``first_token``, the target's first token is the argmax on every
    prompt, the bare one included; ``encore``, every target token is the argmax (teacher forced) on every
    *prefixed* prompt — ENCORE's ``compute_z.py`` (scalable-model-editing/encore, lines 169-195: it drops the
    bare prompt, checks all target positions; its hard-coded ``num_correct == 5`` is this rule for one-token
    targets and 5 prefixes, counted here over all checked tokens as its EMMET code does)."""
    n_prefixes: int = 5
    """Context prefixes generated by the model (the empty prefix is always added)."""
    prefix_tokens: int = 10
    kl_prompt: str = "{} is a"
    norm_anchor: str = "residual"
    """The vector ``v_orig`` whose norm scales the clamp (``‖δ‖ ≤ clamp_norm_factor · ‖v_orig‖``) and the
    weight decay (``weight_decay · ‖δ‖ / ‖v_orig‖²``), at the last subject token of the bare prompt:

    * ``residual``: the residual stream (block output) of the last edit layer — MEMIT's ``compute_z``
      (kmeng01/memit ``memit/compute_z.py``), which EMMET's code (unified-model-editing
      ``emmet/compute_z.py``) shares;
    * ``mlp_output``: the edited MLP's output — ROME's ``compute_v`` (kmeng01/rome
      ``rome/compute_v.py``), which adds δ there.

    Adding δ to the MLP output or to the block output is the same computation (the MLP output is
    the last term added to the residual), so only this scale differs; on SmolLM2 the residual is
    ~3× the MLP output at layer 6, so the choice moves ROME's clamp by ~3× and its decay by ~9×."""
    norm_anchor_scaling: bool = False
    """NAS (SasyaTitech/NAS ``NAS/compute_z.py``, :mod:`editing.norm_anchor`): after the optimisation each
    fact's MLP-output target ``v* = v0 + δ`` is rescaled to the anchor norm ``A`` — the trimmed mean of ``‖v*‖``
    over ``nas_anchor_facts`` rewrites on the unedited model — and a fact with ``‖v*‖ > 2 A`` is not edited
    (δ = 0). It caps the norm growth of sequential edits; usable with every objective."""
    nas_anchor_facts: int = 200
    """Rewrites whose v* norms give the anchor (the first of the bundled CounterFact sample, which every
    machine has; the authors average 1,000 random MultiCounterFact rewrites)."""

    def __post_init__(self) -> None:
        if self.mpes_extra_steps is not None and self.mpes_extra_steps < 0:
            raise ValueError(f"values.mpes_extra_steps must be None or >= 0, got {self.mpes_extra_steps}")
        if self.nll_threshold is not None and self.nll_threshold <= 0:
            raise ValueError(f"values.nll_threshold must be None or > 0, got {self.nll_threshold}")
        if self.nas_anchor_facts < 1:
            raise ValueError(f"values.nas_anchor_facts must be >= 1, got {self.nas_anchor_facts}")
        if self.mpes_rule not in MPES_RULES:
            raise ValueError(f"values.mpes_rule must be one of {MPES_RULES}, got {self.mpes_rule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"values.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.norm_anchor not in NORM_ANCHORS:
            raise ValueError(f"values.norm_anchor must be one of {NORM_ANCHORS}, got {self.norm_anchor!r}")


@dataclass(frozen=True)
class StatsParams:
    """Where and how the preserved keys' second moment ``C0`` is estimated."""

    corpus: str = "wikipedia-leads"
    """A name in ``editing.corpus.TEXT_CORPORA``, a text/JSON(L) file, a saved ``datasets`` folder or hub name.
    Wikipedia leads by default: Wikipedia is what MEMIT estimated C0 on, and WikiText-2 test is
    kept apart for held-out perplexity."""
    n_samples: int = 2000
    max_tokens: int = 128
    batch_size: int = 16


@dataclass(frozen=True)
class EditConfig:
    """Everything that determines an edit, for one model and algorithm."""

    algorithm: str
    layers: tuple[int, ...]
    distribution: str = "memit_spread"
    objective: ObjectiveParams = field(default_factory=ObjectiveParams)
    values: ValueParams = field(default_factory=ValueParams)
    stats: StatsParams = field(default_factory=StatsParams)
    restraint: str | None = None
    """How the run delivers its model: None, as edited; ``prune``, with the accumulated change's large
    singular values restrained (:mod:`editing.prune`) whenever it is evaluated or exported."""

    def __post_init__(self) -> None:
        if self.restraint is not None and self.restraint not in RESTRAINTS:
            raise ValueError(f"restraint must be None or one of {RESTRAINTS}, got {self.restraint!r}")
        if not self.layers:
            raise ValueError("EditConfig.layers must name at least one layer")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"EditConfig.layers must be strictly increasing, got {list(self.layers)}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EditConfig":
        """The configuration of ``data``; an unknown key or a value of the wrong type is refused by name."""
        top = {key: value for key, value in data.items() if key not in _SECTIONS}
        checked_fields(cls, top)
        if "layers" not in data:
            raise ValueError("layers: the edit layers are not set (the hparams file or --layers names them)")
        return cls(
            algorithm=data["algorithm"],
            layers=tuple(data["layers"]),
            distribution=data.get("distribution", "memit_spread"),
            objective=_build(ObjectiveParams, data.get("objective", {}), "objective"),
            values=_build(ValueParams, data.get("values", {}), "values"),
            stats=_build(StatsParams, data.get("stats", {}), "stats"),
            restraint=data.get("restraint"),
        )

    def replace(self, **changes: Any) -> "EditConfig":
        """A copy with top-level fields or nested ``section.field`` keys changed."""
        data = self.to_dict()
        _merge(data, _nest(changes))
        return EditConfig.from_dict(data)


_SECTIONS = ("objective", "values", "stats")


def _build(kind: type, values: Mapping[str, Any], section: str) -> Any:
    if not isinstance(values, Mapping):
        raise ValueError(f"{section}: expected a mapping of {section} settings, got {values!r}")
    return kind(**checked_fields(kind, values, section))


def flatten(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"values": {"steps": 3}, "layers": [4]}`` → ``{"values.steps": 3, "layers": [4]}``: overrides in one
    form, so that merging two sets of them is a dict update in which the later set wins key by key."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in _SECTIONS and isinstance(value, Mapping):
            flat.update({f"{key}.{name}": inner for name, inner in value.items()})
        else:
            flat[key] = value
    return flat


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if "." in key:
            section, name = key.split(".", 1)
            nested.setdefault(section, {})[name] = value
        else:
            nested[key] = value
    return nested


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def layer_overrides(layers: Sequence[int], distribution: str | None = None) -> dict[str, Any]:
    """The overrides that choose the edit layers (``--layers``): a single layer is edited alone
    (``single_layer``) unless a distribution is named — spreading over one layer would be the same edit
    under another name, and ``single_layer`` is what ROME-style configurations are recorded as."""
    overrides: dict[str, Any] = {"layers": list(layers)}
    if distribution is not None or len(layers) == 1:
        overrides["distribution"] = distribution or "single_layer"
    return overrides


def hparams_file(model_key: str) -> Path:
    """The hparams file of ``model_key``: a shipped one by name (``smollm2-135m``), or a YAML file by path
    (such as the skeleton ``seqedit trace`` writes for a new model)."""
    if model_key.endswith((".yaml", ".yml")) and Path(model_key).is_file():
        return Path(model_key)
    path = HPARAMS_DIR / f"{model_key}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in HPARAMS_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no hyperparameters for model {model_key!r}; known: {known}")
    return path


def load_edit_config(model_key: str, algorithm: str, overrides: Mapping[str, Any] | None = None) -> EditConfig:
    """Merge ``defaults`` and the ``algorithm`` section of a model's YAML, then ``overrides`` (the module
    docstring states the order).

    ``overrides`` may use dotted keys (``{"values.steps": 10, "layers": [4, 5]}``) or sections.
    """
    document = yaml.safe_load(hparams_file(model_key).read_text())
    if algorithm not in document:
        raise ValueError(f"{hparams_file(model_key)} has no section for algorithm {algorithm!r}")
    data: dict[str, Any] = {"algorithm": algorithm}
    _merge(data, document.get("defaults", {}))
    _merge(data, document[algorithm])
    _merge(data, _nest(flatten(overrides or {})))
    return EditConfig.from_dict(data)


def hparams_key_for(model_name: str) -> str:
    """The hyperparameter file whose ``match`` patterns occur in ``model_name``.

    The longest matching pattern wins (``gpt-j-6b`` before ``gpt-j``). Models that match
    nothing need an explicit ``--hparams`` choice.
    """
    lowered = model_name.lower()
    best: tuple[int, str] | None = None
    for path in sorted(HPARAMS_DIR.glob("*.yaml")):
        for pattern in yaml.safe_load(path.read_text()).get("match", []):
            if pattern.lower() in lowered and (best is None or len(pattern) > best[0]):
                best = (len(pattern), path.stem)
    if best is None:
        known = sorted(p.stem for p in HPARAMS_DIR.glob("*.yaml"))
        raise ValueError(f"no hyperparameters match model {model_name!r}; choose one of {known} with --hparams")
    return best[1]
