"""Beyond the paper: Prop 5.5's bias bound on the measured Z, DVP under GRPO / PPO-clip, adaptive ρ.

- :func:`prop55_on_policy` samples a policy's own states under π^mp and evaluates the bias bound
  ``|J_mp − J| ≤ R_max · T · (1 − Z_min)`` on the *measured* retained mass Z, next to the exact
  trajectory TV of pruning, ``1 − E_{π^mp}[Π_t Z(s_t)]`` (workbench.theory.prop55), and a direct Monte
  Carlo estimate of ``J_mp − J`` (rewards of responses sampled with and without pruning).
- :data:`LOSS_VARIANTS` / :func:`loss_variants`: the headline arms under RLOO, GRPO-style advantages
  and a PPO-clip loss (2 epochs per batch).
- :func:`adaptive_rho` compares the paper's fixed ρ with an entropy-scaled ρ(s)
  (``RLOOConfig.rho_entropy_scale``).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from workbench import dvp, models
from workbench.experiments.runner import ArmResults, run_arms
from workbench.theory.prop55 import bias_bound

__all__ = ["LOSS_VARIANTS", "Prop55Point", "adaptive_rho", "loss_variants", "prop55_on_policy"]


@dataclass
class Prop55Point:
    """Prop 5.5 evaluated at one ρ on a policy's own states."""

    rho: float
    horizon: int
    """T: the response cap (the bound's horizon)."""
    n_states: int
    one_minus_z_mean: float
    one_minus_z_max: float
    """``1 − Z_min`` over the visited states (an estimate of the bound's worst case from below)."""
    bound: float
    """``R_max · T · (1 − Z_min)`` with the measured ``Z_min`` (R_max = 1)."""
    tv_exact: float
    """Monte Carlo estimate of the exact trajectory TV ``1 − E_{π^mp}[Π_t Z(s_t)]``."""
    j_gap: float
    """``J_mp − J`` estimated from sampled rewards (pruned minus unpruned)."""
    j_gap_se: float
    """Standard error of ``j_gap``."""

    def to_dict(self) -> dict[str, float]:
        """JSON-ready dict."""
        return dict(self.__dict__)


def _sample(engine: Any, prompts: list[list[int]], k: int, t: int, rho: float | None, seed: int) -> Any:
    return engine.generate(prompts, n=k, max_tokens=t, rho=rho, temperature=1.0, seed=seed)


def _rewards(task: Any, tokenizer: Any, problems: Sequence[Any], rollout: Any) -> list[float]:
    out = []
    for i, row, n in zip(rollout.prompt_index.tolist(), rollout.tokens.tolist(), rollout.lengths.tolist()):
        ids = [x for x in row[:n] if x != tokenizer.eos_token_id]
        out.append(task.reward(problems[i], tokenizer.decode(ids)))
    return out


@torch.no_grad()
def prop55_on_policy(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Any,
    rhos: Sequence[float] = (1e-1, 1e-2, 1e-4, dvp.DEFAULT_RHO),
    *,
    n_trajectories: int = 1024,
    k: int = 4,
    batch_prompts: int = 32,
    seed: int = 0,
) -> list[Prop55Point]:
    """Evaluate Prop 5.5 on the states the policy actually visits (fp32 engine, no mismatch).

    Args:
        model, tokenizer, task: the policy and its task (rewards in [0, 1], so R_max = 1).
        rhos: ρ values to evaluate.
        n_trajectories: responses per ρ and per side (pruned / unpruned).
        k: samples per prompt.
        batch_prompts: prompts per generate call.
        seed: seeds prompts and sampling; the pruned and unpruned sides share prompts and seeds.

    Returns:
        One :class:`Prop55Point` per ρ.
    """
    from workbench.engines import TorchEngine, position_ids

    engine = TorchEngine(
        model, dtype="fp32", eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    horizon = task.max_new_tokens
    n_batches = -(-n_trajectories // (batch_prompts * k))
    out = []
    for rho in rhos:
        dvp.validate_rho(rho)
        rng = random.Random(seed)
        one_minus_z: list[torch.Tensor] = []
        prod_z: list[torch.Tensor] = []
        r_mp: list[float] = []
        r_full: list[float] = []
        for b in range(n_batches):
            problems = task.sample(batch_prompts, rng)
            prompts = [models.encode_prompt(tokenizer, p.prompt) for p in problems]
            ro = _sample(engine, prompts, k, horizon, rho, seed * 104729 + b)
            attn = ro.attention_mask
            logits = model(
                input_ids=ro.sequences, attention_mask=attn, position_ids=position_ids(attn)
            ).logits
            z = logits[:, ro.prompt_len - 1 : -1].float()  # (N, T, V)
            logz = dvp.token_stats(z, ro.tokens, rho).logz.double()  # (N, T)
            logz = torch.where(ro.mask, logz, 0.0)
            one_minus_z.append(-torch.expm1(logz)[ro.mask])
            prod_z.append(logz.sum(-1).exp())  # (N,) Π_t Z(s_t)
            r_mp += _rewards(task, tokenizer, problems, ro)
            r_full += _rewards(
                task, tokenizer, problems, _sample(engine, prompts, k, horizon, None, seed * 104729 + b)
            )
        omz = torch.cat(one_minus_z)
        gap = statistics.fmean(r_mp) - statistics.fmean(r_full)
        se = math.sqrt(statistics.variance(r_mp) / len(r_mp) + statistics.variance(r_full) / len(r_full))
        out.append(
            Prop55Point(
                rho=rho,
                horizon=horizon,
                n_states=int(omz.numel()),
                one_minus_z_mean=float(omz.mean()),
                one_minus_z_max=float(omz.max()),
                bound=bias_bound(float(omz.max()), horizon),
                tv_exact=float(1 - torch.cat(prod_z).mean()),
                j_gap=gap,
                j_gap_se=se,
            )
        )
    return out


#: Loss/advantage variants of the headline comparison (config overrides).
LOSS_VARIANTS: dict[str, dict[str, Any]] = {
    "rloo": {},
    "grpo": {"advantage": "grpo"},
    "ppo_clip": {"loss_type": "ppo_clip", "ppo_epochs": 2, "clip_eps": 0.2},
}


def loss_variants(
    scenario: str,
    arms: Sequence[str] = ("naive", "dvp_mis"),
    variants: Mapping[str, Mapping[str, Any]] = LOSS_VARIANTS,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int | None = None,
    quick: bool = False,
    *,
    out_dir: str | None = None,
    progress: bool = True,
    command: str = "",
) -> dict[str, ArmResults]:
    """Run ``arms`` of ``scenario`` under every loss variant; ``{variant: ArmResults}``.

    Results of variant ``v`` are saved under ``out_dir/v`` when ``out_dir`` is given.
    """
    out = {}
    for name, overrides in variants.items():
        out[name] = run_arms(
            scenario,
            list(arms),
            seeds,
            steps,
            quick,
            overrides=overrides,
            out_dir=None if out_dir is None else f"{out_dir}/{name}",
            progress=progress,
            command=command,
        )
    return out


def adaptive_rho(
    scenario: str,
    scales: Sequence[float] = (0.0, 0.5),
    seeds: Sequence[int] = (0, 1, 2),
    steps: int | None = None,
    quick: bool = False,
    *,
    out_dir: str | None = None,
    progress: bool = True,
    command: str = "",
) -> dict[str, ArmResults]:
    """DVP + MIS with ``rho_entropy_scale`` κ in ``scales`` (0 = the paper's fixed ρ), next to naive.

    ``log ρ(s) = log ρ₀ · (1 + κ H(s))``: the cut sits deeper in uncertain states (less pruning bias
    where the policy spreads its mass) and at the paper's ρ₀ in confident ones.
    """
    out = {}
    for kappa in scales:
        out[f"kappa={kappa:g}"] = run_arms(
            scenario,
            ["naive", "dvp_mis"] if kappa == 0 else ["dvp_mis"],
            seeds,
            steps,
            quick,
            overrides={"rho_entropy_scale": kappa} if kappa else None,
            out_dir=None if out_dir is None else f"{out_dir}/kappa{kappa:g}",
            progress=progress,
            command=command,
        )
    return out
