"""Checkers for the lesson exercises, ARENA style: one import for every lesson.

Each ``check_*`` runs the learner's function on a handful of seeded cases, compares the result with the
workbench's reference implementation, and either returns a :class:`Passed` (a green line in a notebook) or
raises :class:`ExerciseFailure` naming the case, the expected and returned values and — when the answer
matches a typical wrong one — the slip::

    from workbench.exercises import check_rloo_advantages

    def my_advantages(rewards, k):
        ...

    check_rloo_advantages(my_advantages)

=========================================  =================================================================
module                                     what it holds
=========================================  =================================================================
:mod:`~workbench.exercises.base`           :class:`ExerciseFailure`, :class:`Passed` and the helpers every
                                           checker is written with (:func:`call_learner`, :func:`as_tensor`,
                                           :func:`compare`, …): write a new checker from these
:mod:`~workbench.exercises.lessons_00_05`  the checkers of lessons 00–05 and :data:`EXERCISES`
:mod:`~workbench.exercises.lessons_06_10`  the checkers of lessons 06–10
=========================================  =================================================================
"""

from workbench.exercises.base import (
    ExerciseFailure,
    Passed,
    as_float,
    as_tensor,
    call_learner,
    close,
    compare,
    fmt,
    generator,
    show,
)
from workbench.exercises.lessons_00_05 import (
    EXERCISES,
    check_bias_identity,
    check_delta_by_bin,
    check_exact_bound,
    check_k1_k3,
    check_logprob_path_derivative,
    check_naive_config,
    check_pruned_logprob,
    check_retained_mass,
    check_rloo_advantages,
    check_safe_mask,
    check_sampled_delta,
    check_sequence_log_ratio,
    check_tail_summary,
    check_worst_case_perturbation,
)
from workbench.exercises.lessons_06_10 import (
    check_boundary_tokens,
    check_entropy_scaled_log_rho,
    check_envelope_eps,
    check_grpo_advantages,
    check_max_safe_rho,
    check_pg_loss,
    check_ppo_clip_loss,
    check_processed_log_ratio,
    check_safe_set_overlap,
    check_token_mis,
)

__all__ = [
    "EXERCISES",
    "ExerciseFailure",
    "Passed",
    "as_float",
    "as_tensor",
    "call_learner",
    "check_bias_identity",
    "check_boundary_tokens",
    "check_delta_by_bin",
    "check_entropy_scaled_log_rho",
    "check_envelope_eps",
    "check_exact_bound",
    "check_grpo_advantages",
    "check_k1_k3",
    "check_logprob_path_derivative",
    "check_max_safe_rho",
    "check_naive_config",
    "check_pg_loss",
    "check_ppo_clip_loss",
    "check_processed_log_ratio",
    "check_pruned_logprob",
    "check_retained_mass",
    "check_rloo_advantages",
    "check_safe_mask",
    "check_safe_set_overlap",
    "check_sampled_delta",
    "check_sequence_log_ratio",
    "check_tail_summary",
    "check_token_mis",
    "check_worst_case_perturbation",
    "close",
    "compare",
    "fmt",
    "generator",
    "show",
]
