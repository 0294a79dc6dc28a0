"""The batched v* engine against a per-fact v* written plainly from docs/math.md, on SmolLM2.

The reference below shares nothing with ``editing/v_star.py``: it is one
fact at a time, one prompt per forward pass, with its own tokenisation and its
own hook on the raw Hugging Face modules. It follows docs/math.md ("Computing k* and
v*") literally: δ is added at the last subject token — to the MLP output for
ROME (``norm_anchor: mlp_output``), to the block output for MEMIT/EMMET
(``residual``) —, the loss is the mean target NLL over the prompts plus
``kl_factor · KL(P_δ ‖ P)`` read at the last subject token of "{subject} is a"
plus ``weight_decay · ‖δ‖ / ‖v_orig‖²``, Adam steps, then the projection
``‖δ‖ ≤ clamp_norm_factor · ‖v_orig‖``; the loop stops when the loss is below
the threshold or the steps run out (no step after the last evaluation).

The clamp is set tight enough to bind, so the two anchors give different
targets and the comparison checks which norm each one uses.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from editing.config import ValueParams
from editing.facts import Fact, fact_from_record
from editing.v_star import compute_v_star
from fixtures.data import counterfact_records
from fixtures.models import FAMILIES
from fixtures.plain import last_subject_token

LAYER = 6
PREFIXES = ("", "The weather was cold that day. ", "Because of this, ")
PARAMS = ValueParams(lr=0.5, steps=4, clamp_norm_factor=0.3, kl_factor=0.0625, weight_decay=0.5,
                     loss_threshold=0.05, n_prefixes=len(PREFIXES) - 1, kl_prompt="{} is a")


def plain_v_star(adapter, fact: Fact, layer: int, params: ValueParams) -> torch.Tensor:
    """``z = h + δ`` for one fact, by the procedure of docs/math.md, one prompt per forward pass of the whole
    model (every family's block calls its MLP ``mlp``)."""
    model, tokenizer = adapter.model, adapter.tokenizer
    block = adapter.blocks[layer]
    site = block.mlp if params.norm_anchor == "mlp_output" else block
    target = tokenizer(" " + fact.target_new, add_special_tokens=False)["input_ids"]
    subject_end = fact.prompt.index("{}") + len(fact.subject)
    prompts = []
    for prefix in PREFIXES:
        ids, position = last_subject_token(tokenizer, prefix + fact.rewrite_prompt, len(prefix) + subject_end)
        prompts.append((ids + target[:-1], position, len(ids)))
    kl_text = params.kl_prompt.replace("{}", fact.subject)
    kl_ids, kl_position = last_subject_token(tokenizer, kl_text, kl_text.index(fact.subject) + len(fact.subject))

    injected: dict[str, object] = {}

    def add_delta(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[0, injected["position"]] += injected["delta"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def block_output_at(ids: list[int], position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual after the block, value at the injection site) at ``position``, without δ."""
        seen = {}
        handles = [block.register_forward_hook(lambda m, a, o: seen.update(h=o[0] if isinstance(o, tuple) else o)),
                   site.register_forward_hook(lambda m, a, o: seen.update(v=o[0] if isinstance(o, tuple) else o))]
        with torch.no_grad():
            model(torch.tensor([ids]))
        for handle in handles:
            handle.remove()
        return seen["h"][0, position], seen["v"][0, position]

    h, v_orig = block_output_at(prompts[0][0], prompts[0][1])
    anchor = torch.linalg.norm(v_orig)
    delta = torch.zeros_like(h, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=params.lr)
    handle = site.register_forward_hook(add_delta)
    reference_kl = None
    try:
        for step in range(params.steps):
            optimizer.zero_grad()
            nll = 0.0
            for ids, position, prompt_length in prompts:
                injected.update(delta=delta, position=position)
                log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
                token_nll = [-log_probs[prompt_length - 1 + t, token] for t, token in enumerate(target)]
                nll = nll + torch.stack(token_nll).mean() / len(prompts)
            injected.update(delta=delta, position=kl_position)
            kl_log_probs = torch.log_softmax(model(torch.tensor([kl_ids])).logits[0, kl_position].float(), dim=-1)
            if reference_kl is None:
                reference_kl = kl_log_probs.detach()
            kl = (kl_log_probs.exp() * (kl_log_probs - reference_kl)).sum()
            loss = nll + params.kl_factor * kl + params.weight_decay * torch.linalg.norm(delta) / anchor ** 2
            if loss.item() < params.loss_threshold or step == params.steps - 1:
                break
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                limit = params.clamp_norm_factor * anchor
                if torch.linalg.norm(delta) > limit:
                    delta.mul_(limit / torch.linalg.norm(delta))
    finally:
        handle.remove()
    return (h + delta).detach()


@pytest.fixture(scope="module")
def three_facts() -> list[Fact]:
    return [fact_from_record(record, index) for index, record in enumerate(counterfact_records(600, 603), start=600)]


@pytest.mark.parametrize("family", FAMILIES)
def test_upper_layer_v_star_equals_full_model_passes_for_every_family(tiny_model, three_facts, family):
    """The engine runs only the blocks above the edit layer; the reference runs the whole model each time."""
    adapter = tiny_model(family, n_layers=4)
    params = replace(PARAMS, steps=5, clamp_norm_factor=2.0)
    engine = compute_v_star(adapter, three_facts, 1, PREFIXES, params, rows_per_chunk=4)
    for parameter in adapter.model.parameters():
        parameter.requires_grad_(False)
    for index, fact in enumerate(three_facts):
        expected = plain_v_star(adapter, fact, 1, params)
        error = torch.linalg.norm(engine.z[index] - expected) / torch.linalg.norm(expected)
        assert error < 1e-4, f"{family}, {fact.subject}: relative difference {error:.2e}"
    assert torch.all(engine.final_nll < engine.initial_nll)


@pytest.mark.smollm
def test_batched_v_star_equals_the_plain_per_fact_procedure_for_both_anchors(smollm2, three_facts):
    model = smollm2.model
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    targets = {}
    for anchor in ("residual", "mlp_output"):
        params = replace(PARAMS, norm_anchor=anchor)
        engine = compute_v_star(smollm2, three_facts, LAYER, PREFIXES, params)
        for index, fact in enumerate(three_facts):
            expected = plain_v_star(smollm2, fact, LAYER, params)
            error = torch.linalg.norm(engine.z[index] - expected) / torch.linalg.norm(expected)
            assert error < 2e-3, f"{anchor}, {fact.subject}: relative difference {error:.2e}"
        targets[anchor] = engine.z
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    # the clamp binds, so the anchor matters: the MLP output is several times smaller than the residual
    assert torch.linalg.norm(targets["residual"] - targets["mlp_output"]) > 1.0
