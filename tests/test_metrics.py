"""Tests for workbench.metrics: every estimator against a naive numpy/loop reference, known cases,
hand-computed examples, padding invariance (NaN/inf in padding), documented keys and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workbench import dvp
from workbench.metrics import (
    DEFAULT_P_EDGES,
    DVP_METRIC_DOCS,
    MISMATCH_METRIC_DOCS,
    TAIL_METRIC_DOCS,
    _student_t_cdf,
    _student_t_quantile,
    boundary_tokens,
    delta_by_prob_bin,
    dvp_metrics,
    mismatch_metrics,
    safe_set_overlap,
    sampled_tail_delta,
    tail_draw_metrics,
)

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------------
# data and naive references


def make_batch(
    b: int, t: int, *, seed: int, sigma: float = 0.3, dtype: torch.dtype = torch.float32, pad: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (logp_train, logp_infer, mask) with ragged lengths, one empty row, and `pad` in padding."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, 50, generator=g) * 3.0
    tokens = torch.randint(0, 50, (b, t), generator=g)
    lt = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)  # (B, T), tail included
    li = lt + sigma * torch.randn(b, t, generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = 0  # a row with no valid token must not break the sequence metrics
    mask = torch.arange(t)[None, :] < lengths[:, None]  # (B, T)
    lt = torch.where(mask, lt, pad).to(dtype)
    li = torch.where(mask, li, pad).to(dtype)
    return lt, li, mask


def ref_mismatch(
    lt: torch.Tensor, li: torch.Tensor, mask: torch.Tensor, clamp: float = 20.0
) -> dict[str, float]:
    """Loop-and-numpy version of every mismatch_metrics estimator, straight from the definitions."""
    lt_np, li_np, m = lt.double().numpy(), li.double().numpy(), mask.numpy()
    us, seq_log_r, seq_log_ppl_gap = [], [], []
    for b in range(m.shape[0]):
        row = [lt_np[b, t] - li_np[b, t] for t in range(m.shape[1]) if m[b, t]]
        us += row
        if row:
            seq_log_r.append(sum(row))
            log_ppl_pi = -np.mean([lt_np[b, t] for t in range(m.shape[1]) if m[b, t]])
            log_ppl_mu = -np.mean([li_np[b, t] for t in range(m.shape[1]) if m[b, t]])
            seq_log_ppl_gap.append(log_ppl_pi - log_ppl_mu)
    u = np.array(us)
    r = np.exp(np.clip(u, -clamp, clamp))
    w = r / r.mean()
    return {
        "mismatch/k1": float(np.mean(-u)),
        "mismatch/k3": float(np.mean(np.exp(u) - u - 1)),
        "mismatch/chi2_token": float(np.mean(r**2) - 1),
        "mismatch/chi2_seq": float(np.mean(np.exp(2 * np.clip(seq_log_r, -clamp, clamp))) - 1),
        "mismatch/ess": float(1.0 / np.mean(w**2)),
        "mismatch/ppl_ratio": float(np.exp(np.mean(seq_log_ppl_gap))),
        "mismatch/ppl_ratio_arith": float(np.mean(np.exp(seq_log_ppl_gap))),
        "mismatch/max_abs_delta": float(np.max(np.abs(u))),
        "mismatch/mean_abs_delta": float(np.mean(np.abs(u))),
    }


def assert_dicts_close(
    got: dict[str, float], want: dict[str, float], rtol: float = 1e-9, atol: float = 1e-12
):
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)


def naive_safe(z: torch.Tensor, rho: float) -> torch.Tensor:
    """THEORY.md's rule, written out: a ∈ V_S ⇔ z_a ≥ max_b z_b + log ρ (float64)."""
    z = z.double()
    return z >= z.max(-1, keepdim=True).values + math.log(rho)


def same_with_nan(a: dict[str, float], b: dict[str, float]) -> bool:
    """Exact equality of two metric dicts where nan == nan."""
    return a.keys() == b.keys() and all((math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a)


# ----------------------------------------------------------------------------------------------------
# mismatch_metrics


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("b", "t", "seed"), [(1, 1, 0), (4, 7, 1), (16, 33, 2), (3, 128, 3)])
def test_mismatch_metrics_match_reference(dtype: torch.dtype, b: int, t: int, seed: int) -> None:
    lt, li, mask = make_batch(b + 1, t, seed=seed, dtype=dtype)
    assert_dicts_close(mismatch_metrics(lt, li, mask), ref_mismatch(lt, li, mask), rtol=1e-9)


def test_identical_logprobs_give_no_mismatch() -> None:
    lt, _, mask = make_batch(8, 20, seed=4)
    m = mismatch_metrics(lt, lt.clone(), mask)
    for k in ("k1", "k3", "chi2_token", "chi2_seq", "max_abs_delta", "mean_abs_delta"):
        assert m[f"mismatch/{k}"] == 0.0, k
    assert m["mismatch/ess"] == pytest.approx(1.0, abs=1e-12)
    assert m["mismatch/ppl_ratio"] == 1.0


def test_mismatch_metrics_hand_computed() -> None:
    # Row 0: π = (1/2, 1/4), μ = (1/4, 1/2) → u = (ln2, −ln2), r = (2, 1/2), log r(y) = 0.
    # Row 1: one valid token π = 1/2, μ = 1/4 → u = ln2, r = 2, log r(y) = ln2; padding is NaN / inf.
    nan, inf = float("nan"), float("inf")
    lt = torch.tensor([[math.log(0.5), math.log(0.25)], [math.log(0.5), nan]], dtype=torch.float64)
    li = torch.tensor([[math.log(0.25), math.log(0.5)], [math.log(0.25), inf]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False]])
    m = mismatch_metrics(lt, li, mask)
    want = {
        "mismatch/k1": -LN2 / 3,  # mean Δ = (−ln2 + ln2 − ln2) / 3
        "mismatch/k3": (1.5 - LN2) / 3,  # ((2 − ln2 − 1) + (1/2 + ln2 − 1) + (2 − ln2 − 1)) / 3
        "mismatch/chi2_token": 1.75,  # (4 + 1/4 + 4) / 3 − 1
        "mismatch/chi2_seq": 1.5,  # (1² + 2²) / 2 − 1
        "mismatch/ess": 9 / 11,  # (mean r)² / mean r² = 1.5² / 2.75
        "mismatch/ppl_ratio": 2**-0.5,  # exp(mean(0, −ln2))
        "mismatch/ppl_ratio_arith": 0.75,  # mean(e^0, e^−ln2)
        "mismatch/max_abs_delta": LN2,
        "mismatch/mean_abs_delta": LN2,
    }
    assert_dicts_close(m, want, rtol=1e-12)


def test_k1_can_be_negative_and_k3_is_not() -> None:
    lt = torch.log(torch.tensor([[0.5, 0.5]]))
    li = torch.log(torch.tensor([[0.4, 0.45]]))  # engine less sure on both: Δ < 0
    m = mismatch_metrics(lt, li, torch.ones(1, 2, dtype=torch.bool))
    assert m["mismatch/k1"] < 0 < m["mismatch/k3"]


def test_chi2_seq_is_clamped_in_log_space() -> None:
    # One sequence of 200 tokens with u = +1 each: log r(y) = 200, e^400 overflows a float32 exp.
    lt = torch.zeros(2, 200)
    li = torch.full((2, 200), -1.0)
    mask = torch.ones(2, 200, dtype=torch.bool)
    mask[1] = False
    mask[1, 0] = True  # second sequence: log r(y) = 1
    m = mismatch_metrics(lt, li, mask, log_clamp=20.0)
    assert m["mismatch/chi2_seq"] == pytest.approx((math.exp(40) + math.exp(2)) / 2 - 1, rel=1e-12)
    assert m["mismatch/chi2_token"] == pytest.approx(math.exp(2) - 1, rel=1e-12)
    assert math.isfinite(mismatch_metrics(lt, li, mask, log_clamp=300.0)["mismatch/chi2_seq"])
    assert_dicts_close(mismatch_metrics(lt, li, mask, log_clamp=5.0), ref_mismatch(lt, li, mask, clamp=5.0))


def test_ess_is_a_fraction_and_drops_with_mismatch() -> None:
    ess = []
    for sigma in (0.01, 0.3, 1.0, 3.0):
        lt, li, mask = make_batch(16, 32, seed=5, sigma=sigma)
        m = mismatch_metrics(lt, li, mask)
        assert 0.0 < m["mismatch/ess"] <= 1.0
        assert m["mismatch/k3"] >= 0.0
        ess.append(m["mismatch/ess"])
    assert ess == sorted(ess, reverse=True) and ess[0] > 0.99 and ess[-1] < 0.5


def test_estimators_agree_with_exact_divergences() -> None:
    """Sample tokens from μ = softmax(z + δ): k1 and k3 estimate KL(μ‖π), chi2_token estimates χ²(π‖μ)."""
    g = torch.Generator().manual_seed(6)
    n, v = 40_000, 8
    z = torch.randn(n, v, generator=g)  # (N, V)
    log_pi = torch.log_softmax(z, -1)
    log_mu = torch.log_softmax(z + 0.3 * torch.randn(n, v, generator=g), -1)
    tok = torch.multinomial(log_mu.exp(), 1, generator=g)  # (N, 1) sampled from μ
    lt, li = log_pi.gather(-1, tok).T, log_mu.gather(-1, tok).T  # (1, N): one long "sequence"
    m = mismatch_metrics(lt, li, torch.ones_like(lt, dtype=torch.bool))
    kl = (log_mu.exp() * (log_mu - log_pi)).sum(-1).mean().item()  # E_s KL(μ‖π)
    chi2 = ((2 * log_pi - log_mu).exp().sum(-1) - 1).mean().item()  # E_s χ²(π‖μ)
    assert m["mismatch/k1"] == pytest.approx(kl, rel=0.1)
    assert m["mismatch/k3"] == pytest.approx(kl, rel=0.05)
    assert m["mismatch/chi2_token"] == pytest.approx(chi2, rel=0.1)


def test_padding_values_never_matter() -> None:
    for pad in (float("nan"), float("inf"), -float("inf"), 1e30):
        clean = make_batch(6, 15, seed=7)
        dirty = make_batch(6, 15, seed=7, pad=pad)
        assert same_with_nan(mismatch_metrics(*clean), mismatch_metrics(*dirty))
        assert same_with_nan(sampled_tail_delta(*clean, p_max=0.05), sampled_tail_delta(*dirty, p_max=0.05))
        for a, b in zip(delta_by_prob_bin(*clean), delta_by_prob_bin(*dirty)):
            assert same_with_nan(a, b)
        assert all(math.isfinite(v) for v in mismatch_metrics(*dirty).values())


def test_empty_mask_gives_nan_not_zero() -> None:
    lt, li, mask = make_batch(3, 4, seed=8)
    empty = torch.zeros_like(mask)
    assert all(math.isnan(v) for v in mismatch_metrics(lt, li, empty).values())
    tail = sampled_tail_delta(lt, li, empty)
    assert tail["mismatch/lowp_count"] == 0.0 and math.isnan(tail["mismatch/lowp_delta_mean"])
    assert all(b["count"] == 0 and math.isnan(b["mean_delta"]) for b in delta_by_prob_bin(lt, li, empty))


# ----------------------------------------------------------------------------------------------------
# delta_by_prob_bin


def ref_bins(lt: torch.Tensor, li: torch.Tensor, mask: torch.Tensor, edges) -> list[dict[str, float]]:
    rows = []
    lt_l, li_l, m_l = lt.double().flatten().tolist(), li.double().flatten().tolist(), mask.flatten().tolist()
    for i in range(len(edges) - 1):
        lo, hi = edges[i], edges[i + 1]
        last = i == len(edges) - 2
        ds = [
            b - a
            for a, b, ok in zip(lt_l, li_l, m_l)
            if ok and lo <= math.exp(a) and (math.exp(a) < hi or (last and math.exp(a) == hi))
        ]
        n = len(ds)
        rows.append(
            {
                "lo": lo,
                "hi": hi,
                "count": float(n),
                "mean_delta": sum(ds) / n if n else float("nan"),
                "mean_abs_delta": sum(abs(d) for d in ds) / n if n else float("nan"),
                "frac_positive": sum(d > 0 for d in ds) / n if n else float("nan"),
            }
        )
    return rows


@pytest.mark.parametrize("edges", [DEFAULT_P_EDGES, (0.0, 0.5, 1.0), (1e-3, 0.2, 0.7), [0.0, 1.0]])
def test_delta_by_prob_bin_matches_reference(edges) -> None:
    lt, li, mask = make_batch(32, 40, seed=9, sigma=0.5)
    got = delta_by_prob_bin(lt, li, mask, edges=edges)
    want = ref_bins(lt, li, mask, list(edges))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            np.testing.assert_allclose(g[k], w[k], rtol=1e-9, atol=1e-12, err_msg=k)
    if edges[0] == 0.0 and edges[-1] == 1.0:
        assert sum(b["count"] for b in got) == mask.sum().item()  # every valid token is in exactly one bin


def test_delta_by_prob_bin_edges_and_hand_example() -> None:
    # p = 0.5 sits on an inner edge (goes right), p = 1 on the last edge (closed), p = 1e-5 below the first.
    lt = torch.log(torch.tensor([0.5, 1.0, 0.25, 1e-5], dtype=torch.float64))
    li = lt + torch.tensor([0.2, -0.1, -0.4, 3.0], dtype=torch.float64)
    bins = delta_by_prob_bin(lt, li, torch.ones(4, dtype=torch.bool), edges=[1e-3, 0.5, 1.0])
    assert [b["count"] for b in bins] == [1.0, 2.0]
    assert bins[0]["mean_delta"] == pytest.approx(-0.4) and bins[0]["frac_positive"] == 0.0
    assert bins[1]["mean_delta"] == pytest.approx(0.05) and bins[1]["mean_abs_delta"] == pytest.approx(0.15)
    assert bins[1]["frac_positive"] == 0.5


# ----------------------------------------------------------------------------------------------------
# sampled_tail_delta and the t quantile


@pytest.mark.parametrize(
    ("df", "t975"),
    [
        (1, 12.706),
        (2, 4.303),
        (3, 3.182),
        (4, 2.776),
        (5, 2.571),
        (10, 2.228),
        (20, 2.086),
        (30, 2.042),
        (60, 2.000),
        (120, 1.980),
        (1000, 1.962),
        (10**6, 1.960),
    ],
)
def test_t_quantile_matches_table(df: int, t975: float) -> None:
    assert _student_t_quantile(0.975, df) == pytest.approx(t975, abs=6e-4)
    assert _student_t_quantile(0.025, df) == pytest.approx(-t975, abs=6e-4)


@pytest.mark.parametrize("df", [3, 4, 7, 50, 200])
@pytest.mark.parametrize("q", [0.6, 0.9, 0.995, 0.99999])
def test_t_quantile_inverts_exact_cdf(df: int, q: float) -> None:
    assert _student_t_cdf(_student_t_quantile(q, df), df) == pytest.approx(q, abs=1e-10)


def test_t_quantile_is_continuous_where_the_method_switches() -> None:
    # Exact series at df=200 versus Cornish–Fisher at 201: a step there would reveal a wrong expansion.
    exact = [_student_t_cdf(_student_t_quantile(q, 201), 201) for q in (0.9, 0.975, 0.999)]
    assert exact == pytest.approx([0.9, 0.975, 0.999], abs=1e-9)


def test_tail_ci_covers_the_true_mean_95_percent_of_the_time() -> None:
    """Small samples (n = 4): a normal-quantile interval would cover only ~86 %, the t interval 95 %."""
    g = torch.Generator().manual_seed(10)
    hits, trials = 0, 2000
    lt = torch.full((4,), math.log(1e-4))
    ones = torch.ones(4, dtype=torch.bool)
    for _ in range(trials):
        d = 0.5 + torch.randn(4, generator=g, dtype=torch.float64)  # true mean Δ = 0.5
        out = sampled_tail_delta(lt.double(), lt.double() + d, ones)
        hits += out["mismatch/lowp_delta_ci_lo"] <= 0.5 <= out["mismatch/lowp_delta_ci_hi"]
    assert 0.93 <= hits / trials <= 0.97


def test_sampled_tail_delta_matches_reference() -> None:
    lt, li, mask = make_batch(32, 40, seed=11, sigma=0.5)
    out = sampled_tail_delta(lt, li, mask, p_max=1e-2)
    sel = [
        (b - a)
        for a, b, ok in zip(
            lt.double().flatten().tolist(), li.double().flatten().tolist(), mask.flatten().tolist()
        )
        if ok and math.exp(a) < 1e-2
    ]
    n = len(sel)
    assert n > 30
    mean, sd = float(np.mean(sel)), float(np.std(sel, ddof=1))
    half = _student_t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    want = {
        "mismatch/lowp_count": float(n),
        "mismatch/lowp_delta_mean": mean,
        "mismatch/lowp_delta_ci_lo": mean - half,
        "mismatch/lowp_delta_ci_hi": mean + half,
        "mismatch/lowp_frac_positive": sum(d > 0 for d in sel) / n,
    }
    assert_dicts_close(out, want, rtol=1e-9)
    wider = sampled_tail_delta(lt, li, mask, p_max=1e-2, confidence=0.99)
    assert wider["mismatch/lowp_delta_ci_lo"] < out["mismatch/lowp_delta_ci_lo"]


def test_sampled_tail_delta_hand_example() -> None:
    # Two tail tokens with Δ = 0.3 and 0.1: mean 0.2, s = √0.02, t_{0.975,1} = 12.706.
    lt = torch.log(torch.tensor([1e-4, 2e-4, 0.9], dtype=torch.float64))
    li = lt + torch.tensor([0.3, 0.1, -0.5], dtype=torch.float64)
    out = sampled_tail_delta(lt, li, torch.ones(3, dtype=torch.bool))
    half = math.tan(math.pi * 0.475) * math.sqrt(0.02) / math.sqrt(2)
    assert out["mismatch/lowp_count"] == 2.0
    assert out["mismatch/lowp_delta_ci_lo"] == pytest.approx(0.2 - half)
    assert out["mismatch/lowp_delta_ci_hi"] == pytest.approx(0.2 + half)
    one = sampled_tail_delta(lt[:1], li[:1], torch.ones(1, dtype=torch.bool))
    assert one["mismatch/lowp_delta_mean"] == pytest.approx(0.3) and math.isnan(
        one["mismatch/lowp_delta_ci_lo"]
    )


# ----------------------------------------------------------------------------------------------------
# tail draws of a training batch


def ref_tail_draws(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    logp_mp: torch.Tensor,
    logp_infer: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    rho: float,
) -> dict[str, float]:
    """The tail-draw metrics one token at a time, in float64: a draw is in the tail when z_a < max z + log ρ."""
    deltas, full_logps, seqs, pos_adv = [], [], 0, 0
    for i in range(tokens.shape[0]):
        in_row = 0
        for j in range(tokens.shape[1]):
            z, a = logits[i, j].double(), int(tokens[i, j])
            if mask[i, j] and z[a] < z.max() + math.log(rho):
                in_row += 1
                deltas.append(float(logp_infer[i, j]) - float(logp_mp[i, j]))
                full_logps.append(float(torch.log_softmax(z, -1)[a]))
        seqs += in_row > 0
        pos_adv += in_row if advantages[i] > 0 else 0
    return {
        "mismatch/tail_tokens": float(len(deltas)),
        "mismatch/tail_delta_mean": float(np.mean(deltas)) if deltas else 0.0,
        "mismatch/tail_logp_mean": float(np.mean(full_logps)) if full_logps else math.nan,
        "mismatch/tail_seqs": float(seqs),
        "mismatch/tail_pos_adv": float(pos_adv),
    }


@pytest.mark.parametrize("rho", [dvp.DEFAULT_RHO, 1e-3])
@pytest.mark.parametrize("train_rho", [None, 1e-2])
def test_tail_draw_metrics_match_a_loop(rho: float, train_rho: float | None) -> None:
    g = torch.Generator().manual_seed(23)
    logits = torch.randn(12, 9, 40, generator=g) * 6.0  # (N, T, V): wide rows, so e^-13 tails get drawn
    tokens = torch.randint(0, 40, (12, 9), generator=g)
    mask = torch.arange(9)[None, :] < torch.randint(0, 10, (12,), generator=g)[:, None]  # ragged, some empty
    stats = dvp.token_stats(logits, tokens, train_rho)
    logp_infer = torch.where(
        mask, stats.logp + 0.3 * torch.randn(12, 9, generator=g), math.nan
    )  # nan padding
    advantages = torch.randn(12, generator=g)
    got = tail_draw_metrics(stats, logp_infer, mask, advantages, rho=rho)
    want = ref_tail_draws(logits, tokens, stats.logp, logp_infer, mask, advantages, rho)
    assert got["mismatch/tail_tokens"] > 5 and got["mismatch/tail_pos_adv"] > 0
    assert_dicts_close(got, want, rtol=1e-5, atol=1e-5)


def test_tail_draw_metrics_without_a_tail_draw() -> None:
    stats = dvp.token_stats(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))  # uniform rows
    m = tail_draw_metrics(stats, stats.logp, torch.ones(2, 3, dtype=torch.bool), torch.ones(2))
    assert m["mismatch/tail_tokens"] == m["mismatch/tail_seqs"] == m["mismatch/tail_delta_mean"] == 0.0
    assert math.isnan(m["mismatch/tail_logp_mean"])
    hand_made = dvp.TokenStats(
        logp=stats.logp, logz=stats.logz, entropy=stats.entropy, safe_size=stats.safe_size
    )
    with pytest.raises(ValueError, match="full_logp"):
        tail_draw_metrics(hand_made, stats.logp, torch.ones(2, 3, dtype=torch.bool), torch.ones(2))


# ----------------------------------------------------------------------------------------------------
# safe sets: overlap and boundary tokens


def ref_overlap(zt: torch.Tensor, zi: torch.Tensor, rho: float) -> torch.Tensor:
    out = []
    for a, b in zip(zt.reshape(-1, zt.shape[-1]), zi.reshape(-1, zi.shape[-1])):
        s_t = {i for i, ok in enumerate(naive_safe(a, rho).tolist()) if ok}
        s_i = {i for i, ok in enumerate(naive_safe(b, rho).tolist()) if ok}
        out.append(len(s_t & s_i) / len(s_t))
    return torch.tensor(out).reshape(zt.shape[:-1])


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
@pytest.mark.parametrize("rho", [1e-1, 1e-3, math.exp(-13)])
def test_safe_set_overlap_matches_reference(chunk_size: int, rho: float) -> None:
    g = torch.Generator().manual_seed(12)
    zt = torch.randn(3, 5, 40, generator=g) * 4.0  # (B, T, V)
    zi = zt + 1.0 * torch.randn(3, 5, 40, generator=g)
    got = safe_set_overlap(zt, zi, rho, chunk_size=chunk_size)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref_overlap(zt, zi, rho).float())
    assert (got < 1).any()  # the data exercises disagreement, not only the trivial case


def test_safe_set_overlap_known_cases() -> None:
    g = torch.Generator().manual_seed(13)
    z = torch.randn(4, 6, 30, generator=g) * 5.0
    assert torch.equal(safe_set_overlap(z, z.clone(), 1e-3), torch.ones(4, 6))
    assert torch.equal(safe_set_overlap(z, z + 1.0, 1e-3), torch.ones(4, 6))  # a constant shift: same sets
    assert torch.equal(safe_set_overlap(z, torch.randn(4, 6, 30), None), torch.ones(4, 6))
    # Temperature: the rule applies to z / τ.
    zi = z + torch.randn(4, 6, 30, generator=g)
    torch.testing.assert_close(
        safe_set_overlap(z, zi, 1e-2, temperature=0.7), safe_set_overlap(z / 0.7, zi / 0.7, 1e-2)
    )


def test_safe_set_overlap_large_vocab_and_padding_rows() -> None:
    """[N, 150k] in small chunks; NaN rows (padding) leave the other rows alone."""
    g = torch.Generator().manual_seed(14)
    n, v = 6, 150_000
    zt = torch.randn(n, v, generator=g) * 3.0
    zi = zt + 0.5 * torch.randn(n, v, generator=g)
    got = safe_set_overlap(zt, zi, 1e-4, chunk_size=2)
    want = (naive_safe(zt, 1e-4) & naive_safe(zi, 1e-4)).sum(-1) / naive_safe(zt, 1e-4).sum(-1)
    torch.testing.assert_close(got, want.float())
    assert torch.equal(safe_set_overlap(zt, zi, 1e-4), got)  # automatic chunk size
    zt_pad, zi_pad = zt.clone(), zi.clone()
    zt_pad[1], zi_pad[1] = float("nan"), float("inf")
    keep = torch.tensor([True, False, True, True, True, True])
    got_pad = safe_set_overlap(zt_pad, zi_pad, 1e-4, mask=keep, chunk_size=2)
    assert torch.equal(got_pad[keep], got[keep]) and got_pad[1].isnan()
    assert safe_set_overlap(zt_pad, zi_pad, None, mask=keep)[1].isnan()


def test_safe_set_functions_read_non_contiguous_logits() -> None:
    """``logits[:, :-1]`` (the causal-LM slice) cannot be viewed as [N, V]: same answers as a copy."""
    g = torch.Generator().manual_seed(21)
    z = torch.randn(3, 7, 50, generator=g) * 4.0
    zi = z + torch.randn(3, 7, 50, generator=g)
    tok = torch.randint(0, 50, (3, 6), generator=g)
    sl, sli = z[:, :-1], zi[:, :-1]
    assert not sl.is_contiguous()
    for chunk in (1, 4, None):
        torch.testing.assert_close(
            safe_set_overlap(sl, sli, 1e-2, chunk_size=chunk),
            safe_set_overlap(sl.contiguous(), sli.contiguous(), 1e-2),
        )
    assert torch.equal(boundary_tokens(sl, tok, 1e-2), boundary_tokens(sl.contiguous(), tok, 1e-2))


def test_boundary_tokens_matches_reference() -> None:
    g = torch.Generator().manual_seed(15)
    z = torch.randn(4, 9, 60, generator=g) * 4.0  # (B, T, V)
    tok = torch.randint(0, 60, (4, 9), generator=g)
    for rho in (1e-1, 1e-3, math.exp(-13)):
        want = ~naive_safe(z, rho).gather(-1, tok[..., None]).squeeze(-1)
        assert torch.equal(boundary_tokens(z, tok, rho), want)
    assert boundary_tokens(z, tok, 1e-1).any() and not boundary_tokens(z, tok, 1e-1).all()
    # The argmax is always safe; nothing is a boundary token without pruning.
    assert not boundary_tokens(z, z.argmax(-1), 1e-1).any()
    assert not boundary_tokens(z, tok, None).any()
    # Temperature: the rule applies to z / τ.
    assert torch.equal(boundary_tokens(z, tok, 1e-2, temperature=2.0), boundary_tokens(z / 2.0, tok, 1e-2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_boundary_tokens_agree_with_dvp_logprobs(dtype: torch.dtype, temperature: float) -> None:
    """A boundary token is exactly a token that dvp.token_logprobs prunes (log-prob ≈ −MASK_MARGIN)."""
    g = torch.Generator().manual_seed(22)
    z = (torch.randn(5, 12, 80, generator=g) * 5.0).to(dtype)
    tok = torch.randint(0, 80, (5, 12), generator=g)
    rho = 1e-3
    b = boundary_tokens(z, tok, rho, temperature=temperature)
    pruned = dvp.token_logprobs(z, tok, rho, temperature=temperature) < -dvp.MASK_MARGIN / 2
    assert b.any() and torch.equal(b, pruned)


def test_boundary_tokens_hand_example_and_padding() -> None:
    # ρ = 1e-3 → cut at max − 6.91: ids 0, 1 safe, id 2 (gap 20) outside.
    z = torch.tensor([[0.0, -1.0, -20.0], [0.0, -1.0, -20.0], [float("nan")] * 3])
    tok = torch.tensor([1, 2, -100])  # the last position is padding with an invalid id and NaN logits
    mask = torch.tensor([True, True, False])
    assert boundary_tokens(z, tok, 1e-3, mask=mask).tolist() == [False, True, False]


def test_engine_sampled_tokens_outside_trainer_set_are_boundary_tokens() -> None:
    """Sample from the engine's min-p policy; boundary tokens are exactly those not in the trainer's V_S."""
    g = torch.Generator().manual_seed(16)
    zt = torch.randn(500, 30, generator=g) * 3.0
    zi = zt + 2.0 * torch.randn(500, 30, generator=g)
    rho = 0.05
    probs = torch.softmax(zi.masked_fill(~naive_safe(zi, rho), -float("inf")), -1)
    tok = torch.multinomial(probs, 1, generator=g).squeeze(-1)
    b = boundary_tokens(zt, tok, rho)
    assert b.any()
    assert torch.equal(b, ~naive_safe(zt, rho).gather(-1, tok[:, None]).squeeze(-1))
    # A boundary token lies in V'_S \ V_S, so the engine's set is not covered: |V_S ∩ V'_S| / |V'_S| < 1.
    assert (safe_set_overlap(zi, zt, rho)[b] < 1).all()


# ----------------------------------------------------------------------------------------------------
# dvp_metrics


def test_dvp_metrics_match_reference_on_token_stats() -> None:
    g = torch.Generator().manual_seed(17)
    logits = torch.randn(3, 8, 64, generator=g) * 5.0  # (B, T, V)
    tokens = torch.randint(0, 64, (3, 8), generator=g)
    mask = torch.arange(8)[None, :] < torch.tensor([[8], [3], [0]])
    stats = dvp.token_stats(logits, tokens, 1e-3)
    got = dvp_metrics(stats, mask)
    sel = mask.flatten().tolist()
    one_minus_z = [1 - math.exp(x) for x, ok in zip(stats.logz.double().flatten().tolist(), sel) if ok]
    size = [x for x, ok in zip(stats.safe_size.flatten().tolist(), sel) if ok]
    ent = [x for x, ok in zip(stats.entropy.double().flatten().tolist(), sel) if ok]
    logp = [x for x, ok in zip(stats.logp.detach().double().flatten().tolist(), sel) if ok]
    want = {
        "dvp/one_minus_z_mean": float(np.mean(one_minus_z)),
        "dvp/one_minus_z_max": max(one_minus_z),
        "dvp/safe_size_mean": float(np.mean(size)),
        "dvp/safe_size_min": float(min(size)),
        "dvp/entropy_mean": float(np.mean(ent)),
        "dvp/logp_mean": float(np.mean(logp)),
    }
    assert_dicts_close(got, want, rtol=1e-6, atol=1e-9)
    assert got["dvp/one_minus_z_max"] > 0 and got["dvp/safe_size_mean"] < 64


def test_dvp_metrics_without_pruning_and_padding() -> None:
    g = torch.Generator().manual_seed(18)
    logits = torch.randn(2, 5, 32, generator=g)
    tokens = torch.randint(0, 32, (2, 5), generator=g)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    m = dvp_metrics(dvp.token_stats(logits, tokens, None), mask)
    assert m["dvp/one_minus_z_mean"] == 0.0 and m["dvp/one_minus_z_max"] == 0.0
    assert m["dvp/safe_size_mean"] == 32.0 and m["dvp/safe_size_min"] == 32.0
    # NaN / inf in padded positions of every field change nothing.
    st = dvp.token_stats(logits, tokens, 1e-2)
    clean = dvp_metrics(st, mask)
    dirty = dvp.TokenStats(
        logp=st.logp.detach().masked_fill(~mask, float("nan")),
        logz=st.logz.masked_fill(~mask, float("inf")),
        entropy=st.entropy.masked_fill(~mask, float("nan")),
        safe_size=st.safe_size.masked_fill(~mask, -7),
    )
    assert dvp_metrics(dirty, mask) == clean
    assert all(math.isnan(v) for v in dvp_metrics(st, torch.zeros_like(mask)).values())


def test_dvp_metrics_hand_example_keeps_tiny_pruned_mass() -> None:
    # 1 − Z = 1e-9 must survive: 1 − exp(logz) in float32 would round it to 0.
    st = dvp.TokenStats(
        logp=torch.tensor([-0.1, -2.0]),
        logz=torch.log1p(torch.tensor([-1e-9, -0.25], dtype=torch.float64)).float(),
        entropy=torch.tensor([0.5, 1.5]),
        safe_size=torch.tensor([4, 10]),
    )
    m = dvp_metrics(st, torch.tensor([True, False]))
    assert m["dvp/one_minus_z_mean"] == pytest.approx(1e-9, rel=1e-3)
    assert (
        m["dvp/safe_size_mean"] == 4.0
        and m["dvp/entropy_mean"] == 0.5
        and m["dvp/logp_mean"] == pytest.approx(-0.1)
    )


# ----------------------------------------------------------------------------------------------------
# documentation of keys


def test_every_emitted_key_is_documented_and_vice_versa() -> None:
    lt, li, mask = make_batch(4, 6, seed=19)
    emitted_mismatch = set(mismatch_metrics(lt, li, mask)) | set(sampled_tail_delta(lt, li, mask))
    assert emitted_mismatch == set(MISMATCH_METRIC_DOCS)
    logits = torch.randn(4, 6, 16)
    emitted_dvp = set(dvp_metrics(dvp.token_stats(logits, torch.zeros(4, 6, dtype=torch.long), 1e-2), mask))
    assert emitted_dvp == set(DVP_METRIC_DOCS)
    stats = dvp.token_stats(logits, torch.zeros(4, 6, dtype=torch.long))
    assert set(tail_draw_metrics(stats, li, mask, torch.ones(4))) == set(TAIL_METRIC_DOCS)
    for docs, prefix in (
        (MISMATCH_METRIC_DOCS, "mismatch/"),
        (TAIL_METRIC_DOCS, "mismatch/tail_"),
        (DVP_METRIC_DOCS, "dvp/"),
    ):
        for key, line in docs.items():
            assert key.startswith(prefix) and line.strip() and "\n" not in line, key


# ----------------------------------------------------------------------------------------------------
# bad input


def _inputs():
    lt, li, mask = make_batch(2, 4, seed=20)
    return lt, li, mask


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda lt, li, m: mismatch_metrics(lt, li[:, :3], m), r"logp_infer has shape \(2, 3\)"),
        (lambda lt, li, m: mismatch_metrics(lt, li, m.long()), r"mask must be a bool tensor.*int64"),
        (lambda lt, li, m: mismatch_metrics(lt, li, m[:, :2]), r"mask has shape \(2, 2\)"),
        (lambda lt, li, m: mismatch_metrics(lt[0], li[0], m[0]), r"logp_train must be 2-D"),
        (lambda lt, li, m: mismatch_metrics(lt.long(), li, m), r"logp_train must be a floating-point"),
        (lambda lt, li, m: mismatch_metrics(lt.tolist(), li, m), r"logp_train must be a torch.Tensor"),
        (
            lambda lt, li, m: mismatch_metrics(lt, li, m, log_clamp=0.0),
            r"log_clamp=0.0 must be .* \(0, inf\)",
        ),
        (lambda lt, li, m: delta_by_prob_bin(lt, li, m, edges=[0.5]), r"edges=\[0.5\] needs at least 2"),
        (lambda lt, li, m: delta_by_prob_bin(lt, li, m, edges=[0, 0.5, 0.5, 1]), r"strictly increasing"),
        (
            lambda lt, li, m: delta_by_prob_bin(lt, li, m, edges=[0, 2]),
            r"edges=\[0, 2\] must lie in \[0, 1\]",
        ),
        (lambda lt, li, m: delta_by_prob_bin(lt, li, m, edges=[0, float("nan")]), r"must lie in \[0, 1\]"),
        (lambda lt, li, m: delta_by_prob_bin(lt, li, m, edges="abc"), r"edges='abc'"),
        (lambda lt, li, m: delta_by_prob_bin(lt, li, m.float(), edges=[0, 1]), r"mask must be a bool tensor"),
        (lambda lt, li, m: sampled_tail_delta(lt, li, m, p_max=0.0), r"p_max=0.0 must be .* \(0, 1.0\]"),
        (lambda lt, li, m: sampled_tail_delta(lt, li, m, p_max=2.0), r"p_max=2.0"),
        (
            lambda lt, li, m: sampled_tail_delta(lt, li, m, confidence=1.0),
            r"confidence=1.0 must be .* \(0, 1\)",
        ),
        (lambda lt, li, m: sampled_tail_delta(lt, li[:1], m), r"logp_infer has shape"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(*_inputs())


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda z, t: safe_set_overlap(z, z[..., :5], 1e-3), r"logits_infer has shape \(2, 3, 5\)"),
        (lambda z, t: safe_set_overlap(z, z, 0.0), r"rho"),
        (lambda z, t: safe_set_overlap(z, z, 2.0), r"rho"),
        (lambda z, t: safe_set_overlap(z, z, 1e-3, chunk_size=0), r"chunk_size=0 must be a positive int"),
        (lambda z, t: safe_set_overlap(z, z, 1e-3, temperature=0.0), r"temperature=0.0"),
        (lambda z, t: safe_set_overlap(z.long(), z, 1e-3), r"logits_train must be a floating-point"),
        (lambda z, t: boundary_tokens(z, t.float(), 1e-3), r"tokens must be an integer tensor"),
        (lambda z, t: boundary_tokens(z, t[:, :2], 1e-3), r"tokens has shape \(2, 2\)"),
        (lambda z, t: boundary_tokens(z, t + 8, 1e-3), r"id \d+ outside \[0, 8\)"),
        (lambda z, t: boundary_tokens(z, t, 1e-3, mask=torch.ones(2, 3)), r"mask must be a bool tensor"),
        (lambda z, t: boundary_tokens(z, t, -1.0), r"rho"),
    ],
)
def test_bad_safe_set_input_is_rejected(call, match: str) -> None:
    z = torch.randn(2, 3, 8)
    t = torch.randint(0, 8, (2, 3))
    with pytest.raises(ValueError, match=match):
        call(z, t)


def test_dvp_metrics_rejects_bad_input() -> None:
    st = dvp.token_stats(torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.long), 1e-2)
    with pytest.raises(ValueError, match=r"mask has shape \(3, 2\)"):
        dvp_metrics(st, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor"):
        dvp_metrics(st, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"stats.entropy has shape"):
        dvp_metrics(
            dvp.TokenStats(st.logp, st.logz, st.entropy[:, :1], st.safe_size),
            torch.ones(2, 3, dtype=torch.bool),
        )
