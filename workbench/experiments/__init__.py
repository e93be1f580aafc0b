"""Experiments that reproduce the paper's claims at small scale, and the presets they use.

==========================================  ==============================================================
module                                      what it does
==========================================  ==============================================================
:mod:`~workbench.experiments.presets`       scenarios (engine, perturbation, policy) × arms (corrections)
:mod:`~workbench.experiments.collapse`      the collapse / degradation criterion, in code
:mod:`~workbench.experiments.runner`        multi-seed arms → ``results.json`` + ``summary.csv``
:mod:`~workbench.experiments.demo`          ``workbench demo``: naive vs DVP + MIS, table + HTML report
:mod:`~workbench.experiments.signature`     check 1: Δ by p bin, positive mode with a CI, 2ε(1−p) envelope
:mod:`~workbench.experiments.overlap`       check 2: safe-set overlap and boundary-token rate
:mod:`~workbench.experiments.sweep`         check 3: the ρ sweep and its U-shape test
:mod:`~workbench.experiments.beyond`        Prop 5.5 on measured Z, GRPO / PPO-clip, entropy-scaled ρ
==========================================  ==============================================================
"""

from workbench.experiments.collapse import CollapseCriterion, Verdict, classify
from workbench.experiments.presets import (
    ARMS,
    HEADLINE_ARMS,
    HEADLINE_SCENARIO,
    SCENARIOS,
    arm_configs,
    make_config,
    preset_names,
    run_length,
)
from workbench.experiments.runner import ArmResults, RunResult, load_results, run_arms, run_one

__all__ = [
    "ARMS",
    "HEADLINE_ARMS",
    "HEADLINE_SCENARIO",
    "SCENARIOS",
    "ArmResults",
    "CollapseCriterion",
    "RunResult",
    "Verdict",
    "arm_configs",
    "classify",
    "load_results",
    "make_config",
    "preset_names",
    "run_arms",
    "run_length",
    "run_one",
]
