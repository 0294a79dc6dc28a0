"""Last-subject-token lookup and target tokenisation, with and without a BOS token."""

from __future__ import annotations

import copy

import pytest
from tokenizers.processors import TemplateProcessing

from editing.facts import fact_from_record
from editing.tokens import encode_target, last_token_before
from fixtures.data import counterfact_records


@pytest.fixture(scope="module")
def facts():
    return [fact_from_record(record) for record in counterfact_records(0, 40)]


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """SmolLM2's tokenizer made to prepend a BOS token, as Llama-2's does."""
    with_bos = copy.deepcopy(tokenizer)
    bos = with_bos.bos_token
    with_bos._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, with_bos.bos_token_id)])
    assert with_bos("Paris")["input_ids"][0] == with_bos.bos_token_id
    return with_bos


@pytest.mark.parametrize("variant", ["plain", "bos"])
@pytest.mark.parametrize("prefix", ["", "Because the weather was cold. "])
def test_last_subject_token_ends_the_subject(tokenizer, bos_tokenizer, facts, variant, prefix):
    tok = tokenizer if variant == "plain" else bos_tokenizer
    for fact in facts:
        text = prefix + fact.rewrite_prompt
        end = len(prefix) + fact.subject_span[1]
        ids, position = last_token_before(tok, text, end)
        decoded_upto = tok.decode(ids[: position + 1], skip_special_tokens=True)
        assert decoded_upto.rstrip().endswith(fact.subject.rstrip()[-3:]), (fact.subject, decoded_upto)
        # the next token starts after the subject
        assert not tok.decode(ids[: position], skip_special_tokens=True).strip().endswith(fact.subject.strip())


def test_bos_shifts_the_position_by_one(tokenizer, bos_tokenizer, facts):
    for fact in facts[:10]:
        _, plain = last_token_before(tokenizer, fact.rewrite_prompt, fact.subject_span[1])
        _, with_bos = last_token_before(bos_tokenizer, fact.rewrite_prompt, fact.subject_span[1])
        assert with_bos == plain + 1


def test_slow_path_agrees_with_offsets(tokenizer, facts, monkeypatch):
    expected = [last_token_before(tokenizer, f.rewrite_prompt, f.subject_span[1]) for f in facts]
    monkeypatch.setattr(type(tokenizer), "is_fast", property(lambda self: False))
    assert [last_token_before(tokenizer, f.rewrite_prompt, f.subject_span[1]) for f in facts] == expected


def test_targets_have_no_special_tokens(bos_tokenizer):
    ids = encode_target(bos_tokenizer, "Paris")
    assert bos_tokenizer.bos_token_id not in ids
    assert bos_tokenizer.decode(ids) == " Paris"


def test_position_outside_text_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="outside text"):
        last_token_before(tokenizer, "abc", 10)
