"""Proposition 5.4 (reconstructed) — pruning moves exactly the pruned mass: ``D_TV(π, π^mp) = 1 − Z``.

Statement (THEORY.md, **reconstructed**: the paper's full text was not available): with the safe set
``V_S = {a : π(a) ≥ ρ max_b π(b)}``, the min-p policy ``π^mp = π · 1[V_S] / Z`` and the retained mass
``Z = Σ_{a ∈ V_S} π(a)``,

    D_TV(π(·|s), π^mp(·|s)) = 1 − Z(s) ≤ (|V| − |V_S|) ρ max π ≤ |V| ρ.

Why: π^mp raises every safe token by the factor 1/Z ≥ 1 and zeroes the rest, so half the L1 distance is the
safe gain ``(1/Z − 1) Z = 1 − Z`` plus the pruned loss ``1 − Z``, halved; each pruned token has
``π(a) < ρ max π``.

Numerics compare, for random logits and ρ from 0.3 down to e^{-13}, the TV computed directly from
``exp(token_logprobs(z, a))`` and ``exp(token_logprobs(z, a, rho))`` over every token with
``1 − retained_mass(z, rho)``, and the bound with ``safe_mask``.
"""

from __future__ import annotations

import sympy as sp
import torch

from workbench.dvp import DEFAULT_RHO, retained_mass, safe_mask, token_logprobs
from workbench.theory.core import (
    Check,
    Statement,
    Step,
    all_ok,
    is_zero,
    prove_nonnegative,
    scaled_derivation,
    seeded_generator,
    sign_abs,
    validate_scale,
)

__all__ = ["DEFAULT_RHOS", "check_prop54"]

DEFAULT_RHOS: tuple[float, ...] = (0.3, 0.1, 1e-2, 1e-4, DEFAULT_RHO)
"""ρ values the numeric check sweeps: large ones make 1 − Z visible, e^{-13} is the paper's default."""

STATEMENT = Statement(
    name="prop_5_4",
    title="Proposition 5.4 (reconstructed) — pointwise TV of pruning: D_TV(π, π^mp) = 1 − Z",
    latex=(
        r"V_S=\{a:\pi(a)\ge\rho\max_b\pi(b)\},\ \ \pi^{mp}=\frac{\pi\,\mathbb 1[V_S]}{Z},\ \ Z=\sum_{a\in V_S}\pi(a): \\"
        r"D_{TV}\big(\pi(\cdot|s),\pi^{mp}(\cdot|s)\big) = {k}(1-Z(s)) \le {k}(|V|-|V_S|)\,\rho\max\pi \le {k}|V|\rho"
    ),
    reconstructed=True,
)


@scaled_derivation
def _derivation(k: sp.Rational, kx: str) -> list[Step]:
    """sympy derivation on |V| = 4 with safe set {1, 2}; ``k`` (LaTeX ``kx``) multiplies every right-hand side."""
    steps: list[Step] = [
        Step(
            "definitions: the argmax is always safe (ρ ≤ 1), so Z ≥ max π > 0 and π^mp is a distribution",
            r"\pi^{mp}(a) = \frac{\pi(a)\,\mathbb 1[a\in V_S]}{Z},\quad Z \ge \max_b \pi(b) > 0",
            proved=False,
            assumption=True,
            method="definition (Section 5)",
        )
    ]
    w = sp.symbols("w1:5", positive=True)  # unnormalised weights e^{z_a}; tokens 1, 2 safe, 3, 4 pruned
    total = sp.Add(*w)
    pi = [wi / total for wi in w]
    z_mass = pi[0] + pi[1]
    pi_mp = [w[0] / (w[0] + w[1]), w[1] / (w[0] + w[1]), sp.Integer(0), sp.Integer(0)]
    tv = sp.Rational(1, 2) * sp.Add(*[sign_abs(sp.together(a - b)) for a, b in zip(pi, pi_mp)])
    steps.append(
        Step(
            "total variation on a 4-token vocabulary split into safe {1, 2} and pruned {3, 4}: every safe token "
            "gains (1/Z − 1)π(a), every pruned one loses π(a)",
            rf"\tfrac12\sum_a|\pi(a)-\pi^{{mp}}(a)| = \tfrac12\big[(1/Z-1)Z + (1-Z)\big] = {kx}(1-Z)",
            proved=is_zero(tv - k * (1 - z_mass)),
            method="sympy: signs of π − π^mp decided from positive weights (sign_abs), then simplify(TV − (1 − Z)) == 0",
        )
    )
    rho = sp.Symbol("rho", positive=True)
    u3, u4 = sp.symbols("u3 u4", positive=True)
    pruned = {w[2]: rho * w[0] / (1 + u3), w[3]: rho * w[0] / (1 + u4)}  # w_a < ρ w_max for pruned tokens
    one_minus_z = ((w[2] + w[3]) / total).subs(pruned)
    pmax = (w[0] / total).subs(pruned)  # token 1 is the argmax
    bound = k * 2 * rho * pmax  # (|V| − |V_S|) ρ max π with |V| − |V_S| = 2
    steps.append(
        Step(
            "each pruned token has π(a) < ρ max π (write w_a = ρ w_max/(1 + u_a), u_a > 0), so the pruned mass is "
            "below (|V| − |V_S|) ρ max π",
            rf"1 - Z = \sum_{{a\notin V_S}}\pi(a) \le {kx}(|V|-|V_S|)\,\rho\max\pi",
            proved=prove_nonnegative(bound - one_minus_z),
            method="sympy: the gap is a rational function with non-negative expanded numerator (prove_nonnegative)",
        )
    )
    steps.append(
        Step(
            "and max π ≤ 1, |V_S| ≥ 1",
            rf"(|V|-|V_S|)\,\rho\max\pi \le {kx}|V|\rho",
            proved=prove_nonnegative(k * 4 * rho - 2 * rho * pmax),
            method="sympy: prove_nonnegative(|V|ρ − (|V| − |V_S|)ρ max π)",
        )
    )
    return steps


def check_prop54(
    seed: int = 0,
    *,
    scale: float = 1.0,
    rhos: tuple[float, ...] = DEFAULT_RHOS,
    batch: int = 512,
    vocab: int = 32,
) -> Check:
    """Check Proposition 5.4 (reconstructed) symbolically and numerically with :mod:`workbench.dvp`.

    Args:
        seed: seeds the ``torch.Generator`` drawing the logits.
        scale: multiplies every right-hand side; 1 is the statement as written, 0.5 a wrong one to reject.
        rhos: ρ values to sweep (each in (0, 1]).
        batch: number of random logit vectors per ρ.
        vocab: vocabulary size.

    Returns:
        A :class:`~workbench.theory.core.Check` (``reconstructed=True``); ``numeric`` holds, per ρ, the largest
        |TV − (1 − Z)|, the largest 1 − Z and the largest ratio (1 − Z) / bound.
    """
    validate_scale(scale)
    if not rhos or any(not (0 < r <= 1) for r in rhos):
        raise ValueError(f"rhos={rhos!r} must be a non-empty tuple of ρ in (0, 1]")
    gen = seeded_generator(seed)
    B, V = batch, vocab
    sharp = torch.empty(B, 1).uniform_(0.5, 8.0, generator=gen)
    z = torch.randn(B, V, generator=gen) * sharp  # (B, V)
    z_all = z[:, None, :].expand(B, V, V).contiguous()  # (B, V, V): one row per (instance, token)
    all_tokens = torch.arange(V).expand(B, V).contiguous()  # (B, V)
    pi = token_logprobs(z_all, all_tokens).double().exp()  # (B, V)

    numeric: dict[str, float | int] = {"batch": B, "vocab": V, "scale": float(scale)}
    crit: dict[str, list[bool]] = {
        k: [] for k in ("tv_equals", "pruned_mass_bound", "vocab_bound", "mp_support", "z_range")
    }
    tol = 1e-5
    for rho in rhos:
        pi_mp = token_logprobs(z_all, all_tokens, rho).double().exp()  # (B, V)
        tv = 0.5 * (pi - pi_mp).abs().sum(-1)  # (B,)
        z_mass = retained_mass(z, rho).double()  # (B,)
        mask = safe_mask(z, rho)  # (B, V)
        n_safe = mask.sum(-1).double()
        one_minus_z = 1 - z_mass
        bound = (V - n_safe) * rho * pi.max(-1).values  # (B,)
        tag = f"rho={rho:.3g}"
        numeric[f"{tag}/max_abs_tv_minus_1mz"] = float((tv - one_minus_z).abs().max())
        numeric[f"{tag}/max_1mz"] = float(one_minus_z.max())
        numeric[f"{tag}/max_ratio_to_bound"] = (
            float((one_minus_z / bound.clamp_min(1e-30))[one_minus_z > 1e-6].max())
            if bool((one_minus_z > 1e-6).any())
            else 0.0
        )
        numeric[f"{tag}/mean_safe_size"] = float(n_safe.mean())
        crit["tv_equals"].append(bool(((tv - scale * one_minus_z).abs() <= tol).all()))
        crit["pruned_mass_bound"].append(bool((one_minus_z <= scale * bound + tol).all()))
        crit["vocab_bound"].append(bool((one_minus_z <= scale * V * rho + tol).all()))
        crit["mp_support"].append(
            bool((pi_mp.masked_fill(mask, 0).sum(-1) < 1e-8).all())
            and bool(((pi_mp.sum(-1) - 1).abs() < tol).all())
        )
        crit["z_range"].append(bool(((z_mass > 0) & (z_mass <= 1 + tol)).all()))
    criteria = {
        "tv_equals_one_minus_z": all_ok(crit["tv_equals"]),
        "one_minus_z_le_pruned_count_rho_pmax": all_ok(crit["pruned_mass_bound"]),
        "one_minus_z_le_vocab_rho": all_ok(crit["vocab_bound"]),
        "pi_mp_supported_on_safe_set_and_normalised": all_ok(crit["mp_support"]),
        "z_in_0_1": all_ok(crit["z_range"]),
    }
    return STATEMENT.to_check(
        scale,
        _derivation(float(scale)),
        numeric,
        criteria,
        notes=f"Numerics: {B} random logit vectors of |V| = {V} per ρ; fp32 log-probs from workbench.dvp; "
        f"absolute tolerance {tol:g}.",
    )
