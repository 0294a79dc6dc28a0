"""v*: the target residual ``z`` of each fact at the last edit layer, by optimising one δ per fact.

``z = h + δ``, where ``h`` is the block output at the last subject token of the bare
prompt and ``δ`` minimises, per fact (docs/math.md, "k* and v*"),

  ``L(δ) = mean_j NLL(target_new | prefix_j + prompt) + kl_factor · KL(P_δ ‖ P) on "{subject} is a"
  + weight_decay · ‖δ‖ / ‖v_orig‖²``

under ``‖δ‖ ≤ clamp_norm_factor · ‖v_orig‖``, with the optimiser of ``values.optimizer``
(:mod:`editing.delta_search`: Adam projected after each step, the references', or L-BFGS with a
line search), freezing a fact once its loss is below ``loss_threshold``. ``v_orig`` is the residual ``h``
(MEMIT/EMMET) or the MLP output (ROME), per :attr:`ValueParams.norm_anchor`. The KL
distribution is read at the last subject token of the KL prompt, where δ is injected, as
the references do.

All facts are optimised in one loop: every fact has its own δ and its own optimiser state
(so its trajectory is exactly the one it would have alone), the rows of all facts share each
forward/backward pass, and a fact that has converged drops out of the batch (its loss
below ``loss_threshold``, or, with ``mpes_extra_steps``, its target the most probable
continuation on all its prompts). Rows are processed in chunks, each chunk back-propagating
its share of ``Σ_f L_f`` as one expression (:func:`_chunk_loss`), so memory stays bounded
for large batches. Each step runs only what δ can change: the blocks above the injection
layer, from the last subject token on (:class:`~editing.upper_stack.UpperStack`) — the
same expression, computed on less of the model.

Adding δ to the block output equals adding it to the MLP output (the MLP's output is the
last term added to the residual in GPT-2, GPT-J and Llama blocks), so ROME's "δ at the MLP
output" and MEMIT's "δ at the residual" are the same computation here; they differ only in
the norm anchor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch

from editing.config import ValueParams
from editing.delta_search import make_search
from editing.evaluation.scoring import log_probs_at
from editing.facts import Fact
from editing.models.adapter import ModelAdapter
from editing.norm_anchor import CAP, rescale
from editing.rows import VStarRows, build_v_star_rows
from editing.tracing import read_states
from editing.upper_stack import UpperStack

log = logging.getLogger(__name__)


STOP_REASONS = ("loss", "nll", "most_probable", "steps")
"""Why a fact's optimisation ended: its loss fell below ``loss_threshold``; its NLL below ``nll_threshold``;
its target's first token was the most probable on all its prompts for ``1 + mpes_extra_steps`` evaluations
(ENCORE's MPES); or the step budget ran out."""


@dataclass
class VStar:
    """Result of the v* optimisation for a batch (rows are facts)."""

    z: torch.Tensor
    """Target residuals ``h + δ`` at the last edit layer (B × d)."""
    delta: torch.Tensor
    initial_nll: torch.Tensor
    final_nll: torch.Tensor
    steps: torch.Tensor
    """Forward passes each fact took part in."""
    final_loss: torch.Tensor | None = None
    """The whole loss (NLL + KL + decay) at each fact's result: what the optimiser minimised."""
    stop_reasons: tuple[str, ...] = ()
    """One of :data:`STOP_REASONS` per fact."""
    dropped: torch.Tensor | None = None
    """With NAS (``values.norm_anchor_scaling``): the facts whose target exceeded the cap and are not edited."""


def compute_v_star(adapter: ModelAdapter, facts: list[Fact], layer: int, prefixes: tuple[str, ...],
                   params: ValueParams, rows_per_chunk: int = 64, autocast: torch.dtype | None = None,
                   anchor: float | None = None) -> VStar:
    """Optimise one δ per fact at block ``layer``'s output; see the module docstring.

    With ``values.norm_anchor_scaling`` the optimised δ is then rescaled by NAS to the anchor norm
    ``anchor`` (:func:`editing.norm_anchor.anchor_norm`, required then).

    Neither the blocks up to ``layer`` nor the positions before the subject depend on
    δ: one full pass records them for every row and each step runs only the blocks
    above, only from the last subject token on (:class:`UpperStack`). Rewrite and KL
    rows share each pass. ``autocast`` (CUDA only) runs the passes under
    ``torch.autocast`` in that dtype; δ, the losses and the softmaxes stay float32.
    """
    if params.norm_anchor_scaling and anchor is None:
        raise ValueError("values.norm_anchor_scaling needs the anchor norm (editing.norm_anchor.anchor_norm)")
    rows = build_v_star_rows(adapter, facts, prefixes, params.kl_prompt)
    n_facts = len(facts)
    stack = UpperStack(adapter, layer, rows.batch, rows.subject_position, rows_per_chunk)
    bare = rows.bare_rows
    h = stack.at(bare, rows.subject_position[bare]).float()                               # (B, d)
    mlp_output = (read_states(adapter, rows.batch.rows(bare), rows.subject_position[bare],
                              mlp_output_layers=[layer]).mlp_outputs[layer].to(adapter.device)
                  if params.norm_anchor == "mlp_output" or params.norm_anchor_scaling else None)
    v_orig = h if params.norm_anchor == "residual" else mlp_output
    anchor_norm = v_orig.norm(dim=1)                                                      # (B,)
    max_norm = params.clamp_norm_factor * anchor_norm

    search = make_search(params.optimizer, n_facts, h.shape[1], max_norm, params.lr, adapter.device)
    state = _Progress(n_facts)
    kl_reference: dict[int, torch.Tensor] = {}

    requires_grad = [p.requires_grad for p in adapter.model.parameters()]
    for parameter in adapter.model.parameters():
        parameter.requires_grad_(False)
    try:
        with stack.active():
            for step in range(params.steps):
                facts_now = state.active.nonzero().flatten()
                points = [search.point(i) for i in range(n_facts)]
                with torch.autocast(adapter.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                    measured = _step(adapter, stack, rows, facts_now, points, anchor_norm, kl_reference, params,
                                     rows_per_chunk)
                loss = measured.loss(params)
                kept = search.observe(facts_now.tolist(), loss)
                state.record(step, facts_now, measured, loss, kept, params)
                if not state.active.any() or step == params.steps - 1:
                    break
                search.advance(state.active.nonzero().flatten().tolist())
    finally:
        for parameter, flag in zip(adapter.model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
    delta = search.result().float().cpu()
    dropped = None
    if params.norm_anchor_scaling:
        delta, dropped = rescale(delta, mlp_output.float().cpu(), anchor)
        log.info("NAS: targets rescaled to norm %.3f, %d of %d facts dropped (above %.1f×)", anchor,
                 int(dropped.sum()), n_facts, CAP)
    log.info("v*: %d facts, mean NLL %.3f -> %.3f, %d steps at most, stopped by %s", n_facts,
             state.initial_nll.mean(), state.final_nll.mean(), int(state.steps.max()),
             {reason: state.reasons.count(reason) for reason in STOP_REASONS})
    return VStar(z=h.cpu() + delta, delta=delta, initial_nll=state.initial_nll, final_nll=state.final_nll,
                 steps=state.steps, final_loss=state.final_loss, stop_reasons=tuple(state.reasons), dropped=dropped)


def mlp_output_at_subject(adapter: ModelAdapter, facts: list[Fact], layer: int) -> torch.Tensor:
    """``v0``: the edited MLP's output at ``layer``, at the last subject token of each fact's bare prompt
    (B × d, float32, CPU) — what NAS rescales."""
    rows = build_v_star_rows(adapter, facts, ("",), "{} is a")
    bare = rows.bare_rows
    return read_states(adapter, rows.batch.rows(bare), rows.subject_position[bare],
                       mlp_output_layers=[layer]).mlp_outputs[layer].float().cpu()


@dataclass
class _Measured:
    """One step's per-fact terms of the loss, for the active facts in order."""

    nll: torch.Tensor
    kl: torch.Tensor
    decay: torch.Tensor
    """``‖δ‖ / ‖v_orig‖²``."""
    most_probable: torch.Tensor
    """Whether the target's first token is the argmax on every one of the fact's prompts."""

    def loss(self, params: ValueParams) -> torch.Tensor:
        """``L = NLL + kl_factor · KL + weight_decay · ‖δ‖ / ‖v_orig‖²`` per fact: what the step minimised."""
        return self.nll + params.kl_factor * self.kl + params.weight_decay * self.decay


class _Progress:
    """Which facts are still optimised, and why the others stopped."""

    def __init__(self, n_facts: int) -> None:
        self.active = torch.ones(n_facts, dtype=torch.bool)
        self.steps = torch.zeros(n_facts, dtype=torch.long)
        self.initial_nll = torch.zeros(n_facts)
        self.final_nll = torch.zeros(n_facts)
        self.final_loss = torch.zeros(n_facts)
        self.most_probable_count = torch.zeros(n_facts, dtype=torch.long)
        self.reasons = ["steps"] * n_facts

    def record(self, step: int, facts: torch.Tensor, measured: _Measured, loss: torch.Tensor, kept: torch.Tensor,
               params: ValueParams) -> None:
        """Count the evaluation of ``facts``; the points their search ``kept`` become their results (a
        rejected line-search trial changes nothing but the count), and may stop them."""
        self.steps[facts] += 1
        if step == 0:
            self.initial_nll[facts] = measured.nll
        facts, loss = facts[kept], loss[kept]
        self.final_nll[facts] = measured.nll[kept]
        self.final_loss[facts] = loss
        self.most_probable_count[facts] += measured.most_probable[kept].long()
        reasons = {"loss": loss < params.loss_threshold,
                   "nll": measured.nll[kept] < (params.nll_threshold if params.nll_threshold is not None else 0.0),
                   "most_probable": (self.most_probable_count[facts] > params.mpes_extra_steps
                                     if params.mpes_extra_steps is not None else torch.zeros_like(loss, dtype=torch.bool))}
        for k, fact in enumerate(facts.tolist()):
            reason = next((name for name, met in reasons.items() if met[k]), None)
            if reason is not None:
                self.active[fact] = False
                self.reasons[fact] = reason


class _ReadPlan(NamedTuple):
    """Where one chunk's logits are read: each rewrite row's target positions, then each KL row's subject."""

    rewrite: torch.Tensor
    """Chunk-local indices of the rewrite rows."""
    kl: torch.Tensor
    """Chunk-local indices of the KL rows."""
    rows: torch.Tensor
    positions: torch.Tensor
    token_ids: torch.Tensor
    """Target token of each rewrite position read (the first ``len(token_ids)`` reads)."""
    token_owner: torch.Tensor
    """For each target token, the index of its row in ``rewrite``."""
    first_tokens: torch.Tensor
    """Index (in the reads) of each rewrite row's first target token."""
    lengths: torch.Tensor


def _read_plan(rows: VStarRows, chunk: torch.Tensor) -> _ReadPlan:
    is_kl = rows.is_kl(chunk)
    rewrite, kl = (~is_kl).nonzero().flatten(), is_kl.nonzero().flatten()
    targets = [rows.target_ids[int(chunk[k])] for k in rewrite.tolist()]
    lengths = torch.tensor([len(target) for target in targets], dtype=torch.long)
    token_rows = rewrite.repeat_interleave(lengths)
    token_positions = torch.tensor([p for k in rewrite.tolist() for p in rows.target_positions[int(chunk[k])]],
                                   dtype=torch.long)
    return _ReadPlan(rewrite=rewrite, kl=kl, rows=torch.cat([token_rows, kl]),
                     positions=torch.cat([token_positions, rows.subject_position[chunk][kl]]),
                     token_ids=torch.tensor([t for target in targets for t in target], dtype=torch.long),
                     token_owner=torch.arange(len(rewrite)).repeat_interleave(lengths),
                     first_tokens=lengths.cumsum(0) - lengths, lengths=lengths)


def _step(adapter: ModelAdapter, stack: UpperStack, rows: VStarRows, facts_now: torch.Tensor,
          deltas: list[torch.Tensor], anchor_norm: torch.Tensor, kl_reference: dict[int, torch.Tensor],
          params: ValueParams, rows_per_chunk: int) -> _Measured:
    """Back-propagate one step's loss ``Σ_f L_f`` over the active facts' rows, chunk by chunk.

    A fact's NLL is the mean over its prompts of the mean per-token target NLL; its KL term
    compares the next-token distribution at the last subject token of its KL prompt with the one
    read at step 0, when its δ was still zero; its decay term is counted in the chunk that holds
    its KL row (every fact has exactly one), so each chunk's loss is one expression of its rows.
    """
    slot = {fact: k for k, fact in enumerate(facts_now.tolist())}
    nll = torch.zeros(len(facts_now))
    kl = torch.zeros(len(facts_now))
    decay = torch.zeros(len(facts_now))
    hits = torch.zeros(len(facts_now), dtype=torch.long)
    for chunk in rows.rows_of(facts_now).split(rows_per_chunk):
        facts = rows.fact_of_row[chunk]
        slots = torch.tensor([slot[f] for f in facts.tolist()])
        states = stack.final_hidden(chunk, torch.stack([deltas[f] for f in facts.tolist()]))
        plan = _read_plan(rows, chunk)
        log_probs = log_probs_at(adapter, states.hidden, plan.rows, plan.positions - states.start.cpu()[plan.rows])
        device = log_probs.device
        n_tokens = len(plan.token_ids)
        token_ids = plan.token_ids.to(device)
        token_log_probs = log_probs[:n_tokens].gather(1, token_ids[:, None])[:, 0]                 # (tokens,)
        row_nll = -torch.zeros(len(plan.rewrite), device=device).index_add(
            0, plan.token_owner.to(device), token_log_probs) / plan.lengths.to(device)             # (rewrite rows,)
        current = log_probs[n_tokens:]                                                              # (KL rows, vocab)
        kl_facts = facts[plan.kl].tolist()
        for index, fact in enumerate(kl_facts):  # read at step 0, when every δ is zero
            kl_reference.setdefault(fact, current[index].detach())
        reference = torch.stack([kl_reference[f] for f in kl_facts]) if kl_facts else current
        divergence = (current.exp() * (current - reference)).sum(dim=1)                            # (KL rows,)
        norm_ratio = torch.stack([deltas[f].norm() / anchor_norm[f] ** 2 for f in kl_facts]) if kl_facts \
            else divergence.new_zeros(0)                                                            # (KL rows,)
        chunk_loss = (row_nll.sum() / rows.n_prefixes + params.kl_factor * divergence.sum()
                      + params.weight_decay * norm_ratio.sum())
        chunk_loss.backward()
        nll.index_add_(0, slots[plan.rewrite], row_nll.detach().cpu() / rows.n_prefixes)
        kl.index_add_(0, slots[plan.kl], divergence.detach().cpu())
        decay.index_add_(0, slots[plan.kl], norm_ratio.detach().cpu())
        hits.index_add_(0, slots[plan.rewrite], _most_probable_rows(log_probs[:n_tokens], token_ids, plan, chunk,
                                                                    rows.n_prefixes, params.mpes_rule))
    checked = rows.n_prefixes - 1 if params.mpes_rule == "encore" and rows.n_prefixes > 1 else rows.n_prefixes
    return _Measured(nll=nll, kl=kl, decay=decay, most_probable=hits == checked)


def _most_probable_rows(log_probs: torch.Tensor, token_ids: torch.Tensor, plan: _ReadPlan, chunk: torch.Tensor,
                        n_prefixes: int, rule: str) -> torch.Tensor:
    """Per rewrite row of the chunk, 1 where MPES counts it as most probable (``values.mpes_rule``): its first
    target token is the argmax (``first_token``), or all its target tokens are and it is a prefixed prompt
    (``encore``; with no prefix the bare prompt is all there is, so it counts)."""
    correct = (log_probs.argmax(dim=1) == token_ids).cpu()                                   # (tokens,)
    if rule == "first_token":
        return correct[plan.first_tokens].long()
    wrong = torch.zeros(len(plan.rewrite), dtype=torch.long).index_add_(0, plan.token_owner, (~correct).long())
    prefixed = chunk[plan.rewrite] % n_prefixes != 0 if n_prefixes > 1 else torch.ones(len(plan.rewrite), dtype=torch.bool)
    return ((wrong == 0) & prefixed).long()
