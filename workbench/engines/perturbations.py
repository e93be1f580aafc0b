"""Perturbation models: emulate *why* an inference engine's policy μ differs from the trainer's π.

A real rollout engine (vLLM, SGLang) runs other kernels, in another precision, with other summation
orders, sometimes with a quantised KV cache. On CPU we reproduce those effects on purpose, each with a
small, documented model, so the mismatch they cause can be seen, measured and fixed:

=====================  ================================  ==================================================
class                  spec                              mimics
=====================  ================================  ==================================================
GaussianLogitNoise     ``"gaussian:0.3"``                the paper's model (Prop 4.3): i.i.d. N(0, σ²) error
                                                         on every logit, e.g. non-deterministic reductions
LogitRounding          ``"round:bf16"``, ``"round:fp8_   an lm_head that writes logits in bf16 / fp8: the
                       e4m3"``, ``"round:fp8_e5m2"``     error is relative, so it grows with |z|
KVCacheQuant           ``"kvquant:8"``, ``"kvquant:4"``, a quantised KV cache (vLLM ``kv_cache_dtype="fp8"``,
                       ``"kvquant:fp8_e4m3"``            int8 KV): error enters through attention, so it is
                                                         correlated across the vocabulary and the context
TailInflation          ``"tail:2.0"``                    a flatter low-precision softmax: logits below
                                                         ``max − threshold`` move up, tail mass grows
                                                         systematically (not zero-mean)
ProbabilityFloor       ``"floor:13.5"``                  an engine that cannot represent probabilities below
                                                         ``e^−nats · p_max`` (underflowing exp, floored
                                                         softmax): every logit ≥ ``max − nats``
Compose                ``"round:bf16+gaussian:0.1"``     several effects at once, applied left to right
=====================  ================================  ==================================================

A perturbation is any callable ``(logits (N, V) fp32, generator) -> logits (N, V) fp32``
(:class:`Perturbation`). The engine applies it to the *processed* logits (after the temperature),
before the min-p mask, so ``μ^mp`` is the engine's min-p policy of the perturbed logits — exactly the
situation of THEORY.md §5. A perturbation that acts inside the model instead (the KV cache) exposes a
``kv_transform(states) -> states`` method, which :class:`~workbench.engines.TorchEngine` hooks into its
cache; its ``__call__`` leaves the logits alone.

>>> p = make_perturbation("floor:5")
>>> p(torch.tensor([[0.0, -3.0, -9.0]])).tolist()
[[0.0, -3.0, -5.0]]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from workbench import dvp

__all__ = [
    "PERTURBATION_KINDS",
    "ROUNDING_FORMATS",
    "Compose",
    "EntropyScaledMinP",
    "GaussianLogitNoise",
    "KVCacheQuant",
    "LogitRounding",
    "Perturbation",
    "ProbabilityFloor",
    "TailInflation",
    "kv_transform_of",
    "make_perturbation",
    "round_to_format",
]

# Number formats a logit (or a KV entry) can be rounded to: torch dtype and the largest finite value.
_FORMATS: dict[str, tuple[torch.dtype, float]] = {
    "bf16": (torch.bfloat16, torch.finfo(torch.bfloat16).max),
    "fp16": (torch.float16, torch.finfo(torch.float16).max),
    "fp8_e4m3": (torch.float8_e4m3fn, torch.finfo(torch.float8_e4m3fn).max),  # 448
    "fp8_e5m2": (torch.float8_e5m2, torch.finfo(torch.float8_e5m2).max),  # 57344
}
ROUNDING_FORMATS: tuple[str, ...] = tuple(_FORMATS)
"""Formats :class:`LogitRounding` and :class:`KVCacheQuant` accept."""


@runtime_checkable
class Perturbation(Protocol):
    """A model of the engine's logit error: ``(logits (N, V) fp32, generator) -> logits (N, V) fp32``.

    Implementations must not modify ``logits`` in place and must draw randomness only from
    ``generator`` (so one seed reproduces a whole rollout). An optional ``kv_transform(states)`` method
    (tensors ``(B, H, L, D)``) is applied to every key and value written to the engine's KV cache.
    """

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...


def round_to_format(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round ``x`` to the nearest value of a number format and back to ``x``'s dtype.

    Out-of-range values saturate at the format's largest finite value (as fp8 kernels do with
    ``saturate=True``) instead of turning into NaN/inf.

    Args:
        x: any float tensor.
        fmt: one of :data:`ROUNDING_FORMATS` (``bf16``, ``fp16``, ``fp8_e4m3``, ``fp8_e5m2``).

    Returns:
        A tensor like ``x`` whose values all lie on the format's grid.

    >>> round_to_format(torch.tensor([1.0, 1.01, 300.0, 1000.0]), "fp8_e4m3").tolist()
    [1.0, 1.0, 288.0, 448.0]
    """
    if fmt not in _FORMATS:
        raise ValueError(f"fmt={fmt!r} must be one of {ROUNDING_FORMATS}")
    dtype, limit = _FORMATS[fmt]
    return x.clamp(-limit, limit).to(dtype).to(x.dtype)


def _check_number(name: str, value: object, lo: float, *, strict: bool = False, hint: str = "") -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= lo if strict else value < lo):  # type: ignore[operator]
        bound = f"> {lo}" if strict else f">= {lo}"
        raise ValueError(f"{name}={value!r} must be a finite number {bound}{hint}")
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class GaussianLogitNoise:
    """Add i.i.d. ``N(0, σ²)`` noise to every logit: the paper's model of engine error (Prop 4.3).

    Mimics non-deterministic kernels and reduction orders whose error looks like independent noise on
    each logit. Sampling from the noisy logits tilts the noise of a sampled tail token towards +σ²
    (the "positive mode"), which is what makes naive IS ratios collapse.

    >>> g = torch.Generator().manual_seed(0)
    >>> z = torch.zeros(1, 20_000)
    >>> round(GaussianLogitNoise(0.5)(z, g).std().item(), 2)
    0.5
    """

    sigma: float = 0.1
    """Standard deviation of the noise, in nats (logit units); 0 disables it."""

    def __post_init__(self) -> None:
        _check_number("sigma", self.sigma, 0.0, hint=" (logit noise std in nats, e.g. 0.1)")

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.sigma == 0:
            return logits
        noise = torch.randn(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
        return logits + self.sigma * noise

    def __str__(self) -> str:
        return f"gaussian:{self.sigma:g}"


@dataclass(frozen=True)
class LogitRounding:
    """Round every logit to a low-precision grid (bf16, fp16, fp8 e4m3 / e5m2).

    Mimics an engine whose lm_head writes logits in low precision. The rounding error is relative
    (|error| ≤ 2^-(mantissa bits + 1) · |z|), so it grows with |z|: the large-magnitude logits of the
    tail are moved the most, the head barely.

    >>> LogitRounding("bf16")(torch.tensor([[1.0, 1.001, -30.3]])).tolist()
    [[1.0, 1.0, -30.25]]
    """

    fmt: str = "bf16"
    """Number format, one of :data:`ROUNDING_FORMATS`."""

    def __post_init__(self) -> None:
        if self.fmt not in _FORMATS:
            raise ValueError(
                f"fmt={self.fmt!r} must be one of {ROUNDING_FORMATS}, e.g. LogitRounding('bf16')"
            )

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return round_to_format(logits, self.fmt)

    def __str__(self) -> str:
        return f"round:{self.fmt}"


@dataclass(frozen=True)
class KVCacheQuant:
    """Quantise / dequantise every key and value written to the engine's KV cache.

    Mimics a quantised KV cache (vLLM ``kv_cache_dtype="fp8"``, int8/int4 KV schemes): each
    ``(token, head)`` vector of ``D`` entries gets its own absmax scale, is rounded to ``bits``-bit
    symmetric integers (or to an fp8 grid) and scaled back. The error enters through attention, so —
    unlike the logit models — it is correlated across the vocabulary and grows with the context.
    This is a hook into the engine (``kv_transform``), not a logit transform: ``__call__`` returns the
    logits unchanged.

    >>> q = KVCacheQuant(bits=2)  # levels -1, 0, +1 times the absmax of each vector
    >>> q.kv_transform(torch.tensor([[[[0.5, 0.1, -0.4]]]])).tolist()
    [[[[0.5, 0.0, -0.5]]]]
    """

    bits: int = 8
    """Integer bits (2–8, symmetric: levels ``−(2^(bits−1)−1) … 2^(bits−1)−1``); ignored when ``fmt`` is fp8."""
    fmt: str = "int"
    """``"int"`` (integer grid with ``bits``) or ``"fp8_e4m3"`` / ``"fp8_e5m2"`` (scaled fp8 grid)."""

    def __post_init__(self) -> None:
        if self.fmt not in ("int", "fp8_e4m3", "fp8_e5m2"):
            raise ValueError(f"fmt={self.fmt!r} must be 'int', 'fp8_e4m3' or 'fp8_e5m2'")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits!r} must be an integer in [2, 8], e.g. KVCacheQuant(bits=8)")

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return logits

    def kv_transform(self, states: torch.Tensor) -> torch.Tensor:
        """Fake-quantise ``states`` ``(B, H, L, D)``: one absmax scale per ``(b, h, l)`` vector."""
        x = states.float()
        amax = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)  # (B, H, L, 1)
        if self.fmt == "int":
            qmax = 2 ** (self.bits - 1) - 1
            scale = amax / qmax
            q = torch.round(x / scale).clamp_(-qmax, qmax) * scale
        else:
            dtype, limit = _FORMATS[self.fmt]
            scale = amax / limit
            q = (x / scale).clamp_(-limit, limit).to(dtype).float() * scale
        return q.to(states.dtype)

    def __str__(self) -> str:
        return f"kvquant:{self.bits}" if self.fmt == "int" else f"kvquant:{self.fmt}"


@dataclass(frozen=True)
class TailInflation:
    """Shrink the distance of tail logits below ``max − threshold`` by ``factor``.

    ``z' = (m − c) − (m − c − z) / factor`` for ``z < m − c`` (``m`` the row max, ``c`` the threshold);
    logits within ``c`` of the max are untouched. Mimics a flatter low-precision softmax / a
    temperature that drifts up in the tail: the engine puts systematically *more* mass on rare tokens
    (not zero-mean noise), so sampled tail tokens have ``log μ > log π`` — the positive mode, on purpose.

    >>> TailInflation(factor=2.0, threshold=4.0)(torch.tensor([[0.0, -2.0, -10.0]])).tolist()
    [[0.0, -2.0, -7.0]]
    """

    factor: float = 2.0
    """How much the tail distances shrink (1 = no change)."""
    threshold: float = 5.0
    """Nats below the max where the tail starts."""

    def __post_init__(self) -> None:
        _check_number("factor", self.factor, 1.0, hint=" (1 = no inflation, e.g. 2.0)")
        _check_number("threshold", self.threshold, 0.0, hint=" (nats below the max, e.g. 5.0)")

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.factor == 1.0:
            return logits
        edge = logits.amax(dim=-1, keepdim=True) - self.threshold  # (N, 1)
        inflated = edge - (edge - logits) / self.factor
        return torch.where(logits < edge, inflated, logits)

    def __str__(self) -> str:
        return f"tail:{self.factor:g}"


@dataclass(frozen=True)
class ProbabilityFloor:
    """Raise every logit to at least ``max − nats``: no probability below ``e^−nats · p_max``.

    Mimics an engine that cannot represent small probabilities (an exp that underflows, a softmax
    computed with a floor). With ``nats`` slightly above ``−log ρ`` (13.5 vs 13 for the paper's
    ρ = e^-13) the floored tokens stay just outside the min-p safe set: DVP hides the floor
    completely, while an unpruned engine moves ``≈ |V| e^-nats`` of mass into the tail.

    >>> ProbabilityFloor(nats=2.0)(torch.tensor([[1.0, 0.5, -7.0]])).tolist()
    [[1.0, 0.5, -1.0]]
    """

    nats: float = 13.5
    """Largest allowed gap to the max logit, in nats."""

    def __post_init__(self) -> None:
        _check_number("nats", self.nats, 0.0, strict=True, hint=" (e.g. 13.5)")

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        floor = logits.amax(dim=-1, keepdim=True) - self.nats  # (N, 1)
        return torch.maximum(logits, floor)

    def __str__(self) -> str:
        return f"floor:{self.nats:g}"


@dataclass(frozen=True)
class Compose:
    """Apply several perturbations left to right; KV-cache hooks are chained in the same order.

    >>> str(Compose((LogitRounding("bf16"), GaussianLogitNoise(0.1))))
    'round:bf16+gaussian:0.1'
    """

    parts: tuple[Any, ...]
    """The perturbations, in application order."""

    def __post_init__(self) -> None:
        if not self.parts or not all(callable(p) for p in self.parts):
            raise ValueError(f"parts={self.parts!r} must be a non-empty sequence of perturbations")

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for part in self.parts:
            logits = part(logits, generator)
        return logits

    @property
    def has_kv_transform(self) -> bool:
        """Whether any part hooks into the KV cache."""
        return any(hasattr(p, "kv_transform") for p in self.parts)

    def kv_transform(self, states: torch.Tensor) -> torch.Tensor:
        """Chain the parts' KV-cache hooks (identity when none has one)."""
        for part in self.parts:
            if hasattr(part, "kv_transform"):
                states = part.kv_transform(states)
        return states

    def __str__(self) -> str:
        return "+".join(str(p) for p in self.parts)


def kv_transform_of(perturbation: Any) -> Any:
    """The KV-cache hook of ``perturbation`` (``None`` when it has none): what the engine installs."""
    if perturbation is None:
        return None
    if isinstance(perturbation, Compose) and not perturbation.has_kv_transform:
        return None
    return getattr(perturbation, "kv_transform", None)


PERTURBATION_KINDS: dict[str, tuple[type, str, str]] = {
    "gaussian": (GaussianLogitNoise, "sigma", "gaussian:0.3"),
    "round": (LogitRounding, "fmt", "round:bf16 | round:fp16 | round:fp8_e4m3 | round:fp8_e5m2"),
    "kvquant": (KVCacheQuant, "bits", "kvquant:8 | kvquant:4 | kvquant:fp8_e4m3"),
    "tail": (TailInflation, "factor", "tail:2.0"),
    "floor": (ProbabilityFloor, "nats", "floor:13.5"),
}
"""``kind -> (class, the parameter a "kind:value" string sets, example specs)``."""

_FORMS = (
    "None or 'none'; 'kind:value' with kind in "
    + ", ".join(f"'{ex}'" for _, _, ex in PERTURBATION_KINDS.values())
    + "; several joined by '+' (applied left to right); a dict {'kind': 'tail', 'factor': 2.0, "
    "'threshold': 5.0}; a list of those; or a Perturbation instance"
)


def _bad(spec: object, why: str) -> ValueError:
    return ValueError(f"perturbation spec {spec!r}: {why}. Allowed forms: {_FORMS}")


def _from_string(spec: str, whole: object) -> Any:
    kind, sep, value = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in PERTURBATION_KINDS or not sep or not value.strip():
        raise _bad(whole, f"cannot parse {spec!r}")
    cls, param, _ = PERTURBATION_KINDS[kind]
    value = value.strip()
    try:
        if kind == "round":
            return cls(value)
        if kind == "kvquant":
            if value.startswith("fp8"):
                return cls(fmt="fp8_e4m3" if value == "fp8" else value)
            return cls(bits=int(value))
        return cls(**{param: float(value)})
    except ValueError as err:
        raise _bad(whole, str(err)) from err


def _from_mapping(spec: Mapping[str, Any], whole: object) -> Any:
    args = dict(spec)
    kind = str(args.pop("kind", "")).lower()
    if kind not in PERTURBATION_KINDS:
        raise _bad(whole, f"'kind' must be one of {tuple(PERTURBATION_KINDS)}")
    try:
        return PERTURBATION_KINDS[kind][0](**args)
    except (TypeError, ValueError) as err:
        raise _bad(whole, str(err)) from err


def make_perturbation(spec: str | Mapping[str, Any] | Sequence[Any] | Perturbation | None) -> Any:
    """Build a perturbation from a short spec (config files, CLI flags, notebooks).

    Args:
        spec: ``None`` / ``"none"`` (no perturbation); ``"kind:value"`` with kind in
            :data:`PERTURBATION_KINDS` (``"gaussian:0.3"``, ``"round:bf16"``, ``"kvquant:8"``,
            ``"tail:2.0"``, ``"floor:13.5"``); several joined by ``"+"``; a dict with a ``"kind"`` key
            and the class's fields; a list of those; or an object that already is a perturbation.

    Returns:
        The perturbation (a :class:`Compose` for several), or ``None``.

    Raises:
        ValueError: the spec is malformed; the message lists the allowed forms.

    >>> make_perturbation("gaussian:0.3")
    GaussianLogitNoise(sigma=0.3)
    >>> make_perturbation({"kind": "tail", "factor": 3.0, "threshold": 4.0})
    TailInflation(factor=3.0, threshold=4.0)
    >>> str(make_perturbation("kvquant:8+floor:13.5"))
    'kvquant:8+floor:13.5'
    >>> make_perturbation(None) is None and make_perturbation("none") is None
    True
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        text = spec.strip()
        if text.lower() in ("", "none"):
            return None
        parts = [_from_string(p, spec) for p in text.split("+")]
        return parts[0] if len(parts) == 1 else Compose(tuple(parts))
    if isinstance(spec, Mapping):
        return _from_mapping(spec, spec)
    if isinstance(spec, (list, tuple)):
        built = [make_perturbation(s) for s in spec]
        parts = [p for p in built if p is not None]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else Compose(tuple(parts))
    if callable(spec):
        return spec
    raise _bad(spec, f"unsupported type {type(spec).__name__}")


class EntropyScaledMinP:
    """Engine-side logits processor of the entropy-scaled ρ: mask logits outside the per-state safe set.

    Applied after the engine's own perturbation (``inner``), on the logits the engine samples from, so
    the engine's entropy (not the trainer's) sets its cut — as a real engine's logits processor would.
    Masked logits become ``-inf``; the engine's processed log-probs are then renormalised over the set.
    A KV-cache hook of ``inner`` is passed through.
    """

    def __init__(self, log_rho: float, kappa: float, inner: Any | None = None) -> None:
        self.log_rho, self.kappa, self.inner = log_rho, kappa, inner
        kv = getattr(inner, "kv_transform", None)
        if kv is not None:
            self.kv_transform = kv

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        z = self.inner(logits, generator) if self.inner is not None else logits
        keep, _ = dvp.entropy_scaled_safe_mask(z, self.log_rho, self.kappa)
        return z.masked_fill(~keep, float("-inf"))

    def __str__(self) -> str:
        base = f"entropy_min_p(log_rho={self.log_rho:g}, kappa={self.kappa:g})"
        return base if self.inner is None else f"{self.inner}+{base}"
