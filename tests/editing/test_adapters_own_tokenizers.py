"""GPT-2 and GPT-J adapters with a tokenizer of their own family, not SmolLM2's.

GPT-2 and GPT-J use byte-level BPE without a BOS token, where a word's leading
space belongs to its token ("Ġworld"). A small one is trained here with
``tokenizers`` on WikiText-2 (no download), so that subject lookup, target
tokenisation and a whole edit are exercised on that convention end to end.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM, PreTrainedTokenizerFast

from editing.config import EditConfig, ObjectiveParams, StatsParams, ValueParams
from editing.editor import Editor
from editing.facts import fact_from_record
from editing.rows import build_rewrite_rows
from editing.models import ModelAdapter
from editing.stats import second_moments
from fixtures.data import counterfact_records, dataset_path

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    lines = dataset_path("wikitext-2-valid").read_text(encoding="utf-8").splitlines()[:3000]
    records = counterfact_records(0, 50)
    prompts = [record["requested_rewrite"]["prompt"].format(record["requested_rewrite"]["subject"])
               for record in records]
    trainer = ByteLevelBPETokenizer(add_prefix_space=False)
    trainer.train_from_iterator(lines + prompts, vocab_size=3000, min_frequency=2, special_tokens=[EOS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=trainer._tokenizer, eos_token=EOS)
    assert tokenizer("Paris")["input_ids"][0] != tokenizer.convert_tokens_to_ids(EOS)  # no BOS added
    return tokenizer


def _model(family: str, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=vocab, n_positions=256))
    return GPTJForCausalLM(GPTJConfig(n_embd=64, n_layer=4, n_head=4, rotary_dim=8, vocab_size=vocab,
                                      n_positions=256))


@pytest.fixture(scope="module")
def facts():
    return [fact_from_record(record, index) for index, record in enumerate(counterfact_records(0, 4))]


@pytest.mark.parametrize("family", ["gpt2", "gptj"])
def test_subject_lookup_with_leading_space_tokens(byte_level_tokenizer, facts, family):
    adapter = ModelAdapter(_model(family, len(byte_level_tokenizer)), byte_level_tokenizer, name=f"tiny-{family}")
    rows = build_rewrite_rows(adapter, facts, ("", "It rained. "), with_targets=True)
    for row, fact_index in enumerate(rows.fact_of_row.tolist()):
        fact = facts[fact_index]
        ids = rows.batch.input_ids[row].tolist()
        up_to_subject = byte_level_tokenizer.decode(ids[:rows.subject_position[row] + 1])
        assert up_to_subject.endswith(fact.subject), (up_to_subject, fact.subject)
        target = byte_level_tokenizer(" " + fact.target_new, add_special_tokens=False)["input_ids"]
        assert rows.target_ids[row] == target and byte_level_tokenizer.decode(target).startswith(" ")


@pytest.mark.parametrize("family", ["gpt2", "gptj"])
def test_an_exact_edit_writes_its_targets_on_its_own_tokenizer(byte_level_tokenizer, facts, family):
    """v* at the last edit layer, exact EMMET spread over two layers (GPT-2's Conv1D stores W transposed):
    afterwards the residual at the last subject token of each bare prompt — found here from the
    tokenizer's offsets, read from the model's own hidden states — is the target ``z``."""
    adapter = ModelAdapter(_model(family, len(byte_level_tokenizer)), byte_level_tokenizer, name=f"tiny-{family}")
    layers = (1, 2)
    moments = second_moments(adapter, list(layers), StatsParams(corpus="wikitext-2-valid", n_samples=64,
                                                                max_tokens=64), progress=False)
    config = EditConfig(algorithm="emmet", layers=layers, distribution="memit_spread",
                        objective=ObjectiveParams(mom2_update_weight=1.0, emmet_lambda=0.0),
                        values=ValueParams(lr=0.5, steps=8, loss_threshold=0.0, n_prefixes=0))
    originals = adapter.snapshot(list(layers))
    edit = Editor(adapter, config, moments, ("",)).apply(facts)
    assert torch.all(edit.v_star.final_nll < edit.v_star.initial_nll)
    for index, fact in enumerate(facts):
        encoding = byte_level_tokenizer(fact.rewrite_prompt, return_offsets_mapping=True)
        end = fact.subject_span[1]
        position = next(i for i, (a, b) in enumerate(encoding["offset_mapping"]) if a < end <= b)
        with torch.no_grad():
            hidden = adapter.model(torch.tensor([encoding["input_ids"]]), output_hidden_states=True).hidden_states
        reached = hidden[layers[-1] + 1][0, position]  # hidden_states[l + 1] is block l's output
        error = torch.linalg.norm(reached - edit.v_star.z[index]) / torch.linalg.norm(edit.v_star.z[index])
        assert error < 1e-4, (fact.subject, float(error))
    for update in edit.updates:
        assert update.memorization == pytest.approx(1.0, abs=1e-5)
        assert 0 < update.delta.rank <= len(facts)
        assert not torch.equal(adapter.weight(update.layer), originals[update.layer])
