"""Second-moment statistics: correct, padding-free, cached and never recomputed."""

from __future__ import annotations

import json

import pytest
import torch

from editing.config import StatsParams
from editing.corpus import open_corpus
from editing.stats import second_moments

TEXTS = [f"Sentence number {i} talks about {'rivers and mountains' if i % 2 else 'the history of music'}, "
         f"and it has {'a few more words ' * (i % 4)}in it." for i in range(24)]


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(TEXTS) + "\n\n")
    return path


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQEDIT_CACHE", str(tmp_path / "cache"))


class ForwardCounter:
    def __init__(self, adapter):
        self.calls = 0
        adapter.model.base_model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1


def explicit_c0(adapter, texts, layer, max_tokens):
    """Every key of every text, one text at a time, then K Kᵀ / N."""
    keys = []
    handle = adapter.edited_module(layer).register_forward_pre_hook(lambda m, a: keys.append(a[0][0]))
    with torch.no_grad():
        for text in texts:
            ids = adapter.tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="pt")["input_ids"]
            adapter.model(ids)
    handle.remove()
    k = torch.cat(keys).double()
    return (k.T @ k / k.shape[0]).float()


@pytest.mark.parametrize("batch_size", [1, 5])
def test_c0_equals_explicit_mean_of_outer_products(tiny_model, corpus_file, batch_size):
    adapter = tiny_model("llama")
    params = StatsParams(corpus=str(corpus_file), n_samples=100, max_tokens=12, batch_size=batch_size)
    moments = second_moments(adapter, [1, 2], params, progress=False)
    for layer in (1, 2):
        expected = explicit_c0(adapter, TEXTS, layer, 12)
        torch.testing.assert_close(moments[layer], expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(moments[layer], moments[layer].T)
        assert torch.linalg.eigvalsh(moments[layer].double()).min() > -1e-6


def test_cached_layers_are_never_recomputed(tiny_model, corpus_file):
    adapter = tiny_model("gpt2")
    counter = ForwardCounter(adapter)
    params = StatsParams(corpus=str(corpus_file), n_samples=100, max_tokens=16, batch_size=8)
    first = second_moments(adapter, [0, 2], params, progress=False)
    assert counter.calls == 3  # 24 texts in batches of 8, both layers in one pass
    again = second_moments(adapter, [2, 0], params, progress=False)
    assert counter.calls == 3
    assert all(torch.equal(first[layer], again[layer]) for layer in (0, 2))
    # one more layer: only it is computed
    more = second_moments(adapter, [0, 1, 2], params, progress=False)
    assert counter.calls == 6
    assert torch.equal(more[0], first[0])
    # another sample count is another cache entry
    second_moments(adapter, [0], StatsParams(corpus=str(corpus_file), n_samples=10, max_tokens=16), progress=False)
    assert counter.calls == 7


def test_model_change_means_a_new_cache_entry(tiny_model, corpus_file):
    params = StatsParams(corpus=str(corpus_file), n_samples=100, max_tokens=16)
    first = second_moments(tiny_model("llama", seed=0), [1], params, progress=False)
    other = tiny_model("llama", seed=1)
    counter = ForwardCounter(other)
    second = second_moments(other, [1], params, progress=False)
    assert counter.calls > 0
    assert not torch.equal(first[1], second[1])


def test_corpora_of_every_kind_open(tmp_path, corpus_file):
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text("\n".join(json.dumps({"extract": t}) for t in TEXTS))
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(folder))
    opened = [open_corpus(str(corpus_file)), open_corpus(str(jsonl)), open_corpus(str(folder))]
    assert [c.texts for c in opened] == [TEXTS] * 3
    assert len({c.fingerprint for c in opened}) == 1  # the fingerprint is of the texts, not of their file
    assert open_corpus(str(jsonl), 3, 0).fingerprint != opened[0].fingerprint  # a sample is other texts
    sampled = open_corpus("wikipedia-leads", 2000, 0)  # what C0 reads by default: the mirror or the bundle
    assert len(sampled.texts) == 2000 and sampled.origin in ("mirror", "bundle")
    with pytest.raises(FileNotFoundError, match="not a known name"):
        open_corpus("no-such-corpus-anywhere")
