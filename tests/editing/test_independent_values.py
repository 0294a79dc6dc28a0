"""Values the engine computes, against the same values computed independently in the test.

* k* against a plain forward pre-hook on the Hugging Face module, one prompt per pass, the subject's last
  token found from the tokenizer's character offsets;
* the edit memory ``S`` against numbers written out by hand;
* few-shot downstream predictions against a plain scorer: one forward pass per (prompt, label word), the
  label with the lowest mean NLL wins.
"""

from __future__ import annotations

import torch

from editing.evaluation import TASKS, build_examples, downstream_accuracy, load_records, score_targets
from editing.keys import compute_keys
from editing.memory import EditMemory
from editing.rows import build_rewrite_rows
from fixtures.data import counterfact_facts_between, dataset_path
from fixtures.plain import last_subject_token

PREFIXES = ("", "Once upon a time. ", "The weather was fine. ")


def test_k_star_is_the_down_projections_input_at_the_last_subject_token_weighted_half_bare(tiny_model):
    adapter = tiny_model("llama")
    facts = counterfact_facts_between(0, 3)
    layer = 2
    keys, _ = compute_keys(adapter, build_rewrite_rows(adapter, facts, PREFIXES, with_targets=False), layer, 3)
    module = adapter.model.model.layers[layer].mlp.down_proj
    for index, fact in enumerate(facts):
        per_prefix = []
        for prefix in PREFIXES:
            text = prefix + fact.rewrite_prompt
            _, position = last_subject_token(adapter.tokenizer, text, len(prefix) + fact.subject_span[1])
            seen = {}
            handle = module.register_forward_pre_hook(lambda m, args: seen.update(k=args[0][0, position].detach()))
            try:
                with torch.no_grad():
                    adapter.model(torch.tensor([adapter.tokenizer(text)["input_ids"]]))
            finally:
                handle.remove()
            per_prefix.append(seen["k"])
        expected = 0.5 * per_prefix[0] + 0.5 * torch.stack(per_prefix[1:]).mean(0)
        torch.testing.assert_close(keys[index], expected, rtol=1e-4, atol=1e-5)


def test_the_edit_memory_is_the_sum_of_the_batches_outer_products_by_hand():
    first = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, 3.0]])   # d_in = 3, two facts
    second = torch.tensor([[1.0], [-1.0], [2.0]])                # one fact
    memory = EditMemory.from_batches([{4: first}, {4: second}])
    # K1 K1ᵀ = [[1,2,0],[2,5,3],[0,3,9]];  K2 K2ᵀ = [[1,-1,2],[-1,1,-2],[2,-2,4]]
    assert torch.equal(memory.at(4), torch.tensor([[2.0, 1.0, 2.0], [1.0, 6.0, 1.0], [2.0, 1.0, 13.0]],
                                                  dtype=torch.float64))
    assert memory.batches == 2 and memory.at(5) is None


def test_downstream_scores_and_predictions_are_what_a_plain_scorer_gives(tiny_model):
    """The label words' mean NLLs after each few-shot prompt, and so the predictions and the accuracy."""
    adapter = tiny_model("llama")
    dataset_path("sst2")
    spec = TASKS["sst2"]
    examples = build_examples(spec, load_records(spec), n=6, seed=0)
    words = list(spec.label_words.values())
    plain = []
    for example in examples:
        context = adapter.tokenizer(example.prompt)["input_ids"]
        for word in words:
            answer = adapter.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = adapter.model(torch.tensor([context + answer])).logits[0].double()
            log_probs = torch.log_softmax(logits[len(context) - 1:-1], dim=-1)
            plain.append(-float(log_probs[torch.arange(len(answer)), torch.tensor(answer)].mean()))
    plain = torch.tensor(plain, dtype=torch.float64).view(len(examples), len(words))
    scored = score_targets(adapter, [(example.prompt, word) for example in examples for word in words],
                           batch_size=4).mean_nll.view(len(examples), len(words))
    torch.testing.assert_close(scored.double(), plain.double(), rtol=1e-4, atol=1e-4)
    correct = sum(int(row.argmin()) == example.label for row, example in zip(plain, examples))
    assert downstream_accuracy(adapter, tasks=["sst2"], n=6)["sst2"].accuracy == correct / len(examples)
