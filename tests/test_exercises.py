"""workbench.exercises: every checker passes the lesson's own solution (run from the lesson's markdown) and fails,
loudly and with the right diagnosis, on the typical wrong answers."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from workbench import exercises as ex
from workbench.config import RLOOConfig

LESSONS = Path(__file__).resolve().parents[1] / "lessons"
SOLUTION = re.compile(r"<details><summary>Solution</summary>\s*```python\n(.*?)```", re.S)


def _solutions(stem: str) -> list[str]:
    return SOLUTION.findall((LESSONS / f"{stem}.md").read_text(encoding="utf-8"))


@pytest.mark.parametrize("stem", sorted(ex.EXERCISES))
def test_lesson_solutions_pass_their_checkers(stem: str) -> None:
    """Run every solution block of the lesson; each calls its checker, which raises if the solution is wrong."""
    blocks = _solutions(stem)
    checkers = {fn.__name__ for fn in ex.EXERCISES[stem]}
    called = {name for b in blocks for name in checkers if f"{name}(" in b}
    assert called == checkers, f"lessons/{stem}.md has no solution calling {sorted(checkers - called)}"
    for block in blocks:
        exec(compile(block, f"lessons/{stem}.md", "exec"), {"__name__": f"lesson_{stem}"})


@pytest.mark.parametrize("stem", sorted(ex.EXERCISES))
def test_lessons_follow_the_template(stem: str) -> None:
    text = (LESSONS / f"{stem}.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings == [
        "Goal",
        "Key equations",
        "Pseudocode",
        "Which `workbench` symbols do it",
        "Logged metrics",
        "Exercises",
        "Summary",
        "Deviations from the paper",
    ], headings
    assert (LESSONS.parent / "notebooks" / f"{stem}.ipynb").is_file(), f"no notebook beside lessons/{stem}.md"


def _fails(checker: Callable[..., object], fn: object, *needles: str) -> str:
    with pytest.raises(ex.ExerciseFailure) as info:
        checker(fn)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_passed_is_truthy_and_renders() -> None:
    p = ex.check_rloo_advantages(_rloo)
    assert p and p.cases == 5 and "check_rloo_advantages" in str(p) and p._repr_markdown_().startswith("✅")
    assert issubclass(ex.ExerciseFailure, AssertionError)


def _rloo(r: torch.Tensor, k: int) -> torch.Tensor:
    g = r.view(-1, k)
    return (g - (g.sum(1, keepdim=True) - g) / (k - 1)).reshape(-1)


def test_rloo_checker_diagnoses_common_slips() -> None:
    _fails(
        ex.check_rloo_advantages,
        lambda r, k: (r.view(-1, k) - r.view(-1, k).mean(1, keepdim=True)).reshape(-1),
        "including* R_i",
        "on case:",
        "expected:",
        "got:",
    )
    _fails(ex.check_rloo_advantages, lambda r, k: r - r.mean(), "batch mean")
    _fails(ex.check_rloo_advantages, lambda r, k: -_rloo(r, k), "sign is flipped")


def test_checkers_report_exceptions_types_and_shapes() -> None:
    def boom(r: torch.Tensor, k: int) -> torch.Tensor:
        raise KeyError("oops")

    msg = _fails(ex.check_rloo_advantages, boom, "raised KeyError", "on case: rewards=")
    assert "oops" in msg
    _fails(ex.check_rloo_advantages, lambda r, k: r.tolist(), "should be a torch.Tensor")
    _fails(ex.check_rloo_advantages, lambda r, k: r[:-1], "has shape")
    _fails(ex.check_rloo_advantages, "not a function", "expected a function")


def test_naive_config_checker_names_the_wrong_field() -> None:
    assert ex.check_naive_config(RLOOConfig(rho=None, is_mode="none", veto=None, engine_dtype="bf16"))
    _fails(
        ex.check_naive_config,
        RLOOConfig(is_mode="none", veto=None, engine_dtype="bf16"),
        "cfg.rho",
        "full vocabulary",
    )
    _fails(ex.check_naive_config, RLOOConfig(rho=None, veto=None, engine_dtype="bf16"), "cfg.is_mode")
    _fails(ex.check_naive_config, {"rho": None}, "expected an RLOOConfig")


def test_k1_k3_checker_catches_nan_padding_and_sign() -> None:
    def masked_mul(lt, li, m):
        d = (li - lt) * m
        return float(d.sum() / m.sum()), 0.0

    _fails(ex.check_k1_k3, masked_mul, "NaN·0 is NaN")

    def flipped(lt, li, m):
        d = (lt - li)[m]
        return float(d.mean()), float((d.exp() - d - 1).mean())

    _fails(ex.check_k1_k3, flipped, "sign")
    _fails(ex.check_k1_k3, lambda lt, li, m: 1.0, "return a pair")


def test_delta_by_bin_checker_diagnoses_signed_means() -> None:
    def signed(lt, li, m, edges):
        p, d = lt[m].double().exp(), (li - lt)[m].double()
        e = torch.tensor(edges, dtype=torch.float64)
        i = (torch.bucketize(p, e, right=True) - 1).clamp(max=len(edges) - 2)
        return [float(d[i == j].mean()) if bool((i == j).any()) else math.nan for j in range(len(edges) - 1)]

    _fails(ex.check_delta_by_bin, signed, "mean of Δ")
    # A list whose entries are not numbers is the learner's slip, reported as such (not a ValueError).
    _fails(ex.check_delta_by_bin, lambda lt, li, m, edges: [torch.zeros(2)] * (len(edges) - 1), "bin 0")


def test_prop42_checkers_diagnose_slips() -> None:
    def at_zero(z, d, a, t):
        p = torch.softmax(z, -1)
        return float(d[a] - (p * d).sum())

    _fails(ex.check_logprob_path_derivative, at_zero, "p(0)")
    _fails(ex.check_exact_bound, lambda p, e: 2 * e * (1 - p), "first-order bound")
    _fails(ex.check_exact_bound, lambda p, e: math.expm1(2 * e) * (1 - p), "exact form of the first-order")

    def too_big(z, a, eps):
        d = torch.full_like(z, -2 * eps)
        d[a] = 2 * eps
        return d

    _fails(ex.check_worst_case_perturbation, too_big, "exceeds ε")
    _fails(ex.check_worst_case_perturbation, lambda z, a, eps: torch.zeros_like(z), "is reachable")


def test_sampled_delta_checker_catches_sampling_from_pi() -> None:
    def from_pi(z, sigma, n, g):
        d = sigma * torch.randn(n, z.numel(), generator=g, dtype=z.dtype)
        lmu = torch.log_softmax(z + d, -1)
        a = torch.multinomial(torch.softmax(z, -1).expand(n, -1), 1, generator=g).squeeze(-1)
        return a, lmu.gather(-1, a[:, None]).squeeze(-1) - torch.log_softmax(z, -1)[a]

    _fails(ex.check_sampled_delta, from_pi, "*engine* sampled", "the reference is")
    _fails(ex.check_sampled_delta, lambda z, s, n, g: (torch.zeros(n), torch.zeros(n)), "integer tensor")


def test_tail_and_sequence_checkers() -> None:
    def zero_for_empty(lt, li, m, pm):
        sel = lt[m] < math.log(pm)
        d = (li - lt)[m][sel]
        return (
            int(sel.sum()),
            float(d.mean()) if d.numel() else 0.0,
            float((d > 0).double().mean()) if d.numel() else 0.0,
        )

    _fails(ex.check_tail_summary, zero_for_empty, "NaN (not 0)")
    _fails(ex.check_sequence_log_ratio, lambda lt, li, m: torch.where(m, lt - li, 0.0).sum(-1), "sign")
    _fails(
        ex.check_sequence_log_ratio,
        lambda lt, li, m: torch.where(m, li - lt, 0.0).sum(-1) / m.sum(-1),
        "mean per token",
    )


def test_bias_identity_checker_diagnoses_slips() -> None:
    def exp_s(lp, lm, g):
        return ((lm.exp() * (1 - (lm - lp).exp()))[:, None] * g).sum(0)

    _fails(ex.check_bias_identity, exp_s, "not e^{S}")

    def uniform(lp, lm, g):
        return ((1 - torch.exp(-(lm - lp)))[:, None] * g).mean(0)

    _fails(ex.check_bias_identity, uniform, "weights each sequence by μ(y)")


def test_safe_set_checkers_diagnose_slips() -> None:
    _fails(ex.check_safe_mask, lambda z, r: torch.softmax(z, -1) >= r, "relative")
    _fails(ex.check_safe_mask, lambda z, r: z - z.amax(-1, keepdim=True) > math.log(r), "use ≥, not >")
    _fails(
        ex.check_safe_mask, lambda z, r: (z - z.amax(-1, keepdim=True) >= math.log(r)).float(), "bool tensor"
    )

    def keep(z, r):
        return z - z.amax(-1, keepdim=True) >= math.log(r)

    _fails(
        ex.check_retained_mass, lambda z, r: 1 - (torch.softmax(z.double(), -1) * keep(z, r)).sum(-1), "1 − Z"
    )
    _fails(
        ex.check_retained_mass,
        lambda z, r: torch.softmax(z.masked_fill(~keep(z, r), -1e9), -1).sum(-1),
        "renormalising",
    )


def test_pruned_logprob_checker_catches_inf_unnormalised_and_detached() -> None:
    def with_inf(z, t, r):
        m = z - z.amax(-1, keepdim=True) < math.log(r)
        return torch.log_softmax(z.masked_fill(m, float("-inf")), -1).gather(-1, t[:, None]).squeeze(-1)

    _fails(ex.check_pruned_logprob, with_inf, "finite")

    def full_vocab(z, t, r):
        return torch.log_softmax(z, -1).gather(-1, t[:, None]).squeeze(-1)

    _fails(ex.check_pruned_logprob, full_vocab, "pruned tokens should get")

    def detached(z, t, r):
        from workbench.dvp import token_logprobs

        return token_logprobs(z.detach(), t, r)

    _fails(ex.check_pruned_logprob, detached, "autograd")


def test_shared_helpers_keep_both_wordings_and_the_graph_on_request() -> None:
    """``compare``/``as_tensor`` serve lessons 00–05 (no ``what``) and lessons 06–10 (``what=...``)."""
    got, expected = torch.tensor([1.0, 2.5]), torch.tensor([1.0, 2.0])
    with pytest.raises(ex.ExerciseFailure) as plain:
        ex.compare("chk", "c", got, expected)
    assert str(plain.value).splitlines() == [
        "chk: wrong value at flat index 1 (1 of 2 entries differ)",
        "  on case:  c",
        "  expected: [1.0, 2.0]",
        "  got:      [1.0, 2.5]",
        "  first mismatch: expected 2, got 2.5 (tolerance atol=1e-05, rtol=0.0001)",
    ]
    with pytest.raises(ex.ExerciseFailure) as named:
        ex.compare("chk", "c", got, expected, what="the result")
    assert str(named.value).splitlines() == [
        "chk: the result is wrong (1 of 2 entries differ)",
        "  on case:  c",
        "  expected: [1, 2]",
        "  got:      [1, 2.5]",
        "  first mismatch at flat index 1: expected 2, got 2.5",
    ]
    loss = torch.ones((), requires_grad=True) * 2
    assert ex.as_tensor(loss, "chk", "c", "the loss", (), detach=False) is loss
    copy = ex.as_tensor(loss, "chk", "c", "the loss", ())
    assert copy.dtype == torch.float64 and not copy.requires_grad
