"""Token-weighted perplexity on held-out text, a collapse symptom (docs/math.md, "Collapse").

``PPL = exp(Σ NLL / Σ tokens)`` over every predicted token of every text: a
long text weighs as much as its tokens, so the value does not depend on how
the texts were split. Each text is tokenised with the tokenizer's defaults and
truncated to ``max_tokens``; its first token has no context and is not scored.
The scoring is :func:`score_continuations`, batched and padding-free.
"""

from __future__ import annotations

import math
from typing import Sequence

from editing.evaluation.scoring import score_continuations
from editing.models.adapter import ModelAdapter
from editing.tokens import encode_prompt


def perplexity(adapter: ModelAdapter, texts: Sequence[str], max_tokens: int = 256, batch_size: int = 8) -> float:
    """Token-weighted perplexity of the model on ``texts`` (texts shorter than two tokens are skipped)."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    sequences = [ids[:max_tokens] for ids in (encode_prompt(adapter.tokenizer, text) for text in texts)]
    sequences = [ids for ids in sequences if len(ids) >= 2]
    if not sequences:
        raise ValueError("no text has two tokens or more: perplexity is undefined")
    scores = score_continuations(adapter, sequences, [1] * len(sequences), batch_size)
    total_nll = sum(float(score.nll.double().sum()) for score in scores)
    total_tokens = sum(len(score.nll) for score in scores)
    return math.exp(total_nll / total_tokens)
