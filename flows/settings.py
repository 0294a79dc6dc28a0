"""Run settings as data: one dataclass describes a sequential-editing run.

A run's settings are stored with the run in the ledger (``runs.hyperparameters``),
so resuming, re-evaluating or serving a run needs nothing but its id. They can
be written as YAML (``seqedit run --config run.yaml``) and overridden from the
command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from editing.config import EditConfig, hparams_key_for, load_edit_config
from editing.data import Sample
from editing.evaluation import EvaluationConfig
from editing.models.loading import DEFAULT_MODEL
from editing.objectives import get_objective
from editing.runtime import Runtime
from editing.typecheck import checked_fields
from flows.collapse import CollapsePolicy

EVALUATION_PROFILES: dict[str, dict[str, Any]] = {
    "quick": {"n_texts": 12, "max_text_tokens": 128, "n_downstream": 16, "downstream_tasks": ["sst2", "cola"],
              "perplexity_corpora": ["wikitext-2-test", "me-ppl-50"], "generation_facts": 2, "max_new_tokens": 40},
    "standard": {"n_texts": 40, "n_downstream": 60, "generation_facts": 5, "max_new_tokens": 60},
    "paper": {"n_texts": 100, "n_downstream": 200, "generation_facts": 10, "max_new_tokens": 100},
}
"""Evaluation sizes: ``quick`` for tests and the demo (seconds on a CPU), ``standard`` for CPU studies,
``paper`` for the collapse paper's protocol (~200 examples per task) on a GPU."""


@dataclass(frozen=True)
class RunSettings:
    """Everything a sequential-editing run is asked to do."""

    algorithm: str = "emmet"
    model: str | None = None
    """Hugging Face name, local folder or GGUF file; None is the embedded SmolLM2-135M."""
    hparams: str | None = None
    """Hyperparameter set (``editing/hparams/<name>.yaml``); matched to the model when None."""
    edit_overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted overrides of the edit configuration (``layers``, ``distribution``, ``values.steps`` ...)."""
    batch_size: int = 16
    eval_every: int = 2
    """Evaluate after every ``eval_every``-th batch (and before the first); 0 disables evaluation."""
    checkpoint_every: int = 10
    limit: int | None = None
    """Most facts the run edits in total (across resumes); None edits all it can claim."""
    fact_pool: str = "shared"
    """``shared``: each pending fact is edited once by whichever run claims it (bulk updates);
    ``private``: the run edits every fact of its source, whatever other runs did (studies)."""
    fact_source: str | None = None
    evaluation_profile: str = "standard"
    evaluation_overrides: dict[str, Any] = field(default_factory=dict)
    retention_sample: int | None = 64
    """Earlier edits re-checked at each evaluation: a fixed, seeded sample of this many (None: all)."""
    eval_mode: str = "inline"
    """``inline``: the editing loop evaluates each point itself; ``async``: each point is a flow run of the
    ``eval_deployment`` on a Prefect work pool and editing goes on (see :mod:`flows.async_evaluation`)."""
    eval_deployment: str = "evaluate/seqedit-evaluate"
    """The ``evaluate`` deployment asynchronous points are submitted to (``seqedit deploy-evaluator`` makes it)."""
    eval_lease_s: float = 120.0
    """A worker renews its claim on a point this often (÷3); a claim not renewed for this long is taken over."""
    eval_max_attempts: int = 3
    """Claims of one point before the run gives up on it (an evaluation that keeps failing is a bug)."""
    eval_wait_s: float = 3600.0
    """At the end of a run, how long to wait for the asynchronous points still out."""
    health_checks: bool = True
    """After every batch, a cheap health check (norms, v* convergence, a small perplexity probe; see
    :mod:`editing.evaluation.health`) recorded and checked by the collapse rules, so a disabling edit is
    caught at the batch that made it, not at the next evaluation point."""
    collapse: CollapsePolicy = field(default_factory=CollapsePolicy)
    save_model: str | None = None
    """Folder where the edited model is written when the run stops: the same Hugging Face folder, checks
    and ``seqedit.json`` provenance as ``seqedit export-model`` (:func:`flows.model_export.write_model_folder`)."""
    name: str | None = None
    runtime: Runtime = field(default_factory=Runtime)
    """Device, dtypes and threads (see :class:`editing.runtime.Runtime`); a new run records its model
    dtype resolved (``auto`` → ``float32``/``bfloat16``) so that resuming elsewhere loads the same weights."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        get_objective(self.algorithm).check_batch_size(self.batch_size)
        if self.eval_every < 0 or self.checkpoint_every < 1:
            raise ValueError("eval_every must be >= 0 and checkpoint_every >= 1")
        if self.eval_mode not in ("inline", "async"):
            raise ValueError(f"eval_mode must be 'inline' or 'async', got {self.eval_mode!r}")
        if self.eval_lease_s <= 0 or self.eval_max_attempts < 1 or self.eval_wait_s < 0:
            raise ValueError("eval_lease_s must be > 0, eval_max_attempts >= 1 and eval_wait_s >= 0")
        if self.fact_pool not in ("shared", "private"):
            raise ValueError(f"fact_pool must be 'shared' or 'private', got {self.fact_pool!r}")
        if self.fact_pool == "private" and not self.fact_source:
            raise ValueError("fact_pool 'private' needs fact_source: the source whose facts the run edits")
        if self.evaluation_profile not in EVALUATION_PROFILES:
            raise ValueError(f"unknown evaluation profile {self.evaluation_profile!r}; "
                             f"known: {sorted(EVALUATION_PROFILES)}")
        self.evaluation_config()  # validates the overrides
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1 (a run edits something), got {self.limit}")

    def evaluation_config(self) -> EvaluationConfig:
        values = {**EVALUATION_PROFILES[self.evaluation_profile], **self.evaluation_overrides}
        return EvaluationConfig(**checked_fields(EvaluationConfig, values, "evaluation"))

    def edit_config(self, model_name: str | None = None) -> EditConfig:
        """The edit configuration: the hparams file's defaults and algorithm section, then ``edit_overrides``
        (see :func:`editing.config.load_edit_config`); every override's key and type is checked here, which is
        how a new run's settings are validated before anything starts. ``model_name`` (default: the
        settings' model) picks the hparams file when ``hparams`` is not set. (A recorded run keeps the
        configuration it resolved, ``runs.hyperparameters["edit"]``: use that for an existing run.)"""
        name = model_name or self.model or DEFAULT_MODEL
        return load_edit_config(self.hparams or hparams_key_for(name), self.algorithm, self.edit_overrides)

    def required_datasets(self, edit: EditConfig | None = None) -> list[tuple[str, Sample | None]]:
        """Every named dataset the run reads, with the sample it reads of each: the C0 text (of ``edit``,
        default :meth:`edit_config`), the perplexity corpora, the downstream tasks and the health check's
        probe — so a command can resolve them all (mirror → bundle → hub, downloading once where it must)
        before it starts anything."""
        from editing.corpus import TEXT_CORPORA
        from editing.evaluation import TASKS
        from editing.evaluation.health import PROBE_CORPUS, HealthProbe
        from editing.stats import SAMPLE_SEED

        stats = (edit or self.edit_config()).stats
        needed: list[tuple[str, Sample | None]] = []
        if stats.corpus in TEXT_CORPORA:
            needed.append((stats.corpus, Sample(stats.n_samples, SAMPLE_SEED)))
        if self.eval_every:
            evaluation = self.evaluation_config()
            needed += [(corpus, Sample(evaluation.n_texts, evaluation.seed)) for corpus in evaluation.perplexity_corpora]
            needed += [(TASKS[task].dataset, None) for task in evaluation.downstream_tasks]
        if self.health_checks:
            probe = HealthProbe()
            needed.append((PROBE_CORPUS, Sample(probe.n_texts, probe.seed)))
        return list(dict.fromkeys(needed))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["collapse"] = self.collapse.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunSettings":
        values = checked_fields(cls, data)
        if "collapse" in values and not isinstance(values["collapse"], CollapsePolicy):
            values["collapse"] = CollapsePolicy.from_dict(values["collapse"])
        if "runtime" in values and not isinstance(values["runtime"], Runtime):
            values["runtime"] = Runtime(**checked_fields(Runtime, values["runtime"], "runtime"))
        return cls(**values)

    @classmethod
    def recorded(cls, data: Mapping[str, Any]) -> "RunSettings":
        """The settings a run was created with, as its ledger row stores them. A run recorded before
        ``runtime.float32_master`` existed added each rounded ``ΔW`` to its low-precision weights, and its
        hashes are of those weights: it resumes, evaluates and exports the same way (no master), not with
        today's default."""
        runtime = data.get("runtime")
        if isinstance(runtime, Mapping) and "float32_master" not in runtime:
            data = {**data, "runtime": {**runtime, "float32_master": False}}
        return cls.from_dict(data)

    @classmethod
    def from_yaml(cls, path: Path, overrides: Mapping[str, Any] | None = None) -> "RunSettings":
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.from_dict({**data, **(overrides or {})})
