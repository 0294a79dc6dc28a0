"""MPES's two counting rules against the rule written out per prompt and token."""

from __future__ import annotations

import pytest
import torch

from editing.facts import Fact
from editing.rows import build_v_star_rows
from editing.v_star import _most_probable_rows, _read_plan

PREFIXES = ("", "A day. ", "It rained. ")


def test_first_token_and_encore_rules_count_what_their_definitions_say(tiny_model):
    adapter = tiny_model("llama")
    facts = [Fact(subject="Paris", prompt="{} is the capital of", target_new="Italian Republic", target_true="France"),
             Fact(subject="Rome", prompt="{} is the capital of", target_new="Spain", target_true="Italy")]
    rows = build_v_star_rows(adapter, facts, PREFIXES, "{} is a")
    chunk = torch.arange(len(facts) * len(PREFIXES))                       # every rewrite row, none of the KL rows
    plan = _read_plan(rows, chunk)
    vocab = 50
    token_ids = plan.token_ids % vocab
    generator = torch.Generator().manual_seed(0)
    right = torch.rand(len(token_ids), generator=generator) < 0.7           # which tokens the "model" gets right
    log_probs = torch.full((len(token_ids), vocab), -10.0)
    log_probs[torch.arange(len(token_ids)), torch.where(right, token_ids, (token_ids + 1) % vocab)] = 0.0
    first = _most_probable_rows(log_probs, token_ids, plan, chunk, len(PREFIXES), "first_token")
    encore = _most_probable_rows(log_probs, token_ids, plan, chunk, len(PREFIXES), "encore")
    for k, row in enumerate(plan.rewrite.tolist()):
        mine = right[plan.token_owner == k]
        assert first[k] == int(mine[0])
        prefixed = int(chunk[row]) % len(PREFIXES) != 0
        assert encore[k] == int(bool(mine.all()) and prefixed)
    assert plan.lengths.max() > 1  # a multi-token target, where the rules differ
    assert not torch.equal(first, encore)


def test_an_unknown_rule_is_refused_by_name():
    from editing.config import ValueParams

    with pytest.raises(ValueError, match="values.mpes_rule"):
        ValueParams(mpes_rule="most")
