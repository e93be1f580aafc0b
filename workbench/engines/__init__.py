"""Rollout engines behind one protocol, and the perturbation models that emulate engine error.

- :class:`Rollout` / :class:`RolloutEngine` — what an engine returns and the two methods the trainer
  calls (``generate``, ``sync_weights``); conventions in :mod:`workbench.engines.base`.
- :class:`TorchEngine` — CPU/GPU, fp32/bf16/fp16 weights, KV cache, min-p, emulated perturbations.
- :class:`VLLMEngine` — vLLM on a GPU with processed log-probs and in-place weight sync (optional extra).
- :func:`make_engine` — an engine by name (``"torch"`` / ``"vllm"``), as the trainer builds it.
- :mod:`workbench.engines.perturbations` — Gaussian logit noise, logit rounding, KV-cache quantisation,
  tail inflation, a probability floor; :func:`make_perturbation` builds one from a short spec.
"""

from workbench.engines.base import Rollout, RolloutEngine, left_pad, position_ids
from workbench.engines.factory import ENGINE_KINDS, make_engine
from workbench.engines.perturbations import (
    Compose,
    EntropyScaledMinP,
    GaussianLogitNoise,
    KVCacheQuant,
    LogitRounding,
    Perturbation,
    ProbabilityFloor,
    TailInflation,
    make_perturbation,
)
from workbench.engines.torch_engine import ENGINE_DTYPES, TorchEngine
from workbench.engines.vllm_engine import VLLMEngine, VLLMUnavailableError, rollout_from_vllm_outputs

__all__ = [
    "ENGINE_DTYPES",
    "ENGINE_KINDS",
    "Compose",
    "EntropyScaledMinP",
    "GaussianLogitNoise",
    "KVCacheQuant",
    "LogitRounding",
    "Perturbation",
    "ProbabilityFloor",
    "Rollout",
    "RolloutEngine",
    "TailInflation",
    "TorchEngine",
    "VLLMEngine",
    "VLLMUnavailableError",
    "left_pad",
    "make_engine",
    "make_perturbation",
    "position_ids",
    "rollout_from_vllm_outputs",
]
