"""Answers without teacher forcing: the WILD protocol of *The Mirage of Model Editing* (arXiv 2502.11177).

Teacher-forced metrics feed the target's own tokens to the model and ask only whether each is the most
probable next one; a model can pass them and still never *say* the new answer. WILD asks the model to
answer: greedy generation from the rewrite and the rephrase prompts (batched, with the KV cache), the
answer read as the continuation up to its first line break or sentence end, and a match of that answer
with the target after SQuAD-style normalisation (case, punctuation, articles and spacing ignored): the
answer equals the target or opens with it as whole words — "Paris, France" answers "Paris", "Parisian"
does not. (The paper also judges with an LLM; a rule needs no second model and is reproducible.)

* ``wild.rewrite``: share of facts whose rewrite prompt is answered with ``target_new``;
* ``wild.rephrase``: the same on the rephrase prompts, averaged per fact, then over facts that have them.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Sequence

from editing.evaluation.generation import greedy_generate
from editing.facts import Fact
from editing.models.adapter import ModelAdapter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SENTENCE_END = re.compile(r"\.(\s|$)")


def normalise_answer(text: str) -> str:
    """Lower case, without punctuation, articles and extra spaces (SQuAD's exact-match normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_of(continuation: str) -> str:
    """The answer a generated continuation gives: up to its first line break, then up to its first
    sentence end (a full stop followed by a space or the end), so "Paris. It is…" answers "Paris"."""
    line = continuation.strip().split("\n", 1)[0]
    return _SENTENCE_END.split(line, 1)[0]


def matches(continuation: str, target: str) -> bool:
    """Whether the answer of ``continuation`` is ``target``, or opens with it as whole words."""
    answer, wanted = normalise_answer(answer_of(continuation)).split(), normalise_answer(target).split()
    return bool(wanted) and answer[:len(wanted)] == wanted


@dataclass(frozen=True)
class WildScores:
    """WILD's exact-match accuracies, overall and per fact (None where a fact has no such prompt)."""

    rewrite: float | None
    rephrase: float | None
    per_fact: tuple[tuple[float, float | None], ...]
    """(rewrite, rephrase) of each fact, in order."""

    def metrics(self) -> dict[str, float]:
        values = {"wild.rewrite": self.rewrite, "wild.rephrase": self.rephrase}
        return {name: float(value) for name, value in values.items() if value is not None}


def wild_accuracy(adapter: ModelAdapter, facts: Sequence[Fact], max_new_tokens: int = 16,
                  batch_size: int = 64) -> WildScores:
    """Generate from every fact's rewrite and rephrase prompts in one batched pass and score the answers."""
    prompts = [(k, prompt) for k, fact in enumerate(facts)
               for prompt in (fact.rewrite_prompt, *fact.paraphrase_prompts)]
    continuations = greedy_generate(adapter, [prompt for _, prompt in prompts], max_new_tokens, batch_size,
                                    with_prompt=False)
    hits: list[list[float]] = [[] for _ in facts]
    for (k, _), continuation in zip(prompts, continuations):
        hits[k].append(float(matches(continuation, facts[k].target_new)))
    per_fact = tuple((own[0], sum(own[1:]) / len(own[1:]) if len(own) > 1 else None) for own in hits)
    rephrased = [rephrase for _, rephrase in per_fact if rephrase is not None]
    return WildScores(rewrite=sum(r for r, _ in per_fact) / len(per_fact) if per_fact else None,
                      rephrase=sum(rephrased) / len(rephrased) if rephrased else None, per_fact=per_fact)
