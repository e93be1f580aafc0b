"""Theorem 4.1 (reconstructed) — the gradient bias caused by training–inference mismatch.

Statement (THEORY.md, **reconstructed**: the paper's full text was not available): the naive estimator
``g(y) = R(y) Σ_t ∇ log π(y_t|s_t)`` fed with samples from the engine's μ instead of the trainer's π has
the exact bias

    E_μ[g] − E_π[g] = E_{y∼μ}[(1 − e^{−S(y)}) g(y)],   S(y) = log μ(y)/π(y),

so ``‖bias‖ ≤ sup‖g‖ E_μ|1 − e^{−S}| = 2 sup‖g‖ D_TV(μ, π)``, with ``D_TV ≤ T Δ_max`` and ``sup‖g‖ = O(T)``:
``‖bias‖ = O(T² Δ_max)``.

The derivation proves the identity on a tiny autoregressive space (T = 2, |V| = 2, symbolic probabilities
and gradients), ``E_μ|1 − e^{−S}| = 2 D_TV``, the per-step ``D_TV ≤ Δ_max`` (from ``1 − e^{−x} ≤ x``) and
``‖∇_z log softmax_a(z)‖ ≤ √2``, so ``sup‖g‖ ≤ √2 R_max T``; the hybrid argument is shared with
Proposition 5.5.

Numerics: exact enumeration of every sequence of small tabular autoregressive policies (|V| = 3, T = 3) whose
parameters are the logit table; log π and log μ from :func:`workbench.dvp.token_logprobs`, per-sequence
gradients by autograd through it, expectations in fp64.
"""

from __future__ import annotations

import math

import sympy as sp
import torch

from workbench.dvp import token_logprobs
from workbench.theory.core import (
    Check,
    Statement,
    Step,
    TreePolicy,
    all_ok,
    conclusion,
    is_zero,
    prove_nonnegative,
    prove_nonnegative_halfline,
    scale_prefix,
    scaled_derivation,
    seeded_generator,
    validate_scale,
)
from workbench.theory.prop55 import hybrid_steps

__all__ = ["check_thm41"]

STATEMENT = Statement(
    name="thm_4_1",
    title="Theorem 4.1 (reconstructed) — gradient bias from mismatch",
    latex=(
        r"g(y)=R(y)\sum_t\nabla\log\pi(y_t|s_t):\qquad "
        r"\mathbb E_\mu[g]-\mathbb E_\pi[g] = {k}\,\mathbb E_{y\sim\mu}\big[(1-e^{-S(y)})\,g(y)\big] \\"
        r"\|\mathrm{bias}\| \le {k}\sup\|g\|\;\mathbb E_\mu|1-e^{-S}| = {k}\,2\sup\|g\|\,D_{TV}(\mu,\pi),\quad "
        r"D_{TV} \le {k}\,T\Delta_{\max},\quad \sup\|g\| = O(T)\ \Rightarrow\ O(T^2\Delta_{\max})"
    ),
    reconstructed=True,
)


@scaled_derivation
def _derivation(k: sp.Rational, kx: str) -> list[Step]:
    """The sympy derivation; ``k`` (LaTeX ``kx``) multiplies every claimed right-hand side."""
    steps: list[Step] = []

    # 1. the identity on every sequence of a T = 2, |V| = 2 autoregressive space
    states = ("r", "1", "2")  # root, after token 1, after token 2
    pi = {s: sp.symbols(f"pi_{s}_1:3", positive=True) for s in states}  # π(a|s) (normalisation not needed)
    mu = {s: sp.symbols(f"mu_{s}_1:3", positive=True) for s in states}
    g = sp.symbols("g1:5", real=True)  # g(y), one component suffices: the identity is linear in g
    lhs = rhs = sp.Integer(0)
    for n, (y1, y2) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        child = states[1 + y1]
        p_y = pi["r"][y1] * pi[child][y2]
        m_y = mu["r"][y1] * mu[child][y2]
        s_y = sp.log(mu["r"][y1] / pi["r"][y1]) + sp.log(mu[child][y2] / pi[child][y2])  # S(y)
        lhs += (m_y - p_y) * g[n]
        rhs += m_y * (1 - sp.exp(-s_y)) * g[n]
    steps.append(
        Step(
            "the exact bias: reweighting E_π to E_μ by π/μ = e^{−S} (every sequence of T = 2, |V| = 2)",
            rf"\mathbb E_\mu[g]-\mathbb E_\pi[g] = {kx}\mathbb E_\mu\big[(1-e^{{-S}})\,g\big]",
            proved=is_zero(sp.expand(sp.powsimp(sp.expand_log(lhs - k * rhs, force=True)))),
            method="sympy: simplify(E_μ g − E_π g − E_μ[(1 − e^{−S}) g]) == 0 with S(y) = Σ_t log(μ_t/π_t)",
        )
    )
    steps.append(
        Step(
            "norm of an expectation ≤ expectation of the norm",
            r"\big\|\mathbb E_\mu[(1-e^{-S})g]\big\| \le \sup\|g\|\;\mathbb E_\mu|1-e^{-S}|",
            proved=False,
            assumption=True,
            method="triangle (Jensen) inequality for norms (standard)",
        )
    )
    m, p = sp.symbols("mu pi", positive=True)
    steps.append(
        Step(
            "per sequence μ|1 − π/μ| = |μ − π|, so the weight's mean absolute value is twice the TV",
            r"\mathbb E_\mu|1-e^{-S}| = \sum_y|\mu(y)-\pi(y)| = 2D_{TV}(\mu,\pi)",
            proved=is_zero(m * sp.Abs(1 - p / m) - sp.Abs(m - p)),
            method="sympy: simplify(μ·|1 − π/μ| − |μ − π|) == 0 for μ, π > 0",
        )
    )
    x = sp.Symbol("x", nonnegative=True)
    ok_tv, order = prove_nonnegative_halfline(k * x - (1 - sp.exp(-x)), x)
    steps.append(
        Step(
            "per step: D_TV = Σ_{a: μ>π} μ_a(1 − e^{−Δ_a}) ≤ Σ μ_a Δ_max ≤ Δ_max, from 1 − e^{−x} ≤ x (x ≥ 0)",
            rf"1-e^{{-x}} \le {kx} x\ \ (x\ge0)\ \Rightarrow\ D_{{TV}}(\mu(\cdot|s),\pi(\cdot|s)) \le "
            rf"{kx}\Delta_{{\max}}",
            proved=ok_tv,
            method=f"sympy: h(0) ≥ 0, …, h^({order}) ≥ 0 on x ≥ 0 (prove_nonnegative_halfline)"
            if ok_tv
            else "sympy could not show the inequality on x ≥ 0",
        )
    )
    hyb = hybrid_steps()
    steps.append(
        Step(
            "over T steps (hybrid argument: telescoping + suffix marginalisation proved in Proposition 5.5's "
            "check, then the triangle inequality)",
            rf"D_{{TV}}(\mu,\pi) \le \sum_t \mathbb E\big[D_{{TV}}(\mu(\cdot|s_t),\pi(\cdot|s_t))\big] \le "
            rf"{kx} T\Delta_{{\max}}",
            proved=False,
            assumption=all(s.ok for s in hyb),
            method="hybrid argument (workbench.theory.prop55.hybrid_steps)",
        )
    )
    w = sp.symbols("w1:4", positive=True)  # softmax weights; token a = 1
    probs = [wi / sp.Add(*w) for wi in w]
    grad_sq = (1 - probs[0]) ** 2 + probs[1] ** 2 + probs[2] ** 2  # ‖e_a − p‖² = ‖∇_z log softmax_a(z)‖²
    zz = sp.symbols("z1:4", real=True)
    logsm = zz[0] - sp.log(sp.Add(*[sp.exp(zi) for zi in zz]))
    grad = [sp.diff(logsm, zi) for zi in zz]
    sub = {sp.exp(zi): wi for zi, wi in zip(zz, w)}
    grad_matches = is_zero(sp.Add(*[gi**2 for gi in grad]).subs(sub) - grad_sq)
    steps.append(
        Step(
            "the logit gradient of log softmax_a is e_a − p, with squared norm (1 − p_a)² + Σ_{b≠a} p_b² ≤ "
            "2(1 − p_a)² ≤ 2; summing T steps: sup‖g‖ ≤ √2 R_max T",
            rf"\|\nabla_z\log\operatorname{{softmax}}_a(z)\|^2 \le 2(1-p_a)^2 \le {scale_prefix(k**2)} 2 "
            rf"\ \Rightarrow\ \sup\|g\| \le {kx}\sqrt2\,R_{{\max}}T = O(T)",
            proved=grad_matches
            and prove_nonnegative(2 * (1 - probs[0]) ** 2 - grad_sq)
            and prove_nonnegative(k**2 * 2 - 2 * (1 - probs[0]) ** 2),
            method="sympy: diff of the log-softmax (|V| = 3), then prove_nonnegative on the two gaps",
        )
    )
    steps.append(
        conclusion(
            "combine: ‖bias‖ ≤ 2 sup‖g‖ D_TV ≤ 2√2 R_max T² Δ_max",
            r"\|\mathrm{bias}\| \le 2\sqrt2\,R_{\max}\,T^2\,\Delta_{\max} = O(T^2\Delta_{\max})",
            steps,
        )
    )
    return steps


def check_thm41(
    seed: int = 0,
    *,
    scale: float = 1.0,
    num_instances: int = 16,
    vocab: int = 3,
    horizon: int = 3,
) -> Check:
    """Check Theorem 4.1 (reconstructed) symbolically and by exact enumeration with :mod:`workbench.dvp`.

    Each instance: a logit table θ (one row per prefix), a perturbation δ ~ N(0, σ²) with σ drawn in
    [0.05, 1], rewards R(y) ~ U[0, R_max]. Over all ``vocab ** horizon`` sequences: ``log π`` and ``log μ`` from
    ``token_logprobs(θ)`` and ``token_logprobs(θ + δ)``, per-sequence gradients ``∇_θ log π(y)`` by autograd,
    then both sides of the identity and every bound in fp64. The policy-gradient theorem (E_π[g] = ∇J, J by
    enumeration) is checked too, so "bias" really is the distance from the true gradient.

    Args:
        seed: seeds the ``torch.Generator``.
        scale: multiplies every right-hand side; 1 is the statement as written, 0.5 a wrong one to reject.
        num_instances: number of random policies.
        vocab, horizon: tree size.

    Returns:
        A :class:`~workbench.theory.core.Check` (``reconstructed=True``); ``numeric`` holds the largest identity
        residual and the largest ratios of ‖bias‖ to each bound.
    """
    validate_scale(scale)
    tree = TreePolicy(vocab=vocab, horizon=horizon)
    gen = seeded_generator(seed)
    seqs, idx = tree.sequences(), tree.state_index()  # (N, T) each
    T, r_max = horizon, 1.0

    rows: list[dict[str, float]] = []
    for _ in range(num_instances):
        sharp = float(torch.empty(()).uniform_(0.5, 3.0, generator=gen))
        sigma = float(torch.empty(()).uniform_(0.05, 1.0, generator=gen))
        theta = (
            torch.randn(tree.num_states, vocab, generator=gen, dtype=torch.float64) * sharp
        ).requires_grad_()
        delta = torch.randn(tree.num_states, vocab, generator=gen, dtype=torch.float64) * sigma
        reward = torch.rand(tree.num_sequences, generator=gen, dtype=torch.float64) * r_max  # (N,)

        def seq_logp(table: torch.Tensor) -> torch.Tensor:
            return token_logprobs(tree.sequence_logits(table), seqs).sum(-1)  # (N,)

        # per-sequence gradients in one backward pass: every sequence reads its own copy of the table
        copies = theta.detach().expand(tree.num_sequences, -1, -1).clone().requires_grad_()  # (N, S, V)
        rows_idx = torch.arange(tree.num_sequences)[:, None]  # (N, 1)
        per_seq = token_logprobs(copies[rows_idx, idx], seqs).sum(
            -1
        )  # (N,) log π(y), own-copy logits (N, T, V)
        (jac,) = torch.autograd.grad(per_seq.sum(), copies)  # (N, S, V): ∇_θ log π(y)
        grads = jac.reshape(tree.num_sequences, -1).double() * reward[:, None]  # g(y), (N, D)
        log_pi = seq_logp(theta).detach().double()
        log_mu = seq_logp(theta.detach() + delta).double()
        pi, mu = log_pi.exp(), log_mu.exp()  # (N,)
        big_s = log_mu - log_pi  # S(y)

        e_pi = (pi[:, None] * grads).sum(0)
        e_mu = (mu[:, None] * grads).sum(0)
        bias = e_mu - e_pi
        rhs = (mu * (1 - torch.exp(-big_s)))[:, None].mul(grads).sum(0)
        j = (seq_logp(theta).exp() * reward).sum()
        (grad_j,) = torch.autograd.grad(j, theta)

        all_tok = torch.arange(vocab).expand(tree.num_states, vocab).contiguous()  # (S, V)
        th = theta.detach()[:, None, :].expand(tree.num_states, vocab, vocab).contiguous()  # (S, V, V)
        delta_tok = token_logprobs(th + delta[:, None, :], all_tok) - token_logprobs(th, all_tok)  # (S, V)
        sup_g = float(grads.norm(dim=-1).max())
        rows.append(
            {
                "bias_norm": float(bias.norm()),
                "identity_residual": float((bias - scale * rhs).norm() / bias.norm().clamp_min(1e-300)),
                "pg_residual": float(
                    (e_pi - grad_j.reshape(-1).double()).norm() / grad_j.norm().clamp_min(1e-300)
                ),
                "sup_g": sup_g,
                "mean_abs_weight": float((mu * (1 - torch.exp(-big_s)).abs()).sum()),
                "tv": 0.5 * float((mu - pi).abs().sum()),
                "delta_max": float(delta_tok.abs().max()),
            }
        )

    tol = 1e-6
    numeric = {
        "num_instances": num_instances,
        "num_sequences_per_instance": tree.num_sequences,
        "min_bias_norm": min(r["bias_norm"] for r in rows),
        "max_identity_residual": max(r["identity_residual"] for r in rows),
        "max_policy_gradient_residual": max(r["pg_residual"] for r in rows),
        "max_ratio_bias_to_weight_bound": max(
            r["bias_norm"] / (r["sup_g"] * r["mean_abs_weight"]) for r in rows
        ),
        "max_ratio_bias_to_tv_bound": max(r["bias_norm"] / (2 * r["sup_g"] * r["tv"]) for r in rows),
        "max_ratio_tv_to_t_delta_max": max(r["tv"] / (T * r["delta_max"]) for r in rows),
        "max_ratio_sup_g_to_sqrt2_rmax_t": max(r["sup_g"] / (math.sqrt(2) * r_max * T) for r in rows),
        "scale": float(scale),
    }
    criteria = {
        "identity_holds": all_ok(r["identity_residual"] <= 1e-9 for r in rows),
        "bias_nonzero": all_ok(r["bias_norm"] > 1e-8 for r in rows),
        "pi_expectation_is_true_gradient": all_ok(r["pg_residual"] <= 1e-4 for r in rows),
        "bias_le_sup_g_times_mean_abs_weight": all_ok(
            r["bias_norm"] <= scale * r["sup_g"] * r["mean_abs_weight"] * (1 + tol) for r in rows
        ),
        "mean_abs_weight_equals_2tv": all_ok(abs(r["mean_abs_weight"] - 2 * r["tv"]) <= 1e-9 for r in rows),
        "tv_le_t_delta_max": all_ok(r["tv"] <= scale * T * r["delta_max"] + tol for r in rows),
        "sup_g_le_sqrt2_rmax_t": all_ok(
            r["sup_g"] <= scale * math.sqrt(2) * r_max * T * (1 + tol) for r in rows
        ),
    }
    return STATEMENT.to_check(
        scale,
        _derivation(float(scale)),
        numeric,
        criteria,
        notes=f"Exact enumeration of {tree.num_sequences} sequences (|V| = {vocab}, T = {horizon}) per instance; "
        "log-probs from workbench.dvp.token_logprobs (fp32), expectations in fp64.",
    )
