"""zsRE facts, token accuracy under teacher forcing and WILD answers, against plain computations."""

from __future__ import annotations

import json

import pytest
import torch

from editing.evaluation import counterfact_metrics
from editing.evaluation.generation import greedy_generate
from editing.evaluation.wild import answer_of, matches, normalise_answer, wild_accuracy
from editing.facts import Fact, fact_from_record
from editing.tokens import encode_prompt, encode_target
from fixtures.data import dataset_path


@pytest.fixture(scope="module")
def zsre_records() -> list[dict]:
    return json.loads(dataset_path("zsre").read_text())


def test_a_zsre_record_becomes_a_fact_with_its_question_rephrase_and_locality(zsre_records):
    record = zsre_records[0]
    fact = fact_from_record(record, 0)
    assert fact.rewrite_prompt == record["src"] and fact.target_new == record["alt"]
    assert fact.target_true == record["answers"][0] and fact.paraphrase_prompts == (record["rephrase"],)
    assert fact.neighborhood_prompts == (record["loc"],) and fact.locality_target == record["loc_ans"]
    # zsRE records whose new answer is also a ground-truth answer keep a different target_true
    same = [r for r in zsre_records if r["alt"].strip().lower() == r["answers"][0].strip().lower()]
    assert same
    for r in same:
        assert fact_from_record(r).target_true.lower() != r["alt"].strip().lower()
    assert all(fact_from_record(r, i) for i, r in enumerate(zsre_records))  # every record is a valid fact


def _token_accuracy_by_hand(adapter, prompt: str, target: str) -> float:
    """A plain full forward pass of prompt + target; the share of target tokens that are the argmax."""
    prompt_ids, target_ids = encode_prompt(adapter.tokenizer, prompt), encode_target(adapter.tokenizer, target)
    ids = torch.tensor([prompt_ids + target_ids])
    with torch.no_grad():
        logits = adapter.model(input_ids=ids).logits[0]
    predicted = logits[len(prompt_ids) - 1:len(prompt_ids) + len(target_ids) - 1].argmax(dim=-1)
    return float((predicted == torch.tensor(target_ids)).float().mean())


def test_token_accuracies_are_the_argmax_share_of_each_target(smollm2_session, zsre_records, eiffel_fact: Fact):
    """On SmolLM2, with facts whose targets it does and does not predict: the Eiffel Tower's true city as the
    new target and as the neighbourhood answer (the Louvre is in Paris too), the counterfactual, zsRE's."""
    import dataclasses

    adapter = smollm2_session
    knows = dataclasses.replace(eiffel_fact, target_new="Paris", target_true="Rome", neighborhood_answer="Paris")
    facts = [knows, eiffel_fact, *(fact_from_record(record) for record in zsre_records[:2])]
    result = counterfact_metrics(adapter, facts, batch_size=3)
    assert result.facts[0].rewrite_acc == 1.0 and result.facts[0].locality_acc > 0  # the Louvre: Paris
    assert result.facts[1].rewrite_acc == 0.0
    for fact, scored in zip(facts, result.facts):
        assert scored.rewrite_acc == pytest.approx(_token_accuracy_by_hand(adapter, fact.rewrite_prompt, fact.target_new))
        rephrased = [_token_accuracy_by_hand(adapter, p, fact.target_new) for p in fact.paraphrase_prompts]
        kept = [_token_accuracy_by_hand(adapter, p, fact.locality_target) for p in fact.neighborhood_prompts]
        assert scored.rephrase_acc == pytest.approx(sum(rephrased) / len(rephrased))
        assert scored.locality_acc == pytest.approx(sum(kept) / len(kept))
    assert result.metrics()["locality_acc"] == pytest.approx(sum(r.locality_acc for r in result.facts) / 4)


def test_answers_are_read_up_to_the_line_or_sentence_end_and_normalised():
    assert answer_of(" Paris. It is the capital.") == "Paris"
    assert answer_of(" Washington, D.C. is where\nmore") == "Washington, D.C"
    assert normalise_answer("The  Washington, D.C") == normalise_answer("washington DC") == "washington dc"
    assert matches(" the Rome\nRome", "Rome") and matches(" Paris, France. It is", "Paris")
    assert not matches(" Parisian food.", "Paris") and not matches(" I think Rome.", "Rome")
    assert not matches(" Rome", "Rome, Italy") and not matches(" anything", "")


def test_wild_generation_equals_a_plain_greedy_loop(tiny_model):
    """The batched, KV-cached, left-padded generation WILD uses against one-prompt-at-a-time argmax decoding
    over the whole sequence, without a cache."""
    adapter = tiny_model("llama")
    prompts = ["The Eiffel Tower is located in", "Paris is the capital of the country called", "Hi"]
    batched = greedy_generate(adapter, prompts, max_new_tokens=5, batch_size=3, with_prompt=False)
    eos = adapter.model.generation_config.eos_token_id
    for prompt, continuation in zip(prompts, batched):
        ids = encode_prompt(adapter.tokenizer, prompt)
        generated = []
        for _ in range(5):
            with torch.no_grad():
                logits = adapter.model(input_ids=torch.tensor([ids + generated])).logits[0, -1]
            if eos is not None:
                logits[eos] = -float("inf")  # the generator never stops early
            generated.append(int(logits.argmax()))
        assert continuation == adapter.tokenizer.decode(generated, skip_special_tokens=True)


def test_wild_scores_a_known_answer_and_its_counterfactual(smollm2_session, eiffel_fact: Fact):
    """SmolLM2 answers "Paris" for the Eiffel Tower: the true object matches, the counterfactual does not."""
    import dataclasses

    knows = dataclasses.replace(eiffel_fact, target_new="Paris", target_true="Rome")
    scores = wild_accuracy(smollm2_session, [knows, eiffel_fact])
    assert scores.per_fact[0][0] == 1.0 and scores.per_fact[1][0] == 0.0
    assert scores.rewrite == 0.5 and scores.metrics()["wild.rewrite"] == 0.5
