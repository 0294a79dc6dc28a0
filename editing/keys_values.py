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
converged drops out of the batch. Rows are processed in chunks with gradient
accumulation so memory stays bounded for large batches.

Adding δ to the block output equals adding it to the MLP output (the MLP's
output is the last term added to the residual in GPT-2, GPT-J and Llama
blocks), so ROME's "δ at the MLP output" and MEMIT's "δ at the residual" are the
same computation here; they differ only in the norm anchor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from editing.config import ValueParams
from editing.facts import Fact
from editing.models.adapter import ModelAdapter
from editing.tokens import PaddedBatch, encode_target, last_token_before, pad_right
from editing.tracing import ResidualInjection, hidden_states, log_probs_at, read_states

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
class ValueTargets:
    """Result of the v* optimisation for a batch (rows are facts)."""

    z: torch.Tensor
    """Target residuals ``h + δ`` at the last edit layer (B × d)."""
    delta: torch.Tensor
    initial_nll: torch.Tensor
    final_nll: torch.Tensor
    steps: torch.Tensor
    """Forward passes each fact took part in."""


def compute_value_targets(adapter: ModelAdapter, facts: list[Fact], layer: int,
                          prefixes: tuple[str, ...], params: ValueParams,
                          rows_per_chunk: int = 64) -> ValueTargets:
    """Optimise one δ per fact at block ``layer``'s output; see the module docstring."""
    rows = build_rewrite_rows(adapter, facts, prefixes)
    kl_batch, kl_subject = build_kl_rows(adapter, facts, params.kl_prompt)
    n_facts = len(facts)
    states = read_states(adapter, rows.batch.rows(rows.bare_rows), rows.subject_position[rows.bare_rows],
                         residual_layers=[layer], value_layers=[layer])
    h = states.residuals[layer].to(adapter.device)
    v_orig = h if params.norm_anchor == "residual" else states.values[layer].to(adapter.device)
    anchor_norm = v_orig.norm(dim=1)
    max_norm = params.clamp_norm_factor * anchor_norm

    deltas = [torch.zeros(h.shape[1], device=adapter.device, requires_grad=True) for _ in facts]
    optimizer = torch.optim.Adam(deltas, lr=params.lr)
    active = torch.ones(n_facts, dtype=torch.bool)
    steps = torch.zeros(n_facts, dtype=torch.long)
    initial_nll = torch.zeros(n_facts)
    final_nll = torch.zeros(n_facts)
    kl_reference: torch.Tensor | None = None
    injection = ResidualInjection(adapter, layer)

    requires_grad = [p.requires_grad for p in adapter.model.parameters()]
    for parameter in adapter.model.parameters():
        parameter.requires_grad_(False)
    try:
        with injection.active():
            for step in range(params.steps):
                facts_now = active.nonzero().flatten()
                optimizer.zero_grad(set_to_none=True)
                nll = _accumulate_nll(adapter, rows, facts_now, deltas, injection, rows_per_chunk)
                kl, kl_reference = _accumulate_kl(adapter, kl_batch, kl_subject, facts_now, deltas,
                                                  injection, kl_reference, params.kl_factor)
                decay = torch.stack([deltas[i].norm() for i in facts_now.tolist()]) / anchor_norm[facts_now] ** 2
                (params.weight_decay * decay).sum().backward()
                loss = nll + params.kl_factor * kl.detach() + params.weight_decay * decay.detach().cpu()
                steps[facts_now] += 1
                final_nll[facts_now] = nll
                if step == 0:
                    initial_nll[:] = nll
                done = loss < params.loss_threshold
                active[facts_now[done]] = False
                if not active.any() or step == params.steps - 1:
                    break
                for i in facts_now[done].tolist():
                    deltas[i].grad = None
                optimizer.step()
                with torch.no_grad():
                    for i in active.nonzero().flatten().tolist():
                        norm = deltas[i].norm()
                        if norm > max_norm[i]:
                            deltas[i].mul_(max_norm[i] / norm)
    finally:
        for parameter, flag in zip(adapter.model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
    delta = torch.stack([d.detach() for d in deltas]).float().cpu()
    log.info("v*: %d facts, mean NLL %.3f -> %.3f, %d forward passes at most", n_facts,
             initial_nll.mean(), final_nll.mean(), int(steps.max()))
    return ValueTargets(z=h.float().cpu() + delta, delta=delta, initial_nll=initial_nll, final_nll=final_nll,
                        steps=steps)


def _accumulate_nll(adapter: ModelAdapter, rows: RewriteRows, facts_now: torch.Tensor, deltas: list[torch.Tensor],
                    injection: ResidualInjection, rows_per_chunk: int) -> torch.Tensor:
    """Back-propagate each active fact's mean-over-prefixes target NLL; return the per-fact NLL (B_active)."""
    position_in_active = {fact: k for k, fact in enumerate(facts_now.tolist())}
    active_rows = torch.cat([torch.arange(f * rows.n_prefixes, (f + 1) * rows.n_prefixes) for f in facts_now.tolist()])
    nll = torch.zeros(len(facts_now))
    for chunk in active_rows.split(rows_per_chunk):
        chunk_facts = rows.fact_of_row[chunk]
        injection.delta = torch.stack([deltas[f] for f in chunk_facts.tolist()])
        injection.positions = rows.subject_position[chunk]
        hidden = hidden_states(adapter, rows.batch.rows(chunk))
        local_rows = torch.cat([torch.full((len(rows.target_positions[r]),), k) for k, r in enumerate(chunk.tolist())])
        positions = torch.tensor([p for r in chunk.tolist() for p in rows.target_positions[r]])
        ids = torch.tensor([t for r in chunk.tolist() for t in rows.target_ids[r]], device=hidden.device)
        token_log_probs = log_probs_at(adapter, hidden, local_rows, positions).gather(1, ids[:, None])[:, 0]
        lengths = torch.tensor([len(rows.target_ids[r]) for r in chunk.tolist()], device=hidden.device)
        row_nll = -torch.zeros(len(chunk), device=hidden.device).index_add(0, local_rows.to(hidden.device),
                                                                            token_log_probs) / lengths
        (row_nll.sum() / rows.n_prefixes).backward()
        slots = torch.tensor([position_in_active[f] for f in chunk_facts.tolist()])
        nll.index_add_(0, slots, row_nll.detach().cpu() / rows.n_prefixes)
    return nll


def _accumulate_kl(adapter: ModelAdapter, batch: PaddedBatch, subject: torch.Tensor,
                   facts_now: torch.Tensor, deltas: list[torch.Tensor], injection: ResidualInjection,
                   reference: torch.Tensor | None, kl_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Back-propagate ``kl_factor · KL(P_δ ‖ P)`` on the KL prompts of the active facts, with both
    distributions read at the last subject token (where δ is injected), as the references do.

    The reference distribution ``P`` is read on the first call, when every δ is
    still zero, so it costs no extra forward pass.
    """
    injection.delta = torch.stack([deltas[f] for f in facts_now.tolist()])
    injection.positions = subject[facts_now]
    hidden = hidden_states(adapter, batch.rows(facts_now))
    log_probs = log_probs_at(adapter, hidden, torch.arange(len(facts_now)), subject[facts_now])
    if reference is None:
        reference = log_probs.detach()
    kl = (log_probs.exp() * (log_probs - reference[facts_now])).sum(dim=1)
    (kl_factor * kl.sum()).backward()
    return kl.detach().cpu(), reference
