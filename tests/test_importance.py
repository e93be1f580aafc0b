"""Tests for workbench.importance: every mode against a naive per-element loop, invariants, stats, trust region."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.importance import (
    IS_METRIC_DOCS,
    IS_MODES,
    MODE_DEFAULT_BOUNDS,
    ISConfig,
    importance_weights,
    resolve_bounds,
)


def _batch(b: int = 6, t: int = 7, sigma: float = 0.4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random log-probs, a mismatch of scale sigma and a ragged right-padded mask.

    Row 0 has no valid token; row 1's first token has ratio e^-12 < 1e-4 (a veto case).
    """
    g = torch.Generator().manual_seed(seed)
    logp_train = -torch.rand(b, t, generator=g) * 4.0
    logp_infer = logp_train + sigma * torch.randn(b, t, generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = 0
    logp_infer[1, 0] = logp_train[1, 0] + 12.0
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return logp_train, logp_infer, mask


def _reference(lt, li, mask, mode, lo, hi, veto, log_clamp=20.0):
    """Naive per-element implementation straight from the THEORY.md table (python floats, explicit loops)."""
    b, t = mask.shape
    weights = [[0.0] * t for _ in range(b)]
    keep = [[False] * t for _ in range(b)]
    seq_keep = [True] * b
    for i in range(b):
        idx = [j for j in range(t) if mask[i, j]]
        logs = [float(lt[i, j]) - float(li[i, j]) for j in idx]
        vetoed = mode != "none" and veto is not None and any(x < math.log(veto) for x in logs)
        if mode in ("none", "token_tis", "token_mis"):
            seq_keep[i] = not vetoed
            for j, x in zip(idx, logs):
                r = math.exp(max(-log_clamp, min(log_clamp, x)))
                if mode == "none":
                    w, ok = 1.0, True
                elif mode == "token_tis":
                    w, ok = min(r, hi), True
                else:
                    ok = math.log(lo) <= x <= math.log(hi)
                    w = r if ok else 0.0
                if ok and not vetoed:
                    weights[i][j], keep[i][j] = w, True
            continue
        s = sum(logs)
        if mode == "geo_mask":
            g = s / len(idx) if idx else 0.0
            ok, w = (math.log(lo) <= g <= math.log(hi)) if idx else True, 1.0
        else:
            r = math.exp(max(-log_clamp, min(log_clamp, s)))
            if mode == "seq_is":
                ok, w = True, r
            elif mode == "seq_tis":
                ok, w = True, min(r, hi)
            else:
                ok = (math.log(lo) <= s <= math.log(hi)) if idx else True
                w = r
        seq_keep[i] = ok and not vetoed
        for j in idx:
            if seq_keep[i]:
                weights[i][j], keep[i][j] = w, True
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(keep), torch.tensor(seq_keep)


# ------------------------------------------------------------------------------------ against the reference
@pytest.mark.parametrize("mode", IS_MODES)
@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
def test_modes_match_naive_reference(mode: str, sigma: float) -> None:
    lt, li, mask = _batch(b=8, t=9, sigma=sigma, seed=int(sigma * 100))
    lo, hi = resolve_bounds(mode)
    if mode == "geo_mask":
        lo, hi = 0.8, 1.25  # the default ±0.1% window would mask everything at these sigmas
    res = importance_weights(lt, li, mask, mode, lo=lo, hi=hi)
    ref_w, ref_keep, ref_seq_keep = _reference(lt, li, mask, mode, lo, hi, veto=1e-4)
    torch.testing.assert_close(res.weights.double(), ref_w, rtol=1e-5, atol=1e-6)
    assert torch.equal(res.keep, ref_keep)
    assert torch.equal(res.seq_keep, ref_seq_keep)
    assert res.weights.dtype == torch.float32
    assert res.keep.shape == mask.shape and res.seq_keep.shape == (mask.shape[0],)


def test_reference_exercises_truncation_masking_and_veto() -> None:
    """Guard against a vacuous reference comparison: the test batch must trigger every mechanism."""
    lt, li, mask = _batch(b=8, t=9, sigma=3.0, seed=300)
    assert importance_weights(lt, li, mask, "token_tis").stats["is/frac_truncated"] > 0
    assert importance_weights(lt, li, mask, "token_mis").stats["is/frac_masked"] > 0
    assert importance_weights(lt, li, mask, "seq_tis").stats["is/frac_vetoed"] > 0


# ----------------------------------------------------------------------------------------------- invariants
@settings(max_examples=60, deadline=None)
@given(
    mode=st.sampled_from(IS_MODES),
    b=st.integers(1, 5),
    t=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.0, 30.0),
)
def test_identical_logprobs_give_weights_exactly_one(
    mode: str, b: int, t: int, seed: int, scale: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g) * scale
    mask = torch.rand(b, t, generator=g) < 0.7
    res = importance_weights(logp, logp.clone(), mask, mode)
    assert torch.equal(res.weights, mask.float())  # exactly 1 on valid tokens, exactly 0 elsewhere
    assert torch.equal(res.keep, mask)
    assert bool(res.seq_keep.all())
    assert res.stats["is/frac_truncated"] == res.stats["is/frac_masked"] == res.stats["is/frac_vetoed"] == 0.0
    if mask.any():
        assert res.stats["is/weight_mean"] == res.stats["is/weight_ess"] == 1.0
        assert res.stats["is/token_ratio_min"] == res.stats["is/token_ratio_max"] == 1.0


@pytest.mark.parametrize("mode", IS_MODES)
def test_padding_values_never_matter(mode: str) -> None:
    lt, li, mask = _batch(seed=1)
    clean = importance_weights(lt, li, mask, mode, lo=0.5 if mode == "geo_mask" else None)
    dirty_t, dirty_i = lt.clone(), li.clone()
    pad = ~mask
    dirty_t[pad] = float("nan")
    dirty_i[pad] = float("inf")
    dirty_i[pad.nonzero()[::2].unbind(1)] = float("-inf")
    dirty = importance_weights(dirty_t, dirty_i, mask, mode, lo=0.5 if mode == "geo_mask" else None)
    assert torch.equal(clean.weights, dirty.weights)
    assert torch.equal(clean.keep, dirty.keep)
    assert torch.equal(clean.seq_keep, dirty.seq_keep)
    assert clean.stats == dirty.stats
    assert all(math.isfinite(v) for v in dirty.stats.values())


def test_weights_are_detached_and_float32() -> None:
    lt, li, mask = _batch()
    lt = lt.to(torch.bfloat16).requires_grad_(True)
    for mode in IS_MODES:
        res = importance_weights(lt, li, mask, mode)
        assert not res.weights.requires_grad and res.weights.grad_fn is None
        assert res.weights.dtype == torch.float32


def test_log_clamp_bounds_the_weights_and_is_counted() -> None:
    lt = torch.zeros(2, 3)
    li = torch.full((2, 3), -10.0)  # each token ratio e^10, sequence ratio e^30
    mask = torch.ones(2, 3, dtype=torch.bool)
    res = importance_weights(lt, li, mask, "seq_is", log_clamp=20.0)
    assert torch.allclose(res.weights, torch.full((2, 3), math.exp(20.0)))
    assert res.stats["is/frac_clamped"] == 1.0
    assert math.isfinite(res.stats["is/weight_ess"]) and res.stats["is/seq_ratio_max"] == pytest.approx(
        math.exp(20)
    )
    tok = importance_weights(lt, li, mask, "token_tis", hi=5.0, log_clamp=5.0)
    assert tok.stats["is/frac_clamped"] == 1.0 and tok.stats["is/frac_truncated"] == 1.0
    assert torch.all(tok.weights == 5.0)


def test_huge_sequence_ratio_is_truncated_in_log_space() -> None:
    """Σ log r = +60 must not overflow: seq_tis caps at hi, seq_mis masks, the stats stay finite."""
    lt = torch.zeros(1, 30)
    li = torch.full((1, 30), -2.0)
    mask = torch.ones(1, 30, dtype=torch.bool)
    tis = importance_weights(lt, li, mask, "seq_tis", hi=3.0)
    assert torch.all(tis.weights == 3.0) and tis.stats["is/frac_truncated"] == 1.0
    mis = importance_weights(lt, li, mask, "seq_mis")
    assert not mis.keep.any() and not mis.seq_keep.any() and mis.stats["is/frac_masked"] == 1.0
    assert all(math.isfinite(v) for v in {**tis.stats, **mis.stats}.values())


# ----------------------------------------------------------------------------------------------------- veto
def test_veto_drops_the_whole_sequence() -> None:
    lt = torch.full((3, 4), -1.0)
    li = lt.clone()
    li[1, 2] = lt[1, 2] + 10.0  # r = e^-10 ≈ 4.5e-5 < 1e-4
    li[2, 1] = lt[2, 1] + 8.0  # r = e^-8 ≈ 3.4e-4 > 1e-4: survives
    mask = torch.ones(3, 4, dtype=torch.bool)
    res = importance_weights(lt, li, mask, "token_tis")
    assert res.seq_keep.tolist() == [True, False, True]
    assert not res.keep[1].any() and torch.all(res.weights[1] == 0)
    assert res.stats["is/frac_vetoed"] == pytest.approx(1 / 3)
    assert res.stats["is/frac_seqs_kept"] == pytest.approx(2 / 3)
    assert res.stats["is/frac_tokens_kept"] == pytest.approx(8 / 12)
    assert importance_weights(lt, li, mask, "token_tis", veto=None).seq_keep.all()
    assert importance_weights(lt, li, mask, "none").seq_keep.all()  # the naive estimator never vetoes
    assert importance_weights(lt, li, mask, "token_tis", veto=1e-3).seq_keep.tolist() == [True, False, False]


def test_veto_ignores_padding_tokens() -> None:
    lt = torch.full((1, 3), -1.0)
    li = lt.clone()
    li[0, 2] = 100.0  # catastrophic ratio, but on a padding position
    mask = torch.tensor([[True, True, False]])
    assert importance_weights(lt, li, mask, "seq_tis").seq_keep.item()


# ---------------------------------------------------------------------------------------------------- stats
def test_stats_by_hand() -> None:
    # token ratios: row 0: [e^1, 1, e^-1]; row 1: [1, 1, pad]
    lt = torch.tensor([[0.0, -1.0, -2.0], [-1.0, -1.0, 0.0]])
    li = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    res = importance_weights(lt, li, mask, "token_tis", hi=2.0)
    e = math.e
    r = [e, 1.0, 1 / e, 1.0, 1.0]
    s = res.stats
    assert s["is/tokens"] == 5.0 and s["is/seqs"] == 2.0
    assert s["is/token_ratio_mean"] == pytest.approx(sum(r) / 5)
    assert s["is/token_ratio_max"] == pytest.approx(e) and s["is/token_ratio_min"] == pytest.approx(1 / e)
    assert s["is/token_ess"] == pytest.approx(sum(r) ** 2 / (5 * sum(x * x for x in r)))
    w = [2.0, 1.0, 1 / e, 1.0, 1.0]
    assert s["is/weight_mean"] == pytest.approx(sum(w) / 5) and s["is/weight_max"] == pytest.approx(2.0)
    assert s["is/weight_ess"] == pytest.approx(sum(w) ** 2 / (5 * sum(x * x for x in w)))
    assert s["is/frac_truncated"] == pytest.approx(1 / 5)
    # sequence-level before-stats: r(y) = [e^0, e^0] → 1; geometric too
    assert s["is/seq_ratio_mean"] == pytest.approx(1.0) and s["is/seq_ess"] == pytest.approx(1.0)
    assert s["is/geo_ratio_max"] == pytest.approx(1.0)
    # after correction at sequence level: seq_mis keeps both (r(y) = 1), weight stats are per sequence
    seq = importance_weights(lt, li, mask, "seq_mis").stats
    assert seq["is/weight_mean"] == pytest.approx(1.0) and seq["is/frac_masked"] == 0.0


@pytest.mark.parametrize("mode", ["token_mis", "seq_mis", "token_tis"])
def test_after_stats_cover_exactly_the_kept_units(mode: str) -> None:
    """Masked/vetoed units must not enter the after-correction stats as zero weights."""
    lt, li, mask = _batch(b=16, t=6, sigma=1.0, seed=11)
    res = importance_weights(lt, li, mask, mode)
    assert res.stats["is/frac_masked"] > 0 or res.stats["is/frac_vetoed"] > 0
    if mode.startswith("token"):
        kept = res.weights[res.keep].double()
    else:
        kept = res.weights[:, 0][res.seq_keep & mask.any(-1)].double()
    assert res.stats["is/weight_min"] == pytest.approx(float(kept.min())) and res.stats["is/weight_min"] > 0
    assert res.stats["is/weight_mean"] == pytest.approx(float(kept.mean()))
    assert res.stats["is/weight_ess"] == pytest.approx(
        float(kept.sum() ** 2 / (kept.numel() * (kept**2).sum()))
    )


def test_stats_with_no_valid_tokens_are_finite_zeros() -> None:
    lt, li, _ = _batch()
    mask = torch.zeros_like(lt, dtype=torch.bool)
    for mode in IS_MODES:
        res = importance_weights(lt, li, mask, mode)
        assert not res.keep.any() and torch.all(res.weights == 0)
        assert res.stats["is/tokens"] == 0.0 and res.stats["is/weight_ess"] == 0.0
        assert all(math.isfinite(v) for v in res.stats.values())


@pytest.mark.parametrize("mode", IS_MODES)
def test_metric_docs_match_emitted_keys(mode: str) -> None:
    lt, li, mask = _batch()
    res = importance_weights(lt, li, mask, mode)
    assert set(res.stats) == set(IS_METRIC_DOCS)
    assert all(k.startswith("is/") and doc for k, doc in IS_METRIC_DOCS.items())


# ------------------------------------------------------------------------------------- config and bounds
def test_default_bounds_and_reciprocal_rule() -> None:
    assert resolve_bounds("token_tis") == (None, 2.0)
    assert resolve_bounds("seq_mis") == (0.5, 2.0)
    assert resolve_bounds("geo_mask") == (0.999, 1.001)
    assert resolve_bounds("token_mis", hi=4.0) == (0.25, 4.0)
    assert resolve_bounds("seq_mis", lo=0.8) == (0.8, 1.25)
    assert resolve_bounds("seq_is") == (None, None)
    assert set(MODE_DEFAULT_BOUNDS) == set(IS_MODES)
    assert ISConfig(mode="geo_mask", hi=1.01).bounds == (1 / 1.01, 1.01)


def test_config_apply_equals_function_and_is_frozen() -> None:
    lt, li, mask = _batch(sigma=1.0)
    cfg = ISConfig(mode="token_mis", lo=0.7, hi=1.6, veto=1e-3)
    a = cfg.apply(lt, li, mask)
    b = importance_weights(lt, li, mask, "token_mis", lo=0.7, hi=1.6, veto=1e-3)
    assert torch.equal(a.weights, b.weights) and a.stats == b.stats
    with pytest.raises(AttributeError):
        cfg.mode = "none"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "tis"}, r"mode='tis'.*choose one of"),
        ({"mode": "token_mis", "lo": 1.5, "hi": 1.2}, r"lo=1.5 > hi=1.2"),
        ({"mode": "geo_mask", "lo": 0.0}, r"lo=0.0 .*> 0"),  # token_mis / seq_mis accept lo=0 (TRL)
        ({"mode": "seq_mis", "lo": -1.0, "hi": 2.0}, r"lo=-1.0"),
        ({"mode": "seq_mis", "lo": 1.1, "hi": 2.0}, r"must contain 1"),
        ({"mode": "token_tis", "hi": 0.5}, r"hi=0.5 .*\[1, inf\)"),
        ({"mode": "token_tis", "hi": float("inf")}, r"hi=inf"),
        ({"mode": "token_tis", "lo": 1.5}, r"lo=1.5 .*lower clip.*\(0, 1\]"),
        ({"mode": "seq_is", "hi": 3.0}, r"takes no bounds.*seq_tis"),
        ({"mode": "none", "lo": 0.5}, r"takes no bounds"),
        ({"mode": "seq_tis", "veto": 1.0}, r"veto=1.0 must be in \(0, 1\)"),
        ({"mode": "seq_tis", "veto": 0.0}, r"veto=0.0"),
        ({"mode": "seq_tis", "veto": True}, r"veto=True"),
        ({"mode": "seq_tis", "log_clamp": 0.0}, r"log_clamp=0.0 must be"),
    ],
)
def test_bad_config_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ISConfig(**kwargs)
    mode = kwargs.pop("mode")
    with pytest.raises(ValueError, match=match):
        importance_weights(
            torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), mode, **kwargs
        )


def test_bad_tensors_raise() -> None:
    lt, li, mask = _batch()
    with pytest.raises(ValueError, match=r"shapes must match.*logp_infer \(6, 6\)"):
        importance_weights(lt, li[:, :6], mask)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor.*float32"):
        importance_weights(lt, li, mask.float())
    with pytest.raises(ValueError, match=r"logp_train must have shape \[B, T\]"):
        importance_weights(lt[0], li[0], mask[0])
    with pytest.raises(ValueError, match=r"logp_infer must be a floating-point"):
        importance_weights(lt, li.long(), mask)
    bad = li.clone()
    r, c = mask.nonzero()[3].tolist()
    bad[r, c] = float("nan")
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\) at valid"):
        importance_weights(lt, bad, mask, "token_tis")


# ------------------------------------------------------------------------------------------ trust region
def _naive_trust_region(lt, li, mask, threshold: float, div: str, clamp: float = 20.0) -> list[bool]:
    """Per sequence: reject iff some valid token has divergence > threshold (one Python loop, verl's formula)."""
    out = []
    for i in range(lt.shape[0]):
        worst = -math.inf
        for j in range(lt.shape[1]):
            if mask[i, j]:
                u = max(-clamp, min(clamp, float(lt[i, j]) - float(li[i, j])))
                worst = max(worst, 0.5 * u * u if div == "k2" else math.exp(u) - 1.0 - u)
        out.append(worst > threshold)
    return out


@pytest.mark.parametrize("div", ["k2", "k3"])
@pytest.mark.parametrize("mode", ["none", "token_mis", "seq_tis", "geo_mask"])
def test_trust_region_matches_naive_reference(mode: str, div: str) -> None:
    lt, li, mask = _batch(b=24, t=7, sigma=0.5, seed=11)
    threshold = 0.3
    res = importance_weights(lt, li, mask, mode, veto=None, trust_region=threshold, trust_region_div=div)
    base = importance_weights(lt, li, mask, mode, veto=None)
    rejected = torch.tensor(_naive_trust_region(lt, li, mask, threshold, div))
    has = mask.any(-1)
    assert 0 < int((rejected & has).sum()) < int(has.sum())  # the rule bites, but not everywhere
    assert torch.equal(res.seq_keep, base.seq_keep & ~rejected)
    assert torch.equal(res.keep, base.keep & ~rejected[:, None])
    assert res.stats["is/frac_trust_region"] == pytest.approx(float((rejected & has).sum() / has.sum()))
    assert base.stats["is/frac_trust_region"] == 0.0


def test_trust_region_is_two_sided_unlike_the_veto() -> None:
    """A token the engine under-estimates (r = e^3) passes the veto but leaves the trust region."""
    lt = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]])
    li = torch.tensor([[-4.0, -2.0], [-1.0, -2.0]])  # row 0: u = +3 on its first token
    mask = torch.ones(2, 2, dtype=torch.bool)
    res = importance_weights(lt, li, mask, "token_tis", veto=1e-4, trust_region=1.0)
    assert res.seq_keep.tolist() == [False, True]
    assert res.stats["is/frac_vetoed"] == 0.0 and res.stats["is/frac_trust_region"] == 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"trust_region": 0.0}, r"trust_region=0.0"),
        ({"trust_region": float("nan")}, r"trust_region=nan"),
        ({"trust_region": 0.5, "trust_region_div": "k1"}, r"trust_region_div='k1'"),
    ],
)
def test_bad_trust_region_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ISConfig("token_tis", **kwargs)
