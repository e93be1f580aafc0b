"""Named run settings: *scenarios* (model, task, engine, perturbation) × *arms* (the correction).

A preset name is ``"<scenario>"`` (the DVP + MIS arm) or ``"<scenario>/<arm>"``; every arm of a
scenario shares model, task, seeds and engine, so arms differ only in how they treat mismatch (the
``control`` arm removes the mismatch instead: fp32 engine, no perturbation — the ceiling).

Each scenario also has a run length (:data:`LENGTHS`): full steps and the QUICK steps used by the
notebooks and CI. QUICK only shrinks sizes, never switches code paths (STYLE.md).

Which perturbation corresponds to what (lessons/LOG.md has the search that chose them):

==================  ====================================================================================
scenario            engine
==================  ====================================================================================
``clean``           fp32 weights, no perturbation: trainer and engine agree to ~1e-6 (the control)
``bf16``            bf16 weights — the everyday mismatch of real RL stacks (too small to reach the tail)
``floor``           bf16 + a probability floor at e^-13.5 of the max: an engine that cannot represent
                    tiny probabilities (a floored / underflow-guarded softmax) — the least physical model,
                    but the one that reliably samples the tail (the issue's head start). Just outside the
                    e^-13 safe set, so DVP's engine never samples the floored ids
``floor12``         the same floor at e^-12, *inside* the e^-13 safe set: DVP's engine samples the floored
                    ids too and only the trainer-side mask (boundary tokens) keeps them out of the loss —
                    the headline: naive RLOO's policy degrades, DVP's does not
``fp8``             bf16 + logits written on the fp8 e4m3 grid (an fp8 lm_head output)
``kvquant``         bf16 + a 4-bit KV cache (int4 KV-cache quantisation)
``gaussian``        bf16 + i.i.d. Gaussian logit noise σ (the paper's Prop 4.3 model) on the
                    label-smoothed policy, whose unused ids sit close enough to the max for σ to reach
``floor12_t64``     ``floor12`` with responses up to 64 tokens (six posed additions, ``multiadd6`` policy):
                    the second point of the horizon study (issue 14)
``floor12_t128``    the same with twelve posed additions (up to 124 tokens, ``multiadd12``): the third point
``floor12_t256``    the same with twenty-four (up to 244 tokens, ``multiadd24``): the longest point
``kvquant_t64``     ``kvquant`` (a 4-bit KV cache) at the T ≈ 64 horizon: the physical perturbation's point
``kvquant_t128``    the same at the T ≈ 128 horizon (``multiadd12``)
``vllm_bf16``       real vLLM (CPU build, or CUDA) serving the policy in bf16 against the fp32 trainer: no
                    emulation at all — the mismatch of a real engine (its ``control`` arm is fp32 vLLM)
``vllm_bf16_t64``   ``vllm_bf16`` at the T ≈ 64 horizon (``multiadd6``): the real engine's point of the study
==================  ====================================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from workbench.dvp import DEFAULT_RHO
from workbench.trainer import RLOOConfig

#: ρ of the paper's DVP: the one constant :data:`workbench.dvp.DEFAULT_RHO` (e^-13), under the name notebooks use.
PAPER_RHO = DEFAULT_RHO

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
    # MIS without DVP (predicted not to fix a tail-driven collapse), with the veto as it was run in
    # results/floor12_corrections.
    "mis": {"rho": None, "is_mode": "token_mis", "veto": 1e-4},
    # The engine still samples the full vocabulary; the trainer only drops the sampled tail tokens
    # (outside its e^-13 safe set) from the loss. Separates "the tail draw's own gradient" from
    # "the off-distribution context it leaves behind".
    "tail_drop": {"rho": PAPER_RHO, "engine_rho": None, "is_mode": "none", "veto": None},
    # DVP alone: min-p safe vocabulary (ρ = e^-13) on both sides, no IS.
    "dvp": {"rho": PAPER_RHO, "is_mode": "none", "veto": None},
    # The recipe: DVP + token MIS. Tokens outside the ratio window — boundary tokens included — are masked,
    # not vetoed: a sequence veto drops every sequence holding one such token (80 % of them at T ≈ 128 under
    # the floor) and left DVP + MIS below naive at every T ≥ 59 (lessons/LOG.md, 2026-12-05). Called
    # `dvp_mis_noveto` in results written before that change.
    "dvp_mis": {"rho": PAPER_RHO, "is_mode": "token_mis", "veto": None},
    # The same with a sequence veto at 1e-4: the recipe before 2026-12-05, called `dvp_mis` in results
    # written before then.
    "dvp_mis_veto": {"rho": PAPER_RHO, "is_mode": "token_mis", "veto": 1e-4},
    # DVP + MIS that also drops the rest of a sequence after its first boundary token: tests whether the
    # off-distribution text after a masked floored draw is what keeps `dvp_mis` below the control at long T.
    "dvp_mis_suffix": {"rho": PAPER_RHO, "is_mode": "token_mis", "veto": None, "drop_boundary_suffix": True},
    # No mismatch at all (fp32 engine, no perturbation), naive RLOO: the ceiling the others chase.
    "control": {"rho": None, "is_mode": "none", "veto": None, "engine_dtype": "fp32", "perturbation": None},
}

_MULTIADD: dict[str, Any] = {
    "model": "multiadd",
    "task": "multiadd",
    "task_kwargs": {"n_problems": 2, "digits": 2},
    "k": 4,
    "prompts_per_step": 16,
    # lr probe on the shipped policy (lessons/LOG.md, 02:00–02:10): 5e-5 learns nothing in 80 steps,
    # 3e-4 damages every arm within 10 steps, 1e-4 lets the clean control and DVP learn.
    "lr": 1e-4,
    "grad_clip": 1.0,
    "engine_dtype": "bf16",
    "eval_every": 10,
}


def _multiadd_long(n_problems: int) -> dict[str, Any]:
    """``_MULTIADD`` with ``n_problems`` posed additions on the ``multiadd<n_problems>`` warm start: the
    settings of one horizon-study point."""
    return {
        **_MULTIADD,
        "model": f"multiadd{n_problems}",
        "task_kwargs": {"n_problems": n_problems, "digits": 2},
    }


# Six posed additions on the `multiadd6` warm start: the T ≈ 64 point of the horizon study.
_MULTIADD_T64 = _multiadd_long(6)

#: Shared settings of each scenario (arms are applied on top).
SCENARIOS: dict[str, dict[str, Any]] = {
    # No perturbation beyond fp32 vs fp32: the control.
    "clean": {"model": "add2", "task": "addition", "engine_dtype": "fp32", "lr": 3e-5},
    # bf16 engine weights vs fp32 trainer: the everyday mismatch of real RL stacks.
    "bf16": {"model": "add2", "task": "addition", "engine_dtype": "bf16", "lr": 3e-5},
    # The head start: a probability floor 13.5 nats below the max, 24-token responses.
    "floor": {**_MULTIADD, "perturbation": "floor:13.5"},
    # A floor *inside* the safe set (12 nats < 13): the engine's floored tokens are in its own
    # safe set but outside the trainer's, so only the trainer-side mask (boundary tokens) catches them.
    "floor12": {**_MULTIADD, "perturbation": "floor:12"},
    # Logits written on the fp8 e4m3 grid (relative error 2^-4: tail logits move by up to ~1 nat).
    "fp8": {**_MULTIADD, "perturbation": "round:fp8_e4m3"},
    # A 4-bit KV cache: correlated error through attention.
    "kvquant": {**_MULTIADD, "perturbation": "kvquant:4"},
    # Gaussian logit noise (Prop 4.3) on the label-smoothed policy with a heavier tail.
    "gaussian": {**_MULTIADD, "model": "multiadd_smooth", "perturbation": "gaussian:0.5"},
    # Real vLLM in bf16, no emulated perturbation: what a real engine's mismatch does to the headline setup.
    "vllm_bf16": {**_MULTIADD, "engine": "vllm"},
    # The horizon study (issue 14): `floor12` at a longer horizon — six posed additions, responses up to 64
    # tokens, on the `multiadd6` warm start — then the int4 KV cache (the most physical perturbation that
    # reaches the tail) and the real bf16 engine at the same horizon.
    "floor12_t64": {**_MULTIADD_T64, "perturbation": "floor:12"},
    "kvquant_t64": {**_MULTIADD_T64, "perturbation": "kvquant:4"},
    "vllm_bf16_t64": {**_MULTIADD_T64, "engine": "vllm"},
    # The same at T ≈ 128: twelve posed additions (responses up to 124 tokens), `multiadd12` warm start.
    "floor12_t128": {**_multiadd_long(12), "perturbation": "floor:12"},
    "kvquant_t128": {**_multiadd_long(12), "perturbation": "kvquant:4"},
    # T ≈ 256: twenty-four posed additions (responses up to 244 tokens, the tiny model's 256 positions),
    # `multiadd24` warm start.
    "floor12_t256": {**_multiadd_long(24), "perturbation": "floor:12"},
}


@dataclass(frozen=True)
class RunLength:
    """Steps of a scenario's full run and of its QUICK version (notebooks, CI)."""

    steps: int
    """Steps per run of the full preset."""
    quick_steps: int
    """Steps per run of the QUICK preset."""


#: Run lengths per scenario (full, QUICK); scenarios not listed use :data:`DEFAULT_LENGTH`.
#: The multiadd scenarios run at ≈ 0.5–1 s/step on 2 idle cores (lessons/LOG.md has measured times).
LENGTHS: dict[str, RunLength] = {
    "clean": RunLength(100, 30),
    "bf16": RunLength(100, 30),
    # 150 steps: the clean-eval degradation of naive crosses the 0.10 criterion on 2–3 of 3 seeds (3/3 in the
    # 2026-12-05 run); at the QUICK 60 steps naive ends 0.05–0.08 below DVP + MIS on 3/3 seeds, under the line
    # (results/headline_floor12, results/README.md).
    "floor12": RunLength(150, 60),
}
DEFAULT_LENGTH = RunLength(150, 40)

#: The headline comparison of the demo and the README.
HEADLINE_SCENARIO = "floor12"
HEADLINE_ARMS: tuple[str, ...] = ("naive", "dvp_mis")


def run_length(scenario: str, quick: bool = False) -> int:
    """Steps per run of ``scenario`` (its QUICK length when ``quick``)."""
    _check_scenario(scenario)
    length = LENGTHS.get(scenario, DEFAULT_LENGTH)
    return length.quick_steps if quick else length.steps


def _check_scenario(scenario: str) -> None:
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario={scenario!r} is unknown: choose one of {sorted(SCENARIOS)}")


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
