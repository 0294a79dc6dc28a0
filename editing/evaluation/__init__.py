"""Evaluation of an (edited) model: CounterFact metrics, retention, GE, perplexity, downstream tasks, norms.

Pure torch + transformers, everything batched. Most callers need only
:func:`evaluate` with an :class:`EvaluationConfig`; the parts are exported for
studies and tests that want one metric.
"""

from editing.evaluation.counterfact import (CounterFactScores, FactResult, PromptSetScores, counterfact_metrics,
                                            harmonic_mean, retention)
from editing.evaluation.downstream import (TASKS, TaskAccuracy, TaskExample, TaskSpec, build_examples,
                                           downstream_accuracy, load_records)
from editing.evaluation.generation import (PROBE_PROMPTS, GenerationResult, generation_entropy, greedy_generate, ngram_entropy,
                                           text_entropy, word_tokens)
from editing.evaluation.norms import LayerNorms, layer_norms
from editing.evaluation.perplexity import perplexity
from editing.evaluation.scoring import TargetScores, TokenScores, score_continuations, score_targets
from editing.evaluation.suite import EvaluationConfig, EvaluationReport, evaluate
from editing.corpus import TEXT_CORPORA, TextReader, data_dir, load_texts, sample_texts

__all__ = [
    "CounterFactScores", "FactResult", "PromptSetScores", "counterfact_metrics", "harmonic_mean", "retention",
    "TASKS", "TaskAccuracy", "TaskExample", "TaskSpec", "build_examples", "downstream_accuracy", "load_records",
    "PROBE_PROMPTS", "GenerationResult", "generation_entropy", "greedy_generate", "ngram_entropy", "text_entropy", "word_tokens",
    "LayerNorms", "layer_norms",
    "perplexity",
    "TargetScores", "TokenScores", "score_continuations", "score_targets",
    "EvaluationConfig", "EvaluationReport", "evaluate",
    "TEXT_CORPORA", "TextReader", "data_dir", "load_texts", "sample_texts",
]
