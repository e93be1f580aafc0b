"""DVP Workbench: see, measure and fix training–inference mismatch in LLM reinforcement learning.

The package is organised by what each room does (see README.md, "Design"):

- :mod:`workbench.dvp` — the min-p safe vocabulary, masked token log-probs, retained mass, entropy.
- :mod:`workbench.importance` — token / sequence / geometric importance ratios, truncation, masking, veto.
- :mod:`workbench.rloo` — leave-one-out advantages and the policy-gradient loss.
- :mod:`workbench.metrics` — the mismatch metrics the field logs (k1, k3, chi², ESS, overlap, …).
- :mod:`workbench.theory` — sympy statements and numeric checks of Thm 4.1, Props 4.2, 4.3, 5.4, 5.5.
- :mod:`workbench.models`, :mod:`workbench.tasks`, :mod:`workbench.engines`, :mod:`workbench.sft`,
  :mod:`workbench.trainer` — the RLOO trainer and everything it drives.

Submodules are imported lazily so ``import workbench`` stays cheap.
"""

__version__ = "0.1.0"
