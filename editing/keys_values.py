"""k* and v* for a whole batch of facts at once.

* **k\\*** of a fact at layer ``l``: the edited module's input at the last
  subject token of ``prefix + prompt``, averaged as the batched references do
  (MEMIT/UME ``compute_ks``): the context prefixes form one context type and
  the bare prompt another, each type is averaged, then the types — so the bare
  prompt weighs as much as all prefixed prompts together (ROME's single-fact
  code takes a plain mean over all prompts instead; seqedit uses the batched
  references' weighting for every objective, ROME included).
* **v\\*** (here: the target residual ``z``) of a fact at the last edit layer
  ``l_T``: ``z = h + δ``, where ``h`` is the block output at the last subject
  token of the bare prompt and ``δ`` minimises (MATH.md)

  ``mean_j NLL(target_new | prefix_j + prompt) + kl_factor · KL(P_δ ‖ P) on "{subject} is a"
  + weight_decay · ‖δ‖ / ‖v_orig‖²``

  with Adam, projecting ``‖δ‖ ≤ clamp_norm_factor · ‖v_orig‖`` after each step
  and freezing a fact once its loss is below ``loss_threshold``. ``v_orig`` is
  the residual ``h`` (MEMIT/EMMET) or the MLP output (ROME), per
  :attr:`ValueParams.norm_anchor`. The KL distribution is read at the last
  subject token of the KL prompt, where δ is injected, as the references do.

All facts are optimised in one loop: every fact has its own δ (a separate
Adam parameter, so its trajectory is exactly the one it would have alone), the
rows of all facts share each forward/backward pass, and a fact that has
converged drops out of the batch (its loss below ``loss_threshold``, or, with
``mpes_extra_steps``, its target the most probable continuation on all its
prompts). Rows are processed in chunks with gradient accumulation so memory
stays bounded for large batches. Each step runs only what δ can change: the
blocks above the injection layer, from the last subject token on
(:class:`~editing.tracing.UpperStack`).

Adding δ to the block output equals adding it to the MLP output (the MLP's
output is the last term added to the residual in GPT-2, GPT-J and Llama
blocks), so ROME's "δ at the MLP output" and MEMIT's "δ at the residual" are the
same computation here; they differ only in the norm anchor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch

from editing.config import ValueParams
from editing.facts import Fact
from editing.models.adapter import ModelAdapter
from editing.tokens import PaddedBatch, encode_target, last_token_before, pad_right
from editing.tracing import UpperStack, log_probs_at, read_states

log = logging.getLogger(__name__)


@dataclass
class RewriteRows:
    """Tokenised ``prefix_j + prompt_i (+ target_i[:-1])`` rows, facts-major.

    Row ``i * n_prefixes + j`` is fact ``i`` with prefix ``j``; prefix 0 is the
    empty prefix, so rows ``i * n_prefixes`` are the bare prompts.
    """

    batch: PaddedBatch
    fact_of_row: torch.Tensor
    subject_position: torch.Tensor
    target_positions: list[list[int]]
    """Per row, the positions whose logits predict the target tokens."""
    target_ids: list[list[int]]
    n_prefixes: int

    @property
    def bare_rows(self) -> torch.Tensor:
        return torch.arange(0, len(self.fact_of_row), self.n_prefixes)

    @property
    def prefix_weights(self) -> torch.Tensor:
        """Weight of each prefix in a fact's k*: ½ for the bare prompt and ½ shared by the others
        (the batched references' two context types), or 1 when there is only the bare prompt."""
        if self.n_prefixes == 1:
            return torch.ones(1)
        others = torch.full((self.n_prefixes - 1,), 0.5 / (self.n_prefixes - 1))
        return torch.cat([torch.tensor([0.5]), others])


def build_rewrite_rows(adapter: ModelAdapter, facts: list[Fact], prefixes: tuple[str, ...],
                       with_targets: bool = True) -> RewriteRows:
    tokenizer = adapter.tokenizer
    sequences, fact_of_row, subject_position, target_positions, target_ids = [], [], [], [], []
    for index, fact in enumerate(facts):
        target = encode_target(tokenizer, fact.target_new) if with_targets else []
        span_end = fact.subject_span[1]
        for prefix in prefixes:
            ids, position = last_token_before(tokenizer, prefix + fact.rewrite_prompt, len(prefix) + span_end)
            sequences.append(ids + target[:-1])
            fact_of_row.append(index)
            subject_position.append(position)
            target_positions.append([len(ids) - 1 + t for t in range(len(target))])
            target_ids.append(target)
    return RewriteRows(pad_right(sequences, tokenizer.pad_token_id), torch.tensor(fact_of_row),
                       torch.tensor(subject_position), target_positions, target_ids, len(prefixes))


def build_kl_rows(adapter: ModelAdapter, facts: list[Fact], kl_prompt: str) -> tuple[PaddedBatch, torch.Tensor]:
    """Rows ``kl_prompt.format(subject)``: (batch, last-subject-token positions, where δ goes and KL is read)."""
    start = kl_prompt.index("{}")
    sequences, subject_position = [], []
    for fact in facts:
        text = kl_prompt.replace("{}", fact.subject, 1)
        ids, position = last_token_before(adapter.tokenizer, text, start + len(fact.subject))
        sequences.append(ids)
        subject_position.append(position)
    return pad_right(sequences, adapter.tokenizer.pad_token_id), torch.tensor(subject_position)


def compute_keys(adapter: ModelAdapter, rows: RewriteRows, layer: int, n_facts: int,
                 residual_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """k* per fact at ``layer`` (B × d_in, weighted by :attr:`RewriteRows.prefix_weights`) and, optionally,
    the current residual at ``residual_layer`` on the bare prompts (B × d) — one forward pass for both."""
    residual_layers = [residual_layer] if residual_layer is not None else []
    keys, residuals, _ = read_states(adapter, rows.batch, rows.subject_position, [layer], residual_layers)
    weight_of_row = rows.prefix_weights.repeat(n_facts)[:, None]
    mean_keys = torch.zeros(n_facts, keys[layer].shape[1]).index_add_(0, rows.fact_of_row, keys[layer] * weight_of_row)
    current = residuals[residual_layer][rows.bare_rows] if residual_layer is not None else None
    return mean_keys, current


@dataclass
class ValueRows:
    """Every row the v* optimisation runs, in one padded batch: the rewrite rows of
    :class:`RewriteRows` (facts-major, with targets), then one KL row per fact."""

    batch: PaddedBatch
    fact_of_row: torch.Tensor
    subject_position: torch.Tensor
    """Where δ is added (the last subject token), in rewrite and KL rows alike."""
    target_positions: list[list[int]]
    """Per rewrite row, the positions whose logits predict the target tokens (empty for KL rows)."""
    target_ids: list[list[int]]
    n_facts: int
    n_prefixes: int

    @property
    def bare_rows(self) -> torch.Tensor:
        return torch.arange(0, self.n_facts * self.n_prefixes, self.n_prefixes)

    def rows_of(self, facts: torch.Tensor) -> torch.Tensor:
        """The rewrite rows and the KL row of each of ``facts``, fact by fact."""
        per_fact = [torch.cat([torch.arange(f * self.n_prefixes, (f + 1) * self.n_prefixes),
                               torch.tensor([self.n_facts * self.n_prefixes + f])]) for f in facts.tolist()]
        return torch.cat(per_fact)

    def is_kl(self, rows: torch.Tensor) -> torch.Tensor:
        return rows >= self.n_facts * self.n_prefixes


def build_value_rows(adapter: ModelAdapter, facts: list[Fact], prefixes: tuple[str, ...], kl_prompt: str) -> ValueRows:
    rewrite = build_rewrite_rows(adapter, facts, prefixes)
    kl_batch, kl_subject = build_kl_rows(adapter, facts, kl_prompt)
    sequences = [row[mask.bool()].tolist() for batch in (rewrite.batch, kl_batch)
                 for row, mask in zip(batch.input_ids, batch.attention_mask)]
    return ValueRows(pad_right(sequences, adapter.tokenizer.pad_token_id),
                     torch.cat([rewrite.fact_of_row, torch.arange(len(facts))]),
                     torch.cat([rewrite.subject_position, kl_subject]),
                     rewrite.target_positions + [[] for _ in facts], rewrite.target_ids + [[] for _ in facts],
                     len(facts), len(prefixes))


STOP_REASONS = ("loss", "most_probable", "steps")
"""Why a fact's optimisation ended: its loss fell below ``loss_threshold``; its target's first token was
the most probable on all its prompts for ``1 + mpes_extra_steps`` evaluations (ENCORE's MPES); or the
step budget ran out."""


@dataclass
class ValueTargets:
    """Result of the v* optimisation for a batch (rows are facts)."""

    z: torch.Tensor
    """Target residuals ``h + δ`` at the last edit layer (B × d)."""
    delta: torch.Tensor
    initial_nll: torch.Tensor
    final_nll: torch.Tensor
    steps: torch.Tensor
    """Forward passes each fact took part in."""
    stop_reasons: tuple[str, ...] = ()
    """One of :data:`STOP_REASONS` per fact."""


def compute_value_targets(adapter: ModelAdapter, facts: list[Fact], layer: int,
                          prefixes: tuple[str, ...], params: ValueParams,
                          rows_per_chunk: int = 64, autocast: torch.dtype | None = None) -> ValueTargets:
    """Optimise one δ per fact at block ``layer``'s output; see the module docstring.

    Neither the blocks up to ``layer`` nor the positions before the subject depend on
    δ: one full pass records them for every row and each step runs only the blocks
    above, only from the last subject token on (:class:`UpperStack`). Rewrite and KL
    rows share each pass. ``autocast`` (CUDA only) runs the passes under
    ``torch.autocast`` in that dtype; δ, the losses and the softmaxes stay float32.
    """
    rows = build_value_rows(adapter, facts, prefixes, params.kl_prompt)
    n_facts = len(facts)
    stack = UpperStack(adapter, layer, rows.batch, rows.subject_position, rows_per_chunk)
    bare = rows.bare_rows
    h = stack.at(bare, rows.subject_position[bare]).float()
    if params.norm_anchor == "residual":
        v_orig = h
    else:
        v_orig = read_states(adapter, rows.batch.rows(bare), rows.subject_position[bare],
                             value_layers=[layer]).values[layer].to(adapter.device)
    anchor_norm = v_orig.norm(dim=1)
    max_norm = params.clamp_norm_factor * anchor_norm

    deltas = [torch.zeros(h.shape[1], device=adapter.device, requires_grad=True) for _ in facts]
    optimizer = torch.optim.Adam(deltas, lr=params.lr)
    state = _Progress(n_facts)
    kl_reference: dict[int, torch.Tensor] = {}

    requires_grad = [p.requires_grad for p in adapter.model.parameters()]
    for parameter in adapter.model.parameters():
        parameter.requires_grad_(False)
    try:
        with stack.active():
            for step in range(params.steps):
                facts_now = state.active.nonzero().flatten()
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(adapter.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                    measured = _step_losses(adapter, stack, rows, facts_now, deltas, kl_reference, params,
                                            rows_per_chunk)
                decay = torch.stack([deltas[i].norm() for i in facts_now.tolist()]) / anchor_norm[facts_now] ** 2
                (params.weight_decay * decay).sum().backward()
                loss = measured.nll + params.kl_factor * measured.kl + params.weight_decay * decay.detach().cpu()
                state.record(step, facts_now, measured, loss, params)
                if not state.active.any() or step == params.steps - 1:
                    break
                for i in facts_now[~state.active[facts_now]].tolist():
                    deltas[i].grad = None
                optimizer.step()
                with torch.no_grad():
                    for i in state.active.nonzero().flatten().tolist():
                        norm = deltas[i].norm()
                        if norm > max_norm[i]:
                            deltas[i].mul_(max_norm[i] / norm)
    finally:
        for parameter, flag in zip(adapter.model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
    delta = torch.stack([d.detach() for d in deltas]).float().cpu()
    log.info("v*: %d facts, mean NLL %.3f -> %.3f, %d steps at most, stopped by %s", n_facts,
             state.initial_nll.mean(), state.final_nll.mean(), int(state.steps.max()),
             {reason: state.reasons.count(reason) for reason in STOP_REASONS})
    return ValueTargets(z=h.cpu() + delta, delta=delta, initial_nll=state.initial_nll, final_nll=state.final_nll,
                        steps=state.steps, stop_reasons=tuple(state.reasons))


@dataclass
class _Measured:
    """One step's per-fact measurements, for the active facts in order."""

    nll: torch.Tensor
    kl: torch.Tensor
    most_probable: torch.Tensor
    """Whether the target's first token is the argmax on every one of the fact's prompts."""


class _Progress:
    """Which facts are still optimised, and why the others stopped."""

    def __init__(self, n_facts: int) -> None:
        self.active = torch.ones(n_facts, dtype=torch.bool)
        self.steps = torch.zeros(n_facts, dtype=torch.long)
        self.initial_nll = torch.zeros(n_facts)
        self.final_nll = torch.zeros(n_facts)
        self.most_probable_count = torch.zeros(n_facts, dtype=torch.long)
        self.reasons = ["steps"] * n_facts

    def record(self, step: int, facts: torch.Tensor, measured: _Measured, loss: torch.Tensor,
               params: ValueParams) -> None:
        self.steps[facts] += 1
        self.final_nll[facts] = measured.nll
        if step == 0:
            self.initial_nll[facts] = measured.nll
        self.most_probable_count[facts] += measured.most_probable.long()
        converged = loss < params.loss_threshold
        most_probable = torch.zeros_like(converged)
        if params.mpes_extra_steps is not None:
            most_probable = self.most_probable_count[facts] > params.mpes_extra_steps
        for fact, by_loss, by_rank in zip(facts.tolist(), converged.tolist(), most_probable.tolist()):
            if by_loss or by_rank:
                self.active[fact] = False
                self.reasons[fact] = "loss" if by_loss else "most_probable"


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


def _read_plan(rows: ValueRows, chunk: torch.Tensor) -> _ReadPlan:
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


def _step_losses(adapter: ModelAdapter, stack: UpperStack, rows: ValueRows, facts_now: torch.Tensor,
                 deltas: list[torch.Tensor], kl_reference: dict[int, torch.Tensor], params: ValueParams,
                 rows_per_chunk: int) -> _Measured:
    """Back-propagate one step's NLL and KL terms over the active facts' rows, chunk by chunk.

    A fact's NLL is the mean over its prompts of the mean per-token target NLL; its KL
    term compares the next-token distribution at the last subject token of its KL
    prompt with the one read at step 0, when its δ was still zero.
    """
    slot = {fact: k for k, fact in enumerate(facts_now.tolist())}
    nll = torch.zeros(len(facts_now))
    kl = torch.zeros(len(facts_now))
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
        token_log_probs = log_probs[:n_tokens].gather(1, token_ids[:, None])[:, 0]
        row_nll = -torch.zeros(len(plan.rewrite), device=device).index_add(
            0, plan.token_owner.to(device), token_log_probs) / plan.lengths.to(device)
        current = log_probs[n_tokens:]
        kl_facts = facts[plan.kl].tolist()
        for index, fact in enumerate(kl_facts):  # read at step 0, when every δ is zero
            kl_reference.setdefault(fact, current[index].detach())
        reference = torch.stack([kl_reference[f] for f in kl_facts]) if kl_facts else current
        divergence = (current.exp() * (current - reference)).sum(dim=1)
        (row_nll.sum() / rows.n_prefixes + params.kl_factor * divergence.sum()).backward()
        nll.index_add_(0, slots[plan.rewrite], row_nll.detach().cpu() / rows.n_prefixes)
        kl.index_add_(0, slots[plan.kl], divergence.detach().cpu())
        first = plan.first_tokens.to(device)
        hits.index_add_(0, slots[plan.rewrite], (log_probs[first].argmax(dim=1) == token_ids[first]).long().cpu())
    return _Measured(nll=nll, kl=kl, most_probable=hits == rows.n_prefixes)
