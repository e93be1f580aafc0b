"""Perturbation models: each does what its docstring says it mimics, and specs parse (or fail) clearly."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from workbench.engines.perturbations import (
    Compose,
    GaussianLogitNoise,
    KVCacheQuant,
    LogitRounding,
    Perturbation,
    ProbabilityFloor,
    TailInflation,
    kv_transform_of,
    make_perturbation,
    round_to_format,
)


def _logits(rows: int = 32, vocab: int = 4096, scale: float = 4.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale  # (N, V)


# ----------------------------------------------------------------------------- Gaussian noise
@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0])
def test_gaussian_noise_has_the_right_std_and_zero_mean(sigma: float) -> None:
    z = _logits()
    out = GaussianLogitNoise(sigma)(z, torch.Generator().manual_seed(1))
    noise = (out - z).double()
    assert noise.std().item() == pytest.approx(sigma, rel=0.01)
    assert abs(noise.mean().item()) < 4 * sigma / math.sqrt(noise.numel())
    # Independent across entries: neighbouring entries are uncorrelated.
    corr = torch.corrcoef(torch.stack([noise[:, :-1].flatten(), noise[:, 1:].flatten()]))[0, 1]
    assert abs(corr.item()) < 0.02


def test_gaussian_noise_is_reproducible_from_the_generator_and_pure() -> None:
    z = _logits(4, 64)
    before = z.clone()
    p = GaussianLogitNoise(0.5)
    a = p(z, torch.Generator().manual_seed(7))
    b = p(z, torch.Generator().manual_seed(7))
    c = p(z, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(z, before)  # never in place
    assert torch.equal(GaussianLogitNoise(0.0)(z), z)


# ----------------------------------------------------------------------------- rounding
def test_bf16_rounding_equals_torch_bf16_rounding() -> None:
    z = _logits(scale=10.0)
    assert torch.equal(LogitRounding("bf16")(z), z.to(torch.bfloat16).float())
    assert torch.equal(LogitRounding("fp16")(z), z.to(torch.float16).float())


@pytest.mark.parametrize(
    ("fmt", "mantissa_bits"), [("bf16", 7), ("fp16", 10), ("fp8_e4m3", 3), ("fp8_e5m2", 2)]
)
def test_rounding_error_is_relative_and_grows_with_magnitude(fmt: str, mantissa_bits: int) -> None:
    z = torch.linspace(-60.0, 60.0, 200_001)
    z = z[
        z.abs() >= 2**-6
    ]  # the normal range of every format (subnormals have absolute, not relative, error)
    err = (LogitRounding(fmt)(z) - z).abs()
    # Round-to-nearest: |error| <= half an ulp = 2^-(m+1) * 2^floor(log2|z|) <= 2^-(m+1) |z|.
    assert bool((err <= z.abs() * 2.0 ** -(mantissa_bits + 1) + 1e-12).all())
    # Mean error per |z| band increases with |z|: the large-|z| tail is moved the most.
    edges = [0.5, 1, 2, 4, 8, 16, 32, 60]
    means = [err[(z.abs() >= lo) & (z.abs() < hi)].mean().item() for lo, hi in itertools.pairwise(edges)]
    assert all(b > a for a, b in itertools.pairwise(means)), means


def test_fp8_rounding_saturates_instead_of_nan() -> None:
    z = torch.tensor([[1e6, -1e6, 0.0, 3.0]])
    out = LogitRounding("fp8_e4m3")(z)
    assert out.tolist() == [[448.0, -448.0, 0.0, 3.0]]
    assert torch.isfinite(round_to_format(torch.tensor([1e9]), "fp8_e5m2")).all()


# ----------------------------------------------------------------------------- floor and tail
def test_probability_floor_keeps_every_logit_within_nats_of_the_max() -> None:
    z = _logits(scale=8.0)
    out = ProbabilityFloor(13.5)(z)
    top = z.amax(-1, keepdim=True)
    assert bool((out >= top - 13.5).all())
    assert torch.equal(out.amax(-1), z.amax(-1))
    near = z >= top - 13.5
    assert torch.equal(out[near], z[near])  # nothing above the floor moves
    assert bool((out[~near] == (top - 13.5).expand_as(z)[~near]).all())
    # The floor is real probability mass: log-probs of the floored tokens are >= -nats - log-partition.
    lp = torch.log_softmax(out, -1)
    assert bool((lp >= lp.amax(-1, keepdim=True) - 13.5 - 1e-4).all())


def test_tail_inflation_raises_only_the_tail_and_keeps_the_order() -> None:
    z = _logits(scale=6.0)
    p = TailInflation(factor=2.0, threshold=5.0)
    out = p(z)
    edge = z.amax(-1, keepdim=True) - 5.0
    head = z >= edge
    assert torch.equal(out[head], z[head])
    assert bool((out[~head] > z[~head]).all())
    # Monotone per row: the ranking of tokens is unchanged.
    assert torch.equal(torch.argsort(out[0]), torch.argsort(z[0]))
    # Systematic (not zero-mean): the engine puts more mass on the tail.
    tail_mass = lambda x: (torch.softmax(x, -1) * (~head)).sum(-1)  # noqa: E731
    assert bool((tail_mass(out) > tail_mass(z)).all())
    assert torch.equal(TailInflation(factor=1.0)(z), z)


# ----------------------------------------------------------------------------- KV-cache quantisation
@pytest.mark.parametrize("bits", [8, 4])
def test_kv_quant_error_is_bounded_by_half_a_step_of_the_absmax_scale(bits: int) -> None:
    x = torch.randn(2, 4, 10, 16, generator=torch.Generator().manual_seed(0))  # (B, H, L, D)
    q = KVCacheQuant(bits=bits).kv_transform(x)
    step = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    assert bool(((q - x).abs() <= step / 2 + 1e-6).all())
    levels = torch.round(q / step)
    assert torch.allclose(levels * step, q, atol=1e-6)  # on the integer grid
    assert q.shape == x.shape and q.dtype == x.dtype


def test_kv_quant_fewer_bits_more_error_and_fp8_path() -> None:
    x = torch.randn(2, 4, 10, 16, generator=torch.Generator().manual_seed(1))
    errs = {b: (KVCacheQuant(bits=b).kv_transform(x) - x).abs().mean().item() for b in (8, 4, 2)}
    assert errs[8] < errs[4] < errs[2]
    e4m3 = KVCacheQuant(fmt="fp8_e4m3").kv_transform(x)
    rel = ((e4m3 - x).abs() / x.abs().clamp_min(1e-3)).median().item()
    assert 0 < rel < 2**-4
    bf = KVCacheQuant(bits=8).kv_transform(x.to(torch.bfloat16))
    assert bf.dtype == torch.bfloat16


def test_kv_quant_leaves_logits_alone_and_exposes_its_hook() -> None:
    z = _logits(2, 16)
    p = KVCacheQuant(8)
    assert p(z) is z
    assert kv_transform_of(p) is not None
    assert kv_transform_of(GaussianLogitNoise(0.1)) is None
    assert kv_transform_of(Compose((GaussianLogitNoise(0.1), LogitRounding()))) is None
    assert kv_transform_of(Compose((GaussianLogitNoise(0.1), p))) is not None


# ----------------------------------------------------------------------------- specs
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("gaussian:0.3", GaussianLogitNoise(0.3)),
        ("round:bf16", LogitRounding("bf16")),
        ("round:fp8_e4m3", LogitRounding("fp8_e4m3")),
        ("round:fp8_e5m2", LogitRounding("fp8_e5m2")),
        ("kvquant:8", KVCacheQuant(bits=8)),
        ("kvquant:4", KVCacheQuant(bits=4)),
        ("kvquant:fp8", KVCacheQuant(fmt="fp8_e4m3")),
        ("tail:2.0", TailInflation(2.0)),
        ("floor:13.5", ProbabilityFloor(13.5)),
        (" Gaussian : 0.1 ", GaussianLogitNoise(0.1)),
        ({"kind": "tail", "factor": 3.0, "threshold": 2.0}, TailInflation(3.0, 2.0)),
        ({"kind": "floor"}, ProbabilityFloor()),
        (None, None),
        ("none", None),
        ("", None),
    ],
)
def test_make_perturbation_accepts_the_documented_forms(spec: object, expected: object) -> None:
    assert make_perturbation(spec) == expected


def test_make_perturbation_composes_and_round_trips_through_str() -> None:
    p = make_perturbation("round:bf16+gaussian:0.1")
    assert isinstance(p, Compose) and p.parts == (LogitRounding("bf16"), GaussianLogitNoise(0.1))
    assert make_perturbation(str(p)) == p
    assert make_perturbation(["kvquant:8", {"kind": "floor", "nats": 10.0}]) == Compose(
        (KVCacheQuant(8), ProbabilityFloor(10.0))
    )
    for single in ("gaussian:0.3", "round:fp8_e4m3", "kvquant:4", "tail:2", "floor:13.5"):
        assert str(make_perturbation(single)) == str(make_perturbation(str(make_perturbation(single))))
    inst = TailInflation(3.0)
    assert make_perturbation(inst) is inst
    # Compose applies left to right.
    z = _logits(2, 32)
    assert torch.equal(
        p(z, torch.Generator().manual_seed(0)),
        GaussianLogitNoise(0.1)(z.to(torch.bfloat16).float(), torch.Generator().manual_seed(0)),
    )


@pytest.mark.parametrize(
    "spec",
    [
        "gaussian",
        "gaussian:",
        "gaussian:abc",
        "gaussian:-1",
        "foo:1",
        "round:fp4",
        "kvquant:1",
        "kvquant:16",
        "tail:0.5",
        "floor:0",
        "floor:nan",
        {"kind": "nope"},
        {"kind": "gaussian", "sigma": 0.1, "extra": 1},
        3.0,
    ],
)
def test_bad_specs_raise_value_error_listing_the_allowed_forms(spec: object) -> None:
    with pytest.raises(ValueError, match="Allowed forms") as info:
        make_perturbation(spec)
    assert "gaussian:0.3" in str(info.value) and "floor:13.5" in str(info.value)


def test_constructors_validate_their_fields() -> None:
    with pytest.raises(ValueError, match="sigma"):
        GaussianLogitNoise(-0.1)
    with pytest.raises(ValueError, match="fmt"):
        LogitRounding("int4")
    with pytest.raises(ValueError, match="bits"):
        KVCacheQuant(bits=True)
    with pytest.raises(ValueError, match="nats"):
        ProbabilityFloor(float("inf"))
    with pytest.raises(ValueError, match="parts"):
        Compose(())


def test_every_perturbation_satisfies_the_protocol() -> None:
    for p in (GaussianLogitNoise(), LogitRounding(), KVCacheQuant(), TailInflation(), ProbabilityFloor()):
        assert isinstance(p, Perturbation)
        out = p(_logits(3, 40), torch.Generator().manual_seed(0))
        assert out.shape == (3, 40) and out.dtype == torch.float32
