"""Tests for workbench.rloo: advantages against naive loops, the loss against hand-computed REINFORCE gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.importance import importance_weights
from workbench.rloo import LOSS_METRIC_DOCS, grpo_advantages, policy_loss, rloo_advantages


def _naive_rloo(rewards: list[float], k: int, valid: list[bool]) -> list[float]:
    out = []
    for i, r in enumerate(rewards):
        g = i // k
        others = [rewards[j] for j in range(g * k, g * k + k) if j != i and valid[j]]
        out.append(r - sum(others) / len(others) if valid[i] and others else 0.0)
    return out


def _naive_grpo(rewards: list[float], k: int, valid: list[bool], scale: bool, eps: float) -> list[float]:
    out = []
    for i, r in enumerate(rewards):
        g = i // k
        grp = [rewards[j] for j in range(g * k, g * k + k) if valid[j]]
        if not valid[i] or len(grp) < 2:
            out.append(0.0)
            continue
        mean = sum(grp) / len(grp)
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (len(grp) - 1))
        out.append((r - mean) / (std + eps) if scale else r - mean)
    return out


# ---------------------------------------------------------------------------------------------- advantages
@settings(max_examples=80, deadline=None)
@given(
    k=st.integers(2, 6),
    groups=st.integers(1, 4),
    data=st.data(),
)
def test_rloo_matches_naive_loop(k: int, groups: int, data: st.DataObject) -> None:
    n = k * groups
    rewards = data.draw(st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=n, max_size=n))
    valid = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    got = rloo_advantages(torch.tensor(rewards, dtype=torch.float64), k, torch.tensor(valid))
    torch.testing.assert_close(got, torch.tensor(_naive_rloo(rewards, k, valid), dtype=torch.float64))
    # advantages of the valid samples of every group sum to zero
    for g in range(groups):
        assert abs(float(got[g * k : (g + 1) * k].sum())) < 1e-9


@settings(max_examples=60, deadline=None)
@given(k=st.integers(2, 6), groups=st.integers(1, 4), scale=st.booleans(), data=st.data())
def test_grpo_matches_naive_loop(k: int, groups: int, scale: bool, data: st.DataObject) -> None:
    n = k * groups
    rewards = data.draw(st.lists(st.floats(0, 1, allow_nan=False, width=32), min_size=n, max_size=n))
    valid = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    got = grpo_advantages(torch.tensor(rewards, dtype=torch.float64), k, torch.tensor(valid), scale=scale)
    ref = _naive_grpo(rewards, k, valid, scale, 1e-6)
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_rloo_closed_form_and_relation_to_grpo() -> None:
    g = torch.Generator().manual_seed(0)
    k = 5
    r = torch.rand(4 * k, generator=g, dtype=torch.float64)
    a = rloo_advantages(r, k)
    mean = r.view(4, k).mean(1, keepdim=True)
    torch.testing.assert_close(a, (k / (k - 1) * (r.view(4, k) - mean)).reshape(-1))  # THEORY.md identity
    torch.testing.assert_close(grpo_advantages(r, k, scale=False) * k / (k - 1), a)


def test_rejected_samples_leave_the_baseline() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    valid = torch.tensor([True, True, False, True, False, True])
    a = rloo_advantages(r, 3, valid)
    assert a.tolist() == [1.0, -1.0, 0.0, 1.0, 0.0, -1.0]
    # changing a rejected sample's reward changes nobody's advantage (a baseline over all samples would)
    r2 = r.clone()
    r2[2] = 100.0
    r2[4] = -7.0
    assert torch.equal(rloo_advantages(r2, 3, valid), a)
    assert not torch.equal(rloo_advantages(r2, 3), rloo_advantages(r, 3))


def test_groups_with_fewer_than_two_valid_samples_get_zero() -> None:
    r = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.9, 0.4])
    valid = torch.tensor([True, False, False, False, False, False])
    assert torch.all(rloo_advantages(r, 3, valid) == 0)
    assert torch.all(grpo_advantages(r, 3, valid) == 0)


def test_equal_rewards_give_zero_not_nan() -> None:
    r = torch.ones(8)
    assert torch.all(rloo_advantages(r, 4) == 0)
    assert torch.all(grpo_advantages(r, 4) == 0)


def test_integer_rewards_are_accepted() -> None:
    a = rloo_advantages(torch.tensor([1, 0, 0, 0]), 2)
    assert a.dtype == torch.float32 and a.tolist() == [1.0, -1.0, 0.0, 0.0]


@pytest.mark.parametrize("fn", [rloo_advantages, grpo_advantages])
@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.zeros(4), 1), r"k=1 must be an int ≥ 2"),
        ((torch.zeros(4), 2.0), r"k=2.0 must be an int"),
        ((torch.zeros(4), True), r"k=True"),
        ((torch.zeros(2, 2), 2), r"rewards must be a 1-D tensor.*\(2, 2\)"),
        ((torch.zeros(5), 2), r"len\(rewards\)=5 is not divisible by k=2"),
        ((torch.tensor([0.0, float("nan"), 1.0, 1.0]), 2), r"non-finite values at indices \[1\]"),
        ((torch.tensor([0.0, float("inf")]), 2), r"must be finite"),
        ((torch.zeros(4), 2, torch.ones(4)), r"valid must be a bool tensor"),
        (
            (torch.zeros(4), 2, torch.ones(3, dtype=torch.bool)),
            r"valid must be a bool tensor of shape \(4,\)",
        ),
    ],
)
def test_advantage_bad_input(fn, args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fn(*args)


# ------------------------------------------------------------------------------------------------- the loss
def _linear_policy(seed: int = 0, b: int = 3, t: int = 4, v: int = 5, d: int = 3):
    """A tiny linear softmax policy π(·|x) = softmax(W x) with per-position features x and sampled tokens y."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (b, t), generator=g)
    return w, x, y


def _logp(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x @ w.T, dim=-1).gather(-1, y[..., None]).squeeze(-1)  # (B, T)


def _reinforce_grad(w, x, y, adv, mask, weights, agg: str) -> torch.Tensor:
    """Hand-written gradient of −Σ w·A·log π: ∇_W log softmax(Wx)_y = (e_y − p) xᵀ."""
    v = w.shape[0]
    grad = torch.zeros_like(w)
    with torch.no_grad():
        p = torch.softmax(x @ w.T, dim=-1)
        b, t = mask.shape
        n_tok = int(mask.sum())
        n_seq = sum(1 for i in range(b) if mask[i].any())
        for i in range(b):
            n_i = int(mask[i].sum())
            for j in range(t):
                if not mask[i, j]:
                    continue
                e_y = torch.zeros(v, dtype=w.dtype)
                e_y[y[i, j]] = 1.0
                coef = float(weights[i, j]) * float(adv[i])
                norm = n_tok if agg == "token_mean" else n_seq * n_i
                grad -= coef * torch.outer(e_y - p[i, j], x[i, j]) / norm
    return grad


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_pg_gradient_equals_hand_computed_reinforce(agg: str) -> None:
    w, x, y = _linear_policy()
    mask = torch.tensor([[True, True, True, False], [True, False, False, False], [True, True, True, True]])
    adv = torch.tensor([1.5, -0.5, 0.25], dtype=torch.float64)
    weights = torch.tensor(
        [[1.0, 2.0, 0.5, 9.0], [0.3, 0.0, 0.0, 0.0], [1.0, 1.0, 1.2, 0.8]], dtype=torch.float64
    )
    loss, stats = policy_loss(_logp(w, x, y), adv, mask, weights, agg=agg)
    loss.backward()
    torch.testing.assert_close(w.grad, _reinforce_grad(w, x, y, adv, mask, weights, agg))
    assert stats["loss/kept_tokens"] == 8.0 and stats["loss/kept_seqs"] == 3.0


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_loss_value_matches_naive_aggregation(agg: str) -> None:
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(4, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 5, generator=g) < 0.6
    mask[2] = False  # a sequence with no kept token must not count in seq_mean
    adv = torch.randn(4, generator=g, dtype=torch.float64)
    w = torch.rand(4, 5, generator=g, dtype=torch.float64)
    loss, _ = policy_loss(logp, adv, mask, w, agg=agg)
    terms = [[-float(w[i, j] * adv[i] * logp[i, j]) for j in range(5) if mask[i, j]] for i in range(4)]
    if agg == "token_mean":
        ref = sum(sum(t) for t in terms) / sum(len(t) for t in terms)
    else:
        seqs = [sum(t) / len(t) for t in terms if t]
        ref = sum(seqs) / len(seqs)
    assert loss.item() == pytest.approx(ref, rel=1e-12)


def test_weights_receive_no_gradient_and_are_treated_as_constants() -> None:
    w, x, y = _linear_policy(seed=2)
    mask = torch.ones(3, 4, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    is_w = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(_logp(w, x, y), adv, mask, is_w)
    loss.backward()
    assert is_w.grad is None
    torch.testing.assert_close(w.grad, _reinforce_grad(w, x, y, adv, mask, is_w.detach(), "token_mean"))
    adv_req = adv.clone().requires_grad_(True)
    loss2, _ = policy_loss(_logp(w, x, y), adv_req, mask, is_w)
    loss2.backward()
    assert adv_req.grad is None  # advantages are constants too


@pytest.mark.parametrize("loss_type", ["pg", "ppo_clip"])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_all_rejected_batch_gives_zero_loss_that_backprops(loss_type: str, agg: str) -> None:
    w, x, y = _linear_policy(seed=3)
    logp = _logp(w, x, y)
    logp = torch.where(
        torch.arange(4) < 2, logp, torch.full_like(logp, float("nan"))
    )  # NaN on dropped positions
    mask = torch.zeros(3, 4, dtype=torch.bool)
    kw = {"logp_old": logp.detach() + 0.1} if loss_type == "ppo_clip" else {}
    loss, stats = policy_loss(
        logp, torch.ones(3, dtype=torch.float64), mask, torch.zeros(3, 4), agg=agg, loss_type=loss_type, **kw
    )
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert (
        stats["loss/all_rejected"] == 1.0
        and stats["loss/kept_tokens"] == 0.0
        and stats["loss/kept_seqs"] == 0.0
    )
    assert all(math.isfinite(v) for v in stats.values())


def test_dropped_positions_with_nan_do_not_poison_loss_or_grad() -> None:
    w, x, y = _linear_policy(seed=4)
    mask = torch.tensor([[True, True, False, False], [True, True, True, False], [True, False, False, False]])
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    clean_loss, _ = policy_loss(_logp(w, x, y), adv, mask)
    clean_loss.backward()
    clean_grad = w.grad.clone()
    w.grad = None
    logp = _logp(w, x, y)
    logp = torch.where(mask, logp, torch.full_like(logp, float("-inf")))
    weights = torch.where(
        mask, torch.ones(3, 4, dtype=torch.float64), torch.full((3, 4), float("nan"), dtype=torch.float64)
    )
    loss, _ = policy_loss(logp, adv, mask, weights)
    loss.backward()
    assert loss.item() == clean_loss.item()
    torch.testing.assert_close(w.grad, clean_grad)


def test_ppo_clip_matches_pg_gradient_on_policy_and_clips_off_policy() -> None:
    w, x, y = _linear_policy(seed=5)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 3] = False
    adv = torch.tensor([1.0, -1.0, 0.3], dtype=torch.float64)
    weights = torch.rand(3, 4, dtype=torch.float64) + 0.5
    # at logp_old = logp the PPO gradient is the REINFORCE gradient (∇ρ = ρ ∇log π, ρ = 1)
    loss, stats = policy_loss(
        _logp(w, x, y), adv, mask, weights, loss_type="ppo_clip", logp_old=_logp(w, x, y).detach()
    )
    loss.backward()
    torch.testing.assert_close(w.grad, _reinforce_grad(w, x, y, adv, mask, weights, "token_mean"))
    assert stats["loss/clipfrac"] == 0.0 and stats["loss/ratio_mean"] == pytest.approx(1.0)
    assert stats["loss/approx_kl"] == pytest.approx(0.0, abs=1e-12)


def test_ppo_clip_value_and_clipfrac_by_hand() -> None:
    # ratios e^{±0.5} ≈ 1.65 / 0.61 with eps 0.2; A > 0 clips the high ratio, A < 0 clips the low one
    logp = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    logp_old = torch.tensor([[-1.5, -1.5], [-1.5, -1.5]], dtype=torch.float64)
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, stats = policy_loss(logp, adv, mask, loss_type="ppo_clip", logp_old=logp_old, clip_eps=0.2)
    hi, lo = math.exp(0.5), math.exp(-0.5)
    terms = [min(hi * 2, 1.2 * 2), min(lo * 2, lo * 2), min(hi * -1, hi * -1), min(lo * -1, 0.8 * -1)]
    assert loss.item() == pytest.approx(-sum(terms) / 4)
    assert stats["loss/clipfrac"] == pytest.approx(0.5)
    loss.backward()
    # clipped tokens (0,0) and (1,1) get no gradient; the others get −A·ρ/N
    expected = torch.tensor([[0.0, -2.0 * lo / 4], [1.0 * hi / 4, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected)


def test_end_to_end_with_importance_result() -> None:
    """IS keep/weights and seq_keep plug into the loss and the baseline; the vetoed sequence is inert."""
    w, x, y = _linear_policy(seed=6, b=4, t=3)
    mask = torch.ones(4, 3, dtype=torch.bool)
    logp = _logp(w, x, y)
    logp_infer = logp.detach().clone()
    logp_infer[1, 1] += 12.0  # catastrophic token in sequence 1
    res = importance_weights(logp, logp_infer, mask, "seq_tis")
    assert res.seq_keep.tolist() == [True, False, True, True]
    adv = rloo_advantages(torch.tensor([1.0, 5.0, 0.0, 1.0], dtype=torch.float64), 2, res.seq_keep)
    assert adv.tolist() == [0.0, 0.0, -1.0, 1.0]  # sequence 0 has no valid partner left
    loss, stats = policy_loss(logp, adv, res.keep, res.weights)
    loss.backward()
    assert stats["loss/kept_tokens"] == 9.0 and stats["loss/kept_seqs"] == 3.0
    torch.testing.assert_close(
        w.grad, _reinforce_grad(w, x, y, adv, res.keep, res.weights.double(), "token_mean")
    )


def test_pg_ignores_logp_old() -> None:
    """pg accepts logp_old (so callers may always pass it) and ignores it, even where it is NaN."""
    logp = -torch.rand(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    plain, _ = policy_loss(logp, adv, mask)
    with_old, stats = policy_loss(logp, adv, mask, logp_old=torch.full((2, 3), float("nan")))
    assert plain.item() == with_old.item() and "loss/clipfrac" not in stats


def test_loss_metric_docs_match_emitted_keys() -> None:
    logp = -torch.rand(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    _, pg = policy_loss(logp, torch.ones(2), mask)
    _, ppo = policy_loss(logp, torch.ones(2), mask, loss_type="ppo_clip", logp_old=logp)
    assert set(pg) | set(ppo) == set(LOSS_METRIC_DOCS)
    assert set(pg) < set(ppo)
    assert {k for k in LOSS_METRIC_DOCS if "ppo_clip only" in LOSS_METRIC_DOCS[k]} == set(ppo) - set(pg)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"logp": torch.zeros(2, 3, dtype=torch.long)}, r"logp must be a floating \[B, T\]"),
        ({"logp": torch.zeros(6)}, r"logp must be a floating \[B, T\]"),
        ({"advantages": torch.zeros(2, 3)}, r"advantages must have shape \[B\]=\(2,\)"),
        ({"mask": torch.ones(2, 3)}, r"mask must be a bool tensor of shape \(2, 3\)"),
        ({"mask": torch.ones(2, 4, dtype=torch.bool)}, r"mask must be a bool tensor"),
        ({"weights": torch.ones(2, 4)}, r"weights must have shape \(2, 3\)"),
        ({"agg": "sum"}, r"agg='sum' must be one of"),
        ({"loss_type": "grpo"}, r"loss_type='grpo' must be one of"),
        ({"loss_type": "ppo_clip"}, r"needs logp_old of shape \(2, 3\)"),
        (
            {"loss_type": "ppo_clip", "logp_old": torch.zeros(2, 3), "clip_eps": 1.5},
            r"clip_eps=1.5 must be in \(0, 1\)",
        ),
        ({"logp_old": torch.zeros(2, 4)}, r"logp_old must have shape \(2, 3\) or be None"),
        ({"advantages": torch.tensor([1.0, float("nan")])}, r"advantages must be finite"),
        ({"weights": -torch.ones(2, 3)}, r"weights must be finite and ≥ 0"),
        ({"logp": torch.full((2, 3), float("nan"))}, r"logp must be finite at kept"),
    ],
)
def test_policy_loss_bad_input(kwargs: dict, match: str) -> None:
    args = {
        "logp": -torch.rand(2, 3),
        "advantages": torch.ones(2),
        "mask": torch.ones(2, 3, dtype=torch.bool),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        policy_loss(args.pop("logp"), args.pop("advantages"), args.pop("mask"), **args)
