"""The v* optimisers (editing.delta_search) on problems whose minimum is known in closed form, and on SmolLM2.

Each search is driven here by a plain loop that does what ``compute_v_star`` does with the model — evaluate
every fact's loss at its point, back-propagate, let the search keep or reject the point, move on — but with
loss functions written in the test: a quadratic whose minimiser is solved densely, a ball-constrained one whose
constrained minimiser is the projection, and Rosenbrock's valley. On SmolLM2, L-BFGS must reach a v* loss no
higher than the references' Adam-25 on the same facts, in fewer evaluations.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import pytest
import torch

from editing.config import ValueParams
from editing.delta_search import AdamSearch, LbfgsSearch, make_search
from editing.facts import fact_from_record
from editing.v_star import compute_v_star
from fixtures.data import counterfact_records

Loss = Callable[[int, torch.Tensor], torch.Tensor]


def minimise(search, loss_of: Loss, n_facts: int, steps: int) -> list[list[float]]:
    """Evaluate, observe, advance ``steps`` times; return each fact's kept losses in order."""
    kept_losses: list[list[float]] = [[] for _ in range(n_facts)]
    facts = list(range(n_facts))
    for step in range(steps):
        points = [search.point(i) for i in facts]
        losses = torch.stack([loss_of(i, point) for i, point in zip(facts, points)])
        losses.sum().backward()
        kept = search.observe(facts, losses.detach())
        for i, keep in zip(facts, kept.tolist()):
            if keep:
                kept_losses[i].append(float(losses[i].detach()))
        if step < steps - 1:
            search.advance(facts)
    return kept_losses


def quadratic(matrices: torch.Tensor, centres: torch.Tensor) -> Loss:
    """``½ (δ − a)ᵀ A (δ − a)`` per fact."""
    return lambda i, delta: 0.5 * (delta - centres[i]) @ matrices[i] @ (delta - centres[i])


def test_lbfgs_reaches_a_quadratics_dense_minimum_where_adam_25_does_not():
    torch.manual_seed(0)
    dim, n = 12, 3
    bases = torch.linalg.qr(torch.randn(n, dim, dim))[0]
    spectra = torch.logspace(0, 1.5, dim).expand(n, dim)                                # condition number ~32
    matrices = bases @ torch.diag_embed(spectra) @ bases.transpose(1, 2)
    centres = torch.randn(n, dim)
    minimiser = torch.linalg.solve(matrices, (matrices @ centres[..., None]))[..., 0]      # = a, solved densely
    loss_of = quadratic(matrices, centres)
    wide = torch.full((n,), 1e6)

    lbfgs = LbfgsSearch(n, dim, wide, lr=0.5, device=torch.device("cpu"))
    lbfgs_losses = minimise(lbfgs, loss_of, n, steps=25)
    adam = AdamSearch(n, dim, wide, lr=0.5, device=torch.device("cpu"))
    adam_losses = minimise(adam, loss_of, n, steps=25)

    assert torch.allclose(lbfgs.result(), minimiser, atol=1e-3)
    for i in range(n):
        assert lbfgs_losses[i][-1] < 1e-6
        assert lbfgs_losses[i][-1] <= adam_losses[i][-1]


def test_on_the_clamp_ball_both_searches_end_at_the_projected_minimiser_and_lbfgs_no_higher():
    """For ``½‖δ − a‖²`` with ‖a‖ above the radius r, the constrained minimiser is ``a · r / ‖a‖``."""
    torch.manual_seed(1)
    dim, n = 16, 4
    centres = 10 * torch.randn(n, dim)
    radius = 0.3 * centres.norm(dim=1)
    loss_of = quadratic(torch.eye(dim).expand(n, dim, dim), centres)
    constrained = centres * (radius / centres.norm(dim=1))[:, None]

    lbfgs = LbfgsSearch(n, dim, radius, lr=0.5, device=torch.device("cpu"))
    lbfgs_losses = minimise(lbfgs, loss_of, n, steps=25)
    adam = AdamSearch(n, dim, radius, lr=0.5, device=torch.device("cpu"))
    adam_losses = minimise(adam, loss_of, n, steps=25)

    assert (lbfgs.result().norm(dim=1) <= radius * (1 + 1e-5)).all()
    assert torch.allclose(lbfgs.result(), constrained, atol=1e-3 * float(radius.max()))
    for i in range(n):
        assert lbfgs_losses[i][-1] <= adam_losses[i][-1] + 1e-6


def test_lbfgs_keeps_only_points_that_decrease_the_loss_and_returns_the_last_kept_one():
    """Rosenbrock's valley, where full quasi-Newton steps overshoot and the line search must reject them."""
    rosenbrock: Loss = lambda i, d: (1 - d[0]) ** 2 + 100 * (d[1] - d[0] ** 2) ** 2
    start_loss = 1.0
    search = LbfgsSearch(1, 2, torch.tensor([1e3]), lr=0.1, device=torch.device("cpu"))
    kept = minimise(search, rosenbrock, 1, steps=60)[0]
    assert kept[0] == start_loss
    assert all(later <= earlier for earlier, later in zip(kept, kept[1:]))
    assert len(kept) < 60                                            # some trials were rejected ...
    assert float(rosenbrock(0, search.result()[0])) == pytest.approx(kept[-1])   # ... and never returned
    assert kept[-1] < 1e-4
    adam = AdamSearch(1, 2, torch.tensor([1e3]), lr=0.1, device=torch.device("cpu"))
    assert kept[-1] <= minimise(adam, rosenbrock, 1, steps=60)[0][-1]


def test_an_unknown_optimizer_is_one_line_naming_the_field():
    with pytest.raises(ValueError, match=r"values.optimizer must be one of \('adam', 'lbfgs'\), got 'sgd'"):
        ValueParams(optimizer="sgd")
    with pytest.raises(ValueError, match="values.nll_threshold must be None or > 0"):
        ValueParams(nll_threshold=0.0)
    with pytest.raises(ValueError, match="values.optimizer"):
        make_search("sgd", 1, 2, torch.ones(1), 0.5, torch.device("cpu"))


def test_a_fact_stops_once_its_nll_is_below_the_nll_threshold(tiny_model, facts):
    adapter = tiny_model("llama")
    params = ValueParams(steps=25, loss_threshold=1e-9, n_prefixes=0, optimizer="lbfgs")
    free = compute_v_star(adapter, facts, 1, ("",), params)
    best = int(free.final_nll.argmin())
    threshold = float(free.initial_nll[best] + free.final_nll[best]) / 2      # crossed on the way down
    stopped = compute_v_star(adapter, facts, 1, ("",), replace(params, nll_threshold=threshold))
    assert stopped.stop_reasons[best] == "nll"
    assert stopped.final_nll[best] < threshold and stopped.steps[best] < free.steps[best]
    for i, reason in enumerate(stopped.stop_reasons):
        assert (reason == "nll") == bool(stopped.final_nll[i] < threshold)


@pytest.fixture(scope="module")
def facts():
    return [fact_from_record(record) for record in counterfact_records(0, 4)]


@pytest.fixture(scope="module")
def held_out_facts():
    """counterfact-1000 records 700-702: never used for tuning (the L-BFGS settings came from easyedit-train 0-15)."""
    return [fact_from_record(record, index) for index, record in enumerate(counterfact_records(700, 703), start=700)]


def test_lbfgs_reaches_a_v_star_loss_no_higher_than_adam_25_in_fewer_evaluations(smollm2, held_out_facts):
    prefixes = ("", "The weather was cold that day. ")
    reference = ValueParams(steps=25)                                     # SmolLM2's values: lr .5, clamp 4, …
    adam = compute_v_star(smollm2, held_out_facts, 7, prefixes, reference)
    lbfgs = compute_v_star(smollm2, held_out_facts, 7, prefixes, replace(reference, optimizer="lbfgs", steps=16))
    assert float(lbfgs.final_loss.mean()) <= float(adam.final_loss.mean())
    assert int(lbfgs.steps.sum()) < int(adam.steps.sum())
    assert (lbfgs.delta.norm(dim=1) <= 4.0 * lbfgs.z.sub(lbfgs.delta).norm(dim=1) * (1 + 1e-5)).all()
