"""The bootstrap intervals against hand computations: the exact bootstrap distribution of a small sample,
enumerated resample by resample, and the paired bootstrap's defining property."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from editing.evaluation.intervals import (binary_sample, bootstrap_interval, harmonic_of_means, paired_difference)

SAMPLE = np.array([0.0, 0.0, 1.0, 1.0, 1.0])


def _exact_quantiles(sample: np.ndarray, statistic, levels: tuple[float, float]) -> tuple[float, float]:
    """Quantiles of the statistic over all n^n equally likely resamples (the bootstrap distribution the
    Monte-Carlo bootstrap approximates), by the inverted-CDF definition."""
    n = len(sample)
    values = np.sort([statistic(sample[list(index)]) for index in itertools.product(range(n), repeat=n)])
    return tuple(float(values[int(np.ceil(level * len(values))) - 1]) for level in levels)


def test_the_interval_of_a_mean_matches_the_enumerated_bootstrap_distribution():
    low, high = _exact_quantiles(SAMPLE, np.mean, (0.025, 0.975))
    assert (low, high) == (0.2, 1.0)  # by hand: P(mean ≤ 0.2) = 0.087 > 0.025 ≥ P(mean = 0) = 0.010
    interval = bootstrap_interval(SAMPLE, n_resamples=20000, seed=1)
    assert interval.mean == pytest.approx(0.6)
    assert interval.low == pytest.approx(low, abs=1e-9)
    assert interval.high == pytest.approx(high, abs=1e-9)
    assert interval.n == 5


def test_s_is_recomputed_from_the_three_means_on_each_resample():
    rows = np.array([[1, 1, 1], [1, 0.5, 0], [1, 1, 1], [0, 0.5, 1], [1, 1, 0]], dtype=float)
    def s(resample: np.ndarray) -> float:
        means = resample.mean(axis=0)
        return 0.0 if (means == 0).any() else 3 / np.sum(1 / means)
    low, high = _exact_quantiles(rows, s, (0.025, 0.975))
    interval = bootstrap_interval(rows, harmonic_of_means, n_resamples=20000, seed=2)
    assert interval.mean == pytest.approx(s(rows))
    assert interval.low == pytest.approx(low, abs=0.02) and interval.high == pytest.approx(high, abs=0.02)


def test_undefined_values_are_not_units():
    interval = bootstrap_interval(np.array([np.nan, 1.0, 0.0, np.nan]))
    assert interval.n == 2 and interval.mean == 0.5
    assert bootstrap_interval(np.array([np.nan])).mean is None


def test_a_paired_difference_is_the_bootstrap_of_the_per_fact_differences():
    rng = np.random.default_rng(0)
    a = rng.random(40)
    b = a - 0.05 + rng.normal(0, 0.01, 40)  # b is a little worse on every fact
    paired = paired_difference(a, b, seed=3)
    assert paired.mean == pytest.approx(0.05, abs=0.01)
    assert paired.excludes(0.0)  # fact by fact the difference is clear ...
    separate_a, separate_b = bootstrap_interval(a, seed=3), bootstrap_interval(b, seed=3)
    assert separate_a.low < separate_b.high  # ... though the arms' own intervals overlap
    same = paired_difference(a, a.copy())
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes(0.0)


def test_an_accuracy_resamples_its_zero_one_examples():
    sample = binary_sample(3, 5)
    assert sorted(sample.tolist()) == [0, 0, 1, 1, 1]
    assert bootstrap_interval(sample, n_resamples=20000, seed=1).low == pytest.approx(0.2)
