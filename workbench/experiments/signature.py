"""The paper's check 1 — the mismatch signature — on real rollouts of a policy, per engine/perturbation.

For one policy and one engine setting (precision + perturbation) :func:`measure_signature` samples
``n_trajectories`` responses (no training), runs the trainer's fp32 forward on them, and records the
engine's *own* processed logits at every decode step (a :class:`LogitRecorder` wraps the engine's
perturbation). From those it computes:

- Δ = log μ − log π of every sampled token, binned by the trainer's probability p
  (:func:`workbench.metrics.delta_by_prob_bin`);
- the positive mode (Prop 4.3): mean Δ of sampled low-p tokens with a 95 % Student-t interval
  (:func:`workbench.metrics.sampled_tail_delta`), for p < 1e-3 and for the e^-13 tail proper;
- the Prop 4.2 envelope: ε(s) = ½ (max δ − min δ) of the logit error δ = z_engine − z_trainer at the
  state (the smallest sup-norm over constant shifts, which softmax ignores), and the fraction of sampled
  tokens with |Δ| ≤ 2ε(1 − p e^{−2ε}) (the exact bound; must be 1 up to rounding) and the median
  |Δ| / (2ε(1 − p)) (how tight the first-order envelope is).

Safe-set overlap and the boundary-token rate (check 2) use the same recorded logits:
:mod:`workbench.experiments.overlap`.

The engine is either the emulating :class:`~workbench.engines.TorchEngine` (its logits are recorded, so
every quantity above is measured) or real vLLM (:class:`~workbench.engines.VLLMEngine`), which reports only
the sampled tokens' log-probs: Δ, its bins, the positive mode, k1 and k3 are measured the same way; the
envelope (it needs the engine's logit error δ) is left empty. :func:`engine_label` names which engine
produced a measurement, for figure legends and titles.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench import dvp, metrics, models
from workbench.experiments.runner import json_clean
from workbench.theory.prop42 import logit_error, prop42_envelope

#: log ρ of the tail proper: the log of the paper's ρ, :data:`workbench.dvp.DEFAULT_RHO` (e^-13).
TAIL_LOG_RHO = math.log(dvp.DEFAULT_RHO)

__all__ = [
    "LogitRecorder",
    "ProbeBatch",
    "Signature",
    "engine_label",
    "envelope_stats",
    "envelope_terms",
    "measure_signature",
    "probe_batches",
]


class LogitRecorder:
    """Wrap an engine perturbation and keep the processed logits it returns at every decode step.

    The engine calls ``perturbation(z, generator)`` once per decode step on the temperature-scaled
    logits ``z (N, V)``; this returns the inner perturbation's output unchanged (so sampling is
    exactly the engine's) and appends it to :attr:`steps`. A KV-cache hook of the inner perturbation
    is exposed as ``kv_transform`` so the engine still installs it.

    >>> rec = LogitRecorder(None)
    >>> _ = rec(torch.zeros(2, 5)); _ = rec(torch.ones(2, 5))
    >>> rec.stacked().shape
    torch.Size([2, 2, 5])
    """

    def __init__(self, inner: Any | None) -> None:
        self.inner = inner
        self.steps: list[torch.Tensor] = []
        kv = getattr(inner, "kv_transform", None)
        if kv is not None:
            self.kv_transform = kv

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        out = self.inner(logits, generator) if self.inner is not None else logits
        self.steps.append(out.detach().float().clone())
        return out

    def stacked(self) -> torch.Tensor:
        """The recorded logits as ``(N, T, V)`` (decode step ``t`` in column ``t``)."""
        if not self.steps:
            raise ValueError("LogitRecorder recorded nothing; run engine.generate first")
        return torch.stack(self.steps, dim=1)  # (N, T, V)

    def clear(self) -> None:
        """Forget the recorded steps."""
        self.steps = []


def engine_label(
    engine: str | Any = "torch", engine_dtype: str = "bf16", perturbation: str | None = None
) -> str:
    """Name the engine that produced a measurement: real vLLM (and its build) or the emulating TorchEngine.

    Figures put this in their legends and titles so that an emulated mismatch is never read as a real one.

    Args:
        engine: ``"torch"``, ``"vllm"`` or a built :class:`~workbench.engines.TorchEngine` /
            :class:`~workbench.engines.VLLMEngine` (then its own dtype, perturbation and platform are named
            and the other arguments are ignored).
        engine_dtype: engine precision (``"fp32"``, ``"bf16"``, ``"fp16"``).
        perturbation: the TorchEngine's emulated perturbation spec, if any.

    >>> engine_label("torch", "bf16")
    'TorchEngine bf16 (emulated)'
    >>> engine_label("torch", "bf16", "tail:4.0")
    'TorchEngine bf16 + tail:4.0 (emulated)'
    """
    from workbench.engines.torch_engine import ENGINE_DTYPES, TorchEngine
    from workbench.engines.vllm_engine import VLLMEngine, vllm_on_cpu

    if isinstance(engine, TorchEngine):
        dtype = {v: k for k, v in ENGINE_DTYPES.items()}[engine.dtype]
        return engine_label("torch", dtype, None if engine.perturbation is None else str(engine.perturbation))
    if engine == "torch":
        return f"TorchEngine {engine_dtype}{f' + {perturbation}' if perturbation else ''} (emulated)"
    if isinstance(engine, VLLMEngine):
        engine_dtype, on_cpu = engine.dtype, engine.on_cpu
    elif engine == "vllm":
        on_cpu = vllm_on_cpu()
    else:
        raise ValueError(f"engine={engine!r} must be 'torch', 'vllm' or a built TorchEngine / VLLMEngine")
    return f"vLLM {engine_dtype} ({'CPU build' if on_cpu else 'CUDA'})"


@dataclass
class ProbeBatch:
    """One batch of probe rollouts with both sides' logits at every response position."""

    rollout: Any
    """The engine's :class:`~workbench.engines.Rollout`."""
    logits_train: torch.Tensor
    """``(N, T, V)`` fp32 trainer logits (temperature applied)."""
    logits_engine: torch.Tensor | None
    """``(N, T, V)`` the engine's processed logits (temperature + perturbation, before min-p); ``None``
    for an engine that reports only the sampled tokens' log-probs (vLLM)."""
    engine: Any
    """The engine that sampled the batch (for follow-up checks on the same weights)."""


def probe_batches(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Any,
    *,
    engine: str | Any = "torch",
    engine_dtype: str = "bf16",
    perturbation: str | None = None,
    rho: float | None = None,
    n_trajectories: int = 1024,
    k: int = 4,
    batch_prompts: int = 32,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int | None = None,
) -> Iterator[ProbeBatch]:
    """Sample ``n_trajectories`` responses in batches and yield both sides' logits for each batch.

    Args:
        model, tokenizer: the policy (the trainer side runs it in fp32, as :class:`RLOOTrainer` does).
        task: a :class:`~workbench.tasks.Task` (prompts come from ``task.sample``).
        engine: ``"torch"`` or ``"vllm"``, built by :func:`workbench.engines.make_engine` as the trainer
            builds it, or an engine already built (a :class:`~workbench.engines.VLLMEngine` shared by
            several measurements: each vLLM start costs ~15 s); only ``"torch"`` records its logits
            (``ProbeBatch.logits_engine``).
        engine_dtype: engine weight precision.
        perturbation: engine perturbation spec (:func:`workbench.engines.make_perturbation`).
        rho: ρ the engine samples with (``None``: full vocabulary).
        n_trajectories: total responses (rounded up to whole batches of ``batch_prompts * k``).
        k: samples per prompt.
        batch_prompts: prompts per batch (memory: ``batch_prompts * k * T * V`` floats per side).
        temperature: sampling temperature (both sides).
        seed: seeds prompts, sampling and perturbation noise.
        max_new_tokens: response cap (``None``: the task's).
    """
    from workbench.engines import make_engine, make_perturbation, position_ids

    if n_trajectories < 1:
        raise ValueError(f"n_trajectories={n_trajectories} must be >= 1")
    rec = LogitRecorder(make_perturbation(perturbation)) if engine == "torch" else None
    if isinstance(engine, str):
        sampler = make_engine(engine, model, tokenizer, dtype=engine_dtype, perturbation=rec)
    else:
        sampler = engine
    rng = random.Random(seed)
    max_tokens = max_new_tokens or task.max_new_tokens
    n_batches = -(-n_trajectories // (batch_prompts * k))
    model.eval()
    for b in range(n_batches):
        problems = task.sample(batch_prompts, rng)
        prompts = [models.encode_prompt(tokenizer, p.prompt) for p in problems]
        if rec is not None:
            rec.clear()
        rollout = sampler.generate(
            prompts, n=k, max_tokens=max_tokens, rho=rho, temperature=temperature, seed=seed * 7919 + b
        )
        z_engine = rec.stacked() if rec is not None else None  # (N, T, V)
        with torch.no_grad():
            attn = rollout.attention_mask
            out = model(input_ids=rollout.sequences, attention_mask=attn, position_ids=position_ids(attn))
            p = rollout.prompt_len
            z_train = out.logits[:, p - 1 : -1].float() / temperature  # (N, T, V)
        yield ProbeBatch(rollout, z_train, z_engine, sampler)


def envelope_terms(
    logits_train: torch.Tensor, logits_engine: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per valid sampled token: ``|Δ|``, ``ε`` and the trainer probability ``p`` (all ``(n,)`` float64).

    ``ε`` is :func:`workbench.theory.logit_error`: ``½ (max_b δ_b − min_b δ_b)`` with ``δ = z_engine − z_train``
    (softmax ignores a constant shift, and this is the smallest ``‖δ − c‖_∞`` over shifts ``c``).
    """
    zt = logits_train[mask].double()  # (n, V)
    ze = logits_engine[mask].double()  # (n, V)
    tok = tokens[mask].long()[:, None]  # (n, 1)
    eps = logit_error(zt, ze)  # (n,)
    lp_t = torch.log_softmax(zt, -1).gather(-1, tok).squeeze(-1)  # (n,)
    lp_e = torch.log_softmax(ze, -1).gather(-1, tok).squeeze(-1)  # (n,)
    return (lp_e - lp_t).abs(), eps, lp_t.exp()


def envelope_stats(gap: torch.Tensor, eps: torch.Tensor, p: torch.Tensor) -> dict[str, float]:
    """How the measured ``|Δ|`` of sampled tokens sits against Prop 4.2's envelope.

    The exact bound ``|Δ_a| ≤ 2ε(1 − p_a e^{−2ε})`` must hold for every token; the first-order
    ``2ε(1 − p_a)`` is the envelope the paper plots.

    Args:
        gap, eps, p: ``(n,)`` from :func:`envelope_terms`.

    Returns:
        ``{"count", "eps_median", "frac_within_exact", "ratio_first_order_median",
        "ratio_first_order_max"}`` (ratios ``|Δ| / (2ε(1−p))``).

    >>> zt = torch.tensor([[0.0, -1.0, -2.0]])
    >>> terms = envelope_terms(zt, zt + torch.tensor([[0.1, -0.1, 0.0]]), torch.tensor([1]), torch.tensor([True]))
    >>> s = envelope_stats(*terms)
    >>> s["count"], round(s["eps_median"], 3), s["frac_within_exact"]
    (1.0, 0.1, 1.0)
    """
    if gap.numel() == 0:
        return {
            "count": 0.0,
            "eps_median": math.nan,
            "frac_within_exact": math.nan,
            "ratio_first_order_median": math.nan,
            "ratio_first_order_max": math.nan,
        }
    exact = prop42_envelope(p.log(), eps)
    first = prop42_envelope(p.log(), eps, exact=False)
    ok = first > 0
    ratio = gap[ok] / first[ok]
    return {
        "count": float(gap.numel()),
        "eps_median": float(eps.median()),
        "frac_within_exact": float((gap <= exact * (1 + 1e-6) + 1e-9).double().mean()),
        "ratio_first_order_median": float(ratio.median()) if ratio.numel() else math.nan,
        "ratio_first_order_max": float(ratio.max()) if ratio.numel() else math.nan,
    }


@dataclass
class Signature:
    """The mismatch signature of one engine setting (see the module docstring)."""

    engine: str
    """Which engine produced it (:func:`engine_label`), e.g. ``"vLLM bf16 (CPU build)"``."""
    n_trajectories: int
    n_tokens: int
    bins: list[dict[str, float]]
    """:func:`workbench.metrics.delta_by_prob_bin` rows."""
    lowp: dict[str, float]
    """Positive mode of tokens with p < 1e-3 (:func:`workbench.metrics.sampled_tail_delta`)."""
    tail: dict[str, float]
    """The same for the e^-13 tail proper (trainer probability below e^-13 of the row max)."""
    envelope: dict[str, float]
    """:func:`envelope_stats` (count 0 and NaN for an engine whose logits are not recorded: vLLM)."""
    k1: float
    k3: float
    deltas: list[tuple[float, float]] = field(default_factory=list)
    """A sample of ``(log p_train, Δ)`` pairs for scatter plots (at most 5,000)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (nan → None)."""
        return json_clean(self.__dict__)


def measure_signature(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Any,
    *,
    engine: str | Any = "torch",
    engine_dtype: str = "bf16",
    perturbation: str | None = None,
    n_trajectories: int = 1024,
    seed: int = 0,
    temperature: float = 1.0,
    edges: Sequence[float] = metrics.DEFAULT_P_EDGES,
    **probe_kw: Any,
) -> Signature:
    """Sample with the full vocabulary (no min-p) and measure the mismatch signature.

    Args:
        model, tokenizer, task: the policy and its task.
        engine: ``"torch"``, ``"vllm"`` or a built engine (:func:`probe_batches`).
        engine_dtype, perturbation: the engine setting.
        n_trajectories: responses sampled (≥ 1,000 for the paper's checks).
        seed: seeds everything.
        temperature: sampling temperature.
        edges: trainer-probability bin edges.
        **probe_kw: passed to :func:`probe_batches` (``k``, ``batch_prompts``, ``max_new_tokens``).

    Returns:
        A :class:`Signature`.
    """
    lt_all, li_all, tail_all, env_terms = [], [], [], []
    n_traj = 0
    for batch in probe_batches(
        model,
        tokenizer,
        task,
        engine=engine,
        engine_dtype=engine_dtype,
        perturbation=perturbation,
        rho=None,
        n_trajectories=n_trajectories,
        seed=seed,
        temperature=temperature,
        **probe_kw,
    ):
        r = batch.rollout
        mask = r.mask
        lt = dvp.token_logprobs(batch.logits_train, r.tokens, None)  # (N, T)
        tail = metrics.boundary_tokens(batch.logits_train, r.tokens, math.exp(TAIL_LOG_RHO), mask=mask)
        lt_all.append(lt[mask])
        li_all.append(r.logprobs[mask])
        tail_all.append(tail[mask])
        if batch.logits_engine is not None:
            env_terms.append(envelope_terms(batch.logits_train, batch.logits_engine, r.tokens, mask))
        n_traj += r.tokens.shape[0]
    lt, li, tail = torch.cat(lt_all), torch.cat(li_all), torch.cat(tail_all)  # (n,) each
    ones = torch.ones_like(lt, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(lt.numel(), generator=gen)[:5000]
    empty = torch.empty(0, dtype=torch.float64)
    envelope = (
        envelope_stats(*(torch.cat(parts) for parts in zip(*env_terms)))
        if env_terms
        else envelope_stats(empty, empty, empty)
    )
    mm = metrics.mismatch_metrics(lt[None], li[None], ones[None])
    return Signature(
        engine=engine_label(engine, engine_dtype, perturbation),
        n_trajectories=n_traj,
        n_tokens=int(lt.numel()),
        bins=metrics.delta_by_prob_bin(lt, li, ones, edges),
        lowp=_strip(metrics.sampled_tail_delta(lt, li, ones, 1e-3)),
        tail=_strip(metrics.sampled_tail_delta(lt[tail], li[tail], ones[tail], 1.0))
        if bool(tail.any())
        else {
            "count": 0.0,
            "delta_mean": math.nan,
            "delta_ci_lo": math.nan,
            "delta_ci_hi": math.nan,
            "frac_positive": math.nan,
        },
        envelope=envelope,
        k1=mm["mismatch/k1"],
        k3=mm["mismatch/k3"],
        deltas=[(float(a), float(b - a)) for a, b in zip(lt[pick].tolist(), li[pick].tolist())],
    )


def _strip(d: dict[str, float]) -> dict[str, float]:
    return {k.replace("mismatch/lowp_", ""): v for k, v in d.items()}
