"""Proposition 4.2 — the asymmetric bound: confident tokens barely move, tail tokens move by up to 2ε.

Statement (THEORY.md): if the rollout engine's logits are the trainer's plus a perturbation with
``‖δ‖_∞ ≤ ε``, then for ``f(t) = log softmax_a(z + tδ)``, ``f'(t) = δ_a − Σ_b p_b(t) δ_b`` and
``|f'(t)| ≤ 2ε(1 − p_a(t))``, so

- first order: ``|Δ_a| ≤ 2ε(1 − p_a)``;
- exact (integrate, using ``p_a(t) ≥ p_a e^{−2ε}``): ``|Δ_a| ≤ 2ε(1 − p_a e^{−2ε})``; always ``|Δ_a| ≤ 2ε``;
- sequence: ``|S(y)| ≤ 2ε Σ_t (1 − p_{y_t})``.

The symbolic derivation works on a vocabulary of 3 symbolic logits. Two remarks the derivation makes precise:
the first-order bound is only first order (numerically the worst ratio ``|Δ_a| / 2ε(1 − p_a)`` is
``(e^{2ε} − 1)/2ε > 1``), and its exact companion is ``|Δ_a| ≤ (e^{2ε} − 1)(1 − p_a)``, proved here too; the
sequence bound is checked in its exact form ``|S| ≤ Σ_t 2ε(1 − p_{y_t} e^{−2ε})``.

Run: ``python -c "from workbench.theory import check_prop42; print(check_prop42().passed)"``.
"""

from __future__ import annotations

import itertools
import math

import sympy as sp
import torch

from workbench.dvp import token_logprobs
from workbench.theory.core import (
    Check,
    Statement,
    Step,
    all_ok,
    is_zero,
    prove_nonnegative,
    prove_nonnegative_halfline,
    scaled_derivation,
    seeded_generator,
    validate_scale,
)

__all__ = ["check_prop42", "logit_error", "prop42_envelope"]


def logit_error(logits_train: torch.Tensor, logits_engine: torch.Tensor) -> torch.Tensor:
    """Prop 4.2's ε at each state: ``½(max_b δ_b − min_b δ_b)`` with ``δ = z_engine − z_train``.

    Softmax ignores a constant shift of the logits, so the ε that matters is the smallest ``‖δ − c‖_∞`` over
    constants ``c`` — half the range of δ, reached at ``c`` = the midrange. ``max |δ|`` is not shift-invariant:
    an engine that adds 3 to every logit has ``max |δ| = 3`` and no mismatch at all. Every ε the workbench
    measures (figures, the signature experiment, the lesson 08 checker) is this one.

    Args:
        logits_train: ``(..., V)`` trainer logits.
        logits_engine: ``(..., V)`` the engine's logits at the same states.

    Returns:
        ``(...)`` ε per state, fp64.

    >>> zt = torch.tensor([[0.0, 1.0, 2.0]])
    >>> logit_error(zt, zt + torch.tensor([[3.1, 3.0, 2.9]]))  # a shift of 3 plus ±0.1
    tensor([0.1000], dtype=torch.float64)
    """
    if logits_train.shape != logits_engine.shape:
        raise ValueError(
            f"logits_engine has shape {tuple(logits_engine.shape)}, logits_train {tuple(logits_train.shape)}; "
            "pass the logits of the same states"
        )
    delta = logits_engine.double() - logits_train.double()  # (..., V)
    return 0.5 * (delta.amax(-1) - delta.amin(-1))


def prop42_envelope(logp: torch.Tensor, eps: torch.Tensor | float, *, exact: bool = True) -> torch.Tensor:
    """Prop 4.2's bound on ``|Δ_a|``: ``2ε(1 − p_a e^{−2ε})`` (exact) or ``2ε(1 − p_a)`` (first order).

    Takes ``log p`` so that ``1 − p e^{−2ε} = −expm1(log p − 2ε)`` stays accurate for confident tokens, where
    the bound is tiny. ``eps`` is :func:`logit_error` for a measured engine, or the box size ``‖δ‖_∞ ≤ ε``.

    Args:
        logp: trainer log-probabilities ``log p_a`` (any shape).
        eps: ε, a float or a tensor broadcastable against ``logp``.
        exact: the exact bound (default) or the first-order envelope.

    Returns:
        The bound, in ``logp``'s (floating) dtype and broadcast shape.

    >>> logp = torch.tensor([-1e-3, -30.0], dtype=torch.float64)  # a confident token (p ≈ 0.999), a tail token
    >>> prop42_envelope(logp, 0.1), prop42_envelope(logp, 0.1, exact=False)
    (tensor([0.0364, 0.2000], dtype=torch.float64), tensor([1.9990e-04, 2.0000e-01], dtype=torch.float64))
    """
    eps_t = torch.as_tensor(eps, dtype=logp.dtype, device=logp.device)
    shifted = logp - 2 * eps_t if exact else logp
    return 2 * eps_t * -torch.expm1(shifted)


STATEMENT = Statement(
    name="prop_4_2",
    title="Proposition 4.2 — asymmetric bound |Δ_a| ≤ 2ε(1 − p_a)",
    latex=(
        r"\|\delta\|_\infty \le \varepsilon:\quad f(t)=\log\operatorname{softmax}_a(z+t\delta),\ "
        r"f'(t)=\delta_a-\textstyle\sum_b p_b(t)\,\delta_b,\ |f'(t)| \le {k}\,2\varepsilon\,(1-p_a(t)) \\"
        r"|\Delta_a| \le {k}\,2\varepsilon\,(1-p_a)\ \text{(first order)},\quad "
        r"|\Delta_a| \le {k}\,2\varepsilon\,(1-p_a e^{-2\varepsilon})\ \text{(exact)},\quad "
        r"|\Delta_a| \le {k}\,2\varepsilon \\"
        r"|S(y)| \le {k}\,2\varepsilon \textstyle\sum_t (1-p_{y_t})"
    ),
    reconstructed=False,
)


@scaled_derivation
def _derivation(k: sp.Rational, kx: str) -> list[Step]:
    """The sympy derivation for a 3-token vocabulary; ``k`` (LaTeX ``kx``) multiplies every claimed bound."""
    vocab = 3
    t = sp.Symbol("t", nonnegative=True)
    eps = sp.Symbol("epsilon", positive=True)
    z = sp.symbols(f"z0:{vocab}", real=True)
    d = sp.symbols(f"delta0:{vocab}", real=True)
    steps: list[Step] = []

    # 1. the derivative of the log-softmax along the path z + tδ
    expo = [sp.exp(z[b] + t * d[b]) for b in range(vocab)]
    norm = sp.Add(*expo)
    p_t = [e / norm for e in expo]  # p_b(t)
    f = sp.log(expo[0] / norm)  # token a = 0
    claim = d[0] - sp.Add(*[p_t[b] * d[b] for b in range(vocab)])
    steps.append(
        Step(
            "derivative of the log-probability along the perturbation path (|V| = 3, a = 0)",
            r"f'(t) = \delta_a - \sum_b p_b(t)\,\delta_b",
            proved=is_zero(sp.diff(f, t) - claim),
            method="sympy: simplify(diff(f, t) − claim) == 0 with p_b(t) the explicit softmax",
        )
    )

    # 2. normalisation rewrites it as a sum over the other tokens
    pairwise = sp.Add(*[p_t[b] * (d[0] - d[b]) for b in range(1, vocab)])
    steps.append(
        Step(
            "using Σ_b p_b = 1, only the other tokens' mass enters",
            r"f'(t) = \sum_{b\ne a} p_b(t)\,(\delta_a-\delta_b)",
            proved=is_zero(claim - pairwise),
            method="sympy: simplify(claim − pairwise) == 0",
        )
    )

    # 3. |f'| ≤ 2ε(1 − p_a): linear in δ, so its extremes over the box are at vertices
    q = sp.symbols(f"q1:{vocab}", positive=True)  # p_b(t) for b ≠ a: any positive values
    bound = k * 2 * eps * sp.Add(*q)  # 2ε(1 − p_a(t)) = 2ε Σ_{b≠a} p_b(t)
    vertex_ok = True
    for signs in itertools.product((-1, 1), repeat=vocab):
        dv = [s * eps for s in signs]
        lin = sp.Add(*[q[b - 1] * (dv[0] - dv[b]) for b in range(1, vocab)])
        vertex_ok &= prove_nonnegative(bound - lin) and prove_nonnegative(bound + lin)
    steps.append(
        Step(
            "bound |f'| on the box ‖δ‖∞ ≤ ε: f' is linear in δ, so it is extreme at a vertex δ ∈ {±ε}^V; "
            "check every vertex",
            rf"|f'(t)| \le {kx} 2\varepsilon\,(1-p_a(t))",
            proved=vertex_ok,
            method="sympy: at each of the 2^3 vertices, bound ∓ f' has non-negative coefficients "
            "in the positive p_b (prove_nonnegative)",
        )
    )

    # 4. first order: Δ_a = f(1) − f(0) = f'(0) + O(ε²)
    s = sp.Symbol("s", positive=True)  # δ = s·d, expand in s
    f_path = sp.log(sp.exp(z[0] + s * d[0]) / sp.Add(*[sp.exp(z[b] + s * d[b]) for b in range(vocab)]))
    delta_a = f_path - f_path.subs(s, 0)
    first = sp.series(delta_a, s, 0, 2).removeO()
    p0 = [sp.exp(z[b]) / sp.Add(*[sp.exp(zz) for zz in z]) for b in range(vocab)]
    fprime0 = s * (d[0] - sp.Add(*[p0[b] * d[b] for b in range(vocab)]))
    steps.append(
        Step(
            "first order in the perturbation: Δ_a = f'(0) + O(‖δ‖²), so step 3 at t = 0 gives the first-order bound",
            rf"\Delta_a = f'(0) + O(\varepsilon^2),\quad |\Delta_a| \le {kx} 2\varepsilon(1-p_a) + O(\varepsilon^2)",
            proved=is_zero(first - fprime0) and vertex_ok,
            method="sympy: series(f(1) − f(0), δ = s·d, s → 0) has linear term f'(0); bound from step 3",
        )
    )

    # 5. how far p_a(t) can move: with K = Σ_{b≠a} e^{z_b − z_a} and E = e^{2εt} = 1 + w ≥ 1
    steps.append(
        Step(
            "hypothesis: each other token's logit gap moves by at most 2ε per unit t, so "
            "K(t) = Σ_{b≠a} e^{z_b − z_a + t(δ_b − δ_a)} ≤ K e^{2εt}",
            r"K(t) \le K\,e^{2\varepsilon t},\quad p_a(t) = \frac{1}{1+K(t)}",
            proved=False,
            assumption=True,
            method="hypothesis ‖δ‖∞ ≤ ε ⇒ δ_b − δ_a ≤ 2ε; exp is increasing",
        )
    )
    kk, w = sp.symbols("K w", positive=True)
    big_e = 1 + w  # e^{2εt} ≥ 1
    lower = 1 / (1 + kk * big_e) - 1 / (big_e * (1 + kk))  # p_a(t) − p_a e^{−2εt} ≥ 0
    upper = big_e * kk / (1 + kk) - kk * big_e / (1 + kk * big_e)  # e^{2εt}(1 − p_a) − (1 − p_a(t)) ≥ 0
    steps.append(
        Step(
            "so p_a(t) cannot fall below p_a e^{−2εt}, and 1 − p_a(t) cannot rise above e^{2εt}(1 − p_a)",
            r"p_a(t) \ge p_a e^{-2\varepsilon t} \ge p_a e^{-2\varepsilon},\qquad 1-p_a(t) \le e^{2\varepsilon t}(1-p_a)",
            proved=prove_nonnegative(lower) and prove_nonnegative(upper),
            method="sympy: with E = e^{2εt} = 1 + w (w ≥ 0), both differences are rational functions "
            "with non-negative expanded numerators (prove_nonnegative)",
        )
    )

    # 6. integrate the derivative bound along t ∈ [0, 1]
    p = sp.Symbol("p", positive=True)  # p_a
    integral = sp.integrate(2 * eps * (1 - p * sp.exp(-2 * eps * t)), (t, 0, 1))
    tight = 2 * eps - p * (1 - sp.exp(-2 * eps))
    steps.append(
        Step(
            "integrate |f'(t)| ≤ 2ε(1 − p_a(t)) ≤ 2ε(1 − p_a e^{−2εt}) over t ∈ [0, 1]",
            r"|\Delta_a| \le \int_0^1 2\varepsilon\,(1-p_a e^{-2\varepsilon t})\,dt = 2\varepsilon - p_a(1-e^{-2\varepsilon})",
            proved=is_zero(integral - tight) and vertex_ok,
            method="sympy: integrate(...) equals the closed form; uses steps 3 and 6",
        )
    )

    # 7. the integrated bound is below the stated exact bound: h(ε) ≥ 0 by monotonicity in ε
    e_nn = sp.Symbol("epsilon", nonnegative=True)
    stated = k * 2 * e_nn * (1 - p * sp.exp(-2 * e_nn))
    h = stated - tight.subs(eps, e_nn)
    ok7, order = prove_nonnegative_halfline(h, e_nn, max_order=2)
    steps.append(
        Step(
            "the integrated bound is at most the stated exact bound (h(0) = 0 and h is non-decreasing in ε)",
            rf"|\Delta_a| \le 2\varepsilon - p_a(1-e^{{-2\varepsilon}}) \le {kx} 2\varepsilon(1-p_a e^{{-2\varepsilon}})",
            proved=ok7,
            method=f"sympy: h(0) ≥ 0 and h^({order})(ε) ≥ 0 on ε ≥ 0 (prove_nonnegative_halfline)"
            if ok7
            else "sympy could not show h ≥ 0 on ε ≥ 0",
        )
    )

    # 8. the rigorous companion of the first-order bound
    companion = sp.integrate(2 * eps * sp.exp(2 * eps * t), (t, 0, 1))
    first_gap = k * (sp.exp(2 * e_nn) - 1) - (sp.exp(2 * e_nn) - 1)
    ok8 = is_zero(companion - (sp.exp(2 * eps) - 1)) and prove_nonnegative_halfline(first_gap, e_nn)[0]
    steps.append(
        Step(
            "exact form of the first-order bound: integrate 2ε e^{2εt}(1 − p_a)",
            rf"|\Delta_a| \le {kx}(e^{{2\varepsilon}}-1)(1-p_a) = {kx} 2\varepsilon(1-p_a)(1+O(\varepsilon))",
            proved=ok8,
            method="sympy: integrate(2ε e^{2εt}, t ∈ [0,1]) = e^{2ε} − 1; with step 6's upper bound",
        )
    )

    # 9. always |Δ_a| ≤ 2ε
    steps.append(
        Step(
            "since 1 − p_a e^{−2ε} ≤ 1, every token moves by at most 2ε",
            rf"|\Delta_a| \le {kx} 2\varepsilon",
            proved=ok7 and prove_nonnegative_halfline(k * 2 * e_nn - tight.subs(eps, e_nn), e_nn)[0],
            method="sympy: h(ε) = 2ε − [2ε − p_a(1 − e^{−2ε})] has h(0) = 0, h' ≥ 0 on ε ≥ 0",
        )
    )

    # 10. sequences: sum the per-token bounds
    steps.append(
        Step(
            "sequence: S(y) = Σ_t Δ_{y_t}(s_t); the triangle inequality sums the per-token bounds",
            rf"|S(y)| \le {kx} 2\varepsilon \sum_t (1-p_{{y_t}} e^{{-2\varepsilon}}) "
            rf"= {kx} 2\varepsilon \sum_t (1-p_{{y_t}}) + O(T\varepsilon^2)",
            proved=False,
            assumption=True,
            method="triangle inequality over the T steps (standard)",
        )
    )
    return steps


def check_prop42(
    seed: int = 0,
    *,
    scale: float = 1.0,
    num_sequences: int = 256,
    horizon: int = 8,
    vocab: int = 12,
    eps_values: tuple[float, ...] = (0.01, 0.05, 0.2, 0.5, 1.0),
) -> Check:
    """Check Proposition 4.2 symbolically (sympy) and numerically with :func:`workbench.dvp.token_logprobs`.

    Numerics: random trainer logits ``z`` of mixed sharpness (so ``p_a`` spans ~1 down to ~1e-8), random
    perturbations with ``‖δ‖_∞ ≤ ε`` (half uniform in the box, half at its vertices ``±ε``, where the bound is
    nearly attained), ``Δ_a = token_logprobs(z + δ, a) − token_logprobs(z, a)`` for *every* token ``a``, and
    ``S`` summed over a uniformly random token per step.

    Args:
        seed: seeds the ``torch.Generator`` that draws every instance.
        scale: multiplies every bound of the statement; 1 is the statement as written, ``0.5`` is a wrong
            statement the check must reject (symbolically and numerically).
        num_sequences, horizon, vocab: instance size: ``num_sequences × horizon`` logit rows of ``vocab``.
        eps_values: the ε values, cycled over sequences.

    Returns:
        A :class:`~workbench.theory.core.Check`; ``numeric`` holds the largest ratios |Δ| / bound.
    """
    validate_scale(scale)
    if not eps_values or any(not (e > 0 and math.isfinite(e)) for e in eps_values):
        raise ValueError(f"eps_values={eps_values!r} must be a non-empty tuple of finite ε > 0")

    gen = seeded_generator(seed)
    n, T, V = num_sequences, horizon, vocab
    sharp = torch.empty(n, 1, 1, dtype=torch.float64).uniform_(0.5, 6.0, generator=gen)
    z = torch.randn(n, T, V, generator=gen, dtype=torch.float64) * sharp  # (n, T, V)
    eps = torch.tensor(eps_values, dtype=torch.float64).repeat(n // len(eps_values) + 1)[:n]  # (n,)
    e3 = eps[:, None, None]  # (n, 1, 1)
    uniform = (2 * torch.rand(n, T, V, generator=gen, dtype=torch.float64) - 1) * e3
    signs = torch.randint(0, 2, (n, T, V), generator=gen, dtype=torch.float64) * 2 - 1
    delta = torch.where(torch.arange(n)[:, None, None] % 2 == 0, uniform, signs * e3)  # (n, T, V)

    all_tokens = torch.arange(V).expand(n, T, V).contiguous()  # (n, T, V): token a for every a
    logp = token_logprobs(z[:, :, None, :].expand(n, T, V, V).contiguous(), all_tokens).double()  # (n, T, V)
    logmu = token_logprobs((z + delta)[:, :, None, :].expand(n, T, V, V).contiguous(), all_tokens).double()
    d_abs = (logmu - logp).abs()  # |Δ_a|, (n, T, V)
    p = logp.exp()
    one_minus_p = -torch.expm1(logp)  # accurate near p = 1
    # fp32 log-probs: allow a few ulps of |log p| on top of the bound
    tol = 8 * torch.finfo(torch.float32).eps * (1 + logp.abs() + logmu.abs())

    exact = prop42_envelope(logp, e3)
    first = prop42_envelope(logp, e3, exact=False)
    first_exact = torch.expm1(2 * e3) * one_minus_p
    cap = (2 * e3).expand_as(d_abs)

    choice = torch.randint(0, V, (n, T), generator=gen)  # (n, T) one random token per step
    s_abs = (logmu - logp).gather(-1, choice[..., None]).squeeze(-1).sum(-1).abs()  # |S|, (n,)
    seq_bound = exact.gather(-1, choice[..., None]).squeeze(-1).sum(-1)  # (n,)
    seq_first = first.gather(-1, choice[..., None]).squeeze(-1).sum(-1)
    seq_tol = tol.gather(-1, choice[..., None]).squeeze(-1).sum(-1)

    meaningful = exact > 1e-3  # ratios where fp32 rounding cannot dominate
    eps_max = max(eps_values)
    numeric = {
        "num_token_deltas": int(d_abs.numel()),
        "eps_values": list(eps_values),
        "p_min": float(p.min()),
        "p_max": float(p.max()),
        "max_ratio_exact": float((d_abs / exact)[meaningful].max()),
        "max_ratio_first_order": float((d_abs / first)[first > 1e-3].max()),
        "first_order_ratio_cap": float(math.expm1(2 * eps_max) / (2 * eps_max)),
        "max_ratio_first_order_exact_form": float((d_abs / first_exact)[first_exact > 1e-3].max()),
        "max_ratio_always_2eps": float((d_abs / cap).max()),
        "max_ratio_sequence": float((s_abs / seq_bound).max()),
        "max_ratio_sequence_first_order": float((s_abs / seq_first).max()),
        "max_abs_delta": float(d_abs.max()),
        "scale": float(scale),
    }
    criteria = {
        "exact_bound_holds": all_ok([(d_abs <= scale * exact + tol).all()]),
        "first_order_bound_holds_in_exact_form": all_ok([(d_abs <= scale * first_exact + tol).all()]),
        "always_at_most_2eps": all_ok([(d_abs <= scale * cap + tol).all()]),
        "sequence_bound_holds": all_ok([(s_abs <= scale * seq_bound + seq_tol).all()]),
        "first_order_ratio_within_cap": numeric["max_ratio_first_order"]
        <= scale * numeric["first_order_ratio_cap"],
    }
    return STATEMENT.to_check(
        scale,
        _derivation(float(scale)),
        numeric,
        criteria,
        notes=(
            "The first-order bound 2ε(1 − p_a) holds only to first order: its worst numeric ratio approaches "
            "(e^{2ε} − 1)/2ε; the check verifies its exact form (e^{2ε} − 1)(1 − p_a) and the exact bound "
            "2ε(1 − p_a e^{−2ε}) on every token. The sequence bound is checked in its exact form "
            "Σ_t 2ε(1 − p_{y_t} e^{−2ε}); max_ratio_sequence_first_order reports the first-order form. Numbers use "
            "fp32 log-probs from workbench.dvp.token_logprobs with a tolerance of 8 fp32 ulps of |log p|."
        ),
    )
