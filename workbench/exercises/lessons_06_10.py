"""Checkers for the exercises of lessons 06–10 (lessons 00–05: :mod:`workbench.exercises.lessons_00_05`), ARENA style.

Each ``check_*`` runs the learner's function on a few seeded cases, compares it with the workbench's own
implementation, and returns a :class:`~workbench.exercises.base.Passed` (a green line in a notebook) or raises
:class:`~workbench.exercises.base.ExerciseFailure` naming the case, the expected and returned values and —
when the answer matches a typical wrong one — the slip::

    from workbench.exercises import check_token_mis

    def my_token_mis(logp_train, logp_infer, mask, lo, hi):
        ...

    check_token_mis(my_token_mis)

=====================================  ======  ===========================================================
checker                                lesson  reference
=====================================  ======  ===========================================================
:func:`check_token_mis`                06      :func:`workbench.importance.importance_weights` (token_mis)
:func:`check_pg_loss`                  06      :func:`workbench.rloo.policy_loss` (pg, token_mean)
:func:`check_max_safe_rho`             07      the definition of V_S (:func:`workbench.dvp.safe_mask`)
:func:`check_safe_set_overlap`         08      :func:`workbench.metrics.safe_set_overlap`
:func:`check_boundary_tokens`          08      :func:`workbench.metrics.boundary_tokens`
:func:`check_envelope_eps`             08      :func:`workbench.theory.logit_error`
:func:`check_processed_log_ratio`      09      :func:`workbench.dvp.token_logprobs` minus the engine's log μ^mp
:func:`check_grpo_advantages`          10      :func:`workbench.rloo.grpo_advantages`
:func:`check_ppo_clip_loss`            10      :func:`workbench.rloo.policy_loss` (ppo_clip)
:func:`check_entropy_scaled_log_rho`   10      :func:`workbench.dvp.entropy_scaled_safe_mask`
=====================================  ======  ===========================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from workbench.dvp import DEFAULT_RHO
from workbench.exercises.base import (
    ExerciseFailure,
    Passed,
    as_tensor,
    call_learner,
    compare,
    generator,
    show,
)
from workbench.theory.prop42 import logit_error

__all__ = [
    "check_boundary_tokens",
    "check_entropy_scaled_log_rho",
    "check_envelope_eps",
    "check_grpo_advantages",
    "check_max_safe_rho",
    "check_pg_loss",
    "check_ppo_clip_loss",
    "check_processed_log_ratio",
    "check_safe_set_overlap",
    "check_token_mis",
]

# ----------------------------------------------------------------------------------------------------
# case generators


def _logp_pair(seed: int, b: int = 4, t: int = 6, spread: float = 1.5) -> tuple[torch.Tensor, ...]:
    """``(logp_train, logp_infer, mask)`` with ratios on both sides of a [0.5, 2] window and padding."""
    g = generator(seed)
    logp_train = -torch.rand(b, t, generator=g, dtype=torch.float64) * 4  # (B, T)
    logp_infer = logp_train + torch.randn(b, t, generator=g, dtype=torch.float64) * spread  # (B, T)
    mask = torch.rand(b, t, generator=g) < 0.8  # (B, T)
    mask[:, 0] = True
    return logp_train.float(), logp_infer.float(), mask


def _logits(seed: int, rows: int = 6, vocab: int = 50, scale: float = 4.0) -> torch.Tensor:
    g = generator(seed)
    z = torch.randn(rows, vocab, generator=g) * scale  # (R, V)
    z[0, 3] = z[0].max() + 8.0  # a peaked row with a long tail
    return z


# ----------------------------------------------------------------------------------------------------
# Lesson 06 — live training


def check_token_mis(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> Passed:
    """Exercise 6.1: token-level masked IS — weights ``r_t = π/μ`` where ``lo ≤ r_t ≤ hi``, tokens dropped elsewhere.

    Args:
        fn: ``fn(logp_train [B,T], logp_infer [B,T], mask [B,T] bool, lo, hi) -> (weights [B,T], keep [B,T] bool)``;
            ``weights`` is 0 wherever ``keep`` is False, ``keep`` is False on padding.

    Returns:
        :class:`~workbench.exercises.base.Passed` when ``fn`` agrees with
        ``importance_weights(..., mode="token_mis", veto=None)`` on every case.
    """
    from workbench.importance import importance_weights

    name = "check_token_mis"
    cases = [(_logp_pair(s), lo, hi) for s, lo, hi in ((0, 0.5, 2.0), (1, 0.8, 1.25), (2, 0.1, 10.0))]
    for (lt, li, mask), lo, hi in cases:
        case = f"B×T = {tuple(lt.shape)}, lo={lo}, hi={hi}"
        out = call_learner(fn, name, case, lt.clone(), li.clone(), mask.clone(), lo, hi)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ExerciseFailure(
                f"{name}: return a pair (weights, keep), got {type(out).__name__}\n  on case: {case}"
            )
        weights = as_tensor(out[0], name, case, "weights", lt.shape)
        keep = as_tensor(out[1], name, case, "keep", lt.shape)
        ref = importance_weights(lt, li, mask, "token_mis", lo=lo, hi=hi, veto=None)
        r = torch.exp(lt.double() - li.double())
        inverse = torch.exp(li.double() - lt.double())
        window_inv = mask & (inverse >= lo) & (inverse <= hi)
        compare(
            name, case, keep.double(), ref.keep.double(), what="keep",
            diagnoses=[
                ((window_inv).double(), "you used μ/π; the ratio corrects samples from μ towards π: r = π/μ = "
                 "exp(logp_train − logp_infer)"),
                (((r >= lo) & (r <= hi)).double(), "padding (mask=False) must never be kept"),
                (mask.double(), "every valid token is kept: masking drops tokens whose ratio leaves [lo, hi]"),
            ],
        )  # fmt: skip
        compare(
            name, case, weights, ref.weights, what="weights",
            diagnoses=[
                (torch.where(ref.keep, inverse, 0.0), "you used μ/π; the weight corrects samples from μ towards "
                 "π: r = π/μ = exp(logp_train − logp_infer)"),
                (torch.where(mask, r.clamp(max=hi), 0.0), "that is truncation (TIS: min(r, hi)); MIS *drops* "
                 "out-of-window tokens (weight 0) instead of capping them"),
                (torch.where(ref.keep, 1.0, 0.0).double(), "a kept token carries its ratio r as weight, not 1"),
            ],
        )  # fmt: skip
    return Passed(name, len(cases), "Tokens whose ratio leaves the window are dropped, not capped.")


def check_pg_loss(fn: Callable[..., torch.Tensor]) -> Passed:
    """Exercise 6.2: the REINFORCE loss with IS weights, token-mean over kept tokens.

    ``loss = −Σ_{kept} w_t · A · log π_t / (number of kept tokens)`` with ``w`` detached.

    Args:
        fn: ``fn(logp [B,T] (requires grad), advantages [B], keep [B,T] bool, weights [B,T]) -> scalar loss``.

    Returns:
        :class:`~workbench.exercises.base.Passed` when value and gradient agree with
        ``rloo.policy_loss(..., agg="token_mean", loss_type="pg")``.
    """
    from workbench.rloo import policy_loss

    name = "check_pg_loss"
    n = 0
    for seed in (0, 1, 2):
        g = generator(seed)
        lt, li, keep = _logp_pair(seed)
        adv = torch.randn(lt.shape[0], generator=g)  # (B,)
        weights = torch.where(keep, torch.exp(lt - li).clamp(max=2.0), 0.0)  # (B, T)
        case = f"seed {seed}, B×T = {tuple(lt.shape)}, kept tokens {int(keep.sum())}"
        logp = lt.clone().requires_grad_(True)
        loss = call_learner(fn, name, case, logp, adv.clone(), keep.clone(), weights.clone())
        loss = as_tensor(loss, name, case, "the loss", (), detach=False)
        ref_logp = lt.clone().requires_grad_(True)
        ref, _ = policy_loss(ref_logp, adv, keep, weights, agg="token_mean", loss_type="pg")
        per_tok = -(weights * adv[:, None] * lt) * keep
        compare(
            name, case, loss.reshape(()), ref.reshape(()), what="the loss value",
            diagnoses=[
                (-ref, "the sign is flipped: the optimiser *minimises* the loss, so loss = −w·A·log π"),
                (per_tok.sum() / keep.numel(), "you divided by every position (B·T); token_mean divides by the "
                 "number of *kept* tokens"),
                ((-(adv[:, None] * lt) * keep).sum() / keep.sum(), "the IS weights are missing"),
            ],
        )  # fmt: skip
        if not loss.requires_grad:
            raise ExerciseFailure(f"{name}: the loss has no gradient; do not detach log π\n  on case: {case}")
        (grad,) = torch.autograd.grad(loss, logp)
        (ref_grad,) = torch.autograd.grad(ref, ref_logp)
        compare(name, case, grad, ref_grad, what="d loss / d log π")
        n += 1
    return Passed(name, n, "The weights scale each token's push; only kept tokens count.")


# ----------------------------------------------------------------------------------------------------
# Lesson 07 — the ρ sweep


def check_max_safe_rho(fn: Callable[[torch.Tensor, torch.Tensor], Any]) -> Passed:
    """Exercise 7.1: the largest ρ that keeps every needed token in the safe set at every position.

    ``V_S = {a : π(a) ≥ ρ·max π}``, so token ``a`` survives exactly when ``ρ ≤ π(a)/max π = exp(z_a − max z)``;
    over positions the binding one is the smallest ratio.

    Args:
        fn: ``fn(logits [R,V], needed [R] token ids) -> float`` (a number or 1-element tensor).

    Returns:
        :class:`~workbench.exercises.base.Passed` when ``fn`` matches, and ``dvp.safe_mask`` at that ρ keeps
        every needed token.
    """
    from workbench.dvp import safe_mask

    name = "check_max_safe_rho"
    cases = []
    for seed in (0, 1, 2):
        z = _logits(seed)
        g = generator(100 + seed)
        needed = torch.randint(0, z.shape[-1], (z.shape[0],), generator=g)
        cases.append((z, needed))
    z = _logits(3)
    cases.append((z, z.argmax(-1)))  # only argmaxes needed: ρ = 1
    for z, needed in cases:
        case = f"logits {tuple(z.shape)}, needed={needed.tolist()}"
        got = as_tensor(call_learner(fn, name, case, z.clone(), needed.clone()), name, case, "ρ", ())
        gap = z.double().gather(-1, needed[:, None]).squeeze(-1) - z.double().amax(-1)  # (R,) ≤ 0
        expected = gap.min().exp()
        probs = torch.softmax(z.double(), -1).gather(-1, needed[:, None]).squeeze(-1)
        compare(
            name, case, got.reshape(()), expected, what="ρ", atol=0.0, rtol=1e-5,
            diagnoses=[
                (gap.max().exp(), "you took the *easiest* position; ρ must keep the token everywhere, so the "
                 "smallest ratio binds"),
                (probs.min(), "V_S compares π(a) with ρ·max π, not with ρ: use π(a)/max π = exp(z_a − max z)"),
            ],
        )  # fmt: skip
        keep = safe_mask(z, float(expected))
        if not bool(keep.gather(-1, needed[:, None]).all()):  # pragma: no cover - guards the reference itself
            raise ExerciseFailure(
                f"{name}: internal check failed: safe_mask drops a needed token at ρ={expected}"
            )
    return Passed(
        name, len(cases), "Above this ρ DVP starts pruning tokens the task needs: the bias side of the U."
    )


# ----------------------------------------------------------------------------------------------------
# Lesson 08 — signature and overlap


def _engine_pair(seed: int, rows: int = 6, vocab: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    z = _logits(seed, rows, vocab, scale=5.0)
    g = generator(200 + seed)
    return z, z + torch.randn(rows, vocab, generator=g) * 1.5  # (R, V) each


def check_safe_set_overlap(fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> Passed:
    """Exercise 8.1: ``|V_S ∩ V'_S| / |V_S|`` per position (trainer's safe set in the denominator).

    Args:
        fn: ``fn(logits_train [R,V], logits_engine [R,V], rho) -> [R]``.

    Returns:
        :class:`~workbench.exercises.base.Passed` when ``fn`` agrees with :func:`workbench.metrics.safe_set_overlap`.
    """
    from workbench.dvp import safe_mask
    from workbench.metrics import safe_set_overlap

    name = "check_safe_set_overlap"
    cases = [(*_engine_pair(s), rho) for s, rho in ((0, 1e-2), (1, 1e-4), (2, DEFAULT_RHO))]
    for zt, ze, rho in cases:
        case = f"logits {tuple(zt.shape)}, rho={rho:.3g}"
        got = as_tensor(
            call_learner(fn, name, case, zt.clone(), ze.clone(), rho), name, case, "the overlap", zt.shape[:1]
        )
        expected = safe_set_overlap(zt, ze, rho)
        st, se = safe_mask(zt, rho), safe_mask(ze, rho)
        inter = (st & se).sum(-1).double()
        compare(
            name, case, got, expected, what="the result",
            diagnoses=[
                (inter / se.sum(-1), "you divided by |V'_S| (the engine's set): that is the engine-side view; "
                 "the trainer-side overlap divides by |V_S|"),
                (inter / (st | se).sum(-1), "that is the Jaccard index (∩ / ∪); the metric is |V_S ∩ V'_S| / |V_S|"),
            ],
        )  # fmt: skip
    return Passed(name, len(cases), "1 means every token the trainer keeps, the engine keeps too.")


def check_boundary_tokens(fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> Passed:
    """Exercise 8.2: sampled tokens outside the *trainer's* safe set (they must be masked or vetoed).

    Args:
        fn: ``fn(logits_train [R,V], tokens [R], rho) -> bool [R]``.

    Returns:
        :class:`~workbench.exercises.base.Passed` when ``fn`` agrees with :func:`workbench.metrics.boundary_tokens`.
    """
    from workbench.metrics import boundary_tokens

    name = "check_boundary_tokens"
    cases = []
    for seed, rho in ((0, 1e-2), (1, 1e-4), (2, 1e-6)):
        zt, ze = _engine_pair(seed)
        g = generator(300 + seed)
        tokens = torch.multinomial(torch.softmax(ze, -1), 1, generator=g).squeeze(
            -1
        )  # (R,) sampled by the engine
        tokens[0] = int(zt[0].argmin())  # a certain boundary token
        cases.append((zt, tokens, rho))
    # A flat policy (max π ≈ 0.1): tokens with ρ·max π ≤ π(a) < ρ are *inside* V_S.
    zt = torch.randn(6, 40, generator=generator(310))  # (R, V)
    p = torch.softmax(zt, -1)
    rho = 0.05
    between = (p >= rho * p.amax(-1, keepdim=True)) & (p < rho)  # (R, V)
    use = between.any(-1) & (torch.arange(6) < 3)  # half the rows: such a token; the rest: the argmax
    tokens = torch.where(use, between.float().argmax(-1), zt.argmax(-1))  # (R,)
    cases.append((zt, tokens, rho))
    for zt, tokens, rho in cases:
        case = f"logits {tuple(zt.shape)}, tokens={tokens.tolist()}, rho={rho:g}"
        got = as_tensor(
            call_learner(fn, name, case, zt.clone(), tokens.clone(), rho),
            name,
            case,
            "the flags",
            tokens.shape,
        )
        expected = boundary_tokens(zt, tokens, rho)
        p = torch.softmax(zt.double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
        compare(
            name, case, got.double(), expected.double(), what="the boundary flags",
            diagnoses=[
                ((~expected).double(), "inverted: flag tokens *outside* the safe set"),
                ((p < rho).double(), "V_S is relative to the row's max: a token is outside when "
                 "π(a) < ρ·max π, i.e. z_a < max z + log ρ"),
            ],
        )  # fmt: skip
    return Passed(name, len(cases), "These tokens carry a trainer log-prob near the mask value: drop them.")


def check_envelope_eps(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Passed:
    """Exercise 8.3: the logit error ε of Prop 4.2 at a state, ``½ (max δ − min δ)`` with ``δ = z_engine − z_train``.

    Softmax ignores a constant shift of the logits, so the relevant size of δ is the smallest
    ``‖δ − c‖_∞`` over shifts c — half its range.

    Args:
        fn: ``fn(logits_train [R,V], logits_engine [R,V]) -> ε [R]``.

    Returns:
        :class:`~workbench.exercises.base.Passed` when ``fn`` agrees with :func:`workbench.theory.logit_error`, the
        one ε every figure and experiment of the workbench uses.
    """
    name = "check_envelope_eps"
    cases = [_engine_pair(s) for s in (0, 1)]
    zt = _logits(2)
    cases.append((zt, zt + 3.0))  # a pure shift: ε = 0
    for zt, ze in cases:
        case = f"logits {tuple(zt.shape)}"
        got = as_tensor(call_learner(fn, name, case, zt.clone(), ze.clone()), name, case, "ε", zt.shape[:1])
        expected = logit_error(zt, ze)
        delta = (ze - zt).double()
        compare(
            name, case, got, expected, what="the result",
            diagnoses=[
                (delta.abs().amax(-1), "max |δ| ignores that softmax is shift-invariant: subtract the best "
                 "constant first (ε = ½(max δ − min δ))"),
                (delta.amax(-1) - delta.amin(-1), "that is the full range; ε is half of it"),
            ],
        )  # fmt: skip
    return Passed(name, len(cases), "A constant logit offset is no mismatch at all.")


# ----------------------------------------------------------------------------------------------------
# Lesson 09 — the GPU path


def check_processed_log_ratio(fn: Callable[..., torch.Tensor]) -> Passed:
    """Exercise 9.1: the token log-ratio against an engine that returns *processed* (min-p renormalised) log-probs.

    ``log r = log π^mp(a) − log μ^mp(a)`` where the trainer prunes with the engine's ρ; scoring the token
    with a full-vocabulary ``log π`` instead adds ``log Z`` (≤ 0) to every ratio — the pitfall of lesson 11.

    Args:
        fn: ``fn(logits_train [R,V], tokens [R], rho, logp_engine [R]) -> log r [R]``.

    Returns:
        :class:`~workbench.exercises.base.Passed` when ``fn`` equals ``dvp.token_logprobs(logits, tokens, rho) − logp_engine``.
    """
    from workbench.dvp import safe_mask, token_logprobs

    name = "check_processed_log_ratio"
    n = 0
    for seed, rho in ((0, 1e-2), (1, 1e-3)):
        zt, ze = _engine_pair(seed)
        keep_e = safe_mask(ze, rho)
        logp_e = torch.log_softmax(ze.masked_fill(~keep_e, float("-inf")), -1)  # (R, V) processed log μ^mp
        g = generator(400 + seed)
        # Tokens the engine could sample and the trainer keeps too (boundary tokens are lesson 8.2).
        both = keep_e & safe_mask(zt, rho)
        tokens = torch.multinomial(both.float(), 1, generator=g).squeeze(-1)  # (R,)
        lp_engine = logp_e.gather(-1, tokens[:, None]).squeeze(-1)  # (R,)
        case = f"logits {tuple(zt.shape)}, rho={rho:g}"
        got = as_tensor(call_learner(fn, name, case, zt.clone(), tokens.clone(), rho, lp_engine.clone()), name, case,
                     "log r", tokens.shape)  # fmt: skip
        expected = token_logprobs(zt, tokens, rho) - lp_engine
        full = torch.log_softmax(zt, -1).gather(-1, tokens[:, None]).squeeze(-1) - lp_engine
        compare(
            name, case, got, expected, what="the result",
            diagnoses=[
                (full, "you scored the token with the full-vocabulary log π: against processed log-probs that "
                 "adds log Z (≤ 0) to every ratio; prune the trainer with the same ρ (dvp.token_logprobs)"),
                (-expected, "the ratio is π/μ: log r = log π^mp − log μ^mp"),
            ],
        )  # fmt: skip
        n += 1
    return Passed(name, n, "Same ρ on both sides: the ratio measures the policy gap and nothing else.")


# ----------------------------------------------------------------------------------------------------
# Lesson 10 — beyond the paper


def check_grpo_advantages(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> Passed:
    """Exercise 10.1: GRPO advantages ``(R_i − mean) / (std + 1e-6)`` per group of ``k`` (unbiased std).

    Args:
        fn: ``fn(rewards [N], k) -> [N]``.

    Returns:
        :class:`~workbench.exercises.base.Passed` when ``fn`` agrees with :func:`workbench.rloo.grpo_advantages`.
    """
    from workbench.rloo import grpo_advantages, rloo_advantages

    name = "check_grpo_advantages"
    g = generator(0)
    cases = [
        (torch.tensor([1.0, 0.0, 1.0, 1.0]), 2),
        ((torch.rand(12, generator=g) < 0.5).float(), 4),
        (torch.rand(12, generator=g), 3),
        (torch.full((6,), 0.5), 3),
    ]
    for rewards, k in cases:
        case = f"rewards={show(rewards)}, k={k}"
        got = as_tensor(
            call_learner(fn, name, case, rewards.clone(), k), name, case, "the advantages", rewards.shape
        )
        expected = grpo_advantages(rewards, k)
        grp = rewards.double().view(-1, k)
        centred = grp - grp.mean(1, keepdim=True)
        pop = (centred / (grp.std(1, unbiased=False, keepdim=True) + 1e-6)).reshape(-1)
        compare(
            name, case, got, expected, what="the result", atol=1e-4,
            diagnoses=[
                (pop, "you used the population std (÷k); GRPO (TRL, verl) uses the unbiased std (÷(k−1))"),
                (centred.reshape(-1), "not scaled: divide the centred reward by the group's std (+ 1e-6)"),
                (rloo_advantages(rewards, k), "that is RLOO's leave-one-out advantage"),
            ],
        )  # fmt: skip
    return Passed(name, len(cases), "Scale-free advantages: a group with equal rewards contributes nothing.")


def check_ppo_clip_loss(fn: Callable[..., torch.Tensor]) -> Passed:
    """Exercise 10.2: the PPO-clip loss, token-mean, ``−min(ρA, clip(ρ, 1−ε, 1+ε)A)`` with ``ρ = π/π_old``.

    Args:
        fn: ``fn(logp [B,T] (requires grad), logp_old [B,T], advantages [B], mask [B,T] bool, clip_eps) -> scalar``.

    Returns:
        :class:`~workbench.exercises.base.Passed` when value and gradient agree with
        ``rloo.policy_loss(..., loss_type="ppo_clip", agg="token_mean")``.
    """
    from workbench.rloo import policy_loss

    name = "check_ppo_clip_loss"
    n = 0
    for seed, eps in ((0, 0.2), (1, 0.1), (2, 0.3)):
        g = generator(seed)
        lt, li, mask = _logp_pair(seed, spread=0.4)
        adv = torch.randn(lt.shape[0], generator=g)  # (B,)
        case = f"seed {seed}, clip_eps={eps}"
        logp = lt.clone().requires_grad_(True)
        loss = as_tensor(call_learner(fn, name, case, logp, li.clone(), adv.clone(), mask.clone(), eps), name, case,
                      "the loss", (), detach=False)  # fmt: skip
        ref_logp = lt.clone().requires_grad_(True)
        ref, _ = policy_loss(
            ref_logp, adv, mask, None, agg="token_mean", loss_type="ppo_clip", logp_old=li, clip_eps=eps
        )
        ratio = torch.exp(lt - li)
        surr, clipped = ratio * adv[:, None], ratio.clamp(1 - eps, 1 + eps) * adv[:, None]
        n_tok = mask.sum()
        compare(
            name, case, loss.reshape(()), ref.reshape(()), what="the loss value",
            diagnoses=[
                ((-torch.maximum(surr, clipped) * mask).sum() / n_tok, "min, not max: PPO takes the *pessimistic* "
                 "surrogate, min(ρA, clip(ρ)A)"),
                ((-surr * mask).sum() / n_tok, "no clipping: use clip(ρ, 1−ε, 1+ε)"),
                ((-clipped * mask).sum() / n_tok, "only the clipped term: take the min with the unclipped one"),
            ],
        )  # fmt: skip
        if not loss.requires_grad:
            raise ExerciseFailure(f"{name}: the loss has no gradient; do not detach log π\n  on case: {case}")
        (grad,) = torch.autograd.grad(loss, logp)
        (ref_grad,) = torch.autograd.grad(ref, ref_logp)
        compare(name, case, grad, ref_grad, what="d loss / d log π", hint="logp_old carries no gradient")
        n += 1
    return Passed(
        name, n, "Outside the clip range the gradient is 0 in the direction that would move further."
    )


def check_entropy_scaled_log_rho(fn: Callable[[torch.Tensor, float, float], torch.Tensor]) -> Passed:
    """Exercise 10.3: the per-state ``log ρ(s) = log ρ₀ · (1 + κ H(s))``, ``H`` the entropy (nats) of softmax(z).

    Args:
        fn: ``fn(logits [R,V], log_rho0, kappa) -> log ρ(s) [R]``.

    Returns:
        :class:`~workbench.exercises.base.Passed` when ``fn`` agrees with
        :func:`workbench.dvp.entropy_scaled_safe_mask`.
    """
    from workbench.dvp import entropy_scaled_safe_mask

    name = "check_entropy_scaled_log_rho"
    cases = [
        (_logits(0), math.log(DEFAULT_RHO), 0.5),
        (_logits(1, scale=0.5), math.log(DEFAULT_RHO), 0.2),
        (_logits(2), -5.0, 0.0),
    ]
    for z, log_rho, kappa in cases:
        case = f"logits {tuple(z.shape)}, log_rho0={log_rho}, kappa={kappa}"
        got = as_tensor(
            call_learner(fn, name, case, z.clone(), log_rho, kappa), name, case, "log ρ(s)", z.shape[:1]
        )
        _, expected = entropy_scaled_safe_mask(z, log_rho, kappa)
        logp = torch.log_softmax(z.double(), -1)
        h = -(logp.exp() * logp).sum(-1)
        compare(
            name, case, got, expected, what="the result", atol=1e-4,
            diagnoses=[
                (log_rho * (1 + kappa * h / math.log(2)), "entropy in bits; use nats (natural log)"),
                (log_rho * (1 - kappa * h), "the sign: uncertain states cut *deeper* (log ρ more negative)"),
                (torch.full_like(h, log_rho) if kappa else None, "log ρ is not scaled: multiply by (1 + κ H)"),
            ],
        )  # fmt: skip
    return Passed(name, len(cases), "High-entropy states prune less: their tails hold real alternatives.")
