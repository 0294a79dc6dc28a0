"""Property tests of the objectives on random well-conditioned problems (float64)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from editing.config import ObjectiveParams
from editing.objectives import memorization, solve

PLAIN = ObjectiveParams(mom2_update_weight=1.0, update_norm_lambda=0.0, emmet_lambda=0.0)


def _solve(name: str, w0: torch.Tensor, c0: torch.Tensor, k_e: torch.Tensor, v_e: torch.Tensor,
           params: ObjectiveParams, **options) -> object:
    """The objective asked to write ``V_E`` for ``K_E`` into ``W0``: its residual is ``R = V_E − W0 K_E``."""
    return solve(name, c0, k_e, v_e - w0 @ k_e, params, **options)


def problem(seed: int, d_in: int, d_out: int, batch: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(d_in, 4 * d_in, generator=generator, dtype=torch.float64)
    c0 = a @ a.T / a.shape[1] + 0.1 * torch.eye(d_in, dtype=torch.float64)
    w0 = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)
    k_e = torch.randn(d_in, batch, generator=generator, dtype=torch.float64)
    v_e = torch.randn(d_out, batch, generator=generator, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (w0, c0, k_e, v_e))


dims = st.tuples(st.integers(0, 10_000), st.integers(16, 48), st.integers(8, 24), st.integers(1, 8))


@settings(max_examples=25, deadline=None)
@given(dims)
def test_emmet_satisfies_its_constraints(case):
    w0, c0, k_e, v_e = problem(*case)
    delta = _solve("emmet", w0, c0, k_e, v_e, PLAIN)
    edited = w0 + delta.u @ delta.v.T
    error = torch.linalg.norm(edited @ k_e - v_e) / torch.linalg.norm(v_e)
    assert error < 1e-6


@settings(max_examples=25, deadline=None)
@given(dims)
def test_memit_satisfies_its_normal_equations(case):
    w0, c0, k_e, v_e = problem(*case)
    params = ObjectiveParams(mom2_update_weight=3.0, update_norm_lambda=0.5)
    delta = _solve("memit", w0, c0, k_e, v_e, params)
    dense = delta.u @ delta.v.T
    residual = v_e - w0 @ k_e
    lhs = dense @ (3.0 * c0 + 0.5 * torch.eye(c0.shape[0], dtype=c0.dtype) + k_e @ k_e.T)
    torch.testing.assert_close(lhs, residual @ k_e.T, rtol=1e-9, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(dims)
def test_update_rank_is_at_most_the_batch_size(case):
    w0, c0, k_e, v_e = problem(*case)
    for name in ("memit", "emmet"):
        delta = _solve(name, w0, c0, k_e, v_e, ObjectiveParams(mom2_update_weight=2.0, emmet_lambda=0.1))
        assert delta.rank == k_e.shape[1]
        assert torch.linalg.matrix_rank(delta.u @ delta.v.T) <= k_e.shape[1]


@settings(max_examples=25, deadline=None)
@given(st.tuples(st.integers(0, 10_000), st.integers(16, 48), st.integers(8, 24), st.just(1)))
def test_emmet_with_one_fact_is_rome_closed_form(case):
    w0, c0, k_e, v_e = problem(*case)
    params = ObjectiveParams(mom2_update_weight=5.0, emmet_lambda=0.1)  # λ_E is not used for B = 1
    c = 5.0 * c0
    c_inv_k = torch.linalg.solve(c, k_e)
    expected = (v_e - w0 @ k_e) @ c_inv_k.T / (k_e.T @ c_inv_k)
    for name in ("emmet", "rome"):
        delta = _solve(name, w0, c0, k_e, v_e, params)
        torch.testing.assert_close(delta.u @ delta.v.T, expected, rtol=1e-9, atol=1e-10)


def test_emmet_does_not_depend_on_lambda_without_ridges():
    w0, c0, k_e, v_e = problem(3, 32, 16, 5)
    first = _solve("emmet", w0, c0, k_e, v_e, ObjectiveParams(mom2_update_weight=1.0, emmet_lambda=0.0))
    second = _solve("emmet", w0, c0, k_e, v_e, ObjectiveParams(mom2_update_weight=1e4, emmet_lambda=0.0))
    torch.testing.assert_close(first.u @ first.v.T, second.u @ second.v.T, rtol=1e-8, atol=1e-10)


def test_emmet_falls_back_to_the_pseudo_inverse_for_duplicate_keys(caplog):
    w0, c0, k_e, v_e = problem(5, 24, 12, 3)
    k_e = torch.cat([k_e, k_e[:, :1]], dim=1)        # fact 4 has fact 1's key ...
    v_e = torch.cat([v_e, v_e[:, :1]], dim=1)        # ... and the same target: consistent
    delta = _solve("emmet", w0, c0, k_e, v_e, PLAIN)
    assert "pseudo-inverse" in caplog.text
    dense = delta.u @ delta.v.T
    assert torch.isfinite(dense).all()
    torch.testing.assert_close((w0 + dense) @ k_e, v_e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lambda_e", [0.0, 1e-6, 0.25])
def test_emmet_with_more_facts_than_key_dimensions_writes_the_residuals_best_fit(lambda_e, caplog):
    """B > d_in (SmolLM2 at B = 2,048 against 1,536 key dimensions): ``ΔW K_E = R`` has no solution, since every
    row of ``ΔW K_E`` lies in the row space of ``K_E``. λ_E = 0 gives the pseudo-inverse and λ_E → 0 tends to the
    best any update can do, ``ΔW K_E = R P`` with ``P = K_E⁺ K_E`` the projection onto that row space (computed
    here by SVD); a larger λ_E is the dense ridge closed form and writes less."""
    w0, c0, k_e, v_e = problem(11, 16, 8, 40)
    residual = v_e - w0 @ k_e
    _, singular, vh = torch.linalg.svd(k_e, full_matrices=False)
    rows = vh[singular > 1e-10 * singular[0]]                                  # orthonormal basis, 16 × 40
    best = residual @ rows.T @ rows                                            # R P
    best_share = 1 - float(torch.linalg.norm(residual - best) / torch.linalg.norm(residual))
    delta = _solve("emmet", w0, c0, k_e, v_e, ObjectiveParams(mom2_update_weight=1.0, emmet_lambda=lambda_e))
    written = delta.u @ delta.v.T @ k_e
    share = memorization(k_e, residual, delta)
    if lambda_e == 0.0:
        assert "pseudo-inverse" in caplog.text
    if lambda_e < 1e-3:
        torch.testing.assert_close(written, best, rtol=1e-5, atol=1e-5)
        assert share == pytest.approx(best_share, abs=1e-5)
    else:
        c_inv = torch.linalg.inv(c0)
        d = k_e.T @ c_inv @ k_e + lambda_e * torch.eye(40, dtype=c0.dtype)
        torch.testing.assert_close(delta.u @ delta.v.T, residual @ torch.linalg.inv(d) @ k_e.T @ c_inv,
                                   rtol=1e-8, atol=1e-10)
        assert share < best_share
    assert 0.2 < best_share < 0.8  # 16 of 40 directions: the constraints cannot hold


def test_float32_inputs_are_solved_in_float64():
    w0, c0, k_e, v_e = problem(7, 32, 16, 4, dtype=torch.float32)
    delta = _solve("emmet", w0, c0, k_e, v_e, PLAIN)
    assert delta.u.dtype == delta.v.dtype == torch.float64
    edited = w0.double() + delta.u @ delta.v.T
    assert torch.linalg.norm(edited @ k_e.double() - v_e.double()) / torch.linalg.norm(v_e.double()) < 1e-6


def test_bad_input_is_rejected_clearly():
    w0, c0, k_e, v_e = problem(1, 16, 8, 2)
    with pytest.raises(ValueError, match="unknown algorithm 'mend'.*emmet"):
        _solve("mend", w0, c0, k_e, v_e, PLAIN)
    with pytest.raises(ValueError, match="rome edits at most 1 fact"):
        _solve("rome", w0, c0, k_e, v_e, PLAIN)
    with pytest.raises(ValueError, match="C0 has shape"):
        _solve("emmet", w0, c0[:-1], k_e, v_e, PLAIN)
    with pytest.raises(ValueError, match="R has shape"):
        solve("memit", c0, k_e, (v_e - w0 @ k_e)[:, :1], PLAIN)  # one residual for two keys
    with pytest.raises(ValueError, match="K_E contains non-finite"):
        _solve("emmet", w0, c0, k_e * float("nan"), v_e, PLAIN)
    with pytest.raises(ValueError, match="not positive definite"):
        _solve("emmet", w0, -c0, k_e, v_e, PLAIN)


@settings(max_examples=25, deadline=None)
@given(st.tuples(st.integers(0, 10_000), st.integers(16, 48), st.integers(8, 24), st.integers(2, 8)))
def test_emmet_with_ridges_is_its_dense_closed_form(case):
    """ΔW = R (K_Eᵀ C⁻¹ K_E + λ_E I)⁻¹ K_Eᵀ C⁻¹ with C = λ C0 + μ I, computed densely with explicit inverses."""
    w0, c0, k_e, v_e = problem(*case)
    params = ObjectiveParams(mom2_update_weight=7.0, update_norm_lambda=0.3, emmet_lambda=0.25)
    c_inv = torch.linalg.inv(7.0 * c0 + 0.3 * torch.eye(c0.shape[0], dtype=c0.dtype))
    d = k_e.T @ c_inv @ k_e + 0.25 * torch.eye(k_e.shape[1], dtype=c0.dtype)
    expected = (v_e - w0 @ k_e) @ torch.linalg.inv(d) @ k_e.T @ c_inv
    delta = _solve("emmet", w0, c0, k_e, v_e, params)
    torch.testing.assert_close(delta.u @ delta.v.T, expected, rtol=1e-8, atol=1e-10)


def test_memorization_is_one_for_exact_emmet_and_less_with_a_large_ridge(caplog):
    w0, c0, k_e, v_e = problem(9, 32, 16, 6)
    exact = _solve("emmet", w0, c0, k_e, v_e, PLAIN)
    assert memorization(k_e, v_e - w0 @ k_e, exact) == pytest.approx(1.0, abs=1e-9)
    d_diagonal = float((k_e.T @ torch.linalg.solve(c0, k_e)).diagonal().mean())
    relaxed_params = ObjectiveParams(mom2_update_weight=1.0, emmet_lambda=d_diagonal)  # λ_E as large as diag(D)
    relaxed = _solve("emmet", w0, c0, k_e, v_e, relaxed_params)
    share = memorization(k_e, v_e - w0 @ k_e, relaxed)
    assert 0.2 < share < 0.8
    assert "constraints are relaxed" in caplog.text
    by_hand = 1 - torch.linalg.norm((w0 + relaxed.u @ relaxed.v.T) @ k_e - v_e) / torch.linalg.norm(v_e - w0 @ k_e)
    assert share == pytest.approx(float(by_hand), abs=1e-12)


@pytest.mark.parametrize("name", ["memit", "emmet"])
def test_a_rank_deficient_c0_is_solved_with_a_ridge_and_a_warning(name, caplog):
    """C0 estimated from fewer keys than its dimension is singular; with μ = 0 the solve must not abort."""
    generator = torch.Generator().manual_seed(4)
    d_in, d_out, batch = 32, 16, 4
    samples = torch.randn(d_in, 10, generator=generator, dtype=torch.float64)
    c0 = samples @ samples.T / 10  # rank 10 < 32
    w0 = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)
    k_e = torch.randn(d_in, batch, generator=generator, dtype=torch.float64)
    v_e = torch.randn(d_out, batch, generator=generator, dtype=torch.float64)
    delta = _solve(name, w0, c0, k_e, v_e, PLAIN)
    assert "not positive definite" in caplog.text and "ridge" in caplog.text
    dense = delta.u @ delta.v.T
    assert torch.isfinite(dense).all()
    if name == "emmet":  # the constraints still hold
        torch.testing.assert_close((w0 + dense) @ k_e, v_e, rtol=1e-6, atol=1e-6)


# -- lifelong objectives: the edit memory S and C0's null space ----------------------------------------------
def _memory(seed: int, d_in: int, edits: int = 12) -> torch.Tensor:
    keys = torch.randn(d_in, edits, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return keys @ keys.T


def _null_space(c0: torch.Tensor, threshold: float) -> torch.Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(c0)
    return eigenvectors[:, eigenvalues < threshold]


@settings(max_examples=20, deadline=None)
@given(dims)
def test_alphaedit_without_memory_and_a_full_null_space_is_ridge_least_squares(case):
    """P = I (the threshold above every eigenvalue) and S = 0: ΔW = R K_Eᵀ (K_E K_Eᵀ + ρ I)⁻¹."""
    w0, c0, k_e, v_e = problem(*case)
    params = ObjectiveParams(alphaedit_ridge=3.0)
    basis = _null_space(c0, float(torch.linalg.eigvalsh(c0).max()) + 1.0)
    assert basis.shape[1] == c0.shape[0]
    delta = _solve("alphaedit", w0, c0, k_e, v_e, params, null_space=basis)
    identity = torch.eye(c0.shape[0], dtype=c0.dtype)
    expected = (v_e - w0 @ k_e) @ k_e.T @ torch.linalg.inv(k_e @ k_e.T + 3.0 * identity)
    torch.testing.assert_close(delta.u @ delta.v.T, expected, rtol=1e-8, atol=1e-10)
    empty = _solve("alphaedit", w0, c0, k_e, v_e, params, null_space=_null_space(c0, -1.0))  # P = 0
    assert torch.count_nonzero(empty.u @ empty.v.T) == 0


@settings(max_examples=20, deadline=None)
@given(dims)
def test_alphaedit_is_its_projected_closed_form_and_spares_the_preserved_directions(case):
    w0, c0, k_e, v_e = problem(*case)
    eigenvectors = torch.linalg.eigh(c0).eigenvectors  # ascending eigenvalues
    half = c0.shape[0] // 2  # the null space: the lower half; one decomposition, so no direction is in both
    basis = eigenvectors[:, :half]
    memory = _memory(case[0] + 1, c0.shape[0])
    params = ObjectiveParams(alphaedit_ridge=10.0)
    delta = _solve("alphaedit", w0, c0, k_e, v_e, params, edit_memory=memory, null_space=basis)
    p = basis @ basis.T
    identity = torch.eye(c0.shape[0], dtype=c0.dtype)
    x = torch.linalg.inv(p @ (memory + k_e @ k_e.T) + 10.0 * identity) @ p @ k_e @ (v_e - w0 @ k_e).T
    dense = delta.u @ delta.v.T
    torch.testing.assert_close(dense, x.T, rtol=1e-8, atol=1e-10)
    preserved = eigenvectors[:, half:]  # the directions the edit must leave alone
    assert torch.linalg.norm(dense @ preserved) < 1e-9 * torch.linalg.norm(dense)


@settings(max_examples=20, deadline=None)
@given(dims)
def test_encore_is_memit_with_the_edit_memory_and_a_norm_penalty(case):
    w0, c0, k_e, v_e = problem(*case)
    plain = ObjectiveParams(mom2_update_weight=4.0, update_norm_lambda=0.0)
    without = _solve("encore", w0, c0, k_e, v_e, plain)  # S = 0, λ_n = 0: MEMIT itself
    memit = _solve("memit", w0, c0, k_e, v_e, plain)
    torch.testing.assert_close(without.u @ without.v.T, memit.u @ memit.v.T, rtol=1e-10, atol=1e-12)
    memory = _memory(case[0], c0.shape[0])
    params = ObjectiveParams(mom2_update_weight=4.0, update_norm_lambda=10.0)
    encore = _solve("encore", w0, c0, k_e, v_e, params, edit_memory=memory)
    identity = torch.eye(c0.shape[0], dtype=c0.dtype)
    expected = (v_e - w0 @ k_e) @ k_e.T @ torch.linalg.inv(4.0 * c0 + memory + k_e @ k_e.T + 10.0 * identity)
    torch.testing.assert_close(encore.u @ encore.v.T, expected, rtol=1e-8, atol=1e-10)
    # MEMIT reads the memory only when asked to preserve earlier edits
    ignored = _solve("memit", w0, c0, k_e, v_e, params, edit_memory=memory)
    preserved = _solve("memit", w0, c0, k_e, v_e, replace(params, preserve_edits=True), edit_memory=memory)
    torch.testing.assert_close(preserved.u @ preserved.v.T, expected, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(ignored.u @ ignored.v.T, expected)


def test_emmet_preserving_edits_keeps_its_constraints_with_s_in_c():
    w0, c0, k_e, v_e = problem(21, 32, 16, 4)
    memory = _memory(3, 32)
    params = ObjectiveParams(mom2_update_weight=2.0, emmet_lambda=0.0, preserve_edits=True)
    delta = _solve("emmet", w0, c0, k_e, v_e, params, edit_memory=memory)
    c_inv = torch.linalg.inv(2.0 * c0 + memory)
    expected = (v_e - w0 @ k_e) @ torch.linalg.inv(k_e.T @ c_inv @ k_e) @ k_e.T @ c_inv
    torch.testing.assert_close(delta.u @ delta.v.T, expected, rtol=1e-8, atol=1e-10)


def test_the_solve_dtype_can_be_float32():
    w0, c0, k_e, v_e = problem(7, 32, 16, 4)
    delta = _solve("emmet", w0, c0, k_e, v_e, PLAIN, dtype=torch.float32)
    assert delta.u.dtype == delta.v.dtype == torch.float32
    edited = w0 + (delta.u @ delta.v.T).double()
    assert torch.linalg.norm(edited @ k_e - v_e) / torch.linalg.norm(v_e) < 1e-4
