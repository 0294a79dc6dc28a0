"""Uncertainty of a metric: the mean and a 95 % percentile-bootstrap interval over facts (or examples).

A study's arm scores N facts; its ES is the mean of N per-fact values, and with
N = 16 (one batch) or 32 examples per downstream task the sampling error is
±0.1 — larger than most differences between methods. The percentile bootstrap
(Efron & Tibshirani 1993, ch. 13) resamples the N units with replacement
``n_resamples`` times, recomputes the statistic on each resample, and takes the
2.5 % and 97.5 % quantiles of those values as the interval.

* :func:`bootstrap_interval` — one arm: the statistic is the mean of the
  defined values (NaN: a fact without such prompts), or any function of the
  resampled rows (S, the harmonic mean of ES, PS and NS, is recomputed from the
  three means on each resample, not averaged per fact).
* :func:`paired_difference` — two arms that scored the same facts: the facts are
  resampled *together*, so the interval is that of the difference on the shared
  facts (much narrower than two separate intervals when the arms agree fact by
  fact); the difference is *called* a difference only when 0 lies outside it.
* A downstream accuracy of ``k`` correct out of ``n`` is the mean of a 0/1
  sample, so its bootstrap needs only the counts (:func:`binary_sample`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

N_RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float | None
    low: float | None
    high: float | None
    n: int
    """Units the statistic was computed on (facts, examples)."""

    def to_dict(self) -> dict[str, float | int | None]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}

    def excludes(self, value: float) -> bool:
        return self.low is not None and self.high is not None and not self.low <= value <= self.high


def nanmean_columns(rows: np.ndarray) -> np.ndarray:
    """Column means of the defined values; NaN where a column has none."""
    defined = ~np.isnan(rows)
    counts = defined.sum(axis=0)
    totals = np.where(defined, rows, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)


def _mean_statistic(rows: np.ndarray) -> float:
    return float(nanmean_columns(rows)[0])


def harmonic_of_means(rows: np.ndarray) -> float:
    """S on a (facts × 3) sample of ES, PS, NS: the harmonic mean of the three means (0 if one is 0)."""
    means = nanmean_columns(rows)
    if np.isnan(means).any():
        return float("nan")
    if (means == 0).any():
        return 0.0
    return float(len(means) / np.sum(1.0 / means))


def _resample_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def bootstrap_interval(values: np.ndarray, statistic: Callable[[np.ndarray], float] | None = None,
                       n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """The statistic of ``values`` (n, or n × k; NaN undefined) and its percentile-bootstrap interval.

    The default statistic is the mean of the defined values of a single column. Rows that are
    entirely undefined do not count as units.
    """
    rows = np.asarray(values, dtype=float)
    rows = rows[:, None] if rows.ndim == 1 else rows
    rows = rows[~np.isnan(rows).all(axis=1)]
    statistic = statistic or _mean_statistic
    if len(rows) == 0:
        return Interval(None, None, None, 0)
    point = statistic(rows)
    replicates = np.array([statistic(rows[index]) for index in _resample_indices(len(rows), n_resamples, seed)])
    replicates = replicates[~np.isnan(replicates)]
    if np.isnan(point) or len(replicates) == 0:
        return Interval(None, None, None, len(rows))
    tail = (1 - level) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    return Interval(float(point), float(low), float(high), len(rows))


def paired_difference(a: np.ndarray, b: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = 0,
                      level: float = LEVEL) -> Interval:
    """``mean(a) − mean(b)`` over the units both define, with the paired bootstrap's interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    both = ~np.isnan(a) & ~np.isnan(b)
    return bootstrap_interval((a - b)[both], n_resamples=n_resamples, seed=seed, level=level)


def binary_sample(correct: int, total: int) -> np.ndarray:
    """A 0/1 sample with ``correct`` ones out of ``total``: what an accuracy's bootstrap resamples."""
    return np.concatenate([np.ones(correct), np.zeros(total - correct)])
