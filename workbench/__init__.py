"""DVP Workbench: see, measure and fix training–inference mismatch in LLM reinforcement learning.

The package is organised by what each room does (see README.md, "Design"):

- :mod:`workbench.dvp` — the min-p safe vocabulary, masked token log-probs, retained mass, entropy.
- :mod:`workbench.importance` — token / sequence / geometric importance ratios, truncation, masking, veto.
- :mod:`workbench.rloo` — leave-one-out advantages and the policy-gradient loss.
- :mod:`workbench.metrics` — the mismatch metrics the field logs (k1, k3, chi², ESS, overlap, …).
- :mod:`workbench.theory` — sympy statements and numeric checks of Thm 4.1, Props 4.2, 4.3, 5.4, 5.5.
- :mod:`workbench.analysis` — measurements on logit rows behind the pictures of notebooks 01–05.
- :mod:`workbench.config` — :class:`RLOOConfig`, every knob of a run (data: importing it runs nothing).
- :mod:`workbench.models`, :mod:`workbench.tasks`, :mod:`workbench.engines`, :mod:`workbench.sft`,
  :mod:`workbench.trainer` — the RLOO trainer and everything it drives.

A notebook imports from a few front doors, not from the rooms behind them:

==============================  =====================================================================
``from workbench import …``     policies, tasks, engines, the trainer, tables (and the core modules
                                ``dvp``, ``importance``, ``rloo``, ``metrics``)
``workbench.analysis``          measurements on logit rows (the data behind notebooks 01–05)
``workbench.experiments``       presets, runs, the paper's checks, real logits (everything that *runs*)
``workbench.viz``               figures, explorers, dashboards, reports (everything that *draws*)
``workbench.exercises``         the lessons' checkers
``workbench.theory``            the theorems' statements and numeric checks
==============================  =====================================================================

The names below are imported lazily, on first use, so ``import workbench`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: The front door: each name, and the module that defines it.
_EXPORTS: dict[str, str] = {
    "RLOOConfig": "workbench.config",
    "RLOOTrainer": "workbench.trainer",
    **dict.fromkeys(
        ["available_policies", "encode_prompt", "load_policy", "pretrained_policy", "resolve_policy"],
        "workbench.models",
    ),
    **dict.fromkeys(["TorchEngine", "make_engine"], "workbench.engines"),
    **dict.fromkeys(
        ["VLLMEngine", "vllm_on_cpu", "vllm_unavailable_reason"], "workbench.engines.vllm_engine"
    ),
    "make_task": "workbench.tasks",
    **dict.fromkeys(["Table", "config_table", "environment_summary"], "workbench.docs"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a front-door name from its module on first use (PEP 562); submodules import as usual."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'workbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next lookup skips this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
