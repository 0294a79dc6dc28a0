"""CounterFact metrics: definitions (docs/math.md), aggregation per fact then over facts, coverage, retention."""

from __future__ import annotations

import dataclasses
import math

import pytest

from editing.evaluation import (PromptSetScores, counterfact_metrics, harmonic_mean, retention,
                                score_targets)
from editing.facts import Fact


def test_prompt_set_success_and_magnitude_follow_the_definitions():
    scores = PromptSetScores(nll_new=(0.5, 2.0, 1.0), nll_true=(1.0, 1.0, 1.0))
    assert scores.success(expect_new=True) == pytest.approx(1 / 3)  # a tie is not a success
    assert scores.success(expect_new=False) == pytest.approx(1 / 3)
    gaps = [math.exp(-0.5) - math.exp(-1.0), math.exp(-2.0) - math.exp(-1.0), 0.0]
    assert scores.magnitude(expect_new=True) == pytest.approx(sum(gaps) / 3)
    assert scores.magnitude(expect_new=False) == pytest.approx(-sum(gaps) / 3)
    assert PromptSetScores().success(True) is None and PromptSetScores().magnitude(False) is None


def test_s_is_the_harmonic_mean():
    assert harmonic_mean([0.5, 1.0, 0.25]) == pytest.approx(3 / (2 + 1 + 4))
    assert harmonic_mean([0.9, 0.0, 0.8]) == 0.0
    assert harmonic_mean([0.9, None, 0.8]) is None


def test_metrics_average_per_fact_then_over_facts_and_report_coverage(tiny_model, counterfact_facts):
    adapter = tiny_model("llama")
    full = counterfact_facts[0]
    second = counterfact_facts[1]
    one_paraphrase = dataclasses.replace(second, paraphrase_prompts=second.paraphrase_prompts[:1])
    bare = dataclasses.replace(counterfact_facts[2], paraphrase_prompts=(), neighborhood_prompts=())
    facts = [full, one_paraphrase, bare]
    result = counterfact_metrics(adapter, facts, batch_size=5)

    def nll(prompts, fact):
        pairs = [(p, t) for p in prompts for t in (fact.target_new, fact.target_true)]
        values = score_targets(adapter, pairs).mean_nll.tolist()
        return values[0::2], values[1::2]

    def per_fact(prompts, fact, expect_new):
        new, true = nll(prompts, fact)
        wins = [(n < t) if expect_new else (t < n) for n, t in zip(new, true)]
        return sum(wins) / len(wins)

    es = [per_fact([f.rewrite_prompt], f, True) for f in facts]
    ps = [per_fact(f.paraphrase_prompts, f, True) for f in facts[:2]]
    ns = [per_fact(f.neighborhood_prompts, f, False) for f in facts[:2]]
    assert result.es == pytest.approx(sum(es) / 3)
    assert result.ps == pytest.approx(sum(ps) / 2)
    assert result.ns == pytest.approx(sum(ns) / 2)
    assert (result.n_facts, result.n_paraphrase_facts, result.n_neighborhood_facts) == (3, 2, 2)
    assert result.s == harmonic_mean([result.es, result.ps, result.ns])
    assert [len(r.paraphrase) for r in result.facts] == [2, 1, 0]
    assert [len(r.neighborhood) for r in result.facts] == [10, 10, 0]
    new, true = nll(full.neighborhood_prompts, full)
    assert result.facts[0].nm == pytest.approx(sum(math.exp(-t) - math.exp(-n) for n, t in zip(new, true)) / 10,
                                               abs=1e-6)
    metrics = result.metrics()
    assert set(metrics) == {"es", "ps", "ns", "em", "pm", "nm", "s", "n_facts", "n_paraphrase_facts",
                            "n_neighborhood_facts", "rewrite_acc", "rephrase_acc", "locality_acc"}


def test_facts_without_paraphrases_leave_ps_undefined(tiny_model, counterfact_facts):
    bare = dataclasses.replace(counterfact_facts[0], paraphrase_prompts=())
    result = counterfact_metrics(tiny_model("gpt2"), [bare])
    assert result.ps is None and result.pm is None and result.s is None
    assert result.n_paraphrase_facts == 0
    assert "ps" not in result.metrics() and "s" not in result.metrics()


def test_retention_is_efficacy_and_paraphrase_without_neighbourhood(tiny_model, counterfact_facts):
    adapter = tiny_model("llama")
    facts = counterfact_facts[:3]
    full = counterfact_metrics(adapter, facts)
    kept = retention(adapter, facts)
    assert (kept.es, kept.ps, kept.em, kept.pm) == pytest.approx((full.es, full.ps, full.em, full.pm))
    assert kept.ns is None and kept.s is None and kept.n_neighborhood_facts == 0
    assert all(len(r.neighborhood) == 0 for r in kept.facts)


@pytest.mark.smollm
def test_known_fact_scores_one_and_its_swap_zero(smollm2_session, eiffel_fact: Fact):
    # The model believes "Paris": as an edit towards "Rome" nothing has happened yet (ES = 0) ...
    unedited = counterfact_metrics(smollm2_session, [eiffel_fact])
    assert unedited.es == 0.0 and unedited.em < -0.1
    # ... and the swapped fact (new = Paris, true = Rome) reads as a perfectly successful edit.
    swapped = dataclasses.replace(eiffel_fact, target_new="Paris", target_true="Rome")
    done = counterfact_metrics(smollm2_session, [swapped])
    assert done.es == 1.0 and done.ps == 1.0
    assert done.em == pytest.approx(-unedited.em)
    assert done.pm == pytest.approx(-unedited.pm)
    assert done.ns == pytest.approx(1.0 - unedited.ns)
    assert done.s == harmonic_mean([done.es, done.ps, done.ns])


@pytest.mark.smollm
def test_real_counterfact_facts_give_fractions_for_every_fact(smollm2_session, counterfact_facts):
    result = counterfact_metrics(smollm2_session, counterfact_facts[:4])
    assert result.n_facts == result.n_paraphrase_facts == result.n_neighborhood_facts == 4
    for value in (result.es, result.ps, result.ns, result.s):
        assert 0.0 <= value <= 1.0
    for value in (result.em, result.pm, result.nm):
        assert -1.0 <= value <= 1.0
    assert [r.fact for r in result.facts] == counterfact_facts[:4]
