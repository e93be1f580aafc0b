"""The paper's check 2 — safe-set overlap between trainer and engine, and the boundary-token rate.

For each engine setting, :func:`measure_overlap` samples ≥ 1,000 trajectories *with* min-p at ρ (as
DVP's engine does), records the engine's processed logits at every step, and reports

- ``|V_S ∩ V'_S| / |V_S|`` per position (trainer's safe set ``V_S``, engine's ``V'_S``), its mean,
  minimum and the fraction of positions where it is exactly 1
  (:func:`workbench.metrics.safe_set_overlap`);
- the reverse view ``|V_S ∩ V'_S| / |V'_S|`` (tokens the engine may sample that the trainer prunes);
- the boundary-token rate: sampled tokens outside the trainer's safe set
  (:func:`workbench.metrics.boundary_tokens`) — these are what DVP + MIS must mask.

With real vLLM as the engine only the sampled tokens' log-probs come back, not its logits: the engine's
safe set is unobserved, so the overlap fields and ``safe_size_engine`` are NaN. The boundary-token count
is still exact — vLLM samples with min-p at the same ρ, so every sampled token is inside its own safe set,
and one outside the trainer's is a boundary token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from workbench import dvp, metrics
from workbench.experiments.runner import json_clean
from workbench.experiments.signature import engine_label, probe_batches

__all__ = ["Overlap", "measure_overlap"]


@dataclass
class Overlap:
    """Check 2 for one engine setting."""

    engine: str
    """Which engine produced it (:func:`~workbench.experiments.signature.engine_label`)."""
    rho: float
    n_trajectories: int
    n_positions: int
    overlap_mean: float
    """Mean of ``|V_S ∩ V'_S| / |V_S|`` over valid positions (trainer-side view); NaN, like every field
    that needs the engine's safe set, for an engine whose logits are not recorded (vLLM)."""
    overlap_min: float
    frac_exact: float
    """Fraction of positions where the two safe sets agree on every trainer-safe token."""
    reverse_mean: float
    """Mean of ``|V_S ∩ V'_S| / |V'_S|`` (engine-side view)."""
    boundary_tokens: int
    """Sampled tokens outside the trainer's safe set."""
    boundary_rate: float
    """``boundary_tokens / n_positions``."""
    safe_size_trainer: float
    safe_size_engine: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (nan → None)."""
        return json_clean(self.__dict__)


def measure_overlap(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Any,
    *,
    engine: str | Any = "torch",
    engine_dtype: str = "bf16",
    perturbation: str | None = None,
    rho: float = dvp.DEFAULT_RHO,
    n_trajectories: int = 1024,
    seed: int = 0,
    temperature: float = 1.0,
    **probe_kw: Any,
) -> Overlap:
    """Sample with min-p at ``rho`` and measure trainer/engine safe-set agreement (module docstring).

    Args:
        model, tokenizer, task: the policy and its task.
        engine: ``"torch"``, ``"vllm"`` or a built engine
            (:func:`~workbench.experiments.signature.probe_batches`).
        engine_dtype, perturbation: the engine setting.
        rho: the min-p threshold of both sides.
        n_trajectories: responses sampled (≥ 1,000 for the paper's check).
        seed: seeds everything.
        temperature: sampling temperature.
        **probe_kw: passed to :func:`~workbench.experiments.signature.probe_batches`.

    Returns:
        An :class:`Overlap`.
    """
    fwd, rev, size_t, size_e = [], [], [], []
    n_boundary = n_pos = n_traj = 0
    for batch in probe_batches(
        model,
        tokenizer,
        task,
        engine=engine,
        engine_dtype=engine_dtype,
        perturbation=perturbation,
        rho=rho,
        n_trajectories=n_trajectories,
        seed=seed,
        temperature=temperature,
        **probe_kw,
    ):
        r, zt, ze = batch.rollout, batch.logits_train, batch.logits_engine
        mask = r.mask
        n_boundary += int(metrics.boundary_tokens(zt, r.tokens, rho, mask=mask).sum())
        n_pos += int(mask.sum())
        n_traj += r.tokens.shape[0]
        size_t.append(dvp.safe_set_size(zt, rho)[mask].double())
        if ze is not None:
            fwd.append(metrics.safe_set_overlap(zt, ze, rho, mask=mask)[mask])
            rev.append(metrics.safe_set_overlap(ze, zt, rho, mask=mask)[mask])
            size_e.append(dvp.safe_set_size(ze, rho)[mask].double())
    engine_side = dict.fromkeys(
        ("overlap_mean", "overlap_min", "frac_exact", "reverse_mean", "safe_size_engine"), math.nan
    )
    if fwd:
        f, b = torch.cat(fwd).double(), torch.cat(rev).double()
        engine_side = {
            "overlap_mean": float(f.mean()),
            "overlap_min": float(f.min()),
            "frac_exact": float((f == 1).double().mean()),
            "reverse_mean": float(b.mean()),
            "safe_size_engine": float(torch.cat(size_e).mean()),
        }
    return Overlap(
        engine=engine_label(engine, engine_dtype, perturbation),
        rho=rho,
        n_trajectories=n_traj,
        n_positions=n_pos,
        boundary_tokens=n_boundary,
        boundary_rate=n_boundary / max(1, n_pos),
        safe_size_trainer=float(torch.cat(size_t).mean()),
        **engine_side,
    )
