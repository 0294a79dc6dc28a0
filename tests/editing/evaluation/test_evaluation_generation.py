"""Generation entropy: ROME's n-gram entropy on fixed strings, and batched greedy generation."""

from __future__ import annotations

import math

import pytest

from editing.evaluation import generation_entropy, greedy_generate, ngram_entropy, text_entropy, word_tokens


def test_word_tokens_split_words_and_punctuation():
    assert word_tokens("The state-of-the-art model, it's 3.5 times faster!") == [
        "The", "state-of-the-art", "model", ",", "it's", "3.5", "times", "faster", "!"]


def test_ngram_entropy_hand_computed():
    tokens = "a b a b a".split()
    assert ngram_entropy(tokens, 2) == pytest.approx(1.0)  # ab, ba, ab, ba: two equally likely bigrams
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # aba ×2, bab ×1
    assert ngram_entropy(tokens, 3) == pytest.approx(h3)
    assert text_entropy("a b a b a") == pytest.approx((2 / 3 * 1.0 + 4 / 3 * h3) / 2)
    # Six distinct words: 5 distinct bigrams and 4 distinct trigrams, all equally likely.
    assert text_entropy("one two three four five six") == pytest.approx((2 / 3 * math.log2(5) + 4 / 3 * 2.0) / 2)
    assert text_entropy("alone") == 0.0 and text_entropy("") == 0.0


def test_repetitive_text_has_lower_entropy_than_varied_text():
    repetitive = "I am a robot. " * 12
    varied = ("The river winds past old mills, where children once fished for trout while their parents "
              "argued about the harvest, the weather, and the price of bread in a distant town.")
    assert text_entropy(repetitive) < text_entropy(varied) - 1.0


def test_batched_greedy_generation_equals_one_prompt_at_a_time(tiny_model):
    adapter = tiny_model("llama")
    prompts = ["The Eiffel Tower is located in", "Hello", "Danielle Darrieux's mother tongue is", "Hello"]
    batched = greedy_generate(adapter, prompts, max_new_tokens=8, batch_size=4)
    single = [greedy_generate(adapter, [prompt], max_new_tokens=8, batch_size=1)[0] for prompt in prompts]
    assert batched == single
    assert all(text.startswith(prompt) for text, prompt in zip(batched, prompts))
    assert all(len(adapter.tokenizer(t)["input_ids"]) > len(adapter.tokenizer(p)["input_ids"])
               for t, p in zip(batched, prompts))


@pytest.mark.smollm
def test_generation_entropy_on_smollm2(smollm2_session):
    prompts = ["The Eiffel Tower is located in", "Danielle Darrieux's mother tongue is"]
    result = generation_entropy(smollm2_session, prompts, max_new_tokens=24, batch_size=2)
    assert result.texts == tuple(greedy_generate(smollm2_session, prompts, max_new_tokens=24, batch_size=1))
    assert result.entropies == tuple(text_entropy(text) for text in result.texts)
    assert result.ge == pytest.approx(sum(result.entropies) / 2)
    assert result.ge > 2.0  # a healthy model does not loop within 24 tokens
