"""Experiments that reproduce the paper's claims at small scale, and the presets they use.

The front door for everything that *runs*: ``from workbench.experiments import …`` gives a notebook the
presets, the runs, the paper's checks and the real logits its explorers draw. Each returns data; the
figures of :mod:`workbench.viz` draw it (the CLI and the notebooks compose the two).

=============================================  ==============================================================
module                                         what it does
=============================================  ==============================================================
:mod:`~workbench.experiments.presets`          scenarios (engine, perturbation, policy) × arms (corrections)
:mod:`~workbench.experiments.collapse`         the collapse / degradation criterion, in code
:mod:`~workbench.experiments.runner`           multi-seed arms → ``results.json`` + ``summary.csv``
:mod:`~workbench.experiments.demo`             ``workbench demo``: naive vs DVP + MIS, the runs and their findings
:mod:`~workbench.experiments.real_logits`      sample a policy with an engine, score it with the trainer
:mod:`~workbench.experiments.signature`        check 1: Δ by p bin, positive mode with a CI, 2ε(1−p) envelope
:mod:`~workbench.experiments.overlap`          check 2: safe-set overlap and boundary-token rate
:mod:`~workbench.experiments.sweep`            check 3: the ρ sweep (training runs) and its U-shape test
:mod:`~workbench.experiments.beyond`           Prop 5.5 on measured Z, GRPO / PPO-clip, entropy-scaled ρ
:mod:`~workbench.experiments.horizon`          damage against response length (Theorem 4.1's accumulation)
:mod:`~workbench.experiments.diagnose`         ``workbench diagnose``: a model + engine's mismatch before training
=============================================  ==============================================================
"""

from workbench.experiments.beyond import LOSS_VARIANTS, adaptive_rho, loss_variants, prop55_on_policy
from workbench.experiments.collapse import CollapseCriterion, Verdict, classify
from workbench.experiments.diagnose import DiagnoseConfig, run_diagnosis
from workbench.experiments.horizon import HORIZON_SCENARIOS, horizon_rows, sequence_mismatch
from workbench.experiments.overlap import measure_overlap
from workbench.experiments.presets import (
    ARMS,
    HEADLINE_ARMS,
    HEADLINE_SCENARIO,
    PAPER_RHO,
    SCENARIOS,
    arm_configs,
    make_config,
    preset_names,
    run_length,
)
from workbench.experiments.real_logits import precision_logits, sample_policy, trainer_logits
from workbench.experiments.runner import (
    ArmResults,
    RunResult,
    atomic_write_text,
    load_results,
    resolve_model,
    run_arms,
    run_one,
)
from workbench.experiments.signature import engine_label, measure_signature
from workbench.experiments.sweep import load_sweep, rho_sweep, u_shape

__all__ = [
    "ARMS",
    "HEADLINE_ARMS",
    "HEADLINE_SCENARIO",
    "HORIZON_SCENARIOS",
    "LOSS_VARIANTS",
    "PAPER_RHO",
    "SCENARIOS",
    "ArmResults",
    "CollapseCriterion",
    "DiagnoseConfig",
    "RunResult",
    "Verdict",
    "adaptive_rho",
    "arm_configs",
    "atomic_write_text",
    "classify",
    "engine_label",
    "horizon_rows",
    "load_results",
    "load_sweep",
    "loss_variants",
    "make_config",
    "measure_overlap",
    "measure_signature",
    "precision_logits",
    "preset_names",
    "prop55_on_policy",
    "resolve_model",
    "rho_sweep",
    "run_arms",
    "run_diagnosis",
    "run_length",
    "run_one",
    "sample_policy",
    "sequence_mismatch",
    "trainer_logits",
    "u_shape",
]
