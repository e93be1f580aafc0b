"""Experiments that reproduce the paper's claims at small scale, and the presets they use."""

from workbench.experiments.presets import ARMS, SCENARIOS, arm_configs, make_config, preset_names

__all__ = ["ARMS", "SCENARIOS", "arm_configs", "make_config", "preset_names"]
