"""Tests for workbench.theory: every check passes as stated, fails on a wrong statement, and catches real bugs."""

from __future__ import annotations

import json
import math

import pytest
import sympy as sp
import torch

import workbench.theory.prop54 as prop54_module
import workbench.theory.prop55 as prop55_module
from workbench.theory import (
    CHECKS,
    Check,
    Step,
    TreePolicy,
    all_checks,
    check_prop42,
    check_prop43,
    check_prop54,
    check_prop55,
    logit_error,
    mode_mismatch,
    posterior_mode_perturbation,
    prop42_envelope,
    second_order_conditional_mean,
    summary_markdown,
)
from workbench.theory.core import (
    AS_STATED_NOTE,
    RECONSTRUCTED_NOTE,
    RECONSTRUCTED_TEX,
    Statement,
    gaussian_expectation,
    is_zero,
    prove_nonnegative,
    prove_nonnegative_halfline,
    scaled_derivation,
    validate_scale,
)

RECONSTRUCTED = {"thm_4_1", "prop_5_4"}

# the numeric criterion that must break when the statement's right-hand side is halved
BREAKS_AT_HALF = {
    "thm_4_1": "identity_holds",
    "prop_4_2": "exact_bound_holds",
    "prop_4_3": "flat/mode_matches_paper_formula",
    "prop_5_4": "tv_equals_one_minus_z",
    "prop_5_5": "bound_holds_worst_case_rewards",
}


@pytest.fixture(scope="module")
def checks() -> dict[str, Check]:
    return {c.name: c for c in all_checks(seed=0)}


# ---------------------------------------------------------------------------------------------------------------
# every statement, as written, passes
# ---------------------------------------------------------------------------------------------------------------


def test_all_checks_covers_every_statement_in_order(checks: dict[str, Check]) -> None:
    assert list(checks) == ["thm_4_1", "prop_4_2", "prop_4_3", "prop_5_4", "prop_5_5"] == list(CHECKS)


@pytest.mark.parametrize("name", list(CHECKS))
def test_check_passes_as_stated(checks: dict[str, Check], name: str) -> None:
    check = checks[name]
    assert check.passed, check.failures
    assert check.symbolic_passed and check.numeric_passed
    assert sum(s.proved for s in check.steps) >= 3, "most of each derivation must be proved by sympy"
    assert all(s.latex and s.description and s.method for s in check.steps)


@pytest.mark.parametrize("name", list(CHECKS))
def test_reconstructed_flag_and_note(checks: dict[str, Check], name: str) -> None:
    check = checks[name]
    assert check.reconstructed == (name in RECONSTRUCTED)
    assert ("Reconstructed" in check.notes) == (name in RECONSTRUCTED)
    assert ("(reconstructed)" in check.title) == (name in RECONSTRUCTED)
    assert ("reconstructed" in check.statement) == (name in RECONSTRUCTED)


@pytest.mark.parametrize("name", list(CHECKS))
def test_check_serialises_and_renders(checks: dict[str, Check], name: str) -> None:
    check = checks[name]
    d = json.loads(json.dumps(check.to_dict()))
    assert d["passed"] is True and d["name"] == name and d["reconstructed"] == check.reconstructed
    assert len(d["steps"]) == len(check.steps) and set(d["criteria"]) == set(check.criteria)
    assert [s["status"] for s in d["steps"]] == [s.status for s in check.steps]
    md = check._repr_markdown_()
    assert check.title in md and "passed" in md and "NOT PROVED" not in md
    tex = check._repr_latex_()
    assert tex.startswith("$$") and tex.endswith("$$") and check.statement in tex


def test_summary_markdown(checks: dict[str, Check]) -> None:
    table = summary_markdown(list(checks.values()))
    rows = table.splitlines()
    assert len(rows) == 2 + len(checks)
    assert all("✅ passed" in row for row in rows[2:])
    assert sum("| yes |" in row for row in rows[2:]) == len(RECONSTRUCTED)
    failed = summary_markdown([check_prop54(0, scale=0.5, batch=16)])
    assert "❌ failed" in failed


# ---------------------------------------------------------------------------------------------------------------
# a wrong statement (right-hand side halved) fails, on the symbolic AND on the numeric side
# ---------------------------------------------------------------------------------------------------------------


# smaller instances keep the suite fast; a halved statement is far outside every tolerance
SMALL = {
    "thm_4_1": {"num_instances": 4},
    "prop_4_2": {"num_sequences": 64},
    "prop_4_3": {"num_draws": 20_000},
    "prop_5_4": {"batch": 128},
    "prop_5_5": {"num_instances": 8},
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_check_rejects_halved_statement(name: str) -> None:
    check = CHECKS[name](0, scale=0.5, **SMALL[name])
    assert not check.passed
    assert not check.symbolic_passed, "sympy must fail to prove the halved statement"
    assert any(s.status == "NOT PROVED" for s in check.steps)
    assert not check.numeric_passed, "the torch cross-check must catch the halved statement"
    assert check.criteria[BREAKS_AT_HALF[name]] is False
    assert "NOT PROVED" in check._repr_markdown_() and "FAILED" in check._repr_markdown_()
    assert json.loads(json.dumps(check.to_dict()))["passed"] is False
    assert r"\frac{1}{2}" in check.statement


@pytest.mark.parametrize("fn", list(CHECKS.values()))
@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_bad_scale_raises(fn, scale: float) -> None:
    with pytest.raises(ValueError, match="scale="):
        fn(0, scale=scale)


# ---------------------------------------------------------------------------------------------------------------
# the instances are strong enough to matter (a loose instance would let wrong statements pass)
# ---------------------------------------------------------------------------------------------------------------


def test_prop42_instances_reach_the_bound(checks: dict[str, Check]) -> None:
    num = checks["prop_4_2"].numeric
    assert 0.9 < num["max_ratio_exact"] <= 1.0 + 1e-3  # near-tight, never above (up to fp32 rounding)
    assert num["max_ratio_first_order"] > 1.0  # the first-order bound really is only first order ...
    assert num["max_ratio_first_order"] <= num["first_order_ratio_cap"]  # ... within (e^{2ε} − 1)/2ε
    assert num["p_min"] < 1e-6 and num["p_max"] > 0.999  # both the tail and confident tokens are probed


def test_logit_error_is_the_smallest_sup_norm_over_shifts() -> None:
    g = torch.Generator().manual_seed(4)
    zt = torch.randn(6, 20, generator=g, dtype=torch.float64)
    delta = 0.3 * torch.randn(6, 20, generator=g, dtype=torch.float64)
    eps = logit_error(zt, zt + delta)
    shifts = torch.linspace(-2, 2, 4001, dtype=torch.float64)  # brute force min_c ‖δ − c‖∞
    brute = (delta[:, None, :] - shifts[None, :, None]).abs().amax(-1).amin(-1)
    assert torch.allclose(eps, brute, atol=1e-3) and bool((eps <= brute + 1e-12).all())
    assert torch.allclose(logit_error(zt, zt + delta + 7.0), eps)  # shift-invariant, unlike max |δ|
    with pytest.raises(ValueError, match="same states"):
        logit_error(zt, zt[:2])


def test_prop42_envelope_bounds_measured_gaps_with_the_shift_invariant_eps() -> None:
    g = torch.Generator().manual_seed(5)
    zt = torch.randn(64, 30, generator=g, dtype=torch.float64) * 4
    ze = zt + 0.2 * (2 * torch.rand(64, 30, generator=g, dtype=torch.float64) - 1) + 5.0  # shifted engine
    logp = torch.log_softmax(zt, -1)
    gap = (torch.log_softmax(ze, -1) - logp).abs()  # (64, 30)
    eps = logit_error(zt, ze)[:, None]  # (64, 1)
    exact, first = prop42_envelope(logp, eps), prop42_envelope(logp, eps, exact=False)
    assert bool((gap <= exact + 1e-12).all())  # the exact bound holds for every token
    assert torch.allclose(exact, 2 * eps * (1 - logp.exp() * torch.exp(-2 * eps)))
    assert torch.allclose(first, 2 * eps * (1 - logp.exp()))
    assert float((gap / exact).max()) > 0.3  # not vacuous: ε is the shift-free size, not max |δ| ≈ 5.2


def test_prop43_mode_mean_and_histogram_peak(checks: dict[str, Check]) -> None:
    num = checks["prop_4_3"].numeric
    assert "log π_infer − log π_train" in num["sign_convention"]
    for shape in ("peaked", "medium", "flat"):
        mode, mean = num[f"{shape}/mode_at_eps_star"], num[f"{shape}/cond_mean_tail"]
        assert num[f"{shape}/mode_max_abs_error_over_sigma4"] < 0.1  # Δ(ε*) is the paper's bracket to O(σ⁴)
        assert num[f"{shape}/cond_mean_ci_lo"] > 0 and num[f"{shape}/uncond_ci_hi"] < 0
        lo, hi = num[f"{shape}/cond_mean_ci_lo"], num[f"{shape}/cond_mean_ci_hi"]
        assert lo - 0.3**4 <= num[f"{shape}/mean_theory_second_order"] <= hi + 0.3**4
        # mean vs mode: the mean sits ½σ²(1 − Σp²) below the mode (up to O(σ⁴) and Monte Carlo error)
        gap = 0.3**2 / 2 * (1 - num[f"{shape}/sum_p_sq"])
        assert mode - mean == pytest.approx(gap, abs=0.3**4 + (hi - lo) / 2)
        # the histogram of sampled tail tokens' Δ peaks near the mean, not at the mode
        peak = num[f"{shape}/hist_peak_tail"]
        assert abs(peak - mean) < abs(peak - mode)
    # a flat policy: the mode is ≈ σ², the mean about half of it
    assert num["flat/mode_at_eps_star"] > 1.8 * num["flat/cond_mean_tail"]


def test_prop43_mode_criterion_catches_the_mean_passed_off_as_the_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import workbench.theory.prop43 as prop43_module

    def mean_as_mode(p: torch.Tensor, p_infer: torch.Tensor, sigma: float) -> torch.Tensor:
        return second_order_conditional_mean(p, sigma)

    monkeypatch.setattr(prop43_module, "mode_mismatch", mean_as_mode)
    check = check_prop43(0, num_draws=2000)
    assert not any(check.criteria[f"{s}/mode_matches_paper_formula"] for s in ("peaked", "medium", "flat"))


def test_posterior_mode_perturbation_maximises_the_posterior() -> None:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 16, generator=g, dtype=torch.float64) * 2
    tokens = torch.tensor([0, 3, 7, 11, 15])
    sigma = 0.6
    eps = posterior_mode_perturbation(z, tokens, sigma)  # (5, 16)

    def log_post(e: torch.Tensor) -> torch.Tensor:  # (5,)
        return (
            -(e**2).sum(-1) / (2 * sigma**2) + torch.log_softmax(z + e, -1).gather(-1, tokens[:, None])[:, 0]
        )

    best = log_post(eps)
    for _ in range(20):  # any nearby perturbation is less probable
        assert bool(
            (log_post(eps + 1e-2 * torch.randn(5, 16, generator=g, dtype=torch.float64)) < best).all()
        )
    # Δ at the mode is the paper's bracket to O(σ⁴), with p' the engine's policy at ε*
    delta = (torch.log_softmax(z + eps, -1) - torch.log_softmax(z, -1)).gather(-1, tokens[:, None])[:, 0]
    p, p_infer = torch.softmax(z, -1), torch.softmax(z + eps, -1)
    formula = mode_mismatch(p, p_infer, sigma).gather(-1, tokens[:, None])[:, 0]
    assert torch.allclose(delta, formula, atol=0.1 * sigma**4)
    assert bool((delta > 0).all())
    with pytest.raises(ValueError, match="sigma"):
        posterior_mode_perturbation(z, tokens, 1.5)


def test_mode_mismatch_limits_and_bracket() -> None:
    sigma = 0.5
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.6, 0.25, 0.15], dtype=torch.float64)
    got = mode_mismatch(p, q, sigma)
    for a in range(3):  # (1 − p_a)(1 − p'_a) + Σ_{k≠a} p_k p'_k, term by term
        others = sum(float(p[k] * q[k]) for k in range(3) if k != a)
        assert float(got[a]) == pytest.approx(sigma**2 * ((1 - float(p[a])) * (1 - float(q[a])) + others))
    flat = torch.full((1000,), 1e-3, dtype=torch.float64)
    assert float(mode_mismatch(flat, flat, sigma)[0]) == pytest.approx(sigma**2, rel=3e-3)  # flat: mode ≈ σ²
    assert float(second_order_conditional_mean(flat, sigma)[0]) == pytest.approx(sigma**2 / 2, rel=3e-3)


def test_prop55_bound_is_nontrivial_and_nearly_tight(checks: dict[str, Check]) -> None:
    num = checks["prop_5_5"].numeric
    assert num["num_nontrivial_bounds"] >= num["num_instances"] // 3
    assert num["max_ratio_worst_case_reward"] > 0.6  # so a halved bound must be violated
    assert num["max_ratio_random_reward"] <= 1.0


def test_thm41_bias_is_real_and_identity_exact(checks: dict[str, Check]) -> None:
    num = checks["thm_4_1"].numeric
    assert num["min_bias_norm"] > 1e-4
    assert num["max_identity_residual"] < 1e-12
    assert num["max_policy_gradient_residual"] < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHECKS))
def test_checks_pass_with_other_seeds(name: str) -> None:
    for seed in (1, 7):
        check = CHECKS[name](seed)
        assert check.passed, (name, seed, check.failures)


@pytest.mark.parametrize("name", list(CHECKS))
def test_small_instances_pass(name: str) -> None:
    check = CHECKS[name](3, **SMALL[name])
    assert check.passed, check.failures


# ---------------------------------------------------------------------------------------------------------------
# the numeric side catches real bugs in the torch code (not only rescaled statements)
# ---------------------------------------------------------------------------------------------------------------


def _no_pruning(logits, tokens, rho=None, **kw):
    """A buggy token_logprobs that ignores rho (min-p never applied)."""
    from workbench.dvp import token_logprobs

    return token_logprobs(logits, tokens, None, **kw)


def _no_renormalisation(logits, tokens, rho=None, **kw):
    """A buggy token_logprobs that masks but forgets to renormalise (adds nothing for log Z)."""
    from workbench.dvp import retained_mass, token_logprobs

    out = token_logprobs(logits, tokens, rho, **kw)
    return out if rho is None else out + torch.log(retained_mass(logits, rho))


def test_prop54_catches_missing_pruning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prop54_module, "token_logprobs", _no_pruning)
    check = check_prop54(0)
    assert check.symbolic_passed and not check.numeric_passed
    assert check.criteria["tv_equals_one_minus_z"] is False


def test_prop55_catches_missing_renormalisation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prop55_module, "token_logprobs", _no_renormalisation)
    check = check_prop55(0, num_instances=6)
    assert not check.numeric_passed
    assert check.criteria["policies_normalised"] is False


# ---------------------------------------------------------------------------------------------------------------
# the small provers are sound (never "prove" a false statement) and useful
# ---------------------------------------------------------------------------------------------------------------


def test_prove_nonnegative_sound_and_useful() -> None:
    u, v = sp.symbols("u v", positive=True)
    x = sp.Symbol("x", real=True)
    assert prove_nonnegative(u * v + u**2)
    assert prove_nonnegative(2 - 1 / (1 + u) - 1 / (1 + v))
    assert not prove_nonnegative(u - v)
    assert not prove_nonnegative(x)
    assert not prove_nonnegative(1 - 2 / (1 + u))  # false for u < 1


def test_prove_nonnegative_halfline() -> None:
    x = sp.Symbol("x", nonnegative=True)
    assert prove_nonnegative_halfline(sp.exp(x) - 1 - x, x)[0]
    assert prove_nonnegative_halfline(x - sp.log(1 + x), x)[0]
    assert not prove_nonnegative_halfline(sp.log(1 + x) - x, x)[0]  # false for every x > 0
    assert not prove_nonnegative_halfline(x**2 - x, x, max_order=3)[0]  # false on (0, 1)


def test_gaussian_expectation_matches_moments() -> None:
    a, b = sp.symbols("a b", real=True)
    assert gaussian_expectation(a**4 * b**2, [a, b]) == 3
    assert gaussian_expectation(a**6, [a, b]) == 15
    assert gaussian_expectation(a * b + a**3, [a, b]) == 0
    s = sp.Symbol("s", positive=True)
    assert is_zero(gaussian_expectation((s * a + 1) ** 2, [a]) - (s**2 + 1))


def test_validate_scale() -> None:
    validate_scale(1.0)
    validate_scale(2)
    for bad in (0, -0.5, float("inf"), "1"):
        with pytest.raises(ValueError, match="scale="):
            validate_scale(bad)  # type: ignore[arg-type]


def test_step_status() -> None:
    assert Step("d", "x", proved=True).status == "proved"
    assert Step("d", "x", proved=False, assumption=True).ok
    assert not Step("d", "x", proved=False).ok


def test_statement_to_check_renders_scale_provenance_and_copies_steps() -> None:
    calls: list[sp.Rational] = []

    @scaled_derivation
    def derivation(k: sp.Rational, kx: str) -> list[Step]:
        calls.append(k)
        return [Step("claim", f"x \\le {kx}x", proved=bool(k >= 1))]

    as_stated = Statement("demo", "Demo", r"x \le {k}x", reconstructed=False)
    check = as_stated.to_check(0.5, derivation(0.5), {"n": 1}, {"ok": True}, notes="Numbers.")
    assert check.statement == r"x \le \frac{1}{2}\cdot x" and check.notes == f"{AS_STATED_NOTE} Numbers."
    assert (check.name, check.title, check.reconstructed) == ("demo", "Demo", False)
    assert not check.passed and check.failures == ["step: claim"]
    check.steps[0].proved = True  # editing a returned check must not reach the cached derivation
    assert derivation(0.5)[0].proved is False and calls == [sp.Rational(1, 2)]  # computed once, cached
    reconstructed = Statement("demo", "Demo", r"x \le {k}x", reconstructed=True)
    check = reconstructed.to_check(1.0, derivation(1.0), {}, {"ok": True}, notes="Numbers.")
    assert check.statement == r"x \le x" + RECONSTRUCTED_TEX
    assert check.notes == f"{RECONSTRUCTED_NOTE} Numbers." and check.passed


# ---------------------------------------------------------------------------------------------------------------
# the enumeration helper
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("vocab", "horizon"), [(2, 1), (3, 3), (6, 4)])
def test_tree_policy_enumerates_every_sequence_once(vocab: int, horizon: int) -> None:
    tree = TreePolicy(vocab=vocab, horizon=horizon)
    seqs, idx = tree.sequences(), tree.state_index()
    assert seqs.shape == idx.shape == (vocab**horizon, horizon)
    assert len({tuple(s) for s in seqs.tolist()}) == vocab**horizon
    assert int(idx.max()) + 1 == tree.num_states == sum(vocab**t for t in range(horizon))
    # same state ⇔ same prefix (naive reference: a dict of prefixes)
    state_of: dict[tuple[int, ...], int] = {}
    for s, row in zip(seqs.tolist(), idx.tolist()):
        for t in range(horizon):
            assert state_of.setdefault(tuple(s[:t]), row[t]) == row[t]
    assert len(set(state_of.values())) == tree.num_states


def test_tree_policy_probabilities_sum_to_one() -> None:
    tree = TreePolicy(vocab=3, horizon=3)
    table = torch.randn(tree.num_states, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits = tree.sequence_logits(table)  # (N, T, V)
    logp = torch.log_softmax(logits, -1).gather(-1, tree.sequences()[..., None]).squeeze(-1).sum(-1)
    assert math.isclose(float(logp.exp().sum()), 1.0, rel_tol=1e-12)


def test_tree_policy_validation() -> None:
    with pytest.raises(ValueError, match="vocab"):
        TreePolicy(vocab=1, horizon=2)
    with pytest.raises(ValueError, match="horizon"):
        TreePolicy(vocab=2, horizon=0)
    with pytest.raises(ValueError, match="too many"):
        TreePolicy(vocab=50, horizon=5)
    with pytest.raises(ValueError, match="table has shape"):
        TreePolicy(vocab=2, horizon=2).sequence_logits(torch.zeros(2, 2))


def test_second_order_conditional_mean_limits() -> None:
    sigma = 0.5
    uniform = torch.full((1000,), 1e-3, dtype=torch.float64)
    assert math.isclose(
        float(second_order_conditional_mean(uniform, sigma)[0]), sigma**2 * (0.5 - 2e-3 + 1.5e-3)
    )
    peaked = torch.tensor([1 - 1e-9, 1e-9], dtype=torch.float64)
    assert math.isclose(float(second_order_conditional_mean(peaked, sigma)[1]), 2 * sigma**2, rel_tol=1e-6)
    assert abs(float(second_order_conditional_mean(peaked, sigma)[0])) < 1e-6  # confident token: ≈ 0


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="eps_values"):
        check_prop42(0, eps_values=(0.1, -1.0))
    with pytest.raises(ValueError, match="sigma"):
        check_prop43(0, sigma=2.0)
    with pytest.raises(ValueError, match="rhos"):
        check_prop54(0, rhos=(0.0,))
    with pytest.raises(ValueError, match="rho_range"):
        check_prop55(0, rho_range=(0.3, 0.1))
