"""Few-shot downstream accuracy (SST-2, MRPC, CoLA, RTE, MMLU, NLI): the collapse detector's main signal.

Gupta et al. (2024) watch general ability during sequential editing with
balanced few-shot classification sets; a collapsed model falls to chance. As
they recommend, the answer is read from the log-probabilities of the label
words (" positive" / " negative", " A" … " D"), not parsed from generations:
the predicted label is the one whose word has the lowest mean per-token NLL
after the prompt, scored by :func:`score_targets` (one-token label words share
one row, so an example costs one forward pass whatever its number of labels,
and the demonstrations common to a task's prompts are run once per batch).

Tasks are data (:class:`TaskSpec` in :data:`TASKS`): adding one is adding an
entry. For each task the ``shots`` demonstrations are drawn once, with the
seed, from the shorter half of the file (short shots keep prompts within small
models' context and CPU budgets), one label after another so that every label
is demonstrated; they are excluded from the evaluated sample, which is drawn
with the same seed, class-balanced (labels taken in turn), and fixed for a
given (n, seed); a larger n extends a smaller n's sample.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from editing.evaluation.scoring import score_targets
from editing.data import resolve
from editing.models.adapter import ModelAdapter

SHOT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class TaskSpec:
    """One few-shot classification task.

    ``template`` is filled with a record's fields by ``str.format`` (indexing
    works: ``{choices[0]}``); a demonstration is the filled template followed by
    a space and its label word, and the evaluated prompt ends with the template.
    """

    name: str
    dataset: str
    """The dataset (``editing/data/catalog.yaml``) holding the task's records, a JSON list."""
    label_field: str
    template: str
    label_words: Mapping[Any, str]
    """Label value in the file → the word the model should continue with (without leading space)."""
    shots: int


_ENTAILMENT_TEMPLATE = "{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:"

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("sst2", "sst2", "label", "Review: {sentence}\nSentiment:",
             {1: "positive", 0: "negative"}, shots=4),
    TaskSpec("mrpc", "mrpc", "label",
             "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nDo both sentences mean the same thing? Answer:",
             {1: "yes", 0: "no"}, shots=3),
    TaskSpec("cola", "cola", "label",
             "Sentence: {sentence}\nIs this sentence grammatically correct? Answer:",
             {1: "yes", 0: "no"}, shots=6),
    # GLUE RTE: 0 = entailment, 1 = not_entailment.
    TaskSpec("rte", "rte", "label", _ENTAILMENT_TEMPLATE, {0: "True", 1: "False"}, shots=3),
    TaskSpec("mmlu", "mmlu", "answer",
             "Question: {question}\nA. {choices[0]}\nB. {choices[1]}\nC. {choices[2]}\nD. {choices[3]}\nAnswer:",
             {0: "A", 1: "B", 2: "C", 3: "D"}, shots=3),
    TaskSpec("nli", "nli", "label", _ENTAILMENT_TEMPLATE,
             {"entailment": "True", "not_entailment": "False"}, shots=3),
)}


@dataclass(frozen=True)
class TaskExample:
    """One evaluated example: the full few-shot prompt and its gold label (index into the label words)."""

    record_index: int
    prompt: str
    label: int


@dataclass(frozen=True)
class TaskAccuracy:
    """Accuracy on a task's sample and the chance level (majority-label share of that sample)."""

    task: str
    accuracy: float
    chance: float
    n: int


def load_records(spec: TaskSpec, root: str | Path | None = None) -> list[dict[str, Any]]:
    """The task's records (a JSON list), from wherever its dataset resolves (mirror, bundle, hub)."""
    return json.loads(resolve(spec.dataset, root=root).path.read_text(encoding="utf-8"))


def _round_robin(groups: list[list[int]], n: int) -> list[int]:
    """Take one index from each group in turn until ``n`` are taken or all groups are empty."""
    taken: list[int] = []
    depth = 0
    while len(taken) < n and any(depth < len(group) for group in groups):
        taken += [group[depth] for group in groups if depth < len(group)][: n - len(taken)]
        depth += 1
    return taken


def build_examples(spec: TaskSpec, records: Sequence[Mapping[str, Any]], n: int, seed: int) -> list[TaskExample]:
    """The fixed few-shot prompts of ``n`` class-balanced examples, shots excluded (see the module docstring)."""
    rng = random.Random(f"{spec.name}:{seed}")
    labels = list(spec.label_words)
    unknown = {record[spec.label_field] for record in records} - set(labels)
    if unknown:
        raise ValueError(f"{spec.name}: labels {sorted(map(str, unknown))} have no label word")
    prompts = [spec.template.format(**record) for record in records]

    by_length = sorted(range(len(records)), key=lambda i: (len(prompts[i]), i))
    short = set(by_length[: max(len(records) // 2, spec.shots)])
    shot_groups = [[i for i in sorted(short) if records[i][spec.label_field] == label] for label in labels]
    for group in shot_groups:
        rng.shuffle(group)
    shots = _round_robin(shot_groups, spec.shots)
    rng.shuffle(shots)
    context = "".join(f"{prompts[i]} {spec.label_words[records[i][spec.label_field]]}{SHOT_SEPARATOR}"
                      for i in shots)

    excluded = set(shots)
    groups = [[i for i in range(len(records)) if i not in excluded and records[i][spec.label_field] == label]
              for label in labels]
    for group in groups:
        rng.shuffle(group)
    chosen = sorted(_round_robin(groups, n))
    return [TaskExample(i, context + prompts[i], labels.index(records[i][spec.label_field])) for i in chosen]


def downstream_accuracy(adapter: ModelAdapter, tasks: Sequence[str] = tuple(TASKS), n: int = 100, seed: int = 0,
                        batch_size: int = 16, root: str | Path | None = None) -> dict[str, TaskAccuracy]:
    """Accuracy of every named task on its fixed sample of ``n`` examples."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown downstream task(s) {sorted(unknown)}; known: {sorted(TASKS)}")
    results = {}
    for name in tasks:
        spec = TASKS[name]
        examples = build_examples(spec, load_records(spec, root), n, seed)
        words = list(spec.label_words.values())
        # One call per task: its prompts share the demonstrations, which the scorer then runs once per batch.
        nll = score_targets(adapter, [(example.prompt, word) for example in examples for word in words],
                            batch_size).mean_nll.view(len(examples), len(words))
        correct = sum(int(row.argmin()) == example.label for row, example in zip(nll, examples))
        majority = max(Counter(example.label for example in examples).values())
        results[name] = TaskAccuracy(name, correct / len(examples), majority / len(examples), len(examples))
    return results
