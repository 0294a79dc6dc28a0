"""How each fact's δ moves between evaluations of its v* loss: the optimisers of ``values.optimizer``.

:func:`editing.v_star.compute_v_star` evaluates the loss ``L_f(δ_f)`` of every active fact in one
batched forward/backward pass and hands each fact's value and gradient to a *search*; the search
decides whether the evaluated point is kept and where the fact is evaluated next. Every search
minimises the same loss under the same clamp ``‖δ_f‖ ≤ r_f`` (r_f = clamp_norm_factor · ‖v_orig‖), so
only the number of evaluations may differ. Each fact's search is its own: the facts share passes,
never steps or line searches.

* :class:`AdamSearch` (``adam``): the references' procedure — Adam on δ_f, then the projection onto
  the ball; every evaluated point is kept.
* :class:`LbfgsSearch` (``lbfgs``): limited-memory BFGS with a backtracking (Armijo) line search along
  the projected path. δ is one vector per fact (576 numbers on SmolLM2) and L is smooth, so a
  quasi-Newton direction learnt from a few gradient differences takes far fewer evaluations than
  Adam's per-coordinate steps. The first trial moves δ as far as Adam's first step (``lr · √d``)
  along ``−∇L``; later trials start at the quasi-Newton step (t = 1) and halve, at least, until
  ``L(x + Δ) ≤ L(x) + c₁ ∇L(x)·Δ`` for the projected displacement Δ. A rejected trial is never
  returned: a fact's result is its last accepted point.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from editing.config import OPTIMIZERS

ARMIJO_C1 = 1e-4
"""Sufficient decrease: the accepted step must realise this fraction of the first-order prediction."""


class DeltaSearch(Protocol):
    """One optimiser over the per-fact δ, driven by :func:`editing.v_star.compute_v_star`."""

    def point(self, fact: int) -> torch.Tensor:
        """The leaf tensor (requires grad) at which ``fact`` is evaluated next; the pass writes its ``.grad``."""

    def observe(self, facts: list[int], loss: torch.Tensor) -> torch.Tensor:
        """Take the evaluated losses (and the points' gradients); return which points are kept (bool, per fact)."""

    def advance(self, facts: list[int]) -> None:
        """Move each of ``facts`` (still optimising) to its next point."""

    def result(self) -> torch.Tensor:
        """Every fact's kept δ (n × d)."""


def project(delta: torch.Tensor, max_norm: torch.Tensor) -> torch.Tensor:
    """The nearest point of the ball ``‖δ‖ ≤ max_norm`` (a rescaling, as the references' clamp)."""
    norm = delta.norm()
    return delta * (max_norm / norm) if norm > max_norm else delta


class AdamSearch:
    """Adam on each fact's δ (its own parameter, so its trajectory is the one it would have alone), projected
    onto the clamp ball after every step; every evaluated point is kept."""

    def __init__(self, n_facts: int, dim: int, max_norm: torch.Tensor, lr: float, device: torch.device) -> None:
        self.deltas = [torch.zeros(dim, device=device, requires_grad=True) for _ in range(n_facts)]
        self.optimizer = torch.optim.Adam(self.deltas, lr=lr)
        self.max_norm = max_norm

    def point(self, fact: int) -> torch.Tensor:
        return self.deltas[fact]

    def observe(self, facts: list[int], loss: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(facts), dtype=torch.bool)

    def advance(self, facts: list[int]) -> None:
        moving = set(facts)
        for fact, delta in enumerate(self.deltas):  # a fact that stopped keeps its point: Adam skips it
            if fact not in moving:
                delta.grad = None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for fact in facts:
                self.deltas[fact].copy_(project(self.deltas[fact], self.max_norm[fact]))

    def result(self) -> torch.Tensor:
        return torch.stack([delta.detach() for delta in self.deltas])


class _FactLbfgs:
    """One fact's L-BFGS state: the kept point, its loss and gradient, the curvature pairs, the trial."""

    def __init__(self, dim: int, device: torch.device, history: int) -> None:
        self.x = torch.zeros(dim, device=device)
        self.loss = math.inf
        self.grad = torch.zeros(dim, device=device)
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.history = history
        self.direction = torch.zeros(dim, device=device)
        self.t = 1.0
        self.trial = torch.zeros(dim, device=device, requires_grad=True)
        self.trial_loss = math.inf

    def quasi_newton_direction(self) -> torch.Tensor:
        """``−H ∇L`` by the two-loop recursion, ``H₀ = (sᵀy / yᵀy) I`` from the newest pair."""
        q = self.grad.clone()
        alphas = []
        for s, y in reversed(self.pairs):
            alpha = (s @ q) / (y @ s)
            q -= alpha * y
            alphas.append(alpha)
        s, y = self.pairs[-1]
        r = q * ((s @ y) / (y @ y))
        for (s, y), alpha in zip(self.pairs, reversed(alphas)):
            beta = (y @ r) / (y @ s)
            r += (alpha - beta) * s
        return -r

    def remember(self, s: torch.Tensor, y: torch.Tensor) -> None:
        """Keep the pair only where it carries positive curvature (sᵀy > 0), so H stays positive definite."""
        if float(s @ y) > 1e-10 * float(s.norm() * y.norm()):
            self.pairs = [*self.pairs, (s, y)][-self.history:]


class LbfgsSearch:
    """L-BFGS per fact with a backtracking Armijo line search on the projected path (module docstring)."""

    def __init__(self, n_facts: int, dim: int, max_norm: torch.Tensor, lr: float, device: torch.device,
                 history: int = 8) -> None:
        self.facts = [_FactLbfgs(dim, device, history) for _ in range(n_facts)]
        self.max_norm = max_norm
        self.first_step = lr * math.sqrt(dim)
        """Adam's first step moves every coordinate by lr: a length of lr · √d."""
        self.accepted = torch.zeros(n_facts, dtype=torch.bool)

    def point(self, fact: int) -> torch.Tensor:
        return self.facts[fact].trial

    def observe(self, facts: list[int], loss: torch.Tensor) -> torch.Tensor:
        kept = torch.zeros(len(facts), dtype=torch.bool)
        for k, fact in enumerate(facts):
            state = self.facts[fact]
            trial, grad, value = state.trial.detach(), state.trial.grad.detach().clone(), float(loss[k])
            state.trial.grad = None
            state.trial_loss = value
            step = trial - state.x
            first = math.isinf(state.loss)
            if first or value <= state.loss + ARMIJO_C1 * float(state.grad @ step):
                if not first:
                    state.remember(step, grad - state.grad)
                state.x, state.loss, state.grad = trial.clone(), value, grad
                kept[k] = True
            self.accepted[fact] = kept[k]
        return kept

    def advance(self, facts: list[int]) -> None:
        for fact in facts:
            state = self.facts[fact]
            if self.accepted[fact]:
                state.direction, state.t = self._direction(state), 1.0
            else:
                state.t = self._backtrack(state)
            trial = project(state.x + state.t * state.direction, self.max_norm[fact])
            state.trial = trial.detach().requires_grad_()

    def _direction(self, state: _FactLbfgs) -> torch.Tensor:
        """The quasi-Newton direction; steepest descent of Adam's first-step length when there is no
        curvature yet or the quasi-Newton direction does not descend."""
        if state.pairs:
            direction = state.quasi_newton_direction()
            if float(direction @ state.grad) < 0:
                return direction
            state.pairs = []
        return -state.grad * (self.first_step / state.grad.norm().clamp_min(1e-12))

    @staticmethod
    def _backtrack(state: _FactLbfgs) -> float:
        """The minimiser of the quadratic through L(x), its slope along the direction and L at the rejected
        trial, kept within [0.1 t, 0.5 t]."""
        t, slope = state.t, float(state.grad @ state.direction)
        curvature = state.trial_loss - state.loss - slope * t
        proposal = -slope * t * t / (2 * curvature) if curvature > 0 else 0.5 * t
        return min(max(proposal, 0.1 * t), 0.5 * t)

    def result(self) -> torch.Tensor:
        return torch.stack([state.x for state in self.facts])


def make_search(optimizer: str, n_facts: int, dim: int, max_norm: torch.Tensor, lr: float,
                device: torch.device) -> DeltaSearch:
    """The search named by ``values.optimizer``."""
    if optimizer == "adam":
        return AdamSearch(n_facts, dim, max_norm, lr, device)
    if optimizer == "lbfgs":
        return LbfgsSearch(n_facts, dim, max_norm, lr, device)
    raise ValueError(f"values.optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
