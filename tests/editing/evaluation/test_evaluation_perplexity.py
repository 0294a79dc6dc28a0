"""Held-out text loaders and token-weighted perplexity."""

from __future__ import annotations

import math

import pytest
import torch

from editing.evaluation import TEXT_CORPORA, load_texts, perplexity, sample_texts
from fixtures.data import dataset_path


def test_wikitext_paragraphs_are_prose_without_headings_or_carriage_returns():
    paragraphs = TEXT_CORPORA["wikitext-2-test"].read(dataset_path("wikitext-2-test"))
    assert len(paragraphs) > 1000
    assert not any(p.startswith("=") and p.endswith("=") for p in paragraphs)
    assert not any("\r" in p or "\n" in p for p in paragraphs)
    assert min(len(p) for p in paragraphs) >= 200
    assert paragraphs[0].startswith("Robert Boulter is an English film")


@pytest.mark.parametrize("corpus, count", [("me-ppl-50", 50), ("me-ppl-1k", None), ("wikipedia-leads", None)])
def test_json_corpora_load_non_empty_stripped_texts(corpus, count):
    dataset_path(corpus)
    texts = load_texts(corpus)
    assert texts and all(text == text.strip() and text for text in texts)
    if count is not None:
        assert len(texts) == count


def test_sample_is_fixed_by_seed_and_size():
    texts = [f"text {i}" for i in range(100)]
    first = sample_texts(texts, 10, seed=3)
    assert first == sample_texts(texts, 10, seed=3)
    assert first != sample_texts(texts, 10, seed=4)
    assert len(set(first)) == 10 and first == sorted(first, key=texts.index)
    assert sample_texts(texts, 500, seed=3) == texts
    with pytest.raises(ValueError, match="unknown text corpus"):
        load_texts("no-such-corpus")


def test_perplexity_is_token_weighted_and_ignores_padding(tiny_model):
    adapter = tiny_model("gpt2")
    texts = ["A short text.", "A somewhat longer text that has quite a few more tokens than the first one.",
             "Medium length text here."]
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([adapter.tokenizer(text)["input_ids"]])
            loss = adapter.model(input_ids=ids, labels=ids).loss  # mean NLL of tokens 1..L-1
            total_nll += float(loss) * (ids.shape[1] - 1)
            total_tokens += ids.shape[1] - 1
    assert perplexity(adapter, texts, batch_size=2) == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-4)


def test_random_tiny_model_is_about_as_perplexed_as_its_vocabulary_is_large(tiny_model):
    adapter = tiny_model("llama")
    vocab = adapter.model.config.vocab_size
    value = perplexity(adapter, load_texts("wikitext-2-test", 4, seed=0), max_tokens=64)
    assert 0.5 * vocab < value < 2 * vocab


@pytest.mark.smollm
def test_smollm2_perplexity_on_wikitext_is_sane(smollm2_session):
    texts = load_texts("wikitext-2-test", 16, seed=0)
    value = perplexity(smollm2_session, texts, max_tokens=128, batch_size=8)
    assert 5 < value < 200
