"""DVP + masked importance sampling inside existing distributed RL engines (TRL and verl).

The workbench's pure modules (:mod:`workbench.dvp`, :mod:`workbench.importance`, :mod:`workbench.rloo`,
:mod:`workbench.metrics`) do the math; these adapters only wire them into someone else's trainer:

- :mod:`workbench.integrations.trl` — :class:`~workbench.integrations.trl.DVPGRPOTrainer`, a TRL
  ``GRPOTrainer`` whose per-token log-probs are ``log π^mp`` (with ``min_p = ρ`` on the vLLM side), whose IS,
  advantages and loss are the workbench's, configured by :class:`~workbench.integrations.trl.DVPGRPOConfig`.
  Needs ``trl``.
- :mod:`workbench.integrations.verl` — the ``dvp_mis`` policy loss for verl's registry, the patches verl
  needs for DVP (log-probs from logits, min-p in vLLM), the matching ``rollout_correction`` settings and a
  config checker; ``verl_dvp_example.yaml`` is a multi-GPU example. Imports verl only lazily.

``import workbench.integrations`` needs neither framework: the names below load their module on first use.
lessons/11_production.md explains when to move and maps every setting and metric between the three trainers.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DVPGRPOConfig", "DVPGRPOTrainer", "VerlDVPConfig", "dvp_policy_loss", "engine_rollout_func"]

_LAZY = {
    "DVPGRPOConfig": "trl",
    "DVPGRPOTrainer": "trl",
    "engine_rollout_func": "trl",
    "VerlDVPConfig": "verl",
    "dvp_policy_loss": "verl",
}


def __getattr__(name: str) -> Any:
    """Load ``trl``/``verl`` adapters on first attribute access (PEP 562), so this package imports cheaply."""
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
