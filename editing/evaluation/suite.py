"""The evaluation suite: one configuration, one call, one report with flat metrics.

A sequential-editing run evaluates the model every few batches. The caller
passes *data* (the facts just edited, the facts edited before, the original
matrices) and one :class:`EvaluationConfig` saying which parts run and how
big they are; :func:`evaluate` returns an :class:`EvaluationReport` whose
:meth:`~EvaluationReport.metrics` is the ``name → value`` table the ledger
stores in long format and the collapse detector reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from editing.evaluation.counterfact import CounterFactScores, counterfact_metrics, retention
from editing.evaluation.downstream import TASKS, TaskAccuracy, downstream_accuracy
from editing.evaluation.generation import GenerationResult, generation_entropy
from editing.evaluation.norms import LayerNorms, layer_norms
from editing.evaluation.perplexity import perplexity
from editing.evaluation.wild import WildScores, wild_accuracy
from editing.corpus import TEXT_CORPORA, load_texts
from editing.facts import Fact
from editing.models.adapter import ModelAdapter


@dataclass(frozen=True)
class EvaluationConfig:
    """Which parts of the suite run and on how much data. Defaults follow the collapse paper's protocol,
    scaled to what a CPU evaluates in minutes; tests shrink the sample sizes."""

    counterfact: bool = True
    """ES/PS/NS/EM/PM/NM/S on the facts being evaluated (usually the batch just edited)."""
    retention: bool = True
    """ES/PS of the facts edited earlier in the run."""
    generation: bool = True
    """GE on the generation prompts of the first ``generation_facts`` facts."""
    wild: bool = True
    """Answers without teacher forcing (:mod:`editing.evaluation.wild`) on the facts' rewrite and rephrase
    prompts: ``wild.rewrite``, ``wild.rephrase``."""
    wild_max_new_tokens: int = 16
    """Tokens generated per WILD prompt: enough for a short answer and the line break or full stop after it."""
    norms: bool = True
    """‖W‖ and ‖W − W0‖ of the edited layers (needs the original matrices)."""
    perplexity_corpora: tuple[str, ...] = ("wikitext-2-test", "me-ppl-50")
    """Names from ``TEXT_CORPORA``; empty to skip perplexity."""
    downstream_tasks: tuple[str, ...] = tuple(TASKS)
    """Names from ``TASKS``; empty to skip the few-shot tasks."""
    n_texts: int = 50
    """Texts sampled from each perplexity corpus."""
    max_text_tokens: int = 256
    n_downstream: int = 100
    """Evaluated examples per downstream task."""
    generation_facts: int = 10
    max_new_tokens: int = 100
    seed: int = 0
    batch_size: int = 16
    """Rows per forward pass when scoring whole sequences."""
    generation_batch_size: int = 64
    """Rows per greedy-generation batch: a decoding step is one token per row, so it affords more rows."""
    data_dir: str | None = None
    """Shared data folder; None means ``$SEQEDIT_DATA`` or the folder beside the project."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "perplexity_corpora", tuple(self.perplexity_corpora))
        object.__setattr__(self, "downstream_tasks", tuple(self.downstream_tasks))
        unknown = (set(self.perplexity_corpora) - set(TEXT_CORPORA)) | (set(self.downstream_tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown corpora/tasks {sorted(unknown)}; corpora: {sorted(TEXT_CORPORA)}, "
                             f"tasks: {sorted(TASKS)}")
        for name in ("n_texts", "max_text_tokens", "n_downstream", "generation_facts", "max_new_tokens",
                     "batch_size", "generation_batch_size", "wild_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvaluationConfig.{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class EvaluationReport:
    """Everything one evaluation measured; parts that did not run are None or empty."""

    counterfact: CounterFactScores | None = None
    retention: CounterFactScores | None = None
    generation: GenerationResult | None = None
    wild: WildScores | None = None
    perplexity: dict[str, float] = field(default_factory=dict)
    downstream: dict[str, TaskAccuracy] = field(default_factory=dict)
    norms: dict[int, LayerNorms] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each part, to choose an evaluation cadence the run can afford."""

    def metrics(self) -> dict[str, float]:
        """Flat ``name → value``: ``es`` … ``s``, the token accuracies (``rewrite_acc`` …), ``retention.es``,
        ``ge``, ``wild.rewrite``/``wild.rephrase``, ``ppl.<corpus>``,
        ``acc.<task>``, ``chance.<task>``, ``norm.w.<layer>``, ``norm.dw.<layer>``, and the time of
        each part, ``seconds.<part>``, with ``seconds_per_fact.<part>`` for the parts that score facts."""
        values: dict[str, float] = {}
        if self.counterfact is not None:
            values.update(self.counterfact.metrics())
        if self.retention is not None:
            values.update(self.retention.metrics(prefix="retention."))
        if self.generation is not None and self.generation.ge is not None:
            values["ge"] = self.generation.ge
        if self.wild is not None:
            values.update(self.wild.metrics())
        values.update({f"ppl.{corpus}": value for corpus, value in self.perplexity.items()})
        for task, result in self.downstream.items():
            values[f"acc.{task}"] = result.accuracy
            values[f"chance.{task}"] = result.chance
        for layer, norms in self.norms.items():
            values[f"norm.w.{layer}"] = norms.weight
            values[f"norm.dw.{layer}"] = norms.delta
        for part, seconds in self.seconds.items():
            values[f"seconds.{part}"] = seconds
        for part, scores in (("counterfact", self.counterfact), ("retention", self.retention)):
            if scores is not None and scores.n_facts and part in self.seconds:
                values[f"seconds_per_fact.{part}"] = self.seconds[part] / scores.n_facts
        return values


def evaluate(adapter: ModelAdapter, config: EvaluationConfig, facts: Sequence[Fact] = (),
             earlier_facts: Sequence[Fact] = (),
             original_weights: Mapping[int, torch.Tensor] | None = None,
             generation_prompts: Sequence[str] | None = None) -> EvaluationReport:
    """Run the parts of the suite that ``config`` enables and the given data allows.

    ``facts`` feed the CounterFact metrics and, unless ``generation_prompts`` are given, GE;
    ``earlier_facts`` retention; ``original_weights`` (layer → W0) the norms. A part without
    its data is skipped.
    """
    parts: dict[str, object] = {}
    seconds: dict[str, float] = {}

    def timed(name: str, compute: Callable[[], object]) -> None:
        start = time.perf_counter()
        parts[name] = compute()
        seconds[name] = time.perf_counter() - start

    size = config.batch_size
    if config.counterfact and facts:
        timed("counterfact", lambda: counterfact_metrics(adapter, facts, size))
    if config.retention and earlier_facts:
        timed("retention", lambda: retention(adapter, earlier_facts, size))
    prompts = list(generation_prompts) if generation_prompts is not None else [
        prompt for fact in facts[:config.generation_facts] for prompt in fact.generation_prompts]
    if config.generation and prompts:
        timed("generation", lambda: generation_entropy(adapter, prompts, config.max_new_tokens,
                                                       config.generation_batch_size))
    if config.wild and facts:
        timed("wild", lambda: wild_accuracy(adapter, facts, config.wild_max_new_tokens, config.generation_batch_size))
    if config.norms and original_weights:
        timed("norms", lambda: layer_norms(adapter, original_weights))
    if config.perplexity_corpora:
        timed("perplexity", lambda: {
            corpus: perplexity(adapter, load_texts(corpus, config.n_texts, config.seed, config.data_dir),
                               config.max_text_tokens, size)
            for corpus in config.perplexity_corpora})
    if config.downstream_tasks:
        timed("downstream", lambda: downstream_accuracy(adapter, config.downstream_tasks, config.n_downstream,
                                                        config.seed, size, config.data_dir))
    return EvaluationReport(seconds=seconds, **parts)  # type: ignore[arg-type]
