"""sympy statements, derivations and numeric checks of the propositions behind DVP (THEORY.md).

Each ``check_*`` function states one result exactly as THEORY.md writes it, derives what sympy can prove on a
small symbolic instance (3–4 logits, a two-step tree), marks every step it does not prove as an explicit
assumption, and cross-checks the statement numerically against the torch code in :mod:`workbench.dvp`
(``token_logprobs``, ``retained_mass``, ``safe_mask``) on seeded random instances. Each returns a
:class:`Check` that renders in a notebook (``_repr_markdown_``, ``_repr_latex_``) and serialises to JSON
(``to_dict()``).

=========================  =========================================================  ===============
check                      statement                                                  status
=========================  =========================================================  ===============
:func:`check_thm41`        bias ``E_μ[g] − E_π[g] = E_μ[(1 − e^{−S}) g]``, O(T²Δ_max)   reconstructed
:func:`check_prop42`       ``|Δ_a| ≤ 2ε(1 − p_a)`` (first order), exact form          quoted by reviews
:func:`check_prop43`       ``Mode[Δ'_a | sampled] ≈ σ²[(1−p_a)(1−p'_a)+Σ p_k p'_k]``  quoted by reviews
:func:`check_prop54`       ``D_TV(π, π^mp) = 1 − Z ≤ |V| ρ``                          reconstructed
:func:`check_prop55`       ``|J_mp − J| ≤ R_max T (1 − Z_min)``                       as in THEORY.md
=========================  =========================================================  ===============

**Reconstructions.** The paper's full text was not available: Theorem 4.1 and Proposition 5.4 are the
workbench's reconstructions (THEORY.md), derived to match the abstract and the quoted bounds; their checks carry
``reconstructed=True`` and say so in their notes. Propositions 4.2 and 4.3 are as two reviews of the paper quote
them. Proposition 4.3 is a statement about the *mode* of ``Δ'_a = log π_infer − log π_train`` (the paper's own Δ
has the opposite sign); its check verifies the mode at the posterior-mode perturbation and, as a complement, the
second-order conditional mean ``σ²(½ − 2p_a + (3/2)Σ p_b²)`` (see :mod:`workbench.theory.prop43`).

Every check takes ``scale`` (default 1): it multiplies the statement's right-hand side. Anything but 1 is a
deliberately wrong statement, and the check must fail on it — the tests use ``scale=0.5`` to show that both the
symbolic and the numeric side can fail.

Example (in a notebook, each ``Check`` renders itself)::

    from IPython.display import Markdown
    from workbench.theory import all_checks, summary_markdown
    checks = all_checks(seed=0)
    Markdown(summary_markdown(checks))
    checks[1]  # Proposition 4.2: statement, derivation steps, numeric cross-checks
"""

from __future__ import annotations

from collections.abc import Callable

from workbench.theory.core import Check, Step, TreePolicy, summary_markdown
from workbench.theory.prop42 import check_prop42, logit_error, prop42_envelope
from workbench.theory.prop43 import (
    SIGN_CONVENTION,
    check_prop43,
    mode_mismatch,
    posterior_mode_perturbation,
    second_order_conditional_mean,
)
from workbench.theory.prop54 import check_prop54
from workbench.theory.prop55 import check_prop55
from workbench.theory.thm41 import check_thm41

__all__ = [
    "CHECKS",
    "SIGN_CONVENTION",
    "Check",
    "Step",
    "TreePolicy",
    "all_checks",
    "check_prop42",
    "check_prop43",
    "check_prop54",
    "check_prop55",
    "check_thm41",
    "logit_error",
    "mode_mismatch",
    "posterior_mode_perturbation",
    "prop42_envelope",
    "second_order_conditional_mean",
    "summary_markdown",
]

CHECKS: dict[str, Callable[..., Check]] = {
    "thm_4_1": check_thm41,
    "prop_4_2": check_prop42,
    "prop_4_3": check_prop43,
    "prop_5_4": check_prop54,
    "prop_5_5": check_prop55,
}
"""Every check by name, in paper order; each is called as ``fn(seed, scale=1.0)``."""


def all_checks(seed: int = 0) -> list[Check]:
    """Run every check (Theorem 4.1, Propositions 4.2, 4.3, 5.4, 5.5) with ``seed``; a few seconds each on CPU.

    Args:
        seed: seeds every check's ``torch.Generator``.

    Returns:
        The :class:`Check` results in paper order; ``all(c.passed for c in result)`` is the verdict.
    """
    return [fn(seed) for fn in CHECKS.values()]
