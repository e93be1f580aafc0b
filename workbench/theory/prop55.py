"""Proposition 5.5 — the objective bias of pruning: ``|J_mp − J| ≤ R_max · T · (1 − Z_min)``.

Statement (THEORY.md): with rewards in ``[0, R_max]``, horizon ``T`` and ``Z_min = min_s Z(s)``,
``|J_mp − J| ≤ R_max · T · (1 − Z_min)``, by the hybrid (simulation-lemma) argument: the trajectory TV is at
most ``Σ_t E[D_TV at step t] ≤ T(1 − Z_min)`` and ``|E_P R − E_Q R| ≤ R_max D_TV(P, Q)``.

The derivation proves the telescoping identity behind the hybrid argument (T = 3), the suffix
marginalisation that turns it into per-step TVs, and — sharper, specific to pruning, because π^mp only ever
*raises* surviving sequences — the exact identity ``D_TV(P_π, P_mp) = 1 − E_{P_mp}[Π_t Z(s_t)] ≤ 1 − Z_min^T``
together with Bernoulli's ``1 − Z^T ≤ T(1 − Z)``.

Numerics enumerate every sequence of small random tree policies (|V| = 6, T = 4, 1296 sequences) with
``token_logprobs`` (π and π^mp via ``rho``) and ``retained_mass`` (Z per state), for ρ in [0.05, 0.3] so the
bound is non-trivial, with random rewards in [0, R_max] and with the worst-case reward ``R_max 1[P_π > P_mp]``.
"""

from __future__ import annotations

import functools

import sympy as sp
import torch

from workbench.dvp import retained_mass, token_logprobs
from workbench.theory.core import (
    Check,
    Statement,
    Step,
    TreePolicy,
    all_ok,
    conclusion,
    is_zero,
    prove_nonnegative,
    scaled_derivation,
    seeded_generator,
    sign_abs,
    validate_scale,
)

__all__ = ["bias_bound", "check_prop55", "hybrid_steps"]

STATEMENT = Statement(
    name="prop_5_5",
    title="Proposition 5.5 — objective bias of pruning |J_mp − J| ≤ R_max T (1 − Z_min)",
    latex=(
        r"R\in[0,R_{\max}],\ Z_{\min}=\min_s Z(s):\qquad |J_{mp}-J| \le {k}R_{\max}\cdot T\cdot(1-Z_{\min}) \\"
        r"D_{TV}(P_\pi,P_{mp}) \le \sum_t \mathbb E\big[D_{TV}(\pi(\cdot|s_t),\pi^{mp}(\cdot|s_t))\big] \le T(1-Z_{\min}),"
        r"\quad |\mathbb E_P R-\mathbb E_Q R| \le R_{\max} D_{TV}(P,Q)"
    ),
    reconstructed=False,
)


def bias_bound(one_minus_z_min: float, horizon: int, r_max: float = 1.0) -> float:
    """The statement's right-hand side ``R_max · T · (1 − Z_min)``, for a measured ``1 − Z_min``.

    Evaluated on the retained mass of the states a policy visits (``workbench diagnose``,
    :func:`workbench.experiments.beyond.prop55_on_policy`), where ``1 − Z_min`` is the largest pruned mass
    seen: an estimate of the bound from below, since unvisited states may prune more.

    >>> bias_bound(0.002, horizon=24)
    0.048
    """
    if not 0.0 <= one_minus_z_min <= 1.0:
        raise ValueError(f"one_minus_z_min={one_minus_z_min!r} must be in [0, 1] (a pruned probability mass)")
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon={horizon!r} must be an integer >= 1 (the response length cap T)")
    return r_max * horizon * one_minus_z_min


@functools.lru_cache(maxsize=2)
def hybrid_steps() -> tuple[Step, ...]:
    """The two sympy-proved steps of the hybrid argument, valid for *any* two autoregressive policies π, μ.

    Theorem 4.1 (TV ≤ T Δ_max) and Proposition 5.5 both use them.
    """
    p = sp.symbols("pi1:4", positive=True)  # π(y_t | s_t) along one sequence, T = 3
    m = sp.symbols("mu1:4", positive=True)  # μ(y_t | s_t)
    telescope = sp.Add(*[sp.Mul(*m[:t]) * (p[t] - m[t]) * sp.Mul(*p[t + 1 :]) for t in range(3)])
    step1 = Step(
        "hybrid telescoping: switch one step at a time from μ to π (prefix from μ, suffix from π)",
        r"\prod_t \pi_t - \prod_t \mu_t = \sum_t \Big(\prod_{u<t}\mu_u\Big)(\pi_t-\mu_t)\Big(\prod_{u>t}\pi_u\Big)",
        proved=is_zero(sp.expand(sp.Mul(*p) - sp.Mul(*m) - telescope)),
        method="sympy: expand(difference) == 0 (T = 3, symbolic per-step probabilities)",
    )
    # suffix marginalisation on T = 2, |V| = 2: π(·|y1) = (1/(1+u), u/(1+u)) sums to 1
    d1, d2 = sp.symbols("d1 d2", real=True)  # π(y1) − μ(y1) at the root
    u1, u2 = sp.symbols("u1 u2", positive=True)
    suffix = {1: (1 / (1 + u1), u1 / (1 + u1)), 2: (1 / (1 + u2), u2 / (1 + u2))}
    layer1 = sp.Add(*[sp.Abs(d * s) for d, y1 in ((d1, 1), (d2, 2)) for s in suffix[y1]])
    m1, m2 = sp.symbols("m1 m2", positive=True)  # μ(y1)
    e = sp.symbols("e1:5", real=True)  # π(y2|y1) − μ(y2|y1)
    layer2 = sp.Abs(m1 * e[0]) + sp.Abs(m1 * e[1]) + sp.Abs(m2 * e[2]) + sp.Abs(m2 * e[3])
    step2 = Step(
        "sum |term t| over sequences: the π-suffix sums to 1 and the μ-prefix is the distribution of s_t, so "
        "term t contributes E_{s_t∼μ}[2 D_TV(π(·|s_t), μ(·|s_t))]",
        r"\sum_y \Big|\Big(\prod_{u<t}\mu_u\Big)(\pi_t-\mu_t)\Big(\prod_{u>t}\pi_u\Big)\Big| = "
        r"\mathbb E_{s_t\sim\mu}\Big[\sum_a|\pi(a|s_t)-\mu(a|s_t)|\Big]",
        proved=is_zero(layer1 - sp.Abs(d1) - sp.Abs(d2))
        and is_zero(layer2 - m1 * (sp.Abs(e[0]) + sp.Abs(e[1])) - m2 * (sp.Abs(e[2]) + sp.Abs(e[3]))),
        method="sympy: simplify on T = 2, |V| = 2 with normalised suffix distributions",
    )
    step3 = Step(
        "triangle inequality over the T terms",
        r"D_{TV}(P_\pi, P_\mu) \le \sum_t \mathbb E_{s_t\sim P_\mu}\big[D_{TV}(\pi(\cdot|s_t),\mu(\cdot|s_t))\big]",
        proved=False,
        assumption=True,
        method="triangle inequality (standard)",
    )
    return step1, step2, step3


@scaled_derivation
def _derivation(k: sp.Rational, kx: str, horizon: int) -> list[Step]:
    """The sympy derivation, Bernoulli up to ``horizon``; ``k`` (LaTeX ``kx``) multiplies the bound."""
    steps = list(hybrid_steps())
    steps.append(
        Step(
            "per step, pruning moves exactly the pruned mass (Proposition 5.4), at most 1 − Z_min",
            r"D_{TV}(\pi(\cdot|s),\pi^{mp}(\cdot|s)) = 1-Z(s) \le 1-Z_{\min}\ \Rightarrow\ D_{TV}(P_\pi,P_{mp}) \le T(1-Z_{\min})",
            proved=False,
            assumption=True,
            method="Proposition 5.4 (proved symbolically in check_prop54)",
        )
    )
    steps.append(
        Step(
            "rewards in [0, R_max]: R/R_max is a mixture of event indicators, and |P(A) − Q(A)| ≤ D_TV(P, Q)",
            r"|\mathbb E_P R - \mathbb E_Q R| \le R_{\max}\, D_{TV}(P,Q)",
            proved=False,
            assumption=True,
            method="standard (TV is the largest difference of event probabilities); the numeric check "
            "computes the worst-case reward and finds equality",
        )
    )

    # the sharper, DVP-specific identity on a symbolic tree: T = 2, |V| = 3, safe set {1, 2} in every state
    a = sp.symbols("a1:4", positive=True)  # root weights
    b = {c: sp.symbols(f"b{c}_1:4", positive=True) for c in (1, 2, 3)}  # child weights after token c
    safe = (0, 1)

    def probs(wts: tuple[sp.Symbol, ...]) -> tuple[list[sp.Expr], list[sp.Expr], sp.Expr]:
        total, kept = sp.Add(*wts), wts[0] + wts[1]
        pi = [wi / total for wi in wts]
        mp = [wts[i] / kept if i in safe else sp.Integer(0) for i in range(3)]
        return pi, mp, kept / total

    pi_r, mp_r, z_r = probs(a)
    tv = sp.Integer(0)
    expect_prod_z = sp.Integer(0)
    for y1 in range(3):
        pi_c, mp_c, z_c = probs(b[y1 + 1])
        if y1 in safe:
            expect_prod_z += mp_r[y1] * z_r * z_c
        for y2 in range(3):
            tv += sign_abs(sp.together(pi_r[y1] * pi_c[y2] - mp_r[y1] * mp_c[y2]))
    tv = tv / 2
    steps.append(
        Step(
            "pruning only raises surviving sequences (P_mp = P_π/Π_t Z ≥ P_π) and zeroes the rest, so the "
            "trajectory TV is exactly the π-probability of ever leaving the safe set",
            r"D_{TV}(P_\pi,P_{mp}) = 1 - \mathbb E_{P_{mp}}\Big[\prod_t Z(s_t)\Big]",
            proved=is_zero(tv - (1 - expect_prod_z)),
            method="sympy: symbolic tree T = 2, |V| = 3, safe set {1, 2}; signs from positive weights (sign_abs)",
        )
    )
    zs, us = sp.Symbol("Z", positive=True), sp.Symbol("u", positive=True)
    bern_ok = True
    for t in range(1, horizon + 1):
        z_of_u = 1 / (1 + us)  # Z ∈ (0, 1]
        bern_ok &= prove_nonnegative(sp.together((k * t * (1 - zs) - (1 - zs**t)).subs(zs, z_of_u)))
    steps.append(
        Step(
            f"Bernoulli: Π_t Z(s_t) ≥ Z_min^T ≥ 1 − T(1 − Z_min) (checked for T = 1 … {horizon})",
            rf"D_{{TV}}(P_\pi,P_{{mp}}) \le 1 - Z_{{\min}}^T \le {kx} T(1-Z_{{\min}})",
            proved=bern_ok,
            method="sympy: with Z = 1/(1+u), u ≥ 0, T(1 − Z) − (1 − Z^T) has a non-negative expanded numerator",
        )
    )
    steps.append(
        conclusion(
            "combine: |J_mp − J| ≤ R_max D_TV(P_π, P_mp) ≤ R_max T (1 − Z_min)",
            rf"|J_{{mp}}-J| \le {kx} R_{{\max}}\, T\,(1-Z_{{\min}})",
            steps,
        )
    )
    return steps


def check_prop55(
    seed: int = 0,
    *,
    scale: float = 1.0,
    num_instances: int = 24,
    vocab: int = 6,
    horizon: int = 4,
    rho_range: tuple[float, float] = (0.05, 0.3),
) -> Check:
    """Check Proposition 5.5 symbolically and by exact enumeration with :mod:`workbench.dvp`.

    Half the instances have independent random logits in every state; the other half share one logit vector
    plus small noise (nearly the same Z everywhere), where the bound is close to tight.

    Args:
        seed: seeds the ``torch.Generator`` for logits, ρ, R_max and rewards.
        scale: multiplies the bound; 1 is the statement as written, 0.5 a wrong one to reject.
        num_instances: number of random tree policies.
        vocab, horizon: tree size (``vocab ** horizon`` sequences are enumerated).
        rho_range: ρ is drawn uniformly from this range per instance (large ρ: a non-trivial bound).

    Returns:
        A :class:`~workbench.theory.core.Check`; ``numeric`` holds the largest ratios |J_mp − J| / bound.
    """
    validate_scale(scale)
    lo, hi = rho_range
    if not (0 < lo <= hi <= 1):
        raise ValueError(f"rho_range={rho_range!r} must satisfy 0 < lo ≤ hi ≤ 1 (e.g. (0.05, 0.3))")
    tree = TreePolicy(vocab=vocab, horizon=horizon)
    gen = seeded_generator(seed)
    seqs, idx = tree.sequences(), tree.state_index()  # (N, T) each
    T = horizon

    rows: list[dict[str, float]] = []
    for i in range(num_instances):
        sharp = float(torch.empty(()).uniform_(1.0, 4.0, generator=gen))
        if i % 2 == 0:
            table = torch.randn(tree.num_states, vocab, generator=gen) * sharp  # (S, V)
        else:
            base = torch.randn(vocab, generator=gen) * sharp
            table = base + 0.1 * torch.randn(tree.num_states, vocab, generator=gen)
        rho = float(torch.empty(()).uniform_(lo, hi, generator=gen))
        r_max = float(torch.empty(()).uniform_(0.5, 2.0, generator=gen))
        logits = tree.sequence_logits(table)  # (N, T, V)
        p = token_logprobs(logits, seqs).double().sum(-1).exp()  # P_π(y), (N,)
        q = token_logprobs(logits, seqs, rho).double().sum(-1).exp()  # P_mp(y), (N,)
        z_state = retained_mass(table, rho).double()  # (S,)
        z_path = z_state[idx]  # (N, T)
        z_min = float(z_state.min())
        reward = torch.rand(tree.num_sequences, generator=gen, dtype=torch.float64) * r_max  # (N,)
        worst = r_max * (p > q).double()  # the reward that maximises J − J_mp
        bound = r_max * T * (1 - z_min)
        tv = 0.5 * float((p - q).abs().sum())
        rows.append(
            {
                "gap_random": float(((q - p) * reward).sum().abs()),
                "gap_worst": float(((q - p) * worst).sum().abs()),
                "bound": bound,
                "r_max": r_max,
                "tv": tv,
                "hybrid_sum": float((q[:, None] * (1 - z_path)).sum()),
                "exact_tv": float(1 - (q * z_path.prod(-1)).sum()),
                "bernoulli": 1 - z_min**T,
                "t_one_minus_zmin": T * (1 - z_min),
                "z_min": z_min,
                "total_p": float(p.sum()),
                "total_q": float(q.sum()),
            }
        )

    tol = 2e-5

    def max_ratio(key: str) -> float:  # instances without pruning (bound 0) have no ratio
        return max([r[key] / r["bound"] for r in rows if r["bound"] > 0], default=0.0)

    numeric = {
        "num_instances": num_instances,
        "num_sequences_per_instance": tree.num_sequences,
        "num_nontrivial_bounds": sum(r["t_one_minus_zmin"] < 1 for r in rows),
        "z_min_mean": sum(r["z_min"] for r in rows) / len(rows),
        "max_ratio_random_reward": max_ratio("gap_random"),
        "max_ratio_worst_case_reward": max_ratio("gap_worst"),
        "max_tv_over_t_one_minus_zmin": max(
            [r["tv"] / r["t_one_minus_zmin"] for r in rows if r["t_one_minus_zmin"] > 0], default=0.0
        ),
        "max_abs_tv_minus_exact_identity": max(abs(r["tv"] - r["exact_tv"]) for r in rows),
        "scale": float(scale),
    }
    criteria = {
        "bound_holds_random_rewards": all_ok(
            r["gap_random"] <= scale * r["bound"] + tol * r["r_max"] for r in rows
        ),
        "bound_holds_worst_case_rewards": all_ok(
            r["gap_worst"] <= scale * r["bound"] + tol * r["r_max"] for r in rows
        ),
        "worst_case_gap_equals_rmax_tv": all_ok(
            abs(r["gap_worst"] - r["r_max"] * r["tv"]) <= tol * r["r_max"] for r in rows
        ),
        "tv_le_hybrid_sum": all_ok(r["tv"] <= r["hybrid_sum"] + tol for r in rows),
        "hybrid_sum_le_t_one_minus_zmin": all_ok(
            r["hybrid_sum"] <= r["t_one_minus_zmin"] + tol for r in rows
        ),
        "tv_equals_one_minus_expected_prod_z": all_ok(abs(r["tv"] - r["exact_tv"]) <= tol for r in rows),
        "tv_le_bernoulli": all_ok(r["tv"] <= r["bernoulli"] + tol for r in rows),
        "policies_normalised": all_ok(
            abs(r["total_p"] - 1) <= tol and abs(r["total_q"] - 1) <= tol for r in rows
        ),
    }
    return STATEMENT.to_check(
        scale,
        _derivation(float(scale), horizon),
        numeric,
        criteria,
        notes=(
            f"Exact enumeration of {tree.num_sequences} sequences per instance (|V| = {vocab}, T = {horizon}), "
            f"fp32 log-probs from workbench.dvp summed in fp64; tolerance {tol:g}·R_max. Sharper, pruning-specific "
            "form proved and checked: D_TV(P_π, P_mp) = 1 − E_{P_mp}[Π_t Z(s_t)] ≤ 1 − Z_min^T."
        ),
    )
