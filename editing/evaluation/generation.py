"""Generation entropy (GE): how repetitive the model's free generations have become.

A collapsing model starts to loop ("the the the", a phrase repeated to the end),
which shows as a fall of the n-gram entropy of its greedy generations long
before perplexity explodes (docs/math.md, "CounterFact metrics" and "Collapse").

The definition is ROME's (Meng et al. 2022, ``compute_n_gram_entropy``):

* a text is split into NLTK-like word tokens (:func:`word_tokens`: words,
  keeping inner hyphens, apostrophes and decimal points, and every other
  non-space character as its own token);
* ``H_n`` is the Shannon entropy, in bits, of the text's n-gram frequency
  distribution (``H_n = −Σ p log₂ p`` over distinct n-grams, ``p`` = count /
  number of n-grams; 0 when the text has fewer than ``n`` tokens);
* the text's entropy is the arithmetic mean of ``2/3·H₂`` and ``4/3·H₃``,
  i.e. ``(2/3·H₂ + 4/3·H₃) / 2``;
* GE is the arithmetic mean over the generated texts.

As in ROME, the text is the prompt followed by its generation. Unlike ROME's
top-k sampling, generation here is greedy (docs/math.md), so GE is deterministic.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import GenerationConfig

from editing.models.adapter import ModelAdapter
from editing.tokens import encode_prompt

PROBE_PROMPTS = (
    "The city of", "My favourite food is", "The history of science", "In the morning, I",
    "The president of the company said", "Music is", "The river flows", "Yesterday the team",
    "A good book", "The most important thing",
)
"""Neutral generation prompts for GE across a sequential run: unlike the edited facts' own
generation prompts they are the same at every evaluation (and the baseline), so a GE drop
means the model's generations changed, not the prompts."""

NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)

_WORD = re.compile(r"\w+(?:[-'’.]\w+)*|[^\w\s]")


def word_tokens(text: str) -> list[str]:
    """Word-level tokens approximating NLTK's ``word_tokenize`` (no NLTK dependency).

    It differs from NLTK only in contractions ("don't" stays one token) and
    quote normalisation, which move the entropy of a ~100-token text by a
    fraction of a bit and never change which of two texts is more repetitive.
    """
    return _WORD.findall(text)


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the distribution of ``tokens``' n-grams (0 without any n-gram)."""
    counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def text_entropy(text: str) -> float:
    """ROME's n-gram entropy of one text: mean of ``2/3·H₂`` and ``4/3·H₃`` over its word tokens."""
    tokens = word_tokens(text)
    weighted = [weight * ngram_entropy(tokens, n) for n, weight in zip(NGRAM_ORDERS, NGRAM_WEIGHTS)]
    return sum(weighted) / len(weighted)


@dataclass(frozen=True)
class GenerationResult:
    """GE over the generations, each text's entropy, and the texts themselves (for audits)."""

    ge: float | None
    """None when there was nothing to generate from."""
    entropies: tuple[float, ...]
    texts: tuple[str, ...]


@torch.no_grad()
def greedy_generate(adapter: ModelAdapter, prompts: Sequence[str], max_new_tokens: int = 100,
                    batch_size: int = 64, with_prompt: bool = True) -> list[str]:
    """Greedy continuations of ``prompts``, returned as prompt + continuation text (``with_prompt``) or
    as the continuation alone.

    Prompts are left-padded into batches of similar length; duplicate prompts
    (CounterFact repeats some) are generated once. A fresh generation config is
    used so that a model's own defaults (sampling, repetition penalty) cannot
    mask the repetition this metric exists to detect. EOS is suppressed and
    every row gets exactly ``max_new_tokens`` tokens (as in ROME, which ignores
    EOS): n-gram entropy grows with text length, so an instruct model ending
    its answer early would otherwise read as repetition.

    Each decoding step feeds one token per row, so small models are bound by
    per-step overhead, not arithmetic: batches are larger than for scoring.
    """
    tokenizer, model = adapter.tokenizer, adapter.model
    eos = model.generation_config.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                              num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0,
                              pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=eos if eos is not None else tokenizer.eos_token_id)
    unique = list(dict.fromkeys(prompts))
    encoded = [encode_prompt(tokenizer, prompt) for prompt in unique]
    order = sorted(range(len(unique)), key=lambda i: (-len(encoded[i]), i))
    generated: dict[str, str] = {}
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        width = max(len(encoded[i]) for i in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, index in enumerate(rows):
            ids = encoded[index]
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        output = model.generate(input_ids=input_ids.to(adapter.device),
                                attention_mask=attention_mask.to(adapter.device), generation_config=config)
        for row, index in enumerate(rows):
            full = (encoded[index] if with_prompt else []) + output[row, width:].tolist()
            generated[unique[index]] = tokenizer.decode(full, skip_special_tokens=True)
    return [generated[prompt] for prompt in prompts]


def generation_entropy(adapter: ModelAdapter, prompts: Sequence[str], max_new_tokens: int = 100,
                       batch_size: int = 64) -> GenerationResult:
    """GE of greedy generations from ``prompts`` (e.g. the facts' ``generation_prompts``)."""
    texts = greedy_generate(adapter, prompts, max_new_tokens, batch_size)
    entropies = tuple(text_entropy(text) for text in texts)
    ge = sum(entropies) / len(entropies) if entropies else None
    return GenerationResult(ge=ge, entropies=entropies, texts=tuple(texts))
