"""The evaluation suite: one config, the parts it enables, flat metrics."""

from __future__ import annotations

import math

import pytest

from editing.evaluation import EvaluationConfig, evaluate

SMALL = dict(n_texts=2, max_text_tokens=32, n_downstream=2, generation_facts=1, max_new_tokens=4, batch_size=8)


def test_every_part_runs_and_reports_flat_finite_metrics(tiny_model, counterfact_facts):
    adapter = tiny_model("llama")
    facts, earlier = counterfact_facts[:2], counterfact_facts[2:4]
    config = EvaluationConfig(perplexity_corpora=("me-ppl-50",), downstream_tasks=("sst2", "cola"), **SMALL)
    report = evaluate(adapter, config, facts=facts, earlier_facts=earlier, original_weights=adapter.snapshot([1]))
    metrics = report.metrics()
    expected = {"es", "ps", "ns", "em", "pm", "nm", "s", "retention.es", "retention.ps", "ge", "ppl.me-ppl-50",
                "acc.sst2", "chance.sst2", "acc.cola", "chance.cola", "norm.w.1", "norm.dw.1"}
    assert expected <= set(metrics)
    assert "retention.ns" not in metrics
    assert all(math.isfinite(value) for value in metrics.values())
    assert metrics["norm.dw.1"] == 0.0
    assert len(report.generation.texts) == len(facts[0].generation_prompts)
    assert set(report.seconds) == {"counterfact", "retention", "generation", "wild", "norms", "perplexity",
                                   "downstream"}


def test_disabled_parts_and_parts_without_data_are_skipped(tiny_model, counterfact_facts):
    config = EvaluationConfig(generation=False, wild=False, perplexity_corpora=(), downstream_tasks=(), **SMALL)
    report = evaluate(tiny_model("gpt2"), config, facts=counterfact_facts[:1])
    assert report.counterfact is not None
    assert report.retention is None and report.generation is None and not report.norms
    assert not report.perplexity and not report.downstream
    assert set(report.seconds) == {"counterfact"}


def test_config_rejects_unknown_names_and_empty_sizes():
    with pytest.raises(ValueError, match="squad"):
        EvaluationConfig(downstream_tasks=("squad",))
    with pytest.raises(ValueError, match="n_texts"):
        EvaluationConfig(n_texts=0)
    assert EvaluationConfig(downstream_tasks=["sst2"]).downstream_tasks == ("sst2",)
