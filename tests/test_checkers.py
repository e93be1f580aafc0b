"""Checkers of lessons 06–10: the lesson's solution passes, typical wrong answers fail with the right diagnosis.

The solutions here are the ones printed in ``lessons/06_*.md`` … ``10_*.md`` (keep them in sync).
"""

from __future__ import annotations

import math

import pytest
import torch

from workbench import exercises as ck
from workbench.exercises import ExerciseFailure, Passed

# ---------------------------------------------------------------------------------------------- solutions


def sol_token_mis(logp_train, logp_infer, mask, lo, hi):
    r = torch.exp(logp_train - logp_infer)
    keep = mask & (r >= lo) & (r <= hi)
    return torch.where(keep, r, 0.0), keep


def sol_pg_loss(logp, advantages, keep, weights):
    per_token = -(weights.detach() * advantages[:, None] * logp)
    return torch.where(keep, per_token, 0.0).sum() / keep.sum().clamp_min(1)


def sol_max_safe_rho(logits, needed):
    gap = logits.gather(-1, needed[:, None]).squeeze(-1) - logits.amax(-1)
    return gap.min().exp()


def _safe(z, rho):
    return z - z.amax(-1, keepdim=True) >= math.log(rho)


def sol_overlap(zt, ze, rho):
    st, se = _safe(zt, rho), _safe(ze, rho)
    return (st & se).sum(-1) / st.sum(-1)


def sol_boundary(zt, tokens, rho):
    return ~_safe(zt, rho).gather(-1, tokens[:, None]).squeeze(-1)


def sol_eps(zt, ze):
    d = ze - zt
    return 0.5 * (d.amax(-1) - d.amin(-1))


def sol_processed_ratio(zt, tokens, rho, logp_engine):
    masked = torch.where(_safe(zt, rho), zt, zt.amax(-1, keepdim=True) - 1000.0)
    logp = torch.log_softmax(masked, -1).gather(-1, tokens[:, None]).squeeze(-1)
    return logp - logp_engine


def sol_grpo(rewards, k):
    g = rewards.view(-1, k)
    centred = g - g.mean(1, keepdim=True)
    return (centred / (g.std(1, keepdim=True) + 1e-6)).reshape(-1)


def sol_ppo(logp, logp_old, advantages, mask, clip_eps):
    ratio = torch.exp(logp - logp_old.detach())
    a = advantages[:, None]
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    return torch.where(mask, per_token, 0.0).sum() / mask.sum()


def sol_log_rho(logits, log_rho0, kappa):
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    return log_rho0 * (1 + kappa * entropy)


SOLUTIONS = [
    (ck.check_token_mis, sol_token_mis),
    (ck.check_pg_loss, sol_pg_loss),
    (ck.check_max_safe_rho, sol_max_safe_rho),
    (ck.check_safe_set_overlap, sol_overlap),
    (ck.check_boundary_tokens, sol_boundary),
    (ck.check_envelope_eps, sol_eps),
    (ck.check_processed_log_ratio, sol_processed_ratio),
    (ck.check_grpo_advantages, sol_grpo),
    (ck.check_ppo_clip_loss, sol_ppo),
    (ck.check_entropy_scaled_log_rho, sol_log_rho),
]


@pytest.mark.parametrize("check,solution", SOLUTIONS, ids=[c.__name__ for c, _ in SOLUTIONS])
def test_the_lesson_solution_passes(check, solution) -> None:
    result = check(solution)
    assert isinstance(result, Passed) and result.cases >= 2 and check.__name__ in str(result)


# ---------------------------------------------------------------------------------------------- wrong answers

WRONG = [
    (ck.check_token_mis, lambda lt, li, m, lo, hi: sol_token_mis(li, lt, m, lo, hi), "you used μ/π"),
    (
        ck.check_token_mis,
        lambda lt, li, m, lo, hi: (torch.where(m, torch.exp(lt - li).clamp(max=hi), 0.0), m),
        "every valid token is kept",
    ),
    (ck.check_pg_loss, lambda lp, a, k, w: -sol_pg_loss(lp, a, k, w), "sign is flipped"),
    (
        ck.check_pg_loss,
        lambda lp, a, k, w: torch.where(k, -(w * a[:, None] * lp), 0.0).sum() / k.numel(),
        "divided by every position",
    ),
    (
        ck.check_max_safe_rho,
        lambda z, n: (z.gather(-1, n[:, None]).squeeze(-1) - z.amax(-1)).max().exp(),
        "easiest",
    ),
    (
        ck.check_max_safe_rho,
        lambda z, n: torch.softmax(z, -1).gather(-1, n[:, None]).min(),
        "not with ρ",
    ),
    (ck.check_safe_set_overlap, lambda a, b, r: sol_overlap(b, a, r), "engine-side view"),
    (
        ck.check_safe_set_overlap,
        lambda a, b, r: (_safe(a, r) & _safe(b, r)).sum(-1) / (_safe(a, r) | _safe(b, r)).sum(-1),
        "Jaccard",
    ),
    (ck.check_boundary_tokens, lambda z, t, r: ~sol_boundary(z, t, r), "inverted"),
    (
        ck.check_boundary_tokens,
        lambda z, t, r: torch.softmax(z, -1).gather(-1, t[:, None]).squeeze(-1) < r,
        "relative to the row's max",
    ),
    (ck.check_envelope_eps, lambda a, b: (b - a).abs().amax(-1), "shift-invariant"),
    (ck.check_envelope_eps, lambda a, b: 2 * sol_eps(a, b), "full range"),
    (
        ck.check_processed_log_ratio,
        lambda z, t, r, le: torch.log_softmax(z, -1).gather(-1, t[:, None]).squeeze(-1) - le,
        "full-vocabulary log π",
    ),
    (
        ck.check_grpo_advantages,
        lambda r, k: (
            (r.view(-1, k) - r.view(-1, k).mean(1, keepdim=True))
            / (r.view(-1, k).std(1, unbiased=False, keepdim=True) + 1e-6)
        ).reshape(-1),
        "population std",
    ),
    (
        ck.check_grpo_advantages,
        lambda r, k: (r.view(-1, k) - r.view(-1, k).mean(1, keepdim=True)).reshape(-1),
        "not scaled",
    ),
    (
        ck.check_ppo_clip_loss,
        lambda lp, lo, a, m, e: (-(torch.exp(lp - lo) * a[:, None]) * m).sum() / m.sum(),
        "no clipping",
    ),
    (
        ck.check_ppo_clip_loss,
        lambda lp, lo, a, m, e: (
            (
                -torch.maximum(
                    torch.exp(lp - lo) * a[:, None], torch.exp(lp - lo).clamp(1 - e, 1 + e) * a[:, None]
                )
                * m
            ).sum()
            / m.sum()
        ),
        "min, not max",
    ),
    (ck.check_entropy_scaled_log_rho, lambda z, lr, k: sol_log_rho(z, lr, -k), "the sign"),
    (ck.check_entropy_scaled_log_rho, lambda z, lr, k: sol_log_rho(z, lr, k / math.log(2)), "bits"),
]


@pytest.mark.parametrize("check,wrong,slip", WRONG, ids=[f"{c.__name__}-{s}" for c, _, s in WRONG])
def test_typical_wrong_answers_fail_with_their_diagnosis(check, wrong, slip: str) -> None:
    with pytest.raises(ExerciseFailure, match="likely slip") as err:
        check(wrong)
    assert slip in str(err.value), str(err.value)
    assert "on case:" in str(err.value)


def test_shape_errors_and_exceptions_are_reported_with_the_case() -> None:
    with pytest.raises(ExerciseFailure, match="shape"):
        ck.check_safe_set_overlap(lambda a, b, r: torch.zeros(3))
    with pytest.raises(ExerciseFailure, match="raised ZeroDivisionError"):
        ck.check_grpo_advantages(lambda r, k: 1 / 0)
    with pytest.raises(ExerciseFailure, match="pair"):
        ck.check_token_mis(lambda *a: torch.zeros(1))
    with pytest.raises(ExerciseFailure, match="no gradient"):
        ck.check_pg_loss(lambda lp, a, k, w: sol_pg_loss(lp.detach(), a, k, w))
    with pytest.raises(ExerciseFailure, match="expected a function"):
        ck.check_envelope_eps(3)  # type: ignore[arg-type]
