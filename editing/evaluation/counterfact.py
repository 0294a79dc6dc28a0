"""CounterFact metrics (docs/math.md, "CounterFact metrics"): ES, PS, NS, EM, PM, NM and S.

A target's probability is compared through its mean per-token negative
log-likelihood after the prompt (lower NLL = more probable); magnitudes are
differences of ``exp(−NLL)``, the per-token geometric-mean probability.

* ES / EM on the rewrite prompt: ``target_new`` should beat ``target_true``.
* PS / PM on the paraphrase prompts: the same, averaged over a fact's prompts,
  then over the facts that have paraphrase prompts.
* NS / NM on the neighbourhood prompts (other subjects sharing the true
  object): ``target_true`` should still beat ``target_new``; averaged likewise.
* S: harmonic mean of ES, PS and NS (undefined when one of them is).
* Token accuracies (MEMIT's and AlphaEdit's zsRE metrics; EasyEdit's rewrite/rephrase accuracy): the share
  of a target's tokens that are the argmax under teacher forcing — ``rewrite_acc`` and ``rephrase_acc`` of
  ``target_new``, ``locality_acc`` of the neighbourhood answer (zsRE's ``loc_ans``; ``target_true`` for
  CounterFact) on the neighbourhood prompts. They come from the same scoring pass as the probabilities.

The neighbourhood prompts are scored against :attr:`Fact.locality_target`: ``target_true`` for
CounterFact, the record's own answer where it has one (zsRE, EasyEdit's ``locality_ground_truth``).

Every prompt of every fact is scored in one batched :func:`score_targets`
call. Per-fact results are kept because retention, audits and the ledger need
to know *which* edits hold, not only how many.

Retention of earlier edits is the same computation on a different fact list
(:func:`retention`), not a second implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from editing.evaluation.scoring import score_targets
from editing.facts import Fact
from editing.models.adapter import ModelAdapter


@dataclass(frozen=True)
class PromptSetScores:
    """Mean per-token NLLs of ``target_new`` and ``target_true`` on each prompt of one kind."""

    nll_new: tuple[float, ...] = ()
    nll_true: tuple[float, ...] = ()
    acc_new: tuple[float, ...] = ()
    """Token accuracy of ``target_new`` on each prompt."""
    acc_true: tuple[float, ...] = ()
    """Token accuracy of the other target (``target_true``, or the locality answer on neighbourhood prompts)."""

    def __len__(self) -> int:
        return len(self.nll_new)

    def success(self, expect_new: bool) -> float | None:
        """Share of prompts where the expected target is strictly more probable; None without prompts."""
        if not self.nll_new:
            return None
        wins = [(new < true) if expect_new else (true < new) for new, true in zip(self.nll_new, self.nll_true)]
        return sum(wins) / len(wins)

    def accuracy(self, of_new: bool) -> float | None:
        """Mean token accuracy of ``target_new`` (``of_new``) or of the other target; None without prompts."""
        values = self.acc_new if of_new else self.acc_true
        return sum(values) / len(values) if values else None

    def magnitude(self, expect_new: bool) -> float | None:
        """Mean of ``exp(−NLL_expected) − exp(−NLL_other)``; None without prompts."""
        if not self.nll_new:
            return None
        sign = 1.0 if expect_new else -1.0
        gaps = [sign * (math.exp(-new) - math.exp(-true)) for new, true in zip(self.nll_new, self.nll_true)]
        return sum(gaps) / len(gaps)


@dataclass(frozen=True)
class FactResult:
    """The scores of one fact; the metric properties are None where the fact has no such prompts."""

    fact: Fact
    rewrite: PromptSetScores
    paraphrase: PromptSetScores
    neighborhood: PromptSetScores

    @property
    def es(self) -> float | None:
        return self.rewrite.success(expect_new=True)

    @property
    def em(self) -> float | None:
        return self.rewrite.magnitude(expect_new=True)

    @property
    def ps(self) -> float | None:
        return self.paraphrase.success(expect_new=True)

    @property
    def pm(self) -> float | None:
        return self.paraphrase.magnitude(expect_new=True)

    @property
    def ns(self) -> float | None:
        return self.neighborhood.success(expect_new=False)

    @property
    def nm(self) -> float | None:
        return self.neighborhood.magnitude(expect_new=False)

    @property
    def rewrite_acc(self) -> float | None:
        return self.rewrite.accuracy(of_new=True)

    @property
    def rephrase_acc(self) -> float | None:
        return self.paraphrase.accuracy(of_new=True)

    @property
    def locality_acc(self) -> float | None:
        return self.neighborhood.accuracy(of_new=False)


@dataclass(frozen=True)
class CounterFactScores:
    """The seven metrics as fractions (None where no fact covers them), their coverage and per-fact results."""

    es: float | None
    ps: float | None
    ns: float | None
    em: float | None
    pm: float | None
    nm: float | None
    s: float | None
    n_facts: int
    n_paraphrase_facts: int
    n_neighborhood_facts: int
    facts: tuple[FactResult, ...]
    rewrite_acc: float | None = None
    rephrase_acc: float | None = None
    locality_acc: float | None = None

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat ``name → value`` of the defined metrics and the coverage counts (the ledger's long format)."""
        values = {"es": self.es, "ps": self.ps, "ns": self.ns, "em": self.em, "pm": self.pm, "nm": self.nm,
                  "s": self.s, "rewrite_acc": self.rewrite_acc, "rephrase_acc": self.rephrase_acc,
                  "locality_acc": self.locality_acc, "n_facts": self.n_facts, "n_paraphrase_facts": self.n_paraphrase_facts,
                  "n_neighborhood_facts": self.n_neighborhood_facts}
        return {prefix + name: float(value) for name, value in values.items() if value is not None}


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean; None if any value is undefined, 0 if any value is 0 (its limit)."""
    if not values or any(value is None for value in values):
        return None
    if any(value == 0 for value in values):
        return 0.0
    return len(values) / sum(1.0 / value for value in values)  # type: ignore[operator]


def _mean(values: list[float | None]) -> tuple[float | None, int]:
    """Mean of the defined values and how many there were."""
    defined = [value for value in values if value is not None]
    return (sum(defined) / len(defined) if defined else None), len(defined)


PROMPT_KINDS = ("rewrite", "paraphrase", "neighborhood")
"""The prompt sets of a fact that CounterFact scores (ES, PS, NS), in the order they are scored."""


def prompts_of(fact: Fact, kind: str) -> tuple[str, ...]:
    """A fact's prompts of one of :data:`PROMPT_KINDS`."""
    return (fact.rewrite_prompt,) if kind == "rewrite" else getattr(fact, f"{kind}_prompts")


def counterfact_metrics(adapter: ModelAdapter, facts: Sequence[Fact], batch_size: int = 16,
                        with_neighborhood: bool = True) -> CounterFactScores:
    """ES, PS, NS, EM, PM, NM and S of ``facts`` on the model as it is now.

    ``with_neighborhood=False`` skips the neighbourhood prompts (NS, NM and S
    stay None), for callers that only ask whether edits still hold.
    """
    kinds = PROMPT_KINDS if with_neighborhood else PROMPT_KINDS[:2]
    pairs: list[tuple[str, str]] = []
    for fact in facts:
        for kind in kinds:
            other = fact.locality_target if kind == "neighborhood" else fact.target_true
            for prompt in prompts_of(fact, kind):
                pairs += [(prompt, fact.target_new), (prompt, other)]
    scored = score_targets(adapter, pairs, batch_size)
    nll, accuracy = scored.mean_nll.tolist(), scored.token_accuracy.tolist()

    cursor = 0
    results = []
    for fact in facts:
        sets = {}
        for kind in PROMPT_KINDS:
            count = len(prompts_of(fact, kind)) if kind in kinds else 0
            chunk = nll[cursor:cursor + 2 * count]
            correct = accuracy[cursor:cursor + 2 * count]
            sets[kind] = PromptSetScores(tuple(chunk[0::2]), tuple(chunk[1::2]), tuple(correct[0::2]),
                                         tuple(correct[1::2]))
            cursor += 2 * count
        results.append(FactResult(fact, **sets))

    es, n_facts = _mean([result.es for result in results])
    em, _ = _mean([result.em for result in results])
    ps, n_paraphrase = _mean([result.ps for result in results])
    pm, _ = _mean([result.pm for result in results])
    ns, n_neighborhood = _mean([result.ns for result in results])
    nm, _ = _mean([result.nm for result in results])
    return CounterFactScores(es=es, ps=ps, ns=ns, em=em, pm=pm, nm=nm, s=harmonic_mean([es, ps, ns]),
                             n_facts=n_facts, n_paraphrase_facts=n_paraphrase,
                             n_neighborhood_facts=n_neighborhood, facts=tuple(results),
                             rewrite_acc=_mean([r.rewrite_acc for r in results])[0],
                             rephrase_acc=_mean([r.rephrase_acc for r in results])[0],
                             locality_acc=_mean([r.locality_acc for r in results])[0])


def retention(adapter: ModelAdapter, earlier_facts: Sequence[Fact], batch_size: int = 16) -> CounterFactScores:
    """ES/PS (and EM/PM) of previously applied edits: how many still hold after later ones.

    Neighbourhood prompts are skipped: they measure collateral damage of an
    edit when it is made, which the current batch's NS already tracks.
    """
    return counterfact_metrics(adapter, earlier_facts, batch_size, with_neighborhood=False)
