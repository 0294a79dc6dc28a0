"""Few-shot downstream tasks: prompt construction from the registry, sampling, accuracy by label-word scores."""

from __future__ import annotations

from collections import Counter

import pytest

from editing.evaluation import TASKS, build_examples, downstream_accuracy, load_records
from editing.evaluation.downstream import SHOT_SEPARATOR
from fixtures.data import dataset_path


def task_records(name: str) -> list[dict]:
    """The records of task ``name`` (skipped where its dataset is not available)."""
    dataset_path(TASKS[name].dataset)
    return load_records(TASKS[name])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_prompts_hold_k_shots_and_never_the_evaluated_example(name):
    spec = TASKS[name]
    records = task_records(name)
    examples = build_examples(spec, records, n=40, seed=0)
    assert len(examples) == 40
    contexts = set()
    for example in examples:
        query = spec.template.format(**records[example.record_index])
        assert example.prompt.endswith(query)
        context = example.prompt[: -len(query)]
        contexts.add(context)
        assert context.count(SHOT_SEPARATOR) == spec.shots
        assert query not in context
        assert list(spec.label_words)[example.label] == records[example.record_index][spec.label_field]
    assert len(contexts) == 1  # one fixed set of demonstrations per task
    demonstrated = Counter(shot.rsplit(" ", 1)[-1] for shot in contexts.pop().split(SHOT_SEPARATOR)[:-1])
    assert len(demonstrated) == min(spec.shots, len(spec.label_words))  # every label shown when k allows
    counts = Counter(example.label for example in examples).values()
    assert max(counts) - min(counts) <= 1  # class-balanced


def test_sample_is_fixed_by_seed():
    spec = TASKS["sst2"]
    records = task_records("sst2")
    first = build_examples(spec, records, n=20, seed=0)
    assert first == build_examples(spec, records, n=20, seed=0)
    assert first != build_examples(spec, records, n=20, seed=1)
    larger = build_examples(spec, records, n=40, seed=0)
    assert {e.record_index for e in first} < {e.record_index for e in larger}  # a larger n extends the sample


def test_accuracies_are_fractions_deterministic_with_chance_levels(tiny_model):
    for spec in TASKS.values():
        dataset_path(spec.dataset)
    adapter = tiny_model("llama")
    first = downstream_accuracy(adapter, n=4)
    assert first == downstream_accuracy(adapter, n=4)
    assert set(first) == set(TASKS)
    for name, result in first.items():
        assert 0.0 <= result.accuracy <= 1.0 and result.n == 4
        assert result.chance == pytest.approx(1 / len(TASKS[name].label_words))
    with pytest.raises(ValueError, match="unknown downstream task"):
        downstream_accuracy(adapter, tasks=["squad"], n=4)


@pytest.mark.smollm
def test_smollm2_reads_sentiment_better_than_chance(smollm2_session):
    result = downstream_accuracy(smollm2_session, tasks=["sst2"], n=16)["sst2"]
    assert result.accuracy >= 0.7 > result.chance
