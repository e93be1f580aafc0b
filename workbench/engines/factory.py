"""Build a rollout engine by name: the one place that maps ``"torch"`` / ``"vllm"`` to an engine.

The trainer (:meth:`workbench.trainer.RLOOTrainer`) and ``workbench diagnose`` both build their engine
here, so an engine that works in one works in the other.
"""

from __future__ import annotations

from typing import Any

from workbench.engines.torch_engine import TorchEngine
from workbench.engines.vllm_engine import VLLMEngine

__all__ = ["ENGINE_KINDS", "make_engine"]

ENGINE_KINDS: tuple[str, ...] = ("torch", "vllm")
"""Engine names :func:`make_engine` accepts."""


def make_engine(
    kind: str, model: Any, tokenizer: Any, *, dtype: str = "bf16", perturbation: Any | None = None
) -> Any:
    """A rollout engine serving ``model`` at ``dtype``.

    Args:
        kind: ``"torch"`` (:class:`TorchEngine`: a rounded private copy of the model, emulated
            perturbations) or ``"vllm"`` (:meth:`VLLMEngine.from_trainer_model`: real vLLM on the saved
            weights; its mismatch is real, so ``perturbation`` must be ``None``).
        model, tokenizer: the trainer's policy (never modified).
        dtype: engine precision, ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        perturbation: a callable from :func:`workbench.engines.make_perturbation` (or ``None``).

    Raises:
        ValueError: unknown ``kind``.
        VLLMUnavailableError: ``kind="vllm"`` where vLLM cannot run (the message says what to install).
    """
    if kind == "vllm":
        return VLLMEngine.from_trainer_model(model, tokenizer, dtype=dtype, perturbation=perturbation)
    if kind == "torch":
        return TorchEngine(
            model,
            dtype=dtype,
            perturbation=perturbation,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    raise ValueError(f"engine={kind!r} must be one of {ENGINE_KINDS}; 'torch' runs anywhere")
