"""The batched scorer against an unbatched reference: full forward, full-vocabulary log-softmax, one pair at a time."""

from __future__ import annotations

import pytest
import torch

import editing.evaluation.scoring as scoring
from editing.evaluation import score_continuations, score_targets
from editing.models import ModelAdapter

# Mixed prompt lengths, multi-token targets, and one prompt with two one-token targets (shared row).
PAIRS = [
    ("The Eiffel Tower is located in the city of", "Paris"),
    ("The Eiffel Tower is located in the city of", "Rome"),
    ("Danielle Darrieux's mother tongue is", "French"),
    ("In 1954, in a gesture of friendship to mark the anniversary of the union, the premier gave", "Crimea to Ukraine"),
    ("Toko Yasuda, the", "guitarist and singer"),
    ("Apple A5 was created by", "Google"),
    ("The", "quick brown fox jumps over the lazy dog"),
    ("What is the twin city of Lyon? It is", "Beirut"),
]

FEW_SHOT_CONTEXT = ("Review: a gorgeous, witty, seductive movie.\nSentiment: positive\n\n"
                    "Review: the story is lazy and the jokes fall flat.\nSentiment: negative\n\n")
FEW_SHOT_PAIRS = [(FEW_SHOT_CONTEXT + f"Review: {text}\nSentiment:", word)
                  for text in ("an utter bore.", "one of the best films of the year, full of life and wit.",
                               "it never finds its footing.")
                  for word in ("positive", "negative", "somewhat mixed")]


def reference_scores(adapter: ModelAdapter, pairs: list[tuple[str, str]]) -> tuple[list[float], list[bool]]:
    """Mean target NLL and greedy match, one pair at a time, from the model's own full logits."""
    tokenizer = adapter.tokenizer
    nlls, greedy = [], []
    with torch.no_grad():
        for prompt, target in pairs:
            prompt_ids = tokenizer(prompt)["input_ids"]
            target_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt_ids + target_ids])
            log_probs = torch.log_softmax(adapter.model(input_ids=ids).logits[0].float(), dim=-1)
            positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(target_ids) - 1)
            wanted = torch.tensor(target_ids)
            nlls.append(float(-log_probs[positions, wanted].mean()))
            greedy.append(bool((log_probs[positions].argmax(dim=-1) == wanted).all()))
    return nlls, greedy


@pytest.mark.parametrize("family", ["gpt2", "gptj", "llama"])
def test_batched_scores_equal_unbatched_reference_on_tiny_models(tiny_model, family):
    adapter = tiny_model(family)
    expected_nll, expected_greedy = reference_scores(adapter, PAIRS)
    scores = score_targets(adapter, PAIRS, batch_size=3)
    assert scores.mean_nll.tolist() == pytest.approx(expected_nll, abs=1e-4)
    assert scores.greedy.tolist() == expected_greedy
    assert scores.n_tokens.tolist() == [len(adapter.tokenizer(" " + t, add_special_tokens=False)["input_ids"])
                                        for _, t in PAIRS]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_shared_few_shot_prefix_is_run_once_and_scores_stay_exact(tiny_model, family, monkeypatch):
    adapter = tiny_model(family)
    shared_lengths = []
    original = scoring._suffix_hidden_states

    def spy(adapter, rows, shared):
        shared_lengths.append(shared)
        return original(adapter, rows, shared)

    monkeypatch.setattr(scoring, "_suffix_hidden_states", spy)
    expected_nll, expected_greedy = reference_scores(adapter, FEW_SHOT_PAIRS)
    scores = score_targets(adapter, FEW_SHOT_PAIRS, batch_size=4)
    assert max(shared_lengths) >= scoring.MIN_SHARED_PREFIX
    assert scores.mean_nll.tolist() == pytest.approx(expected_nll, abs=1e-4)
    assert scores.greedy.tolist() == expected_greedy


def test_logits_computed_in_small_chunks_give_the_same_scores(tiny_model, monkeypatch):
    adapter = tiny_model("llama")
    whole = score_targets(adapter, PAIRS, batch_size=8)
    vocab = adapter.model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(scoring, "LOGIT_BUDGET", 2 * vocab)  # two positions at a time
    chunked = score_targets(adapter, PAIRS, batch_size=8)
    assert torch.equal(whole.greedy, chunked.greedy)
    assert torch.allclose(whole.mean_nll, chunked.mean_nll, atol=1e-5)


def test_score_continuations_scores_every_token_after_start(tiny_model):
    adapter = tiny_model("gpt2")
    sequence = adapter.tokenizer("One two three four five six")["input_ids"]
    (scores,) = score_continuations(adapter, [sequence], [2])
    with torch.no_grad():
        log_probs = torch.log_softmax(adapter.model(input_ids=torch.tensor([sequence])).logits[0], dim=-1)
    expected = -log_probs[torch.arange(1, len(sequence) - 1), torch.tensor(sequence[2:])]
    assert torch.allclose(scores.nll, expected, atol=1e-4)
    with pytest.raises(ValueError, match="start"):
        score_continuations(adapter, [sequence], [0])
    with pytest.raises(ValueError, match="start"):
        score_continuations(adapter, [sequence], [len(sequence)])


@pytest.mark.smollm
def test_batched_scores_equal_unbatched_reference_on_smollm2(smollm2_session):
    expected_nll, expected_greedy = reference_scores(smollm2_session, PAIRS + FEW_SHOT_PAIRS[:3])
    scores = score_targets(smollm2_session, PAIRS + FEW_SHOT_PAIRS[:3], batch_size=4)
    assert scores.mean_nll.tolist() == pytest.approx(expected_nll, abs=1e-4)
    assert scores.greedy.tolist() == expected_greedy


@pytest.mark.smollm
def test_padding_does_not_change_scores(smollm2_session):
    one_at_a_time = score_targets(smollm2_session, PAIRS, batch_size=1)
    padded = score_targets(smollm2_session, PAIRS, batch_size=7)
    assert torch.allclose(one_at_a_time.mean_nll, padded.mean_nll, atol=1e-4)
    assert torch.equal(one_at_a_time.greedy, padded.greedy)


@pytest.mark.smollm
def test_smollm2_knows_where_the_eiffel_tower_is(smollm2_session):
    scores = score_targets(smollm2_session, PAIRS[:2])
    paris, rome = scores.mean_nll.tolist()
    assert paris < rome - 2.0
    assert scores.greedy.tolist() == [True, False]
