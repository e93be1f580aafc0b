"""Named run settings: *scenarios* (model, task, engine, perturbation) × *arms* (the correction).

A preset name is ``"<scenario>"`` (the DVP + MIS arm) or ``"<scenario>/<arm>"``; every arm of a
scenario shares model, task, seeds and engine, so arms differ only in how they treat mismatch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from workbench.trainer import RLOOConfig

#: How each arm treats mismatch (fields of :class:`~workbench.trainer.RLOOConfig`).
ARMS: dict[str, dict[str, Any]] = {
    # Naive RLOO: full vocabulary, no correction (what TRL's RLOOTrainer does).
    "naive": {"rho": None, "is_mode": "none", "veto": None},
    # Naive + untruncated token IS on the unmasked ratio.
    "naive_is": {"rho": None, "is_mode": "token_tis", "is_hi": 1e6, "veto": None},
    # Truncated token IS (cap 2), full vocabulary.
    "token_tis": {"rho": None, "is_mode": "token_tis", "is_hi": 2.0, "veto": None},
    # Sequence-level masked IS, full vocabulary.
    "seq_mis": {"rho": None, "is_mode": "seq_mis", "veto": None},
    # MIS without DVP (predicted not to fix a tail-driven collapse).
    "mis": {"rho": None, "is_mode": "token_mis", "veto": 1e-4},
    # DVP alone: min-p safe vocabulary (ρ = e^-13) on both sides, no IS.
    "dvp": {"rho": math.exp(-13), "is_mode": "none", "veto": None},
    # The paper's recipe: DVP + token MIS + veto.
    "dvp_mis": {"rho": math.exp(-13), "is_mode": "token_mis", "veto": 1e-4},
}

#: Shared settings of each scenario (arms are applied on top).
SCENARIOS: dict[str, dict[str, Any]] = {
    # No perturbation beyond fp32 vs fp32: the control.
    "clean": {"model": "add2", "task": "addition", "engine_dtype": "fp32", "lr": 3e-5},
    # bf16 engine weights vs fp32 trainer: the everyday mismatch of real RL stacks.
    "bf16": {"model": "add2", "task": "addition", "engine_dtype": "bf16", "lr": 3e-5},
}


def preset_names() -> list[str]:
    """Every valid preset name: scenarios and ``scenario/arm`` pairs."""
    return sorted(SCENARIOS) + [f"{s}/{a}" for s in sorted(SCENARIOS) for a in ARMS]


def make_config(name: str, **overrides: Any) -> RLOOConfig:
    """Build the :class:`RLOOConfig` of preset ``name`` (``scenario`` or ``scenario/arm``) with overrides."""
    scenario, _, arm = name.partition("/")
    arm = arm or "dvp_mis"
    if scenario not in SCENARIOS or arm not in ARMS:
        raise ValueError(
            f"preset={name!r} is unknown: scenarios {sorted(SCENARIOS)}, arms {sorted(ARMS)} "
            "(write 'scenario' or 'scenario/arm')"
        )
    fields: dict[str, Any] = {**SCENARIOS[scenario], **ARMS[arm], **overrides}
    return RLOOConfig(**fields)


def arm_configs(
    scenario: str, arms: Mapping[str, Any] | list[str] | None = None, **overrides: Any
) -> dict[str, RLOOConfig]:
    """Configs of several arms of one scenario, keyed by arm name (default: every arm)."""
    names = list(arms) if arms is not None else list(ARMS)
    return {a: make_config(f"{scenario}/{a}", **overrides) for a in names}
