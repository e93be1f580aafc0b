"""VLLMEngine: rollouts from vLLM on a GPU, with in-place weight sync and processed log-probs.

vLLM is an optional extra (``pip install -e '.[vllm]'``, CUDA only); it is imported lazily, so this
module imports everywhere and fails with a clear message only when an engine is built without it.

What the engine does, and where each piece comes from:

- ``LLM(..., logprobs_mode="processed_logprobs")`` so the returned log-probs are those of the
  distribution vLLM sampled from (temperature and min-p applied, renormalised) — the same quantity
  as :class:`~workbench.engines.TorchEngine`'s and the trainer's ``log π^mp``. TRL sets the same mode
  "so temperature scaling/logit tweaking affects the TIS log probs" (``trl/generation/vllm_generation.py``).
- ``SamplingParams(min_p=ρ, logprobs=0, ...)``: vLLM's min-p keeps tokens with ``p ≥ min_p · p_max``,
  the same rule as :func:`workbench.dvp.safe_mask`; ``logprobs=0`` returns only the sampled token's
  log-prob. With ``n`` samples per request vLLM seeds child ``j`` with ``seed + j``
  (``vllm/v1/engine/parallel_sampling.py``), so request ``i`` gets seed ``base + i·n``.
- Weight sync after each optimiser step, in place: ``LLM.apply_model(fn)`` (vLLM ≥ 0.10: "Run a
  function directly on the model inside each worker") calling the vLLM model's ``load_weights`` with
  ``(name, tensor)`` pairs, as TRL's colocate mode does
  (``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights``, used here as the
  fallback for older vLLM), then ``llm.reset_prefix_cache()`` so no KV block computed with the old
  weights is reused. The engine core runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the
  function and the tensors are not pickled.
- :func:`rollout_from_vllm_outputs` converts vLLM's ``RequestOutput`` objects into a
  :class:`~workbench.engines.base.Rollout` (pure Python, tested on CPU with stand-in objects).
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from workbench.dvp import validate_rho
from workbench.engines.base import Rollout, check_generate_args, left_pad

__all__ = ["VLLMEngine", "VLLMUnavailableError", "rollout_from_vllm_outputs", "vllm_unavailable_reason"]

_VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class VLLMUnavailableError(ImportError):
    """vLLM or a CUDA GPU is missing; the message says how to get them or what to use instead."""


def vllm_unavailable_reason() -> str | None:
    """Why a :class:`VLLMEngine` cannot be built here (``None`` when it can)."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed: `pip install -e '.[vllm]'` on a machine with a CUDA GPU"
    if not torch.cuda.is_available():
        return "vLLM needs a CUDA GPU and torch sees none"
    return None


def _sampled_logprob(entry: Any, token: int, row: int, pos: int) -> float:
    """The sampled token's log-prob from one position's logprobs entry (a ``{id: Logprob}`` mapping)."""
    if entry is None:
        raise ValueError(f"completion {row}: no logprobs at position {pos}; use SamplingParams(logprobs=0)")
    try:
        item = entry[token]
    except (KeyError, IndexError, TypeError):
        raise ValueError(
            f"completion {row}: the logprobs at position {pos} do not include the sampled token {token}"
        ) from None
    value = float(getattr(item, "logprob", item))
    if math.isnan(value) or value > 1e-4:
        raise ValueError(
            f"completion {row}: log-prob {value} of token {token} at position {pos} is not a log-prob"
        )
    return value


def rollout_from_vllm_outputs(
    outputs: Sequence[Any],
    prompts: Sequence[Sequence[int]],
    n: int,
    *,
    pad_token_id: int,
    eos_token_id: int | None = None,
    device: torch.device | str = "cpu",
) -> Rollout:
    """Convert vLLM ``RequestOutput`` objects (one per prompt, ``n`` completions each) into a Rollout.

    Only the attributes vLLM documents are read: ``RequestOutput.outputs`` (list of
    ``CompletionOutput``), ``CompletionOutput.index``, ``.token_ids`` and ``.logprobs`` (one
    ``{token_id: Logprob}`` mapping per generated token; plain floats are accepted too). Completions
    are ordered by ``index``. Tokens after the first eos are dropped (eos itself is kept, valid).

    Args:
        outputs: what ``LLM.generate`` returned, in prompt order.
        prompts: the prompts sent (their lengths set the left padding).
        n: completions per prompt.
        pad_token_id: id for the padding (prompt and after eos).
        eos_token_id: the stop id (``None``: keep every returned token).
        device: where the Rollout's tensors go.

    Returns:
        A :class:`Rollout` with ``safe_size=None`` (vLLM does not report the safe-set size).

    Raises:
        ValueError: counts do not match, or log-probs are missing / not log-probs.
    """
    if len(outputs) != len(prompts):
        raise ValueError(f"got {len(outputs)} request outputs for {len(prompts)} prompts; pass them in order")
    rows_tokens: list[list[int]] = []
    rows_logps: list[list[float]] = []
    for i, request in enumerate(outputs):
        completions = sorted(request.outputs, key=lambda c: getattr(c, "index", 0))
        if len(completions) != n:
            raise ValueError(f"prompt {i}: vLLM returned {len(completions)} completions, expected n={n}")
        for completion in completions:
            row = len(rows_tokens)
            token_ids = [int(t) for t in completion.token_ids]
            if eos_token_id is not None and eos_token_id in token_ids:
                token_ids = token_ids[: token_ids.index(eos_token_id) + 1]
            entries = completion.logprobs
            if entries is None or len(entries) < len(token_ids):
                got = None if entries is None else len(entries)
                raise ValueError(
                    f"completion {row}: {got} logprob entries for {len(token_ids)} tokens; "
                    "generate with SamplingParams(logprobs=0)"
                )
            rows_logps.append([_sampled_logprob(entries[p], t, row, p) for p, t in enumerate(token_ids)])
            rows_tokens.append(token_ids)

    input_ids, prompt_mask, prompt_index = left_pad(prompts, pad_token_id, n)
    rows = len(rows_tokens)
    width = max(1, max(len(r) for r in rows_tokens))
    tokens = torch.full((rows, width), pad_token_id, dtype=torch.long)  # (N, T)
    logprobs = torch.zeros(rows, width, dtype=torch.float32)  # (N, T)
    mask = torch.zeros(rows, width, dtype=torch.bool)  # (N, T)
    for r, (ids, lps) in enumerate(zip(rows_tokens, rows_logps)):
        tokens[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        logprobs[r, : len(lps)] = torch.tensor(lps, dtype=torch.float32)
        mask[r, : len(ids)] = True
    rollout = Rollout(
        sequences=torch.cat([input_ids, tokens], dim=1),
        attention_mask=torch.cat([prompt_mask, mask.long()], dim=1),
        prompt_len=int(input_ids.shape[1]),
        tokens=tokens,
        logprobs=logprobs,
        mask=mask,
        lengths=mask.sum(-1),
        safe_size=None,
        prompt_index=prompt_index,
    )
    return rollout.to(device)


def _state_items(model: Any) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs for vLLM's ``load_weights`` (HF names; vLLM maps and fuses them)."""
    return [(name, t.detach()) for name, t in model.state_dict().items()]


class VLLMEngine:
    """Rollouts from ``vllm.LLM`` on the policy's weights (GPU only).

    Args:
        model_path: a local Hugging Face model directory (``workbench.models.save_policy`` writes one).
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``: vLLM's weight and compute precision.
        gpu_memory_utilization: fraction of the GPU vLLM may take (leave room for the trainer).
        eos_token_id, pad_token_id: default to the model config's ids.
        perturbation: must be ``None``: vLLM's mismatch is real, not emulated.
        seed: engine-level seed (per-call seeds come from ``generate``).
        enforce_eager: skip CUDA-graph capture (faster start, right for tiny models).
        max_model_len: longest prompt + response (default: the model's).
        **llm_kwargs: passed to ``vllm.LLM``.

    Raises:
        VLLMUnavailableError: vllm is not installed or no CUDA GPU is visible.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "bf16",
        gpu_memory_utilization: float = 0.3,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        perturbation: Any | None = None,
        seed: int = 0,
        enforce_eager: bool = True,
        max_model_len: int | None = None,
        **llm_kwargs: Any,
    ) -> None:
        if dtype not in _VLLM_DTYPES:
            raise ValueError(f"dtype={dtype!r} must be one of {tuple(_VLLM_DTYPES)}")
        if perturbation is not None:
            raise ValueError(
                f"perturbation={perturbation!s} is not supported by VLLMEngine (its mismatch is real); "
                "use TorchEngine to emulate one, or pass perturbation=None"
            )
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization!r} must be in (0, 1], e.g. 0.3")
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model_path={str(path)!r} is not a Hugging Face model directory (no config.json)"
            )
        reason = vllm_unavailable_reason()
        if reason is not None:
            raise VLLMUnavailableError(f"VLLMEngine: {reason}; on CPU use TorchEngine instead")
        # In-process engine core: apply_model then reaches the weights without pickling tensors.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import vllm
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        self.eos_token_id = config.eos_token_id if eos_token_id is None else eos_token_id
        if isinstance(self.eos_token_id, (list, tuple)):
            self.eos_token_id = self.eos_token_id[0] if self.eos_token_id else None
        self.pad_token_id = config.pad_token_id if pad_token_id is None else pad_token_id
        if self.pad_token_id is None:
            raise ValueError(
                "pad_token_id is None in the model config; pass VLLMEngine(..., pad_token_id=...)"
            )
        self.model_path = path
        self.dtype = dtype
        self.perturbation = None
        self.llm = vllm.LLM(
            model=str(path),
            dtype=_VLLM_DTYPES[dtype],
            gpu_memory_utilization=gpu_memory_utilization,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
            seed=seed,
            enforce_eager=enforce_eager,
            max_model_len=max_model_len,
            **llm_kwargs,
        )
        self._sampling_params = vllm.SamplingParams

    @classmethod
    def from_trainer_model(
        cls,
        model: Any,
        tokenizer: Any,
        *,
        dtype: str = "bf16",
        perturbation: Any | None = None,
        **kwargs: Any,
    ) -> VLLMEngine:
        """Save ``model`` and ``tokenizer`` to a temporary directory and start vLLM on it.

        The directory is removed when the engine is garbage-collected.
        """
        reason = vllm_unavailable_reason()
        if reason is not None:
            raise VLLMUnavailableError(f"VLLMEngine: {reason}; on CPU use TorchEngine instead")
        tmp = tempfile.mkdtemp(prefix="workbench-vllm-")
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
            kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
            engine = cls(tmp, dtype=dtype, perturbation=perturbation, **kwargs)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        weakref.finalize(engine, shutil.rmtree, tmp, True)
        return engine

    def __repr__(self) -> str:
        return f"VLLMEngine(model_path={str(self.model_path)!r}, dtype={self.dtype!r})"

    def generate(
        self,
        prompts: list[list[int]],
        n: int = 1,
        max_tokens: int = 32,
        rho: float | None = None,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> Rollout:
        """Sample ``n`` responses per prompt with vLLM (same contract as ``TorchEngine.generate``)."""
        check_generate_args(prompts, n, max_tokens, temperature, seed)
        validate_rho(rho)
        base = seed * 1_000_003
        params = [
            self._sampling_params(
                n=n,
                max_tokens=max_tokens,
                temperature=float(temperature),
                min_p=0.0 if rho is None else float(rho),
                top_p=1.0,
                seed=(base + i * n) % (2**31 - 1),
                logprobs=0,
                stop_token_ids=None if self.eos_token_id is None else [self.eos_token_id],
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        requests = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        return rollout_from_vllm_outputs(
            outputs, prompts, n, pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id
        )

    def sync_weights(self, model: Any) -> None:
        """Load ``model``'s current weights into vLLM in place, then drop the stale prefix cache."""
        weights = _state_items(model)

        def load(vllm_model: Any) -> None:
            vllm_model.load_weights(weights)

        if hasattr(self.llm, "apply_model"):
            self.llm.apply_model(load)
        else:  # vLLM < 0.10 (the path TRL's colocate mode used)
            load(self.llm.llm_engine.model_executor.driver_worker.model_runner.model)
        self.llm.reset_prefix_cache()
