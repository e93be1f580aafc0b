"""Checkers for the lesson exercises (``lessons/00_*.md`` … ``05_*.md``), ARENA style.

Each ``check_*`` function runs the learner's function on a handful of seeded cases, compares the result with
the workbench's reference implementation, and either returns a :class:`Passed` (which renders as a green line
in a notebook) or raises :class:`ExerciseFailure` with a message that says *which case* failed, *what was
expected and what came back*, and — when the mistake is a common one — *what the slip probably was*::

    from workbench.exercises import check_rloo_advantages

    def my_advantages(rewards, k):
        ...

    check_rloo_advantages(my_advantages)

The references are the library's own functions (``workbench.rloo``, ``workbench.metrics``, ``workbench.dvp``)
or, where the library has none, the formula written out plainly; the tests check every checker passes the
lesson's solution and fails, with the right diagnosis, on typical wrong answers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from workbench.dvp import DEFAULT_RHO
from workbench.exercises.base import (
    ExerciseFailure,
    Passed,
    as_float,
    as_tensor,
    call_learner,
    compare,
    fmt,
    generator,
)

__all__ = [
    "EXERCISES",
    "check_bias_identity",
    "check_delta_by_bin",
    "check_exact_bound",
    "check_k1_k3",
    "check_logprob_path_derivative",
    "check_naive_config",
    "check_pruned_logprob",
    "check_retained_mass",
    "check_rloo_advantages",
    "check_safe_mask",
    "check_sampled_delta",
    "check_sequence_log_ratio",
    "check_tail_summary",
    "check_worst_case_perturbation",
]


# ----------------------------------------------------------------------------------------------------
# Lesson 00 — the tour


def check_rloo_advantages(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> Passed:
    """Exercise 0.1: leave-one-out advantages ``A_i = R_i − mean_{j≠i} R_j`` within groups of ``k``.

    Args:
        fn: ``fn(rewards [N], k) -> advantages [N]``; samples of one prompt are ``k`` consecutive entries.

    Returns:
        :class:`Passed` when ``fn`` agrees with :func:`workbench.rloo.rloo_advantages` on every case.

    Raises:
        ExerciseFailure: on the first case that disagrees.
    """
    from workbench.rloo import rloo_advantages

    name = "check_rloo_advantages"
    g = generator(0)
    cases = [
        (torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]), 4),
        (torch.tensor([1.0, 0.0, 0.5, 3.0]), 4),
        ((torch.rand(12, generator=g) < 0.5).float(), 3),
        (torch.rand(16, generator=g), 2),
        (torch.full((8,), 0.7), 8),
    ]
    for rewards, k in cases:
        case = f"rewards={fmt(rewards)}, k={k}"
        got = as_tensor(
            call_learner(fn, name, case, rewards.clone(), k), name, case, "the advantages", rewards.shape
        )
        expected = rloo_advantages(rewards, k).double()
        groups = rewards.double().view(-1, k)
        with_self = (groups - groups.mean(1, keepdim=True)).reshape(-1)
        compare(
            name, case, got, expected,
            diagnoses=[
                (
                    with_self,
                    "you subtracted the group mean *including* R_i; RLOO leaves sample i out of its "
                    "own baseline: A_i = R_i − (Σ_{j≠i} R_j)/(k−1) = k/(k−1)·(R_i − mean)",
                ),
                (
                    rewards.double() - rewards.double().mean(),
                    "you used the batch mean; the baseline is per prompt: groups of k consecutive samples",
                ),
                (-expected, "the sign is flipped: A_i = R_i − baseline"),
            ],
            hint="group the rewards with rewards.view(-1, k); the baseline of i is the mean of the other k−1",
        )  # fmt: skip
    return Passed(
        name, len(cases), "Leave-one-out: each sample is judged against the other samples of its prompt."
    )


def check_naive_config(cfg: Any) -> Passed:
    """Exercise 0.2: the :class:`~workbench.config.RLOOConfig` of *naive* RLOO against a bf16 engine.

    Naive RLOO trains on the full vocabulary (``rho=None``), applies no importance correction
    (``is_mode="none"``, ``veto=None``) and samples with a bf16 engine (``engine_dtype="bf16"``).

    Args:
        cfg: the learner's config.

    Returns:
        :class:`Passed` when those four fields are right.

    Raises:
        ExerciseFailure: naming the first wrong field and what it does.
    """
    from workbench.config import RLOOConfig

    name = "check_naive_config"
    if not isinstance(cfg, RLOOConfig):
        raise ExerciseFailure(
            f"{name}: expected an RLOOConfig, got {type(cfg).__name__}; build one with RLOOConfig(...)"
        )
    wanted = [
        (
            "rho",
            None,
            "rho=None trains on the full vocabulary (no min-p safe set): that is what 'naive' means",
        ),
        ("is_mode", "none", "is_mode='none' applies no importance-sampling correction"),
        ("veto", None, "veto=None keeps every sequence, however small its token ratios"),
        ("engine_dtype", "bf16", "engine_dtype='bf16' rounds the rollout engine's weights to bf16"),
    ]
    for field_name, value, why in wanted:
        got = getattr(cfg, field_name)
        if got != value:
            raise ExerciseFailure(f"{name}: cfg.{field_name}={got!r}, expected {value!r}: {why}")
    return Passed(name, len(wanted), "This is the arm called 'naive' in workbench.experiments.presets.ARMS.")


# ----------------------------------------------------------------------------------------------------
# Lesson 01 — where mismatch comes from


def _mismatch_cases(seed: int) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(description, logp_train, logp_infer, mask) with NaN in padded positions, as real batches can have."""
    g = generator(seed)
    out = []
    for b, t, scale in ((2, 5, 0.01), (4, 7, 0.3), (3, 6, 2.0)):
        lt = torch.log(torch.rand(b, t, generator=g).clamp_min(1e-6))  # (B, T)
        li = lt + scale * torch.randn(b, t, generator=g)
        mask = torch.rand(b, t, generator=g) < 0.8
        mask[:, 0] = True
        lt = lt.masked_fill(~mask, float("nan"))
        li = li.masked_fill(~mask, float("nan"))
        out.append(
            (f"B={b}, T={t}, Δ scale {scale}, NaN in the {int((~mask).sum())} padded slots", lt, li, mask)
        )
    return out


def check_k1_k3(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[Any, Any]]) -> Passed:
    """Exercise 1.1: the k1 and k3 mismatch estimators on the valid sampled tokens.

    ``k1 = mean Δ`` with ``Δ = log μ − log π``; ``k3 = mean(e^u − u − 1)`` with ``u = log π − log μ``.

    Args:
        fn: ``fn(logp_train [B, T], logp_infer [B, T], mask [B, T] bool) -> (k1, k3)`` (floats). Padded
            positions (``mask`` False) hold NaN, as a real batch may.

    Returns:
        :class:`Passed` when both match ``workbench.metrics.mismatch_metrics``.
    """
    from workbench.metrics import mismatch_metrics

    name = "check_k1_k3"
    cases = _mismatch_cases(1)
    for case, lt, li, mask in cases:
        out = call_learner(fn, name, case, lt.clone(), li.clone(), mask.clone())
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ExerciseFailure(
                f"{name}: return a pair (k1, k3), got {type(out).__name__}\n  on case: {case}"
            )
        k1, k3 = (as_float(v, name, case, w) for v, w in zip(out, ("k1", "k3")))
        ref = mismatch_metrics(lt, li, mask)
        d = (li - lt)[mask].double()
        if math.isnan(k1) or math.isnan(k3):
            raise ExerciseFailure(
                f"{name}: got NaN (k1={k1}, k3={k3})\n  on case: {case}\n  likely slip: padded positions hold "
                "NaN and NaN·0 is NaN; select valid tokens with x[mask] (or torch.where(mask, x, 0)) before reducing"
            )
        compare(
            name + " (k1)",
            case,
            torch.tensor(k1),
            torch.tensor(ref["mismatch/k1"]),
            diagnoses=[(torch.tensor(float(-d.mean())), "sign: Δ = log μ − log π (engine minus trainer)")],
            hint="k1 is the plain mean of Δ over the valid tokens",
        )
        compare(
            name + " (k3)",
            case,
            torch.tensor(k3),
            torch.tensor(ref["mismatch/k3"]),
            diagnoses=[
                (
                    torch.tensor(float((torch.expm1(d) - d).mean())),
                    "k3 uses u = log π − log μ = −Δ: mean(e^u − u − 1)",
                ),
                (
                    torch.tensor(float((d * d / 2).mean())),
                    "that is the second-order approximation Δ²/2; use e^u − u − 1 exactly",
                ),
            ],
            hint="k3 = mean over valid tokens of exp(u) − u − 1 with u = logp_train − logp_infer",
        )
    return Passed(
        name, len(cases), "k1 can be negative; k3 is ≥ 0 per token, a lower-variance KL(μ‖π) estimate."
    )


def check_delta_by_bin(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Sequence[float]], Any],
) -> Passed:
    """Exercise 1.2: the mismatch signature, mean |Δ| of sampled tokens per trainer-probability bin.

    Bin ``i`` holds tokens with ``edges[i] ≤ p < edges[i+1]`` (``p = exp(logp_train)``; the last bin also holds
    ``p = edges[-1]``); an empty bin's mean is NaN.

    Args:
        fn: ``fn(logp_train [N], logp_infer [N], mask [N], edges) -> [len(edges) − 1]`` tensor (or list).

    Returns:
        :class:`Passed` when it matches ``workbench.metrics.delta_by_prob_bin(...)[i]["mean_abs_delta"]``.
    """
    from workbench.metrics import delta_by_prob_bin

    name = "check_delta_by_bin"
    g = generator(2)
    p = torch.cat(
        [torch.rand(40, generator=g) * 1e-3, torch.rand(40, generator=g), torch.tensor([0.25, 1.0, 0.1])]
    )
    lt = p.log()  # (N,)
    li = lt + 0.2 * torch.randn(lt.shape, generator=g)
    mask = torch.rand(lt.shape, generator=g) < 0.9
    mask[-3:] = True
    cases = [
        ("edges=(0, 0.001, 0.5, 1), one token with p = 1 (the last bin is closed)", (0.0, 1e-3, 0.5, 1.0)),
        (
            "edges=(0, 1e-6, 1e-4, 0.01, 0.1, 0.5, 0.9, 1): some bins empty",
            (0.0, 1e-6, 1e-4, 0.01, 0.1, 0.5, 0.9, 1.0),
        ),
    ]
    for case, edges in cases:
        out = call_learner(fn, name, case, lt.clone(), li.clone(), mask.clone(), edges)
        if isinstance(out, (list, tuple)):
            out = torch.tensor([as_float(v, name, case, f"bin {i}'s mean |Δ|") for i, v in enumerate(out)])
        got = as_tensor(out, name, case, "the per-bin mean |Δ|", (len(edges) - 1,))
        expected = torch.tensor([b["mean_abs_delta"] for b in delta_by_prob_bin(lt, li, mask, edges)])
        pe, dd = p[mask].double(), (li - lt)[mask].double()
        e = torch.tensor(edges, dtype=torch.float64)
        idx = (torch.bucketize(pe, e, right=True) - 1).clamp(max=len(edges) - 2)
        signed = torch.tensor(
            [
                float(dd[idx == i].mean()) if bool((idx == i).any()) else float("nan")
                for i in range(len(edges) - 1)
            ]
        )
        compare(
            name, case, got, expected,
            diagnoses=[(signed, "that is the mean of Δ; the signature averages |Δ| (signs would cancel)")],
            hint="p = exp(logp_train) over valid tokens; mean of |logp_infer − logp_train| per bin; NaN when empty",
        )  # fmt: skip
    return Passed(
        name, len(cases), "Prop 4.2 predicts |Δ| shrinking as p → 1; you will see it in notebook 01."
    )


# ----------------------------------------------------------------------------------------------------
# Lesson 02 — Proposition 4.2


def check_logprob_path_derivative(fn: Callable[[torch.Tensor, torch.Tensor, int, float], Any]) -> Passed:
    """Exercise 2.1: ``f'(t)`` for ``f(t) = log softmax_a(z + tδ)`` — the first step of Prop 4.2's proof.

    Args:
        fn: ``fn(z [V], delta [V], a, t) -> f'(t)`` (a float), written from the formula
            ``δ_a − Σ_b p_b(t) δ_b`` (no autograd needed).

    Returns:
        :class:`Passed` when it matches the autograd derivative.
    """
    name = "check_logprob_path_derivative"
    g = generator(3)
    cases = []
    for v, t in ((3, 0.0), (8, 0.5), (32, 1.0), (16, 2.0)):
        z = 3 * torch.randn(v, generator=g, dtype=torch.float64)
        delta = torch.empty(v, dtype=torch.float64).uniform_(-0.5, 0.5, generator=g)
        a = int(torch.randint(0, v, (1,), generator=g))
        cases.append((z, delta, a, t))
    for z, delta, a, t in cases:
        case = f"V={z.numel()}, a={a}, t={t}"
        got = torch.tensor(
            as_float(call_learner(fn, name, case, z.clone(), delta.clone(), a, t), name, case, "f'(t)")
        )
        tt = torch.tensor(t, dtype=torch.float64, requires_grad=True)
        f = torch.log_softmax(z + tt * delta, -1)[a]
        (expected,) = torch.autograd.grad(f, tt)
        p0 = torch.softmax(z, -1)
        compare(
            name,
            case,
            got,
            expected.detach(),
            atol=1e-7,
            rtol=1e-6,
            diagnoses=[
                (
                    delta[a] - (p0 * delta).sum(),
                    "you used p(0) = softmax(z); the derivative at t uses p(t) = softmax(z + tδ)",
                ),
                (-expected.detach(), "the sign is flipped: f'(t) = δ_a − Σ_b p_b(t) δ_b"),
            ],
            hint="p = softmax(z + t·δ); f'(t) = δ[a] − (p * δ).sum()",
        )
    return Passed(name, len(cases), "Since |δ_a − Σ p_b δ_b| ≤ 2ε(1 − p_a), confident tokens barely move.")


def check_exact_bound(fn: Callable[[torch.Tensor, float], torch.Tensor]) -> Passed:
    """Exercise 2.2: the exact bound of Prop 4.2, ``|Δ_a| ≤ 2ε(1 − p_a e^{−2ε})``.

    Args:
        fn: ``fn(p [N], eps) -> bound [N]``.

    Returns:
        :class:`Passed` when it matches the formula for several ε (and hence bounds every measured Δ).
    """
    from workbench.theory.prop42 import prop42_envelope

    name = "check_exact_bound"
    p = torch.tensor([1e-9, 1e-4, 0.01, 0.3, 0.5, 0.9, 0.999, 1.0], dtype=torch.float64)
    eps_values = (0.001, 0.05, 0.5, 2.0)
    for eps in eps_values:
        case = f"p={fmt(p)}, eps={eps}"
        got = as_tensor(call_learner(fn, name, case, p.clone(), eps), name, case, "the bound", p.shape)
        expected = prop42_envelope(p.log(), eps)
        compare(
            name, case, got, expected, atol=1e-9, rtol=1e-6,
            diagnoses=[
                (
                    2 * eps * (1 - p),
                    "that is the first-order bound 2ε(1 − p); the exact one keeps e^{−2ε}: "
                    "p_a can drop to p_a e^{−2ε} along the path",
                ),
                (
                    (math.exp(2 * eps) - 1) * (1 - p),
                    "that is the exact form of the first-order bound, "
                    "(e^{2ε} − 1)(1 − p); the exercise asks for 2ε(1 − p e^{−2ε})",
                ),
            ],
            hint="bound = 2·eps·(1 − p·exp(−2·eps))",
        )  # fmt: skip
    return Passed(name, len(eps_values), "At p = 1 the bound is 2ε(1 − e^{−2ε}) ≈ 4ε², not 0: second order.")


def check_worst_case_perturbation(fn: Callable[[torch.Tensor, int, float], torch.Tensor]) -> Passed:
    """Exercise 2.3: the perturbation with ``‖δ‖_∞ ≤ ε`` that raises ``log μ(a)`` the most.

    Args:
        fn: ``fn(z [V], a, eps) -> delta [V]``.

    Returns:
        :class:`Passed` when ``‖δ‖_∞ ≤ ε`` and ``Δ_a`` reaches its maximum ``2ε − log(1 + p_a(e^{2ε} − 1))``.
    """
    name = "check_worst_case_perturbation"
    g = generator(4)
    cases = []
    for v, eps, scale in ((4, 0.1, 1.0), (32, 0.5, 3.0), (100, 1.0, 0.5)):
        z = scale * torch.randn(v, generator=g, dtype=torch.float64)
        a = int(torch.randint(0, v, (1,), generator=g))
        cases.append((z, a, eps))
    for z, a, eps in cases:
        case = f"V={z.numel()}, a={a}, eps={eps}"
        delta = as_tensor(call_learner(fn, name, case, z.clone(), a, eps), name, case, "delta", z.shape)
        norm = float(delta.abs().max())
        if norm > eps * (1 + 1e-9):
            raise ExerciseFailure(f"{name}: ‖δ‖∞ = {norm:.6g} exceeds ε = {eps}\n  on case: {case}")
        lp = torch.log_softmax(z, -1)
        achieved = float(torch.log_softmax(z + delta, -1)[a] - lp[a])
        p_a = float(lp[a].exp())
        best = 2 * eps - math.log1p(p_a * math.expm1(2 * eps))
        if achieved < best - 1e-9:
            raise ExerciseFailure(
                f"{name}: your δ moves log μ(a) by Δ_a = {achieved:.6g}, but {best:.6g} is reachable\n"
                f"  on case: {case}\n  hint: Δ_a = δ_a − log Σ_b p_b e^{{δ_b}} grows with δ_a and shrinks with "
                "every other δ_b: push a up by ε and everything else down by ε"
            )
    return Passed(
        name, len(cases), "The worst case is a vertex of the box: Prop 4.2's bound is nearly tight."
    )


# ----------------------------------------------------------------------------------------------------
# Lesson 03 — Proposition 4.3


def _tail_reference(
    z: torch.Tensor, sigma: float, p_tail: float, draws: int, seed: int
) -> tuple[float, float]:
    """E[Δ_a | a sampled, p_a < p_tail] and its Monte Carlo SE, by weighting every token by μ_a (no sampling of a)."""
    g = generator(seed)
    lp = torch.log_softmax(z.double(), -1)  # (V,)
    tail = lp.exp() < p_tail
    num, den = [], []
    for _ in range(draws // 4096 + 1):
        d = sigma * torch.randn(4096, z.numel(), generator=g, dtype=torch.float64)  # (D, V)
        lmu = torch.log_softmax(z.double() + d, -1)  # (D, V)
        w = lmu.exp() * tail  # (D, V) μ_a on tail tokens
        num.append((w * (lmu - lp)).sum(-1))
        den.append(w.sum(-1))
    n, dd = torch.cat(num), torch.cat(den)
    ratio = float(n.mean() / dd.mean())
    resid = n - ratio * dd  # delta method for a ratio of means
    se = float(resid.std() / dd.mean() / math.sqrt(n.numel()))
    return ratio, se


def check_sampled_delta(
    fn: Callable[[torch.Tensor, float, int, torch.Generator], tuple[torch.Tensor, torch.Tensor]],
) -> Passed:
    """Exercise 3.1: simulate Prop 4.3 — Δ of tokens the *engine* sampled under logit noise.

    The learner draws ``n`` independent ``δ ~ N(0, σ² I)``, samples ``a ~ μ = softmax(z + δ)`` with the same
    δ, and returns the tokens and ``Δ_a = log μ(a) − log π(a)``. The checker compares the learner's mean Δ
    over tail tokens with a precise reference (every token weighted by μ_a; no sampling noise in a).

    Args:
        fn: ``fn(z [V], sigma, n, generator) -> (tokens [n] long, delta [n] float)``.

    Returns:
        :class:`Passed` when the tail mean is within 4 standard errors (+ 0.01) of the reference and positive.
    """
    name = "check_sampled_delta"
    g = generator(5)
    z = 1.5 * torch.randn(32, generator=g, dtype=torch.float64)
    sigma, n, p_tail = 0.5, 20_000, 0.02
    case = f"V=32 logits 1.5·N(0,1), sigma={sigma}, n={n}"
    out = call_learner(fn, name, case, z.clone(), sigma, n, generator(6))
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ExerciseFailure(
            f"{name}: return a pair (tokens, delta), got {type(out).__name__}\n  on case: {case}"
        )
    tokens, delta = out
    if not isinstance(tokens, torch.Tensor) or tokens.shape != (n,) or tokens.is_floating_point():
        raise ExerciseFailure(f"{name}: tokens must be an integer tensor of shape ({n},)\n  on case: {case}")
    if int(tokens.min()) < 0 or int(tokens.max()) >= z.numel():
        raise ExerciseFailure(f"{name}: tokens must be ids in [0, {z.numel()})\n  on case: {case}")
    d = as_tensor(delta, name, case, "delta", (n,))
    if not bool(torch.isfinite(d).all()):
        raise ExerciseFailure(f"{name}: delta contains NaN/inf\n  on case: {case}")
    p = torch.softmax(z, -1)
    tail = p[tokens.long()] < p_tail
    k = int(tail.sum())
    if k < 100:
        raise ExerciseFailure(
            f"{name}: only {k} of {n} sampled tokens have p < {p_tail}; with σ = {sigma} about 10% should\n"
            f"  on case: {case}\n  hint: sample a from softmax(z + δ), one fresh δ per draw"
        )
    est = float(d[tail].mean())
    se = float(d[tail].std() / math.sqrt(k))
    ref, ref_se = _tail_reference(z, sigma, p_tail, 50_000, seed=7)
    if abs(est - ref) > 4 * math.hypot(se, ref_se) + 0.01:
        slip = (
            "your tail tokens have Δ < 0 on average: the positive mode only appears for tokens the *engine* "
            "sampled. Draw a from μ = softmax(z + δ) with the same δ you use to compute Δ (not from π, not uniformly)"
            if est < 0
            else "compute Δ = log_softmax(z + δ)[a] − log_softmax(z)[a] with the δ that produced the sample"
        )
        raise ExerciseFailure(
            f"{name}: mean Δ over sampled tail tokens (p < {p_tail}) is {est:.4f} ± {se:.4f}; "
            f"the reference is {ref:.4f} ± {ref_se:.4f}\n  on case: {case}\n  likely slip: {slip}"
        )
    return Passed(
        name,
        1,
        f"{k} sampled tail tokens: mean Δ = {est:.3f} > 0 (σ² = {sigma**2}): the engine is over-confident on them.",
    )


def check_tail_summary(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[Any, Any, Any]],
) -> Passed:
    """Exercise 3.2: the training-log view of the positive mode — count, mean Δ, fraction Δ > 0 of low-p tokens.

    Args:
        fn: ``fn(logp_train, logp_infer, mask, p_max) -> (count, mean_delta, frac_positive)`` over valid sampled
            tokens with trainer probability ``p < p_max``; ``mean_delta`` and ``frac_positive`` are NaN when
            there are none.

    Returns:
        :class:`Passed` when it matches ``workbench.metrics.sampled_tail_delta``.
    """
    from workbench.metrics import sampled_tail_delta

    name = "check_tail_summary"
    cases = [(c, lt, li, m, p_max) for (c, lt, li, m), p_max in zip(_mismatch_cases(8), (0.1, 1e-3, 0.5))]
    cases.append(("no token below p_max", *_mismatch_cases(8)[0][1:], 1e-12))
    for case, lt, li, mask, p_max in cases:
        case = f"{case}, p_max={p_max}"
        out = call_learner(fn, name, case, lt.clone(), li.clone(), mask.clone(), p_max)
        if not (isinstance(out, (tuple, list)) and len(out) == 3):
            raise ExerciseFailure(f"{name}: return (count, mean_delta, frac_positive)\n  on case: {case}")
        got = torch.tensor(
            [as_float(v, name, case, w) for v, w in zip(out, ("count", "mean_delta", "frac_positive"))]
        )
        ref = sampled_tail_delta(lt, li, mask, p_max=p_max)
        expected = torch.tensor(
            [ref["mismatch/lowp_count"], ref["mismatch/lowp_delta_mean"], ref["mismatch/lowp_frac_positive"]],
            dtype=torch.float64,
        )
        compare(
            name, case, got, expected,
            hint="select valid tokens first (x[mask]), then those with logp_train < log(p_max); "
            "mean of Δ = logp_infer − logp_train; NaN (not 0) for an empty selection",
        )  # fmt: skip
    return Passed(name, len(cases), "In a run this is mismatch/lowp_delta_mean and its CI.")


# ----------------------------------------------------------------------------------------------------
# Lesson 04 — Theorem 4.1


def check_sequence_log_ratio(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> Passed:
    """Exercise 4.1: ``S(y) = Σ_t Δ_t = log μ(y) − log π(y)`` per sequence, over valid tokens.

    Args:
        fn: ``fn(logp_train [B, T], logp_infer [B, T], mask [B, T]) -> S [B]`` (padding holds NaN).

    Returns:
        :class:`Passed` when it matches the masked sum.
    """
    name = "check_sequence_log_ratio"
    cases = _mismatch_cases(9)
    for case, lt, li, mask in cases:
        got = as_tensor(
            call_learner(fn, name, case, lt.clone(), li.clone(), mask.clone()), name, case, "S", lt.shape[:1]
        )
        d = torch.where(mask, li.double() - lt.double(), 0.0)
        expected = d.sum(-1)
        compare(
            name, case, got, expected,
            diagnoses=[
                (-expected, "sign: S = log μ(y) − log π(y) (engine minus trainer), so π/μ = e^{−S}"),
                (expected / mask.sum(-1), "that is the mean per token; S is the sum over the sequence"),
            ],
            hint="torch.where(mask, logp_infer − logp_train, 0).sum(-1)",
        )  # fmt: skip
    return Passed(name, len(cases), "The sequence ratio is r(y) = π(y)/μ(y) = e^{−S(y)}.")


def check_bias_identity(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> Passed:
    """Exercise 4.2: the right-hand side of Theorem 4.1, ``E_{y∼μ}[(1 − e^{−S(y)}) g(y)]``.

    Args:
        fn: ``fn(log_pi [N], log_mu [N], g [N, D]) -> [D]``: an exact expectation over ``N`` enumerated
            sequences with probabilities ``π(y) = e^{log_pi}``, ``μ(y) = e^{log_mu}`` and ``S = log_mu − log_pi``.

    Returns:
        :class:`Passed` when it equals the bias ``E_μ[g] − E_π[g]``.
    """
    name = "check_bias_identity"
    g = generator(10)
    cases = []
    for n, dim, scale in ((4, 1, 0.3), (27, 5, 1.0), (81, 3, 0.05)):
        logits = torch.randn(n, generator=g, dtype=torch.float64)
        log_pi = torch.log_softmax(logits, 0)
        log_mu = torch.log_softmax(logits + scale * torch.randn(n, generator=g, dtype=torch.float64), 0)
        grads = torch.randn(n, dim, generator=g, dtype=torch.float64)
        cases.append((log_pi, log_mu, grads))
    for log_pi, log_mu, grads in cases:
        case = f"N={log_pi.numel()} sequences, D={grads.shape[1]}"
        got = as_tensor(
            call_learner(fn, name, case, log_pi.clone(), log_mu.clone(), grads.clone()),
            name,
            case,
            "the bias",
            grads.shape[1:],
        )
        pi, mu = log_pi.exp(), log_mu.exp()
        expected = ((mu - pi)[:, None] * grads).sum(0)
        s = log_mu - log_pi
        compare(
            name, case, got, expected, atol=1e-9, rtol=1e-7,
            diagnoses=[
                (
                    ((mu * (1 - torch.exp(s)))[:, None] * grads).sum(0),
                    "e^{−S} = π/μ, not e^{S}: S = log μ − log π",
                ),
                (-expected, "sign: the bias is E_μ[g] − E_π[g]"),
                (
                    ((1 - torch.exp(-s))[:, None] * grads).mean(0),
                    "an expectation over μ weights each sequence by μ(y), not 1/N",
                ),
            ],
            hint="(mu * (1 − exp(−S)))[:, None] * g, summed over sequences",
        )  # fmt: skip
    return Passed(
        name, len(cases), "Reweighting by e^{−S} = π/μ turns E_μ into E_π: what is left over is the bias."
    )


# ----------------------------------------------------------------------------------------------------
# Lesson 05 — the safe vocabulary


def _safe_cases(seed: int) -> list[tuple[str, torch.Tensor, float]]:
    """Logit tensors whose entries stay clear of the ρ cut (so float rounding cannot decide a case), plus ties."""
    g = generator(seed)
    out: list[tuple[str, torch.Tensor, float]] = []
    for shape, scale, rho in (((4, 16), 3.0, 1e-2), ((2, 3, 50), 6.0, DEFAULT_RHO), ((5, 8), 1.0, 0.3)):
        z = scale * torch.randn(shape, generator=g)
        gap = z - z.amax(-1, keepdim=True) - math.log(rho)  # (.., V) distance to the cut
        z = torch.where(gap.abs() < 1e-2, z + 0.05, z)
        out.append((f"logits of shape {shape} (scale {scale}), rho={rho:.3g}", z, rho))
    out.append(
        ("ties at the max, rho=1.0", torch.tensor([[2.0, 2.0, 1.0, -5.0], [0.0, -1.0, -1.0, -3.0]]), 1.0)
    )
    out.append(("a row with -inf entries, rho=0.01", torch.tensor([[0.0, float("-inf"), -3.0, -10.0]]), 0.01))
    return out


def check_safe_mask(fn: Callable[[torch.Tensor, float], torch.Tensor]) -> Passed:
    """Exercise 5.1: the safe set ``V_S = {a : π(a) ≥ ρ · max_b π(b)}`` as a boolean mask.

    Args:
        fn: ``fn(logits [..., V], rho) -> bool [..., V]``.

    Returns:
        :class:`Passed` when it matches :func:`workbench.dvp.safe_mask`.
    """
    from workbench.dvp import safe_mask

    name = "check_safe_mask"
    cases = _safe_cases(11)
    for case, z, rho in cases:
        out = call_learner(fn, name, case, z.clone(), rho)
        if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
            got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
            raise ExerciseFailure(f"{name}: return a bool tensor, got {got}\n  on case: {case}")
        got = as_tensor(out, name, case, "the mask", z.shape)
        expected = safe_mask(z, rho).double()
        probs = torch.softmax(z, -1)
        compare(
            name, case, got, expected,
            diagnoses=[
                (
                    (z - z.amax(-1, keepdim=True) > math.log(rho)).double(),
                    "use ≥, not >: the argmax (and ties with it) must always be in V_S",
                ),
                (
                    (probs >= rho).double(),
                    "the threshold is relative: π(a) ≥ ρ · max π, i.e. z_a ≥ max z + log ρ",
                ),
            ],
            hint="z − z.max(-1, keepdim=True) ≥ log(rho)",
        )  # fmt: skip
    return Passed(name, len(cases), "The argmax is always safe, so Z > 0 and π^mp is a proper distribution.")


def check_retained_mass(fn: Callable[[torch.Tensor, float], torch.Tensor]) -> Passed:
    """Exercise 5.2: the retained mass ``Z = Σ_{a ∈ V_S} π(a)`` per row (``1 − Z = D_TV(π, π^mp)``, Prop 5.4).

    Args:
        fn: ``fn(logits [..., V], rho) -> Z [...]``.

    Returns:
        :class:`Passed` when it matches :func:`workbench.dvp.retained_mass` (and so ``1 − Z ≤ |V| ρ``).
    """
    from workbench.dvp import retained_mass, safe_mask

    name = "check_retained_mass"
    cases = _safe_cases(12)
    for case, z, rho in cases:
        got = as_tensor(call_learner(fn, name, case, z.clone(), rho), name, case, "Z", z.shape[:-1])
        expected = retained_mass(z, rho).double()
        compare(
            name, case, got, expected, atol=1e-6, rtol=1e-5,
            diagnoses=[
                (1 - expected, "that is 1 − Z, the pruned mass; Z is the mass that stays"),
                (
                    torch.ones_like(expected),
                    "Z is the trainer's mass π on V_S *before* renormalising (π^mp always sums to 1)",
                ),
                (
                    safe_mask(z, rho).sum(-1).double() / z.shape[-1],
                    "Z is a probability mass, not the fraction of tokens kept",
                ),
            ],
            hint="(softmax(z) * safe_mask).sum(-1)",
        )  # fmt: skip
    return Passed(
        name, len(cases), "1 − Z = D_TV(π, π^mp) ≤ |V|ρ: tiny at ρ = e^-13 for any real vocabulary."
    )


def check_pruned_logprob(fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> Passed:
    """Exercise 5.3: ``log π^mp(a)``, differentiable, with a finite value for pruned tokens.

    Safe tokens must match :func:`workbench.dvp.token_logprobs` in value *and* gradient; a pruned token must get
    a finite log-prob far below every safe one (never ``-inf``: ``0 · -inf`` is NaN in entropies and KLs).

    Args:
        fn: ``fn(logits [N, V] (requires grad), tokens [N], rho) -> logp [N]``.

    Returns:
        :class:`Passed` when values, the pruned tokens' finiteness and the gradients are right.
    """
    from workbench.dvp import safe_mask, token_logprobs

    name = "check_pruned_logprob"
    g = generator(13)
    cases = []
    for n, v, scale, rho in ((6, 10, 3.0, 1e-2), (8, 64, 5.0, DEFAULT_RHO), (4, 5, 1.0, 0.5)):
        z = scale * torch.randn(n, v, generator=g, dtype=torch.float64)
        tok = torch.randint(0, v, (n,), generator=g)
        safe = safe_mask(z, rho)
        tok[0] = int(z[0].argmin()) if not bool(safe[0].all()) else tok[0]  # one pruned token when possible
        cases.append((z, tok, rho))
    for z, tok, rho in cases:
        case = f"logits {tuple(z.shape)}, rho={rho:.3g}, tokens={fmt(tok)}"
        zl = z.clone().requires_grad_(True)
        out = call_learner(fn, name, case, zl, tok.clone(), rho)
        got = as_tensor(out, name, case, "logp", tok.shape)
        inside = safe_mask(z, rho).gather(-1, tok[:, None]).squeeze(-1)  # (N,)
        zr = z.clone().requires_grad_(True)
        ref = token_logprobs(zr, tok, rho)
        if bool((~torch.isfinite(got[~inside])).any()):
            raise ExerciseFailure(
                f"{name}: a pruned token got {got[~inside].tolist()}\n  on case: {case}\n  likely slip: use a finite "
                "mask value (e.g. max(z) − 1000), never -inf: 0·(−inf) = NaN in entropy and KL terms"
            )
        floor = math.log(rho) - math.log(z.shape[-1]) - 1.0
        if bool((got[~inside] > floor).any()):
            raise ExerciseFailure(
                f"{name}: pruned tokens should get a log-prob far below log ρ − log|V| = {floor + 1:.3g}, "
                f"got {got[~inside].tolist()}\n  on case: {case}"
            )
        full = torch.log_softmax(z, -1).gather(-1, tok[:, None]).squeeze(-1)
        compare(
            name,
            case,
            got[inside],
            ref.detach().double()[inside],
            diagnoses=[
                (
                    full[inside],
                    "that is log π (full vocabulary); renormalise over V_S: log π^mp = log π − log Z",
                )
            ],
            hint="log_softmax over the masked logits, gathered at the tokens",
        )
        if not (isinstance(out, torch.Tensor) and out.requires_grad):
            raise ExerciseFailure(
                f"{name}: the result does not depend on the logits through autograd\n  on case: {case}"
            )
        (g_got,) = torch.autograd.grad(out[inside].sum(), zl, allow_unused=True)
        (g_ref,) = torch.autograd.grad(ref[inside].sum(), zr)
        if g_got is None:
            raise ExerciseFailure(f"{name}: no gradient reaches the logits\n  on case: {case}")
        compare(
            name + " (gradient)",
            case,
            g_got.double(),
            g_ref.double(),
            atol=1e-6,
            rtol=1e-5,
            hint="the mask and the mask value carry no gradient (compute them under torch.no_grad()); "
            "∂ log π^mp(a)/∂z_b = 1[a = b] − π^mp(b) on V_S, 0 outside",
        )
    return Passed(name, len(cases), "Gradients flow only through the safe set; pruned tokens stay finite.")


EXERCISES: dict[str, tuple[Callable[..., Passed], ...]] = {
    "00_tour": (check_rloo_advantages, check_naive_config),
    "01_where_mismatch_comes_from": (check_k1_k3, check_delta_by_bin),
    "02_prop42_bound": (check_logprob_path_derivative, check_exact_bound, check_worst_case_perturbation),
    "03_prop43_positive_mode": (check_sampled_delta, check_tail_summary),
    "04_thm41_bias_accumulates": (check_sequence_log_ratio, check_bias_identity),
    "05_safe_vocabulary": (check_safe_mask, check_retained_mass, check_pruned_logprob),
}
"""The checkers of each lesson, by lesson file stem (``lessons/<stem>.md``)."""
